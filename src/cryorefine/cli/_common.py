"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryorefine.io.stacks import ChunkFunc, ParticleStack, write_stack


def write_processed(stack: ParticleStack, args: argparse.Namespace, run: ChunkFunc) -> list[Path]:
    """Stream ``stack`` through ``run`` chunk by chunk into ``args.output``; close the stack."""
    try:
        return write_stack(
            stack, args.output, overwrite=args.overwrite, chunk_size=args.chunk, process=run
        )
    finally:
        stack.close()

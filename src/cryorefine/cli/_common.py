"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryorefine.io.stacks import ChunkFunc, ParticleStack, write_stack
from cryorefine.registry import Registry


def registered(registry: Registry) -> str:
    """For a help text: the names ``registry`` holds (what ``cryorefine help KIND``
    details), so that the list cannot fall behind what is registered."""
    names = ", ".join(registry.names())
    return f"{names}; see cryorefine help {registry.kind}".replace("%", "%%")


def write_processed(stack: ParticleStack, args: argparse.Namespace, run: ChunkFunc) -> list[Path]:
    """Stream ``stack`` through ``run`` chunk by chunk into ``args.output``; close the stack."""
    try:
        return write_stack(
            stack, args.output, overwrite=args.overwrite, chunk_size=args.chunk, process=run
        )
    finally:
        stack.close()

"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

from cryorefine.io.stacks import ChunkFunc, ParticleStack, write_stack
from cryorefine.registry import Registry


def registered(registry: Registry) -> str:
    """:meth:`Registry.help_list`, escaped for argparse."""
    return registry.help_list().replace("%", "%%")


def write_processed(stack: ParticleStack, args: argparse.Namespace, run: ChunkFunc) -> list[Path]:
    """Stream ``stack`` through ``run`` chunk by chunk into ``args.output``; close the stack."""
    try:
        return write_stack(
            stack, args.output, overwrite=args.overwrite, chunk_size=args.chunk, process=run
        )
    finally:
        stack.close()

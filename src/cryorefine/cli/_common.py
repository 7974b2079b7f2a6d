"""Helpers shared by the subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cryorefine.config import StageOptions, option_help, option_type
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


def add_config_arguments(parser: argparse.ArgumentParser, config: type[StageOptions]) -> None:
    """A flag for each option of stage ``config``, as its fields declare them
    (:func:`cryorefine.config.option`); the value goes to ``args.FIELD``."""
    flags = config.flags()
    for f in config.options():
        flag = flags[f.name]
        kind = option_type(config, f)
        meta = {"dest": f.name, "help": option_help(f, flags).replace("%", "%%")}
        if kind is bool:
            action = "store_false" if f.default else "store_true"
            parser.add_argument(flag, action=action, **meta)
            continue
        metavar = f.metadata["metavar"] or flag.lstrip("-").upper()
        if kind is tuple:
            parser.add_argument(flag, action="append", default=[], metavar=metavar, **meta)
            continue
        if f.default is not None:
            meta["help"] += f" (default {f.default})".replace("%", "%%")
        parser.add_argument(flag, type=kind, default=f.default, metavar=metavar, **meta)


def config_from_args(config: type[StageOptions], args: argparse.Namespace) -> Any:
    """The ``config`` of the options parsed by :func:`add_config_arguments`."""
    values = {f.name: getattr(args, f.name) for f in config.options()}
    return config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

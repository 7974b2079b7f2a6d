"""List the EMAN2 objects of one kind (processors, ...) with their parameters.

Kinds: processors, comparators, aligners, averagers, reconstructors, projectors,
orientgens.

examples:
  cryorefine help processors
  cryorefine help processors filter.lowpass.gauss
"""

from __future__ import annotations

import argparse
import textwrap

from cryorefine import config  # noqa: F401  (fills the registries)
from cryorefine.registry import REGISTRIES


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=sorted(REGISTRIES), help="which kind of object")
    parser.add_argument("name", nargs="?", help="show only this one")


def main(args: argparse.Namespace) -> int:
    registry = REGISTRIES[args.kind]
    entries = [registry.get(args.name, option="help")] if args.name else registry.entries()
    if not entries:
        print(f"no {args.kind} are available in this version")
        return 0
    for e in entries:
        print(e.name + (f"  (also: {', '.join(e.aliases)})" if e.aliases else ""))
        print(textwrap.indent(textwrap.fill(e.help, 76), "    "))
        for p in e.params:
            default = (
                "required"
                if p.required
                else ("unset" if p.default is None else f"default {p.default}")
            )
            print(f"      {p.name} ({p.type.__name__}, {default}): {p.help}")
    return 0

"""Similarity matrix: every particle aligned to and scored against every projection (e2simmx).

Positional arguments as e2simmx: the projections (columns), the particles (rows) and
the output, as e2simmx --saveali writes it: an EMAN2 .hdf stack of 6 images of
projections columns by particles rows (score, dx, dy, dalpha, flip, scale).
Scores: smaller is better. (dx, dy, dalpha, flip) bring the particle onto the
projection: rotate about the centre, shift (full-size px), mirror x.
The default aligner runs on the batched engine: footprint rotation search for all
pairs at once, then the translation of 4 candidates per pair.

examples:
  cryorefine simmx projections.hdf particles.star simmx.hdf
  cryorefine simmx proj.mrcs ptcl.star simmx.hdf --align rotate_translate_flip:maxshift=3 \\
      --aligncmp ccc --cmp frc:zeromask=1:snrweight=1 --ralign refine --raligncmp ccc
  cryorefine simmx proj.mrcs ptcl.star simmx.hdf --twostage 2 --shrink 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryorefine.cli._common import add_config_arguments, config_from_args
from cryorefine.config import SimmxConfig
from cryorefine.stages.simmx import run_simmx

#: takes --parallel: its chunks run where it says (cryorefine.parallel)
PARALLEL = True


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("projections", type=Path, help="reference projections (columns)")
    parser.add_argument("particles", type=Path, help="particle stack (rows)")
    parser.add_argument("output", type=Path, help="similarity matrix (.hdf)")
    add_config_arguments(parser, SimmxConfig)
    parser.add_argument(
        "--usefilt",
        type=Path,
        help="align and score this stack instead (same particles, e.g. filtered)",
    )
    parser.add_argument(
        "--exclude", type=Path, help="text file of particle rows to skip (they get the worst score)"
    )
    parser.add_argument("--overwrite", "-f", action="store_true", help="replace an existing output")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(SimmxConfig, args)
    n_p, nc = run_simmx(
        args.projections,
        args.particles,
        args.output,
        cfg,
        exclude=args.exclude,
        usefilt=args.usefilt,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.output}: {n_p} particles x {nc} projections")
    return 0

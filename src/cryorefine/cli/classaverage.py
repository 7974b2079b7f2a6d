"""Align and average the particles of each class, rejecting the worst (e2classaverage).

Each class (one per projection of --ref) averages the particles the classification
assigned to it: round 0 uses the classification's alignment, each of --iter rounds
realigns every member to the running average, scores it (--cmp) and leaves out the
worst (--keep, --keepsig); the final average is aligned to its projection. No
particle is lost: a class of one member gives that member, aligned; an empty class
gives a zero image with ptcl_repr 0. Output: one average per class number (.hdf with
EMAN2 headers; .star + .mrcs with the orientation, rlnClassNumber and our crPtclRepr,
crClassPtclIdxs and crExcClassPtclIdxs columns), and with --resultmx the
classification with used flags and final alignments.

examples:
  cryorefine classaverage --input particles.star --classmx classify.hdf \\
      --ref projections.star --output classes.star --resultmx cls_result.hdf
  cryorefine classaverage --input particles.star --classmx classify.hdf \\
      --ref projections.star --output classes.hdf --averager ctf.weight --keep 0.9
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryorefine.cli._common import add_config_arguments, config_from_args
from cryorefine.config import ClassaverageConfig
from cryorefine.stages.classaverage import run_classaverage

#: takes --parallel: its chunks run where it says (cryorefine.parallel)
PARALLEL = True


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, required=True, help="particle stack")
    parser.add_argument(
        "--classmx",
        type=Path,
        required=True,
        help="classification matrix (cryorefine classify or e2classify.py)",
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="class averages (.star, .mrcs, .hdf)"
    )
    parser.add_argument("--ref", type=Path, help="the projections the classes refer to")
    parser.add_argument("--resultmx", type=Path, help="write the updated classification (.hdf)")
    parser.add_argument("--usefilt", type=Path, help="filtered particles used for alignment")
    parser.add_argument("--apix", type=float, help="Å/pixel (default: the particles' header)")
    add_config_arguments(parser, ClassaverageConfig)
    parser.add_argument(
        "--storebad", action="store_true", help="accepted: every class number always gets an image"
    )
    parser.add_argument("--overwrite", "-f", action="store_true", help="replace existing outputs")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(ClassaverageConfig, args)
    ca = run_classaverage(
        args.input,
        args.classmx,
        args.output,
        cfg,
        ref=args.ref,
        resultmx=args.resultmx,
        usefilt=args.usefilt,
        apix=args.apix,
        overwrite=args.overwrite,
    )
    used = int(ca.used.sum())
    print(
        f"wrote {args.output}: {len(ca.images)} classes ({int((ca.ptcl_repr > 0).sum())} "
        f"non-empty) from {len(ca.used)} memberships, {used} in the averages"
    )
    return 0

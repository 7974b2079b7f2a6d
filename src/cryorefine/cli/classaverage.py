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
  cryorefine classaverage --input particles.star --classmx classmx.h5 \\
      --ref projections.star --output classes.star --resultmx cls_result.h5
  cryorefine classaverage --input particles.star --classmx classmx.h5 \\
      --ref projections.star --output classes.hdf --averager ctf.weight --keep 0.9
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryorefine.cli._common import registered
from cryorefine.config import ClassaverageConfig
from cryorefine.registry import ALIGNERS, AVERAGERS, COMPARATORS
from cryorefine.stages.classaverage import run_classaverage

_D = ClassaverageConfig()


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, required=True, help="particle stack")
    parser.add_argument("--classmx", type=Path, required=True, help="classify output (.h5)")
    parser.add_argument(
        "--output", type=Path, required=True, help="class averages (.star, .mrcs, .hdf)"
    )
    parser.add_argument("--ref", type=Path, help="the projections the classes refer to")
    parser.add_argument("--resultmx", type=Path, help="write the updated classification (.h5)")
    parser.add_argument("--usefilt", type=Path, help="filtered particles used for alignment")
    parser.add_argument("--apix", type=float, help="Å/pixel (default: the particles' header)")
    parser.add_argument(
        "--iter", type=int, default=_D.iterations, help="alignment rounds (default %(default)s)"
    )
    parser.add_argument(
        "--keep",
        type=float,
        default=_D.keep,
        help="fraction kept, or sigmas with --keepsig (default %(default)s)",
    )
    parser.add_argument("--keepsig", action="store_true", help="--keep counts standard deviations")
    parser.add_argument(
        "--align",
        default=_D.align,
        help=f"aligner (default %(default)s): {registered(ALIGNERS)}",
    )
    parser.add_argument(
        "--aligncmp",
        default=_D.aligncmp,
        help=f"its comparator (default %(default)s): {registered(COMPARATORS)}",
    )
    parser.add_argument(
        "--ralign", help=f"refining aligner run after --align: {registered(ALIGNERS)}"
    )
    parser.add_argument(
        "--raligncmp", default=_D.raligncmp, help="its comparator (default %(default)s)"
    )
    parser.add_argument(
        "--cmp", default=_D.cmp, help="comparator rating members (default %(default)s)"
    )
    parser.add_argument(
        "--averager",
        default=_D.averager,
        help=f"averager (default %(default)s): {registered(AVERAGERS)}",
    )
    parser.add_argument(
        "--normproc",
        default=_D.normproc,
        help="normalisation of members (default %(default)s; none): a processor, see "
        "cryorefine help processors",
    )
    parser.add_argument(
        "--setsfref", action="store_true", help="give each average its projection's spectrum"
    )
    parser.add_argument(
        "--automask", action="store_true", help="2D automask of the running average"
    )
    parser.add_argument(
        "--prefilt",
        action="store_true",
        help="filter the average to each member's power spectrum before aligning it",
    )
    parser.add_argument(
        "--storebad", action="store_true", help="accepted: every class number always gets an image"
    )
    parser.add_argument("--overwrite", "-f", action="store_true", help="replace existing outputs")


def main(args: argparse.Namespace) -> int:
    cfg = ClassaverageConfig(
        iterations=args.iter,
        keep=args.keep,
        keepsig=args.keepsig,
        align=args.align,
        aligncmp=args.aligncmp,
        ralign=args.ralign,
        raligncmp=args.raligncmp,
        cmp=args.cmp,
        averager=args.averager,
        normproc=args.normproc,
        setsfref=args.setsfref,
        automask=args.automask,
        prefilt=args.prefilt,
    )
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

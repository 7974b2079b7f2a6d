"""Project a map over the asymmetric unit of a symmetry (EMAN2 e2project3d).

The output stack carries each projection's orientation: a .star writes the images
to a .mrcs beside it and the orientations as RELION angles; an .hdf stores EMAN2
xform.projection headers; an .lst refers into a .mrcs written beside it.

examples:
  cryorefine project3d --model threed.mrc --out projections.star
  cryorefine project3d --model threed.mrc --out proj.hdf --sym d7 \\
      --orientgen eman:delta=3:perturb=0 --postprocess normalize.circlemean
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryorefine.cli._common import registered
from cryorefine.config import Project3dConfig
from cryorefine.registry import ORIENTGENS, PROJECTORS
from cryorefine.stages.project3d import run_project3d


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="3D map to project")
    parser.add_argument(
        "--out", type=Path, required=True, help="output stack (.star, .hdf, .lst or .mrcs)"
    )
    parser.add_argument(
        "--orientgen",
        default="eman:delta=5.0:inc_mirror=0:perturb=1",
        help=f"orientation generator (default %(default)s): {registered(ORIENTGENS)}",
    )
    parser.add_argument("--sym", default="c1", help="symmetry: cN, dN, tet, oct, icos")
    parser.add_argument(
        "--projector",
        default="fourier",
        help=f"projector (default %(default)s; standard: EMAN2's real-space one): "
        f"{registered(PROJECTORS)}",
    )
    parser.add_argument(
        "--postprocess",
        action="append",
        default=[],
        metavar="NAME:K=V",
        help="processor applied to each projection (repeatable)",
    )
    parser.add_argument("--apix", type=float, help="pixel size in Å, overriding the map's")
    parser.add_argument("--seed", type=int, help="random seed for perturb/random generators")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def main(args: argparse.Namespace) -> int:
    cfg = Project3dConfig(
        orientgen=args.orientgen,
        sym=args.sym,
        projector=args.projector,
        postprocess=tuple(args.postprocess),
        seed=args.seed,
    )
    written = run_project3d(args.model, args.out, cfg, apix=args.apix, overwrite=args.overwrite)
    print(f"wrote {', '.join(map(str, written))}")
    return 0

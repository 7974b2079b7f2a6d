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

from cryorefine.cli._common import add_config_arguments, config_from_args
from cryorefine.config import Project3dConfig
from cryorefine.stages.project3d import run_project3d


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="3D map to project")
    parser.add_argument(
        "--out", type=Path, required=True, help="output stack (.star, .hdf, .lst or .mrcs)"
    )
    add_config_arguments(parser, Project3dConfig)
    parser.add_argument("--apix", type=float, help="pixel size in Å, overriding the map's")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(Project3dConfig, args)
    written = run_project3d(args.model, args.out, cfg, apix=args.apix, overwrite=args.overwrite)
    print(f"wrote {', '.join(map(str, written))}")
    return 0

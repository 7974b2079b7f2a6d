"""Apply EMAN2 processors to a particle stack or a map (like e2proc2d / e2proc3d).

Processors run in the order given, each vectorised over a chunk of images; a stack is
streamed chunk by chunk and its metadata carried through. `cryorefine help
processors` lists the processors and their parameters.

examples:
  cryorefine process threed.mrc threed_filt.mrc --process normalize.bymass:mass=500
  cryorefine process map.mrc lp.mrc --process filter.lowpass.gauss:cutoff_res=8
  cryorefine process ptcls.star ptcls_norm.star --process normalize.edgemean \\
      --process mask.soft:outer_radius=50:width=5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryorefine.cli._common import write_processed
from cryorefine.config import parse_option
from cryorefine.errors import CryorefineError
from cryorefine.io.maps import is_map_file, read_map, write_map
from cryorefine.io.stacks import ParticleStack
from cryorefine.registry import PROCESSORS


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="input map or particle stack")
    parser.add_argument("output", type=Path, help="output file (map or stack type)")
    parser.add_argument(
        "--process",
        action="append",
        default=[],
        metavar="NAME:K=V",
        help="processor to apply (repeatable, applied in order)",
    )
    parser.add_argument("--apix", type=float, help="pixel size in Å, overriding the input's")
    parser.add_argument("--chunk", type=int, default=1024, help="particles per chunk")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def main(args: argparse.Namespace) -> int:
    mods = [parse_option(PROCESSORS, text, option="--process") for text in args.process]
    mods = [m for m in mods if m is not None]
    if not mods:
        raise CryorefineError("--process: give at least one processor")
    if args.input.is_file() and is_map_file(args.input):
        volume = read_map(args.input, apix=args.apix)
        data = volume.data
        for m in mods:
            data = m(data, ndim=3, apix=volume.apix or None)
        volume.data = np.asarray(data, dtype=np.float32)
        write_map(args.output, volume, overwrite=args.overwrite)
        print(f"wrote {args.output}")
        return 0
    stack = ParticleStack.from_path(args.input, apix=args.apix)
    apix = stack.apix

    def run(indices: np.ndarray, images: np.ndarray) -> np.ndarray:
        for m in mods:
            images = m(images, ndim=2, apix=apix)
        return images

    written = write_processed(stack, args, run)
    print(f"wrote {', '.join(map(str, written))}: {len(stack)} particles")
    return 0

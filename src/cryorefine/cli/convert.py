"""Convert particle stacks or maps between MRC/MRCS, RELION STAR, EMAN2 HDF and LST.

Every field both formats can express is kept: images bit for bit (float32), pixel
size, orientation (RELION rot/tilt/psi <-> EMAN2 xform.projection), shifts, CTF,
class, half set. A .star or .lst output refers to the existing image files where the
target program can read them (add --copy-images to write <stem>.mrcs beside it).

examples:
  cryorefine convert particles.star particles.hdf
  cryorefine convert sets/all.lst particles.star --copy-images
  cryorefine convert ptcls.mrcs ptcls.star --apix 1.35
  cryorefine convert threed.mrc threed.hdf
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryorefine.io.maps import MAP_SUFFIXES, is_map_file, read_map, write_map
from cryorefine.io.stacks import ParticleStack, write_stack


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="input stack (.mrcs .star .hdf .lst) or map")
    parser.add_argument("output", type=Path, help="output file; its extension picks the format")
    parser.add_argument("--apix", type=float, help="pixel size in Å, overriding the input's")
    parser.add_argument(
        "--root", type=Path, help="project folder for relative image paths (default: current)"
    )
    parser.add_argument(
        "--copy-images",
        action="store_true",
        help="write the images beside a .star/.lst instead of referring to them",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def main(args: argparse.Namespace) -> int:
    out_suffix = args.output.suffix.lower()
    if out_suffix in (".mrc", ".map") or (
        out_suffix == ".hdf" and args.input.is_file() and is_map_file(args.input)
    ):
        if args.input.suffix.lower() not in MAP_SUFFIXES:
            from cryorefine.errors import CryorefineError

            raise CryorefineError(
                f"{args.output}: a map output needs a map input "
                f"(.mrc, .map, .hdf); {args.input} is a stack"
            )
        volume = read_map(args.input, apix=args.apix)
        write_map(args.output, volume, overwrite=args.overwrite)
        print(f"wrote {args.output}: map {volume.box}^3, {volume.apix:.4f} Å/px")
        return 0
    stack = ParticleStack.from_path(args.input, apix=args.apix, root=args.root)
    try:
        written = write_stack(
            stack, args.output, overwrite=args.overwrite, copy_images=args.copy_images
        )
    finally:
        stack.close()
    print(
        f"wrote {', '.join(map(str, written))}: {len(stack)} particles, "
        f"{stack.box} px, {stack.apix:.4f} Å/px"
    )
    return 0

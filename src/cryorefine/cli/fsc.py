"""Fourier shell correlation between two maps, and the resolution where it crosses.

Prints the resolution at FSC 0.143 (half maps, gold standard) and 0.5 (map against
a reference), linearly interpolated. --mask multiplies both maps by a mask first.
With --out PREFIX it writes PREFIX.txt (EMAN2's two columns: 1/Å, FSC),
PREFIX.star (RELION data_fsc table) and PREFIX.png (plot).

examples:
  cryorefine fsc half1.mrc half2.mrc --mask mask.mrc --out fsc_halves
  cryorefine fsc threed_01.mrc threed_02.mrc
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryorefine.errors import CryorefineError
from cryorefine.fourier.fsc import fsc, resolution_at
from cryorefine.io.atomic import check_output
from cryorefine.io.fsc_files import plot_fsc, write_fsc_star, write_fsc_text
from cryorefine.io.maps import read_map


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map1", type=Path)
    parser.add_argument("map2", type=Path)
    parser.add_argument("--mask", type=Path, help="mask map applied to both (values 0-1)")
    parser.add_argument("--apix", type=float, help="pixel size in Å (default: map1's)")
    parser.add_argument("--out", help="write PREFIX.txt, PREFIX.star and PREFIX.png")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def main(args: argparse.Namespace) -> int:
    outputs = [Path(f"{args.out}{s}") for s in (".txt", ".star", ".png")] if args.out else []
    for p in outputs:
        check_output(p, overwrite=args.overwrite)
    a = read_map(args.map1, apix=args.apix)
    b = read_map(args.map2, apix=args.apix or a.apix)
    if a.box != b.box:
        raise CryorefineError(f"{args.map2}: box {b.box} px differs from {args.map1}'s {a.box} px")
    if args.apix is None and abs(a.apix - b.apix) > 0.01 * a.apix:
        raise CryorefineError(
            f"{args.map2}: pixel size {b.apix:.4f} Å differs from "
            f"{args.map1}'s {a.apix:.4f} Å (pass --apix to override)"
        )
    x, y = a.data, b.data
    if args.mask is not None:
        m = read_map(args.mask, apix=a.apix).data
        if m.shape != x.shape:
            raise CryorefineError(f"{args.mask}: box {m.shape[0]} px differs from the maps'")
        x, y = x * m, y * m
    curve = fsc(x, y)
    r143 = resolution_at(curve, threshold=0.143, apix=a.apix)
    r05 = resolution_at(curve, threshold=0.5, apix=a.apix)
    print(f"FSC 0.143: {r143:.2f} Å   FSC 0.5: {r05:.2f} Å   (Nyquist {2 * a.apix:.2f} Å)")
    if outputs:
        write_fsc_text(outputs[0], curve, apix=a.apix, overwrite=args.overwrite)
        write_fsc_star(outputs[1], curve, apix=a.apix, overwrite=args.overwrite)
        plot_fsc(
            outputs[2],
            curve,
            apix=a.apix,
            overwrite=args.overwrite,
            title=f"{args.map1.name} vs {args.map2.name}",
        )
        print(f"wrote {', '.join(map(str, outputs))}")
    return 0

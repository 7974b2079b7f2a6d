"""Reconstruct a 3D map from images with known orientations (EMAN2 e2make3d).

Input: a STAR, EMAN2 HDF/LST or MRCS stack whose metadata holds orientations (and
shifts, CTF, weights, half sets). Each image is padded (--pad, default twice the box),
Fourier transformed, weighted by its CTF if the metadata has one, and inserted into
a 3D transform once per symmetry operator; the result is divided by the summed
weights, gridding-corrected and cropped. Then a Wiener filter: the two half sets
(rlnRandomSubset, else alternate particles) are reconstructed apart and their FSC
gives the spectral SNR that weights each Fourier shell of the map by SSNR / (1 + SSNR)
(--no-wiener: plain division, as e2make3d). A soft mask of the box's inscribed sphere removes
the noise in the corners (--no-sphere-mask keeps it). --iter 2 --keep 0.8 rates
each image against the map and leaves out the worst, as e2make3d does.

examples:
  cryorefine make3d --input particles.star --output threed.mrc
  cryorefine make3d --input classes.hdf --output threed.hdf --sym d7 \\
      --recon fourier:mode=gauss_2 --preprocess normalize.edgemean
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cryorefine.cli._common import registered
from cryorefine.config import Make3dConfig
from cryorefine.registry import RECONSTRUCTORS
from cryorefine.stages.make3d import run_make3d


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, required=True, help="stack with orientations")
    parser.add_argument("--output", type=Path, required=True, help="output map (.mrc or .hdf)")
    parser.add_argument("--sym", default="c1", help="symmetry: cN, dN, tet, oct, icos")
    parser.add_argument("--pad", type=int, help="pad images to this size in px (default 2x box)")
    parser.add_argument(
        "--recon",
        default="fourier",
        help="reconstructor (default %(default)s; fourier:mode=gauss_2 as EMAN2): "
        + registered(RECONSTRUCTORS),
    )
    parser.add_argument(
        "--preprocess",
        action="append",
        default=[],
        metavar="NAME:K=V",
        help="processor applied to each image first (repeatable)",
    )
    parser.add_argument(
        "--postprocess",
        action="append",
        default=[],
        metavar="NAME:K=V",
        help="processor applied to the map (repeatable)",
    )
    parser.add_argument(
        "--automask3d",
        metavar="THR,RADIUS,NSHELLS,NSHELLSGAUSS,NMAXSEED",
        help="mask the map with mask.auto3d (EMAN2's five values, e.g. 1.1,30,5,5,0)",
    )
    parser.add_argument("--setsf", help="impose this structure factor (text file or map)")
    parser.add_argument("--apix", type=float, help="pixel size in Å, overriding the input's")
    parser.add_argument(
        "--iter",
        type=int,
        default=1,
        help="passes; from 2 on, slices are rated against the map and the worst left out "
        "(e2make3d's default and e2refine's --m3diter are 2)",
    )
    parser.add_argument(
        "--keep",
        type=float,
        default=1.0,
        help="fraction of slices kept (a sigma multiple with --keepsig)",
    )
    parser.add_argument("--keepsig", action="store_true", help="--keep is a sigma multiple")
    parser.add_argument(
        "--keepabs",
        action="store_true",
        help="rate slices by absolute, not locally relative, quality",
    )
    parser.add_argument(
        "--no-ctf", dest="ctf", action="store_false", help="ignore the CTF in the metadata"
    )
    parser.add_argument(
        "--no-oversample",
        dest="oversample",
        action="store_false",
        help="insert unpadded image transforms (4x less work, as RELION; slightly less "
        "accurate at high resolution)",
    )
    parser.add_argument(
        "--no-wiener",
        dest="wiener",
        action="store_false",
        help="divide by the summed weights alone (e2make3d); default: a Wiener filter from "
        "the FSC of the half sets (rlnRandomSubset, else alternate particles)",
    )
    parser.add_argument(
        "--no-wt",
        dest="weights",
        action="store_false",
        help="weight every image 1 (default: the metadata's weights)",
    )
    parser.add_argument(
        "--no-sphere-mask",
        dest="sphere_mask",
        action="store_false",
        help="keep the noise outside the inscribed sphere",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def main(args: argparse.Namespace) -> int:
    cfg = Make3dConfig(
        sym=args.sym,
        pad_px=args.pad,
        recon=args.recon,
        preprocess=tuple(args.preprocess),
        postprocess=tuple(args.postprocess),
        setsf=args.setsf,
        automask3d=args.automask3d,
        use_ctf=args.ctf,
        use_weights=args.weights,
        mask_sphere=args.sphere_mask,
        wiener=args.wiener,
        oversample_2d=args.oversample,
        iterations=args.iter,
        keep=args.keep,
        keepsig=args.keepsig,
        keepabs=args.keepabs,
    )
    info = run_make3d(args.input, args.output, cfg, apix=args.apix, overwrite=args.overwrite)
    print(
        f"wrote {args.output}: {len(info['inserted'])} images inserted "
        f"({len(info['excluded'])} excluded, {len(info['skipped'])} skipped), "
        f"symmetry {args.sym}, CTF {'on' if info['ctf'] else 'off'}"
    )
    return 0

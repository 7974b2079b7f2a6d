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

from cryorefine.cli._common import add_config_arguments, config_from_args
from cryorefine.config import Make3dConfig
from cryorefine.stages.make3d import run_make3d

#: takes --parallel: its chunks run where it says (cryorefine.parallel)
PARALLEL = True


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, required=True, help="stack with orientations")
    parser.add_argument("--output", type=Path, required=True, help="output map (.mrc or .hdf)")
    add_config_arguments(parser, Make3dConfig)
    parser.add_argument("--apix", type=float, help="pixel size in Å, overriding the input's")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(Make3dConfig, args)
    info = run_make3d(args.input, args.output, cfg, apix=args.apix, overwrite=args.overwrite)
    print(
        f"wrote {args.output}: {len(info['inserted'])} images inserted "
        f"({len(info['excluded'])} excluded, {len(info['skipped'])} skipped), "
        f"symmetry {cfg.sym}, CTF {'on' if info['ctf'] else 'off'}"
    )
    return 0

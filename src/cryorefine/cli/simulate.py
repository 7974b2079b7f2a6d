"""Simulate particles from a map with known orientations, shifts, CTF and noise.

Each particle is the projection of --model along an orientation uniform on SO(3)
(or taken from --angles), moved by a random shift within --max-shift Å, multiplied
by a CTF (defocus uniform in --defocus, astigmatism up to --astigmatism) and given
white Gaussian noise at --snr (mean signal variance over noise variance inside the
box). Writes an MRCS stack and a RELION 3.1 STAR that carries the ground truth.

examples:
  cryorefine simulate --model threed.mrc --n 2000 --snr 0.1 --max-shift 9 --out sim.star
  cryorefine simulate --model map.mrc --angles poses.star --no-ctf --snr 1 --out s.star
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.io.atomic import check_output
from cryorefine.io.maps import read_map
from cryorefine.io.mrc import MrcStackWriter
from cryorefine.io.stacks import ParticleStack, write_stack
from cryorefine.io.star import read_orientations_star
from cryorefine.testing import noise_sigma_for_snr, render_particles, simulate_metadata


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not MIN,MAX") from exc
    return lo, hi


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="3D map")
    parser.add_argument("--out", type=Path, required=True, help="output .star (images in .mrcs)")
    parser.add_argument("--n", type=int, help="number of particles (default: 1000, or --angles)")
    parser.add_argument("--angles", type=Path, help="STAR file whose orientations to use")
    parser.add_argument("--snr", type=float, default=0.1, help="signal/noise variance ratio")
    parser.add_argument(
        "--max-shift",
        type=float,
        default=0.0,
        help="largest random shift in Å (default %(default)s)",
    )
    parser.add_argument(
        "--defocus",
        type=_pair,
        default=(1.0, 2.5),
        metavar="MIN,MAX",
        help="defocus range in µm (default 1.0,2.5)",
    )
    parser.add_argument(
        "--astigmatism",
        type=float,
        default=0.05,
        help="largest defocus difference U-V in µm (default %(default)s)",
    )
    parser.add_argument("--no-ctf", dest="ctf", action="store_false", help="no CTF")
    parser.add_argument("--voltage", type=float, default=300.0, help="kV")
    parser.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm")
    parser.add_argument("--amp-contrast", type=float, default=0.1, help="amplitude contrast")
    parser.add_argument("--apix", type=float, help="pixel size in Å, overriding the map's")
    parser.add_argument("--projector", default="fourier", help="fourier or standard")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--chunk", type=int, default=500, help="particles per chunk")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def main(args: argparse.Namespace) -> int:
    if args.out.suffix.lower() != ".star":
        raise CryorefineError(f"--out {args.out}: must be a .star file")
    if args.snr <= 0:
        raise CryorefineError("--snr must be positive")
    if args.max_shift < 0 or args.astigmatism < 0:
        raise CryorefineError("--max-shift and --astigmatism must not be negative")
    if args.ctf and not 0 < args.defocus[0] <= args.defocus[1]:
        raise CryorefineError("--defocus: give MIN,MAX in µm with 0 < MIN <= MAX")
    images_path = args.out.with_suffix(".mrcs")
    check_output(args.out, overwrite=args.overwrite)
    check_output(images_path, overwrite=args.overwrite)
    volume = read_map(args.model, apix=args.apix)
    rotations = read_orientations_star(args.angles) if args.angles else None
    n = args.n or (len(rotations) if rotations is not None else 1000)
    if rotations is not None and n != len(rotations):
        raise CryorefineError(
            f"--n {n} differs from the {len(rotations)} orientations in {args.angles}"
        )
    rng = np.random.default_rng(args.seed)
    meta = simulate_metadata(
        n,
        apix=volume.apix,
        rng=rng,
        rotations=rotations,
        max_shift_a=args.max_shift,
        defocus_range_um=args.defocus if args.ctf else None,
        astigmatism_um=args.astigmatism,
        voltage_kv=args.voltage,
        cs_mm=args.cs,
        amplitude_contrast=args.amp_contrast,
    )
    sigma = noise_sigma_for_snr(volume.data, meta, args.snr, rng=rng, projector=args.projector)
    with MrcStackWriter(
        images_path, n, volume.box, apix=volume.apix, overwrite=args.overwrite
    ) as w:
        for start in range(0, n, args.chunk):
            idx = np.arange(start, min(start + args.chunk, n))
            w.write(
                start,
                render_particles(
                    volume.data, meta, idx, noise_sigma=sigma, rng=rng, projector=args.projector
                ),
            )
    stack = ParticleStack.from_path(images_path)
    meta.source_path, meta.source_index = stack.meta.source_path, stack.meta.source_index
    stack.meta = meta
    write_stack(stack, args.out, overwrite=args.overwrite)
    stack.close()
    print(
        f"wrote {args.out} and {images_path}: {n} particles of {volume.box} px at "
        f"{volume.apix:.4f} Å/px, SNR {args.snr}, noise sigma {sigma:.4g}"
    )
    return 0

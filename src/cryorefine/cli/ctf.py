"""Apply, phase-flip or Wiener-correct the CTF of every particle of a stack.

The CTF of each particle comes from its metadata (RELION STAR columns or the EMAN2
ctf header), in RELION's convention. `apply` multiplies by the CTF (simulation),
`flip` multiplies by its sign (EMAN2's __ctf_flip particles), `wiener` divides with
a constant spectral SNR (--snr).

examples:
  cryorefine ctf particles.star particles_flip.star --mode flip
  cryorefine ctf particles.star corrected.mrcs --mode wiener --snr 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryorefine.cli._common import write_processed
from cryorefine.errors import CryorefineError
from cryorefine.fourier import ctf as ctf_ops
from cryorefine.io.stacks import ParticleStack


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="particle stack with CTF parameters")
    parser.add_argument("output", type=Path, help="output stack (.mrcs .star .hdf .lst)")
    parser.add_argument("--mode", choices=("apply", "flip", "wiener"), default="flip")
    parser.add_argument(
        "--snr",
        type=float,
        default=10.0,
        help="spectral SNR for --mode wiener (default %(default)s)",
    )
    parser.add_argument("--apix", type=float, help="pixel size in Å, overriding the input's")
    parser.add_argument("--chunk", type=int, default=512, help="particles per chunk")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def main(args: argparse.Namespace) -> int:
    if args.snr <= 0:
        raise CryorefineError("--snr must be positive")
    stack = ParticleStack.from_path(args.input, apix=args.apix)
    missing = ~stack.meta.ctf.known
    if missing.any():
        raise CryorefineError(
            f"{args.input}: {int(missing.sum())} particles have no CTF parameters "
            "(a STAR file needs rlnDefocusU, rlnDefocusV, rlnVoltage, rlnSphericalAberration)"
        )

    def run(indices: np.ndarray, images: np.ndarray) -> np.ndarray:
        c = stack.meta.ctf.take(indices).evaluate(stack.box, stack.meta.apix[indices])
        if args.mode == "apply":
            return ctf_ops.apply_ctf(images, c)
        if args.mode == "flip":
            return ctf_ops.phase_flip(images, c)
        return ctf_ops.wiener_divide(images, c, snr=args.snr)

    written = write_processed(stack, args, run)
    print(f"wrote {', '.join(map(str, written))}: {len(stack)} particles, CTF {args.mode}")
    return 0

"""Benchmark: make3d against relion_reconstruct on data made by relion_project, D7 and C1.

usage: python bench/make3d_vs_relion.py [--n 2000] [--apix 5] [--cases d7:0.0005,c1:0.004]

Per case the true map is the bundled rnapol2_64 map (64 px; its pixel size is taken as
--apix), averaged over the group's operators (our symmetry code, cubic interpolation;
testing.symmetrised) for D7, as it is for C1. Poses are uniform on SO(3) with shifts
up to 3 px and a CTF (defocus 1-2.5 µm); ``relion_project --ctf --add_noise
--white_noise SIGMA`` makes the images, SIGMA set for the case's SNR (mean signal
variance over noise variance inside the box). The STAR file carries no half sets, so
each program regularises alone: ``relion_reconstruct --ctf --sym G`` (no --fsc:
unregularised gridding), our ``make3d --sym G`` (alternate particles for the Wiener
filter) and, for reference, our plain division (``--no-wiener``, e2make3d). Prints per
case and program: FSC(map, truth) at 0.143 and 0.5 (Å) and the real-space correlation
with the truth inside the box.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cryorefine.config import Make3dConfig
from cryorefine.fourier.fsc import fsc, resolution_at
from cryorefine.io.stacks import ParticleStack
from cryorefine.stages.make3d import make3d
from cryorefine.testing import (
    demo_map,
    relion_project_particles,
    relion_reconstruct_map,
    symmetrised,
)


def map_figures(volume: np.ndarray, truth: np.ndarray, apix: float) -> dict[str, float]:
    """FSC(map, truth) at 0.143 and 0.5 (Å) and the real-space correlation."""
    curve = fsc(volume, truth)
    return {
        "fsc0143": resolution_at(curve, threshold=0.143, apix=apix),
        "fsc05": resolution_at(curve, threshold=0.5, apix=apix),
        "rcc": float(np.corrcoef(volume.ravel(), truth.ravel())[0, 1]),
    }


def reconstruct_ours(star: Path, sym: str, **cfg) -> np.ndarray:
    stack = ParticleStack.from_path(star)
    try:
        volume, _ = make3d(stack, Make3dConfig(sym=sym, **cfg))
    finally:
        stack.close()
    return volume


def run_case(sym: str, snr: float, args: argparse.Namespace) -> list[dict]:
    truth = demo_map().data
    if sym != "c1":
        truth = symmetrised(truth, sym)
    star = relion_project_particles(truth, apix=args.apix, n=args.n, snr=snr, seed=args.seed)
    maps = {
        "cryorefine make3d": reconstruct_ours(star, sym),
        "cryorefine make3d --no-wiener": reconstruct_ours(star, sym, wiener=False),
        "relion_reconstruct --ctf": relion_reconstruct_map(star, apix=args.apix, sym=sym),
    }
    return [{"program": k, **map_figures(m, truth, args.apix)} for k, m in maps.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        default="d7:0.0005,c1:0.004",
        help="GROUP:SNR per case (default %(default)s: FSC(truth) 0.143 between 10 and 15 Å)",
    )
    parser.add_argument("--n", type=int, default=2000, help="particles per case")
    parser.add_argument("--apix", type=float, default=5.0, help="pixel size, Å")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if not (shutil.which("relion_project") and shutil.which("relion_reconstruct")):
        raise SystemExit("relion_project and relion_reconstruct must be on PATH")
    cases = [c.strip().lower().split(":") for c in args.cases.split(",")]
    print(f"{args.n} particles, 64 px, {args.apix} Å/px, seed {args.seed}")
    print("| case | SNR | program | FSC 0.143 (Å) | FSC 0.5 (Å) | real-space corr. |")
    print("|---|---|---|---|---|---|")
    cwd = os.getcwd()
    for sym, snr in cases:
        work = Path(tempfile.mkdtemp(prefix=f"cryorefine-m3d-{sym}-"))
        os.chdir(work)
        try:
            for r in run_case(sym, float(snr), args):
                print(
                    f"| {sym.upper()} | {snr} | {r['program']} | {r['fsc0143']:.2f} | "
                    f"{r['fsc05']:.2f} | {r['rcc']:.3f} |",
                    flush=True,
                )
        finally:
            os.chdir(cwd)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

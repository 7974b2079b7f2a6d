"""Benchmark: reconstruct N particles with known poses and CTF, ours vs relion_reconstruct.

usage: python bench/reconstruct.py [--n 10000] [--map ../shared/data/rnapol2_128.mrc]

Simulates N particles (SNR 0.1, defocus 1-2.5 um, shifts up to 3 px), then times
`cryorefine make3d` (in-process) and `relion_reconstruct --ctf` on the same STAR in
one run on this machine, and prints both times and both maps' resolutions against
the truth.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np

from cryorefine.config import Make3dConfig
from cryorefine.fourier.fsc import fsc, resolution_at
from cryorefine.io.maps import read_map
from cryorefine.io.stacks import ParticleStack, write_stack
from cryorefine.stages.make3d import make3d
from cryorefine.testing import simulate_particles

DEFAULT_MAP = Path(__file__).resolve().parents[2] / "shared" / "data" / "rnapol2_128.mrc"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--map", type=Path, default=DEFAULT_MAP)
    args = parser.parse_args()
    truth = read_map(args.map)
    work = Path(tempfile.mkdtemp(prefix="cryorefine-bench-"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        t0 = time.perf_counter()
        stack = simulate_particles(
            truth.data,
            args.n,
            apix=truth.apix,
            snr=0.1,
            rng=np.random.default_rng(1),
            max_shift_a=3 * truth.apix,
        )
        write_stack(stack, "particles.star")
        del stack
        print(
            f"simulated {args.n} particles of {truth.box} px in {time.perf_counter() - t0:.0f} s"
            f" ({os.cpu_count()} cores)"
        )
        for label, cfg in (
            ("cryorefine make3d", Make3dConfig()),
            ("... --no-oversample", Make3dConfig(oversample_2d=False)),
        ):
            make3d(ParticleStack.from_path("particles.star").take(np.arange(4)), cfg)  # JIT
            t0 = time.perf_counter()
            ours, _ = make3d(ParticleStack.from_path("particles.star"), cfg)
            t_ours = time.perf_counter() - t0
            r_ours = resolution_at(fsc(ours, truth.data), threshold=0.143, apix=truth.apix)
            print(f"{label:24s}: {t_ours:6.1f} s, FSC(truth) 0.143 at {r_ours:.2f} Å", flush=True)
        if shutil.which("relion_reconstruct") is None:
            print("relion_reconstruct not installed; no comparison")
            return
        t0 = time.perf_counter()
        subprocess.run(
            [
                "relion_reconstruct",
                "--i",
                "particles.star",
                "--o",
                "relion.mrc",
                "--ctf",
                "--angpix",
                str(truth.apix),
            ],
            check=True,
            capture_output=True,
        )
        t_rel = time.perf_counter() - t0
        r_rel = resolution_at(
            fsc(mrcfile.read("relion.mrc"), truth.data), threshold=0.143, apix=truth.apix
        )
        print(
            f"{'relion_reconstruct --ctf':24s}: {t_rel:6.1f} s, FSC(truth) 0.143 at {r_rel:.2f} Å"
        )
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

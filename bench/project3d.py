"""Benchmark: 1,000 projections of a 128^3 map with each projector.

usage: python bench/project3d.py [--n 1000] [--map ../shared/data/rnapol2_128.mrc]

Prints wall time and projections per second for `fourier` and `standard`, and how
well they agree (correlation after a low-pass to 2/3 Nyquist).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import scipy.fft

from cryorefine.fourier.fft import rfft_radius
from cryorefine.fourier.project import prepare_volume, project_fourier, project_standard
from cryorefine.io.maps import read_map
from cryorefine.testing import uniform_rotations

DEFAULT_MAP = Path(__file__).resolve().parents[2] / "shared" / "data" / "rnapol2_128.mrc"


def lowpass(images: np.ndarray, cutoff: float) -> np.ndarray:
    n = images.shape[-1]
    ft = scipy.fft.rfft2(images)
    ft[..., rfft_radius((n, n)) > cutoff] = 0
    return scipy.fft.irfft2(ft, s=(n, n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--map", type=Path, default=DEFAULT_MAP)
    args = parser.parse_args()
    volume = read_map(args.map)
    rots = uniform_rotations(args.n, np.random.default_rng(0))
    print(f"map {args.map.name}: {volume.box}^3, {args.n} projections, {os.cpu_count()} cores")

    t0 = time.perf_counter()
    vft = prepare_volume(volume.data)
    t1 = time.perf_counter()
    fourier = project_fourier(vft, rots)
    t2 = time.perf_counter()
    print(
        f"fourier : {t2 - t0:7.1f} s ({t1 - t0:.1f} s padding + 3D FFT), "
        f"{args.n / (t2 - t0):7.1f} projections/s"
    )
    t0 = time.perf_counter()
    standard = project_standard(volume.data, rots)
    t1 = time.perf_counter()
    print(f"standard: {t1 - t0:7.1f} s, {args.n / (t1 - t0):7.1f} projections/s")
    a, b = lowpass(fourier, 1 / 3), lowpass(standard, 1 / 3)
    c = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b, strict=True)]
    print(f"agreement after low-pass to 2/3 Nyquist: min corr {min(c):.4f}, mean {np.mean(c):.4f}")


if __name__ == "__main__":
    main()

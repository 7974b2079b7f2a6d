"""Benchmark: simmx of N particles against the eman:delta=5 (c1) projections at 64 px.

usage: python bench/simmx.py [--n 1000] [--maxshift 3] [--pairs 300] [--cmp ccc]

Simulates N particles from rnapol2_64.mrc (SNR 0.1, CTF, shifts up to 3 px), then
times in one run on this machine:
  * the batched engine (one stage), pair evaluations per second and its FLOP rate;
  * a straightforward per-pair implementation (the aligner called once per pair in a
    loop) on a sample of pairs, extrapolated to the whole matrix;
  * --twostage 2, with the time of each of its stages;
and reports the assignment accuracy of both simmx runs (classified to the best
projection: within 2 delta of the true orientation and within 1 px of the true shift).

The aligner's comparator is ccc (e2refine's --simaligncmp default); the final score
is ``--cmp``: ccc (default, scored from sums inside the engine) or e.g. e2refine's
--simcmp default ``frc:zeromask=1:snrweight=1`` (the particles' CTF gives the SNR).
FLOP rates count the arithmetic of the dominant steps (stated below, alignment only)
divided by the measured time; the same counting rules are used for both
implementations.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cryorefine.align.align2d import rotate_translate_flip
from cryorefine.align.rotational import polar_size
from cryorefine.cli import set_thread_spin
from cryorefine.config import SimmxConfig
from cryorefine.fourier.project import project
from cryorefine.geometry.orientations import orientations
from cryorefine.io.maps import read_map
from cryorefine.registry import COMPARATORS
from cryorefine.stages.classify import classify
from cryorefine.stages.simmx import ctf_snr, fill_uncomputed, score_pairs, signal_power
from cryorefine.stages.twostage import twostage_pairs
from cryorefine.testing import assignment_errors, demo_map, simulate_particles


def fft_flops(npix: int) -> float:
    """Real 2D FFT of ``npix`` points: 2.5 N log2 N."""
    return 2.5 * npix * math.log2(npix)


def engine_flops_per_pair(n: int, maxshift: int) -> float:
    """Footprint GEMM and angular IFFT (both mirrors) + 4 candidates x (product,
    windowed inverse DFT rows and columns, the wrapped strips removed from the peak)."""
    xs, r1, r2 = polar_size(n)
    m, r, hx, nw = xs // 2 + 1, r2 - r1, n // 2 + 1, 2 * maxshift + 1
    rotation = 2 * (8 * m * r + 2.5 * xs * math.log2(xs))
    candidate = 6 * n * hx + 8 * n * hx * nw + 4 * nw * nw * hx + 2 * n * 2 * maxshift
    return rotation + 4 * candidate


def per_pair_flops(n: int) -> float:
    """Footprints of moving, target and mirrored target (FFT, IFFT, unwrap), 4 bilinear
    rotations, 4 CCFs (forward FFT + inverse FFT), 2 target FFTs, 6 ccc, 1 final score."""
    xs, r1, r2 = polar_size(n)
    footprint = 2 * 2 * fft_flops(n * n) + 8 * (r2 - r1) * xs
    return (
        3 * footprint
        + 4 * 10 * n * n
        + 4 * 2 * fft_flops(n * n)
        + 2 * fft_flops(n * n)
        + 7 * 6 * n * n
    )


def accuracy(sim, refs_rot, meta, delta) -> float:
    angle_deg, shift_px = assignment_errors(classify(sim), refs_rot, meta)
    return float(np.mean((angle_deg <= 2 * delta) & (shift_px <= 1.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--maxshift", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=300, help="pairs timed per pair")
    parser.add_argument("--map", type=Path, help="a 3D map (default: the bundled rnapol2_64)")
    parser.add_argument("--cmp", default="ccc", help="final comparator (e2simmx --cmp)")
    args = parser.parse_args()
    set_thread_spin()
    truth = read_map(args.map) if args.map else demo_map()
    n, apix, delta = truth.box, truth.apix, 5.0
    stack = simulate_particles(
        truth.data, args.n, apix=apix, snr=0.1, rng=np.random.default_rng(2), max_shift_a=3 * apix
    )
    particles, meta = stack.read(), stack.meta
    rots = orientations(f"eman:delta={delta:g}", "c1", rng=np.random.default_rng(3))
    refs = project(truth.data, rots)
    snr = ctf_snr(meta, np.arange(args.n), n, apix, signal_power(refs))
    npairs = len(particles) * len(refs)
    print(
        f"{args.n} particles x {len(refs)} projections of {n} px, {os.cpu_count()} cores, "
        f"--aligncmp ccc --cmp {args.cmp}"
    )
    align = f"rotate_translate_flip:maxshift={args.maxshift}:subpixel=1"
    cfg = SimmxConfig(align=align, aligncmp="ccc", cmp=args.cmp)
    score_pairs(refs[:8], particles[:4], cfg, apix=apix, snr=snr[:4])  # compile
    t0 = time.perf_counter()
    one = score_pairs(refs, particles, cfg, apix=apix, snr=snr)
    t_one = time.perf_counter() - t0
    flops = engine_flops_per_pair(n, args.maxshift) * npairs
    print(
        f"one stage : {t_one:6.1f} s, {npairs / t_one:9.0f} pairs/s, "
        f"{flops / t_one / 1e9:5.1f} GFLOP/s counted, "
        f"assignment {100 * accuracy(one, rots, meta, delta):.1f}%"
    )
    rng = np.random.default_rng(0)
    p_i = rng.integers(0, len(particles), args.pairs)
    c_i = rng.integers(0, len(refs), args.pairs)
    ccc, final = COMPARATORS.parse("ccc"), COMPARATORS.parse(args.cmp)
    rotate_translate_flip(refs[:1], particles[:1], maxshift=args.maxshift, cmp=ccc)
    t0 = time.perf_counter()
    for p, c in zip(p_i, c_i, strict=True):
        res = rotate_translate_flip(
            refs[c : c + 1], particles[p : p + 1], maxshift=args.maxshift, cmp=ccc
        )
        final(particles[p : p + 1], res.images, apix=apix, snr=snr[p : p + 1])
    t_pair = (time.perf_counter() - t0) / args.pairs
    print(
        f"per pair  : {1 / t_pair:9.0f} pairs/s, "
        f"{per_pair_flops(n) / t_pair / 1e9:5.1f} GFLOP/s counted, "
        f"whole matrix {t_pair * npairs:.0f} s (extrapolated from {args.pairs} pairs)"
    )
    two_cfg = replace(cfg, twostage=2)
    small_plan = twostage_pairs(
        refs[:40], two_cfg, apix, score_pairs
    )  # compile, as for the one stage
    pairs = small_plan(particles[:4], snr[:4])
    score_pairs(refs[:40], particles[:4], two_cfg, apix=apix, snr=snr[:4], pairs=pairs)
    t0 = time.perf_counter()
    plan = twostage_pairs(refs, two_cfg, apix, score_pairs)
    t1 = time.perf_counter()
    pairs = plan(particles, snr)
    t2 = time.perf_counter()
    two = score_pairs(refs, particles, two_cfg, apix=apix, snr=snr, pairs=pairs)
    fill_uncomputed(two)
    t_two = time.perf_counter() - t0
    print(
        f"two stage : {t_two:6.1f} s ({t_one / t_two:.1f}x faster, "
        f"{len(pairs[0]) / args.n:.0f} full comparisons per particle), "
        f"assignment {100 * accuracy(two, rots, meta, delta):.1f}%\n"
        f"            stage 1 (projections only) {t1 - t0:.1f} s, stage 2 {t2 - t1:.1f} s, "
        f"stage 3 {t0 + t_two - t2:.1f} s"
    )


if __name__ == "__main__":
    main()

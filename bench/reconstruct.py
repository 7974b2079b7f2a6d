"""Benchmark: reconstruct particles with known poses and CTF, ours vs relion_reconstruct.

usage: python bench/reconstruct.py [--cases 64,128] [--n64 2000] [--n128 10000]

Two cases, each simulated once (SNR 0.1, CTF defocus 1-2.5 um, shifts up to 3 px, no
half sets in the STAR file) and reconstructed on this machine, each program in a
fresh process, so that every figure includes start-up and (for us) loading the
compiled kernels:

* 64 px, 2,000 particles of the bundled rnapol2_64 map (3 Å/px);
* 128 px, 10,000 particles of ../shared/data/rnapol2_128.mrc (1.5 Å/px), if present.

Per program: wall time of `cryorefine make3d` / `relion_reconstruct --ctf`, peak
resident memory of the process, and the map against the truth: real-space
correlation inside the box, the resolution where FSC(map, truth) falls below 0.143
and 0.5, and the amplitude of the map's outermost full shell (Nyquist - 1) over the
truth's. For us also the resident memory of a process that imports what the command
imports, reads the STAR file's metadata and loads the compiled kernels (a 4-image
reconstruction at 16 px): what this Python program holds before it holds any data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cryorefine.fourier.fsc import fsc, resolution_at
from cryorefine.io.maps import read_map
from cryorefine.io.stacks import write_stack
from cryorefine.testing import (
    demo_map,
    make3d_memory_before_data,
    measure_command,
    outer_shell_amplitude,
    simulate_particles,
)

MAP_128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "rnapol2_128.mrc"


def map_figures(volume: np.ndarray, truth: np.ndarray, apix: float) -> dict[str, float]:
    curve = fsc(volume, truth)
    return {
        "rcc": float(np.corrcoef(volume.ravel(), truth.ravel())[0, 1]),
        "fsc0143": resolution_at(curve, threshold=0.143, apix=apix),
        "fsc05": resolution_at(curve, threshold=0.5, apix=apix),
        "outer_amp": outer_shell_amplitude(volume) / outer_shell_amplitude(truth),
    }


def run_case(truth_data: np.ndarray, apix: float, n: int, label: str) -> list[dict]:
    case = Path(f"case_{truth_data.shape[0]}")
    case.mkdir()
    os.chdir(case)
    try:
        return _run_case(truth_data, apix, n, label)
    finally:
        os.chdir("..")


def _run_case(truth_data: np.ndarray, apix: float, n: int, label: str) -> list[dict]:
    t0 = time.perf_counter()
    stack = simulate_particles(
        truth_data,
        n,
        apix=apix,
        snr=0.1,
        rng=np.random.default_rng(1),
        max_shift_a=3 * apix,
        defocus_range_um=(1.0, 2.5),
    )
    stack.meta.half_set[:] = 0  # no half sets: the reconstructor has to regularise alone
    write_stack(stack, "particles.star")
    del stack
    print(f"\n{label}: simulated {n} particles in {time.perf_counter() - t0:.0f} s")
    rows = []
    ours = [sys.executable, "-m", "cryorefine", "make3d", "--input", "particles.star"]
    measure_command([*ours, "--output", "warm.mrc"])  # the kernels' on-disk cache is filled
    wall, rss = measure_command([*ours, "--output", "ours.mrc"])
    base = make3d_memory_before_data("particles.star")
    fig = map_figures(read_map(Path("ours.mrc")).data, truth_data, apix)
    rows.append({"program": "cryorefine make3d", "wall_s": wall, "rss_mib": rss, **fig})
    rows[-1]["baseline_mib"] = base
    if shutil.which("relion_reconstruct"):
        cmd = ["relion_reconstruct", "--i", "particles.star", "--o", "relion.mrc", "--ctf"]
        wall, rss = measure_command([*cmd, "--angpix", str(apix)])
        fig = map_figures(read_map(Path("relion.mrc")).data, truth_data, apix)
        rows.append({"program": "relion_reconstruct --ctf", "wall_s": wall, "rss_mib": rss, **fig})
    else:
        print("relion_reconstruct is not installed: no comparison")
    print(
        "| program | wall (s) | peak RSS (MiB) | real-space corr. | FSC 0.143 (Å) | "
        "FSC 0.5 (Å) | outer-shell amplitude / truth |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['program']} | {r['wall_s']:.2f} | {r['rss_mib']:.0f} | {r['rcc']:.3f} | "
            f"{r['fsc0143']:.2f} | {r['fsc05']:.2f} | {r['outer_amp']:.2f} |"
        )
    print(
        f"cryorefine before any data (imports, metadata, compiled kernels): "
        f"{base:.0f} MiB; working memory above it {rows[0]['rss_mib'] - base:.0f} MiB"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="64,128", help="which cases (64, 128)")
    parser.add_argument("--n64", type=int, default=2000)
    parser.add_argument("--n128", type=int, default=10000)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    cases = {c.strip() for c in args.cases.split(",")}
    print(f"{os.cpu_count()} cores")
    work = Path(tempfile.mkdtemp(prefix="cryorefine-bench-"))
    cwd = os.getcwd()
    results = {}
    os.chdir(work)
    try:
        if "64" in cases:
            m = demo_map()
            results["64"] = run_case(m.data, m.apix, args.n64, f"64 px, {m.apix} Å/px")
        if "128" in cases:
            if MAP_128.is_file():
                m = read_map(MAP_128)
                results["128"] = run_case(m.data, m.apix, args.n128, f"128 px, {m.apix} Å/px")
            else:
                print(f"{MAP_128} not present: no 128-px case")
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

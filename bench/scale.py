"""Benchmark: how a refinement iteration's time and peak memory grow with the number of
particles and the box, and what a Dask cluster costs against this process.

usage: python bench/scale.py [--work DIR] [--ns 2000,5000,10000,20000] [--boxes 64,128,256]
                             [--box-n 2000] [--dask-n 5000] [--parallel 2]
                             [--options "..."] [--map ../shared/data/rnapol2_128.mrc]

Data: --map (1.5 Å/px, 128 px) resampled in Fourier space to each box at the same
extent in Å (64 px: 3 Å/px, 256 px: 0.75 Å/px); particles simulated once per box at
SNR 0.1 with CTF (defocus 1-2.5 µm) and shifts up to 3 px, the start the truth
low-passed to 30 Å. The sets of fewer particles are the first N rows of the largest.

Each run is one iteration, ``cryorefine refine --iter 1 --seed 1 --parallel thread:P``
plus --options (default ``--orientgen eman:delta=10``, so that the largest set fits an
afternoon; the iteration is a global one, with the default two-stage simmx), in a fresh
process under ``/usr/bin/time -v``: wall time, peak resident memory (of the refinement's
process; with Dask, of the largest of its processes), and the iteration's seconds per
stage from ``0_refine_parms.json``.

* N: --ns particles at 128 px; the ratio of each time to the previous one's against
  the ratio of N;
* box: --box-n particles at each of --boxes;
* Dask: --dask-n particles at 128 px with ``--parallel dask:local=P`` against
  ``thread:P`` (the N sweep's run when it has that N).

Prints a table and writes ``scale.json`` and ``scale_particles.png``/``scale_box.png``
(time and memory against N and box) into --work.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryorefine.cli import set_thread_spin
from cryorefine.fourier.fft import rescale_to_box
from cryorefine.io.maps import Map, read_map
from cryorefine.testing import refine_command, write_simulated_set

MAP_128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "rnapol2_128.mrc"
DEFAULT_OPTIONS = "--orientgen eman:delta=10"


def data_set(work: Path, truth: Map, box: int, n: int) -> Path:
    """The simulated set of ``box`` px (at least ``n`` particles), made once."""
    folder = work / f"data_{box}"
    star = folder / "particles.star"
    if star.is_file() and len(starfile.read(star)["particles"]) >= n:
        return folder
    apix = truth.apix * truth.box / box
    data, got = rescale_to_box(truth.data, truth.apix, box, apix)
    t0 = time.perf_counter()
    write_simulated_set(folder, Map(data.astype(np.float32), got), n, snr=0.1, start_a=30.0)
    print(f"simulated {n} particles of {box} px in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def subset(folder: Path, n: int) -> Path:
    """``folder``'s first ``n`` particles as particles.star of a folder of their own."""
    out = folder.parent / f"{folder.name}_n{n}"
    out.mkdir(exist_ok=True)
    tables = starfile.read(folder / "particles.star", always_dict=True)
    particles = tables["particles"].iloc[:n].copy()
    root = folder.resolve()
    particles["rlnImageName"] = [
        f"{a}@{root / b}" for a, b in (s.split("@", 1) for s in particles["rlnImageName"])
    ]
    tables = {**tables, "particles": pd.DataFrame(particles)}
    starfile.write(tables, out / "particles.star", overwrite=True)
    for name in ("start.mrc", "truth.mrc"):
        if not (out / name).exists():
            (out / name).symlink_to((folder / name).resolve())
    return out


def run(folder: Path, name: str, options: list[str]) -> dict:
    """One iteration under /usr/bin/time -v: wall, peak RSS and per-stage seconds."""
    path = folder.parent / "runs" / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    cmd = ["/usr/bin/time", "-v", *refine_command(folder, path, *options)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{name}: exit {out.returncode}\n{out.stderr[-3000:]}")
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)[1])
    record = json.loads((path / "0_refine_parms.json").read_text())
    it = record["iterations"][0]
    result = {
        "run": name,
        "wall_s": wall,
        "iteration_s": it["wall_seconds"],
        "peak_rss_mib": rss_kib / 1024,
        "stages_s": {k: round(v, 1) for k, v in it["seconds"].items() if v},
    }
    print(json.dumps(result), flush=True)
    return result


def plot(results: dict, work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, fname in (
        ("n", "particles", "scale_particles.png"),
        ("box", "box (px)", "scale_box.png"),
    ):
        rows = results.get(key) or []
        if len(rows) < 2:
            continue
        x = np.array([r[key] for r in rows], float)
        t = np.array([r["iteration_s"] for r in rows])
        m = np.array([r["peak_rss_mib"] for r in rows]) / 1024
        if key == "n":
            x = x / 1000
            label = "particles (thousands)"
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
        a.plot(x, t, "o-", label="measured")
        ref = t[0] * (x / x[0]) ** (1 if key == "n" else 2)
        a.plot(x, ref, "--", color="grey", label="linear" if key == "n" else "∝ box²")
        a.set(xlabel=label, ylabel="seconds per iteration")
        a.legend()
        b.plot(x, m, "o-")
        b.set(xlabel=label, ylabel="peak resident memory (GiB)", ylim=(0, None))
        fig.tight_layout()
        fig.savefig(work / fname, dpi=120)
        plt.close(fig)
        print(f"wrote {work / fname}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path)
    p.add_argument("--map", type=Path, default=MAP_128)
    p.add_argument("--ns", default="2000,5000,10000,20000")
    p.add_argument("--boxes", default="64,128,256")
    p.add_argument("--box-n", type=int, default=2000)
    p.add_argument("--dask-n", type=int, default=5000)
    p.add_argument("--parallel", type=int, default=2, help="cores (thread:P, dask:local=P)")
    p.add_argument("--options", default=DEFAULT_OPTIONS)
    args = p.parse_args()
    set_thread_spin()
    work = args.work or Path(tempfile.mkdtemp(prefix="cryorefine_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    truth = read_map(args.map)
    ns = [int(x) for x in args.ns.split(",") if x]
    boxes = [int(x) for x in args.boxes.split(",") if x]
    base = ["--iter", "1", "--seed", "1", *args.options.split()]
    thread = [*base, "--parallel", f"thread:{args.parallel}"]
    results: dict = {"options": base, "cores": args.parallel, "n": [], "box": [], "dask": []}
    top = max([*ns, args.dask_n if args.dask_n else 0])
    full = data_set(work, truth, truth.box, top) if (ns or args.dask_n) else None
    for n in ns:
        r = run(subset(full, n), f"n{n}", thread)
        results["n"].append({"n": n, **r})
    for box in boxes:
        same = [r for r in results["n"] if r["n"] == args.box_n and box == truth.box]
        if same:
            results["box"].append({"box": box, **same[0]})
            continue
        folder = subset(data_set(work, truth, box, args.box_n), args.box_n)
        results["box"].append({"box": box, **run(folder, f"box{box}", thread)})
    if args.dask_n:
        folder = subset(full, args.dask_n)
        same = [r for r in results["n"] if r["n"] == args.dask_n]
        here = same[0] if same else run(folder, f"thread_{args.dask_n}", thread)
        there = run(
            folder, f"dask_{args.dask_n}", [*base, "--parallel", f"dask:local={args.parallel}"]
        )
        results["dask"] = [{"parallel": "thread", **here}, {"parallel": "dask", **there}]
    (work / "scale.json").write_text(json.dumps(results, indent=1))
    print(f"\noptions: {' '.join(base)}; {args.parallel} cores")
    print(f"{'run':>14} {'iteration s':>12} {'wall s':>8} {'peak GiB':>9}  ratio")
    prev = None
    for r in results["n"]:
        ratio = ""
        if prev is not None:
            t, k = r["iteration_s"] / prev["iteration_s"], r["n"] / prev["n"]
            ratio = f"time x{t:.2f} for N x{k:.2f}"
        print(
            f"{'N=' + str(r['n']):>14} {r['iteration_s']:>12.1f} {r['wall_s']:>8.1f} "
            f"{r['peak_rss_mib'] / 1024:>9.2f}  {ratio}"
        )
        prev = r
    for r in results["box"]:
        print(
            f"{'box=' + str(r['box']):>14} {r['iteration_s']:>12.1f} {r['wall_s']:>8.1f} "
            f"{r['peak_rss_mib'] / 1024:>9.2f}"
        )
    if results["dask"]:
        a, b = results["dask"]
        for r in (a, b):
            print(
                f"{r['parallel']:>14} {r['iteration_s']:>12.1f} {r['wall_s']:>8.1f} "
                f"{r['peak_rss_mib'] / 1024:>9.2f}"
            )
        print(
            f"dask / thread: iteration x{b['iteration_s'] / a['iteration_s']:.2f}, "
            f"wall x{b['wall_s'] / a['wall_s']:.2f}"
        )
    plot(results, work)


if __name__ == "__main__":
    main()

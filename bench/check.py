"""Benchmark: ``refine --check``'s estimates against the run they estimate.

usage: python bench/check.py [--cases 64,128] [--n-64 2000] [--n-128 5000]
                             [--map-128 ../shared/data/rnapol2_128.mrc] [--work DIR]

Two cases, each simulated once (SNR 0.1, CTF defocus 1-2.5 um, shifts up to 3 px):

* ``64``: 2,000 particles of the bundled rnapol2_64 map (3 Å/px), the start the truth
  low-passed to 40 Å, the default options;
* ``128``: 5,000 particles of --map-128 (1.5 Å/px), the start the truth low-passed to
  30 Å, ``--twostage 2``.

Per case, on this machine: ``cryorefine refine ... --iter 2 --earlystop 0 --check``
(its estimate lines printed and parsed: seconds per iteration and per stage, peak
memory), then the same refinement without ``--check`` in a fresh process (wall time,
peak resident memory), whose per-iteration and per-stage seconds come from its
``0_refine_parms.json``. The table gives the prediction against both iterations: each
stage, the sum of the stages (what the estimate adds up) and the iteration's wall time
(the stages plus writing its files and the report), and the peak memory. Each command
is run with ``--seed 1``. Beside each: the load average before and after, and the cores
other processes kept busy meanwhile (the machine's busy CPU time less the command's).

--work keeps the simulated data and the runs (a second call reuses the data, and
replaces the runs); without it they go to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from cryorefine.cli import set_thread_spin
from cryorefine.io.maps import Map, read_map
from cryorefine.refine.step import STAGES
from cryorefine.testing import demo_map, measure_command, refine_command, write_simulated_set

MAP_128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "rnapol2_128.mrc"
#: per case: low-pass of the start (Å) and the refinement's options
CASES = {"64": (40.0, ()), "128": (30.0, ("--twostage", "2"))}
ITERATIONS = ("--iter", "2", "--earlystop", "0", "--seed", "1")


def simulate(folder: Path, truth: Map, n: int, start_a: float) -> None:
    """``n`` particles of ``truth`` in ``folder``/particles.star, start.mrc beside them."""
    t0 = time.perf_counter()
    write_simulated_set(folder, truth, n, snr=0.1, start_a=start_a)
    print(f"simulated {n} particles of {truth.box} px in {time.perf_counter() - t0:.0f} s")


def load() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


class Contention:
    """The cores other processes kept busy while a block ran: the machine's busy CPU
    time (``/proc/stat``) less this process's children's, over the block's wall time."""

    def __enter__(self) -> Contention:
        self.load = load()
        self.start = self._now()
        return self

    def __exit__(self, *exc) -> None:
        busy, own, t = (b - a for a, b in zip(self.start, self._now(), strict=True))
        self.cores = (busy - own) / t
        print(f"(load {self.load} before, {load()} after; other processes: {self.cores:.2f} cores)")

    @staticmethod
    def _now() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # not idle, iowait
        t = os.times()
        return busy, t.children_user + t.children_system, time.perf_counter()


def parse_check(text: str) -> dict:
    """The figures of ``--check``'s estimate lines: memory (GiB), seconds per iteration
    and per stage."""
    memory = re.search(r"estimated peak memory: ([\d.]+) GiB", text)
    timing = re.search(r"estimated time per iteration: ([\d.]+) s \((.*)\);", text)
    if memory is None or timing is None:
        raise SystemExit(f"--check printed no estimates:\n{text}")
    stages = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) s", timing.group(2))}
    return {
        "memory_gib": float(memory.group(1)),
        "seconds_per_iteration": float(timing.group(1)),
        "seconds_per_stage": stages,
    }


def run_case(folder: Path, options: tuple[str, ...]) -> dict:
    """``--check`` then the refinement itself, in fresh processes; their figures."""
    for name in ("check", "run"):
        shutil.rmtree(folder / name, ignore_errors=True)
    cmd = refine_command(folder, folder / "check", *ITERATIONS, *options, "--check")
    print(f"$ {' '.join(map(str, cmd[2:]))}")
    with Contention() as during_check:
        t0 = time.perf_counter()
        out = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, check=False)
        check_wall = time.perf_counter() - t0
    print(f"{out.stdout.strip()}\n(--check took {check_wall:.0f} s)")
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    predicted = parse_check(out.stdout)
    cmd = refine_command(folder, folder / "run", *ITERATIONS, *options)
    print(f"$ {' '.join(map(str, cmd[2:]))}")
    with Contention() as during_run:
        wall, rss_mib = measure_command(cmd)
    print(f"(the run took {wall:.0f} s, {rss_mib:.0f} MiB)")
    record = json.loads((folder / "run" / "0_refine_parms.json").read_text())
    return {
        "predicted": predicted,
        "check_wall_s": check_wall,
        "check_other_cores": during_check.cores,
        "wall_s": wall,
        "run_other_cores": during_run.cores,
        "peak_rss_gib": rss_mib / 1024,
        "iterations": [
            {"seconds": h["seconds"], "wall_seconds": h["wall_seconds"]}
            for h in record["iterations"]
        ],
    }


def table(label: str, r: dict) -> None:
    """predicted | iteration 0 | iteration 1 (measured / predicted in brackets)."""
    p, its = r["predicted"], r["iterations"]

    def num(x: float) -> str:
        return f"{x:.1f}" if x >= 0.95 else f"{x:.2g}"

    def row(name: str, pred: float, measured: list[float]) -> None:
        cells = " | ".join(f"{num(m)} s ({pred / m:.2f})" if m > 0 else num(m) for m in measured)
        print(f"| {name} | {num(pred)} s | {cells} |")

    print(f"\n{label}: predicted against measured (predicted / measured in brackets)")
    print("| | predicted | iteration 0 | iteration 1 |")
    print("|---|---|---|---|")
    for s in STAGES:
        if s in p["seconds_per_stage"]:  # --check estimates global iterations only
            row(s, p["seconds_per_stage"][s], [h["seconds"][s] for h in its])
    row("sum of stages", p["seconds_per_iteration"], [sum(h["seconds"].values()) for h in its])
    row("iteration wall", p["seconds_per_iteration"], [h["wall_seconds"] for h in its])
    print(
        f"| peak memory | {p['memory_gib']:.2f} GiB | {r['peak_rss_gib']:.2f} GiB "
        f"({p['memory_gib'] / r['peak_rss_gib']:.2f}) | |"
    )


def main() -> None:
    set_thread_spin()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="64,128", help="which cases (64, 128)")
    p.add_argument("--n-64", type=int, default=2000)
    p.add_argument("--n-128", type=int, default=5000)
    p.add_argument("--map-128", type=Path, default=MAP_128)
    p.add_argument("--work", type=Path, help="keep data and runs here (default: a temp folder)")
    args = p.parse_args()
    work = args.work.resolve() if args.work else Path(tempfile.mkdtemp(prefix="cryorefine-check-"))
    print(f"{os.cpu_count()} cores; working in {work}")
    results = {}
    try:
        for case in args.cases.split(","):
            start_a, options = CASES[case]
            folder = work / f"case_{case}"
            if not (folder / "particles.star").is_file():
                truth = demo_map() if case == "64" else read_map(args.map_128)
                n = args.n_64 if case == "64" else args.n_128
                simulate(folder, truth, n, start_a)
            results[case] = run_case(folder, options)
            table(f"{case} px", results[case])
            print(json.dumps(results[case]), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

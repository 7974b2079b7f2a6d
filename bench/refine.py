"""Benchmark: a whole refinement of simulated particles against the truth.

usage: python bench/refine.py [--n 2000] [--iter 6]
                              [--runs gold,global,global_twostage,classes,twostage]
                              [--work DIR] [--extra "--simalign ..."] [--map MRC]
                              [--start 40] [--no-overhead]

Simulates --n particles of the bundled rnapol2_64 map (3 Å/px; or --map; SNR 0.1, CTF
defocus 1-2.5 um, shifts up to 3 px), starts from the truth low-passed to --start Å,
and reports:

* the reference: make3d with the true poses (FSC against the truth at 0.143 and 0.5);
* per run (each ``cryorefine refine`` in a fresh process, timed, peak memory
  measured): ``gold`` = the defaults (gold-standard halves, particles, local
  refinement once the global search settles); ``global`` = the same with
  ``--localrefine 0`` (global iterations only, e2refine's one-stage simmx);
  ``global_twostage`` = ``--localrefine 0 --twostage 2`` (global only, with the
  two-stage simmx the defaults' global iterations use); ``classes`` =
  ``--goldstandard 0 --m3dsource classes`` (e2refine's chain); ``twostage`` = the
  defaults with ``--twostage 2``, run for as many iterations as ``gold`` ran (with
  ``--earlystop 0``), so that the two times compare the same work. All add --extra
  (default ``--classaverager ctf.weight``, CTF-corrected class averages; ``''``: the
  defaults).
  Figures: FSC(map, truth) at 0.143 and 0.5, the reported resolution, the median
  orientation error, particles in the map, wall time per iteration and per stage;
* the driver's overhead: iteration 1 of the ``gold`` run against the sum of its stages
  run alone, in this process, on the same arrays, and against the stage times the
  driver itself recorded;
* ``--check``'s memory estimate against the ``gold`` run's measured peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from cryorefine.cli import set_thread_spin
from cryorefine.fourier.fsc import fsc, resolution_at
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.io.maps import read_map
from cryorefine.io.stacks import ParticleStack
from cryorefine.io.star import read_particle_star
from cryorefine.stages.make3d import make3d
from cryorefine.testing import demo_map, measure_command, refine_command, write_simulated_set

RUNS = {
    "gold": (),
    "global": ("--localrefine", "0"),
    "global_twostage": ("--localrefine", "0", "--twostage", "2"),
    "classes": ("--goldstandard", "0", "--m3dsource", "classes"),
    "twostage": ("--twostage", "2"),
}


def simulate(work: Path, n: int, map_path: Path | None, start_a: float) -> None:
    truth = demo_map() if map_path is None else read_map(map_path)
    write_simulated_set(work, truth, n, snr=0.1, start_a=start_a)


def against_truth(volume: np.ndarray, truth: np.ndarray, apix: float) -> tuple[float, float]:
    curve = fsc(volume, truth)
    return (
        resolution_at(curve, threshold=0.143, apix=apix),
        resolution_at(curve, threshold=0.5, apix=apix),
    )


def command(work: Path, path: Path, iters: int, extra: list[str], *more: str) -> list[str]:
    options = ("--iter", iters, "--seed", 1, *extra, *more)
    return refine_command(work, path, *options)


def run_one(work: Path, name: str, iters: int, extra: list[str], *more: str) -> dict:
    path = work / name
    path.mkdir(exist_ok=True)
    wall, rss = measure_command(command(work, path, iters, extra, *RUNS[name], *more))
    record = json.loads((path / "0_refine_parms.json").read_text())
    last = record["iterations"][-1]
    k = f"{last['iteration']:02d}"
    truth = read_map(work / "truth.mrc")
    r143, r05 = against_truth(read_map(path / f"threed_{k}.mrc").data, truth.data, truth.apix)
    meta = read_particle_star(path / f"particles_{k}.star")
    true = ParticleStack.from_path(work / "particles.star")
    angle = symmetry_group("c1").angle_between(meta.rotations, true.meta.rotations)
    true.close()
    return {
        "run": name,
        "wall_s": wall,
        "peak_rss_mib": rss,
        "iterations": len(record["iterations"]),
        "stopped": record.get("stopped"),
        "fsc_truth_0.143_A": r143,
        "fsc_truth_0.5_A": r05,
        "reported_A": last["resolution"],
        "reported_unmasked_A": last["resolution_unmasked"],
        "median_angle_error_deg": float(np.median(angle)),
        "particles": last["particles"],
        "per_iteration_s": [h["wall_seconds"] for h in record["iterations"]],
        "search_per_iteration": [
            h.get("search", "global") + (f" {h['range_deg']:g}" if h.get("range_deg") else "")
            for h in record["iterations"]
        ],
        "per_stage_s": [h["seconds"] for h in record["iterations"]],
        "resolution_per_iteration_A": [h["resolution"] for h in record["iterations"]],
    }


def stages_alone(work: Path, extra: list[str]) -> dict:
    """Iteration 1 of the gold run, its stages called alone on the same arrays."""
    from cryorefine.refine.options import defaults, refine_config
    from cryorefine.refine.step import run_step

    path = work / "gold"
    opts = json.loads((path / "0_refine_parms.json").read_text())["options"]
    cfg = refine_config({**defaults(), **opts})
    stack = ParticleStack.from_path(work / "particles.star")
    meta = read_particle_star(path / "particles_01.star")
    halves = [np.flatnonzero(meta.half_set == h) for h in (1, 2)]
    maps = [read_map(path / f"threed_00_{h}.mrc").data for h in ("even", "odd")]
    t0 = time.perf_counter()
    step = run_step(maps, stack, halves, cfg, iteration=1)
    total = time.perf_counter() - t0
    stack.close()
    record = json.loads((path / "0_refine_parms.json").read_text())
    driver = record["iterations"][1]["wall_seconds"]
    return {
        "stages_alone_s": step.seconds,
        "sum_of_stages_s": sum(step.seconds.values()),
        "run_step_s": total,
        "driver_iteration_s": driver,
        "ratio": driver / sum(step.seconds.values()),
        "driver_stage_sum_s": sum(record["iterations"][1]["seconds"].values()),
        "ratio_to_own_stages": driver / sum(record["iterations"][1]["seconds"].values()),
    }


def main() -> None:
    set_thread_spin()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--iter", type=int, default=6)
    p.add_argument("--runs", default="gold,classes,twostage")
    p.add_argument("--work", type=Path, default=Path("bench_refine"))
    p.add_argument(
        "--extra",
        default="--classaverager ctf.weight",
        help="more refine options for every run ('' for the defaults)",
    )
    p.add_argument("--map", type=Path, help="the truth (default: the bundled rnapol2_64)")
    p.add_argument("--start", type=float, default=40.0, help="start: truth low-passed to Å")
    p.add_argument(
        "--no-overhead",
        action="store_true",
        help="skip the driver-overhead and --check comparisons after the gold run",
    )
    args = p.parse_args()
    work = args.work.resolve()
    work.mkdir(exist_ok=True)
    extra = args.extra.split()
    if not (work / "particles.star").is_file():
        simulate(work, args.n, args.map, args.start)
    truth = read_map(work / "truth.mrc")
    stack = ParticleStack.from_path(work / "particles.star")
    volume, _ = make3d(stack)
    stack.close()
    r143, r05 = against_truth(volume, truth.data, truth.apix)
    results = {"true_poses": {"fsc_truth_0.143_A": r143, "fsc_truth_0.5_A": r05}}
    print(json.dumps(results["true_poses"]), flush=True)
    for name in args.runs.split(","):
        if name == "twostage" and "gold" in results:  # as many iterations as gold ran
            n_gold = results["gold"]["iterations"]
            results[name] = run_one(work, name, n_gold, extra, "--earlystop", "0")
        else:
            results[name] = run_one(work, name, args.iter, extra)
        print(json.dumps(results[name]), flush=True)
    if "gold" in results and not args.no_overhead:
        results["overhead"] = stages_alone(work, extra)
        print(json.dumps(results["overhead"]), flush=True)
        (work / "gold_check").mkdir(exist_ok=True)
        out = subprocess.run(
            command(work, work / "gold_check", args.iter, extra, "--check"),
            capture_output=True,
            text=True,
            check=False,
        )
        for line in out.stdout.splitlines():
            if line.startswith("estimated peak memory"):
                est = float(line.split(":")[1].split()[0]) * 1024
                results["memory"] = {
                    "estimated_mib": est,
                    "measured_mib": results["gold"]["peak_rss_mib"],
                    "ratio": est / results["gold"]["peak_rss_mib"],
                }
        print(json.dumps(results.get("memory", out.stderr)), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

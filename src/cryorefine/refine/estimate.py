"""``--check``: estimates of a refinement's peak memory, disk use and time per iteration.

The estimates come from running the real iteration (:func:`run_step`) on two small
samples of the particles, each in a fresh process (after a warm-up here that compiles
or loads the kernels, so that neither counts a compiler's memory). Each stage's time
is fitted as ``a + b * particles``; the peak memory is the larger sample's plus what
the whole set adds to it (simmx's working memory and matrices, the particles' pages);
the disk use is the size of an iteration's files, from the counts.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.geometry.orientations import orientations
from cryorefine.refine.driver import Run
from cryorefine.refine.step import STAGES, run_step, start_maps
from cryorefine.stages.simmx import particle_chunk

#: sample sizes (particles) of the two timed runs, after a warm-up run of the first
SAMPLES = (24, 96)


def peak_rss_bytes() -> float:
    """This process's peak resident memory so far (bytes)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def _sample_run(run: Run, count: int, maps: list[np.ndarray]) -> dict[str, float]:
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(run.stack), size=min(count, len(run.stack)), replace=False))
    stack = run.stack.take(idx)
    usefilt = None if run.usefilt is None else run.usefilt.take(idx)
    k = len(idx)
    halves = [np.arange(0, k, 2), np.arange(1, k, 2)] if len(maps) == 2 else [np.arange(k)]
    step = run_step(maps, stack, halves, run.cfg, iteration=0, usefilt=usefilt)
    return dict(step.seconds)


def _start_maps(run: Run) -> list[np.ndarray]:
    return start_maps(run.model, run.cfg, run.stack.apix, np.random.default_rng(0))


def _sample_in_child(opts: dict, count: int) -> tuple[dict[str, float], float]:
    """Stage seconds and peak memory (bytes) of a sample run in a fresh process, which
    loads the kernels compiled by this one (so a compiler's memory is not counted)."""
    code = (
        "import json, sys; from cryorefine.refine.estimate import sample_main; "
        "sample_main(json.loads(sys.argv[1]), int(sys.argv[2]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(opts), str(count)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise CryorefineError(f"--check: the sample run failed: {out.stderr.strip()[-300:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["seconds"], result["peak_rss_bytes"]


def sample_main(opts: dict, count: int) -> None:
    """Entry of :func:`_sample_in_child`: one sample run, its figures as JSON."""
    from cryorefine.refine.driver import prepare

    run = prepare(opts)
    try:
        seconds = _sample_run(run, count, _start_maps(run))
    finally:
        run.close()
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}))


def _memory_beyond_sample(n: int, n_r: int, n_p: int, sample: int, halves: int) -> float:
    """Memory (bytes) the whole data set needs beyond a sample of ``sample`` particles:
    simmx's working memory for a half's particles (its own model per particle, up to
    its chunk), the similarity matrices (the whole and a half's, 6 planes of float32)
    and the particle file's pages as they are read."""
    per = 50 * n * n + 100 * n_r  # stages.simmx.particle_chunk's model
    chunk = particle_chunk(n, n_r)

    def working(k: int) -> float:
        return min(-(-k // halves), chunk) * per

    more = max(n_p - sample, 0)
    return working(n_p) - working(sample) + 1.5 * 6 * 4 * n_r * more + 4 * n * n * more


def estimate(run: Run) -> dict:
    """Peak memory (bytes), disk use per iteration and in all (bytes), and seconds per
    iteration (per stage and total) of ``run``."""
    cfg, stack = run.cfg, run.stack
    n, n_p = stack.box, len(stack)
    gold = cfg.goldstandard
    small, large = (min(s, n_p) for s in SAMPLES)
    _sample_run(run, small, _start_maps(run))  # compiles (or loads) the kernels here
    opts = {k: v for k, v in run.opts.items() if k != "check"}
    t_small, _ = _sample_in_child(opts, small)
    t0 = time.perf_counter()
    t_large, rss_large = _sample_in_child(opts, large)
    sample_wall = time.perf_counter() - t0
    seconds = {}
    for s in STAGES:
        if large > small:
            b = max(t_large[s] - t_small[s], 0.0) / (large - small)
            a = max(t_large[s] - b * large, 0.0)
        else:
            a, b = t_large[s], 0.0
        seconds[s] = a + b * n_p
    n_r = len(orientations(cfg.project3d.orientgen_mod, cfg.sym, rng=np.random.default_rng(0)))
    halves = 2 if gold else 1
    memory = rss_large + _memory_beyond_sample(n, n_r, n_p, large, halves)
    image = 4 * n * n
    disk = (
        2 * halves * n_r * image  # projections and class averages
        + 6 * 4 * n_p * n_r  # simmx
        + 3 * 7 * 4 * n_p  # classify, cls_result
        + (3 + halves + 2) * 4 * n**3  # maps, masks
        + 600 * n_p  # particles_NN.star
        + 4 * n_r * 200  # STAR of projections and classes
    )
    return {
        "memory_bytes": memory,
        "disk_per_iteration_bytes": disk,
        "disk_bytes": disk * cfg.iterations,
        "seconds_per_stage": seconds,
        "seconds_per_iteration": sum(seconds.values()),
        "sample_seconds": sample_wall,
        "projections": n_r,
        "particles": n_p,
    }


def check_report(run: Run) -> str:
    """What ``--check`` prints: the checked inputs and the estimates. Raises when the
    output folder's disk lacks the estimated space."""
    e = estimate(run)
    folder = run.path or Path(".")
    while not folder.exists() and folder.parent != folder:  # --path is made by the run
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if e["disk_bytes"] > free:
        raise CryorefineError(
            f"--path {folder}: {free / 2**30:.1f} GiB free; the run needs about "
            f"{e['disk_bytes'] / 2**30:.1f} GiB"
        )
    gib = 2**30
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in e["seconds_per_stage"].items())
    cfg, stack = run.cfg, run.stack
    return "\n".join(
        [
            f"check passed: {e['particles']} particles of {stack.box} px at {stack.apix:g} Å/px "
            f"({run.opts['input']}), model {run.opts['model']}, symmetry {cfg.sym}, "
            f"{e['projections']} projections per iteration, every option parsed",
            f"estimated peak memory: {e['memory_bytes'] / gib:.2f} GiB",
            f"estimated disk use: {e['disk_per_iteration_bytes'] / gib:.2f} GiB per iteration, "
            f"{e['disk_bytes'] / gib:.2f} GiB for {cfg.iterations} (free: {free / gib:.1f} GiB)",
            f"estimated time per iteration: {e['seconds_per_iteration']:.0f} s ({stages}); "
            f"at most {cfg.iterations} iterations",
        ]
    )

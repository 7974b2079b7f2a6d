"""``--check``: estimates of a refinement's peak memory, disk use and time per iteration.

The estimates come from running the real iteration (:func:`run_step`) on two small
samples of the particles (after a warm-up that loads the compiled kernels) and fitting
each stage's time and the process's peak memory as ``a + b * particles``; the disk
use is the size of an iteration's files, from the counts.
"""

from __future__ import annotations

import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.geometry.orientations import orientations
from cryorefine.refine.driver import Run
from cryorefine.refine.iteration import gold_standard_starts
from cryorefine.refine.step import STAGES, run_step

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


def estimate(run: Run) -> dict:
    """Peak memory (bytes), disk use per iteration and in all (bytes), and seconds per
    iteration (per stage and total) of ``run``."""
    cfg, stack = run.cfg, run.stack
    n, n_p = stack.box, len(stack)
    gold = cfg.goldstandard
    rng = np.random.default_rng(0)
    if gold:
        maps = list(
            gold_standard_starts(run.model, apix=stack.apix, inires_a=cfg.inires_a, rng=rng)
        )
    else:
        maps = [run.model]
    small, large = (min(s, n_p) for s in SAMPLES)
    _sample_run(run, small, maps)  # warm-up: kernels loaded, caches filled
    t_small = _sample_run(run, small, maps)
    rss_small = peak_rss_bytes()
    t0 = time.perf_counter()
    t_large = _sample_run(run, large, maps)
    sample_wall = time.perf_counter() - t0
    rss_large = peak_rss_bytes()
    seconds = {}
    for s in STAGES:
        if large > small:
            b = max(t_large[s] - t_small[s], 0.0) / (large - small)
            a = max(t_large[s] - b * large, 0.0)
        else:
            a, b = t_large[s], 0.0
        seconds[s] = a + b * n_p
    per_ptcl = (rss_large - rss_small) / (large - small) if large > small else 0.0
    memory = rss_large + max(per_ptcl, 0.0) * max(n_p - large, 0)
    n_r = len(orientations(cfg.project3d.orientgen_mod, cfg.sym, rng=np.random.default_rng(0)))
    halves = 2 if gold else 1
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

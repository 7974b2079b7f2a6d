"""``--check``: estimates of a refinement's peak memory, disk use and time per iteration.

The estimates come from running the real iteration (:func:`run_step`) on two samples of
the particles, one after the other in a fresh process (after a warm-up run there, and
one here that compiles or loads the kernels, so that neither sample counts a
compiler's memory or a kernel's first load). Each stage's time is fitted on the two
samples by how that stage's work grows in the full run:

* project3d: fixed (the projections do not depend on the particles): the faster sample;
* simmx: ``a + b * particles`` (every particle against every projection); with
  ``--twostage``, ``a + c * classes``: the coarse stage is fixed, and the full-size work
  is done per projection that some particle's best centres hold, so it grows with the
  projections touched, not with the particles;
* classify: ``a + b * particles``;
* classaverage, and make3d from class averages: ``a + c * classes``;
* make3d from the particles: ``a + b * particles``.

``classes`` is the expected number of projections holding at least one particle: in
each half, ``Nr (1 - (1 - 1/Nr)^(sep k))`` for ``k`` particles and ``Nr`` projections.
A sample of ``k`` particles touches about ``k`` classes; the full run, with many
particles per class, far fewer than its particles, so a per-particle fit of a per-class
cost overestimates the full run. (A per-particle fit of every stage predicted 815 s per
iteration for 5,000 particles of 128 px with ``--twostage 2``, against 302-312 s
measured; on 400 particles of 128 px and 210 projections, timed at 24, 96 and 400
particles, class averaging grew with the classes touched, not the particles.)

The peak memory is the larger sample's plus what the whole set adds to it (simmx's
working memory and matrices, the particles' pages); the disk use is the size of an
iteration's files, from the counts.
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
from cryorefine.refine.step import run_step, start_maps
from cryorefine.stages.simmx import particle_chunk

#: sample sizes (particles) of the two timed runs, after a warm-up run of WARMUP
SAMPLES = (24, 96)
WARMUP = 8


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
    halves = [np.arange(0, k, 2), np.arange(1, k, 2)] if run.cfg.goldstandard else [np.arange(k)]
    step = run_step(maps, stack, halves, run.cfg, iteration=0, usefilt=usefilt)
    return dict(step.seconds)


def _start_maps(run: Run) -> list[np.ndarray]:
    return start_maps(run.model, run.cfg, run.stack.apix, np.random.default_rng(0))


def _samples_in_child(opts: dict) -> tuple[list[dict[str, float]], float]:
    """Stage seconds of each of :data:`SAMPLES` and the peak memory (bytes), run in a
    fresh process after a warm-up there; it loads the kernels compiled by this one (so
    a compiler's memory is not counted)."""
    code = (
        "import json, sys; from cryorefine.refine.estimate import sample_main; "
        "sample_main(json.loads(sys.argv[1]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(opts)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise CryorefineError(f"--check: the sample run failed: {out.stderr.strip()[-300:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["seconds"], result["peak_rss_bytes"]


def sample_main(opts: dict) -> None:
    """Entry of :func:`_samples_in_child`: the warm-up and the samples, figures as JSON."""
    from cryorefine.refine.driver import prepare

    run = prepare(opts)
    try:
        maps = _start_maps(run)
        _sample_run(run, WARMUP, maps)
        seconds = [_sample_run(run, k, maps) for k in SAMPLES]
    finally:
        run.close()
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss_bytes()}))


def classes_touched(particles: float, n_r: int, halves: int, sep: int = 1) -> float:
    """Expected number of projections (over the halves) that hold at least one of
    ``particles`` particles, each assigned to ``sep`` of its half's ``n_r``."""
    k = particles / halves
    return halves * n_r * (1.0 - (1.0 - min(sep, n_r) / n_r) ** k)


def stage_growth(cfg) -> dict[str, str]:
    """What each stage's time grows with, beyond a fixed part: ``"particles"``,
    ``"classes"`` (projections holding particles) or ``"fixed"``."""
    classes_source = cfg.m3dsource == "classes"
    return {
        "project3d": "fixed",
        "simmx": "classes" if cfg.simmx.twostage else "particles",
        "classify": "particles",
        "classaverage": "classes",
        "make3d": "classes" if classes_source else "particles",
    }


def fit_stage(sizes: tuple[float, float], seconds: tuple[float, float], full: float) -> float:
    """Seconds at ``full`` of a stage timed ``seconds`` at ``sizes`` (of what it grows
    with): the line through the two, slope and intercept kept non-negative; the faster
    one when the sizes are equal (a fixed stage)."""
    (x0, x1), (t0, t1) = sizes, seconds
    if x1 <= x0:
        return min(t0, t1)
    b = max(t1 - t0, 0.0) / (x1 - x0)
    a = max(t1 - b * x1, 0.0)
    return a + b * full


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
    _sample_run(run, WARMUP, _start_maps(run))  # compiles (or loads) the kernels here
    opts = {k: v for k, v in run.opts.items() if k != "check"}
    t0 = time.perf_counter()
    (t_small, t_large), rss_large = _samples_in_child(opts)
    sample_wall = time.perf_counter() - t0
    n_r = len(orientations(cfg.project3d.orientgen_mod, cfg.sym, rng=np.random.default_rng(0)))
    halves = 2 if gold else 1

    def size(growth: str, k: int) -> float:
        if growth == "particles":
            return float(k)
        if growth == "classes":
            return classes_touched(k, n_r, halves, cfg.sep)
        return 0.0

    seconds = {}
    for s, growth in stage_growth(cfg).items():
        sizes = (size(growth, small), size(growth, large))
        seconds[s] = fit_stage(sizes, (t_small[s], t_large[s]), size(growth, n_p))
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

"""``--check``: estimates of a refinement's peak memory, disk use and time per iteration.

The estimates come from running the real iteration (:func:`run_step`) on three samples
of the particles, one after the other in a fresh process (after a warm-up run there,
and one here that compiles or loads the kernels, so that no sample counts a compiler's
memory or a kernel's first load). Each stage's time is fitted as
``a + b * particles + c * references`` by what its work grows with in the full run:

* project3d: fixed (the projections do not depend on the particles): the fastest sample;
* simmx: ``a + b * particles`` (every particle against every projection; the
  projections' banks, every in-plane turn of each, are built once per chunk of a half's
  particles and are in ``a``); with ``--twostage``, ``c * banks`` too: the full-size
  search builds a bank only for the projections some particle of the chunk is compared
  with (the members of its best centres, ``m`` of ``Nr``), so a sample builds fewer than
  the full run, which builds them all in each of its chunks (:func:`projections_banked`);
* classify, and make3d from the particles: ``a + b * particles``;
* classaverage, and make3d from class averages: ``a + b * particles + c * classes``:
  every member is aligned and scored, and every class average is aligned (its own bank)
  and filtered.

``classes`` is the expected number of projections holding at least one particle: in
each half, ``Nr (1 - (1 - sep/Nr)^k)`` for ``k`` particles of the half and ``Nr``
projections; ``banks`` the same count per chunk with ``m`` projections per particle.
A sample of ``k`` distinct particles touches about ``k`` classes, so on samples of
distinct particles alone a per-particle and a per-class cost cannot be told apart, yet
the full run has several particles per class. The samples therefore are 24 particles,
96 particles, and the first 24 each repeated 16 times (384 rows in the same halves: the
copies fall into their original's class and meet the same projections): the first and
third differ only in particles, the first and second in classes and banks too. (The
third is large because the fixed parts dominate a sample: with 8 copies, 5% errors in
the samples' times gave 15% in the prediction of two-stage simmx, with 16 copies 9%.)
(Fitting every stage per particle on 24 and 96 particles predicted 815 s per iteration
for 5,000 particles of 128 px with ``--twostage 2``, against 302-312 s measured;
fitting class averaging and two-stage simmx per class touched alone followed the full
run only near 5,000 particles, by the saturation of that count: it overestimated
two-stage simmx 1.7 to 1.9 times at 384 and 1,536 particles.)

The peak memory is the samples' peak plus what the whole set adds to it (simmx's
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

from cryorefine import memory
from cryorefine.errors import CryorefineError
from cryorefine.fourier.fft import cpu_count
from cryorefine.geometry.orientations import orientations
from cryorefine.memory import PER_PARTICLE_BYTES, low_memory, peak_bound
from cryorefine.refine.driver import Run
from cryorefine.refine.step import run_step, start_maps
from cryorefine.stages.simmx import particle_chunk

#: the timed samples, after a warm-up run of WARMUP particles: (distinct particles,
#: copies of each). The first and the last hold the same particles, so they touch the
#: same classes and projections and differ only in rows (the per-particle cost); the
#: middle one touches four times the classes (the per-class and per-projection cost)
SAMPLES = ((24, 1), (96, 1), (24, 16))
WARMUP = 8


def peak_rss_bytes() -> float:
    """This process's peak resident memory so far (bytes)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def sample_rows(n_p: int, distinct: int, copies: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The stack rows of a sample of ``distinct`` of ``n_p`` particles, each repeated
    ``copies`` times (the same draw for any ``copies``), and its gold-standard halves:
    alternate distinct particles, with every copy in its original's half (so that the
    copies fall into the original's class)."""
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(n_p, size=min(distinct, n_p), replace=False))
    rows = np.repeat(chosen, copies)
    which = np.arange(len(rows)) // copies  # the distinct particle of each row
    return rows, [np.flatnonzero(which % 2 == h) for h in (0, 1)]


def computed_per_row(score: np.ndarray) -> float:
    """Mean number of projections a particle was compared with: the cells of a row
    below its largest score (a two-stage search gives its uncomputed cells the row's
    largest computed score plus a margin, :func:`~cryorefine.stages.simmx.fill_uncomputed`;
    within one of the exact count)."""
    score = np.asarray(score)
    return float(np.mean(np.sum(score < score.max(axis=1, keepdims=True), axis=1)))


def _sample_run(run: Run, distinct: int, copies: int, maps: list[np.ndarray]) -> dict:
    """One sample through :func:`run_step`: its size, its stage seconds and the mean
    number of projections each particle was compared with."""
    rows, halves = sample_rows(len(run.stack), distinct, copies)
    if not run.cfg.goldstandard:
        halves = [np.arange(len(rows))]
    stack = run.stack.take(rows)
    usefilt = None if run.usefilt is None else run.usefilt.take(rows)
    step = run_step(maps, stack, halves, run.cfg, iteration=0, usefilt=usefilt)
    return {
        "rows": len(rows),
        "distinct": len(rows) // copies,
        "seconds": dict(step.seconds),
        "compared": computed_per_row(step.sim.score),
    }


def _start_maps(run: Run) -> list[np.ndarray]:
    return start_maps(run.model, run.cfg, run.stack.apix, np.random.default_rng(0))


def _samples_in_child(opts: dict) -> tuple[list[dict], float]:
    """Each of :data:`SAMPLES` (:func:`_sample_run`) and the peak memory (bytes), run in a
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
    return result["samples"], result["peak_rss_bytes"]


def sample_main(opts: dict) -> None:
    """Entry of :func:`_samples_in_child`: the warm-up and the samples, figures as JSON."""
    from cryorefine.refine.driver import prepare

    run = prepare(opts)
    try:
        with low_memory(bool(opts.get("lowmem"))):
            maps = _start_maps(run)
            _sample_run(run, WARMUP, 1, maps)
            samples = [_sample_run(run, d, c, maps) for d, c in SAMPLES]
    finally:
        run.close()
    print(json.dumps({"samples": samples, "peak_rss_bytes": peak_rss_bytes()}))


def classes_touched(particles: float, n_r: int, halves: int, sep: float = 1) -> float:
    """Expected number of projections (over the halves) that hold at least one of
    ``particles`` particles, each assigned to ``sep`` of its half's ``n_r`` (or compared
    with ``sep`` of them)."""
    k = particles / halves
    return halves * n_r * (1.0 - (1.0 - min(sep, n_r) / n_r) ** k)


def projections_banked(
    rows: float, distinct: float, n_r: int, halves: int, compared: float, chunk: int
) -> float:
    """Expected number of projection banks (a projection turned through every in-plane
    angle, built for the pairs of one chunk of a half's particles) that simmx builds
    for ``rows`` particle rows of ``distinct`` particles (the others copies), in chunks
    of ``chunk`` rows, each particle compared with ``compared`` of its half's ``n_r``
    projections: per chunk, the projections at least one of its particles is compared
    with (:func:`classes_touched` with ``compared`` classes per particle)."""
    chunks = max(1, int(np.ceil(rows / halves / chunk)))
    per_chunk = distinct / halves / chunks
    return halves * chunks * classes_touched(per_chunk, n_r, 1, compared)


def stage_growth(cfg) -> dict[str, str]:
    """What each stage's time grows with, beyond a fixed part: ``"particles"``;
    ``"classes"`` (particles, and projections holding particles); ``"projections"``
    (particles, and projection banks built, :func:`projections_banked`); or ``"fixed"``."""
    classes_source = cfg.m3dsource == "classes"
    return {
        "project3d": "fixed",
        "simmx": "projections" if cfg.simmx.twostage else "particles",
        "classify": "particles",
        "classaverage": "classes",
        "make3d": "classes" if classes_source else "particles",
    }


def fit_stage(
    particles: list[float], references: list[float], seconds: list[float]
) -> tuple[float, float, float]:
    """``(a, b, c)`` of ``seconds = a + b particles + c references`` over the samples, by
    non-negative least squares (exact on three samples when the solution is
    non-negative). ``references`` (classes or banks; ``[]``: none) equal in every sample
    give ``c = 0`` (the fixed part holds them)."""
    import scipy.optimize

    columns = [np.ones(len(seconds)), np.asarray(particles, float)]
    varies = len(references) > 0 and np.ptp(references) > 1e-6 * max(references)
    if varies:
        columns.append(np.asarray(references, float))
    coef, _ = scipy.optimize.nnls(np.stack(columns, axis=1), np.asarray(seconds, float))
    return float(coef[0]), float(coef[1]), float(coef[2]) if varies else 0.0


def _memory_beyond_sample(
    n: int, n_r: int, n_p: int, rows: int, distinct: int, halves: int
) -> float:
    """Memory (bytes) the whole data set needs beyond the samples (at most ``rows`` rows
    of ``distinct`` particles): simmx's working memory for a half's particles (its own
    model per particle, up to its chunk), what the driver holds per particle
    (:data:`~cryorefine.memory.PER_PARTICLE_BYTES`; the similarity matrix streams to
    its file, and the images are read without a memory map, so none stay resident)."""
    per = memory.budget("simmx") / particle_chunk(n, n_r)  # stages.simmx.particle_chunk
    chunk = particle_chunk(n, n_r)

    def working(k: int) -> float:
        return min(-(-k // halves), chunk) * per

    more = max(n_p - rows, 0)
    return working(n_p) - working(rows) + PER_PARTICLE_BYTES * more


def stage_model(samples: list[dict], cfg, n_r: int, box: int) -> dict[str, dict]:
    """Each stage's fit (:func:`fit_stage`) on the samples (:func:`_sample_run`): its
    growth (:func:`stage_growth`), ``a``, ``b``, ``c``, and how its references are
    counted (``compared``: projections per particle; ``chunk``: simmx's particles per
    chunk)."""
    halves = 2 if cfg.goldstandard else 1
    compared = max(s["compared"] for s in samples)
    shrunk = box // (cfg.simmx.shrink or 1)
    cells = n_r
    if cfg.simmx.twostage:  # simmx sizes its chunks by the largest candidate sets
        cells = min(n_r, max(int(np.ceil(compared)), 1))
    chunk = cfg.simmx.chunk or particle_chunk(shrunk, cells)
    model = {}
    for stage, growth in stage_growth(cfg).items():
        seconds = [s["seconds"][stage] for s in samples]
        entry = {"growth": growth, "compared": compared, "chunk": chunk, "halves": halves}
        if growth == "fixed":
            entry.update(a=min(seconds), b=0.0, c=0.0)
        else:
            rows = [s["rows"] for s in samples]
            refs = [references(entry, n_r, s["rows"], s["distinct"], cfg.sep) for s in samples]
            a, b, c = fit_stage(rows, refs if growth != "particles" else [], seconds)
            entry.update(a=a, b=b, c=c)
        model[stage] = entry
    return model


def references(entry: dict, n_r: int, rows: float, distinct: float, sep: int) -> float:
    """The references a stage of ``entry``'s growth handles for ``rows`` particle rows of
    ``distinct`` particles: classes holding particles, or projection banks built by
    simmx (:func:`projections_banked`)."""
    halves, compared, chunk = entry["halves"], entry["compared"], entry["chunk"]
    if entry["growth"] == "classes":
        return classes_touched(distinct, n_r, halves, sep)
    if entry["growth"] == "projections":
        return projections_banked(rows, distinct, n_r, halves, compared, chunk)
    return 0.0


def predict(model: dict[str, dict], n_r: int, n_p: int, sep: int) -> dict[str, float]:
    """Seconds of each stage for ``n_p`` particles under ``model`` (:func:`stage_model`)."""
    return {
        stage: e["a"] + e["b"] * n_p + e["c"] * references(e, n_r, n_p, n_p, sep)
        for stage, e in model.items()
    }


def estimate(run: Run) -> dict:
    """Peak memory (bytes), disk use per iteration and in all (bytes), and seconds per
    iteration (per stage and total) of ``run``."""
    cfg, stack = run.cfg, run.stack
    n, n_p = stack.box, len(stack)
    gold = cfg.goldstandard
    _sample_run(run, WARMUP, 1, _start_maps(run))  # compiles (or loads) the kernels here
    opts = {k: v for k, v in run.opts.items() if k != "check"}
    t0 = time.perf_counter()
    samples, rss_peak = _samples_in_child(opts)
    sample_wall = time.perf_counter() - t0
    n_r = len(orientations(cfg.project3d.orientgen_mod, cfg.sym, rng=np.random.default_rng(0)))
    halves = 2 if gold else 1
    model = stage_model(samples, cfg, n_r, n)
    seconds = predict(model, n_r, n_p, cfg.sep)
    rows = max(s["rows"] for s in samples)
    distinct = max(s["distinct"] for s in samples)
    with low_memory(bool(run.opts.get("lowmem"))):
        memory = rss_peak + _memory_beyond_sample(n, n_r, n_p, rows, distinct, halves)
    image = 4 * n * n
    disk = (
        4 * halves * n_r * image  # projections and class averages, RELION's and EMAN2's
        + 6 * 4 * n_p * n_r  # simmx
        + 3 * 7 * 4 * n_p  # classify, cls_result
        + (3 + halves + 2) * 4 * n**3  # maps, masks
        + 600 * n_p  # particles_NN.star
        + 4 * n_r * 200  # STAR of projections and classes
    )
    bound = peak_bound(
        n,
        n_r,
        n_p,
        halves=halves,
        pad=cfg.make3d.pad_px,
        threads=run.parallel.cores or cpu_count(),
        lowmem=bool(run.opts.get("lowmem")),
    )
    return {
        "memory_bytes": memory,
        "memory_bound": bound,
        "disk_per_iteration_bytes": disk,
        # + the EMAN2 particle sets (each particle's CTF with its SNR curve) and the starts
        "disk_bytes": disk * cfg.iterations + (300 + 8 * n) * n_p + 2 * 4 * n**3,
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
            f"estimated peak memory: {e['memory_bytes'] / gib:.2f} GiB; bound "
            f"{e['memory_bound']['total'] / gib:.2f} GiB (README, Memory: largest stage "
            f"{e['memory_bound']['largest']}"
            + (
                "; per process, the Dask workers each beside it)"
                if run.parallel.distributed
                else ")"
            ),
            f"estimated disk use: {e['disk_per_iteration_bytes'] / gib:.2f} GiB per iteration, "
            f"{e['disk_bytes'] / gib:.2f} GiB for {cfg.iterations} (free: {free / gib:.1f} GiB)",
            f"estimated time per iteration: {e['seconds_per_iteration']:.0f} s ({stages}); "
            f"at most {cfg.iterations} iterations"
            + (
                "; that of a global iteration (local ones, --localrefine, are not estimated)"
                if cfg.localrefine_mod.mode != "global"
                else ""
            ),
        ]
    )

"""Every ``refine`` option acts: each test measures a number that the option changes
and that would be wrong if the option were dropped on its way to the stage that
applies it (``refine_config`` -> stage config -> the stage), on small data: the bundled
map (64 px, 3 Å/px), a few dozen clean or noisy views, stage-level calls where that
proves the option acts."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cryorefine.geometry.orientations import orientations
from cryorefine.io.maps import Map, write_map
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.stacks import ParticleStack
from cryorefine.refine.options import eman2_commands, inert_warnings, refine_config
from cryorefine.refine.step import run_step
from cryorefine.stages.classaverage import classaverage
from cryorefine.stages.classify import ClassMx
from cryorefine.stages.make3d import make3d
from cryorefine.testing import demo_map, simulate_metadata

APIX = 3.0
#: a projection grid small enough to run a stage in a second (eman, c1: 17 directions)
GRID = "eman:delta=30:perturb=0"


def _opts(**extra) -> dict:
    """Options of a one-iteration refinement on clean data without CTF (ccc scores)."""
    base = {
        "iter": 1,
        "orientgen": GRID,
        "simcmp": "ccc",
        "classcmp": "ccc",
        "goldstandard": 0,
        "localrefine": "0",
        "seed": 3,
    }
    return {**base, **extra}


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return demo_map().data


def _project(volume: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    from cryorefine.fourier.project import project

    return project(volume, rotations)


def shell_power(volume: np.ndarray) -> np.ndarray:
    """Mean ``|F|^2`` per integer Fourier shell (numpy's FFT, nearest shell), 2D or 3D."""
    n = volume.shape[-1]
    k = np.fft.fftfreq(n) * n
    grids = np.meshgrid(*([k] * volume.ndim), indexing="ij")
    shell = np.rint(np.sqrt(sum(g * g for g in grids))).astype(np.int64).ravel()
    power = np.abs(np.fft.fftn(volume)) ** 2
    return (np.bincount(shell, power.ravel()) / np.bincount(shell))[: n // 2]


def band_power(images: np.ndarray) -> np.ndarray:
    """:func:`shell_power` of each image summed over bands of 4 rings (rings 1 to 28)."""
    return np.array([shell_power(a)[1:29].reshape(7, 4).sum(axis=1) for a in images])


@pytest.fixture(scope="module")
def views(truth) -> ParticleStack:
    """100 clean views of the map at random orientations, no shift, no CTF."""
    meta = simulate_metadata(100, apix=APIX, rng=np.random.default_rng(8), defocus_range_um=None)
    return ParticleStack.from_arrays(_project(truth, meta.rotations), apix=APIX, meta=meta)


def _on_grid(truth: np.ndarray, per_class: int, noise: float, seed: int, classes: int = 17):
    """Particles taken exactly at the first ``classes`` orientations of the projection
    grid (``per_class`` of each, white noise of ``noise`` times the projections'
    standard deviation), their exact classification (zero alignments) and the grid's
    projections."""
    rots = orientations(GRID, "c1")[:classes]
    refs = _project(truth, rots)
    cls = np.repeat(np.arange(len(rots)), per_class)
    rng = np.random.default_rng(seed)
    images = refs[cls] + noise * refs.std() * rng.standard_normal((len(cls),) + refs.shape[1:])
    meta = ParticleMetadata.empty(len(cls), apix=APIX)
    meta.rotations = rots[cls]
    stack = ParticleStack.from_arrays(images.astype(np.float32), apix=APIX, meta=meta)
    zeros = np.zeros((len(cls), 1))
    cm = ClassMx(cls[:, None], zeros + 1, zeros, zeros, zeros, zeros, zeros + 1)
    return stack, cm, refs


# --- make3d: --m3dpreprocess, --m3dsetsf/--m3dsffile, --m3diter ---------------------


def test_m3dpreprocess_filters_every_inserted_particle(views):
    """A Gaussian low-pass at 1/25 Å^-1 on each particle leaves the map's shells beyond
    1/10 Å^-1 (gain under exp(-3)) with under 1% of the power they have without it."""
    pre = refine_config(_opts(m3dpreprocess="filter.lowpass.gauss:cutoff_freq=0.04")).make3d
    plain = refine_config(_opts()).make3d
    hi = slice(22, 30)  # 22/64/3 Å = 1/8.7 Å^-1 onwards
    with_pre = shell_power(make3d(views, pre)[0])[hi].sum()
    without = shell_power(make3d(views, plain)[0])[hi].sum()
    assert with_pre < 0.01 * without, with_pre / without


def _write_strucfac(path, falloff_a: float) -> tuple[np.ndarray, np.ndarray]:
    """An EMAN2 structure factor (1/Å, power) falling as a Gaussian of ``falloff_a``."""
    freq = np.linspace(0, 0.5 / APIX, 200)
    power = 1e3 * np.exp(-((freq * falloff_a) ** 2))
    np.savetxt(path, np.c_[freq, power])
    return freq, power


@pytest.mark.parametrize("how", ["m3dsffile", "m3dsetsf"])
def test_m3dsetsf_imposes_the_structure_factor_file(views, tmp_path, monkeypatch, how):
    """The map's power per shell follows the file (within a factor 1.5 from shell 3 to
    30), where without it the map's is 20 times off or more somewhere."""
    monkeypatch.chdir(tmp_path)  # --m3dsetsf reads strucfac.txt in the working folder
    freq, power = _write_strucfac(tmp_path / "strucfac.txt", 30.0)
    opts = _opts(m3dsffile="strucfac.txt") if how == "m3dsffile" else _opts(m3dsetsf=True)
    shells = np.arange(3, 31)
    target = np.interp(shells / (64 * APIX), freq, power)
    got = shell_power(make3d(views, refine_config(opts).make3d)[0])[shells] / 64**3
    plain = shell_power(make3d(views, refine_config(_opts()).make3d)[0])[shells] / 64**3
    assert np.abs(np.log(got / target)).max() < np.log(1.5), got / target
    assert np.abs(np.log(plain / target)).max() > np.log(20), plain / target


def test_m3diter_rates_and_leaves_out_the_worst_class_averages(truth):
    """From class averages: 10 of 60 carry a wrong orientation. With --m3diter 2 and
    --m3dkeep 0.8 the second pass leaves out at least 8 of those 10; one pass keeps
    every image."""
    rng = np.random.default_rng(4)
    rots = orientations("rand:n=60", "c1", rng=rng)
    images = _project(truth, rots)
    bad = np.arange(0, 60, 6)
    images[bad] = _project(truth, orientations("rand:n=10", "c1", rng=rng))
    meta = ParticleMetadata.empty(60, apix=APIX)
    meta.rotations = rots
    stack = ParticleStack.from_arrays(images, apix=APIX, meta=meta)
    two = refine_config(_opts(m3dsource="classes", m3diter=2, m3dkeep=0.8, pad=64)).make3d
    one = refine_config(_opts(m3dsource="classes", m3diter=1, m3dkeep=0.8, pad=64)).make3d
    caught = np.isin(bad, make3d(stack, two)[1]["excluded"]).sum()
    assert caught >= 8, caught
    assert len(make3d(stack, one)[1]["excluded"]) == 0


# --- classaverage: --classrefsf, --classautomask, --prefilt ---------------------------


def test_classrefsf_gives_each_average_its_projection_spectrum(truth):
    """Averages of 6 noisy members (noise 2x the signal): their power per ring matches
    the projection's within a factor 1.3 (rings 2 to 28) with --classrefsf; without,
    the noise left in the average puts at least twice the projection's power in some
    ring."""
    stack, cm, refs = _on_grid(truth, 6, 2.0, seed=1, classes=6)
    refsf = refine_config(_opts(classrefsf=True, classiter=0)).classaverage
    plain = refine_config(_opts(classiter=0)).classaverage
    rings = np.arange(2, 29)

    def worst(cfg) -> float:
        avg = classaverage(stack, cm, refs, cfg).images
        ratios = [
            shell_power(a)[rings] / shell_power(r)[rings] for a, r in zip(avg, refs, strict=True)
        ]
        return float(np.abs(np.log(ratios)).max())

    assert worst(refsf) < np.log(1.3)
    assert worst(plain) > np.log(2.0)


def test_classautomask_takes_the_background_out_of_the_running_average(truth):
    """Each member's noise is in the running average it is scored against (a sixth of
    it); the automask removes the background of that average, so the members' ccc with
    it drops: the mean score (-ccc) rises by more than 0.02 (measured 0.05)."""
    stack, cm, refs = _on_grid(truth, 6, 1.0, seed=2, classes=6)
    qual = [
        classaverage(stack, cm, refs, refine_config(_opts(classautomask=a)).classaverage).qual
        for a in (False, True)
    ]
    assert qual[1].mean() > qual[0].mean() + 0.02, qual


def test_prefilt_matches_the_average_to_each_member_before_aligning(truth, monkeypatch):
    """With --prefilt, class averaging aligns each member to the running average filtered
    to that member's power spectrum (e2classaverage's filter.matchto): one target per
    member, whose power per ring is the member's (within 10%, rings 1 to 28)."""
    import cryorefine.stages.classaverage as stage

    stack, cm, refs = _on_grid(truth, 4, 1.0, seed=3, classes=5)
    calls = []
    original = stage.match_power_spectrum

    def spy(images, targets):
        out = original(images, targets)
        calls.append((out, np.asarray(targets)))
        return out

    monkeypatch.setattr(stage, "match_power_spectrum", spy)
    members = len(stack)
    for prefilt in (False, True):
        calls.clear()
        classaverage(stack, cm, refs, refine_config(_opts(prefilt=prefilt)).classaverage)
        per_member = [(o, t) for o, t in calls if len(o) == members]
        if not prefilt:
            assert not per_member
            continue
        assert len(per_member) == 1
        out, targets = per_member[0]
        ratio = band_power(out) / band_power(targets)
        assert np.abs(ratio - 1).max() < 0.1, np.abs(ratio - 1).max()
        # unfiltered, the clean projection holds less power than its noisy members
        unmatched = band_power(refs[cm.cls[:, 0]]) / band_power(targets)
        assert np.abs(unmatched - 1).max() > 0.3


# --- simmx: --simmask, --usefilt ------------------------------------------------------


def test_simmask_keeps_a_decoy_outside_the_mask_out_of_the_score(truth, tmp_path):
    """Every particle and one decoy projection carry the same bright ring beyond 26 px
    (the particle lies within 24 px). Scored inside a 24 px disc (--simmask), at least
    90% of the particles find their own projection; scored on the whole image, the ring
    draws at least half of them to the decoy."""
    from cryorefine.io.stacks import write_stack
    from cryorefine.stages.simmx import simmx

    stack, cm, refs = _on_grid(truth, 2, 0.3, seed=5)
    n = refs.shape[-1]
    r = np.hypot(*(np.mgrid[:n, :n] - n // 2))
    ring = (3 * refs.std() * np.exp(-(((r - 28) / 1.5) ** 2))).astype(np.float32)
    decoy = 0
    refs = refs.copy()
    refs[decoy] += ring
    particles = stack.read() + ring
    disc = (r <= 24).astype(np.float32)
    write_stack(ParticleStack.from_arrays(disc[None], apix=APIX), tmp_path / "mask.mrcs")
    truth_cls = cm.cls[:, 0]
    found = {}
    for mask in (str(tmp_path / "mask.mrcs"), None):
        cfg = refine_config(_opts(simmask=mask)).simmx
        best = np.argmin(simmx(refs, particles, cfg, apix=APIX).score, axis=1)
        found[mask is not None] = np.mean(best[truth_cls != decoy] == truth_cls[truth_cls != decoy])
    assert found[True] >= 0.9, found
    assert found[False] <= 0.5, found


def test_usefilt_aligns_simmx_on_the_filtered_copy(views):
    """The particles are pure noise; --usefilt gives their clean copies. One iteration:
    simmx assigns each from the copies (median orientation error under 25 degrees on a
    30-degree grid; from the noise it is random, about 90)."""
    from cryorefine.testing import assignment_errors

    rng = np.random.default_rng(6)
    sub = np.arange(40)
    clean = views.take(sub)
    noise = ParticleStack.from_arrays(
        rng.standard_normal((len(sub), 64, 64)).astype(np.float32), apix=APIX, meta=clean.meta
    )
    cfg = refine_config(_opts(classiter=0))
    step = run_step([demo_map().data], noise, [sub], cfg, iteration=0, usefilt=clean)
    angle, _ = assignment_errors(step.cm, step.ref_rotations[0], clean.meta)
    assert np.median(angle) < 25.0, np.median(angle)


def test_usefilt_scores_class_members_on_the_filtered_copy(truth):
    """Class averaging in one iteration (from the exact classification of 10 grid views
    per class): the particles are pure noise, --usefilt their clean copies. Members are
    aligned to and scored against the average of the copies: mean ccc above 0.9 (on the
    noise it is the members' own share of the average's noise: measured 0.16)."""
    clean, cm, _ = _on_grid(truth, 10, 0.0, seed=8, classes=6)
    rng = np.random.default_rng(8)
    noise = ParticleStack.from_arrays(
        rng.standard_normal((len(clean), 64, 64)).astype(np.float32),
        apix=APIX,
        meta=clean.meta,
    )
    halves = [np.arange(len(clean))]
    step = run_step(
        [truth], noise, halves, refine_config(_opts()), iteration=0, cm=cm, usefilt=clean
    )
    assert -step.classes[0].score.mean() > 0.9, step.classes[0].score.mean()


# --- after make3d: --m3dpostprocess2 ----------------------------------------------------


def test_m3dpostprocess2_filters_the_map_and_what_is_projected_next(truth):
    """One iteration from the exact classification of grid views: a Gaussian low-pass
    at 1/25 Å^-1 after make3d leaves the map, and the map the next iteration projects,
    under 1% of their power beyond 1/8.7 Å^-1 without it."""
    stack, cm, _ = _on_grid(truth, 3, 0.1, seed=7, classes=6)
    hi = slice(22, 30)
    power = {}
    for post in ("filter.lowpass.gauss:cutoff_freq=0.04", None):
        cfg = refine_config(_opts(m3dpostprocess2=post, classiter=0))
        step = run_step([truth], stack, [np.arange(len(stack))], cfg, iteration=0, cm=cm)
        power[post is not None] = [shell_power(m)[hi].sum() for m in (step.volume, step.maps[0])]
    ratio = np.array(power[True]) / np.array(power[False])
    assert (ratio < 0.01).all(), ratio


# --- --orientgen: breaksym, n= ----------------------------------------------------------


def _two_fold_correlation(volume: np.ndarray) -> float:
    """Correlation of a map with itself turned 180 degrees about z (box centre n // 2)."""
    turned = np.roll(np.rot90(volume, 2, axes=(1, 2)), (1, 1), axis=(1, 2))
    return float(np.corrcoef(volume.ravel(), turned.ravel())[0, 1])


def test_breaksym_reconstructs_without_the_symmetry(views, truth):
    """--sym c2 with eman:...:breaksym=1: the projections cover both copies, so the map
    is reconstructed in c1 (as e2refine): from views of the asymmetric map its two-fold
    correlation stays near the map's own (0.40; under 0.55) and its likeness to the map
    above 0.95, where c2 makes the two-fold correlation 1."""
    broken = refine_config(_opts(sym="c2", orientgen="eman:delta=30:breaksym=1"))
    volume = make3d(views, broken.make3d)[0]
    own = _two_fold_correlation(truth)
    assert own < 0.8
    # measured 0.48 against the map's 0.40 (the reconstruction is smoother)
    assert _two_fold_correlation(volume) < own + 0.15, (_two_fold_correlation(volume), own)
    assert np.corrcoef(volume.ravel(), truth.ravel())[0, 1] > 0.95
    symmetric = make3d(views, refine_config(_opts(sym="c2")).make3d)[0]
    assert _two_fold_correlation(symmetric) > 0.99
    # run.log's line says what ran
    line = eman2_commands(_opts(sym="c2", orientgen="eman:delta=30:breaksym=1"), broken, 0, "p")
    assert "--sym C1" in line["make3d"] and "--sym=c2" in line["project3d"]


@pytest.mark.parametrize("gen", ["eman", "even", "saff"])
@pytest.mark.parametrize("sym", ["c1", "c2"])
def test_orientgen_n_sets_the_projection_count_and_the_stopping_step(gen, sym):
    """--orientgen GEN:n=60: about 60 projections over the asymmetric unit (within the
    rings' granularity, 20%), and the stopping rule's step is the spacing of those
    projections over it (half the sphere over the group's order: sqrt(2 pi / (order 60)) within
    20%). The rule stops on that step instead of failing."""
    from cryorefine.geometry.symmetry import symmetry_group
    from cryorefine.refine.driver import angular_step, stop_reason

    cfg = refine_config(_opts(sym=sym, orientgen=f"{gen}:n=60", iter=5))
    count = len(orientations(cfg.project3d.orientgen_mod, sym, rng=np.random.default_rng(0)))
    assert abs(count - 60) <= 12, count  # measured 49 to 71
    step = angular_step(cfg)
    spacing = np.rad2deg(np.sqrt(2 * np.pi / (symmetry_group(sym).order * count)))
    assert abs(step / spacing - 1) < 0.2, (step, spacing)
    entry = {"resolution": 10.0, "median_orientation_change": 0.9 * step}
    assert "under the" in stop_reason([entry] * 3, cfg)
    entry = {"resolution": 10.0, "median_orientation_change": 1.1 * step}
    assert stop_reason([entry] * 3, cfg) is None


# --- --parallel, inert options, run.log -------------------------------------------------


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity and two cores",
)
def test_parallel_thread_limits_kernels_ffts_and_affinity_then_restores_them(monkeypatch):
    """Inside --parallel thread:1 the compiled kernels run 1 thread, the process may use
    1 core, and every FFT is asked for 1 worker (scipy.fft's default -1 would start one
    per core); afterwards all three are what they were."""
    import numba
    import scipy.fft

    from cryorefine.fourier.fft import fft_threads
    from cryorefine.fourier.fsc import fsc
    from cryorefine.parallel import limited_cores

    def state():
        return numba.get_num_threads(), sorted(os.sched_getaffinity(0)), fft_threads()

    before = state()
    workers = []
    real = scipy.fft.rfftn

    def spy(*args, **kw):
        workers.append(kw.get("workers"))
        return real(*args, **kw)

    monkeypatch.setattr(scipy.fft, "rfftn", spy)
    a = np.random.default_rng(0).standard_normal((16, 16, 16))
    with limited_cores(1):
        threads, cores, _ = state()
        fsc(a, a)
    assert (threads, len(cores), workers) == (1, 1, [1, 1])
    assert state() == before


def test_inert_options_are_warned_once_and_run_log_says_what_ran(truth, tmp_path, capsys):
    """A library run (prepare, refine) with --m3dkeep and --automask3d, which cannot act
    with --m3dsource particles and without --mass: one warning line each, on the console
    and in run.log; the log's make3d line is the RELION command that rebuilds the map
    from particles_00.star, in c1 for breaksym; --parallel thread:1 is undone after."""
    from cryorefine.io.stacks import write_stack
    from cryorefine.refine.driver import prepare, refine
    from cryorefine.testing import simulate_particles

    sim = simulate_particles(
        truth, 40, apix=APIX, snr=1.0, rng=np.random.default_rng(9), defocus_range_um=None
    )
    write_stack(sim, tmp_path / "particles.star")
    write_map(tmp_path / "start.mrc", Map(truth, APIX))
    (tmp_path / "run").mkdir()
    opts = _opts(
        input=str(tmp_path / "particles.star"),
        model=str(tmp_path / "start.mrc"),
        path=str(tmp_path / "run"),
        sym="c2",
        orientgen="eman:delta=30:perturb=0:breaksym=1",
        m3dkeep=0.5,
        automask3d="1.1,30,5,5,0",
        parallel="thread:1",
    )
    assert len(inert_warnings(opts)) == 2
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    run = prepare(opts)
    try:
        refine(run, progress=False)
    finally:
        run.close()
    if affinity is not None:
        assert sorted(os.sched_getaffinity(0)) == affinity
    log = (tmp_path / "run" / "run.log").read_text()
    out = capsys.readouterr().out
    for text in (log, out):
        warned = [line for line in text.splitlines() if "warning:" in line]
        assert len(warned) == 2, warned
        assert "--m3dkeep 0.5 has no effect with --m3dsource particles" in warned[0]
        assert "--automask3d 1.1,30,5,5,0 has no effect without --mass" in warned[1]
    make3d_line = next(x for x in log.splitlines() if "iteration 00 make3d" in x)
    assert "e2make3d" not in make3d_line and "--keep" not in make3d_line
    assert f"relion_reconstruct --i {tmp_path}/run/particles_00.star" in make3d_line
    assert "--sym C1" in make3d_line


def test_a_library_caller_routes_the_log(truth, tmp_path, capsys):
    """refine(console=False) prints nothing; its lines reach run.log and a handler the
    caller put on the 'cryorefine' logger, each iteration's summary at INFO."""
    import logging

    from cryorefine.io.stacks import write_stack
    from cryorefine.refine.driver import prepare, refine
    from cryorefine.testing import simulate_particles

    sim = simulate_particles(
        truth, 40, apix=APIX, snr=1.0, rng=np.random.default_rng(9), defocus_range_um=None
    )
    write_stack(sim, tmp_path / "particles.star")
    write_map(tmp_path / "start.mrc", Map(truth, APIX))
    opts = _opts(
        input=str(tmp_path / "particles.star"),
        model=str(tmp_path / "start.mrc"),
        path=str(tmp_path / "run"),
        orientgen="eman:delta=30:perturb=0",
    )
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("cryorefine")
    logger.addHandler(handler)
    run = prepare(opts)
    try:
        refine(run, progress=False, console=False)
    finally:
        run.close()
        logger.removeHandler(handler)
    assert capsys.readouterr().out == ""
    summaries = [r.getMessage() for r in records if r.getMessage().startswith("iteration 00:")]
    assert len(summaries) == 1 and "FSC 0.143" in summaries[0]
    assert summaries[0] in (tmp_path / "run" / "run.log").read_text()

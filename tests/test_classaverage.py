"""Class averaging: members realigned onto their projection, the worst left out, no
particle lost (singletons kept, empty classes zero with ptcl_repr 0)."""

from __future__ import annotations

import numpy as np
import pytest

from cryorefine import memory
from cryorefine.align import transform2d as t2d
from cryorefine.config import ClassaverageConfig
from cryorefine.errors import CryorefineError
from cryorefine.stages.classaverage import classaverage, keep_members
from cryorefine.stages.classify import ClassMx

from .conftest import angle_diff

#: the misclassified members of the ``dataset`` fixture: the last of classes 1-9
BAD = 8 * np.arange(1, 10) + 7


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.fixture(scope="module")
def dataset(projections_d15):
    """Classes 0-9 with 8 members each (class 0 also 2 pure-noise members), class 10 a
    singleton, the other 82 classes empty. Members are their projection turned, shifted
    and (half of them) mirrored, plus noise at SNR 1; the classification's stored
    alignment is the truth perturbed by up to 6 degrees and 1 px. The last member of
    each of classes 1-9 (particles ``BAD``) is misclassified: it shows another
    projection, 40 directions away."""
    rng = np.random.default_rng(11)
    refs = projections_d15
    n = refs.shape[-1]
    classes = np.r_[np.repeat(np.arange(10), 8), 10]
    k = len(classes)
    alpha = rng.uniform(0, 360, k)
    tx, ty = rng.uniform(-3, 3, k), rng.uniform(-3, 3, k)
    mirror = rng.uniform(size=k) < 0.5
    # particle = projection moved by the inverse of the particle -> projection transform
    inv = t2d.inverse(alpha, tx, ty, mirror)
    shown = classes.copy()
    shown[BAD] = (classes[BAD] + 40) % len(refs)
    clean = t2d.apply_transform(refs[shown], *inv)
    sigma = np.sqrt(clean.var(axis=(1, 2), keepdims=True))
    particles = clean + sigma * rng.standard_normal(clean.shape).astype(np.float32)
    junk = (np.median(sigma) * rng.standard_normal((2, n, n))).astype(np.float32)
    particles = np.concatenate([particles, junk]).astype(np.float32)
    classes = np.r_[classes, 0, 0]
    kk = len(classes)
    noise_a = np.r_[alpha + rng.uniform(-6, 6, k), rng.uniform(0, 360, 2)]
    cm = ClassMx(
        classes[:, None].astype(np.int64),
        np.ones((kk, 1), np.float32),
        np.r_[tx + rng.uniform(-1, 1, k), 0, 0][:, None].astype(np.float32),
        np.r_[ty + rng.uniform(-1, 1, k), 0, 0][:, None].astype(np.float32),
        np.mod(noise_a, 360)[:, None].astype(np.float32),
        np.r_[mirror, False, False][:, None].astype(np.float32),
        np.ones((kk, 1), np.float32),
    )
    truth = (alpha, tx, ty, mirror)
    return refs, particles, cm, truth, k


def test_classes_average_their_members_onto_the_projection(dataset):
    refs, particles, cm, truth, k = dataset
    cfg = ClassaverageConfig(cmp="ccc", keep=0.8, iterations=2)
    out = classaverage(particles, cm, refs, cfg, apix=3.0)
    for c in range(10):
        assert corr(out.images[c], refs[c]) > 0.9, c
    # the two pure-noise members of class 0 are among those left out, and so is the
    # misclassified member of each of classes 1-9
    assert {k, k + 1} <= set(out.members(0, used=False).tolist())
    for c, bad in zip(range(1, 10), BAD, strict=True):
        assert bad in out.members(c, used=False), (c, out.members(c, used=False))
    # every real member's final transform is the truth (particle -> projection): each
    # is aligned to its class's average (SNR about 8), so about 1 degree of noise; the
    # classification's start was up to 6 degrees and 1 px off
    alpha, tx, ty, mirror = truth
    real = (out.particle < k) & ~np.isin(out.particle, BAD)
    p = out.particle[real]
    assert (out.mirror[real] == mirror[p]).all()
    err = angle_diff(out.alpha[real], alpha[p])
    assert np.median(err) < 2.0 and err.max() < 6.0, np.sort(err)
    assert np.median(np.hypot(out.tx[real] - tx[p], out.ty[real] - ty[p])) < 0.6
    assert out.qual.shape == (len(refs),) and out.qual[0] < out.qual[20] == 0.0


def test_no_particle_is_lost(dataset):
    """The singleton keeps its member (its average is the aligned particle); empty
    classes are zero images with ptcl_repr 0; every input particle appears."""
    refs, particles, cm, truth, k = dataset
    out = classaverage(particles, cm, refs, ClassaverageConfig(cmp="ccc"), apix=3.0)
    assert out.ptcl_repr[10] == 1 and out.members(10).tolist() == [k - 1]
    assert corr(out.images[10], refs[10]) > 0.5
    assert (out.ptcl_repr[11:] == 0).all() and not out.images[11:].any()
    assert sorted(set(out.particle.tolist())) == list(range(len(particles)))


def test_keep_rules():
    score = np.array([5.0, 1.0, 3.0, 2.0, 4.0, 9.0, 7.0])
    cls = np.array([0, 0, 0, 0, 0, 1, 1])
    kept = keep_members(score, cls, keep=0.6, keepsig=False)
    assert kept.tolist() == [False, True, True, True, False, False, True]  # 3 of 5, 1 of 2
    sig = keep_members(score, cls, keep=0.0, keepsig=True)  # within the mean
    assert sig.tolist() == [False, True, True, True, False, False, True]
    assert keep_members(score, cls, keep=1.0, keepsig=False).all()


def test_snr_weighted_score_needs_a_ctf(dataset):
    refs, particles, cm, _, _ = dataset
    with pytest.raises(CryorefineError, match=r"^--cmp frc:snrweight=1: snrweight needs the"):
        classaverage(particles, cm, refs, ClassaverageConfig(), apix=3.0)


def test_chunks_do_not_change_the_result(dataset, monkeypatch):

    refs, particles, cm, _, _ = dataset
    cfg = ClassaverageConfig(cmp="ccc")
    whole = classaverage(particles, cm, refs, cfg, apix=3.0)
    monkeypatch.setitem(memory.BUDGETS, "classaverage", 1)  # one class at a time
    parts = classaverage(particles, cm, refs, cfg, apix=3.0)
    np.testing.assert_allclose(parts.images, whole.images, atol=1e-5)
    assert np.array_equal(parts.used, whole.used)


def test_full_plane_of_an_even_map_round_trips():
    from cryorefine.align.average import _full_plane, _half_plane
    from cryorefine.fourier.ctf import CTFParams

    for n in (16, 15):
        ctf = CTFParams([2e4], [1.5e4], [30.0], 300, 2.7, 0.1, 0, 0, 1).evaluate(n, 2.0)
        full = _full_plane(ctf, n)
        np.testing.assert_array_equal(_half_plane(full), ctf)
        np.testing.assert_array_equal(full, full[:, ::-1, ::-1] if n % 2 else full)


@pytest.mark.parametrize("name", ["ctf.weight", "ctf.auto"])
def test_ctf_averagers_undo_each_members_ctf(projections_d15, name):
    """20 members of one projection, each turned, shifted, mirrored and modulated by its
    own astigmatic CTF (defocus 1-2.5 um, 3 Å/px) in its own frame: the CTF averagers
    give back the projection; the plain mean does not."""
    from cryorefine.fourier.ctf import CTFParams, apply_ctf
    from cryorefine.registry import AVERAGERS

    rng = np.random.default_rng(4)
    ref = projections_d15[7]
    n, k = ref.shape[-1], 20
    truth = (
        rng.uniform(0, 360, k),
        rng.uniform(-2, 2, k),
        rng.uniform(-2, 2, k),
        rng.uniform(size=k) < 0.5,
    )
    moved = t2d.apply_transform(np.broadcast_to(ref, (k, n, n)), *t2d.inverse(*truth))
    du = rng.uniform(1e4, 2.5e4, k)
    params = CTFParams(du, du - 800, rng.uniform(-90, 90, k), 300, 2.7, 0.1, 0, 0, 1)
    ctf = params.evaluate(n, 3.0).astype(np.float32)
    members = apply_ctf(moved, ctf).astype(np.float32)
    members += 0.05 * members.std() * rng.standard_normal(members.shape).astype(np.float32)
    groups = np.zeros(k, np.int64)
    moves = t2d.Transform2D.of(*truth)
    mean_avg, counts = AVERAGERS.parse("mean")(members, groups, 1, transform=moves)
    ctf_avg, _ = AVERAGERS.parse(name)(members, groups, 1, transform=moves, ctf=ctf)
    assert counts.tolist() == [k]
    inner = np.hypot(*np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2)) < n // 2 - 4
    c_ctf = corr(ctf_avg[0][inner], ref[inner])
    c_mean = corr(mean_avg[0][inner], ref[inner])
    assert c_ctf > 0.9 and c_ctf > c_mean + 0.2, (c_ctf, c_mean)
    with pytest.raises(CryorefineError, match="no CTF"):
        AVERAGERS.parse(name)(members, groups, 1, transform=moves)


def test_result_classmx_records_use_and_final_transforms(dataset):
    refs, particles, cm, truth, k = dataset
    out = classaverage(particles, cm, refs, ClassaverageConfig(cmp="ccc"), apix=3.0)
    res = out.result_classmx(cm)
    assert np.array_equal(res.cls, cm.cls)  # the classes stay; cm itself is untouched
    assert cm.weight.min() == 1.0
    # the noise and the misclassified members are marked out
    assert (res.weight[[k, k + 1, *BAD], 0] == 0.0).all(), res.weight[[k, k + 1, *BAD], 0]
    # the stored transforms are the members' true particle -> projection transforms,
    # not the classification's (up to 6 degrees and 1 px off)
    alpha, tx, ty, mirror = truth
    good = np.setdiff1d(np.arange(k), BAD)
    err = angle_diff(res.dalpha[good, 0], alpha[good])
    assert np.median(err) < 2.0, np.median(err)
    shift = np.hypot(res.dx[good, 0] - tx[good], res.dy[good, 0] - ty[good])
    assert np.median(shift) < 0.6, np.median(shift)
    assert (res.flip[good, 0] == mirror[good]).all()


def test_refining_aligner_and_per_pair_aligner(dataset):
    """--classralign refine after the engine, and a per-pair first aligner
    (rtf_exhaustive), each still average the classes onto their projections."""
    refs, particles, cm, _, _ = dataset
    for kw in ({"ralign": "refine"}, {"align": "rtf_exhaustive:maxshift=4"}):
        out = classaverage(particles, cm, refs, ClassaverageConfig(cmp="ccc", **kw), apix=3.0)
        assert min(corr(out.images[c], refs[c]) for c in range(10)) > 0.9, kw


def test_automask_of_the_running_average(dataset):
    """--automask masks the running average the members align to: the classes still
    match their projections, the members' alignments are as good, and the final
    averages are unmasked (not zero outside the particle)."""
    refs, particles, cm, truth, k = dataset
    cfg = ClassaverageConfig(cmp="ccc", keep=0.8, iterations=2, automask=True)
    out = classaverage(particles, cm, refs, cfg, apix=3.0)
    for c in range(10):
        assert corr(out.images[c], refs[c]) > 0.9, c
    alpha = truth[0]
    real = out.particle < k
    assert np.median(angle_diff(out.alpha[real], alpha[out.particle[real]])) < 2.0
    from cryorefine.processors.mask import centred_radius

    ring = (centred_radius(refs.shape[-1], 2) > 24) & (centred_radius(refs.shape[-1], 2) < 30)
    assert out.images[0][ring].std() > 0.05 * out.images[0].std()  # unmasked: noise there


def test_auto_mask_2d_covers_the_particle_only():
    from cryorefine.processors.mask import auto_mask_2d, centred_radius

    r = centred_radius(64, 2)
    rng = np.random.default_rng(0)
    image = 2.0 * (r < 10) + rng.normal(0, 0.3, (64, 64))
    image[4:9, 4:9] += 3  # a bright blob away from the particle
    mask = auto_mask_2d(image[None].astype(np.float32))[0]
    assert mask[r < 9].min() > 0.95
    assert mask[r > 15].max() < 0.05 and mask[6, 6] == 0


@pytest.mark.parametrize("suffix", [".star", ".hdf"])
def test_classaverage_command_writes_averages_and_resultmx(dataset, in_tmp, run_cli, suffix):
    """cryorefine classaverage on files: one average per projection with its orientation,
    ptcl_repr and members, and the classification updated by --resultmx."""
    from cryorefine.geometry.orientations import orientations
    from cryorefine.io.metadata import ParticleMetadata
    from cryorefine.io.stacks import ParticleStack, write_stack
    from cryorefine.stages.classify import read_classmx, write_classmx

    refs, particles, cm, truth, k = dataset
    meta = ParticleMetadata.empty(len(refs), apix=3.0)
    meta.rotations = orientations("eman:delta=15:perturb=0", "c1")
    write_stack(ParticleStack.from_arrays(refs, apix=3.0, meta=meta), "proj.star")
    write_stack(ParticleStack.from_arrays(particles, apix=3.0), "ptcl.mrcs")
    write_classmx(in_tmp / "cm.h5", cm, len(refs))
    code, out, err = run_cli(
        "classaverage",
        "--input",
        "ptcl.mrcs",
        "--classmx",
        "cm.h5",
        "--ref",
        "proj.star",
        "--output",
        f"classes{suffix}",
        "--resultmx",
        "result.h5",
        "--cmp",
        "ccc",
        "--iter",
        "2",
    )
    assert code == 0, err
    classes = ParticleStack.from_path(f"classes{suffix}")
    assert len(classes) == len(refs)
    assert classes.meta.weight[0] == 8 and classes.meta.weight[10] == 1
    assert (classes.meta.weight[11:] == 0).all()
    # EMAN2 leaves a blank average without xform.projection, so that e2make3d skips it
    oriented = classes.meta.has_orientation
    assert (
        oriented.all()
        if suffix == ".star"
        else oriented.tolist() == [True] * 11 + [False] * (len(refs) - 11)
    )
    np.testing.assert_allclose(classes.meta.rotations[:11], meta.rotations[:11], atol=1e-5)
    assert corr(classes.read(np.array([3]))[0], refs[3]) > 0.9
    classes.close()
    result = read_classmx(in_tmp / "result.h5")
    assert result.weight[k:, 0].tolist() == [0.0, 0.0]  # the two noise members, rejected
    assert result.weight[:8, 0].sum() >= 6
    if suffix == ".star":
        import starfile

        table = starfile.read("classes.star")["particles"]
        members = str(table["crClassPtclIdxs"][0]).split(",")
        assert len(members) == 8 and str(table["crExcClassPtclIdxs"][0]) != "-"
    else:  # as e2classaverage names its inputs
        from cryorefine.io.eman2 import HdfImages

        with HdfImages("classes.hdf") as f:
            h = f.header(0)
        assert (h["class_ptcl_src"], h["projection_image"]) == ("ptcl.mrcs", "proj.star")
        assert h["projection_image_idx"] == 0 and len(h["class_ptcl_idxs"]) == 8


def test_a_chunk_of_classes_stays_within_its_memory_budget(monkeypatch):
    """1,600 members of 64 px in 40 classes, averaged under a 32 MiB chunk budget: the
    memory traced while averaging (images, aligned copies, the alignment's and the
    averager's arrays) peaks within 1.15x the budget (measured 27 MiB; 202 MiB when a
    member was counted as 2 images)."""
    import tracemalloc

    n, n_classes, per_class = 64, 40, 40
    rng = np.random.default_rng(0)
    refs = rng.standard_normal((n_classes, n, n)).astype(np.float32)
    k = n_classes * per_class
    particles = rng.standard_normal((k, n, n)).astype(np.float32)
    zero = np.zeros((k, 1), np.float32)
    one = np.ones((k, 1), np.float32)
    cls = np.repeat(np.arange(n_classes), per_class)[:, None]
    cm = ClassMx(cls, one, zero, zero, zero, zero, one)
    cfg = ClassaverageConfig(cmp="ccc")
    few = np.arange(2 * per_class)  # first, what a first call sets up once (caches)
    cut = ClassMx(
        *(getattr(cm, f)[few] for f in ("cls", "weight", "dx", "dy", "dalpha", "flip", "scale"))
    )
    classaverage(particles[few], cut, refs, cfg, apix=3.0)
    budget = 32 * 2**20
    monkeypatch.setitem(memory.BUDGETS, "classaverage", budget)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        classaverage(particles, cm, refs, cfg, apix=3.0)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= 1.15 * budget, f"{peak / 2**20:.1f} MiB"


def test_lowmem_quarters_the_working_memory_and_keeps_the_averages(monkeypatch):
    """--lowmem (memory.low_memory): 800 members of 64 px under a 64 MiB budget
    average in a quarter of the memory, to the same averages and alignments."""
    import tracemalloc

    n, n_classes, per_class = 64, 40, 20
    rng = np.random.default_rng(1)
    refs = rng.standard_normal((n_classes, n, n)).astype(np.float32)
    k = n_classes * per_class
    particles = rng.standard_normal((k, n, n)).astype(np.float32)
    zero, one = np.zeros((k, 1), np.float32), np.ones((k, 1), np.float32)
    cm = ClassMx(
        np.repeat(np.arange(n_classes), per_class)[:, None], one, zero, zero, zero, zero, one
    )
    cfg = ClassaverageConfig(cmp="ccc")
    monkeypatch.setitem(memory.BUDGETS, "classaverage", 64 * 2**20)
    classaverage(
        particles[:80], cm.__class__(*(a[:80] for a in vars(cm).values())), refs, cfg, apix=3.0
    )
    peaks, results = {}, {}
    for low in (False, True):
        with memory.low_memory(low):
            tracemalloc.start()
            try:
                base = tracemalloc.get_traced_memory()[0]
                results[low] = classaverage(particles, cm, refs, cfg, apix=3.0)
                peaks[low] = tracemalloc.get_traced_memory()[1] - base
            finally:
                tracemalloc.stop()
    print({k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()})
    assert peaks[True] < 0.35 * peaks[False], peaks
    assert peaks[True] <= 1.25 * 16 * 2**20, peaks
    assert np.array_equal(results[True].images, results[False].images)
    for name in ("used", "alpha", "tx", "ty"):
        assert np.array_equal(getattr(results[True], name), getattr(results[False], name)), name

"""simmx, two-stage search and classify: layouts, known alignments, assignment."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryorefine.align import transform2d as t2d
from cryorefine.align.rotational import angle_step
from cryorefine.config import ClassifyConfig, SimmxConfig
from cryorefine.errors import CryorefineError
from cryorefine.fourier.project import project
from cryorefine.geometry.orientations import orientations
from cryorefine.io.stacks import ParticleStack
from cryorefine.stages.classify import classify, read_classmx
from cryorefine.stages.simmx import FIELDS, WORST, Simmx, read_simmx, score_pairs, simmx
from cryorefine.stages.twostage import N_BEST, twostage_pairs

from .conftest import PACKAGE_MAP, angle_diff


@pytest.fixture(scope="module")
def refs(projections_d15) -> np.ndarray:
    return projections_d15


CCC = SimmxConfig(aligncmp="ccc", cmp="ccc")


def test_projections_against_themselves(refs):
    """Identity: no shift, angle 0 (or 360) within a step, no flip, the row's best cell."""
    sim = simmx(refs, refs[:10], CCC, apix=3.0)
    assert sim.score.shape == (10, len(refs))
    diag = np.arange(10)
    assert (np.argmin(sim.score, axis=1) == diag).all()
    assert (sim.dx[diag, diag] == 0).all() and (sim.dy[diag, diag] == 0).all()
    assert (angle_diff(sim.dalpha[diag, diag], 0) <= angle_step(64)).all()
    assert (sim.flip[diag, diag] == 0).all()
    assert set(np.unique(sim.flip)) <= {0.0, 1.0} and (sim.scale == 1).all()


@pytest.mark.parametrize("ralign", [None, "refine"])
def test_stored_transform_brings_the_particle_onto_the_projection(refs, ralign):
    rng = np.random.default_rng(11)
    k = 8
    which = rng.integers(0, len(refs), k)
    alpha, tx, ty = rng.uniform(0, 360, k), rng.integers(-6, 7, k), rng.integers(-6, 7, k)
    mirror = rng.integers(0, 2, k).astype(bool)
    x = t2d.apply_transform(refs[which], alpha, tx, ty, mirror)
    cfg = SimmxConfig(aligncmp="ccc", cmp="ccc", ralign=ralign, raligncmp="ccc")
    sim = simmx(refs, x, cfg, apix=3.0)
    r = np.arange(k)
    p = (sim.dalpha[r, which], sim.dx[r, which], sim.dy[r, which], sim.flip[r, which] > 0.5)
    back = t2d.apply_transform(x, *p)
    inner = np.s_[:, 12:-12, 12:-12]  # away from the zero-filled edges
    for b, ref in zip(back[inner], refs[which][inner], strict=True):
        assert np.corrcoef(b.ravel(), ref.ravel())[0, 1] >= 0.95
    inv = t2d.inverse(alpha, tx, ty, mirror)
    assert (p[3] == mirror).all()
    tol_a, tol_t = (0.5, 0.3) if ralign else (angle_step(64) + 0.5, 1.0)
    assert angle_diff(p[0], inv[0]).max() <= tol_a
    assert np.hypot(p[1] - inv[1], p[2] - inv[2]).max() <= tol_t


def test_shrunk_search_reports_full_size_shifts(refs, in_tmp, run_cli):
    from cryorefine.io.stacks import ParticleStack, write_stack

    rng = np.random.default_rng(12)
    k = 6
    which = rng.integers(0, len(refs), k)
    tx, ty = rng.integers(-6, 7, k), rng.integers(-6, 7, k)
    x = t2d.apply_transform(refs[which], 0.0, tx, ty, False)
    write_stack(ParticleStack.from_arrays(refs, apix=3.0), "proj.mrcs")
    write_stack(ParticleStack.from_arrays(x, apix=3.0), "ptcl.mrcs")
    (in_tmp / "skip.txt").write_text("5\n")
    code, out, err = run_cli(
        "simmx",
        "proj.mrcs",
        "ptcl.mrcs",
        "simmx.h5",
        "--shrink",
        "2",
        "--aligncmp",
        "ccc",
        "--cmp",
        "ccc",
        "--exclude",
        "skip.txt",
    )
    assert code == 0, err
    sim = read_simmx(in_tmp / "simmx.h5")
    r = np.arange(5)
    inv = t2d.inverse(0.0, tx, ty, False)
    assert np.abs(sim.dx[r, which[:5]] - inv[1][:5]).max() <= 2
    assert np.abs(sim.dy[r, which[:5]] - inv[2][:5]).max() <= 2
    assert (sim.score[5] == WORST).all()  # excluded: the worst score, never a best match
    code, _, err = run_cli("simmx", "proj.mrcs", "ptcl.mrcs", "simmx.h5")
    assert code == 2 and "exists" in err  # no silent overwrite


def test_bad_options_are_one_line_errors(refs, in_tmp, run_cli):
    from cryorefine.io.stacks import ParticleStack, write_stack

    write_stack(ParticleStack.from_arrays(refs, apix=3.0), "proj.mrcs")
    write_stack(ParticleStack.from_arrays(refs[:, :32, :32].copy(), apix=3.0), "small.mrcs")
    for args, text in (
        (("--align", "nosuch"), "unknown aligner 'nosuch'"),
        (("--cmp", "frc:nokey=1"), "unknown parameter 'nokey'"),
        (("--shrink", "1"), "--shrink 1"),
    ):
        code, _, err = run_cli("simmx", "proj.mrcs", "proj.mrcs", "out.h5", *args)
        assert code == 2 and text in err and "Traceback" not in err
    code, _, err = run_cli("simmx", "proj.mrcs", "small.mrcs", "out.h5")
    assert code == 2 and "box" in err


@pytest.mark.parametrize("twostage", [0, 2])
def test_results_do_not_depend_on_the_particle_chunks(refs, in_tmp, run_cli, twostage):
    """simmx of 13 particles in chunks of 5 equals the one-chunk run, cell for cell."""
    from cryorefine.align.transform2d import apply_transform
    from cryorefine.io.stacks import ParticleStack, write_stack

    rng = np.random.default_rng(4)
    x = apply_transform(refs[rng.integers(0, len(refs), 13)], rng.uniform(0, 360, 13), 1, 0, 0)
    x += (rng.standard_normal(x.shape) * x.std()).astype(np.float32)
    write_stack(ParticleStack.from_arrays(refs, apix=3.0), "proj.mrcs")
    write_stack(ParticleStack.from_arrays(x, apix=3.0), "ptcl.mrcs")
    opts = ("--aligncmp", "ccc", "--cmp", "ccc", "--twostage", str(twostage))
    assert run_cli("simmx", "proj.mrcs", "ptcl.mrcs", "one.h5", *opts)[0] == 0
    assert run_cli("simmx", "proj.mrcs", "ptcl.mrcs", "five.h5", *opts, "--chunk", "5")[0] == 0
    one, five = read_simmx(Path("one.h5")), read_simmx(Path("five.h5"))
    for name in ("score", "dx", "dy", "dalpha", "flip"):
        assert np.array_equal(getattr(one, name), getattr(five, name)), name


def test_classify_facts():
    score = np.array([[3.0, 1.0, 2.0, 5.0], [1.0, 0.0, 0.0, 4.0]], np.float32)
    sim = Simmx.empty(2, 4)
    sim.score[:] = score
    sim.dx[:] = np.arange(8).reshape(2, 4)
    cm = classify(sim, ClassifyConfig(sep=2))
    assert cm.cls[0].tolist() == [1, 2] and cm.weight[0].tolist() == [1, 1]
    assert cm.dx[0].tolist() == [1, 2]
    assert cm.cls[1, 0] == 1  # ties: the first minimum
    assert cm.cls.shape == (2, 2) and cm.scale.shape == (2, 2)
    members = cm.members(4)
    assert members[1].tolist() == [0, 1] and members[3].size == 0
    with pytest.raises(CryorefineError, match="--sep 5"):
        classify(sim, ClassifyConfig(sep=5))
    with pytest.raises(CryorefineError, match="--sep 0"):
        ClassifyConfig(sep=0)
    assert cm.cls.dtype == np.int64
    assert classify(sim, ClassifyConfig(simvec=True)).cls.shape == (2, 1)


def test_two_stage_layout(refs):
    """100 projections: 30 centres, every projection in exactly two member lists; each
    particle's computed cells are the members of its 4 best centres."""
    from cryorefine.align.transform2d import apply_transform

    proj = project(
        mrcfile.read(PACKAGE_MAP),
        orientations("eman:delta=5:perturb=0", "c1")[:100],
    )
    cfg = SimmxConfig(aligncmp="ccc", cmp="ccc", twostage=2)
    plan = twostage_pairs(proj, cfg, 3.0, score_pairs)
    assert len(plan.centres) == 30 and len(set(plan.centres.tolist())) == 30
    counts = np.bincount(np.concatenate(plan.members), minlength=100)
    assert (counts == 2).all()
    rng = np.random.default_rng(3)
    x = apply_transform(proj[rng.integers(0, 100, 5)], rng.uniform(0, 360, 5), 1, -1, 0)
    p_idx, c_idx = plan(x, None)
    for p in range(5):
        cells = set(c_idx[p_idx == p].tolist())
        assert 1 <= len(cells) <= 2 * 100 // 30 * N_BEST + 20
    from cryorefine.stages.simmx import fill_uncomputed

    sim = score_pairs(proj, x, cfg, apix=3.0, pairs=(p_idx, c_idx))
    computed = np.zeros(sim.score.shape, bool)
    computed[p_idx, c_idx] = True
    fill_uncomputed(sim)
    row_max = np.where(computed, sim.score, -np.inf).max(axis=1)
    assert np.allclose(sim.score[~computed], np.repeat(row_max + 1e-4, (~computed).sum(1)))


@pytest.mark.slow
@pytest.mark.parametrize("cmp", ["ccc", "frc:zeromask=1:snrweight=1"])
def test_orientation_assignment_of_simulated_particles(rnapol2_64, in_tmp, run_cli, cmp):
    """150 particles (SNR 0.1, CTF, shifts up to 3 px) against eman:delta=5 projections:
    >= 90% assigned within 2 delta of the truth with a shift error <= 1 px, scored by
    ccc or by e2refine's default --simcmp (its SNR weights from the particles' CTF and
    the projections' power spectrum)."""
    from cryorefine.io.stacks import ParticleStack
    from cryorefine.testing import assignment_errors

    assert (
        run_cli(
            "simulate",
            "--model",
            rnapol2_64,
            "--out",
            "ptcl.star",
            "--n",
            "150",
            "--snr",
            "0.1",
            "--max-shift",
            "9",
            "--seed",
            "4",
        )[0]
        == 0
    )
    assert (
        run_cli(
            "project3d", "--model", rnapol2_64, "--out", "proj.hdf", "--orientgen", "eman:delta=5"
        )[0]
        == 0
    )
    code, _, err = run_cli(
        "simmx",
        "proj.hdf",
        "ptcl.star",
        "simmx.h5",
        "--align",
        "rotate_translate_flip:maxshift=4:subpixel=1",
        "--aligncmp",
        "ccc",
        "--cmp",
        cmp,
    )
    assert code == 0, err
    assert run_cli("classify", "simmx.h5", "classmx.h5")[0] == 0
    cm = read_classmx(in_tmp / "classmx.h5")
    proj, ptcl = ParticleStack.from_path("proj.hdf"), ParticleStack.from_path("ptcl.star")
    ang, err_px = assignment_errors(cm, proj.meta.rotations, ptcl.meta)
    assert np.mean((ang <= 10) & (err_px <= 1)) >= 0.9


def test_snr_curves_for_snrweight(refs, rng):
    """A particle's measured EMAN2 SNR curve is read at each ring's frequency (linear,
    last value beyond its end); without one, the curve follows CTF^2 times the
    projections' power. A constant curve makes frc:snrweight=1 the plain frc."""
    from cryorefine.align.compare import frc
    from cryorefine.fourier.ctf import CTFParams
    from cryorefine.io.metadata import ParticleMetadata
    from cryorefine.io.stacks import ParticleStack
    from cryorefine.stages.simmx import ctf_snr, signal_power

    n, apix, k = refs.shape[-1], 3.0, 3
    meta = ParticleMetadata.empty(k, apix=apix)
    meta.ctf = CTFParams(np.full(k, 2e4), np.full(k, 2e4), 0.0, 300, 2.7, 0.1, 0, 0, 1)
    meta.ctf_curves = np.full(k, None, dtype=object)
    meta.ctf_curves[0], meta.ctf_curves[2] = (0.01, [], [4.0, 2.0, 1.0]), (0.5, [], [0.7])
    stack = ParticleStack.from_arrays(refs[:k], apix=apix, meta=meta)
    signal = signal_power(refs)
    snr = ctf_snr(stack.meta, np.arange(k), n, apix, signal)
    s = np.arange(n // 2) / (apix * n)
    assert np.allclose(snr[0], np.interp(s, [0, 0.01, 0.02], [4, 2, 1]))
    assert snr[0][-1] == 1.0 and np.allclose(snr[2], 0.7)
    alone = ParticleStack.from_arrays(refs[:1], apix=apix, meta=meta.take([1]))
    assert np.allclose(snr[1], ctf_snr(alone.meta, [0], n, apix)[0] * signal)
    cut = signal.copy()
    cut[n // 3 :] = 0.0  # a hard low-pass: no signal there, weights just above 0
    low = ctf_snr(alone.meta, [0], n, apix, cut)[0]
    assert np.all(low[n // 3 :] > 0) and low[n // 3 :].max() < 1e-9 < low[1]
    assert signal[1:].max() == 1.0 and signal[1] > 100 * signal[n // 3]  # falls with s
    noisy = refs[:k] + rng.standard_normal(refs[:k].shape).astype(np.float32)
    plain = frc(refs[:k], noisy, apix=apix)
    assert np.allclose(frc(refs[:k], noisy, apix=apix, snrweight=True, snr=snr)[2], plain[2])


def test_prefilt_matches_the_particle_power_spectrum(refs, rng):
    from cryorefine.fourier.filters import match_power_spectrum

    noisy = refs[:4] + rng.standard_normal(refs[:4].shape).astype(np.float32)
    smooth = refs[4:8]
    out = match_power_spectrum(smooth, noisy)
    # ring-mean powers now follow the noisy particles' (up to the support mask's leakage)
    ring = np.rint(np.hypot(*np.meshgrid(np.fft.fftfreq(64, 1 / 64), np.arange(33), indexing="ij")))

    def ring_power(a: np.ndarray) -> np.ndarray:
        p = np.abs(np.fft.rfft2(a)) ** 2
        return np.stack([p[:, ring == r].mean(axis=1) for r in range(3, 29)], axis=1)

    ratio = ring_power(out) / ring_power(noisy)
    assert np.abs(np.median(ratio, axis=1) - 1).max() < 0.1
    assert np.median(ring_power(smooth) / ring_power(noisy)) < 0.2  # it did need filtering
    # with --prefilt the pair-by-pair path still finds each particle's projection
    x = t2d.apply_transform(refs[[1, 5, 9]], 40.0, 2, -1, False)
    sim = simmx(refs[:12], x, SimmxConfig(aligncmp="ccc", cmp="ccc", prefilt=True), apix=3.0)
    assert np.argmin(sim.score, axis=1).tolist() == [1, 5, 9]


@pytest.mark.parametrize("opts", [{"twostage": 2}, {"twostage": 2, "shrink": 2}, {"shrink": 2}])
def test_array_simmx_gives_what_the_command_writes(refs, in_tmp, run_cli, opts):
    """simmx(refs, particles, cfg) does the whole job of `cryorefine simmx`: the same
    matrix, cell for cell, with --twostage and --shrink (and the SNR weights of
    e2refine's default score, which need the particles' CTF)."""
    from cryorefine.io.stacks import ParticleStack, write_stack
    from cryorefine.testing import simulate_particles

    rng = np.random.default_rng(8)
    volume = mrcfile.read(PACKAGE_MAP)
    sim = simulate_particles(volume, 12, apix=3.0, snr=0.5, rng=rng, max_shift_a=6.0)
    write_stack(ParticleStack.from_arrays(refs, apix=3.0), "proj.mrcs")
    write_stack(sim, "ptcl.star")
    cfg = SimmxConfig(aligncmp="ccc", cmp="frc:zeromask=1:snrweight=1", **opts)
    args = [f"--{k}={v}" for k, v in opts.items()]
    code, _, err = run_cli(
        "simmx", "proj.mrcs", "ptcl.star", "cli.h5", "--aligncmp", "ccc", "--cmp", cfg.cmp, *args
    )
    assert code == 0, err
    written = read_simmx(in_tmp / "cli.h5")
    ours = simmx(refs, sim.read(), cfg, apix=3.0, meta=sim.meta)
    for name in ("score", "dx", "dy", "dalpha", "flip"):
        assert np.array_equal(getattr(ours, name), getattr(written, name)), name
    # and the two-stage search did restrict the search: most cells were filled in
    if opts.get("twostage"):
        assert np.mean(ours.score == ours.score.max(axis=1, keepdims=True)) > 0.3


def test_config_refuses_what_the_command_line_refuses():
    for kwargs, text in (
        ({"shrink": 1}, "--shrink 1"),
        ({"twostage": -1}, "--twostage -1"),
        ({"chunk": 0}, "--chunk 0"),
        ({"align": "nosuch"}, "unknown aligner 'nosuch'"),
        ({"cmp": "frc:nokey=1"}, "unknown parameter 'nokey'"),
        ({"cmp": "none"}, "--cmp: a comparator is required"),
        ({"mask": "no_such_mask.mrc"}, "--mask"),
    ):
        with pytest.raises(CryorefineError, match=re.escape(text)):
            SimmxConfig(**kwargs)
    assert SimmxConfig(shrink=0).shrink is None  # 0 is e2refine's "off"


@pytest.mark.parametrize("simvec", [False, True], ids=["best", "simvec"])
def test_a_matrix_classified_from_its_file_in_chunks_matches_the_whole(in_tmp, simvec):
    """classify_file reads 7 rows at a time (twice for --simvec, whose class patterns
    come from every row) and gives what classify gives on the whole matrix."""
    from cryorefine.stages.classify import classify_file
    from cryorefine.stages.simmx import write_simmx

    rng = np.random.default_rng(3)
    sim = Simmx.empty(50, 9)
    for name in ("score", "dx", "dy", "dalpha"):
        getattr(sim, name)[:] = rng.normal(size=(50, 9))
    write_simmx(in_tmp / "m.h5", sim)
    cfg = ClassifyConfig(sep=2, simvec=simvec)
    whole = classify(sim, cfg)
    chunked, best = classify_file(in_tmp / "m.h5", cfg, rows=7)
    for name in ("cls", "dx", "dy", "dalpha"):
        assert np.array_equal(getattr(whole, name), getattr(chunked, name)), name
    assert np.array_equal(best, sim.score[np.arange(50), whole.cls[:, 0]])


def test_the_similarity_matrix_streams_to_its_file_and_is_never_whole(in_tmp):
    """score_particles with a file writes each chunk's rows as they come: the same
    matrix and classes as in memory, while the traced peak stays below a third of the
    matrix (37 MiB here); held whole, it is above the matrix."""
    import tracemalloc

    from cryorefine.refine.options import defaults, refine_config
    from cryorefine.refine.step import score_particles
    from cryorefine.stages.simmx import read_simmx

    rng = np.random.default_rng(5)
    n_p, nc, box = 4000, 400, 8
    refs = rng.normal(size=(nc, box, box)).astype(np.float32)
    particles = ParticleStack.from_arrays(
        rng.normal(size=(n_p, box, box)).astype(np.float32), apix=3.0
    )
    halves = [np.arange(0, n_p, 2), np.arange(1, n_p, 2)]
    cfg = refine_config({**defaults(), "input": "p.star", "model": "m.mrc", "iter": 1, "sep": 2})
    cfg = dataclasses.replace(cfg, simmx=SimmxConfig(align=None, cmp="ccc", chunk=100))
    matrix = n_p * nc * 6 * 4
    peaks = {}
    files = [in_tmp / "s_even.hdf", in_tmp / "s_odd.hdf"]
    for name, out in (("file", files), ("memory", None)):
        tracemalloc.start()
        sim, cm, best = score_particles([refs, refs[::-1]], particles, halves, cfg, None, out=out)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if out is not None:
            assert sim is None
            streamed, streamed_cm = [read_simmx(f) for f in out], cm
    print({k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()}, f"matrix {matrix / 2**20:.1f} MiB")
    assert peaks["file"] < matrix / 3 < matrix < peaks["memory"], peaks
    for name in ("score", "dx", "dy"):
        for half, idx in zip(streamed, halves, strict=True):  # each half's rows in order
            assert np.array_equal(getattr(sim, name)[idx], getattr(half, name)), name
    assert np.array_equal(cm.cls, streamed_cm.cls)
    assert np.array_equal(best, sim.score[np.arange(n_p), cm.cls[:, 0]])


def test_simvec_classifies_each_half_by_its_own_patterns(in_tmp):
    """--simvec with two halves scored against different projections (the second
    half's are the first's in reverse order, so a column is a different projection in
    each): each half's classes are those of classify on that half's rows alone, in
    memory and from the halves' files. Patterns averaged over both halves' rows, whose
    columns mean different projections, give other classes for many particles."""
    from cryorefine.refine.options import defaults, refine_config
    from cryorefine.refine.step import score_particles

    rng = np.random.default_rng(8)
    n_p, nc, box = 300, 24, 8
    refs = rng.normal(size=(nc, box, box)).astype(np.float32)
    particles = ParticleStack.from_arrays(
        (refs[rng.integers(0, nc, n_p)] + rng.normal(size=(n_p, box, box))).astype(np.float32),
        apix=3.0,
    )
    halves = [np.arange(0, n_p, 2), np.arange(1, n_p, 2)]
    opts = {**defaults(), "input": "p.star", "model": "m.mrc", "iter": 1, "simvec": True}
    cfg = dataclasses.replace(
        refine_config(opts), simmx=SimmxConfig(align=None, cmp="ccc", chunk=50)
    )
    projections = [refs, refs[::-1]]
    sim, cm, _ = score_particles(projections, particles, halves, cfg, None)
    files = [in_tmp / "even.hdf", in_tmp / "odd.hdf"]
    _, from_files, _ = score_particles(projections, particles, halves, cfg, None, out=files)
    mixed = classify(sim, cfg.classify).cls[:, 0]
    for idx in halves:
        own = classify(Simmx(*(getattr(sim, f)[idx] for f in FIELDS)), cfg.classify)
        assert np.array_equal(cm.cls[idx], own.cls)
        assert np.array_equal(from_files.cls[idx], own.cls)
    differ = int((mixed != cm.cls[:, 0]).sum())
    print(f"{differ} of {n_p} particles in another class with the halves' patterns mixed")
    assert differ > n_p // 20

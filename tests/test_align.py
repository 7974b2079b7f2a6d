"""2D transforms, aligners and the batched engine against known answers and the
per-pair definitions."""

from __future__ import annotations

import numpy as np
import pytest

import cryorefine.config  # noqa: F401  (fills the registries)
from cryorefine.align import transform2d as t2d
from cryorefine.align.align2d import refine_alignment, rotate_translate_flip, translational
from cryorefine.align.engine import EngineAligner, align_all
from cryorefine.align.rotational import angle_step, polar_size
from cryorefine.registry import ALIGNERS, COMPARATORS

from .conftest import angle_diff


@pytest.fixture(scope="module")
def projections(projections_d15) -> np.ndarray:
    return projections_d15


def test_inverse_and_composition():
    alpha, tx, ty, m = t2d.inverse(30, 3, -2, 0)
    assert alpha[0] == pytest.approx(330)
    r = np.deg2rad(-30)
    expected = -np.array([[np.cos(r), np.sin(r)], [-np.sin(r), np.cos(r)]]) @ [3, -2]
    assert (tx[0], ty[0]) == pytest.approx(tuple(expected))
    alpha, tx, ty, m = t2d.inverse(30, 3, -2, 1)
    assert m[0] and alpha[0] == pytest.approx(30)  # a mirrored transform keeps its angle
    for mirror in (0, 1):
        ident = t2d.compose(t2d.inverse(30, 3, -2, mirror), (30, 3, -2, mirror))
        assert angle_diff(ident[0], 0)[0] < 1e-9 and abs(ident[1][0]) < 1e-9 and not ident[3][0]


def test_rotation_moves_content_as_specified():
    image = np.zeros((64, 64), np.float32)
    image[32, 37] = 1.0  # q = (5, 0)
    moved = t2d.apply_transform(image, 90, 0, 0, 0)
    assert tuple(np.argwhere(moved > 0.5)[0] - 32) == (-5, 0)  # (y, x): q -> (0, -5)
    shifted = t2d.apply_transform(image, 0, 2, -3, 0)
    assert tuple(np.argwhere(shifted > 0.5)[0] - 32) == (-3, 7)
    mirrored = t2d.apply_transform(image, 0, 0, 0, 1)
    assert tuple(np.argwhere(mirrored > 0.5)[0] - 32) == (0, -5)
    assert np.allclose(mirrored, t2d.mirror_x(image))
    # applying T then its inverse gives the image back (away from the zero-filled edge)
    back = t2d.apply_transform(
        t2d.apply_transform(image, 0, 3, 1, 1), *[v[0] for v in t2d.inverse(0, 3, 1, 1)]
    )
    assert np.allclose(back, image, atol=1e-6)


@pytest.mark.parametrize("n", [16, 15])
def test_rotate_stack_equals_the_per_image_rotation(n):
    """The bank's stack rotation gives exactly apply_transform's pixels, all rows or
    the first rows only (the others untouched)."""
    rng = np.random.default_rng(4)
    images = rng.standard_normal((5, n, n)).astype(np.float32)
    alpha = rng.uniform(0, 360, 3)
    out = np.full((5, 3, n, n), 7.0, np.float32)
    t2d.rotate_stack(images, alpha, out)
    direct = t2d.apply_transform(images, np.tile(alpha, 5), 0, 0, 0, source=np.repeat(range(5), 3))
    assert np.array_equal(out, direct.reshape(out.shape))
    part = np.full((5, 3, n, n), 7.0, np.float32)
    t2d.rotate_stack(images, alpha, part, rows=2)
    assert np.array_equal(part[:, :, :2], out[:, :, :2]) and (part[:, :, 2:] == 7.0).all()


@pytest.mark.parametrize("n", [64, 57])
def test_quarter_turns_and_turned_sums_match_direct_computation(n):
    """The bank's shortcuts: rotations from 90 degrees on made as quarter turns equal
    the direct bilinear rotation, the turned images' line sums derived from the
    untouched images equal those computed on rotate180 images, and the bank's
    transforms (half of them permuted from the others) equal FFTs of its images."""
    from cryorefine.align.bank import build_bank, line_sums, turned_line_sums
    from cryorefine.align.rotational import polar_size

    rng = np.random.default_rng(2)
    images = rng.standard_normal((6, n, n)).astype(np.float32)
    alpha = rng.uniform(0, 180, 6)
    direct = t2d.apply_transform(images, alpha, 0, 0, 0)
    assert np.allclose(t2d.rotate_with_quarter_turns(images, alpha, alpha >= 90), direct, atol=1e-6)
    base = line_sums(images, np.empty((6, 2, 2, n + 1)))
    turned = turned_line_sums(images, base, np.empty_like(base))
    expected = line_sums(t2d.rotate180(images), np.empty_like(base))
    assert np.allclose(turned, expected, atol=1e-9)
    bank = build_bank(images, np.array([4, 1]), polar_size(n)[0])
    ft = np.fft.rfft2(bank.images.astype(np.float64))
    scale = np.abs(ft).max()
    assert np.abs(bank.re - ft.real).max() < 1e-6 * scale
    assert np.abs(bank.im - ft.imag).max() < 1e-6 * scale


@pytest.mark.parametrize("n", [16, 15])
def test_materialised_candidates_match_the_transforms(n):
    """The engine's one-pass candidate images equal rotate180, shift_integer and
    mirror_x applied in turn (every combination of turn, shift and mirror), beside the
    images they are compared with; with zeromask both are zeroed wherever either is 0."""
    from cryorefine.align.candidates import materialised
    from cryorefine.align.compare import _zeromask

    rng = np.random.default_rng(5)
    bank = rng.standard_normal((3, n, n)).astype(np.float32)
    others = rng.standard_normal((4, n, n)).astype(np.float32)
    others[0, :, 5:8] = 0.0
    k = 40
    idx, turned, mirror = rng.integers(0, 3, k), rng.integers(0, 2, k), rng.integers(0, 2, k)
    dx, dy = rng.integers(-4, 5, k), rng.integers(-4, 5, k)
    o_i = rng.integers(0, 4, k)
    got, other = (a.copy() for a in materialised(bank, idx, turned, dx, dy, mirror, others, o_i))
    want = bank[idx]
    want[turned == 1] = t2d.rotate180(want[turned == 1])
    want = t2d.shift_integer(want, dx, dy)
    want[mirror == 1] = t2d.mirror_x(want[mirror == 1])
    assert np.array_equal(got, want) and np.array_equal(other, others[o_i])
    masked = materialised(bank, idx, turned, dx, dy, mirror, others, o_i, zeromask=True)
    expected = _zeromask(want, others[o_i])
    assert all(np.array_equal(g, e) for g, e in zip(masked, expected, strict=True))
    assert (masked[0] == 0).sum() > (want == 0).sum()  # the zero columns of others[0] count


def test_polar_sizes_follow_eman2():
    assert polar_size(64)[0] == 64 and polar_size(128)[0] == 140 and polar_size(256)[0] == 270
    assert polar_size(64)[1:] == (4, 30)


def _trials(projections, k, snr, seed, integer_shifts=True):
    rng = np.random.default_rng(seed)
    ref = projections[rng.integers(0, len(projections), k)]
    shift = (lambda: rng.integers(-4, 5, k)) if integer_shifts else (lambda: rng.uniform(-4, 4, k))
    truth = (rng.uniform(0, 360, k), shift(), shift(), rng.integers(0, 2, k).astype(bool))
    particles = t2d.apply_transform(ref, *truth)
    if snr is not None:
        sigma = np.sqrt(particles.var(axis=(1, 2), keepdims=True) / snr)
        particles += (rng.standard_normal(particles.shape) * sigma).astype(np.float32)
    return ref, particles, truth


def _cramer_rao(ref, truth, snr) -> np.ndarray:
    """Lower bound on the covariance of any unbiased estimate of (alpha [deg], tx, ty
    [px]) from one noisy particle: the inverse Fisher information ``J^T J / sigma^2``,
    ``J`` the model image's derivatives (central differences), white noise of variance
    ``var(clean) / snr``. ``(k, 3, 3)``."""
    k, h = len(ref), 0.02

    def model(d):
        alpha, tx, ty, mirror = truth
        moved = t2d.apply_transform(ref, alpha + d[0], tx + d[1], ty + d[2], mirror)
        return moved.reshape(k, -1).astype(np.float64)

    jac = np.stack([(model(e * h) - model(-e * h)) / (2 * h) for e in np.eye(3)], axis=1)
    var = model(np.zeros(3)).var(axis=1) / snr
    return np.linalg.inv(np.einsum("kip,kjp->kij", jac, jac) / var[:, None, None])


def _recovered(res, truth, max_angle=2.0, max_shift=0.5):
    alpha, tx, ty, mirror = truth
    return (
        (angle_diff(res.alpha, alpha) <= max_angle)
        & (np.hypot(res.tx - tx, res.ty - ty) <= max_shift)
        & (res.mirror == mirror)
    )


def test_rotate_translate_flip_recovers_exact_transforms(projections):
    """Noise-free: angle within one footprint step + 0.5 degrees, exact integer shift
    and mirror, for every one of 200 random transforms."""
    ref, particles, truth = _trials(projections, 200, None, 5)
    res = rotate_translate_flip(ref, particles, maxshift=6, cmp=COMPARATORS.parse("ccc"))
    assert _recovered(res, truth, angle_step(64) + 0.5, 0.0).all()


def test_rotate_translate_flip_and_refine_at_snr_03(projections):
    """EMAN2's chain (footprint search, then refine) on 500 trials at SNR 0.3: >= 95%
    within 2 degrees, 0.5 px and the right mirror (the Cramer-Rao bound allows 99.9%)."""
    ref, particles, truth = _trials(projections, 500, 0.3, 5)
    ccc = COMPARATORS.parse("ccc")
    coarse = rotate_translate_flip(ref, particles, maxshift=5, cmp=ccc)
    res = refine_alignment(ref, particles, start=coarse.transform, cmp=ccc)
    assert _recovered(res, truth).mean() >= 0.95


def test_alignment_errors_reach_the_cramer_rao_bound(projections):
    """SNR 1, 200 trials with sub-pixel shifts: the rms errors of rotate_translate_flip
    + refine are within 25% of the Cramer-Rao bound in angle and both shifts."""
    ref, particles, truth = _trials(projections, 200, 1.0, 7, integer_shifts=False)
    ccc = COMPARATORS.parse("ccc")
    coarse = rotate_translate_flip(ref, particles, maxshift=6, cmp=ccc)
    res = refine_alignment(ref, particles, start=coarse.transform, cmp=ccc)
    assert (res.mirror == truth[3]).all()
    err = np.stack(
        [(res.alpha - truth[0] + 180) % 360 - 180, res.tx - truth[1], res.ty - truth[2]], 1
    )
    bound = np.diagonal(_cramer_rao(ref, truth, 1.0), axis1=1, axis2=2)
    ratio = np.sqrt(np.mean(err**2, axis=0) / np.mean(bound, axis=0))
    assert (ratio <= 1.25).all(), ratio


@pytest.mark.slow
def test_exhaustive_search_and_refine_reach_the_noise_limit(projections):
    """500 trials at SNR 0.1: rtf_exhaustive then refine. Where the answer is not
    within 2 degrees / 0.5 px / right mirror, the solution found scores better than
    the true transform: the data, not the search, sets the error. Even an ideal
    unbiased estimator (errors at the Cramer-Rao bound) would be within 2 degrees and
    0.5 px in only about 90% of these trials."""
    ref, particles, truth = _trials(projections, 500, 0.1, 5)
    ccc = COMPARATORS.parse("ccc")
    coarse = ALIGNERS.parse("rtf_exhaustive:maxshift=5")(ref, particles, cmp=ccc)
    res = refine_alignment(ref, particles, start=coarse.transform, cmp=ccc)
    ok = _recovered(res, truth)
    assert ok.mean() >= 0.7, ok.mean()  # the footprint search alone: about 0.2
    assert (res.mirror == truth[3]).mean() >= 0.99
    at_truth = ccc(t2d.apply_transform(ref, *truth), particles)
    assert (res.score[~ok] <= at_truth[~ok] + 1e-6).mean() >= 0.95
    cov = _cramer_rao(ref, truth, 0.1)
    draws = np.random.default_rng(1).multivariate_normal(np.zeros(3), np.eye(3), (500, 400))
    draws = np.einsum("kij,kdj->kdi", np.linalg.cholesky(cov), draws)
    ideal = (np.abs(draws[..., 0]) <= 2) & (np.hypot(draws[..., 1], draws[..., 2]) <= 0.5)
    assert 0.85 <= ideal.mean() <= 0.93, ideal.mean()


def test_refine_polishes_a_perturbed_start(projections):
    rng = np.random.default_rng(6)
    k = 40
    ref = projections[rng.integers(0, len(projections), k)]
    alpha, tx, ty = rng.uniform(0, 360, k), rng.uniform(-4, 4, k), rng.uniform(-4, 4, k)
    mirror = rng.integers(0, 2, k).astype(bool)
    target = t2d.apply_transform(ref, alpha, tx, ty, mirror)
    start = (
        alpha + rng.choice([-3.0, 3.0], k),
        tx + rng.choice([-1.0, 1.0], k),
        ty + rng.choice([-1.0, 1.0], k),
        mirror,
    )
    res = refine_alignment(
        ref, target, start=t2d.Transform2D.of(*start), cmp=COMPARATORS.parse("ccc")
    )
    assert angle_diff(res.alpha, alpha).max() <= 0.5
    assert np.abs(res.tx - tx).max() <= 0.25 and np.abs(res.ty - ty).max() <= 0.25
    assert (res.mirror == mirror).all()
    # a solution beyond maxshift is rejected: the start comes back
    first3 = t2d.Transform2D.of(*start).take(slice(0, 3))
    far = refine_alignment(ref[:3], target[:3], start=first3, maxshift=0)
    assert np.allclose(far.tx, start[1][:3]) and np.allclose(far.alpha % 360, start[0][:3] % 360)


def test_translational_cannot_reach_beyond_maxshift(projections):
    image = projections[:1]
    moved = t2d.shift_integer(image, np.array([20]), np.array([0]))
    res = translational(image, moved, maxshift=16)
    assert abs(res.tx[0] - 20) > 1  # n/4 = 16 at 64 px: 20 px is out of reach
    near = translational(image, t2d.shift_integer(image, np.array([5]), np.array([-3])))
    assert (near.tx[0], near.ty[0]) == (5, -3)


@pytest.mark.parametrize(
    "aligncmp,final,box,ms",
    [
        ("ccc", "dot:normalize=1", 64, 5),
        ("sqeuclidean:normto=1", "sqeuclidean", 64, 5),
        ("frc:maxres=0", "ccc", 64, 5),
        ("ccc", "sqeuclidean", 57, 5),
        ("sqeuclidean:normto=1", "frc:maxres=0", 57, 5),
        ("sqeuclidean:normto=1", "sqeuclidean", 64, 0),
        ("ccc", "ccc", 57, 0),
        ("frc:zeromask=1:maxres=0", "phase:zeromask=1:maxres=0", 64, 3),
    ],
)
def test_engine_reproduces_the_per_pair_aligner(projections, aligncmp, final, box, ms):
    """Every pair of 12 noisy particles x all projections: the batched engine gives the
    per-pair definition's transforms and scores (even and odd boxes; ``maxshift=0``,
    where the engine works in real space, as stage 1 of ``--twostage`` uses it)."""
    rng = np.random.default_rng(7)
    lo = (64 - box) // 2
    refs = np.ascontiguousarray(projections[:, lo : lo + box, lo : lo + box])
    k, nc = 12, len(refs)
    truth = rng.integers(0, nc, k)
    x = t2d.apply_transform(
        refs[truth],
        rng.uniform(0, 360, k),
        rng.integers(-min(ms, 3), min(ms, 3) + 1, k),
        rng.integers(-min(ms, 3), min(ms, 3) + 1, k),
        rng.integers(0, 2, k),
    )
    x += (rng.standard_normal(x.shape) * x.std()).astype(np.float32)
    a, f = COMPARATORS.parse(aligncmp), COMPARATORS.parse(final)
    batched = align_all(refs, x, EngineAligner(a, maxshift=ms), final=f, ctx={"apix": 3.0})
    p_i, c_i = np.repeat(np.arange(k), nc), np.tile(np.arange(nc), k)
    pair = rotate_translate_flip(refs[c_i], x[p_i], maxshift=ms, cmp=a, apix=3.0)
    same = (
        np.isclose(pair.alpha, batched.alpha.ravel())
        & (pair.tx == batched.tx.ravel())
        & (pair.ty == batched.ty.ravel())
        & (pair.mirror == batched.mirror.ravel())
    )
    assert same.mean() >= 0.99
    score = f(x[p_i], pair.images, apix=3.0)
    assert np.allclose(score[same], batched.final.ravel()[same], rtol=1e-4, atol=1e-6)
    assert np.allclose(pair.score[same], batched.score.ravel()[same], rtol=1e-4, atol=1e-6)
    assert (np.argmin(batched.final, axis=1) == truth).mean() >= 0.9


def test_aligner_registry_lists_the_five():
    assert {
        "translational",
        "rotational",
        "rotate_translate",
        "rotate_translate_flip",
        "refine",
    } <= set(ALIGNERS.names())
    assert angle_step(64) == pytest.approx(180 / 64)

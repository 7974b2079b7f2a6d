"""Comparators: the properties the specification lists (smaller is better)."""

from __future__ import annotations

import numpy as np
import pytest

import cryorefine.config  # noqa: F401  (fills the registries)
from cryorefine.errors import CryorefineError
from cryorefine.registry import COMPARATORS


@pytest.fixture
def image(rng) -> np.ndarray:
    return rng.standard_normal((64, 64)).astype(np.float32)


def cmp(text: str):
    return COMPARATORS.parse(text)


def test_ccc_is_invariant_to_scale_and_offset(image):
    c = cmp("ccc")
    assert c(image, image)[0] == pytest.approx(-1, abs=1e-6)
    assert c(image, -image)[0] == pytest.approx(1, abs=1e-6)
    assert c(image, 3 * image + 5)[0] == pytest.approx(-1, abs=1e-6)
    assert c(image, np.ones_like(image))[0] == 2.0  # undefined
    assert cmp("ccc:negative=0")(image, image)[0] == pytest.approx(1, abs=1e-6)


def test_dot_normalised_and_plain(image):
    assert cmp("dot:normalize=1")(image, image)[0] == pytest.approx(-1, abs=1e-6)
    assert cmp("dot:normalize=1")(image, 2 * image)[0] == pytest.approx(-1, abs=1e-6)
    expected = -np.mean(image.astype(np.float64) ** 2)
    assert cmp("dot")(image, image)[0] == pytest.approx(expected, rel=1e-9)


def test_sqeuclidean_normto_removes_a_linear_scale(image, rng):
    positive = np.abs(image) + 0.1  # normto fits over pixels of a > 0
    assert cmp("sqeuclidean")(image, image)[0] == 0.0
    assert cmp("sqeuclidean:normto=1")(positive, 2 * positive + 1)[0] == pytest.approx(0, abs=1e-9)
    assert cmp("sqeuclidean")(positive, 2 * positive + 1)[0] > 1
    assert cmp("sqeuclidean")(image, 0 * image)[0] == pytest.approx(
        np.mean(image.astype(np.float64) ** 2)
    )


@pytest.mark.parametrize(
    "options",
    ["", ":sweight=0", ":ampweight=1", ":minres=0:maxres=0", ":minres=100:maxres=8", ":zeromask=1"],
)
def test_frc_of_an_image_with_itself_is_the_best_score(image, options):
    c = cmp("frc" + options)
    assert c(image, image, apix=2.0)[0] == pytest.approx(-1, abs=1e-6)
    assert c(image, 7 * image, apix=2.0)[0] == pytest.approx(-1, abs=1e-6)
    assert c(image, -image, apix=2.0)[0] == pytest.approx(1, abs=1e-6)


def test_frc_falls_with_noise(image, rng):
    c = cmp("frc")
    scores = [
        c(image, image + s * rng.standard_normal(image.shape), apix=2.0)[0] for s in (0.3, 1, 3)
    ]
    assert -1 < scores[0] < scores[1] < scores[2] < 0


def test_frc_snr_weighting_needs_an_snr_curve(image, rng):
    noisy = image + rng.standard_normal(image.shape)
    with pytest.raises(CryorefineError, match="snrweight"):
        cmp("frc:snrweight=1")(image, noisy, apix=2.0)
    flat = np.full((1, 32), 3.0)
    assert cmp("frc:snrweight=1")(image, noisy, apix=2.0, snr=flat)[0] == pytest.approx(
        cmp("frc")(image, noisy, apix=2.0)[0], rel=1e-9
    )
    # weighting by an SNR that is high only at low frequency changes the score
    falling = np.exp(-np.arange(32) / 4.0)[None]
    assert cmp("frc:snrweight=1")(image, noisy, apix=2.0, snr=falling)[0] != pytest.approx(
        cmp("frc")(image, noisy, apix=2.0)[0], rel=1e-3
    )


def test_phase_residual(image):
    c = cmp("phase")
    assert c(image, image, apix=2.0)[0] == pytest.approx(0, abs=1e-4)
    assert c(image, 5 * image, apix=2.0)[0] == pytest.approx(0, abs=1e-4)
    assert c(image, -image, apix=2.0)[0] == pytest.approx(np.pi, abs=1e-4)
    with pytest.raises(CryorefineError, match="snrweight and snrfn"):
        cmp("phase:snrweight=1:snrfn=1")


@pytest.mark.parametrize(
    "text", ["ccc", "dot", "dot:normalize=1", "sqeuclidean", "frc", "phase", "sqeuclidean:normto=1"]
)
def test_scores_order_identical_similar_different(image, rng, text):
    """Identical scores better than similar (half the variance noise), similar better
    than unrelated, each by a clear margin: a constant or reversed score fails."""
    other = rng.standard_normal(image.shape).astype(np.float32)
    similar = image + 0.7 * rng.standard_normal(image.shape).astype(np.float32)
    positive = text == "sqeuclidean:normto=1"  # normto fits over pixels of a > 0
    a = np.abs(image) + 0.1 if positive else image
    b, d = (np.abs(similar) + 0.1, np.abs(other) + 0.1) if positive else (similar, other)
    c = cmp(text)
    same, near, far = (c(a, x, apix=2.0)[0] for x in (a, b, d))
    spread = abs(far - same)
    assert spread > 0
    assert near < far - 0.05 * spread, (same, near, far)
    if text != "dot":  # the plain dot product of a with a + noise is that of a with a
        assert same < near - 0.05 * spread, (same, near, far)
    else:
        assert same < far - 0.5 * spread


def test_many_pairs_in_one_call(image, rng):
    stack = rng.standard_normal((5, 64, 64)).astype(np.float32)
    one_by_one = [cmp("frc")(image, s, apix=2.0)[0] for s in stack]
    assert np.allclose(cmp("frc")(image[None], stack, apix=2.0), one_by_one)

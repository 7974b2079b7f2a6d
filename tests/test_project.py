"""Projectors: geometric invariants, accuracy, standard vs fourier."""

import mrcfile
import numpy as np
import pytest
import scipy.fft

from cryorefine.fourier.fft import rfft_radius, shift_images
from cryorefine.fourier.project import project, project_fourier, project_standard
from cryorefine.geometry.euler import eman_to_matrices, relion_to_matrices
from cryorefine.testing import uniform_rotations


def lowpass(images: np.ndarray, cutoff_cpp: float) -> np.ndarray:
    n = images.shape[-1]
    ft = scipy.fft.rfft2(images)
    ft[..., rfft_radius((n, n)) > cutoff_cpp] = 0
    return scipy.fft.irfft2(ft, s=(n, n))


def corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_standard_at_identity_is_the_sum_along_z(rng):
    vol = rng.standard_normal((24, 24, 24)).astype(np.float32)
    expected = vol.astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(project_standard(vol, np.eye(3)[None])[0], expected, atol=1e-5)


@pytest.mark.parametrize("n", [32, 33])
@pytest.mark.parametrize("projector", ["standard", "fourier"])
def test_a_centred_delta_lands_on_the_centre_in_every_view(n, projector, rng):
    vol = np.zeros((n, n, n), np.float32)
    vol[n // 2, n // 2, n // 2] = 1.0
    images = project(vol, uniform_rotations(10, rng), projector=projector)
    for img in images:
        assert np.unravel_index(np.argmax(img), img.shape) == (n // 2, n // 2)
        if projector == "fourier":  # trilinear ray sums do not conserve a delta's mass
            assert img.sum() == pytest.approx(1.0, abs=0.02)


def test_a_quarter_turn_about_z_is_rot90(rng):
    n = 33  # odd: np.rot90 turns about the centre pixel n // 2
    vol = rng.standard_normal((n, n, n)).astype(np.float32)
    quarter = eman_to_matrices(0, 0, -90)  # active +90 deg about z: +x moves to +y
    np.testing.assert_allclose(quarter[0], [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    img = project_standard(vol, quarter)[0]
    # on (y, x) arrays, +x -> +y is np.rot90 with k=-1
    np.testing.assert_allclose(img, np.rot90(vol.sum(axis=0), k=-1), atol=1e-4)
    turned = project_fourier(vol, quarter)
    direct = project_fourier(np.rot90(vol, k=-1, axes=(1, 2)), np.eye(3)[None])
    # equal below Nyquist (the padded grid's Nyquist row has no rotated partner)
    np.testing.assert_allclose(lowpass(turned, 0.45), lowpass(direct, 0.45), atol=1e-3)


def test_a_shift_moves_a_delta_by_exactly_that():
    n = 32
    img = np.zeros((1, n, n), np.float32)
    img[0, 16, 16] = 1
    moved = shift_images(img, np.array([[3.0, -5.0]]))[0]
    assert np.unravel_index(np.argmax(moved), moved.shape) == (11, 19)
    assert moved.max() == pytest.approx(1.0, abs=1e-5)


def gaussian_blob_map(n: int, sigma: float, centre) -> np.ndarray:
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return np.exp(
        -((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2) / (2 * sigma**2)
    ).astype(np.float32)


def test_fourier_projection_of_a_gaussian_matches_the_analytic_one(rng):
    n, sigma, centre = 64, 2.0, np.array([5.0, -3.0, 4.0])
    vol = gaussian_blob_map(n, sigma, centre)
    rots = uniform_rotations(10, rng)
    images = project_fourier(vol, rots)
    c = np.arange(n) - n // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    for img, r in zip(images, rots, strict=True):
        px, py, _ = r @ centre  # the blob centre after rotation
        truth = (
            np.sqrt(2 * np.pi) * sigma * np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * sigma**2))
        )
        assert np.linalg.norm(img - truth) / np.linalg.norm(truth) < 0.02


def test_standard_and_fourier_agree_after_a_lowpass(rnapol2_64, rng):
    vol = mrcfile.read(rnapol2_64)
    rots = relion_to_matrices(*rng.uniform(-180, 180, (3, 20)))
    a = lowpass(project_standard(vol, rots), 2 / 3 * 0.5)
    b = lowpass(project_fourier(vol, rots), 2 / 3 * 0.5)
    assert min(corr(x, y) for x, y in zip(a, b, strict=True)) >= 0.99

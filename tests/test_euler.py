"""Euler conventions against the spec's worked numbers."""

import numpy as np
import pytest

from cryorefine.geometry.euler import (
    eman_to_matrices,
    matrices_to_eman,
    matrices_to_relion,
    relion_to_matrices,
)


def test_worked_example_matches_stored_transform():
    # spec 05 §5.7 fact 3: EMAN (120, 40, -40) stored row-major
    expected = np.array(
        [
            [0.043412, 0.909616, -0.413176],
            [-0.829598, 0.263258, 0.492404],
            [0.55667, 0.321394, 0.766044],
        ]
    )
    np.testing.assert_allclose(eman_to_matrices(120, 40, -40)[0], expected, atol=2e-6)
    np.testing.assert_allclose(relion_to_matrices(30, 40, 50)[0], expected, atol=2e-6)


def test_eman_and_relion_agree_under_the_offsets(rng):
    rot, tilt, psi = (
        rng.uniform(-180, 180, 200),
        rng.uniform(0, 180, 200),
        rng.uniform(-180, 180, 200),
    )
    np.testing.assert_allclose(
        eman_to_matrices(rot + 90, tilt, psi - 90), relion_to_matrices(rot, tilt, psi), atol=1e-12
    )


def test_spec02_example_and_viewing_directions():
    np.testing.assert_allclose(
        eman_to_matrices(30, 40, 50), relion_to_matrices(-60, 40, 140), atol=1e-12
    )
    np.testing.assert_allclose(eman_to_matrices(0, 90, 0)[0][2], [0, -1, 0], atol=1e-12)
    np.testing.assert_allclose(eman_to_matrices(90, 90, 0)[0][2], [1, 0, 0], atol=1e-12)


def test_relion_angles_round_trip(rng):
    rot, tilt, psi = (
        rng.uniform(-179, 179, 500),
        rng.uniform(1, 179, 500),
        rng.uniform(-179, 179, 500),
    )
    r2, t2, p2 = matrices_to_relion(relion_to_matrices(rot, tilt, psi))
    np.testing.assert_allclose(np.c_[r2, t2, p2], np.c_[rot, tilt, psi], atol=1e-9)


def test_eman_angles_round_trip_and_ranges(rng):
    az, alt, phi = rng.uniform(0, 360, 500), rng.uniform(1, 179, 500), rng.uniform(0, 360, 500)
    a2, b2, c2 = matrices_to_eman(eman_to_matrices(az, alt, phi))
    np.testing.assert_allclose(np.c_[a2, b2, c2], np.c_[az, alt, phi], atol=1e-9)
    assert matrices_to_eman(eman_to_matrices(30, 40, 50)) == pytest.approx((30, 40, 50))


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_degenerate_tilt_gives_an_equivalent_matrix(tilt):
    m = relion_to_matrices(25.0, tilt, 40.0)
    np.testing.assert_allclose(relion_to_matrices(*matrices_to_relion(m)), m, atol=1e-12)
    np.testing.assert_allclose(eman_to_matrices(*matrices_to_eman(m)), m, atol=1e-12)
    assert matrices_to_eman(m)[0][0] == 0.0


def test_matrices_are_proper_rotations(rng):
    m = relion_to_matrices(*rng.uniform(-180, 180, (3, 100)))
    np.testing.assert_allclose(
        m @ np.swapaxes(m, 1, 2), np.broadcast_to(np.eye(3), m.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(m), 1.0, atol=1e-12)

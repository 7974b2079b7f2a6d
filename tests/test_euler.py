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
    # ch02 §3.5 worked example and facts 2-3
    expected = np.array(
        [
            [0.263258, 0.829598, 0.492404],
            [-0.909616, 0.043412, 0.413176],
            [0.321394, -0.556670, 0.766044],
        ]
    )
    np.testing.assert_allclose(eman_to_matrices(30, 40, 50)[0], expected, atol=2e-6)
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


def test_antipodal_view_relation(rng):
    # ch02 fact 4: R_y(180) R(az, alt, phi) = R(az + 180, 180 - alt, -phi)
    az, alt, phi = rng.uniform(0, 360, 100), rng.uniform(0, 180, 100), rng.uniform(0, 360, 100)
    ry180 = np.diag([-1.0, 1.0, -1.0])
    np.testing.assert_allclose(
        ry180 @ eman_to_matrices(az, alt, phi),
        eman_to_matrices(az + 180, 180 - alt, -phi),
        atol=1e-12,
    )


def test_alignment_to_particle_orientation_worked_example():
    # ch02 fact 7 and §5: (alpha 20, tx 3, ty -2) on reference (30, 40, 50)
    from cryorefine.geometry.euler import particle_from_alignment

    ref = eman_to_matrices(30, 40, 50)
    rot, tau = particle_from_alignment(ref, 20, 3, -2, 0)
    assert matrices_to_eman(rot) == pytest.approx((30, 40, 30))
    np.testing.assert_allclose(-tau[0], [3.5031, -0.8533], atol=1e-4)  # RELION origin
    assert matrices_to_relion(rot) == pytest.approx((-60, 40, 120))
    rot, tau2 = particle_from_alignment(ref, 20, 3, -2, 1)
    assert matrices_to_eman(rot) == pytest.approx((210, 140, 290))
    assert matrices_to_relion(rot) == pytest.approx((120, 140, 20))
    np.testing.assert_allclose(tau2, tau)


def test_alignment_composition_tracks_points(rng):
    # the particle equals the reference projection moved by S^-1: check on points
    from cryorefine.geometry.euler import decompose_2d, particle_from_alignment, transform_2d

    k = 200
    ref = relion_to_matrices(*rng.uniform(-180, 180, (3, k)))
    alpha, tx, ty = rng.uniform(-180, 180, k), rng.uniform(-5, 5, k), rng.uniform(-5, 5, k)
    mirror = rng.uniform(size=k) < 0.5
    rot, tau = particle_from_alignment(ref, alpha, tx, ty, mirror)
    s = transform_2d(alpha, tx, ty, mirror)
    v = rng.standard_normal((k, 3))
    # a map point v lands, in the particle, at (rot v)_xy + tau ...
    in_particle = np.einsum("kij,kj->ki", rot, v)[:, :2] + tau
    # ... and S applied to it lands where the reference projection has it: (ref v)_xy
    moved = np.einsum("kij,kj->ki", s[:, :, :3], np.c_[in_particle, np.zeros(k)])[:, :2]
    moved += s[:, :2, 3]
    np.testing.assert_allclose(moved, np.einsum("kij,kj->ki", ref, v)[:, :2], atol=1e-9)
    a2, tx2, ty2, m2 = decompose_2d(s)
    np.testing.assert_allclose(np.c_[a2, tx2, ty2], np.c_[alpha, tx, ty], atol=1e-9)
    assert (m2 == mirror).all()


def test_quaternions_round_trip_and_match_the_matrix(rng):
    from cryorefine.geometry.euler import matrices_to_quaternions, quaternions_to_matrices

    m = relion_to_matrices(*rng.uniform(-180, 180, (3, 50)))
    q = matrices_to_quaternions(m)
    assert q.shape == (50, 4) and (q[:, 0] >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(quaternions_to_matrices(q), m, atol=1e-12)
    # a rotation by 90 deg about z: (w, x, y, z) = (cos 45, 0, 0, sin 45)
    quarter = eman_to_matrices(0, 0, -90)
    np.testing.assert_allclose(
        matrices_to_quaternions(quarter)[0], [np.sqrt(0.5), 0, 0, np.sqrt(0.5)], atol=1e-12
    )

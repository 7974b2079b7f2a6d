"""Symmetry groups: orders, closure, axes, asymmetric units, reduction."""

import numpy as np
import pytest

from cryorefine.errors import CryorefineError
from cryorefine.geometry.euler import eman_to_matrices
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.testing import uniform_rotations

GROUPS = {"c1": 1, "c4": 4, "c5": 5, "d2": 4, "d7": 14, "tet": 12, "oct": 24, "icos": 60}


def rotation_about(axis, angle_deg) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    return Rotation.from_rotvec(np.deg2rad(angle_deg) * axis).as_matrix()


def contains_matrix(ops: np.ndarray, m: np.ndarray) -> bool:
    return bool(np.abs(ops - m).max(axis=(1, 2)).min() < 1e-9)


@pytest.mark.parametrize("name,order", GROUPS.items())
def test_order_closure_and_proper_rotations(name, order):
    ops = symmetry_group(name).operators
    assert ops.shape == (order, 3, 3) and ops.dtype == np.float64
    np.testing.assert_allclose(np.linalg.det(ops), 1.0, atol=1e-12)
    products = np.einsum("aij,bjk->abik", ops, ops).reshape(-1, 3, 3)
    for p in products:
        assert contains_matrix(ops, p)
    # distinct elements
    d = np.abs(ops[:, None] - ops[None]).max(axis=(2, 3))
    assert (d + np.eye(order) * 9).min() > 1e-6


def test_axes_lie_where_emans_setting_puts_them():
    d7 = symmetry_group("d7").operators
    np.testing.assert_allclose(d7[7], np.diag([1.0, -1.0, -1.0]), atol=1e-12)  # 2-fold on x
    assert contains_matrix(d7, rotation_about([0, 0, 1], 360 / 7).T)
    icos = symmetry_group("icos").operators
    assert contains_matrix(icos, rotation_about([0, 1, 0], 180))  # 2-fold on y
    assert contains_matrix(icos, rotation_about([0, 0, 1], 72))  # 5-fold on z
    assert contains_matrix(icos, rotation_about([2 / np.sqrt(5), 0, 1 / np.sqrt(5)], 72))
    octa = symmetry_group("oct").operators
    for axis in np.eye(3):
        assert contains_matrix(octa, rotation_about(axis, 90))
    tet = symmetry_group("tet").operators
    assert contains_matrix(tet, rotation_about([0, 0, 1], 120))
    assert contains_matrix(tet, rotation_about([0, np.sqrt(2 / 3), -np.sqrt(1 / 3)], 180))


@pytest.mark.parametrize("name", [g for g in GROUPS if g != "c1"])
def test_operators_map_their_own_axes_onto_themselves(name):
    ops = symmetry_group(name).operators
    from scipy.spatial.transform import Rotation

    vecs = Rotation.from_matrix(ops).as_rotvec()
    axes = [v / np.linalg.norm(v) for v in vecs if np.linalg.norm(v) > 1e-6]
    axis_set = np.array(axes + [-a for a in axes])
    for op in ops:
        moved = axis_set @ op.T
        gap = np.linalg.norm(moved[:, None] - axis_set[None], axis=2).min(axis=1)
        assert gap.max() < 1e-9


@pytest.mark.parametrize("name", GROUPS)
@pytest.mark.parametrize("inc_mirror", [True, False])
def test_random_orientations_reduce_into_the_unit(name, inc_mirror):
    group = symmetry_group(name)
    rots = uniform_rotations(10000, np.random.default_rng(7))
    reduced, index, mirrored = group.reduce(rots, inc_mirror=inc_mirror)
    assert group.contains(reduced, inc_mirror=inc_mirror).all()
    flip = np.diag([-1.0, 1.0, -1.0])
    base = np.where(mirrored[:, None, None], flip @ rots, rots)
    np.testing.assert_allclose(reduced, base @ group.operators[index], atol=1e-12)
    if inc_mirror:
        assert not mirrored.any()
    else:
        assert 0.45 < mirrored.mean() < 0.55  # the mirror half is half the unit
    # equivalence under the group: relative angle 0 modulo symmetry (and mirror)
    assert group.angle_between(reduced, rots, mirror=not inc_mirror).max() < 1e-6


@pytest.mark.parametrize("name", GROUPS)
def test_units_tile_the_sphere(name):
    # each direction lies in the unit for (about) exactly one operator
    group = symmetry_group(name)
    rots = uniform_rotations(4000, np.random.default_rng(3))
    hits = sum(group.contains(rots @ op, inc_mirror=True).astype(int) for op in group.operators)
    assert np.mean(hits == 1) > 0.99


def test_angle_between_modulo_symmetry():
    c4 = symmetry_group("c4")
    a = eman_to_matrices(10, 30, 0)
    assert c4.angle_between(a, eman_to_matrices(100, 30, 0))[0] == pytest.approx(0, abs=1e-6)
    assert c4.angle_between(a, eman_to_matrices(10, 33, 0))[0] == pytest.approx(3, abs=1e-6)
    c1 = symmetry_group("c1")
    mirror_view = np.diag([-1.0, 1.0, -1.0]) @ a
    assert c1.angle_between(a, mirror_view)[0] > 90
    assert c1.angle_between(a, mirror_view, mirror=True)[0] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("bad", ["c0", "d", "q5", "icos2", "h3", "c-2", "d2.5", ""])
def test_malformed_symmetry_is_a_clear_error(bad):
    with pytest.raises(CryorefineError, match="--sym"):
        symmetry_group(bad)


def test_names_are_case_insensitive():
    assert symmetry_group("D7").name == "d7" and symmetry_group("ICOS5").name == "icos"

"""Orientation generators: EMAN2's counts, ring layout, coverage of the unit."""

import numpy as np
import pytest

from cryorefine.errors import CryorefineError
from cryorefine.geometry.euler import eman_to_matrices, matrices_to_eman
from cryorefine.geometry.orientations import eman_directions, orientations
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.testing import uniform_rotations

GROUPS = "c1 c2 c3 c4 c5 c6 d2 d3 d4 d5 d6 d7 tet oct icos".split()
# spec 02 §7.2: eman generator counts "without mirror / with mirror"
COUNTS = {
    3: "2301/4601 1186/2313 775/1549 596/1163 465/929 398/777 606/1157 402/775 313/582 249/465 "
    "217/389 187/337 198/390 109/197 48/77",
    5: "833/1665 436/837 279/557 221/425 170/340 148/285 226/419 150/279 120/213 97/170 86/143 "
    "74/124 72/138 43/73 22/29",
    10: "210/419 114/211 72/143 59/110 44/88 40/75 62/106 42/72 36/55 30/44 29/38 27/33 18/34 "
    "14/19 10/9",
}
CASES = [
    (d, g, tuple(map(int, c.split("/"))))
    for d, row in COUNTS.items()
    for g, c in zip(GROUPS, row.split(), strict=True)
]


@pytest.mark.parametrize("delta,group,expected", CASES)
def test_eman_counts_match_eman2(delta, group, expected):
    rng = np.random.default_rng(0)
    for mirror, want in zip((0, 1), expected, strict=True):
        rots = orientations(f"eman:delta={delta}:inc_mirror={mirror}", group, rng=rng)
        assert len(rots) == want


def test_first_c1_ring_and_icos_layout():
    az, alt = eman_directions(symmetry_group("c1"), 5.0)
    assert (az[0], alt[0]) == (0.0, 0.0)
    assert alt[1:8] == [5.0] * 7 and alt[8] == 10.0
    np.testing.assert_allclose(np.diff(az[1:8]), 57.369, atol=1e-3)
    assert az[9] == pytest.approx(28.794, abs=1e-3)
    assert (az[-1], alt[-1]) == (180.0, 90.0)
    rings = np.unique(alt, return_counts=True)
    assert rings[1].tolist() == [
        1,
        7,
        13,
        19,
        25,
        31,
        36,
        42,
        47,
        51,
        55,
        59,
        63,
        66,
        68,
        70,
        71,
        72,
        37,
    ]
    az, alt = eman_directions(symmetry_group("icos"), 5.0)
    np.testing.assert_allclose(az[:5], [234, 234, 251.143, 268.286, 234], atol=1e-3)
    assert alt[:5] == [0, 5, 5, 5, 10] and az[-1] == pytest.approx(268.869, abs=1e-3)


def test_other_generators_counts():
    want = {
        ("even", "c1", 5): (835, 1599),
        ("even", "d2", 5): (190, 406),
        ("even", "icos", 5): (9, 21),
        ("even", "c1", 10): (213, 391),
        ("even", "d2", 10): (44, 100),
        ("even", "icos", 10): (4, 5),
        ("saff", "c1", 5): (850, 1701),
        ("saff", "d2", 5): (212, 425),
        ("saff", "icos", 5): (13, 27),
    }
    for (gen, group, delta), counts in want.items():
        got = tuple(len(orientations(f"{gen}:delta={delta}:inc_mirror={m}", group)) for m in (0, 1))
        assert got == counts, (gen, group, delta)


def test_perturb_keeps_the_count_and_jitters():
    rng = np.random.default_rng(1)
    a = orientations("eman:delta=5:perturb=1", "c1", rng=rng)
    b = orientations("eman:delta=5:perturb=0", "c1", rng=rng)
    assert len(a) == len(b) == 833
    assert np.allclose(a[0], b[0])  # the pole is not perturbed
    alt_a, alt_b = matrices_to_eman(a)[1], matrices_to_eman(b)[1]
    assert 0.3 < np.std(alt_a - alt_b) < 1.0  # sigma = delta/8 = 0.625


def test_phi_options_n_and_breaksym():
    base = orientations("eman:delta=10:perturb=0", "c1")
    more = orientations("eman:delta=10:perturb=0:phitoo=90", "c1")
    assert len(more) == 4 * len(base)
    np.testing.assert_allclose(matrices_to_eman(more[:4])[2], [0, 90, 180, 270], atol=1e-9)
    rand_phi = orientations(
        "eman:delta=10:perturb=0:random_phi=1", "c1", rng=np.random.default_rng(0)
    )
    assert np.std(matrices_to_eman(rand_phi)[2]) > 50
    for n in (100, 300, 1000):  # n is approximate (the count jumps as rings appear)
        assert abs(len(orientations(f"eman:n={n}:perturb=0", "c1")) - n) <= 0.1 * n
    broken = orientations("eman:delta=10:perturb=0:breaksym=1", "c4")
    # the whole hemisphere, as c1 without mirror (210 at delta 10)
    assert 200 <= len(broken) <= 250 and (broken[:, 2, 2] >= 0).all()
    rand = orientations("rand:n=500:seed=3", "d2")
    assert len(rand) == 500 and symmetry_group("d2").contains(rand, inc_mirror=True).all()


@pytest.mark.parametrize("group", ["c4", "d7", "tet", "oct"])
def test_every_direction_is_near_a_generated_one(group):
    # within 1.5 * delta of a generated orientation, modulo symmetry and mirror
    delta = 5.0
    sym = symmetry_group(group)
    gen = orientations(f"eman:delta={delta}:perturb=0", group)
    probe = uniform_rotations(10000, np.random.default_rng(11))
    d_gen = eman_to_matrices(*matrices_to_eman(gen)[:2], 0)[:, 2]  # viewing directions
    flip = np.diag([-1.0, 1.0, -1.0])
    best = np.full(len(probe), np.inf)
    for base in (probe, flip @ probe):
        for op in sym.operators:
            d_probe = (base @ op)[:, 2]
            cos = np.clip(d_probe @ d_gen.T, -1, 1).max(axis=1)
            best = np.minimum(best, np.rad2deg(np.arccos(cos)))
    assert best.max() <= 1.5 * delta


def test_bad_generator_options():
    with pytest.raises(CryorefineError, match="unknown orientation generator 'emann'"):
        orientations("emann:delta=5", "c1")
    with pytest.raises(CryorefineError, match="exactly one of delta, n"):
        orientations("eman:delta=5:n=100", "c1")
    with pytest.raises(CryorefineError, match="delta must be positive"):
        orientations("eman:delta=-1", "c1")
    with pytest.raises(CryorefineError, match="--sym"):
        orientations("eman:delta=5", "x3")

"""Local search: poses refined around the current ones, against a map, within a range."""

from __future__ import annotations

import numpy as np
import pytest

from cryorefine.align.local import (
    FourierPoints,
    local_search,
    perturbed,
    rotation_angle_deg,
    score_candidates,
)
from cryorefine.fourier.project import extract_slices, prepare_volume
from cryorefine.testing import demo_map, simulate_particles


@pytest.fixture(scope="module")
def particles():
    """120 particles of the bundled map (3 Å/px) at SNR 1, with CTF (1-2.5 um) and shifts
    up to 2 px, their CTFs, and the map's padded transform."""
    truth = demo_map()
    stack = simulate_particles(
        truth.data, 120, apix=truth.apix, snr=1.0, rng=np.random.default_rng(5), max_shift_a=6.0
    )
    ctf = stack.meta.ctf.evaluate(stack.box, stack.apix)
    return stack, ctf, prepare_volume(truth.data)


def _moved(rotations: np.ndarray, angle_deg: float, seed: int) -> np.ndarray:
    """Each rotation turned by ``angle_deg`` about an axis of its own, drawn at random."""
    axis = np.random.default_rng(seed).standard_normal((len(rotations), 3))
    axis *= np.deg2rad(angle_deg) / np.linalg.norm(axis, axis=1)[:, None]
    return perturbed(rotations, axis[:, None])[:, 0]


def _search(particles, start, shifts, *, range_deg, score="ccc"):
    stack, ctf, vft = particles
    points = FourierPoints.of(stack.box)
    weight = np.ones((len(stack), points.rings))
    return local_search(
        vft,
        stack.read(),
        ctf,
        start,
        shifts,
        weight,
        points,
        range_deg=range_deg,
        step_deg=2.0,
        shift_px=2.0,
        score=score,
    )


@pytest.mark.parametrize("score", ["frc", "ccc"])
def test_poses_three_degrees_off_are_refined_below_one_degree(particles, score):
    """Orientations turned 3 degrees off the truth and shifts up to 1 px off, refined
    against the true map at SNR 1: median orientation error under 1 degree, and under
    0.5 degree, which the grid alone does not reach (measured 0.22 ccc, 0.26 frc; floor
    0.20; the 2-degree grid without the polish 1.02-1.04), and shift error under 0.25 px
    (measured 0.04; without the polish 0.39)."""
    stack, _, _ = particles
    truth_shift = stack.meta.shift_a / stack.apix
    start = _moved(stack.meta.rotations, 3.0, seed=1)
    shifts = truth_shift + np.random.default_rng(2).uniform(-1, 1, truth_shift.shape)
    res = _search(particles, start, shifts, range_deg=6.0, score=score)
    err = rotation_angle_deg(res.rotations, stack.meta.rotations)
    shift_err = np.linalg.norm(res.shifts_px - truth_shift, axis=1)
    print(f"{score}: median error {np.median(err):.2f} deg, shift {np.median(shift_err):.3f} px")
    assert np.median(err) < 0.5 and np.median(shift_err) < 0.25


def test_no_particle_moves_beyond_the_range(particles):
    """Started 3 degrees and 2.5 px off with a 1.5-degree, 2 px range, the best poses lie
    outside the range: every particle stops inside it, and most at its edge (the bound
    held them, measured: median move 1.4 degrees)."""
    stack, _, _ = particles
    start = _moved(stack.meta.rotations, 3.0, seed=3)
    shifts = stack.meta.shift_a / stack.apix + 2.5 / np.sqrt(2)
    res = _search(particles, start, shifts, range_deg=1.5)
    moved = rotation_angle_deg(res.rotations, start)
    assert moved.max() <= 1.5 + 1e-6, moved.max()
    assert np.linalg.norm(res.shifts_px - shifts, axis=1).max() <= 2.0 + 1e-6
    assert np.median(moved) > 1.2, np.median(moved)
    # and it moved towards the truth
    assert np.median(rotation_angle_deg(res.rotations, stack.meta.rotations)) < 2.0


def test_the_kernel_scores_the_central_slice_as_numpy_does(particles):
    """The compiled score of a particle against a rotation equals the FRC written here in
    NumPy from extract_slices (map_coordinates on the padded transform, twice the box, so
    that each point of the particle's grid is a point of the slice's)."""
    stack, ctf, vft = particles
    n = stack.box
    points = FourierPoints.of(n)
    images = stack.read()[:4]
    rots = _moved(stack.meta.rotations[:4], 2.0, seed=4)
    slices = extract_slices(vft, rots)  # (4, P, P // 2 + 1), origin at index 0
    size = vft.pad_size
    model = slices[:, (2 * points.qy.astype(int)) % size, 2 * points.qx.astype(int)]
    model = model * ctf[:4, points.iy, points.ix]
    shift = np.array([0.7, -1.2])  # the particle centred by -shift
    ft = np.fft.rfft2(np.fft.ifftshift(images, axes=(-2, -1)))[:, points.iy, points.ix]
    centred = ft * np.exp(2j * np.pi * (points.qx * shift[0] + points.qy * shift[1]) / n)
    rings = points.rings
    expected = []
    for x, v in zip(centred, model, strict=True):
        dot = np.bincount(points.ring, (x * v.conj()).real, rings)[1:]
        px = np.bincount(points.ring, abs(x) ** 2, rings)[1:]
        pv = np.bincount(points.ring, abs(v) ** 2, rings)[1:]
        expected.append(np.mean(dot / np.sqrt(px * pv)))
    weight = np.ones((4, rings))
    weight[:, 0] = 0
    got = score_candidates(
        vft,
        rots[:, None],
        np.broadcast_to(shift, (4, 1, 2)),
        np.ascontiguousarray(ft, np.complex64),
        np.ascontiguousarray(ctf[:4, points.iy, points.ix]),
        points,
        weight,
        score="frc",
    )[:, 0, 0]
    np.testing.assert_allclose(got, expected, atol=2e-4)

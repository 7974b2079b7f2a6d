"""Direct Fourier reconstruction and FSC against known answers."""

import mrcfile
import numpy as np
import pytest

from cryorefine.config import Make3dConfig
from cryorefine.fourier.filters import radial_power
from cryorefine.fourier.fsc import fsc, resolution_at
from cryorefine.fourier.project import project
from cryorefine.fourier.reconstruct import FourierVolume, backproject, image_slices
from cryorefine.geometry.orientations import orientations
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.stacks import ParticleStack
from cryorefine.stages.make3d import make3d
from cryorefine.testing import simulate_particles, uniform_rotations


def test_inserting_then_removing_a_slice_leaves_nothing(rng):
    vol = FourierVolume(32, 16)
    images = rng.standard_normal((3, 16, 16)).astype(np.float32)
    rots = uniform_rotations(3, rng)
    slices = image_slices(images, 32)
    ops = symmetry_group("c2").operators
    vol.insert(slices, rots, ops=ops, weights=np.ones(3))
    f, w = vol.sums()
    assert np.abs(w).max() > 0
    vol.insert(slices, rots, ops=ops, weights=-np.ones(3))
    f2, w2 = vol.sums()
    assert np.abs(f2).max() < 1e-6 * np.abs(f).max() and np.abs(w2).max() < 1e-6 * w.max()


def test_noise_free_projections_reconstruct_the_map(rnapol2_64):
    truth = mrcfile.read(rnapol2_64)
    rots = orientations("eman:delta=3:perturb=0", "c1")
    volume = backproject(project(truth, rots), rots).finish()
    curve = fsc(volume, truth)
    assert curve[1 : int(0.8 * 32) + 1].min() >= 0.99
    assert volume.sum() / truth.sum() == pytest.approx(1.0, abs=0.1)


def quarter_turn(vol: np.ndarray) -> np.ndarray:
    """Turn a map by 90 deg about z around voxel n // 2 (np.rot90 turns about (n-1)/2)."""
    return np.roll(np.rot90(vol, 1, axes=(1, 2)), 1, axis=1)


def test_symmetric_reconstruction_from_the_asymmetric_unit(rnapol2_64):
    truth = mrcfile.read(rnapol2_64)
    c4 = symmetry_group("c4")
    sym_truth = np.mean(
        [
            truth,
            quarter_turn(truth),
            quarter_turn(quarter_turn(truth)),
            quarter_turn(quarter_turn(quarter_turn(truth))),
        ],
        axis=0,
    )
    unit = orientations("eman:delta=3:perturb=0:inc_mirror=1", "c4")
    full = orientations("eman:delta=3:perturb=0", "c1")
    from_unit = backproject(project(sym_truth, unit), unit, ops=c4.operators).finish()
    from_full = backproject(project(sym_truth, full), full).finish()
    assert fsc(from_unit, from_full)[1:26].min() > 0.99
    assert fsc(quarter_turn(from_unit), from_unit)[1:26].min() > 0.99  # 4-fold invariant
    assert fsc(quarter_turn(truth), truth)[1:26].min() < 0.9  # while the input is not


@pytest.mark.slow
def test_d7_symmetry_beats_c1_on_noisy_particles(rnapol2_64):
    truth = mrcfile.read(rnapol2_64)
    d7 = symmetry_group("d7")
    from cryorefine.fourier.project import project_fourier

    # a d7-symmetric map: average of the map over the group (via reconstruction)
    views = orientations("eman:delta=4:perturb=0", "c1")
    sym_truth = backproject(project_fourier(truth, views), views, ops=d7.operators).finish()
    rng = np.random.default_rng(5)
    stack = simulate_particles(sym_truth, 600, apix=3.0, snr=0.05, rng=rng, max_shift_a=6.0)
    with_d7, _ = make3d(stack, Make3dConfig(sym="d7"))
    with_c1, _ = make3d(stack, Make3dConfig(sym="c1"))
    a, b = fsc(with_d7, sym_truth), fsc(with_c1, sym_truth)
    assert a[1:30].mean() > b[1:30].mean() + 0.05
    assert resolution_at(a, threshold=0.5, apix=3.0) < resolution_at(b, threshold=0.5, apix=3.0)


def test_fsc_of_a_map_and_itself_plus_noise_is_the_analytic_curve(rnapol2_64, rng):
    truth = mrcfile.read(rnapol2_64).astype(np.float64)
    noise = rng.standard_normal(truth.shape) * truth.std()
    curve = fsc(truth, truth + noise)
    ps, pn = radial_power(truth, 3), radial_power(noise, 3)
    expected = np.sqrt(ps / (ps + pn))  # correlation of S with S + N per shell
    np.testing.assert_allclose(curve[1:], expected[1:], atol=0.05)
    assert fsc(truth, 3 * truth)[1:] == pytest.approx(1.0)


def test_make3d_skips_images_without_orientation_and_weights(rnapol2_64, rng):
    truth = mrcfile.read(rnapol2_64)
    rots = orientations("eman:delta=6:perturb=0", "c1")
    images = project(truth, rots)
    meta = ParticleMetadata.empty(len(rots), apix=3.0)
    meta.rotations = rots.copy()
    meta.rotations[:5] = np.nan
    meta.weight[5:10] = 0.0
    volume, info = make3d(ParticleStack.from_arrays(images, apix=3.0, meta=meta))
    assert len(info["inserted"]) == len(rots) - 10 and len(info["skipped"]) == 10
    assert fsc(volume, truth)[1:20].min() > 0.98


def test_keep_excludes_the_worst_slices_and_sums_their_weights(rnapol2_64):
    # ch04 fact 8: --keepabs --keep 0.8 --iter 2 on 100 class averages excludes 20;
    # ptcl_repr is the summed weight of the 80 kept. Ten averages are pure noise.
    truth = mrcfile.read(rnapol2_64)
    rng = np.random.default_rng(8)
    rots = uniform_rotations(100, rng)
    images = project(truth, rots)
    images += rng.standard_normal(images.shape).astype(np.float32) * images.std() * 0.3
    bad = np.arange(0, 100, 10)
    images[bad] = rng.standard_normal((10, 64, 64)).astype(np.float32) * images.std()
    meta = ParticleMetadata.empty(100, apix=3.0)
    meta.rotations = rots
    meta.weight = rng.integers(5, 50, 100).astype(float)
    stack = ParticleStack.from_arrays(images, apix=3.0, meta=meta)
    volume, info = make3d(stack, Make3dConfig(iterations=2, keep=0.8, keepabs=True))
    assert len(info["excluded"]) == 20 and len(info["inserted"]) == 80
    assert set(bad) <= set(info["excluded"].tolist())
    assert info["ptcl_repr"] == pytest.approx(meta.weight[info["inserted"]].sum())
    cleaned = fsc(volume, truth)[1:25].mean()
    everything, _ = make3d(stack)
    assert cleaned > fsc(everything, truth)[1:25].mean()
    # the relative rule and the sigma rule also leave the noise out
    _, rel = make3d(stack, Make3dConfig(iterations=2, keep=0.8))
    assert set(bad) <= set(rel["excluded"].tolist())
    _, sig = make3d(stack, Make3dConfig(iterations=2, keep=1.0, keepsig=True, keepabs=True))
    assert set(bad) <= set(sig["excluded"].tolist()) and len(sig["excluded"]) < 30


def test_wiener_regularisation_helps_noisy_ctf_data(rnapol2_64):
    truth = mrcfile.read(rnapol2_64)
    stack = simulate_particles(
        truth, 800, apix=3.0, snr=0.05, rng=np.random.default_rng(9), max_shift_a=6.0
    )
    plain, info = make3d(stack, Make3dConfig(wiener=False))
    assert info["half_fsc"] is None
    gold, info = make3d(stack)  # the simulated half sets
    assert info["half_fsc"] is not None and info["half_fsc"][1] > 0.9
    stack.meta.half_set[:] = 0  # no half sets: alternate particles make them
    made, info = make3d(stack)
    assert info["half_fsc"] is not None
    forced, _ = make3d(stack, Make3dConfig(recon="wiener_fourier", wiener=False))
    assert np.array_equal(forced, made)
    f_plain, f_gold, f_made = (fsc(m, truth) for m in (plain, gold, made))
    # no worse overall, and it rescues the shells at Nyquist, where the summed weights
    # are thin and dividing by them alone amplifies the noise
    for f in (f_gold, f_made):
        assert f[1:33].mean() > f_plain[1:33].mean() - 0.005
        assert f[31:33].mean() > f_plain[31:33].mean() + 0.05
    # in real space the noise the plain division amplifies dominates the map
    rcc = [np.corrcoef(m.ravel(), truth.ravel())[0, 1] for m in (plain, gold, made)]
    assert rcc[1] > rcc[0] + 0.1 and rcc[2] > rcc[0] + 0.1, rcc


def test_too_few_images_for_half_sets_are_not_split():
    """Below MIN_WIENER_IMAGES the halves would differ in coverage, not noise: plain
    division, no half-set FSC."""
    from cryorefine.stages.make3d import MIN_WIENER_IMAGES
    from cryorefine.testing import solid_sphere

    vol = solid_sphere(16, 5.0)
    stack = simulate_particles(
        vol, MIN_WIENER_IMAGES - 1, apix=2.0, snr=10, rng=np.random.default_rng(1)
    )
    assert make3d(stack)[1]["half_fsc"] is None
    stack = simulate_particles(
        vol, MIN_WIENER_IMAGES, apix=2.0, snr=10, rng=np.random.default_rng(1)
    )
    assert make3d(stack)[1]["half_fsc"] is not None


def test_half_set_groups_share_the_thread_accumulators():
    """Two groups in one volume: each group's map equals a volume built from its slices
    alone, and the whole equals the sum; the accumulators are no more than the threads'."""
    from cryorefine.fourier.project import project
    from cryorefine.fourier.reconstruct import FourierVolume, image_slices
    from cryorefine.testing import solid_sphere, uniform_rotations

    rng = np.random.default_rng(3)
    n, k = 16, 40
    rots = uniform_rotations(k, rng)
    images = project(solid_sphere(n, 5.0, centre=(1.0, -2.0, 0.5)), rots)
    slices = image_slices(images, 2 * n)
    groups = rng.integers(0, 2, k)
    both = FourierVolume(2 * n, n, threads=2, groups=2)
    assert both.accs.shape[0] == 2
    both.insert(slices, rots, ops=np.eye(3)[None], weights=np.ones(k), groups=groups)
    for g in (0, 1):
        alone = FourierVolume(2 * n, n, threads=1)
        sel = groups == g
        alone.insert(slices[sel], rots[sel], ops=np.eye(3)[None], weights=np.ones(sel.sum()))
        np.testing.assert_allclose(both.finish(group=g), alone.finish(), atol=1e-5)
    whole = FourierVolume(2 * n, n, threads=1)
    whole.insert(slices, rots, ops=np.eye(3)[None], weights=np.ones(k))
    np.testing.assert_allclose(both.finish(), whole.finish(), atol=1e-5)
    np.testing.assert_array_equal(both.symmetrised_weights(), both.symmetrised()[1])


def test_wiener_map_keeps_the_plain_divisions_fsc_with_symmetry(rnapol2_64):
    """The Wiener term weights whole shells of the cropped map by their SNR, so the
    map's FSC against the truth is the plain division's (e2make3d) in every shell, or
    better where the summed weights are thin, while the map is clean. Dividing by
    ``Wsum + mean(Wsum) / SSNR`` voxel by voxel before the crop instead put this D7
    map's 0.143 point at 29 Å against the plain division's 15.7 Å."""
    from cryorefine.testing import symmetrised

    truth = symmetrised(mrcfile.read(rnapol2_64), "d7", order=1)
    stack = simulate_particles(
        truth, 100, apix=5.0, snr=0.003, rng=np.random.default_rng(1), max_shift_a=10.0
    )
    stack.meta.half_set[:] = 0  # alternate particles make the halves
    wiener, info = make3d(stack, Make3dConfig(sym="d7"))
    plain, _ = make3d(stack, Make3dConfig(sym="d7", wiener=False))
    assert info["half_fsc"] is not None
    f_wiener, f_plain = fsc(wiener, truth), fsc(plain, truth)
    res = [resolution_at(f, threshold=0.143, apix=5.0) for f in (f_wiener, f_plain)]
    print("FSC(truth) 0.143 (Wiener, plain):", res)
    assert res[0] <= res[1] + 0.1, res
    assert (f_wiener[1:31] >= f_plain[1:31] - 0.03).all(), np.c_[f_wiener, f_plain][1:31]
    rcc = [np.corrcoef(m.ravel(), truth.ravel())[0, 1] for m in (wiener, plain)]
    assert rcc[0] > rcc[1] + 0.5, rcc

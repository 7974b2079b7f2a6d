"""Processors against analytic expectations."""

import numpy as np
import pytest
from scipy import ndimage

from cryorefine.errors import CryorefineError
from cryorefine.fourier.filters import radial_power
from cryorefine.processors import apply_processor
from cryorefine.processors import apply_processor as processors_apply
from cryorefine.processors.mask import centred_radius
from cryorefine.testing import solid_sphere


def shell_mean(values: np.ndarray, n: int, ndim: int) -> np.ndarray:
    """Mean of a full-FFT-grid quantity per integer shell, computed with plain numpy."""
    f = np.fft.fftfreq(n) * n
    grids = np.meshgrid(*([f] * ndim), indexing="ij")
    shell = np.rint(np.sqrt(sum(g * g for g in grids))).astype(int).ravel()
    sums = np.bincount(shell, values.ravel())
    counts = np.bincount(shell)
    return (sums / np.maximum(counts, 1))[: n // 2]


def cosine(n: int, k: int) -> np.ndarray:
    x = np.arange(n)
    return np.broadcast_to(np.cos(2 * np.pi * k * x / n), (n, n)).astype(np.float32)[None]


def test_gaussian_lowpass_of_white_noise_has_the_expected_power_spectrum(rng):
    n, k, c = 64, 400, 0.15
    noise = rng.standard_normal((k, n, n)).astype(np.float32)
    out = apply_processor(f"filter.lowpass.gauss:cutoff_abs={c}", noise, ndim=2, apix=1.0)
    measured = shell_mean((np.abs(np.fft.fft2(out)) ** 2).mean(axis=0) / n**2, n, 2)
    f = np.fft.fftfreq(n)
    s2 = f[:, None] ** 2 + f[None, :] ** 2
    expected = shell_mean(np.exp(-2 * s2 / c**2), n, 2)  # unit-variance noise times H^2
    strong = expected > 1e-3
    strong[0] = False  # shell 0 holds one sample per image
    assert strong.sum() > 15
    np.testing.assert_allclose(measured[strong], expected[strong], rtol=0.05)


def test_gaussian_lowpass_gain_is_one_over_e_at_the_cutoff():
    n = 64
    img = cosine(n, 8)  # 8/64 = 0.125 cycles/pixel
    out = apply_processor("filter.lowpass.gauss:cutoff_abs=0.125", img, ndim=2, apix=2.0)
    assert np.abs(out).max() == pytest.approx(np.exp(-1), rel=1e-4)
    same = apply_processor("filter.lowpass.gauss:cutoff_freq=0.0625", img, ndim=2, apix=2.0)
    np.testing.assert_allclose(same, out, atol=1e-6)
    res = apply_processor("filter.lowpass.gauss:cutoff_res=16", img, ndim=2, apix=2.0)
    np.testing.assert_allclose(res, out, atol=1e-6)
    flat = np.ones((1, n, n), np.float32)
    dc = apply_processor("filter.lowpass.gauss:cutoff_abs=0.1", flat, ndim=2, apix=1.0)
    np.testing.assert_allclose(dc, flat, atol=1e-5)  # origin unchanged


def test_sigma_form_tanh_and_highpass_gains():
    n = 64
    img = cosine(n, 8)
    sig = apply_processor("filter.lowpass.gauss:sigma=0.125", img, ndim=2, apix=1.0)
    assert np.abs(sig).max() == pytest.approx(np.exp(-0.5), rel=1e-4)
    tanh = apply_processor("filter.lowpass.tanh:cutoff_abs=0.125", img, ndim=2, apix=1.0)
    assert np.abs(tanh).max() == pytest.approx(0.5, abs=1e-3)
    far = apply_processor("filter.lowpass.tanh:cutoff_abs=0.125", cosine(n, 20), ndim=2, apix=1.0)
    assert np.abs(far).max() < 1e-3
    hp = apply_processor("filter.highpass.gauss:cutoff_abs=0.125", img, ndim=2, apix=1.0)
    assert np.abs(hp).max() == pytest.approx(1 - np.exp(-1), rel=1e-4)
    flat = np.ones((1, n, n), np.float32)
    assert (
        np.abs(
            apply_processor("filter.highpass.gauss:cutoff_pixels=8", flat, ndim=2, apix=1.0)
        ).max()
        < 1e-5
    )


def test_filters_work_on_3d_maps_and_need_apix_for_angstroms():
    n = 32
    z = np.arange(n)[:, None, None]
    wave = np.broadcast_to(np.cos(2 * np.pi * 4 * z / n), (n, n, n)).astype(np.float32)
    out = apply_processor("filter.lowpass.gauss:cutoff_abs=0.125", wave, ndim=3, apix=1.0)
    np.testing.assert_allclose(out, wave * np.exp(-1), atol=1e-5)
    with pytest.raises(CryorefineError, match="need a pixel size"):
        apply_processor("filter.lowpass.gauss:cutoff_res=8", wave, ndim=3, apix=None)


def test_normalizations(rng):
    imgs = (rng.standard_normal((5, 32, 32)) * 4 + 7).astype(np.float32)
    out = apply_processor("normalize", imgs, ndim=2, apix=1.0)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.reshape(5, -1).std(axis=1, ddof=1), 1, atol=1e-5)
    edge = apply_processor("normalize.edgemean", imgs, ndim=2, apix=1.0)
    border = np.concatenate([edge[:, 0], edge[:, -1], edge[:, :, 0], edge[:, :, -1]], axis=1)
    np.testing.assert_allclose(border.mean(axis=1), 0, atol=1e-5)
    circ = apply_processor("normalize.circlemean", imgs, ndim=2, apix=1.0)
    r = centred_radius(32, 2)
    ring = (r >= 13) & (r < 15)  # (r-1)^2 <= d^2 < (r+1)^2 with r = 32//2 - 2
    np.testing.assert_allclose(circ[:, ring].mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(circ.reshape(5, -1).std(axis=1, ddof=1), 1, atol=1e-5)
    vol = (rng.standard_normal((16, 16, 16)) + 3).astype(np.float32)
    e3 = apply_processor("normalize.edgemean", vol, ndim=3, apix=1.0)
    faces = np.concatenate(
        [
            e3[0].ravel(),
            e3[-1].ravel(),
            e3[:, 0].ravel(),
            e3[:, -1].ravel(),
            e3[:, :, 0].ravel(),
            e3[:, :, -1].ravel(),
        ]
    )
    assert faces.mean() == pytest.approx(0, abs=1e-5)
    zero = np.zeros((1, 8, 8), np.float32)
    assert np.array_equal(apply_processor("normalize", zero, ndim=2, apix=1.0), zero)


def test_normalize_bymass_thresholds_a_sphere_at_its_edge():
    n, radius, apix = 64, 12.0, 2.0
    sphere = ndimage.gaussian_filter(solid_sphere(n, radius, value=5.0), 1.0)
    mass = 4 / 3 * np.pi * radius**3 * apix**3 * 0.81 / 1000  # kDa
    out = apply_processor(f"normalize.bymass:mass={mass:.4f}", sphere, ndim=3, apix=apix)
    enclosed = (out >= 1).sum() * apix**3 * 0.81 / 1000
    assert enclosed == pytest.approx(mass, rel=0.02)
    # the iso-surface at 1.0 sits at the sphere's edge
    r = centred_radius(n, 3)
    inside = out >= 1
    boundary = inside & ~ndimage.binary_erosion(inside)
    assert r[boundary].mean() == pytest.approx(radius, abs=0.75)
    dense = sphere > 1e-3
    assert np.allclose(
        out[dense] / sphere[dense], out[n // 2, n // 2, n // 2] / sphere[n // 2, n // 2, n // 2]
    )  # a pure scale
    with pytest.raises(CryorefineError, match="could not be achieved"):
        apply_processor("normalize.bymass:mass=1e9", sphere, ndim=3, apix=apix)


def test_auto3d_follows_the_spec_example():
    # ch04 fact 12: sphere radius 10 value 2; a second, separate blob is excluded
    n = 64
    vol = solid_sphere(n, 10, value=2.0) + solid_sphere(n, 3, value=2.0, centre=(0, 0, 22))
    mask = apply_processor(
        "mask.auto3d:threshold=1:radius=2:nshells=3:nshellsgauss=4:nmaxseed=0:return_mask=1",
        vol,
        ndim=3,
        apix=1.0,
    )
    r = centred_radius(n, 3)
    assert mask.min() >= 0
    assert mask[r <= 9].min() > 0.95
    assert mask[r > 20].max() == 0 or mask[(r > 20) & (r < 30)].max() < 0.01
    assert mask[n // 2 + 22, n // 2, n // 2] < 0.01  # the disconnected blob
    # 0.5 contour near 10 + 3 + 2 along the axes (6-connected dilation is a diamond there)
    profile = mask[n // 2, n // 2, n // 2 :]
    edge = np.flatnonzero(profile < 0.5)[0]
    assert 13 <= edge <= 16
    masked = apply_processor(
        "mask.auto3d:threshold=1:radius=2:nshells=3:nshellsgauss=4", vol, ndim=3, apix=1.0
    )
    np.testing.assert_allclose(masked, vol * mask, atol=1e-6)


def test_sharp_and_soft_masks():
    ones = np.ones((2, 32, 32), np.float32)
    r = centred_radius(32, 2)
    sharp = apply_processor("mask.sharp:outer_radius=10:inner_radius=4", ones, ndim=2, apix=1.0)
    assert np.array_equal(sharp[0], ((r <= 10) & (r >= 4)).astype(np.float32))
    edge = apply_processor("mask.sharp:outer_radius=-2", ones, ndim=2, apix=1.0)
    assert np.array_equal(edge[1], (r <= 14).astype(np.float32))
    soft = apply_processor("mask.soft:outer_radius=8:width=3", ones, ndim=2, apix=1.0)
    assert np.all(soft[0][r <= 8] == 1)
    np.testing.assert_allclose(soft[0][r == 11], np.exp(-1), rtol=1e-6)


def test_setsf_imposes_a_map_spectrum(tmp_path, rng):
    from cryorefine.config import parse_option
    from cryorefine.io.maps import Map, write_map
    from cryorefine.registry import PROCESSORS

    def apply_processor(text, data, *, ndim, apix):  # the option's file read once, here
        return parse_option(PROCESSORS, text, option="--process")(data, ndim=ndim, apix=apix)

    n, apix = 32, 2.0
    target = ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 1.5).astype(np.float32)
    write_map(tmp_path / "ref.mrc", Map(target, apix))
    noise = rng.standard_normal((n, n, n)).astype(np.float32)
    out = apply_processor(f"setsf:strucfac={tmp_path / 'ref.mrc'}", noise, ndim=3, apix=apix)
    want, got = radial_power(target, 3), radial_power(out, 3)
    np.testing.assert_allclose(got[2 : n // 2], want[2 : n // 2], rtol=0.1)
    before = radial_power(noise, 3)
    assert (
        np.abs(np.log(got[2 : n // 2] / want[2 : n // 2])).max()
        < 0.1
        < np.abs(np.log(before[2 : n // 2] / want[2 : n // 2])).max()
    )
    # the same curve from a two-column text file
    s = np.arange(n // 2 + 1) / (n * apix)
    np.savetxt(tmp_path / "sf.txt", np.c_[s, want])
    out2 = apply_processor(
        f"filter.setstrucfac:strucfac={tmp_path / 'sf.txt'}", noise, ndim=3, apix=apix
    )
    np.testing.assert_allclose(out2, out, atol=1e-4)
    (tmp_path / "short.txt").write_text("0 1\n0.001 1\n")
    with pytest.raises(CryorefineError, match="needs >= 3 rows"):
        apply_processor(f"setsf:strucfac={tmp_path / 'short.txt'}", noise, ndim=3, apix=apix)
    # below io, a file name is refused rather than opened
    with pytest.raises(CryorefineError, match="is a file name"):
        processors_apply(f"setsf:strucfac={tmp_path / 'sf.txt'}", noise, ndim=3, apix=apix)


def test_randomised_phases_keep_amplitudes_and_low_resolution():
    """Below the cut-off the map is unchanged (FSC 1); beyond it the phases are random
    (FSC near 0) and the amplitudes kept; two draws are independent there."""
    from cryorefine.fourier.filters import randomise_phases
    from cryorefine.fourier.fsc import fsc
    from cryorefine.testing import demo_map

    vol = demo_map().data
    cut = 0.15  # cycles/pixel: shell 9.6 of 64
    a = randomise_phases(vol, cut, 3, np.random.default_rng(1))
    b = randomise_phases(vol, cut, 3, np.random.default_rng(2))
    assert a.dtype == np.float32 and a.shape == vol.shape
    f = fsc(a, vol)
    assert (f[1:9] > 0.999).all()
    assert np.abs(f[11:32]).mean() < 0.1 and np.abs(fsc(a, b)[11:32]).mean() < 0.1
    np.testing.assert_allclose(radial_power(a, 3)[1:32], radial_power(vol, 3)[1:32], rtol=0.02)

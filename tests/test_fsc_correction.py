"""The gold-standard FSC corrected by noise substitution, and the FSC mask.

Half maps are built from a known signal and independent noise, so the resolution the
data hold is known without the code under test: beyond the signal's band limit the two
halves share nothing, whatever a mask makes the masked curve say.
"""

import numpy as np
import pytest
import scipy.fft

from cryorefine.fourier.fft import rfft_radius
from cryorefine.fourier.fsc import noise_substituted_fsc, resolution_at
from cryorefine.processors.mask import soft_edge_mask
from cryorefine.refine.step import fsc_mask
from cryorefine.testing import demo_map, solid_sphere

N = 64


def band_limited(volume: np.ndarray, shell: float) -> np.ndarray:
    """``volume`` with every Fourier component at ``|k| >= shell`` (Fourier px) removed."""
    ft = scipy.fft.rfftn(volume)
    ft[rfft_radius(volume.shape) * volume.shape[0] >= shell] = 0
    return scipy.fft.irfftn(ft, s=volume.shape).astype(np.float32)


def half_maps(signal: np.ndarray, noise_sd: float, rng) -> tuple[np.ndarray, np.ndarray]:
    return tuple(
        (signal + noise_sd * rng.standard_normal(signal.shape)).astype(np.float32) for _ in range(2)
    )


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return demo_map().data


def test_corrected_fsc_falls_where_the_shared_signal_ends(truth):
    # The halves share a signal band-limited to shell 12 and nothing beyond. A sharp
    # mask spreads that signal into the empty shells, the same in both halves, so the
    # masked curve stays high beyond shell 12; the corrected one must not.
    rng = np.random.default_rng(3)
    signal = band_limited(truth, 12)
    # the noise is low-passed too, so the halves carry little power beyond the band
    # (as Wiener-regularised half maps do) and the mask's leak dominates there
    noise = [band_limited(rng.standard_normal(truth.shape), 14) for _ in range(2)]
    sd = 0.3 * signal.std() / noise[0].std()
    h1, h2 = (signal + sd * n for n in noise)
    mask = (fsc_mask(signal, 3.0, extend_a=0.0, soft_edge_a=0.0) > 0.5).astype(np.float32)
    curves = noise_substituted_fsc(h1, h2, mask, rng=np.random.default_rng(0))
    masked_shell = resolution_at(curves.masked, threshold=0.143, apix=1.0)
    corrected_shell = resolution_at(curves.corrected, threshold=0.143, apix=1.0)
    # resolution_at with apix 1 gives N / shell; convert to shells
    print("masked crossing shell", N / masked_shell, "corrected", N / corrected_shell)
    assert N / masked_shell > 17  # the leak: the masked curve claims shells with no signal
    assert 11 <= N / corrected_shell <= 14.5
    # beyond the band the corrected curve is noise around 0
    assert np.abs(curves.corrected[17:]).max() < 0.143


def test_corrected_fsc_keeps_what_the_mask_rightly_gains():
    # A small particle in a large box with white noise: the mask removes solvent noise,
    # so the masked FSC rises above the unmasked one. The halves share signal in every
    # shell, so the correction must not take that gain away. Expected per shell: the
    # masked signal's power over that plus the masked noise's (both known here).
    rng = np.random.default_rng(5)
    sphere = solid_sphere(N, 8.0)
    signal = band_limited(sphere + 0.5 * solid_sphere(N, 4.0, centre=(3, 2, -4)), 30)
    noise_sd = 2.0 * signal.std()
    h1, h2 = half_maps(signal, noise_sd, rng)
    mask = soft_edge_mask(sphere > 0, 3.0, 6.0)
    curves = noise_substituted_fsc(h1, h2, mask, rng=np.random.default_rng(1))
    fs = scipy.fft.rfftn(signal * mask)
    fn = scipy.fft.rfftn(noise_sd * rng.standard_normal((N, N, N)) * mask)
    shell = np.rint(rfft_radius((N, N, N)) * N).astype(int)
    keep = shell <= N // 2
    p_s = np.bincount(shell[keep], np.abs(fs[keep]) ** 2, N // 2 + 1)
    p_n = np.bincount(shell[keep], np.abs(fn[keep]) ** 2, N // 2 + 1)
    expected = p_s / (p_s + p_n)
    unmasked_res = resolution_at(curves.unmasked, threshold=0.143, apix=1.0)
    corrected_res = resolution_at(curves.corrected, threshold=0.143, apix=1.0)
    expected_res = resolution_at(expected, threshold=0.143, apix=1.0)
    print(
        "shells: unmasked",
        N / unmasked_res,
        "corrected",
        N / corrected_res,
        "expected",
        N / expected_res,
    )
    assert N / corrected_res > N / unmasked_res + 3  # the mask's gain is kept
    assert abs(N / corrected_res - N / expected_res) < 2.0


def test_soft_edge_mask_extends_and_falls_as_a_raised_cosine():
    region = np.zeros((N, N, N), bool)
    region[N // 2, N // 2, N // 2] = True
    mask = soft_edge_mask(region, 4.0, 6.0)
    line = mask[N // 2, N // 2, N // 2 :]  # distance d px along x
    np.testing.assert_allclose(line[:5], 1.0)  # within the extension
    d = np.arange(5, 10)
    np.testing.assert_allclose(line[5:10], 0.5 * (1 + np.cos(np.pi * (d - 4) / 6)), atol=1e-6)
    assert line[10:].max() == 0.0


def test_fsc_mask_extent_is_set_in_angstrom(truth):
    # the same map at two pixel sizes: the same growth in Å is twice the pixels at half
    # the pixel size, so the mask at 1.5 Å/px reaches further (in px) past the region
    tight = fsc_mask(truth, 3.0, extend_a=0.0, soft_edge_a=0.0) > 0.5
    wide3 = fsc_mask(truth, 3.0, extend_a=6.0, soft_edge_a=0.0) > 0.5
    wide15 = fsc_mask(truth, 1.5, extend_a=6.0, soft_edge_a=0.0) > 0.5
    grown3 = wide3.sum() - tight.sum()
    grown15 = wide15.sum() - (fsc_mask(truth, 1.5, extend_a=0.0, soft_edge_a=0.0) > 0.5).sum()
    print("voxels added: 6 Å at 3 Å/px", grown3, "at 1.5 Å/px", grown15)
    assert grown15 > 1.6 * grown3

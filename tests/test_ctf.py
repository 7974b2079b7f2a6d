"""The CTF model (RELION convention) and its helpers."""

import numpy as np
import pytest
import scipy.fft

from cryorefine.fourier.ctf import (
    CTFParams,
    apply_ctf,
    electron_wavelength_a,
    phase_flip,
    wiener_divide,
)
from cryorefine.io.eman2 import EmanCtf, eman_ctf_from_relion, relion_ctf_from_eman


def spec_ctf(**kw) -> CTFParams:
    p = dict(
        defocus_u_a=21000.0,
        defocus_v_a=19000.0,
        defocus_angle_deg=30.0,
        voltage_kv=300.0,
        cs_mm=2.7,
        amplitude_contrast=0.1,
        phase_shift_deg=0.0,
        bfactor=0.0,
        scale=1.0,
    )
    p.update(kw)
    return CTFParams(**p)


def test_wavelength_at_300kv():
    assert electron_wavelength_a(300.0) == pytest.approx(0.019688, abs=2e-6)


def test_values_at_the_spec_points():
    # spec 05 §5.7 fact 6: (X, Y) = (0.05, 0.02) 1/Å -> -0.656; (0, 0.15) -> 0.933.
    # A 100-px box at 1 Å/px puts Fourier pixels every 0.01 1/Å.
    c = spec_ctf().evaluate(100, 1.0)[0]
    assert c[2, 5] == pytest.approx(-0.656, abs=1e-3)
    assert c[15, 0] == pytest.approx(0.933, abs=1e-3)
    assert c[0, 0] == pytest.approx(0.1, abs=1e-6)  # +Q0 at the origin


def test_astigmatism_angle_points_along_defocus_u():
    # along the U direction (angle A) the defocus is U; perpendicular it is V
    c_u = spec_ctf(defocus_angle_deg=0.0).evaluate(128, 1.0)[0]
    c_same = CTFParams(21000, 21000, 0, 300, 2.7, 0.1, 0, 0, 1).evaluate(128, 1.0)[0]
    c_v = CTFParams(19000, 19000, 0, 300, 2.7, 0.1, 0, 0, 1).evaluate(128, 1.0)[0]
    np.testing.assert_allclose(c_u[0, :], c_same[0, :], atol=1e-6)  # kx axis
    np.testing.assert_allclose(c_u[:, 0], c_v[:, 0], atol=1e-6)  # ky axis


def test_bfactor_and_phase_shift():
    s2 = (np.fft.fftfreq(64)[:, None] ** 2 + np.fft.rfftfreq(64)[None] ** 2) / 2.0**2
    plain = spec_ctf().evaluate(64, 2.0)[0]
    damped = spec_ctf(bfactor=100.0).evaluate(64, 2.0)[0]
    np.testing.assert_allclose(damped, plain * np.exp(-100 * s2 / 4), atol=1e-6)
    shifted = spec_ctf(phase_shift_deg=90.0, amplitude_contrast=0.0).evaluate(64, 2.0)[0]
    assert shifted[0, 0] == pytest.approx(1.0, abs=1e-6)  # Volta-style: full contrast at 0


def test_batched_evaluation_matches_one_by_one(rng):
    k = 7
    p = CTFParams(
        rng.uniform(8e3, 3e4, k),
        rng.uniform(8e3, 3e4, k),
        rng.uniform(-90, 90, k),
        300,
        2.7,
        0.07,
        rng.uniform(0, 30, k),
        rng.uniform(0, 50, k),
        1,
    )
    apix = rng.uniform(1, 2, k)
    batch = p.evaluate(48, apix)
    assert batch.shape == (k, 48, 25) and batch.dtype == np.float32
    for i in range(k):
        np.testing.assert_allclose(batch[i], p.take([i]).evaluate(48, apix[i])[0], atol=1e-6)


def test_apply_flip_and_wiener(rng):
    n, k = 64, 4
    images = rng.standard_normal((k, n, n)).astype(np.float32)
    p = CTFParams(np.linspace(1e4, 2.5e4, k), np.linspace(1e4, 2.5e4, k), 0, 300, 2.7, 0.1, 0, 0, 1)
    c = p.evaluate(n, 1.5)
    applied = apply_ctf(images, c)
    np.testing.assert_allclose(scipy.fft.rfft2(applied), scipy.fft.rfft2(images) * c, atol=2e-3)
    flipped = phase_flip(applied, c)
    assert (scipy.fft.rfft2(flipped) * scipy.fft.rfft2(images).conj()).real.sum() > 0
    np.testing.assert_allclose(
        np.abs(scipy.fft.rfft2(flipped)), np.abs(scipy.fft.rfft2(applied)), atol=2e-3
    )
    restored = wiener_divide(applied, c, snr=1e6)
    strong = np.abs(c) > 0.3
    np.testing.assert_allclose(
        scipy.fft.rfft2(restored)[strong], scipy.fft.rfft2(images)[strong], atol=1e-2
    )
    with pytest.raises(ValueError):
        wiener_divide(applied, c, snr=0)


def test_eman_ctf_string_layout():
    # spec 05 §5.7 fact 5
    ctf = EmanCtf(
        defocus=2.0, dfdiff=0.2, dfang=30, bfactor=50, ampcont=10, voltage=300, cs=2.7, apix=1.35
    )
    text = ctf.to_string()
    assert text == "E2 0.200000003 30 50 10 300 2.700000048 1.350000024 -1 0 0"
    back = EmanCtf.from_string(text)
    assert back.defocus == 2.0 and back.cs == pytest.approx(2.7) and back.background == []
    curves = EmanCtf(defocus=1.0, dsbg=0.01, background=[1.5, 2.25], snr=[3.0])
    again = EmanCtf.from_string(curves.to_string())
    assert (
        again.background == [1.5, 2.25] and again.snr == [3.0] and again.dsbg == pytest.approx(0.01)
    )


def test_eman_relion_conversion_of_the_spec_example():
    e = eman_ctf_from_relion(21000, 19000, 30, 300, 2.7, 0.1, 0, 0, 1.35)
    assert (e.defocus, e.dfdiff, e.dfang, e.ampcont) == pytest.approx((2.0, 0.2, 30, 10))
    r = relion_ctf_from_eman(e)
    assert r["defocus_u_a"] == pytest.approx(21000) and r["defocus_v_a"] == pytest.approx(19000)
    assert r["amplitude_contrast"] == pytest.approx(0.1) and r["phase_shift_deg"] == 0


def test_v_larger_than_u_and_phase_shift_keep_the_same_ctf():
    for u, v, ang, shift in [
        (19000, 21000, 30, 0),
        (15000, 14000, -20, 60),
        (20000, 20500, 75, 130),
        (18000, 18000, 0, -120),
    ]:
        original = CTFParams(u, v, ang, 300, 2.7, 0.1, shift, 0, 1)
        e = eman_ctf_from_relion(u, v, ang, 300, 2.7, 0.1, shift, 0, 1.0)
        assert e.dfdiff >= 0
        back = CTFParams(**relion_ctf_from_eman(e), scale=1.0)
        np.testing.assert_allclose(back.evaluate(64, 1.0), original.evaluate(64, 1.0), atol=1e-5)

"""Radial Fourier filters and radial power spectra, batched over stacks.

A filter is a real transfer function ``H(s)`` of the radius ``s`` in cycles/pixel
(``s = |k| / n`` per axis, Nyquist 0.5) multiplied into the unpadded FFT, as EMAN2
does. ``data`` is ``(..., n, n)`` for images or ``(..., n, n, n)`` for maps; ``ndim``
says how many trailing axes form one image.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from cryorefine.fourier.fft import fft_threads, filter_rfft, rfft_radius, ring_mean


def lowpass_gauss(data: np.ndarray, cutoff_cpp: float, ndim: int) -> np.ndarray:
    """EMAN2 Gaussian low-pass ``H = exp(-s^2 / c^2)`` (gain 1/e at ``c`` cycles/pixel)."""
    s = rfft_radius(data.shape[-ndim:])
    return filter_rfft(data, np.exp(-(s * s) / cutoff_cpp**2), ndim)


def lowpass_gauss_sigma(data: np.ndarray, sigma_cpp: float, ndim: int) -> np.ndarray:
    """Gaussian low-pass given its standard deviation: ``H = exp(-s^2 / (2 sigma^2))``."""
    return lowpass_gauss(data, np.sqrt(2.0) * sigma_cpp, ndim)


def highpass_gauss(data: np.ndarray, cutoff_cpp: float, ndim: int) -> np.ndarray:
    """EMAN2 Gaussian high-pass ``H = 1 - exp(-s^2 / c^2)``."""
    s = rfft_radius(data.shape[-ndim:])
    return filter_rfft(data, 1.0 - np.exp(-(s * s) / cutoff_cpp**2), ndim)


def lowpass_tanh(
    data: np.ndarray, cutoff_cpp: float, ndim: int, fall_off: float = 0.5
) -> np.ndarray:
    """EMAN2 tanh low-pass ``H = (tanh(a (s + c)) - tanh(a (s - c))) / 2``, ``a = pi / (2 f c)``."""
    s = rfft_radius(data.shape[-ndim:])
    a = np.pi / (2.0 * fall_off * cutoff_cpp)
    h = 0.5 * (np.tanh(a * (s + cutoff_cpp)) - np.tanh(a * (s - cutoff_cpp)))
    return filter_rfft(data, h, ndim)


def _shell_weights(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Linear split of every rfft element between the two nearest integer shells.

    Returns ``(lo, w_hi, mult, nbins)``: lower shell index, weight of the upper shell,
    and the multiplicity of each rfft element in the full FFT (1 or 2; Hermitian
    half-space), all of the rfft shape.
    """
    n = shape[0]
    r = rfft_radius(shape) * n
    lo = np.floor(r).astype(np.int64)
    w_hi = r - lo
    mult = np.full(r.shape, 2.0)
    mult[..., 0] = 1.0
    if shape[-1] % 2 == 0:
        mult[..., -1] = 1.0
    beyond = lo > n // 2  # corners past Nyquist take no part
    mult[beyond] = 0.0
    lo[beyond] = n // 2
    return lo, w_hi, mult, n // 2 + 2


def radial_power(data: np.ndarray, ndim: int) -> np.ndarray:
    """Radial mean of ``|F|^2 / N`` per integer shell, for each image of a stack.

    ``F`` is the unnormalised FFT and ``N`` the number of pixels/voxels, so white
    noise of variance ``v`` has power ``v`` in every shell. Samples are split linearly
    between the two nearest shells. Returns ``(..., n // 2 + 1)`` float64: shell ``i``
    is at ``i / n`` cycles/pixel.
    """
    shape = data.shape[-ndim:]
    axes = tuple(range(-ndim, 0))
    ft = scipy.fft.rfftn(np.asarray(data, dtype=np.float32), axes=axes, workers=fft_threads())
    power = (ft.real**2 + ft.imag**2) / float(np.prod(shape))
    lo, w_hi, mult, nb = _shell_weights(shape)
    lead = power.shape[:-ndim]
    power = power.reshape((-1,) + power.shape[-ndim:])
    k = power.shape[0]
    offs = (np.arange(k) * nb)[(slice(None),) + (None,) * ndim]
    wl = (mult * (1.0 - w_hi))[None]
    wh = (mult * w_hi)[None]
    idx_lo = (offs + lo[None]).ravel()
    idx_hi = (offs + lo[None] + 1).ravel()
    size = k * nb
    num = np.bincount(idx_lo, (power * wl).ravel(), size) + np.bincount(
        idx_hi, (power * wh).ravel(), size
    )
    den = np.bincount(idx_lo, np.broadcast_to(wl, power.shape).ravel(), size) + np.bincount(
        idx_hi, np.broadcast_to(wh, power.shape).ravel(), size
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return curve.reshape(lead + (nb,))[..., : shape[0] // 2 + 1]


def set_structure_factor(
    data: np.ndarray, freq_a: np.ndarray, power: np.ndarray, apix: float, ndim: int
) -> np.ndarray:
    """Impose the radial power curve ``power(freq_a)`` on each image or map.

    ``freq_a`` (1/Å, increasing) and ``power`` (same normalisation as
    :func:`radial_power`) define the target; it is linearly interpolated at each shell
    ``i / (n apix)``. Each shell is scaled by ``sqrt(target / current)``; beyond the
    curve's end the last factor is reused; a shell with no power reuses the previous
    factor. Factors are interpolated linearly in radius. Raises ``ValueError`` if the
    curve covers fewer than 3 shells.
    """
    shape = data.shape[-ndim:]
    n = shape[0]
    current = radial_power(data, ndim)
    nb = current.shape[-1]
    s_a = np.arange(nb) / (n * apix)
    imax = int(np.sum(s_a <= freq_a[-1] * (1 + 1e-9)))
    if imax < 3:
        raise ValueError("the structure-factor curve covers fewer than 3 Fourier shells")
    target = np.interp(s_a[:imax], freq_a, power)
    lead = current.shape[:-1]
    cur = current.reshape(-1, nb)
    factor = np.ones_like(cur)  # shell 0 (the mean) is left unchanged
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.sqrt(np.clip(target[None], 0, None) / cur[:, :imax])
    for i in range(1, imax):  # shells, not particles: n/2 steps of vector work
        good = np.isfinite(ratio[:, i]) & (cur[:, i] > 0)
        factor[:, i] = np.where(good, ratio[:, i], factor[:, i - 1])
    factor[:, imax:] = factor[:, imax - 1 : imax]
    r = rfft_radius(shape) * n
    lo = np.minimum(np.floor(r).astype(np.int64), nb - 1)
    hi = np.minimum(lo + 1, nb - 1)
    w = r - np.floor(r)
    transfer = factor[:, lo] * (1.0 - w) + factor[:, hi] * w
    out = filter_rfft(data.reshape((-1,) + shape), transfer, ndim)
    return out.reshape(lead + shape) if lead else out.reshape(shape)


def match_power_spectrum(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """EMAN2 ``filter.matchto``: each image ``(k, n, n)`` filtered so that its ring-mean
    power spectrum matches that of its target (``(k, n, n)``, same pixel size), then
    multiplied by the image's support (1 where it was non-zero).

    Rings are one Fourier pixel wide; the amplitude ratio ``sqrt(P_target / P_image)``
    is interpolated linearly between rings (0 where the image has no power).
    """
    images = np.asarray(images, np.float32)
    n = images.shape[-1]
    fi = scipy.fft.rfft2(images, workers=fft_threads())
    ft = scipy.fft.rfft2(np.asarray(targets, np.float32), workers=fft_threads())
    radius = rfft_radius((n, n)) * n  # Fourier pixels
    p_img = ring_mean(np.abs(fi) ** 2)
    p_tgt = ring_mean(np.abs(ft) ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(p_img > 0, np.sqrt(p_tgt / p_img), 0.0)
    r = np.minimum(radius.ravel(), n // 2)
    lo = np.floor(r).astype(np.int64)
    hi = np.minimum(lo + 1, n // 2)
    frac = r - lo
    gain = ratio[:, lo] * (1 - frac) + ratio[:, hi] * frac
    out = scipy.fft.irfft2(
        fi * gain.reshape(fi.shape).astype(np.float32), s=(n, n), workers=fft_threads()
    )
    return (out * (images != 0)).astype(np.float32)


def randomise_phases(data: np.ndarray, beyond_cpp: float, ndim: int, rng) -> np.ndarray:
    """``data`` with the phase of every Fourier component beyond ``beyond_cpp``
    (cycles/pixel) replaced by a random one, amplitudes kept (RELION's test of masked
    FSCs, and the independent starts of gold-standard half maps).

    The random phases are those of white Gaussian noise's transform, so the result stays
    real (Hermitian symmetry holds by construction). ``rng``: a NumPy ``Generator``.
    """
    data = np.asarray(data, np.float32)
    axes = tuple(range(-ndim, 0))
    ft = scipy.fft.rfftn(data, axes=axes, workers=fft_threads())
    noise = scipy.fft.rfftn(rng.standard_normal(data.shape), axes=axes, workers=fft_threads())
    beyond = rfft_radius(data.shape[-ndim:]) > beyond_cpp
    phase = np.exp(1j * np.angle(noise))
    ft = np.where(beyond, np.abs(ft) * phase, ft)
    out = scipy.fft.irfftn(ft, s=data.shape[-ndim:], axes=axes, workers=fft_threads())
    return out.astype(np.float32)

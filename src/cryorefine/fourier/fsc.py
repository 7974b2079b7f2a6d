"""Fourier shell (3D) and ring (2D) correlation, and the resolution where it crosses.

Shells are ``round(|k|)`` in Fourier pixels, ``k`` wrapped to ``-n/2 .. n/2``; shell
``r`` is at ``r / (n apix)`` 1/Å. Shells beyond ``n/2`` are ignored (EMAN2's
``calc_fourier_shell_correlation`` with ring width 1).
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from cryorefine.fourier.fft import fft_threads, rfft_shell_index


def fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC (3D) or FRC (2D) of two equal-shaped arrays; ``(n // 2 + 1,)`` float64.

    Element ``r`` is ``sum Re(A conj B) / sqrt(sum |A|^2 sum |B|^2)`` over shell ``r``
    (the Hermitian half-space counted twice where it stands for two points).
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    n = a.shape[0]
    fa = scipy.fft.rfftn(np.asarray(a, np.float64), workers=fft_threads())
    fb = scipy.fft.rfftn(np.asarray(b, np.float64), workers=fft_threads())
    shell = rfft_shell_index(a.shape)
    weight = np.full(shell.shape, 2.0)
    weight[..., 0] = 1.0
    if a.shape[-1] % 2 == 0:
        weight[..., -1] = 1.0
    nb = n // 2 + 1
    keep = shell < nb
    s, w = shell[keep], weight[keep]
    num = np.bincount(s, w * (fa * fb.conj()).real[keep], nb)
    pa = np.bincount(s, w * np.abs(fa[keep]) ** 2, nb)
    pb = np.bincount(s, w * np.abs(fb[keep]) ** 2, nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pa * pb > 0, num / np.sqrt(pa * pb), 0.0)


def shell_frequencies_a(n: int, apix: float) -> np.ndarray:
    """Spatial frequency (1/Å) of each shell of :func:`fsc` for an ``n`` box."""
    return np.arange(n // 2 + 1) / (n * apix)


def resolution_at(curve: np.ndarray, *, threshold: float = 0.143, apix: float) -> float:
    """Resolution in Å where ``curve`` first falls below ``threshold`` (interpolated).

    Shell 0 is skipped. Returns the Nyquist resolution ``2 apix`` if it never does.
    """
    n = 2 * (len(curve) - 1)
    freq = shell_frequencies_a(n, apix)
    below = np.flatnonzero(curve[1:] < threshold)
    if below.size == 0:
        return 2.0 * apix
    i = below[0] + 1
    if i == 1:
        return 1.0 / freq[1]
    c0, c1 = curve[i - 1], curve[i]
    f = freq[i - 1] + (freq[i] - freq[i - 1]) * (c0 - threshold) / (c0 - c1)
    return float(1.0 / f)

"""EMAN2's rotational footprint and the rotation search over all image pairs at once.

The footprint is a translation-invariant image: the inverse transform of the
high-passed amplitude spectrum (``|F H|``, ``H = 1 - exp(-s^2 / 2 sigma^2)``,
``sigma = 1.5 / n`` cycles/px), centred, minus its edge mean, unwrapped to polar
coordinates over 180 degrees (it is centrosymmetric): ``xs`` angles ``i 180 / xs``,
radii ``4 .. r2 - 1`` (``r2 = n / 2 - 2`` rounded down to even), each row times its
radius. Rotating an image by ``alpha`` shifts its footprint by ``alpha`` along angle,
so the rotation that best brings image ``m`` onto image ``t`` is the peak of the
circular correlation ``C(j) = sum_r sum_i fp_t(r, i) fp_m(r, i + j)``. For every pair
of two stacks that is one matrix product per angular frequency (over radii) and an
inverse FFT along angle.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from numba import njit, prange

from cryorefine.fourier.fft import fft_threads


def _smooth_size(n: int) -> bool:
    if n % 2:
        return False
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


def polar_size(n: int) -> tuple[int, int, int]:
    """``(xs, r1, r2)``: angular samples over 180 degrees and the radius range [r1, r2)."""
    xs = int(np.floor(np.pi * n / 3))
    xs -= xs % 4
    while not _smooth_size(xs):
        xs += 1
    xs = max(xs, 16)
    r2 = n // 2 - 2
    r2 -= r2 % 2
    return xs, 4, r2


def angle_step(n: int) -> float:
    """The rotation search's step in degrees (``180 / xs``)."""
    return 180.0 / polar_size(n)[0]


@njit(cache=True, parallel=True, fastmath=True)
def _unwrap(images, cos_t, sin_t, r1, r2, out):
    k, n, _ = images.shape
    c = n / 2.0
    for i in prange(k):
        for ir in range(r2 - r1):
            r = r1 + ir
            for j in range(cos_t.shape[0]):
                x = r * cos_t[j] + c
                y = r * sin_t[j] + c
                x0 = int(np.floor(x))
                y0 = int(np.floor(y))
                fx = x - x0
                fy = y - y0
                v = (1 - fy) * ((1 - fx) * images[i, y0, x0] + fx * images[i, y0, x0 + 1]) + fy * (
                    (1 - fx) * images[i, y0 + 1, x0] + fx * images[i, y0 + 1, x0 + 1]
                )
                out[i, ir, j] = v * r


def footprints(images: np.ndarray) -> np.ndarray:
    """Polar rotational footprints ``(k, r2 - r1, xs)`` float32 of images ``(k, n, n)``."""
    images = np.asarray(images, dtype=np.float32)
    n = images.shape[-1]
    # the amplitude spectrum is real and centrosymmetric: half-plane transforms suffice
    ft = scipy.fft.rfft2(images, workers=fft_threads())
    f = scipy.fft.fftfreq(n)
    s2 = f[:, None] ** 2 + scipy.fft.rfftfreq(n)[None, :] ** 2
    sigma = 1.5 / n
    amp = np.abs(ft) * (1.0 - np.exp(-s2 / (2 * sigma * sigma))).astype(np.float32)
    fp = scipy.fft.fftshift(
        scipy.fft.irfft2(amp, s=(n, n), workers=fft_threads()).astype(np.float32), axes=(-2, -1)
    )
    edge = np.concatenate(
        [fp[:, 0, :], fp[:, -1, :], fp[:, 1:-1, 0], fp[:, 1:-1, -1]], axis=1
    ).mean(axis=1)
    fp -= edge[:, None, None]
    xs, r1, r2 = polar_size(n)
    theta = np.arange(xs) * np.pi / xs
    out = np.empty((len(images), r2 - r1, xs), dtype=np.float32)
    _unwrap(np.ascontiguousarray(fp), np.cos(theta), np.sin(theta), r1, r2, out)
    return out


def spectra(fp: np.ndarray) -> np.ndarray:
    """Angular spectra of footprints ``(k, R, xs)``: ``(xs // 2 + 1, R, k)`` complex64,
    laid out for the per-frequency matrix products of :func:`best_rotations`."""
    s = scipy.fft.rfft(fp, axis=-1, workers=fft_threads()).astype(np.complex64)
    return np.ascontiguousarray(np.transpose(s, (2, 1, 0)))


#: memory for one block of the rotation search's temporaries (small enough for the
#: allocator to recycle between blocks)
ROTATION_BYTES = 24 * 2**20


def best_rotations(moving: np.ndarray, target: np.ndarray, xs: int) -> np.ndarray:
    """Footprint rotation index ``j`` ``(n_target, n_moving)`` for every pair.

    ``moving``/``target`` are :func:`spectra`. Rotating moving image ``c`` by
    ``j * 180 / xs`` degrees best matches target ``p`` (first maximum; the answer is
    modulo 180 degrees). Targets are taken in blocks, so memory stays bounded.
    """
    nm, _, nc = moving.shape
    n_t = target.shape[-1]
    out = np.empty((n_t, nc), np.int64)
    block = max(1, ROTATION_BYTES // (nc * max(nm * 8, xs * 4)))
    for s0 in range(0, n_t, block):
        t = target[..., s0 : s0 + block]
        # C_hat[m, p, c] = sum_r conj(T[m, r, p]) M[m, r, c]: one GEMM per frequency m
        c_hat = np.matmul(np.conj(np.transpose(t, (0, 2, 1))), moving)
        corr = scipy.fft.irfft(c_hat, n=xs, axis=0, workers=fft_threads())
        out[s0 : s0 + block] = np.argmax(corr, axis=0)
    return out


@njit(cache=True, parallel=True, fastmath=True)
def _pair_spectra(moving, target, c_idx, p_idx, out):
    """``out[i, m] = sum_r conj(target[p_idx[i], m, r]) moving[c_idx[i], m, r]``."""
    nm, nr = moving.shape[1], moving.shape[2]
    for i in prange(c_idx.shape[0]):
        mv = moving[c_idx[i]]
        tg = target[p_idx[i]]
        for m in range(nm):
            acc = 0j
            for r in range(nr):
                acc += np.conj(tg[m, r]) * mv[m, r]
            out[i, m] = acc


def pair_layout(spectra: np.ndarray) -> np.ndarray:
    """:func:`spectra` laid out per image ``(k, xs // 2 + 1, R)`` for :func:`pair_rotations`."""
    return np.ascontiguousarray(np.transpose(spectra, (2, 0, 1)))


def pair_rotations(
    moving: np.ndarray,
    target: np.ndarray,
    c_idx: np.ndarray,
    p_idx: np.ndarray,
    xs: int,
    *,
    laid_out: bool = False,
) -> np.ndarray:
    """As :func:`best_rotations`, for the listed pairs only ``(moving c_idx[i], target
    p_idx[i])`` (when they are few compared with all pairs). ``laid_out``: the spectra
    come as :func:`pair_layout` gives them."""
    mv = moving if laid_out else pair_layout(moving)  # (Nc, M, R)
    tg = target if laid_out else pair_layout(target)
    c_idx = np.asarray(c_idx, np.int64)
    p_idx = np.asarray(p_idx, np.int64)
    out = np.empty(len(c_idx), np.int64)
    c_hat = np.empty((min(len(c_idx), 65536), mv.shape[1]), np.complex64)
    for s0 in range(0, len(c_idx), 65536):
        sl = slice(s0, s0 + 65536)
        part = c_hat[: len(c_idx[sl])]
        _pair_spectra(mv, tg, c_idx[sl], p_idx[sl], part)
        corr = scipy.fft.irfft(part, n=xs, axis=1, workers=fft_threads())
        out[sl] = np.argmax(corr, axis=1)
    return out

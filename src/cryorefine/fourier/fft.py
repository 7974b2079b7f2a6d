"""Frequency grids for ``scipy.fft`` layouts.

Images are ``(..., n, n)`` arrays whose real-space origin is pixel ``n // 2``. The
``rfft2`` layout keeps ``ky`` in standard FFT order (0, 1, ..., -1) along axis -2 and
``kx = 0 .. n // 2`` along axis -1. Frequencies are in cycles/pixel unless a pixel
size is given, then in 1/Å.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import scipy.fft

#: threads of every FFT call in cryorefine (-1: all cores; see :func:`fft_threads_limited`)
_fft_threads = -1


def fft_threads() -> int:
    """The ``workers`` every ``scipy.fft`` call in cryorefine passes: -1 (every core)
    unless :func:`fft_threads_limited` is in effect."""
    return _fft_threads


@contextmanager
def fft_threads_limited(n: int) -> Iterator[None]:
    """Run every FFT of cryorefine on ``n`` threads inside the block (restored after)."""
    global _fft_threads
    before, _fft_threads = _fft_threads, int(n)
    try:
        yield
    finally:
        _fft_threads = before


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks, e.g. SLURM's)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def rfft_freqs_2d(n: int, apix: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(fy, fx)`` grids of shape ``(n, n // 2 + 1)`` for an ``rfft2`` of an n x n image.

    Units: cycles/pixel, or 1/Å when ``apix`` (Å/pixel) is given.
    """
    scale = 1.0 if apix is None else 1.0 / apix
    fy = scipy.fft.fftfreq(n)[:, None] * scale
    fx = scipy.fft.rfftfreq(n)[None, :] * scale
    return np.broadcast_arrays(fy, fx)


def rfft_radius(shape: tuple[int, ...]) -> np.ndarray:
    """Radius ``|k| / n`` in cycles/pixel of every element of an ``rfftn`` of ``shape``.

    ``shape`` is the real-space shape (2D or 3D, each axis ``n_i``); the result has the
    rfft shape. Each axis is scaled by its own length, as EMAN2 does.
    """
    axes = [scipy.fft.fftfreq(n) for n in shape[:-1]] + [scipy.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    return np.sqrt(sum(g * g for g in grids))


def rfft_shell_index(shape: tuple[int, ...]) -> np.ndarray:
    """Integer Fourier shell ``round(|k|)`` (pixels of the first axis) of an ``rfftn``."""
    return np.rint(rfft_radius(shape) * shape[0]).astype(np.int64)


def filter_rfft(data: np.ndarray, transfer: np.ndarray, ndim: int) -> np.ndarray:
    """Multiply the last ``ndim`` axes of ``data`` by ``transfer`` in Fourier space.

    ``transfer`` has the ``rfftn`` shape (broadcast over leading axes). Multiplying by a
    real function of ``|k|`` commutes with moving the origin, so no shift is needed.
    Returns float32 with the shape of ``data``.
    """
    axes = tuple(range(-ndim, 0))
    ft = scipy.fft.rfftn(np.asarray(data, dtype=np.float32), axes=axes, workers=fft_threads())
    ft *= transfer
    out = scipy.fft.irfftn(ft, s=data.shape[-ndim:], axes=axes, workers=fft_threads())
    return out.astype(np.float32, copy=False)


def shift_images(images: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Move each image ``(k, n, n)`` by ``(dx, dy)`` pixels ``(k, 2)`` (Fourier phase shift).

    Content at pixel ``(x, y)`` moves to ``(x + dx, y + dy)`` (circularly).
    """
    n = images.shape[-1]
    fy, fx = rfft_freqs_2d(n)
    d = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
    phase = np.exp(-2j * np.pi * (fx[None] * d[:, 0, None, None] + fy[None] * d[:, 1, None, None]))
    ft = scipy.fft.rfft2(np.asarray(images, dtype=np.float32), workers=fft_threads())
    return scipy.fft.irfft2(ft * phase, s=(n, n), workers=fft_threads()).astype(np.float32)


def ring_sum(values: np.ndarray, rings: np.ndarray, nring: int) -> np.ndarray:
    """Per-row sums of ``values`` ``(k, m)`` by ring index ``rings`` ``(m,)``:
    ``(k, nring)`` float64 (one matrix product)."""
    onehot = np.zeros((values.shape[1], nring))
    onehot[np.arange(len(rings)), rings] = 1.0
    return values.astype(np.float64) @ onehot


def ring_mean(values: np.ndarray) -> np.ndarray:
    """Means ``(k, n // 2 + 1)`` float64 over the rings ``round(|k|)`` (the last one
    holding everything from ``n // 2`` out) of per-coefficient values ``(k, n, n // 2 + 1)``
    on the ``rfft2`` grid of ``n x n`` images."""
    k, n = values.shape[0], values.shape[1]
    rings = np.minimum(rfft_shell_index((n, n)).ravel(), n // 2)
    counts = np.maximum(np.bincount(rings, minlength=n // 2 + 1), 1)
    return ring_sum(values.reshape(k, -1), rings, n // 2 + 1) / counts


def clip_center(volume: np.ndarray, size: int) -> np.ndarray:
    """Clip or zero-pad a cubic map ``(n, n, n)`` to ``(size, size, size)`` about its
    centre: voxel ``n // 2`` becomes voxel ``size // 2`` (EMAN2's ``--clip``)."""
    n = volume.shape[0]
    off = size // 2 - n // 2
    lo, hi = max(0, -off), min(n, size - off)
    out = np.zeros((size,) * volume.ndim, dtype=volume.dtype)
    out[(slice(lo + off, hi + off),) * volume.ndim] = volume[(slice(lo, hi),) * volume.ndim]
    return out


def resize_fourier(volume: np.ndarray, size: int) -> np.ndarray:
    """Resample a cubic map ``(n, n, n)`` onto ``(size, size, size)`` voxels spanning the
    same length (pixel size times ``n / size``) by cropping or zero-padding its centred
    spectrum: band-limited interpolation, origin voxel ``n // 2`` kept at ``size // 2``,
    density values (and so the mean) kept."""
    n = volume.shape[0]
    if size == n:
        return volume.copy()
    axes = tuple(range(volume.ndim))
    ft = np.fft.fftshift(
        scipy.fft.fftn(np.fft.ifftshift(volume.astype(np.float64)), workers=fft_threads())
    )
    ft = clip_center(ft, size) * (size / n) ** volume.ndim
    out = scipy.fft.ifftn(np.fft.ifftshift(ft, axes=axes), workers=fft_threads())
    return np.fft.fftshift(out.real).astype(volume.dtype)


def rescale_to_box(
    volume: np.ndarray, apix: float, box: int, target_apix: float
) -> tuple[np.ndarray, float]:
    """A cubic map at ``apix`` Å/px resampled (:func:`resize_fourier`) to ``target_apix``
    and clipped or padded to ``box`` px, centre on centre (what e2refine does to a model
    that does not match the particles). Returns the map and its exact pixel size (Å):
    the map is first padded to the size within twice its own whose resampled size is
    closest to a whole number of voxels, so that it differs from ``target_apix`` by
    under 0.1 / ``box`` relative in all but rare ratios."""
    n = volume.shape[0]
    ratio = apix / target_apix  # output voxels per input voxel
    if np.isclose(ratio, 1.0, rtol=1e-6, atol=0):
        return clip_center(volume, box), apix
    need = max(n, int(np.ceil(box / ratio)))  # input voxels covering the output box
    sizes = np.arange(need, 2 * need + 1)
    error = np.abs(sizes * ratio - np.round(sizes * ratio)) / (sizes * ratio)
    good = np.flatnonzero(error < 0.1 / box)
    padded = int(sizes[good[0]] if len(good) else sizes[np.argmin(error)])
    size = int(round(padded * ratio))
    out = resize_fourier(clip_center(volume, padded), size)
    return clip_center(out, box), apix * padded / size

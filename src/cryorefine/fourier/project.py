"""Projection of a map along many orientations (central-slice and real-space).

Orientation ``R`` ``(3, 3)`` acts on ``(x, y, z)``: the map rotated by ``R`` (density at
``v`` moved to ``R v``) is summed along z, so ``P(x, y) = sum_z V(R^T (x, y, z))`` in
voxel units (no pixel-size factor), centred on pixel ``n // 2``. This is EMAN2's and
RELION's projection.

* ``fourier`` (default): pre-divide the map by the trilinear kernel's transform
  ``sinc^2``, zero-pad to ``P = pad * n``, FFT once, then per orientation sample the
  central slice ``F(R^T (kx, ky, 0))`` by trilinear interpolation and inverse-FFT.
* ``standard``: EMAN2's real-space ray sum with trilinear interpolation, one voxel
  per step (without EMAN2's column-0 quirk). Exact for axis-aligned views, slower
  and slightly low-passed at oblique ones.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage

from cryorefine.errors import CryorefineError
from cryorefine.fourier import _kernels
from cryorefine.fourier.ctf import CTFParams, apply_ctf
from cryorefine.fourier.fft import cpu_count, fft_threads, shift_images
from cryorefine.registry import PROJECTORS, Modifier, Param


@dataclass
class VolumeFT:
    """A map's padded, gridding-corrected, centred 3D Fourier transform.

    ``data`` ``(P, P, P)`` complex64, axes (z, y, x), zero frequency at ``P // 2``;
    ``n`` is the original box.
    """

    data: np.ndarray
    n: int

    @property
    def pad_size(self) -> int:
        return self.data.shape[0]


def prepare_volume(volume: np.ndarray, *, pad_factor: float = 2.0) -> VolumeFT:
    """Gridding-correct, pad and Fourier-transform ``volume`` ``(n, n, n)`` once."""
    n = volume.shape[0]
    size = int(round(pad_factor * n))
    size += size % 2
    if size < n:
        raise CryorefineError(f"fourier projector: pad={pad_factor} must be at least 1")
    c = np.arange(n) - n // 2
    s2 = np.sinc(c / size) ** 2
    corrected = volume / (s2[:, None, None] * s2[None, :, None] * s2[None, None, :])
    padded = np.zeros((size,) * 3, dtype=np.float32)
    o = size // 2 - n // 2
    padded[o : o + n, o : o + n, o : o + n] = corrected
    ft = scipy.fft.fftshift(scipy.fft.fftn(scipy.fft.ifftshift(padded), workers=fft_threads()))
    # the -P/2 planes have no +P/2 partners; zero them so that every rotation of the
    # grid sees the same (Hermitian-symmetric) transform
    ft[0], ft[:, 0], ft[:, :, 0] = 0, 0, 0
    return VolumeFT(ft.astype(np.complex64), n)


def extract_slices(volume_ft: VolumeFT, rotations: np.ndarray) -> np.ndarray:
    """Central slices ``(k, P, P // 2 + 1)`` complex64 in ``rfft2`` layout.

    Slice ``j`` at 2D frequency ``q = (kx, ky)`` (padded-box units) is the 3D transform at
    ``R_j^T (kx, ky, 0)``, trilinearly interpolated, zero outside the box.
    """
    size = volume_ft.pad_size
    ky = scipy.fft.fftfreq(size, 1.0 / size)
    kx = np.arange(size // 2 + 1, dtype=np.float64)
    qy, qx = np.meshgrid(ky, kx, indexing="ij")
    rots = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    # s = R^T q with q = (qx, qy, 0): s_i = R[0, i] qx + R[1, i] qy
    s = rots[:, 0, :, None, None] * qx + rots[:, 1, :, None, None] * qy  # (k, 3, P, P/2+1)
    coords = s[:, ::-1] + size // 2  # (x, y, z) -> array axes (z, y, x)
    coords = np.moveaxis(coords, 1, 0).reshape(3, -1)
    out = ndimage.map_coordinates(
        volume_ft.data, coords, order=1, mode="constant", cval=0.0, prefilter=False
    )
    return out.reshape(len(rots), size, size // 2 + 1).astype(np.complex64)


def slices_to_images(slices: np.ndarray, n: int) -> np.ndarray:
    """Inverse-FFT padded ``rfft2`` slices and crop the central ``n x n`` (float32)."""
    size = slices.shape[-2]
    images = scipy.fft.irfft2(slices, s=(size, size), workers=fft_threads())
    images = scipy.fft.fftshift(images, axes=(-2, -1))
    o = size // 2 - n // 2
    return np.ascontiguousarray(images[:, o : o + n, o : o + n], dtype=np.float32)


def project_fourier(
    volume: np.ndarray | VolumeFT,
    rotations: np.ndarray,
    *,
    pad_factor: float = 2.0,
    chunk: int = 8,
) -> np.ndarray:
    """Central-slice projections ``(k, n, n)`` float32 of ``volume`` along ``rotations``.

    Small chunks of orientations run on all cores in threads (the interpolation
    releases the GIL, and small chunks stay in cache).
    """
    vft = volume if isinstance(volume, VolumeFT) else prepare_volume(volume, pad_factor=pad_factor)
    rots = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    out = np.empty((len(rots), vft.n, vft.n), dtype=np.float32)

    def run(start: int) -> None:
        sl = slice(start, start + chunk)
        out[sl] = slices_to_images(extract_slices(vft, rots[sl]), vft.n)

    with ThreadPoolExecutor(max_workers=cpu_count()) as pool:
        list(pool.map(run, range(0, len(rots), chunk)))
    return out


def project_standard(volume: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """EMAN2 ``standard`` projections ``(k, n, n)``: trilinear ray sums, one voxel a step.

    A sample with any coordinate outside ``[0, n - 1]`` contributes nothing. Compiled,
    one orientation per thread.
    """
    vol = np.ascontiguousarray(volume, dtype=np.float32)
    rots = np.ascontiguousarray(np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3))
    out = np.empty((len(rots), vol.shape[0], vol.shape[0]), dtype=np.float32)
    _kernels.ray_sums(vol, rots, out)
    return out


@PROJECTORS.register(
    "fourier",
    "Central-slice projection from the padded 3D FFT, trilinear interpolation with "
    "sinc^2 gridding correction (accurate to Nyquist; the default).",
    (Param("pad", float, "padding factor of the 3D FFT", default=2.0),),
)
def fourier(volume: np.ndarray, rotations: np.ndarray, *, pad: float = 2.0) -> np.ndarray:
    return project_fourier(volume, rotations, pad_factor=pad)


@PROJECTORS.register(
    "standard",
    "EMAN2's real-space projector: trilinear ray sums, one voxel per step (slower).",
)
def standard(volume: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    return project_standard(volume, rotations)


def project(
    volume: np.ndarray,
    rotations: np.ndarray,
    *,
    projector: str | Modifier = "fourier",
    shifts_px: np.ndarray | None = None,
    ctf: CTFParams | None = None,
    apix: float | None = None,
) -> np.ndarray:
    """Project ``volume`` along ``rotations``, then shift and apply a CTF if given.

    Parameters
    ----------
    projector
        ``fourier`` or ``standard`` (an EMAN2 modifier string, e.g. ``fourier:pad=3``).
    shifts_px
        ``(k, 2)`` ``(x, y)`` pixels: each projection is moved by this amount (its centre
        lands at ``n // 2 + shift``; RELION origin = ``-shift``).
    ctf, apix
        Per-projection CTF (RELION convention) and the pixel size in Å.
    """
    mod = projector if isinstance(projector, Modifier) else None
    mod = mod or PROJECTORS.parse(projector, option="--projector")
    images = mod(np.asarray(volume, dtype=np.float32), rotations)
    if shifts_px is not None:
        images = shift_images(images, shifts_px)
    if ctf is not None:
        if not apix:
            raise CryorefineError("a CTF needs the pixel size (apix)")
        images = apply_ctf(images, ctf.evaluate(images.shape[-1], apix))
    return images

"""EMAN2's 2D alignment transform and its application to image stacks.

A transform ``(alpha, tx, ty, mirror)`` maps centred coordinates ``q`` (pixels from
``(n // 2, n // 2)``) as ``T(q) = M^mirror (R(alpha) q + t)``: rotate about the centre,
translate, then mirror x. ``R(a) = [[cos a, sin a], [-sin a, cos a]]`` on ``(x, y)``,
``M = diag(-1, 1)``. Applying ``T`` to an image moves the content at ``q`` to ``T(q)``:
``J(p) = I(T^-1(p))``, bilinear, zero where the source lies outside the box. All
functions take arrays of transforms (one per image); angles in degrees, shifts in px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from cryorefine.errors import CryorefineError


def as_matrices(alpha, tx, ty, mirror) -> np.ndarray:
    """Homogeneous ``(k, 3, 3)`` matrices ``[[M^m R, M^m t], [0, 0, 1]]``."""
    alpha, tx, ty, mirror = np.broadcast_arrays(
        np.atleast_1d(np.asarray(alpha, np.float64)),
        np.atleast_1d(np.asarray(tx, np.float64)),
        np.atleast_1d(np.asarray(ty, np.float64)),
        np.atleast_1d(np.asarray(mirror).astype(bool)),
    )
    a = np.deg2rad(alpha)
    c, s = np.cos(a), np.sin(a)
    out = np.zeros(alpha.shape + (3, 3))
    out[..., 0, 0], out[..., 0, 1], out[..., 0, 2] = c, s, tx
    out[..., 1, 0], out[..., 1, 1], out[..., 1, 2] = -s, c, ty
    out[..., 2, 2] = 1.0
    out[..., 0, :] *= np.where(mirror, -1.0, 1.0)[..., None]
    return out


def inverse_matrices(alpha, tx, ty, mirror) -> np.ndarray:
    """``(k, 3, 3)`` inverses of :func:`as_matrices` in closed form:
    ``T^-1(p) = R^T (M^m p - t)``."""
    m = as_matrices(alpha, tx, ty, mirror)
    out = np.zeros_like(m)
    rt = np.swapaxes(m[..., :2, :2], -1, -2)  # (M^m R)^T = R^T M^m
    out[..., :2, :2] = rt
    # T^-1 p = R^T M^m p - R^T t, and R^T t = rt . (M^m t) since M^m M^m = 1
    out[..., :2, 2] = -np.einsum("...ij,...j->...i", rt, m[..., :2, 2])
    out[..., 2, 2] = 1.0
    return out


def from_matrices(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(alpha in [0, 360), tx, ty, mirror)`` of homogeneous matrices ``(..., 3, 3)``."""
    m = np.array(m, dtype=np.float64)
    mirror = (m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]) < 0
    m[..., 0, :] *= np.where(mirror, -1.0, 1.0)[..., None]
    alpha = np.mod(np.rad2deg(np.arctan2(m[..., 0, 1], m[..., 0, 0])), 360.0)
    alpha = np.where(alpha >= 360.0 - 1e-9, 0.0, alpha)
    return alpha, m[..., 0, 2], m[..., 1, 2], mirror


def inverse(alpha, tx, ty, mirror) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The inverse transforms (a mirrored transform keeps its angle)."""
    return from_matrices(inverse_matrices(alpha, tx, ty, mirror))


def compose(first, second) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``second o first``: apply ``first`` then ``second``; each an (alpha, tx, ty, mirror)."""
    return from_matrices(as_matrices(*second) @ as_matrices(*first))


@dataclass(frozen=True)
class Transform2D:
    """A stack of transforms, one per image: ``alpha`` (degrees), ``tx``, ``ty`` (px) and
    ``mirror`` (bool) arrays of one length, each the transform of the module docstring.

    The arrays are kept as given (no copy, no cast), so that a stack of transforms
    travels by name without changing a bit of what it carries.
    """

    alpha: np.ndarray
    tx: np.ndarray
    ty: np.ndarray
    mirror: np.ndarray

    @classmethod
    def identity(cls, k: int) -> Transform2D:
        """``k`` identity transforms."""
        return cls(np.zeros(k), np.zeros(k), np.zeros(k), np.zeros(k, bool))

    @classmethod
    def of(cls, alpha, tx, ty, mirror) -> Transform2D:
        """The transforms of four array-likes (as arrays)."""
        return cls(np.asarray(alpha), np.asarray(tx), np.asarray(ty), np.asarray(mirror))

    def __len__(self) -> int:
        return len(self.alpha)

    def take(self, idx) -> Transform2D:
        """The transforms ``idx`` (indices, a boolean mask or a slice)."""
        return Transform2D(self.alpha[idx], self.tx[idx], self.ty[idx], self.mirror[idx])

    def inverse(self) -> Transform2D:
        """The inverse transforms (:func:`inverse`)."""
        return Transform2D(*inverse(self.alpha, self.tx, self.ty, self.mirror))

    def then(self, second: Transform2D) -> Transform2D:
        """``second o self``: these transforms, then ``second`` (:func:`compose`)."""
        return Transform2D(*compose(self._parts(), second._parts()))

    def apply(self, images: np.ndarray, *, source=None, out: np.ndarray | None = None):
        """Each image moved by its transform (:func:`apply_transform`)."""
        return apply_transform(
            images, self.alpha, self.tx, self.ty, self.mirror, source=source, out=out
        )

    def _parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.alpha, self.tx, self.ty, self.mirror


@njit(cache=True, parallel=True, fastmath=True)
def _apply(images, src, inv, out, rows):
    """Bilinear resampling of output rows ``0 .. rows - 1``: ``out[i]`` is image
    ``src[i]`` under inverse matrix ``inv[i]``."""
    k = src.shape[0]
    n = images.shape[-1]
    c = n // 2
    for i in prange(k):
        a = inv[i]
        img = images[src[i]]
        o = out[i]
        for y in range(rows):
            py = y - c
            for x in range(n):
                px = x - c
                sx = a[0, 0] * px + a[0, 1] * py + a[0, 2] + c
                sy = a[1, 0] * px + a[1, 1] * py + a[1, 2] + c
                if sx < 0.0 or sy < 0.0 or sx > n - 1 or sy > n - 1:
                    o[y, x] = 0.0
                    continue
                x0 = min(int(sx), n - 2)
                y0 = min(int(sy), n - 2)
                fx = sx - x0
                fy = sy - y0
                o[y, x] = (1.0 - fy) * ((1.0 - fx) * img[y0, x0] + fx * img[y0, x0 + 1]) + fy * (
                    (1.0 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1]
                )


def apply_transform(
    images: np.ndarray,
    alpha,
    tx,
    ty,
    mirror,
    *,
    source=None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Transform each image ``(k, n, n)`` by its own ``(alpha, tx, ty, mirror)``.

    Bilinear; pixels whose source falls outside the box are 0. Returns float32.
    ``source`` (optional, ``(m,)`` indices into ``images``): output ``i`` is image
    ``source[i]`` transformed by transform ``i`` (no copies of repeated images).
    ``out``: a float32 C-contiguous array to fill instead of a new one.
    """
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim == 2:
        return apply_transform(images[None], alpha, tx, ty, mirror)[0]
    if images.shape[-1] != images.shape[-2] or images.shape[-1] < 2:
        raise CryorefineError(f"images must be square, got {images.shape[-2:]}")
    src = np.arange(len(images)) if source is None else np.asarray(source, np.int64)
    k = len(src)
    inv = inverse_matrices(alpha, tx, ty, mirror)
    inv = np.ascontiguousarray(np.broadcast_to(inv, (k, 3, 3)))
    if out is None:
        out = np.empty((k,) + images.shape[1:], np.float32)
    _apply(images, src, inv, out, images.shape[-1])
    return out


def rotate_stack(images: np.ndarray, alpha, out: np.ndarray, rows: int | None = None) -> None:
    """``out[r, j] = apply_transform(images[r], alpha[j], 0, 0, 0)`` for every image
    ``r`` and angle ``j`` (rows ``0 .. rows - 1`` only; all by default), as one pass
    that computes each angle's source positions once for the whole stack and runs the
    compiled loop along the stack. ``out`` ``(k, len(alpha), n, n)`` float32 (any
    strides)."""
    k, n = len(images), images.shape[-1]
    if out.shape != (k, len(np.atleast_1d(alpha)), n, n) or out.dtype != np.float32:
        raise ValueError(f"rotate_stack: out must be float32 {(k, len(alpha), n, n)}")
    by_pixel = np.ascontiguousarray(np.asarray(images, np.float32).reshape(k, n * n).T)
    inv = np.ascontiguousarray(inverse_matrices(alpha, 0.0, 0.0, False))
    _rotate_stack(by_pixel, inv, out, n if rows is None else rows)


@njit(cache=True, parallel=True, fastmath=True)
def _rotate_stack(by_pixel, inv, out, rows):
    """:func:`_apply`'s resampling with the stack on the inner axis: ``by_pixel``
    ``(n * n, k)`` (pixel-major images), one task per output angle and row."""
    k = by_pixel.shape[1]
    n = out.shape[-1]
    c = n // 2
    for t in prange(inv.shape[0] * rows):
        j = t // rows
        y = t % rows
        a = inv[j]
        py = y - c
        tile = np.empty((n, k), np.float32)
        for x in range(n):
            px = x - c
            sx = a[0, 0] * px + a[0, 1] * py + a[0, 2] + c
            sy = a[1, 0] * px + a[1, 1] * py + a[1, 2] + c
            if sx < 0.0 or sy < 0.0 or sx > n - 1 or sy > n - 1:
                tile[x, :] = 0.0
                continue
            x0 = min(int(sx), n - 2)
            y0 = min(int(sy), n - 2)
            fx = sx - x0
            fy = sy - y0
            i = y0 * n + x0
            v00, v01 = by_pixel[i], by_pixel[i + 1]
            v10, v11 = by_pixel[i + n], by_pixel[i + n + 1]
            for r in range(k):
                tile[x, r] = (1.0 - fy) * ((1.0 - fx) * v00[r] + fx * v01[r]) + fy * (
                    (1.0 - fx) * v10[r] + fx * v11[r]
                )
        for r in range(k):
            for x in range(n):
                out[r, j, y, x] = tile[x, r]


def mirror_x(images: np.ndarray) -> np.ndarray:
    """Mirror x about the centre column ``n // 2``; for even ``n`` column 0 has no
    partner and becomes 0 (as EMAN2)."""
    n = images.shape[-1]
    out = np.zeros_like(images)
    c = n // 2
    # out[..., j] = in[..., 2c - j]; 2c - lo = n - 1 for odd and even n
    lo = 2 * c - (n - 1)
    out[..., lo:] = images[..., ::-1][..., : n - lo]
    return out


def rotate180(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rotate by 180 degrees about ``(n // 2, n // 2)``: an exact pixel permutation (what
    bilinear resampling gives); for even ``n`` row 0 and column 0 have no source and are 0.
    ``out``: an array of the same shape to fill instead of a new one."""
    n = images.shape[-1]
    out = np.empty_like(images) if out is None else out
    lo = 2 * (n // 2) - (n - 1)  # 1 for even n, 0 for odd
    out[..., lo:, lo:] = images[..., ::-1, ::-1][..., : n - lo, : n - lo]
    out[..., :lo, :] = 0.0
    out[..., :, :lo] = 0.0
    return out


def rotate_quarter(images: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rotate by +90 degrees about ``(n // 2, n // 2)``: an exact pixel permutation,
    ``out[y, x] = in[x, 2 (n // 2) - y]``; for even ``n`` row 0 has no source and is 0.
    ``images`` ``(..., n, n)`` (up to two leading axes, any strides)."""
    out = np.empty_like(images) if out is None else out
    lead = (1,) * (4 - images.ndim)
    _rotate_quarter(images.reshape(lead + images.shape), out.reshape(lead + out.shape))
    return out


@njit(cache=True, parallel=True)
def _rotate_quarter(images, out):
    a, b, n, _ = images.shape
    c2 = 2 * (n // 2)
    for t in prange(a * b):
        src = images[t // b, t % b]
        dst = out[t // b, t % b]
        for y in range(n):
            if c2 - y >= n:
                dst[y, :] = 0.0
                continue
            for x in range(n):
                dst[y, x] = src[x, c2 - y]


def rotate_with_quarter_turns(
    images: np.ndarray, alpha, turn, *, source=None, out: np.ndarray | None = None
) -> np.ndarray:
    """Rotation by ``alpha`` degrees as ``apply_transform(images, alpha, 0, 0, 0)``;
    where ``turn`` is set, made as an exact quarter turn of the bilinear rotation by
    ``alpha - 90``, with row 0 (for even ``n`` it has no source in the turned image)
    resampled bilinearly at ``alpha``. Equal to the direct bilinear rotation up to
    rounding; the engine's bank builds its angles from 90 degrees on the same way
    from the images it holds already. ``source``: as :func:`apply_transform`."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    src = np.arange(len(images)) if source is None else np.asarray(source, np.int64)
    alpha = np.broadcast_to(np.asarray(alpha, np.float64), src.shape)
    turn = np.broadcast_to(np.asarray(turn, bool), src.shape)
    out = apply_transform(images, np.where(turn, alpha - 90.0, alpha), 0, 0, 0, source=src, out=out)
    if turn.any():
        idx = np.flatnonzero(turn)
        out[idx] = rotate_quarter(out[idx])
        fix_row0(images, alpha[idx], src[idx], out, idx)
    return out


def fix_row0(images, alpha, src, out, idx) -> None:
    """Resample row 0 of ``out[idx]`` bilinearly: image ``src`` rotated by ``alpha``
    (the row an even image's quarter turn leaves without a source)."""
    n = images.shape[-1]
    if n % 2 or len(idx) == 0:
        return
    inv = np.ascontiguousarray(inverse_matrices(alpha, 0.0, 0.0, False))
    row = np.empty((len(idx), 1, n), np.float32)
    _apply(images, np.asarray(src, np.int64), inv, row, 1)
    out[idx, 0, :] = row[:, 0, :]


def shift_integer(images: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Shift each image by whole pixels ``(dx, dy)`` with zero fill (content moves by +d)."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    dx = np.broadcast_to(np.asarray(dx, np.int64), images.shape[:1]).copy()
    dy = np.broadcast_to(np.asarray(dy, np.int64), images.shape[:1]).copy()
    out = np.zeros_like(images)
    _shift_integer(images, dx, dy, out)
    return out


@njit(cache=True, parallel=True)
def _shift_integer(images, dx, dy, out):
    k, n, _ = images.shape
    for i in prange(k):
        for y in range(max(0, dy[i]), min(n, n + dy[i])):
            for x in range(max(0, dx[i]), min(n, n + dx[i])):
                out[i, y, x] = images[i, y - dy[i], x - dx[i]]


def meanshrink(images: np.ndarray, factor: int) -> np.ndarray:
    """EMAN2 ``math.meanshrink``: means of non-overlapping ``factor x factor`` blocks."""
    if factor < 2:
        raise CryorefineError(f"--shrink {factor}: the shrink factor must be at least 2")
    n_y, n_x = images.shape[-2] // factor, images.shape[-1] // factor
    cut = images[..., : n_y * factor, : n_x * factor]
    shape = cut.shape[:-2] + (n_y, factor, n_x, factor)
    return cut.reshape(shape).mean(axis=(-3, -1), dtype=np.float64).astype(np.float32)

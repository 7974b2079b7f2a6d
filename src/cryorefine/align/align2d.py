"""EMAN2's 2D aligners, vectorised over pairs of images.

Each aligner moves ``moving`` ``(k, n, n)`` onto ``target`` ``(k, n, n)`` pair by pair
and returns an :class:`Alignment`: the transformed images and the forward transforms
(``transform2d``'s convention). ``cmp`` is the comparator (a parsed modifier, or a
function of ``(a, b)``) that chooses among candidates, always called as
``cmp(candidate, target)``. These are the per-pair definitions the batched engine
(:mod:`cryorefine.align.engine`) must reproduce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.fft

from cryorefine.align.rotational import footprints, pair_rotations, polar_size, spectra
from cryorefine.align.transform2d import (
    Transform2D,
    apply_transform,
    mirror_x,
    rotate180,
    rotate_with_quarter_turns,
    shift_integer,
)
from cryorefine.errors import CryorefineError
from cryorefine.fourier.fft import fft_threads
from cryorefine.registry import ALIGNERS, COMPARATORS, Param


@dataclass
class Alignment:
    """Aligned images and their forward transforms (one per pair)."""

    images: np.ndarray
    alpha: np.ndarray
    tx: np.ndarray
    ty: np.ndarray
    mirror: np.ndarray
    score: np.ndarray | None = None  # the candidate-choosing comparator's value

    @property
    def transform(self) -> Transform2D:
        """The forward transforms as one bundle."""
        return Transform2D(self.alpha, self.tx, self.ty, self.mirror)


def default_maxshift(n: int, maxshift: int | None) -> int:
    """EMAN2's default ``n // 4``; never more than ``n / 2 - 1``."""
    ms = n // 4 if maxshift is None or maxshift < 0 else int(maxshift)
    return min(ms, n // 2 - 1)


def comparator(cmp) -> Callable[..., np.ndarray]:
    """A comparator callable from a modifier string, a parsed modifier or a function."""
    if cmp is None:
        return COMPARATORS.parse("ccc")
    if isinstance(cmp, str):
        return COMPARATORS.parse(cmp, option="aligner cmp")
    return cmp


def window_offsets(maxshift: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(dx, dy)`` of the square search window in EMAN2's scan order."""
    d = np.arange(-maxshift, maxshift + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    return dx.ravel(), dy.ravel()


def ccf_peaks(
    moving_ft: np.ndarray, target_ft: np.ndarray, n: int, maxshift: int, nozero: bool = False
):
    """Integer peaks ``(px, py)`` of ``IFFT(M conj T)`` within ``|d| <= maxshift``, and
    their sub-pixel offsets ``(fx, fy)`` from a parabola through the neighbours.

    First maximum in scan order (y outer, x inner, negative to positive). ``nozero``
    zeroes the CCF at the origin and its 8 neighbours first (against fixed patterns).
    """
    ccf = scipy.fft.irfft2(moving_ft * np.conj(target_ft), s=(n, n), workers=fft_threads())
    if nozero:
        near = np.array([-1, 0, 1]) % n
        ccf[:, near[:, None], near[None, :]] = 0.0
    dx, dy = window_offsets(maxshift)
    nw = 2 * maxshift + 1
    win = ccf[:, dy % n, dx % n]
    best = np.argmax(win, axis=1)
    win = win.reshape(-1, nw, nw).astype(np.float64)
    iy, ix = np.divmod(best, nw)
    k = np.arange(len(best))

    def vertex(lo, mid, hi, at_edge):
        den = lo - 2 * mid + hi
        with np.errstate(invalid="ignore", divide="ignore"):
            f = np.clip(0.5 * (lo - hi) / den, -0.5, 0.5)
        return np.where(at_edge | (den >= 0), 0.0, f)

    ixl, ixh = np.clip(ix - 1, 0, nw - 1), np.clip(ix + 1, 0, nw - 1)
    iyl, iyh = np.clip(iy - 1, 0, nw - 1), np.clip(iy + 1, 0, nw - 1)
    fx = vertex(win[k, iy, ixl], win[k, iy, ix], win[k, iy, ixh], (ix == 0) | (ix == nw - 1))
    fy = vertex(win[k, iyl, ix], win[k, iy, ix], win[k, iyh, ix], (iy == 0) | (iy == nw - 1))
    return dx[best], dy[best], fx, fy


_MAXSHIFT = Param("maxshift", int, "largest shift per axis in px (default n/4)")


def _cmp_ctx(cmp, a, b, ctx):
    return np.asarray(cmp(a, b, **ctx), dtype=np.float64)


@ALIGNERS.register(
    "translational",
    "Integer translation: peak of the circular cross-correlation within maxshift; "
    "the image is shifted with zero fill.",
    (
        _MAXSHIFT,
        Param("nozero", bool, "zero the CCF at the origin and its 8 neighbours", default=False),
    ),
)
def translational(moving, target, *, maxshift=None, nozero=False, cmp=None, **ctx) -> Alignment:
    moving = np.asarray(moving, np.float32)
    n = moving.shape[-1]
    ms = default_maxshift(n, maxshift)
    px, py, _, _ = ccf_peaks(
        scipy.fft.rfft2(moving, workers=fft_threads()),
        scipy.fft.rfft2(np.asarray(target, np.float32), workers=fft_threads()),
        n,
        ms,
        nozero,
    )
    k = len(moving)
    return Alignment(
        shift_integer(moving, -px, -py), np.zeros(k), -px * 1.0, -py * 1.0, np.zeros(k, bool)
    )


def footprint_angles(moving: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per pair, the footprint rotation ``alpha0`` in degrees, in ``[0, 180)``."""
    xs = polar_size(moving.shape[-1])[0]
    k = np.arange(len(moving))
    j = pair_rotations(spectra(footprints(moving)), spectra(footprints(target)), k, k, xs)
    return j * (180.0 / xs)


@ALIGNERS.register(
    "rotational",
    "Rotation from the rotational footprints; the 180-degree ambiguity resolved with the "
    "comparator (ambig180=1 skips that).",
    (Param("ambig180", bool, "keep the footprint angle without testing +180", default=False),),
)
def rotational(moving, target, *, ambig180=False, cmp=None, **ctx) -> Alignment:
    moving = np.asarray(moving, np.float32)
    target = np.asarray(target, np.float32)
    k = len(moving)
    a0 = footprint_angles(moving, target)
    r0 = apply_transform(moving, a0, 0, 0, 0)
    if ambig180:
        return Alignment(r0, a0, np.zeros(k), np.zeros(k), np.zeros(k, bool))
    r1 = apply_transform(moving, a0 + 180, 0, 0, 0)
    cmp = comparator(cmp)
    use180 = _cmp_ctx(cmp, r1, target, ctx) <= _cmp_ctx(cmp, r0, target, ctx)
    return Alignment(
        np.where(use180[:, None, None], r1, r0),
        np.where(use180, a0 + 180.0, a0),
        np.zeros(k),
        np.zeros(k),
        np.zeros(k, bool),
    )


_RT_PARAMS = (
    _MAXSHIFT,
    Param("nozero", bool, "zero the CCF at the origin and its 8 neighbours", default=False),
    Param("rfp_mode", int, "rotational footprint mode (2: EMAN2's default)", default=2),
    Param("useflcf", bool, "fast local correlation (not supported)", default=False),
    Param("zscore", bool, "z-score footprint rows (not supported)", default=False),
    Param(
        "subpixel",
        bool,
        "report the shift at the parabola-interpolated CCF peak (not EMAN2; the "
        "candidates are still compared at the integer peak)",
        default=False,
    ),
)


def _check_rt(params: dict, where: str) -> None:
    if params.get("useflcf") or params.get("zscore"):
        raise CryorefineError(f"{where}: useflcf and zscore are not supported")
    if params.get("rfp_mode", 2) != 2:
        raise CryorefineError(f"{where}: only rfp_mode=2 (EMAN2's default) is supported")


@ALIGNERS.register(
    "rotate_translate",
    "Rotation from the footprints (alpha0 and alpha0 + 180 tried), then the integer "
    "translation within maxshift; the comparator picks the better candidate.",
    _RT_PARAMS,
    check=_check_rt,
)
def rotate_translate(
    moving, target, *, maxshift=None, nozero=False, subpixel=False, cmp=None, **ctx
) -> Alignment:
    moving = np.asarray(moving, np.float32)
    target = np.asarray(target, np.float32)
    k, n = len(moving), moving.shape[-1]
    ms = default_maxshift(n, maxshift)
    cmp = comparator(cmp)
    a0 = footprint_angles(moving, target)
    target_ft = scipy.fft.rfft2(target, workers=fft_threads())
    best = None
    r0 = rotate_with_quarter_turns(moving, a0, a0 >= 90.0)  # as the engine's bank
    # two candidates, alpha0 and that image turned by a further 180 degrees (exact);
    # on a tie the 180-degree one wins
    for alpha, rot in ((a0, r0), (a0 + 180.0, rotate180(r0))):
        px, py, fx, fy = ccf_peaks(
            scipy.fft.rfft2(rot, workers=fft_threads()), target_ft, n, ms, nozero
        )
        cand = shift_integer(rot, -px, -py)
        score = _cmp_ctx(cmp, cand, target, ctx)
        tx, ty = (-(px + fx), -(py + fy)) if subpixel else (-px * 1.0, -py * 1.0)
        if best is None:
            best = [cand, alpha, tx, ty, score]
        else:
            take = score <= best[4]
            best = [
                np.where(take[:, None, None], cand, best[0]),
                np.where(take, alpha, best[1]),
                np.where(take, tx, best[2]),
                np.where(take, ty, best[3]),
                np.where(take, score, best[4]),
            ]
    return Alignment(best[0], np.mod(best[1], 360.0), best[2], best[3], np.zeros(k, bool), best[4])


@ALIGNERS.register(
    "rotate_translate_flip",
    "rotate_translate against the target and against its x-mirror; the better of the "
    "two (by the comparator) wins, the mirrored one with mirror=1.",
    _RT_PARAMS,
    check=_check_rt,
)
def rotate_translate_flip(moving, target, *, maxshift=None, cmp=None, **ctx) -> Alignment:
    target = np.asarray(target, np.float32)
    kw = dict(ctx)
    kw.pop("nozero", None)  # EMAN2 does not forward nozero
    a = rotate_translate(moving, target, maxshift=maxshift, cmp=cmp, **kw)
    b = rotate_translate(moving, mirror_x(target), maxshift=maxshift, cmp=cmp, **kw)
    keep_a = a.score < b.score
    return Alignment(
        np.where(keep_a[:, None, None], a.images, mirror_x(b.images)),
        np.where(keep_a, a.alpha, b.alpha),
        np.where(keep_a, a.tx, b.tx),
        np.where(keep_a, a.ty, b.ty),
        ~keep_a,
        np.where(keep_a, a.score, b.score),
    )


@ALIGNERS.register(
    "refine",
    "Local Nelder-Mead polish of (tx, ty, alpha) from a start transform (the mirror "
    "is kept); the solution is rejected (start returned) beyond maxshift.",
    (
        Param("stepx", float, "initial simplex step in x, px", default=1.0),
        Param("stepy", float, "initial simplex step in y, px", default=1.0),
        Param("stepaz", float, "initial simplex step in angle, degrees", default=5.0),
        Param("stepscale", float, "scale step (scale is not refined: must be 0)", default=0.0),
        Param("precision", float, "stop when the simplex size is below this", default=0.04),
        Param("maxiter", int, "iteration limit", default=28),
        Param("maxshift", int, "largest accepted shift per axis in px (default n/4)"),
        Param(
            "mode", int, "0: the comparator (mode 2, a built-in dot, is not supported)", default=0
        ),
        Param("mask", str, "mask image file multiplied into the moved image", file="image"),
    ),
    check=lambda p, w: _check_refine(p, w),
)
def refine_alignment(
    moving,
    target,
    *,
    start: Transform2D | None = None,
    stepx=1.0,
    stepy=1.0,
    stepaz=5.0,
    stepscale=0.0,
    precision=0.04,
    maxiter=28,
    maxshift=None,
    mode=0,
    mask=None,
    cmp=None,
    **ctx,
) -> Alignment:
    """``start``: the transforms to polish, one per pair (identity when absent)."""
    from cryorefine.align.compare import load_mask

    moving = np.asarray(moving, np.float32)
    target = np.asarray(target, np.float32)
    k, n = len(moving), moving.shape[-1]
    ms = default_maxshift(n, maxshift)
    cmp = comparator(cmp)
    sel = load_mask(mask, n, "refine")
    if start is None:
        start = Transform2D.identity(k)
    a0, x0, y0, mirror = (
        np.broadcast_to(np.asarray(v), (k,)).copy()
        for v in (start.alpha, start.tx, start.ty, start.mirror)
    )
    mirror = mirror.astype(bool)
    v0 = np.stack([x0, y0, a0], axis=1).astype(np.float64)

    def objective(v: np.ndarray, idx: np.ndarray) -> np.ndarray:
        img = apply_transform(moving[idx], v[:, 2], v[:, 0], v[:, 1], mirror[idx])
        if sel is not None:
            img = img * sel
        return _cmp_ctx(cmp, img, target[idx], ctx)

    best_v = minimise_simplex(
        objective, v0, np.array([stepx, stepy, stepaz]), precision=precision, maxiter=maxiter
    )
    flat = np.std(moving.reshape(k, -1), axis=1) * np.std(target.reshape(k, -1), axis=1) == 0
    ok = (np.abs(best_v[:, 0]) <= ms) & (np.abs(best_v[:, 1]) <= ms) & ~flat
    v = np.where(ok[:, None], best_v, v0)
    images = apply_transform(moving, v[:, 2], v[:, 0], v[:, 1], mirror)
    if sel is not None:
        images = images * sel
    score = _cmp_ctx(cmp, images, target, ctx)
    return Alignment(images, np.mod(v[:, 2], 360.0), v[:, 0], v[:, 1], mirror, score)


def _check_refine(params: dict, where: str) -> None:
    if params.get("stepscale"):
        raise CryorefineError(f"{where}: scale refinement (stepscale) is not supported")
    if params.get("mode", 0) != 0:
        raise CryorefineError(f"{where}: only mode=0 (the comparator) is supported")


def minimise_simplex(
    objective: Callable[[np.ndarray, np.ndarray], np.ndarray],
    start: np.ndarray,
    steps: np.ndarray,
    *,
    precision: float,
    maxiter: int,
) -> np.ndarray:
    """Nelder-Mead on many problems at once: ``start`` ``(k, d)``, returns the best points.

    ``objective(points (m, d), indices (m,))`` scores points of problems ``indices``.
    Initial simplex: the start and the start displaced by ``steps`` along each axis.
    Stops per problem when the mean vertex distance from the centroid is below
    ``precision``, or after ``maxiter - 1`` iterations (GSL nmsimplex's rules).
    """
    k, d = start.shape
    verts = np.repeat(start[:, None, :], d + 1, axis=1)
    verts[:, 1:, :] += np.diag(steps)[None]
    allk = np.arange(k)
    vals = np.stack([objective(verts[:, i], allk) for i in range(d + 1)], axis=1)
    for _ in range(maxiter - 1):
        cen_all = verts.mean(axis=1)
        size = np.linalg.norm(verts - cen_all[:, None], axis=2).mean(axis=1)
        act = np.flatnonzero(size >= precision)
        if act.size == 0:
            break
        order = np.argsort(vals[act], axis=1)
        v = np.take_along_axis(verts[act], order[:, :, None], axis=1)
        f = np.take_along_axis(vals[act], order, axis=1)
        cen = v[:, :-1].mean(axis=1)
        worst = v[:, -1]
        xr = cen + (cen - worst)
        fr = objective(xr, act)
        new_v, new_f = worst.copy(), f[:, -1].copy()
        better = fr < f[:, -2]
        new_v[better], new_f[better] = xr[better], fr[better]
        # expansion where the reflection beat the best
        exp = np.flatnonzero(fr < f[:, 0])
        if exp.size:
            xe = cen[exp] + 2.0 * (cen[exp] - worst[exp])
            fe = objective(xe, act[exp])
            win = fe < fr[exp]
            new_v[exp[win]], new_f[exp[win]] = xe[win], fe[win]
        # contraction where the reflection was no better than the second worst
        con = np.flatnonzero(~better)
        shrink = np.zeros(len(act), bool)
        if con.size:
            xc = cen[con] + 0.5 * (worst[con] - cen[con])
            fc = objective(xc, act[con])
            win = fc < f[con, -1]
            new_v[con[win]], new_f[con[win]] = xc[win], fc[win]
            shrink[con[~win]] = True
        v[:, -1], f[:, -1] = new_v, new_f
        sh = np.flatnonzero(shrink)
        if sh.size:
            v[sh, 1:] = v[sh, :1] + 0.5 * (v[sh, 1:] - v[sh, :1])
            for i in range(1, d + 1):
                f[sh, i] = objective(v[sh, i], act[sh])
        verts[act], vals[act] = v, f
    best = np.argmin(vals, axis=1)
    return verts[np.arange(k), best]


@ALIGNERS.register(
    "rtf_exhaustive",
    "Exhaustive rotate_translate_flip: every rotation on the footprint grid (180/xs "
    "degrees over 360), the integer translation of each by cross-correlation, against "
    "the target and its mirror; the comparator picks the best. Robust at low SNR where "
    "the footprint misleads; about xs/2 times the work of rotate_translate_flip.",
    (
        _MAXSHIFT,
        Param("subpixel", bool, "report the interpolated CCF peak", default=False),
    ),
)
def rtf_exhaustive(moving, target, *, maxshift=None, subpixel=False, cmp=None, **ctx) -> Alignment:
    moving = np.asarray(moving, np.float32)
    target = np.asarray(target, np.float32)
    k, n = len(moving), moving.shape[-1]
    ms = default_maxshift(n, maxshift)
    cmp = comparator(cmp)
    xs = polar_size(n)[0]
    targets = (target, mirror_x(target))
    target_fts = [scipy.fft.rfft2(t, workers=fft_threads()) for t in targets]
    best_score = np.full(k, np.inf)
    best = [np.zeros(k), np.zeros(k), np.zeros(k), np.zeros(k, bool)]
    for j in range(xs):
        r0 = apply_transform(moving, j * 180.0 / xs, 0, 0, 0)
        for alpha, rot in ((j * 180.0 / xs, r0), (j * 180.0 / xs + 180.0, rotate180(r0))):
            rot_ft = scipy.fft.rfft2(rot, workers=fft_threads())
            for m, (tgt, tgt_ft) in enumerate(zip(targets, target_fts, strict=True)):
                px, py, fx, fy = ccf_peaks(rot_ft, tgt_ft, n, ms)
                score = _cmp_ctx(cmp, shift_integer(rot, -px, -py), tgt, ctx)
                take = score < best_score
                best_score = np.where(take, score, best_score)
                tx, ty = (-(px + fx), -(py + fy)) if subpixel else (-px * 1.0, -py * 1.0)
                for v, new in zip(best, (alpha, tx, ty, bool(m)), strict=True):
                    v[take] = new[take] if np.ndim(new) else new
    images = apply_transform(moving, best[0], np.rint(best[1]), np.rint(best[2]), best[3])
    return Alignment(images, np.mod(best[0], 360.0), best[1], best[2], best[3], best_score)

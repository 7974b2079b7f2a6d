"""The batched alignment engine: every particle against every reference at once.

For ``rotate_translate_flip`` (and ``rotate_translate``) the per-pair definition in
:mod:`cryorefine.align.align2d` is evaluated for all pairs of two stacks without a
loop over pairs:

1. Rotational footprints of every reference, particle and mirrored particle; the
   footprint rotation of every pair is one matrix product per angular frequency
   (over radii) followed by an inverse FFT along angle (:func:`best_rotations`).
2. The footprint angle is quantised to ``180 / xs`` degrees, so each reference is
   rotated once to each of the ``xs`` angles (bilinear, as the per-pair path): a
   "bank" of ``xs`` images per reference, each Fourier-transformed once instead of a
   rotation per pair (angles from 90 degrees on are quarter turns of those below,
   their transforms permutations of theirs). The further 180-degree turn is exact (a
   pixel permutation): its transform is formed from the first's inside the kernel,
   never stored.
3. Each pair has four candidates (``alpha0``, ``alpha0 + 180``, each against the
   particle and its mirror). Their circular cross-correlation is needed only inside
   the ``maxshift`` window, so a compiled kernel evaluates ``bank * conj(particle)``
   by a partial inverse DFT on that window (rows, then columns) and takes the first
   maximum in EMAN2's scan order. Without a shift search (``maxshift=0``) the kernel
   works in real space only.
4. The candidates are scored by the aligner's comparator on the actually shifted
   images (zero fill): ``ccc``, ``dot`` and ``sqeuclidean`` (also ``normto=1``) from
   pixel sums the same kernel forms; any other comparator on materialised images.

References are taken in chunks (the bank holds ``xs`` images per reference) and
particles in chunks, so memory is bounded whatever the stack sizes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import scipy.fft
from numba import njit, prange, uint64

from cryorefine.align.align2d import default_maxshift
from cryorefine.align.compare import FLT_MIN, pair_context, premasked
from cryorefine.align.rotational import (
    best_rotations,
    footprints,
    pair_layout,
    pair_rotations,
    polar_size,
    spectra,
)
from cryorefine.align.transform2d import mirror_x, rotate180, rotate_quarter, rotate_stack
from cryorefine.fourier.fft import WORKERS

FUSED = {"ccc", "dot", "sqeuclidean"}
#: memory for one chunk of the reference bank (xs rotated images per reference, each
#: with its transform and line sums): the number of references per chunk follows from it
BANK_BYTES = 256 * 2**20
#: memory for one batch of candidate images materialised for a comparator scored on
#: images (and as much again for the images they are compared with): 1,024 pairs of
#: 64-px images. Large enough that the threads' hand-over between the compiled
#: kernels and the FFTs costs little, small enough to stay in cache.
IMAGE_BYTES = 16 * 2**20


@dataclass
class PairAlignment:
    """Forward transforms (reference -> particle) for a block of pairs ``(Np, Nc)``."""

    alpha: np.ndarray
    tx: np.ndarray
    ty: np.ndarray
    mirror: np.ndarray
    score: np.ndarray  # the aligner comparator's value of the chosen candidate
    final: np.ndarray | None = None  # the final comparator's score, when asked for


def fused_ok(cmp) -> bool:
    """Whether a comparator modifier can be scored by the fused kernel."""
    name = getattr(cmp, "name", None)
    if name not in FUSED:
        return False
    p = cmp.params
    if p.get("mask") is not None:
        return False
    return not (name == "sqeuclidean" and p.get("zeromask"))


def _needs_fit(cmp) -> bool:
    return getattr(cmp, "name", None) == "sqeuclidean" and bool(cmp.params.get("normto"))


@njit(cache=True)
def _parabola(win, iy, ix, axis):
    """Sub-pixel offset of a window maximum along x (axis 0) or y (axis 1): the vertex
    of the parabola through it and its two neighbours (0 at the window's edge)."""
    nw = win.shape[0]
    i = ix if axis == 0 else iy
    if i == 0 or i == nw - 1:
        return 0.0
    if axis == 0:
        lo, mid, hi = win[iy, ix - 1], win[iy, ix], win[iy, ix + 1]
    else:
        lo, mid, hi = win[iy - 1, ix], win[iy, ix], win[iy + 1, ix]
    den = lo - 2.0 * mid + hi
    if den >= 0.0:
        return 0.0
    return min(0.5, max(-0.5, 0.5 * (lo - hi) / den))


@njit(cache=True, inline="always")
def _pixel(img, y, x, h, c2):
    """Pixel ``(y, x)`` of bank image ``img`` (``h = 0``) or of it turned by 180 degrees
    about the centre (``h = 1``: ``img[c2 - y, c2 - x]``, 0 where that is outside)."""
    if h == 1:
        y = c2 - y
        x = c2 - x
        if y >= img.shape[0] or x >= img.shape[1]:
            return 0.0
    return np.float64(img[y, x])


@njit(cache=True, fastmath=True)
def _fit_sums(img, t_img, sx, sy, h, c2, out):
    """Count and sums (a, b, a^2, ab) over the pixels where the candidate ``a`` (bank
    image, turned if ``h``, shifted by ``(sx, sy)`` with zero fill) is ``>= FLT_MIN``,
    ``b`` the target: the least-squares fit of ``sqeuclidean:normto=1``."""
    n = img.shape[-1]
    y_lo, y_hi = max(0, sy), min(n, n + sy)
    x_lo, x_hi = max(0, sx), min(n, n + sx)
    f_n = 0.0
    f_a = 0.0
    f_b = 0.0
    f_aa = 0.0
    f_ab = 0.0
    if h == 1:  # the turned image's row and column 0 have no source
        y_lo = max(y_lo, c2 + sy - n + 1)
        x_lo = max(x_lo, c2 + sx - n + 1)
    for y in range(y_lo, y_hi):
        t_row = t_img[y]
        if h == 0:
            row = img[y - sy]
            off = sx
        else:  # turned row y - sy is source row c2 - y + sy read backwards
            row = img[c2 - y + sy, ::-1]
            off = sx + c2 - n + 1
        for x in range(x_lo, x_hi):  # branch-free, so that it vectorises
            a = np.float64(row[x - off])
            w = 1.0 if a >= FLT_MIN else 0.0
            tb = np.float64(t_row[x]) * w
            f_n += w
            f_a += a * w
            f_b += tb
            f_aa += a * a * w
            f_ab += a * tb
    out[0] = f_n
    out[1] = f_a
    out[2] = f_b
    out[3] = f_aa
    out[4] = f_ab


@njit(cache=True, fastmath=True)
def _products(img, t_img, t_turned, fit, out):
    """Products of a bank image ``a``, unshifted, and of it turned by 180 degrees
    (``h = 1``) with the target ``b``: ``out[h, 2]`` the sum of ab; with ``fit`` also
    ``out[h, 0]``, ``out[h, 1]``: the sums of b and ab over the pixels where
    ``a >= FLT_MIN`` (the candidate's own sums there are the bank's ``masked``). The
    turned image's products are those of ``a`` with the turned target ``t_turned``
    (:func:`rotate180`, which zeroes what has no source), in the same pass."""
    n = img.shape[-1]
    b0 = 0.0
    b1 = 0.0
    ab0 = 0.0
    ab1 = 0.0
    s0 = 0.0
    s1 = 0.0
    for y in range(n):
        row = img[y]
        t0 = t_img[y]
        t1 = t_turned[y]
        if fit:
            for x in range(n):  # branch-free
                a = np.float64(row[x])
                u = np.float64(t0[x])
                v = np.float64(t1[x])
                w = 1.0 if a >= FLT_MIN else 0.0
                b0 += u * w
                b1 += v * w
                ab0 += a * u * w
                ab1 += a * v * w
                s0 += a * u
                s1 += a * v
        else:
            for x in range(n):
                a = np.float64(row[x])
                s0 += a * np.float64(t0[x])
                s1 += a * np.float64(t1[x])
    out[0, 0] = b0
    out[0, 1] = ab0
    out[0, 2] = s0
    out[1, 0] = b1
    out[1, 1] = ab1
    out[1, 2] = s1


@njit(cache=True, fastmath=True, inline="always")
def _window_peak(s_re, s_im, e, phase, t_re, t_im, h, odd, dft, scratch):
    """The circular CCF of a bank image (turned by 180 degrees if ``h``; see
    :class:`Bank`) with a target over the shift window (filled into ``win``) by a
    partial inverse DFT of ``S conj(T)``, rows first; returns its first maximum in scan
    order and the shift ``(bx, by)`` there. ``dft``: the window's DFT factors
    ``(ey_re, ey_im, ex_re, ex_im)`` (:func:`window_dft`); ``scratch``: the arrays
    ``(rr, ri, gr, gi, sr, si, win)`` it works in."""
    ey_re, ey_im, ex_re, ex_im = dft
    rr, ri, gr, gi, sr, si, win = scratch
    n = s_re.shape[0]
    hx = s_re.shape[1]
    nw = ey_re.shape[0]
    ms = nw // 2
    rr[:, :] = 0.0
    ri[:, :] = 0.0
    for ky in range(n):
        if h == 0:
            for kx in range(hx):
                sr[kx] = s_re[ky, kx]
                si[kx] = s_im[ky, kx]
        else:  # conj(F - R(kx) - C(ky) + a00), times a phase for odd n
            col_re = e[2, ky] - e[4, 0]
            col_im = e[3, ky]
            for kx in range(hx):
                sr[kx] = s_re[ky, kx] - e[0, kx] - col_re
                si[kx] = -(s_im[ky, kx] - e[1, kx] - col_im)
            if odd:
                for kx in range(hx):
                    pr = phase[0, ky, kx]
                    pi = phase[1, ky, kx]
                    ar = sr[kx]
                    sr[kx] = ar * pr - si[kx] * pi
                    si[kx] = ar * pi + si[kx] * pr
        for kx in range(hx):  # g = S conj(T)
            ar, ai = sr[kx], si[kx]
            br, bi = t_re[ky, kx], t_im[ky, kx]
            gr[kx] = ar * br + ai * bi
            gi[kx] = ai * br - ar * bi
        for w in range(nw):
            er = ey_re[w, ky]
            ei = ey_im[w, ky]
            for kx in range(hx):
                rr[w, kx] += er * gr[kx] - ei * gi[kx]
                ri[w, kx] += er * gi[kx] + ei * gr[kx]
    best = -np.inf
    bx = 0
    by = 0
    for wy in range(nw):
        for wx in range(nw):
            v = 0.0
            for kx in range(hx):
                v += rr[wy, kx] * ex_re[wx, kx] - ri[wy, kx] * ex_im[wx, kx]
            win[wy, wx] = v
            if v > best:
                best = v
                bx = wx - ms
                by = wy - ms
    return best, bx, by


@njit(cache=True, parallel=True, fastmath=True)
def _search_block(
    bank_re,
    bank_im,
    bank,
    sums,
    edges,
    phase,
    masked,
    tgt_re,
    tgt_im,
    tgt,
    tgt_turned,
    ang,
    p_list,
    c_list,
    xs,
    ey_re,
    ey_im,
    ex_re,
    ex_im,
    px_out,
    py_out,
    stats,
    fit,
):
    """Translations and candidate sums for the pairs ``(p_list[i], c_list[i])``.

    ``c_list`` indexes the references of this chunk's bank and ``ang[m, i]`` is pair
    ``i``'s footprint angle index against target ``m``. Candidate ``q = 2 m + h`` is
    bank image ``b = c xs + ang[m, i]``, turned by a further 180 degrees if ``h = 1``;
    the turned image's transform is formed here from the first's (see
    :func:`_bank`, ``edges``). Its circular CCF with target ``m`` is evaluated only on
    the ``(2 ms + 1)^2`` window by a partial inverse DFT (rows first) and the first
    maximum in scan order kept.
    ``stats[..., 0:5]``: the sums (a, a^2, ab, and a, a^2 over its column 0) of the
    candidate shifted by minus the peak (zero fill) against the target;
    ``stats[..., 5:7]``: the peak's sub-pixel offset (x, y) from a parabola through
    its neighbours; with ``fit``, ``stats[..., 7:12]``: the count and sums (a, b,
    a^2, ab) over the pixels where ``a >= FLT_MIN`` (the least-squares fit of
    ``sqeuclidean:normto=1``). Transforms come as separate real and imaginary float32
    planes so that the compiled loops vectorise.
    """
    nm = tgt.shape[0]
    n = bank.shape[-1]
    nb = bank.shape[0]
    c2 = 2 * (n // 2)
    odd = n % 2 == 1
    hx = bank_re.shape[-1]
    nw = ey_re.shape[0]
    ms = nw // 2
    dft = (ey_re, ey_im, ex_re, ex_im)
    for i in prange(p_list.shape[0]):
        p = p_list[i]
        c = c_list[i]
        rr = np.empty((nw, hx), dtype=np.float32)
        ri = np.empty((nw, hx), dtype=np.float32)
        gr = np.empty(hx, dtype=np.float32)
        gi = np.empty(hx, dtype=np.float32)
        sr = np.empty(hx, dtype=np.float32)
        si = np.empty(hx, dtype=np.float32)
        win = np.empty((nw, nw))
        scratch = (rr, ri, gr, gi, sr, si, win)
        fsum = np.empty(6)
        prod = np.empty((2, 3))
        for m in range(nm):
            t_re = tgt_re[m, p]
            t_im = tgt_im[m, p]
            t_img = tgt[m, p]
            b = c * xs + ang[m, i]
            if nw == 1:  # no shift searched: the products in real space
                _products(bank[b], t_img, tgt_turned[m, p], fit, prod)
            for h in range(2):
                if nw == 1:
                    fsum[2] = prod[h, 0]
                    fsum[4] = prod[h, 1]
                    fsum[5] = prod[h, 2]
                    if fit:  # the sums of the candidate alone are the bank's
                        fsum[0] = masked[b, h, 0]
                        fsum[1] = masked[b, h, 1]
                        fsum[3] = masked[b, h, 2]
                    best = fsum[5] * (n * n)
                    bx = 0
                    by = 0
                    win[0, 0] = best
                else:
                    best, bx, by = _window_peak(
                        bank_re[b], bank_im[b], edges[b], phase, t_re, t_im, h, odd, dft, scratch
                    )
                q = 2 * m + h
                px_out[i, q] = bx
                py_out[i, q] = by
                stats[i, q, 5] = _parabola(win, by + ms, bx + ms, 0)
                stats[i, q, 6] = _parabola(win, by + ms, bx + ms, 1)
                # candidate = bank image shifted by (-bx, -by) with zero fill; its sums
                # from the bank image's row/column sums less the rows and columns the
                # shift pushes out, and its product with the target from the circular
                # CCF at the peak less the wrapped-around strips
                sx, sy = -bx, -by
                img = bank[b]
                hb = h * nb + b  # line sums of the turned images follow the first
                r_lo, r_hi = (n - sy, n) if sy > 0 else (0, -sy)
                c_lo, c_hi = (n - sx, n) if sx > 0 else (0, -sx)
                s_a = sums[hb, 0, 0, n]
                s_aa = sums[hb, 0, 1, n]
                for r in range(r_lo, r_hi):
                    s_a -= sums[hb, 0, 0, r]
                    s_aa -= sums[hb, 0, 1, r]
                for cc in range(c_lo, c_hi):
                    s_a -= sums[hb, 1, 0, cc]
                    s_aa -= sums[hb, 1, 1, cc]
                    for r in range(r_lo, r_hi):
                        a = _pixel(img, r, cc, h, c2)
                        s_a += a
                        s_aa += a * a
                wrapped = 0.0
                for zy in range(n):
                    wy = zy + by
                    if wy < 0 or wy >= n:
                        wy %= n
                        for zx in range(n):
                            wrapped += _pixel(img, wy, (zx + bx) % n, h, c2) * t_img[zy, zx]
                    else:
                        for zx in range(0, max(0, -bx)):
                            wrapped += _pixel(img, wy, zx + bx + n, h, c2) * t_img[zy, zx]
                        for zx in range(min(n, n - bx), n):
                            wrapped += _pixel(img, wy, zx + bx - n, h, c2) * t_img[zy, zx]
                s_ab = best / (n * n) - wrapped
                if fit:
                    if nw > 1:
                        _fit_sums(img, t_img, sx, sy, h, c2, fsum)
                    stats[i, q, 7:12] = fsum[:5]
                else:
                    stats[i, q, 7:12] = 0.0
                c0 = 0.0
                c00 = 0.0
                if sx <= 0:  # column 0 of the shifted image (dropped by a mirror)
                    c0 = sums[hb, 1, 0, -sx]
                    c00 = sums[hb, 1, 1, -sx]
                    for r in range(r_lo, r_hi):
                        a = _pixel(img, r, -sx, h, c2)
                        c0 -= a
                        c00 -= a * a
                stats[i, q, 0] = s_a
                stats[i, q, 1] = s_aa
                stats[i, q, 2] = s_ab
                stats[i, q, 3] = c0
                stats[i, q, 4] = c00


@njit(cache=True, parallel=True)
def _image_sums(images):
    """Float64 sums of the values and of their squares of each row of ``images``."""
    k = images.shape[0]
    total = np.empty(k)
    sq = np.empty(k)
    for i in prange(k):
        a = 0.0
        b = 0.0
        for j in range(images.shape[1]):
            v = np.float64(images[i, j])
            a += v
            b += v * v
        total[i] = a
        sq[i] = b
    return total, sq


def window_dft(n: int, maxshift: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors of the inverse DFT restricted to shifts ``-ms..ms``: rows ``(2ms+1, n)``
    over ky (FFT order) and columns ``(2ms+1, n//2+1)`` over kx with the half-plane
    weights (1 on kx = 0 and, for even n, on the Nyquist column n/2; else 2)."""
    d = np.arange(-maxshift, maxshift + 1)
    ky = np.arange(n)
    kx = np.arange(n // 2 + 1)
    ey = np.exp(2j * np.pi * np.outer(d, ky) / n)
    w = np.where((kx == 0) | ((n % 2 == 0) & (kx == n // 2)), 1.0, 2.0)  # odd n: no Nyquist
    ex = np.exp(2j * np.pi * np.outer(d, kx) / n) * w
    return ey.astype(np.complex64), ex.astype(np.complex64)


def fused_scores(cmp, a_sum, a_sq, b_sum, b_sq, ab, npix: int, fit=None) -> np.ndarray:
    """``cmp(a, b)`` for ccc/dot/sqeuclidean from pixel sums over the whole box.

    ``fit`` (``sqeuclidean:normto=1``): ``(..., 5)`` count and sums (a, b, a^2, ab) over
    the pixels with ``a >= FLT_MIN``, where ``b = A + B a`` is fitted.
    """
    p = cmp.params
    sign = -1.0 if p.get("negative", True) else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        if cmp.name == "ccc":
            ma, mb = a_sum / npix, b_sum / npix
            c = (ab / npix - ma * mb) / np.sqrt((a_sq / npix - ma * ma) * (b_sq / npix - mb * mb))
            return sign * np.where(np.isfinite(c), c, -2.0)
        if cmp.name == "dot":
            v = ab / np.sqrt(a_sq * b_sq) if p.get("normalize") else ab / npix
            return sign * np.where(np.isfinite(v), v, 0.0)
        if fit is not None and p.get("normto"):
            f_n, f_a, f_b, f_aa, f_ab = (fit[..., i] for i in range(5))
            ma, mb = f_a / f_n, f_b / f_n
            slope = (f_ab - f_n * ma * mb) / (f_aa - f_n * ma * ma)
            icept = mb - slope * ma
            ok = np.isfinite(slope) & (slope != 0) & (1.0 / slope > 0)
            slope, icept = np.where(ok, slope, 1.0), np.where(ok, icept, 0.0)
            ab = (ab - icept * a_sum) / slope
            b_sq = (b_sq - 2 * icept * b_sum + npix * icept * icept) / (slope * slope)
        v = (a_sq - 2 * ab + b_sq) / npix
        return np.where(np.isfinite(v), v, np.finfo(np.float32).max)


def align_all(refs: np.ndarray, particles: np.ndarray, **kw) -> PairAlignment:
    """:func:`align_pairs` for every (particle, reference) pair; ``(Np, Nc)`` arrays."""
    n_p, nc = len(particles), len(refs)
    p_idx, c_idx = (a.ravel() for a in np.indices((n_p, nc)))
    flat = align_pairs(refs, particles, p_idx, c_idx, **kw)
    return PairAlignment(
        *(
            None if v is None else v.reshape(n_p, nc)
            for v in (flat.alpha, flat.tx, flat.ty, flat.mirror, flat.score, flat.final)
        )
    )


def align_pairs(
    refs: np.ndarray,
    particles: np.ndarray,
    p_idx: np.ndarray,
    c_idx: np.ndarray,
    *,
    cmp,
    final=None,
    maxshift: int | None = None,
    flip: bool = True,
    subpixel: bool = False,
    ctx: dict | None = None,
    ref_chunk: int = 64,
    batch: int | None = None,
    ref_spectra: np.ndarray | None = None,
    bank_cache: dict | None = None,
    targets: dict | None = None,
) -> PairAlignment:
    """``rotate_translate[_flip]`` of reference ``c_idx[i]`` onto particle ``p_idx[i]``.

    ``refs`` ``(Nc, n, n)`` are the moving images, ``particles`` ``(Np, n, n)`` the
    targets; ``cmp`` chooses among candidates. ``final`` (optional comparator) scores
    each chosen alignment as e2simmx does, ``final(particle, aligned reference)``,
    into ``PairAlignment.final``. ``ctx``: comparator context; per-particle arrays
    (``snr``) are indexed by particle. ``subpixel``: report the translation at the
    parabola-interpolated CCF peak (candidates are still chosen and scored at the
    integer peak). ``bank_cache`` (a dict or an open :class:`BankCache`, kept by the
    caller across calls with the same ``refs`` and ``ref_chunk``) keeps the rotated
    references; ``targets`` (a dict kept by the caller across calls with the same
    ``particles``, ``flip`` and ``maxshift``) keeps what is computed from the particles.
    ``batch``: pairs whose images are materialised at a time for a comparator scored
    on images (default: :data:`IMAGE_BYTES` of them). Returns one value per pair.
    """
    refs = np.ascontiguousarray(refs, np.float32)
    particles = np.ascontiguousarray(particles, np.float32)
    nc, n = len(refs), refs.shape[-1]
    batch = batch or max(16, IMAGE_BYTES // (4 * n * n))
    n_p = len(particles)
    p_idx = np.asarray(p_idx, np.int64)
    c_idx = np.asarray(c_idx, np.int64)
    npair = len(p_idx)
    ms = default_maxshift(n, maxshift)
    xs = polar_size(n)[0]
    ctx = ctx or {}
    if ref_spectra is None:
        ref_spectra = spectra(footprints(refs))
    fourier = ms > 0  # without a shift search the kernel works in real space only
    tg = {} if targets is None else targets
    if not tg:
        tg.update(_prepare_targets(particles, flip, fourier))
    tgt, nm = tg["images"], len(tg["images"])
    if npair * 4 < n_p * nc:  # few pairs: footprint angles of those pairs only
        if "laid_out" not in tg:
            tg["laid_out"] = [pair_layout(ts) for ts in tg["spectra"]]
        mv = pair_layout(ref_spectra)
        j_pairs = np.stack(
            [pair_rotations(mv, ts, c_idx, p_idx, xs, laid_out=True) for ts in tg["laid_out"]]
        )
    else:
        j0 = np.stack([best_rotations(ref_spectra, ts, xs) for ts in tg["spectra"]])
        j_pairs = j0[:, p_idx, c_idx]
    tgt_re, tgt_im, tgt_turned = tg["re"], tg["im"], tg["turned"]
    t_sum, t_sq = tg["sum"], tg["sq"]
    ey, ex = window_dft(n, ms)
    planes = [
        np.ascontiguousarray(a, dtype=np.float32) for a in (ey.real, ey.imag, ex.real, ex.imag)
    ]
    out = PairAlignment(
        np.zeros(npair),
        np.zeros(npair),
        np.zeros(npair),
        np.zeros(npair, bool),
        np.zeros(npair),
        None if final is None else np.zeros(npair),
    )
    m_of_q = np.repeat(np.arange(nm), 2)
    order = np.argsort(c_idx, kind="stable")
    if bank_cache is None:  # bank chunks within the memory budget
        ref_chunk = max(1, min(ref_chunk, BANK_BYTES // (8 * xs * n * n)))
    # buffers reused from chunk to chunk (fresh memory is slow to fault in)
    counts = np.bincount(c_idx // ref_chunk, minlength=-(-nc // ref_chunk))
    kmax = int(counts.max()) if counts.size else 0
    px_buf = np.empty((kmax, 2 * nm), np.int64)
    py_buf = np.empty((kmax, 2 * nm), np.int64)
    st_buf = np.empty((kmax, 2 * nm, 12))
    if bank_cache is None:
        pooled = not _pool().get("busy", False)
        bank_buf = _BankBuffers(min(ref_chunk, nc), xs, n, pooled, fourier)
    else:
        bank_buf = None
    for c0 in range(0, nc, ref_chunk):
        c1 = min(c0 + ref_chunk, nc)
        lo, hi = np.searchsorted(c_idx[order], [c0, c1])
        if hi == lo:
            continue
        sel = order[lo:hi]
        ps, cl = p_idx[sel], c_idx[sel] - c0
        key = (c0, fourier)
        if bank_cache is not None and key in bank_cache:
            used, bank = bank_cache[key]
        else:
            used = np.arange(c1 - c0) if bank_cache is not None else np.unique(cl)
            if bank_buf is None:  # kept in bank_cache: its first bank may use the pool
                lent = getattr(bank_cache, "lease", False) and not bank_cache
                buf = _BankBuffers(c1 - c0, xs, n, lent, fourier)
            bank = _bank(refs, used + c0, xs, bank_buf or buf, fourier=fourier)
            if bank_cache is not None:
                bank_cache[key] = used, bank
        slot = np.searchsorted(used, cl)  # position of each pair's reference in the bank
        ang = np.ascontiguousarray(j_pairs[:, sel])
        k = len(sel)
        px, py, st = px_buf[:k], py_buf[:k], st_buf[:k]
        _search_block(
            bank.re,
            bank.im,
            bank.images,
            bank.sums,
            bank.edges,
            bank.phase,
            bank.masked,
            tgt_re,
            tgt_im,
            tgt,
            tgt_turned,
            ang,
            ps,
            slot,
            xs,
            *planes,
            px,
            py,
            st,
            _needs_fit(cmp),
        )
        # candidate q = 2 m + h is scored against target m
        if fused_ok(cmp):
            score = fused_scores(
                cmp,
                st[..., 0],
                st[..., 1],
                t_sum[m_of_q][:, ps].T,
                t_sq[m_of_q][:, ps].T,
                st[..., 2],
                n * n,
                st[..., 7:12],
            )
        else:
            score = _generic_scores(bank.images, tgt, ang, ps, slot, xs, px, py, cmp, ctx, batch)
        # within a mirror state the 180-degree candidate wins ties; then the
        # unmirrored one wins only if strictly better
        use180 = score[:, 1::2] <= score[:, 0::2]
        s_m = np.where(use180, score[:, 1::2], score[:, 0::2])
        mirror = ~(s_m[:, 0] < s_m[:, 1]) if nm == 2 else np.zeros(k, bool)
        m = mirror.astype(np.int64)
        h = use180[np.arange(k), m].astype(np.int64)
        q = 2 * m + h
        bx, by = px[np.arange(k), q], py[np.arange(k), q]
        j = ang[m, np.arange(k)]
        out.alpha[sel] = np.mod((j + h * xs) * (180.0 / xs), 360.0)
        if subpixel:  # reported shift from the interpolated peak; scores stay integer
            out.tx[sel] = -(bx + st[np.arange(k), q, 5])
            out.ty[sel] = -(by + st[np.arange(k), q, 6])
        else:
            out.tx[sel], out.ty[sel] = -bx, -by
        out.mirror[sel] = mirror
        out.score[sel] = s_m[np.arange(k), m]
        if final is None:
            continue
        bank_idx = slot * xs + j
        if fused_ok(final) and not _needs_fit(final):  # final(particle, S or mirror(S))
            chosen = st[np.arange(k), q]
            drop = mirror & (n % 2 == 0)  # mirroring an even box loses column 0
            b_sum = np.where(drop, chosen[:, 0] - chosen[:, 3], chosen[:, 0])
            b_sq = np.where(drop, chosen[:, 1] - chosen[:, 4], chosen[:, 1])
            out.final[sel] = fused_scores(
                final, t_sum[0][ps], t_sq[0][ps], b_sum, b_sq, chosen[:, 2], n * n
            )
        else:
            out.final[sel] = _generic_final(
                bank.images, bank_idx, h, bx, by, mirror, particles, ps, final, ctx, batch
            )
    return out


def _prepare_targets(particles: np.ndarray, flip: bool, fourier: bool) -> dict:
    """The particles (and their mirrors): images, footprint spectra, transforms (real
    and imaginary planes; placeholders without a shift search), sums of values and of
    squares, and (without a shift search) the images turned by 180 degrees."""
    tgt = np.stack([particles, mirror_x(particles)] if flip else [particles])
    nm, n_p = tgt.shape[:2]
    if fourier:
        ft = scipy.fft.rfft2(tgt, workers=WORKERS)
        t_re = np.ascontiguousarray(ft.real, dtype=np.float32)
        t_im = np.ascontiguousarray(ft.imag, dtype=np.float32)
        del ft
        turned = np.zeros((1, 1, 1, 1), np.float32)
    else:
        t_re = t_im = np.zeros((nm, n_p, 1, 1), np.float32)
        turned = rotate180(tgt)
    t_sum, t_sq = _image_sums(tgt.reshape(nm * n_p, -1))
    return {
        "images": tgt,
        "spectra": [spectra(footprints(t)) for t in tgt],
        "re": t_re,
        "im": t_im,
        "turned": turned,
        "sum": t_sum.reshape(nm, n_p),
        "sq": t_sq.reshape(nm, n_p),
    }


_SCRATCH = threading.local()


def _pool() -> dict:
    return _SCRATCH.__dict__.setdefault("pool", {})


def _scratch(name: str, size: int) -> np.ndarray:
    """A float32 array of ``size`` from this thread's pool: the memory of the last
    request under ``name`` when large enough (freshly allocated memory is slow to
    fault in, and the bank is rebuilt on every call)."""
    pool = _pool()
    buf = pool.get(name)
    if buf is None or buf.size < size:
        pool[name] = buf = None  # let the old one go first
        pool[name] = buf = np.empty(size, np.float32)
    return buf[:size]


class BankCache(dict):
    """Banks kept by a caller across :func:`align_pairs` calls with the same ``refs``
    and ``ref_chunk``. Used as a context manager, it lends its first bank this
    thread's pooled bank memory until it closes (meanwhile other calls in the thread
    use fresh memory), and empties itself on closing."""

    lease = False

    def __enter__(self) -> BankCache:
        self.lease = not _pool().get("busy", False)
        _pool()["busy"] = True
        return self

    def __exit__(self, *exc) -> None:
        self.clear()
        if self.lease:
            _pool()["busy"] = False
            self.lease = False


@dataclass
class Bank:
    """References rotated to the ``xs`` footprint angles: image ``slot xs + j``.

    ``images`` ``(nb, n, n)`` and the real and imaginary planes ``re``, ``im`` of their
    ``rfft2``; ``sums`` ``(2 nb, 2, 2, n + 1)`` float64 line sums (:func:`_line_sums`)
    of the images and then of the images turned by 180 degrees; ``edges``
    ``(nb, 5, n)``: the transform of the turned image is
    ``conj(F - R(kx) - C(ky) + a00)`` (even ``n``: row 0 and column 0 have no source
    and drop out; ``R``, ``C`` the 1D transforms of that row and column, rows 0-1 and
    2-3 of ``edges``, ``a00`` at ``[4, 0]``) or ``conj(F) exp(2 pi i (ky + kx) / n)``
    (odd ``n``: a pixel permutation; ``edges`` is 0, ``phase`` ``(2, n, n // 2 + 1)``
    holds the real and imaginary parts of the factor). ``masked`` ``(nb, 2, 3)``
    (filled only for a search without shifts, else ``(1, 2, 3)`` zeros): the count,
    sum and sum of squares of the pixels ``>= FLT_MIN`` of each image and of it turned.
    """

    images: np.ndarray
    re: np.ndarray
    im: np.ndarray
    sums: np.ndarray
    edges: np.ndarray
    phase: np.ndarray
    masked: np.ndarray


class _BankBuffers:
    """Memory for the bank of up to ``m`` references, reused from chunk to chunk and
    (``pooled``) from call to call in the same thread; without ``fourier`` (a search
    without shifts) the transforms and edges are one placeholder image."""

    def __init__(self, m: int, xs: int, n: int, pooled: bool = False, fourier: bool = True) -> None:
        size = m * xs * n
        get = _scratch if pooled else (lambda _name, k: np.empty(k, np.float32))
        self.images = get("bank", size * n)
        self.sums = get("bank_sums", 2 * (2 * m * xs * 4 * (n + 1)))  # float64, viewed
        if fourier:
            self.re = get("bank_re", size * (n // 2 + 1))
            self.im = get("bank_im", size * (n // 2 + 1))
            self.edges = get("bank_edges", 5 * size)
        else:
            self.re = self.im = np.zeros(n * (n // 2 + 1), np.float32)
            self.edges = np.zeros(5 * n, np.float32)

    def bank(self, nb: int, n: int) -> Bank:
        """Views for a bank of ``nb`` images."""
        hx = n // 2 + 1
        nf = min(nb, len(self.re) // (n * hx))  # 1 for the placeholder
        return Bank(
            self.images[: nb * n * n].reshape(nb, n, n),
            self.re[: nf * n * hx].reshape(nf, n, hx),
            self.im[: nf * n * hx].reshape(nf, n, hx),
            self.sums.view(np.float64)[: 2 * nb * 4 * (n + 1)].reshape(2 * nb, 2, 2, n + 1),
            self.edges[: nf * 5 * n].reshape(nf, 5, n),
            _turn_phase(n),
            np.zeros((1, 2, 3)),
        )


def _turn_phase(n: int) -> np.ndarray:
    """``exp(2 pi i (ky + kx) / n)`` on the rfft2 grid as real and imaginary planes:
    the factor of an odd image's transform under the 180-degree turn."""
    ky = np.arange(n)[:, None]
    kx = np.arange(n // 2 + 1)[None, :]
    ph = np.exp(2j * np.pi * (ky + kx) / n)
    return np.ascontiguousarray(np.stack([ph.real, ph.imag]), dtype=np.float32)


def _bank(
    refs: np.ndarray,
    which: np.ndarray,
    xs: int,
    buf: _BankBuffers | None = None,
    *,
    fourier: bool = True,
) -> Bank:
    """References ``which`` at the ``xs`` footprint angles (bilinear), their line sums
    and (``fourier``) transforms and turned-image edges (:class:`Bank`)."""
    n = refs.shape[-1]
    nb = len(which) * xs
    bank = (buf or _BankBuffers(len(which), xs, n, fourier=fourier)).bank(nb, n)
    # angles j 180 / xs: bilinear below 90 degrees, exact quarter turns of those above
    # (xs is even), as the per-pair aligner (rotate_with_quarter_turns)
    half = xs // 2
    angles = np.arange(xs) * (180.0 / xs)
    per_ref = bank.images.reshape(len(which), xs, n, n)
    chunk = refs[which]
    rotate_stack(chunk, angles[:half], per_ref[:, :half])
    rotate_quarter(per_ref[:, :half], out=per_ref[:, half:])
    if n % 2 == 0:  # row 0 of a quarter turn has no source: resampled
        rotate_stack(chunk, angles[half:], per_ref[:, half:], rows=1)
    _line_sums(bank.images, bank.sums[:nb])
    _turned_line_sums(bank.images, bank.sums[:nb], bank.sums[nb:])
    if not fourier:
        bank.masked = _masked_sums(bank.images)
        return bank
    hx = n // 2 + 1
    # transforms: FFTs of the bilinear half; the quarter-turned half, the edges and the
    # copy into planes in one compiled pass
    re4, im4 = (a.reshape(len(which), xs, n, hx) for a in (bank.re, bank.im))
    edges = bank.edges.reshape(len(which), xs, 5, n)
    ph = np.exp(2j * np.pi * np.arange(n) / n) if n % 2 else np.ones(n)  # see the kernel
    ph = np.ascontiguousarray(np.stack([ph.real, ph.imag]), dtype=np.float32)
    step = max(1, 512 // half)  # batches small enough to reuse heap memory
    for r0 in range(0, len(which), step):
        sl = slice(r0, r0 + step)
        ft = scipy.fft.rfft2(per_ref[sl, :half], workers=WORKERS)
        row = scipy.fft.rfft(per_ref[sl, :, 0, :], workers=WORKERS)
        col = scipy.fft.fft(per_ref[sl, :, :, 0], workers=WORKERS)
        _bank_transforms(per_ref[sl], ft, row, col, re4[sl], im4[sl], edges[sl], ph)
    return bank


@njit(cache=True, parallel=True, fastmath=True)
def _bank_transforms(images, ft, row, col, re, im, edges, ph):
    """The bank's transforms and edges for references ``images`` ``(refs, xs, n, n)``
    from ``ft``, the ``rfft2`` of their first ``half = xs // 2`` angles, and ``row``,
    ``col``, the transforms of row 0 (``rfft``) and column 0 (``fft``) of all angles.

    ``re``, ``im`` ``(refs, xs, n, n // 2 + 1)``: angles below ``half`` copied from
    ``ft``; angle ``half + j`` is the quarter turn of angle ``j``
    (``J[y, x] = I[x, 2 (n // 2) - y]``): ``FJ(ky, kx) = FI(kx, -ky)`` times ``ph[ky]``
    (``exp(2 pi i ky / n)`` for odd ``n``; conjugate symmetry supplies ``-ky`` beyond
    the stored half), plus, for even ``n``, the transform of the change to row 0 (the
    turn would bring column 0 of ``I`` there; the bank resamples it), ``row(J) -
    col(I)``. ``edges`` ``(refs, xs, 5, n)``: for even ``n`` ``row``, ``col`` and pixel
    ``(0, 0)`` of every image (:class:`Bank`), else 0.
    """
    nr, xs, n, _ = images.shape
    hx = n // 2 + 1
    half = xs // 2
    even = n % 2 == 0
    for t in prange(nr * half):
        r = t // half
        j = t % half
        f = ft[r, j]
        o_re = re[r, j]
        o_im = im[r, j]
        for ky in range(n):
            for kx in range(hx):
                o_re[ky, kx] = f[ky, kx].real
                o_im[ky, kx] = f[ky, kx].imag
        t_re = re[r, half + j]
        t_im = im[r, half + j]
        rj = row[r, half + j]
        ci = col[r, j]
        for ky in range(n):
            b = (n - ky) % n
            pr = ph[0, ky]
            pi = ph[1, ky]
            for kx in range(hx):
                if b < hx:  # FI(kx, b) is stored
                    vr = f[kx, b].real
                    vi = f[kx, b].imag
                else:  # FI(kx, b) = conj(FI(-kx, ky))
                    a = (n - kx) % n
                    vr = f[a, ky].real
                    vi = -f[a, ky].imag
                wr = vr * pr - vi * pi
                wi = vr * pi + vi * pr
                if even:
                    wr += rj[kx].real - ci[kx].real
                    wi += rj[kx].imag - ci[kx].imag
                t_re[ky, kx] = wr
                t_im[ky, kx] = wi
        for q in range(2):
            i = j + q * half
            e = edges[r, i]
            e[:, :] = 0.0
            if even:
                for k in range(hx):
                    e[0, k] = row[r, i, k].real
                    e[1, k] = row[r, i, k].imag
                for k in range(n):
                    e[2, k] = col[r, i, k].real
                    e[3, k] = col[r, i, k].imag
                e[4, 0] = images[r, i, 0, 0]


@njit(cache=True, parallel=True, fastmath=True)
def _line_sums(images: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` ``(k, 2, 2, n + 1)`` float64 with the line sums of ``images``:
    [rows | columns][values | squares][index], the last index holding the total."""
    k, n = images.shape[0], images.shape[-1]
    for i in prange(k):
        cs = np.zeros(n)
        cq = np.zeros(n)
        ts = 0.0
        tq = 0.0
        for y in range(n):
            rs = 0.0
            rq = 0.0
            for x in range(n):
                a = np.float64(images[i, y, x])
                rs += a
                rq += a * a
                cs[x] += a
                cq[x] += a * a
            out[i, 0, 0, y] = rs
            out[i, 0, 1, y] = rq
            ts += rs
            tq += rq
        for x in range(n):
            out[i, 1, 0, x] = cs[x]
            out[i, 1, 1, x] = cq[x]
        out[i, 0, 0, n] = ts
        out[i, 1, 0, n] = ts
        out[i, 0, 1, n] = tq
        out[i, 1, 1, n] = tq
    return out


@njit(cache=True, parallel=True)
def _masked_sums(images):
    """``(k, 2, 3)``: count, sum and sum of squares of the pixels ``>= FLT_MIN`` of each
    image and of it turned by 180 degrees (for even ``n`` without the source's row and
    column 0, which the turn leaves without a place)."""
    k, n = images.shape[0], images.shape[-1]
    out = np.zeros((k, 2, 3))
    edge = 1 if n % 2 == 0 else 0
    for i in prange(k):
        for y in range(n):
            for x in range(n):
                a = np.float64(images[i, y, x])
                if a >= FLT_MIN:
                    out[i, 0, 0] += 1.0
                    out[i, 0, 1] += a
                    out[i, 0, 2] += a * a
                    if y >= edge and x >= edge:
                        out[i, 1, 0] += 1.0
                        out[i, 1, 1] += a
                        out[i, 1, 2] += a * a
    return out


@njit(cache=True, parallel=True)
def _turned_line_sums(images: np.ndarray, base: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Line sums (as :func:`_line_sums`) of the images turned by 180 degrees, from
    their own: row ``y`` of the turned image is row ``2 (n // 2) - y`` reversed; for
    even ``n`` row and column 0 have no source and the source's column and row 0 drop
    out of the others."""
    k, n = images.shape[0], images.shape[-1]
    c2 = 2 * (n // 2)
    for i in prange(k):
        img = images[i]
        for p in range(2):
            total = base[i, 0, p, n]
            for y in range(n):  # rows (and, by symmetry of the formula, columns)
                src = c2 - y
                if src >= n:
                    out[i, 0, p, y] = 0.0
                    out[i, 1, p, y] = 0.0
                    continue
                row = base[i, 0, p, src]
                col = base[i, 1, p, src]
                if c2 == n:  # even: the source's column 0 (row 0) has no place
                    a = np.float64(img[src, 0])
                    b = np.float64(img[0, src])
                    row -= a if p == 0 else a * a
                    col -= b if p == 0 else b * b
                out[i, 0, p, y] = row
                out[i, 1, p, y] = col
            if c2 == n:
                a = np.float64(img[0, 0])
                total -= base[i, 0, p, 0] + base[i, 1, p, 0] - (a if p == 0 else a * a)
            out[i, 0, p, n] = total
            out[i, 1, p, n] = total
    return out


@njit(cache=True, parallel=True)
def _aligned_pairs(bank, idx, turned, dx, dy, mirror, others, o_i, zeromask, out, out_other):
    """``out[i]``: bank image ``idx[i]``, turned by 180 degrees about the centre if
    ``turned[i]`` (as :func:`rotate180`), shifted by whole pixels ``(dx, dy)`` with zero
    fill (as :func:`shift_integer`), then mirrored in x if ``mirror[i]`` (as
    :func:`mirror_x`): the candidate images, materialised in one pass, each beside the
    image it is compared with, ``out_other[i] = others[o_i[i]]``. ``zeromask``: both
    zeroed wherever either is 0."""
    n = bank.shape[-1]
    c2 = 2 * (n // 2)
    for i in prange(idx.shape[0]):
        img = bank[idx[i]]
        other = others[o_i[i]]
        o = out[i]
        g = out_other[i]
        mi = mirror[i] != 0
        tu = turned[i] != 0
        ddx = dx[i]
        ddy = dy[i]
        # columns with a source: xm (x after the mirror) in [lo, hi); the source
        # column is base + step * x
        lo = max(0, ddx + (c2 - n + 1 if tu else 0))
        hi = min(n, n + ddx)
        if mi:
            lo = max(lo, c2 - n + 1)
            x0, x1 = c2 - hi + 1, c2 - lo + 1
        else:
            x0, x1 = lo, hi
        x1 = max(x0, x1)
        step = -1 if mi != tu else 1
        base = (c2 if mi != tu else 0) + (ddx if tu else -ddx)
        for y in range(n):  # 2D indexing: views of rows would cost more than the copy
            sy = y - ddy
            ty = c2 - sy if tu else sy
            a, b = (x0, x1) if 0 <= sy < n and ty < n else (n, n)
            for x in range(a):
                o[y, x] = 0.0
            # a constant step and unsigned source indices (no negative-index
            # wrap-around to handle), so that the copies vectorise
            if step == 1:
                for x in range(a, b):
                    o[y, x] = img[ty, uint64(base + x)]
            else:
                for x in range(a, b):
                    o[y, x] = img[ty, uint64(base - x)]
            for x in range(b, n):
                o[y, x] = 0.0
            if zeromask:
                for x in range(n):
                    v = o[y, x]
                    u = other[y, x]
                    keep = (v != 0) & (u != 0)
                    o[y, x] = v if keep else 0.0
                    g[y, x] = u if keep else 0.0
            else:
                for x in range(n):
                    g[y, x] = other[y, x]


def _materialised(bank, idx, turned, dx, dy, mirror, others, o_i, zeromask=False):
    """The candidate images of :func:`_aligned_pairs` and the images they are compared
    with, ``others[o_i]`` (float32 scratch memory, valid until the next call)."""
    k = len(idx)
    n = bank.shape[-1]
    out = _scratch("aligned", k * n * n).reshape(k, n, n)
    out_other = _scratch("other", k * n * n).reshape(k, n, n)
    args = (np.asarray(a, np.int64) for a in (idx, turned, dx, dy, mirror))
    others = np.ascontiguousarray(others, np.float32)
    _aligned_pairs(bank, *args, others, np.asarray(o_i, np.int64), zeromask, out, out_other)
    return out, out_other


def _generic_final(bank, bank_idx, h, bx, by, mirror, particles, p_i, final, ctx, batch):
    """``final(particle, aligned reference)`` on materialised images."""
    res = np.empty(len(p_i))
    zeromask, final = premasked(final)
    for s0 in range(0, len(p_i), batch):
        sl = slice(s0, s0 + batch)
        img, ptcl = _materialised(
            bank, bank_idx[sl], h[sl], -bx[sl], -by[sl], mirror[sl], particles, p_i[sl], zeromask
        )
        sub = pair_context(ctx, p_i[sl])
        res[sl] = np.asarray(final(ptcl, img, **sub), np.float64)
    return res


def _generic_scores(bank, tgt, ang, p_i, slot, xs, px, py, cmp, ctx, batch):
    """Candidate scores with any comparator, on materialised candidate images."""
    score = np.empty(px.shape)
    i_i, q_i = (a.ravel() for a in np.indices(px.shape))
    m_i, h_i = q_i // 2, q_i % 2
    b_i = slot[i_i] * xs + ang[m_i, i_i]
    pp = p_i[i_i]
    t_i = m_i * tgt.shape[1] + pp  # target m of particle pp
    targets = tgt.reshape(-1, *tgt.shape[2:])
    zeromask, cmp = premasked(cmp)
    no = np.zeros(len(i_i), np.int64)
    for s0 in range(0, len(i_i), batch):
        sl = slice(s0, s0 + batch)
        cand, t = _materialised(
            bank,
            b_i[sl],
            h_i[sl],
            -px.ravel()[sl],
            -py.ravel()[sl],
            no[sl],
            targets,
            t_i[sl],
            zeromask,
        )
        sub = pair_context(ctx, pp[sl])
        score.reshape(-1)[sl] = np.asarray(cmp(cand, t, **sub), np.float64)
    return score

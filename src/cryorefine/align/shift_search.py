"""The windowed shift search: each candidate's cross-correlation with its target,
evaluated only over the ``maxshift`` window, and the candidate's pixel sums there.

The circular cross-correlation of a bank image with a target is needed only inside
the ``(2 maxshift + 1)^2`` window, so a compiled kernel evaluates ``bank * conj(target)``
by a partial inverse DFT on that window (rows, then columns) and takes the first
maximum in EMAN2's scan order. Without a shift search (``maxshift=0``) it works in
real space only. For each candidate it also forms the sums that the fused comparators
(:mod:`cryorefine.align.candidates`) score from, corrected for the pixels that the
shift pushes out of the box (zero fill).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
from numba import njit, prange

from cryorefine.align.compare import FLT_MIN


class Stat(IntEnum):
    """Columns of :func:`search_block`'s per-candidate statistics, ``stats[..., Stat.X]``.

    ``a`` is the candidate (the bank image shifted by minus the CCF peak, zero fill) and
    ``b`` its target; sums are over the box unless said otherwise.
    """

    SUM = 0  #: sum of a
    SQ = 1  #: sum of a^2
    PRODUCT = 2  #: sum of ab
    COL0_SUM = 3  #: sum of a over its column 0 (which mirroring an even box drops)
    COL0_SQ = 4  #: sum of a^2 over its column 0
    SUB_X = 5  #: sub-pixel offset of the CCF peak in x (px), from a parabola
    SUB_Y = 6  #: the same in y
    FIT_N = 7  #: count of the pixels where a >= FLT_MIN (``sqeuclidean:normto=1`` only)
    FIT_A = 8  #: sum of a over those pixels
    FIT_B = 9  #: sum of b over those pixels
    FIT_AA = 10  #: sum of a^2 over those pixels
    FIT_AB = 11  #: sum of ab over those pixels


#: the number of statistics per candidate
N_STATS = len(Stat)
#: the least-squares fit's columns, ``stats[..., FIT]``: count and sums (a, b, a^2, ab)
FIT = slice(Stat.FIT_N, Stat.FIT_AB + 1)
# the columns as plain integers, compile-time constants of the kernel
_SUM, _SQ, _PRODUCT = int(Stat.SUM), int(Stat.SQ), int(Stat.PRODUCT)
_COL0_SUM, _COL0_SQ = int(Stat.COL0_SUM), int(Stat.COL0_SQ)
_SUB_X, _SUB_Y = int(Stat.SUB_X), int(Stat.SUB_Y)
_FIT_START, _FIT_STOP = int(Stat.FIT_N), int(Stat.FIT_AB) + 1


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
def _pixel(img, y, x, h, two_c):
    """Pixel ``(y, x)`` of bank image ``img`` (``h = 0``) or of it turned by 180 degrees
    about the centre (``h = 1``: ``img[two_c - y, two_c - x]``, 0 where that is outside)."""
    if h == 1:
        y = two_c - y
        x = two_c - x
        if y >= img.shape[0] or x >= img.shape[1]:
            return 0.0
    return np.float64(img[y, x])


@njit(cache=True, fastmath=True)
def _fit_sums(img, t_img, sx, sy, h, two_c, out):
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
        y_lo = max(y_lo, two_c + sy - n + 1)
        x_lo = max(x_lo, two_c + sx - n + 1)
    for y in range(y_lo, y_hi):
        t_row = t_img[y]
        if h == 0:
            row = img[y - sy]
            off = sx
        else:  # turned row y - sy is source row two_c - y + sy read backwards
            row = img[two_c - y + sy, ::-1]
            off = sx + two_c - n + 1
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
def search_block(bank_arrays, targets, ang, p_list, c_list, xs, dft, found, fit):
    """Translations and candidate sums for the pairs ``(p_list[i], c_list[i])``.

    ``bank_arrays``: the bank's ``(re, im, images, sums, edges, phase, masked)``
    (:class:`cryorefine.align.bank.Bank`); ``targets``: the particles' (and mirrors')
    ``(re, im, images, turned)``, each indexed ``[m, p]``; ``dft``: the window's DFT
    factors ``(ey_re, ey_im, ex_re, ex_im)`` (:func:`window_dft`); ``found``: the
    outputs ``(px, py, stats)``, one row per pair and one column per candidate.

    ``c_list`` indexes the references of this chunk's bank and ``ang[m, i]`` is pair
    ``i``'s footprint angle index against target ``m``. Candidate ``q = 2 m + h`` is
    bank image ``b = c xs + ang[m, i]``, turned by a further 180 degrees if ``h = 1``;
    the turned image's transform is formed here from the first's (see
    :func:`build_bank`, ``edges``). Its circular CCF with target ``m`` is evaluated only on
    the ``(2 ms + 1)^2`` window by a partial inverse DFT (rows first) and the first
    maximum in scan order kept.
    ``stats`` ``(pairs, candidates, N_STATS)``: the columns :class:`Stat` names (the
    fit's columns are 0 without ``fit``). Transforms come as separate real and imaginary float32
    planes so that the compiled loops vectorise.
    """
    bank_re, bank_im, bank, sums, edges, phase, masked = bank_arrays
    tgt_re, tgt_im, tgt, tgt_turned = targets
    px_out, py_out, stats = found
    nm = tgt.shape[0]
    n = bank.shape[-1]
    nb = bank.shape[0]
    two_c = 2 * (n // 2)
    odd = n % 2 == 1
    hx = bank_re.shape[-1]
    nw = dft[0].shape[0]
    ms = nw // 2
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
                stats[i, q, _SUB_X] = _parabola(win, by + ms, bx + ms, 0)
                stats[i, q, _SUB_Y] = _parabola(win, by + ms, bx + ms, 1)
                # candidate = bank image shifted by (-bx, -by) with zero fill; its sums
                # from the bank image's row/column sums less the rows and columns the
                # shift pushes out, and its product with the target from the circular
                # CCF at the peak less the wrapped-around strips
                sx, sy = -bx, -by
                img = bank[b]
                sums_row = h * nb + b  # line sums of the turned images follow the first
                r_lo, r_hi = (n - sy, n) if sy > 0 else (0, -sy)
                c_lo, c_hi = (n - sx, n) if sx > 0 else (0, -sx)
                s_a = sums[sums_row, 0, 0, n]
                s_aa = sums[sums_row, 0, 1, n]
                for r in range(r_lo, r_hi):
                    s_a -= sums[sums_row, 0, 0, r]
                    s_aa -= sums[sums_row, 0, 1, r]
                for cc in range(c_lo, c_hi):
                    s_a -= sums[sums_row, 1, 0, cc]
                    s_aa -= sums[sums_row, 1, 1, cc]
                    for r in range(r_lo, r_hi):
                        a = _pixel(img, r, cc, h, two_c)
                        s_a += a
                        s_aa += a * a
                wrapped = 0.0
                for zy in range(n):
                    wy = zy + by
                    if wy < 0 or wy >= n:
                        wy %= n
                        for zx in range(n):
                            wrapped += _pixel(img, wy, (zx + bx) % n, h, two_c) * t_img[zy, zx]
                    else:
                        for zx in range(0, max(0, -bx)):
                            wrapped += _pixel(img, wy, zx + bx + n, h, two_c) * t_img[zy, zx]
                        for zx in range(min(n, n - bx), n):
                            wrapped += _pixel(img, wy, zx + bx - n, h, two_c) * t_img[zy, zx]
                s_ab = best / (n * n) - wrapped
                if fit:
                    if nw > 1:
                        _fit_sums(img, t_img, sx, sy, h, two_c, fsum)
                    stats[i, q, _FIT_START:_FIT_STOP] = fsum[:5]
                else:
                    stats[i, q, _FIT_START:_FIT_STOP] = 0.0
                c0 = 0.0
                c00 = 0.0
                if sx <= 0:  # column 0 of the shifted image (dropped by a mirror)
                    c0 = sums[sums_row, 1, 0, -sx]
                    c00 = sums[sums_row, 1, 1, -sx]
                    for r in range(r_lo, r_hi):
                        a = _pixel(img, r, -sx, h, two_c)
                        c0 -= a
                        c00 -= a * a
                stats[i, q, _SUM] = s_a
                stats[i, q, _SQ] = s_aa
                stats[i, q, _PRODUCT] = s_ab
                stats[i, q, _COL0_SUM] = c0
                stats[i, q, _COL0_SQ] = c00


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

"""Scoring the alignment candidates with the aligner's and the final comparator.

``ccc``, ``dot`` and ``sqeuclidean`` (also ``normto=1``) are scored from the pixel
sums the shift search forms (:func:`fused_scores`); any other comparator on the
candidate images, materialised in batches in one compiled pass (turn, shift with zero
fill, mirror) beside the images they are compared with.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, uint64

from cryorefine.align.bank import scratch
from cryorefine.align.compare import pair_context, premasked

FUSED = {"ccc", "dot", "sqeuclidean"}

#: memory for one batch of candidate images materialised for a comparator scored on
#: images (and as much again for the images they are compared with): 1,024 pairs of
#: 64-px images. Large enough that the threads' hand-over between the compiled
#: kernels and the FFTs costs little, small enough to stay in cache.
IMAGE_BYTES = 16 * 2**20


def fused_ok(cmp) -> bool:
    """Whether a comparator modifier can be scored by the fused kernel."""
    name = getattr(cmp, "name", None)
    if name not in FUSED:
        return False
    p = cmp.params
    if p.get("mask") is not None:
        return False
    return not (name == "sqeuclidean" and p.get("zeromask"))


def needs_fit(cmp) -> bool:
    return getattr(cmp, "name", None) == "sqeuclidean" and bool(cmp.params.get("normto"))


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


@njit(cache=True, parallel=True)
def image_sums(images):
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


@njit(cache=True, parallel=True)
def aligned_pairs(bank, idx, turned, dx, dy, mirror, others, o_i, zeromask, out, out_other):
    """``out[i]``: bank image ``idx[i]``, turned by 180 degrees about the centre if
    ``turned[i]`` (as :func:`rotate180`), shifted by whole pixels ``(dx, dy)`` with zero
    fill (as :func:`shift_integer`), then mirrored in x if ``mirror[i]`` (as
    :func:`mirror_x`): the candidate images, materialised in one pass, each beside the
    image it is compared with, ``out_other[i] = others[o_i[i]]``. ``zeromask``: both
    zeroed wherever either is 0."""
    n = bank.shape[-1]
    two_c = 2 * (n // 2)
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
        lo = max(0, ddx + (two_c - n + 1 if tu else 0))
        hi = min(n, n + ddx)
        if mi:
            lo = max(lo, two_c - n + 1)
            x0, x1 = two_c - hi + 1, two_c - lo + 1
        else:
            x0, x1 = lo, hi
        x1 = max(x0, x1)
        step = -1 if mi != tu else 1
        base = (two_c if mi != tu else 0) + (ddx if tu else -ddx)
        for y in range(n):  # 2D indexing: views of rows would cost more than the copy
            sy = y - ddy
            ty = two_c - sy if tu else sy
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


def materialised(bank, idx, turned, dx, dy, mirror, others, o_i, zeromask=False):
    """The candidate images of :func:`aligned_pairs` and the images they are compared
    with, ``others[o_i]`` (float32 scratch memory, valid until the next call)."""
    k = len(idx)
    n = bank.shape[-1]
    out = scratch("aligned", k * n * n).reshape(k, n, n)
    out_other = scratch("other", k * n * n).reshape(k, n, n)
    args = (np.asarray(a, np.int64) for a in (idx, turned, dx, dy, mirror))
    others = np.ascontiguousarray(others, np.float32)
    aligned_pairs(bank, *args, others, np.asarray(o_i, np.int64), zeromask, out, out_other)
    return out, out_other


def generic_final(bank, bank_idx, h, bx, by, mirror, particles, p_i, final, ctx, batch):
    """``final(particle, aligned reference)`` on materialised images."""
    res = np.empty(len(p_i))
    zeromask, final = premasked(final)
    for s0 in range(0, len(p_i), batch):
        sl = slice(s0, s0 + batch)
        img, ptcl = materialised(
            bank, bank_idx[sl], h[sl], -bx[sl], -by[sl], mirror[sl], particles, p_i[sl], zeromask
        )
        sub = pair_context(ctx, p_i[sl])
        res[sl] = np.asarray(final(ptcl, img, **sub), np.float64)
    return res


def generic_scores(bank, tgt, ang, p_i, slot, xs, px, py, cmp, ctx, batch):
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
        cand, t = materialised(
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

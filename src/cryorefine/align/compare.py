"""EMAN2's image comparators, each evaluated on many image pairs at once.

Every comparator returns float64 scores where **smaller is better** (similarity
measures are negated). ``a`` is EMAN2's "this" image and ``b`` "with", both
``(k, n, n)`` (or broadcastable); sums are accumulated in float64. In e2simmx's final
score ``a`` is the particle and ``b`` the aligned projection.

Keyword context every comparator accepts (and may ignore): ``apix`` (Å/px of ``a``,
for ``minres``/``maxres``), ``snr`` ``(k, n // 2)`` (the particle's SNR per Fourier
ring, for ``snrweight``), ``ptcl_repr`` (particles behind ``b``, for ``nweight``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.fft
from numba import njit, prange

from cryorefine.errors import CryorefineError
from cryorefine.fourier.fft import fft_threads, rfft_shell_index
from cryorefine.registry import COMPARATORS, Modifier, Param

FLT_MAX = float(np.finfo(np.float32).max)
FLT_MIN = float(np.finfo(np.float32).tiny)

_MASK = Param("mask", str, "mask image file; pixels > 0.5 are compared", file="image")


def load_mask(mask: np.ndarray | None, n: int, where: str) -> np.ndarray | None:
    """A comparator mask as a boolean ``(n, n)`` (pixels > 0.5).

    The option parser (``cryorefine.config.parse_option``) reads a mask file once and
    hands the image here; nothing at this level opens files."""
    if mask is None:
        return None
    if isinstance(mask, str | Path):
        raise CryorefineError(
            f"{where}: mask={mask} is a file name; parse the option with "
            "cryorefine.config.parse_option, which reads it once"
        )
    mask = np.asarray(mask)
    if mask.shape != (n, n):
        raise CryorefineError(f"{where}: mask is {mask.shape}, the images are {(n, n)}")
    return mask > 0.5


def pair_context(ctx: dict, particles: np.ndarray) -> dict:
    """The comparator context for a batch of pairs: per-particle arrays (``snr``) taken at
    the pairs' ``particles`` indices, scalars (``apix``) as they are."""
    return {
        k: (v[particles] if isinstance(v, np.ndarray) and v.ndim else v) for k, v in ctx.items()
    }


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[-2:] != b.shape[-2:]:
        raise CryorefineError(f"cannot compare images of {a.shape[-2:]} and {b.shape[-2:]}")
    a, b = np.broadcast_arrays(a, b)
    return a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])


def _moments(a, b, sel):
    """Pixel count and float64 sums (a, b, a^2, b^2, ab) over ``sel`` (None: all)."""
    k = a.shape[0]
    a2 = a.reshape(k, -1).astype(np.float64)
    b2 = b.reshape(k, -1).astype(np.float64)
    if sel is None:
        w = None
        count = np.full(k, float(a2.shape[1]))
    else:
        w = np.broadcast_to(sel.reshape(-1, a2.shape[1]), a2.shape).astype(np.float64)
        count = w.sum(axis=1)
        a2, b2 = a2 * w, b2 * w
    return (
        count,
        a2.sum(1),
        b2.sum(1),
        np.einsum("ij,ij->i", a2, a2),
        np.einsum("ij,ij->i", b2, b2),
        np.einsum("ij,ij->i", a2, b2),
    )


@COMPARATORS.register(
    "ccc",
    "Normalised cross-correlation coefficient: -1 identical (up to scale and offset), "
    "+1 inverted, +2 when undefined.",
    (Param("negative", bool, "return -c (smaller is better)", default=True), _MASK),
)
def ccc(a, b, *, negative: bool = True, mask=None, **_ctx) -> np.ndarray:
    a, b = _pair(a, b)
    sel = load_mask(mask, a.shape[-1], "ccc")
    n, sa, sb, saa, sbb, sab = _moments(a, b, sel)
    with np.errstate(invalid="ignore", divide="ignore"):
        ma, mb = sa / n, sb / n
        va, vb = saa / n - ma * ma, sbb / n - mb * mb
        c = (sab / n - ma * mb) / np.sqrt(va * vb)
    c = np.where(np.isfinite(c), c, -2.0)
    return -c if negative else c


@COMPARATORS.register(
    "dot",
    "Dot product: -sum(ab)/n, or with normalize=1 the cosine -sum(ab)/sqrt(sum(a^2) "
    "sum(b^2)) (no mean subtraction).",
    (
        Param("negative", bool, "return the negative (smaller is better)", default=True),
        Param("normalize", bool, "divide by the norms instead of the pixel count", default=False),
        _MASK,
    ),
)
def dot(a, b, *, negative: bool = True, normalize: bool = False, mask=None, **_ctx):
    a, b = _pair(a, b)
    sel = load_mask(mask, a.shape[-1], "dot")
    n, _, _, saa, sbb, sab = _moments(a, b, sel)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = sab / np.sqrt(saa * sbb) if normalize else sab / n
    value = np.where(np.isfinite(value), value, 0.0)
    return -value if negative else value


@COMPARATORS.register(
    "sqeuclidean",
    "Mean squared difference; normto=1 first scales and offsets b to a by least squares.",
    (
        _MASK,
        Param("zeromask", bool, "use only pixels that are non-zero in both", default=False),
        Param("normto", bool, "fit b = A + B a first and compare (b - A) / B", default=False),
    ),
)
def sqeuclidean(a, b, *, mask=None, zeromask: bool = False, normto: bool = False, **_ctx):
    a, b = _pair(a, b)
    a64 = a.reshape(len(a), -1).astype(np.float64)
    b64 = b.reshape(len(b), -1).astype(np.float64)
    if normto:  # EMAN2 normalize.toimage: fit over a >= FLT_MIN (and both != 0)
        fit = a64 >= FLT_MIN
        if zeromask:
            fit &= (a64 != 0) & (b64 != 0)
        w = fit.astype(np.float64)
        cnt = w.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            ma, mb = (a64 * w).sum(1) / cnt, (b64 * w).sum(1) / cnt
            cov = ((a64 - ma[:, None]) * (b64 - mb[:, None]) * w).sum(1)
            var = (((a64 - ma[:, None]) ** 2) * w).sum(1)
            slope = cov / var
            icept = mb - slope * ma
            ok = np.isfinite(slope) & (slope != 0) & (1.0 / slope > 0)
        slope, icept = np.where(ok, slope, 1.0), np.where(ok, icept, 0.0)
        b64 = (b64 - icept[:, None]) / slope[:, None]
    sel = load_mask(mask, a.shape[-1], "sqeuclidean")
    if sel is not None:
        w = np.broadcast_to(sel.reshape(1, -1), a64.shape)
    elif zeromask:
        w = (a64 != 0) & (b.reshape(len(b), -1) != 0)
    else:
        w = None
    d = (a64 - b64) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        out = d.mean(1) if w is None else (d * w).sum(1) / w.sum(1)
    return np.where(np.isfinite(out), out, FLT_MAX)


def _zeromask(a, b):
    """Both images zeroed wherever either is 0 (float32 copies)."""
    out_a = np.empty(a.shape, np.float32)
    out_b = np.empty(b.shape, np.float32)
    _zeromask_kernel(
        a.reshape(len(a), -1),
        b.reshape(len(b), -1),
        out_a.reshape(len(a), -1),
        out_b.reshape(len(b), -1),
    )
    return out_a, out_b


def premasked(cmp):
    """``(zeromask, comparator)``: for a comparator whose ``zeromask`` zeroes both images
    wherever either is 0 and then compares them as they are (``frc``, ``phase``),
    ``(True, the same comparator without it)``, so that a caller can apply the mask
    while it builds the images; otherwise ``(False, cmp)`` (also for a plain function,
    e.g. a comparator wrapped in simmx's ``--mask``)."""
    if not isinstance(cmp, Modifier):
        return False, cmp
    if cmp.name in ("frc", "phase") and cmp.params.get("zeromask"):
        return True, Modifier(cmp.entry, {**cmp.params, "zeromask": False})
    return False, cmp


@njit(cache=True, parallel=True)
def _zeromask_kernel(a, b, out_a, out_b):
    for i in prange(a.shape[0]):
        for j in range(a.shape[1]):
            x = a[i, j]
            y = b[i, j]
            keep = (x != 0) & (y != 0)
            out_a[i, j] = x if keep else 0.0
            out_b[i, j] = y if keep else 0.0


@lru_cache(maxsize=8)
def _frc_rings(n: int) -> np.ndarray:
    """Ring of each ``rfft2`` coefficient for :func:`frc`: ``round(|k|)`` on the
    non-redundant half-plane (kx > 0, and ky >= 0 on the column kx = 0) up to ring
    ``n // 2``; -1 elsewhere (read-only, shared between calls)."""
    rings = rfft_shell_index((n, n))
    ky = scipy.fft.fftfreq(n, 1.0 / n)
    keep = np.ones(rings.shape, bool)
    keep[:, 0] = ky >= 0
    keep &= rings <= n // 2
    out = np.where(keep, rings, -1)
    out.setflags(write=False)
    return out


@njit(cache=True, parallel=True, fastmath=True)
def _frc_sums(fa, fb, rings, amp, out):
    """Per pair and ring: sums of Re(fa conj(fb)), |fa|^2, |fb|^2 and (``amp``) |fa|
    into ``out`` ``(k, 4, nring)`` float64."""
    k, ny, hx = fa.shape
    for i in prange(k):
        o = out[i]
        o[:, :] = 0.0
        for y in range(ny):
            for x in range(hx):
                r = rings[y, x]
                if r < 0:
                    continue
                ar = np.float64(fa[i, y, x].real)
                ai = np.float64(fa[i, y, x].imag)
                br = np.float64(fb[i, y, x].real)
                bi = np.float64(fb[i, y, x].imag)
                o[0, r] += ar * br + ai * bi
                o[1, r] += ar * ar + ai * ai
                o[2, r] += br * br + bi * bi
                if amp:
                    o[3, r] += np.sqrt(ar * ar + ai * ai)


def _resolution_edges(w, rings, n, apix, minres, maxres, where):
    if (minres > 0 or maxres > 0) and not apix:
        raise CryorefineError(f"{where}: minres/maxres need the pixel size")
    if minres > 0:
        pmin = apix * n / minres
        w = w * (np.tanh(5 * (rings - pmin) / pmin) + 1) / 2
    if maxres > 0:
        pmax = apix * n / maxres
        w = w * (1 - np.tanh(rings - pmax)) / 2
    return w


def _snr_weights(snr, k, nring, where):
    if snr is None:
        raise CryorefineError(
            f"{where}: snrweight=1 needs particles with CTF (an SNR curve per Fourier ring)"
        )
    s = np.broadcast_to(np.asarray(snr, dtype=np.float64), (k, np.shape(snr)[-1]))
    if s.shape[1] < nring:
        s = np.concatenate([s, np.repeat(s[:, -1:], nring - s.shape[1], axis=1)], axis=1)
    s = s[:, :nring]
    return np.where(s <= 0, 0.001, s)


def frc_ring_weights(params: dict, k: int, n: int, apix: float | None, snr) -> np.ndarray:
    """The ring weights ``(k, n // 2)`` of :func:`frc` that do not depend on the images:
    ring size (``sweight``), the particles' SNR per ring (``snrweight``, ``snr``
    ``(k, rings)``) and the ``minres``/``maxres`` edges (Å, ``apix`` Å/px)."""
    nring = n // 2
    w = np.ones((k, nring))
    if params["sweight"]:
        rings = _frc_rings(n)
        w = w * 2 * np.bincount(rings[rings >= 0], minlength=nring + 1)[:nring]
    if params["snrweight"]:
        w = w * _snr_weights(snr, k, nring, "frc")
    i = np.arange(nring, dtype=np.float64)
    return _resolution_edges(w, i, n, apix, params["minres"], params["maxres"], "frc")


_RES = (
    Param("minres", float, "low-resolution edge in Å (<= 0: none)", default=500.0),
    Param("maxres", float, "high-resolution edge in Å (<= 0: none)", default=10.0),
)


@COMPARATORS.register(
    "frc",
    "Weighted mean Fourier ring correlation, negated (-1 identical). Rings weighted by "
    "their size (sweight), mean amplitude (ampweight), the particle's SNR (snrweight) "
    "and soft minres/maxres edges.",
    (
        Param("snrweight", bool, "weight rings by the particle's CTF SNR", default=False),
        Param("ampweight", bool, "weight rings by the mean amplitude of a", default=False),
        Param("sweight", bool, "weight rings by their number of coefficients", default=True),
        Param("nweight", bool, "scale the SNR by 1 / ptcl_repr of b", default=False),
        Param("zeromask", bool, "zero both images wherever either is 0", default=False),
        *_RES,
    ),
)
def frc(
    a,
    b,
    *,
    snrweight: bool = False,
    ampweight: bool = False,
    sweight: bool = True,
    nweight: bool = False,
    zeromask: bool = False,
    minres: float = 500.0,
    maxres: float = 10.0,
    apix: float | None = None,
    snr=None,
    ptcl_repr=None,
    **_ctx,
) -> np.ndarray:
    a, b = _pair(a, b)
    k, n = a.shape[0], a.shape[-1]
    if zeromask:
        a, b = _zeromask(a, b)
    dtype = np.float32 if a.dtype == b.dtype == np.float32 else np.float64
    fa = scipy.fft.rfft2(np.asarray(a, dtype), workers=fft_threads())
    fb = scipy.fft.rfft2(np.asarray(b, dtype), workers=fft_threads())
    rings = _frc_rings(n)
    nring = n // 2
    sums = np.empty((k, 4, nring + 1))
    _frc_sums(fa, fb, rings, bool(ampweight), sums)
    del fa, fb
    cross, pa, pb = sums[:, 0], sums[:, 1], sums[:, 2]
    r = rings[rings >= 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        ring_frc = (cross / np.sqrt(pa * pb))[:, :nring]
    ring_frc = np.where(np.isfinite(ring_frc), ring_frc, 0.0)
    params = dict(sweight=sweight, snrweight=snrweight, minres=minres, maxres=maxres)
    w = frc_ring_weights(params, k, n, apix, snr)
    if ampweight:
        cnt = np.maximum(np.bincount(r, minlength=nring + 1), 1)
        w = w * (sums[:, 3] / cnt)[:, :nring]
    with np.errstate(invalid="ignore", divide="ignore"):
        total = (w * ring_frc).sum(1) / w.sum(1)
        if nweight and ptcl_repr is not None:
            nrep = np.broadcast_to(np.asarray(ptcl_repr, np.float64), (k,))
            ok = (nrep > 0) & (total >= 0) & (total < 1)
            s = total / (1 - total) / np.where(nrep > 0, nrep, 1)
            total = np.where(ok, s / (1 + s), total)
    total = np.where(np.isfinite(total), total, -3e38)
    return -total


@COMPARATORS.register(
    "phase",
    "Weighted mean phase residual in radians (0 identical, pi inverted).",
    (
        Param("snrweight", bool, "weight by the particle's CTF SNR", default=False),
        Param("snrfn", bool, "weight by x exp(-x), x = 10 r / (n / 2)", default=False),
        Param("ampweight", bool, "weight each coefficient by |F(b)|", default=False),
        Param("zeromask", bool, "zero both images wherever either is 0", default=False),
        *_RES,
    ),
    check=lambda p, w: _exclusive(p, w),
)
def phase(
    a,
    b,
    *,
    snrweight: bool = False,
    snrfn: bool = False,
    ampweight: bool = False,
    zeromask: bool = False,
    minres: float = 500.0,
    maxres: float = 10.0,
    apix: float | None = None,
    snr=None,
    **_ctx,
) -> np.ndarray:
    a, b = _pair(a, b)
    k, n = a.shape[0], a.shape[-1]
    if zeromask:
        a, b = _zeromask(a, b)
    # double precision: arccos is ill-conditioned next to 0 and pi
    fa = scipy.fft.rfft2(a.astype(np.float64), workers=fft_threads()).reshape(k, -1)
    fb = scipy.fft.rfft2(b.astype(np.float64), workers=fft_threads()).reshape(k, -1)
    rings = rfft_shell_index((n, n)).ravel()
    nring = n // 2
    idx = np.flatnonzero(rings < nring)
    r = rings[idx]
    fa, fb = fa[:, idx], fb[:, idx]
    i = np.arange(nring, dtype=np.float64)
    if snrweight:
        wr = _snr_weights(snr, k, nring, "phase")
    elif snrfn:
        x = 10 * i / (n / 2)
        wr = np.broadcast_to(x * np.exp(-x), (k, nring))
    else:
        wr = np.ones((k, nring))
    wr = _resolution_edges(wr, i, n, apix, minres, maxres, "phase")
    w = wr[:, r]
    if ampweight:
        w = w * np.abs(fb)
    mag = np.abs(fa) * np.abs(fb)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.clip(np.real(fa * np.conj(fb)) / mag, -1.0, 1.0)
    err = np.where(mag > 0, np.arccos(cosine), 0.0)
    return (w * err).sum(1) / (FLT_MIN + w.sum(1))


def _exclusive(params: dict, where: str) -> None:
    if params["snrweight"] and params["snrfn"]:
        raise CryorefineError(f"{where}: snrweight and snrfn cannot both be set")

"""The reference bank: every reference rotated to the footprint angles, once.

The footprint angle of a pair is quantised to ``180 / xs`` degrees, so each reference
is rotated once to each of the ``xs`` angles (bilinear, as the per-pair aligner): a
bank of ``xs`` images per reference, each Fourier-transformed once instead of a
rotation per pair. Angles from 90 degrees on are quarter turns of those below (their
transforms permutations of theirs); the further 180-degree turn is exact, and its
transform is formed from the first's where it is used (:class:`Bank`, ``edges``).
The bank's memory comes from a per-thread pool, reused from call to call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import scipy.fft
from numba import njit, prange

from cryorefine.align.compare import FLT_MIN
from cryorefine.align.transform2d import rotate_quarter, rotate_stack
from cryorefine.fourier.fft import fft_threads

_SCRATCH = threading.local()


def thread_pool() -> dict:
    return _SCRATCH.__dict__.setdefault("pool", {})


def scratch(name: str, size: int) -> np.ndarray:
    """A float32 array of ``size`` from this thread's pool: the memory of the last
    request under ``name`` when large enough (freshly allocated memory is slow to
    fault in, and the bank is rebuilt on every call)."""
    pool = thread_pool()
    buf = pool.get(name)
    if buf is None or buf.size < size:
        pool[name] = buf = None  # let the old one go first
        pool[name] = buf = np.empty(size, np.float32)
    return buf[:size]


def release_pool() -> None:
    """Let this thread's pooled bank memory go: the pool serves the calls of one stage
    (it grows to about 2x the bank budget, and to about 130 n^3 bytes for boxes of
    ``n`` >= 256 px, whose bank of one reference exceeds the budget), and a stage that
    ends hands it back so that later stages do not carry it."""
    pool = thread_pool()
    busy = pool.get("busy", False)
    pool.clear()
    if busy:
        pool["busy"] = True


class BankCache(dict):
    """Banks kept by a caller across :func:`align_pairs` calls with the same ``refs``
    and ``ref_chunk``. Used as a context manager, it lends its first bank this
    thread's pooled bank memory until it closes (meanwhile other calls in the thread
    use fresh memory), and empties itself on closing."""

    lease = False

    def __enter__(self) -> BankCache:
        self.lease = not thread_pool().get("busy", False)
        thread_pool()["busy"] = True
        return self

    def __exit__(self, *exc) -> None:
        self.clear()
        if self.lease:
            thread_pool()["busy"] = False
            self.lease = False


@dataclass
class Bank:
    """References rotated to the ``xs`` footprint angles: image ``slot xs + j``.

    ``images`` ``(nb, n, n)`` and the real and imaginary planes ``re``, ``im`` of their
    ``rfft2``; ``sums`` ``(2 nb, 2, 2, n + 1)`` float64 line sums (:func:`line_sums`)
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


class BankBuffers:
    """Memory for the bank of up to ``m`` references, reused from chunk to chunk and
    (``pooled``) from call to call in the same thread; without ``fourier`` (a search
    without shifts) the transforms and edges are one placeholder image."""

    def __init__(self, m: int, xs: int, n: int, pooled: bool = False, fourier: bool = True) -> None:
        size = m * xs * n
        get = scratch if pooled else (lambda _name, k: np.empty(k, np.float32))
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
            turn_phase(n),
            np.zeros((1, 2, 3)),
        )


def turn_phase(n: int) -> np.ndarray:
    """``exp(2 pi i (ky + kx) / n)`` on the rfft2 grid as real and imaginary planes:
    the factor of an odd image's transform under the 180-degree turn."""
    ky = np.arange(n)[:, None]
    kx = np.arange(n // 2 + 1)[None, :]
    ph = np.exp(2j * np.pi * (ky + kx) / n)
    return np.ascontiguousarray(np.stack([ph.real, ph.imag]), dtype=np.float32)


def build_bank(
    refs: np.ndarray,
    which: np.ndarray,
    xs: int,
    buf: BankBuffers | None = None,
    *,
    fourier: bool = True,
) -> Bank:
    """References ``which`` at the ``xs`` footprint angles (bilinear), their line sums
    and (``fourier``) transforms and turned-image edges (:class:`Bank`)."""
    n = refs.shape[-1]
    nb = len(which) * xs
    bank = (buf or BankBuffers(len(which), xs, n, fourier=fourier)).bank(nb, n)
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
    line_sums(bank.images, bank.sums[:nb])
    turned_line_sums(bank.images, bank.sums[:nb], bank.sums[nb:])
    if not fourier:
        bank.masked = masked_sums(bank.images)
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
        ft = scipy.fft.rfft2(per_ref[sl, :half], workers=fft_threads())
        row = scipy.fft.rfft(per_ref[sl, :, 0, :], workers=fft_threads())
        col = scipy.fft.fft(per_ref[sl, :, :, 0], workers=fft_threads())
        bank_transforms(per_ref[sl], ft, row, col, re4[sl], im4[sl], edges[sl], ph)
    return bank


@njit(cache=True, parallel=True, fastmath=True)
def bank_transforms(images, ft, row, col, re, im, edges, ph):
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
def line_sums(images: np.ndarray, out: np.ndarray) -> np.ndarray:
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
def masked_sums(images):
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
def turned_line_sums(images: np.ndarray, base: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Line sums (as :func:`line_sums`) of the images turned by 180 degrees, from
    their own: row ``y`` of the turned image is row ``2 (n // 2) - y`` reversed; for
    even ``n`` row and column 0 have no source and the source's column and row 0 drop
    out of the others."""
    k, n = images.shape[0], images.shape[-1]
    two_c = 2 * (n // 2)
    for i in prange(k):
        img = images[i]
        for p in range(2):
            total = base[i, 0, p, n]
            for y in range(n):  # rows (and, by symmetry of the formula, columns)
                src = two_c - y
                if src >= n:
                    out[i, 0, p, y] = 0.0
                    out[i, 1, p, y] = 0.0
                    continue
                row = base[i, 0, p, src]
                col = base[i, 1, p, src]
                if two_c == n:  # even: the source's column 0 (row 0) has no place
                    a = np.float64(img[src, 0])
                    b = np.float64(img[0, src])
                    row -= a if p == 0 else a * a
                    col -= b if p == 0 else b * b
                out[i, 0, p, y] = row
                out[i, 1, p, y] = col
            if two_c == n:
                a = np.float64(img[0, 0])
                total -= base[i, 0, p, 0] + base[i, 1, p, 0] - (a if p == 0 else a * a)
            out[i, 0, p, n] = total
            out[i, 1, p, n] = total
    return out

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

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.fft

from cryorefine import memory
from cryorefine.align.align2d import default_maxshift
from cryorefine.align.bank import BankBuffers, BankCache, build_bank, thread_pool
from cryorefine.align.candidates import (
    IMAGE_BYTES,
    fused_ok,
    fused_scores,
    generic_final,
    generic_scores,
    image_sums,
    needs_fit,
)
from cryorefine.align.rotational import (
    best_rotations,
    footprints,
    pair_layout,
    pair_rotations,
    polar_size,
    spectra,
)
from cryorefine.align.shift_search import FIT, N_STATS, Stat, search_block, window_dft
from cryorefine.align.transform2d import Transform2D, mirror_x, rotate180
from cryorefine.fourier.fft import fft_threads

__all__ = [
    "BankCache",
    "EngineAligner",
    "PairAlignment",
    "Reuse",
    "Targets",
    "align_all",
    "align_pairs",
]


@dataclass(frozen=True)
class EngineAligner:
    """What the engine's aligner does: ``cmp`` (a comparator) chooses among the
    candidates, shifts up to ``maxshift`` px per axis are searched (``None``: EMAN2's
    ``n // 4``), the mirror is tried with ``flip`` (``rotate_translate_flip``), and
    ``subpixel`` reports the shift at the interpolated CCF peak."""

    cmp: object
    maxshift: int | None = None
    flip: bool = True
    subpixel: bool = False

    @classmethod
    def from_modifier(cls, align, cmp) -> EngineAligner:
        """The settings of a parsed ``rotate_translate[_flip]`` modifier, with ``cmp``."""
        return cls(
            cmp,
            maxshift=align.params.get("maxshift"),
            flip=align.name == "rotate_translate_flip",
            subpixel=bool(align.params.get("subpixel")),
        )


@dataclass
class Reuse:
    """What a caller keeps across :func:`align_pairs` calls.

    ``ref_spectra``: the references' footprint spectra (computed when absent);
    ``ref_chunk``: references per bank; ``bank_cache`` (a dict or an open
    :class:`BankCache`, for calls with the same references and ``ref_chunk``) keeps the
    rotated references; ``targets`` is filled by the first call with what is computed
    from the particles (for calls with the same particles, ``flip`` and ``maxshift``).
    """

    ref_spectra: np.ndarray | None = None
    ref_chunk: int = 64
    bank_cache: dict | None = None
    targets: Targets | None = None


@dataclass(frozen=True)
class Targets:
    """The particles (and their mirrors, with ``flip``), ``(nm, Np, ...)`` each:
    ``images``; ``spectra`` (footprint spectra, one per mirror state); ``re``, ``im``
    (the transforms' real and imaginary planes; placeholders without a shift search);
    ``turned`` (the images turned by 180 degrees, without a shift search; else a
    placeholder); ``sum`` and ``sq`` (sums of the values and of their squares)."""

    images: np.ndarray
    spectra: list[np.ndarray]
    re: np.ndarray
    im: np.ndarray
    turned: np.ndarray
    sum: np.ndarray
    sq: np.ndarray

    @cached_property
    def laid_out(self) -> list[np.ndarray]:
        """The spectra laid out for the footprint angles of a few pairs."""
        return [pair_layout(ts) for ts in self.spectra]


@dataclass
class PairAlignment:
    """Forward transforms (reference -> particle) for a block of pairs ``(Np, Nc)``."""

    alpha: np.ndarray
    tx: np.ndarray
    ty: np.ndarray
    mirror: np.ndarray
    score: np.ndarray  # the aligner comparator's value of the chosen candidate
    final: np.ndarray | None = None  # the final comparator's score, when asked for

    @property
    def transform(self) -> Transform2D:
        """The forward transforms as one bundle."""
        return Transform2D(self.alpha, self.tx, self.ty, self.mirror)


def align_all(
    refs: np.ndarray,
    particles: np.ndarray,
    aligner: EngineAligner,
    *,
    final=None,
    ctx: dict | None = None,
    reuse: Reuse | None = None,
) -> PairAlignment:
    """:func:`align_pairs` for every (particle, reference) pair; ``(Np, Nc)`` arrays."""
    n_p, nc = len(particles), len(refs)
    p_idx, c_idx = (a.ravel() for a in np.indices((n_p, nc)))
    flat = align_pairs(refs, particles, p_idx, c_idx, aligner, final=final, ctx=ctx, reuse=reuse)
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
    aligner: EngineAligner,
    *,
    final=None,
    ctx: dict | None = None,
    reuse: Reuse | None = None,
    batch: int | None = None,
) -> PairAlignment:
    """``rotate_translate[_flip]`` of reference ``c_idx[i]`` onto particle ``p_idx[i]``.

    ``refs`` ``(Nc, n, n)`` are the moving images, ``particles`` ``(Np, n, n)`` the
    targets; ``aligner`` says how candidates are searched and chosen. ``final``
    (optional comparator) scores each chosen alignment as e2simmx does,
    ``final(particle, aligned reference)``, into ``PairAlignment.final``. ``ctx``:
    comparator context; per-particle arrays (``snr``) are indexed by particle. With
    ``subpixel`` the translation is reported at the parabola-interpolated CCF peak
    (candidates are still chosen and scored at the integer peak). ``reuse``: what the
    caller keeps across calls (:class:`Reuse`). ``batch``: pairs whose images are
    materialised at a time for a comparator scored on images (default:
    :data:`IMAGE_BYTES` of them). Returns one value per pair.
    """
    cmp, flip, subpixel = aligner.cmp, aligner.flip, aligner.subpixel
    reuse = reuse or Reuse()
    ref_chunk, bank_cache = reuse.ref_chunk, reuse.bank_cache
    refs = np.ascontiguousarray(refs, np.float32)
    particles = np.ascontiguousarray(particles, np.float32)
    nc, n = len(refs), refs.shape[-1]
    batch = batch or max(16, IMAGE_BYTES // (4 * n * n))
    n_p = len(particles)
    p_idx = np.asarray(p_idx, np.int64)
    c_idx = np.asarray(c_idx, np.int64)
    npair = len(p_idx)
    ms = default_maxshift(n, aligner.maxshift)
    xs = polar_size(n)[0]
    ctx = ctx or {}
    ref_spectra = reuse.ref_spectra
    if ref_spectra is None:
        ref_spectra = spectra(footprints(refs))
    fourier = ms > 0  # without a shift search the kernel works in real space only
    if reuse.targets is None:
        reuse.targets = prepare_targets(particles, flip, fourier)
    prepared = reuse.targets
    tgt, nm = prepared.images, len(prepared.images)
    if npair * 4 < n_p * nc:  # few pairs: footprint angles of those pairs only
        mv = pair_layout(ref_spectra)
        j_pairs = np.stack(
            [pair_rotations(mv, ts, c_idx, p_idx, xs, laid_out=True) for ts in prepared.laid_out]
        )
    else:
        j0 = np.stack([best_rotations(ref_spectra, ts, xs) for ts in prepared.spectra])
        j_pairs = j0[:, p_idx, c_idx]
    target_arrays = (prepared.re, prepared.im, tgt, prepared.turned)
    t_sum, t_sq = prepared.sum, prepared.sq
    ey, ex = window_dft(n, ms)
    dft = tuple(
        np.ascontiguousarray(a, dtype=np.float32) for a in (ey.real, ey.imag, ex.real, ex.imag)
    )
    out = PairAlignment(
        np.zeros(npair),
        np.zeros(npair),
        np.zeros(npair),
        np.zeros(npair, bool),
        np.zeros(npair),
        None if final is None else np.zeros(npair),
    )
    target_of_candidate = np.repeat(np.arange(nm), 2)
    order = np.argsort(c_idx, kind="stable")
    if bank_cache is None:  # bank chunks within the memory budget
        ref_chunk = max(1, min(ref_chunk, memory.budget("bank") // (8 * xs * n * n)))
    # buffers reused from chunk to chunk (fresh memory is slow to fault in)
    counts = np.bincount(c_idx // ref_chunk, minlength=-(-nc // ref_chunk))
    kmax = int(counts.max()) if counts.size else 0
    px_buf = np.empty((kmax, 2 * nm), np.int64)
    py_buf = np.empty((kmax, 2 * nm), np.int64)
    stats_buf = np.empty((kmax, 2 * nm, N_STATS))
    if bank_cache is None:
        pooled = not thread_pool().get("busy", False)
        bank_buf = BankBuffers(min(ref_chunk, nc), xs, n, pooled, fourier)
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
                buf = BankBuffers(c1 - c0, xs, n, lent, fourier)
            bank = build_bank(refs, used + c0, xs, bank_buf or buf, fourier=fourier)
            if bank_cache is not None:
                bank_cache[key] = used, bank
        slot = np.searchsorted(used, cl)  # position of each pair's reference in the bank
        ang = np.ascontiguousarray(j_pairs[:, sel])
        k = len(sel)
        px, py, stats = px_buf[:k], py_buf[:k], stats_buf[:k]
        bank_arrays = (bank.re, bank.im, bank.images, bank.sums, bank.edges, bank.phase)
        search_block(
            (*bank_arrays, bank.masked),
            target_arrays,
            ang,
            ps,
            slot,
            xs,
            dft,
            (px, py, stats),
            needs_fit(cmp),
        )
        # candidate q = 2 m + h is scored against target m
        if fused_ok(cmp):
            score = fused_scores(
                cmp,
                stats[..., Stat.SUM],
                stats[..., Stat.SQ],
                t_sum[target_of_candidate][:, ps].T,
                t_sq[target_of_candidate][:, ps].T,
                stats[..., Stat.PRODUCT],
                n * n,
                stats[..., FIT],
            )
        else:
            score = generic_scores(bank.images, tgt, ang, ps, slot, xs, px, py, cmp, ctx, batch)
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
            out.tx[sel] = -(bx + stats[np.arange(k), q, Stat.SUB_X])
            out.ty[sel] = -(by + stats[np.arange(k), q, Stat.SUB_Y])
        else:
            out.tx[sel], out.ty[sel] = -bx, -by
        out.mirror[sel] = mirror
        out.score[sel] = s_m[np.arange(k), m]
        if final is None:
            continue
        bank_idx = slot * xs + j
        if fused_ok(final) and not needs_fit(final):  # final(particle, S or mirror(S))
            chosen = stats[np.arange(k), q]
            drop = mirror & (n % 2 == 0)  # mirroring an even box loses column 0
            a_sum, a_sq = chosen[:, Stat.SUM], chosen[:, Stat.SQ]
            b_sum = np.where(drop, a_sum - chosen[:, Stat.COL0_SUM], a_sum)
            b_sq = np.where(drop, a_sq - chosen[:, Stat.COL0_SQ], a_sq)
            out.final[sel] = fused_scores(
                final, t_sum[0][ps], t_sq[0][ps], b_sum, b_sq, chosen[:, Stat.PRODUCT], n * n
            )
        else:
            out.final[sel] = generic_final(
                bank.images, bank_idx, h, bx, by, mirror, particles, ps, final, ctx, batch
            )
    return out


def prepare_targets(particles: np.ndarray, flip: bool, fourier: bool) -> Targets:
    """The :class:`Targets` of ``particles`` (and their mirrors with ``flip``); their
    transforms with a shift search (``fourier``), else their turned images."""
    tgt = np.stack([particles, mirror_x(particles)] if flip else [particles])
    nm, n_p = tgt.shape[:2]
    if fourier:
        ft = scipy.fft.rfft2(tgt, workers=fft_threads())
        t_re = np.ascontiguousarray(ft.real, dtype=np.float32)
        t_im = np.ascontiguousarray(ft.imag, dtype=np.float32)
        del ft
        turned = np.zeros((1, 1, 1, 1), np.float32)
    else:
        t_re = t_im = np.zeros((nm, n_p, 1, 1), np.float32)
        turned = rotate180(tgt)
    t_sum, t_sq = image_sums(tgt.reshape(nm * n_p, -1))
    return Targets(
        images=tgt,
        spectra=[spectra(footprints(images)) for images in tgt],
        re=t_re,
        im=t_im,
        turned=turned,
        sum=t_sum.reshape(nm, n_p),
        sq=t_sq.reshape(nm, n_p),
    )

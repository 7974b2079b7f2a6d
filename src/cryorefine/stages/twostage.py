"""e2simmx2stage: a coarse search over averaged projections, then a local full search.

Stage 1 compares the projections with each other (shrunk by the ``--twostage``
factor, ``sqeuclidean:normto=1`` inside the aligner, ``sqeuclidean`` to score;
rotation and mirror only, as all projections share one origin), picks
``Ns = 3 floor(sqrt(Nc))`` centres by farthest-point sampling, gives every projection
to its 2 most similar centres and averages each centre's members after aligning them
to its first member. Stage 2 scores every particle against those averages (shrunk,
with the user's aligner and comparators). Stage 3 computes the full similarity only
for the members of each particle's 4 best averages; the other cells of its row become
``max(computed row) + 1e-4``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cryorefine.align.engine import BankCache, EngineAligner, Reuse, align_pairs
from cryorefine.align.rotational import footprints, spectra
from cryorefine.align.transform2d import Transform2D, meanshrink
from cryorefine.config import SimmxConfig
from cryorefine.registry import COMPARATORS

N_BEST = 4
N_OWNERS = 2
# Choice (EMAN2 searches the default n/4): projections of one map share its origin, so
# neighbouring views are related by an in-plane rotation about the box centre alone
STAGE1_MAXSHIFT = 0


def centres_and_members(
    rows: Callable[[np.ndarray], np.ndarray], nc: int, *, batch: int = 2
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Farthest-point centres and their member lists.

    ``rows(ks)`` scores projections ``ks`` (particle role) against every projection
    (projection role): row ``i`` is EMAN2's ``Q[:, ks[i]]``. Start with projection 0,
    repeatedly add the projection maximising its minimum ``Q`` over the centres (ties:
    lowest index); then each projection joins its 2 most similar centres (smallest
    ``Q[i, centre]``). Only centres' rows are needed; they are computed ``batch`` at a
    time: the wanted one and the next farthest, which are likely to be wanted next.
    """
    ns = min(nc, 3 * int(np.floor(np.sqrt(nc))))
    cache: dict[int, np.ndarray] = {}
    taken = np.zeros(nc, bool)
    dist = np.full(nc, np.inf)

    def row(j: int) -> np.ndarray:
        if j not in cache:
            free = np.flatnonzero(~taken & (dist > -np.inf))
            order = free[np.argsort(-dist[free], kind="stable")]
            extra = [k for k in order.tolist() if k != j and k not in cache]
            ks = np.asarray([j] + extra[: batch - 1] if np.isfinite(dist).any() else [j])
            for k, r in zip(ks.tolist(), rows(ks), strict=True):
                cache[k] = np.asarray(r, np.float64)
        return cache[j]

    centres = [0]
    taken[0] = True
    dist = row(0).copy()
    q = [dist.copy()]
    while len(centres) < ns:
        j = int(np.argmax(np.where(taken, -np.inf, dist)))
        centres.append(j)
        taken[j] = True
        q.append(row(j))
        dist = np.minimum(dist, q[-1])
    q = np.stack(q, axis=1)  # (projection i, centre) = Q[i, centre]
    owners = np.argsort(q, axis=1, kind="stable")[:, : min(N_OWNERS, ns)]
    members = [np.flatnonzero((owners == c).any(axis=1)) for c in range(ns)]
    return np.asarray(centres), members


def class_averages(
    refs: np.ndarray,
    members: list[np.ndarray],
    align_onto: Callable[[np.ndarray, np.ndarray], Transform2D],
) -> np.ndarray:
    """Each centre's members aligned onto its first member and averaged.

    ``align_onto(j, m0)`` gives the transforms bringing projections ``j`` onto
    projections ``m0`` (the stored e2simmx alignment at (x=m0, y=j)).
    """
    out = np.zeros((len(members),) + refs.shape[1:], np.float32)
    pairs = [(mem[1:], np.full(len(mem) - 1, mem[0])) for mem in members if len(mem) > 1]
    if pairs:
        j_all = np.concatenate([p[0] for p in pairs])
        m_all = np.concatenate([p[1] for p in pairs])
        moved = align_onto(j_all, m_all).apply(refs[j_all])
    start = 0
    for c, mem in enumerate(members):
        if mem.size == 0:
            continue
        total = refs[mem[0]].astype(np.float64)
        if len(mem) > 1:
            total = total + moved[start : start + len(mem) - 1].sum(axis=0)
            start += len(mem) - 1
        out[c] = total / len(mem)
    return out


@functools.cache
def _stage1_comparators():
    """e2simmx2stage's stage-1 comparators (inside the aligner, and the score), parsed
    once per process."""
    return COMPARATORS.parse("sqeuclidean:normto=1"), COMPARATORS.parse("sqeuclidean")


def twostage_pairs(
    refs: np.ndarray, cfg: SimmxConfig, apix: float, score: Callable
) -> TwoStagePlan:
    """Stage 1 on the references; returns ``plan(particles, snr) -> (p_idx, c_idx)``.

    ``score(averages, images, cfg, apix=..., snr=...)`` is the one-stage scorer of a
    chunk (``stages.simmx.score_pairs``), passed in so that this module does not
    import the one that calls it."""
    factor = max(1, int(cfg.twostage) // max(1, cfg.shrink or 1))
    small = meanshrink(refs, factor) if factor > 1 else refs
    nc = len(small)
    # e2simmx2stage's self-comparison, one centre row at a time: the projections
    # share one origin, so only small residual shifts are searched
    within, final = _stage1_comparators()
    aligner = EngineAligner(within, maxshift=STAGE1_MAXSHIFT)

    def rows(ks: np.ndarray) -> np.ndarray:
        p_idx = np.repeat(ks, nc)  # every projection is a target: prepared once
        c_idx = np.tile(np.arange(nc), len(ks))
        pa = align_pairs(small, small, p_idx, c_idx, aligner, final=final, reuse=reuse)
        return pa.final.reshape(len(ks), nc)

    def align_onto(j: np.ndarray, m0: np.ndarray) -> Transform2D:
        pa = align_pairs(small, small, j, m0, aligner, final=final, reuse=reuse)
        return pa.transform.inverse()

    with BankCache() as bank_cache:
        # one bank (small images), kept across the sequential rows
        reuse = Reuse(spectra(footprints(small)), ref_chunk=nc, bank_cache=bank_cache)
        centres, members = centres_and_members(rows, nc)
        averages = class_averages(small, members, align_onto)
    membership = np.zeros((len(members), nc), bool)
    for c, mem in enumerate(members):
        membership[c, mem] = True
    return TwoStagePlan(factor, apix, averages, cfg.coarse(), membership, centres, members, score)


@dataclass(frozen=True)
class TwoStagePlan:
    """Stage 2's cells of a chunk of particles: ``plan(particles, snr) -> (p_idx,
    c_idx)``, the members of each particle's :data:`N_BEST` best class centres, scored
    against the stage-1 class averages (``averages``, shrunk by ``factor``). It carries
    everything a chunk needs, so that it travels to a worker as it is."""

    factor: int
    apix: float
    averages: np.ndarray
    coarse_cfg: SimmxConfig
    membership: np.ndarray
    centres: np.ndarray
    members: list
    score: Callable

    def __call__(self, particles: np.ndarray, snr: np.ndarray | None):
        f = self.factor
        images = meanshrink(particles, f) if f > 1 else particles
        coarse = self.score(
            self.averages, images, self.coarse_cfg, apix=self.apix * f, snr=_resample(snr, f)
        )
        best = np.argsort(coarse.score, axis=1, kind="stable")[:, :N_BEST]
        # the members of a particle's best centres: rows of the membership table, or-ed
        return np.nonzero(self.membership[best].any(axis=1))


def _resample(snr: np.ndarray | None, factor: int) -> np.ndarray | None:
    """Ring SNR of shrunk images: ring ``i`` of the shrunk image is ring ``i`` of the
    original at the same frequency in Å (shrinking keeps frequencies below the new Nyquist)."""
    if snr is None or factor == 1:
        return snr
    return snr[:, : snr.shape[1] // factor]

"""e2simmx2stage: a coarse search over averaged projections, then a local full search.

Stage 1 compares the projections with each other (shrunk by the ``--twostage``
factor, ``sqeuclidean:normto=1`` inside the aligner, ``sqeuclidean`` to score),
picks ``Ns = 3 floor(sqrt(Nc))`` centres by farthest-point sampling, gives every
projection to its 2 most similar centres and averages each centre's members after
aligning them to its first member. Stage 2 scores every particle against those
averages (shrunk, with the user's aligner and comparators). Stage 3 computes the full
similarity only for the members of each particle's 4 best averages; the other cells
of its row become ``max(computed row) + 1e-4``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from cryorefine.align.transform2d import apply_transform, meanshrink

N_BEST = 4
N_OWNERS = 2


def centres_and_members(score: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Farthest-point centres and their member lists from a projection self-simmx.

    ``score[k, j]`` is projection ``k`` (particle role) against ``j`` (projection
    role), i.e. EMAN2's ``Q[j, k]``. Start with projection 0, repeatedly add the
    projection maximising its minimum ``Q`` to the centres (ties: lowest index); then
    each projection joins its 2 most similar centres (smallest ``Q[i, centre]``).
    """
    nc = score.shape[0]
    ns = min(nc, 3 * int(np.floor(np.sqrt(nc))))
    centres = [0]
    dist = score[0].astype(np.float64).copy()  # min over centres k of Q[j, k] = score[k, j]
    taken = np.zeros(nc, bool)
    taken[0] = True
    while len(centres) < ns:
        j = int(np.argmax(np.where(taken, -np.inf, dist)))
        centres.append(j)
        taken[j] = True
        dist = np.minimum(dist, score[j])
    centres = np.asarray(centres)
    q = score[centres].T  # (projection i, centre) = Q[i, centre]
    owners = np.argsort(q, axis=1, kind="stable")[:, : min(N_OWNERS, ns)]
    members = [np.flatnonzero((owners == c).any(axis=1)) for c in range(ns)]
    return centres, members


def class_averages(refs: np.ndarray, sim, members: list[np.ndarray]) -> np.ndarray:
    """Each centre's members aligned onto its first member (stored alignments) and averaged."""
    out = np.zeros((len(members),) + refs.shape[1:], np.float32)
    for c, mem in enumerate(members):
        if mem.size == 0:
            continue
        m0, rest = mem[0], mem[1:]
        total = refs[m0].astype(np.float64)
        if rest.size:
            moved = apply_transform(
                refs[rest],
                sim.dalpha[rest, m0],
                sim.dx[rest, m0],
                sim.dy[rest, m0],
                sim.flip[rest, m0] > 0.5,
            )
            total = total + moved.sum(axis=0)
        out[c] = total / len(mem)
    return out


def twostage_pairs(refs: np.ndarray, cfg, apix: float) -> Callable:
    """Stage 1 on the references; returns ``plan(particles, snr) -> (p_idx, c_idx)``."""
    from cryorefine.stages.simmx import SimmxConfig, simmx

    factor = max(1, int(cfg.twostage) // max(1, cfg.shrink or 1))
    small = meanshrink(refs, factor) if factor > 1 else refs
    self_cfg = SimmxConfig(
        align="rotate_translate_flip", aligncmp="sqeuclidean:normto=1", cmp="sqeuclidean"
    )
    q = simmx(small, small, self_cfg, apix=apix * factor)
    centres, members = centres_and_members(q.score)
    averages = class_averages(small, q, members)
    coarse_cfg = replace(cfg, twostage=0, shrink=None, ralign=None)

    def plan(particles: np.ndarray, snr: np.ndarray | None):
        images = meanshrink(particles, factor) if factor > 1 else particles
        coarse = simmx(averages, images, coarse_cfg, apix=apix * factor, snr=_resample(snr, factor))
        best = np.argsort(coarse.score, axis=1, kind="stable")[:, :N_BEST]
        p_idx, c_idx = [], []
        for p, row in enumerate(best):
            cols = np.unique(np.concatenate([members[c] for c in row]))
            p_idx.append(np.full(len(cols), p))
            c_idx.append(cols)
        return np.concatenate(p_idx), np.concatenate(c_idx)

    plan.centres, plan.members = centres, members
    return plan


def _resample(snr: np.ndarray | None, factor: int) -> np.ndarray | None:
    """Ring SNR of shrunk images: ring ``i`` of the shrunk image is ring ``i`` of the
    original at the same frequency in Å (shrinking keeps frequencies below the new Nyquist)."""
    if snr is None or factor == 1:
        return snr
    return snr[:, : snr.shape[1] // factor]

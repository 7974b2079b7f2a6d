"""A local iteration (``--localrefine``): every particle's pose refined around its last one.

There are no projections, similarity matrix, classes or class averages. Each half's
particles are read chunk by chunk and searched against their own half's map
(:func:`cryorefine.align.local.local_search`) within ``range_deg`` and ``shift_px`` of
the poses of the iteration before; the map is then made from the particles, at their
new poses and with their CTFs, as with ``--m3dsource particles``.

Scores (``--localrefine ...:score=``):

* ``ssnr``: one correlation over the Fourier rings up to where the half maps' FSC
  vanishes, each ring weighted by the SNR it is expected to hold in this particle: its
  size times the particle's mean CTF^2 on it times the half maps' SSNR ``FSC / (1 - FSC)``
  (the previous iteration's curve, the reported one with half maps);
* ``simcmp``: the comparator ``--simcmp`` names, ``frc`` (its ring weights: ring size,
  the particle's CTF SNR with ``snrweight``, the ``minres``/``maxres`` edges) or ``ccc``.

Rejection (``--classkeep``, ``--classkeepsig``): the particles of a half are grouped
by viewing direction, each joining the nearest (symmetry copies and mirror included)
of about one direction per :data:`GROUP_SIZE` particles spread evenly over the
asymmetric unit, and each group keeps its best scores by class averaging's rule
(:func:`cryorefine.stages.classaverage.keep_members`). The scores of one view are
alike, so a particle is judged against its peers, as in an e2refine class; groups of
about 25 make the rule act (a class of one keeps its member). The rejected are left out
of the map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cryorefine import memory, parallel
from cryorefine.align.compare import frc_ring_weights
from cryorefine.align.local import FourierPoints, local_search
from cryorefine.config import RefineConfig
from cryorefine.fourier.fft import ring_mean
from cryorefine.fourier.project import prepare_volume
from cryorefine.geometry.orientations import orientations
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.io.stacks import ParticleStack
from cryorefine.refine.step import (
    CLASSKEEP,
    LOCAL_STAGES,
    USED,
    Step,
    finish_maps,
    reconstruct_from_particles,
    timed,
)
from cryorefine.registry import ORIENTGENS
from cryorefine.stages.classaverage import keep_members
from cryorefine.stages.simmx import ctf_snr

#: the smallest search radius the halving reaches (degrees)
MIN_RANGE_DEG = 0.5
#: FSC under which a ring is left out of the search (the map holds nothing there)
FSC_FLOOR = 0.02
#: particles per direction group of the rejection rule (on average)
GROUP_SIZE = 25


@dataclass(frozen=True)
class Search:
    """One iteration's search: ``kind`` ``global`` or ``local``; a local one's radius
    ``range_deg``, grid spacing ``step_deg`` and shift radius ``shift_px``."""

    kind: str
    range_deg: float | None = None
    step_deg: float | None = None
    shift_px: float | None = None


@dataclass(frozen=True)
class _HalfContext:
    """What every chunk of one half needs: its map's padded transform, the
    configuration, the Fourier points read, the half maps' FSC, the search and the
    score (``ccc`` or ``frc``)."""

    volume_ft: object
    cfg: RefineConfig
    points: FourierPoints
    fsc_curve: np.ndarray | None
    search: Search
    score: str


@dataclass(frozen=True)
class _Chunk:
    """A chunk of particles: their metadata (CTF, pixel size), the images searched
    (the particles or their ``--usefilt`` copies), and their poses so far (rotations,
    shifts in px)."""

    meta: object
    images: ParticleStack
    rotations: np.ndarray
    shifts_px: np.ndarray


def search_chunk(ctx: _HalfContext, chunk: _Chunk):
    """One chunk of :func:`local_poses`: :func:`~cryorefine.align.local.local_search`'s
    result for its particles."""
    stack = chunk.images.with_meta(chunk.meta)
    box, apix, k = stack.box, stack.apix, len(stack)
    every = np.arange(k)
    ctf = chunk.meta.ctf.evaluate(box, apix) if chunk.meta.ctf.known.all() else None
    images = chunk.images.read()
    chunk.images.release()
    return local_search(
        ctx.volume_ft,
        images,
        np.ones((k, box, box // 2 + 1), np.float32) if ctf is None else ctf,
        chunk.rotations,
        chunk.shifts_px,
        ring_weights(ctx.cfg, stack, every, ctx.points, ctx.fsc_curve, ctf),
        ctx.points,
        range_deg=ctx.search.range_deg,
        step_deg=ctx.search.step_deg,
        shift_px=ctx.search.shift_px,
        score=ctx.score,
    )


def band_limit(fsc_curve: np.ndarray | None, box: int) -> int:
    """The last ring the search reads: two past the last where ``fsc_curve`` (shells
    0 .. box // 2) is above :data:`FSC_FLOOR`; the Nyquist ring without a curve."""
    top = box // 2 - 1
    if fsc_curve is None:
        return top
    above = np.flatnonzero(np.asarray(fsc_curve) > FSC_FLOOR)
    return int(min(top, (above[-1] if len(above) else 1) + 2))


def ring_weights(
    cfg: RefineConfig,
    stack: ParticleStack,
    idx: np.ndarray,
    points: FourierPoints,
    fsc_curve: np.ndarray | None,
    ctf: np.ndarray | None,
) -> np.ndarray:
    """Each particle's ring weights ``(len(idx), points.rings)`` for the score (module
    docstring); ``ctf``: the particles' CTFs on the ``rfft2`` grid (``None``: without
    CTF). Ring 0 weighs nothing."""
    box, apix, rings = stack.box, stack.apix, points.rings
    count = np.bincount(points.ring, minlength=rings).astype(np.float64)
    if cfg.localrefine_mod.score == "simcmp":
        cmp = cfg.simmx.cmp_mod
        if cmp.name == "ccc":
            w = np.broadcast_to(count, (len(idx), rings)).copy()
        else:
            snr = ctf_snr(stack.meta, idx, box, apix) if cmp.params["snrweight"] else None
            w = frc_ring_weights(cmp.params, len(idx), box, apix, snr)
            w = np.pad(w, ((0, 0), (0, max(0, rings - w.shape[1]))))[:, :rings]
    else:
        if ctf is not None:
            c2 = ring_mean(ctf.astype(np.float64) ** 2)[:, :rings]
        else:
            c2 = np.ones((len(idx), rings))
        f = np.ones(rings) if fsc_curve is None else np.asarray(fsc_curve, np.float64)[:rings]
        f = np.clip(f, 0.0, 0.999)
        w = count[None] * c2 * (f / (1.0 - f))[None]
    w[:, 0] = 0.0
    return w


def direction_groups(
    rotations: np.ndarray, grid: np.ndarray, sym: str, chunk: int = 4096
) -> np.ndarray:
    """The index into ``grid`` ``(Nr, 3, 3)`` of the projection direction nearest each
    rotation's ``(k, 3, 3)``, over the symmetry copies of ``sym`` and the mirror
    (viewing direction ``R^T e_z``)."""
    ops = symmetry_group(sym).operators
    grid_dirs = grid[:, 2, :]  # (Nr, 3)
    out = np.empty(len(rotations), np.int64)
    for s in range(0, len(rotations), chunk):
        d = rotations[s : s + chunk, 2, :]  # (k, 3)
        copies = np.einsum("gba,kb->kga", ops, d)  # S^T d for each operator
        cos = np.abs(np.einsum("kga,ra->kgr", copies, grid_dirs)).max(axis=1)
        out[s : s + chunk] = cos.argmax(axis=1)
    return out


def local_poses(
    maps: list[np.ndarray],
    stack: ParticleStack,
    halves: list[np.ndarray],
    cfg: RefineConfig,
    rotations: np.ndarray,
    shifts_a: np.ndarray,
    search: Search,
    fsc_curve: np.ndarray | None,
    *,
    usefilt: ParticleStack | None = None,
    progress: Callable[[str, int, int], Callable[[int], None]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each particle's refined rotation ``(Np, 3, 3)``, shift ``(Np, 2)`` (Å) and score
    (higher is better), each half against its own map, chunk by chunk (``usefilt``:
    the copies searched instead of the particles)."""
    apix, box = stack.apix, stack.box
    points = FourierPoints.of(box, band_limit(fsc_curve, box))
    score_kind = (
        "frc"
        if (cfg.localrefine_mod.score == "simcmp" and cfg.simmx.cmp_mod.name == "frc")
        else "ccc"
    )
    new_rot = np.array(rotations, np.float64, copy=True)
    new_shift = np.asarray(shifts_a, np.float64) / apix
    score = np.full(len(stack), np.nan)
    source = usefilt or stack
    chunk = parallel.chunk_size(
        len(stack) // len(halves), max(16, int(memory.budget("local") // (12 * box * box)))
    )
    for h, idx in enumerate(halves):
        shared = _HalfContext(
            prepare_volume(np.asarray(maps[h], np.float32)),
            cfg,
            points,
            fsc_curve,
            search,
            score_kind,
        )
        tick = progress("local", h, len(idx)) if progress else None
        subs = [idx[start : start + chunk] for start in range(0, len(idx), chunk)]
        items = (
            _Chunk(stack.take(sub).meta, source.take(sub), new_rot[sub], new_shift[sub])
            for sub in subs
        )
        for sub, res in zip(subs, parallel.map_chunks(search_chunk, shared, items), strict=True):
            new_rot[sub], new_shift[sub], score[sub] = res.rotations, res.shifts_px, res.score
            if tick:
                tick(len(sub))
    return new_rot, new_shift * apix, score


def group_directions(count: int, sym: str) -> np.ndarray:
    """About ``count`` rotations whose viewing directions spread evenly over the
    asymmetric unit of ``sym`` (at least one)."""
    gen = ORIENTGENS.parse(f"eman:n={max(1, count)}:perturb=0", option="groups")
    return orientations(gen, sym)


def kept_by_score(
    score: np.ndarray, rotations: np.ndarray, halves: list[np.ndarray], cfg: RefineConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Which particles stay (module docstring) and each one's group (0-based)."""
    ca = cfg.classaverage
    keep = np.zeros(len(score), bool)
    group = np.zeros(len(score), np.int64)
    for idx in halves:
        grid = group_directions(round(len(idx) / GROUP_SIZE), cfg.sym)
        g = direction_groups(rotations[idx], grid, cfg.sym)
        keep[idx] = keep_members(-score[idx], g, keep=ca.keep, keepsig=ca.keepsig)
        group[idx] = g
    return keep, group


def run_local_step(
    maps: list[np.ndarray],
    stack: ParticleStack,
    halves: list[np.ndarray],
    cfg: RefineConfig,
    *,
    iteration: int,
    rotations: np.ndarray,
    shifts_a: np.ndarray,
    search: Search,
    fsc_curve: np.ndarray | None,
    usefilt: ParticleStack | None = None,
    progress: Callable[[str, int, int], Callable[[int], None]] | None = None,
) -> Step:
    """One local iteration: ``maps`` (one per half) against ``stack``'s particles, each
    starting from ``rotations`` ``(Np, 3, 3)`` and ``shifts_a`` ``(Np, 2)`` (Å); weights
    from ``fsc_curve`` (the half maps' FSC of the iteration before; module docstring)."""
    apix = stack.apix
    seconds = dict.fromkeys(LOCAL_STAGES, 0.0)
    with timed(seconds, "local"):
        new_rot, new_shift_a, score = local_poses(
            maps,
            stack,
            halves,
            cfg,
            rotations,
            shifts_a,
            search,
            fsc_curve,
            usefilt=usefilt,
            progress=progress,
        )
        keep, group = kept_by_score(score, new_rot, halves, cfg)
    with timed(seconds, "make3d"):
        volume, new_maps, info = reconstruct_from_particles(
            stack, halves, new_rot, new_shift_a, keep, cfg
        )
        volume, new_maps, curves, mask = finish_maps(volume, new_maps, cfg, apix, iteration)
    return Step(
        rotations=new_rot,
        shifts_a=new_shift_a,
        score=-score,
        reason=np.where(keep, USED, CLASSKEEP),
        maps=new_maps,
        volume=volume,
        fsc=curves,
        mask=mask,
        info=info,
        goldstandard=cfg.goldstandard,
        search="local",
        range_deg=search.range_deg,
        group=group,
        seconds=seconds,
    )

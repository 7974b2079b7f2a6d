"""e2classaverage: each class's members aligned, scored, the worst left out, averaged.

For class ``c`` (one per reference projection) the members are the particles the
classification assigned to ``c`` (in any of their ``sep`` choices). Round 0 brings
each member onto the projection with the alignment the classification stored
(Choice, as modern EMAN2; e2refine's 2013 code re-aligned from scratch); rounds 1..
``iterations`` align every member to the class's current average. After each round
every member is scored against the average (``cmp``) and the members whose score is
beyond the class's threshold (``keep``/``keepsig``) are left out of the next average;
excluded members are still aligned and scored, and may return. The last average is
aligned to the projection (its power spectrum matched first) and the final average
is built from the members under "own transform, then that one", unmasked.

No particle is lost: a class of one member gives that member, aligned; every class
keeps at least its best member; an empty class gives a zero image with
``ptcl_repr = 0``. Classes are processed in chunks whose members fit a memory budget;
within a chunk every step runs on all members of all its classes at once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryorefine import memory, parallel
from cryorefine.align.bank import release_pool
from cryorefine.align.compare import pair_context
from cryorefine.align.engine import EngineAligner, align_pairs
from cryorefine.align.transform2d import Transform2D
from cryorefine.config import ClassaverageConfig
from cryorefine.errors import CryorefineError
from cryorefine.fourier.filters import match_power_spectrum
from cryorefine.fourier.fsc import fsc
from cryorefine.io.atomic import check_output
from cryorefine.io.eman2 import HdfStackWriter, projection_transform
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.stacks import ParticleStack, write_stack
from cryorefine.processors.mask import auto_mask_2d, centred_radius, soft_sphere
from cryorefine.processors.normalize import normalize_circlemean
from cryorefine.registry import ALIGNERS, COMPARATORS
from cryorefine.stages.classify import (
    CLASSMX_FIELDS,
    ClassMx,
    grouped,
    read_classmx,
    write_classmx,
)
from cryorefine.stages.simmx import ctf_snr, runs_on_engine, signal_power

#: ``n x n`` float32 images held per member while its class is averaged: its image, its
#: aligned copy, the alignment's and the averager's working arrays (measured with
#: tracemalloc: 13.7 at 64 px, 10-12 at 128 px); one more for a --usefilt copy and one
#: for --prefilt
IMAGES_PER_MEMBER = 14
#: the refining aligner of the fixed recipe that brings each final average onto its
#: projection (after rotate_translate_flip on the batched engine; e2classaverage)
FINAL_REFINE = "refine"


@dataclass
class ClassAverages:
    """Class averages ``(Nc, n, n)`` and how each was made.

    Per class: ``ptcl_repr`` (members in the final average), ``qual`` and
    ``qual_sigma`` (mean and standard deviation of the members' scores in the last
    round). Per member ``m`` (one row per particle and class it belongs to, sorted by
    class then particle): ``particle``, ``cls``, ``used`` (in the final average), the
    final particle -> average transform ``alpha`` (degrees), ``tx``, ``ty`` (px),
    ``mirror``, the last round's ``score`` and the classification's ``column`` (choice)
    it comes from.
    """

    images: np.ndarray
    ptcl_repr: np.ndarray
    qual: np.ndarray
    qual_sigma: np.ndarray
    particle: np.ndarray
    cls: np.ndarray
    used: np.ndarray
    alpha: np.ndarray
    tx: np.ndarray
    ty: np.ndarray
    mirror: np.ndarray
    score: np.ndarray
    column: np.ndarray

    def result_classmx(self, cm: ClassMx) -> ClassMx:
        """``cm`` updated as e2classaverage ``--resultmx`` writes it: in the column of
        each membership, weight 1 (in the final average) or 0 (excluded) and the final
        particle -> average transform (written for excluded members too)."""
        out = ClassMx(*(np.array(getattr(cm, f), copy=True) for f in CLASSMX_FIELDS))
        p, col = self.particle, self.column
        out.weight[p, col] = self.used.astype(np.float32)
        out.dx[p, col], out.dy[p, col] = self.tx, self.ty
        out.dalpha[p, col], out.flip[p, col] = self.alpha, self.mirror.astype(np.float32)
        return out

    @property
    def transform(self) -> Transform2D:
        """Each member's final particle -> average transform."""
        return Transform2D(self.alpha, self.tx, self.ty, self.mirror)

    def members(self, c: int, *, used: bool | None = True) -> np.ndarray:
        """Particles of class ``c`` (``used``: only those in the average; ``False``: only
        the excluded; ``None``: all)."""
        sel = self.cls == c
        if used is not None:
            sel &= self.used == used
        return self.particle[sel]


def class_members(cm: ClassMx, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (particle, class) membership of a classification, sorted by class then
    particle, with the choice column it comes from: ``(particle, cls, column)``."""
    n_p, sep = cm.cls.shape
    particle = np.repeat(np.arange(n_p), sep)
    column = np.tile(np.arange(sep), n_p)
    cls = cm.cls.ravel().astype(np.int64)
    keep = (cls >= 0) & (cls < n_classes)
    particle, cls, column = particle[keep], cls[keep], column[keep]
    order = np.lexsort((particle, cls))
    return particle[order], cls[order], column[order]


def keep_members(score: np.ndarray, cls: np.ndarray, *, keep: float, keepsig: bool) -> np.ndarray:
    """Which members stay, class by class (e2classaverage ``--keep``; scores: smaller is
    better). Fraction: exactly ``max(1, round(n keep))`` best of a class's ``n``
    (Choice; EMAN2 keeps ``floor(n keep) + 1``). ``keepsig``: those within
    ``mean + keep sigma`` of the class's scores. The best member always stays."""
    order = np.lexsort((score, cls))
    sc, cl = score[order], cls[order]
    starts = np.flatnonzero(np.r_[True, cl[1:] != cl[:-1]])
    counts = np.diff(np.r_[starts, len(cl)])
    rank = np.arange(len(cl)) - np.repeat(starts, counts)
    n_c = np.repeat(counts, counts)
    if keepsig:
        sums = np.add.reduceat(sc, starts) if len(sc) else np.zeros(0)
        sq = np.add.reduceat(sc * sc, starts) if len(sc) else np.zeros(0)
        mu = np.repeat(sums / counts, counts)
        sigma = np.sqrt(np.maximum(np.repeat(sq / counts, counts) - mu * mu, 0.0))
        stay = (sc <= mu + keep * sigma) | (rank == 0)
    else:
        stay = rank < np.maximum(1, np.round(n_c * keep))
    out = np.empty(len(score), bool)
    out[order] = stay
    return out


def _soft_circle(n: int) -> np.ndarray:
    """e2classaverage's mask between rounds: 1 within ``n//2 - g``, then
    ``exp(-(r - inner)^2 / (g / 1.3)^2)``, ``g = max(5, n // 12)``."""
    g = max(5, n // 12)
    return soft_sphere(centred_radius(n, 2), n // 2 - g, g / 1.3).astype(np.float32)


def _circlemean(images: np.ndarray) -> np.ndarray:
    """normalize.circlemean on a stack (zero images stay zero)."""
    return normalize_circlemean(images, ndim=2, apix=None)


def _align(cfg: ClassaverageConfig, moving_idx, moving, targets, target_idx, ctx) -> Transform2D:
    """Transforms bringing ``moving[moving_idx]`` onto ``targets[target_idx]`` (particle ->
    average), by ``cfg``'s aligner then its refining aligner. ``cfg.prefilt``: each
    target is first filtered to its member's power spectrum."""
    align, aligncmp = cfg.align_mod, cfg.aligncmp_mod
    if cfg.prefilt:  # each member's own copy of its target, matched to its spectrum
        targets = match_power_spectrum(targets[target_idx], moving[moving_idx])
        target_idx = np.arange(len(targets))
    if runs_on_engine(align):
        # the engine moves "references" onto "particles": the averages onto the members,
        # then inverted (as simmx stores particle -> projection)
        aligner = EngineAligner.from_modifier(align, aligncmp)
        pa = align_pairs(targets, moving, moving_idx, target_idx, aligner, ctx=ctx)
        fwd = pa.transform.inverse()
    else:
        fwd = _per_pair(align, aligncmp, moving, moving_idx, targets, target_idx, ctx)
    if cfg.ralign_mod is not None:
        fwd = _per_pair(
            cfg.ralign_mod, cfg.raligncmp_mod, moving, moving_idx, targets, target_idx, ctx, fwd
        )
    return fwd


def _per_pair(
    aligner, cmp, moving, moving_idx, targets, target_idx, ctx, start: Transform2D | None = None
) -> Transform2D:
    """A registered aligner on the pairs (``moving[moving_idx]``, ``targets[target_idx]``),
    seeded with ``start`` when given; its forward transforms."""
    kw = {k: v for k, v in aligner.params.items() if v is not None}
    if start is not None:
        kw["start"] = start
    res = aligner.entry.func(
        moving[moving_idx], targets[target_idx], cmp=cmp, **kw, **pair_context(ctx, moving_idx)
    )
    return res.transform


def classaverage(
    particles: np.ndarray | ParticleStack,
    cm: ClassMx,
    refs: np.ndarray | None,
    cfg: ClassaverageConfig,
    *,
    apix: float | None = None,
    meta: ParticleMetadata | None = None,
    n_classes: int | None = None,
    usefilt: np.ndarray | ParticleStack | None = None,
) -> ClassAverages:
    """Average every class of ``cm`` (see the module docstring).

    ``particles`` ``(Np, n, n)`` with ``apix`` (and ``meta`` for CTF-derived SNR weights
    of ``snrweight`` comparators), or a :class:`ParticleStack`; ``refs`` ``(Nc, n, n)``:
    the projections, image ``c`` the reference of class ``c`` (``None``: round 0 starts
    from the mean of the members under their stored alignment, and the final average is
    not aligned to anything). ``n_classes`` defaults to the number of projections.
    ``usefilt``: the same particles (e.g. filtered) used for every alignment and score;
    the final average takes ``particles``.
    """
    stack = ParticleStack.from_input(particles, apix=apix, meta=meta, who="classaverage")
    align_stack = (
        stack
        if usefilt is None
        else ParticleStack.from_input(usefilt, apix=stack.apix, meta=stack.meta, who="--usefilt")
    )
    if len(align_stack) != len(stack) or align_stack.box != stack.box:
        raise CryorefineError(
            f"--usefilt {align_stack.label}: {len(align_stack)} images of {align_stack.box} px; "
            f"the particles are {len(stack)} of {stack.box} px"
        )
    if cm.cls.shape[0] != len(stack):
        raise CryorefineError(
            f"classification of {cm.cls.shape[0]} particles, the stack holds {len(stack)}"
        )
    n, apix = stack.box, stack.apix
    if refs is not None:
        refs = np.asarray(refs, np.float32)
        if refs.shape[-1] != n:
            raise CryorefineError(f"projections of {refs.shape[-1]} px, particles of {n} px")
    nc = n_classes if n_classes is not None else (len(refs) if refs is not None else 0)
    if nc == 0:
        nc = int(cm.cls.max()) + 1 if cm.cls.size else 0
    particle, cls, column = class_members(cm, nc)
    m = len(particle)
    out = ClassAverages(
        np.zeros((nc, n, n), np.float32),
        np.zeros(nc, np.int64),
        np.zeros(nc),
        np.zeros(nc),
        particle,
        cls,
        np.zeros(m, bool),
        np.zeros(m),
        np.zeros(m),
        np.zeros(m),
        np.zeros(m, bool),
        np.zeros(m),
        column,
    )
    signal = None
    if cfg.needs_snr:
        signal = signal_power(refs) if refs is not None else None
    per_member = 4 * n * n * (IMAGES_PER_MEMBER + (usefilt is not None) + cfg.prefilt)
    budget = parallel.chunk_size(m, max(1, memory.budget("classaverage") // per_member))
    bounds = np.r_[0, np.flatnonzero(np.diff(cls)) + 1, m]  # class boundaries
    slices: list[slice] = []
    start = 0
    while start < len(bounds) - 1:
        stop = start + 1
        while stop < len(bounds) - 1 and bounds[stop + 1] - bounds[start] <= budget:
            stop += 1
        slices.append(slice(bounds[start], bounds[stop]))
        start = stop

    def item(sl: slice) -> _ClassChunk:
        uniq, inverse = np.unique(particle[sl], return_inverse=True)
        rows, cols = particle[sl], column[sl]
        moves = Transform2D(
            cm.dalpha[rows, cols].astype(np.float64),
            cm.dx[rows, cols].astype(np.float64),
            cm.dy[rows, cols].astype(np.float64),
            cm.flip[rows, cols] > 0.5,
        )
        align = None if align_stack is stack else align_stack.take(uniq)
        return _ClassChunk(stack.take(uniq), align, inverse, cls[sl], moves)

    shared = _ClassContext(cfg, refs, signal)
    results = parallel.map_chunks(average_chunk, shared, (item(sl) for sl in slices))
    for sl, res in zip(slices, results, strict=True):
        classes = res.classes
        out.images[classes], out.ptcl_repr[classes] = res.images, res.counts
        out.qual[classes], out.qual_sigma[classes] = res.qual, res.qual_sigma
        out.used[sl], out.score[sl] = res.used, res.score
        out.alpha[sl], out.tx[sl] = res.moves.alpha, res.moves.tx
        out.ty[sl], out.mirror[sl] = res.moves.ty, res.moves.mirror
    release_pool()
    return out


@dataclass(frozen=True)
class _ClassContext:
    """What every chunk of classes needs: the configuration, the projections (class
    ``c``'s reference is image ``c``; ``None``: none) and the signal's ring power."""

    cfg: ClassaverageConfig
    refs: np.ndarray | None
    signal: np.ndarray | None


@dataclass(frozen=True)
class _ClassChunk:
    """Whole classes: their distinct particles (``stack``; ``align``: their
    ``--usefilt`` copies, ``None`` without), and per member its particle's row in
    ``stack`` (``source``), its class and its classification alignment (round 0)."""

    stack: ParticleStack
    align: ParticleStack | None
    source: np.ndarray
    cls: np.ndarray
    moves: Transform2D


@dataclass(frozen=True)
class _ClassResult:
    """A chunk's averages (``classes`` numbers them), member counts and score
    statistics; per member whether it is used, its final transform and score."""

    classes: np.ndarray
    images: np.ndarray
    counts: np.ndarray
    qual: np.ndarray
    qual_sigma: np.ndarray
    used: np.ndarray
    moves: Transform2D
    score: np.ndarray


def average_chunk(shared: _ClassContext, chunk: _ClassChunk) -> _ClassResult:
    """All classes of one chunk (:func:`classaverage`), on its own particles."""
    cfg, refs, signal = shared.cfg, shared.refs, shared.signal
    stack = chunk.stack
    align_stack = stack if chunk.align is None else chunk.align
    n, apix = stack.box, stack.apix
    inverse, cls, moves = chunk.source, chunk.cls, chunk.moves
    uniq = np.arange(len(stack))
    classes, slot = np.unique(cls, return_inverse=True)  # chunk-local class slots
    k = len(classes)

    def read(s: ParticleStack) -> np.ndarray:
        images = s.read(uniq)
        if cfg.normproc_mod is not None:
            images = cfg.normproc_mod(images, ndim=2, apix=apix)
        return np.ascontiguousarray(images, np.float32)

    p_img = read(align_stack)
    q_img = p_img if align_stack is stack else read(stack)
    stack.release()
    align_stack.release()
    snr = None
    if cfg.needs_snr:
        snr = ctf_snr(stack.meta, uniq, n, apix, signal)
        if snr is None:
            raise cfg.error(
                "{cmp} {0}: snrweight needs the particles' CTF ({1})", cfg.cmp, stack.label
            )
    ctx = {"apix": apix, "snr": snr}
    everyone = np.ones(len(inverse), bool)
    ctf = None
    if cfg.averager_mod.name.startswith("ctf."):
        if not stack.meta.ctf.take(uniq).known.all():
            raise cfg.error(
                "{averager} {0}: the particles have no CTF ({1})", cfg.averager, stack.label
            )
        ctf = stack.meta.ctf.take(uniq).evaluate(n, apix).astype(np.float32)

    def average(
        images: np.ndarray, transform: Transform2D, sel: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The averager over the members ``sel`` under ``transform``."""
        moved = transform.take(sel)
        return cfg.averager_mod(images, slot[sel], k, transform=moved, source=inverse[sel], ctf=ctf)

    ref = refs[classes] if refs is not None else None
    if ref is None:
        ref = average(p_img, moves, everyone)[0]
    mask = _soft_circle(n)
    used = everyone  # round 0 averages every member
    for it in range(cfg.iterations + 1):
        if it > 0:
            moves = _align(cfg, inverse, p_img, ref, slot, ctx)
        aligned = moves.apply(p_img, source=inverse)
        score = _scores(cfg, aligned, ref[slot], pair_context(ctx, inverse))
        avg, _ = average(p_img, moves, used)
        ref = _circlemean(avg) * mask
        if cfg.automask:  # the running average only; the final one stays unmasked
            ref *= auto_mask_2d(ref)
        # the members of the next round (and, after the last, of the final average)
        used = keep_members(score, slot, keep=cfg.keep, keepsig=cfg.keepsig)
    if refs is not None:  # the last average onto its projection, then composed
        target = refs[classes]
        filtered = match_power_spectrum(target, ref)
        final = _final_alignment(ref, filtered)
        moves = moves.then(final.take(slot))
    avg, counts = average(q_img, moves, used)
    if cfg.setsfref and refs is not None:
        has = counts > 0
        avg[has] = match_power_spectrum(avg[has], refs[classes][has])
    sums = np.bincount(slot, score, k)
    sq = np.bincount(slot, score * score, k)
    cnt = np.maximum(np.bincount(slot, minlength=k), 1)
    sigma = np.sqrt(np.maximum(sq / cnt - (sums / cnt) ** 2, 0.0))
    return _ClassResult(classes, avg, counts, sums / cnt, sigma, used, moves, score)


def _scores(cfg: ClassaverageConfig, aligned: np.ndarray, refs: np.ndarray, ctx: dict):
    """``cmp(aligned member, its class's average)`` for every member, in batches."""
    out = np.empty(len(aligned))
    batch = 1024
    for s0 in range(0, len(aligned), batch):
        rows = np.arange(s0, min(s0 + batch, len(aligned)))
        out[rows] = cfg.cmp_mod(aligned[rows], refs[rows], **pair_context(ctx, rows))
    return out


@functools.cache
def _ccc():
    return COMPARATORS.parse("ccc")


def _final_alignment(averages: np.ndarray, targets: np.ndarray) -> Transform2D:
    """Each average onto its (spectrum-matched) projection: rotate_translate_flip, then
    refine, both scored by ccc (e2classaverage's fixed recipe)."""
    ccc = _ccc()
    k = len(averages)
    idx = np.arange(k)
    pa = align_pairs(targets, averages, idx, idx, EngineAligner(ccc))
    polish = ALIGNERS.get(FINAL_REFINE).func
    res = polish(averages, targets, start=pa.transform.inverse(), cmp=ccc)
    return res.transform


#: rings of the running mean that smooths ``class_ssnr`` (EMAN2 2.99 e2classaverage)
SSNR_SMOOTHING = 9


def class_ssnr(average: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """EMAN2's ``class_ssnr`` of a class average (e2classaverage 2.99): its FRC with the
    reference projection per ring ``(n // 2 + 1,)``, smoothed by a 9-ring running mean
    (the end values repeated beyond the ends), as a pseudo-SSNR ``FRC / (1 - FRC)``.
    e2make3d's iterative insertion needs it on every average it reinserts."""
    frc = fsc(average, reference)
    half = SSNR_SMOOTHING // 2
    padded = np.concatenate([np.full(half, frc[0]), frc, np.full(half, frc[-1])])
    smooth = np.convolve(padded, np.ones(SSNR_SMOOTHING) / SSNR_SMOOTHING, mode="valid")
    return smooth / (1.0 - np.minimum(smooth, 0.999999))


def write_classes(
    path: Path,
    ca: ClassAverages,
    ref_rotations: np.ndarray | None,
    apix: float,
    *,
    references: np.ndarray | None = None,
    ptcl_src: str | None = None,
    ptcl_set: np.ndarray | None = None,
    projection_file: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the class averages, one per class number (``--storebad``), with how each was
    made.

    ``.hdf``, as e2classaverage writes it: float32, with EMAN2 headers
    (``xform.projection`` and ``model_id`` of the class's projection, which is image
    ``projection_image_idx`` of ``projection_image`` (``projection_file``), the
    projection the members were aligned to; ``ptcl_repr``; ``class_ptcl_idxs``,
    ``exc_class_ptcl_idxs``: 0-based particle numbers in ``class_ptcl_src``
    (``ptcl_src``, whose particles are ``ptcl_set``, by their numbers in ``ca``);
    ``class_ptcl_qual``, ``class_ptcl_qual_sigma``; ``class_ssnr`` against the
    ``references`` (:func:`class_ssnr`); the pixel size).
    ``.star`` (with ``.mrcs``) or ``.mrcs``: RELION 3.1 with the orientation,
    ``rlnClassNumber`` (1-based), ``rlnClassDistribution`` and our columns
    ``crPtclRepr`` (the average's weight in a reconstruction; make3d reads it),
    ``crClassQuality``, ``crClassPtclIdxs`` and ``crExcClassPtclIdxs`` (1-based member
    lists, ``-`` for none).
    """
    path = Path(path)
    n_r = len(ca.images)
    members = grouped(ca.particle[ca.used], ca.cls[ca.used], n_r)
    rejected = grouped(ca.particle[~ca.used], ca.cls[~ca.used], n_r)
    if path.suffix.lower() == ".hdf":
        if ptcl_set is not None:  # numbers in the set ptcl_src lists
            members = [np.searchsorted(ptcl_set, m) for m in members]
            rejected = [np.searchsorted(ptcl_set, m) for m in rejected]
        headers = []
        for c in range(n_r):
            h = {
                "apix_x": apix,
                "apix_y": apix,
                "apix_z": apix,
                "ptcl_repr": int(ca.ptcl_repr[c]),
                "class_ptcl_qual": float(ca.qual[c]),
                "class_ptcl_qual_sigma": float(ca.qual_sigma[c]),
                "class_ptcl_idxs": [int(p) for p in members[c]],
                "exc_class_ptcl_idxs": [int(p) for p in rejected[c]],
            }
            if ptcl_src is not None:
                h["class_ptcl_src"] = ptcl_src
            if ref_rotations is not None and ca.ptcl_repr[c] > 0:
                # a blank average has none, so that e2make3d skips it (spec ch04 §4.1.7)
                h["xform.projection"] = projection_transform(ref_rotations[c], np.zeros(2))
                h["model_id"] = 0
            if references is not None and ca.ptcl_repr[c] > 0:
                h["class_ssnr"] = class_ssnr(ca.images[c], references[c])
            if projection_file is not None:
                h["projection_image"] = projection_file
            h["projection_image_idx"] = c
            headers.append(h)
        with HdfStackWriter(path, overwrite=overwrite) as w:
            w.append(ca.images, headers)
        return [path]
    meta = ParticleMetadata.empty(n_r, apix=apix)
    if ref_rotations is not None:
        meta.rotations = np.asarray(ref_rotations, np.float64)
    meta.class_number = np.arange(n_r)
    meta.weight = ca.ptcl_repr.astype(np.float64)

    def listed(groups: list[np.ndarray]) -> np.ndarray:
        return np.array([",".join(str(p + 1) for p in g) or "-" for g in groups], dtype=object)

    meta.extra = {
        "rlnClassDistribution": ca.ptcl_repr / max(int(ca.ptcl_repr.sum()), 1),
        "crPtclRepr": ca.ptcl_repr,
        "crClassQuality": ca.qual,
        "crClassPtclIdxs": listed(members),
        "crExcClassPtclIdxs": listed(rejected),
    }
    stack = ParticleStack.from_arrays(ca.images, apix=apix, meta=meta)
    return write_stack(stack, path, overwrite=overwrite)


def run_classaverage(
    input_path: Path,
    classmx_path: Path,
    output: Path,
    cfg: ClassaverageConfig,
    *,
    ref: Path | None = None,
    resultmx: Path | None = None,
    usefilt: Path | None = None,
    apix: float | None = None,
    overwrite: bool = False,
) -> ClassAverages:
    """Read the particles, classification and projections; average (:func:`classaverage`);
    write the averages (:func:`write_classes`) and, with ``resultmx``, the updated
    classification (used flags and final alignments, e2classaverage ``--resultmx``)."""
    for p in (output, resultmx):
        if p is not None:
            check_output(p, overwrite=overwrite)
    cm = read_classmx(classmx_path)
    stack = ParticleStack.from_path(input_path, apix=apix)
    filt = refs = None
    try:
        refs_images = rotations = None
        if ref is not None:
            refs = ParticleStack.from_path(ref, apix=stack.apix)
            if refs.box != stack.box:
                raise CryorefineError(
                    f"--ref {ref}: {refs.box} px; the particles ({input_path}) are {stack.box} px"
                )
            refs_images = refs.read()
            if refs.meta.has_orientation.all():
                rotations = refs.meta.rotations
        if usefilt is not None:
            filt = ParticleStack.from_path(usefilt, apix=stack.apix)
        n_classes = len(refs_images) if refs_images is not None else None
        ca = classaverage(stack, cm, refs_images, cfg, n_classes=n_classes, usefilt=filt)
        write_classes(
            output,
            ca,
            rotations,
            stack.apix,
            references=refs_images,
            ptcl_src=str(input_path),
            projection_file=None if ref is None else str(ref),
            overwrite=overwrite,
        )
        if resultmx is not None:
            write_classmx(resultmx, ca.result_classmx(cm), len(ca.images), overwrite=overwrite)
    finally:
        for s in (stack, filt, refs):
            if s is not None:
                s.close()
    return ca

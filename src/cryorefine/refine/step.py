"""One iteration of the refinement on arrays, for one chain or two gold-standard halves.

Each half (or the single chain of ``--goldstandard 0``) projects its own map over its
own set of orientations drawn for the iteration (:func:`half_orientations`), scores its
own particles against its projections, and averages its classes. The similarity and
classification matrices cover every particle (each row scored against its own half's
projections), so that they are one file each, as in e2refine. The map is reconstructed
from the particles (every particle kept by class averaging, at its assigned orientation
and shift, with its CTF; the two halves share one pass, spec ch04 §4.5) or from the
class averages (each half's own, weighted by ``ptcl_repr``, as e2refine). The half maps'
FSC is reported under a soft mask, corrected by noise substitution.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from cryorefine.config import RefineConfig
from cryorefine.errors import CryorefineError
from cryorefine.fourier.filters import lowpass_gauss, randomise_phases
from cryorefine.fourier.fsc import HalfMapFsc, fsc, noise_substituted_fsc
from cryorefine.fourier.reconstruct import apply_wiener_gain
from cryorefine.geometry.orientations import orientations
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.stacks import ParticleStack
from cryorefine.processors.mask import auto_mask, soft_edge_mask
from cryorefine.processors.normalize import normalize_bymass
from cryorefine.stages.classaverage import ClassAverages, classaverage
from cryorefine.stages.classify import ClassMx, assigned_poses, classify, classify_file
from cryorefine.stages.make3d import make3d, postprocess
from cryorefine.stages.project3d import project3d
from cryorefine.stages.simmx import FIELDS as SIMMX_FIELDS
from cryorefine.stages.simmx import WORST, Simmx, simmx_rows, simmx_writer

#: every stage an iteration may run: a global one all but ``local``, a local one
#: ``local`` and ``make3d`` (:data:`GLOBAL_STAGES`, :data:`LOCAL_STAGES`)
STAGES = ("project3d", "simmx", "classify", "classaverage", "local", "make3d")
GLOBAL_STAGES = ("project3d", "simmx", "classify", "classaverage", "make3d")
LOCAL_STAGES = ("local", "make3d")
#: why a particle is not in the map (``Step.reason``; 0: it is)
REASONS = ("used", "classkeep", "m3dkeep")
USED, CLASSKEEP, M3DKEEP = range(3)
#: resolution of the low-pass before the soft mask of the masked half-map FSC (Å)
MASK_LOWPASS_A = 15.0
#: growth of the FSC mask's region (Å) and the width of its raised-cosine edge (Å)
FSC_MASK_EXTEND_A = 6.0
FSC_MASK_SOFT_EDGE_A = 24.0


@dataclass
class Step:
    """What one iteration produced (arrays over all ``Np`` particles unless stated).

    ``ref_rotations`` ``(Nr, 3, 3)``, ``projections``, ``classes``: one per half (one
    for a single chain; :func:`half_orientations`); ``sim``, ``cm`` (the
    classification) and ``resultmx`` (class averaging's: used flags and final
    alignments); ``rotations`` ``(Np, 3, 3)``, ``shifts_a`` ``(Np, 2)`` (Å) and
    ``score`` of each particle's best projection; ``reason``: 0 if in the map, else
    an index into :data:`REASONS`; ``maps``: each half's map (the one it projects next);
    ``volume``: the combined map; ``fsc``: the gold-standard curves of the half maps
    (unmasked, masked, phase-randomised and corrected; ``None`` without half maps);
    ``mask``: the FSC's soft mask; ``goldstandard``: whether the particles were refined
    in two halves (``RefineConfig.goldstandard``); ``seconds``: per stage.

    A local iteration (``search`` ``"local"``, radius ``range_deg``) has no projections,
    matrices or classes (``None``, empty lists); its ``score`` is the local search's,
    negated (smaller is better, as simmx's), and ``group`` each particle's projection
    direction (:mod:`cryorefine.refine.local`).
    """

    rotations: np.ndarray
    shifts_a: np.ndarray
    score: np.ndarray
    reason: np.ndarray
    maps: list[np.ndarray]
    volume: np.ndarray
    fsc: HalfMapFsc | None
    mask: np.ndarray | None
    info: dict
    goldstandard: bool
    ref_rotations: list[np.ndarray] = field(default_factory=list)
    projections: list[np.ndarray] = field(default_factory=list)
    sim: Simmx | None = None
    cm: ClassMx | None = None
    resultmx: ClassMx | None = None
    classes: list[ClassAverages] = field(default_factory=list)
    search: str = "global"
    range_deg: float | None = None
    group: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this iteration ran."""
        return LOCAL_STAGES if self.search == "local" else GLOBAL_STAGES

    @property
    def class_number(self) -> np.ndarray:
        """Each particle's class (0-based projection; a local iteration's: its group)."""
        return self.group if self.cm is None else self.cm.cls[:, 0]


def check_inires(inires_a: float, apix: float) -> None:
    """Refuse an ``--inires`` finer than Nyquist (``2 apix`` Å)."""
    if not 2 * apix <= inires_a:
        raise CryorefineError(f"--inires {inires_a:g} Å is finer than Nyquist ({2 * apix:g} Å)")


def gold_standard_starts(
    volume: np.ndarray, *, apix: float, inires_a: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The starting maps of the two half refinements (``--goldstandard``).

    Each is ``volume`` low-passed to ``inires_a`` Å (Gaussian, gain 1/e there) with its
    phases randomised beyond that resolution, independently for each half, so that the
    halves share no noise beyond it (RELION's practice).
    """
    check_inires(inires_a, apix)
    cut = apix / inires_a  # cycles/pixel
    low = lowpass_gauss(np.asarray(volume, np.float32), cut, 3)
    return randomise_phases(low, cut, 3, rng), randomise_phases(low, cut, 3, rng)


def half_sets(meta: ParticleMetadata, rng: np.random.Generator) -> np.ndarray:
    """Each particle's half set, 1 or 2: the file's (``rlnRandomSubset``) when every
    particle has one, else a random, balanced split (``rng``)."""
    given = np.asarray(meta.half_set, np.int64)
    if len(given) and np.isin(given, (1, 2)).all():
        return given.copy()
    return rng.permutation(np.arange(len(given)) % 2) + 1


def iteration_seed(seed: int, iteration: int) -> list[int]:
    """The random-number seed of one iteration; a stream is this plus its own number
    (each half's orientations: the half's index; the FSC's phase randomisation: 9)."""
    return [int(seed), int(iteration), 0x5EED]


def half_orientations(cfg: RefineConfig, iteration: int, n_halves: int) -> list[np.ndarray]:
    """The orientations each half (or the single chain) projects its map over.

    Each gold-standard half draws its own set from ``--orientgen`` (seeded by the run's
    seed, the iteration and the half) and turns it by a rotation of its own that keeps
    the set a sampling of the asymmetric unit: any rotation in C1 (or with
    ``breaksym``), one about the symmetry axis in Cn, none in the other groups (there the
    perturbation alone differs). Halves that assigned their particles to one grid would
    share its discretisation error, which correlates the half maps beyond what the data
    hold and makes the half-map FSC optimistic (Choice). A single chain, and a grid
    limited by ``alt_min``/``alt_max``, keep the generator's own orientations; sets
    that come out of different sizes give way to the first half's, for both.
    """
    p3 = cfg.project3d
    mod = p3.orientgen_mod
    group = symmetry_group(p3.sym)
    limited = mod.params.get("alt_min", 0.0) != 0.0 or mod.params.get("alt_max", 180.0) != 180.0
    sets = []
    for h in range(n_halves):
        rng = np.random.default_rng([*iteration_seed(cfg.seed, iteration), h])
        rots = orientations(mod, group, rng=rng)
        if n_halves > 1 and not limited:
            if group.order == 1 or mod.params.get("breaksym"):
                rots = rots @ Rotation.random(random_state=rng).as_matrix()
            elif group.kind == "c":
                rots = rots @ Rotation.from_euler("z", rng.uniform(0, 2 * np.pi)).as_matrix()
        sets.append(rots)
    if len({len(r) for r in sets}) > 1:  # e.g. breaksym's hemisphere cut of a perturbed grid
        sets = [sets[0]] * n_halves
    return sets


def fsc_mask(
    volume: np.ndarray,
    apix: float,
    *,
    extend_a: float = FSC_MASK_EXTEND_A,
    soft_edge_a: float = FSC_MASK_SOFT_EDGE_A,
) -> np.ndarray:
    """The soft mask of the masked half-map FSC (``fsc_mask_NN.mrc``).

    The region: ``volume`` low-passed to 15 Å, above a fifth of its maximum, flood-filled
    from the centre. It is grown by ``extend_a`` Å and given a raised-cosine edge of
    ``soft_edge_a`` Å (:func:`soft_edge_mask`).
    """
    n = volume.shape[-1]
    low = lowpass_gauss(np.asarray(volume, np.float32), min(0.5, apix / MASK_LOWPASS_A), 3)
    region = auto_mask(low, float(0.2 * low.max()), n / 4, 0, 0, 1) > 0.5
    return soft_edge_mask(region, extend_a / apix, soft_edge_a / apix)


def fsc_filter(volume: np.ndarray, half_fsc: np.ndarray) -> np.ndarray:
    """``volume`` multiplied in Fourier space by ``sqrt(2 FSC / (1 + FSC))`` per shell
    (0 where the FSC is not positive): the gold-standard map's filter (spec §4.5)."""
    h = np.clip(np.asarray(half_fsc, np.float64), 0, 1)
    return apply_wiener_gain(volume, np.sqrt(2 * h / (1 + h)))


def start_maps(
    model: np.ndarray, cfg: RefineConfig, apix: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """The maps iteration 0 projects: the gold-standard halves' phase-randomised starts
    (:func:`gold_standard_starts`), or the model itself for a single chain."""
    if not cfg.goldstandard:
        return [model]
    return list(gold_standard_starts(model, apix=apix, inires_a=cfg.inires_a, rng=rng))


@contextmanager
def timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``seconds[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def project_halves(
    maps: list[np.ndarray], cfg: RefineConfig, iteration: int, apix: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """project3d: each half's orientations (:func:`half_orientations`) and its map's
    projections over them."""
    ref_rotations = half_orientations(cfg, iteration, len(maps))
    projections = [
        project3d(m, cfg.project3d, apix=apix, rotations=r)[0]
        for m, r in zip(maps, ref_rotations, strict=True)
    ]
    return ref_rotations, projections


def score_particles(
    projections: list[np.ndarray],
    stack: ParticleStack,
    halves: list[np.ndarray],
    cfg: RefineConfig,
    progress: Callable[[str, int, int], Callable[[int], None]] | None,
    *,
    out: list[Path] | None = None,
    headers: list[dict] | None = None,
) -> tuple[Simmx | None, ClassMx, np.ndarray]:
    """simmx and classify, chunk by chunk: each half's particles (``stack``: the
    particles, or their ``--usefilt`` copy) scored against its own projections, and
    each row classified as it comes.

    ``out``: one file per half, which gets the half's matrix (its particles in order:
    row ``i`` is particle ``halves[h][i]``) row chunk by row chunk, replacing one there,
    with ``headers[h]`` on its image 0; the matrix is then never whole in memory
    (``None`` is returned for it). Without ``out`` it is returned whole, rows in the
    stack's order. Returns the matrix, the classification (rows in the stack's order)
    and each particle's score for its first class. ``--simvec`` needs a half's class
    patterns: its rows are classified after, from the half's matrix.
    """
    n_p, nc = len(stack), len(projections[0])
    classify(Simmx.empty(0, nc), cfg.classify)  # --sep against the projections, first
    sim = None
    if out is None:
        sim = Simmx.empty(n_p, nc)
        sim.score[:] = WORST
    cm, best = ClassMx.empty(n_p, cfg.classify.sep), np.empty(n_p, np.float32)
    attrs = {"apix": stack.apix, "options": repr(cfg.simmx)}
    headers = headers or [{} for _ in halves]
    for h, idx in enumerate(halves):
        sink = (
            nullcontext(None)
            if out is None
            else simmx_writer(
                out[h],
                len(idx),
                nc,
                {**attrs, **headers[h]},
                overwrite=True,
            )
        )
        with sink as writer:
            tick = progress("simmx", h, len(idx)) if progress else None
            for rows, part in simmx_rows(projections[h], stack.take(idx), cfg.simmx, progress=tick):
                if writer is not None:
                    writer.write(rows, part)
                rows = idx[rows]
                if sim is not None:
                    for name in SIMMX_FIELDS:
                        getattr(sim, name)[rows] = getattr(part, name)
                if not cfg.classify.simvec:
                    sub = classify(part, cfg.classify)
                    cm.put(rows, sub)
                    best[rows] = np.take_along_axis(part.score, sub.cls[:, :1], axis=1)[:, 0]
        if cfg.classify.simvec:  # the half's own class patterns
            if out is not None:
                sub, best[idx] = classify_file(out[h], cfg.classify)
            else:
                half = Simmx(*(getattr(sim, name)[idx] for name in SIMMX_FIELDS))
                sub = classify(half, cfg.classify)
                best[idx] = np.take_along_axis(half.score, sub.cls[:, :1], axis=1)[:, 0]
            cm.put(idx, sub)
    return sim, cm, best


def classify_halves(
    files: list[Path], halves: list[np.ndarray], n_p: int, cfg: RefineConfig
) -> tuple[ClassMx, np.ndarray]:
    """:func:`classify_file` of each half's matrix file, in the stack's order: the
    classification and each particle's score for its first class."""
    cm, best = ClassMx.empty(n_p, cfg.classify.sep), np.empty(n_p, np.float32)
    for f, idx in zip(files, halves, strict=True):
        sub, best[idx] = classify_file(f, cfg.classify)
        cm.put(idx, sub)
    return cm, best


def average_classes(
    stack: ParticleStack,
    cm: ClassMx,
    projections: list[np.ndarray],
    halves: list[np.ndarray],
    cfg: RefineConfig,
    usefilt: ParticleStack | None,
    progress: Callable[[str, int, int], Callable[[int], None]] | None,
) -> tuple[list[ClassAverages], ClassMx, np.ndarray]:
    """classaverage per half: its averages, the classification updated with class
    averaging's used flags and final alignments (``--resultmx``), and whether each
    particle's first class kept it."""
    classes = []
    resultmx = ClassMx(*(np.array(a, copy=True) for a in vars(cm).values()))
    in_class = np.zeros(len(stack), bool)
    for h, idx in enumerate(halves):
        ca = classaverage(
            stack.take(idx),
            cm.rows(idx),
            projections[h],
            cfg.classaverage,
            n_classes=len(projections[h]),
            usefilt=None if usefilt is None else usefilt.take(idx),
        )
        ca.particle = idx[ca.particle]  # global particle numbers
        res = ca.result_classmx(cm)
        rows = np.unique(ca.particle)
        for name in ("weight", "dx", "dy", "dalpha", "flip"):
            getattr(resultmx, name)[rows] = getattr(res, name)[rows]
        first = ca.column == 0
        in_class[ca.particle[first]] = ca.used[first]
        classes.append(ca)
        if progress:
            progress("classaverage", h, len(idx))(len(idx))
    return classes, resultmx, in_class


def reconstruct_from_particles(
    stack: ParticleStack,
    halves: list[np.ndarray],
    rotations: np.ndarray,
    shifts_a: np.ndarray,
    in_class: np.ndarray,
    cfg: RefineConfig,
) -> tuple[np.ndarray, list[np.ndarray], dict]:
    """make3d from every particle kept (``in_class``) at its pose, with its CTF: the
    combined map, each half's map (one pass for both halves), and make3d's info."""
    n_p, apix, m3d = len(stack), stack.apix, cfg.make3d
    gold = cfg.goldstandard
    meta = stack.meta.take(np.arange(n_p))
    meta.rotations, meta.shift_a = rotations, shifts_a
    meta.weight = np.where(in_class, meta.weight, 0.0)
    labels = np.zeros(n_p, np.int64)
    if gold:
        for h, idx in enumerate(halves):
            labels[idx] = h + 1
    meta.half_set = labels
    volume, info = make3d(stack.with_meta(meta), m3d, keep_halves=gold)
    if not gold:
        return volume, [volume], info
    if info["half_maps"] is not None:
        return volume, [postprocess(m, m3d, apix) for m in info["half_maps"]], info
    half_maps = []  # too few particles to split inside make3d: one pass per half
    for idx in halves:
        half_meta = meta.take(np.arange(n_p))
        half_meta.weight = np.where(np.isin(np.arange(n_p), idx), meta.weight, 0.0)
        half_maps.append(make3d(stack.with_meta(half_meta), m3d)[0])
    return volume, half_maps, info


def reconstruct_from_classes(
    classes: list[ClassAverages],
    ref_rotations: list[np.ndarray],
    cfg: RefineConfig,
    *,
    apix: float,
    n_p: int,
) -> tuple[list[np.ndarray], dict, np.ndarray]:
    """make3d from each half's class averages at their projections' orientations,
    weighted by ``ptcl_repr`` (e2refine): each half's map, make3d's info, and which
    particles' classes ``--m3dkeep`` left out."""
    maps, excluded = [], np.zeros(n_p, bool)
    info: dict = {}
    for ca, class_rotations in zip(classes, ref_rotations, strict=True):
        cmeta = ParticleMetadata.empty(len(class_rotations), apix=apix)
        cmeta.rotations = class_rotations
        cmeta.weight = ca.ptcl_repr.astype(np.float64)  # empty classes: skipped
        averages = ParticleStack.from_arrays(ca.images, apix=apix, meta=cmeta)
        vol, info = make3d(averages, cfg.make3d)
        dropped = np.isin(ca.cls, info["excluded"]) & ca.used & (ca.column == 0)
        excluded[ca.particle[dropped]] = True
        maps.append(vol)
    return maps, info, excluded


def finish_maps(
    volume: np.ndarray,
    half_maps: list[np.ndarray],
    cfg: RefineConfig,
    apix: float,
    iteration: int,
    *,
    from_classes: bool = False,
) -> tuple[np.ndarray, list[np.ndarray], HalfMapFsc | None, np.ndarray | None]:
    """After make3d: with gold-standard halves, the FSC curves under the FSC mask (and,
    ``from_classes``, the map as the halves' FSC-weighted mean); then
    ``--m3dpostprocess2`` on the map and each half map. Returns the map, the half maps,
    the curves and the mask (``None`` without halves)."""
    curves = mask = None
    if cfg.goldstandard:
        # as make3d returns them: already in its soft sphere (a second one would add a
        # correlation of its own, as any mask does)
        half_fsc = fsc(half_maps[0], half_maps[1])
        if from_classes:
            volume = fsc_filter((half_maps[0] + half_maps[1]) / 2, half_fsc)
        mask = cfg.fscmask_map if cfg.fscmask_map is not None else fsc_mask(volume, apix)
        rng = np.random.default_rng([*iteration_seed(cfg.seed, iteration), 9])
        curves = noise_substituted_fsc(*half_maps, mask, rng=rng, unmasked=half_fsc)
    if cfg.postprocess2_mod is not None:
        volume = cfg.postprocess2_mod(volume, ndim=3, apix=apix)
        half_maps = [cfg.postprocess2_mod(m, ndim=3, apix=apix) for m in half_maps]
    return volume, half_maps, curves, mask


def run_step(
    maps: list[np.ndarray],
    stack: ParticleStack,
    halves: list[np.ndarray],
    cfg: RefineConfig,
    *,
    iteration: int,
    usefilt: ParticleStack | None = None,
    sim: Simmx | None = None,
    cm: ClassMx | None = None,
    simmx_files: list[Path] | None = None,
    simmx_headers: list[dict] | None = None,
    reuse_simmx: bool = False,
    progress: Callable[[str, int, int], Callable[[int], None]] | None = None,
    save: Callable[[str, object, int], None] | None = None,
) -> Step:
    """Run one iteration: ``maps`` (one per half) against ``stack``'s particles.

    ``halves``: the particle indices of each half (one array for a single chain).
    ``sim``/``cm``: a similarity or classification matrix already computed for this
    iteration, used instead of computing it again. ``simmx_files``: each half's
    similarity matrix is written there row chunk by row chunk, with
    ``simmx_headers[h]`` on its image 0, and never held whole (:func:`score_particles`;
    ``Step.sim`` is then ``None``); with ``reuse_simmx`` the files are complete
    already (a resumed run) and are classified from disk.
    ``progress(stage, half, total)`` returns a callback taking the count of particles
    just done; ``save("classify", matrix, n_projections)`` receives the classification
    as soon as it exists (a driver writes it, so that a resumed run can start after it).
    """
    n_p, apix = len(stack), stack.apix
    gold = cfg.goldstandard
    if len(halves) != len(maps) or len(halves) != (2 if gold else 1):
        raise ValueError(f"{len(maps)} maps and {len(halves)} halves for goldstandard={gold}")
    seconds = dict.fromkeys(STAGES, 0.0)
    with timed(seconds, "project3d"):
        ref_rotations, projections = project_halves(maps, cfg, iteration, apix)
    n_r = len(ref_rotations[0])
    best = None
    with timed(seconds, "simmx"):
        if cm is None and sim is None and not reuse_simmx:
            sim, cm, best = score_particles(
                projections,
                usefilt or stack,
                halves,
                cfg,
                progress,
                out=simmx_files,
                headers=simmx_headers,
            )
            if save:
                save("classify", cm, n_r)
    with timed(seconds, "classify"):
        if sim is None and best is None and reuse_simmx:  # each row's best score, too
            found, best = classify_halves(simmx_files, halves, n_p, cfg)
            if cm is None:
                cm = found
                if save:
                    save("classify", cm, n_r)
        if cm is None:
            cm = classify(sim, cfg.classify)
            if save:
                save("classify", cm, n_r)
        if best is None and sim is not None:
            best = np.take_along_axis(sim.score, cm.cls[:, :1], axis=1)[:, 0]
    with timed(seconds, "classaverage"):
        classes, resultmx, in_class = average_classes(
            stack, cm, projections, halves, cfg, usefilt, progress
        )
    with timed(seconds, "make3d"):
        rotations = np.empty((n_p, 3, 3))
        shifts_px = np.empty((n_p, 2))
        for h, idx in enumerate(halves):
            rotations[idx], shifts_px[idx] = assigned_poses(cm.rows(idx), ref_rotations[h])
        reason = np.where(in_class, USED, CLASSKEEP)
        if cfg.m3dsource == "particles":
            volume, new_maps, info = reconstruct_from_particles(
                stack, halves, rotations, shifts_px * apix, in_class, cfg
            )
        else:
            new_maps, info, excluded = reconstruct_from_classes(
                classes, ref_rotations, cfg, apix=apix, n_p=n_p
            )
            if gold:  # make3d's own split is of one half's class averages: not the halves'
                info = {**info, "half_fsc": None}
            reason[excluded & in_class] = M3DKEEP
            volume = new_maps[0]
        volume, new_maps, curves, mask = finish_maps(
            volume, new_maps, cfg, apix, iteration, from_classes=cfg.m3dsource == "classes"
        )
    score = np.full(n_p, np.nan) if best is None else best
    return Step(
        ref_rotations=ref_rotations,
        projections=projections,
        sim=sim,
        cm=cm,
        resultmx=resultmx,
        classes=classes,
        rotations=rotations,
        shifts_a=shifts_px * apix,
        score=score,
        reason=reason,
        maps=new_maps,
        volume=volume,
        fsc=curves,
        mask=mask,
        info=info,
        goldstandard=gold,
        seconds=seconds,
    )


def filtered(
    volume: np.ndarray, cfg: RefineConfig, apix: float, *, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """e2refine's ``threed_filt``: with ``--mass`` normalised by mass and, with
    ``--automask3d`` too, multiplied by the automask (``mask``, or computed from the
    normalised map); returns (map, mask or None). Without ``--mass`` the map itself
    (spec ch01 §5.3, Choice)."""
    if not cfg.mass_kda:
        return volume, None
    filt = normalize_bymass(volume, ndim=3, apix=apix, mass=cfg.mass_kda)
    if cfg.automask3d_mod is None:
        return filt, None
    if mask is None:
        mask = cfg.automask3d_mod(filt, ndim=3, apix=apix).astype(np.float32)
    return (filt * mask).astype(np.float32), mask

"""The files of a refinement folder (spec ch01 §4 and §7), each written atomically.

Per iteration ``NN`` (half files end ``_even``/``_odd``, as e2refine_easy names them,
for half sets 1 and 2; a single chain has no suffix):
``projections_NN[_half].mrcs/.star/.hdf``, ``simmx_NN[_half].hdf``,
``classify_NN[_half].hdf``, ``cls_result_NN[_half].hdf`` (EMAN2's matrices; rows
are the particles of ``particles[_half].lst``), ``classes_NN[_half].mrcs/.star/.hdf``,
``threed_NN.mrc`` (the combined map), ``threed_NN_even/odd.mrc`` (the half maps),
``threed_filt_NN.mrc`` (the map projected next by a single chain;
``--mass``/``--automask3d`` applied; with halves, ``threed_filt_NN_even/odd.mrc``
are what they project next),
``threed_mask_NN.mrc``, ``fsc_mask_NN.mrc`` (the soft mask of the masked half-map FSC),
``fsc_unmasked_NN.txt``, ``fsc_masked_NN.txt``, ``fsc_corrected_NN.txt`` and
``fsc_halves_NN.star`` (half maps; relion_postprocess's curves),
``fsc_xx_00.txt``/``fsc_MM_NN.txt`` (+ ``.star``: successive maps), and
``particles_NN.star``.

Once per run: ``particles[_half].lst`` (and ``usefilt[_half].lst``), the EMAN2 particle
sets the matrices and class averages number their particles by (each half's
particles in order, pointing into the input's images with their CTF), and, with
halves, ``threed_start_even/odd.mrc``, the maps iteration 0 projects.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.fourier.fsc import fsc, resolution_at
from cryorefine.io.eman2 import HdfStackWriter
from cryorefine.io.fsc_files import write_fsc_star, write_fsc_text
from cryorefine.io.lst import LstRecord, write_lst
from cryorefine.io.maps import Map, write_map
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.stacks import ParticleStack, eman_header, ref_path, write_stack
from cryorefine.io.star import write_particle_star
from cryorefine.refine.step import REASONS, Step
from cryorefine.stages.classaverage import write_classes
from cryorefine.stages.classify import ClassMx, read_classmx, write_classmx
from cryorefine.stages.simmx import ctf_snr, map_signal_power

HALF_NAMES = ("even", "odd")


def nn(iteration: int) -> str:
    """The iteration number as e2refine prints it (two digits at least)."""
    return f"{iteration:02d}"


def half_suffixes(gold: bool) -> tuple[str, ...]:
    return tuple(f"_{h}" for h in HALF_NAMES) if gold else ("",)


def iteration_file(path: Path, stem: str, iteration: int, ext: str, half: str = "") -> Path:
    """``path/STEM_NN[HALF]EXT``: the name of every per-iteration file is built here."""
    return path / f"{stem}_{nn(iteration)}{half}{ext}"


def map_paths(path: Path, iteration: int, gold: bool) -> list[Path]:
    """The maps iteration ``iteration`` leaves for the next to project, one per half."""
    if gold:
        return [iteration_file(path, "threed", iteration, ".mrc", s) for s in half_suffixes(True)]
    return [iteration_file(path, "threed_filt", iteration, ".mrc")]


def simmx_paths(path: Path, iteration: int, gold: bool) -> list[Path]:
    """Each half's similarity matrix (EMAN2 ``.hdf``)."""
    return [iteration_file(path, "simmx", iteration, ".hdf", s) for s in half_suffixes(gold)]


def classify_paths(path: Path, iteration: int, gold: bool) -> list[Path]:
    """Each half's classification matrix (EMAN2 ``.hdf``)."""
    return [iteration_file(path, "classify", iteration, ".hdf", s) for s in half_suffixes(gold)]


def particle_set(path: Path, half: str = "", *, usefilt: bool = False) -> Path:
    """The EMAN2 particle set (``.lst``) of one half (``half``: its suffix)."""
    return path / f"{'usefilt' if usefilt else 'particles'}{half}.lst"


def start_paths(path: Path) -> list[Path]:
    """The maps the gold-standard halves project at iteration 0."""
    return [path / f"threed_start{s}.mrc" for s in half_suffixes(True)]


def write_particle_sets(
    path: Path,
    stack: ParticleStack,
    image_names: np.ndarray,
    halves: list[np.ndarray],
    gold: bool,
    usefilt: ParticleStack | None,
    model: np.ndarray,
    *,
    resume: bool,
) -> None:
    """``particles[_half].lst`` (and ``usefilt[_half].lst``): each half's particles in
    order, as EMAN2 reads them, pointing into the images ``particles_NN.star`` names
    (``image_names``, ``NNNNNN@file``; usefilt's own files) with each particle's EMAN2
    header: no image is copied. A resumed run keeps those already there; a new run
    never takes a file of that name for its own.

    A particle's CTF carries the SNR curve ``snrweight`` weights its rings by: its own
    (e2ctf's), else the one cryorefine uses (:func:`~cryorefine.stages.simmx.ctf_snr`,
    with the starting ``model``'s power), every ring of its box, so that EMAN2's
    comparators and CTF averagers, which need one, run on it."""
    signal = map_signal_power(model)
    for s, idx in zip(half_suffixes(gold), halves, strict=True):
        for source, usef in ((stack, False), (usefilt, True)):
            target = particle_set(path, s, usefilt=usef)
            if source is None or (resume and target.is_file()):
                continue
            write_lst(target, _set_records(source, usef, idx, image_names, signal))


def _set_records(
    source: ParticleStack, usefilt: bool, idx: np.ndarray, image_names, signal: np.ndarray
) -> Iterator[LstRecord]:
    """The records of one particle set, a chunk of SNR curves at a time."""
    box, apix, curves = source.box, source.apix, source.meta.ctf_curves
    chunk = max(1, SET_CHUNK_BYTES // (24 * box * (box // 2 + 1)))
    for c0 in range(0, len(idx), chunk):
        rows = idx[c0 : c0 + chunk]
        snr = ctf_snr(source.meta, rows, box, apix, signal)
        for j, i in enumerate(rows):
            hdr = eman_header(source.meta, int(i), with_apix=False)
            if snr is not None and (curves is None or curves[i] is None):
                hdr["ctf"].dsbg = 1.0 / (apix * box)
                hdr["ctf"].snr = [float(f"{v:.4g}") for v in snr[j]]
            number, file = _image_file(source, usefilt, image_names, int(i))
            yield LstRecord(number, file, hdr)


#: working memory of the particles' SNR curves computed at once (their CTFs over the
#: box, float64, and temporaries)
SET_CHUNK_BYTES = 64 * 2**20


def _image_file(stack: ParticleStack, usefilt: bool, image_names: np.ndarray, i: int):
    """Image ``i``'s (0-based number, file) as an EMAN2 set refers to it."""
    if not usefilt:
        number, file = str(image_names[i]).split("@", 1)
        return int(number) - 1, file
    return int(stack.meta.source_index[i]), ref_path(str(stack.meta.source_path[i]))


def write_matrices(
    files: list[Path],
    cm: ClassMx,
    halves: list[np.ndarray],
    n_classes: int,
    headers: list[dict],
    *,
    overwrite: bool,
) -> None:
    """Each half's rows of a classification matrix, in EMAN2's layout."""
    for f, idx, header in zip(files, halves, headers, strict=True):
        write_classmx(f, cm.rows(idx), n_classes, header=header, overwrite=overwrite)


def read_matrices(files: list[Path], halves: list[np.ndarray], n_p: int) -> ClassMx:
    """The classification of every particle from each half's file."""
    parts = [read_classmx(f) for f in files]
    cm = ClassMx.empty(n_p, parts[0].cls.shape[1])
    for f, part, idx in zip(files, parts, halves, strict=True):
        if len(part.cls) != len(idx):
            raise CryorefineError(f"{f}: {len(part.cls)} particles, not the half's {len(idx)}")
        cm.put(idx, part)
    return cm


def write_step(
    path: Path,
    iteration: int,
    step: Step,
    stack: ParticleStack,
    image_names: np.ndarray,
    halves: list[np.ndarray],
    filt: np.ndarray,
    automask: np.ndarray | None,
    previous_filt: np.ndarray | None,
    *,
    overwrite: bool,
) -> dict:
    """Write every file of one iteration; return its FSC figures.

    ``filt``/``automask``: the ``threed_filt`` map and the ``--automask3d`` mask (or
    ``None``); ``previous_filt``: the map it is compared with (the start for iteration 0).
    """
    k, apix, gold = nn(iteration), stack.apix, step.goldstandard
    sfx = half_suffixes(gold)
    if step.search == "global":  # a local iteration has no projections or classes
        n_r = len(step.ref_rotations[0])
        for h, s in enumerate(sfx):
            meta = ParticleMetadata.empty(n_r, apix=apix)
            meta.rotations = step.ref_rotations[h]
            proj = ParticleStack.from_arrays(step.projections[h], apix=apix, meta=meta)
            write_stack(
                proj,
                iteration_file(path, "projections", iteration, ".star", s),
                overwrite=overwrite,
            )
            proj_hdf = iteration_file(path, "projections", iteration, ".hdf", s)
            write_projections_hdf(proj_hdf, proj, overwrite=overwrite)
            for ext in (".star", ".hdf"):
                write_classes(
                    iteration_file(path, "classes", iteration, ext, s),
                    step.classes[h],
                    step.ref_rotations[h],
                    apix,
                    references=step.projections[h],
                    ptcl_src=ref_path(particle_set(path, s)),
                    ptcl_set=halves[h],
                    projection_file=ref_path(proj_hdf),
                    overwrite=overwrite,
                )
        write_matrices(
            [iteration_file(path, "cls_result", iteration, ".hdf", s) for s in sfx],
            step.resultmx,
            halves,
            n_r,
            [{"class_ptcl_src": ref_path(particle_set(path, s))} for s in sfx],
            overwrite=overwrite,
        )
    write_map(
        iteration_file(path, "threed", iteration, ".mrc"),
        Map(step.volume, apix),
        overwrite=overwrite,
    )
    if gold:
        for m, p in zip(step.maps, map_paths(path, iteration, True), strict=True):
            write_map(p, Map(m, apix), overwrite=overwrite)
    write_map(
        iteration_file(path, "threed_filt", iteration, ".mrc"), Map(filt, apix), overwrite=overwrite
    )
    if automask is not None:
        write_map(
            iteration_file(path, "threed_mask", iteration, ".mrc"),
            Map(automask, apix),
            overwrite=overwrite,
        )
    figures = {}
    if step.fsc is not None:
        curves = step.fsc
        write_map(
            iteration_file(path, "fsc_mask", iteration, ".mrc"),
            Map(step.mask, apix),
            overwrite=overwrite,
        )
        for name, curve in (
            ("unmasked", curves.unmasked),
            ("masked", curves.masked),
            ("corrected", curves.corrected),
        ):
            write_fsc_text(
                iteration_file(path, f"fsc_{name}", iteration, ".txt"),
                curve,
                apix=apix,
                overwrite=overwrite,
            )
        n = 2 * (len(curves.corrected) - 1)
        write_fsc_star(
            iteration_file(path, "fsc_halves", iteration, ".star"),
            curves.corrected,
            apix=apix,
            overwrite=overwrite,
            extra={
                # what relion_reconstruct --fsc regularises with, as we do
                "rlnGoldStandardFsc": step.info["half_fsc"]
                if step.info.get("half_fsc") is not None
                else curves.unmasked,
                # relion_postprocess's four curves
                "rlnFourierShellCorrelationCorrected": curves.corrected,
                "rlnFourierShellCorrelationUnmaskedMaps": curves.unmasked,
                "rlnFourierShellCorrelationMaskedMaps": curves.masked,
                "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": (
                    curves.randomised_masked
                ),
            },
            general={"rlnRandomiseFrom": n * apix / curves.randomised_from},
        )
        figures["resolution_unmasked"] = resolution_at(curves.unmasked, threshold=0.143, apix=apix)
        figures["resolution_masked"] = resolution_at(curves.masked, threshold=0.143, apix=apix)
        figures["resolution_corrected"] = curves.resolution(apix=apix)
    if previous_filt is not None:
        curve = fsc(previous_filt, filt)
        name = "fsc_xx_00" if iteration == 0 else f"fsc_{nn(iteration - 1)}_{k}"
        write_fsc_text(path / f"{name}.txt", curve, apix=apix, overwrite=overwrite)
        write_fsc_star(path / f"{name}.star", curve, apix=apix, overwrite=overwrite)
        figures["successive_fsc"] = curve
        figures["successive_0.5"] = resolution_at(curve, threshold=0.5, apix=apix)
    write_particles(
        iteration_file(path, "particles", iteration, ".star"),
        step,
        stack,
        image_names,
        halves,
        overwrite=overwrite,
    )
    return figures


def write_projections_hdf(path: Path, proj: ParticleStack, *, overwrite: bool) -> None:
    """The projections as e2project3d writes them (spec ch01 §4.2): EMAN2 ``.hdf``,
    float32, each with ``xform.projection``, ``ptcl_repr = 0``, ``model_id = 0`` and
    the pixel size."""
    headers = [
        {**eman_header(proj.meta, i), "ptcl_repr": 0, "model_id": 0} for i in range(len(proj))
    ]
    with HdfStackWriter(path, overwrite=overwrite) as w:
        w.append(proj.read(), headers)


def write_particles(
    path: Path,
    step: Step,
    stack: ParticleStack,
    image_names: np.ndarray,
    halves: list[np.ndarray],
    *,
    overwrite: bool,
) -> None:
    """``particles_NN.star``: every input particle (RELION 3.1) with its orientation,
    origin, half set, class (1-based projection number), score, and whether it is in the
    map: ``rlnParticleFigureOfMerit`` 1 or 0 (``relion_reconstruct --fom_weighting``
    then rebuilds only what we used), ``crIncluded`` and ``crExcludedBy`` (``used``,
    ``classkeep``: rejected from its class average; ``m3dkeep``: its class average left
    out of the map)."""
    n = len(stack)
    meta = stack.meta.take(np.arange(n))
    meta.rotations, meta.shift_a = step.rotations, step.shifts_a
    meta.class_number = step.class_number
    if step.goldstandard:
        meta.half_set = np.zeros(n, np.int64)
        for h, idx in enumerate(halves):
            meta.half_set[idx] = h + 1
    used = step.reason == 0
    meta.extra = {
        **{k: v for k, v in meta.extra.items() if not k.startswith("cr")},
        "rlnParticleFigureOfMerit": used.astype(np.float64),
        "crSimilarityScore": step.score,
        "crIncluded": used.astype(np.int64),
        "crExcludedBy": np.asarray(REASONS, dtype=object)[step.reason],
    }
    write_particle_star(path, meta, image_names, stack.box, overwrite=overwrite)

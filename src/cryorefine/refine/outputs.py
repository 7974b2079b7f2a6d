"""The files of a refinement folder (spec ch01 §4 and §7), each written atomically.

Per iteration ``NN`` (half files end ``_even``/``_odd``, as e2refine_easy names them,
for half sets 1 and 2; a single chain has no suffix):
``projections_NN[_half].mrcs/.star``, ``simmx_NN.h5``, ``classify_NN.h5``,
``cls_result_NN.h5``, ``classes_NN[_half].mrcs/.star``, ``threed_NN.mrc`` (the
combined map), ``threed_NN_even/odd.mrc`` (the half maps), ``threed_filt_NN.mrc``
(the map projected next by a single chain; ``--mass``/``--automask3d`` applied),
``threed_mask_NN.mrc``, ``fsc_mask_NN.mrc`` (the soft mask of the masked half-map FSC),
``fsc_unmasked_NN.txt``, ``fsc_masked_NN.txt``, ``fsc_corrected_NN.txt`` and
``fsc_halves_NN.star`` (half maps; relion_postprocess's curves),
``fsc_xx_00.txt``/``fsc_MM_NN.txt`` (+ ``.star``: successive maps), and
``particles_NN.star``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryorefine.fourier.fsc import fsc, resolution_at
from cryorefine.io.fsc_files import write_fsc_star, write_fsc_text
from cryorefine.io.maps import Map, write_map
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.stacks import ParticleStack, write_stack
from cryorefine.io.star import write_particle_star
from cryorefine.refine.step import REASONS, Step
from cryorefine.stages.classaverage import write_classes
from cryorefine.stages.classify import write_classmx

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


def simmx_path(path: Path, iteration: int) -> Path:
    return iteration_file(path, "simmx", iteration, ".h5")


def classify_path(path: Path, iteration: int) -> Path:
    return iteration_file(path, "classify", iteration, ".h5")


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
            write_classes(
                iteration_file(path, "classes", iteration, ".star", s),
                step.classes[h],
                step.ref_rotations[h],
                apix,
                overwrite=overwrite,
            )
        write_classmx(
            iteration_file(path, "cls_result", iteration, ".h5"),
            step.resultmx,
            n_r,
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

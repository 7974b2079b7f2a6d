"""The refinement iteration: project3d -> simmx -> classify -> (classaverage) -> make3d.

:func:`iterate` runs one iteration of e2refine's chain on arrays and a particle stack,
in memory, with no files between the stages. It reconstructs from every particle with
the orientation and shift of its best projection (``m3dsource="particles"``, our
default, spec ch04 §4.5), or, as e2refine, from the class averages, each at its
projection's orientation and weighted by the particles it holds (``"classes"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryorefine.config import RefineConfig
from cryorefine.errors import CryorefineError
from cryorefine.fourier.filters import lowpass_gauss, randomise_phases
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.stacks import ParticleStack
from cryorefine.stages.classaverage import ClassAverages, classaverage
from cryorefine.stages.classify import ClassMx, assigned_poses, classify
from cryorefine.stages.make3d import make3d
from cryorefine.stages.project3d import project3d
from cryorefine.stages.simmx import Simmx, simmx


def gold_standard_starts(
    volume: np.ndarray, *, apix: float, inires_a: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The starting maps of the two half refinements (``--goldstandard``).

    Each is ``volume`` low-passed to ``inires_a`` Å (Gaussian, gain 1/e there) with its
    phases randomised beyond that resolution, independently for each half, so that the
    halves share no noise beyond it (RELION's practice).
    """
    if not 2 * apix <= inires_a:
        raise CryorefineError(f"--inires {inires_a} Å is finer than Nyquist ({2 * apix} Å)")
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


@dataclass
class Iteration:
    """What one iteration produced.

    ``projections`` ``(Nc, n, n)`` and their ``ref_rotations`` ``(Nc, 3, 3)``; the
    similarity and classification matrices; each particle's assigned ``rotations``
    ``(Np, 3, 3)`` and ``shifts_a`` ``(Np, 2)`` (x, y in Å, the particle's centre
    offset); the class averages (``classes``, when reconstructed from them); the new
    ``volume`` ``(n, n, n)`` and make3d's ``info``.
    """

    projections: np.ndarray
    ref_rotations: np.ndarray
    simmx: Simmx
    classmx: ClassMx
    rotations: np.ndarray
    shifts_a: np.ndarray
    volume: np.ndarray
    info: dict
    classes: ClassAverages | None = None


def iterate(volume: np.ndarray, particles: ParticleStack, cfg: RefineConfig) -> Iteration:
    """One refinement iteration of ``particles`` against ``volume`` (same box and Å/px).

    Projects ``volume`` over ``cfg.project3d``'s orientations, scores every particle
    against every projection (``cfg.simmx``), assigns each to its best projection
    (``cfg.classify``) and reconstructs the particles with those poses (``cfg.make3d``;
    CTF, weights and half sets from the particles' metadata).
    """
    apix = particles.apix
    projections, ref_rotations = project3d(volume, cfg.project3d, apix=apix)
    sim = simmx(projections, particles, cfg.simmx)
    cm = classify(sim, cfg.classify)
    rotations, shifts_px = assigned_poses(cm, ref_rotations)
    classes = None
    if cfg.m3dsource == "classes":
        classes = classaverage(
            particles, cm, projections, cfg.classaverage, n_classes=len(projections)
        )
        meta = ParticleMetadata.empty(len(projections), apix=apix)
        meta.rotations = ref_rotations
        meta.weight = classes.ptcl_repr.astype(np.float64)  # empty classes: skipped
        source = ParticleStack.from_arrays(classes.images, apix=apix, meta=meta)
    else:
        meta = particles.meta.take(np.arange(len(particles)))
        meta.rotations, meta.shift_a = rotations, shifts_px * apix
        source = particles.with_meta(meta)
    new_volume, info = make3d(source, cfg.make3d)
    return Iteration(
        projections,
        ref_rotations,
        sim,
        cm,
        rotations,
        shifts_px * apix,
        new_volume,
        info,
        classes,
    )

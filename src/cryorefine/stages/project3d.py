"""e2project3d: reference projections over the asymmetric unit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryorefine.config import Project3dConfig
from cryorefine.fourier.project import project
from cryorefine.geometry.orientations import orientations
from cryorefine.io.maps import read_map
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.stacks import ParticleStack, write_stack


def project3d(
    volume: np.ndarray,
    cfg: Project3dConfig,
    *,
    apix: float | None = None,
    rotations: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Project ``volume`` ``(n, n, n)`` over the asymmetric unit of ``cfg.sym``.

    The orientations come from ``cfg.orientgen`` (seeded by ``cfg.seed``) unless
    ``rotations`` ``(k, 3, 3)`` are given. ``apix`` (Å/px) is needed by Å-valued
    post-processors.

    Returns the ``(k, n, n)`` float32 projections (voxel-sum units before
    post-processing, centred on pixel ``n // 2``) and their ``(k, 3, 3)`` rotations.
    """
    if rotations is None:
        rng = np.random.default_rng(cfg.seed)
        rotations = orientations(cfg.orientgen_mod, cfg.sym, rng=rng)
    images = project(volume, rotations, projector=cfg.projector_mod)
    for m in cfg.postprocess_mods:
        images = m(images, ndim=2, apix=apix)
    return images, rotations


def run_project3d(
    model: Path,
    out: Path,
    cfg: Project3dConfig,
    *,
    apix: float | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Read the map, project it (:func:`project3d`), write the stack with orientations."""
    volume = read_map(model, apix=apix)
    images, rotations = project3d(volume.data, cfg, apix=volume.apix)
    meta = ParticleMetadata.empty(len(images), apix=volume.apix)
    meta.rotations = rotations
    stack = ParticleStack.from_arrays(images, apix=volume.apix, meta=meta)
    return write_stack(stack, out, overwrite=overwrite)

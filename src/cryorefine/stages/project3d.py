"""e2project3d: reference projections over the asymmetric unit."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryorefine.fourier.project import project
from cryorefine.geometry.orientations import orientations
from cryorefine.io.maps import read_map
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.stacks import ParticleStack, write_stack
from cryorefine.registry import PROCESSORS


def project3d(
    volume: np.ndarray,
    rotations: np.ndarray,
    *,
    projector: str = "fourier",
    postprocess: tuple[str, ...] = (),
    apix: float | None = None,
) -> np.ndarray:
    """Project ``volume`` ``(n, n, n)`` along ``rotations`` ``(k, 3, 3)``; apply processors.

    Returns ``(k, n, n)`` float32 projections (voxel-sum units before post-processing),
    centred on pixel ``n // 2``, in the order of ``rotations``.
    """
    mods = [PROCESSORS.parse(p, option="--postprocess") for p in postprocess]
    images = project(volume, rotations, projector=projector)
    for m in mods:
        if m is not None:
            images = m(images, ndim=2, apix=apix)
    return images


def run_project3d(
    model: Path,
    out: Path,
    *,
    orientgen: str,
    sym: str = "c1",
    projector: str = "fourier",
    postprocess: tuple[str, ...] = (),
    apix: float | None = None,
    seed: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Read the map, project over the asymmetric unit, write the stack with orientations."""
    from cryorefine.registry import PROJECTORS

    PROJECTORS.parse(projector, option="--projector")
    for p in postprocess:
        PROCESSORS.parse(p, option="--postprocess")
    rotations = orientations(orientgen, sym, rng=np.random.default_rng(seed))
    volume = read_map(model, apix=apix)
    images = project3d(
        volume.data, rotations, projector=projector, postprocess=postprocess, apix=volume.apix
    )
    meta = ParticleMetadata.empty(len(images), apix=volume.apix)
    meta.rotations = rotations
    stack = ParticleStack.from_arrays(images, apix=volume.apix, meta=meta)
    return write_stack(stack, out, overwrite=overwrite)

"""3D maps with their pixel size and origin, in MRC or EMAN2 HDF files."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryorefine.errors import CryorefineError, CryorefineWarning
from cryorefine.io import eman2
from cryorefine.io.mrc import read_mrc, write_mrc

MAP_SUFFIXES = (".mrc", ".map", ".hdf")


@dataclass
class Map:
    """A map ``data`` ``(z, y, x)`` float32, pixel size ``apix`` in Å,
    and ``origin_a``, the position ``(x, y, z)`` in Å of voxel 0 (MRC header origin)."""

    data: np.ndarray
    apix: float
    origin_a: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def box(self) -> int:
        return self.data.shape[-1]


def is_map_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds one 3D map rather than a stack of 2D images.

    ``.map`` always; ``.mrc`` when its header says volume (or it has one section of
    many); ``.hdf`` when image 0 is 3D. ``.mrcs``, ``.star`` and ``.lst`` are stacks.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".map":
        return True
    if suffix == ".mrc":
        from cryorefine.io.mrc import open_mrc

        with open_mrc(path) as mrc:
            return mrc.data.ndim == 3 and not mrc.is_image_stack()
    if suffix == ".hdf":
        f = eman2.HdfImages(path)
        try:
            return f.count == 1 and len(f.shape(0)) == 3 and f.shape(0)[0] > 1
        finally:
            f.close()
    return False


def read_map(
    path: str | os.PathLike, *, apix: float | None = None, no_apix_ok: bool = False
) -> Map:
    """Read a 3D map (``.mrc``/``.map``/``.hdf``); ``apix`` overrides the header.
    A header without a pixel size gives 1.0 Å/px with a warning, or 0.0 (for the
    caller to decide) when ``no_apix_ok``.

    Raises
    ------
    CryorefineError
        Missing or corrupt file, not 3D, not cubic, or NaN/Inf values.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".hdf":
        data, hdr = eman2.read_hdf_map(path)
        file_apix = float(hdr.get("apix_x", 0.0) or 0.0)
        origin = tuple(float(hdr.get(f"origin_{a}", 0.0) or 0.0) for a in "xyz")
    elif suffix in (".mrc", ".map", ".mrcs"):
        data, file_apix, origin = read_mrc(path)
    else:
        raise CryorefineError(f"{path}: unknown map type; use .mrc, .map or .hdf")
    if data.ndim != 3:
        raise CryorefineError(f"{path}: is not a 3D map (shape {data.shape})")
    if len(set(data.shape)) != 1:
        raise CryorefineError(
            f"{path}: map is {data.shape[2]} x {data.shape[1]} x "
            f"{data.shape[0]}; only cubic maps are supported"
        )
    if not np.isfinite(data).all():
        raise CryorefineError(f"{path}: contains NaN or Inf values")
    if apix is not None:
        if apix <= 0:
            raise CryorefineError(f"--apix must be positive, got {apix}")
        return Map(data, float(apix), origin)
    if file_apix <= 0 and no_apix_ok:
        return Map(data, 0.0, origin)
    if file_apix <= 0:
        warnings.warn(
            f"{path}: no pixel size in the header; assuming 1.0 Å/px (pass --apix)",
            CryorefineWarning,
            stacklevel=2,
        )
        file_apix = 1.0
    return Map(data, file_apix, origin)


def write_map(path: str | os.PathLike, volume: Map, *, overwrite: bool = False) -> Path:
    """Write a map as MRC (``.mrc``/``.map``) or EMAN2 HDF (``.hdf``), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".hdf":
        return eman2.write_hdf_map(
            path, volume.data, apix=volume.apix, origin_a=volume.origin_a, overwrite=overwrite
        )
    if suffix in (".mrc", ".map"):
        return write_mrc(
            path, volume.data, apix=volume.apix, origin_a=volume.origin_a, overwrite=overwrite
        )
    raise CryorefineError(f"{path}: cannot write a map of this type; use .mrc, .map or .hdf")

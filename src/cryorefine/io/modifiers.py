"""Files named inside modifier strings: read once, when an option is parsed.

A registered parameter declared with ``file="image"`` (a comparator's ``mask``) or
``file="strucfac"`` (``filter.setstrucfac``) names a file. :func:`read_modifier_files`
replaces such names by their content, so the computing code below io gets arrays and
never re-reads a file per batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.fourier import filters
from cryorefine.io.atomic import is_file
from cryorefine.io.maps import read_map
from cryorefine.io.stacks import ParticleStack
from cryorefine.registry import Modifier


def read_modifier_files(mod: Modifier | None, *, option: str = "option") -> Modifier | None:
    """``mod`` with each file-valued parameter replaced by the file's content."""
    if mod is None:
        return None
    params = dict(mod.params)
    for p in mod.entry.params:
        value = params.get(p.name)
        if p.file is None or not isinstance(value, str):
            continue
        try:
            if p.file == "image":
                params[p.name] = read_image(value)
            elif p.file == "strucfac":
                params[p.name] = read_structure_factor(value)
            else:  # pragma: no cover - a registration error
                raise ValueError(f"unknown file kind {p.file!r}")
        except CryorefineError as exc:
            raise CryorefineError(f"{option} {mod.name}: {p.name}: {exc}") from None
    return Modifier(mod.entry, params)


def read_image(path: str | Path) -> np.ndarray:
    """The first image of a stack or 2D map file, ``(n, n)`` float32."""
    stack = ParticleStack.from_path(Path(path))
    try:
        return np.asarray(stack.read(np.arange(1))[0], np.float32)
    finally:
        stack.close()


def read_structure_factor(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A 1D power spectrum ``(freq_a, power)`` from a text file or a map.

    Text: two whitespace-separated columns, spatial frequency in 1/Å and power
    (EMAN2's ``strucfac.txt`` layout; ``#`` comments allowed). A map (``.mrc``,
    ``.hdf``): its radial power spectrum (:func:`fourier.filters.radial_power`).
    """
    path = Path(path)
    if not is_file(path):
        raise CryorefineError(f"{path}: no such file (structure factor)")
    if path.suffix.lower() in (".mrc", ".map", ".hdf", ".h5"):
        m = read_map(path)
        if m.apix <= 0:
            raise CryorefineError(f"{path}: the map has no pixel size")
        power = filters.radial_power(m.data, m.data.ndim)
        return np.arange(len(power)) / (m.data.shape[0] * m.apix), power
    try:
        table = np.loadtxt(path, comments="#", ndmin=2)
    except ValueError as exc:
        raise CryorefineError(f"{path}: not a two-column structure-factor file ({exc})") from exc
    if table.shape[1] < 2 or len(table) < 3:
        raise CryorefineError(f"{path}: a structure-factor file needs >= 3 rows of 2 columns")
    freq, power = table[:, 0], table[:, 1]
    if np.any(np.diff(freq) <= 0) or not np.all(np.isfinite(table[:, :2])):
        raise CryorefineError(f"{path}: frequencies must increase and values be finite")
    return freq, power

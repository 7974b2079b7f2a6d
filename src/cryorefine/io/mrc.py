"""MRC maps and MRCS stacks (via ``mrcfile``).

Arrays are ``(z, y, x)`` for maps and ``(k, y, x)`` for stacks, float32, exactly as
stored; no axis flips. The pixel size comes from the header (``cella / mx``); the
origin is the header ``origin`` in Å.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.io.atomic import atomic_output, is_file

#: MRC modes we read (converted to float32); we write mode 2 only.
READABLE_MODES = {0, 1, 2, 6, 12}


def open_mrc(path: str | os.PathLike) -> mrcfile.mrcfile.MrcFile:
    """Open an MRC file memory-mapped, read-only, with a clear error when it is bad.

    Files without the ``MAP`` ID string (written by old programs) are accepted as long
    as the header describes a data block that fits the file.

    Raises
    ------
    CryorefineError
        If the file is missing, truncated, not an MRC file, or of an unsupported mode.
    """
    path = Path(path)
    if not is_file(path):
        raise CryorefineError(f"{path}: no such file")
    try:
        mrc = mrcfile.mmap(path, mode="r", permissive=False)
    except ValueError as exc:
        text = str(exc)
        if "mmap length" in text or "could only read" in text:
            raise CryorefineError(
                f"{path}: truncated MRC file (data block shorter than the header says)"
            ) from exc
        if "Map ID string" not in text:
            raise CryorefineError(f"{path}: not a valid MRC file ({text})") from exc
        mrc = _open_permissive(path)
    except Exception as exc:  # mrcfile raises assorted errors on junk
        raise CryorefineError(f"{path}: not a valid MRC file ({exc})") from exc
    mode = int(mrc.header.mode)
    if mode not in READABLE_MODES:
        mrc.close()
        raise CryorefineError(
            f"{path}: MRC mode {mode} is not supported (readable: 0, 1, 2, 6, 12)"
        )
    return mrc


def _open_permissive(path: Path) -> mrcfile.mrcfile.MrcFile:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mrc = mrcfile.mmap(path, mode="r", permissive=True)
        if mrc.data is None or mrc.header.nx < 1 or mrc.header.ny < 1:
            raise ValueError("no data block")
    except Exception as exc:
        raise CryorefineError(f"{path}: not a valid MRC file or truncated ({exc})") from exc
    return mrc


def header_apix(mrc: mrcfile.mrcfile.MrcFile) -> float:
    """Pixel size in Å from an open file's header (x axis); 0.0 when absent."""
    mx, cella_x = int(mrc.header.mx), float(mrc.header.cella.x)
    if mx <= 0 or not np.isfinite(cella_x) or cella_x <= 0:
        return 0.0
    return cella_x / mx


def header_origin_a(mrc: mrcfile.mrcfile.MrcFile) -> tuple[float, float, float]:
    """Header origin ``(x, y, z)`` in Å."""
    o = mrc.header.origin
    return (float(o.x), float(o.y), float(o.z))


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float, tuple[float, float, float]]:
    """Read a whole MRC file into memory.

    Returns
    -------
    data, apix, origin_a
        float32 array as stored (``(ny, nx)``, ``(nz, ny, nx)``), pixel size in Å (0.0 if
        the header has none), header origin in Å.
    """
    with open_mrc(path) as mrc:
        data = np.array(mrc.data, dtype=np.float32)
        return data, header_apix(mrc), header_origin_a(mrc)


def write_mrc(
    path: str | os.PathLike,
    data: np.ndarray,
    *,
    apix: float,
    origin_a: tuple[float, float, float] = (0.0, 0.0, 0.0),
    stack: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``data`` as a mode-2 (float32) MRC file atomically.

    ``stack=True`` marks a 3D array as a stack of 2D images (``.mrcs``); otherwise a 3D
    array is a volume.
    """
    arr = np.ascontiguousarray(data, dtype=np.float32)
    with atomic_output(path, overwrite=overwrite) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            with np.errstate(all="ignore"):  # float32 statistics of extreme values
                mrc.set_data(arr)
            set_header_stats(mrc.header, arr)
            if arr.ndim == 3:
                if stack:
                    mrc.set_image_stack()
                else:
                    mrc.set_volume()
            mrc.voxel_size = apix
            mrc.header.origin = origin_a
    return Path(path)


def set_header_stats(header, data: np.ndarray, *, chunk: int = 256) -> None:
    """dmin, dmax, dmean and rms of ``data`` in the header, summed in float64 a chunk of
    images at a time (mrcfile's float32 sums overflow on extreme values; the header
    fields are float32, so such values are stored clipped to its range)."""
    arr = data.reshape((-1,) + data.shape[-2:]) if data.ndim >= 2 else data.reshape(1, 1, -1)
    total, total2, count = 0.0, 0.0, 0
    lo, hi = np.inf, -np.inf
    for s in range(0, len(arr), chunk):
        block = np.asarray(arr[s : s + chunk], dtype=np.float64)
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
        total += float(block.sum())
        total2 += float(np.square(block).sum())
        count += block.size
    if count == 0:
        return
    mean = total / count
    rms = np.sqrt(max(total2 / count - mean * mean, 0.0))
    big = float(np.finfo(np.float32).max)
    header.dmin, header.dmax, header.dmean, header.rms = (
        float(np.clip(v, -big, big)) for v in (lo, hi, mean, rms)
    )


class MrcStackWriter:
    """Stream a large stack into a ``.mrcs`` file chunk by chunk (memory-mapped).

    Use as a context manager; the file appears under its name only when the block
    completes without an exception.
    """

    def __init__(
        self, path: str | os.PathLike, n: int, box: int, *, apix: float, overwrite: bool = False
    ) -> None:
        self.path = Path(path)
        self._ctx = atomic_output(self.path, overwrite=overwrite)
        self.n, self.box, self.apix = n, box, apix

    def __enter__(self) -> MrcStackWriter:
        tmp = self._ctx.__enter__()
        self._mrc = mrcfile.new_mmap(
            tmp, shape=(self.n, self.box, self.box), mrc_mode=2, overwrite=True
        )
        self._mrc.set_image_stack()
        self._mrc.voxel_size = self.apix
        return self

    def write(self, start: int, images: np.ndarray) -> None:
        """Write ``images`` ``(k, box, box)`` at positions ``start .. start+k-1``."""
        self._mrc.data[start : start + len(images)] = images

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            set_header_stats(self._mrc.header, self._mrc.data)
        self._mrc.close()
        self._ctx.__exit__(*exc)

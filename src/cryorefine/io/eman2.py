"""EMAN2 HDF5 images (``.hdf``), Transform and EMAN2Ctf header values.

Layout (EMAN2 ``hdfio2``): image ``i`` is the dataset ``/MDF/images/<i>/image``
(``(ny, nx)`` or ``(nz, ny, nx)`` float32); its header keys are attributes ``EMAN.<key>``
of the group ``/MDF/images/<i>``; ``/MDF/images`` carries ``imageid_max``. Scalars are
1-element arrays; strings fixed-length NUL-terminated; a Transform is one compound of
12 float32 named ``"00" .. "23"``; a CTF is its ``E...`` text.

A particle's ``xform.projection`` ``[A | t]`` means: rotate the map by ``A``, project
along z, then shift by ``(tx, ty)`` pixels to match the particle. A mirrored
transform (``det A < 0``, row 0 negated) projects identically to the proper rotation
with rows 0 and 2 negated, which is how mirrors are folded on reading.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.io.atomic import atomic_output, is_file

HDF_SIGNATURE = b"\x89HDF\r\n\x1a\n"
TRANSFORM_DTYPE = np.dtype([(f"{r}{c}", "<f4") for r in range(3) for c in range(4)])
_NO_COPY = (
    "render_min",
    "render_max",
    "render_bits",
    "stored_renderbits",
    "stored_rendermin",
    "stored_rendermax",
    "stored_truncated",
)


@dataclass
class Transform:
    """An EMAN2 Transform: the 3 x 4 matrix ``[A | t]`` (float64)."""

    matrix: np.ndarray

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float64).reshape(3, 4)

    def to_json(self) -> dict[str, str]:
        vals = ",".join(f"{v:.9g}" for v in self.matrix.ravel())
        return {"__class__": "Transform", "matrix": f"[{vals}]"}

    @classmethod
    def from_json(cls, obj: dict) -> Transform:
        """Raises ValueError for a missing, malformed or non-finite matrix."""
        if "matrix" not in obj:
            raise ValueError("Transform without a matrix")
        m = obj["matrix"]
        if isinstance(m, str):
            m = [float(v) for v in m.strip("[] ").split(",")]
        m = np.array(m, dtype=np.float64)
        if m.size != 12 or not np.isfinite(m).all():
            raise ValueError(f"Transform matrix needs 12 finite numbers, got {m.size}")
        return cls(m)


def projection_transform(rotation: np.ndarray, shift_px: np.ndarray) -> Transform:
    """``xform.projection`` from a rotation ``(3, 3)`` and the shift ``(tx, ty)`` in px."""
    m = np.zeros((3, 4))
    m[:, :3] = rotation
    m[0, 3], m[1, 3] = shift_px
    return Transform(m)


def split_projection_transform(t: Transform) -> tuple[np.ndarray, np.ndarray]:
    """``(rotation (3, 3), shift (tx, ty) px)`` of an ``xform.projection``; mirrors folded."""
    a = t.matrix[:, :3].copy()
    if np.linalg.det(a) < 0:
        a[2] *= -1.0
    return a, t.matrix[:2, 3].copy()


@dataclass
class EmanCtf:
    """EMAN2Ctf: defocus/dfdiff in µm (positive underfocus), dfang deg, bfactor Å²,
    ampcont percent, voltage kV, cs mm, apix Å/px, dsbg 1/Å, background/snr curves."""

    defocus: float
    dfdiff: float = 0.0
    dfang: float = 0.0
    bfactor: float = 0.0
    ampcont: float = 10.0
    voltage: float = 300.0
    cs: float = 2.7
    apix: float = 1.0
    dsbg: float = -1.0
    background: list[float] = field(default_factory=list)
    snr: list[float] = field(default_factory=list)

    def to_string(self) -> str:
        nums = [
            self.defocus,
            self.dfdiff,
            self.dfang,
            self.bfactor,
            self.ampcont,
            self.voltage,
            self.cs,
            self.apix,
            self.dsbg,
        ]
        head = " ".join(_g10(float(np.float32(v))) for v in nums)
        bg = "".join(f",{v:1.3g}" for v in self.background)
        snr = "".join(f",{v:1.3g}" for v in self.snr)
        return f"E{head} {len(self.background)}{bg} {len(self.snr)}{snr}"

    @classmethod
    def from_string(cls, text: str) -> EmanCtf:
        if not text.startswith("E"):
            raise ValueError(f"not an EMAN2Ctf string: {text[:20]!r}")
        parts = text[1:].split(" ")
        nums = [float(v) for v in parts[:9]]
        if len(nums) < 9 or not np.isfinite(nums).all():
            raise ValueError(f"EMAN2Ctf string needs 9 finite numbers: {text[:40]!r}")
        curves = []
        for part in parts[9:11]:
            count, *vals = part.split(",")
            if int(count) != len(vals):
                raise ValueError(f"EMAN2Ctf curve length mismatch in {text[:40]!r}")
            curves.append([float(v) for v in vals])
        while len(curves) < 2:
            curves.append([])
        return cls(*nums, background=curves[0], snr=curves[1])

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["__class__"] = "EMAN2Ctf"
        return dict(sorted(d.items()))

    @classmethod
    def from_json(cls, obj: dict) -> EmanCtf:
        """Raises ValueError for a missing defocus or a value of the wrong type."""
        keys = {f for f in cls.__dataclass_fields__}
        if "defocus" not in obj:
            raise ValueError("EMAN2Ctf without a defocus")
        values = {k: v for k, v in obj.items() if k in keys}
        for k, v in values.items():
            curve = k in ("background", "snr")
            ok = (
                isinstance(v, list) and all(isinstance(x, int | float) for x in v)
                if curve
                else isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
            )
            if not ok:
                want = "a list of numbers" if curve else "a finite number"
                raise ValueError(f"EMAN2Ctf {k}={v!r} is not {want}")
        return cls(**values)


def _g10(v: float) -> str:
    """C ``%1.10g``."""
    return f"{v:1.10g}"


# --- EMAN2 CTF <-> RELION parameters (spec 05 §5.3) ---------------------------------


def eman_ctf_from_relion(
    u_a: float,
    v_a: float,
    angle_deg: float,
    voltage_kv: float,
    cs_mm: float,
    q0: float,
    phase_shift_deg: float,
    bfactor: float,
    apix: float,
) -> EmanCtf:
    """RELION CTF parameters -> EMAN2Ctf (phase shift folded into ``ampcont``)."""
    dfdiff = (u_a - v_a) * 1e-4
    dfang = angle_deg
    if dfdiff < 0:
        dfdiff, dfang = -dfdiff, dfang + 90.0
    phi = np.arcsin(np.clip(q0, -1, 1)) + np.deg2rad(phase_shift_deg)
    phi = (phi + np.pi) % (2 * np.pi) - np.pi  # (-pi, pi]
    if phase_shift_deg == 0 and 0.0 <= q0 <= 1.0:
        amp = 100.0 * q0  # exact, without a round trip through asin
    elif -np.pi / 2 <= phi < np.pi / 2:
        amp = 100.0 * np.sin(phi)
    elif phi >= np.pi / 2:
        amp = 100.0 * (2.0 - np.sin(phi))
    else:
        amp = 100.0 * (-2.0 - np.sin(phi))
    return EmanCtf(
        defocus=(u_a + v_a) / 2 * 1e-4,
        dfdiff=dfdiff,
        dfang=dfang,
        bfactor=bfactor,
        ampcont=float(amp),
        voltage=voltage_kv,
        cs=cs_mm,
        apix=apix,
    )


def relion_ctf_from_eman(ctf: EmanCtf) -> dict[str, float]:
    """EMAN2Ctf -> RELION parameters (Å, degrees, fraction)."""
    a = ctf.ampcont / 100.0
    if 0.0 <= a <= 1.0:
        q0, shift = a, 0.0
    else:
        if -1.0 < a <= 1.0:
            phi = np.arcsin(a)
        elif a > 1.0:
            phi = np.pi - np.arcsin(2.0 - a)
        else:
            phi = -np.pi - np.arcsin(-2.0 - a)
        q0 = 0.1
        shift = float(np.rad2deg(phi - np.arcsin(q0)))
    return {
        "defocus_u_a": (ctf.defocus + ctf.dfdiff / 2) * 1e4,
        "defocus_v_a": (ctf.defocus - ctf.dfdiff / 2) * 1e4,
        "defocus_angle_deg": ctf.dfang,
        "voltage_kv": ctf.voltage,
        "cs_mm": ctf.cs,
        "amplitude_contrast": q0,
        "phase_shift_deg": shift,
        "bfactor": ctf.bfactor,
    }


# --- attribute encoding ---------------------------------------------------------------


def encode_attr(value: Any) -> np.ndarray | None:
    """A header value as EMAN2 stores it in HDF (None: not storable, skip it)."""
    if isinstance(value, Transform):
        return np.array([tuple(value.matrix.ravel())], dtype=TRANSFORM_DTYPE)
    if isinstance(value, EmanCtf):
        value = value.to_string()
    if isinstance(value, str):
        raw = value.encode("ascii")
        return np.array(raw, dtype=f"S{len(raw) + 1}")
    if isinstance(value, bool | np.bool_):
        return np.array([84 if value else 70], dtype=np.int8)
    if isinstance(value, int | np.integer):
        return np.array([value], dtype=np.int32)
    if isinstance(value, float | np.floating):
        return np.array([value], dtype=np.float32)
    if isinstance(value, list | tuple | np.ndarray):
        arr = np.asarray(value)
        if arr.size == 0:
            return None
        if np.issubdtype(arr.dtype, np.integer):
            return arr.astype(np.int32).ravel()
        if np.issubdtype(arr.dtype, np.floating):
            return arr.astype(np.float32).ravel()
    return None


def decode_attr(key: str, value: Any) -> Any:
    """An HDF attribute as an EMAN2 header value (EMAN2 ``read_attr`` rules)."""
    if isinstance(value, bytes | np.bytes_):
        text = bytes(value).rstrip(b"\0").decode("ascii", errors="replace")
        if key == "ctf":
            return EmanCtf.from_string(text)  # ValueError names what is wrong
        if len(text) > 1 and text[0] in "EO" and text[1].isdigit():
            try:
                return EmanCtf.from_string(text)
            except (ValueError, IndexError):
                return text
        return text
    if isinstance(value, str):
        return value
    arr = np.asarray(value)
    if arr.dtype.names is not None:
        return Transform(np.array([arr.ravel()[0][n] for n in arr.dtype.names], dtype=np.float64))
    arr = arr.ravel()
    if arr.dtype.itemsize == 1 and np.issubdtype(arr.dtype, np.integer):
        return bool(arr[0] == 84)
    if np.issubdtype(arr.dtype, np.integer):
        return int(arr[0]) if arr.size == 1 else [int(v) for v in arr]
    if arr.dtype == np.float64:
        return float(arr[0])
    if np.issubdtype(arr.dtype, np.floating):
        return float(arr[0]) if arr.size == 1 else [float(v) for v in arr]
    return arr


# --- reading --------------------------------------------------------------------------


#: what h5py raises on damaged files (its C library reports corruption as RuntimeError)
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError)


class HdfImages:
    """An open EMAN2 HDF file, read lazily image by image."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not is_file(self.path):
            raise CryorefineError(f"{self.path}: no such file")
        with open(self.path, "rb") as fh:
            if fh.read(8) != HDF_SIGNATURE:
                raise CryorefineError(f"{self.path}: not an HDF5 file (bad signature)")
        try:
            self._f = h5py.File(self.path, "r")
            group = self._f["MDF/images"]
            self.count = int(np.ravel(group.attrs["imageid_max"])[0]) + 1
        except KeyError as exc:
            raise CryorefineError(
                f"{self.path}: not an EMAN2 image file (no /MDF/images imageid_max)"
            ) from exc
        except _H5_ERRORS as exc:
            raise CryorefineError(
                f"{self.path}: unreadable or truncated HDF5 file ({exc})"
            ) from exc
        self._group = group

    def close(self) -> None:
        self._f.close()

    def _entry(self, i: int) -> h5py.Group:
        try:
            return self._group[str(i)]
        except KeyError as exc:
            raise CryorefineError(f"{self.path}: image {i} is missing") from exc
        except _H5_ERRORS as exc:
            raise CryorefineError(f"{self.path}: image {i} cannot be read ({exc})") from None

    def shape(self, i: int = 0) -> tuple[int, ...]:
        try:
            shape = tuple(self._entry(i)["image"].shape)
        except CryorefineError:
            raise
        except _H5_ERRORS as exc:
            raise CryorefineError(f"{self.path}: image {i} cannot be read ({exc})") from None
        if not 1 <= len(shape) <= 3 or min(shape) < 1:
            raise CryorefineError(f"{self.path}: image {i} has shape {shape}")
        return shape

    def header(self, i: int, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Header of image ``i`` with the ``EMAN.`` prefix stripped.

        ``keys`` limits the read to those keys (each attribute read costs ~0.1 ms in
        HDF5, so a stack's metadata is read much faster this way).
        """
        attrs = self._entry(i).attrs
        try:
            if keys is None:
                names = list(attrs)
            else:
                names = [n for n in (f"EMAN.{k}" for k in keys) if n in attrs]
        except _H5_ERRORS as exc:
            raise CryorefineError(f"{self.path}: image {i}: unreadable header ({exc})") from None
        out = {}
        for name in names:
            key = name[5:] if name.startswith("EMAN.") else name
            try:
                out[key] = decode_attr(key, attrs[name])
            except _H5_ERRORS as exc:
                raise CryorefineError(f"{self.path}: image {i}: {key}: {exc}") from None
        return out

    def image(self, i: int) -> np.ndarray:
        """Pixels of image ``i`` as float32, integer-quantised data rescaled."""
        entry = self._entry(i)
        try:
            raw = entry["image"][()]
            data = np.asarray(raw, dtype=np.float32)
            bits = entry.attrs.get("EMAN.stored_renderbits")
            if bits is not None and int(np.ravel(bits)[0]) > 0:
                b = int(np.ravel(bits)[0])
                lo = float(np.ravel(entry.attrs["EMAN.stored_rendermin"])[0])
                hi = float(np.ravel(entry.attrs["EMAN.stored_rendermax"])[0])
                if not (0 < b <= 32 and np.isfinite(lo) and np.isfinite(hi)):
                    raise ValueError(f"stored_renderbits {b} over [{lo}, {hi}]")
                data = data / (2**b - 1) * (hi - lo) + lo
        except _H5_ERRORS as exc:
            raise CryorefineError(f"{self.path}: image {i} cannot be read ({exc})") from None
        if data.ndim == 1:
            data = data[None]
        return data

    def images(self, indices: np.ndarray) -> np.ndarray:
        return np.stack([self.image(int(i)) for i in indices])

    def rows(self, i: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the 2D float32 image ``i`` (a matrix read in pieces); a
        one-row image, which EMAN2 stores as 1D, is one row."""
        try:
            ds = self._entry(i)["image"]
            data = ds[()][None][start:stop] if ds.ndim == 1 else ds[start:stop]
        except CryorefineError:
            raise
        except _H5_ERRORS as exc:
            raise CryorefineError(f"{self.path}: image {i} cannot be read ({exc})") from None
        return np.asarray(data, dtype=np.float32)

    def __enter__(self) -> HdfImages:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- writing --------------------------------------------------------------------------


def image_stats(images: np.ndarray) -> list[dict[str, float]]:
    """EMAN2's per-image statistics keys, computed for a whole chunk at once."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    n = flat.shape[1]
    nz = flat != 0
    cnt = np.maximum(nz.sum(axis=1), 1)
    mean_nz = np.where(nz, flat, 0).sum(axis=1) / cnt
    var_nz = np.where(nz, (flat - mean_nz[:, None]) ** 2, 0).sum(axis=1) / np.maximum(cnt - 1, 1)
    stats = {
        "minimum": flat.min(axis=1),
        "maximum": flat.max(axis=1),
        "mean": flat.mean(axis=1),
        "sigma": flat.std(axis=1, ddof=1 if n > 1 else 0),
        "square_sum": (flat * flat).sum(axis=1),
        "mean_nonzero": mean_nz,
        "sigma_nonzero": np.sqrt(var_nz),
    }
    return [{k: float(v[i]) for k, v in stats.items()} for i in range(len(images))]


def _create_attr(gid: h5py.h5g.GroupID, name: str, value: np.ndarray) -> None:
    """Create one attribute through h5py's low-level API (twice as fast as ``attrs``)."""
    if value.shape == ():
        space = h5py.h5s.create(h5py.h5s.SCALAR)
    else:
        space = h5py.h5s.create_simple(value.shape)
    attr = h5py.h5a.create(gid, name.encode("ascii"), h5py.h5t.py_create(value.dtype), space)
    attr.write(np.ascontiguousarray(value))


class HdfStackWriter:
    """Write images with EMAN2 headers into a new ``.hdf`` file (atomically).

    >>> with HdfStackWriter("ptcls.hdf") as w:
    ...     w.append(images, headers)   # (k, ny, nx) and k header dicts
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self._ctx = atomic_output(self.path, overwrite=overwrite)
        self.count = 0

    def __enter__(self) -> HdfStackWriter:
        tmp = self._ctx.__enter__()
        self._f = h5py.File(tmp, "w")
        self._group = self._f.create_group("MDF/images")
        self._group.attrs.create("imageid_max", np.array([-1], dtype=np.int32))
        return self

    def append(self, images: np.ndarray, headers: list[dict[str, Any]] | None = None) -> None:
        """Append ``images`` (``(k, ny, nx)``, or one ``(nz, ny, nx)`` map as ``k = 1``)."""
        headers = headers or [{} for _ in images]
        for img, stats, hdr in zip(images, image_stats(images), headers, strict=True):
            arr = np.ascontiguousarray(img, dtype=np.float32)
            g = self._group.create_group(str(self.count))
            g.create_dataset("image", data=arr)
            nz, ny, nx = (1,) * (3 - arr.ndim) + arr.shape
            full = {**_basic_header(nx, ny, nz), **stats}
            full.update({k: v for k, v in hdr.items() if k not in _NO_COPY})
            for key, value in full.items():
                enc = encode_attr(value)
                if enc is not None:
                    _create_attr(g.id, f"EMAN.{key}", enc)
            self.count += 1
        self._group.attrs.create("imageid_max", np.array([self.count - 1], dtype=np.int32))

    def __exit__(self, *exc) -> None:
        self._f.close()
        self._ctx.__exit__(*exc)


def _basic_header(nx: int, ny: int, nz: int = 1) -> dict[str, Any]:
    """The keys EMAN2 writes on every image: its size and a real float32 data type."""
    return {
        "nx": nx,
        "ny": ny,
        "nz": nz,
        "datatype": 7,
        "is_complex": 0,
        "is_complex_x": 0,
        "is_complex_ri": 1,
        "changecount": 0,
    }


class _Stats:
    """EMAN2's statistics keys of one image, accumulated over row blocks (float64)."""

    def __init__(self) -> None:
        self.n = self.nnz = 0
        self.total = self.squares = self.total_nz = self.squares_nz = 0.0
        self.lo, self.hi = np.inf, -np.inf

    def add(self, values: np.ndarray, repeat: int = 1) -> None:
        v = np.asarray(values, np.float64).ravel()
        if not v.size or repeat < 1:
            return
        nz = v[v != 0]
        self.n += repeat * v.size
        self.nnz += repeat * nz.size
        self.total += repeat * v.sum()
        self.squares += repeat * (v * v).sum()
        self.total_nz += repeat * nz.sum()
        self.squares_nz += repeat * (nz * nz).sum()
        self.lo, self.hi = min(self.lo, v.min()), max(self.hi, v.max())

    def header(self) -> dict[str, float]:
        n, nnz = max(self.n, 1), max(self.nnz, 1)
        mean, mean_nz = self.total / n, self.total_nz / nnz
        var = max(self.squares - n * mean * mean, 0.0) / max(n - 1, 1)
        var_nz = max(self.squares_nz - nnz * mean_nz * mean_nz, 0.0) / max(nnz - 1, 1)
        stats = {
            "minimum": float(self.lo) if self.n else 0.0,
            "maximum": float(self.hi) if self.n else 0.0,
            "mean": mean,
            "sigma": float(np.sqrt(var)),
            "square_sum": self.squares,
            "mean_nonzero": mean_nz,
            "sigma_nonzero": float(np.sqrt(var_nz)),
        }
        # float32 attributes, as EMAN2 keeps them (a matrix of 1e24 scores overflows)
        top = float(np.finfo(np.float32).max)
        return {k: float(np.clip(v, -top, top)) for k, v in stats.items()}


class HdfMatrixWriter:
    """Write an EMAN2 ``.hdf`` stack of ``count`` float32 images of ``(ny, nx)`` row block
    by row block, so that no image is ever whole in memory (EMAN2's similarity and
    classification matrices: rows are particles). Rows never written hold ``fill[i]``.
    The file appears under ``path`` only when the ``with`` block completes. The images
    are stored contiguous and uncompressed, as EMAN2 writes them, which lets EMAN2
    overwrite them in place (``e2classaverage --resultmx``).

    >>> with HdfMatrixWriter("simmx.hdf", 6, n_p, n_c, fill=[1e24, 0, 0, 0, 0, 1]) as w:
    ...     w.write(0, rows, scores)          # image 0, rows ``rows`` (a slice or indices)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        count: int,
        ny: int,
        nx: int,
        *,
        fill: list[float] | None = None,
        headers: list[dict[str, Any]] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.path, self.count, self.ny, self.nx = Path(path), count, ny, nx
        self.fill = list(fill) if fill is not None else [0.0] * count
        self.headers = headers or [{} for _ in range(count)]
        self._ctx = atomic_output(self.path, overwrite=overwrite)
        self._stats = [_Stats() for _ in range(count)]
        self._written = [0] * count

    def __enter__(self) -> HdfMatrixWriter:
        tmp = self._ctx.__enter__()
        try:
            self._f = h5py.File(tmp, "w")
            group = self._f.create_group("MDF/images")
            group.attrs.create("imageid_max", np.array([self.count - 1], dtype=np.int32))
            self._data = []
            for i in range(self.count):
                g = group.create_group(str(i))
                self._data.append(
                    g.create_dataset(
                        "image", shape=(self.ny, self.nx), dtype=np.float32, fillvalue=self.fill[i]
                    )
                )
        except BaseException as exc:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def write(self, image: int, rows: slice | np.ndarray, values: np.ndarray) -> None:
        """Set the rows ``rows`` (a slice, or increasing indices, each written once) of
        image ``image`` to ``values`` ``(len(rows), nx)``."""
        values = np.asarray(values, np.float32)
        self._data[image][rows] = values
        self._stats[image].add(values)
        self._written[image] += len(values)

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                for i, g in enumerate(self._data):
                    stats = self._stats[i]
                    stats.add(np.full(self.nx, self.fill[i]), self.ny - self._written[i])
                    full = {**_basic_header(self.nx, self.ny), **stats.header()}
                    full.update(self.headers[i])
                    for key, value in full.items():
                        enc = encode_attr(value)
                        if enc is not None:
                            _create_attr(g.parent.id, f"EMAN.{key}", enc)
        finally:
            self._f.close()
            self._ctx.__exit__(*exc)


class MatrixFile:
    """A matrix file open for reading, row block by row block: named planes ``names`` of
    equal shape ``(rows, columns)``. Either EMAN2's ``.hdf`` stack (its images in
    ``names``' order, as many as one of ``counts``; the absent trailing planes read as
    ``absent[name]``, else 0; a one-row image EMAN2 stores as 1D is one row), or
    HDF5 datasets named ``names`` in a file whose ``format`` attribute is ``legacy``.
    ``what`` names the kind of matrix in errors; ``attrs``: image 0's header (or the
    file's attributes)."""

    def __init__(
        self,
        path: str | os.PathLike,
        names: tuple[str, ...],
        counts: tuple[int, ...],
        *,
        legacy: str,
        what: str,
        absent: dict[str, float] | None = None,
    ) -> None:
        self.path, self.names, self.absent = Path(path), names, absent or {}
        self._h5 = self._hdf = None
        try:
            with h5py.File(self.path, "r") as f:
                eman, old = "MDF" in f, f.attrs.get("format") == legacy
        except OSError as err:
            raise CryorefineError(f"{self.path}: cannot read ({err})") from None
        try:
            if eman:
                self._hdf = HdfImages(self.path)
                shapes = [self._plane_shape(i) for i in range(self._hdf.count)]
                if self._hdf.count not in counts or None in shapes:
                    listed = ", ".join(map(str, counts[:-1])) + f" or {counts[-1]}"
                    raise CryorefineError(
                        f"{self.path}: not a {what} ({listed} two-dimensional images)"
                    )
                self.shape = shapes[0]
                for i, shape in enumerate(shapes):
                    if shape != self.shape:
                        raise CryorefineError(
                            f"{self.path}: image {i} differs in size from image 0"
                        )
                self.attrs = self._hdf.header(0)
            elif old:
                self._h5 = h5py.File(self.path, "r")
                missing = [name for name in names if name not in self._h5]
                if missing:
                    raise CryorefineError(f"{self.path}: no dataset '{missing[0]}'")
                self.shape = tuple(self._h5[names[0]].shape)
                self.attrs = dict(self._h5.attrs)
            else:
                raise CryorefineError(
                    f"{self.path}: not a {what} (neither EMAN2's .hdf images nor "
                    "cryorefine's .h5 datasets)"
                )
        except BaseException:
            self.close()
            raise

    def _plane_shape(self, i: int) -> tuple[int, int] | None:
        shape = self._hdf.shape(i)
        return (1, *shape) if len(shape) == 1 else shape if len(shape) == 2 else None

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of every plane, float32 (the legacy files' as stored)."""
        try:
            if self._h5 is not None:
                return {k: self._h5[k][start:stop] for k in self.names}
            out = {}
            for i, name in enumerate(self.names):
                if i < self._hdf.count:
                    out[name] = self._hdf.rows(i, start, stop)
                else:
                    n = max(0, min(stop, self.shape[0]) - start)
                    value = self.absent.get(name, 0.0)
                    out[name] = np.full((n, self.shape[1]), value, np.float32)
            return out
        except OSError as err:
            raise CryorefineError(f"{self.path}: cannot read ({err})") from None

    def close(self) -> None:
        for f in (self._h5, self._hdf):
            if f is not None:
                f.close()

    def __enter__(self) -> MatrixFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_hdf_map(path: str | os.PathLike, index: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """One image (usually the 3D map at index 0) and its header."""
    f = HdfImages(path)
    try:
        if index >= f.count:
            raise CryorefineError(f"{path}: has {f.count} images, no image {index}")
        return f.image(index), f.header(index)
    finally:
        f.close()


def write_hdf_map(
    path: str | os.PathLike,
    volume: np.ndarray,
    *,
    apix: float,
    origin_a: tuple[float, float, float] = (0.0, 0.0, 0.0),
    header: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a map (or single image) as an EMAN2 HDF file with its pixel size."""
    hdr = {
        "apix_x": apix,
        "apix_y": apix,
        "apix_z": apix,
        "origin_x": origin_a[0],
        "origin_y": origin_a[1],
        "origin_z": origin_a[2],
        **(header or {}),
    }
    with HdfStackWriter(path, overwrite=overwrite) as w:
        w.append(np.asarray(volume, dtype=np.float32)[None], [hdr])
    return Path(path)

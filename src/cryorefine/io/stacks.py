"""Particle stacks: images (in memory or read lazily from files) plus metadata.

``ParticleStack.from_path`` reads ``.mrcs``/``.mrc``, RELION ``.star``, EMAN2 ``.hdf``
and ``.lst``; images stay on disk (memory-mapped MRC, per-image HDF datasets) and are
read in chunks, so no stage needs the whole stack in RAM::

    stack = ParticleStack.from_path("particles.star")
    for indices, images in stack.chunks(1024):
        ...

``write_stack`` writes any of those formats, streaming chunk by chunk.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

from cryorefine.errors import CryorefineError, CryorefineWarning
from cryorefine.fourier.ctf import CTFParams
from cryorefine.io import eman2, lst, star
from cryorefine.io.atomic import check_output, is_file
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.mrc import MrcStackWriter, header_apix, open_mrc

STACK_SUFFIXES = (".mrcs", ".mrc", ".star", ".hdf", ".lst")
#: the EMAN2 header keys that particle metadata is built from
EMAN_META_KEYS = (
    "apix_x",
    "ctf",
    "xform.projection",
    "class",
    "class_id",
    "score",
    "weight",
    "ptcl_repr",
)
MRC_SUFFIXES = (".mrcs", ".mrc", ".st")


class _MrcSource:
    """The images of an MRC stack, read with ``pread`` (not through the memory map,
    whose pages would stay in the process's resident memory as the whole stack is read,
    and grow it with the number of particles)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mrc = open_mrc(path)
        data = self._mrc.data
        self._data = data[None] if data.ndim == 2 else data
        self.count = len(self._data)
        self.shape = tuple(self._data.shape[-2:])
        self.apix = header_apix(self._mrc)
        self._fd = None
        if isinstance(self._mrc, mrcfile.mrcmemmap.MrcMemmap):
            self._offset = 1024 + int(self._mrc.header.nsymbt)
            self._fd = os.open(path, os.O_RDONLY)

    def images(self, idx: np.ndarray) -> np.ndarray:
        if self._fd is None:  # not memory-mapped: the data are in memory already
            return np.asarray(self._data[idx], dtype=np.float32)
        idx = np.asarray(idx, np.int64)
        out = np.empty((len(idx), *self.shape), np.float32)
        dtype = self._data.dtype
        size = int(np.prod(self.shape)) * dtype.itemsize
        order = np.argsort(idx, kind="stable")
        ranked = idx[order]
        runs = np.split(np.arange(len(idx)), np.flatnonzero(np.diff(ranked) != 1) + 1)
        for run in runs:  # each run of consecutive images in one read
            if not run.size:
                continue
            count, first = len(run), int(ranked[run[0]])
            block = _pread_all(self._fd, size * count, self._offset + size * first, self.path)
            out[order[run]] = np.frombuffer(block, dtype).reshape(count, *self.shape)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._mrc.close()


def _pread_all(fd: int, size: int, offset: int, path: str) -> bytearray:
    """``size`` bytes at ``offset`` (``pread`` returns at most about 2 GiB a call)."""
    out = bytearray(size)
    view, done = memoryview(out), 0
    while done < size:
        got = os.preadv(fd, [view[done : done + 2**30]], offset + done)
        if got <= 0:
            raise CryorefineError(f"{path}: shorter than its header says")
        done += got
    return out


class _HdfSource:
    def __init__(self, path: str) -> None:
        self.path = path
        self._f = eman2.HdfImages(path)
        self.count = self._f.count
        shape = self._f.shape(0) if self.count else (0, 0)
        if len(shape) == 3 and shape[0] > 1:
            raise CryorefineError(f"{path}: holds 3D maps, not 2D particle images")
        self.shape = tuple(shape[-2:])
        self.apix = 0.0

    def images(self, idx: np.ndarray) -> np.ndarray:
        return self._f.images(idx).reshape((len(idx),) + self.shape)

    def header(self, i: int) -> dict[str, Any]:
        return self._f.header(i, EMAN_META_KEYS)

    def close(self) -> None:
        self._f.close()


def _open_source(path: str) -> _MrcSource | _HdfSource:
    if Path(path).suffix.lower() in (".hdf", ".h5"):
        return _HdfSource(path)
    return _MrcSource(path)


def _resolve(name: str, first: Path, root: Path, where: Path) -> str:
    p = Path(name)
    candidates = [p] if p.is_absolute() else [first / p, root / p]
    found = next((c for c in candidates if is_file(c)), None)
    if found is None:
        raise CryorefineError(f"{where}: image file {name} not found")
    return str(found.resolve())


def ref_path(path: str | Path) -> str:
    """How a written file refers to another: relative to the working directory when the
    file lies below it (RELION and EMAN2 resolve from the project folder), else absolute."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


class ParticleStack:
    """``k`` square particle images of ``box`` pixels and their metadata.

    Images live in memory (``images``) or in the files named by
    ``meta.source_path``/``meta.source_index``, read on demand.
    """

    def __init__(
        self,
        meta: ParticleMetadata,
        box: int,
        *,
        images: np.ndarray | None = None,
        label: str = "<memory>",
        sources: dict[str, Any] | None = None,
    ) -> None:
        self.meta = meta
        self.box = int(box)
        self.label = label
        self._images = images
        self._sources = {} if sources is None else sources

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls, images: np.ndarray, *, apix: float, meta: ParticleMetadata | None = None
    ) -> ParticleStack:
        """An in-memory stack of ``(k, n, n)`` images."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise CryorefineError(f"images must be (k, n, n); got {images.shape}")
        meta = meta or ParticleMetadata.empty(len(images), apix=apix)
        return cls(meta, images.shape[-1], images=images)

    @classmethod
    def from_input(
        cls,
        particles: np.ndarray | ParticleStack,
        *,
        apix: float | None,
        meta: ParticleMetadata | None = None,
        who: str = "particles",
    ) -> ParticleStack:
        """``particles`` as a stack: a stack as it is, or ``(k, n, n)`` images with their
        pixel size ``apix`` (Å, required) and optional metadata."""
        if isinstance(particles, ParticleStack):
            return particles
        if apix is None:
            raise CryorefineError(f"{who}: give the particles' pixel size (apix)")
        return cls.from_arrays(particles, apix=apix, meta=meta)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        *,
        apix: float | None = None,
        root: str | os.PathLike | None = None,
    ) -> ParticleStack:
        """Open a particle stack lazily (``.mrcs``, ``.mrc``, ``.star``, ``.hdf``, ``.lst``).

        Parameters
        ----------
        apix
            Pixel size in Å overriding the files (``--apix``).
        root
            Project folder against which relative image paths are resolved after the
            STAR/LST file's own folder (default: the working directory).
        """
        path = Path(path)
        root_p = Path.cwd() if root is None else Path(root)
        suffix = path.suffix.lower()
        if suffix not in STACK_SUFFIXES:
            raise CryorefineError(
                f"{path}: unknown stack type; use one of {', '.join(STACK_SUFFIXES)}"
            )
        if not is_file(path):
            raise CryorefineError(f"{path}: no such file")
        sources: dict[str, Any] = {}
        if suffix in MRC_SUFFIXES:
            src = _MrcSource(str(path.resolve()))
            sources[src.path] = src
            meta = ParticleMetadata.empty(src.count, apix=src.apix, source_path=src.path)
        elif suffix == ".star":
            meta = star.read_particle_star(path, root=root_p)
        elif suffix == ".hdf":
            src = _HdfSource(str(path.resolve()))
            sources[src.path] = src
            headers = [src.header(i) for i in range(src.count)]
            meta = meta_from_eman_headers(headers, [src.path] * src.count, np.arange(src.count))
        else:
            meta, sources = _read_lst(path, root_p)
        if len(meta) == 0:
            for src in sources.values():
                src.close()
            raise CryorefineError(f"{path}: holds no images")
        stack = cls(meta, 0, label=str(path), sources=sources)
        stack._check_sources()
        stack._settle_apix(apix)
        return stack

    def _source(self, path: str) -> _MrcSource | _HdfSource:
        src = self._sources.get(path)
        if src is None:
            src = self._sources[path] = _open_source(path)
        return src

    def _check_sources(self) -> None:
        paths, inverse = np.unique(self.meta.source_path.astype(str), return_inverse=True)
        shape = None
        for j, p in enumerate(paths):
            src = self._source(p)
            if src.shape[0] != src.shape[1]:
                raise CryorefineError(
                    f"{p}: images are {src.shape[1]} x {src.shape[0]} px; "
                    "only square images are supported"
                )
            if shape is not None and src.shape != shape:
                raise CryorefineError(
                    f"{p}: images are {src.shape[0]} px but others in "
                    f"{self.label} are {shape[0]} px"
                )
            shape = src.shape
            idx = self.meta.source_index[inverse == j]
            if len(idx) and idx.max() >= src.count:
                raise CryorefineError(
                    f"{self.label}: refers to image {idx.max() + 1} of {p}, which holds {src.count}"
                )
        self.box = shape[0] if shape else 0

    def _settle_apix(self, apix: float | None) -> None:
        meta = self.meta
        if apix is not None:
            if apix <= 0:
                raise CryorefineError(f"--apix must be positive, got {apix}")
            known = meta.apix[meta.apix > 0]
            if known.size and np.any(np.abs(known - apix) > 1e-3 * apix):
                warnings.warn(
                    f"{self.label}: --apix {apix} overrides the pixel size "
                    f"{known[0]:.4f} Å given in the file",
                    CryorefineWarning,
                    stacklevel=3,
                )
            meta.apix = np.full(len(meta), float(apix))
            return
        missing = meta.apix <= 0
        if missing.any():
            for p in np.unique(meta.source_path[missing].astype(str)):
                sel = missing & (meta.source_path == p)
                meta.apix[sel] = getattr(self._source(p), "apix", 0.0)
        if np.any(meta.apix <= 0):
            warnings.warn(
                f"{self.label}: no pixel size in the file; assuming 1.0 Å/px (pass --apix)",
                CryorefineWarning,
                stacklevel=3,
            )
            meta.apix[meta.apix <= 0] = 1.0

    # -- access -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.meta)

    @property
    def apix(self) -> float:
        """The pixel size in Å shared by all particles."""
        a = self.meta.apix
        if len(a) and np.any(np.abs(a - a[0]) > 1e-4 * a[0]):
            raise CryorefineError(
                f"{self.label}: particles have different pixel sizes "
                f"({a.min():.4f} to {a.max():.4f} Å); rescale them first"
            )
        return float(a[0]) if len(a) else 0.0

    @property
    def in_memory(self) -> bool:
        return self._images is not None

    def read(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Images ``(k, box, box)`` float32 of the particles ``indices`` (default: all).

        Raises
        ------
        CryorefineError
            If an image holds NaN or Inf.
        """
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        if self._images is not None:
            out = np.array(self._images[idx], dtype=np.float32)
        else:
            out = np.empty((len(idx), self.box, self.box), dtype=np.float32)
            paths = self.meta.source_path[idx].astype(str)
            src_idx = self.meta.source_index[idx]
            for p in np.unique(paths):
                sel = paths == p
                out[sel] = self._source(p).images(src_idx[sel])
        bad = ~np.isfinite(out).all(axis=(1, 2))
        if bad.any():
            j = int(idx[np.flatnonzero(bad)[0]])
            where = (
                f"{self.meta.source_path[j]} image {self.meta.source_index[j] + 1}"
                if self._images is None
                else f"{self.label} image {j + 1}"
            )
            raise CryorefineError(f"{where}: contains NaN or Inf values")
        return out

    def chunks(self, size: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(indices, images)`` for consecutive chunks of at most ``size`` particles."""
        for start in range(0, len(self), size):
            idx = np.arange(start, min(start + size, len(self)))
            yield idx, self.read(idx)

    def take(self, indices: np.ndarray) -> ParticleStack:
        """A stack of a subset of the particles (sharing open files)."""
        idx = np.asarray(indices, dtype=np.int64)
        images = None if self._images is None else self._images[idx]
        return ParticleStack(
            self.meta.take(idx), self.box, images=images, label=self.label, sources=self._sources
        )

    def with_meta(self, meta: ParticleMetadata) -> ParticleStack:
        """The same images with other metadata (e.g. assigned poses; sharing open files)."""
        if len(meta) != len(self):
            raise ValueError(f"metadata for {len(meta)} particles, the stack has {len(self)}")
        return ParticleStack(
            meta, self.box, images=self._images, label=self.label, sources=self._sources
        )

    def close(self) -> None:
        for src in self._sources.values():
            src.close()
        self._sources.clear()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its open files (a chunk sent to a worker opens them there,
        by the absolute paths its metadata holds, and closes them with :meth:`release`)."""
        return {**self.__dict__, "_sources": {}, "_sent": True}

    def release(self) -> None:
        """Close the files a stack sent to another process opened there (a chunk's, once
        done); a no-op for a stack of this process, which shares its parent's files."""
        if getattr(self, "_sent", False):
            self.close()


# --- EMAN2 headers <-> metadata ---------------------------------------------------------


def _header_number(h: dict[str, Any], key: str, where: str, *, integer: bool = False):
    """``h[key]`` as a finite number (or ``None`` when absent); an error names the field."""
    if key not in h:
        return None
    v = h[key]
    ok = isinstance(v, int) if integer else isinstance(v, int | float) and np.isfinite(v)
    if isinstance(v, bool) or not ok:
        kind = "an integer" if integer else "a finite number"
        raise CryorefineError(f"{where}: {key} {v!r} is not {kind}")
    return v


def meta_from_eman_headers(
    headers: list[dict[str, Any]],
    paths: list[str],
    indices: np.ndarray,
    labels: list[str] | None = None,
) -> ParticleMetadata:
    """Metadata from EMAN2 image headers (after any ``.lst`` overrides).

    ``labels``: where each header comes from, for errors (default ``path image i``).

    Raises
    ------
    CryorefineError
        A known key with a value of the wrong type (``ctf``, ``xform.projection``,
        ``apix_x``, ``class``, ``class_id``, ``score``, ``weight``, and ``ptcl_repr`` as the
        weight of a class average), naming the image.
    """
    n = len(headers)
    meta = ParticleMetadata.empty(n, source_index=indices)
    meta.source_path = np.asarray(paths, dtype=object)
    ctf_rows: dict[str, list[float]] = {}
    curves = np.full(n, None, dtype=object)
    for i, h in enumerate(headers):
        where = labels[i] if labels is not None else f"{paths[i]} image {indices[i]}"
        c = h.get("ctf")
        apix = _header_number(h, "apix_x", where) or 0.0
        if apix < 0:
            raise CryorefineError(f"{where}: apix_x {apix} is negative")
        if c is not None and not isinstance(c, eman2.EmanCtf):
            raise CryorefineError(f"{where}: ctf {c!r} is not an EMAN2Ctf")
        if isinstance(c, eman2.EmanCtf):
            apix = c.apix if c.apix > 0 else apix
            for k, v in eman2.relion_ctf_from_eman(c).items():
                ctf_rows.setdefault(k, [np.nan] * n)[i] = v
            if c.snr and c.dsbg > 0:
                curves[i] = (float(c.dsbg), list(c.background), list(c.snr))
        meta.apix[i] = apix
        xf = h.get("xform.projection")
        if xf is not None:
            if not isinstance(xf, eman2.Transform) or not np.isfinite(xf.matrix).all():
                raise CryorefineError(f"{where}: xform.projection {xf!r} is not a Transform")
            rot, shift = eman2.split_projection_transform(xf)
            meta.rotations[i] = rot
            meta.shift_a[i] = shift * apix
        cls = _header_number(h, "class", where, integer=True)
        if cls is not None and cls >= 0:
            meta.half_set[i] = cls + 1
        class_id = _header_number(h, "class_id", where, integer=True)
        if class_id is not None:
            meta.class_number[i] = class_id
        for key, target in (("score", meta.score), ("weight", meta.weight)):
            v = _header_number(h, key, where)
            if v is not None:
                target[i] = float(v)
        repr_ = _header_number(h, "ptcl_repr", where)  # a class average: its particles
        if repr_ is not None and "weight" not in h:
            meta.weight[i] = float(repr_)
    if ctf_rows:
        meta.ctf = CTFParams(**{k: np.asarray(v) for k, v in ctf_rows.items()}, scale=np.ones(n))
    if any(c is not None for c in curves):
        meta.ctf_curves = curves
    return meta


def eman_header(meta: ParticleMetadata, i: int, *, with_apix: bool = True) -> dict[str, Any]:
    """The EMAN2 header keys cryorefine writes for particle ``i``."""
    apix = float(meta.apix[i])
    h: dict[str, Any] = {}
    if with_apix:
        h.update(apix_x=apix, apix_y=apix, apix_z=apix)
    c = meta.ctf
    if c.known[i]:
        h["ctf"] = eman2.eman_ctf_from_relion(
            c.defocus_u_a[i],
            c.defocus_v_a[i],
            c.defocus_angle_deg[i],
            c.voltage_kv[i],
            c.cs_mm[i],
            c.amplitude_contrast[i],
            c.phase_shift_deg[i],
            c.bfactor[i],
            apix,
        )
        if meta.ctf_curves is not None and meta.ctf_curves[i] is not None:
            dsbg, background, snr = meta.ctf_curves[i]
            h["ctf"].dsbg, h["ctf"].background, h["ctf"].snr = dsbg, list(background), list(snr)
    if meta.has_orientation[i]:
        h["xform.projection"] = eman2.projection_transform(
            meta.rotations[i], meta.shift_a[i] / apix
        )
    if meta.half_set[i] > 0:
        h["class"] = int(meta.half_set[i] - 1)
    if meta.class_number[i] >= 0:
        h["class_id"] = int(meta.class_number[i])
    if np.isfinite(meta.score[i]):
        h["score"] = float(meta.score[i])
    if meta.weight[i] != 1.0:
        h["weight"] = float(meta.weight[i])
    return h


def _read_lst(path: Path, root: Path) -> tuple[ParticleMetadata, dict[str, Any]]:
    records = lst.read_lst(path)
    sources: dict[str, Any] = {}
    headers, paths = [], []
    resolved: dict[str, str] = {}
    for rec in records:
        full = resolved.get(rec.path)
        if full is None:
            full = resolved[rec.path] = _resolve(rec.path, path.parent, root, path)
        src = sources.get(full)
        if src is None:
            src = sources[full] = _open_source(full)
        if rec.n >= src.count:
            raise CryorefineError(
                f"{path}: refers to image {rec.n} of {full}, which holds {src.count}"
            )
        base = src.header(rec.n) if isinstance(src, _HdfSource) else {"apix_x": src.apix}
        headers.append({**base, **rec.params})
        paths.append(full)
    labels = [f"{path}: record {i}" for i in range(len(records))]
    indices = np.array([r.n for r in records], dtype=np.int64)
    meta = meta_from_eman_headers(headers, paths, indices, labels)
    return meta, sources


# --- writing -----------------------------------------------------------------------------


def _sources_readable_by(stack: ParticleStack, suffixes: tuple[str, ...]) -> bool:
    if stack.in_memory or len(stack) == 0:
        return False
    return all(Path(str(p)).suffix.lower() in suffixes for p in np.unique(stack.meta.source_path))


def _source_files(stack: ParticleStack) -> tuple[np.ndarray, np.ndarray]:
    """Each image's file (as :func:`ref_path` writes it) and its index in that file."""
    uniq, inv = np.unique(stack.meta.source_path.astype(str), return_inverse=True)
    files = np.array([ref_path(u) for u in uniq], dtype=object)[inv]
    return files, stack.meta.source_index


def _star_names(index: np.ndarray, files: np.ndarray) -> np.ndarray:
    return np.array([f"{i + 1:06d}@{f}" for i, f in zip(index, files, strict=True)], dtype=object)


def star_image_names(stack: ParticleStack) -> np.ndarray | None:
    """``rlnImageName`` of each image of ``stack`` in its own file (``000001@path``), as
    a written STAR file refers to it; ``None`` when RELION cannot read those files (not
    MRC stacks) or the images are in memory."""
    if not _sources_readable_by(stack, (".mrcs",)):
        return None
    files, index = _source_files(stack)
    return _star_names(index, files)


ChunkFunc = Callable[[np.ndarray, np.ndarray], np.ndarray]


def write_stack(
    stack: ParticleStack,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    chunk_size: int = 1024,
    copy_images: bool = False,
    process: ChunkFunc | None = None,
) -> list[Path]:
    """Write ``stack`` as ``.mrcs``, ``.star``, ``.hdf`` or ``.lst``; return the files written.

    ``.star`` and ``.lst`` refer to the existing image files when RELION (MRC stacks)
    or EMAN2 (MRC or HDF) can read them, unless ``copy_images`` or ``process``;
    otherwise the images are written to ``<stem>.mrcs`` beside the output.
    ``process(indices, images)`` transforms each chunk before it is written. Every file
    is written atomically; existing files are replaced only with ``overwrite``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mrcs", ".star", ".hdf", ".lst"):
        raise CryorefineError(
            f"{path}: cannot write a particle stack of this type; use .mrcs, .star, .hdf or .lst"
        )
    check_output(path, overwrite=overwrite)
    if suffix == ".mrcs":
        _write_mrcs(stack, path, overwrite, chunk_size, process)
        return [path]
    if suffix == ".hdf":
        with eman2.HdfStackWriter(path, overwrite=overwrite) as w:
            for idx, images in _chunks(stack, chunk_size, process):
                w.append(images, [eman_header(stack.meta, int(i)) for i in idx])
        return [path]
    written = []
    readable = (".mrcs",) if suffix == ".star" else (".mrcs", ".hdf")
    if copy_images or process is not None or not _sources_readable_by(stack, readable):
        images_path = path.with_suffix(".mrcs")
        if images_path == path:
            raise CryorefineError(f"{path}: cannot hold its own images")
        check_output(images_path, overwrite=overwrite)
        _write_mrcs(stack, images_path, overwrite, chunk_size, process)
        written.append(images_path)
        files = np.full(len(stack), ref_path(images_path), dtype=object)
        index = np.arange(len(stack))
    else:
        files, index = _source_files(stack)
    if suffix == ".star":
        names = _star_names(index, files)
        star.write_particle_star(path, stack.meta, names, stack.box, overwrite=overwrite)
    else:
        records = [
            lst.LstRecord(int(i), str(f), eman_header(stack.meta, j, with_apix=False))
            for j, (i, f) in enumerate(zip(index, files, strict=True))
        ]
        lst.write_lst(path, records, overwrite=overwrite)
    written.append(path)
    return written


def _chunks(
    stack: ParticleStack, size: int, process: ChunkFunc | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for idx, images in stack.chunks(size):
        yield (
            idx,
            (images if process is None else np.asarray(process(idx, images), dtype=np.float32)),
        )


def _write_mrcs(
    stack: ParticleStack,
    path: Path,
    overwrite: bool,
    chunk_size: int,
    process: ChunkFunc | None = None,
) -> None:
    with MrcStackWriter(path, len(stack), stack.box, apix=stack.apix, overwrite=overwrite) as w:
        for idx, images in _chunks(stack, chunk_size, process):
            w.write(int(idx[0]), images)

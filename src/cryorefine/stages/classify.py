"""e2classify: each particle to its ``sep`` best projections of a similarity matrix.

The classmx holds, per particle (row) and choice (column, best first), the class
(projection index), weight (1.0, as EMAN2) and the particle -> projection alignment
copied from the similarity matrix (dx, dy, dalpha, flip, scale).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryorefine.align.compare import sqeuclidean
from cryorefine.config import ClassifyConfig
from cryorefine.errors import CryorefineError
from cryorefine.geometry.euler import particle_from_alignment
from cryorefine.io.atomic import check_output
from cryorefine.io.eman2 import HdfMatrixWriter, MatrixFile
from cryorefine.stages.simmx import Simmx, read_simmx_rows, simmx_shape

#: the --simvec score of a class that no particle chose first (EMAN2's value)
SIMVEC_UNUSED = 100000.0
CLASSMX_FIELDS = ("cls", "weight", "dx", "dy", "dalpha", "flip", "scale")


@dataclass
class ClassMx:
    """``(Np, sep)`` arrays, best choice first; ``cls`` holds projection indices (int64)."""

    cls: np.ndarray
    weight: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    dalpha: np.ndarray
    flip: np.ndarray
    scale: np.ndarray

    @classmethod
    def empty(cls, n_p: int, sep: int) -> ClassMx:
        z = lambda: np.zeros((n_p, sep), np.float32)  # noqa: E731
        return cls(np.zeros((n_p, sep), np.int64), z(), z(), z(), z(), z(), z())

    def put(self, rows: np.ndarray, part: ClassMx) -> None:
        """Set the rows ``rows`` from ``part``'s."""
        for name in CLASSMX_FIELDS:
            getattr(self, name)[rows] = getattr(part, name)

    def rows(self, idx: np.ndarray) -> ClassMx:
        """The rows ``idx``, as a matrix of their own."""
        return ClassMx(*(getattr(self, name)[idx] for name in CLASSMX_FIELDS))

    def members(self, n_classes: int) -> list[np.ndarray]:
        """Per class, the particles assigned to it in any of their ``sep`` choices."""
        rows = np.repeat(np.arange(self.cls.shape[0]), self.cls.shape[1])
        return grouped(rows, self.cls.ravel(), n_classes)


def grouped(values: np.ndarray, keys: np.ndarray, n: int) -> list[np.ndarray]:
    """``values`` split by integer ``keys`` in ``[0, n)``: one array per key, in the
    values' order (one stable sort, not a pass per key)."""
    order = np.argsort(keys, kind="stable")
    bounds = np.searchsorted(np.asarray(keys)[order], np.arange(n + 1))
    return [values[order[a:b]] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _standardised(score: np.ndarray) -> np.ndarray:
    s = score.astype(np.float64)
    std = s.std(axis=1, keepdims=True)
    return (s - s.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1)


def simvec_patterns(scores: Iterable[np.ndarray], nc: int) -> np.ndarray:
    """EMAN2 ``--simvec``'s class patterns ``(nc, nc)``: per class, the mean standardised
    score row of the particles that chose it first, normalised (0 for a class none
    chose). ``scores``: the matrix's score rows, whole or chunk by chunk."""
    acc = np.zeros((nc, nc))
    for score in scores:
        np.add.at(acc, np.argmin(score, axis=1), _standardised(score))
    norm = np.linalg.norm(acc, axis=1, keepdims=True)
    return np.where(norm > 0, acc / np.where(norm > 0, norm, 1), 0)


def simvec_scores(score: np.ndarray, patterns: np.ndarray | None = None) -> np.ndarray:
    """EMAN2 ``--simvec``: rows compared with each class's pattern
    (:func:`simvec_patterns`, of ``score`` itself unless given)."""
    n_p, nc = score.shape
    if patterns is None:
        patterns = simvec_patterns([score], nc)
    s = score.astype(np.float64)
    out = np.full((n_p, nc), SIMVEC_UNUSED)
    used = np.linalg.norm(patterns, axis=1) > 0
    for i in np.flatnonzero(used):  # one comparison per used class, vectorised over particles
        out[:, i] = sqeuclidean(
            s[:, None, :].astype(np.float32),
            np.broadcast_to(patterns[i], (n_p, 1, nc)),
            normto=True,
        )
    return out


def classify(
    sim: Simmx, cfg: ClassifyConfig | None = None, *, patterns: np.ndarray | None = None
) -> ClassMx:
    """Assign each particle to its ``cfg.sep`` lowest-scoring projections (first minimum
    wins); with ``cfg.simvec`` by the pattern of similarities (EMAN2 ``--simvec``; the
    class patterns of the whole matrix, :func:`simvec_patterns`, when ``sim`` holds only
    some of its rows)."""
    cfg = cfg or ClassifyConfig()
    sep, simvec = cfg.sep, cfg.simvec
    n_p, nc = sim.score.shape
    if not 1 <= sep <= nc:
        raise CryorefineError(f"--sep {sep}: must be between 1 and the {nc} projections")
    row = simvec_scores(sim.score, patterns) if simvec else sim.score.astype(np.float64)
    # a stable sort keeps the first of equal scores first, as EMAN2's repeated argmin
    cls = np.argsort(row, axis=1, kind="stable")[:, :sep]
    take = lambda a: np.take_along_axis(a, cls, axis=1).astype(np.float32)  # noqa: E731
    return ClassMx(
        cls.astype(np.int64),
        np.ones((n_p, sep), np.float32),
        take(sim.dx),
        take(sim.dy),
        take(sim.dalpha),
        take(sim.flip),
        take(sim.scale),
    )


def classify_file(
    path: Path, cfg: ClassifyConfig | None = None, *, rows: int = 4096
) -> tuple[ClassMx, np.ndarray]:
    """:func:`classify` of a similarity matrix file, read ``rows`` particles at a time
    (twice with ``--simvec``: the class patterns, then the classes), never whole.
    Returns the classification and each particle's score for its first class."""
    cfg = cfg or ClassifyConfig()
    n_p, nc = simmx_shape(path)
    patterns = None
    if cfg.simvec and n_p:
        patterns = simvec_patterns((p.score for _, p in read_simmx_rows(path, rows)), nc)
    classify(Simmx.empty(0, nc), cfg)  # the options' checks, before any row is read
    cm, best = ClassMx.empty(n_p, cfg.sep), np.empty(n_p, np.float32)
    for idx, part in read_simmx_rows(path, rows):
        sub = classify(part, cfg, patterns=patterns)
        cm.put(idx, sub)
        best[idx] = np.take_along_axis(part.score, sub.cls[:, :1], axis=1)[:, 0]
    return cm, best


def assigned_poses(
    cm: ClassMx, ref_rotations: np.ndarray, *, choice: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's orientation and shift from its ``choice``-th class.

    ``ref_rotations`` ``(Nc, 3, 3)``: the projections' orientations. Returns
    ``(Np, 3, 3)`` rotations and ``(Np, 2)`` shifts in pixels (x, y: where the map's
    centre lands in the particle, RELION origin = ``-shift``), composing the
    projection's orientation with the stored 2D alignment (spec ch02 §5).
    """
    c = cm.cls[:, choice]
    return particle_from_alignment(
        ref_rotations[c],
        cm.dalpha[:, choice],
        cm.dx[:, choice],
        cm.dy[:, choice],
        cm.flip[:, choice] > 0.5,
    )


def write_classmx(
    path: Path,
    cm: ClassMx,
    n_classes: int,
    *,
    header: dict | None = None,
    overwrite: bool = False,
) -> None:
    """EMAN2's classification matrix (spec ch03 §6.4): an ``.hdf`` stack of 7 float32
    images ``nx = sep``, ``ny = particles`` (class, weight, dx, dy, dalpha, flip,
    scale), best choice first; ``header`` (and ``n_classes``) on image 0."""
    n_p, sep = cm.cls.shape
    headers = [{"n_classes": int(n_classes), **(header or {})}] + [{} for _ in CLASSMX_FIELDS[1:]]
    with HdfMatrixWriter(
        path, len(CLASSMX_FIELDS), n_p, sep, headers=headers, overwrite=overwrite
    ) as w:
        for i, name in enumerate(CLASSMX_FIELDS):
            w.write(i, slice(0, n_p), getattr(cm, name))


def read_classmx(path: Path) -> ClassMx:
    """Read a classification matrix: EMAN2's ``.hdf`` images (2, 6 or 7: without the
    alignment, dx ... flip read as 0 and scale as 1), or cryorefine 0.1's ``.h5``."""
    with MatrixFile(
        path,
        CLASSMX_FIELDS,
        (2, 6, 7),
        legacy="cryorefine classmx 1",
        what="classification matrix",
        absent={"scale": 1.0},
    ) as f:
        data = f.read(0, f.shape[0])
    cls = data["cls"]
    if not (np.isfinite(cls).all() and (cls >= 0).all() and (cls == np.round(cls)).all()):
        raise CryorefineError(f"{path}: class numbers must be whole numbers from 0")
    data["cls"] = cls.astype(np.int64)
    return ClassMx(**data)


def run_classify(
    simmx_path: Path, output: Path, cfg: ClassifyConfig, *, overwrite: bool = False
) -> ClassMx:
    """Read a similarity matrix, classify (:func:`classify`), write the classmx."""
    check_output(output, overwrite=overwrite)
    cm, _ = classify_file(simmx_path, cfg)
    write_classmx(output, cm, simmx_shape(simmx_path)[1], overwrite=overwrite)
    return cm

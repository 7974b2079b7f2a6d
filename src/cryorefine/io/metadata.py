"""The per-particle metadata table shared by every stack format.

Conventions (format quirks are converted at the edge, in ``star.py`` and ``eman2.py``):

* ``rotations`` ``(k, 3, 3)``: the projection orientation (``geometry.euler``); NaN
  where unknown.
* ``shift_a`` ``(k, 2)``: ``(x, y)`` offset in Å of the particle's centre from the box
  centre ``n // 2``; EMAN2 ``(tx, ty) * apix``; RELION ``rlnOriginXAngst = -x``.
* ``class_number`` 0-based (-1: none); ``half_set`` 1 or 2 (0: none).
* ``extra`` and ``optics_extra``: columns of a STAR file that cryorefine does not use,
  carried through unchanged (keyed by RELION label without the underscore).
* ``ctf_curves``: EMAN2's measured curves of a fitted CTF (e2ctf), per particle
  ``(dsbg in 1/Å, background, snr)`` or None; ``None`` for the whole table when no
  particle has them. ``snr`` feeds the comparators' ``snrweight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from cryorefine.fourier.ctf import CTFParams


@dataclass
class ParticleMetadata:
    """Metadata of ``k`` particles, one array entry per particle."""

    source_path: np.ndarray
    source_index: np.ndarray
    apix: np.ndarray
    shift_a: np.ndarray
    rotations: np.ndarray
    ctf: CTFParams
    class_number: np.ndarray
    weight: np.ndarray
    half_set: np.ndarray
    score: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    optics_extra: dict[str, np.ndarray] = field(default_factory=dict)
    ctf_curves: np.ndarray | None = None

    @classmethod
    def empty(
        cls,
        n: int,
        *,
        apix: float | np.ndarray = 0.0,
        source_path: str = "",
        source_index: np.ndarray | None = None,
    ) -> ParticleMetadata:
        """``n`` particles with nothing known but their source and pixel size."""
        return cls(
            source_path=np.full(n, source_path, dtype=object),
            source_index=np.arange(n, dtype=np.int64)
            if source_index is None
            else np.asarray(source_index, dtype=np.int64),
            apix=np.broadcast_to(np.asarray(apix, dtype=np.float64), (n,)).copy(),
            shift_a=np.zeros((n, 2)),
            rotations=np.full((n, 3, 3), np.nan),
            ctf=CTFParams.empty(n),
            class_number=np.full(n, -1, dtype=np.int64),
            weight=np.ones(n),
            half_set=np.zeros(n, dtype=np.int64),
            score=np.full(n, np.nan),
        )

    def __len__(self) -> int:
        return len(self.source_index)

    @property
    def has_orientation(self) -> np.ndarray:
        """Boolean ``(k,)``: which particles have a known orientation."""
        return np.isfinite(self.rotations).all(axis=(1, 2))

    def take(self, indices: np.ndarray) -> ParticleMetadata:
        """The metadata of a subset (or reordering) of the particles."""
        idx = np.asarray(indices)
        kw = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                kw[f.name] = None
            elif isinstance(value, dict):
                kw[f.name] = {k: v[idx] for k, v in value.items()}
            elif isinstance(value, CTFParams):
                kw[f.name] = value.take(idx)
            else:
                kw[f.name] = value[idx]
        return ParticleMetadata(**kw)

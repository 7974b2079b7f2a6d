"""Point-group symmetry in EMAN2's setting, and its asymmetric units.

Groups: ``c<N>`` (N-fold on z), ``d<N>`` (N-fold on z, a 2-fold on x), ``tet``
(3-fold on z), ``oct`` (4-folds on x, y, z) and ``icos`` (5-fold on z, 2-fold on y).
Operator ``S_i`` leaves the map unchanged (``V(S_i^T v) = V(v)``), so orientations
``R`` and ``R S_i`` give the same projection.

The asymmetric unit is a region of viewing directions ``(alt, az)`` (EMAN angles,
degrees). ``inc_mirror=False`` keeps half of it: the other half holds the mirror
images (``R_y(180) R`` projects to the x-mirror of ``R``), which 2D alignment
reaches by flipping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.geometry.euler import eman_to_matrices, matrices_to_eman

_PLATONIC_FOLD = {"tet": 3, "oct": 4, "icos": 5}
#: azimuth added to generated orientations after the membership test
_AZ_OFFSET = {"tet": 0.0, "oct": 0.0, "icos": 234.0}
_EPS = 1e-6  # degrees of slack on the inclusive bounds


def _eman_ops(az, alt, phi) -> np.ndarray:
    return eman_to_matrices(np.asarray(az, float), np.asarray(alt, float), np.asarray(phi, float))


def _icos_operators() -> np.ndarray:
    lvl1 = float(np.rad2deg(np.arctan(2.0)))  # 63.4349 in EMAN2's table, exact here
    lvl2 = 180.0 - lvl1
    ps = (0, 288, 216, 144, 72)
    table = [(0, 0, p) for p in ps]
    table += [(a, lvl1, p) for a in (0, 72, 144, 216, 288) for p in (36, 324, 252, 180, 108)]
    table += [(a, lvl2, p) for a in (36, 108, 180, 252, 324) for p in ps]
    table += [(0, 180, p) for p in ps]
    t = np.array(table, dtype=float)
    return _eman_ops(t[:, 0] + 90, t[:, 1], t[:, 2] - 90)


@dataclass(frozen=True)
class SymmetryGroup:
    """A point group: ``kind`` in ``c, d, tet, oct, icos`` and ``n`` (for c and d)."""

    kind: str
    n: int = 1

    @property
    def name(self) -> str:
        return f"{self.kind}{self.n}" if self.kind in ("c", "d") else self.kind

    @property
    def order(self) -> int:
        return {"c": self.n, "d": 2 * self.n, "tet": 12, "oct": 24, "icos": 60}[self.kind]

    @property
    def platonic(self) -> bool:
        return self.kind in _PLATONIC_FOLD

    @property
    def az_offset(self) -> float:
        return _AZ_OFFSET.get(self.kind, 0.0)

    @cached_property
    def operators(self) -> np.ndarray:
        """``(order, 3, 3)`` float64 rotation matrices, in EMAN2's order."""
        k, n = self.kind, self.n
        if k == "c":
            return _eman_ops(360.0 * np.arange(n) / n, 0.0, 0.0)
        if k == "d":
            az = 360.0 * (np.arange(2 * n) % n) / n
            alt = np.where(np.arange(2 * n) < n, 0.0, 180.0)
            return _eman_ops(az, alt, 0.0)
        if k == "tet":
            t = [(0, 0, p) for p in (0, 120, 240)]
            tet = float(np.rad2deg(np.arccos(-1.0 / 3.0)))  # 109.4712
            t += [(a, tet, p) for a in (0, 120, 240) for p in (60, 180, 300)]
        elif k == "oct":
            ps = (0, 90, 180, 270)
            t = [(0, 0, p) for p in ps] + [(a, 90, p) for a in ps for p in ps]
            t += [(0, 180, p) for p in ps]
        else:
            return _icos_operators()
        t = np.array(t, dtype=float)
        return _eman_ops(t[:, 0], t[:, 1], t[:, 2])

    # --- asymmetric unit ------------------------------------------------------------
    def alt_max(self, inc_mirror: bool) -> float:
        """Largest ``alt`` (degrees) of the asymmetric unit."""
        if self.kind == "c":
            return 180.0 if inc_mirror else 90.0
        if self.kind == "d":
            return 90.0
        return float(np.rad2deg(self._platonic_alpha))

    def az_max(self, inc_mirror: bool) -> float:
        """Largest ``az`` (degrees, before the group's azimuth offset)."""
        if self.kind == "c":
            return 360.0 / self.n
        if self.kind == "d":
            return (360.0 if inc_mirror else 180.0) / self.n
        full = 360.0 / _PLATONIC_FOLD[self.kind]
        if self.kind == "tet":
            return full
        return full if inc_mirror else full / 2

    @property
    def _platonic_sigma(self) -> float:
        return 2 * np.pi / _PLATONIC_FOLD[self.kind]

    @property
    def _platonic_alpha(self) -> float:
        s = self._platonic_sigma
        return float(np.arccos(1.0 / (np.sqrt(3.0) * np.tan(s / 2))))

    @property
    def _platonic_half_theta_c(self) -> float:
        s = self._platonic_sigma
        return float(0.5 * np.arccos(np.cos(s) / (1 - np.cos(s))))

    def _platonic_bound(self, a_rad: np.ndarray, x_rad: float) -> np.ndarray:
        s2 = self._platonic_sigma / 2
        tc = self._platonic_half_theta_c
        with np.errstate(divide="ignore"):
            return np.arctan(
                np.sin(s2) / (np.sin(s2 - a_rad) / np.tan(tc) + np.sin(a_rad) / np.tan(x_rad))
            )

    def in_asym_unit(
        self, alt_deg: np.ndarray, az_deg: np.ndarray, *, inc_mirror: bool = False
    ) -> np.ndarray:
        """Whether directions ``(alt, az)`` lie in the unit (``az`` without offset).

        EMAN2's ``is_in_asym_unit``; the inclusive bounds get 1e-6 deg of slack.
        """
        alt = np.asarray(alt_deg, dtype=np.float64)
        az = np.asarray(az_deg, dtype=np.float64)
        am, zm = self.alt_max(inc_mirror), self.az_max(inc_mirror)
        if self.kind == "c":
            ok = (alt <= am + _EPS) & (az <= zm + _EPS)
            return ok & (az >= -_EPS) if self.n != 1 else ok
        if self.kind == "d":
            ok = (alt >= -_EPS) & (alt <= 90 + _EPS) & (az <= zm + _EPS)
            return ok if (self.n == 1 and inc_mirror) else ok & (az >= -_EPS)
        ok = (alt >= -_EPS) & (alt <= am + _EPS) & (az >= -_EPS) & (az <= zm + _EPS)
        a = np.deg2rad(np.clip(az, 0, None))
        sig = self._platonic_sigma
        a = np.where(a > sig / 2, sig - a, a)
        bound = np.rad2deg(self._platonic_bound(a, self._platonic_alpha))
        ok &= alt < bound + _EPS  # EMAN2's float32 bound admits points on it
        if self.kind == "tet" and not inc_mirror:
            ok &= alt <= np.rad2deg(self._platonic_bound(a, self._platonic_alpha / 2)) + _EPS
        return ok

    def contains(self, rotations: np.ndarray, *, inc_mirror: bool = False) -> np.ndarray:
        """Whether each orientation's viewing direction lies in the asymmetric unit."""
        az, alt, _ = matrices_to_eman(rotations)
        az = np.mod(az - self.az_offset + _EPS, 360.0) - _EPS
        return self.in_asym_unit(alt, az, inc_mirror=inc_mirror)

    def reduce(
        self, rotations: np.ndarray, *, inc_mirror: bool = True
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Move each orientation into the asymmetric unit.

        Returns ``(reduced, operator_index, mirrored)``: ``reduced = R S_i`` (or, when
        ``inc_mirror`` is false and only the mirror half holds it,
        ``R_y(180) R S_i``, whose projection is the x-mirror of ``R``'s).
        """
        rots = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
        k = len(rots)
        reduced = np.full_like(rots, np.nan)
        index = np.full(k, -1)
        mirrored = np.zeros(k, dtype=bool)
        flip = np.diag([-1.0, 1.0, -1.0])  # R_y(180)
        candidates = [(rots, False)] + ([] if inc_mirror else [(flip @ rots, True)])
        for base, is_mirror in candidates:
            todo = index < 0
            if not todo.any():
                break
            for i, op in enumerate(self.operators):
                todo = index < 0
                if not todo.any():
                    break
                trial = base[todo] @ op
                inside = self.contains(trial, inc_mirror=inc_mirror)
                sel = np.flatnonzero(todo)[inside]
                reduced[sel] = trial[inside]
                index[sel] = i
                mirrored[sel] = is_mirror
        if (index < 0).any():
            raise RuntimeError(
                f"{self.name}: {int((index < 0).sum())} orientations could not "
                "be reduced into the asymmetric unit"
            )
        return reduced, index, mirrored

    def angle_between(self, a: np.ndarray, b: np.ndarray, *, mirror: bool = False) -> np.ndarray:
        """Smallest rotation angle (degrees) from ``a`` to any equivalent of ``b``.

        ``mirror=True`` also allows ``R_y(180) b`` (the mirror-image view), as when 2D
        alignment may flip. ``a`` and ``b`` are ``(k, 3, 3)`` (broadcast).
        """
        a = np.asarray(a, dtype=np.float64).reshape(-1, 3, 3)
        b = np.asarray(b, dtype=np.float64).reshape(-1, 3, 3)
        variants = [b] + ([np.diag([-1.0, 1.0, -1.0]) @ b] if mirror else [])
        best = np.full(np.broadcast_shapes(a.shape[:1], b.shape[:1]), np.inf)
        for v in variants:
            for op in self.operators:
                # ||A - B||_F = 2 sqrt(2) sin(theta / 2): accurate at small angles too
                dist = np.linalg.norm(a - v @ op, axis=(1, 2))
                theta = 2 * np.arcsin(np.clip(dist / (2 * np.sqrt(2)), 0, 1))
                best = np.minimum(best, np.rad2deg(theta))
        return best


def symmetry_group(name: str) -> SymmetryGroup:
    """Parse ``c<N>``, ``d<N>``, ``tet``, ``oct``, ``icos`` (``icos5``); case-insensitive.

    Raises
    ------
    CryorefineError
        For anything else (``c0``, ``d``, ``q5``, ``icos2``, helical ``h``...).
    """
    text = str(name).strip().lower()
    if text in ("tet", "oct", "icos", "icos5"):
        return SymmetryGroup(text[:4] if text.startswith("icos") else text)
    m = re.fullmatch(r"([cd])(\d+)", text)
    if m and int(m.group(2)) >= 1:
        return SymmetryGroup(m.group(1), int(m.group(2)))
    hint = ""
    if text.startswith("h"):
        hint = " (helical symmetry is not supported)"
    elif text == "icos2":
        hint = " (icos2 is not supported; use icos)"
    raise CryorefineError(
        f"--sym: '{name}' is not a symmetry; use c<N> or d<N> with N >= 1, tet, oct or icos{hint}"
    )

"""Euler-angle conventions <-> rotation matrices.

Inside cryorefine an orientation is a ``(k, 3, 3)`` float64 matrix ``R`` acting on
``(x, y, z)`` column vectors: the map rotated by ``R`` (density at ``v`` moved to
``R v``) and integrated along ``z`` gives the projection. This is the matrix EMAN2
stores in ``xform.projection`` and the matrix RELION builds in ``Euler_angles2matrix``.

* EMAN ``(az, alt, phi)``: ``R = Z(phi) X(alt) Z(az)`` with frame matrices
  ``Z(t) = [[c, s, 0], [-s, c, 0], [0, 0, 1]]``, ``X(t) = [[1, 0, 0], [0, c, s], [0, -s, c]]``.
* RELION ``(rot, tilt, psi)``: ``R = Z(psi) Y(tilt) Z(rot)`` with
  ``Y(t) = [[c, 0, -s], [0, 1, 0], [s, 0, c]]``.

The two agree when ``rot = az - 90``, ``tilt = alt``, ``psi = phi + 90``. All angles
are in degrees.
"""

from __future__ import annotations

import numpy as np

_EPS = 16 * np.finfo(np.float32).eps


def _frame_z(t: np.ndarray) -> np.ndarray:
    c, s = np.cos(t), np.sin(t)
    m = np.zeros(t.shape + (3, 3))
    m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1], m[..., 2, 2] = c, s, -s, c, 1.0
    return m


def _frame_x(t: np.ndarray) -> np.ndarray:
    c, s = np.cos(t), np.sin(t)
    m = np.zeros(t.shape + (3, 3))
    m[..., 0, 0], m[..., 1, 1], m[..., 1, 2], m[..., 2, 1], m[..., 2, 2] = 1.0, c, s, -s, c
    return m


def _frame_y(t: np.ndarray) -> np.ndarray:
    c, s = np.cos(t), np.sin(t)
    m = np.zeros(t.shape + (3, 3))
    m[..., 0, 0], m[..., 0, 2], m[..., 1, 1], m[..., 2, 0], m[..., 2, 2] = c, -s, 1.0, s, c
    return m


def _as_rad(*angles_deg: np.ndarray) -> list[np.ndarray]:
    arrs = np.broadcast_arrays(
        *[np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in angles_deg]
    )
    return [np.deg2rad(a) for a in arrs]


def eman_to_matrices(az_deg, alt_deg, phi_deg) -> np.ndarray:
    """EMAN ``(az, alt, phi)`` in degrees -> ``(k, 3, 3)`` rotation matrices."""
    az, alt, phi = _as_rad(az_deg, alt_deg, phi_deg)
    return _frame_z(phi) @ _frame_x(alt) @ _frame_z(az)


def relion_to_matrices(rot_deg, tilt_deg, psi_deg) -> np.ndarray:
    """RELION ``(rot, tilt, psi)`` (ZYZ) in degrees -> ``(k, 3, 3)`` rotation matrices."""
    rot, tilt, psi = _as_rad(rot_deg, tilt_deg, psi_deg)
    return _frame_z(psi) @ _frame_y(tilt) @ _frame_z(rot)


def _wrap180(a: np.ndarray) -> np.ndarray:
    """Wrap degrees into (-180, 180]."""
    return 180.0 - np.mod(180.0 - a, 360.0)


def matrices_to_relion(rotations: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(k, 3, 3)`` rotations -> RELION ``(rot, tilt, psi)`` in degrees.

    ``rot, psi`` in (-180, 180], ``tilt`` in [0, 180]; at ``tilt = 0`` (or 180) the
    whole in-plane angle is put in ``psi`` and ``rot = 0``.
    """
    m = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    sb = np.hypot(m[:, 0, 2], m[:, 1, 2])
    general = sb > _EPS
    rot = np.where(general, np.arctan2(m[:, 2, 1], m[:, 2, 0]), 0.0)
    tilt = np.where(general, np.arctan2(sb, m[:, 2, 2]), np.where(m[:, 2, 2] > 0, 0.0, np.pi))
    psi_general = np.arctan2(m[:, 1, 2], -m[:, 0, 2])
    psi_flat = np.where(
        m[:, 2, 2] > 0, np.arctan2(-m[:, 1, 0], m[:, 0, 0]), np.arctan2(m[:, 1, 0], -m[:, 0, 0])
    )
    psi = np.where(general, psi_general, psi_flat)
    return _wrap180(np.rad2deg(rot)), np.rad2deg(tilt), _wrap180(np.rad2deg(psi))


def matrices_to_eman(rotations: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(k, 3, 3)`` rotations -> EMAN ``(az, alt, phi)`` in degrees (EMAN2's rules).

    ``az, phi`` in [0, 360), ``alt`` in [0, 180]; at ``alt = 0`` or 180, ``az = 0``.
    """
    rot, tilt, psi = matrices_to_relion(rotations)
    flat = (tilt == 0.0) | (tilt == 180.0)
    m = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    phi_flat = np.where(
        tilt == 0.0, np.arctan2(m[:, 0, 1], m[:, 0, 0]), np.arctan2(-m[:, 0, 1], m[:, 0, 0])
    )
    az = np.where(flat, 0.0, rot + 90.0)
    phi = np.where(flat, np.rad2deg(phi_flat), psi - 90.0)
    return np.mod(az, 360.0), tilt, np.mod(phi, 360.0)


def matrices_to_quaternions(rotations: np.ndarray) -> np.ndarray:
    """``(k, 3, 3)`` rotations -> unit quaternions ``(k, 4)`` as ``(w, x, y, z)``, w >= 0."""
    from scipy.spatial.transform import Rotation

    q = Rotation.from_matrix(np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)).as_quat()
    q = np.roll(q, 1, axis=1)  # scipy is scalar-last
    return q * np.where(q[:, :1] < 0, -1.0, 1.0)


def quaternions_to_matrices(quaternions: np.ndarray) -> np.ndarray:
    """Quaternions ``(k, 4)`` ``(w, x, y, z)`` -> ``(k, 3, 3)`` rotation matrices."""
    from scipy.spatial.transform import Rotation

    q = np.asarray(quaternions, dtype=np.float64).reshape(-1, 4)
    return Rotation.from_quat(np.roll(q, -1, axis=1)).as_matrix()


def rotation_2d(alpha_deg: np.ndarray) -> np.ndarray:
    """EMAN2's 2D rotation ``R(0, 0, alpha)``, ``(k, 3, 3)``.

    ``[[c, s, 0], [-s, c, 0], [0, 0, 1]]`` with ``c, s`` of ``alpha`` (degrees).
    """
    a = np.deg2rad(np.atleast_1d(np.asarray(alpha_deg, dtype=np.float64)))
    return _frame_z(a)


def particle_from_alignment(
    reference: np.ndarray, alpha_deg, tx_px, ty_px, mirror
) -> tuple[np.ndarray, np.ndarray]:
    """A particle's orientation and shift from its 2D alignment to a reference projection.

    The 2D transform ``S = (alpha, tx, ty, mirror)`` (EMAN2 ``xform.align2d``: rotate,
    translate, then x-mirror) brings the particle onto the projection made with
    ``reference`` ``(k, 3, 3)``. The particle is then the projection with
    ``S^-1 R_ref``: rotation ``R_alpha^T F^m R_ref`` (made proper by negating row 2 when
    mirrored, which leaves a projection unchanged) shifted by ``tau = -R_alpha^T t``.

    Returns ``(rotations (k, 3, 3), shifts (k, 2) px)``; ``shift`` is EMAN2's
    ``xform.projection`` ``(tx, ty)`` (RELION origin = ``-shift``).
    """
    ref = np.asarray(reference, dtype=np.float64).reshape(-1, 3, 3)
    alpha, tx, ty, m = np.broadcast_arrays(
        np.atleast_1d(np.asarray(alpha_deg, float)),
        np.atleast_1d(np.asarray(tx_px, float)),
        np.atleast_1d(np.asarray(ty_px, float)),
        np.atleast_1d(np.asarray(mirror).astype(bool)),
    )
    ra_t = np.swapaxes(rotation_2d(alpha), 1, 2)
    flip = np.where(m[:, None], -1.0, 1.0)
    fm = np.zeros((len(m), 3, 3))
    fm[:, 0, 0], fm[:, 1, 1], fm[:, 2, 2] = flip[:, 0], 1.0, 1.0
    rot = ra_t @ fm @ ref
    rot[:, 2] *= flip  # fold the mirror: negate row 2 (a z-reflection inside the projection)
    t = np.stack([tx, ty, np.zeros_like(tx)], axis=1)
    tau = -(ra_t @ t[:, :, None])[:, :2, 0]
    return rot, tau


def transform_2d(alpha_deg, tx_px, ty_px, mirror) -> np.ndarray:
    """EMAN2 ``2d`` Transforms ``(k, 3, 4)``: ``v -> F^m (R_alpha v + t)``.

    Rotate by ``alpha`` (EMAN ``phi`` slot), translate by ``(tx, ty)`` px, then mirror x
    when ``mirror``; the stored matrix is ``[F^m R_alpha | F^m t]`` (EMAN2 stores the
    pre-mirror ``tx`` negated).
    """
    alpha, tx, ty, m = np.broadcast_arrays(
        np.atleast_1d(np.asarray(alpha_deg, float)),
        np.atleast_1d(np.asarray(tx_px, float)),
        np.atleast_1d(np.asarray(ty_px, float)),
        np.atleast_1d(np.asarray(mirror).astype(bool)),
    )
    out = np.zeros((len(alpha), 3, 4))
    out[:, :, :3] = rotation_2d(alpha)
    out[:, 0, 3], out[:, 1, 3] = tx, ty
    out[m, 0, :] *= -1.0
    return out


def decompose_2d(transforms: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(alpha_deg, tx_px, ty_px, mirror)`` of EMAN2 ``2d`` Transforms ``(k, 3, 4)``."""
    t = np.asarray(transforms, dtype=np.float64).reshape(-1, 3, 4).copy()
    mirror = np.linalg.det(t[:, :, :3]) < 0
    t[mirror, 0, :] *= -1.0
    alpha = np.rad2deg(np.arctan2(t[:, 0, 1], t[:, 0, 0]))
    return alpha, t[:, 0, 3], t[:, 1, 3], mirror

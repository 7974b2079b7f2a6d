"""Local search: each particle's orientation and shift refined around its current pose.

A particle is compared with central slices of its map's padded 3D transform
(:func:`cryorefine.fourier.project.prepare_volume`) taken at rotations near its own, one
particle at a time inside a compiled kernel: no bank of every orientation is made, and
the memory per particle is that of its candidates' scores.

* **Grid.** Rotations ``R = exp([w]x) R0`` with the rotation vector ``w`` on a cubic grid
  of spacing ``step_deg`` inside the ball ``|w| <= range_deg`` (the perturbation acts in
  the viewing frame: tilts about x and y, in-plane turns about z), times the shifts on a
  1 px grid inside the disc ``|s - s0| <= shift_px``.
* **Polish.** From the best grid point, rounds on SO(3) x R^2: the six rotations
  ``exp(+-d e_x) R`` ... and the four shifts ``s +- (d_s, 0)`` ... are scored, then one
  step along all five axes at once, to the vertex of each axis's parabola through its
  two probes and the current score. A particle moves to the best of these when it scores
  higher; its steps (from ``step_deg / 2`` and 0.5 px) stay when a probe won (the
  optimum may lie further out) and halve otherwise, until the rotation step falls below
  ``step_deg / 10``. A candidate outside the range is never taken, so no particle ends
  further than ``range_deg`` and ``shift_px`` from where it started.

Score (higher is better) of a particle's transform ``X`` (centred on its shift) against
the slice ``V`` times its CTF ``C``, over the Fourier rings ``r`` up to ``max_ring``
(origin excluded), with the caller's ring weights ``w_r`` (per particle):

* ``frc``: ``sum_r w_r FRC_r / sum_r w_r``, ``FRC_r = Re sum X conj(CV) / sqrt(sum |X|^2
  sum |CV|^2)`` (EMAN2's ``frc`` comparator, sign flipped);
* ``ccc``: ``sum_r w_r Re sum X conj(CV) / sqrt(sum_r w_r sum |X|^2 sum_r w_r sum |CV|^2)``,
  one correlation of the weighted rings (with ``w_r`` the spectral SNR, a matched filter).

Conventions: rotations as :mod:`cryorefine.fourier.project` (``R`` turns the map, the
projection sums along z); a particle's centre sits at pixel ``n // 2 + shift`` (as
:func:`cryorefine.fourier.reconstruct.image_slices`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
from numba import njit, prange
from scipy.spatial.transform import Rotation

from cryorefine.fourier.fft import fft_threads, ring_sum
from cryorefine.fourier.project import VolumeFT

#: the two scores (:func:`score_candidates` ``mode``)
SCORES = ("frc", "ccc")
#: particles per call of the compiled kernel (bounds the score table's memory)
CHUNK = 256


@dataclass(frozen=True)
class FourierPoints:
    """The ``rfft2`` points of an ``n`` x ``n`` image that the score reads: the
    half-plane (``kx > 0``, and ``ky > 0`` on ``kx = 0``) inside ring ``max_ring``.

    ``qx``, ``qy``: frequencies in cycles per box (float64); ``iy``, ``ix``: their
    indices in the ``rfft2`` array; ``ring``: ``round(|q|)``.
    """

    n: int
    qx: np.ndarray
    qy: np.ndarray
    iy: np.ndarray
    ix: np.ndarray
    ring: np.ndarray

    @classmethod
    def of(cls, n: int, max_ring: int | None = None) -> FourierPoints:
        top = n // 2 - 1 if max_ring is None else min(int(max_ring), n // 2 - 1)
        ky = scipy.fft.fftfreq(n, 1.0 / n)
        kx = np.arange(n // 2 + 1, dtype=np.float64)
        qy, qx = np.meshgrid(ky, kx, indexing="ij")
        ring = np.rint(np.hypot(qx, qy)).astype(np.int64)
        keep = ((qx > 0) | ((qx == 0) & (qy > 0))) & (ring >= 1) & (ring <= top)
        iy, ix = np.nonzero(keep)
        return cls(n, qx[keep], qy[keep], iy, ix, ring[keep])

    @property
    def rings(self) -> int:
        """Rings counted (index 0 .. max ring)."""
        return int(self.ring.max()) + 1


def particle_transforms(images: np.ndarray, points: FourierPoints) -> np.ndarray:
    """The particles' transforms at ``points`` ``(k, M)`` complex64, origin at pixel
    ``n // 2`` (no shift applied)."""
    ft = scipy.fft.rfft2(
        scipy.fft.ifftshift(np.asarray(images, np.float32), axes=(-2, -1)), workers=fft_threads()
    )
    return np.ascontiguousarray(ft[:, points.iy, points.ix], dtype=np.complex64)


def ring_power(data: np.ndarray, points: FourierPoints) -> np.ndarray:
    """Each particle's power per ring ``(k, points.rings)``, from its transform at
    ``points`` ``(k, M)``."""
    return ring_sum(np.abs(data) ** 2, points.ring, points.rings)


def rotation_grid(range_deg: float, step_deg: float) -> np.ndarray:
    """Rotation vectors ``(J, 3)`` in radians on a cubic grid of spacing ``step_deg``
    inside the ball of radius ``range_deg``; the first is zero (no change)."""
    m = int(np.floor(range_deg / step_deg + 1e-9))
    g = np.arange(-m, m + 1) * step_deg
    w = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    w = w[np.linalg.norm(w, axis=1) <= range_deg + 1e-9]
    w = w[np.argsort(np.linalg.norm(w, axis=1), kind="stable")]
    return np.deg2rad(w)


def shift_grid(shift_px: float) -> np.ndarray:
    """Shift offsets ``(S, 2)`` in px on the 1 px grid inside the disc of radius
    ``shift_px``; the first is zero."""
    m = int(np.floor(shift_px + 1e-9))
    g = np.arange(-m, m + 1, dtype=np.float64)
    s = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    s = s[np.linalg.norm(s, axis=1) <= shift_px + 1e-9]
    return s[np.argsort(np.linalg.norm(s, axis=1), kind="stable")]


def perturbed(rotations: np.ndarray, rotvecs: np.ndarray) -> np.ndarray:
    """``exp([w]x) R`` for each particle's ``R`` ``(k, 3, 3)`` and each of its
    rotation vectors ``w`` ``(k, J, 3)`` (or ``(J, 3)`` for all): ``(k, J, 3, 3)``."""
    k = len(rotations)
    w = np.broadcast_to(rotvecs, (k, *np.shape(rotvecs)[-2:]))
    d = Rotation.from_rotvec(np.array(w.reshape(-1, 3))).as_matrix().reshape(*w.shape[:2], 3, 3)
    return np.einsum("kjab,kbc->kjac", d, rotations)


@njit(cache=True, parallel=True, fastmath=True)
def _scores(vol, scale, rots, shifts, data, ctf, qx, qy, ring, weight, power, n, mode, out):
    """``out[i, j, s]``: score of particle ``i`` at rotation ``rots[i, j]`` and shift
    ``shifts[i, s]`` (px) against ``vol`` (centred full transform, axes z, y, x)."""
    k, nj = rots.shape[0], rots.shape[1]
    ns, m = shifts.shape[1], qx.shape[0]
    nring = weight.shape[1]
    size = vol.shape[0]
    c = size // 2
    half = n // 2
    two_pi_n = 2.0 * np.pi / n
    for i in prange(k):
        # the particle centred by each shift, its phase factors separable in x and y;
        # for ccc, each point carries its ring's weight, so that a score is one sum
        ex = np.empty(half + 1, np.complex64)
        ey = np.empty(n, np.complex64)
        moved = np.empty((ns, m), np.complex64)
        for s in range(ns):
            dx, dy = shifts[i, s, 0], shifts[i, s, 1]
            for q in range(half + 1):
                ph = two_pi_n * q * dx
                ex[q] = np.complex64(np.cos(ph) + 1j * np.sin(ph))
            for q in range(n):
                ph = two_pi_n * (q - half) * dy
                ey[q] = np.complex64(np.cos(ph) + 1j * np.sin(ph))
            for p in range(m):
                u = data[i, p] * ex[int(qx[p])] * ey[int(qy[p]) + half]
                if mode == 1:
                    u *= np.float32(weight[i, ring[p]])
                moved[s, p] = u
        wx = 0.0
        for r in range(nring):
            if weight[i, r] > 0.0:
                wx += weight[i, r] * power[i, r]
        model = np.empty(m, np.complex64)
        pv = np.empty(nring)
        dot = np.empty(nring)
        for j in range(nj):
            a = rots[i, j]
            pv[:] = 0.0
            wv = 0.0
            for p in range(m):
                # the 3D frequency R^T (qx, qy, 0), in the padded box
                x = (a[0, 0] * qx[p] + a[1, 0] * qy[p]) * scale + c
                y = (a[0, 1] * qx[p] + a[1, 1] * qy[p]) * scale + c
                z = (a[0, 2] * qx[p] + a[1, 2] * qy[p]) * scale + c
                x0, y0, z0 = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
                if x0 < 0 or y0 < 0 or z0 < 0 or x0 >= size - 1 or y0 >= size - 1:
                    model[p] = 0j
                    continue
                if z0 >= size - 1:
                    model[p] = 0j
                    continue
                # single precision from here: the weights and the gathered values
                fx, fy, fz = np.float32(x - x0), np.float32(y - y0), np.float32(z - z0)
                gx, gy, gz = np.float32(1) - fx, np.float32(1) - fy, np.float32(1) - fz
                v = (
                    gz
                    * (
                        gy * (gx * vol[z0, y0, x0] + fx * vol[z0, y0, x0 + 1])
                        + fy * (gx * vol[z0, y0 + 1, x0] + fx * vol[z0, y0 + 1, x0 + 1])
                    )
                    + fz
                    * (
                        gy * (gx * vol[z0 + 1, y0, x0] + fx * vol[z0 + 1, y0, x0 + 1])
                        + fy * (gx * vol[z0 + 1, y0 + 1, x0] + fx * vol[z0 + 1, y0 + 1, x0 + 1])
                    )
                ) * ctf[i, p]
                model[p] = v
                v2 = v.real * v.real + v.imag * v.imag
                if mode == 1:
                    wv += weight[i, ring[p]] * v2
                else:
                    pv[ring[p]] += v2
            for s in range(ns):
                if mode == 1:
                    num = 0.0
                    for p in range(m):
                        u, v = moved[s, p], model[p]
                        num += u.real * v.real + u.imag * v.imag
                    den = np.sqrt(wx * wv)
                    out[i, j, s] = num / den if den > 0.0 else -1.0
                    continue
                dot[:] = 0.0
                for p in range(m):
                    u, v = moved[s, p], model[p]
                    dot[ring[p]] += u.real * v.real + u.imag * v.imag
                num = 0.0
                den = 0.0
                for r in range(nring):
                    w = weight[i, r]
                    if w > 0.0 and power[i, r] > 0.0 and pv[r] > 0.0:
                        num += w * dot[r] / np.sqrt(power[i, r] * pv[r])
                        den += w
                out[i, j, s] = num / den if den > 0.0 else -1.0


def score_candidates(
    volume_ft: VolumeFT,
    rotations: np.ndarray,
    shifts_px: np.ndarray,
    data: np.ndarray,
    ctf: np.ndarray,
    points: FourierPoints,
    weight: np.ndarray,
    *,
    score: str = "frc",
    power: np.ndarray | None = None,
) -> np.ndarray:
    """Scores ``(k, J, S)`` of particles ``data`` ``(k, M)`` (:func:`particle_transforms`)
    at rotations ``(k, J, 3, 3)`` and shifts ``(k, S, 2)`` px, with their CTFs at
    ``points`` ``(k, M)`` and ring weights ``(k, rings)`` (module docstring); ``power``:
    the particles' :func:`ring_power`, when already known."""
    if power is None:
        power = ring_power(data, points)
    out = np.empty((len(data), rotations.shape[1], shifts_px.shape[1]), np.float64)
    _scores(
        volume_ft.data,
        volume_ft.pad_size / points.n,
        np.ascontiguousarray(rotations, np.float64),
        np.ascontiguousarray(shifts_px, np.float64),
        data,
        np.ascontiguousarray(ctf, np.float32),
        points.qx,
        points.qy,
        points.ring,
        np.ascontiguousarray(weight, np.float64),
        power,
        points.n,
        SCORES.index(score),
        out,
    )
    return out


@dataclass(frozen=True)
class LocalResult:
    """Each particle's refined ``rotations`` ``(k, 3, 3)``, ``shifts_px`` ``(k, 2)`` and
    ``score``; ``angle_deg``: how far its orientation moved."""

    rotations: np.ndarray
    shifts_px: np.ndarray
    score: np.ndarray
    angle_deg: np.ndarray


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (degrees) of the rotation between ``a`` and ``b`` ``(..., 3, 3)``."""
    cos = (np.einsum("...ij,...ij->...", a, b) - 1.0) / 2.0
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


#: the polish's probes: +-1 along each rotation axis (x, y, z), and along each shift axis
_AXES = np.vstack([np.eye(3), -np.eye(3)])
_SHIFT_AXES = np.vstack([np.eye(2), -np.eye(2)])


def _polish_round(scores, live, rot, shift, best, delta, dshift, rot0, shift0, range_deg, shift_px):
    """One round of the polish for particles ``live``: the ten axis probes, then one step
    along all five axes at once to the vertex of each axis's parabola through its two
    probes and the current score (clipped to the probes). Returns the best candidate of
    each particle (rotation, shift, score) and whether it was a probe; candidates outside
    the range score -inf."""
    n = len(live)
    r = np.arange(n)
    d, ds = delta[live], dshift[live]
    here_rot, here_shift, f0 = rot[live], shift[live], best[live]
    probe_rot = perturbed(here_rot, _AXES[None] * d[:, None, None])  # (n, 6, 3, 3)
    probe_shift = here_shift[:, None, :] + _SHIFT_AXES[None] * ds[:, None, None]  # (n, 4, 2)
    f_rot = scores(probe_rot, here_shift[:, None, :], live)[:, :, 0]  # (n, 6)
    f_shift = scores(here_rot[:, None], probe_shift, live)[:, 0, :]  # (n, 4)
    f_rot[rotation_angle_deg(probe_rot, rot0[live, None]) > range_deg + 1e-6] = -np.inf
    f_shift[np.linalg.norm(probe_shift - shift0[live, None], axis=-1) > shift_px + 1e-6] = -np.inf
    # the parabola's vertex along each axis, in units of the probe's distance
    plus = np.concatenate([f_rot[:, :3], f_shift[:, :2]], axis=1)
    minus = np.concatenate([f_rot[:, 3:], f_shift[:, 2:]], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = plus + minus - 2 * f0[:, None]
        t = np.where(curve < 0, (minus - plus) / (2 * curve), np.sign(plus - minus))
    t = np.clip(np.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0), -1.0, 1.0)
    step_rot = perturbed(here_rot, (t[:, None, :3] * d[:, None, None]))  # (n, 1, 3, 3)
    step_shift = here_shift + t[:, 3:] * ds[:, None]
    f_step = scores(step_rot, step_shift[:, None, :], live)[:, 0, 0]
    if_out = (rotation_angle_deg(step_rot[:, 0], rot0[live]) > range_deg + 1e-6) | (
        np.linalg.norm(step_shift - shift0[live], axis=-1) > shift_px + 1e-6
    )
    f_step[if_out] = -np.inf
    # the best of the probes and the step
    table = np.concatenate([f_rot, f_shift, f_step[:, None]], axis=1)
    pick = table.argmax(1)
    out_rot = here_rot.copy()
    out_shift = here_shift.copy()
    is_rot = pick < 6
    out_rot[is_rot] = probe_rot[r[is_rot], pick[is_rot]]
    is_shift = (pick >= 6) & (pick < 10)
    out_shift[is_shift] = probe_shift[r[is_shift], pick[is_shift] - 6]
    is_step = pick == 10
    out_rot[is_step] = step_rot[is_step, 0]
    out_shift[is_step] = step_shift[is_step]
    return out_rot, out_shift, table[r, pick], pick < 10


def local_search(
    volume_ft: VolumeFT,
    images: np.ndarray,
    ctf: np.ndarray,
    rotations: np.ndarray,
    shifts_px: np.ndarray,
    weight: np.ndarray,
    points: FourierPoints,
    *,
    range_deg: float,
    step_deg: float,
    shift_px: float,
    score: str = "frc",
    max_rounds: int = 12,
) -> LocalResult:
    """Refine the poses of particles ``images`` ``(k, n, n)`` around ``rotations``
    ``(k, 3, 3)`` and ``shifts_px`` ``(k, 2)`` against one map (module docstring).

    ``ctf``: each particle's CTF on the ``rfft2`` grid ``(k, n, n // 2 + 1)`` (ones
    without); ``weight``: ring weights ``(k, points.rings)``. Works through the particles
    :data:`CHUNK` at a time.
    """
    out = [
        _search_chunk(
            volume_ft,
            images[sl],
            ctf[sl],
            rotations[sl],
            shifts_px[sl],
            weight[sl],
            points,
            range_deg=range_deg,
            step_deg=step_deg,
            shift_px=shift_px,
            score=score,
            max_rounds=max_rounds,
        )
        for sl in (slice(i, i + CHUNK) for i in range(0, len(images), CHUNK))
    ]
    return LocalResult(
        *(np.concatenate([getattr(r, f) for r in out]) for f in LocalResult.__annotations__)
    )


def _search_chunk(
    vft,
    images,
    ctf,
    rot0,
    shift0,
    weight,
    points,
    *,
    range_deg,
    step_deg,
    shift_px,
    score,
    max_rounds,
) -> LocalResult:
    k = len(images)
    data = particle_transforms(images, points)
    ctf_pts = np.ascontiguousarray(ctf[:, points.iy, points.ix], np.float32)
    rot0 = np.asarray(rot0, np.float64)
    shift0 = np.asarray(shift0, np.float64)

    power = ring_power(data, points)

    def scores(rots, shifts, rows=slice(None)):
        return score_candidates(
            vft,
            rots,
            shifts,
            data[rows],
            ctf_pts[rows],
            points,
            weight[rows],
            score=score,
            power=power[rows],
        )

    # the grid
    cand = perturbed(rot0, rotation_grid(range_deg, step_deg))
    offsets = shift0[:, None, :] + shift_grid(shift_px)[None]
    table = scores(cand, offsets)
    flat = table.reshape(k, -1).argmax(1)
    j, s = np.unravel_index(flat, table.shape[1:])
    rows = np.arange(k)
    rot, shift = cand[rows, j], offsets[rows, s]
    best = table[rows, j, s]
    # the polish
    delta = np.full(k, np.deg2rad(step_deg) / 2)
    dshift = np.full(k, 0.5)
    stop = np.deg2rad(step_deg) / 10
    for _ in range(max_rounds):
        live = np.flatnonzero(delta >= stop)
        if len(live) == 0:
            break
        cand_rot, cand_shift, cand_score, probe_won = _polish_round(
            scores, live, rot, shift, best, delta, dshift, rot0, shift0, range_deg, shift_px
        )
        better = cand_score > best[live] + 1e-7
        moved = live[better]
        rot[moved] = cand_rot[better]
        shift[moved] = cand_shift[better]
        best[moved] = cand_score[better]
        # a probe won: the optimum may lie further out, so the step stays; else the
        # particle sits at its parabolas' vertex (or nothing scored higher): halve
        shrink = live[~(better & probe_won)]
        delta[shrink] /= 2
        dshift[shrink] /= 2
    return LocalResult(rot, shift, best, rotation_angle_deg(rot, rot0))

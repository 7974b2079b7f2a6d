"""numba kernels for Fourier-space insertion and slice comparison (scatter/gather).

Scatter-adding millions of slice samples into a 3D grid has no efficient NumPy
form; these loops are compiled with numba and run one block of slices per thread,
each thread into its own accumulator. ``acc`` has the layout ``(P, P, P // 2 + 1, 3)``
float32 holding (Re Fsum, Im Fsum, Wsum) side by side, so a voxel is one cache line.
Modes: 0 trilinear, 1 EMAN2 gauss_2, 2 nearest neighbour.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

TRILINEAR, GAUSS_2, NEAREST = 0, 1, 2
_GAUSS_2 = np.pi**2 / 4


@njit(cache=True, inline="always", fastmath=True)
def _kernel_weight(mode: int, fx: float, fy: float, fz: float, dx: int, dy: int, dz: int) -> float:
    if mode == TRILINEAR:
        return (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy) * (fz if dz else 1.0 - fz)
    rx, ry, rz = fx - dx, fy - dy, fz - dz
    return np.exp(-(rx * rx + ry * ry + rz * rz) * _GAUSS_2)


@njit(cache=True, fastmath=True)
def _insert_block(
    acc, nrep, slices, ctf, weights, flat, mult, rots, qx, qy, size, mode, first, last
):
    hx = size // 2 + 1
    m = qx.shape[0]
    has_ctf = ctf.shape[0] > 0
    for s in range(first, last):
        a = rots[s]
        row = s // nrep
        w_row = weights[row]
        for j in range(m):
            x = a[0, 0] * qx[j] + a[0, 1] * qy[j]
            y = a[1, 0] * qx[j] + a[1, 1] * qy[j]
            z = a[2, 0] * qx[j] + a[2, 1] * qy[j]
            f = flat[j]
            c = ctf[row, f] if has_ctf else 1.0
            w = w_row * mult[j]
            vre = slices[row, f].real * c * w
            vim = slices[row, f].imag * c * w
            wt = c * c * w
            if x < 0:  # Friedel mate: conjugate at -v
                x, y, z, vim = -x, -y, -z, -vim
            if mode == NEAREST:
                ix = int(np.floor(x + 0.5))
                if ix < hx:
                    iy = int(np.floor(y + 0.5)) % size
                    iz = int(np.floor(z + 0.5)) % size
                    acc[iz, iy, ix, 0] += vre
                    acc[iz, iy, ix, 1] += vim
                    acc[iz, iy, ix, 2] += wt
                continue
            x0, y0, z0 = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
            fx, fy, fz = x - x0, y - y0, z - z0
            if mode == TRILINEAR:  # the common case, written out for speed
                for dz in range(2):
                    iz = (z0 + dz) % size
                    gz = fz if dz else 1.0 - fz
                    for dy in range(2):
                        iy = (y0 + dy) % size
                        gzy = gz * (fy if dy else 1.0 - fy)
                        g0 = gzy * (1.0 - fx)
                        acc[iz, iy, x0, 0] += g0 * vre
                        acc[iz, iy, x0, 1] += g0 * vim
                        acc[iz, iy, x0, 2] += g0 * wt
                        if x0 + 1 < hx:
                            g1 = gzy * fx
                            acc[iz, iy, x0 + 1, 0] += g1 * vre
                            acc[iz, iy, x0 + 1, 1] += g1 * vim
                            acc[iz, iy, x0 + 1, 2] += g1 * wt
                continue
            for dz in range(2):
                iz = (z0 + dz) % size
                for dy in range(2):
                    iy = (y0 + dy) % size
                    for dx in range(2):
                        ix = x0 + dx
                        if ix >= hx:
                            continue
                        g = _kernel_weight(mode, fx, fy, fz, dx, dy, dz)
                        acc[iz, iy, ix, 0] += g * vre
                        acc[iz, iy, ix, 1] += g * vim
                        acc[iz, iy, ix, 2] += g * wt


@njit(cache=True, parallel=True, fastmath=True)
def insert_slices(accs, nrep, slices, ctf, weights, flat, mult, rots, qx, qy, size, mode, bounds):
    """Scatter 2D transforms into the per-thread accumulators ``accs``.

    ``slices`` ``(k, M)`` complex: flattened ``rfft2`` of each image; ``ctf`` ``(k, M)``
    (or an empty array: no CTF); ``weights`` ``(k,)``. Points ``flat`` ``(m,)`` of the
    half-plane, standing for ``mult`` points of the full plane, at ``(qx, qy)``, are
    inserted with value ``w mult C X`` and weight ``w mult C^2``. ``rots[s]``
    ``(k * nrep, 3, 3)`` maps a point of slice ``s // nrep`` (one rotation per symmetry
    operator) to the volume, ``v = rots[s] @ (qx, qy, 0)``. ``accs``
    ``(T, P, P, P // 2 + 1, 3)``: one accumulator per thread block; block ``b`` inserts
    the rows ``bounds[b]:bounds[b + 1]`` of ``rots``.
    """
    blocks = accs.shape[0]
    for b in prange(blocks):
        _insert_block(
            accs[b],
            nrep,
            slices,
            ctf,
            weights,
            flat,
            mult,
            rots,
            qx,
            qy,
            size,
            mode,
            bounds[b],
            bounds[b + 1],
        )


@njit(cache=True, parallel=True)
def compare_slices(fsum, wsum, values, ctf, rots, qx, qy, size, out):
    """EMAN2's slice agreement: per slice ``(dot, power, power2)`` against the volume.

    For each slice point (origin excluded, Nyquist excluded) the volume is read with
    the 2x2x2 Gaussian ``exp(-r^2 pi^2 / 4)``: ``V = C sum g Fsum / sum g Wsum`` (``C``
    the slice's CTF, 1 without) and ``Wv = sum g Wsum / sum g``; then
    ``dot += Re(V conj S) Wv``, ``power += |V|^2 Wv``, ``power2 += |S|^2 Wv``.
    ``fsum``/``wsum`` are the full half-space arrays.
    """
    hx = size // 2 + 1
    half = size / 2.0
    k, m = values.shape
    for s in prange(k):
        a = rots[s]
        dot = 0.0
        p1 = 0.0
        p2 = 0.0
        for j in range(m):
            if qx[j] == 0.0 and qy[j] == 0.0:
                continue
            x = a[0, 0] * qx[j] + a[0, 1] * qy[j]
            y = a[1, 0] * qx[j] + a[1, 1] * qy[j]
            z = a[2, 0] * qx[j] + a[2, 1] * qy[j]
            sre = values[s, j].real
            sim = values[s, j].imag
            if x < 0:
                x, y, z, sim = -x, -y, -z, -sim
            if x > half or abs(y) >= half or abs(z) >= half:
                continue
            x0, y0, z0 = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
            fx, fy, fz = x - x0, y - y0, z - z0
            nre = 0.0
            nim = 0.0
            gw = 0.0
            gs = 0.0
            for dz in range(2):
                iz = (z0 + dz) % size
                for dy in range(2):
                    iy = (y0 + dy) % size
                    for dx in range(2):
                        ix = x0 + dx
                        if ix >= hx:
                            continue
                        g = _kernel_weight(GAUSS_2, fx, fy, fz, dx, dy, dz)
                        nre += g * fsum[iz, iy, ix].real
                        nim += g * fsum[iz, iy, ix].imag
                        gw += g * wsum[iz, iy, ix]
                        gs += g
            if gw == 0.0 or gs == 0.0:
                continue
            wv = gw / gs
            c = ctf[s, j]
            vre, vim = c * nre / gw, c * nim / gw
            dot += (vre * sre + vim * sim) * wv
            p1 += (vre * vre + vim * vim) * wv
            p2 += (sre * sre + sim * sim) * wv
        out[s, 0] = dot
        out[s, 1] = p1
        out[s, 2] = p2


@njit(cache=True, parallel=True, fastmath=True)
def ray_sums(vol, rots, out):
    """``out[j, y, x] = sum_z vol(R_j^T (x, y, z))`` (centred coordinates), trilinear;
    samples with a coordinate outside ``[0, n - 1]`` are skipped (EMAN2 ``standard``)."""
    n = vol.shape[0]
    c = n // 2
    hi = n - 1 + 1e-9
    for j in prange(rots.shape[0]):
        r = rots[j]
        for y in range(n):
            for x in range(n):
                bx = r[0, 0] * (x - c) + r[1, 0] * (y - c) + c
                by = r[0, 1] * (x - c) + r[1, 1] * (y - c) + c
                bz = r[0, 2] * (x - c) + r[1, 2] * (y - c) + c
                total = 0.0
                for k in range(n):
                    z = k - c
                    px = bx + r[2, 0] * z
                    py = by + r[2, 1] * z
                    pz = bz + r[2, 2] * z
                    if px < -1e-9 or py < -1e-9 or pz < -1e-9 or px > hi or py > hi or pz > hi:
                        continue
                    px = min(max(px, 0.0), n - 1.0)
                    py = min(max(py, 0.0), n - 1.0)
                    pz = min(max(pz, 0.0), n - 1.0)
                    x0 = min(int(px), n - 2)
                    y0 = min(int(py), n - 2)
                    z0 = min(int(pz), n - 2)
                    fx = px - x0
                    fy = py - y0
                    fz = pz - z0
                    v00 = vol[z0, y0, x0] * (1 - fx) + vol[z0, y0, x0 + 1] * fx
                    v01 = vol[z0, y0 + 1, x0] * (1 - fx) + vol[z0, y0 + 1, x0 + 1] * fx
                    v10 = vol[z0 + 1, y0, x0] * (1 - fx) + vol[z0 + 1, y0, x0 + 1] * fx
                    v11 = vol[z0 + 1, y0 + 1, x0] * (1 - fx) + vol[z0 + 1, y0 + 1, x0 + 1] * fx
                    total += (v00 * (1 - fy) + v01 * fy) * (1 - fz) + (
                        v10 * (1 - fy) + v11 * fy
                    ) * fz
                out[j, y, x] = total

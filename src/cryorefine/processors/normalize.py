"""Normalisation processors: ``normalize``, ``.edgemean``, ``.circlemean``, ``.bymass``."""

from __future__ import annotations

import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.registry import PROCESSORS, Param

#: protein density used by normalize.bymass, Da/Å^3 (1.35 g/cm^3)
PROTEIN_DENSITY_DA_PER_A3 = 0.81


def _flat(data: np.ndarray, ndim: int) -> np.ndarray:
    return data.reshape(data.shape[:-ndim] + (-1,))


def _scale(data: np.ndarray, ndim: int, offset: np.ndarray) -> np.ndarray:
    """``(x - offset) / sigma`` per image; sigma with the n-1 denominator (EMAN2).

    Images whose sigma is 0 or not finite are returned unchanged.
    """
    flat = _flat(data, ndim).astype(np.float64)
    sigma = flat.std(axis=-1, ddof=1) if flat.shape[-1] > 1 else np.zeros(flat.shape[:-1])
    ok = np.isfinite(sigma) & (sigma > 0)
    safe = np.where(ok, sigma, 1.0)
    out = np.where(ok[..., None], (flat - offset[..., None]) / safe[..., None], flat)
    return out.reshape(data.shape).astype(np.float32)


@PROCESSORS.register("normalize", "Subtract the mean and divide by the standard deviation.")
def normalize(data: np.ndarray, *, ndim: int, apix: float) -> np.ndarray:
    return _scale(data, ndim, _flat(data, ndim).mean(axis=-1, dtype=np.float64))


def edge_mean(data: np.ndarray, ndim: int) -> np.ndarray:
    """Mean of the border pixels of each image (2D: rows and columns, corners twice;
    3D: the six faces)."""
    if ndim == 2:
        parts = [data[..., 0, :], data[..., -1, :], data[..., :, 0], data[..., :, -1]]
    else:
        parts = [
            data[..., 0, :, :],
            data[..., -1, :, :],
            data[..., :, 0, :],
            data[..., :, -1, :],
            data[..., :, :, 0],
            data[..., :, :, -1],
        ]
    total = sum(
        p.reshape(p.shape[: data.ndim - ndim] + (-1,)).sum(axis=-1, dtype=np.float64) for p in parts
    )
    count = sum(int(np.prod(p.shape[data.ndim - ndim :])) for p in parts)
    return total / count


@PROCESSORS.register(
    "normalize.edgemean",
    "Subtract the mean of the edge pixels, divide by the standard deviation.",
)
def normalize_edgemean(data: np.ndarray, *, ndim: int, apix: float) -> np.ndarray:
    return _scale(data, ndim, edge_mean(data, ndim))


def ring_mask(n: int, ndim: int) -> np.ndarray:
    """The circlemean ring: ``n//2 - 3 <= r < n//2 - 1`` around pixel ``n//2``."""
    c = np.arange(n) - n // 2
    grids = np.meshgrid(*([c] * ndim), indexing="ij", sparse=True)
    r2 = sum(g * g for g in grids)
    r = n // 2 - 2
    return ((r - 1) ** 2 <= r2) & (r2 < (r + 1) ** 2)


@PROCESSORS.register(
    "normalize.circlemean",
    "Subtract the mean of a ring just inside the box edge (radius n/2-3 to n/2-1 px), "
    "divide by the standard deviation.",
)
def normalize_circlemean(data: np.ndarray, *, ndim: int, apix: float) -> np.ndarray:
    ring = ring_mask(data.shape[-1], ndim).ravel()
    mean = _flat(data, ndim)[..., ring].mean(axis=-1, dtype=np.float64)
    return _scale(data, ndim, mean)


def _check_bymass(params: dict, where: str) -> None:
    if params["mass"] <= 0:
        raise CryorefineError(f"{where}: mass must be positive (kDa)")
    if params["apix"] is not None and params["apix"] <= 0:
        raise CryorefineError(f"{where}: apix must be positive (Å/pixel)")


def mass_threshold(
    volume: np.ndarray, mass_kda: float, apix: float, thr: float | None = None
) -> float:
    """Density level whose enclosed volume holds ``mass_kda`` of protein (EMAN2 search).

    The enclosed mass at level ``t`` is ``count(x >= t) * apix^3 * 0.81 / 1000`` kDa.
    The search starts at ``thr`` (default mean + sigma) with step sigma/2 and refines
    the step by 4 twice per round, 4 rounds, as EMAN2's ``normalize.bymass``.
    """
    values = np.sort(volume.ravel().astype(np.float64))
    n = values.size
    kda_per_voxel = apix**3 * PROTEIN_DENSITY_DA_PER_A3 / 1000.0
    vmin, vmax = values[0], values[-1]
    sigma = values.std(ddof=1)
    t = values.mean() + sigma if thr is None else thr
    step = sigma / 2.0

    def enclosed(level: float) -> float:
        return (n - np.searchsorted(values, level, side="left")) * kda_per_voxel

    for _ in range(4):
        for direction in (+1, -1):
            steps = 0
            while (
                (t < vmax and enclosed(t) > mass_kda)
                if direction > 0
                else (t > vmin and enclosed(t) < mass_kda)
            ):
                t += direction * step
                steps += 1
                if steps > 1000:
                    raise CryorefineError(
                        f"normalize.bymass: a mass of {mass_kda} kDa could not be achieved "
                        "(check --mass and --apix)"
                    )
            step /= 4.0
    return float(t)


@PROCESSORS.register(
    "normalize.bymass",
    "Scale a map so that the iso-level 1.0 encloses the given mass of protein (0.81 Da/Å^3).",
    (
        Param("mass", float, "mass in kDa", required=True),
        Param("apix", float, "Å/pixel (default: the map's)"),
        Param("thr", float, "starting threshold (default: mean + sigma)"),
    ),
    check=_check_bymass,
)
def normalize_bymass(
    data: np.ndarray, *, ndim: int, apix: float | None, mass: float, thr: float | None = None
) -> np.ndarray:
    if ndim != 3:
        raise CryorefineError("normalize.bymass: works on 3D maps only")
    a = apix
    if not a or a <= 0:
        raise CryorefineError("normalize.bymass: the map has no pixel size; give apix=")
    maps = data.reshape((-1,) + data.shape[-3:])
    out = np.empty_like(maps, dtype=np.float32)
    for i, vol in enumerate(maps):  # one search per map (few maps)
        t = mass_threshold(vol, mass, a, thr)
        if t <= 0:
            most = (vol > 0).sum() * a**3 * PROTEIN_DENSITY_DA_PER_A3 / 1000.0
            raise CryorefineError(
                f"normalize.bymass: a mass of {mass} kDa could not be achieved (the positive "
                f"density encloses {most:.1f} kDa; check --mass and --apix)"
            )
        out[i] = vol / t
    return out.reshape(data.shape)

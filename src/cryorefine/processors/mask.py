"""Mask processors: ``mask.sharp``, ``mask.soft`` and ``mask.auto3d``.

Radii are in pixels from the box centre (pixel ``n // 2``); a negative radius counts
from the box edge (``n // 2 + r``), as in EMAN2.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cryorefine.errors import CryorefineError
from cryorefine.fourier import filters
from cryorefine.registry import PROCESSORS, Param


def centred_radius(n: int, ndim: int) -> np.ndarray:
    """Distance in pixels of every pixel of an ``n``-box from the centre ``n // 2``."""
    c = np.arange(n, dtype=np.float64) - n // 2
    grids = np.meshgrid(*([c] * ndim), indexing="ij", sparse=True)
    return np.sqrt(sum(g * g for g in grids))


def _radius(r: float, n: int) -> float:
    return n // 2 + r if r < 0 else r


@PROCESSORS.register(
    "mask.sharp",
    "Zero everything outside outer_radius (and inside inner_radius), in pixels.",
    (
        Param("outer_radius", float, "outer radius in px; negative: from the edge", default=-1.0),
        Param("inner_radius", float, "inner radius in px; < 0 for none", default=-1.0),
        Param("value", float, "value put outside the mask", default=0.0),
    ),
)
def mask_sharp(
    data: np.ndarray,
    *,
    ndim: int,
    apix: float | None,
    outer_radius: float,
    inner_radius: float,
    value: float,
) -> np.ndarray:
    n = data.shape[-1]
    r = centred_radius(n, ndim)
    keep = r <= _radius(outer_radius, n)
    if inner_radius >= 0:
        keep &= r >= inner_radius
    return np.where(keep, data, np.float32(value)).astype(np.float32)


@PROCESSORS.register(
    "mask.soft",
    "Soft spherical mask: 1 inside outer_radius, Gaussian fall-off "
    "exp(-(r-R)^2/width^2) outside (pixels).",
    (
        Param("outer_radius", float, "outer radius in px; negative: from the edge", default=-1.0),
        Param("width", float, "Gaussian fall-off width in px", default=4.0),
        Param("inner_radius", float, "inner radius in px; < 0 for none", default=-1.0),
        Param("inner_width", float, "fall-off width inside inner_radius, px", default=4.0),
    ),
)
def mask_soft(
    data: np.ndarray,
    *,
    ndim: int,
    apix: float | None,
    outer_radius: float,
    width: float,
    inner_radius: float,
    inner_width: float,
) -> np.ndarray:
    n = data.shape[-1]
    r = centred_radius(n, ndim)
    m = soft_sphere(r, _radius(outer_radius, n), width)
    if inner_radius >= 0:
        d = np.clip(inner_radius - r, 0, None)
        m = m * (np.exp(-(d * d) / inner_width**2) if inner_width > 0 else (d == 0))
    return (data * m).astype(np.float32)


def soft_sphere(r: np.ndarray, radius: float, width: float) -> np.ndarray:
    """1 for ``r <= radius``, ``exp(-(r - radius)^2 / width^2)`` beyond."""
    d = np.clip(r - radius, 0, None)
    if width <= 0:
        return (d == 0).astype(np.float64)
    return np.exp(-(d * d) / width**2)


def _check_auto3d(params: dict, where: str) -> None:
    if params["threshold"] is None and params["sigma"] is None:
        raise CryorefineError(f"{where}: give threshold (or sigma)")
    for key in ("nshells", "nshellsgauss", "nmaxseed"):
        if params[key] < 0:
            raise CryorefineError(f"{where}: {key} must be >= 0")
    if params["radius"] <= 0 and params["nmaxseed"] <= 0:
        raise CryorefineError(f"{where}: give radius > 0 or nmaxseed > 0 to seed the mask")


def auto_mask(
    volume: np.ndarray,  # (n, n, n) or (n, n)
    threshold: float,
    radius: float,
    nshells: int,
    nshellsgauss: int,
    nmaxseed: int,
) -> np.ndarray:
    """EMAN2 ``mask.auto3d`` on one map: seed, 6-connected flood fill, dilate, soften.

    Seeds are the ``nmaxseed`` highest voxels and the voxels ``>= threshold`` within
    ``radius`` px of the centre. The region grows through voxels ``> threshold``
    (6-connected, never into the outermost layer), is dilated by
    ``nshells + nshellsgauss // 2`` 6-connected shells, low-passed with
    ``cutoff_abs = 1 / nshellsgauss`` and values below 0.002 are set to 0. The same on
    a 2D image (4-connected).
    """
    n, ndim = volume.shape[-1], volume.ndim
    above = volume > threshold
    inner = np.zeros_like(above)
    inner[(slice(1, -1),) * ndim] = True
    seeds = np.zeros_like(above)
    if radius > 0:
        seeds |= (centred_radius(n, ndim) <= radius) & (volume >= threshold)
    if nmaxseed > 0:
        top = np.argpartition(volume.ravel(), -nmaxseed)[-nmaxseed:]
        seeds.ravel()[top] = True
    six = ndimage.generate_binary_structure(ndim, 1)
    labels, _ = ndimage.label((above & inner) | seeds, structure=six)
    keep = np.unique(labels[seeds])
    mask = np.isin(labels, keep[keep > 0])
    grow = nshells + nshellsgauss // 2
    if grow > 0:
        mask = ndimage.binary_dilation(mask, structure=six, iterations=grow)
    soft = mask.astype(np.float32)
    if nshellsgauss > 0:
        soft = filters.lowpass_gauss(soft, 1.0 / nshellsgauss, ndim)
    soft[soft < 0.002] = 0.0
    return soft


def soft_edge_mask(region: np.ndarray, extend_px: float, edge_px: float) -> np.ndarray:
    """A binary ``region`` grown by ``extend_px`` and given a raised-cosine edge.

    1 within ``extend_px`` (Euclidean distance) of the region, falling as
    ``(1 + cos(pi (d - extend_px) / edge_px)) / 2`` to 0 at ``extend_px + edge_px``
    (relion_mask_create's ``--extend_inimask`` and ``--width_soft_edge``). float32.
    """
    region = np.asarray(region, bool)
    if not region.any():
        return np.zeros(region.shape, np.float32)
    d = ndimage.distance_transform_edt(~region)
    out = np.clip((d - extend_px) / edge_px, 0.0, 1.0) if edge_px > 0 else (d > extend_px) * 1.0
    return (0.5 * (1.0 + np.cos(np.pi * out))).astype(np.float32)


@PROCESSORS.register(
    "mask.auto3d",
    "Automatic 3D mask: flood fill from seeds above a threshold, dilate, soften.",
    (
        Param("threshold", float, "density threshold of the region"),
        Param("sigma", float, "threshold as mean + sigma * standard deviation instead"),
        Param(
            "radius", float, "seed with voxels above threshold within this radius, px", default=0.0
        ),
        Param("nshells", int, "shells added by dilation", default=0),
        Param("nshellsgauss", int, "width of the soft Gaussian edge, shells", default=0),
        Param("nmaxseed", int, "seed also with the N highest voxels", default=0),
        Param("return_mask", bool, "1: return the mask instead of the masked map", default=False),
    ),
    check=_check_auto3d,
)
def mask_auto3d(
    data: np.ndarray,
    *,
    ndim: int,
    apix: float | None,
    threshold,
    sigma,
    radius: float,
    nshells: int,
    nshellsgauss: int,
    nmaxseed: int,
    return_mask: bool,
) -> np.ndarray:
    if ndim != 3:
        raise CryorefineError("mask.auto3d: works on 3D maps only")
    maps = data.reshape((-1,) + data.shape[-3:])
    out = np.empty(maps.shape, dtype=np.float32)
    for i, vol in enumerate(maps):  # one flood fill per map
        t = threshold
        if sigma is not None:
            t = float(vol.mean() + sigma * vol.std(ddof=1))
        mask = auto_mask(vol, t, radius, nshells, nshellsgauss, nmaxseed)
        out[i] = mask if return_mask else vol * mask
    return out.reshape(data.shape)


def auto_mask_2d(images: np.ndarray) -> np.ndarray:
    """A soft mask ``(k, n, n)`` around the particle of each 2D average (e2classaverage
    ``--automask``): the image low-passed to 0.1 cycles/px, thresholded at its mean + 1
    standard deviation, flood-filled from the pixels above it within ``n / 4`` of the
    centre (4-connected), dilated by 2 px and given a soft edge of 2 px
    (:func:`auto_mask` in 2D)."""
    images = np.asarray(images, np.float32).reshape((-1,) + images.shape[-2:])
    n = images.shape[-1]
    low = filters.lowpass_gauss(images, 0.1, 2)
    out = np.empty(images.shape, np.float32)
    for i, im in enumerate(low):
        t = float(im.mean() + im.std())
        out[i] = auto_mask(im, t, n / 4, 1, 2, 1)
    return out

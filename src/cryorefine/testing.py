"""Synthetic maps and particle images for tests, the demo and benchmarks."""

from __future__ import annotations

from importlib import resources

import numpy as np

from cryorefine.fourier.ctf import CTFParams, apply_ctf
from cryorefine.io.maps import Map, read_map


def demo_map() -> Map:
    """The bundled RNA polymerase II density, 64^3 at 3.0 Å/px."""
    with resources.as_file(resources.files("cryorefine") / "data" / "rnapol2_64.mrc") as p:
        return read_map(p)


def gaussian_blobs(
    n: int, *, count: int = 12, sigma_px: tuple[float, float] = (1.0, 2.0), rng: np.random.Generator
) -> np.ndarray:
    """``(n, n, n)`` float32 map of ``count`` Gaussian blobs inside radius ``n/2 - 6``."""
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((n, n, n))
    for _ in range(count):
        while True:
            p = rng.uniform(-(n / 2 - 6), n / 2 - 6, 3)
            if np.linalg.norm(p) < n / 2 - 6:
                break
        s = rng.uniform(*sigma_px)
        vol += np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def solid_sphere(
    n: int,
    radius_px: float,
    *,
    value: float = 1.0,
    centre: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """``(n, n, n)`` float32: ``value`` inside ``radius_px`` of ``centre`` (default the
    box centre, ``(z, y, x)`` in pixels), 0 outside."""
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij", sparse=True)
    cz, cy, cx = (0.0, 0.0, 0.0) if centre is None else centre
    r2 = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2
    return np.where(r2 <= radius_px**2, value, 0.0).astype(np.float32)


def random_ctf(
    k: int,
    *,
    defocus_range_a: tuple[float, float] = (10000.0, 25000.0),
    astigmatism_a: float = 500.0,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    rng: np.random.Generator,
) -> CTFParams:
    """CTF parameters with defocus uniform in a range and random astigmatism angles."""
    mean = rng.uniform(*defocus_range_a, k)
    half = rng.uniform(0, astigmatism_a, k) / 2
    return CTFParams(
        mean + half,
        mean - half,
        rng.uniform(-180, 180, k),
        voltage_kv,
        cs_mm,
        amplitude_contrast,
        0.0,
        0.0,
        1.0,
    )


def noisy_images(
    clean: np.ndarray, ctf: CTFParams | None, *, apix: float, snr: float, rng: np.random.Generator
) -> np.ndarray:
    """CTF-modulate ``clean`` ``(k, n, n)`` images and add white Gaussian noise.

    ``snr`` is the variance of the (CTF-modulated) signal inside the box over the noise
    variance.
    """
    signal = clean if ctf is None else apply_ctf(clean, ctf.evaluate(clean.shape[-1], apix))
    sigma = np.sqrt(signal.var(axis=(1, 2), keepdims=True) / snr)
    return (signal + sigma * rng.standard_normal(signal.shape)).astype(np.float32)

"""The contrast transfer function, in RELION's convention.

``CTF(s) = -scale * sin(chi) * exp(-B s^2 / 4)`` with
``chi = -pi lambda df(theta) s^2 + (pi/2) Cs lambda^3 s^4 - phase_shift - asin(Q0)``
and ``df(theta) = U cos^2(theta - A) + V sin^2(theta - A)``; ``theta`` is the angle of
the Fourier point from the x axis. Defocus in Å (positive = underfocus), A in
degrees, voltage in kV, Cs in mm, Q0 a fraction, phase shift in degrees, B in Å^2.
At low frequency the CTF is +Q0: protein stays positive, as in RELION.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import scipy.fft
from numba import njit, prange

from cryorefine.fourier.fft import fft_threads, rfft_freqs_2d


@njit(cache=True, parallel=True, fastmath=True)
def _evaluate_ctf(coef, s2, cos2t, sin2t, out):  # one pass, one sine per sample
    for k in prange(coef.shape[0]):
        mean, half, a2, k2, k3, scale, bexp = coef[k]
        ca, sa = np.cos(a2), np.sin(a2)
        for j in range(s2.shape[0]):
            q = s2[j]
            astig = half * (cos2t[j] * ca + sin2t[j] * sa)
            chi = (mean + astig + k2 * q) * q + k3
            value = -np.sin(chi) * scale
            if bexp != 0.0:
                value *= np.exp(bexp * q)
            out[k, j] = value


def electron_wavelength_a(voltage_kv: np.ndarray | float) -> np.ndarray:
    """Relativistic electron wavelength in Å (RELION's constants)."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


@dataclass
class CTFParams:
    """Per-particle CTF parameters, each a float64 array of length ``k``.

    A particle without CTF information has NaN ``voltage_kv``/``defocus_u_a``.
    """

    defocus_u_a: np.ndarray
    defocus_v_a: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kv: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        n = None
        for f in fields(self):
            arr = np.atleast_1d(np.asarray(getattr(self, f.name), dtype=np.float64))
            setattr(self, f.name, arr)
            n = len(arr) if n is None else n
        # broadcast scalars to the common length
        n = max(len(getattr(self, f.name)) for f in fields(self))
        for f in fields(self):
            arr = getattr(self, f.name)
            if len(arr) != n:
                setattr(self, f.name, np.broadcast_to(arr, (n,)).copy())

    @classmethod
    def empty(cls, n: int) -> CTFParams:
        """``n`` particles without CTF information."""
        nan = np.full(n, np.nan)
        return cls(nan, nan, nan, nan, nan, nan, np.zeros(n), np.zeros(n), np.ones(n))

    def __len__(self) -> int:
        return len(self.defocus_u_a)

    @property
    def known(self) -> np.ndarray:
        """Boolean ``(k,)``: which particles have a usable CTF."""
        return (
            np.isfinite(self.defocus_u_a)
            & np.isfinite(self.defocus_v_a)
            & np.isfinite(self.voltage_kv)
            & np.isfinite(self.cs_mm)
        )

    def take(self, indices: np.ndarray) -> CTFParams:
        return CTFParams(**{f.name: getattr(self, f.name)[indices] for f in fields(self)})

    def evaluate(self, box: int, apix: float | np.ndarray) -> np.ndarray:
        """The CTF on the ``rfft2`` grid of a ``box`` x ``box`` image.

        Parameters
        ----------
        box
            Image size in pixels.
        apix
            Pixel size in Å, scalar or one per particle.

        Returns
        -------
        np.ndarray
            ``(k, box, box // 2 + 1)`` float32, ky in FFT order, kx = 0..box//2.
        """
        fy, fx = rfft_freqs_2d(box)
        s2_px = fx * fx + fy * fy  # (cycles/pixel)^2
        theta = np.arctan2(fy, fx)
        apix = np.broadcast_to(np.asarray(apix, dtype=np.float64), (len(self),))
        # df(theta) = mean + half cos(2 (theta - A)); chi = (k1 df + k2 s^2) s^2 + k3
        lam = electron_wavelength_a(self.voltage_kv)
        inv_a2 = 1.0 / (apix * apix)
        k1 = -np.pi * lam * inv_a2
        coef = np.stack(
            [
                k1 * (self.defocus_u_a + self.defocus_v_a) / 2,  # times s^2
                k1 * (self.defocus_u_a - self.defocus_v_a) / 2,  # times s^2 cos(2 (theta - A))
                np.deg2rad(self.defocus_angle_deg) * 2,
                0.5 * np.pi * self.cs_mm * 1e7 * lam**3 * inv_a2 * inv_a2,  # times s^4
                -np.deg2rad(self.phase_shift_deg)
                - np.arcsin(np.clip(self.amplitude_contrast, -1, 1)),
                self.scale,
                -self.bfactor * inv_a2 / 4.0,  # times s^2 in the exponent
            ],
            axis=1,
        )
        out = np.empty((len(self),) + s2_px.shape, dtype=np.float32)
        _evaluate_ctf(
            coef,
            s2_px.ravel(),
            np.cos(2 * theta).ravel(),
            np.sin(2 * theta).ravel(),
            out.reshape(len(self), -1),
        )
        return out


def _rfft2(images: np.ndarray) -> np.ndarray:
    return scipy.fft.rfft2(np.asarray(images, dtype=np.float32), workers=fft_threads())


def _irfft2(images_rft: np.ndarray, n: int) -> np.ndarray:
    return scipy.fft.irfft2(images_rft, s=(n, n), workers=fft_threads()).astype(np.float32)


def apply_ctf(images: np.ndarray, ctf: np.ndarray) -> np.ndarray:
    """Multiply each image ``(k, n, n)`` by its CTF ``(k, n, n//2+1)`` (from ``evaluate``)."""
    return _irfft2(_rfft2(images) * ctf, images.shape[-1])


def phase_flip(images: np.ndarray, ctf: np.ndarray) -> np.ndarray:
    """Flip the phases of each image where its CTF is negative."""
    return _irfft2(_rfft2(images) * np.sign(ctf), images.shape[-1])


def wiener_divide(images: np.ndarray, ctf: np.ndarray, *, snr: float = 10.0) -> np.ndarray:
    """Wiener-correct each image: ``F * C / (C^2 + 1/snr)``.

    ``snr`` is the assumed spectral signal-to-noise ratio (constant over frequency).
    """
    if snr <= 0:
        raise ValueError("snr must be positive")
    return _irfft2(_rfft2(images) * (ctf / (ctf * ctf + 1.0 / snr)), images.shape[-1])

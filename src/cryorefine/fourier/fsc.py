"""Fourier shell (3D) and ring (2D) correlation, and the resolution where it crosses.

Shells are ``round(|k|)`` in Fourier pixels, ``k`` wrapped to ``-n/2 .. n/2``; shell
``r`` is at ``r / (n apix)`` 1/Å. Shells beyond ``n/2`` are ignored (EMAN2's
``calc_fourier_shell_correlation`` with ring width 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft

from cryorefine.fourier.fft import fft_threads, rfft_shell_index
from cryorefine.fourier.filters import randomise_phases

#: the unmasked FSC below which the phases are randomised (RELION's ``--randomize_at_fsc``)
RANDOMISE_BELOW_FSC = 0.8
#: shells after the randomisation shell still reported as the masked FSC (RELION's choice:
#: the randomised maps keep correlations leaked from just below that shell)
RANDOMISE_GUARD_SHELLS = 2


def fsc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC (3D) or FRC (2D) of two equal-shaped arrays; ``(n // 2 + 1,)`` float64.

    Element ``r`` is ``sum Re(A conj B) / sqrt(sum |A|^2 sum |B|^2)`` over shell ``r``
    (the Hermitian half-space counted twice where it stands for two points).
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    n = a.shape[0]
    fa = scipy.fft.rfftn(np.asarray(a, np.float64), workers=fft_threads())
    fb = scipy.fft.rfftn(np.asarray(b, np.float64), workers=fft_threads())
    shell = rfft_shell_index(a.shape)
    weight = np.full(shell.shape, 2.0)
    weight[..., 0] = 1.0
    if a.shape[-1] % 2 == 0:
        weight[..., -1] = 1.0
    nb = n // 2 + 1
    keep = shell < nb
    s, w = shell[keep], weight[keep]
    num = np.bincount(s, w * (fa * fb.conj()).real[keep], nb)
    pa = np.bincount(s, w * np.abs(fa[keep]) ** 2, nb)
    pb = np.bincount(s, w * np.abs(fb[keep]) ** 2, nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pa * pb > 0, num / np.sqrt(pa * pb), 0.0)


def shell_frequencies_a(n: int, apix: float) -> np.ndarray:
    """Spatial frequency (1/Å) of each shell of :func:`fsc` for an ``n`` box."""
    return np.arange(n // 2 + 1) / (n * apix)


def resolution_at(curve: np.ndarray, *, threshold: float = 0.143, apix: float) -> float:
    """Resolution in Å where ``curve`` first falls below ``threshold`` (interpolated).

    Shell 0 is skipped. Returns the Nyquist resolution ``2 apix`` if it never does.
    """
    n = 2 * (len(curve) - 1)
    freq = shell_frequencies_a(n, apix)
    below = np.flatnonzero(curve[1:] < threshold)
    if below.size == 0:
        return 2.0 * apix
    i = below[0] + 1
    if i == 1:
        return 1.0 / freq[1]
    c0, c1 = curve[i - 1], curve[i]
    f = freq[i - 1] + (freq[i] - freq[i - 1]) * (c0 - threshold) / (c0 - c1)
    return float(1.0 / f)


@dataclass(frozen=True)
class HalfMapFsc:
    """The four gold-standard FSC curves of two half maps, as relion_postprocess writes
    them (each ``(n // 2 + 1,)`` float64, shell ``r`` at ``r / (n apix)`` 1/Å).

    ``unmasked``: the half maps as given; ``masked``: both under the FSC mask;
    ``randomised_masked``: both with their phases randomised beyond shell
    ``randomised_from``, then masked; ``corrected``: the masked curve corrected by
    noise substitution (Chen et al. 2013), the one whose 0.143 crossing is reported.
    """

    unmasked: np.ndarray
    masked: np.ndarray
    randomised_masked: np.ndarray
    corrected: np.ndarray
    randomised_from: int

    def resolution(self, *, apix: float, threshold: float = 0.143) -> float:
        """The corrected curve's resolution (Å) at ``threshold``."""
        return resolution_at(self.corrected, threshold=threshold, apix=apix)


def noise_substituted_fsc(
    half1: np.ndarray,
    half2: np.ndarray,
    mask: np.ndarray,
    *,
    rng: np.random.Generator,
    unmasked: np.ndarray | None = None,
    randomise_below: float = RANDOMISE_BELOW_FSC,
) -> HalfMapFsc:
    """Masked half-map FSC corrected for the correlation the mask itself brings.

    The phases of both maps are randomised (independently) beyond the first shell where
    their unmasked FSC falls below ``randomise_below``; the same mask on those maps
    gives ``FSC_rand``. From two shells past that shell on, the corrected curve is
    ``(FSC_masked - FSC_rand) / (1 - FSC_rand)``; below, ``FSC_masked``
    (relion_postprocess). ``unmasked``: the curve to take that shell from (default:
    the FSC of the maps as given). If the unmasked FSC
    never falls below ``randomise_below``, nothing is randomised and the corrected curve
    is the masked one.
    """
    half1 = np.asarray(half1, np.float32)
    half2 = np.asarray(half2, np.float32)
    mask = np.asarray(mask, np.float32)
    if unmasked is None:
        unmasked = fsc(half1, half2)
    masked = fsc(half1 * mask, half2 * mask)
    below = np.flatnonzero(unmasked[1:] < randomise_below)
    if below.size == 0:
        return HalfMapFsc(unmasked, masked, np.zeros_like(masked), masked.copy(), len(masked))
    shell = int(below[0]) + 1
    n = half1.shape[-1]
    # randomise_phases keeps what lies within the radius, in cycles/pixel
    beyond_cpp = (shell - 0.5) / n
    rand1 = randomise_phases(half1, beyond_cpp, 3, rng)
    rand2 = randomise_phases(half2, beyond_cpp, 3, rng)
    rand = fsc(rand1 * mask, rand2 * mask)
    return HalfMapFsc(unmasked, masked, rand, corrected_fsc(masked, rand, shell), shell)


def corrected_fsc(masked: np.ndarray, randomised: np.ndarray, shell: int) -> np.ndarray:
    """``(FSC_masked - FSC_rand) / (1 - FSC_rand)`` from shell ``shell + 2`` on,
    ``FSC_masked`` below: Chen et al. (2013) as relion_postprocess applies it, with
    phases randomised from shell ``shell``."""
    masked = np.asarray(masked, np.float64)
    randomised = np.asarray(randomised, np.float64)
    corrected = masked.copy()
    tail = np.arange(len(masked)) >= shell + RANDOMISE_GUARD_SHELLS
    with np.errstate(invalid="ignore", divide="ignore"):
        true = np.where(randomised < 1.0, (masked - randomised) / (1.0 - randomised), 0.0)
    corrected[tail] = true[tail]
    return corrected

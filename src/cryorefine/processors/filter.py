"""Fourier filter processors: Gaussian and tanh low-pass, Gaussian high-pass, setsf.

The cut-off is given as exactly one of ``cutoff_abs`` (cycles/pixel, Nyquist = 0.5,
EMAN2's unit), ``cutoff_freq`` (1/Å), ``cutoff_res`` (Å) or ``cutoff_pixels``
(Fourier pixels, ``= cutoff_pixels / n`` cycles/pixel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.fourier import filters
from cryorefine.registry import PROCESSORS, Param

_CUTOFFS = (
    Param("cutoff_abs", float, "cut-off in cycles/pixel (Nyquist = 0.5)"),
    Param("cutoff_freq", float, "cut-off in 1/Å"),
    Param("cutoff_res", float, "cut-off as a resolution in Å"),
    Param("cutoff_pixels", float, "cut-off as a radius in Fourier pixels"),
)


def _check_cutoff(params: dict, where: str, *, allow_sigma: bool = False) -> None:
    names = [p.name for p in _CUTOFFS] + (["sigma"] if allow_sigma else [])
    given = [k for k in names if params.get(k) is not None]
    if len(given) != 1:
        raise CryorefineError(f"{where}: give exactly one of {', '.join(names)}")
    value = params[given[0]]
    if value <= 0:
        raise CryorefineError(f"{where}: {given[0]} must be positive")


def cutoff_cpp(params: dict, n: int, apix: float | None, where: str) -> float:
    """The cut-off in cycles/pixel from whichever of the cut-off parameters is set."""
    if params.get("cutoff_abs") is not None:
        return params["cutoff_abs"]
    if params.get("cutoff_pixels") is not None:
        return params["cutoff_pixels"] / n
    if not apix or apix <= 0:
        raise CryorefineError(f"{where}: cutoff_freq/cutoff_res need a pixel size (--apix)")
    if params.get("cutoff_freq") is not None:
        return params["cutoff_freq"] * apix
    return apix / params["cutoff_res"]


@PROCESSORS.register(
    "filter.lowpass.gauss",
    "Gaussian low-pass exp(-s^2/c^2): gain 1/e at the cut-off c (or give sigma).",
    _CUTOFFS + (Param("sigma", float, "standard deviation in cycles/pixel instead of a cut-off"),),
    check=lambda p, w: _check_cutoff(p, w, allow_sigma=True),
)
def lowpass_gauss(
    data: np.ndarray, *, ndim: int, apix: float | None, sigma=None, **cut
) -> np.ndarray:
    if sigma is not None:
        return filters.lowpass_gauss_sigma(data, sigma, ndim)
    return filters.lowpass_gauss(
        data, cutoff_cpp(cut, data.shape[-1], apix, "filter.lowpass.gauss"), ndim
    )


@PROCESSORS.register(
    "filter.highpass.gauss",
    "Gaussian high-pass 1 - exp(-s^2/c^2).",
    _CUTOFFS,
    check=_check_cutoff,
)
def highpass_gauss(data: np.ndarray, *, ndim: int, apix: float | None, **cut) -> np.ndarray:
    return filters.highpass_gauss(
        data, cutoff_cpp(cut, data.shape[-1], apix, "filter.highpass.gauss"), ndim
    )


@PROCESSORS.register(
    "filter.lowpass.tanh",
    "Hyperbolic-tangent low-pass with gain 1/2 at the cut-off.",
    _CUTOFFS
    + (Param("fall_off", float, "width of the fall-off, relative to the cut-off", default=0.5),),
    check=_check_cutoff,
)
def lowpass_tanh(
    data: np.ndarray, *, ndim: int, apix: float | None, fall_off: float, **cut
) -> np.ndarray:
    if fall_off <= 0:
        raise CryorefineError("filter.lowpass.tanh: fall_off must be positive")
    return filters.lowpass_tanh(
        data, cutoff_cpp(cut, data.shape[-1], apix, "filter.lowpass.tanh"), ndim, fall_off
    )


@PROCESSORS.register(
    "filter.setstrucfac",
    "Impose a 1D radial power spectrum (structure factor) from a text file "
    "(1/Å, power) or from another map.",
    (
        Param(
            "strucfac",
            str,
            "text file of (1/Å, power) or a map file",
            required=True,
            file="strucfac",
        ),
        Param("apix", float, "Å/pixel of the data (default: the data's)"),
    ),
    aliases=("setsf",),
)
def setstrucfac(
    data: np.ndarray,
    *,
    ndim: int,
    apix: float | None,
    strucfac: tuple[np.ndarray, np.ndarray] | str,
) -> np.ndarray:
    """``strucfac``: the ``(freq_a, power)`` table, which the option parser
    (``cryorefine.config.parse_option``) reads from the named file once."""
    if not apix or apix <= 0:
        raise CryorefineError("filter.setstrucfac: the data have no pixel size; give apix=")
    if isinstance(strucfac, str | Path):
        raise CryorefineError(
            f"filter.setstrucfac: strucfac={strucfac} is a file name; parse the option "
            "with cryorefine.config.parse_option, which reads it once"
        )
    freq, power = strucfac
    try:
        return filters.set_structure_factor(data, freq, power, apix, ndim)
    except ValueError as exc:
        raise CryorefineError(f"filter.setstrucfac: {exc}") from exc

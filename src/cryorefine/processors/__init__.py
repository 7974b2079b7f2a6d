"""EMAN2 processors for 2D image stacks and 3D maps.

Every processor is registered in :data:`cryorefine.registry.PROCESSORS` and called as
``func(data, ndim=..., apix=..., **params)``: ``data`` is ``(..., n, n)`` (``ndim=2``)
or ``(..., n, n, n)`` (``ndim=3``) float32, processed image by image in one
vectorised call; ``apix`` is the pixel size in Å (needed by Å-valued parameters).
Radii are in pixels and frequencies in cycles/pixel unless the name says Å, as in
EMAN2.
"""

from __future__ import annotations

import numpy as np

from cryorefine.processors import filter, mask, normalize  # noqa: F401  (register)
from cryorefine.registry import PROCESSORS


def apply_processor(
    text: str, data: np.ndarray, *, ndim: int, apix: float, option: str = "--process"
) -> np.ndarray:
    """Parse ``text`` (``name:key=value``) and apply it to ``data``."""
    mod = PROCESSORS.parse(text, option=option)
    if mod is None:
        return data
    return mod(data, ndim=ndim, apix=apix)


__all__ = ["apply_processor"]

"""cryorefine: single-particle cryo-EM 3D refinement in the spirit of EMAN2's e2refine."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

# The compiled kernels' OpenMP threads would otherwise spin for a while after each
# parallel region, taking the cores from scipy.fft's threads that run between the
# kernels (10-15% of a simmx run). Set before numba starts its threads; a value the
# user gives wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cryorefine.errors import CryorefineError, CryorefineWarning

try:
    __version__ = version("cryorefine")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["CryorefineError", "CryorefineWarning", "__version__"]

"""cryorefine: single-particle cryo-EM 3D refinement in the spirit of EMAN2's e2refine."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

# The compiled kernels (numba, OpenMP) alternate with scipy's FFT threads many times per
# second; spinning OpenMP workers would steal the cores those threads need. A user's
# own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cryorefine.errors import CryorefineError, CryorefineWarning

try:
    __version__ = version("cryorefine")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["CryorefineError", "CryorefineWarning", "__version__"]

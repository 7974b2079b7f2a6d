"""cryorefine: single-particle cryo-EM 3D refinement in the spirit of EMAN2's e2refine."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

# The compiled kernels' OpenMP (libgomp) threads would otherwise spin for up to
# ~300,000 rounds after each parallel region, taking the cores from scipy.fft's threads
# that run between the kernels (10-20% of a simmx run with an FFT comparator); a tenth
# of that still keeps them awake between the short kernels of a single-pair alignment.
# Set before numba starts its threads; a setting the user gives wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")

from cryorefine.errors import CryorefineError, CryorefineWarning

try:
    __version__ = version("cryorefine")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["CryorefineError", "CryorefineWarning", "__version__"]

"""cryorefine: single-particle cryo-EM 3D refinement in the spirit of EMAN2's e2refine."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from cryorefine.errors import CryorefineError, CryorefineWarning

try:
    __version__ = version("cryorefine")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["CryorefineError", "CryorefineWarning", "__version__"]

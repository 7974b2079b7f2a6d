"""Run configurations: frozen dataclasses whose fields mirror the command-line options.

Each validates itself in ``__post_init__`` so that bad options fail before any data
is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryorefine.errors import CryorefineError
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.registry import PROCESSORS, RECONSTRUCTORS


def automask_processor(values: str) -> str:
    """EMAN2's ``--automask3d thr,radius,nshells,nshellsgauss,nmaxseed`` as a processor."""
    parts = [v.strip() for v in values.split(",")]
    if len(parts) != 5 or not all(parts):
        raise CryorefineError(
            f"--automask3d '{values}': give threshold,radius,nshells,nshellsgauss,nmaxseed "
            "(e.g. 1.1,30,5,5,0)"
        )
    keys = ("threshold", "radius", "nshells", "nshellsgauss", "nmaxseed")
    return "mask.auto3d:" + ":".join(f"{k}={v}" for k, v in zip(keys, parts, strict=True))


@dataclass(frozen=True)
class Make3dConfig:
    """Options of ``make3d`` (EMAN2 e2make3d).

    ``pad_px``: padded image size in pixels (default twice the box); ``iterations``,
    ``keep``, ``keepsig``, ``keepabs``: EMAN2's slice rating and exclusion passes;
    ``use_ctf``/``use_weights``: use the metadata's CTF and weights; ``mask_sphere``:
    damp the corners outside the inscribed sphere; ``wiener``: when the particles carry
    two half sets, reconstruct them apart and regularise the whole map with the
    spectral SNR from their FSC (RELION's tau^2 term); ``automask3d``: EMAN2's five
    comma-separated ``mask.auto3d`` values, applied last; ``oversample_2d``: pad each
    image as the volume before its 2D transform (accurate; off: insert the unpadded
    transform at scaled positions, 4x less work, as RELION).
    """

    sym: str = "c1"
    pad_px: int | None = None
    recon: str = "fourier"
    preprocess: tuple[str, ...] = ()
    postprocess: tuple[str, ...] = ()
    setsf: str | None = None
    automask3d: str | None = None
    use_ctf: bool = True
    use_weights: bool = True
    mask_sphere: bool = True
    wiener: bool = True
    oversample_2d: bool = True
    iterations: int = 1
    keep: float = 1.0
    keepsig: bool = False
    keepabs: bool = False

    def __post_init__(self) -> None:
        symmetry_group(self.sym)
        RECONSTRUCTORS.parse(self.recon, option="--recon")
        for p in self.preprocess:
            PROCESSORS.parse(p, option="--preprocess")
        for p in self.postprocess:
            PROCESSORS.parse(p, option="--postprocess")
        if self.iterations < 1:
            raise CryorefineError(f"--iter must be at least 1, got {self.iterations}")
        if not self.keepsig and not 0 < self.keep <= 1:
            raise CryorefineError(
                f"--keep {self.keep}: a fraction must be in (0, 1] (or use --keepsig)"
            )
        if self.automask3d is not None:
            PROCESSORS.parse(automask_processor(self.automask3d), option="--automask3d")
        if self.pad_px is not None and self.pad_px < 1:
            raise CryorefineError(f"--pad must be a positive size in pixels, got {self.pad_px}")

"""e2make3d: a 3D map from images with known orientations (direct Fourier inversion)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryorefine.errors import CryorefineError
from cryorefine.fourier.reconstruct import FourierVolume, backproject, sphere_mask
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.io.maps import Map, write_map
from cryorefine.io.stacks import ParticleStack
from cryorefine.registry import PROCESSORS, RECONSTRUCTORS, Param


@RECONSTRUCTORS.register(
    "fourier",
    "Direct Fourier inversion: slices inserted into a padded 3D transform and divided "
    "by the summed weights (CTF^2 with CTF); trilinear with sinc^2 gridding correction "
    "by default, or EMAN2's gauss_2 kernel.",
    (
        Param(
            "mode",
            str,
            "interpolation: trilinear, gauss_2 or nearest_neighbor",
            default="trilinear",
        ),
    ),
)
def fourier_reconstructor(size: int, n: int, *, mode: str = "trilinear") -> FourierVolume:
    return FourierVolume(size, n, mode)


def make3d(
    stack: ParticleStack,
    *,
    sym: str = "c1",
    pad_px: int | None = None,
    recon: str = "fourier",
    preprocess: tuple[str, ...] = (),
    use_ctf: bool = True,
    use_weights: bool = True,
    mask_sphere: bool = True,
    chunk: int = 256,
) -> tuple[np.ndarray, dict]:
    """Reconstruct a map ``(n, n, n)`` float32 from a stack with orientations.

    Images are read chunk by chunk (memory stays bounded), pre-processed, padded to
    ``pad_px`` (default twice the box), CTF-weighted when the metadata has a CTF and
    ``use_ctf``, weighted by ``meta.weight`` when ``use_weights``, and inserted once
    per symmetry operator of ``sym``. Images with weight 0 or no orientation are
    skipped. Returns the map and a dict (``inserted``, ``skipped`` indices,
    ``ptcl_repr`` = summed weight).
    """
    group = symmetry_group(sym)
    mod = RECONSTRUCTORS.parse(recon, option="--recon")
    mods = [m for m in (PROCESSORS.parse(p, option="--preprocess") for p in preprocess) if m]
    meta = stack.meta
    n = stack.box
    usable = meta.has_orientation & (np.abs(meta.weight) > 0 if use_weights else True)
    if not usable.any():
        raise CryorefineError(
            f"{stack.label}: no image has an orientation (STAR: rlnAngleRot/"
            "rlnAngleTilt/rlnAnglePsi; EMAN2: xform.projection)"
        )
    size = 2 * n if pad_px is None else int(pad_px)
    if size < n:
        raise CryorefineError(f"--pad {size} is smaller than the box ({n} px)")
    size += size % 2
    vol = mod(size, n)
    apix = stack.apix
    ctf_known = meta.ctf.known
    with_ctf = use_ctf and bool(ctf_known[usable].all())
    idx_all = np.flatnonzero(usable)
    for start in range(0, len(idx_all), chunk):
        idx = idx_all[start : start + chunk]
        images = stack.read(idx)
        for m in mods:
            images = m(images, ndim=2, apix=apix)
        sub = meta.take(idx)
        backproject(
            images,
            sub.rotations,
            shifts_px=sub.shift_a / apix,
            ctf=sub.ctf if with_ctf else None,
            apix=apix,
            weights=sub.weight if use_weights else None,
            ops=group.operators,
            volume=vol,
            chunk=64,
        )
    volume = vol.finish()
    if mask_sphere:
        volume *= sphere_mask(n)
    info = {
        "inserted": idx_all,
        "skipped": np.flatnonzero(~usable),
        "ptcl_repr": float(meta.weight[usable].sum()) if use_weights else float(usable.sum()),
        "ctf": with_ctf,
    }
    return volume, info


def run_make3d(
    input_path: Path,
    output: Path,
    *,
    sym: str = "c1",
    pad_px: int | None = None,
    recon: str = "fourier",
    preprocess: tuple[str, ...] = (),
    postprocess: tuple[str, ...] = (),
    setsf: str | None = None,
    apix: float | None = None,
    use_ctf: bool = True,
    use_weights: bool = True,
    mask_sphere: bool = True,
    overwrite: bool = False,
) -> dict:
    """Read the stack, reconstruct, apply setsf and post-processors, write the map."""
    from cryorefine.io.atomic import check_output

    check_output(output, overwrite=overwrite)
    symmetry_group(sym)
    recon_mod = RECONSTRUCTORS.parse(recon, option="--recon")
    FourierVolume(4, 2, recon_mod.params["mode"])  # validates the mode before any reading
    post = [m for m in (PROCESSORS.parse(p, option="--postprocess") for p in postprocess) if m]
    sf = (
        PROCESSORS.parse(f"filter.setstrucfac:strucfac={setsf}", option="--setsf")
        if setsf
        else None
    )
    stack = ParticleStack.from_path(input_path, apix=apix)
    try:
        volume, info = make3d(
            stack,
            sym=sym,
            pad_px=pad_px,
            recon=recon,
            preprocess=preprocess,
            use_ctf=use_ctf,
            use_weights=use_weights,
            mask_sphere=mask_sphere,
        )
        a = stack.apix
    finally:
        stack.close()
    for m in ([sf] if sf else []) + post:
        volume = m(volume, ndim=3, apix=a)
    write_map(output, Map(np.asarray(volume, np.float32), a), overwrite=overwrite)
    return info

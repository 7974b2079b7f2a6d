"""e2make3d: a 3D map from images with known orientations (direct Fourier inversion)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryorefine import memory, parallel
from cryorefine.config import Make3dConfig
from cryorefine.errors import CryorefineError
from cryorefine.fourier.fsc import fsc
from cryorefine.fourier.reconstruct import (
    FourierVolume,
    apply_wiener_gain,
    image_slices,
    sphere_mask,
    weight_floor,
    wiener_gain,
)
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.io.atomic import check_output
from cryorefine.io.maps import Map, write_map
from cryorefine.io.stacks import ParticleStack

#: fewer images than this are not split into halves for the Wiener term (their FSC
#: would measure the halves' different coverage of Fourier space, not the noise)
MIN_WIENER_IMAGES = 50


def slice_qualities(
    absqual: np.ndarray, weights: np.ndarray, *, keep: float, keepsig: bool, keepabs: bool
) -> tuple[np.ndarray, float]:
    """EMAN2's slice quality and exclusion cut-off (e2make3d ``--keep``).

    ``keepabs``: the quality is ``absqual``; otherwise it is ``absqual`` over the mean
    of its 21 neighbours when sorted by (weight, absqual), so that averages of similar
    particle counts are compared. Cut-off: the best ``keep`` fraction, or
    ``mean - keep * std`` with ``keepsig``. Slices with quality below it are excluded.
    """
    if keepabs:
        qual = absqual.copy()
    else:
        order = np.lexsort((absqual, weights))
        sorted_q = absqual[order]
        k = len(order)
        csum = np.concatenate([[0.0], np.cumsum(sorted_q)])
        lo = np.maximum(np.arange(k) - 10, 0)
        hi = np.minimum(np.arange(k) + 10, k)
        local = (csum[hi] - csum[lo]) / np.maximum(hi - lo, 1)
        qual = np.empty(k)
        qual[order] = sorted_q / np.where(local != 0, local, 1.0)
    q = np.sort(qual)
    if keepsig:
        cutoff = float(q.mean() - keep * q.std())
    else:
        cutoff = float(q[-int(np.floor(keep * len(q)))]) if np.floor(keep * len(q)) > 0 else -np.inf
    return qual, cutoff


def postprocess(volume: np.ndarray, cfg: Make3dConfig, apix: float) -> np.ndarray:
    """``volume`` post-processed as ``cfg`` says: structure factor, processors, automask."""
    for m in cfg.postprocess_mods:
        volume = m(volume, ndim=3, apix=apix)
    return volume


def make3d(
    stack: ParticleStack,
    cfg: Make3dConfig | None = None,
    *,
    chunk: int | None = None,
    keep_halves: bool = False,
) -> tuple[np.ndarray, dict]:
    """Reconstruct a map ``(n, n, n)`` float32 from a stack with orientations.

    Images are read chunk by chunk (memory stays bounded), pre-processed, padded to
    ``pad_px`` (default twice the box), CTF-weighted when the metadata has a CTF and
    ``use_ctf``, weighted by ``meta.weight`` when ``use_weights``, and inserted once
    per symmetry operator of ``sym``. Images with weight 0 or no orientation are
    skipped.

    ``iterations > 1`` runs EMAN2's passes: after each pass but the last, every slice
    is compared with the map built without it (Fourier correlation weighted by the
    map's sampling), rescaled to match it, and the worst (``keep``, ``keepsig``,
    ``keepabs``; see :func:`slice_qualities`) are left out of the next pass. Slices
    are taken out in small blocks (about 1/64 of the stack) for the comparison.

    The map is then post-processed as ``cfg`` says (structure factor, processors,
    automask). Returns the map and a dict: ``inserted`` and ``excluded`` image indices of the
    last pass, ``skipped`` (no orientation or weight 0), ``quality`` (absolute, per
    image, NaN where not compared), ``ptcl_repr`` (summed weight inserted), ``ctf``,
    ``half_fsc`` (of the two half sets, when split) and, with ``keep_halves``,
    ``half_maps``: each half's own map, masked as the map and Wiener-filtered by its own
    FSC-derived SNR, not post-processed (``None`` when not split).

    Split into halves, the map is divided by ``Wsum`` plus a small floor
    (:func:`~cryorefine.fourier.reconstruct.weight_floor`), cropped and masked, and then
    each shell is weighted by ``SSNR / (1 + SSNR)`` from the halves' FSC
    (:func:`~cryorefine.fourier.reconstruct.wiener_gain`).
    """
    cfg = cfg or Make3dConfig()
    group = symmetry_group(cfg.sym)
    mod = cfg.recon_mod
    mods = cfg.preprocess_mods
    meta = stack.meta
    n = stack.box
    usable = meta.has_orientation & (np.abs(meta.weight) > 0 if cfg.use_weights else True)
    if not usable.any():
        raise CryorefineError(
            f"{stack.label}: no image has an orientation (STAR: rlnAngleRot/"
            "rlnAngleTilt/rlnAnglePsi; EMAN2: xform.projection)"
        )
    size = 2 * n if cfg.pad_px is None else int(cfg.pad_px)
    if size < n:
        raise CryorefineError(f"--pad {size} is smaller than the box ({n} px)")
    size += size % 2
    apix = stack.apix
    with_ctf = cfg.use_ctf and bool(meta.ctf.known[usable].all())
    weights = meta.weight if cfg.use_weights else np.ones(len(meta))
    ops = group.operators

    slice_size = size if cfg.oversample_2d else n
    if chunk is None:  # padded image, its transform, CTF and copies: ~40 bytes a pixel
        chunk = max(8, int(memory.budget("make3d") // (40 * slice_size * slice_size)))

    def new_volume(groups: int = 1) -> FourierVolume:
        return mod(size, n, slice_size=slice_size, groups=groups)

    def prepare(idx: np.ndarray):
        images = stack.read(idx)
        for m in mods:
            images = m(images, ndim=2, apix=apix)
        sub = meta.take(idx)
        slices = image_slices(images, slice_size, sub.shift_a / apix)
        if (norm[idx] != 1).any():
            slices *= norm[idx, None, None].astype(np.float32)
        ctf = sub.ctf.evaluate(slice_size, apix) if with_ctf else None
        return slices, ctf, sub.rotations

    def insert(vol, slices, ctf, rots, w, sel, groups=None) -> None:
        if sel.any():
            vol.insert(
                slices[sel],
                rots[sel],
                ops=ops,
                weights=w[sel],
                ctf=None if ctf is None else ctf[sel],
                groups=None if groups is None else groups[sel],
            )

    idx_all = np.flatnonzero(usable)
    halves = meta.half_set
    has_halves = set(np.unique(halves[idx_all]).tolist()) == {1, 2}
    split = (mod.name == "wiener_fourier" or cfg.wiener) and len(idx_all) >= MIN_WIENER_IMAGES
    if split and not has_halves:  # alternate particles make the two halves
        halves = np.zeros(len(meta), dtype=np.int64)
        halves[idx_all] = 1 + np.arange(len(idx_all)) % 2
    norm = np.ones(len(meta))
    excluded = np.zeros(len(meta), dtype=bool)
    absqual = np.full(len(meta), np.nan)
    for it in range(cfg.iterations):
        final = it == cfg.iterations - 1
        # gold standard: the two half sets in groups 0 and 1 of one volume
        halved = final and split
        vol = new_volume(2 if halved else 1)
        active = idx_all[~excluded[idx_all]]
        executor = parallel.current()
        if executor.distributed and active.size:  # each worker's share, summed here
            shares = np.array_split(active, min(len(active), executor.workers()))
            job = _InsertJob(cfg, size, slice_size, with_ctf, chunk, vol.groups)
            items = (
                _Share(
                    stack.take(i),
                    norm[i],
                    weights[i],
                    (halves[i] - 1) if halved else np.zeros(len(i), np.int64),
                )
                for i in shares
            )
            for sums in parallel.map_chunks(insert_share, job, items):
                vol.add(sums)
        else:
            for start in range(0, len(active), chunk):
                idx = active[start : start + chunk]
                slices, ctf, rots = prepare(idx)
                groups = halves[idx] - 1 if halved else None
                insert(vol, slices, ctf, rots, weights[idx], np.ones(len(idx), bool), groups)
        if final:
            break
        scale = np.ones(len(meta))
        block = max(1, -(-len(idx_all) // 64))
        for start in range(0, len(idx_all), block):
            idx = idx_all[start : start + block]
            slices, ctf, rots = prepare(idx)
            inside = ~excluded[idx]
            insert(vol, slices, ctf, rots, -weights[idx], inside)  # compare without itself
            absqual[idx], scale[idx] = vol.compare(slices, rots, ops=ops, ctf=ctf)
            insert(vol, slices, ctf, rots, weights[idx], inside)
        norm *= scale
        qual, cutoff = slice_qualities(
            absqual[idx_all],
            weights[idx_all],
            keep=cfg.keep,
            keepsig=cfg.keepsig,
            keepabs=cfg.keepabs,
        )
        excluded[idx_all] = qual < cutoff
    mask = sphere_mask(n) if cfg.mask_sphere else np.ones((n, n, n), np.float32)
    half_fsc = half_maps = None
    if vol.groups == 2:
        # each shell weighted by its SNR after the crop and mask (see wiener_gain)
        halves = [vol.finish(weight_floor(vol, group=g), group=g) * mask for g in (0, 1)]
        half_fsc = fsc(*halves)
        volume = apply_wiener_gain(vol.finish(weight_floor(vol)) * mask, wiener_gain(half_fsc))
        if keep_halves:
            gain = wiener_gain(half_fsc, half=True)
            half_maps = [apply_wiener_gain(h, gain) for h in halves]
        del halves
    else:
        volume = vol.finish() * mask
    volume = postprocess(volume, cfg, apix)
    inserted = idx_all[~excluded[idx_all]]
    info = {
        "inserted": inserted,
        "excluded": idx_all[excluded[idx_all]],
        "skipped": np.flatnonzero(~usable),
        "quality": absqual,
        "ptcl_repr": float(weights[inserted].sum()),
        "ctf": with_ctf,
        "half_fsc": half_fsc,
        "half_maps": half_maps,
    }
    return volume, info


@dataclass(frozen=True)
class _InsertJob:
    """What every share of :func:`make3d`'s insertion needs: the configuration, the
    padded size, the slices' size, whether to weight by the CTF, the images per chunk
    and the volume's groups (2: the half sets)."""

    cfg: Make3dConfig
    size: int
    slice_size: int
    with_ctf: bool
    chunk: int
    groups: int


@dataclass(frozen=True)
class _Share:
    """A worker's share of the images: their stack (with orientations, shifts, CTF),
    the per-image scale of earlier passes, weights and groups (0-based)."""

    stack: ParticleStack
    norm: np.ndarray
    weights: np.ndarray
    groups: np.ndarray


def insert_share(job: _InsertJob, share: _Share) -> list[tuple[np.ndarray, np.ndarray]]:
    """Insert a share of the images, chunk by chunk, into a volume of its own; returns
    each group's ``(Fsum, Wsum)``, which add up exactly to the volume of every share."""
    stack, apix = share.stack, share.stack.apix
    ops = symmetry_group(job.cfg.sym).operators
    vol = job.cfg.recon_mod(job.size, stack.box, slice_size=job.slice_size, groups=job.groups)
    for start in range(0, len(stack), job.chunk):
        sl = slice(start, start + job.chunk)
        sub = stack.meta.take(np.arange(len(stack))[sl])
        images = stack.read(np.arange(len(stack))[sl])
        for m in job.cfg.preprocess_mods:
            images = m(images, ndim=2, apix=apix)
        slices = image_slices(images, job.slice_size, sub.shift_a / apix)
        if (share.norm[sl] != 1).any():
            slices *= share.norm[sl, None, None].astype(np.float32)
        ctf = sub.ctf.evaluate(job.slice_size, apix) if job.with_ctf else None
        vol.insert(
            slices,
            sub.rotations,
            ops=ops,
            weights=share.weights[sl],
            ctf=ctf,
            groups=share.groups[sl] if job.groups > 1 else None,
        )
    stack.release()
    return [vol.sums(g if job.groups > 1 else None) for g in range(job.groups)]


def run_make3d(
    input_path: Path,
    output: Path,
    cfg: Make3dConfig,
    *,
    apix: float | None = None,
    overwrite: bool = False,
) -> dict:
    """Read the stack, reconstruct (:func:`make3d`), write the map."""
    check_output(output, overwrite=overwrite)
    stack = ParticleStack.from_path(input_path, apix=apix)
    try:
        volume, info = make3d(stack, cfg)
        a = stack.apix
    finally:
        stack.close()
    write_map(output, Map(np.asarray(volume, np.float32), a), overwrite=overwrite)
    return info

"""Averagers (EMAN2 ``--averager``): the members of many classes into one image each.

An averager is called as ``func(images, groups, n_groups, transform=..., source=...,
ctf=...)``: ``images`` ``(u, n, n)`` float32 are the members in their own frame,
member ``m`` is image ``source[m]`` (default: member ``m`` is image ``m``) brought into
its class's frame by ``transform`` (a :class:`~cryorefine.align.transform2d.Transform2D`,
the particle -> average transforms, one per member; default: none),
and belongs to class ``groups[m]``. ``ctf`` ``(u, n, n // 2 + 1)``: each image's CTF in
its own frame (rfft layout, RELION convention), needed by the CTF averagers. Returns
the ``(n_groups, n, n)`` averages and the number of members behind each (``ptcl_repr``);
a class without members gives a zero image and 0.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from cryorefine.align.transform2d import Transform2D
from cryorefine.errors import CryorefineError
from cryorefine.fourier.fft import fft_threads, rfft_shell_index
from cryorefine.registry import AVERAGERS, Param

#: members transformed and summed at a time
BATCH = 1024


def group_sums(images: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """``(n_groups, ...)`` float64 sums of the images of each group (sorted, reduceat)."""
    images = np.asarray(images)
    groups = np.asarray(groups, np.int64)
    out = np.zeros((n_groups,) + images.shape[1:], np.float64)
    if len(groups) == 0:
        return out
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    out[g[starts]] = np.add.reduceat(images[order].astype(np.float64), starts, axis=0)
    return out


def _members(images, groups, transform, source):
    groups = np.asarray(groups, np.int64)
    m = len(groups)
    src = np.arange(m) if source is None else np.asarray(source, np.int64)
    if transform is None:
        transform = Transform2D.identity(m)
    return groups, src, transform


def _aligned_sums(images, groups, n_groups, transform, src) -> np.ndarray:
    """Sums per class of the members brought into their class's frame (in batches)."""
    n = images.shape[-1]
    out = np.zeros((n_groups, n, n))
    for s0 in range(0, len(groups), BATCH):
        sl = slice(s0, s0 + BATCH)
        moved = transform.take(sl).apply(images, source=src[sl])
        out += group_sums(moved, groups[sl], n_groups)
    return out


@AVERAGERS.register("mean", "Pixelwise mean of each class's members (n = 1: the member).")
def mean(
    images: np.ndarray,
    groups: np.ndarray,
    n_groups: int,
    *,
    transform: Transform2D | None = None,
    source=None,
    ctf: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    groups, src, transform = _members(images, groups, transform, source)
    counts = np.bincount(groups, minlength=n_groups)
    sums = _aligned_sums(np.asarray(images, np.float32), groups, n_groups, transform, src)
    return (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32), counts


def _full_plane(half: np.ndarray, n: int) -> np.ndarray:
    """A real, even Fourier-space map in rfft layout ``(k, n, n // 2 + 1)`` as the full
    centred plane ``(k, n, n)`` (origin at ``n // 2``), using ``C(-k) = C(k)``."""
    k = len(half)
    full = np.empty((k, n, n), np.float32)
    hx = n // 2 + 1
    full[:, :, :hx] = half
    ky = (-np.arange(n)) % n
    kx = (-np.arange(hx, n)) % n  # negative kx: read at (-ky, -kx)
    full[:, :, hx:] = half[:, ky][:, :, kx]
    return np.fft.fftshift(full, axes=(-2, -1))


def _half_plane(full_centred: np.ndarray) -> np.ndarray:
    n = full_centred.shape[-1]
    return np.fft.ifftshift(full_centred, axes=(-2, -1))[..., : n // 2 + 1]


def ctf_sums(
    images: np.ndarray, groups: np.ndarray, n_groups: int, transform, src, ctf: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the transforms ``N = sum T_m[C F]`` and ``D = sum R_m[C^2]``: each
    member multiplied by its own CTF (in its frame), then moved into the class frame;
    its ``C^2`` rotated (and mirrored) with it (shifts leave it unchanged). Both in rfft
    layout ``(n_groups, n, n // 2 + 1)``."""
    n = images.shape[-1]
    images = np.asarray(images, np.float32)
    weighted = scipy.fft.irfft2(
        scipy.fft.rfft2(images, workers=fft_threads()) * ctf, s=(n, n), workers=fft_threads()
    ).astype(np.float32)
    num = _aligned_sums(weighted, groups, n_groups, transform, src)
    c2 = _full_plane(np.square(ctf, dtype=np.float32), n)
    zeros = np.zeros(len(groups))
    turn = Transform2D(np.asarray(transform.alpha), zeros, zeros, np.asarray(transform.mirror))
    den = _aligned_sums(c2, groups, n_groups, turn, src)
    # rotation about pixel n // 2 by bilinear interpolation: symmetric enough that the
    # centred map stays a map of squared CTFs (non-negative)
    return scipy.fft.rfft2(num, workers=fft_threads()), _half_plane(np.maximum(den, 0.0))


def _check_wiener(params: dict, where: str) -> None:
    if params["wiener"] <= 0:
        raise CryorefineError(f"{where}: wiener must be positive")


def _ctf_average(images, groups, n_groups, transform, source, ctf, name, finish):
    if ctf is None:
        raise CryorefineError(f"averager {name}: the particles have no CTF (ctf=None)")
    groups, src, transform = _members(images, groups, transform, source)
    n = images.shape[-1]
    counts = np.bincount(groups, minlength=n_groups)
    num, den = ctf_sums(images, groups, n_groups, transform, src, np.asarray(ctf, np.float32))
    out = scipy.fft.irfft2(finish(num, den, n), s=(n, n), workers=fft_threads())
    out[counts == 0] = 0.0
    return out.astype(np.float32), counts


@AVERAGERS.register(
    "ctf.weight",
    "Wiener average of CTF-modulated members: sum C F / (sum C^2 + wiener x the ring "
    "mean of sum C^2), each member's CTF rotated with it; CTF-corrected in amplitude and "
    "phase (for particles that are not phase-flipped, as RELION's).",
    (Param("wiener", float, "Wiener constant, relative to the ring mean of sum C^2", 0.1),),
    check=lambda p, where: _check_wiener(p, where),
)
def ctf_weight(
    images,
    groups,
    n_groups,
    *,
    transform: Transform2D | None = None,
    source=None,
    ctf=None,
    wiener: float = 0.1,
):
    _check_wiener({"wiener": wiener}, "averager ctf.weight")

    def finish(num, den, n):
        ring = rfft_shell_index((n, n))
        nr = n // 2 + 1
        keep = ring < nr
        out = np.zeros_like(num)
        for g in range(len(num)):
            d = den[g]
            means = np.bincount(ring[keep], d[keep], nr) / np.maximum(
                np.bincount(ring[keep], minlength=nr), 1
            )
            lam = wiener * means[np.minimum(ring, nr - 1)]
            with np.errstate(invalid="ignore", divide="ignore"):
                out[g] = np.where(keep & (d + lam > 0), num[g] / (d + lam), 0)
        return out

    return _ctf_average(images, groups, n_groups, transform, source, ctf, "ctf.weight", finish)


@AVERAGERS.register(
    "ctf.auto",
    "EMAN2's ctf.auto on particles that are not phase-flipped: sum C F / sum C^2 with "
    "each member's |C| floored at 0.05 (at most 20x amplification), nothing beyond the "
    "Nyquist ring.",
)
def ctf_auto(
    images, groups, n_groups, *, transform: Transform2D | None = None, source=None, ctf=None
):
    counts = np.bincount(np.asarray(groups, np.int64), minlength=n_groups)

    def finish(num, den, n):
        ring = rfft_shell_index((n, n))
        floor = (0.05**2) * np.maximum(counts, 1)[:, None, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = num / np.maximum(den, floor)
        out[:, ring > (n - 2) // 2] = 0
        return out

    return _ctf_average(images, groups, n_groups, transform, source, ctf, "ctf.auto", finish)

"""Direct Fourier inversion: insert 2D slices into a padded 3D transform.

Each image (``n x n``, centred on ``n // 2``) is zero-padded to ``P x P`` (centre at
``P // 2``), Fourier-transformed, un-shifted and, with a CTF, multiplied by the CTF
evaluated on the padded grid (as RELION). Its
``rfft2`` half-plane ``q = (qx, qy)`` is inserted at ``v = (R S_k)^T (qx, qy, 0)`` for every
symmetry operator ``S_k`` into ``Fsum`` (complex) and ``Wsum`` (real) on the half-space
``vx >= 0`` of a ``P^3`` volume (Friedel mates are conjugated). Interpolation:

* ``trilinear`` (default): the 8 neighbours with tent weights; the finished map is
  divided by the kernel's transform ``sinc^2(x / P)`` per axis (gridding correction);
* ``gauss_2``: EMAN2's 2x2x2 Gaussian ``exp(-r^2 pi^2 / 4)``, no correction (as EMAN2);
* ``nearest_neighbor``.

Finishing: ``F = Fsum / (Wsum + lambda)``, Hermitian planes symmetrised, inverse FFT,
centred crop to ``n^3``. ``lambda = 0`` or a per-shell floor (:func:`weight_floor`) as the
caller says; the Wiener weighting of each shell by its SNR follows on the cropped map
(:func:`wiener_gain`, :func:`apply_wiener_gain`). Choice: spec ch04 §4.5 divides by
``Wsum + 1/tau^2`` voxel by voxel; that weights each voxel by its own sampling, spreads
signal beyond the box and cost 0.143 shells against relion_reconstruct (with D7 and in
C1), so the SNR scales whole shells instead (``bench/make3d_vs_relion.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numba
import numpy as np
import scipy.fft

from cryorefine import memory
from cryorefine.errors import CryorefineError
from cryorefine.fourier import _kernels
from cryorefine.fourier.ctf import CTFParams
from cryorefine.fourier.fft import fft_threads, filter_rfft, rfft_shell_index
from cryorefine.registry import RECONSTRUCTORS, Param

KERNELS = ("trilinear", "gauss_2", "nearest_neighbor")
#: the Wiener-regularised map divides by ``Wsum + WEIGHT_FLOOR * mean(Wsum in the shell)``
WEIGHT_FLOOR = 0.01


def padded_size(n: int, pad_factor: float) -> int:
    """The even padded box ``P >= n`` for ``pad_factor``."""
    size = int(round(pad_factor * n))
    size += size % 2
    if size < n:
        raise CryorefineError(f"pad factor {pad_factor} must be at least 1")
    return size


def image_slices(images: np.ndarray, size: int, shifts_px: np.ndarray | None = None) -> np.ndarray:
    """``rfft2`` of images zero-padded to ``size`` (centre to ``size // 2``), un-shifted.

    ``shifts_px`` ``(k, 2)``: each particle's centre sits at ``n // 2 + shift``; the
    transform is phase-shifted by ``-shift`` to centre it. Returns complex64
    ``(k, size, size // 2 + 1)`` with the origin at index 0.
    """
    k, n = images.shape[0], images.shape[-1]
    # zero-pad with the image centre at index 0 (ifftshift of the centred padded image)
    padded = np.zeros((k, size, size), dtype=np.float32)
    c = n // 2
    rows = (np.arange(n) - c) % size
    padded[:, rows[:, None], rows[None, :]] = images
    ft = scipy.fft.rfft2(padded, workers=fft_threads(), overwrite_x=True)
    del padded
    if shifts_px is not None:
        d = np.asarray(shifts_px, dtype=np.float64).reshape(-1, 2)
        # separable phase ramp exp(2 pi i (fx dx + fy dy)): two 1D factors per image
        ex = np.exp(2j * np.pi * scipy.fft.rfftfreq(size)[None, :] * d[:, :1]).astype(np.complex64)
        ey = np.exp(2j * np.pi * scipy.fft.fftfreq(size)[None, :] * d[:, 1:]).astype(np.complex64)
        ft *= ey[:, :, None]
        ft *= ex[:, None, :]
    return ft.astype(np.complex64, copy=False)


def half_plane(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``rfft2`` half-plane points of a ``size`` box inside the Nyquist circle.

    Returns ``(flat, qxy, mult)``: their flat indices in the ``(size, size // 2 + 1)``
    layout, their ``(qx, qy)`` frequencies in Fourier pixels, and how many points of the
    full plane each stands for (1 on the columns ``qx = 0`` and ``qx = size / 2``, else 2).
    """
    qy = scipy.fft.fftfreq(size, 1.0 / size)
    qx = np.arange(size // 2 + 1, dtype=np.float64)
    gy, gx = np.meshgrid(qy, qx, indexing="ij")
    inside = (gx * gx + gy * gy <= (size / 2) ** 2).ravel()
    mult = np.where((gx == 0) | (gx == size // 2), 1.0, 2.0).ravel()
    return np.flatnonzero(inside), np.c_[gx.ravel(), gy.ravel()][inside], mult[inside]


@dataclass
class FourierVolume:
    """Accumulators of a ``P^3`` transform: ``Fsum`` (complex) and ``Wsum`` (real).

    Half-space layout ``(P, P, P // 2 + 1)``, axes (z, y, x); z and y in FFT order, so
    index ``i`` is frequency ``i`` (``i - P`` above ``P // 2``). Kept as float32 in one
    accumulator per thread (``threads``), summed when read. With ``groups`` > 1 (the two
    half sets of a gold-standard reconstruction) the accumulators are shared out among
    the groups, each thread inserting one group's slices, so that the groups cost no
    more memory than the threads alone; read one group with ``group=g``.
    """

    size: int
    n: int
    kernel: str = "trilinear"
    threads: int = 0
    slice_size: int = 0
    groups: int = 1
    accs: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise CryorefineError(
                f"reconstructor mode '{self.kernel}': use one of {', '.join(KERNELS)}"
            )
        hx = self.size // 2 + 1
        per_thread = self.size * self.size * hx * 3 * 4
        if self.threads <= 0:  # all cores, within their memory budget
            budget = max(1, int(memory.budget("accumulators") // per_thread))
            self.threads = max(1, min(numba.get_num_threads(), budget))
        # a whole number of accumulators per group, at least one each
        self.threads = max(self.groups, self.threads - self.threads % self.groups)
        self.accs = np.zeros((self.threads, self.size, self.size, hx, 3), np.float32)
        # 2D transforms of slice_size (default: the padded size) land at q * size / slice_size
        self.slice_size = self.slice_size or self.size
        self._flat, self._qxy, self._mult = half_plane(self.slice_size)
        self._qxy = self._qxy * (self.size / self.slice_size)

    def _blocks(self, group: int | None) -> np.ndarray:
        if group is None:
            return self.accs
        per = self.threads // self.groups
        return self.accs[group * per : (group + 1) * per]

    def sums(self, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(Fsum, Wsum)``: complex64 and float32 ``(P, P, P // 2 + 1)``, of every group
        or of ``group``."""
        blocks = self._blocks(group)
        f = np.empty(blocks.shape[1:-1], np.complex64)
        w = np.empty(blocks.shape[1:-1], np.float32)
        f.real, f.imag, w[:] = blocks[0][..., 0], blocks[0][..., 1], blocks[0][..., 2]
        for b in blocks[1:]:
            f.real += b[..., 0]
            f.imag += b[..., 1]
            w += b[..., 2]
        return f, w

    def add(self, sums: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Add each group's ``(Fsum, Wsum)`` (:meth:`sums` of another volume of the same
        size and groups, e.g. a worker's share of the images) to this one."""
        if len(sums) != self.groups:
            raise ValueError(f"sums of {len(sums)} groups for a volume of {self.groups}")
        for g, (f, w) in enumerate(sums):
            block = self._blocks(g if self.groups > 1 else None)[0]
            block[..., 0] += f.real
            block[..., 1] += f.imag
            block[..., 2] += w

    def insert(
        self,
        slices: np.ndarray,
        rotations: np.ndarray,
        *,
        ops: np.ndarray,
        weights: np.ndarray,
        ctf: np.ndarray | None = None,
        groups: np.ndarray | None = None,
    ) -> None:
        """Insert ``slices`` ``(k, P, P // 2 + 1)`` at ``rotations`` ``(k, 3, 3)``.

        ``ops`` ``(K, 3, 3)`` symmetry operators; ``weights`` ``(k,)`` per slice (a
        negative weight removes a slice); ``ctf`` ``(k, P, P // 2 + 1)``: then values
        ``w C X`` and weights ``w C^2`` are accumulated; ``groups`` ``(k,)``: each
        slice's group ``0 .. groups - 1`` (all 0 by default).
        """
        k = len(slices)
        rots = np.asarray(rotations, np.float64).reshape(-1, 3, 3)
        group = np.zeros(k, np.int64) if groups is None else np.asarray(groups, np.int64)
        if group.size and not (0 <= group.min() and group.max() < self.groups):
            raise ValueError(f"slice groups must be in 0..{self.groups - 1}")
        order = np.argsort(group, kind="stable")
        ordered = bool((order == np.arange(k)).all())
        nrep = len(ops)
        # v = (R S)^T q for every slice and operator (row s of slice s // nrep)
        mats = np.swapaxes(np.einsum("kij,sjl->ksil", rots[order], ops), -1, -2).reshape(-1, 3, 3)
        c = (
            np.zeros((0, 1), np.float32)
            if ctf is None
            else np.ascontiguousarray(
                ctf.reshape(k, -1) if ordered else ctf.reshape(k, -1)[order], dtype=np.float32
            )
        )
        # each group's rows of `mats`, shared out evenly among its accumulators
        per = self.threads // self.groups
        ends = np.cumsum(np.bincount(group, minlength=self.groups)) * nrep
        starts = np.r_[0, ends[:-1]]
        bounds = np.concatenate(
            [
                np.linspace(a, b, per + 1).round().astype(np.int64)[:-1]
                for a, b in zip(starts, ends, strict=True)
            ]
            + [np.array([k * nrep], np.int64)]
        )
        _kernels.insert_slices(
            self.accs,
            nrep,
            np.ascontiguousarray(
                slices.reshape(k, -1) if ordered else slices.reshape(k, -1)[order], np.complex64
            ),
            c,
            np.asarray(weights, np.float64)[order],
            self._flat,
            self._mult,
            np.ascontiguousarray(mats),
            self._qxy[:, 0].copy(),
            self._qxy[:, 1].copy(),
            self.size,
            _MODES[self.kernel],
            bounds,
        )

    def compare(
        self,
        slices: np.ndarray,
        rotations: np.ndarray,
        *,
        ops: np.ndarray,
        ctf: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """EMAN2's agreement of each slice with the current volume (mean over operators).

        Returns ``(absqual, scale)``: the weighted Fourier correlation in [-1, 1] and
        ``sqrt(power_volume / power_slice)``, the factor matching the slice to the volume.
        """
        f, w = self.symmetrised()
        k = len(slices)
        vals = np.ascontiguousarray(slices.reshape(k, -1)[:, self._flat], np.complex128)
        c = (
            np.ones(vals.shape)
            if ctf is None
            else np.ascontiguousarray(ctf.reshape(k, -1)[:, self._flat], np.float64)
        )
        mats = np.swapaxes(
            np.einsum("kij,sjl->ksil", np.asarray(rotations, np.float64), ops), -1, -2
        )
        nops = len(ops)
        out = np.zeros((k * nops, 3))
        _kernels.compare_slices(
            f,
            w,
            np.repeat(vals, nops, axis=0),
            np.repeat(c, nops, axis=0),
            np.ascontiguousarray(mats.reshape(-1, 3, 3)),
            self._qxy[:, 0].copy(),
            self._qxy[:, 1].copy(),
            self.size,
            out,
        )
        dot, p1, p2 = out.reshape(k, nops, 3).sum(axis=1).T
        with np.errstate(invalid="ignore", divide="ignore"):
            qual = np.where(p1 * p2 > 0, dot / np.sqrt(p1 * p2), 0.0)
            scale = np.where(p2 > 0, np.sqrt(p1 / p2), 1.0)
        return qual, scale

    # --- finishing -------------------------------------------------------------------
    def _complete_planes(self, a: np.ndarray) -> np.ndarray:
        """Add to the planes ``x = 0`` and ``x = P/2`` of ``a`` their Hermitian mates
        (conjugated for complex ``a``), in place; returns ``a``."""
        for x in (0, self.size // 2):
            plane = a[:, :, x].copy()
            a[:, :, x] = plane + np.conj(np.roll(plane[::-1, ::-1], 1, axis=(0, 1)))
        return a

    def symmetrised_weights(self, group: int | None = None) -> np.ndarray:
        """``wsum`` alone, with the Hermitian planes completed (as :meth:`symmetrised`)."""
        blocks = self._blocks(group)
        w = np.ascontiguousarray(blocks[0][..., 2])
        for b in blocks[1:]:
            w += b[..., 2]
        return self._complete_planes(w)

    def symmetrised(self, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``fsum, wsum`` with the Hermitian planes ``x = 0`` and ``x = P/2`` completed."""
        f, w = self.sums(group)
        return self._complete_planes(f), self._complete_planes(w)

    def finish(
        self, regularisation: np.ndarray | float = 0.0, *, group: int | None = None
    ) -> np.ndarray:
        """The map ``(n, n, n)`` float32: ``Fsum / (Wsum + lambda)``, inverse FFT, crop.

        ``regularisation`` is a constant or a per-shell array (index = shell radius in
        voxels of the ``P^3`` grid); ``group``: of one group's slices only.
        """
        f, w = self.symmetrised(group)
        floor = np.float32(1e-12 * max(float(w.max()), 1e-30))
        if np.ndim(regularisation):
            shell = np.minimum(_shell_index(self.size), len(regularisation) - 1)
            w += np.asarray(regularisation, np.float32)[shell]
        else:
            w += np.float32(regularisation)
        small = w <= floor
        w[small] = 1.0
        f /= w  # in place: complex64 by float32
        f[small] = 0
        del w, small
        vol = scipy.fft.irfftn(f, s=(self.size,) * 3, workers=fft_threads())
        # centred crop of the fftshifted map, taken directly from the unshifted one
        c = np.arange(self.n) - self.n // 2
        idx = c % self.size
        vol = vol[np.ix_(idx, idx, idx)]
        if self.kernel == "trilinear":
            s2 = (np.sinc(c / self.size) ** 2).astype(np.float32)
            vol /= s2[:, None, None] * s2[None, :, None] * s2[None, None, :]
        return np.ascontiguousarray(vol, dtype=np.float32)


_MODES = {
    "trilinear": _kernels.TRILINEAR,
    "gauss_2": _kernels.GAUSS_2,
    "nearest_neighbor": _kernels.NEAREST,
}


def _shell_index(size: int) -> np.ndarray:
    """Radius (rounded, in voxels) of each element of the half-space ``(P, P, P/2+1)``
    grid, int16 (the radius stays below ``P``), built a plane at a time."""
    f = scipy.fft.fftfreq(size, 1.0 / size).astype(np.float32)
    fx = np.arange(size // 2 + 1, dtype=np.float32)
    plane = f[:, None] ** 2 + fx[None, :] ** 2
    out = np.empty((size, size, size // 2 + 1), np.int16)
    for z in range(size):
        out[z] = np.rint(np.sqrt(plane + f[z] ** 2))
    return out


def backproject(
    images: np.ndarray,
    rotations: np.ndarray,
    *,
    shifts_px: np.ndarray | None = None,
    ctf: CTFParams | None = None,
    apix: float | None = None,
    weights: np.ndarray | None = None,
    ops: np.ndarray | None = None,
    pad_factor: float = 2.0,
    kernel: str = "trilinear",
    chunk: int = 64,
    oversample_2d: bool = True,
    volume: FourierVolume | None = None,
) -> FourierVolume:
    """Insert images ``(k, n, n)`` into a (new or given) :class:`FourierVolume`.

    ``rotations`` as for projection (``geometry.euler``); ``shifts_px`` the particles'
    offsets (RELION origin = ``-shift``); ``ctf`` and ``apix`` for CTF-weighted
    insertion; ``weights`` per image (default 1); ``ops`` symmetry operators (default
    the identity).
    """
    n = images.shape[-1]
    if volume is None:
        size = padded_size(n, pad_factor)
        volume = FourierVolume(size, n, kernel, slice_size=size if oversample_2d else n)
    vol = volume
    ops = np.eye(3)[None] if ops is None else np.asarray(ops, dtype=np.float64)
    k = len(images)
    weights = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    rotations = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    for start in range(0, k, chunk):
        sl = slice(start, min(start + chunk, k))
        slices = image_slices(
            images[sl], vol.slice_size, None if shifts_px is None else shifts_px[sl]
        )
        c = None
        if ctf is not None:
            if not apix:
                raise CryorefineError("CTF-weighted insertion needs the pixel size")
            c = ctf.take(np.arange(sl.start, sl.stop)).evaluate(vol.slice_size, apix)
        vol.insert(slices, rotations[sl], ops=ops, weights=weights[sl], ctf=c)
    return vol


def sphere_mask(n: int, *, edge_px: float = 4.0) -> np.ndarray:
    """``(n, n, n)`` soft sphere: 1 within ``n / 2 - edge``, cosine fall-off to 0 at ``n / 2``.

    Reconstruction noise fills the whole box; the particle sits inside the inscribed
    sphere, so the corners hold only noise (RELION damps them likewise).
    """
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    inner = n / 2 - edge_px
    ramp = 0.5 + 0.5 * np.cos(np.pi * np.clip((r - inner) / edge_px, 0, 1))
    return np.where(r <= inner, 1.0, ramp).astype(np.float32)


def weight_floor(volume: FourierVolume, *, group: int | None = None) -> np.ndarray:
    """Per-shell ``lambda`` for :meth:`FourierVolume.finish`: ``WEIGHT_FLOOR`` times the
    shell's mean ``Wsum`` (of ``group``'s slices, or all), indexed by shell radius on the
    padded grid.

    It leaves alone the voxels the data sample (the shell's SNR is applied after the
    crop, :func:`wiener_gain`) and quiets those few sample thinly (at the edge of the
    slices' Nyquist circle), where dividing by ``Wsum`` alone amplifies the noise.
    """
    size = volume.size
    w = volume.symmetrised_weights(group)
    shell = np.minimum(_shell_index(size), size // 2)
    counts = np.bincount(shell.ravel(), minlength=size // 2 + 1)
    mean_w = np.bincount(shell.ravel(), w.ravel(), size // 2 + 1) / np.maximum(counts, 1)
    return WEIGHT_FLOOR * mean_w


def wiener_gain(half_fsc: np.ndarray, *, half: bool = False) -> np.ndarray:
    """Per-shell Wiener gain ``SSNR / (1 + SSNR)`` of a map, from its half maps' FSC.

    The full set's FSC ``2 FSC / (1 + FSC)`` (``half``: for one half alone, the half-map
    FSC itself) gives ``SSNR = FSC / (1 - FSC)`` (RELION's SSNR from the FSC), so the gain
    is that FSC, smoothed over 5 shells and clipped to [0.02, 0.999]. Indexed like
    ``half_fsc``.

    The gain multiplies whole shells of the cropped map (:func:`apply_wiener_gain`), so it
    leaves its FSC against the truth as it is and only weights the shells by their SNR.
    Dividing by ``Wsum + mean(Wsum) / SSNR`` voxel by voxel before the crop instead (the
    form of RELION's regularised reconstruction) costs resolution: where the SNR is low it
    weights each voxel by its own ``Wsum``, a rough pattern across the shell that spreads
    the signal outside the box, and the crop cuts it off. On D7 data from relion_project
    it moved the FSC(map, truth) 0.143 point from 12.4 to 14.7 Å
    (bench/make3d_vs_relion.py).
    """
    # a running mean over 5 shells: where the FSC is near zero its noise alone would
    # swing the gain from one shell to the next
    h = np.asarray(half_fsc, dtype=np.float64)
    padded = np.r_[h[:1], h[:1], h, h[-1:], h[-1:]]
    h = np.r_[h[:2], np.convolve(padded, np.ones(5) / 5, mode="valid")[2:]]
    return np.clip(h if half else 2 * h / (1 + h), 0.02, 0.999)


def apply_wiener_gain(volume: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """``volume`` ``(n, n, n)`` with each Fourier shell multiplied by ``gain[shell]``."""
    shell = np.minimum(rfft_shell_index(volume.shape), len(gain) - 1)
    return filter_rfft(volume, gain[shell].astype(np.float32), 3)


def _check_mode(params: dict, where: str) -> None:
    if params["mode"] not in KERNELS:
        raise CryorefineError(
            f"{where}: mode '{params['mode']}' is not one of {', '.join(KERNELS)}"
        )


_MODE = (
    Param(
        "mode", str, "interpolation: trilinear, gauss_2 or nearest_neighbor", default="trilinear"
    ),
)


def _fourier_volume(
    size: int, n: int, *, mode: str = "trilinear", slice_size: int = 0, groups: int = 1
) -> FourierVolume:
    return FourierVolume(size, n, mode, slice_size=slice_size, groups=groups)


RECONSTRUCTORS.register(
    "fourier",
    "Direct Fourier inversion: slices inserted into a padded 3D transform and divided "
    "by the summed weights (CTF^2 with CTF); trilinear with sinc^2 gridding correction "
    "by default, or EMAN2's gauss_2 kernel. Wiener-filtered (unless --no-wiener): the "
    "two half sets (rlnRandomSubset, else alternate particles) are reconstructed apart, "
    "their FSC gives the spectral SNR, and each shell of the map is weighted by "
    "SSNR / (1 + SSNR).",
    _MODE,
    check=_check_mode,
)(_fourier_volume)
RECONSTRUCTORS.register(
    "wiener_fourier",
    "As fourier, Wiener-filtered even with --no-wiener: the two half sets "
    "(rlnRandomSubset, or alternate particles when the stack has none) are reconstructed "
    "apart and each shell of the map is weighted by SSNR / (1 + SSNR), SSNR from their "
    "FSC.",
    _MODE,
    check=_check_mode,
)(_fourier_volume)

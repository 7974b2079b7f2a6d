"""Synthetic maps and particle images for tests, the demo and benchmarks."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.ndimage
from scipy.spatial.transform import Rotation

from cryorefine.fourier.ctf import CTFParams, apply_ctf
from cryorefine.fourier.fft import rfft_shell_index
from cryorefine.fourier.project import project
from cryorefine.geometry.symmetry import symmetry_group
from cryorefine.io.maps import Map, read_map, write_map
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.mrc import write_mrc
from cryorefine.io.stacks import ParticleStack
from cryorefine.io.star import write_particle_star
from cryorefine.stages.classify import ClassMx, assigned_poses


def demo_map() -> Map:
    """The bundled RNA polymerase II density, 64^3 at 3.0 Å/px."""
    with resources.as_file(resources.files("cryorefine") / "data" / "rnapol2_64.mrc") as p:
        return read_map(p)


def pseudo_atomic_map(
    n: int,
    *,
    apix: float,
    diameter_a: float,
    rng: np.random.Generator,
    atoms_per_nm3: float = 20.0,
) -> np.ndarray:
    """A protein-like ``(n, n, n)`` float32 map unlike the bundled one: Gaussian
    "atoms" (sigma 1 Å, at least half a pixel) filling three overlapping ellipsoidal
    domains within ``diameter_a`` Å of the centre, at ``atoms_per_nm3`` per nm^3 (a
    protein's heavy atoms: about 50), band-limited to Nyquist (``apix`` Å/px).
    """
    radius = diameter_a / 2.0
    domains = []
    for _ in range(3):
        axes = radius * rng.uniform(0.35, 0.55, 3)
        centre = rng.normal(size=3)
        centre *= (radius - axes.max()) * rng.uniform(0.3, 1.0) / np.linalg.norm(centre)
        domains.append((centre, axes, Rotation.random(random_state=rng).as_matrix()))
    volume_a3 = sum(4.0 / 3.0 * np.pi * np.prod(a) for _, a, _ in domains)
    count = int(atoms_per_nm3 * volume_a3 / 1000.0)
    points = []
    for centre, axes, rot in domains:
        k = int(count * np.prod(axes) / sum(np.prod(a) for _, a, _ in domains))
        u = rng.normal(size=(k, 3))
        u *= (rng.uniform(size=(k, 1)) ** (1 / 3)) / np.linalg.norm(u, axis=1, keepdims=True)
        points.append(centre + (u * axes) @ rot.T)
    xyz = np.concatenate(points) / apix + n // 2  # (x, y, z) in pixels
    grid = np.zeros((n, n, n), np.float64)
    idx = np.clip(np.rint(xyz).astype(np.int64), 0, n - 1)
    np.add.at(grid, (idx[:, 2], idx[:, 1], idx[:, 0]), 1.0)
    sigma_cpp = 1.0 / (2 * np.pi * max(1.0 / apix, 0.5))  # Gaussian atom of sigma 1 Å
    k = np.sqrt(sum(f * f for f in np.meshgrid(*_fft_axes(n), indexing="ij", sparse=True)))
    gain = np.exp(-(k * k) / (2 * sigma_cpp**2)) * (k <= 0.5)
    out = scipy.fft.irfftn(scipy.fft.rfftn(grid) * gain, s=grid.shape)
    return out.astype(np.float32)


def _fft_axes(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = scipy.fft.fftfreq(n)
    return f, f, scipy.fft.rfftfreq(n)


def solid_sphere(
    n: int,
    radius_px: float,
    *,
    value: float = 1.0,
    centre: tuple[float, float, float] | None = None,
) -> np.ndarray:
    """``(n, n, n)`` float32: ``value`` inside ``radius_px`` of ``centre`` (default the
    box centre, ``(z, y, x)`` in pixels), 0 outside."""
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij", sparse=True)
    cz, cy, cx = (0.0, 0.0, 0.0) if centre is None else centre
    r2 = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2
    return np.where(r2 <= radius_px**2, value, 0.0).astype(np.float32)


def symmetrised(volume: np.ndarray, sym: str, *, order: int = 3) -> np.ndarray:
    """``volume`` ``(n, n, n)`` averaged over the operators of ``sym`` about voxel
    ``n // 2`` (spline interpolation of ``order``): a map with that symmetry, float32."""
    n = volume.shape[0]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    xyz = np.stack([x.ravel(), y.ravel(), z.ravel()]).astype(np.float64)
    ops = symmetry_group(sym).operators
    out = np.zeros(volume.size)
    for op in ops:  # the map turned by op samples the input at op^T r
        sx, sy, sz = op.T @ xyz + n // 2
        out += scipy.ndimage.map_coordinates(volume, [sz, sy, sx], order=order, mode="constant")
    return (out / len(ops)).reshape(volume.shape).astype(np.float32)


def uniform_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n, 3, 3)`` rotations uniform on SO(3)."""
    return Rotation.random(n, random_state=rng).as_matrix()


def simulate_metadata(
    n: int,
    *,
    apix: float,
    rng: np.random.Generator,
    rotations: np.ndarray | None = None,
    max_shift_a: float = 0.0,
    defocus_range_um: tuple[float, float] | None = (1.0, 2.5),
    astigmatism_um: float = 0.05,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
) -> ParticleMetadata:
    """Ground-truth metadata for ``n`` simulated particles.

    Orientations uniform on SO(3) unless given; shifts uniform in a disc of radius
    ``max_shift_a`` Å; mean defocus uniform in ``defocus_range_um`` (µm, None: no CTF)
    with astigmatism ``U - V`` uniform in ``[0, astigmatism_um]`` at a random angle;
    half sets 1 and 2 at random, balanced.
    """
    meta = ParticleMetadata.empty(n, apix=apix)
    meta.rotations = uniform_rotations(n, rng) if rotations is None else np.asarray(rotations)
    radius = max_shift_a * np.sqrt(rng.uniform(0, 1, n))
    angle = rng.uniform(0, 2 * np.pi, n)
    meta.shift_a = np.c_[radius * np.cos(angle), radius * np.sin(angle)]
    if defocus_range_um is not None:
        mean = rng.uniform(*defocus_range_um, n) * 1e4
        half = rng.uniform(0, astigmatism_um, n) * 1e4 / 2
        meta.ctf = CTFParams(
            mean + half,
            mean - half,
            rng.uniform(-90, 90, n),
            voltage_kv,
            cs_mm,
            amplitude_contrast,
            0.0,
            0.0,
            1.0,
        )
    meta.half_set = rng.permutation(np.arange(n) % 2) + 1
    return meta


def render_particles(
    volume: np.ndarray,
    meta: ParticleMetadata,
    indices: np.ndarray,
    *,
    noise_sigma: float,
    rng: np.random.Generator,
    projector: str = "fourier",
) -> np.ndarray:
    """Images of the particles ``indices``: projection, shift, CTF, white noise.

    The CTF acts on the projection padded to twice the box and the result is cropped,
    as in a micrograph: signal the CTF delocalises past the box edge is lost rather
    than wrapped around.
    """
    sub = meta.take(indices)
    clean = project(
        volume, sub.rotations, projector=projector, shifts_px=sub.shift_a / sub.apix[:, None]
    )
    if sub.ctf.known.all():
        n = clean.shape[-1]
        o = n - n // 2  # centre n // 2 -> n in the 2n box
        padded = np.zeros((len(clean), 2 * n, 2 * n), dtype=np.float32)
        padded[:, o : o + n, o : o + n] = clean
        padded = apply_ctf(padded, sub.ctf.evaluate(2 * n, sub.apix))
        clean = padded[:, o : o + n, o : o + n]
    return (clean + noise_sigma * rng.standard_normal(clean.shape)).astype(np.float32)


def noise_sigma_for_snr(
    volume: np.ndarray,
    meta: ParticleMetadata,
    snr: float,
    *,
    rng: np.random.Generator,
    pilot: int = 200,
    projector: str = "fourier",
) -> float:
    """Noise standard deviation giving ``snr`` = mean signal variance / noise variance.

    The signal variance (inside the box, after CTF) is averaged over up to ``pilot``
    particles.
    """
    if snr <= 0:
        raise ValueError("snr must be positive")
    idx = np.arange(min(pilot, len(meta)))
    clean = render_particles(volume, meta, idx, noise_sigma=0.0, rng=rng, projector=projector)
    return float(np.sqrt(clean.var(axis=(1, 2)).mean() / snr))


def simulate_particles(
    volume: np.ndarray,
    n: int,
    *,
    apix: float,
    snr: float,
    rng: np.random.Generator,
    chunk: int = 1000,
    projector: str = "fourier",
    **kw,
) -> ParticleStack:
    """An in-memory stack of ``n`` simulated particles with their true metadata.

    ``kw`` goes to :func:`simulate_metadata` (rotations, max_shift_a, defocus_range_um,
    astigmatism_um, voltage_kv, cs_mm, amplitude_contrast).
    """
    meta = simulate_metadata(n, apix=apix, rng=rng, **kw)
    sigma = noise_sigma_for_snr(volume, meta, snr, rng=rng, projector=projector)
    box = volume.shape[-1]
    images = np.empty((n, box, box), dtype=np.float32)
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        images[idx] = render_particles(
            volume, meta, idx, noise_sigma=sigma, rng=rng, projector=projector
        )
    return ParticleStack.from_arrays(images, apix=apix, meta=meta)


def relion_project_particles(
    truth: np.ndarray, *, apix: float, n: int, snr: float, seed: int
) -> Path:
    """``n`` particles of ``truth`` made by ``relion_project`` in the working directory.

    Poses uniform on SO(3), shifts up to 3 px, CTF (defocus 1-2.5 µm), no half sets
    (:func:`simulate_metadata`); ``relion_project --ctf --add_noise --white_noise`` with
    the noise set for ``snr`` (:func:`noise_sigma_for_snr`). Writes ``truth.mrc``,
    ``poses.star`` and ``proj.star``/``proj.mrcs``; returns ``proj.star``.
    """
    box = truth.shape[0]
    rng = np.random.default_rng(seed)
    meta = simulate_metadata(n, apix=apix, rng=rng, max_shift_a=3 * apix)
    meta.half_set[:] = 0  # no half sets: each program regularises by itself
    sigma = noise_sigma_for_snr(truth, meta, snr, rng=rng)
    write_map("truth.mrc", Map(truth, apix))
    write_mrc("dummy.mrcs", np.zeros((n, box, box), np.float32), apix=apix, stack=True)
    write_particle_star("poses.star", meta, [f"{i + 1:06d}@dummy.mrcs" for i in range(n)], box)
    cmd = ["relion_project", "--i", "truth.mrc", "--o", "proj", "--ang", "poses.star"]
    cmd += ["--ctf", "--angpix", str(apix), "--add_noise", "--white_noise", f"{sigma:.6g}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=1200)
    return Path("proj.star")


def relion_reconstruct_map(star: str | Path, *, apix: float, sym: str = "c1") -> np.ndarray:
    """``relion_reconstruct --ctf --sym SYM`` of ``star`` (written to ``relion.mrc``)."""
    cmd = ["relion_reconstruct", "--i", str(star), "--o", "relion.mrc", "--ctf"]
    cmd += ["--angpix", str(apix), "--sym", sym.upper()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=1200)
    return read_map("relion.mrc").data


def assignment_errors(
    cm: ClassMx,
    ref_rotations: np.ndarray,
    truth: ParticleMetadata,
    *,
    sym: str = "c1",
    choice: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """How far each particle's assigned pose lies from its true one.

    ``cm``: the classification; ``ref_rotations`` ``(Nc, 3, 3)``: the projections'
    orientations; ``truth``: the particles' simulated metadata (rotations, ``shift_a``,
    ``apix``). Returns the orientation error in degrees (the smallest over the
    symmetry's operators) and the shift error in pixels, both ``(Np,)``.
    """
    rotations, shifts_px = assigned_poses(cm, ref_rotations, choice=choice)
    angle_deg = symmetry_group(sym).angle_between(rotations, truth.rotations)
    apix = np.asarray(truth.apix, np.float64).reshape(-1, 1)
    shift_px = np.linalg.norm(shifts_px - truth.shift_a / apix, axis=1)
    return angle_deg, shift_px


def outer_shell_amplitude(volume: np.ndarray) -> float:
    """RMS Fourier amplitude of a map's outermost full shell (radius ``n // 2 - 1``
    voxels): where noise amplified by thin reconstruction weights shows first."""
    volume = np.asarray(volume, np.float64)
    outer = rfft_shell_index(volume.shape) == volume.shape[0] // 2 - 1
    return float(np.sqrt(np.mean(np.abs(scipy.fft.rfftn(volume)[outer]) ** 2)))


# --- measuring a command's time and memory (tests and benchmarks) ---------------------

# a small parent process that runs the command and reports the child's peak RSS (a
# process forked from a large one would inherit that one's peak)
_CHILD_RSS = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, capture_output=True)
wall = time.perf_counter() - t0
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""

# what a make3d process holds before any data: its imports, a STAR file's metadata and
# the compiled kernels, loaded by a reconstruction of 4 of its images cut to 16 px
_BEFORE_DATA = """
import sys
import numpy as np
from cryorefine.config import Make3dConfig
from cryorefine.io.stacks import ParticleStack
from cryorefine.stages.make3d import make3d
stack = ParticleStack.from_path(sys.argv[1]).take(np.arange(4))
c = stack.box // 2
tiny = stack.read()[:, c - 8 : c + 8, c - 8 : c + 8]
make3d(ParticleStack.from_arrays(tiny, apix=stack.apix, meta=stack.meta), Make3dConfig())
"""


def measure_command(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak resident memory (MiB) of ``cmd`` run in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD_RSS, *map(str, cmd)],
        check=True,
        capture_output=True,
        text=True,
    )
    wall, rss = out.stdout.split()
    return float(wall), float(rss)


def make3d_memory_before_data(star: str | Path) -> float:
    """Peak resident memory (MiB) of a process that imports what ``cryorefine make3d``
    imports, reads ``star``'s metadata and loads the compiled kernels: what it holds
    before it holds any data."""
    return measure_command([sys.executable, "-c", _BEFORE_DATA, str(star)])[1]


def refine_command(folder: Path, path: Path, *options: str) -> list[str]:
    """``cryorefine refine`` in a fresh Python process on ``folder``'s particles.star and
    start.mrc, writing into ``path``, with more ``options``."""
    return [
        sys.executable,
        "-m",
        "cryorefine",
        "refine",
        "--input",
        str(Path(folder) / "particles.star"),
        "--model",
        str(Path(folder) / "start.mrc"),
        "--path",
        str(path),
        *map(str, options),
    ]


@dataclass(frozen=True)
class DataSet:
    """A simulated data set for checking a refinement against the truth: the map
    (``rnapol2``: the bundled map, relabelled to ``apix``; ``synthetic``:
    :func:`pseudo_atomic_map` of ``diameter_a`` Å in a ``box``), the SNR, and the low-pass
    resolution (Å) of the starting map."""

    map: str
    apix: float
    snr: float
    start_a: float
    diameter_a: float = 0.0
    box: int = 64

    def truth(self) -> Map:
        if self.map == "rnapol2":
            return Map(demo_map().data, self.apix)
        rng = np.random.default_rng(7)
        volume = pseudo_atomic_map(self.box, apix=self.apix, diameter_a=self.diameter_a, rng=rng)
        return Map(volume, self.apix)


#: data sets that differ in map, pixel size, particle size in the box and SNR
#: (``bench/resolution.py`` and the slow tests)
RESOLUTION_SETS = {
    "rnapol2_3A_snr0.1": DataSet("rnapol2", 3.0, 0.1, 40.0),
    "rnapol2_5A_snr0.1": DataSet("rnapol2", 5.0, 0.1, 40.0),
    "synthetic_4.5A_snr0.05": DataSet("synthetic", 4.5, 0.05, 40.0, diameter_a=160.0),
    "synthetic_3A_snr0.3": DataSet("synthetic", 3.0, 0.3, 30.0, diameter_a=120.0),
    "rnapol2_6A_snr0.3": DataSet("rnapol2", 6.0, 0.3, 50.0),
}
#: the refinement options of those checks (a quick search: shifts are at most 3 px)
RESOLUTION_OPTIONS = ("--twostage", "2", "--simalign", "rotate_translate_flip:maxshift=4")


def simulate_data_set(folder: Path, ds: DataSet, n: int) -> None:
    """``n`` particles of ``ds`` (:func:`write_simulated_set`)."""
    write_simulated_set(folder, ds.truth(), n, snr=ds.snr, start_a=ds.start_a)


def write_simulated_set(folder: Path, truth: Map, n: int, *, snr: float, start_a: float) -> None:
    """``n`` particles of ``truth`` (CTF defocus 1-2.5 um, shifts up to 3 px, at ``snr``)
    written to ``folder``/particles.star + .mrcs, with start.mrc (the truth low-passed to
    ``start_a`` Å) and truth.mrc."""
    from cryorefine.fourier.filters import lowpass_gauss
    from cryorefine.io.maps import write_map
    from cryorefine.io.stacks import write_stack

    sim = simulate_particles(
        truth.data,
        n,
        apix=truth.apix,
        snr=snr,
        rng=np.random.default_rng(2026),
        max_shift_a=3.0 * truth.apix,
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_stack(sim, folder / "particles.star", overwrite=True)
    start = lowpass_gauss(truth.data, truth.apix / start_a, 3).astype(np.float32)
    write_map(folder / "start.mrc", Map(start, truth.apix), overwrite=True)
    write_map(folder / "truth.mrc", truth, overwrite=True)


def particle_fraction(truth: np.ndarray, apix: float) -> float:
    """The particle's diameter over the box: twice the 99th percentile of the distance
    from the centre of the truth's 15 Å-low-passed density above a fifth of its maximum."""
    from cryorefine.fourier.filters import lowpass_gauss

    low = lowpass_gauss(truth, min(0.5, apix / 15.0), 3)
    n = truth.shape[-1]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij", sparse=True)
    r = np.broadcast_to(np.sqrt(x * x + y * y + z * z), low.shape)[low > 0.2 * low.max()]
    return float(2 * np.percentile(r, 99) / n)

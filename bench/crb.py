"""The floor of orientation accuracy: the Cramér–Rao bound of a particle's pose.

usage: python bench/crb.py [--particles 300] [--snr 0.1,0.3,1] [--map128 PATH]

For a particle ``X = CTF * P(R, s) + N`` with white Gaussian noise of the variance that
gives the data set its SNR (``testing.noise_sigma_for_snr``: mean signal variance over
noise variance, in the box, after the CTF), the Fisher information of its five pose
parameters (small rotations about x, y and z of the viewing frame, the shifts x and y)
is ``I = J^T J / sigma^2``, ``J`` the derivatives of the noise-free image, taken here by
central differences of rendered particles (0.05 degrees, 0.05 px). Any unbiased
estimate of the rotation, knowing the true map and CTF, has a covariance of at least the
rotation block of ``I^-1``; the script reports, over ``--particles`` particles in
random orientations with CTF (1-2.5 um), the median of ``sqrt(trace)`` of that block
(the RMS angle of the bound, in degrees) and, for a Gaussian error of that covariance,
the median angle (Monte Carlo). Data sets: rnapol2_64 at 3 Å/px (the bundled map) and
rnapol2_128 at 1.5 Å/px.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cryorefine.align.local import perturbed
from cryorefine.io.maps import read_map
from cryorefine.testing import demo_map, noise_sigma_for_snr, render_particles, simulate_metadata

EPS_DEG, EPS_PX = 0.05, 0.05


def pose_bound(volume: np.ndarray, apix: float, snr: float, count: int, seed: int) -> dict:
    """Median RMS and median angle (degrees) of the rotation bound over ``count``
    particles, and the median shift bound (px)."""
    rng = np.random.default_rng(seed)
    meta = simulate_metadata(count, apix=apix, rng=rng, max_shift_a=0.0)
    sigma = noise_sigma_for_snr(volume, meta, snr, rng=rng)
    idx = np.arange(count)
    columns = []
    for k in range(3):
        w = np.zeros(3)
        w[k] = np.deg2rad(EPS_DEG)
        images = []
        for sign in (1, -1):
            m = meta.take(idx)
            m.rotations = perturbed(meta.rotations, (sign * w)[None])[:, 0]
            images.append(render_particles(volume, m, idx, noise_sigma=0.0, rng=rng))
        columns.append((images[0] - images[1]) / (2 * EPS_DEG))  # per degree
    for k in range(2):
        images = []
        for sign in (1, -1):
            m = meta.take(idx)
            m.shift_a = meta.shift_a.copy()
            m.shift_a[:, k] += sign * EPS_PX * apix
            images.append(render_particles(volume, m, idx, noise_sigma=0.0, rng=rng))
        columns.append((images[0] - images[1]) / (2 * EPS_PX))  # per px
    jac = np.stack([c.reshape(count, -1) for c in columns], axis=2).astype(np.float64)
    fisher = np.einsum("kpi,kpj->kij", jac, jac) / sigma**2
    cov = np.linalg.inv(fisher)
    rot = cov[:, :3, :3]
    rms = np.sqrt(np.trace(rot, axis1=1, axis2=2))
    chol = np.linalg.cholesky(rot)
    draws = np.einsum("kij,kdj->kdi", chol, rng.standard_normal((count, 200, 3)))
    angle = np.linalg.norm(draws, axis=2)
    shift = np.sqrt(np.trace(cov[:, 3:, 3:], axis1=1, axis2=2))
    return {
        "rms_deg": float(np.median(rms)),
        "median_angle_deg": float(np.median(angle)),
        "shift_px": float(np.median(shift)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--particles", type=int, default=300)
    ap.add_argument("--snr", default="0.05,0.1,0.3,1")
    ap.add_argument(
        "--map128", default=str(Path(__file__).parents[2] / "shared/data/rnapol2_128.mrc")
    )
    args = ap.parse_args()
    sets = [("rnapol2_64, 3 Å/px", demo_map())]
    if Path(args.map128).is_file():
        sets.append(("rnapol2_128, 1.5 Å/px", read_map(Path(args.map128))))
    print("| data | SNR | rotation bound, RMS (°) | median angle (°) | shift bound (px) |")
    print("|---|---|---|---|---|")
    for name, m in sets:
        for snr in (float(x) for x in args.snr.split(",")):
            b = pose_bound(np.asarray(m.data, np.float32), m.apix, snr, args.particles, seed=1)
            print(
                f"| {name} | {snr:g} | {b['rms_deg']:.3f} | {b['median_angle_deg']:.3f} | "
                f"{b['shift_px']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""Benchmark: is the reported resolution true? Refinements of simulated data sets that
differ in map, pixel size, particle size in the box and SNR, each compared with the
truth (the sets of ``cryorefine.testing.RESOLUTION_SETS``, also the slow tests').

usage: python bench/resolution.py [--sets a,b,...] [--n 1500] [--iter 3]
                                  [--work DIR] [--extra "..."] [--masks]

For each data set: simulates --n particles (CTF defocus 1-2.5 um, shifts up to 3 px),
starts from the truth low-passed to the set's start resolution, runs ``cryorefine
refine`` (fresh process) with ``--iter --seed 1`` and the set's options plus --extra,
and compares the reported resolution (the noise-substitution corrected masked half-map
FSC at 0.143) with the resolution where FSC(map, truth) crosses 0.5 under the run's own
FSC mask (what the reported figure describes) and unmasked. Results go to
DIR/results.json and a table on stdout.

``--masks`` (after the runs exist): the corrected and uncorrected masked FSC of each
set's last half maps under FSC masks of several extensions and soft edges (Å), against
the same truth figures; how the default mask was chosen.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cryorefine.cli import set_thread_spin
from cryorefine.fourier.fsc import fsc, noise_substituted_fsc, resolution_at
from cryorefine.io.maps import read_map
from cryorefine.refine.step import fsc_mask
from cryorefine.testing import (
    RESOLUTION_OPTIONS,
    RESOLUTION_SETS,
    DataSet,
    measure_command,
    particle_fraction,
    refine_command,
    simulate_data_set,
)


def against_truth(volume: np.ndarray, truth: np.ndarray, apix: float, mask=None) -> float:
    """Where FSC(volume, truth) crosses 0.5 (Å), under ``mask`` if given."""
    if mask is not None:
        volume, truth = volume * mask, truth * mask
    return resolution_at(fsc(volume, truth), threshold=0.5, apix=apix)


def run_set(work: Path, name: str, ds: DataSet, args) -> dict:
    if not (work / "particles.star").is_file():
        simulate_data_set(work, ds, args.n)
    path = work / "run"
    if not (path / "0_refine_parms.json").is_file():
        path.mkdir(exist_ok=True)
        cmd = refine_command(
            work, path, "--iter", args.iter, "--seed", 1, *RESOLUTION_OPTIONS, *args.extra
        )
        wall, rss = measure_command(cmd)
    else:
        wall = rss = float("nan")
    record = json.loads((path / "0_refine_parms.json").read_text())
    last = record["iterations"][-1]
    k = f"{last['iteration']:02d}"
    truth = read_map(work / "truth.mrc").data
    volume = read_map(path / f"threed_{k}.mrc").data
    mask = read_map(path / f"fsc_mask_{k}.mrc").data
    row = {
        "set": name,
        "apix": ds.apix,
        "snr": ds.snr,
        "particle_over_box": round(particle_fraction(truth, ds.apix), 2),
        "truth_0.5_A": against_truth(volume, truth, ds.apix),
        "truth_masked_0.5_A": against_truth(volume, truth, ds.apix, mask),
        "reported_A": last["resolution"],
        "unmasked_A": last.get("resolution_unmasked"),
        "masked_A": last.get("resolution_masked"),
        "wall_s": wall,
        "peak_rss_mib": rss,
    }
    row["reported_over_truth_masked"] = row["reported_A"] / row["truth_masked_0.5_A"]
    row["reported_over_truth"] = row["reported_A"] / row["truth_0.5_A"]
    return row


def mask_grid(work: Path, ds: DataSet) -> list[dict]:
    """The corrected and masked FSC 0.143 of the last half maps under several masks."""
    path = work / "run"
    record = json.loads((path / "0_refine_parms.json").read_text())
    k = f"{record['iterations'][-1]['iteration']:02d}"
    truth = read_map(work / "truth.mrc").data
    volume = read_map(path / f"threed_{k}.mrc").data
    halves = [read_map(path / f"threed_{k}_{h}.mrc").data for h in ("even", "odd")]
    unmasked = fsc(*halves)
    t05 = against_truth(volume, truth, ds.apix)
    rows = []
    curves = noise_substituted_fsc(
        *halves, np.ones_like(volume), rng=np.random.default_rng(0), unmasked=unmasked
    )
    rows.append(
        {
            "extend_A": None,
            "edge_A": None,
            "masked_A": resolution_at(unmasked, threshold=0.143, apix=ds.apix),
            "corrected_A": curves.resolution(apix=ds.apix),
            "truth_0.5_A": t05,
            "truth_masked_0.5_A": t05,
        }
    )
    for extend_a in (0.0, 6.0, 12.0):
        for edge_a in (6.0, 12.0, 18.0, 24.0, 36.0):
            mask = fsc_mask(volume, ds.apix, extend_a=extend_a, soft_edge_a=edge_a)
            curves = noise_substituted_fsc(
                *halves, mask, rng=np.random.default_rng(0), unmasked=unmasked
            )
            rows.append(
                {
                    "extend_A": extend_a,
                    "edge_A": edge_a,
                    "masked_A": resolution_at(curves.masked, threshold=0.143, apix=ds.apix),
                    "corrected_A": curves.resolution(apix=ds.apix),
                    "truth_0.5_A": t05,
                    "truth_masked_0.5_A": against_truth(volume, truth, ds.apix, mask),
                }
            )
    return rows


def main() -> None:
    set_thread_spin()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default=",".join(RESOLUTION_SETS))
    p.add_argument("--n", type=int, default=1500)
    p.add_argument("--iter", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("bench_resolution"))
    p.add_argument("--extra", default="", help="more refine options for every run")
    p.add_argument("--masks", action="store_true", help="evaluate FSC masks on the runs")
    args = p.parse_args()
    args.extra = args.extra.split()
    work = args.work.resolve()
    results = {}
    for name in args.sets.split(","):
        ds = RESOLUTION_SETS[name]
        if args.masks:
            results[name] = mask_grid(work / name, ds)
            for r in results[name]:
                print(name, json.dumps(r), flush=True)
        else:
            results[name] = run_set(work / name, name, ds, args)
            print(json.dumps(results[name]), flush=True)
    out = work / ("masks.json" if args.masks else "results.json")
    out.write_text(json.dumps(results, indent=1))
    if not args.masks:
        print(
            "| set | Å/px | SNR | particle/box | reported | FSC(map, truth) 0.5 under the mask "
            "(ratio) | unmasked (ratio) | masked, uncorrected | unmasked half maps |"
        )
        for r in results.values():
            print(
                f"| {r['set']} | {r['apix']} | {r['snr']} | {r['particle_over_box']:.2f} | "
                f"{r['reported_A']:.2f} Å | {r['truth_masked_0.5_A']:.2f} Å "
                f"({r['reported_over_truth_masked']:.3f}) | {r['truth_0.5_A']:.2f} Å "
                f"({r['reported_over_truth']:.3f}) | {r['masked_A']:.2f} Å | "
                f"{r['unmasked_A']:.2f} Å |"
            )


if __name__ == "__main__":
    main()

"""The reported resolution against the truth, on simulated data sets that differ in map,
pixel size, particle size in the box and SNR (the sets of ``bench/resolution.py``).

The reported figure (the masked half-map FSC corrected by noise substitution, at 0.143)
describes the map within its FSC mask, as relion_postprocess's does: it must lie within
10% of where the FSC of the map with the true map, both under that mask, crosses 0.5.
Unmasked, the map holds the solvent's noise too, and its FSC with the truth is up to 20%
coarser for a particle that fills half the box (printed beside).
"""

import json
import subprocess

import pytest

from cryorefine.fourier.fsc import fsc, resolution_at
from cryorefine.io.maps import read_map
from cryorefine.testing import (
    RESOLUTION_OPTIONS,
    RESOLUTION_SETS,
    refine_command,
    simulate_data_set,
)

#: particles and iterations of each run (as bench/resolution.py's defaults)
N_PARTICLES, ITERATIONS = 1500, 3


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESOLUTION_SETS))
def test_reported_resolution_matches_the_truth(tmp_path, name):
    ds = RESOLUTION_SETS[name]
    simulate_data_set(tmp_path, ds, N_PARTICLES)
    path = tmp_path / "run"
    path.mkdir()
    options = ("--iter", ITERATIONS, "--seed", 1, *RESOLUTION_OPTIONS)
    subprocess.run(refine_command(tmp_path, path, *options), check=True, capture_output=True)
    last = json.loads((path / "0_refine_parms.json").read_text())["iterations"][-1]
    k = f"{last['iteration']:02d}"
    volume = read_map(path / f"threed_{k}.mrc").data
    mask = read_map(path / f"fsc_mask_{k}.mrc").data
    truth = read_map(tmp_path / "truth.mrc").data
    against = resolution_at(fsc(volume * mask, truth * mask), threshold=0.5, apix=ds.apix)
    unmasked = resolution_at(fsc(volume, truth), threshold=0.5, apix=ds.apix)
    ratio = last["resolution"] / against
    print(
        f"{name}: reported {last['resolution']:.2f} Å (masked {last['resolution_masked']:.2f}, "
        f"unmasked {last['resolution_unmasked']:.2f}); FSC with the truth 0.5 under the "
        f"mask at {against:.2f} Å (ratio {ratio:.3f}), unmasked at {unmasked:.2f} Å"
    )
    assert 0.9 <= ratio <= 1.1

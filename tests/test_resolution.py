"""The reported resolution against the truth, on simulated data sets that differ in map,
pixel size, particle size in the box and SNR (the sets of ``bench/resolution.py``).

The reported figure (the masked half-map FSC corrected by noise substitution, at 0.143)
must lie within 10% of where the map's FSC with the true map crosses 0.5.
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
    volume = read_map(path / f"threed_{last['iteration']:02d}.mrc").data
    truth = read_map(tmp_path / "truth.mrc").data
    against = resolution_at(fsc(volume, truth), threshold=0.5, apix=ds.apix)
    ratio = last["resolution"] / against
    print(
        f"{name}: reported {last['resolution']:.2f} Å (masked {last['resolution_masked']:.2f}, "
        f"unmasked {last['resolution_unmasked']:.2f}); FSC with the truth 0.5 at "
        f"{against:.2f} Å; ratio {ratio:.3f}"
    )
    assert 0.9 <= ratio <= 1.1

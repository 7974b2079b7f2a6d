"""One refinement iteration in memory (``refine.step.run_step``), reconstructing from
the particles or (as e2refine) from the class averages."""

from __future__ import annotations

import numpy as np
import pytest

from cryorefine.config import (
    ClassaverageConfig,
    Project3dConfig,
    RefineConfig,
    SimmxConfig,
)
from cryorefine.errors import CryorefineError
from cryorefine.fourier.filters import lowpass_gauss
from cryorefine.fourier.fsc import fsc, resolution_at
from cryorefine.refine import run_step
from cryorefine.testing import assignment_errors, demo_map, simulate_particles


@pytest.fixture(scope="module")
def simulated():
    truth = demo_map()
    stack = simulate_particles(
        truth.data,
        400,
        apix=truth.apix,
        snr=1.0,
        rng=np.random.default_rng(3),
        max_shift_a=2 * truth.apix,
        defocus_range_um=None,
    )
    start = lowpass_gauss(truth.data, truth.apix / 20.0, 3).astype(np.float32)
    return truth, stack, start


@pytest.mark.parametrize("source", ["particles", "classes"])
def test_one_iteration_from_a_20_angstrom_start(simulated, source):
    truth, stack, start = simulated
    cfg = RefineConfig(
        iterations=1,
        m3dsource=source,
        project3d=Project3dConfig(orientgen="eman:delta=12:perturb=0"),
        simmx=SimmxConfig(align="rotate_translate_flip:maxshift=4", aligncmp="ccc", cmp="ccc"),
        classaverage=ClassaverageConfig(cmp="ccc"),
    )
    it = run_step([start], stack, [np.arange(len(stack))], cfg, iteration=0)
    angle, shift = assignment_errors(it.cm, it.ref_rotations, stack.meta)
    assert np.mean(angle <= 24.0) >= 0.9  # within 2 delta
    res = resolution_at(fsc(it.volume, truth.data), threshold=0.5, apix=truth.apix)
    # measured 12.2 Å (particles: those class averaging kept) and 12.0 Å (classes): the
    # poses are those of a 12-degree grid, so the map cannot be much sharper after one
    # iteration
    assert res < (13.0 if source == "particles" else 16.0), res
    ca = it.classes[0]
    assert len(ca.images) == len(it.projections[0])
    used = it.reason == 0
    if source == "classes":
        # every particle is in exactly one class; every class keeps its best member
        assert np.array_equal(np.sort(ca.particle), np.arange(len(stack)))
        populated = np.bincount(ca.cls, minlength=len(it.projections[0])) > 0
        assert (ca.ptcl_repr[populated] >= 1).all() and (ca.ptcl_repr[~populated] == 0).all()
        assert ca.ptcl_repr.sum() == ca.used.sum() >= 0.7 * len(stack)
        # empty classes carry no orientation weight: make3d skips them
        assert len(it.info["skipped"]) == (~populated).sum()
    else:  # every particle its class averaging kept, with its own pose and CTF
        assert np.array_equal(it.info["inserted"], np.flatnonzero(used))
        assert used.sum() >= 0.7 * len(stack)


def test_unknown_reconstruction_source_is_refused():
    with pytest.raises(CryorefineError, match="--m3dsource both"):
        RefineConfig(m3dsource="both")


@pytest.mark.slow
def test_class_averages_must_undo_the_ctf():
    """With CTF (defocus 1-2.5 um), one iteration from class averages: the plain mean
    blurs each class by its members' CTFs (measured FSC 0.5 at 20 Å), a CTF averager
    does not (9.6 Å with ctf.weight; from the particles: 9.4 Å)."""
    truth = demo_map()
    stack = simulate_particles(
        truth.data, 400, apix=truth.apix, snr=1.0, rng=np.random.default_rng(3), max_shift_a=6.0
    )
    start = lowpass_gauss(truth.data, truth.apix / 20.0, 3).astype(np.float32)
    res = {}
    for averager in ("mean", "ctf.weight"):
        cfg = RefineConfig(
            iterations=1,
            m3dsource="classes",
            project3d=Project3dConfig(orientgen="eman:delta=12:perturb=0"),
            simmx=SimmxConfig(align="rotate_translate_flip:maxshift=4", aligncmp="ccc", cmp="ccc"),
            classaverage=ClassaverageConfig(averager=averager),  # e2refine's frc score
        )
        volume = run_step([start], stack, [np.arange(len(stack))], cfg, iteration=0).volume
        res[averager] = resolution_at(fsc(volume, truth.data), threshold=0.5, apix=truth.apix)
    assert res["ctf.weight"] < 11.0 and res["mean"] > 15.0, res


def test_gold_standard_starts_share_nothing_beyond_inires():
    from cryorefine.io.metadata import ParticleMetadata
    from cryorefine.refine import gold_standard_starts, half_sets

    truth = demo_map()
    a, b = gold_standard_starts(
        truth.data, apix=truth.apix, inires_a=30.0, rng=np.random.default_rng(0)
    )
    f_ab, f_at = fsc(a, b), fsc(a, truth.data)
    shell = 64 * truth.apix / 30.0  # 6.4
    assert (f_ab[1:6] > 0.99).all() and (f_at[1:6] > 0.99).all()  # the same below 30 Å
    assert np.abs(f_ab[8:32]).mean() < 0.1  # independent beyond it
    assert shell < 8
    with pytest.raises(CryorefineError, match="--inires 5"):
        gold_standard_starts(truth.data, apix=3.0, inires_a=5.0, rng=np.random.default_rng(0))
    meta = ParticleMetadata.empty(101, apix=3.0)
    halves = half_sets(meta, np.random.default_rng(1))
    assert set(halves.tolist()) == {1, 2} and abs((halves == 1).sum() - 50.5) <= 0.5
    meta.half_set = np.r_[np.ones(50), 2 * np.ones(51)].astype(np.int64)
    assert np.array_equal(half_sets(meta, np.random.default_rng(1)), meta.half_set)

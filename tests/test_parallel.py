"""``--parallel``: its forms, and the same results on a Dask cluster as in this process
(a ``LocalCluster`` of two workers started by the test), with a worker killed mid-run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from cryorefine import parallel
from cryorefine.config import ClassaverageConfig, SimmxConfig
from cryorefine.errors import CryorefineError
from cryorefine.io.maps import read_map
from cryorefine.io.stacks import ParticleStack
from cryorefine.io.star import read_particle_star
from cryorefine.parallel import parse_parallel
from cryorefine.stages.classaverage import classaverage
from cryorefine.stages.classify import classify
from cryorefine.stages.simmx import FIELDS, simmx
from cryorefine.testing import demo_map, write_simulated_set

from .conftest import FAST_GLOBAL

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """160 particles of the bundled map with CTF and shifts up to 3 px (particles.star),
    the truth low-passed to 25 Å (start.mrc)."""
    folder = tmp_path_factory.mktemp("parallel_data")
    write_simulated_set(folder, demo_map(), 160, snr=0.5, start_a=25.0)
    return folder


@pytest.mark.parametrize(
    ("spec", "expect"),
    [
        ("thread:3", parallel.ParallelSpec(cores=3, text="thread:3")),
        ("dask:local=4", parallel.ParallelSpec("dask", local=4, text="dask:local=4")),
        (
            "dask:scheduler=tcp://10.0.0.1:8786",
            parallel.ParallelSpec(
                "dask", scheduler="tcp://10.0.0.1:8786", text="dask:scheduler=tcp://10.0.0.1:8786"
            ),
        ),
    ],
)
def test_parallel_forms(spec, expect):
    assert parse_parallel(spec) == expect


def test_jobqueue_form_and_its_job_script():
    """Each batch job is one worker that runs one chunk at a time on all its cores."""
    spec = parse_parallel(
        "dask:jobqueue=slurm:cores=8:memory=16GB:jobs=3:queue=gpu:walltime=04:00:00"
    )
    assert spec.jobqueue == (
        "slurm",
        {"cores": 8, "memory": "16GB", "jobs": 3, "queue": "gpu", "walltime": "04:00:00"},
    )
    dask_jobqueue = pytest.importorskip("dask_jobqueue")
    from cryorefine.parallel.dask import jobqueue_cluster

    cluster = jobqueue_cluster(dask_jobqueue.SLURMCluster, spec.jobqueue[1])
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH --cpus-per-task=8" in script and "#SBATCH -p gpu" in script
    assert "#SBATCH -t 04:00:00" in script
    assert "--nthreads 8" in script and "--resources chunk=1" in script


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mpi:4", "use dask:local=N"),
        ("dc:localhost", "use dask:local=N"),
        ("thread:0", "positive whole number"),
        ("thread:4:/scratch", "no more fields"),
        ("dask:local=two", "positive whole number"),
        ("dask:jobqueue=slurm:cores=4", "give memory="),
        ("dask:jobqueue=moab:cores=4:memory=8GB", "batch system 'moab'"),
        ("dask:workers=3", "use thread:N"),
    ],
)
def test_bad_parallel_is_refused_with_one_line(spec, message):
    with pytest.raises(CryorefineError, match=message) as err:
        parse_parallel(spec)
    assert str(err.value).startswith(f"--parallel {spec}:") and "\n" not in str(err.value)


def _projections(truth) -> np.ndarray:
    from cryorefine.config import Project3dConfig
    from cryorefine.stages.project3d import project3d

    return project3d(truth.data, Project3dConfig(orientgen="eman:delta=15"), apix=truth.apix)[0]


def test_simmx_and_classaverage_on_dask_match_this_process_with_a_worker_killed(data):
    """simmx (one-stage in the chunks a cluster gets, two-stage in chunks of 12) and
    class averaging give the same results on two Dask workers as in this process (the
    same best projection of every particle, with its alignment; scores and averages
    within float rounding: a worker's kernels run one thread); killing a worker after
    the first chunk comes back changes nothing (its chunks are computed again
    elsewhere)."""
    truth = demo_map()
    refs = _projections(truth)
    stack = ParticleStack.from_path(data / "particles.star")
    configs = [
        SimmxConfig(aligncmp="ccc", cmp="frc:zeromask=1:snrweight=1"),
        SimmxConfig(aligncmp="ccc", cmp="ccc", chunk=12, twostage=2),
    ]
    here = [simmx(refs, stack, cfg) for cfg in configs]
    cm = classify(here[0])
    ca_cfg = ClassaverageConfig(averager="ctf.weight", iterations=2)
    ca_here = classaverage(stack, cm, refs, ca_cfg)
    killed: list[int] = []
    with parallel.use("dask:local=2") as executor:
        assert executor.workers() == 2

        def kill_one(_: int) -> None:
            if not killed:
                pid = next(iter(executor.client.run(os.getpid).values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        there = [simmx(refs, stack, configs[0], progress=kill_one), simmx(refs, stack, configs[1])]
        ca_there = classaverage(stack, cm, refs, ca_cfg)
    stack.close()
    assert killed
    rows = np.arange(len(stack.meta.weight))
    for a, b in zip(here, there, strict=True):
        best = a.score.argmin(axis=1)
        assert np.array_equal(best, b.score.argmin(axis=1))
        assert np.allclose(a.score, b.score, rtol=1e-4, atol=1e-6)
        for name in FIELDS[1:]:
            x, y = getattr(a, name)[rows, best], getattr(b, name)[rows, best]
            assert np.allclose(x, y, atol=1e-3), (name, np.abs(x - y).max())
    assert np.allclose(ca_here.images, ca_there.images, atol=1e-5 * np.abs(ca_here.images).max())
    for name in ("ptcl_repr", "used", "mirror"):
        assert np.array_equal(getattr(ca_here, name), getattr(ca_there, name)), name
    for name in ("alpha", "tx", "ty"):
        assert np.allclose(getattr(ca_here, name), getattr(ca_there, name), atol=1e-3), name


def _run(run_cli, data: Path, path: Path, spec: str, *extra: str) -> Path:
    code, _, err = run_cli(
        "refine",
        "--input",
        data / "particles.star",
        "--model",
        data / "start.mrc",
        "--path",
        path,
        "--seed",
        "3",
        "--iter",
        "1",
        *FAST_GLOBAL,
        "--parallel",
        spec,
        *extra,
    )
    assert code == 0, err
    return path


@pytest.mark.slow
@pytest.mark.parametrize("search", ["0", "1"], ids=["global", "local"])
def test_refine_on_dask_gives_the_maps_and_poses_of_thread(data, tmp_path, run_cli, search):
    """One iteration (global: simmx, classify, class averaging, make3d; local: the local
    search and make3d) with --parallel dask:local=2 and thread:2: the same maps within
    float rounding (make3d sums the workers' accumulators in another order) and the
    same particles_00.star."""
    runs = [
        _run(run_cli, data, tmp_path / name, spec, "--localrefine", search)
        for name, spec in (("thread", "thread:2"), ("dask", "dask:local=2"))
    ]
    for name in ("threed_00.mrc", "threed_00_even.mrc", "threed_00_odd.mrc"):
        a, b = (read_map(r / name).data for r in runs)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), name
    a, b = (read_particle_star(r / "particles_00.star") for r in runs)
    assert np.allclose(a.rotations, b.rotations, atol=1e-5)
    assert np.allclose(a.shift_a, b.shift_a, atol=1e-4)
    assert np.array_equal(a.half_set, b.half_set)
    assert np.array_equal(a.class_number, b.class_number)
    assert np.allclose(a.extra["crSimilarityScore"], b.extra["crSimilarityScore"], rtol=1e-5)
    for column in ("crIncluded", "crExcludedBy"):
        assert list(a.extra[column]) == list(b.extra[column]), column


@pytest.mark.slow
def test_a_running_scheduler_is_joined_and_gives_the_same_matrix(data):
    """dask:scheduler=ADDRESS: the workers of a scheduler started beside this run (as
    `dask scheduler` and `dask worker --nthreads 1` would be, without our resource)
    score the particles to the matrix this process computes."""
    from distributed import LocalCluster

    refs = _projections(demo_map())
    stack = ParticleStack.from_path(data / "particles.star")
    cfg = SimmxConfig(aligncmp="ccc", cmp="ccc", chunk=20)
    here = simmx(refs, stack, cfg)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        with parallel.use(f"dask:scheduler={cluster.scheduler_address}") as executor:
            assert executor.workers() == 2 and not executor.own_workers
            there = simmx(refs, stack, cfg)
    stack.close()
    best = here.score.argmin(axis=1)
    assert np.array_equal(best, there.score.argmin(axis=1))
    assert np.allclose(here.score, there.score, rtol=1e-4, atol=1e-6)

"""Where the chunks of a stage run: this process (``--parallel thread:N``) or a Dask
cluster (``--parallel dask:...``).

Every stage that works through particles or images in chunks hands them to
:func:`map_chunks`: a module-level function ``fn(shared, item)``, the data every chunk
needs (``shared``: the projections, a half map, the configuration) and the chunks
(``items``: each carries its own particles, as a :class:`~cryorefine.io.stacks.ParticleStack`
that reads its images from disk where it runs). Results come back in the order of
``items``, whichever worker computed them, so that the outputs do not depend on where
the work ran. The driver alone writes files.

EMAN2's form is kept: ``type:option=value:...``.

- ``thread:N``: this process on N cores (the default: all).
- ``dask:local=N``: a Dask ``LocalCluster`` of N worker processes on this machine.
- ``dask:scheduler=ADDRESS``: the workers of a running Dask scheduler
  (``tcp://host:8786``).
- ``dask:jobqueue=SYSTEM:cores=C:memory=M:jobs=J[:queue=Q:walltime=T:account=A...]``:
  J batch jobs of dask-jobqueue (``SYSTEM``: slurm, pbs, sge, lsf, oar, htcondor), each
  one worker of C cores and M memory; further keys go to the cluster as given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from cryorefine.errors import CryorefineError
from cryorefine.fourier.fft import fft_threads_limited

#: the batch systems of ``dask:jobqueue=SYSTEM`` and their dask-jobqueue classes
JOBQUEUE_SYSTEMS = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "sge": "SGECluster",
    "lsf": "LSFCluster",
    "oar": "OARCluster",
    "htcondor": "HTCondorCluster",
}
#: what ``--parallel`` accepts, for error lines
FORMS = (
    "thread:N, dask:local=N, dask:scheduler=ADDRESS or dask:jobqueue=slurm:cores=C:memory=M:jobs=J"
)


@dataclass(frozen=True)
class ParallelSpec:
    """A parsed ``--parallel``: ``kind`` ``thread`` (``cores``; ``None``: all) or
    ``dask`` with one of ``local`` (worker processes), ``scheduler`` (an address) or
    ``jobqueue`` (the batch system and the cluster's keyword arguments)."""

    kind: str = "thread"
    cores: int | None = None
    local: int | None = None
    scheduler: str | None = None
    jobqueue: tuple[str, dict[str, Any]] | None = None
    text: str = ""

    @property
    def distributed(self) -> bool:
        return self.kind == "dask"


def _positive(text: str, spec: str, what: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise CryorefineError(f"--parallel {spec}: {what} must be a positive whole number")
    return int(text)


def _value(text: str) -> Any:
    """A jobqueue value: a whole number (cores, jobs, processes) or the text as given."""
    return int(text) if text.isdigit() else text


def parse_parallel(spec: str | None) -> ParallelSpec:
    """Parse ``--parallel`` (module docstring); ``None``: ``thread`` on every core.

    Raises
    ------
    CryorefineError
        One line naming the spec and what is wrong; ``mpi:`` and ``dc:`` name ``dask:``.
    """
    if spec is None or spec == "":
        return ParallelSpec()
    kind, _, rest = spec.partition(":")
    if kind == "thread":
        cores, *more = rest.split(":")
        if more:
            raise CryorefineError(
                f"--parallel {spec}: thread:N takes no more fields (EMAN2's scratch folder "
                "is not used)"
            )
        return ParallelSpec(cores=_positive(cores, spec, "thread:N"), text=spec)
    if kind in ("mpi", "dc"):
        raise CryorefineError(
            f"--parallel {spec}: {kind} is not supported; use dask:local=N on one machine, "
            "dask:jobqueue=slurm:cores=C:memory=M:jobs=J on a cluster, or "
            "dask:scheduler=ADDRESS"
        )
    if kind != "dask":
        raise CryorefineError(f"--parallel {spec}: use {FORMS}")
    key, _, value = rest.partition("=")
    if key == "local":
        return ParallelSpec("dask", local=_positive(value, spec, "dask:local=N"), text=spec)
    if key == "scheduler":
        if not value:
            raise CryorefineError(f"--parallel {spec}: give the scheduler's address")
        return ParallelSpec("dask", scheduler=value, text=spec)
    if key == "jobqueue":
        system, *fields = value.split(":")
        pairs: list[str] = []
        for f in fields:  # a field without '=' continues the value before (walltime=04:00:00)
            if "=" not in f and pairs:
                pairs[-1] += ":" + f
            else:
                pairs.append(f)
        if system not in JOBQUEUE_SYSTEMS:
            raise CryorefineError(
                f"--parallel {spec}: batch system '{system}'; use one of "
                f"{', '.join(JOBQUEUE_SYSTEMS)}"
            )
        kwargs: dict[str, Any] = {}
        for pair in pairs:
            k, eq, v = pair.partition("=")
            if not eq or not k or not v:
                raise CryorefineError(f"--parallel {spec}: '{pair}' is not key=value")
            kwargs[k] = _value(v)
        for k in ("cores", "memory"):
            if k not in kwargs:
                raise CryorefineError(f"--parallel {spec}: give {k}= (each job's {k})")
        kwargs.setdefault("jobs", 1)
        _positive(str(kwargs["jobs"]), spec, "jobs")
        _positive(str(kwargs["cores"]), spec, "cores")
        return ParallelSpec("dask", jobqueue=(system, kwargs), text=spec)
    raise CryorefineError(f"--parallel {spec}: use {FORMS}")


@dataclass
class InProcess:
    """Chunks run one after the other in this process, each on every core it may use
    (the compiled kernels' and the FFTs' threads)."""

    spec: ParallelSpec = field(default_factory=ParallelSpec)
    #: whether chunks leave this process
    distributed: bool = False

    def workers(self) -> int:
        return 1

    def map(
        self, fn: Callable[[Any, Any], Any], shared: Any, items: Iterable[Any]
    ) -> Iterator[Any]:
        for item in items:
            yield fn(shared, item)

    def close(self) -> None:
        pass


@contextmanager
def limited_cores(cores: int | None) -> Iterator[None]:
    """Run the block on ``cores`` cores (``--parallel thread:N``; ``None``: all): the
    compiled kernels' threads, the FFTs' threads and the process's CPU affinity, each
    restored when the block ends (a library caller gets its own settings back)."""
    if not cores:
        yield
        return
    import numba

    threads = numba.get_num_threads()
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else None
    try:
        numba.set_num_threads(min(cores, numba.config.NUMBA_NUM_THREADS))
        if affinity is not None:
            os.sched_setaffinity(0, affinity[:cores])
        with fft_threads_limited(cores):
            yield
    finally:
        numba.set_num_threads(threads)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)


_current: list[Any] = [InProcess()]


def current() -> Any:
    """The executor in effect (:func:`use`); in-process unless a caller set one."""
    return _current[-1]


def map_chunks(
    fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any] | Iterable[Any]
) -> Iterator[Any]:
    """``fn(shared, item)`` for each item, on the executor in effect, in the items' order.

    ``fn`` must be a module-level function (it travels to the workers by name);
    ``shared`` is sent to each worker once per call, the items one each.
    """
    return current().map(fn, shared, items)


#: chunks per worker a stage cuts its work into at least, on a cluster (so that every
#: worker stays busy while the last chunks finish)
CHUNKS_PER_WORKER = 2


def chunk_size(n: int, limit: int) -> int:
    """Items per chunk for ``n`` items: ``limit`` (what a chunk's memory allows), or on
    a cluster fewer, so that each worker gets :data:`CHUNKS_PER_WORKER` chunks."""
    executor = current()
    if not executor.distributed:
        return max(1, limit)
    return max(1, min(limit, -(-n // (CHUNKS_PER_WORKER * executor.workers()))))


@contextmanager
def use(spec: ParallelSpec | str | None) -> Iterator[Any]:
    """Run the block's stages as ``spec`` says: a Dask cluster is started (or joined) on
    entry and closed on exit; ``thread`` runs in this process."""
    if not isinstance(spec, ParallelSpec):
        spec = parse_parallel(spec)
    if spec.distributed:
        from cryorefine.parallel.dask import DaskExecutor

        executor: Any = DaskExecutor.start(spec)
    else:
        executor = InProcess(spec=spec)
    _current.append(executor)
    try:
        with limited_cores(spec.cores):
            yield executor
    finally:
        _current.remove(executor)
        executor.close()

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

from cryorefine.fourier.fft import fft_threads_limited
from cryorefine.parallel.spec import ParallelSpec, parse_parallel

__all__ = [
    "InProcess",
    "ParallelSpec",
    "chunk_size",
    "current",
    "limited_cores",
    "map_chunks",
    "parse_parallel",
    "use",
]


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

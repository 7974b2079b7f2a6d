"""Chunks on a Dask cluster (``--parallel dask:...``; see :mod:`cryorefine.parallel`).

A stage's shared data goes to every worker once per call (``scatter``, broadcast); the
chunks are submitted a few per worker ahead of the one the caller waits for, and come
back in order. A chunk whose worker dies is computed again elsewhere (Dask reschedules
the tasks a lost worker held). Each worker runs one chunk at a time, on all the cores
it owns: a worker of ours holds the resource ``chunk=1``, and its kernels and FFTs get
its threads; a worker started by hand (``dask:scheduler=``) should run one thread
(``dask worker ADDRESS --nthreads 1``), whose chunk then gets every core it may use.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cryorefine.errors import CryorefineError, CryorefineWarning
from cryorefine.fourier.fft import cpu_count
from cryorefine.parallel.spec import JOBQUEUE_SYSTEMS, ParallelSpec

#: the worker resource that makes a worker of ours run one chunk at a time
RESOURCE = "chunk"
#: chunks in flight per worker, beyond the one the caller waits for
AHEAD = 2
#: seconds to wait for a running scheduler to answer (``dask:scheduler=``)
CONNECT_TIMEOUT_S = 30
#: seconds to wait for a first worker (not with ``jobqueue``, whose jobs may queue)
WORKER_WAIT_S = 120


def _call(fn: Callable[[Any, Any], Any], shared: Any, item: Any, lowmem: bool) -> Any:
    """On a worker: ``fn(shared, item)`` with the kernels' and the FFTs' threads set to
    the cores this chunk may use, and the driver's memory budgets (``--lowmem``)."""
    import numba
    from distributed import get_worker

    from cryorefine import memory
    from cryorefine.fourier.fft import fft_threads_limited

    worker = get_worker()
    nthreads = max(1, int(getattr(worker.state, "nthreads", 1)))
    resources = getattr(worker.state, "total_resources", {}) or {}
    threads = nthreads if RESOURCE in resources else max(1, cpu_count() // nthreads)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with fft_threads_limited(threads), memory.low_memory(lowmem):
            return fn(shared, item)
    finally:
        numba.set_num_threads(before)


@dataclass
class DaskExecutor:
    """A client of a Dask cluster that runs :func:`cryorefine.parallel.map_chunks`."""

    client: Any
    cluster: Any
    spec: ParallelSpec
    own_workers: bool
    #: whether chunks leave this process
    distributed: bool = True

    @classmethod
    def start(cls, spec: ParallelSpec) -> DaskExecutor:
        """Start (``local``, ``jobqueue``) or join (``scheduler``) the cluster ``spec``
        names."""
        distributed = _dependency("distributed", spec, "'dask[distributed]'")
        if spec.local:
            cluster = distributed.LocalCluster(
                n_workers=spec.local,
                threads_per_worker=max(1, cpu_count() // spec.local),
                processes=True,
                resources={RESOURCE: 1},
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
            return cls(distributed.Client(cluster), cluster, spec, True)
        if spec.scheduler:
            try:
                client = distributed.Client(spec.scheduler, timeout=CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as err:
                raise CryorefineError(
                    f"--parallel {spec.text}: no Dask scheduler answers at {spec.scheduler} ({err})"
                ) from None
            return cls(client, None, spec, False)
        system, kwargs = spec.jobqueue
        dask_jobqueue = _dependency("dask_jobqueue", spec, "dask-jobqueue")
        cluster = jobqueue_cluster(getattr(dask_jobqueue, JOBQUEUE_SYSTEMS[system]), kwargs)
        cluster.scale(jobs=int(kwargs.get("jobs", 1)))
        return cls(distributed.Client(cluster), cluster, spec, True)

    def workers(self) -> int:
        """Workers now connected (at least 1: chunks wait for the first to come)."""
        return max(1, len(self.client.nthreads()))

    def wait_for_workers(self) -> None:
        """Wait for a first worker: as long as the batch queue takes with ``jobqueue``,
        :data:`WORKER_WAIT_S` otherwise (then a one-line error)."""
        if self.client.nthreads():
            return
        timeout = None if self.spec.jobqueue else WORKER_WAIT_S
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise CryorefineError(
                f"--parallel {self.spec.text}: no Dask worker joined in {WORKER_WAIT_S} s"
            ) from None

    def map(
        self, fn: Callable[[Any, Any], Any], shared: Any, items: Iterable[Any]
    ) -> Iterator[Any]:
        from cryorefine import memory

        self.wait_for_workers()
        # one future (a list or dict would be scattered item by item)
        (shared_f,) = self.client.scatter([shared], broadcast=True, hash=False)
        resources = {RESOURCE: 1} if self.own_workers else None
        lowmem = memory.is_low()
        window = (AHEAD + 1) * self.workers()
        pending: deque = deque()
        todo = iter(items)

        def submit() -> bool:
            item = next(todo, _END)
            if item is _END:
                return False
            pending.append(
                self.client.submit(
                    _call, fn, shared_f, item, lowmem, pure=False, resources=resources
                )
            )
            return True

        try:
            while len(pending) < window and submit():
                pass
            while pending:
                future = pending.popleft()
                result = future.result()
                future.release()
                submit()
                yield result
        finally:
            for future in pending:
                future.cancel()
            shared_f.release()

    def close(self) -> None:
        """Close the client and a cluster of ours (best effort: a worker that is still
        restarting may make the cluster's shutdown complain, after every result is in)."""
        try:
            self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        except (OSError, TimeoutError, RuntimeError) as err:
            warnings.warn(
                f"closing the Dask cluster: {err or type(err).__name__}",
                CryorefineWarning,
                stacklevel=2,
            )


_END = object()


def _dependency(module: str, spec: ParallelSpec, package: str) -> Any:
    """Import ``module``, or a one-line error naming the package to install."""
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover - a dependency of the package
        raise CryorefineError(
            f"--parallel {spec.text}: {module} is not installed (python3 -m pip install {package})"
        ) from None


def jobqueue_cluster(cluster_class: type, kwargs: dict[str, Any]) -> Any:
    """A dask-jobqueue cluster of one worker per job, each running one chunk at a time
    on the job's ``cores``; ``jobs`` is for :meth:`scale`, the other keys go to
    ``cluster_class`` as given (``queue``, ``walltime``, ``account``, ...)."""
    args = {k: v for k, v in kwargs.items() if k != "jobs"}
    extra = list(args.pop("worker_extra_args", []))
    return cluster_class(
        processes=1,
        worker_extra_args=[*extra, "--resources", f"{RESOURCE}=1"],
        scheduler_options={"dashboard_address": None},
        **args,
    )

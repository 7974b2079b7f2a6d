"""``--parallel``'s text: EMAN2's ``type:option=value`` form (see
:mod:`cryorefine.parallel`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryorefine.errors import CryorefineError

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

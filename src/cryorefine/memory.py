"""The stages' working-memory budgets (``--lowmem``) and the bound they set on a
refinement's peak memory.

Every stage that holds particles works through them in chunks sized to a budget of its
own: simmx's chunk of particles, the projection bank of the alignment engine, class
averaging's chunk of class members, the local search's chunk of particles, make3d's
chunk of images and its Fourier accumulators (one per thread, within their budget).
``--lowmem`` divides every budget by :data:`LOWMEM_DIVISOR`: smaller chunks, the same
results, for machines with little memory (at some cost in speed: each chunk rebuilds
its projection bank).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: bytes of working memory per stage (see the module docstring)
BUDGETS = {
    "simmx": 2**30,
    "bank": 256 * 2**20,
    "classaverage": 256 * 2**20,
    "local": 256 * 2**20,
    "make3d": 32 * 2**20,
    "accumulators": 2 * 10**9,
}
#: what ``--lowmem`` divides every budget by
LOWMEM_DIVISOR = 4
#: bytes a refinement process holds before any data (Python, NumPy, SciPy, the
#: compiled kernels; measured 250-290 MiB)
BASELINE_BYTES = 300 * 2**20
#: bytes per particle the driver holds for the whole run (metadata, poses, scores, the
#: classification, the STAR table while it is written)
PER_PARTICLE_BYTES = 4096

_low = [False]


def budget(stage: str) -> int:
    """The working memory (bytes) ``stage`` may use for one chunk now."""
    return int(BUDGETS[stage] // (LOWMEM_DIVISOR if _low[-1] else 1))


def is_low() -> bool:
    """Whether ``--lowmem``'s budgets are in effect (:func:`low_memory`)."""
    return _low[-1]


@contextmanager
def low_memory(on: bool = True) -> Iterator[None]:
    """Inside the block every budget is divided by :data:`LOWMEM_DIVISOR` (``on``)."""
    _low.append(bool(on))
    try:
        yield
    finally:
        _low.pop()


def peak_bound(
    box: int,
    projections: int,
    particles: int,
    *,
    halves: int = 2,
    pad: int | None = None,
    threads: int = 1,
    lowmem: bool = False,
) -> dict[str, Any]:
    """The bound (bytes) on a refinement's peak memory, term by term, and its ``total``.

    ``box`` ``n`` px; ``projections`` ``Nr`` per half; ``halves`` 2 (gold standard) or
    1; ``pad`` ``P`` (make3d's padded size, default ``2n``); ``threads``: cores. With
    ``B_stage`` each budget (:data:`BUDGETS`, divided by 4 with ``lowmem``)::

        total = 300 MiB + 4 KiB N + 8 h Nr n^2 + 48 n^3
                + max(2 B_simmx + K, 2 B_classaverage + K,
                      B_local + 24 (2n)^3,
                      B_make3d + min(T, max(2, B_accumulators / A)) A + 24 P^3)

    where ``K = max(2 B_bank, 140 n^3)`` is the alignment engine's pooled bank memory
    (a bank of one reference exceeds the budget from about 256 px; measured: 163 MiB at
    64 px, 425 MiB at 128 px, 2.2 GiB at 256 px), ``A = 12 P^2 (P / 2 + 1)`` one
    Fourier accumulator and ``T`` the threads.
    The persistent terms are the projections and class averages of each half (``8 h Nr
    n^2``) and about a dozen maps of ``n^3`` float32 (``48 n^3``); the stages run one at
    a time, so only the largest working set counts. A chunk may reach twice its budget
    (the budgets count its arrays, not NumPy's temporaries and the allocator's slack).
    """
    low = LOWMEM_DIVISOR if lowmem else 1
    b = {k: v / low for k, v in BUDGETS.items()}
    n = int(box)
    p = int(pad or 2 * n)
    acc = 12.0 * p * p * (p // 2 + 1)
    accumulators = min(max(threads, 2), max(2, int(b["accumulators"] // acc))) * acc
    pool = max(2 * b["bank"], 140.0 * n**3)
    stages = {
        "simmx": 2 * b["simmx"] + pool,
        "classaverage": 2 * b["classaverage"] + pool,
        "local": b["local"] + 24.0 * (2 * n) ** 3,
        "make3d": b["make3d"] + accumulators + 24.0 * p**3,
    }
    terms = {
        "baseline": float(BASELINE_BYTES),
        "particles": float(PER_PARTICLE_BYTES) * particles,
        "projections": 8.0 * halves * projections * n * n,
        "maps": 48.0 * n**3,
        "largest_stage": max(stages.values()),
    }
    largest = max(stages, key=stages.get)
    return {**terms, "largest": largest, "total": sum(terms.values())}

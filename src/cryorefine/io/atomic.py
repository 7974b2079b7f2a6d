"""Atomic, no-clobber output files.

Every file cryorefine writes is first written beside its target under a hidden
``.<name>.<pid>.partial`` name and renamed into place when complete, so a crash never
leaves a half-written file that looks finished. An existing target is replaced only
when the caller says so (``--overwrite`` on the command line).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryorefine.errors import CryorefineError


def check_output(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check that ``path`` may be written; return it as a ``Path``.

    Raises
    ------
    CryorefineError
        If the file exists and ``overwrite`` is false, or its folder does not exist.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CryorefineError(f"{path}: exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise CryorefineError(f"{path}: output folder {path.parent} does not exist")
    return path


@contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` when the block succeeds.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = check_output(path, overwrite=overwrite)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an existing file; ``False`` (not an exception) for a name
    no file can have (too long, a NUL byte), as a damaged metadata file may hold."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False

"""Shared fixtures: data paths, a seeded generator, a CLI runner."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import cryorefine
from cryorefine.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


#: refine options that make a small run quick: a 15-degree grid, shifts up to 3 px, the
#: CTF-weighted averager, the halves' starts at 25 Å
FAST_GLOBAL = (
    "--orientgen",
    "eman:delta=15:perturb=1",
    "--simalign",
    "rotate_translate_flip:maxshift=3",
    "--classaverager",
    "ctf.weight",
    "--inires",
    "25",
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


#: the demo map shipped inside the package (the same file as ../shared/data/rnapol2_64.mrc)
PACKAGE_MAP = Path(cryorefine.__file__).parent / "data" / "rnapol2_64.mrc"


@pytest.fixture(scope="session")
def rnapol2_64() -> Path:
    """RNA polymerase II, 64^3 at 3.0 Å/px: the map shipped with the package."""
    return PACKAGE_MAP


@pytest.fixture(scope="session")
def rnapol2_128() -> Path:
    """RNA polymerase II, 128^3 at 1.5 Å/px, from ../shared/data (slow tests only)."""
    path = SHARED_DATA / "rnapol2_128.mrc"
    if not path.is_file():
        pytest.skip(f"test map {path} not present (it lives in ../shared/data beside the clone)")
    return path


@pytest.fixture(scope="module")
def projections_d15() -> np.ndarray:
    """Projections of rnapol2_64.mrc over eman:delta=15 without jitter (93 images of 64 px)."""
    import mrcfile

    from cryorefine.fourier.project import project
    from cryorefine.geometry.orientations import orientations

    return project(mrcfile.read(PACKAGE_MAP), orientations("eman:delta=15:perturb=0", "c1"))


def angle_diff(a, b) -> np.ndarray:
    """Absolute angular differences in degrees, modulo 360."""
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test inside a temporary folder (relative paths land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def run_cli(capsys):
    """Run ``cryorefine ARGS`` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse errors
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def relion_available(*programs: str) -> bool:
    return all(shutil.which(p) for p in programs)


#: where ../shared/eman2/build.sh installs EMAN2's programs (and its Python, ``python``)
EMAN2_DEFAULT_BIN = Path("/opt/eman2/bin")


def eman2_bin() -> Path | None:
    """The folder of EMAN2's programs: the one on ``PATH``, else the build script's;
    ``None`` where EMAN2 is not installed."""
    found = shutil.which("e2classify.py")
    if found:
        return Path(found).parent
    return EMAN2_DEFAULT_BIN if (EMAN2_DEFAULT_BIN / "e2classify.py").is_file() else None

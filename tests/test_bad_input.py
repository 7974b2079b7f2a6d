"""No input is silently misread: damaged files of every format give the project's error.

Property-based: from a small valid file of each format (RELION STAR + MRCS, MRC map,
EMAN2 HDF, EMAN2 LST) hypothesis makes truncated, emptied, byte-flipped, random and (for
the text formats) mistyped versions, and every reader, and a command run on the file,
must either succeed or raise :class:`CryorefineError` (exit status 2, one line). Any
other exception, a warning or a traceback fails the test.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryorefine.errors import CryorefineError, CryorefineWarning
from cryorefine.io.maps import Map, read_map, write_map
from cryorefine.io.stacks import ParticleStack, write_stack
from cryorefine.testing import simulate_particles, solid_sphere

#: damaged files tried per kind in the default suite (five times as many with -m slow)
EXAMPLES = 80
BOX = 12
N = 6


def _valid_files(folder: Path) -> dict[str, Path]:
    """One small valid file of each format; the STAR and LST refer to MRCS/HDF beside."""
    vol = solid_sphere(BOX, 3.0, centre=(1.0, 0.0, -1.0))
    sim = simulate_particles(vol, N, apix=2.0, snr=1.0, rng=np.random.default_rng(0))
    write_stack(sim, folder / "particles.star")
    write_stack(sim, folder / "particles.hdf")
    write_stack(ParticleStack.from_path(folder / "particles.star"), folder / "particles.lst")
    write_map(folder / "map.mrc", Map(vol, 2.0))
    return {
        "star": folder / "particles.star",
        "mrcs": folder / "particles.mrcs",
        "hdf": folder / "particles.hdf",
        "lst": folder / "particles.lst",
        "mrc": folder / "map.mrc",
    }


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    return _valid_files(tmp_path_factory.mktemp("valid"))


def read_as_stack(path: Path) -> None:
    stack = ParticleStack.from_path(path)
    try:
        stack.read()
    finally:
        stack.close()


def read_as_map(path: Path) -> None:
    read_map(path)


READERS = {"star": read_as_stack, "mrcs": read_as_stack, "hdf": read_as_stack, "lst": read_as_stack}
READERS["mrc"] = read_as_map


def commands(path: Path, kind: str, work: Path) -> list[list[str]]:
    out = work / "out"
    if kind == "mrc":
        return [
            ["fsc", str(path), str(path), "--out", str(out)],
            [
                "project3d",
                "--model",
                str(path),
                "--out",
                f"{out}.star",
                "--orientgen",
                "eman:delta=30",
            ],
            ["process", str(path), f"{out}.mrc", "--process", "normalize"],
        ]
    return [
        ["make3d", "--input", str(path), "--output", f"{out}.mrc"],
        ["convert", str(path), f"{out}.mrcs"],
        ["check", "--input", str(path)],
    ]


@st.composite
def damaged(draw, data: bytes, text: bool):
    """A damaged version of ``data``: truncated, emptied, flipped, random or mistyped."""
    how = draw(st.sampled_from(["truncate", "empty", "flip", "random", "mistype"]))
    if how == "truncate":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if how == "empty":
        return b""
    if how == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] = draw(st.integers(0, 255))
        return bytes(buf)
    if how == "random":
        return draw(st.binary(min_size=0, max_size=4096))
    # mistype: replace one whitespace-separated token (text) or one 4-byte word (binary)
    if text:
        tokens = data.split(b" ")
        i = draw(st.integers(0, len(tokens) - 1))
        junk = draw(st.sampled_from([b"abc", b"nan", b"inf", b"-", b"1e999", b"@", b"", b"0"]))
        tokens[i] = junk
        return b" ".join(tokens)
    buf = bytearray(data)
    i = 4 * draw(st.integers(0, min(len(buf), 1024) // 4 - 1))
    buf[i : i + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(buf)


def _check(kind: str, valid: dict[str, Path], mutate, run_cli) -> None:
    original = valid[kind]
    data = original.read_bytes()
    work = Path(tempfile.mkdtemp(prefix="bad-input-"))
    try:
        # the damaged file beside intact copies of the files it refers to
        for p in valid.values():
            shutil.copy(p, work / p.name)
        target = work / original.name
        target.write_bytes(mutate(data))
        with warnings.catch_warnings():
            # any warning but ours (a damaged header may lack the pixel size) is a bug
            warnings.simplefilter("error")
            warnings.simplefilter("ignore", CryorefineWarning)
            try:
                READERS[kind](target)
            except CryorefineError as exc:
                assert "\n" not in str(exc)
            for args in commands(target, kind, work):
                code, out, err = run_cli(*args)
                assert code in (0, 2), (args, code, err)
                assert "Traceback" not in err
                if code == 2:
                    assert err.count("\n") == 1 and err.startswith("cryorefine: error: "), err
                for leftover in work.glob("out*"):
                    leftover.unlink() if leftover.is_file() else shutil.rmtree(leftover)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _runner():
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from cryorefine.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code
        return code, out.getvalue(), err.getvalue()

    return run


@pytest.mark.parametrize(
    "examples", [EXAMPLES, pytest.param(5 * EXAMPLES, marks=pytest.mark.slow, id="many")]
)
@pytest.mark.parametrize("kind", ["star", "lst", "mrcs", "mrc", "hdf"])
def test_damaged_files_give_the_projects_error(valid, kind, examples):
    text = kind in ("star", "lst")
    data = valid[kind].read_bytes()
    run_cli = _runner()
    seen: set[bytes] = set()

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(damaged(data, text))
    def check(mutated: bytes) -> None:
        seen.add(mutated)
        _check(kind, valid, lambda _: mutated, run_cli)

    check()
    assert len(seen) >= examples * 0.9, len(seen)  # distinct damaged files tried


@pytest.mark.parametrize(
    "content, text",
    [
        ("data_particles\n\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n", "no particles"),
        ("", "no data table found"),
    ],
)
def test_empty_star_is_one_line(in_tmp, run_cli, content, text):
    Path("empty.star").write_text(content)
    code, _, err = run_cli("make3d", "--input", "empty.star", "--output", "m.mrc")
    assert code == 2 and text in err and err.count("\n") == 1, err


def test_empty_stack_is_one_line(in_tmp, run_cli):
    import mrcfile

    with mrcfile.new("empty.mrcs") as m:
        m.set_data(np.zeros((0, 8, 8), np.float32))
    code, _, err = run_cli("make3d", "--input", "empty.mrcs", "--output", "m.mrc")
    assert code == 2 and "no images" in err and err.count("\n") == 1, err


def test_star_whose_images_are_missing_is_one_line(in_tmp, run_cli, valid):
    text = valid["star"].read_text().replace("particles.mrcs", "elsewhere.mrcs")
    Path("p.star").write_text(text)
    code, _, err = run_cli("make3d", "--input", "p.star", "--output", "m.mrc")
    assert code == 2 and "elsewhere.mrcs not found" in err and err.count("\n") == 1, err


def test_a_malformed_star_value_names_the_row_and_column(in_tmp, valid):
    from cryorefine.io.star import read_particle_star

    shutil.copy(valid["mrcs"], "particles.mrcs")
    lines = valid["star"].read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if line.strip() == "loop_")
    cols, i = [], start + 1
    while lines[i].startswith("_"):
        cols.append(lines[i].split()[0][1:])
        i += 1
    row = lines[i + 2].split()  # the third particle's tilt becomes text
    row[cols.index("rlnAngleTilt")] = "abc"
    lines[i + 2] = " ".join(row)
    Path("p.star").write_text("\n".join(lines) + "\n")
    with pytest.raises(CryorefineError, match=r"p.star: particle 3: rlnAngleTilt 'abc'"):
        read_particle_star("p.star")


def _options_of(command: str) -> set[str]:
    """Every option string of ``cryorefine COMMAND``."""
    import argparse

    from cryorefine.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices[command]._option_string_actions)


#: per stage command: options with a bad value, and the options the one-line error must
#: name (refine passes the same stage options under other names: --classkeep, --simcmp,
#: --m3dkeep ...; a stage command's error must name its own)
BAD_STAGE_OPTIONS = [
    ("classaverage", ("--keep", "2"), {"--keep", "--keepsig"}),
    ("classaverage", ("--iter", "2", "--align", "none"), {"--iter", "--align"}),
    ("classaverage", ("--averager", "nosuch"), {"--averager"}),
    ("classaverage", ("--averager", "ctf.weight:wiener=0"), {"--averager"}),
    ("classaverage", ("--cmp", "frc:nokey=1"), {"--cmp"}),
    ("classaverage", ("--normproc", "normalize.nosuch"), {"--normproc"}),
    ("simmx", ("--cmp", "frc:nokey=1"), {"--cmp"}),
    ("simmx", ("--align", "rotate_translate_flip:maxshift=x"), {"--align"}),
    ("simmx", ("--mask", "no_such_mask.mrc"), {"--mask"}),
    ("make3d", ("--keep", "2"), {"--keep", "--keepsig"}),
    ("make3d", ("--iter", "0"), {"--iter"}),
    ("make3d", ("--preprocess", "normalize.nosuch"), {"--preprocess"}),
    ("make3d", ("--setsf", "no_such_file.txt"), {"--setsf"}),
    ("classify", ("--sep", "0"), {"--sep"}),
    ("project3d", ("--orientgen", "eman:nokey=1"), {"--orientgen"}),
    ("project3d", ("--projector", "nosuch"), {"--projector"}),
]


def _stage_command(command: str, *extra: str) -> list[str]:
    """``command`` with its required arguments (files that need not exist: the options
    are checked before any file is read)."""
    required = {
        "classaverage": ["--input", "p.star", "--classmx", "c.h5", "--output", "a.star"],
        "simmx": ["proj.mrcs", "p.star", "s.h5"],
        "make3d": ["--input", "p.star", "--output", "m.mrc"],
        "classify": ["s.h5", "c.h5"],
        "project3d": ["--model", "m.mrc", "--out", "proj.star"],
    }
    return [command, *required[command], *extra]


@pytest.mark.parametrize("command, extra, named", BAD_STAGE_OPTIONS)
def test_a_stage_command_names_its_own_options(in_tmp, run_cli, command, extra, named):
    code, _, err = run_cli(*_stage_command(command, *extra))
    assert code == 2 and err.count("\n") == 1, err
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", err))
    assert flags == named, err
    assert flags <= _options_of(command), err


@pytest.mark.parametrize(
    "config",
    ["Project3dConfig", "SimmxConfig", "ClassifyConfig", "ClassaverageConfig", "Make3dConfig"],
)
def test_stage_configs_spell_their_fields_as_their_commands(config):
    """The options a stage config's errors name are options of its command."""
    import cryorefine.config as cfgs

    cls = getattr(cfgs, config)
    assert set(cls.flags().values()) <= _options_of(cls.STAGE), cls.flags()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"classkeep": 2.0}, {"--classkeep", "--classkeepsig"}),
        ({"m3dsource": "classes", "m3dkeep": -1.0}, {"--m3dkeep", "--m3dkeepsig"}),
        ({"classiter": 2, "classalign": None}, {"--classiter", "--classalign"}),
    ],
)
def test_refine_names_a_stages_options_as_refine_spells_them(options, named):
    import re

    from cryorefine.refine.options import defaults, refine_config

    with pytest.raises(CryorefineError) as err:
        refine_config({**defaults(), "iter": 1, **options})
    assert set(re.findall(r"--[a-z0-9]+", str(err.value))) == named, str(err.value)


#: stage options that refine sets by other means or not at all, and why
REFINE_LEAVES = {
    "project3d.seed": "the run's --seed seeds each half's orientations",
    "simmx.chunk": "sized from the memory model",
    "make3d.automask3d": "refine's --automask3d masks threed_filt, after make3d",
    "make3d.use_ctf": "always the particles' CTF",
    "make3d.use_weights": "always the metadata's weights",
    "make3d.mask_sphere": "always on",
    "make3d.wiener": "always on",
    "make3d.oversample_2d": "always on",
}


def test_every_stage_option_is_set_by_a_refine_option_or_named_as_left_to_the_stage():
    """Each option a stage config declares is reached from refine (an Option's target or
    FIXED) or listed above with the reason; a new stage option cannot go unexposed or
    unexplained."""
    from cryorefine.refine.options import FIXED, OPTIONS, STAGE_CONFIGS

    targets = {t for o in OPTIONS for t, _ in o.targets} | set(FIXED)
    declared = {f"{s}.{f.name}" for s, c in STAGE_CONFIGS.items() for f in c.options()}
    assert declared - targets == set(REFINE_LEAVES), declared - targets
    assert not targets - declared - {t for t in targets if t.startswith("refine.")}


def test_refine_help_names_a_stage_options_neighbours_as_refine_spells_them():
    """--classkeep's help (class averaging's --keep, declared once on the stage config)
    points to --classkeepsig, never to the stage's --keepsig."""
    from cryorefine.refine.options import BY_NAME, help_text

    assert "--classkeepsig" in help_text(BY_NAME["classkeep"])
    assert "--keepsig" not in help_text(BY_NAME["classkeep"]).replace("--classkeepsig", "")
    assert "--simalign" in help_text(BY_NAME["simralign"])

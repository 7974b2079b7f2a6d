"""What an e2refine user expects of ``cryorefine refine``: the output folder made for
them, a finished run extended, resume by file rather than by spelling, old parameter
records read, a model at another pixel size fitted, bad combinations refused up front
and zero defaults shown. Data: 60 particles of 32 px at 6 Å/px, CTF, SNR 1; the start
map is the truth at 3 Å/px and 64 px, so every run fits it to the particles."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cryorefine.errors import CryorefineError, CryorefineWarning
from cryorefine.fourier.fft import clip_center, rescale_to_box, resize_fourier
from cryorefine.fourier.filters import lowpass_gauss
from cryorefine.io.maps import Map, read_map, write_map
from cryorefine.io.stacks import write_stack
from cryorefine.refine import driver
from cryorefine.refine.driver import PARMS, prepare
from cryorefine.testing import demo_map, refine_command, simulate_particles

FAST = (
    "--orientgen",
    "eman:delta=30:perturb=1",
    "--simalign",
    "rotate_translate_flip:maxshift=2",
    "--classaverager",
    "ctf.weight",
    "--inires",
    "25",
    "--seed",
    "3",
    "--earlystop",
    "0",
)
BOX, APIX = 32, 6.0
#: start.mrc is fitted to the particles in every run; tests that are not about that
#: let its warning pass (``pytest.warns`` still sees it)
pytestmark = pytest.mark.filterwarnings("ignore:--model .* resampled:UserWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """particles.star (32 px, 6 Å/px, CTF), nocf.star (the same without CTF), start.mrc
    (the truth at 3 Å/px, 64 px, low-passed to 25 Å) and truth32.mrc (the particles'
    truth)."""
    folder = tmp_path_factory.mktemp("expect_data")
    truth = demo_map()
    small = resize_fourier(truth.data, BOX)
    sim = simulate_particles(
        small, 60, apix=APIX, snr=1.0, rng=np.random.default_rng(3), max_shift_a=APIX
    )
    write_stack(sim, folder / "particles.star")
    bare = simulate_particles(
        small, 8, apix=APIX, snr=1.0, rng=np.random.default_rng(4), defocus_range_um=None
    )
    write_stack(bare, folder / "noctf.star")
    start = lowpass_gauss(truth.data, truth.apix / 25.0, 3).astype(np.float32)
    write_map(folder / "start.mrc", Map(start, truth.apix))
    write_map(folder / "truth32.mrc", Map(small, APIX))
    return folder


def _opts(data: Path, **more) -> dict:
    base = {
        "input": str(data / "particles.star"),
        "model": str(data / "start.mrc"),
        "iter": 1,
        "inires": 25.0,
    }
    return {**base, **more}


def _run(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """One iteration into a --path that does not exist yet (two levels), typed relative
    to the data folder."""
    root = tmp_path_factory.mktemp("finished")
    path = root / "new" / "run"
    cmd = refine_command(Path("."), path, "--iter", "1", *FAST)
    done = _run(*cmd, cwd=data)
    assert done.returncode == 0, done.stderr
    return path


def test_path_is_created_for_the_run(finished, data):
    assert (finished / "threed_00.mrc").is_file()
    record = json.loads((finished / PARMS).read_text())
    assert Path(record["cwd"]) == data.resolve()


def test_a_refused_or_failed_start_leaves_no_folder(data, tmp_path, run_cli, monkeypatch):
    target = tmp_path / "a" / "b"
    code, _, err = run_cli(*refine_command(data, target, "--iter", "1", "--pad", "16")[3:])
    assert code == 2 and "--pad 16" in err
    assert not (tmp_path / "a").exists()

    def broken(*args, **kwargs):
        raise CryorefineError("start maps failed")

    monkeypatch.setattr(driver, "start_maps", broken)
    with pytest.warns(CryorefineWarning, match="resampled"):
        run = prepare(_opts(data, path=str(target), seed=1))
    try:
        with pytest.raises(CryorefineError, match="start maps failed"):
            driver.refine(run, progress=False)
    finally:
        run.close()
    assert not (tmp_path / "a").exists(), list(tmp_path.rglob("*"))


def _copy(finished: Path, tmp_path: Path) -> Path:
    path = tmp_path / "run"
    shutil.copytree(finished, path)
    return path


def test_a_finished_run_is_extended_as_if_run_at_once(finished, data, tmp_path):
    path = _copy(finished, tmp_path)
    more = _run(*refine_command(data, path, "--iter", "2", "--startiter", "1", *FAST))
    assert more.returncode == 0, more.stderr
    whole = tmp_path / "whole"
    at_once = _run(*refine_command(data, whole, "--iter", "2", *FAST))
    assert at_once.returncode == 0, at_once.stderr
    a, b = read_map(whole / "threed_01.mrc").data, read_map(path / "threed_01.mrc").data
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(np.abs(a).max()))
    record = json.loads((path / PARMS).read_text())
    assert record["options"]["iter"] == 2
    assert [h["iteration"] for h in record["iterations"]] == [0, 1]


def test_only_iter_may_grow(finished, data, tmp_path, run_cli):
    path = _copy(finished, tmp_path)
    common = refine_command(data, path, "--startiter", "1", *FAST)[3:]
    code, _, err = run_cli(*common, "--iter", "3", "--classkeep", "0.7")
    assert code == 2 and "--classkeep: 0.8 -> 0.7" in err and "--iter" not in err, err
    code, _, err = run_cli(*common, "--iter", "1")
    assert code == 2 and "--iter 1: nothing to run" in err, err
    record = json.loads((path / PARMS).read_text())
    record["options"]["iter"] = 4
    (path / PARMS).write_text(json.dumps(record))
    code, _, err = run_cli(*common, "--iter", "3")
    assert code == 2 and "--iter: 4 -> 3" in err, err


def test_resume_compares_files_not_spellings(finished, data, tmp_path, run_cli):
    """The run was started in the data folder with ``particles.star``; resuming from
    elsewhere with the absolute name (or ``./``) is the same file, a copy is not."""
    path = _copy(finished, tmp_path)
    copy = tmp_path / "copy.star"
    shutil.copy(data / "particles.star", copy)
    args = ["--path", path, "--startiter", "1", "--iter", "1", *FAST]
    code, _, err = run_cli("refine", "--input", copy, "--model", data / "start.mrc", *args)
    assert code == 2 and "--input" in err and "--model" not in err, err
    # the same files under other spellings: past the comparison to the --iter check
    for spelling in (data / "particles.star", data / "." / "particles.star"):
        code, _, err = run_cli("refine", "--input", spelling, "--model", data / "start.mrc", *args)
        assert code == 2 and "options differ" not in err and "--iter 1: nothing" in err, err


def test_a_record_from_before_an_option_resumes_with_its_default(finished, data, tmp_path):
    path = _copy(finished, tmp_path)
    record = json.loads((path / PARMS).read_text())
    for key in ("record_version", "cwd"):  # the version-1 layout
        del record[key]
    del record["options"]["modelapix"], record["options"]["lowmem"]  # options added since
    (path / PARMS).write_text(json.dumps(record))
    # without a recorded cwd, the relative names are read from the resuming folder
    cmd = refine_command(data, path, "--iter", "2", "--startiter", "1", *FAST)
    more = _run(*cmd, cwd=data)
    assert more.returncode == 0, more.stderr
    upgraded = json.loads((path / PARMS).read_text())
    assert upgraded["record_version"] == driver.RECORD_VERSION
    assert upgraded["options"]["modelapix"] == 0.0 and upgraded["options"]["lowmem"] is False
    # a record from a newer layout is refused, naming it
    upgraded["record_version"] = driver.RECORD_VERSION + 1
    (path / PARMS).write_text(json.dumps(upgraded))
    newer = _run(*refine_command(data, path, "--iter", "3", "--startiter", "2", *FAST))
    assert newer.returncode == 2 and "record version" in newer.stderr


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_a_model_at_another_pixel_size_is_resampled_and_clipped(finished, data, tmp_path):
    """A 64 px map at 3 Å/px on 32 px particles at 6 Å/px, and a 100 px map at 2.4 Å/px
    (wider than the particles' box: clipped), each become the 32 px truth; the console
    and run.log say so in one line."""
    truth = demo_map()
    want = resize_fourier(truth.data, BOX)
    wide, wide_apix = rescale_to_box(truth.data, truth.apix, 100, 2.4)
    write_map(tmp_path / "wide.mrc", Map(wide, wide_apix))
    write_map(tmp_path / "same.mrc", Map(truth.data, truth.apix))
    for name, words in (("same.mrc", "resampled"), ("wide.mrc", "clipped to 32 px")):
        with pytest.warns(CryorefineWarning) as caught:
            run = prepare(_opts(data, model=str(tmp_path / name)))
        run.close()
        assert len(caught) == 1 and words in str(caught[0].message)
        assert "\n" not in str(caught[0].message)
        c = _corr(run.model, want)
        print(f"{name}: correlation with the particles' truth {c:.6f}")
        assert c > 0.999, c
    log = (finished / "run.log").read_text()
    assert len([ln for ln in log.splitlines() if "warning: --model" in ln]) == 1


def test_a_model_without_pixel_size_takes_modelapix(data, tmp_path):
    truth = demo_map()
    # 48 px at 3 Å/px, header without pixel size: spans 144 Å, not the particles' 192 Å
    crop = truth.data[8:56, 8:56, 8:56].copy()
    want = resize_fourier(clip_center(crop, 64), BOX)
    write_map(tmp_path / "nopix.mrc", Map(crop, 0.0))
    assert read_map(tmp_path / "nopix.mrc", no_apix_ok=True).apix == 0.0
    with pytest.warns(CryorefineWarning, match="resampled"):
        run = prepare(_opts(data, model=str(tmp_path / "nopix.mrc"), modelapix=3.0))
    run.close()
    got = _corr(run.model, want)
    with pytest.warns(CryorefineWarning, match="give --modelapix"):
        guess = prepare(_opts(data, model=str(tmp_path / "nopix.mrc")))
    guess.close()
    guessed = _corr(guess.model, want)
    print(f"correlation with the truth: --modelapix 3 {got:.4f}; box-span guess {guessed:.4f}")
    assert got > 0.999 and guessed < 0.8, (got, guessed)


@pytest.mark.parametrize(
    "more, option",
    [
        ({}, "--simcmp frc:zeromask=1:snrweight=1"),
        ({"simcmp": "frc:zeromask=1"}, "--classcmp frc:snrweight=1"),
        ({"simcmp": "ccc", "simaligncmp": "frc:snrweight=1"}, "--simaligncmp"),
    ],
)
def test_snr_weight_without_ctf_is_refused_before_any_work(data, more, option):
    with pytest.raises(CryorefineError) as err:
        prepare(_opts(data, input=str(data / "noctf.star"), **more))
    text = str(err.value)
    assert text.startswith(option) and "8 of 8 particles" in text and "\n" not in text, text


def test_no_snr_weight_without_ctf_is_accepted(data):
    prepare(_opts(data, input=str(data / "noctf.star"), simcmp="ccc", classcmp="ccc")).close()


def test_pad_smaller_than_the_box_is_refused(data):
    with pytest.raises(CryorefineError, match=r"^--pad 31: smaller than the particles' box"):
        prepare(_opts(data, pad=31))
    prepare(_opts(data, pad=32)).close()


def test_inires_is_checked_against_nyquist_only_for_gold_standard(data):
    """Nyquist is 12 Å: --inires 10 is refused with two halves and unused (so not
    checked) with one chain."""
    with pytest.raises(CryorefineError, match=r"^--inires 10"):
        prepare(_opts(data, inires=10.0))
    prepare(_opts(data, inires=10.0, goldstandard=0)).close()


def test_help_shows_defaults_of_zero(run_cli):
    code, out, _ = run_cli("refine", "--help")
    assert code == 0
    blocks = re.split(r"\n(?=  -)", out)  # one per option
    for option, default in (
        ("shrink", "0"),
        ("twostage", "auto"),
        ("mass", "0"),
        ("modelapix", "0"),
        ("pad", "0"),
        ("classkeep", "0.8"),
    ):
        block = next(b for b in blocks if b.startswith(f"  --{option} "))
        shown = " ".join(block.split())
        assert f"(default {default})" in shown, (option, shown)


def test_classes_touched_matches_random_assignment():
    """The expected number of projections holding particles, against drawing them."""
    from cryorefine.refine.estimate import classes_touched

    rng = np.random.default_rng(0)
    for particles, n_r in ((24, 833), (400, 210), (5000, 833)):
        drawn = [
            len(np.unique(rng.integers(0, n_r, particles // 2)))
            + len(np.unique(rng.integers(0, n_r, particles // 2)))
            for _ in range(200)
        ]
        expected = classes_touched(particles, n_r, halves=2)
        assert abs(np.mean(drawn) - expected) < 0.01 * expected, (np.mean(drawn), expected)


def test_check_samples_tell_a_per_particle_from_a_per_class_cost():
    """Class averaging at 1 s + 0.01 s per particle + 0.05 s per class touched (833
    projections per half), timed on --check's samples with 3% errors: the fit predicts
    5,000 particles (1,583 classes, 130 s) within 10% for every pattern of errors. The
    same errors on samples of distinct particles alone (24, 96, 384: about as many
    classes as particles) miss by more."""
    from itertools import product

    from cryorefine.refine.estimate import SAMPLES, classes_touched, predict, stage_model
    from cryorefine.refine.step import STAGES

    cfg = driver.refine_config({"iter": 1, "twostage": 2})

    def seconds(rows: float, distinct: float) -> float:
        return 1 + 0.01 * rows + 0.05 * classes_touched(distinct, 833, 2)

    def worst_miss(design) -> float:
        worst = 0.0
        for errors in product((0.97, 1.03), repeat=len(design)):
            samples = [
                {
                    "rows": d * c,
                    "distinct": d,
                    "compared": 66.0,
                    "seconds": {
                        **dict.fromkeys(STAGES, 0.0),
                        "classaverage": e * seconds(d * c, d),
                    },
                }
                for (d, c), e in zip(design, errors, strict=True)
            ]
            got = predict(stage_model(samples, cfg, 833, 128), 833, 5000, 1)["classaverage"]
            worst = max(worst, abs(got / seconds(5000, 5000) - 1))
        return worst

    assert worst_miss(SAMPLES) < 0.10, worst_miss(SAMPLES)
    assert worst_miss(((24, 1), (96, 1), (384, 1))) > 0.10


def test_two_stage_simmx_builds_the_banks_the_estimate_counts(projections_d15, monkeypatch):
    """The full-size projection banks two-stage simmx builds for a few particles (93
    projections, one chunk): as many as --check counts from the projections each particle
    is compared with, and no more for copies of the same particles (what its samples of
    repeated particles rest on)."""
    import cryorefine.align.engine as engine
    from cryorefine.align.transform2d import apply_transform
    from cryorefine.config import SimmxConfig
    from cryorefine.refine.estimate import computed_per_row, projections_banked
    from cryorefine.stages.simmx import simmx

    built = []
    build_bank = engine.build_bank

    def counted(refs, which, *args, **kw):
        if refs.shape[-1] == projections_d15.shape[-1]:  # not the shrunk stages 1 and 2
            built.append(len(which))
        return build_bank(refs, which, *args, **kw)

    monkeypatch.setattr(engine, "build_bank", counted)
    rng = np.random.default_rng(5)
    n_r = len(projections_d15)
    cfg = SimmxConfig(aligncmp="ccc", cmp="ccc", twostage=2)
    for k in (3, 6):
        picked = projections_d15[rng.choice(n_r, k, replace=False)]
        particles = apply_transform(picked, rng.uniform(0, 360, k), 1, -1, 0)
        particles += rng.normal(0, 0.5 * particles.std(), particles.shape).astype(np.float32)
        counts = []
        for copies in (1, 3):
            built.clear()
            sim = simmx(projections_d15, np.repeat(particles, copies, axis=0), cfg, apix=3.0)
            counts.append(sum(built))
        m = computed_per_row(sim.score)
        expected = projections_banked(k, k, n_r, 1, m, chunk=10**6)
        assert counts[1] == counts[0], counts
        assert abs(counts[0] - expected) <= 0.15 * expected, (k, m, counts[0], expected)
        assert counts[0] < 0.9 * n_r  # the search does not bank every projection

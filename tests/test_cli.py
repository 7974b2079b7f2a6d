"""The command line: successful runs and every bad-input case (exit 2, one line)."""

import h5py
import mrcfile
import numpy as np
import pytest

from cryorefine.fourier.ctf import CTFParams
from cryorefine.io.maps import Map, read_map, write_map
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.mrc import write_mrc
from cryorefine.io.stacks import ParticleStack, write_stack


def assert_one_line_error(result, *fragments):
    code, out, err = result
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cryorefine: error: ")
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture
def ctf_star(in_tmp, rng):
    k, n = 6, 32
    meta = ParticleMetadata.empty(k, apix=2.0)
    meta.ctf = CTFParams(
        rng.uniform(1e4, 2e4, k), rng.uniform(1e4, 2e4, k), 0, 300, 2.7, 0.1, 0, 0, 1
    )
    images = rng.standard_normal((k, n, n)).astype(np.float32)
    write_stack(ParticleStack.from_arrays(images, apix=2.0, meta=meta), "ptcls.star")
    write_map("model.mrc", Map(rng.standard_normal((n, n, n)).astype(np.float32), 2.0))
    return in_tmp


# --- successful runs ---------------------------------------------------------------------


def test_convert_between_formats(ctf_star, run_cli):
    code, out, _ = run_cli("convert", "ptcls.star", "ptcls.hdf")
    assert code == 0 and "6 particles" in out
    assert run_cli("convert", "ptcls.hdf", "ptcls.lst")[0] == 0
    assert run_cli("convert", "ptcls.lst", "back.star")[0] == 0
    a = ParticleStack.from_path("ptcls.star")
    b = ParticleStack.from_path("back.star")
    assert np.array_equal(a.read(), b.read())
    # V > U comes back as U > V with the angle turned by 90 deg: the same CTF
    np.testing.assert_allclose(
        b.meta.ctf.evaluate(32, 2.0), a.meta.ctf.evaluate(32, 2.0), atol=1e-4
    )
    assert run_cli("convert", "model.mrc", "model.hdf")[0] == 0
    assert run_cli("convert", "model.hdf", "model2.mrc")[0] == 0
    assert np.array_equal(read_map("model2.mrc").data, read_map("model.mrc").data)
    assert read_map("model2.mrc").apix == 2.0
    assert run_cli("python-m-is-the-same", "x")[0] == 2  # unknown subcommand


def test_process_ctf_and_check(ctf_star, run_cli):
    code, _, _ = run_cli(
        "process",
        "model.mrc",
        "lp.mrc",
        "--process",
        "filter.lowpass.gauss:cutoff_res=10",
        "--process",
        "normalize",
    )
    assert code == 0
    lp = read_map("lp.mrc").data
    assert abs(lp.mean()) < 1e-5 and lp.std() == pytest.approx(1, rel=1e-3)
    code, _, _ = run_cli("process", "ptcls.star", "norm.star", "--process", "normalize.edgemean")
    assert code == 0 and ParticleStack.from_path("norm.star").meta.ctf.known.all()
    code, _, _ = run_cli("ctf", "ptcls.star", "flip.mrcs", "--mode", "flip")
    assert code == 0
    with mrcfile.open("flip.mrcs") as mrc:
        flipped = mrc.data.copy()
    original = ParticleStack.from_path("ptcls.star").read()
    ratio = np.abs(np.fft.rfft2(flipped)) / np.maximum(np.abs(np.fft.rfft2(original)), 1e-6)
    assert np.median(ratio) == pytest.approx(1.0, abs=1e-3)  # flipping keeps amplitudes
    code, out, _ = run_cli(
        "check", "--input", "ptcls.star", "--model", "model.mrc", "--require", "ctf"
    )
    assert code == 0 and "6 particles of 32 px at 2.0000" in out and "CTF: yes" in out


def check_demo_outputs(folder, out: str, *, max_truth_res: float, max_angle: float) -> None:
    """Read the demo's files: the refinement's record, final map and poses against the
    truth, its report; and what it printed."""
    import json

    from cryorefine.fourier.fsc import fsc, resolution_at
    from cryorefine.geometry.symmetry import symmetry_group
    from cryorefine.io.maps import read_map
    from cryorefine.io.stacks import ParticleStack
    from cryorefine.testing import demo_map

    truth = demo_map()
    record = json.loads((folder / "refine" / "0_refine_parms.json").read_text())
    last = record["iterations"][-1]
    k = f"{last['iteration']:02d}"
    final = read_map(folder / "refine" / f"threed_{k}.mrc")
    assert final.apix == truth.apix
    res = resolution_at(fsc(final.data, truth.data), threshold=0.143, apix=truth.apix)
    assert res < max_truth_res, res
    assert 2 * truth.apix <= last["resolution"] < 2.5 * max_truth_res
    sim = ParticleStack.from_path(folder / "particles.star")
    got = ParticleStack.from_path(folder / "refine" / f"particles_{k}.star")
    assert len(got) == len(sim) and np.array_equal(got.read(np.arange(3)), sim.read(np.arange(3)))
    angle = symmetry_group("c1").angle_between(got.meta.rotations, sim.meta.rotations)
    assert np.median(angle) < max_angle, np.median(angle)
    sim.close(), got.close()
    assert (folder / "refine" / "report.html").is_file()
    lines = out.splitlines()
    assert sum(ln.startswith("iteration ") for ln in lines) == len(record["iterations"])
    assert any("half maps FSC 0.143 at" in ln and "map vs truth" in ln for ln in lines)
    assert any(ln.startswith("report: ") for ln in lines)


def test_demo_runs_a_refinement(in_tmp, run_cli):
    code, out, err = run_cli("demo", "--out", "d", "--n", "300", "--snr", "0.5", "--iter", "2")
    assert code == 0, err
    check_demo_outputs(in_tmp / "d", out, max_truth_res=14.0, max_angle=10.0)
    assert run_cli("demo", "--out", "d", "--n", "300")[0] == 2  # no silent overwrite


@pytest.mark.slow
def test_demo_with_its_defaults(in_tmp, run_cli):
    """The README's demo as a user runs it."""
    code, out, err = run_cli("demo", "--out", "d")
    assert code == 0, err
    check_demo_outputs(in_tmp / "d", out, max_truth_res=8.5, max_angle=5.0)


# --- bad input: one line, exit 2 -----------------------------------------------------


def test_missing_file(in_tmp, run_cli):
    assert_one_line_error(
        run_cli("convert", "nothing.star", "out.hdf"), "nothing.star", "no such file"
    )
    assert_one_line_error(run_cli("check", "--input", "nothing.mrcs"), "nothing.mrcs")


def test_truncated_and_corrupt_mrc(in_tmp, run_cli, rng):
    write_mrc("t.mrcs", rng.standard_normal((4, 16, 16)), apix=1.0, stack=True)
    raw = (in_tmp / "t.mrcs").read_bytes()
    (in_tmp / "t.mrcs").write_bytes(raw[:-100])
    assert_one_line_error(run_cli("check", "--input", "t.mrcs"), "t.mrcs", "truncated")
    (in_tmp / "junk.mrc").write_bytes(bytes(range(256)) * 8)
    assert_one_line_error(
        run_cli("process", "junk.mrc", "o.mrc", "--process", "normalize"), "junk.mrc"
    )


def test_truncated_and_corrupt_hdf(in_tmp, run_cli, rng):
    write_stack(ParticleStack.from_arrays(rng.standard_normal((20, 32, 32)), apix=1.0), "p.hdf")
    raw = (in_tmp / "p.hdf").read_bytes()
    (in_tmp / "cut.hdf").write_bytes(raw[: len(raw) // 2])
    assert_one_line_error(run_cli("check", "--input", "cut.hdf"), "cut.hdf")
    (in_tmp / "junk.hdf").write_bytes(b"\0" * 1000)
    assert_one_line_error(run_cli("convert", "junk.hdf", "x.star"), "junk.hdf", "not an HDF5 file")
    with h5py.File("other.hdf", "w") as f:
        f["x"] = np.zeros(2)
    assert_one_line_error(run_cli("convert", "other.hdf", "x.star"), "not an EMAN2 image file")


def test_box_and_pixel_size_mismatch(ctf_star, run_cli, rng):
    write_map("big.mrc", Map(np.zeros((48, 48, 48), np.float32), 2.0))
    assert_one_line_error(
        run_cli("check", "--input", "ptcls.star", "--model", "big.mrc"),
        "big.mrc",
        "box 48 px differs",
        "32 px",
    )
    write_map("fine.mrc", Map(np.zeros((32, 32, 32), np.float32), 1.0))
    assert_one_line_error(
        run_cli("check", "--input", "ptcls.star", "--model", "fine.mrc"),
        "fine.mrc",
        "pixel size 1.0000",
        "2.0000",
    )


def test_non_square_images_and_non_cubic_map(in_tmp, run_cli):
    write_mrc("rect.mrcs", np.zeros((3, 16, 20)), apix=1.0, stack=True)
    assert_one_line_error(
        run_cli("convert", "rect.mrcs", "r.star"), "rect.mrcs", "only square images"
    )
    write_mrc("brick.mrc", np.zeros((16, 16, 20)), apix=1.0)
    assert_one_line_error(run_cli("convert", "brick.mrc", "b.hdf"), "brick.mrc", "cubic")


def test_nan_and_inf_values(in_tmp, run_cli, rng):
    data = rng.standard_normal((4, 16, 16)).astype(np.float32)
    data[3, 1, 1] = np.nan
    vol = np.ones((16, 16, 16), np.float32)
    vol[0, 0, 0] = np.inf
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        write_mrc("nan.mrcs", data, apix=1.0, stack=True)
        write_mrc("inf.mrc", vol, apix=1.0)
    assert_one_line_error(run_cli("check", "--input", "nan.mrcs"), "nan.mrcs image 4", "NaN or Inf")
    assert_one_line_error(run_cli("convert", "nan.mrcs", "n.hdf"), "NaN or Inf")
    assert not (in_tmp / "n.hdf").exists()  # nothing half-written is left behind
    assert [p.name for p in in_tmp.iterdir() if "partial" in p.name] == []
    assert_one_line_error(
        run_cli("process", "inf.mrc", "o.mrc", "--process", "normalize"), "inf.mrc", "NaN or Inf"
    )


def test_star_without_the_columns_a_command_needs(in_tmp, run_cli, rng):
    write_mrc("s.mrcs", rng.standard_normal((2, 8, 8)), apix=1.0, stack=True)
    (in_tmp / "noctf.star").write_text("data_\n\nloop_\n_rlnImageName #1\n1@s.mrcs\n2@s.mrcs\n")
    assert_one_line_error(
        run_cli("ctf", "noctf.star", "f.mrcs"), "noctf.star", "no CTF parameters", "rlnDefocusU"
    )
    assert_one_line_error(
        run_cli("check", "--input", "noctf.star", "--require", "orientations"),
        "noctf.star",
        "rlnAngleRot",
    )
    (in_tmp / "noname.star").write_text("data_\n\nloop_\n_rlnDefocusU #1\n10000\n")
    assert_one_line_error(run_cli("convert", "noname.star", "x.hdf"), "noname.star", "rlnImageName")


def test_unknown_option_names_and_keys(in_tmp, run_cli):
    write_map("m.mrc", Map(np.zeros((8, 8, 8), np.float32), 1.0))
    assert_one_line_error(
        run_cli("process", "m.mrc", "o.mrc", "--process", "filter.lowpass.gaus"),
        "--process",
        "unknown processor 'filter.lowpass.gaus'",
        "filter.lowpass.gauss",
    )
    assert_one_line_error(
        run_cli("process", "m.mrc", "o.mrc", "--process", "filter.lowpass.gauss:cutof=0.1"),
        "--process",
        "unknown parameter 'cutof'",
        "cutoff_abs",
    )
    assert_one_line_error(
        run_cli("process", "m.mrc", "o.mrc", "--process", "normalize:x"),
        "must have the form key=value",
    )
    assert_one_line_error(run_cli("check", "--input", "m.mrc", "--require", "ctff"), "ctff")
    code, _, err = run_cli("convert", "m.mrc", "o.mrc", "--frobnicate")
    assert code == 2 and "unrecognized arguments: --frobnicate" in err


def test_existing_output_is_not_overwritten(ctf_star, run_cli):
    before = (ctf_star / "model.mrc").read_bytes()
    write_map("other.mrc", Map(np.ones((32, 32, 32), np.float32), 2.0))
    assert_one_line_error(run_cli("convert", "other.mrc", "model.mrc"), "model.mrc", "exists")
    assert (ctf_star / "model.mrc").read_bytes() == before
    assert run_cli("convert", "other.mrc", "model.mrc", "--overwrite")[0] == 0
    assert read_map("model.mrc").data.max() == 1.0


def test_verbose_shows_the_traceback(in_tmp, run_cli):
    code, _, err = run_cli("convert", "nothing.star", "out.hdf", "--verbose")
    assert code == 2 and "Traceback" in err and "nothing.star: no such file" in err


# --- project3d and simulate ----------------------------------------------------------


@pytest.mark.parametrize("suffix", [".star", ".hdf", ".lst"])
def test_project3d_writes_orientations_in_every_format(in_tmp, run_cli, rnapol2_64, suffix):
    from cryorefine.geometry.orientations import orientations

    code, _, err = run_cli(
        "project3d",
        "--model",
        rnapol2_64,
        "--out",
        f"proj{suffix}",
        "--sym",
        "d7",
        "--orientgen",
        "eman:delta=10:perturb=0",
        "--postprocess",
        "normalize.circlemean",
    )
    assert code == 0, err
    stack = ParticleStack.from_path(f"proj{suffix}")
    expected = orientations("eman:delta=10:perturb=0", "d7")
    assert len(stack) == 27 == len(expected)
    np.testing.assert_allclose(stack.meta.rotations, expected, atol=2e-6)
    assert stack.apix == 3.0 and stack.box == 64
    images = stack.read()
    np.testing.assert_allclose(images.reshape(27, -1).std(axis=1, ddof=1), 1.0, rtol=1e-4)
    stack.close()


def test_simulate_writes_the_ground_truth(in_tmp, run_cli, rnapol2_64):
    from cryorefine.fourier.project import project

    code, out, err = run_cli(
        "simulate",
        "--model",
        rnapol2_64,
        "--n",
        "120",
        "--snr",
        "0.5",
        "--max-shift",
        "9",
        "--out",
        "sim.star",
        "--seed",
        "4",
    )
    assert code == 0, err
    stack = ParticleStack.from_path("sim.star")
    meta = stack.meta
    assert len(stack) == 120 and stack.apix == 3.0
    assert meta.ctf.known.all() and meta.has_orientation.all()
    assert set(meta.half_set.tolist()) == {1, 2}
    assert np.linalg.norm(meta.shift_a, axis=1).max() <= 9.0 + 1e-6
    defocus = (meta.ctf.defocus_u_a + meta.ctf.defocus_v_a) / 2
    assert 1e4 <= defocus.min() and defocus.max() <= 2.5e4
    # the images are the truth's projections plus noise at the stated SNR
    volume = read_map(rnapol2_64)
    clean = project(
        volume.data, meta.rotations, shifts_px=meta.shift_a / 3.0, ctf=meta.ctf, apix=3.0
    )
    noise = stack.read() - clean
    snr = clean.var(axis=(1, 2)).mean() / noise.var()
    assert snr == pytest.approx(0.5, rel=0.1)
    assert abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]) < 0.1
    stack.close()
    # orientations taken from a STAR file
    code, _, err = run_cli(
        "simulate", "--model", rnapol2_64, "--angles", "sim.star", "--no-ctf", "--out", "again.star"
    )
    assert code == 0, err
    again = ParticleStack.from_path("again.star")
    np.testing.assert_allclose(again.meta.rotations, meta.rotations, atol=1e-5)
    assert not again.meta.ctf.known.any()


def test_projection_and_simulation_errors(in_tmp, run_cli, rnapol2_64):
    assert_one_line_error(
        run_cli("project3d", "--model", rnapol2_64, "--out", "p.star", "--sym", "q5"),
        "--sym",
        "'q5'",
    )
    assert_one_line_error(
        run_cli(
            "project3d",
            "--model",
            rnapol2_64,
            "--out",
            "p.star",
            "--orientgen",
            "eman:delta=5:mirror=1",
        ),
        "--orientgen",
        "unknown parameter 'mirror'",
        "inc_mirror",
    )
    assert_one_line_error(
        run_cli("project3d", "--model", rnapol2_64, "--out", "p.star", "--projector", "gauss_fft"),
        "--projector",
        "unknown projector 'gauss_fft'",
        "fourier",
    )
    assert_one_line_error(
        run_cli("project3d", "--model", "none.mrc", "--out", "p.star"), "none.mrc"
    )
    assert_one_line_error(
        run_cli("simulate", "--model", rnapol2_64, "--out", "s.mrcs"), "must be a .star"
    )
    assert_one_line_error(
        run_cli("simulate", "--model", rnapol2_64, "--out", "s.star", "--snr", "0"), "--snr"
    )


def test_make3d_and_fsc_commands(in_tmp, run_cli, rnapol2_64):
    code, _, err = run_cli(
        "simulate", "--model", rnapol2_64, "--n", "400", "--snr", "1", "--out", "s.star"
    )
    assert code == 0, err
    code, out, err = run_cli("make3d", "--input", "s.star", "--output", "m.mrc")
    assert code == 0 and "400 images inserted" in out and "CTF on" in out, err
    code, out, err = run_cli("fsc", "m.mrc", rnapol2_64, "--out", "cmp")
    assert code == 0, err
    import starfile

    general = starfile.read(in_tmp / "cmp.star", always_dict=True)["general"]
    res143 = float(general["rlnFinalResolution"])
    assert 6.0 <= res143 < 12.0
    assert f"{res143:.2f}" in out  # the printed figure is the file's
    lines = (in_tmp / "cmp.txt").read_text().splitlines()
    assert len(lines) == 32 and lines[0].split("\t")[0] == f"{1 / (64 * 3.0):g}"
    assert (in_tmp / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "_rlnFourierShellCorrelation" in (in_tmp / "cmp.star").read_text()
    code, _, _ = run_cli(
        "make3d",
        "--input",
        "s.star",
        "--output",
        "m.hdf",
        "--sym",
        "c2",
        "--recon",
        "fourier:mode=gauss_2",
    )
    assert code == 0 and read_map("m.hdf").apix == 3.0


def test_make3d_and_fsc_errors(in_tmp, run_cli, rng):
    write_mrc("p.mrcs", rng.standard_normal((4, 16, 16)), apix=1.0, stack=True)
    assert_one_line_error(
        run_cli("make3d", "--input", "p.mrcs", "--output", "m.mrc"),
        "p.mrcs",
        "no image has an orientation",
    )
    assert_one_line_error(
        run_cli(
            "make3d", "--input", "p.mrcs", "--output", "m.mrc", "--recon", "fourier:mode=cubic"
        ),
        "mode 'cubic'",
    )
    write_map("a.mrc", Map(np.zeros((16, 16, 16), np.float32), 1.0))
    write_map("b.mrc", Map(np.zeros((20, 20, 20), np.float32), 1.0))
    assert_one_line_error(run_cli("fsc", "a.mrc", "b.mrc"), "b.mrc", "box 20 px differs")


def test_make3d_keep_through_the_command_line(in_tmp, run_cli, rnapol2_64):
    code, _, err = run_cli(
        "project3d",
        "--model",
        rnapol2_64,
        "--out",
        "p.hdf",
        "--orientgen",
        "eman:delta=12:perturb=0",
    )
    assert code == 0, err
    code, out, err = run_cli(
        "make3d",
        "--input",
        "p.hdf",
        "--output",
        "m.mrc",
        "--iter",
        "2",
        "--keep",
        "0.8",
        "--keepabs",
    )
    n = len(ParticleStack.from_path("p.hdf"))
    assert code == 0 and f"{n - int(0.2 * n + 0.999)} images inserted" in out, (out, err)
    assert_one_line_error(
        run_cli("make3d", "--input", "p.hdf", "--output", "x.mrc", "--keep", "1.5"), "--keep 1.5"
    )


def test_make3d_automask3d(in_tmp, run_cli, rnapol2_64):
    code, _, err = run_cli(
        "project3d",
        "--model",
        rnapol2_64,
        "--out",
        "p.star",
        "--orientgen",
        "eman:delta=8:perturb=0",
    )
    assert code == 0, err
    plain = "plain.mrc"
    assert run_cli("make3d", "--input", "p.star", "--output", plain)[0] == 0
    level = float(np.percentile(read_map(plain).data, 90))
    code, _, err = run_cli(
        "make3d", "--input", "p.star", "--output", "masked.mrc", "--automask3d", f"{level},4,2,3,0"
    )
    assert code == 0, err
    masked, full = read_map("masked.mrc").data, read_map(plain).data
    assert (masked == 0).mean() > 0.3  # the solvent is cut away ...
    core = full > 2 * level
    np.testing.assert_allclose(masked[core], full[core], rtol=0.02)  # ... the particle kept
    assert_one_line_error(
        run_cli("make3d", "--input", "p.star", "--output", "x.mrc", "--automask3d", "1,2,3"),
        "--automask3d",
        "threshold,radius",
    )


def test_fsc_command_gives_the_analytic_curve_for_added_noise(in_tmp, run_cli, rnapol2_64):
    from cryorefine.fourier.filters import radial_power

    truth = read_map(rnapol2_64)
    noise = np.random.default_rng(4).standard_normal(truth.data.shape) * truth.data.std()
    write_map("noisy.mrc", Map((truth.data + noise).astype(np.float32), truth.apix))
    code, _, err = run_cli("fsc", rnapol2_64, "noisy.mrc", "--out", "curve")
    assert code == 0, err
    table = np.loadtxt(in_tmp / "curve.txt")
    ps, pn = radial_power(truth.data, 3), radial_power(noise, 3)
    expected = np.sqrt(ps / (ps + pn))[1:]  # correlation of S with S + N, shells 1..n/2
    np.testing.assert_allclose(table[:, 0], np.arange(1, 33) / (64 * truth.apix), rtol=1e-5)
    np.testing.assert_allclose(table[:, 1], expected, atol=0.05)


@pytest.mark.parametrize(
    "command, option, kind",
    [
        ("classaverage", "--averager", "averagers"),
        ("classaverage", "--align", "aligners"),
        ("classaverage", "--ralign", "aligners"),
        ("classaverage", "--aligncmp", "comparators"),
        ("simmx", "--align", "aligners"),
        ("simmx", "--ralign", "aligners"),
        ("simmx", "--aligncmp", "comparators"),
        ("make3d", "--recon", "reconstructors"),
        ("project3d", "--projector", "projectors"),
        ("project3d", "--orientgen", "orientgens"),
    ],
)
def test_help_lists_what_is_registered(monkeypatch, command, option, kind):
    """A stage command's help lists the names its registry holds: an entry registered
    now shows up there (a hard-coded list would not have it), and every name listed is
    registered."""
    import argparse
    import re

    from cryorefine.cli import build_parser
    from cryorefine.registry import REGISTRIES, Entry

    registry = REGISTRIES[kind]
    monkeypatch.setitem(registry._entries, "zz_new", Entry("zz_new", "new", (), lambda: None))

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = sub.choices[command]._option_string_actions[option]
    listed = re.search(r": ([\w.]+(?:, [\w.]+)*); see cryorefine help " + kind, action.help)
    assert listed is not None, action.help
    assert listed.group(1).split(", ") == registry.names(), action.help
    assert "zz_new" in registry.names()

"""A refinement's stage files in EMAN2's layouts (spec ch03 §2.3, §6.4; ch04 §4.1.7;
ch01 §4.2), and the EMAN2 lines of ``run.log``.

Without EMAN2 the layouts are checked with h5py against the spec's tables; where EMAN2
is installed (``../shared/eman2/build.sh``; tests marked ``eman2``) its own programs
read our files and run every line ``run.log`` gives them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import starfile

from cryorefine.cli import main
from cryorefine.fourier.filters import lowpass_gauss
from cryorefine.io.eman2 import HdfImages, split_projection_transform
from cryorefine.io.lst import read_lst
from cryorefine.io.maps import Map, write_map
from cryorefine.io.stacks import ParticleStack, write_stack
from cryorefine.stages.classify import read_classmx
from cryorefine.stages.simmx import read_simmx
from cryorefine.testing import demo_map, simulate_particles

from .conftest import eman2_bin

HALVES = ("_even", "_odd")
#: a small refinement: 20-degree grid (about 50 projections per half), 2 iterations;
#: the two-stage search, so that the matrices hold cells it did not compute
OPTIONS = (
    "--orientgen",
    "eman:delta=20:perturb=1",
    "--twostage",
    "2",
    "--simalign",
    "rotate_translate_flip:maxshift=3",
    "--classaverager",
    "ctf.weight",
    "--localrefine",
    "0",
    "--iter",
    "2",
    "--seed",
    "3",
)
#: one single-chain run of the other paths: usefilt, class averages to the map, --mass
OTHER = (
    "--goldstandard",
    "0",
    "--usefilt",
    "filt.star",
    "--m3dsource",
    "classes",
    "--mass",
    "500",
    "--apix",
    "3",
    "--twostage",
    "0",
    "--m3dpostprocess",
    "filter.lowpass.gauss:cutoff_freq=0.1",
    "--m3dpostprocess2",
    "filter.lowpass.gauss:cutoff_freq=0.1",
)


def _make_data(folder: Path, n: int) -> None:
    truth = demo_map()
    sim = simulate_particles(
        truth.data, n, apix=truth.apix, snr=0.5, rng=np.random.default_rng(4), max_shift_a=6.0
    )
    write_stack(sim, folder / "ptcl.star")
    filt = ParticleStack.from_arrays(
        lowpass_gauss(sim.read(), truth.apix / 12.0, 2).astype(np.float32),
        apix=truth.apix,
        meta=sim.meta,
    )
    write_stack(filt, folder / "filt.star")
    start = lowpass_gauss(truth.data, truth.apix / 25.0, 3).astype(np.float32)
    write_map(folder / "start.mrc", Map(start, truth.apix))


def _refine_in(folder: Path, name: str, *options: str) -> Path:
    """Run a refinement from ``folder`` (its working directory: run.log's paths and the
    particle sets' are relative to it) into ``folder/name``."""
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        args = ["refine", "--input", "ptcl.star", "--model", "start.mrc", "--path", name]
        assert main([*args, *OPTIONS, *options]) == 0
    finally:
        os.chdir(cwd)
    return folder / name


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder: 120 simulated particles (with CTF), their low-passed copy, a
    start map, and two refinements: ``r`` (gold standard) and ``s`` (:data:`OTHER`)."""
    folder = tmp_path_factory.mktemp("eman2_files")
    _make_data(folder, 120)
    _refine_in(folder, "r")
    _refine_in(folder, "s", *OTHER)
    return folder


def _images(path: Path) -> list[np.ndarray]:
    """Every image of an EMAN2 ``.hdf`` file, read with h5py alone."""
    with h5py.File(path) as f:
        g = f["MDF/images"]
        return [g[f"{i}/image"][()] for i in range(int(g.attrs["imageid_max"][0]) + 1)]


def _attrs(path: Path, i: int) -> dict:
    with h5py.File(path) as f:
        return {k[5:]: v for k, v in f[f"MDF/images/{i}"].attrs.items()}


def _text(value) -> str:
    return bytes(value).rstrip(b"\0").decode()


def _listed(value) -> list:
    """A list-valued header key as a list (EMAN2 reads one number back as a number, and
    stores no empty list)."""
    return [] if value is None else value if isinstance(value, list) else [value]


def _half_rows(project: Path) -> list[np.ndarray]:
    """Each half's particles (0-based, in order), from particles_00.star alone."""
    table = starfile.read(project / "r" / "particles_00.star")["particles"]
    return [np.flatnonzero(table["rlnRandomSubset"].to_numpy() == h) for h in (1, 2)]


def test_matrices_have_eman2s_layout(project):
    """simmx: 6 float32 images, projections across (nx) by the half's particles down
    (ny), projection_file and particle_file on image 0; classify: 7 images of one
    column whose class is the row's first lowest score (e2classify's rule, computed
    here from the raw planes) and whose planes 2-6 are simmx's 1-5 there; cls_result:
    the same classes, plane 1 the 1/0 flag that matches crIncluded of
    particles_00.star."""
    r = project / "r"
    table = starfile.read(r / "particles_00.star")["particles"]
    n_r = len(_images(r / "projections_00_even.hdf"))
    for s, rows in zip(HALVES, _half_rows(project), strict=True):
        sim = _images(r / f"simmx_00{s}.hdf")
        assert len(sim) == 6
        assert all(p.shape == (len(rows), n_r) and p.dtype == np.float32 for p in sim)
        head = _attrs(r / f"simmx_00{s}.hdf", 0)
        assert head["nx"][0] == n_r and head["ny"][0] == len(rows)
        assert _text(head["projection_file"]) == f"r/projections_00{s}.hdf"
        assert _text(head["particle_file"]) == f"r/particles{s}.lst"
        assert head["minimum"][0] == pytest.approx(sim[0].min())
        score, dx, dy, alpha, flip, scale = sim
        assert np.isfinite(score).all() and ((alpha >= 0) & (alpha < 360)).all()
        assert set(np.unique(flip)) <= {0.0, 1.0} and (scale == 1).all()
        cls = _images(r / f"classify_00{s}.hdf")
        assert len(cls) == 7 and all(p.shape == (len(rows), 1) for p in cls)
        best = np.argmin(score, axis=1)
        assert np.array_equal(cls[0][:, 0], best.astype(np.float32))
        assert (cls[1] == 1).all()
        pick = np.arange(len(rows)), best
        for plane, source in zip(cls[2:], sim[1:], strict=True):
            assert np.array_equal(plane[:, 0], source[pick])
        res = _images(r / f"cls_result_00{s}.hdf")
        assert np.array_equal(res[0], cls[0])
        assert np.array_equal(res[1][:, 0], table["crIncluded"].to_numpy()[rows].astype(np.float32))
        assert 0.5 < res[1].mean() < 1.0  # some members rejected (--classkeep 0.8)


def test_particle_sets_list_each_halfs_particles_with_their_ctf(project):
    """particles_even.lst record i is the i-th particle of half 1 in particles_00.star:
    the same image of the same file, its defocus, and an SNR curve over the box."""
    r = project / "r"
    table = starfile.read(r / "particles_00.star")["particles"]
    names = table["rlnImageName"].to_numpy()
    defocus = (table["rlnDefocusU"].to_numpy() + table["rlnDefocusV"].to_numpy()) / 2e4
    for s, rows in zip(HALVES, _half_rows(project), strict=True):
        records = read_lst(r / f"particles{s}.lst")
        assert len(records) == len(rows)
        for rec, i in zip(records, rows, strict=True):
            number, file = names[i].split("@")
            assert (rec.n + 1, rec.path) == (int(number), file)
            assert rec.params["ctf"].defocus == pytest.approx(defocus[i], rel=1e-6)
            assert len(rec.params["ctf"].snr) == 32 and rec.params["ctf"].dsbg == 1 / 192


def test_projections_and_class_averages_in_hdf(project, monkeypatch):
    """projections_00_even.hdf and classes_00_even.hdf: the .mrcs pixels exactly
    (float32, no quantisation); each projection's xform.projection that of the
    .star, ptcl_repr 0; each average the projection it was aligned to (xform.projection,
    projection_image, projection_image_idx), its members and rejected members as
    numbers in particles_even.lst (those cls_result_00_even.hdf flags 1 and 0 in that
    class), ptcl_repr their count; a blank average without xform.projection."""
    monkeypatch.chdir(project)  # the .star files name their images from there
    r = project / "r"
    for s in HALVES:
        proj_star = ParticleStack.from_path(r / f"projections_00{s}.star")
        classes_star = ParticleStack.from_path(r / f"classes_00{s}.star")
        res = _images(r / f"cls_result_00{s}.hdf")
        cls, used = res[0][:, 0].astype(int), res[1][:, 0] > 0
        with HdfImages(r / f"projections_00{s}.hdf") as f:
            assert f.count == len(proj_star)
            assert np.array_equal(f.images(np.arange(f.count)), proj_star.read())
            for i in range(f.count):
                h = f.header(i)
                rot, shift = split_projection_transform(h["xform.projection"])
                np.testing.assert_allclose(rot, proj_star.meta.rotations[i], atol=1e-6)
                assert (h["ptcl_repr"], h["model_id"], h["apix_x"], h["apix_z"]) == (0, 0, 3, 3)
        with HdfImages(r / f"classes_00{s}.hdf") as f:
            assert f.count == len(proj_star)
            assert np.array_equal(f.images(np.arange(f.count)), classes_star.read())
            blank = 0
            for c in range(f.count):
                h = f.header(c)
                members = np.flatnonzero((cls == c) & used)
                rejected = np.flatnonzero((cls == c) & ~used)
                assert _listed(h.get("class_ptcl_idxs")) == members.tolist()
                assert _listed(h.get("exc_class_ptcl_idxs")) == rejected.tolist()
                assert h["ptcl_repr"] == len(members)
                assert h["projection_image"] == f"r/projections_00{s}.hdf"
                assert h["projection_image_idx"] == c and h["apix_y"] == 3
                assert h["class_ptcl_src"] == f"r/particles{s}.lst"
                if len(members):
                    rot, _ = split_projection_transform(h["xform.projection"])
                    np.testing.assert_allclose(rot, proj_star.meta.rotations[c], atol=1e-6)
                else:
                    assert "xform.projection" not in h
                    blank += 1
            assert blank > 0  # 60 particles over about 50 projections: some classes empty
        proj_star.close(), classes_star.close()


_FILE = re.compile(r"[^\s=;,]+\.(?:hdf|mrc|mrcs|lst|star|txt)\b")


def _log_lines(path: Path) -> list[tuple[str, str, str]]:
    """(iteration, stage, command) of each line of run.log that gives one."""
    out = []
    for line in (path / "run.log").read_text().splitlines():
        m = re.search(r"iteration (\d\d) (\w+): [\d.]+ s; as (?:EMAN2|RELION): (.*)$", line)
        if m:
            out.append(m.groups())
    return out


@pytest.mark.parametrize("name", ["r", "s"])
def test_every_file_run_log_names_exists(project, name):
    """Every file an EMAN2 or RELION line of run.log names (before its shell comment) is
    in the project, and no EMAN2 line has e2refine's -f, which EMAN2 2.99 refuses."""
    lines = _log_lines(project / name)
    stages = {stage for _, stage, _ in lines}
    assert stages == {"project3d", "simmx", "classify", "classaverage", "make3d"}
    named = set()
    for _, _, command in lines:
        command = command.split("  # ")[0]
        assert " -f " not in f"{command} "
        named |= set(_FILE.findall(command))
    assert any(n.endswith(".lst") for n in named) and any(n.endswith(".hdf") for n in named)
    missing = sorted(n for n in named if not (project / n).is_file())
    assert not missing, missing


def test_a_new_run_never_takes_a_particle_set_it_did_not_write(project, run_cli, tmp_path):
    """A folder that already holds a particles_even.lst: the run stops with one line
    naming it, before any iteration, and leaves the file as it was."""
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "particles_even.lst").write_text("someone else's\n")
    code, _, err = run_cli(
        "refine", "--input", project / "ptcl.star", "--model", project / "start.mrc",
        "--path", folder, *OPTIONS,
    )  # fmt: skip
    assert code == 2 and "particles_even.lst" in err and len(err.strip().splitlines()) == 1
    assert (folder / "particles_even.lst").read_text() == "someone else's\n"
    assert not list(folder.glob("threed_*"))


def test_readers_take_the_h5_files_of_earlier_versions(tmp_path, run_cli, monkeypatch):
    """simmx.h5 and classmx.h5 as cryorefine 0.1 wrote them (HDF5 datasets) still read,
    and classify turns the old matrix into an EMAN2 one with each row's first minimum."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(2)
    fields = {k: rng.random((30, 12)).astype(np.float32) for k in ("score", "dx", "dy")}
    fields["dalpha"] = rng.uniform(0, 360, (30, 12)).astype(np.float32)
    fields["flip"] = rng.integers(0, 2, (30, 12)).astype(np.float32)
    fields["scale"] = np.ones((30, 12), np.float32)
    with h5py.File("old_simmx.h5", "w") as f:
        f.attrs["format"] = "cryorefine simmx 1"
        for k, v in fields.items():
            f.create_dataset(k, data=v)
    sim = read_simmx(tmp_path / "old_simmx.h5")
    assert all(np.array_equal(getattr(sim, k), v) for k, v in fields.items())
    code, _, err = run_cli("classify", "old_simmx.h5", "new.hdf")
    assert code == 0, err
    planes = _images(tmp_path / "new.hdf")
    best = np.argmin(fields["score"], axis=1)
    assert np.array_equal(planes[0][:, 0], best)
    assert np.array_equal(planes[4][:, 0], fields["dalpha"][np.arange(30), best])
    cls = np.stack([best, (best + 1) % 12], axis=1)
    with h5py.File("old_classmx.h5", "w") as f:
        f.attrs["format"] = "cryorefine classmx 1"
        f.create_dataset("cls", data=cls)
        for k in ("weight", "dx", "dy", "dalpha", "flip", "scale"):
            f.create_dataset(k, data=np.full((30, 2), 0.5, np.float32))
    old = read_classmx(tmp_path / "old_classmx.h5")
    assert np.array_equal(old.cls, cls) and (old.dalpha == 0.5).all()


def test_a_one_particle_matrix_that_eman2_stores_in_1d_reads_as_one_row(tmp_path):
    """EMAN2 stores an image of one row as a 1D dataset: a classification matrix of one
    particle (sep 2) reads as one row of two choices, every plane in its place."""
    with h5py.File(tmp_path / "one.hdf", "w") as f:
        g = f.create_group("MDF/images")
        g.attrs["imageid_max"] = np.array([6], np.int32)
        for i in range(7):
            g.create_dataset(f"{i}/image", data=np.array([10 * i + 3, 10 * i + 5], np.float32))
    cm = read_classmx(tmp_path / "one.hdf")
    assert cm.cls.tolist() == [[3, 5]] and cm.dalpha.tolist() == [[43.0, 45.0]]
    assert cm.scale.tolist() == [[63.0, 65.0]]


# --- with EMAN2 ------------------------------------------------------------------------

BIN = eman2_bin()
needs_eman2 = pytest.mark.skipif(
    BIN is None,
    reason="EMAN2 is not installed (build it with ../shared/eman2/build.sh, or put it on PATH)",
)


def _copy(project: Path, name: str, target: str) -> Path:
    """A copy of the project with refinement ``name`` (EMAN2 writes over our files)."""
    dest = project.parent / f"{project.name}_{target}"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(project, dest, ignore=shutil.ignore_patterns("r" if name == "s" else "s"))
    return dest


def _eman2(folder: Path, command: str, timeout: float = 600) -> str:
    """Run a shell line of EMAN2 commands in ``folder``; fail with its output if any fails."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["QT_QPA_PLATFORM"] = "offscreen"
    done = subprocess.run(
        ["bash", "-e", "-c", command],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{command}\n{output[-3000:]}"
    return output


def _eman2_python(folder: Path, script: str) -> object:
    """What an EMAN2 Python script prints as JSON on its last line."""
    out = _eman2(folder, f"{BIN / 'python'} - <<'EOF'\n{script}\nEOF")
    return json.loads(out.strip().splitlines()[-1])


def _command(folder: Path, name: str, iteration: str, stage: str) -> str:
    for it, st, command in _log_lines(folder / name):
        if (it, st) == (iteration, stage):
            return command
    raise AssertionError(f"no {stage} line for iteration {iteration}")


@pytest.mark.eman2
@needs_eman2
def test_e2classify_on_our_simmx_gives_our_classes(project):
    """run.log's e2classify line, run by EMAN2 on our simmx_00_even/odd.hdf, writes the
    same classes and alignments as our classify_00_even/odd.hdf, every particle."""
    copy = _copy(project, "r", "classify")
    print(_eman2(copy, _command(copy, "r", "00", "classify"))[-200:])
    for s in HALVES:
        theirs, ours = (
            _images(copy / "r" / f"classify_00{s}.hdf"),
            _images(project / "r" / f"classify_00{s}.hdf"),
        )
        assert len(theirs) == 7
        assert np.array_equal(theirs[0], ours[0]), f"{s}: {(theirs[0] != ours[0]).sum()} differ"
        for i in range(2, 7):
            assert np.array_equal(theirs[i], ours[i])
        print(s, f"{len(ours[0])} particles, all in the same class")


@pytest.mark.eman2
@needs_eman2
@pytest.mark.parametrize("extra", [(), ("--sep", "2"), ("--simvec",)])
def test_our_classify_on_e2simmx_matrix_gives_eman2s_classes(project, run_cli, extra):
    """e2simmx.py (run.log's line: our projections against our particle set) writes a
    matrix; our classify of it gives e2classify's classes for every particle."""
    copy = project.parent / f"{project.name}_e2simmx"
    if not (copy / "r" / "simmx_00_even.hdf").is_file() or not extra:
        copy = _copy(project, "r", "e2simmx")
        _eman2(copy, _command(copy, "r", "00", "simmx").split("  # ")[0])
    flags = " ".join(extra).replace("--sep 2", "--sep=2")
    counts = []
    for s in HALVES:
        _eman2(copy, f"e2classify.py r/simmx_00{s}.hdf r/eman2_classes{s}.hdf {flags}")
        code, _, err = run_cli(
            "classify", copy / f"r/simmx_00{s}.hdf", copy / f"r/ours{s}.hdf", *extra, "-f"
        )
        assert code == 0, err
        theirs, ours = _images(copy / f"r/eman2_classes{s}.hdf"), _images(copy / f"r/ours{s}.hdf")
        assert ours[0].shape == theirs[0].shape == (60, 2 if extra == ("--sep", "2") else 1)
        assert np.array_equal(theirs[0], ours[0]), f"{s}: {(theirs[0] != ours[0]).sum()} differ"
        for i in range(2, 7):
            assert np.array_equal(theirs[i], ours[i])
        counts.append(ours[0].size)
    print(extra, f"{counts} assignments (even, odd), all the same as e2classify's")


@pytest.mark.eman2
@needs_eman2
def test_e2classaverage_reads_our_classify_and_projections(project, monkeypatch):
    """run.log's e2classaverage line on our classify_00_*.hdf, projections_00_*.hdf and
    particles_*.lst: each of its averages holds exactly the particles our matrix put
    in that class (kept or rejected), and carries the xform.projection of our
    projection of that class."""
    monkeypatch.chdir(project)  # the .star files name their images from there
    copy = _copy(project, "r", "classaverage")
    _eman2(copy, _command(copy, "r", "00", "classaverage"))
    script = """
import json
from EMAN2 import EMData
out = {}
for s in ("_even", "_odd"):
    rows = []
    for im in EMData.read_images("r/classes_00%s.hdf" % s):
        d = im.get_attr_dict()
        m = d["xform.projection"].get_matrix() if "xform.projection" in d else None
        rows.append([d.get("class_ptcl_idxs", []), d.get("exc_class_ptcl_idxs", []), m])
    out[s] = rows
print(json.dumps(out))
"""
    got = _eman2_python(copy, script)
    for s in HALVES:
        cls = _images(project / "r" / f"classify_00{s}.hdf")[0][:, 0].astype(int)
        proj = ParticleStack.from_path(project / "r" / f"projections_00{s}.star")
        filled = 0
        for c, (kept, excluded, matrix) in enumerate(got[s]):
            ours = np.flatnonzero(cls == c).tolist()
            listed = sorted(_listed(kept) + _listed(excluded))
            # EMAN2 cannot average one particle with a CTF averager (it raises "Cannot
            # perform correct average of single particle") and stores a blank
            assert listed == ours or (listed == [] and len(ours) == 1), (c, listed, ours)
            if listed:
                filled += 1
                rot = np.asarray(matrix, float).reshape(3, 4)[:, :3]
                np.testing.assert_allclose(rot, proj.meta.rotations[c], atol=1e-5)
        several = int((np.bincount(cls) > 1).sum())
        assert filled == several > 10
        proj.close()
        print(s, f"{len(got[s])} averages: each of our {filled} classes of 2 or more particles")


@pytest.mark.eman2
@needs_eman2
def test_eman2_reads_our_headers(project):
    """EMAN2's own reader gives, for projections_00_even.hdf and classes_00_even.hdf,
    our xform.projection (as its Transform), ptcl_repr, class_ptcl_idxs,
    exc_class_ptcl_idxs, apix_x/y/z, projection_image(_idx), pixels, and class_ssnr
    as e2classaverage computes it from the average and its projection."""
    script = """
import json
from EMAN2 import EMData
out = {}
for name in ("r/projections_00_even.hdf", "r/classes_00_even.hdf"):
    rows = []
    for im in EMData.read_images(name):
        d = im.get_attr_dict()
        x = d.get("xform.projection")
        rows.append({
            "xform": x.get_matrix() if x is not None else None,
            "eman": x.get_params("eman") if x is not None else None,
            "ptcl_repr": d.get("ptcl_repr"),
            "idxs": d.get("class_ptcl_idxs", []),
            "exc": d.get("exc_class_ptcl_idxs", []),
            "apix": [d["apix_x"], d["apix_y"], d["apix_z"]],
            "image": d.get("projection_image"),
            "image_idx": d.get("projection_image_idx"),
            "pixels": [im.get_value_at(x, y) for x, y in ((0, 0), (31, 32), (40, 17))],
            "ssnr": d.get("class_ssnr"),
        })
        if d.get("class_ssnr") is not None:  # as e2classaverage computes it
            ref = EMData("r/projections_00_even.hdf", len(rows) - 1)
            f = im.calc_fourier_shell_correlation(ref)
            t = len(f) // 3
            f = [f[t]] * 4 + f[t : 2 * t] + [f[2 * t - 1]] * 4
            f = [sum(f[i - 4 : i + 5]) / 9.0 for i in range(4, t + 4)]
            rows[-1]["eman2_ssnr"] = [v / (1.0 - min(v, 0.999999)) for v in f]
    out[name] = rows
print(json.dumps(out))
"""
    got = _eman2_python(project, script)
    for name in ("r/projections_00_even.hdf", "r/classes_00_even.hdf"):
        with HdfImages(project / name) as f:
            assert len(got[name]) == f.count
            for i, row in enumerate(got[name]):
                h, img = f.header(i), f.image(i)
                assert row["apix"] == [3.0, 3.0, 3.0]
                assert row["ptcl_repr"] == h["ptcl_repr"]
                assert row["pixels"] == [float(img[y, x]) for x, y in ((0, 0), (31, 32), (40, 17))]
                if "xform.projection" in h:
                    np.testing.assert_allclose(
                        np.reshape(row["xform"], (3, 4)), h["xform.projection"].matrix, atol=1e-6
                    )
                else:
                    assert row["xform"] is None
                if "classes" in name:
                    assert _listed(row["idxs"]) == _listed(h.get("class_ptcl_idxs"))
                    assert _listed(row["exc"]) == _listed(h.get("exc_class_ptcl_idxs"))
                    assert row["image"] == "r/projections_00_even.hdf" and row["image_idx"] == i
                    if h["ptcl_repr"] > 0:  # e2make3d --iter 2 needs it (it crashes without)
                        np.testing.assert_allclose(row["ssnr"], h["class_ssnr"], rtol=1e-6)
                        # the same but where the smoothing reaches the Nyquist ring, whose
                        # FRC EMAN2 sums over other pixels
                        np.testing.assert_allclose(
                            row["ssnr"][:-5], row["eman2_ssnr"][:-5], rtol=1e-4, atol=1e-5
                        )
    first = got["r/projections_00_even.hdf"][0]["eman"]
    print("read", {k: len(v) for k, v in got.items()}, "images; projection 0:", first)


@pytest.mark.eman2
@needs_eman2
@pytest.mark.parametrize("name", ["r", "s"])
def test_eman2_runs_every_line_of_run_log(project, name):
    """Each EMAN2 line of run.log (iterations 00 and 01; every half) runs as written, in
    order, in the folder the refinement ran in: e2project3d, e2simmx, e2classify,
    e2classaverage and, for ``s``, e2make3d and e2proc3d."""
    copy = _copy(project, name, f"lines_{name}")
    ran = []
    for it, stage, command in _log_lines(copy / name):
        if command.startswith("relion_"):
            continue
        if it == "01" and stage in ("simmx", "classaverage"):
            continue  # as iteration 00's, on the next files: the slowest lines, once
        _eman2(copy, command)
        ran.append(f"{it} {stage}")
    print(name, "ran:", ", ".join(ran))
    assert len(ran) >= 6

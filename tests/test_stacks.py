"""Particle stacks: lazy chunked reading and round trips through every format."""

import os

import mrcfile
import numpy as np
import pytest

from cryorefine.errors import CryorefineError, CryorefineWarning
from cryorefine.fourier.ctf import CTFParams
from cryorefine.geometry.euler import relion_to_matrices
from cryorefine.io.eman2 import HdfStackWriter, Transform
from cryorefine.io.lst import LstRecord, write_lst
from cryorefine.io.metadata import ParticleMetadata
from cryorefine.io.mrc import write_mrc
from cryorefine.io.stacks import ParticleStack, write_stack


def rich_stack(rng, k=9, n=24, apix=1.35) -> ParticleStack:
    images = (rng.standard_normal((k, n, n)) * 3 + 1).astype(np.float32)
    meta = ParticleMetadata.empty(k, apix=apix)
    meta.rotations = relion_to_matrices(
        rng.uniform(-180, 180, k), rng.uniform(0, 180, k), rng.uniform(-180, 180, k)
    )
    meta.shift_a = rng.uniform(-5, 5, (k, 2))
    meta.ctf = CTFParams(
        rng.uniform(1e4, 3e4, k),
        rng.uniform(1e4, 3e4, k),
        rng.uniform(-90, 90, k),
        300,
        2.7,
        0.1,
        0,
        0,
        1,
    )
    meta.half_set = 1 + np.arange(k) % 2
    meta.class_number = np.arange(k) % 4
    return ParticleStack.from_arrays(images, apix=apix, meta=meta)


def assert_same_metadata(a: ParticleMetadata, b: ParticleMetadata) -> None:
    np.testing.assert_allclose(b.apix, a.apix, rtol=1e-6)
    np.testing.assert_allclose(b.rotations, a.rotations, atol=2e-6)
    np.testing.assert_allclose(b.shift_a, a.shift_a, atol=2e-5)
    # CTFs compared as functions (EMAN2 stores mean/difference, RELION U/V)
    np.testing.assert_allclose(b.ctf.evaluate(32, b.apix), a.ctf.evaluate(32, a.apix), atol=1e-4)
    assert b.half_set.tolist() == a.half_set.tolist()
    assert b.class_number.tolist() == a.class_number.tolist()


def test_round_trip_through_every_format(in_tmp, rng):
    original = rich_stack(rng)
    truth = original.read()
    write_stack(original, "a.star")  # images -> a.mrcs
    star = ParticleStack.from_path("a.star")
    write_stack(star, "b.hdf")  # EMAN2 HDF with headers
    hdf = ParticleStack.from_path("b.hdf")
    write_stack(hdf, "c.lst")  # .lst referring into b.hdf
    lst = ParticleStack.from_path("c.lst")
    write_stack(lst, "d.star")  # HDF not readable by RELION: copies
    star2 = ParticleStack.from_path("d.star")
    write_stack(star2, "e.lst")  # .lst referring into d.mrcs
    lst2 = ParticleStack.from_path("e.lst")
    write_stack(lst2, "f.mrcs")
    for stack in (star, hdf, lst, star2, lst2):
        images = stack.read()
        assert images.dtype == np.float32 and np.array_equal(images, truth)
        assert_same_metadata(original.meta, stack.meta)
    assert (in_tmp / "d.mrcs").is_file()
    assert "b.hdf" in (in_tmp / "c.lst").read_text()
    assert "d.mrcs" in (in_tmp / "e.lst").read_text()
    with mrcfile.open("f.mrcs") as mrc:
        assert np.array_equal(mrc.data, truth) and mrc.voxel_size.x == pytest.approx(1.35)
    for stack in (star, hdf, lst, star2, lst2):
        stack.close()


def test_mrcs_to_star_refers_to_the_stack(in_tmp, rng):
    write_mrc("p.mrcs", rng.standard_normal((5, 8, 8)), apix=2.0, stack=True)
    stack = ParticleStack.from_path("p.mrcs")
    assert stack.apix == 2.0 and not stack.meta.ctf.known.any()
    written = write_stack(stack, "p.star")
    assert [p.name for p in written] == ["p.star"]
    assert "000005@p.mrcs" in (in_tmp / "p.star").read_text()
    write_stack(stack, "copy.star", copy_images=True)
    assert "000001@copy.mrcs" in (in_tmp / "copy.star").read_text()


def test_chunks_and_take_read_lazily(in_tmp, rng):
    data = rng.standard_normal((50, 8, 8)).astype(np.float32)
    write_mrc("big.mrcs", data, apix=1.0, stack=True)
    stack = ParticleStack.from_path("big.mrcs")
    assert not stack.in_memory
    seen = []
    for idx, images in stack.chunks(16):
        assert len(images) <= 16
        assert np.array_equal(images, data[idx])
        seen.extend(idx.tolist())
    assert seen == list(range(50))
    sub = stack.take(np.array([7, 3, 41]))
    assert np.array_equal(sub.read(), data[[7, 3, 41]]) and len(sub) == 3
    stack.close()


def test_lst_overrides_the_hdf_header(in_tmp, rng):
    # fact 9: JSON keys override the referenced image's header
    images = rng.standard_normal((2, 8, 8)).astype(np.float32)
    with HdfStackWriter("ptcls.hdf") as w:
        w.append(images, [{"apix_x": 2.0, "class": 0}, {"apix_x": 2.0, "class": 0}])
    rot = Transform(np.eye(3, 4))
    write_lst(
        "set.lst",
        [
            LstRecord(1, "ptcls.hdf", {"class": 1, "xform.projection": rot}),
            LstRecord(0, "ptcls.hdf"),
        ],
    )
    stack = ParticleStack.from_path("set.lst")
    assert stack.meta.half_set.tolist() == [2, 1]
    assert stack.meta.has_orientation.tolist() == [True, False]
    assert np.array_equal(stack.read(), images[[1, 0]]) and stack.apix == 2.0
    stack.close()


def test_missing_pixel_size_warns_and_apix_overrides(in_tmp, rng):
    write_mrc("nopix.mrcs", rng.standard_normal((2, 8, 8)), apix=0.0, stack=True)
    with pytest.warns(CryorefineWarning, match="no pixel size"):
        stack = ParticleStack.from_path("nopix.mrcs")
    assert stack.apix == 1.0
    assert ParticleStack.from_path("nopix.mrcs", apix=1.7).apix == 1.7
    write_mrc("pix.mrcs", rng.standard_normal((2, 8, 8)), apix=1.2, stack=True)
    with pytest.warns(CryorefineWarning, match="overrides the pixel size"):
        assert ParticleStack.from_path("pix.mrcs", apix=1.7).apix == 1.7


def test_nan_and_non_square_images_are_refused(in_tmp, rng):
    data = rng.standard_normal((3, 8, 8)).astype(np.float32)
    data[2, 4, 4] = np.inf
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning, match="infinite"):
        write_mrc("inf.mrcs", data, apix=1.0, stack=True)
    stack = ParticleStack.from_path("inf.mrcs")
    assert np.array_equal(stack.read([0, 1]), data[:2])
    with pytest.raises(CryorefineError, match="inf.mrcs image 3: contains NaN or Inf"):
        stack.read()
    write_mrc("rect.mrcs", np.zeros((2, 8, 10)), apix=1.0, stack=True)
    with pytest.raises(CryorefineError, match="only square images"):
        ParticleStack.from_path("rect.mrcs")
    with pytest.raises(CryorefineError, match="unknown stack type"):
        ParticleStack.from_path("x.tif")


def test_measured_ctf_curves_survive_eman2_files(in_tmp, rng):
    """EMAN2's fitted background and SNR curves (e2ctf) ride along through HDF and .lst
    files; a RELION STAR file has no place for them."""
    stack = rich_stack(rng, k=3)
    curves = np.full(3, None, dtype=object)
    curves[0] = (0.01, [1.0, 0.5], [0.0, 2.5, 1.25, 0.5])
    curves[2] = (0.02, [], [3.0, 1.0])
    stack.meta.ctf_curves = curves
    write_stack(stack, "a.hdf")
    write_stack(ParticleStack.from_path("a.hdf"), "b.lst")
    for name in ("a.hdf", "b.lst"):
        back = ParticleStack.from_path(name).meta.ctf_curves
        assert back[1] is None
        for i in (0, 2):
            dsbg, background, snr = back[i]
            assert dsbg == pytest.approx(curves[i][0])
            assert np.allclose(background, curves[i][1]) and np.allclose(snr, curves[i][2])
    write_stack(ParticleStack.from_path("a.hdf"), "c.star")
    assert ParticleStack.from_path("c.star").meta.ctf_curves is None


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("RssFile:"))
    return int(line.split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_reading_a_whole_stack_leaves_none_of_it_resident(tmp_path):
    """Reading every image of a 48 MiB MRC stack in chunks (as the stages do) leaves the
    process's file-backed resident memory where it was (a memory map would keep every
    page read, growing the process with the number of particles), and gives the
    file's images, in any order, repeats included."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3000, 64, 64)).astype(np.float32)
    with mrcfile.new(tmp_path / "big.mrcs") as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 2.0
    stack = ParticleStack.from_path(tmp_path / "big.mrcs")
    picks = np.array([7, 3, 4, 2999, 3, 0, 1500, 1501, 1502])
    assert np.array_equal(stack.read(picks), data[picks])
    # 16-bit integers, big-endian, after an extended header
    small = (rng.standard_normal((20, 16, 16)) * 100).astype(">i2")
    with mrcfile.new(tmp_path / "int.mrcs") as mrc:
        mrc.set_extended_header(np.zeros(37, np.uint8))
        mrc.set_data(small)
        mrc.voxel_size = 2.0
    other = ParticleStack.from_path(tmp_path / "int.mrcs")
    assert np.array_equal(other.read(picks[picks < 20]), small[picks[picks < 20]])
    other.close()
    before = _rss_file_kib()
    for idx, images in stack.chunks(250):
        assert images[0, 0, 0] == data[idx[0], 0, 0]
    grown = (_rss_file_kib() - before) / 1024
    stack.close()
    assert grown < 8, f"{grown:.1f} MiB of the stack stayed resident"

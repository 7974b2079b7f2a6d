"""MRC maps and stacks, atomic writes."""

import mrcfile
import numpy as np
import pytest

from cryorefine.errors import CryorefineError
from cryorefine.io.maps import Map, read_map, write_map
from cryorefine.io.mrc import MrcStackWriter, open_mrc, read_mrc, write_mrc


def test_map_round_trip_keeps_values_apix_and_origin(tmp_path, rng):
    data = rng.standard_normal((32, 32, 32)).astype(np.float32)
    write_map(tmp_path / "m.mrc", Map(data, 1.35, (10.0, -5.0, 2.5)))
    back = read_map(tmp_path / "m.mrc")
    assert np.array_equal(back.data, data)
    assert back.apix == pytest.approx(1.35) and back.origin_a == (10.0, -5.0, 2.5)
    with mrcfile.open(tmp_path / "m.mrc") as mrc:
        assert mrc.header.mode == 2 and mrc.is_volume()


def test_stack_writer_streams_chunks(tmp_path, rng):
    data = rng.standard_normal((10, 16, 16)).astype(np.float32)
    with MrcStackWriter(tmp_path / "s.mrcs", 10, 16, apix=2.0) as w:
        w.write(0, data[:4])
        w.write(4, data[4:])
    back, apix, _ = read_mrc(tmp_path / "s.mrcs")
    assert np.array_equal(back, data) and apix == 2.0
    with mrcfile.open(tmp_path / "s.mrcs") as mrc:
        assert mrc.is_image_stack()


def test_cannot_accidentally_overwrite_file(tmp_path):
    write_mrc(tmp_path / "a.mrc", np.zeros((4, 4, 4)), apix=1.0)
    with pytest.raises(CryorefineError, match="exists; pass --overwrite"):
        write_mrc(tmp_path / "a.mrc", np.ones((4, 4, 4)), apix=1.0)
    write_mrc(tmp_path / "a.mrc", np.ones((4, 4, 4)), apix=1.0, overwrite=True)
    assert read_mrc(tmp_path / "a.mrc")[0].max() == 1.0


def test_a_failed_write_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with MrcStackWriter(tmp_path / "s.mrcs", 4, 8, apix=1.0) as w:
            w.write(0, np.zeros((2, 8, 8)))
            raise RuntimeError("crash half-way")
    assert list(tmp_path.iterdir()) == []


def test_other_modes_are_read_as_float32(tmp_path):
    ints = np.arange(64, dtype=np.int16).reshape(4, 4, 4)
    with mrcfile.new(tmp_path / "i.mrc") as mrc:
        mrc.set_data(ints)
    data, apix, _ = read_mrc(tmp_path / "i.mrc")
    assert data.dtype == np.float32 and np.array_equal(data, ints) and apix == 0.0


def test_files_without_map_id_are_accepted(tmp_path):
    write_mrc(tmp_path / "old.mrc", np.ones((4, 4, 4)), apix=1.0)
    raw = bytearray((tmp_path / "old.mrc").read_bytes())
    raw[208:212] = b"\0\0\0\0"  # the 'MAP ' ID string
    (tmp_path / "old.mrc").write_bytes(bytes(raw))
    with open_mrc(tmp_path / "old.mrc") as mrc:
        assert mrc.data.shape == (4, 4, 4)


def test_truncated_and_junk_files_are_clear_errors(tmp_path):
    write_mrc(tmp_path / "t.mrcs", np.ones((3, 8, 8)), apix=1.0, stack=True)
    raw = (tmp_path / "t.mrcs").read_bytes()
    (tmp_path / "t.mrcs").write_bytes(raw[:-40])
    with pytest.raises(CryorefineError, match="t.mrcs: truncated MRC"):
        open_mrc(tmp_path / "t.mrcs")
    (tmp_path / "j.mrc").write_bytes(b"not a map" * 200)
    with pytest.raises(CryorefineError, match="j.mrc: not a valid MRC"):
        open_mrc(tmp_path / "j.mrc")
    with pytest.raises(CryorefineError, match="nope.mrc: no such file"):
        open_mrc(tmp_path / "nope.mrc")


def test_map_checks(tmp_path):
    write_mrc(tmp_path / "flat.mrc", np.ones((8, 8)), apix=1.0)
    with pytest.raises(CryorefineError, match="not a 3D map"):
        read_map(tmp_path / "flat.mrc")
    write_mrc(tmp_path / "box.mrc", np.ones((8, 8, 6)), apix=1.0)
    with pytest.raises(CryorefineError, match="only cubic maps"):
        read_map(tmp_path / "box.mrc")
    bad = np.ones((8, 8, 8), np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"):
        write_mrc(tmp_path / "nan.mrc", bad, apix=1.0)
    with pytest.raises(CryorefineError, match="NaN or Inf"):
        read_map(tmp_path / "nan.mrc")


def test_map_without_pixel_size_warns_unless_apix_is_given(tmp_path):
    from cryorefine.errors import CryorefineWarning

    write_mrc(tmp_path / "nopix.mrc", np.zeros((8, 8, 8)), apix=0.0)
    with pytest.warns(CryorefineWarning, match="no pixel size"):
        assert read_map(tmp_path / "nopix.mrc").apix == 1.0
    assert read_map(tmp_path / "nopix.mrc", apix=2.2).apix == 2.2

"""EMAN2 HDF layout, attribute encoding, Transforms, and .lst files (spec 05 §5.7)."""

import h5py
import numpy as np
import pytest

from cryorefine.errors import CryorefineError
from cryorefine.geometry.euler import eman_to_matrices
from cryorefine.io.eman2 import (
    EmanCtf,
    HdfImages,
    HdfStackWriter,
    Transform,
    projection_transform,
    read_hdf_map,
    split_projection_transform,
    write_hdf_map,
)
from cryorefine.io.lst import LSX_COMMENT, LstRecord, read_lst, write_lst
from cryorefine.io.mrc import write_mrc

# spec 05 §5.7 fact 3: EMAN (120, 40, -40), (tx, ty) = (1.5, -2.25), row-major [A | t]
# fmt: off
WORKED_EXAMPLE = [0.043412, 0.909616, -0.413176, 1.5, -0.829598, 0.263258, 0.492404, -2.25,
                  0.55667, 0.321394, 0.766044, 0]
# fmt: on


def test_new_stack_layout(tmp_path, rng):
    # fact 1
    with HdfStackWriter(tmp_path / "a.hdf") as w:
        pass
    with h5py.File(tmp_path / "a.hdf") as f:
        assert f["MDF/images"].attrs["imageid_max"].tolist() == [-1]
        assert f["MDF/images"].attrs["imageid_max"].dtype == np.int32
    images = rng.standard_normal((3, 64, 64)).astype(np.float32)
    with HdfStackWriter(tmp_path / "b.hdf") as w:
        w.append(images)
    with h5py.File(tmp_path / "b.hdf") as f:
        g = f["MDF/images"]
        assert g.attrs["imageid_max"].tolist() == [2]
        assert sorted(g) == ["0", "1", "2"]
        for i in range(3):
            d = g[f"{i}/image"]
            assert d.shape == (64, 64) and d.dtype == np.float32 and d.chunks is None
            assert g[str(i)].attrs["EMAN.nx"].tolist() == [64]
            assert g[str(i)].attrs["EMAN.nz"].tolist() == [1]
            assert g[str(i)].attrs["EMAN.datatype"].tolist() == [7]
            assert np.array_equal(d[()], images[i])
        assert g["0"].attrs["EMAN.sigma"][0] == pytest.approx(images[0].std(ddof=1), rel=1e-5)


def test_map_layout_matches_mrc(tmp_path, rng):
    # fact 2
    vol = rng.standard_normal((32, 32, 32)).astype(np.float32)
    write_hdf_map(tmp_path / "m.hdf", vol, apix=2.5)
    write_mrc(tmp_path / "m.mrc", vol, apix=2.5)
    with h5py.File(tmp_path / "m.hdf") as f:
        assert f["MDF/images/0/image"].shape == (32, 32, 32)
    data, hdr = read_hdf_map(tmp_path / "m.hdf")
    assert np.array_equal(data, vol) and hdr["apix_x"] == 2.5 and hdr["nz"] == 32


def test_transform_attribute_of_the_worked_example(tmp_path):
    # fact 3: EMAN (120, 40, -40), (tx, ty) = (1.5, -2.25)
    t = projection_transform(eman_to_matrices(120, 40, -40)[0], np.array([1.5, -2.25]))
    with HdfStackWriter(tmp_path / "t.hdf") as w:
        w.append(np.zeros((1, 8, 8)), [{"xform.projection": t}])
    expected = WORKED_EXAMPLE
    with h5py.File(tmp_path / "t.hdf") as f:
        attr = f["MDF/images/0"].attrs["EMAN.xform.projection"]
        assert attr.shape == (1,) and attr.dtype.names == tuple(
            f"{r}{c}" for r in range(3) for c in range(4)
        )
        assert attr.dtype.itemsize == 48
        np.testing.assert_allclose(list(attr[0]), expected, atol=2e-6)
    f = HdfImages(tmp_path / "t.hdf")
    back = f.header(0)["xform.projection"]
    f.close()
    np.testing.assert_allclose(back.matrix.ravel(), expected, atol=2e-6)


def test_mirrored_transform_folds_to_the_equivalent_rotation():
    rot = eman_to_matrices(30, 40, 50)[0]
    m = np.zeros((3, 4))
    m[:, :3] = rot
    m[0] *= -1  # EMAN2 mirror: row 0 negated
    m[:2, 3] = [-2.0, 3.0]
    proper, shift = split_projection_transform(Transform(m))
    assert np.linalg.det(proper) == pytest.approx(1.0)
    np.testing.assert_allclose(proper, np.diag([-1, 1, -1]) @ rot, atol=1e-12)
    np.testing.assert_allclose(shift, [-2.0, 3.0])


def test_attribute_types(tmp_path):
    hdr = {
        "flag": True,
        "ptcl_repr": 37,
        "score": -0.5,
        "class_ptcl_idxs": [3, 17, 52],
        "one_idx": [17],
        "qual": [0.5, 0.25],
        "source_path": "particles/a.hdf",
        "ctf": EmanCtf(
            defocus=2.0,
            dfdiff=0.2,
            dfang=30,
            bfactor=50,
            ampcont=10,
            voltage=300,
            cs=2.7,
            apix=1.35,
        ),
        "empty": [],
    }
    with HdfStackWriter(tmp_path / "h.hdf") as w:
        w.append(np.zeros((1, 4, 4)), [hdr])
    with h5py.File(tmp_path / "h.hdf") as f:
        a = f["MDF/images/0"].attrs
        assert a["EMAN.flag"].dtype == np.int8 and a["EMAN.flag"].tolist() == [84]
        assert a["EMAN.ptcl_repr"].dtype == np.int32 and a["EMAN.ptcl_repr"].shape == (1,)
        assert a["EMAN.score"].dtype == np.float32
        # fact 11: fixed-length NUL-terminated strings, never variable length
        assert a.get_id("EMAN.source_path").get_type().is_variable_str() is False
        assert a["EMAN.source_path"] == b"particles/a.hdf"
        assert a["EMAN.ctf"] == b"E2 0.200000003 30 50 10 300 2.700000048 1.350000024 -1 0 0"
        assert "EMAN.empty" not in a
    f = HdfImages(tmp_path / "h.hdf")
    h = f.header(0)
    f.close()
    assert h["flag"] is True and h["ptcl_repr"] == 37 and h["class_ptcl_idxs"] == [3, 17, 52]
    assert h["one_idx"] == 17  # fact 10: a 1-element int list reads back as an int
    assert h["qual"] == [0.5, 0.25] and h["source_path"] == "particles/a.hdf"
    assert isinstance(h["ctf"], EmanCtf) and h["ctf"].defocus == 2.0


def test_quantised_images_are_decoded(tmp_path):
    with h5py.File(tmp_path / "q.hdf", "w") as f:
        g = f.create_group("MDF/images")
        g.attrs["imageid_max"] = np.array([0], np.int32)
        e = g.create_group("0")
        e.create_dataset(
            "image",
            data=np.array([[0, 255], [51, 102]], np.uint8),
            chunks=(1, 2),
            compression="gzip",
        )
        e.attrs["EMAN.stored_renderbits"] = np.array([8], np.int32)
        e.attrs["EMAN.stored_rendermin"] = np.array([-1.0], np.float32)
        e.attrs["EMAN.stored_rendermax"] = np.array([1.0], np.float32)
    f = HdfImages(tmp_path / "q.hdf")
    np.testing.assert_allclose(f.image(0), [[-1, 1], [-0.6, -0.2]], atol=1e-6)
    f.close()


def test_hdf_errors(tmp_path):
    (tmp_path / "x.hdf").write_bytes(b"garbage" * 10)
    with pytest.raises(CryorefineError, match="x.hdf: not an HDF5 file"):
        HdfImages(tmp_path / "x.hdf")
    with h5py.File(tmp_path / "plain.hdf", "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(CryorefineError, match="not an EMAN2 image file"):
        HdfImages(tmp_path / "plain.hdf")


def test_lst_layout_of_the_spec_example(tmp_path):
    # fact 8: three records, L = 217, header 173 bytes, file 824 bytes
    t0 = Transform(WORKED_EXAMPLE)
    recs = [
        LstRecord(
            0,
            "particles/mic001__ctf_flip.hdf",
            {"class": 0, "score": -0.6213, "xform.projection": t0},
        ),
        LstRecord(
            1,
            "particles/mic001__ctf_flip.hdf",
            {"class": 1, "score": -0.5876, "xform.projection": Transform(np.eye(3, 4))},
        ),
        LstRecord(7, "particles/mic002__ctf_flip.hdf"),
    ]
    write_lst(tmp_path / "s.lst", recs)
    raw = (tmp_path / "s.lst").read_bytes()
    header = f"#LSX\n{LSX_COMMENT}\n# 217\n".encode()
    assert raw.startswith(header) and len(header) == 173
    assert len(raw) == 173 + 3 * 217
    first = raw[173 : 173 + 217].decode()
    assert first.startswith(
        '0\tparticles/mic001__ctf_flip.hdf\t{"class":0,"score":-0.6213,'
        '"xform.projection":{"__class__":"Transform","matrix":"[0.043412,'
    )
    assert first.endswith("    \n")
    back = read_lst(tmp_path / "s.lst")
    assert [r.n for r in back] == [0, 1, 7] and back[2].params == {}
    np.testing.assert_allclose(back[0].params["xform.projection"].matrix, t0.matrix)
    assert back[1].params["class"] == 1


def test_legacy_lst_and_errors(tmp_path):
    (tmp_path / "old.lst").write_text("#LST\n# comment\n3\ta.hdf\tfree text\n5\tb.hdf\n")
    recs = read_lst(tmp_path / "old.lst")
    assert [(r.n, r.path) for r in recs] == [(3, "a.hdf"), (5, "b.hdf")]
    (tmp_path / "bad.lst").write_text("#LSX\n# c\n# 10\n0\ta.hdf\n")
    with pytest.raises(CryorefineError, match="whole number of 10-byte records"):
        read_lst(tmp_path / "bad.lst")
    (tmp_path / "dos.lst").write_bytes(b"#LSX\r\n")
    with pytest.raises(CryorefineError, match="carriage returns"):
        read_lst(tmp_path / "dos.lst")
    with pytest.raises(CryorefineError, match="white space"):
        write_lst(tmp_path / "w.lst", [LstRecord(0, "a b.hdf")])


def test_an_lst_is_written_from_a_generator_without_holding_its_records(tmp_path):
    """write_lst takes a generator and holds one record at a time: 5,000 records with a
    CTF and a 64-ring SNR curve each (3 MiB of text) are written under a traced peak of
    1 MiB, with the fixed record length of the longest, and read back."""
    import tracemalloc

    def records():
        for i in range(5_000):
            ctf = EmanCtf(defocus=1.0 + i * 1e-5, snr=[round(0.5 / (1 + r), 4) for r in range(64)])
            yield LstRecord(i, "ptcl.mrcs", {"ctf": ctf})

    tracemalloc.start()
    write_lst(tmp_path / "set.lst", records())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = (tmp_path / "set.lst").stat().st_size
    print(f"peak {peak / 2**20:.2f} MiB for a {size / 2**20:.1f} MiB file")
    assert size > 2.5 * 2**20 and peak < 2**20
    back = read_lst(tmp_path / "set.lst")
    assert len(back) == 5_000 and back[2_345].n == 2_345
    assert back[2_345].params["ctf"].defocus == pytest.approx(1.02345)
    assert back[7].params["ctf"].snr[:3] == [0.5, 0.25, 0.1667]

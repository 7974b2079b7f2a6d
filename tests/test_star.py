"""RELION STAR files: 3.1 with optics groups, 3.0 style, paths, version lines."""

import numpy as np
import pytest
import starfile

from cryorefine.errors import CryorefineError
from cryorefine.geometry.euler import relion_to_matrices
from cryorefine.io.mrc import write_mrc
from cryorefine.io.stacks import ParticleStack, write_stack
from cryorefine.io.star import read_particle_star

STAR_31 = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnImagePixelSize #7
_rlnImageSize #8
_rlnImageDimensionality #9
_rlnBeamTiltX #10
opticsGroup1            1     0.675000   300.000000     2.700000     0.100000     1.350000           16            2     0.100000
opticsGroup2            2     0.500000   200.000000     2.000000     0.070000     1.000000           16            2     0.000000


# version 30001

data_particles

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnOpticsGroup #3
_rlnDefocusU #4
_rlnDefocusV #5
_rlnDefocusAngle #6
_rlnCtfBfactor #7
_rlnPhaseShift #8
_rlnAngleRot #9
_rlnAngleTilt #10
_rlnAnglePsi #11
_rlnOriginXAngst #12
_rlnOriginYAngst #13
_rlnRandomSubset #14
_rlnClassNumber #15
000001@Particles/mic001.mrcs micrographs/mic001.mrc 1 21000.0 19000.0 30.0 0.0 0.0 30.0 40.0 50.0 -2.025 3.0375 1 1
000002@Particles/mic001.mrcs micrographs/mic001.mrc 2 15000.0 14000.0 -10.0 0.0 20.0 -100.0 90.0 10.0 1.0 -2.0 2 3
000001@Particles/mic002.mrcs micrographs/mic002.mrc 1 25000.0 25500.0 80.0 0.0 0.0 170.0 5.0 -60.0 0.0 0.0 1 1
"""

STAR_30 = """
data_

loop_
_rlnImageName #1
_rlnVoltage #2
_rlnSphericalAberration #3
_rlnAmplitudeContrast #4
_rlnMagnification #5
_rlnDetectorPixelSize #6
_rlnDefocusU #7
_rlnDefocusV #8
_rlnDefocusAngle #9
_rlnOriginX #10
_rlnOriginY #11
_rlnAngleRot #12
_rlnAngleTilt #13
_rlnAnglePsi #14
000001@stack.mrcs 300 2.7 0.1 37037 5.0 20000 19000 15 2 -1 10 20 30
000002@stack.mrcs 300 2.7 0.1 37037 5.0 18000 18500 -5 0 0.5 0 0 0
"""


@pytest.fixture
def project(tmp_path, rng):
    (tmp_path / "Particles").mkdir()
    for name in ("mic001", "mic002"):
        write_mrc(
            tmp_path / "Particles" / f"{name}.mrcs",
            rng.standard_normal((2, 16, 16)).astype(np.float32),
            apix=1.35,
            stack=True,
        )
    (tmp_path / "Refine").mkdir()
    return tmp_path


def test_relion31_with_two_optics_groups(project):
    (project / "particles.star").write_text(STAR_31)
    meta = read_particle_star(project / "particles.star")
    assert meta.apix.tolist() == [1.35, 1.0, 1.35]
    assert meta.ctf.voltage_kv.tolist() == [300, 200, 300]
    assert meta.ctf.cs_mm.tolist() == [2.7, 2.0, 2.7]
    assert meta.ctf.amplitude_contrast.tolist() == [0.1, 0.07, 0.1]
    assert meta.ctf.phase_shift_deg.tolist() == [0, 20, 0]
    assert meta.source_index.tolist() == [0, 1, 0]
    assert meta.source_path[0].endswith("Particles/mic001.mrcs")
    assert meta.source_path[2].endswith("Particles/mic002.mrcs")
    np.testing.assert_allclose(meta.rotations[0], relion_to_matrices(30, 40, 50)[0])
    # fact 3: rlnOrigin (-2.025, 3.0375) Å at 1.35 Å/px is EMAN (tx, ty) = (1.5, -2.25) px
    np.testing.assert_allclose(meta.shift_a[0] / meta.apix[0], [1.5, -2.25])
    assert meta.half_set.tolist() == [1, 2, 1] and meta.class_number.tolist() == [0, 2, 0]
    assert meta.extra["rlnMicrographName"][1] == "micrographs/mic001.mrc"
    assert meta.optics_extra["rlnBeamTiltX"].tolist() == [0.1, 0.0, 0.1]
    stack = ParticleStack.from_path(project / "particles.star")
    assert stack.box == 16 and len(stack) == 3
    with pytest.raises(CryorefineError, match="different pixel sizes"):
        _ = stack.apix
    stack.close()


def test_relion31_written_back_keeps_groups_and_unknown_columns(project):
    (project / "particles.star").write_text(STAR_31)
    stack = ParticleStack.from_path(project / "particles.star")
    write_stack(stack, project / "Refine" / "out.star")
    text = (project / "Refine" / "out.star").read_text()
    assert text.count("# version 30001") == 2
    blocks = starfile.read(project / "Refine" / "out.star", always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"]
    assert optics["rlnImagePixelSize"].tolist() == [1.35, 1.0]
    assert optics["rlnBeamTiltX"].tolist() == [0.1, 0.0]
    assert parts["rlnOpticsGroup"].tolist() == [1, 2, 1]
    assert parts["rlnMicrographName"].tolist()[2] == "micrographs/mic002.mrc"
    np.testing.assert_allclose(parts["rlnOriginXAngst"], [-2.025, 1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(parts["rlnDefocusV"], [19000, 14000, 25500])
    again = read_particle_star(project / "Refine" / "out.star")
    np.testing.assert_allclose(again.rotations, stack.meta.rotations, atol=1e-6)
    assert again.source_path.tolist() == stack.meta.source_path.tolist()
    stack.close()


def test_relion30_style_is_converted(tmp_path, rng):
    # fact 12: detector pixel 5.0 µm at magnification 37037 -> 1.35 Å; origin 2 px -> 2.7 Å
    write_mrc(tmp_path / "stack.mrcs", rng.standard_normal((2, 8, 8)), apix=0.0, stack=True)
    (tmp_path / "old.star").write_text(STAR_30)
    meta = read_particle_star(tmp_path / "old.star")
    np.testing.assert_allclose(meta.apix, 1.35, atol=1e-4)
    np.testing.assert_allclose(-meta.shift_a[0], [2 * 1.35, -1 * 1.35], atol=1e-3)
    assert meta.ctf.defocus_u_a.tolist() == [20000, 18000]


def test_image_paths_resolve_beside_the_star_file_then_in_the_project(project, monkeypatch):
    (project / "Refine" / "Particles").mkdir()
    write_mrc(
        project / "Refine" / "Particles" / "mic001.mrcs",
        np.zeros((2, 16, 16)),
        apix=1.35,
        stack=True,
    )
    (project / "Refine" / "p.star").write_text(STAR_31)
    monkeypatch.chdir(project)
    meta = read_particle_star(project / "Refine" / "p.star")
    assert "Refine/Particles/mic001.mrcs" in meta.source_path[0]  # beside the STAR
    assert "Refine" not in meta.source_path[2]  # not there: from the project folder


def test_missing_columns_and_files_are_named(tmp_path):
    (tmp_path / "noname.star").write_text("data_particles\n\nloop_\n_rlnDefocusU #1\n1000\n")
    with pytest.raises(CryorefineError, match="noname.star: no rlnImageName column"):
        read_particle_star(tmp_path / "noname.star")
    (tmp_path / "novolt.star").write_text(
        "data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n1@x.mrcs 1000\n"
    )
    write_mrc(tmp_path / "x.mrcs", np.zeros((1, 4, 4)), apix=1.0, stack=True)
    with pytest.raises(CryorefineError, match="no rlnVoltage or rlnSphericalAberration"):
        read_particle_star(tmp_path / "novolt.star")
    (tmp_path / "gone.star").write_text("data_\n\nloop_\n_rlnImageName #1\n1@gone.mrcs\n")
    with pytest.raises(CryorefineError, match="image file gone.mrcs not found"):
        read_particle_star(tmp_path / "gone.star")

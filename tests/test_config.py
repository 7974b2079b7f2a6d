"""Stage configurations: validated once when made, never re-parsed while the stage runs."""

from __future__ import annotations

import numpy as np
import pytest

from cryorefine.config import (
    ClassaverageConfig,
    ClassifyConfig,
    Make3dConfig,
    Project3dConfig,
    RefineConfig,
    SimmxConfig,
)
from cryorefine.errors import CryorefineError, OptionError
from cryorefine.registry import Registry


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda: Project3dConfig(sym="q5"), "q5"),
        (lambda: Project3dConfig(orientgen="eman:nokey=1"), "unknown parameter 'nokey'"),
        (lambda: Project3dConfig(projector="gauss_fft"), "unknown projector"),
        (lambda: Project3dConfig(postprocess=("nosuch",)), "unknown processor 'nosuch'"),
        (lambda: Make3dConfig(recon="nosuch"), "unknown reconstructor"),
        (lambda: Make3dConfig(keep=1.5), "--keep 1.5"),
        (lambda: Make3dConfig(iterations=0), "--iter must be at least 1"),
        (lambda: Make3dConfig(automask3d="1,2,3"), "--automask3d"),
        (lambda: Make3dConfig(setsf="no_such_file.txt"), "no such file"),
        (lambda: Make3dConfig(pad_px=0), "--pad"),
        (lambda: ClassifyConfig(sep=0), "--sep 0"),
        (lambda: ClassaverageConfig(keep=0), "--keep 0"),
        (lambda: ClassaverageConfig(iterations=2, align=None), "need --align"),
        (lambda: ClassaverageConfig(averager="mean", cmp="nosuch"), "unknown comparator"),
        (lambda: RefineConfig(iterations=0), "--iter 0"),
        (lambda: RefineConfig(sym="d7"), "configured with c1"),
    ],
)
def test_bad_options_are_refused_when_the_config_is_made(make, text):
    with pytest.raises(CryorefineError, match=text):
        make()


def test_an_option_error_is_spelled_by_the_command_that_was_run():
    """A stage config names its options as the stage's command does; a command that
    passes them under other names (refine) re-spells the same error with its names."""
    with pytest.raises(OptionError) as info:
        ClassaverageConfig(keep=2)
    err = info.value
    assert str(err) == "--keep 2: a fraction must be in (0, 1] (or use --keepsig)"
    assert err.stage == "classaverage" and err.fields == ("keep", "keepsig")
    refine = err.spelled({"keep": "--classkeep", "keepsig": "--classkeepsig"})
    assert str(refine) == "--classkeep 2: a fraction must be in (0, 1] (or use --classkeepsig)"
    with pytest.raises(OptionError) as info:  # a parser's error, re-raised by field
        SimmxConfig(cmp="frc:nokey=1")
    assert info.value.fields == ("cmp",)
    assert str(info.value.spelled({"cmp": "--simcmp"})).startswith("--simcmp frc: unknown")


def test_configs_are_frozen_and_compare_by_their_options():
    a, b = SimmxConfig(cmp="ccc"), SimmxConfig(cmp="ccc")
    assert a == b and hash(a) == hash(b) and a != SimmxConfig(cmp="frc")
    with pytest.raises(AttributeError):
        a.cmp = "frc"  # type: ignore[misc]
    assert "cmp_mod" not in repr(a)
    assert a.cmp_mod.name == "ccc" and a.align_mod.params["maxshift"] is None


def test_the_stages_never_parse_an_option_while_they_run(monkeypatch, projections_d15):
    """simmx (two stages) over 6 particles in chunks of 2, and make3d: no registry
    lookup once the configurations exist (every chunk reuses the parsed modifiers)."""
    from cryorefine.stages.make3d import make3d
    from cryorefine.stages.simmx import simmx
    from cryorefine.testing import simulate_particles, solid_sphere

    refs = projections_d15[:20]
    sim_cfg = SimmxConfig(aligncmp="ccc", cmp="frc:zeromask=1:snrweight=1", chunk=2, twostage=2)
    m3d_cfg = Make3dConfig(preprocess=("normalize.edgemean",), postprocess=("normalize",))
    stack = simulate_particles(
        solid_sphere(64, 10.0), 6, apix=3.0, snr=1.0, rng=np.random.default_rng(0)
    )
    from cryorefine.stages.twostage import _stage1_comparators

    _stage1_comparators()  # e2simmx2stage's fixed comparators: parsed once per process
    calls = []
    original = Registry.parse

    def counting(self, text, *, option="option"):
        calls.append((self.kind, text))
        return original(self, text, option=option)

    monkeypatch.setattr(Registry, "parse", counting)
    sim = simmx(refs, stack, sim_cfg)
    assert sim.score.shape == (6, 20)
    make3d(stack, m3d_cfg)
    assert calls == []


def test_refine_config_composes_the_stages():
    cfg = RefineConfig(
        iterations=2,
        sym="d7",
        project3d=Project3dConfig(sym="d7"),
        make3d=Make3dConfig(sym="d7"),
    )
    assert cfg.simmx == SimmxConfig() and cfg.classaverage.keep == 0.8

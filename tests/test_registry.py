"""Modifier strings (EMAN2 parsemodopt) and registry validation."""

import pytest

import cryorefine.config  # noqa: F401  (fills the registries)
from cryorefine.errors import CryorefineError
from cryorefine.registry import PROCESSORS, REGISTRIES, parse_modopt


def test_name_only_and_typed_values():
    assert parse_modopt("ccc") == ("ccc", {})
    name, params = parse_modopt('eman:delta=5.0:inc_mirror=0:perturb=1:label="a b":x=str')
    assert name == "eman"
    assert params == {"delta": 5.0, "inc_mirror": 0, "perturb": 1, "label": "a b", "x": "str"}
    assert isinstance(params["inc_mirror"], int) and isinstance(params["delta"], float)


def test_none_and_empty_mean_disabled():
    assert parse_modopt(None) is None
    assert parse_modopt("") is None
    assert parse_modopt("None") is None
    assert PROCESSORS.parse("none") is None


def test_true_false_are_aliases_of_one_and_zero():
    assert parse_modopt("x:a=true:b=False")[1] == {"a": 1, "b": 0}


def test_last_duplicate_key_wins_and_bdb_colon_is_protected():
    assert parse_modopt("x:a=1:a=2")[1] == {"a": 2}
    assert parse_modopt("x:file=bdb:proj#ptcls")[1] == {"file": "bdb:proj#ptcls"}


@pytest.mark.parametrize("text", ["x:a", "x:a=1=2", "x:=3", "x:a=", ":a=1"])
def test_malformed_fields_are_errors(text):
    with pytest.raises(CryorefineError, match="--simcmp"):
        parse_modopt(text, option="--simcmp")


def test_unknown_name_lists_valid_names():
    with pytest.raises(CryorefineError) as exc:
        PROCESSORS.parse("filter.lowpass.gaus:cutoff_abs=0.1", option="--process")
    msg = str(exc.value)
    assert "unknown processor 'filter.lowpass.gaus'" in msg and "filter.lowpass.gauss" in msg


def test_unknown_key_lists_valid_keys():
    with pytest.raises(CryorefineError) as exc:
        PROCESSORS.parse("filter.lowpass.gauss:cutof=0.1", option="--process")
    assert "unknown parameter 'cutof'" in str(exc.value)
    assert "cutoff_abs" in str(exc.value) and "cutoff_res" in str(exc.value)


def test_lookup_falls_back_to_lower_case_and_fills_defaults():
    mod = PROCESSORS.parse("Filter.LowPass.Tanh:cutoff_abs=0.2")
    assert mod.name == "filter.lowpass.tanh"
    assert mod.params["fall_off"] == 0.5 and mod.params["cutoff_abs"] == 0.2


def test_integers_widen_to_float_and_bad_types_are_errors():
    assert isinstance(PROCESSORS.parse("mask.sharp:outer_radius=10").params["outer_radius"], float)
    with pytest.raises(CryorefineError, match="must be float"):
        PROCESSORS.parse("mask.sharp:outer_radius=big")
    with pytest.raises(CryorefineError, match="must be 0 or 1"):
        PROCESSORS.parse("mask.auto3d:threshold=1:radius=3:return_mask=2")


def test_required_parameter_and_semantic_checks():
    with pytest.raises(CryorefineError, match="'mass' is required"):
        PROCESSORS.parse("normalize.bymass")
    with pytest.raises(CryorefineError, match="exactly one of"):
        PROCESSORS.parse("filter.lowpass.gauss")
    with pytest.raises(CryorefineError, match="exactly one of"):
        PROCESSORS.parse("filter.lowpass.gauss:cutoff_abs=0.1:cutoff_res=8")


def test_every_kind_has_a_registry():
    assert set(REGISTRIES) == {
        "processors",
        "comparators",
        "aligners",
        "averagers",
        "reconstructors",
        "projectors",
        "orientgens",
    }
    assert "normalize.edgemean" in PROCESSORS.names()


def test_help_lists_processors_with_parameters(run_cli):
    code, out, _ = run_cli("help", "processors")
    assert code == 0
    for name in ("normalize.bymass", "mask.auto3d", "filter.lowpass.gauss", "filter.setstrucfac"):
        assert name in out
    assert "cutoff_freq" in out and "nshellsgauss" in out
    code, out, _ = run_cli("help", "processors", "mask.sharp")
    assert code == 0 and "outer_radius" in out and "normalize" not in out
    code, _, err = run_cli("help", "processors", "mask.sharpp")
    assert code == 2 and "unknown processor 'mask.sharpp'" in err

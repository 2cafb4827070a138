"""tritter_comm.config: specs, files and the environment that switch compression on."""

import json

import pytest

from tritter_comm.config import CommConfig, from_env


def test_spec_parses_literals_and_strings():
    c = CommConfig.parse("vsa:mode=int2:start_iter=50:fixed_keys=True:block_size=256")
    assert c.enabled and dict(c.options) == {"mode": "int2", "start_iter": 50, "fixed_keys": True,
                                             "block_size": 256}
    s = c.vsa
    assert (s.mode, s.start_iter, s.fixed_keys, s.block_size) == ("int2", 50, True, 256)
    assert not CommConfig.parse("none").enabled


@pytest.mark.parametrize("spec, match", [
    ("vsa:mdoe=int2", "unknown tritter-comm option.*mdoe.*valid: hook, mode"),
    ("vsa:mode=int3", "mode must be one of"),
    ("vsa:start_iter=1", "start_iter must be an int >= 2"),
    ("vsa:start_iter", "write key=value"),
    ("powersgd", "hook must be one of vsa, none"),
])
def test_bad_spec_is_a_clear_error(spec, match):
    with pytest.raises(ValueError, match=match):
        CommConfig.parse(spec)


def test_env_file_then_spec_overrides(tmp_path):
    yaml = pytest.importorskip("yaml")
    f = tmp_path / "tc.yaml"
    f.write_text(yaml.safe_dump({"hook": "vsa", "mode": "sign", "start_iter": 7}))
    assert from_env({}) is None
    c = from_env({"TRITTER_COMM_CONFIG": str(f)})
    assert dict(c.options) == {"mode": "sign", "start_iter": 7}
    c = from_env({"TRITTER_COMM_CONFIG": str(f), "TRITTER_COMM": "vsa:mode=int2"})
    assert dict(c.options) == {"mode": "int2", "start_iter": 7}
    assert not from_env({"TRITTER_COMM_CONFIG": str(f), "TRITTER_COMM": "none"}).enabled


def test_json_file_and_shipped_recipe(tmp_path):
    f = tmp_path / "tc.json"
    f.write_text(json.dumps({"mode": "int2", "seed": 3}))
    assert dict(CommConfig.from_file(f).options) == {"mode": "int2", "seed": 3}
    with pytest.raises(ValueError, match="unknown tritter-comm option.*bogus"):
        f.write_text(json.dumps({"bogus": 1}))
        CommConfig.from_file(f)
    pytest.importorskip("yaml")
    from _procs import ROOT

    c = CommConfig.from_file(ROOT / "launch" / "tritter_comm.yaml")
    assert c.enabled and c.options["mode"] == "int2"


# -- VSAConfig --------------------------------------------------------------------------------

import dataclasses  # noqa: E402

import tritter_comm  # noqa: E402
from tritter_comm import VSAConfig, VSAState  # noqa: E402


def _non_defaults():
    return dict(mode="ternary", phase2_mode="int2", block_size=256, seed=2**64 - 1, start_iter=7,
                min_compress_numel=3, error_feedback=False, server_error_feedback=False,
                fixed_keys=True, auto=True, residual_dtype="bfloat16", residual_budget=0.5,
                intra_node_size=2)


def test_every_field_round_trips_spec_config_row_config():
    opts = _non_defaults()
    assert set(opts) == {f.name for f in dataclasses.fields(VSAConfig)}  # covers every field
    spec = "vsa:" + ":".join(f"{k}={v!r}" for k, v in opts.items())
    c = VSAConfig.from_spec(spec)
    assert c == VSAConfig(**opts) == VSAConfig.from_dict(opts)
    back = VSAConfig.read_row(c.row())
    mine = ("residual_dtype", "residual_budget")  # ranks may differ there
    agreed = {k: v for k, v in opts.items() if k not in mine}
    assert back == agreed
    assert VSAConfig(**back, residual_dtype="bfloat16", residual_budget=0.5) == c
    assert VSAConfig.from_spec(c.describe()) == c
    assert VSAConfig.from_spec("vsa") == VSAConfig()


def test_from_env_and_none():
    assert VSAConfig.from_env({}) is None
    assert VSAConfig.from_env({"TRITTER_COMM": "none"}) is None
    assert VSAConfig.from_env({"TRITTER_COMM": "vsa:seed=4"}) == VSAConfig(seed=4)
    with pytest.raises(ValueError, match="installs no hook"):
        VSAConfig.from_spec("none")


@pytest.mark.parametrize("bad, match", [
    (dict(mode="int3"), "mode must be one of"),
    (dict(phase2_mode="x"), "phase2_mode"),
    (dict(block_size=1000), "block"),
    (dict(seed=-1), "seed"),
    (dict(start_iter=1), "start_iter must be an int >= 2"),
    (dict(min_compress_numel=0), "min_compress_numel"),
    (dict(auto="maybe"), "auto must be True or False"),
    (dict(residual_dtype="float16"), "residual_dtype"),
    (dict(residual_budget=0), "residual_budget must be a positive number"),
    (dict(residual_budget=float("inf")), "residual_budget"),
    (dict(residual_budget="half"), "residual_budget"),
    (dict(residual_budget=True), "residual_budget"),
])
def test_each_bad_value_names_its_field(bad, match):
    with pytest.raises(ValueError, match=match):
        VSAConfig(**bad)
    with pytest.raises(ValueError, match=match):
        VSAState(**bad)


def test_replace_and_unknown_names():
    c = VSAConfig().replace(mode="sign")
    assert c.mode == "sign" and c.phase2 == "sign"  # phase 2 follows the mode unless given
    with pytest.raises(ValueError, match="unknown tritter-comm option.*mdoe"):
        VSAConfig().replace(mdoe="sign")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.mode = "int2"


def test_vsastate_keyword_forms_still_work():
    s = VSAState(None, mode="ternary", block_size=None, seed=5, start_iter=3, auto="on",
                 fixed_keys=1, residual_dtype="bfloat16")
    assert (s.mode, s.phase2_mode, s.block_size, s.seed, s.start_iter, s.auto, s.fixed_keys,
            s.residual_dtype) == ("ternary", "ternary", 1024, 5, 3, True, True, "bfloat16")
    s = VSAState(config=VSAConfig(mode="sign"), start_iter=9)  # keywords override the config
    assert (s.mode, s.start_iter) == ("sign", 9) and s.config == VSAConfig(mode="sign",
                                                                           start_iter=9)
    with pytest.raises(TypeError, match="VSAConfig"):
        VSAState(None, {"mode": "int2"})
    assert tritter_comm.VSAState().config == VSAConfig()


def test_the_option_table_lists_every_field():
    from tritter_comm.config import options_table

    table = options_table()
    for f in dataclasses.fields(VSAConfig):
        assert f"| `{f.name}` |" in table


def test_the_docs_show_the_generated_option_table():
    from _procs import ROOT
    from tritter_comm.config import options_table

    assert options_table() in (ROOT / "docs" / "USAGE.md").read_text(encoding="utf-8")

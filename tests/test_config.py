"""tritter_comm.config: specs, files and the environment that switch compression on."""

import json

import pytest

from tritter_comm.config import CommConfig, from_env


def test_spec_parses_literals_and_strings():
    c = CommConfig.parse("vsa:mode=int2:start_iter=50:fixed_keys=True:block_size=256")
    assert c.enabled and dict(c.options) == {"mode": "int2", "start_iter": 50, "fixed_keys": True,
                                             "block_size": 256}
    s = c.make_state()
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

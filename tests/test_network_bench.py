"""The network benchmark's pieces that need neither root nor a GPU (issue 16, item 6; issue 17):
the workloads it adds, the netns backend choice, its flags and the GPU targets. Its namespaces
and timings are exercised by running it (``python -m benchmarks.network --quick``), not here."""

import sys

import pytest
import torch

from _procs import ROOT

# Appended, not inserted first: this process's sys.path is what every multi-rank test's spawned
# ranks start from, and a checkout first on it would make them import the source tree's
# tritter_comm (no built extension) instead of the installed one.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from benchmarks import workloads  # noqa: E402
from benchmarks.network import netns, report, run  # noqa: E402


def test_wide_mlp_batches_are_deterministic_and_disjoint():
    w = workloads.build("wide_mlp", seed=0, size="small")
    a0, b0 = w.batch(0, 2, 5), w.batch(1, 2, 5)
    assert torch.equal(a0[0], w.batch(0, 2, 5)[0]) and torch.equal(a0[1], w.batch(0, 2, 5)[1])
    assert not torch.equal(a0[0], b0[0])
    loss = w.loss(w.model, a0)
    loss.backward()
    assert torch.isfinite(loss) and 0 < w.eval_loss(w.model) < 10
    assert w.info["params"] == sum(p.numel() for p in w.model.parameters())


def test_xl_transformer_has_300m_parameters():
    cfg = workloads._TRANSFORMER_SIZES["xl"]
    with torch.device("meta"):  # no memory: the count is all that is checked
        m = workloads.CharTransformer(d_model=cfg["d_model"], n_layers=cfg["n_layers"],
                                      n_heads=cfg["n_heads"], context=cfg["context"])
    assert sum(p.numel() for p in m.parameters()) >= 300e6
    with pytest.raises(ValueError, match="transformer only"):
        workloads.build("digits", seed=0, size="xl")


def test_netns_backend_choice(monkeypatch):
    monkeypatch.setenv(netns.BACKEND_ENV, "pyroute2")
    assert netns.backend() == "pyroute2"
    prefix = netns.exec_prefix("tcnb-1-r0")
    assert prefix[1].endswith("_nsexec.py") and prefix[2] == "tcnb-1-r0"
    monkeypatch.setenv(netns.BACKEND_ENV, "ip")
    assert netns.exec_prefix("x") == ["ip", "netns", "exec", "x"]
    monkeypatch.setenv(netns.BACKEND_ENV, "iproute")
    with pytest.raises(ValueError, match="pyroute2"):
        netns.backend()


def test_gpu_rows_are_known_modes_and_workloads():
    for m in ("none", "bf16", "powersgd4", "vsa", "vsa+auto"):
        assert m in run.MODES
    for wl in ("large", "xl", "mlp"):
        assert wl in run.WORKLOADS
    with pytest.raises(SystemExit):
        run.main(["--links-for", "xl=2gbit"])


def test_gpu_targets():
    def row(link, label, speedup):
        return {"workload": "large", "world": 2, "link": link, "label": label,
                "speedup_vs_none": speedup}

    rows = [row("1gbit", "powersgd4", 5.0), row("1gbit", "vsa", 6.0), row("10gbit", "vsa", 1.5)]
    got = {t["target"]: t["met"] for t in report.check_targets(rows, "cuda:0")}
    assert got == {
        "vsa >= 5x faster than none, 1 Gbit/s, large, 2 ranks, GPU": True,
        "vsa >= 1.5x faster than powersgd4, 1 Gbit/s, large, 2 ranks, GPU": False,
        "vsa >= 2x faster than none, 10 Gbit/s, large, 2 ranks, GPU": False,
    }


def test_every_row_is_a_comm_mode_and_peers_have_rows():
    from benchmarks import comm

    for label, (name, _) in run.MODES.items():
        assert name in comm.MODES, label
    assert {"bf16", "powersgd4", "fp8-2phase", "int4-2phase", "vsa"} <= set(run.MODES)


def test_time_to_target_trains_the_runs_modes_but_not_auto_rows():
    assert run.ttt_modes(["none", "bf16", "fp8-2phase", "vsa", "vsa+auto"]) == [
        "none", "bf16", "fp8-2phase", "vsa"]
    # hook rows before this start_iter run at no hook's step time
    from tritter_comm import VSAConfig

    assert run._hook_default_start() == VSAConfig().start_iter


def test_time_to_target_uses_the_small_models_own_no_hook_step():
    # another workload's no-hook row (a slower model on the same link) must not be the base
    rows = [dict(workload=wl, world=2, link="1gbit", label=label, step_s_median=t,
                 speedup_vs_none=sp)
            for wl, label, t, sp in (("small", "none", 0.2, 1.0), ("small", "vsa", 0.1, 2.0),
                                     ("mlp", "none", 20.0, 1.0), ("mlp", "vsa", 2.0, 10.0))]
    ttt = {"target_loss": 1.0, "modes": {
        "none": {"curve": [[10, 2.0], [20, 1.0]], "start_iter": 0},
        "vsa": {"curve": [[10, 2.0], [20, 1.0]], "start_iter": 10}}}
    report.add_ttt(rows, ttt)
    small = {r["label"]: r for r in rows if r["workload"] == "small"}
    assert small["none"]["time_to_target_s"] == pytest.approx(20 * 0.2)
    # 10 steps before start_iter at no hook's step time, 10 at the hook's
    assert small["vsa"]["time_to_target_s"] == pytest.approx(10 * 0.2 + 10 * 0.1)
    assert all("time_to_target_s" not in r for r in rows if r["workload"] == "mlp")

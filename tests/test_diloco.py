"""tritter_comm.optim.DiLoCo: replicas bit-identical after every sync (fp32 and compressed, 2
ranks on gloo), streaming fragments, exact resume from a state dict, the bytes it reports, and
the errors for bad input."""

import pytest
import torch
import torch.nn as nn

import _diloco_workers as W
from _dist import run
from tritter_comm import VSAConfig
from tritter_comm.exchange import Plan
from tritter_comm.codec import MODES, block_log2
from tritter_comm.optim import DiLoCo


@pytest.mark.parametrize("config", [None, {"mode": "int2"}, {"mode": "ternary"}],
                         ids=["fp32", "int2", "ternary"])
def test_replicas_bit_identical_after_every_sync(config):
    r0, r1 = run(W.replicas, 2, steps=12, H=4, config=config, outer_lr=0.7, outer_momentum=0.9)
    assert r0["start"] != r1["start"]  # different inits, and yet:
    assert [s for _, _, s in r0["after_sync"]] == [s for _, _, s in r1["after_sync"]]
    assert [t for t, _, _ in r0["after_sync"]] == [3, 7, 11]
    # between syncs each rank trains on its own data: no exchange, the replicas drift
    for step in range(12):
        same = r0["every"][step] == r1["every"][step]
        assert same == (step % 4 == 3), step
    assert r0["stats"]["syncs"] == 3


@pytest.mark.parametrize("config", [None, {"mode": "int2"}], ids=["fp32", "int2"])
def test_fragments_stream_one_every_h_over_f_steps(config):
    r0, r1 = run(W.replicas, 2, steps=16, H=8, fragments=4, config=config)
    # fragment k syncs after steps 2(k+1) - 1, then every 8 steps
    assert [(t, k) for t, k, _ in r0["after_sync"]] == [
        (1, 0), (3, 1), (5, 2), (7, 3), (9, 0), (11, 1), (13, 2), (15, 3)]
    assert r0["after_sync"] == r1["after_sync"]  # each synced fragment identical on both
    assert r0["stats"]["syncs"] == 8


@pytest.mark.parametrize("kw", [
    dict(config=None),
    dict(config={"mode": "int2"}, outer_lr=0.7, outer_momentum=0.9),
    dict(config={"mode": "ternary"}, fragments=2, outer_momentum=0.5),
], ids=["fp32", "int2-momentum", "ternary-fragments"])
def test_resume_from_state_dict_is_exact(kw):
    for straight, resumed in run(W.resume, 2, total=14, cut=7, H=4, **kw):
        assert straight == resumed  # parameters bit for bit, and every counter of stats()


@pytest.mark.parametrize("kw", [dict(config=None), dict(config={"mode": "int2"}),
                                dict(config={"mode": "ternary", "phase2_mode": "int2"},
                                     fragments=3, H=6)],
                         ids=["fp32", "int2", "ternary-int2-fragments"])
def test_bytes_accounting(kw):
    kw = {"H": 4, **kw}
    out = run(W.count_bytes, 2, steps=12, **kw)
    for r in out:
        s, n = r["stats"], r["numel"]
        assert s["ddp_bytes"] == 12 * 2 * (2 - 1) / 2 * 4 * n
        assert s["bytes_sent"] == r["counted"]  # what the collectives were handed
        assert s["ratio"] == pytest.approx(s["ddp_bytes"] / s["bytes_sent"])
    if kw["config"] is None:
        assert out[0]["stats"]["bytes_sent"] == 3 * 4 * out[0]["numel"]  # 3 syncs, fp32
    elif kw.get("fragments", 1) == 1:
        cfg = VSAConfig(**{**W.VSA, **kw["config"]})
        plan = Plan.make(out[0]["numel"], 2, block_log2(cfg.block_size), MODES[cfg.mode],
                         MODES[cfg.phase2])
        assert out[0]["stats"]["bytes_sent"] == 3 * plan.wire_bytes


def test_outer_step_matches_torch_sgd_nesterov():
    """One process: the pseudo-gradient is the rank's own; the anchor moves as torch's SGD."""
    model = W.net()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = DiLoCo(model, inner, sync_every=3, outer_lr=0.7, outer_momentum=0.9)
    for step in range(9):
        W.one_step(model, opt, 0, step)
    # the same, with torch's SGD stepping a copy of the anchor
    ref = [p.detach().clone().requires_grad_(True) for p in W.net().parameters()]
    outer = torch.optim.SGD(ref, lr=0.7, momentum=0.9, nesterov=True)
    model2 = W.net()
    inner2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    for step in range(9):
        x, y = W.batch(0, step)
        inner2.zero_grad()
        torch.nn.functional.cross_entropy(model2(x), y).backward()
        inner2.step()
        if (step + 1) % 3 == 0:
            outer.zero_grad()
            with torch.no_grad():
                for r, p in zip(ref, model2.parameters()):
                    r.grad = r.detach() - p.detach()
            outer.step()
            with torch.no_grad():
                for r, p in zip(ref, model2.parameters()):
                    p.copy_(r)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("kw, match", [
    (dict(sync_every=0), "sync_every must be an int >= 1"),
    (dict(sync_every=2.5), "sync_every must be an int"),
    (dict(sync_every=10, fragments=4), "fragments .4. must divide sync_every .10."),
    (dict(sync_every=10, fragments=0), "fragments must be an int >= 1"),
    (dict(sync_every=12, fragments=12), "more than the model's 6 trainable"),
    (dict(sync_every=4, outer_lr=0), "outer_lr must be a positive"),
    (dict(sync_every=4, outer_momentum=1.0), "outer_momentum must be in"),
    (dict(sync_every=4, config="vsa"), "config must be a VSAConfig"),
    (dict(sync_every=4, config=VSAConfig(auto=True)), "auto is not supported"),
])
def test_bad_options(kw, match):
    model = W.net()
    with pytest.raises(ValueError, match=match):
        DiLoCo(model, _opt(model), **kw)


def test_optimizer_over_other_parameters():
    model = W.net()
    with pytest.raises(ValueError, match="exactly the model's trainable parameters"):
        DiLoCo(model, _opt(nn.Linear(2, 2)), sync_every=4)
    with pytest.raises(ValueError, match="must be a torch.optim.Optimizer"):
        DiLoCo(model, object(), sync_every=4)


def test_state_dict_with_other_settings_is_refused():
    model = W.net()
    sd = DiLoCo(model, _opt(model), sync_every=4).state_dict()
    with pytest.raises(ValueError, match="sync_every: this 8, checkpoint 4"):
        DiLoCo(model, _opt(model), sync_every=8).load_state_dict(sd)


def test_ddp_and_fsdp2_models_are_refused():
    (ddp, fsdp2), = run(W.wrapped_models, 1, timeout=600)
    assert ddp is not None and "pass the plain module (ddp.module)" in ddp
    assert fsdp2 is not None and "FSDP" in fsdp2 and "plain module" in fsdp2


def test_settings_that_differ_across_ranks_are_refused():
    for msg in run(W.mismatch, 2, timeout=600):
        assert msg is not None and "differ across ranks" in msg

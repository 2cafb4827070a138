"""``VSAState(auto=True)``: per-bucket choice between plain and compressed exchange (issue 4).

Timing differs from rank to rank; the choice must not. These tests run real gloo processes and
force the measured times (``_auto._measured`` for the probe, ``_auto._measured_step`` for the
trial) to show each outcome, including ranks whose own measurements disagree.
"""

import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import _ddp_workers as W
import tritter_comm
from _dist import run
from tritter_comm.hooks import _auto

AUTO = dict(start_iter=2, min_compress_numel=1000, auto=True)
PROBE = 2 * _auto.PROBE_ROUNDS  # probe steps of a check
TRIAL = 4 * _auto.TRIAL_ROUNDS  # trial steps of a check that found candidates (see train_auto)


# Forced timings. A probe preference names, per rank and bucket, the variant that measures ten
# times faster; a trial preference names the configuration whose steps measure faster.

def _probe_disagree(state, idx):
    # bucket 0: every rank measures compression faster; bucket 1: every rank measures plain
    # faster; the others: every rank but the last measures compression faster
    if idx < 2:
        return ("compressed", "plain")[idx]
    return "compressed" if dist.get_rank() < dist.get_world_size() - 1 else "plain"


def _probe_flip(state, idx):
    # compression wins the first check's probe and loses the second's
    return "compressed" if state._auto.checks == 0 else "plain"


PROBES = {"disagree": _probe_disagree, "flip": _probe_flip,
          "compressed": lambda state, idx: "compressed", "plain": lambda state, idx: "plain"}


def _force(probe, trial):
    def measured(state, idx, variant, seconds):
        return 0.001 if variant == PROBES[probe](state, idx) else 0.010

    def measured_step(state, variant, seconds):
        return 0.001 if variant == trial else 0.010

    _auto._measured = measured
    _auto._measured_step = measured_step


def train_auto(rank, world, *, steps, probe=None, trial="compressed", recheck=None,
               hook=AUTO, checkpoint_at=None):
    """Train W.Net with ``auto``; ``probe``/``trial`` force the timings (see :func:`_force`)."""
    if probe is not None:
        _force(probe, trial)
    if recheck is not None:
        _auto.RECHECK_EVERY = recheck
    _auto.TRIAL_SECONDS = 0.0  # TRIAL_ROUNDS rounds, however short the steps
    torch.manual_seed(0)
    model = W.Net(tiny=False, depth=8)
    # DDP's first bucket holds 1 MB; the ~1.3 MB that follow go in buckets of one layer each
    ddp = DDP(model, bucket_cap_mb=0.01)
    state = tritter_comm.VSAState(**hook)
    ddp.register_comm_hook(state, tritter_comm.vsa_hook)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    history, link_bytes, saved = [], [], None
    for step in range(steps):
        x, y = W._data(rank, step, torch.float32)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        st = state.stats()
        history.append((st["auto"], st["buckets_compressed"], st["buckets_uncompressed"]))
        link_bytes.append((st["bytes_sent_inter_node"], st["bytes_sent_intra_node"]))
        if checkpoint_at is not None and step + 1 == checkpoint_at:
            buf = io.BytesIO()
            torch.save(state.state_dict(), buf)
            saved = buf.getvalue()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"params": flat.numpy().tobytes(), "stats": state.stats(), "history": history,
            "link_bytes": link_bytes,
            "buckets": len(ddp.reducer._get_zeros_like_grad_buckets()), "saved": saved}


def _same_everywhere(res, key):
    for r in res[1:]:
        assert r[key] == res[0][key], f"{key} differs between ranks"


def _expected_counts(nb, candidates, final, after, trial=True):
    """(compressed, plain) bucket exchanges: 2 plain iterations (one bucket before DDP's
    rebuild), the probe (half plain, half compressed), the trial if any (blocks of two steps:
    candidates compressed, all plain), then ``after`` steps of the final choice."""
    half = PROBE // 2
    comp = half * nb + after * final
    plain = 1 + nb + half * nb + after * (nb - final)
    if trial:
        comp += (TRIAL // 2) * candidates
        plain += (TRIAL // 2) * (nb - candidates) + (TRIAL // 2) * nb
    return comp, plain


def test_measured_choice_is_identical_on_every_rank():
    # real clocks: whatever is chosen, every rank chooses it and replicas stay identical
    res = run(train_auto, 2, steps=2 + PROBE + TRIAL + 2)
    _same_everywhere(res, "params")
    _same_everywhere(res, "history")
    st = res[0]["stats"]
    assert st["auto_checks"] == 1
    assert len(st["auto"]) == res[0]["buckets"]  # every bucket here is large enough to probe
    assert set(st["auto"].values()) <= {"plain", "compressed"}
    assert set(st["auto"]) == set(st["auto_seconds"])
    assert all(v["plain"] > 0 and v["compressed"] > 0 for v in st["auto_seconds"].values())
    assert st["auto_next_check"] == 2 + _auto.RECHECK_EVERY


@pytest.mark.parametrize("world", [2, 3])
def test_forced_outcomes_and_ranks_that_disagree(world):
    after = 3
    res = run(train_auto, world, steps=2 + PROBE + TRIAL + after, probe="disagree")
    _same_everywhere(res, "params")
    _same_everywhere(res, "history")
    st, nb = res[0]["stats"], res[0]["buckets"]
    assert nb >= 4 and len(st["auto"]) == nb
    assert st["auto"][0] == "compressed" and st["auto"][1] == "plain"
    # 2 ranks: one vote each way, the summed times tie, and ties go to plain (exact);
    # 3 ranks: two votes to one
    split = "plain" if world == 2 else "compressed"
    assert all(st["auto"][i] == split for i in range(2, nb)), st["auto"]
    n = sum(c == "compressed" for c in st["auto"].values())
    assert (st["buckets_compressed"], st["buckets_uncompressed"]) == _expected_counts(
        nb, candidates=n, final=n, after=after)
    assert st["auto_step_seconds"] == {"plain": 0.010, "compressed": 0.001}
    # the choice is reported from the end of the check on, and not before
    hist = res[0]["history"]
    end = 2 + PROBE + TRIAL - 1
    assert all(h[0] == {} for h in hist[:end])
    assert all(h[0] == st["auto"] for h in hist[end:])


def test_two_links_compressed_is_the_node_aware_exchange():
    # 4 ranks as 2 nodes of 2 (intra_node_size=2): auto's "compressed" is the node-aware
    # exchange (plain inside the node, compressed across), its "plain" the all-reduce; both
    # are counted by link, and the choice is the same on every rank
    after = 3
    hook = {**AUTO, "intra_node_size": 2}
    per_step = {}
    for choice in ("compressed", "plain"):
        res = run(train_auto, 4, steps=2 + PROBE + TRIAL + after, probe=choice, trial=choice,
                  hook=hook, timeout=240)
        _same_everywhere(res, "params")
        _same_everywhere(res, "history")
        st = res[0]["stats"]
        assert set(st["auto"].values()) == {choice}
        assert st["bytes_sent"] == st["bytes_sent_inter_node"] + st["bytes_sent_intra_node"]
        # the last step's bytes on each link, every rank
        per_step[choice] = [tuple(a - b for a, b in zip(r["link_bytes"][-1], r["link_bytes"][-2]))
                            for r in res]
    for (c_inter, c_intra), (p_inter, p_intra) in zip(per_step["compressed"], per_step["plain"]):
        assert 0 < c_inter < 0.2 * p_inter  # compressed across the slow link
        assert c_intra > 0  # fp32 shards inside the node


def test_trial_overrules_the_probe():
    # every bucket's exchange is faster compressed, but whole steps are faster all plain
    after = 2
    res = run(train_auto, 2, steps=2 + PROBE + TRIAL + after, probe="compressed", trial="plain")
    _same_everywhere(res, "params")
    st, nb = res[0]["stats"], res[0]["buckets"]
    assert set(st["auto"].values()) == {"plain"}
    assert (st["buckets_compressed"], st["buckets_uncompressed"]) == _expected_counts(
        nb, candidates=nb, final=0, after=after)


def test_recheck_can_change_the_choice():
    recheck = PROBE + TRIAL + 3
    res = run(train_auto, 2, steps=2 + recheck + PROBE + 1, recheck=recheck, probe="flip")
    _same_everywhere(res, "params")
    _same_everywhere(res, "history")
    hist, st = res[0]["history"], res[0]["stats"]
    first = hist[2 + PROBE + TRIAL - 1][0]
    assert first and set(first.values()) == {"compressed"}
    assert hist[2 + recheck - 1][0] == first  # kept until the re-check
    # the second probe finds no candidate: all plain, no trial
    assert set(st["auto"].values()) == {"plain"}
    assert st["auto_checks"] == 2 and st["auto_next_check"] == 2 + 2 * recheck


def test_trial_length_follows_the_step_time():
    assert _auto._trial_rounds(math.nan) == _auto.TRIAL_ROUNDS
    assert _auto._trial_rounds(10.0) == _auto.TRIAL_ROUNDS  # long steps: the minimum
    assert _auto._trial_rounds(1e-4) == _auto.MAX_TRIAL_ROUNDS  # short ones: the maximum
    mid = _auto.TRIAL_SECONDS / (4 * 3)  # three rounds fit in TRIAL_SECONDS
    assert _auto._trial_rounds(mid * 1.01) == 2 and _auto._trial_rounds(mid * 0.99) == 3


def test_choice_is_in_the_state_dict_and_config_is_checked():
    steps = 2 + PROBE + TRIAL + 1
    res = run(train_auto, 2, steps=steps, probe="disagree", checkpoint_at=steps)
    sd = torch.load(io.BytesIO(res[0]["saved"]), weights_only=True)
    assert sd["config"]["auto"] is True
    assert sd["auto"]["choice"][0] == "compressed" and sd["auto"]["choice"][1] == "plain"
    state = tritter_comm.VSAState(**AUTO)
    state.load_state_dict(sd)
    assert state.stats()["auto"] == res[0]["stats"]["auto"]
    with pytest.raises(ValueError, match="auto"):
        tritter_comm.VSAState(**dict(AUTO, auto=False)).load_state_dict(sd)
    # a checkpoint from before `auto` existed loads into auto=False
    old = dict(sd, config={k: v for k, v in sd["config"].items() if k != "auto"})
    tritter_comm.VSAState(**dict(AUTO, auto=False)).load_state_dict(old)
    assert tritter_comm.VSAState(auto=True).config.auto is True


def test_ranks_with_different_auto_fail_clearly():
    with pytest.raises(RuntimeError) as e:
        run(W.train, 2, steps=4, hook_per_rank=[dict(AUTO), dict(AUTO, auto=False)])
    assert "auto: rank 0=True, rank 1=False" in str(e.value)

"""The FSDP1 hook and the FSDP2 reduce-scatter on real gloo processes (2 ranks, CPU).

Spawning ranks costs more than training these models, so each API's trainings run one after
another in one pair of processes (a module-scoped fixture) and the tests read their results.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import _fsdp_workers as W
import tritter_comm
import tritter_comm.fsdp
import tritter_comm.hooks.fsdp2
from _dist import run

HOOK = dict(start_iter=2, min_compress_numel=1000)
APIS = ["fsdp1", "fsdp2"]
STEPS = 40


def _runs(api, path):
    runs = dict(
        # many units (10), against FSDP's own reduction
        base=dict(depth=8, steps=STEPS),
        vsa=dict(depth=8, steps=STEPS, hook=HOOK),
        # one step's gradient: FSDP's own, the hook's uncompressed path, the first compressed
        exact=dict(steps=3, grads_at=(0, 1, 2)),
        plain=dict(steps=3, grads_at=(0, 1, 2), hook=dict(HOOK, start_iter=10**9)),
        first=dict(steps=3, grads_at=(2,), hook=HOOK),
        accumulate=dict(steps=20, accumulate=2, hook=HOOK),
        bf16=dict(steps=20, reduce_dtype=torch.bfloat16, hook=HOOK),
        count=dict(steps=6, width=256, count_from=3, hook=dict(HOOK, mode="ternary")),
        # two equal units whose backward order flips on odd steps
        fixed=dict(steps=12, branches=True, hook=HOOK),
        flipped=dict(steps=12, branches=True, flip_odd=True, hook=HOOK),
        full=dict(steps=16, save_at=8, save_path=path, hook=dict(HOOK, start_iter=4)),
        resumed=dict(steps=16, load_path=path, hook=dict(HOOK, start_iter=4)),
        nan=dict(steps=8, nan_at=(1, 5), hook=HOOK),
    )
    if api == "fsdp1":
        runs.update(
            shard_grad_op=dict(steps=20, strategy="SHARD_GRAD_OP", hook=HOOK),
            no_shard=dict(steps=20, strategy="NO_SHARD", hook=HOOK),
        )
    else:
        runs.update(
            # FSDP asks for SUM and divides by the factor itself afterwards
            sum_exact=dict(steps=3, grads_at=(2,), divide_factor=4.0, force_sum=True),
            sum_first=dict(steps=3, grads_at=(2,), divide_factor=4.0, force_sum=True,
                           hook=HOOK),
            fp16=dict(steps=20, reduce_dtype=torch.float16, hook=HOOK),
        )
    return runs


_cache: dict = {}


@pytest.fixture(params=APIS)
def api(request, tmp_path_factory):
    if request.param == "fsdp2" and not tritter_comm.fsdp.available():
        pytest.skip(f"torch {torch.__version__} has no FSDP2 custom reduce-scatter")
    if request.param not in _cache:
        path = str(tmp_path_factory.mktemp(request.param) / "ckpt")
        _cache[request.param] = run(W.suite, 2, _runs(request.param, path), api=request.param,
                                    timeout=280)
    return request.param, _cache[request.param]


def mean(xs):
    return sum(xs) / len(xs)


def flat(b):
    return np.frombuffer(b, dtype=np.float32)


def test_many_units_train_like_uncompressed(api):
    _, res = api
    base, comp = res[0]["base"], res[0]["vsa"]
    st = comp["stats"]
    assert st["steps"] == STEPS and st["iter"] == STEPS
    assert comp["residual_keys"] == list(range(9))  # the root (inp, head) and 8 blocks
    assert st["buckets_uncompressed"] == 2 * 9 and st["buckets_compressed"] == (STEPS - 2) * 9
    b, c = mean(base["losses"][-10:]), mean(comp["losses"][-10:])
    assert c < 0.8 * mean(comp["losses"][:5])
    assert c < b * 1.1 + 0.02, (b, c)


def test_uncompressed_path_is_fsdps_own_reduction(api):
    _, res = api
    for r in res:
        assert r["plain"]["grads"] == r["exact"]["grads"]  # same division, bit for bit


def _scale_and_error(got, exact):
    g, e = flat(got), flat(exact)
    return float(g @ e / (e @ e)), float(np.linalg.norm(g - e) / np.linalg.norm(e))


def test_compressed_gradient_is_the_average(api):
    name, res = api
    pairs = [("first", "exact", -1)]
    if name == "fsdp2":
        pairs.append(("sum_first", "sum_exact", 0))
    for r in res:
        for got, exact, i in pairs:
            scale, err = _scale_and_error(r[got]["grads"][0], r[exact]["grads"][i])
            # one ternary quantization of each rank's gradient, no feedback yet: the least-
            # squares scale of a quantized vector is 1 - err^2 (~0.8); a wrong division by
            # the world size would halve or double it
            assert 0.65 < scale < 1.1, (got, scale)
            assert 0.05 < err < 0.7, (got, err)


def test_bytes_counted_at_collectives(api):
    _, res = api
    for r in res:
        c = r["count"]
        st, st0 = c["stats"], c["stats_at_count"]
        sent = st["bytes_sent"] - st0["bytes_sent"]
        assert c["counted"] == sent
        assert st["buckets_uncompressed"] == st0["buckets_uncompressed"]  # all compressed
        # what an fp32 reduce-scatter of the (unpadded) gradients sends in the 3 steps
        fp32 = 3 * c["n_params"] * 4 // 2
        assert sent * 16 <= fp32, (sent, fp32)


def test_residuals_keyed_by_unit_not_call_order(api):
    _, res = api
    for r in res:
        fixed, flipped = r["fixed"], r["flipped"]
        assert fixed["order"][:3] != flipped["order"][3:6]  # the backward order did flip
        assert fixed["order"][:3] == fixed["order"][3:6]
        assert fixed["residual_keys"] == flipped["residual_keys"] == [0, 1, 2]
        # same math in either order: keyed by unit, the runs agree bit for bit
        assert flipped["local"] == fixed["local"]


def test_gradient_accumulation_syncs_once_a_step(api):
    _, res = api
    r = res[0]["accumulate"]
    assert r["stats"]["steps"] == 20
    assert len(r["order"]) == 20 * 5  # 5 units reduced once per step, never in no-sync passes
    assert mean(r["losses"][-5:]) < mean(r["losses"][:5])


@pytest.mark.parametrize("run_name", ["bf16", "fp16", "shard_grad_op", "no_shard"])
def test_precisions_and_strategies(api, run_name):
    name, res = api
    if run_name not in res[0]:
        pytest.skip(f"{run_name} is not an {name} option here")
    r = res[0][run_name]
    assert r["stats"]["buckets_compressed"] == 18 * 5
    assert all(np.isfinite(r["losses"]))
    assert mean(r["losses"][-5:]) < mean(r["losses"][:5])
    if run_name == "no_shard":  # every rank holds the whole model
        assert res[1][run_name]["local"] == r["local"]


def test_replicas_consistent(api):
    _, res = api
    for run_name, r in res[0].items():
        assert res[1][run_name]["full"] == r["full"], run_name


def test_checkpoint_resume_is_exact(api):
    _, res = api
    for r in res:
        full, resumed = r["full"], r["resumed"]
        assert resumed["local"] == full["local"]
        assert resumed["losses"] == full["losses"][8:]
        assert resumed["stats"]["iter"] == 16 and resumed["stats"]["steps"] == 8


def test_non_finite_gradient_reaches_every_rank_and_spares_residuals(api):
    _, res = api
    for rank, r in enumerate(res):
        rows = r["nan"]["nonfinite"]
        assert [row[0] for row in rows] == list(range(8))
        for step, finite, residuals_finite, n_residuals in rows:
            assert residuals_finite, f"rank {rank}: a residual was poisoned at step {step}"
            assert finite == (step != 5), f"rank {rank}, step {step}: gradient finite={finite}"
            if step >= 2:  # compressing since start_iter: the NaN went through the codec
                assert n_residuals > 0
    assert res[0]["nan"]["full"] == res[1]["nan"]["full"]


def test_enable_names_the_torch_it_needs(monkeypatch):
    monkeypatch.setattr(tritter_comm.hooks.fsdp2, "_API", None)
    with pytest.raises(RuntimeError, match=r"needs torch 2\.\d+ or newer"):
        tritter_comm.fsdp.enable(nn.Linear(2, 2), tritter_comm.VSAState())


@pytest.mark.skipif(not tritter_comm.fsdp.available(), reason="no FSDP2 custom comms")
def test_enable_needs_fully_shard_modules():
    with pytest.raises(ValueError, match="fully_shard"):
        tritter_comm.fsdp.enable(nn.Linear(2, 2), tritter_comm.VSAState())
    with pytest.raises(ValueError, match="VSAState"):
        tritter_comm.fsdp.enable(nn.Linear(2, 2), object())


def test_reduce_ops_map_to_the_sum_scaled():
    scale = tritter_comm.hooks.fsdp2._scale
    assert scale(dist.ReduceOp.SUM, 4) == (None, None)
    assert scale(dist.ReduceOp.AVG, 4) == (4.0, None)
    assert scale(dist.ReduceOp.PREMUL_SUM(0.125), 4) == (None, 0.125)
    with pytest.raises(ValueError, match="MAX"):
        scale(dist.ReduceOp.MAX, 4)


def test_plan_even_keeps_fsdps_shards():
    from tritter_comm.exchange import Plan

    p = Plan.even(2 * 5509, 2, 10, 0)  # shards need not be block-aligned
    assert p.chunk == 5509 and p.bounds(1) == (5509, 11018)
    assert p.reduce_scatter_wire_bytes == p.slot == -(-tritter_comm.body_nbytes(5509) // 4) * 4
    with pytest.raises(ValueError, match="equal chunks"):
        Plan.even(11, 2, 10, 0)


def test_hook_is_exported():
    assert tritter_comm.hooks.vsa_fsdp_hook is tritter_comm.vsa_fsdp_hook
    assert "vsa_fsdp_hook" in tritter_comm.hooks.__all__


def test_an_unknown_unit_is_keyed_by_call_order_with_a_warning():
    state = tritter_comm.VSAState()
    with pytest.warns(tritter_comm.TritterCommWarning, match="call order"):
        assert tritter_comm.hooks.fsdp.enter(state, None) == 0
    assert tritter_comm.hooks.fsdp.enter(state, None) == 1  # warned once

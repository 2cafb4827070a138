"""The CUDA path of the exchange and the DDP hook: two gloo ranks sharing the one GPU, and one
NCCL rank whose exchanges are forced through the collectives (``VSAState._force_exchange``, for
tests only: one GPU allows no more NCCL ranks).

Skipped without a GPU (CI has none). The codec's own CUDA checks are in test_torch_codec.py,
the weight sync's in test_sync.py and the predictor's in test_phase.py.
"""

import functools

import pytest
import torch
import tritter_comm

import _cuda_workers as C
import _ddp_workers as W
from _dist import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("mode", ["ternary", "int2"])
def test_exchange_on_cuda_is_bit_identical_to_cpu(mode):
    res = run(C.exchange_cpu_and_cuda, 2, mode=mode, timeout=300)
    for r in res:
        assert r["outputs_equal"] == [True] * 3
        assert r["residual_equal"] and r["server_residual_equal"]
        assert r["residual_used"]
    assert res[0]["outputs"] == res[1]["outputs"]  # every rank decodes the same average


def test_ddp_hook_on_cuda_keeps_replicas_identical():
    res = run(C.ddp_on_cuda, 2, timeout=300)
    assert res[0]["first_diff"] is None, f"replicas differ after step {res[0]['first_diff']}"
    assert res[0]["params"] == res[1]["params"]
    st = res[0]["stats"]
    assert st["buckets_compressed"] > 0, st
    assert res[0]["residual_devices"] == ["cuda:0"]
    losses = res[0]["losses"]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_ddp_without_hook_on_cuda_keeps_replicas_identical():
    # the control: gloo's own all-reduce of CUDA buckets
    res = run(C.ddp_on_cuda, 2, hook=False, timeout=300)
    assert res[0]["first_diff"] is None, f"replicas differ after step {res[0]['first_diff']}"


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
@pytest.mark.parametrize("block_log2", [8, 10, 16])
def test_cuda_decode_is_exact_under_any_matmul_precision(precision, block_log2):
    # the transform of the levels runs as matrix products (TF32 or bf16 inputs under "high" and
    # "medium"); its inputs are small integers, so the result must not change
    from tritter_comm import _torch_codec as tc

    n = 3 * (1 << block_log2) + 1000
    g = torch.Generator().manual_seed(block_log2)
    x = torch.randn(n, generator=g)
    e = 0.1 * torch.randn(n, generator=g)
    kw = dict(seed=5, stream=9, mode=2, block_log2=block_log2)
    ec = e.clone()
    body = tc.encode_body(x, residual=ec, **kw)
    y = tc.decode_body(body, n=n, dtype=torch.float32, **kw)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        eg = e.cuda()
        bg = tc.encode_body(x.cuda(), residual=eg, **kw)
        yg = tc.decode_body(bg, n=n, dtype=torch.float32, **kw)
    finally:
        torch.set_float32_matmul_precision(old)
    assert torch.equal(body, bg.cpu())
    assert torch.equal(ec, eg.cpu())
    assert torch.equal(y, yg.cpu())


@pytest.mark.parametrize("block_log2", [8, 10, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["ternary", "sign", "int2"])
def test_triton_encoder_on_cuda_gives_the_rust_bytes(mode, dtype, block_log2):
    from tritter_comm import _triton_codec as tt
    from tritter_comm.codec import MODES, encode_body_into

    n = 7 * (1 << block_log2) + 333
    g = torch.Generator().manual_seed(block_log2)
    x = (torch.randn(n, generator=g) * 2).to(dtype)
    e = (torch.randn(n, generator=g) * 0.2).to(dtype)
    kw = dict(seed=3, stream=77, mode_id=MODES[mode], block_log2=block_log2)
    size = tritter_comm.body_nbytes(n, mode=mode, block_size=1 << block_log2)
    bc, bg = torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8,
                                                               device="cuda")
    ec, eg = e.clone(), e.cuda()
    encode_body_into(x, bc, residual=ec, backend="rust", **kw)
    before = tt.launches
    encode_body_into(x.cuda(), bg, residual=eg, backend="torch", **kw)
    assert tt.launches == before + 1, tt._broken
    assert torch.equal(bc, bg.cpu())
    assert torch.equal(ec, eg.cpu())


NCCL = "cpu:gloo,cuda:nccl"  # CPU tensors (the references, the tests' own checks) over gloo


def _assert_forced_world1(r):
    """Every bucket of the run came out of the hook as a direct Exchange on CPU tensors (the
    Rust codec, gloo) makes it, bit for bit, and the compressed ones went through the
    collectives."""
    n = sum(r["compressed"])
    assert n > 0 and not all(r["compressed"]), r["compressed"]
    assert all(r["equal_ref"]), r["equal_ref"]
    assert [not u for u in r["unchanged"]] == r["compressed"]
    assert r["calls"]["all_to_all_single"] == n and r["calls"]["all_gather_into_tensor"] == n


def test_exchange_through_nccl_at_world_1_is_bit_identical_to_gloo_cpu():
    # the exchange itself: CUDA tensors through NCCL, CPU tensors through gloo, one group
    res = run(C.exchange_cpu_and_cuda, 1, mode="int2", backend=NCCL, timeout=300)[0]
    assert res["outputs_equal"] == [True] * 3
    assert res["residual_equal"] and res["server_residual_equal"] and res["residual_used"]


@functools.lru_cache(maxsize=None)
def _runs(backend: str, sync_debug: bool = False) -> dict:
    """The forced world-1 DDP run on the GPU over ``backend``, side stream off and on (one
    process, each run's own model and state); each result run once for the tests below."""
    return run(C.side_stream_off_and_on, 1, worker=W.ddp_world1, device="cuda",
               backend=backend, sync_debug=sync_debug, steps=5 if sync_debug else 6,
               timeout=300)[0]


def test_ddp_hook_through_nccl_at_world_1_is_bit_identical_to_gloo_cpu():
    # DDP with the hook, the model on the GPU, the exchange forced through NCCL: each bucket
    # as the CPU exchange (gloo, the Rust codec) makes it; and the whole run as the same run
    # over gloo with the model on the GPU
    r = _runs(NCCL)["off"]
    _assert_forced_world1(r)
    g = _runs("gloo")["off"]
    _assert_forced_world1(g)
    assert r["params"] == g["params"]


def test_ddp_hook_on_cuda_through_nccl_makes_no_host_sync():
    # issue 16: after the warm-up every hook call runs under set_sync_debug_mode("error"),
    # which raises at any host synchronization (the non-finite check included); with the
    # side stream too
    both = _runs(NCCL, sync_debug=True)
    for r in both.values():
        _assert_forced_world1(r)
    assert both["on"]["side_streams"] == 1


@pytest.mark.parametrize("backend", [NCCL, "gloo"])
def test_ddp_hook_on_cuda_side_stream_gives_the_same_bits_at_world_1(backend):
    # issue 16, item 2: the codec work on a side stream, ordered by events, changes no bit
    both = _runs(backend)
    _assert_forced_world1(both["on"])
    assert both["on"]["side_streams"] == 1 and both["off"]["side_streams"] == 0
    assert both["on"]["params"] == both["off"]["params"]


def test_ddp_hook_on_cuda_side_stream_gives_the_same_bits_on_two_gloo_ranks():
    res = run(C.side_stream_off_and_on, 2, worker=C.ddp_on_cuda, steps=12, timeout=300)
    for r in res:
        assert r["on"]["side_streams"] == 1 and r["off"]["side_streams"] == 0
        for k in ("off", "on"):
            assert r[k]["first_diff"] is None, (k, r[k]["first_diff"])
            assert r[k]["stats"]["buckets_compressed"] > 0
    assert res[0]["on"]["params"] == res[1]["on"]["params"] == res[0]["off"]["params"]


def test_exchange_with_nan_and_inf_on_cuda_matches_cpu_through_nccl():
    # the non-finite flag on the device (issue 16): the NaN outputs (NaN where the CPU's are,
    # the NaNs' payload bits aside) and the untouched residuals of the CPU path, bit for bit,
    # with float32 and bf16 residuals
    res = run(C.exchange_nonfinite_cpu_and_cuda, 1, backend=NCCL, timeout=300)[0]
    for rdt, r in res.items():
        assert r["nan_steps"] == [False, True, True, False], (rdt, r)
        assert r["residual_kept"] == [True, True], (rdt, r)
        assert r["outputs"] == [True] * 4 and r["residuals"] == [True] * 4, (rdt, r)

"""The CUDA path of the exchange and the DDP hook: two gloo ranks sharing the one GPU.

Skipped without a GPU (CI has none). The codec's own CUDA checks are in test_torch_codec.py,
the weight sync's in test_sync.py and the predictor's in test_phase.py.
"""

import pytest
import torch

import _cuda_workers as C
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

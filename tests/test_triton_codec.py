"""The Triton encoder (tritter_comm/_triton_codec.py, what CUDA tensors use) gives the torch
codec's bytes and residuals bit for bit. Here it runs in Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, in a child process: it must be set before triton is imported);
tests/test_cuda.py checks it on a GPU against the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("block_log2s", ["8,10", "12"])
def test_triton_encoder_matches_the_torch_codec_bit_for_bit(block_log2s):
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(HERE / "_triton_check.py"), block_log2s],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["broken"] == {}
    assert len(res["cases"]) == 36 * len(block_log2s.split(","))
    bad = [c for c in res["cases"]
           if not (c["body_equal"] and c["residual_equal"] and c["kernel_ran"])]
    assert bad == []


def test_triton_is_not_used_for_cpu_tensors_or_other_block_sizes():
    import torch

    from tritter_comm import _triton_codec as tt

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the kernel on CPU tensors")
    assert not tt.available(torch.device("cpu"), 1024)
    assert not tt.available(torch.device("cuda"), 128)
    assert not tt.available(torch.device("cuda"), 8192)

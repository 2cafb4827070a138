"""The Triton kernels (tritter_comm/_triton_codec.py, what CUDA tensors use) give the Rust
codec's bytes, residuals, decoded vectors and phase-2 sums bit for bit. Here they run in Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1, in one child process: it must be set before
triton is imported; tests/_triton_check.py does the checking); tests/test_cuda.py checks them on
a GPU against the CPU.

Block 256 runs every case; 1024 and 4096, and the kernels' plain build, one length ("quick"):
the interpreter is slow.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent

# job (section:block log2s[:options]): number of cases
CHECKS = {
    "encode:8": 72,  # 3 modes x 3 dtypes x residual or not x 4 lengths
    "encode:10,12:quick": 36,  # one length: full blocks and a tail
    "decode:8": 42,  # 3 modes x 4 lengths x 3 dtypes, + 2 x 3 of rounding ties
    "decode:10,12:quick": 30,
    "decode_sum:8": 48,  # 3 modes x 2 lengths x 1 or 3 bodies x 4 outputs
    "decode_sum:10,12:quick": 24,  # 3 bodies, one length
    "nonfinite:8": 33,  # NaN, -Inf, overflow x 3 modes x dtypes; decode and sum
    "poison:8": 36,  # the flag on the device: 3 modes x 3 dtypes x (none, NaN, tail Inf, residual)
    "poison:8:plain": 36,
    "encode:8:unbiased": 24,  # int2's unbiased scale: 3 dtypes x residual or not x 4 lengths
    "encode:10:unbiased,quick": 6,
    "encode:8:plain,unbiased,quick": 6,
    "encode:8:plain,quick": 18,  # the plain build
    "decode_sum:8:plain,quick": 12,
    # the fast build's variants that benchmarks/codec_cuda_sweep.py times (same bits)
    "encode:8:words,quick": 18,
    "decode_sum:8:words": 48,
    "decode:8:dot,quick": 15,
    "encode:8:dot,quick": 18,
    "poison:8:words": 36,
}
FALLBACK = "fallback:8"


# two child processes, each well inside the per-test timeout on a busy machine
GROUPS = ([j for j in CHECKS if not j.startswith("decode")],
          [j for j in CHECKS if j.startswith("decode")] + [FALLBACK])


def _run(jobs: list) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITTER_COMM_TRITON", None)
    out = subprocess.run([sys.executable, str(HERE / "_triton_check.py"), *jobs],
                         capture_output=True, text=True, env=env, timeout=280, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results() -> dict:
    """The results of every job, each group's child run when a test first needs it."""

    class _Lazy(dict):
        def __missing__(self, job):
            self.update(_run(next(g for g in GROUPS if job in g)))
            return self[job]

    return _Lazy()


@pytest.mark.parametrize("job", list(CHECKS))
def test_triton_kernels_match_the_rust_codec_bit_for_bit(results, job):
    res = results[job]
    assert res["broken"] == {}
    assert len(res["cases"]) == CHECKS[job]
    assert [c["case"] for c in res["cases"] if not c["ok"]] == []


def test_a_kernel_that_cannot_be_built_falls_back_with_the_same_results(results):
    cases = results[FALLBACK]["cases"]
    assert [c["case"] for c in cases if not c["ok"]] == []
    runs: dict = {}
    for c in cases:
        r = runs.setdefault(c["case"][0], {"warnings": []})
        if c["case"][1] == "broken":
            r["broken"] = set(c["broken"])
        else:
            r["warnings"].append(c["warnings"])
    for what, r in runs.items():  # logged once a case: a second run adds no warning
        w = r["warnings"]
        assert w[0::2] == w[1::2], (what, w)
    assert runs["off"]["warnings"] == [0] * 4 and runs["off"]["broken"] == set()
    assert runs["fast"]["broken"] == {f"{k} fast {p}" for k in ("encode", "decode")
                                      for p in ("full", "tail")}
    assert runs["tail"]["broken"] == {f"{k} {b} tail" for k in ("encode", "decode")
                                      for b in ("fast", "plain")}
    assert runs["all"]["broken"] == {f"{k} {b} full" for k in ("encode", "decode")
                                     for b in ("fast", "plain")}


def test_triton_kernels_build_for_sm90_without_a_gpu():
    # the interpreter does not compile: triton.compile for an H100/H200 does, with no GPU
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITTER_COMM_TRITON")}
    out = subprocess.run([sys.executable, str(HERE / "_triton_check.py"), "--compile", "90"],
                         capture_output=True, text=True, env=env, timeout=280, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    cases = json.loads(out.stdout.strip().splitlines()[-1])["cases"]
    if any("unsupported" in c for c in cases):
        pytest.skip(f"this triton compiles differently: {cases[0]['unsupported']}")
    assert len(cases) == 6 and all(c["ok"] for c in cases), cases


def test_triton_is_not_used_for_cpu_tensors_or_other_block_sizes(monkeypatch):
    import torch

    from tritter_comm import _triton_codec as tt

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter runs the kernel on CPU tensors")
    assert not tt.available(torch.device("cpu"), 1024)
    assert not tt.available(torch.device("cuda"), 128)
    assert not tt.available(torch.device("cuda"), 8192)
    monkeypatch.setenv("TRITTER_COMM_TRITON", "0")
    assert not tt.available(torch.device("cuda"), 1024)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
def test_triton_kernels_on_cuda_match_the_rust_codec():
    # compiled for the GPU (no interpreter): the bits, and that the fast build compiled (a
    # build that fails falls back, but should not here). Each new case is a compilation (a
    # second or more), so one dtype for each block size and mode, in turn ("sparse"): some 60
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITTER_COMM_TRITON")}
    jobs = ["encode:8,12:quick,sparse", "decode:8,12:quick,sparse",
            "decode_sum:10:quick,sparse", "nonfinite:10:sparse", "poison:10:sparse",
            "fallback:10"]
    out = subprocess.run([sys.executable, str(HERE / "_triton_check.py"), "--cuda", *jobs],
                         capture_output=True, text=True, env=env, timeout=280, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for job in jobs:
        assert res[job]["cases"], job
        assert [c["case"] for c in res[job]["cases"] if not c["ok"]] == [], job
        if not job.startswith("fallback"):
            assert res[job]["broken"] == {}, job

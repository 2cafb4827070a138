"""The Rust codec against the torch codec, byte for byte (docs/FORMAT.md is the contract).

Every length class (one element, a short tail, tails above and below a SIMD vector, several
blocks plus a tail), every mode, dtype and a spread of block sizes; the encoded bodies, the
updated residuals and the decoded tensors must be identical, at every SIMD level the CPU has.
"""

from __future__ import annotations

import pytest
import torch

import tritter_comm as tc
from tritter_comm import _native

MODES = ["ternary", "sign", "int2"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [1, 5, 300, 1000, 4097, 100003]
BLOCKS = [256, 1024, 65536]
LEVELS = ["scalar", "avx2", "avx512"]


def _inputs(n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    # a few large values, so that some blocks are far from Gaussian
    x[:: max(1, n // 7)] *= 50.0
    e = 0.1 * torch.randn(n, generator=g)
    return x.to(dtype), e.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _levels():
    """The SIMD levels the CPU has, switched to in turn; the best one is restored after."""
    best = _native.simd_level()
    try:
        for level in LEVELS:
            if _native.set_simd_level(level) == level:
                yield level
    finally:
        _native.set_simd_level(best)


@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_rust_matches_torch(mode, dtype, block_size):
    for i, n in enumerate(SIZES):
        x, e = _inputs(n, dtype, seed=1000 * i + block_size)
        kw = {"seed": 12345, "stream": (n << 8) + 3, "mode": mode, "block_size": block_size}
        e_torch = e.clone()
        p_torch = tc.encode(x, residual=e_torch, backend="torch", **kw)
        y_torch = tc.decode(p_torch, backend="torch")
        for level in _levels():
            what = f"n={n} {mode} {dtype} block={block_size} {level}"
            e_rust = e.clone()
            p_rust = tc.encode(x, residual=e_rust, backend="rust", **kw)
            assert torch.equal(p_rust.body, p_torch.body), f"body differs: {what}"
            assert torch.equal(_bits(e_rust), _bits(e_torch)), f"residual differs: {what}"
            y_rust = tc.decode(p_rust, backend="rust")
            assert torch.equal(_bits(y_rust), _bits(y_torch)), f"decode differs: {what}"


@pytest.mark.parametrize("mode", MODES)
def test_rust_matches_torch_without_residual(mode):
    for n in [7, 1024, 5000]:
        x, _ = _inputs(n, torch.float32, seed=n)
        p_torch = tc.encode(x, seed=1, stream=2, mode=mode, backend="torch")
        for level in _levels():
            p_rust = tc.encode(x, seed=1, stream=2, mode=mode, backend="rust")
            assert torch.equal(p_rust.body, p_torch.body), f"n={n} {mode} {level}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rust_matches_torch_with_the_unbiased_scale(dtype):
    """int2's unbiased scale (``encode(..., unbiased=True)``): the same body and residual from
    both backends at every SIMD level, and not least squares' body."""
    for i, n in enumerate(SIZES):
        x, e = _inputs(n, dtype, seed=77 + i)
        kw = {"seed": 5, "stream": n, "mode": "int2", "block_size": 256, "unbiased": True}
        e_torch = e.clone()
        p_torch = tc.encode(x, residual=e_torch, backend="torch", **kw)
        plain = tc.encode(x, backend="torch", **kw)
        lsq = tc.encode(x, backend="torch", **{**kw, "unbiased": False})
        if n >= 300:  # a block of one element: both scales are |z| / |m|
            assert not torch.equal(plain.body, lsq.body)
        for level in _levels():
            what = f"n={n} {dtype} {level}"
            e_rust = e.clone()
            assert torch.equal(tc.encode(x, residual=e_rust, backend="rust", **kw).body,
                               p_torch.body), what
            assert torch.equal(_bits(e_rust), _bits(e_torch)), what
            assert torch.equal(tc.encode(x, backend="rust", **kw).body, plain.body), what


@pytest.mark.parametrize("mode", ["ternary", "sign"])
def test_unbiased_scale_is_int2s(mode):
    with pytest.raises(ValueError, match="int2"):
        tc.encode(torch.randn(300), mode=mode, unbiased=True)
    with pytest.raises(ValueError, match="int2"):
        _native.encode_f32(torch.randn(300).numpy(), torch.empty(1000, dtype=torch.uint8).numpy(),
                           {"ternary": 0, "sign": 1}[mode], 8, 0, 0, unbiased=True)

"""The Triton codec kernels' variants on a GPU, timed side by side (issue 16): which one each
kernel should run by default.

Every variant gives the same bits (``tritter_comm._triton_codec.tuning``; the interpreter tests
check each one against the Rust codec, and this script checks each one's body, residual and
decoded vector against the default's on the GPU): warps a program, the keys hashed once a word
or once a position, the int2/sign codes unpacked from bytes loaded once or a byte load a
position, and the levels' transform (decode, and the residual's ``xhat`` in the encoder) as two
matrix products or as butterflies. They differ in registers a thread, shared memory, and so in
how many blocks an SM runs at once.

1. Every variant of the encoder and of the decoder at ``--n`` (64M) fp32 int2: median ms of
   ``--repeats`` CUDA-event timings, GB/s moved (reads plus writes, as benchmarks/codec_cuda.py
   counts them), and whether its bits equal the default's.
2. The fastest encoder and decoder of (1.), beside the default, in fp32 ternary and in bf16.
3. The fastest pair as encode plus decode in GB/s of fp32 input, against issue 16's target of
   500 GB/s at 64M on an H200.

Prints tables; ``--out`` writes JSON with the fastest ``tuning`` (benchmarks/codec_cuda.py
``--tuning`` applies it)::

    python -m benchmarks.codec_cuda_sweep --out /tmp/sweep.json

``--interpret`` runs it on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1`` set
before the run; wall-clock times, a small ``--n``): a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))

from benchmarks import _common  # noqa: E402
from benchmarks.codec import _parse_size  # noqa: E402
from benchmarks.codec_cuda import SEED, STREAM, _time  # noqa: E402
from tritter_comm import _native, _triton_codec  # noqa: E402
from tritter_comm.codec import (  # noqa: E402
    DEFAULT_BLOCK_SIZE,
    MODES,
    decode_body_into,
    encode_body_into,
)

DEVICE = "cuda"  # "cpu" with --interpret
DEFAULT = {k: dict(v) for k, v in _triton_codec.tuning.items()}


def _variants(kernel: str, warps_list: list[int]) -> list[dict[str, Any]]:
    """Each variant of ``kernel`` as its ``tuning`` entry."""
    out = []
    for warps, words, dot in itertools.product(warps_list, (False, True), (True, False)):
        v = {"warps": warps, "key_words": words, "dot": dot}
        if kernel == "decode":
            v["unpack_bytes"] = words
        out.append(v)
    return out


def _label(v: dict[str, Any]) -> str:
    return (f"{v['warps'] or 'dflt':>4}w {'words' if v['key_words'] else 'pos':>5} "
            f"{'dot' if v['dot'] else 'bfly':>4}")


def _reset() -> None:
    for k, v in DEFAULT.items():
        _triton_codec.tuning[k] = dict(v)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


class Case:
    """One vector, its residual, and the default's body, residual and decoded vector."""

    def __init__(self, n: int, dtype: torch.dtype, mode: str):
        g = torch.Generator(device=DEVICE).manual_seed(n)
        self.x = torch.randn(n, device=DEVICE, generator=g).to(dtype)
        self.e0 = (0.1 * torch.randn(n, device=DEVICE, generator=g)).to(dtype)
        self.mode, self.dtype, self.n = mode, dtype, n
        self.blog = DEFAULT_BLOCK_SIZE.bit_length() - 1
        self.kw = dict(seed=SEED, stream=STREAM, mode_id=MODES[mode], block_log2=self.blog,
                       backend="torch")
        nbytes = _native.body_nbytes(n, MODES[mode], self.blog)
        self.body = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
        self.e = self.e0.clone()
        self.y = torch.empty_like(self.x)
        self.moved = {"encode": 3 * n * self.x.element_size() + nbytes,
                      "decode": nbytes + n * self.x.element_size()}
        _reset()
        self.ref = self.outputs()

    def outputs(self) -> tuple:
        """Body, residual, decoded vector of one encode (from the saved residual) and decode."""
        e = self.e0.clone()
        encode_body_into(self.x, self.body, residual=e, check_finite=False, **self.kw)
        decode_body_into(self.body, self.y, **self.kw)
        return self.body.clone(), _bits(e).clone(), _bits(self.y).clone()

    def time(self, kernel: str, repeats: int) -> float:
        if kernel == "encode":
            return _timed(lambda: encode_body_into(self.x, self.body, residual=self.e,
                                                   check_finite=False, **self.kw), repeats)
        return _timed(lambda: decode_body_into(self.body, self.y, **self.kw), repeats)

    def run(self, kernel: str, variant: dict[str, Any], repeats: int) -> dict[str, Any]:
        _reset()
        _triton_codec.tuning[kernel].update(variant)
        variant = dict(_triton_codec.tuning[kernel])
        launches = _triton_codec.launches
        try:
            got = self.outputs()
            same = all(torch.equal(a, b) for a, b in zip(got, self.ref))
            t = self.time(kernel, repeats)
        finally:
            _reset()
        built = not _triton_codec._broken and _triton_codec.launches > launches
        _triton_codec._broken.clear()  # a variant that failed to build ran the next build
        return {"kernel": kernel, "variant": variant, "label": _label(variant),
                "dtype": str(self.dtype).replace("torch.", ""), "mode": self.mode, "n": self.n,
                "ms": 1e3 * t, "gbs": self.moved[kernel] / t / 1e9, "same_bits": same,
                "built": built}


def _gpu() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU, Triton's interpreter"


def _timed(fn, repeats: int) -> float:
    if DEVICE == "cuda":
        return _time(fn, repeats)
    t = time.perf_counter()  # --interpret: a check of the script
    fn()
    return time.perf_counter() - t


def _print(rows: list[dict[str, Any]], copy_gbs: float) -> None:
    print(f"{'kernel':>6} {'dtype':>8} {'mode':>7} {'variant':>16} | {'ms':>7} {'GB/s':>6} "
          f"{'copy':>5} | same bits")
    for r in rows:
        print(f"{r['kernel']:>6} {r['dtype']:>8} {r['mode']:>7} {r['label']:>16} | "
              f"{r['ms']:7.3f} {r['gbs']:6.0f} {r['gbs'] / copy_gbs:5.1%} | "
              f"{'yes' if r['same_bits'] else 'NO'}{'' if r['built'] else ' (not built)'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="64M")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warps", default="2,4,8,16", help="warps a program to try")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--interpret", action="store_true",
                    help="CPU tensors in Triton's interpreter (TRITON_INTERPRET=1): a dry run")
    args = ap.parse_args(argv)
    global DEVICE
    if args.interpret:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--interpret needs TRITON_INTERPRET=1 in the environment")
        DEVICE = "cpu"
    if not _triton_codec.available(torch.device(DEVICE), DEFAULT_BLOCK_SIZE) or (
            DEVICE == "cuda" and not torch.cuda.is_available()):
        raise SystemExit("benchmarks.codec_cuda_sweep needs CUDA and triton (or --interpret)")
    n = _parse_size(args.n)
    src = torch.empty(n, device=DEVICE)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 4 / _timed(lambda: dst.copy_(src), args.repeats) / 1e9
    del src, dst
    print(f"## 1. every variant, {n >> 20}M float32 int2, block {DEFAULT_BLOCK_SIZE} "
          f"({_gpu()}; a copy moves {copy_gbs:.0f} GB/s); default: "
          f"{DEFAULT}", flush=True)
    case = Case(n, torch.float32, "int2")
    warps = [int(w) for w in args.warps.split(",")]
    rows = {k: [case.run(k, v, args.repeats) for v in [{}] + _variants(k, warps)]
            for k in ("encode", "decode")}
    for k in rows:
        rows[k][0]["label"] = "default " + rows[k][0]["label"].strip()
        _print(rows[k], copy_gbs)
    best = {k: min((r for r in rows[k] if r["same_bits"] and r["built"]), key=lambda r: r["ms"])
            for k in rows}
    del case
    print("\n## 2. the fastest of (1.) and the default, other modes and dtypes", flush=True)
    more = []
    for dtype, mode in ((torch.float32, "ternary"), (torch.bfloat16, "int2"),
                        (torch.bfloat16, "ternary")):
        case = Case(n, dtype, mode)
        for k in ("encode", "decode"):
            for v in ({}, best[k]["variant"]):
                r = case.run(k, v, args.repeats)
                r["label"] = ("default " if not v else "") + r["label"].strip()
                more.append(r)
        del case
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    _print(more, copy_gbs)
    enc, dec = best["encode"], best["decode"]
    fp32_in = n * 4
    pair = fp32_in / ((enc["ms"] + dec["ms"]) / 1e3) / 1e9
    dflt = fp32_in / ((rows["encode"][0]["ms"] + rows["decode"][0]["ms"]) / 1e3) / 1e9
    print(f"\n## 3. encode + decode, {n >> 20}M fp32 int2, GB/s of input: default {dflt:.0f}, "
          f"fastest ({enc['label'].strip()} / {dec['label'].strip()}) {pair:.0f}; target 500")
    tuning = {"encode": enc["variant"], "decode": dec["variant"]}
    print("tuning for benchmarks/codec_cuda.py --tuning:", json.dumps(tuning))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "machine": _common.machine(gpu=_gpu()),
            "copy_gbs": copy_gbs, "rows": rows["encode"] + rows["decode"], "more": more,
            "enc_dec_gbs": {"default": dflt, "fastest": pair}, "tuning": tuning}, indent=1))


if __name__ == "__main__":
    main()

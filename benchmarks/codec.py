"""Codec throughput: encode (with the residual update) and decode of one flat fp32 vector.

GB/s are of fp32 input (4 bytes an element), medians of ``--repeats`` runs after one warm-up:

1. per size: the Rust codec on 1 thread and on all threads, the torch codec on CPU (1 thread and
   torch's default), and a numpy copy of the same data as the memory-bandwidth reference, side
   by side, with the encode-only and decode-only rates and the ratios to torch on as many
   threads and to the copy;
2. every mode on Rust, per size and thread count;
3. a block-size sweep (256 to 65536) on 1 thread with throughput, payload bits per element and
   the relative error of one encode/decode, which the default block size is chosen from (the
   cases take turns in every repeat, so that a change in load falls on all of them alike).

The codec is timed as the hooks run it: ``encode_body_into`` and ``decode_body_into`` into
preallocated buffers. The ``rust api`` row times ``tritter_comm.encode``/``decode``, whose fresh
output tensor costs a page fault per 4 KiB on first touch; the ``rust api out=`` row beside it
times the same calls with ``decode(payload, out=y)`` into a tensor kept from call to call (the
payload is still a new tensor, a twentieth of the input's bytes in ternary). The Rust cases of
a size take turns in every repeat, so that a change in the machine's load falls on all of them
alike. Prints tables and writes ``benchmarks/results/codec.json`` with the machine, versions and
settings::

    python -m benchmarks.codec                  # 1M, 16M and 64M elements
    python -m benchmarks.codec --quick          # 1M and 4M, 3 repeats
    python -m benchmarks.codec --sizes 1M,256M --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import tritter_comm as tc
from tritter_comm import _native
from tritter_comm.codec import (
    DEFAULT_BLOCK_SIZE,
    MODES,
    decode_body_into,
    encode_body_into,
)

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable (appended: an
    sys.path.append(str(_ROOT))  # installed tritter_comm must win over the source tree's)

from benchmarks import _common  # noqa: E402
GB = 1e9
SEED, STREAM = 20240531, 7
DEFAULT_SIZES = "1M,16M,64M"
QUICK_SIZES = "1M,4M"
BLOCKS = [1 << b for b in range(8, 17)]


def _parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
    return int(s.rstrip("KMG")) * mult


def _label(n: int) -> str:
    for unit, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


class _Threads:
    """Run the Rust codec on ``n`` threads (0: one per core) inside the block."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        tc.set_num_threads(self.n)

    def __exit__(self, *exc):
        tc.set_num_threads(0)


def _time_once(enc: Callable[[], Any], dec: Callable[[], Any]) -> tuple[float, float]:
    """Seconds of one ``enc`` and the ``dec`` right after it."""
    t0 = time.perf_counter()
    enc()
    t1 = time.perf_counter()
    dec()
    return t1 - t0, time.perf_counter() - t1


def _medians(te: list[float], td: list[float]) -> dict[str, float]:
    return {
        "enc_s": statistics.median(te),
        "dec_s": statistics.median(td),
        "enc_dec_s": statistics.median([a + b for a, b in zip(te, td)]),
    }


def _time_pair(enc: Callable[[], Any], dec: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median seconds of ``enc``, ``dec`` and of both, over ``repeats`` runs after a warm-up."""
    enc()
    dec()
    te, td = zip(*(_time_once(enc, dec) for _ in range(repeats)))
    return _medians(list(te), list(td))


def _rates(n: int, t: dict[str, float]) -> dict[str, float]:
    b = 4 * n / GB
    return {
        "enc_dec_gbps": b / t["enc_dec_s"],
        "enc_gbps": b / t["enc_s"],
        "dec_gbps": b / t["dec_s"],
    }


def bench_codec(
    x: torch.Tensor,
    e0: torch.Tensor,
    *,
    backend: str,
    mode: str = "ternary",
    block_size: int = DEFAULT_BLOCK_SIZE,
    repeats: int,
) -> dict[str, Any]:
    """Encode with the residual update, then decode, into preallocated buffers."""
    n = x.numel()
    mode_id, blog = MODES[mode], block_size.bit_length() - 1
    body = torch.empty(_native.body_nbytes(n, mode_id, blog), dtype=torch.uint8)
    y = torch.empty_like(x)
    e = e0.clone()
    kw = {
        "seed": SEED,
        "stream": STREAM,
        "mode_id": mode_id,
        "block_log2": blog,
        "backend": backend,
    }
    t = _time_pair(
        lambda: encode_body_into(x, body, residual=e, **kw),
        lambda: decode_body_into(body, y, **kw),
        repeats,
    )
    return {**t, **_rates(n, t), "bits_per_element": 8 * (body.numel() + 32) / n}


def bench_rust(
    x: torch.Tensor, e0: torch.Tensor, cases: list[dict[str, Any]], *, repeats: int
) -> list[dict[str, Any]]:
    """The Rust codec in each case (``threads``, ``mode``, ``block_size``, and ``api``: through
    ``tritter_comm.encode``/``decode``, which allocate the payload and, with ``api="alloc"``,
    the output, or decode into a kept tensor with ``api="out"``), the cases taking turns in
    every repeat so that a change in the machine's load falls on all alike."""
    n = x.numel()
    e = e0.clone()
    y = torch.empty_like(x)
    runs = []
    for c in cases:
        mode, block = c.get("mode", "ternary"), c.get("block_size", DEFAULT_BLOCK_SIZE)
        mode_id, blog = MODES[mode], block.bit_length() - 1
        body = torch.empty(_native.body_nbytes(n, mode_id, blog), dtype=torch.uint8)
        if c.get("api"):
            box: dict[str, Any] = {}
            kw = {"seed": SEED, "stream": STREAM, "mode": mode, "block_size": block}
            into = y if c["api"] == "out" else None

            def enc(kw=kw, box=box):
                box["p"] = tc.encode(x, residual=e, backend="rust", **kw)

            def dec(box=box, into=into):
                tc.decode(box["p"], out=into, backend="rust")
        else:
            kw = {"seed": SEED, "stream": STREAM, "mode_id": mode_id, "block_log2": blog}
            enc = partial(encode_body_into, x, body, residual=e, backend="rust", **kw)
            dec = partial(decode_body_into, body, y, backend="rust", **kw)
        with _Threads(c["threads"]):
            enc()
            dec()
        runs.append((c["threads"], enc, dec, body.numel(), [], []))
    for _ in range(repeats):
        for threads, enc, dec, _, te, td in runs:
            with _Threads(threads):
                a, b = _time_once(enc, dec)
            te.append(a)
            td.append(b)
    out = []
    for _, _, _, nbytes, te, td in runs:
        t = _medians(te, td)
        out.append({**t, **_rates(n, t), "bits_per_element": 8 * (nbytes + 32) / n})
    return out


def bench_copy(x: torch.Tensor, *, repeats: int) -> dict[str, Any]:
    """numpy copy of the fp32 data: the memory-bandwidth reference (one thread)."""
    src = x.numpy()
    dst = np.empty_like(src)
    np.copyto(dst, src)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t0)
    t = statistics.median(ts)
    return {"copy_s": t, "copy_gbps": 4 * x.numel() / GB / t}


def rel_error(x: torch.Tensor, *, mode: str, block_size: int) -> float:
    """||x - decode(encode(x))|| / ||x||, one shot without a residual."""
    y = tc.decode(tc.encode(x, seed=SEED, stream=STREAM, mode=mode, block_size=block_size))
    return float((x.double() - y.double()).norm() / x.double().norm())


def _inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g)
    e0 = 0.1 * torch.randn(n, generator=g)
    return x, e0


def _machine() -> dict[str, Any]:
    return _common.machine(
        simd_level=_native.simd_level(),
        cpu_features=list(_native.cpu_features()),
        rust_threads_all=_native.default_threads(),
        torch_threads=torch.get_num_threads(),
        native=_native.__version__,
    )


def _fmt(v: float | None, w: int = 7, p: int = 2) -> str:
    return f"{v:{w}.{p}f}" if v is not None else " " * (w - 1) + "-"


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [_parse_size(s) for s in args.sizes.split(",")]
    sweep_n = _parse_size(args.sweep_size)
    all_threads = _native.default_threads()
    main_rows: list[dict[str, Any]] = []
    mode_rows: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []

    for n in sizes:
        x, e0 = _inputs(n)
        base = {"size": n, "label": _label(n)}
        copy = bench_copy(x, repeats=args.repeats)
        main_rows.append({**base, "impl": "numpy copy", "threads": 1, **copy})
        cases = [{"threads": t, "mode": m} for t in (1, 0) for m in MODES]
        cases += [{"threads": 1, "api": "alloc"}, {"threads": 1, "api": "out"}]
        for c, r in zip(cases, bench_rust(x, e0, cases, repeats=args.repeats)):
            nthreads = c["threads"] or all_threads
            if c.get("api"):
                impl = "rust api out=" if c["api"] == "out" else "rust api"
                main_rows.append({**base, "impl": impl, "threads": 1, **r})
                continue
            mode_rows.append({**base, "mode": c["mode"], "threads": nthreads, **r})
            if c["mode"] == "ternary":
                main_rows.append({**base, "impl": "rust", "threads": nthreads, **r})
        torch_rows: dict[int, dict[str, Any]] = {}
        if n <= args.torch_max:
            default = torch.get_num_threads()
            for threads in sorted({1, default}):
                torch.set_num_threads(threads)
                try:
                    t = bench_codec(x, e0, backend="torch", repeats=args.repeats)
                finally:
                    torch.set_num_threads(default)
                torch_rows[threads] = {**base, "impl": "torch", "threads": threads, **t}
                main_rows.append(torch_rows[threads])
        for r in main_rows:
            if r["size"] != n or r["impl"] == "numpy copy":
                continue
            r["vs_copy"] = r["enc_dec_gbps"] / copy["copy_gbps"]
            # against torch on as many threads, or on its default number
            ref = torch_rows.get(r["threads"]) or torch_rows.get(torch.get_num_threads())
            if ref is not None:
                r["vs_torch"] = r["enc_dec_gbps"] / ref["enc_dec_gbps"]
        del x, e0

    x, e0 = _inputs(sweep_n)
    cases = [{"threads": 1, "block_size": b, "mode": m} for b in BLOCKS for m in MODES]
    for c, r in zip(cases, bench_rust(x, e0, cases, repeats=args.repeats)):
        block, mode = c["block_size"], c["mode"]
        with _Threads(1):
            err = rel_error(x, mode=mode, block_size=block)
        sweep_rows.append(
            {"size": sweep_n, "block_size": block, "mode": mode, "rel_error": err, **r}
        )
    return {
        "benchmark": "codec",
        "settings": {
            "sizes": sizes,
            "repeats": args.repeats,
            "statistic": "median after one warm-up run",
            "throughput": "GB/s of fp32 input (4 bytes an element), 1e9 bytes",
            "encode": "x + residual encoded, residual updated (check_finite=True)",
            "timed": (
                "encode_body_into / decode_body_into into preallocated buffers; 'rust api': "
                "tritter_comm.encode / decode, allocating; 'rust api out=': the same with "
                "decode(payload, out=y) into a kept tensor"
            ),
            "default_block_size": DEFAULT_BLOCK_SIZE,
            "default_mode": "ternary",
            "sweep_size": sweep_n,
            "torch_max": args.torch_max,
            "input": "x ~ N(0, 1), residual ~ N(0, 0.01), seeded per size",
        },
        "machine": _machine(),
        "results": {"main": main_rows, "modes": mode_rows, "block_sweep": sweep_rows},
    }


def format_report(report: dict[str, Any]) -> str:
    m, res = report["machine"], report["results"]
    lines = [
        (
            f"{m['cpu_model']}, {m['affinity']} cores, simd {m['simd_level']}, torch "
            f"{m['torch']} ({m['torch_threads']} threads), median of "
            f"{report['settings']['repeats']}"
        ),
        "",
        (
            "GB/s of fp32 input; encode includes the residual update; ternary, block "
            f"{report['settings']['default_block_size']}"
        ),
        (
            f"{'size':>5} {'impl':<14}{'thr':>4} {'enc+dec':>8}{'enc':>8}{'dec':>8}"
            f"{'copy':>8}{'x torch':>9}{'x copy':>8}"
        ),
    ]
    for r in res["main"]:
        if r["impl"] == "numpy copy":
            lines.append(
                f"{r['label']:>5} {r['impl']:<14}{r['threads']:>4} {'':>8}{'':>8}{'':>8}"
                f"{_fmt(r['copy_gbps'], 8)}"
            )
            continue
        lines.append(
            f"{r['label']:>5} {r['impl']:<14}{r['threads']:>4} {_fmt(r['enc_dec_gbps'], 8)}"
            f"{_fmt(r['enc_gbps'], 8)}{_fmt(r['dec_gbps'], 8)}{'':>8}"
            f"{_fmt(r.get('vs_torch'), 9, 1)}{_fmt(r.get('vs_copy'), 8)}"
        )
    lines += [
        "",
        "Rust by mode (GB/s)",
        f"{'size':>5} {'mode':<8}{'thr':>4} {'enc+dec':>8}{'enc':>8}{'dec':>8}{'bits/el':>9}",
    ]
    for r in res["modes"]:
        lines.append(
            f"{_label(r['size']):>5} {r['mode']:<8}{r['threads']:>4} {_fmt(r['enc_dec_gbps'], 8)}"
            f"{_fmt(r['enc_gbps'], 8)}{_fmt(r['dec_gbps'], 8)}{_fmt(r['bits_per_element'], 9, 3)}"
        )
    sweep = res["block_sweep"]
    if sweep:
        lines += [
            "",
            (
                f"Block sizes at {_label(sweep[0]['size'])}, 1 thread: enc+dec GB/s, "
                "relative error of one encode/decode, bits per element"
            ),
            f"{'block':>6} " + "".join(f"{mode:>26}" for mode in MODES),
        ]
        for block in sorted({r["block_size"] for r in sweep}):
            cells = []
            for mode in MODES:
                r = next(r for r in sweep if r["block_size"] == block and r["mode"] == mode)
                cells.append(
                    f"{r['enc_dec_gbps']:>9.2f}{r['rel_error']:>9.4f}{r['bits_per_element']:>8.3f}"
                )
            lines.append(f"{block:>6} " + "".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=None, help=f"comma-separated (default {DEFAULT_SIZES})")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5)")
    ap.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 3 repeats")
    ap.add_argument("--sweep-size", default=None, help="elements of the block sweep (16M)")
    ap.add_argument(
        "--torch-max",
        type=_parse_size,
        default=None,
        help="largest size to time the torch codec at (default: all sizes; 4M with --quick)",
    )
    ap.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results" / "codec.json")
    args = ap.parse_args(argv)
    args.sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.sweep_size = args.sweep_size or ("4M" if args.quick else "16M")
    if args.torch_max is None:
        args.torch_max = _parse_size("4M") if args.quick else 1 << 62
    if args.repeats < 3:
        ap.error("--repeats must be at least 3 (the medians need them)")
    report = run(args)
    print(format_report(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

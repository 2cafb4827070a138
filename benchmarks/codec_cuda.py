"""The torch codec on a GPU, and what it makes of a step of the network benchmark's model.

1. Each codec kernel on one flat vector on the GPU, into preallocated buffers as the hooks run
   them, medians of CUDA-event timings: encode (with the residual update), decode, and phase 2's
   decode-and-sum of the ``--world`` bodies of one chunk (into float32, as the exchange sums),
   beside the same sum decoded body by body and added (``acc += tmp``, today's exchange). For
   each: the bytes it moves (reads plus writes: encode ``x``, the residual twice and the body;
   decode the body and the output; the sum the N bodies and the output) per second, and that
   figure as a fraction of a device-to-device copy of the vector measured in the same run (which
   moves twice the vector's bytes); and, as before, encode plus decode in GB/s of input (4 bytes
   an element for fp32, 2 for bf16). The kernels are Triton's where triton is installed
   (``TRITTER_COMM_TRITON=0``: the torch ops alone, for comparison).
2. The codec time of one exchange of a flat fp32 vector (``--exchange-sizes``, 43M and 1B
   elements) as one rank of ``world`` runs it, by its codec calls in the exchange's order with
   no collectives: phase 1 encodes its N chunks (client residual), phase 2 decodes and sums the N
   bodies of its chunk, divides by N and re-encodes it (server residual), phase 3 decodes the N
   gathered chunks. Worlds 1 (every element encoded and decoded twice) and ``--world``. The
   check for NaN and Inf before each encode (a host synchronization the exchange makes today)
   is left out: this is the codec's own time.
3. The network benchmark's "large" transformer (~43M parameters, one 128-token sequence a rank):
   forward and backward time on the GPU, and the codec work of one exchange of all its
   gradients (a world-of-one Exchange: two encodes and two decodes of every element, more than
   a rank of two does). With these, a *projection* (no overlap of compute and communication,
   bytes at line rate, 2 ranks) of the step time at 1 Gbit/s and 10 Gbit/s for no hook and for
   the hook; a projection, not a measurement of two GPUs on a link.

Needs CUDA. Prints tables and writes JSON (``--out``)::

    python -m benchmarks.codec_cuda --out /tmp/codec-cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))

from benchmarks import _common, workloads  # noqa: E402
from benchmarks.codec import _parse_size  # noqa: E402
from tritter_comm import _native, _triton_codec  # noqa: E402
from tritter_comm.codec import (  # noqa: E402
    DEFAULT_BLOCK_SIZE,
    MODES,
    decode_body_into,
    decode_sum_into,
    encode_body_into,
)
from tritter_comm.exchange import Exchange, Plan, Timers  # noqa: E402

SEED, STREAM = 20240531, 7


def _time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` on the current stream (CUDA events), after two warm-ups."""
    fn()
    fn()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)


def _chunk_bodies(x: torch.Tensor, plan: Plan, mode_id: int, blog: int) -> torch.Tensor:
    """What an owner receives in phase 1: ``world`` bodies of its chunk, in slots of
    ``plan.slot`` bytes (here the encodings of the first ``world`` chunks of ``x``)."""
    recv = torch.zeros(plan.world * plan.slot, dtype=torch.uint8, device=x.device)
    m = plan.bounds(0)[1]
    for j in range(plan.world):
        lo = min(j * plan.chunk, x.numel() - m)
        encode_body_into(x[lo:lo + m], recv[j * plan.slot:j * plan.slot + plan.body_nbytes(0)],
                         seed=SEED, stream=STREAM, mode_id=mode_id, block_log2=blog,
                         backend="torch", check_finite=False)
    return recv


def codec_rows(sizes: list[int], repeats: int, world: int) -> list[dict[str, Any]]:
    rows = []
    blog = DEFAULT_BLOCK_SIZE.bit_length() - 1
    for n in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device="cuda").manual_seed(n)
            x = torch.randn(n, device="cuda", generator=g).to(dtype)
            e = (0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
            y = torch.empty_like(x)
            es = x.element_size()
            nbytes = n * es
            t_copy = _time(lambda: y.copy_(x), repeats)
            copy_bps = 2 * nbytes / t_copy  # a copy reads and writes the vector
            for mode in ("ternary", "int2"):
                mode_id = MODES[mode]
                kw = dict(seed=SEED, stream=STREAM, mode_id=mode_id, block_log2=blog,
                          backend="torch")
                body = torch.empty(_native.body_nbytes(n, mode_id, blog), dtype=torch.uint8,
                                   device="cuda")
                # check_finite=False: the kernel alone (the check is a host sync, issue 16)
                t_enc = _time(lambda: encode_body_into(x, body, residual=e, check_finite=False,
                                                       **kw), repeats)
                t_dec = _time(lambda: decode_body_into(body, y, **kw), repeats)
                plan = Plan.make(n, world, blog, mode_id)
                recv = _chunk_bodies(x, plan, mode_id, blog)
                acc = torch.empty(plan.bounds(0)[1], dtype=torch.float32, device="cuda")
                tmp = torch.empty_like(acc)
                body_m = plan.body_nbytes(0)
                t_sum = _time(lambda: decode_sum_into(recv, acc, slot=plan.slot, **kw), repeats)

                def decode_then_sum():
                    for j in range(world):
                        decode_body_into(recv[j * plan.slot:j * plan.slot + body_m],
                                         acc if j == 0 else tmp, **kw)
                        if j:
                            acc.add_(tmp)

                t_loop = _time(decode_then_sum, repeats)
                moved = {"enc": 3 * nbytes + body.numel(), "dec": body.numel() + nbytes,
                         "sum": world * body_m + 4 * acc.numel()}
                times = {"enc": t_enc, "dec": t_dec, "sum": t_sum}
                row = {"n": n, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
                       "world": world}
                for k, t in times.items():
                    row[f"{k}_ms"] = 1e3 * t
                    row[f"{k}_gbs"] = moved[k] / t / 1e9  # bytes moved (read + written) / s
                    row[f"{k}_of_copy"] = moved[k] / t / copy_bps
                row.update({
                    "decode_then_sum_ms": 1e3 * t_loop,
                    "enc_dec_gbs": nbytes / (t_enc + t_dec) / 1e9,  # GB/s of input
                    "copy_gbs": nbytes / t_copy / 1e9,  # GB/s of input, as enc_dec_gbs
                    "copy_moved_gbs": copy_bps / 1e9,
                })
                rows.append(row)
                del recv, acc, tmp, body
            del x, e, y
            torch.cuda.empty_cache()
    return rows


def exchange_codec(n: int, world: int, mode: str, repeats: int) -> float:
    """Seconds of codec work in one exchange of ``n`` fp32 elements as one rank of ``world``
    runs it (module docstring, 2.), median of ``repeats``."""
    blog = DEFAULT_BLOCK_SIZE.bit_length() - 1
    mode_id = MODES[mode]
    plan = Plan.make(n, world, blog, mode_id)
    g = torch.Generator(device="cuda").manual_seed(world)
    x = torch.randn(n, device="cuda", generator=g)
    res = torch.zeros_like(x)
    out = torch.empty_like(x)
    m = plan.bounds(0)[1]
    acc = torch.empty(m, dtype=torch.float32, device="cuda")
    sres = torch.zeros_like(acc)
    send = torch.zeros(world * plan.slot, dtype=torch.uint8, device="cuda")
    recv = _chunk_bodies(x, plan, mode_id, blog)  # the all_to_all's result, made beforehand
    mine = torch.zeros(plan.slot2, dtype=torch.uint8, device="cuda")
    gathered = torch.zeros(world * plan.slot2, dtype=torch.uint8, device="cuda")
    for c in range(world):  # the all_gather's result, made beforehand
        lo, hi = plan.bounds(c)
        if hi > lo:
            encode_body_into(x[lo:hi], gathered[c * plan.slot2:c * plan.slot2
                                                + plan.body_nbytes(c, 1)],
                             seed=SEED, stream=STREAM, mode_id=mode_id, block_log2=blog,
                             backend="torch", check_finite=False)
    kw = dict(seed=SEED, stream=STREAM, mode_id=mode_id, block_log2=blog, backend="torch")

    def one_exchange():
        for c in range(world):  # phase 1
            lo, hi = plan.bounds(c)
            if hi > lo:
                encode_body_into(x[lo:hi], send[c * plan.slot:c * plan.slot
                                                + plan.body_nbytes(c)],
                                 residual=res[lo:hi], check_finite=False, **kw)
        decode_sum_into(recv, acc, slot=plan.slot, average=True, **kw)  # phase 2
        encode_body_into(acc, mine[:plan.body_nbytes(0, 1)], residual=sres, check_finite=False,
                         **kw)
        for c in range(world):  # phase 3
            lo, hi = plan.bounds(c)
            if hi > lo:
                decode_body_into(gathered[c * plan.slot2:c * plan.slot2
                                          + plan.body_nbytes(c, 1)], out[lo:hi], **kw)

    t = _time(one_exchange, repeats)
    del x, res, out, acc, sres, send, recv, mine, gathered
    torch.cuda.empty_cache()
    return t


def exchange_rows(sizes: list[int], repeats: int, world: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        for w in dict.fromkeys((1, world)):
            for mode in ("ternary", "int2"):
                rows.append({"n": n, "world": w, "mode": mode,
                             "codec_ms": 1e3 * exchange_codec(n, w, mode, repeats)})
    return rows


def step_projection(repeats: int) -> dict[str, Any]:
    w = workloads.build("transformer", seed=0, size="large")
    model = w.model.cuda()
    batch = tuple(t.cuda() for t in w.batch(0, 2, 0))

    def fwd_bwd():
        model.zero_grad(set_to_none=False)
        w.loss(model, batch).backward()

    t_step = _time(fwd_bwd, repeats)
    n = sum(p.numel() for p in model.parameters())
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    out: dict[str, Any] = {"params": n, "fwd_bwd_ms": 1e3 * t_step, "modes": {}}
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0,
                                         world_size=1)
    try:
        for mode in ("ternary", "int2"):
            plan = Plan.make(n, 1, DEFAULT_BLOCK_SIZE.bit_length() - 1, MODES[mode])
            res, sres = torch.zeros_like(flat), torch.zeros_like(flat)

            def exchange():
                ex = Exchange(plan, rank=0, group=None, seed=1, step=0, key=0, timers=Timers())
                y = flat.clone()
                ex.start(y, res)
                ex.reduce(sres)
                ex.finish(y)

            t_ex = _time(exchange, repeats)
            plan2 = Plan.make(n, 2, DEFAULT_BLOCK_SIZE.bit_length() - 1, MODES[mode])
            out["modes"][mode] = {"exchange_codec_ms": 1e3 * t_ex,
                                  "wire_bytes_per_rank_2_ranks": plan2.wire_bytes}
    finally:
        _common.teardown()  # our teardown (issue 14): garbage collected, then the group goes
    out["none_wire_bytes_per_rank_2_ranks"] = 4 * n  # ring all-reduce: 2(w-1)/w of the bytes
    proj = {}
    for gbit in (1.0, 10.0):
        bps = gbit * 1e9 / 8
        none = t_step + out["none_wire_bytes_per_rank_2_ranks"] / bps
        row = {"none_ms": 1e3 * none}
        for mode, m in out["modes"].items():
            t = t_step + m["exchange_codec_ms"] / 1e3 + m["wire_bytes_per_rank_2_ranks"] / bps
            row[f"{mode}_ms"] = 1e3 * t
            row[f"{mode}_speedup"] = none / t
        proj[f"{gbit:g}gbit"] = row
    out["projection"] = proj
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="16M,64M,256M")
    ap.add_argument("--exchange-sizes", default="43000000,1000000000",
                    help="vector lengths for the codec time of one exchange (2.)")
    ap.add_argument("--world", type=int, default=8,
                    help="ranks: bodies summed in phase 2, chunks of an exchange")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results" / "codec-cuda.json")
    ap.add_argument("--tuning", type=Path, default=None,
                    help="the kernels' variants (_triton_codec.tuning) from the JSON of "
                         "benchmarks/codec_cuda_sweep.py --out")
    args = ap.parse_args(argv)
    if args.tuning:
        for kernel, v in json.loads(args.tuning.read_text())["tuning"].items():
            _triton_codec.tuning[kernel].update(v)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.codec_cuda needs CUDA")
    sizes = [_parse_size(s) for s in args.sizes.split(",")]
    ex_sizes = [_parse_size(s) for s in args.exchange_sizes.split(",")]
    encoder = ("triton" if _triton_codec.available(torch.device("cuda"), DEFAULT_BLOCK_SIZE)
               else "torch ops")  # TRITTER_COMM_TRITON=0: the torch ops alone
    report = {"codec": codec_rows(sizes, args.repeats, args.world),
              "exchange": exchange_rows(ex_sizes, args.repeats, args.world),
              "step": step_projection(args.repeats)}
    # which build of each kernel ran: any that failed to build is listed (then the next one,
    # or the torch ops, ran), so the figures say what they measured
    report = {"machine": _common.machine(
        gpu=torch.cuda.get_device_name(), encoder=encoder, world=args.world,
        tuning=_triton_codec.tuning,
        kernels_not_built=sorted(str(k) for k in _triton_codec._broken)), **report}
    print(f"## 1. codec kernels on {report['machine']['gpu']} ({encoder}; variants "
          f"{_triton_codec.tuning}), block {DEFAULT_BLOCK_SIZE}: ms, GB/s moved (reads + "
          f"writes) and its fraction of a copy's; sum = decode-and-sum of {args.world} bodies "
          f"of a 1/{args.world} chunk (loop: body by "
          f"body, acc += tmp); enc+dec in GB/s of input")
    print(f"{'n':>6} {'dtype':>8} {'mode':>7} | {'enc ms':>7} {'GB/s':>6} {'copy':>5} | "
          f"{'dec ms':>7} {'GB/s':>6} {'copy':>5} | {'sum ms':>7} {'GB/s':>6} {'copy':>5} "
          f"{'loop ms':>7} | {'enc+dec':>7} {'copy GB/s':>9}")
    for r in report["codec"]:
        print(f"{r['n'] >> 20:>5}M {r['dtype']:>8} {r['mode']:>7} | "
              + " | ".join(f"{r[k + '_ms']:7.3f} {r[k + '_gbs']:6.0f} {r[k + '_of_copy']:5.1%}"
                           for k in ("enc", "dec", "sum"))
              + f" {r['decode_then_sum_ms']:7.3f} | {r['enc_dec_gbs']:7.1f} "
              f"{r['copy_moved_gbs']:9.0f}")
    if report["machine"]["kernels_not_built"]:
        print("kernels that did not build:", ", ".join(report["machine"]["kernels_not_built"]))
    print("\n## 2. codec time of one exchange of a flat fp32 vector, one rank (no collectives, "
          "no NaN check)")
    print(f"{'n':>13} {'world':>5} {'mode':>7} {'codec ms':>9}")
    for r in report["exchange"]:
        print(f"{r['n']:>13,} {r['world']:>5} {r['mode']:>7} {r['codec_ms']:9.2f}")
    s = report["step"]
    print(f"\n## 3. large transformer ({s['params']:,} params), 1 sequence of 128: forward+backward "
          f"{s['fwd_bwd_ms']:.2f} ms")
    for mode, m in s["modes"].items():
        print(f"{mode}: codec of one exchange {m['exchange_codec_ms']:.2f} ms, "
              f"{m['wire_bytes_per_rank_2_ranks']:,} B a rank (none: "
              f"{s['none_wire_bytes_per_rank_2_ranks']:,})")
    print("projection, 2 ranks, no overlap, bytes at line rate:")
    for link, row in s["projection"].items():
        print(f"  {link}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

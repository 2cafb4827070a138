"""The torch codec on a GPU, and what it makes of a step of the network benchmark's model.

1. Encode (with the residual update) and decode of one flat vector on the GPU, into
   preallocated buffers as the hooks run them: GB/s of input (4 bytes an element for fp32, 2
   for bf16), medians of CUDA-event timings, beside a device-to-device copy of the same data.
   The encoder's full blocks run as one Triton kernel where triton is installed
   (``TRITTER_COMM_TRITON=0``: the torch ops alone, for comparison).
2. The network benchmark's "large" transformer (~43M parameters, one 128-token sequence a rank):
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
from tritter_comm.codec import DEFAULT_BLOCK_SIZE, MODES, decode_body_into, encode_body_into  # noqa: E402
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


def codec_rows(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    blog = DEFAULT_BLOCK_SIZE.bit_length() - 1
    for n in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator(device="cuda").manual_seed(n)
            x = torch.randn(n, device="cuda", generator=g).to(dtype)
            e = (0.1 * torch.randn(n, device="cuda", generator=g)).to(dtype)
            y = torch.empty_like(x)
            nbytes = n * x.element_size()
            t_copy = _time(lambda: y.copy_(x), repeats)
            for mode in ("ternary", "int2"):
                kw = dict(seed=SEED, stream=STREAM, mode_id=MODES[mode], block_log2=blog,
                          backend="torch")
                body = torch.empty(_native.body_nbytes(n, MODES[mode], blog), dtype=torch.uint8,
                                   device="cuda")
                t_enc = _time(lambda: encode_body_into(x, body, residual=e, **kw), repeats)
                t_dec = _time(lambda: decode_body_into(body, y, **kw), repeats)
                rows.append({
                    "n": n, "dtype": str(dtype).replace("torch.", ""), "mode": mode,
                    "enc_ms": 1e3 * t_enc, "dec_ms": 1e3 * t_dec,
                    "enc_dec_gbs": nbytes / (t_enc + t_dec) / 1e9,
                    "copy_gbs": nbytes / t_copy / 1e9,
                })
            del x, e, y
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
                ex.gather_future().wait()
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
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=_ROOT / "benchmarks" / "results" / "codec-cuda.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.codec_cuda needs CUDA")
    sizes = [_parse_size(s) for s in args.sizes.split(",")]
    encoder = ("triton" if _triton_codec.available(torch.device("cuda"), DEFAULT_BLOCK_SIZE)
               else "torch ops")  # TRITTER_COMM_TRITON=0: the torch ops alone
    report = {"machine": _common.machine(gpu=torch.cuda.get_device_name(), encoder=encoder),
              "codec": codec_rows(sizes, args.repeats), "step": step_projection(args.repeats)}
    print(f"## 1. torch codec on {report['machine']['gpu']} (encoder: {encoder}): encode "
          f"(residual) + decode, GB/s of input, block {DEFAULT_BLOCK_SIZE}")
    print(f"{'n':>6} {'dtype':>9} {'mode':>8} {'enc ms':>8} {'dec ms':>8} {'GB/s':>8} {'copy GB/s':>10}")
    for r in report["codec"]:
        print(f"{r['n'] >> 20:>5}M {r['dtype']:>9} {r['mode']:>8} {r['enc_ms']:8.3f} "
              f"{r['dec_ms']:8.3f} {r['enc_dec_gbs']:8.1f} {r['copy_gbs']:10.1f}")
    s = report["step"]
    print(f"\n## 2. large transformer ({s['params']:,} params), 1 sequence of 128: forward+backward "
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

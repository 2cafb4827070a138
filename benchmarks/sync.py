"""Packed-ternary weight sync benchmark (issue 8): speed, sizes, and local SGD against DDP.

Four parts, each printed as a table and written to ``benchmarks/results/sync.json``:

1. pack + unpack throughput of one weight matrix, Rust (1 thread, and all threads) against the
   torch twin (1 thread) on CPU, as ratios; medians of repeats, Rust and torch taking turns
   within each repeat. Times are process CPU seconds (the machine is shared: wall time measures
   the neighbours), and wall seconds beside them.
2. bytes of a weight broadcast for GPT-shaped models of 10M to 100M parameters: fp32, bf16 and
   the packed body (per-row scales, and groups of 128).
3. the packed size of Llama-2-7B from the format's size function (``packed_nbytes`` over its
   shape list), per row and with groups of 256/128/64.
4. local SGD (H local AdamW steps, then ``TernaryWeightSync.average()``) against DDP (fp32
   all-reduce every step) and against local SGD with exact fp32 averaging, on the transformer
   workload, 2 ranks on gloo: eval loss and bytes per rank per step.

Usage::

    python benchmarks/sync.py                 # about 5 minutes on 2 shared cores
    python benchmarks/sync.py --quick         # smoke test
    python benchmarks/sync.py --parts 1,3     # a subset
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.append(str(_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import tritter_comm  # noqa: E402
from tritter_comm import sync as S  # noqa: E402
from benchmarks import _common  # noqa: E402

# ------------------------------------------------------------------------------ 1. speed


def _timed(f) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    f()
    return time.process_time() - c0, time.perf_counter() - w0


def speed(rows: int, cols: int, repeats: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(dtype)
        p = S.pack_ternary(w)
        assert p == S.pack_ternary(w, backend="torch")  # same bytes
        cases = {
            "rust-1t": ("rust", 1),
            f"rust-{os.cpu_count()}t": ("rust", 0),
            "torch-1t": ("torch", None),
        }
        times: dict[str, dict[str, list[float]]] = {
            k: {"pack_cpu": [], "unpack_cpu": [], "pack_wall": [], "unpack_wall": []}
            for k in cases
        }
        for _ in range(repeats):
            for name, (backend, threads) in cases.items():
                if threads is not None:
                    tritter_comm.set_num_threads(threads)
                c, wl = _timed(lambda: S.pack_ternary(w, backend=backend))
                times[name]["pack_cpu"].append(c)
                times[name]["pack_wall"].append(wl)
                c, wl = _timed(lambda: S.unpack_ternary(p, backend=backend))
                times[name]["unpack_cpu"].append(c)
                times[name]["unpack_wall"].append(wl)
        tritter_comm.set_num_threads(0)
        med = {k: {m: statistics.median(v) for m, v in t.items()} for k, t in times.items()}
        torch_total = med["torch-1t"]["pack_cpu"] + med["torch-1t"]["unpack_cpu"]
        for name, m in med.items():
            total = m["pack_cpu"] + m["unpack_cpu"]
            out.append({
                "dtype": str(dtype).replace("torch.", ""), "shape": [rows, cols], "case": name,
                "pack_ms": 1e3 * m["pack_cpu"], "unpack_ms": 1e3 * m["unpack_cpu"],
                "total_ms": 1e3 * total,
                "wall_total_ms": 1e3 * (m["pack_wall"] + m["unpack_wall"]),
                "gb_per_s": w.numel() * w.element_size() / total / 1e9,
                "speedup_vs_torch": torch_total / total,
            })
    return out


def speed_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'dtype':<9}{'case':<10}{'pack ms':>9}{'unpack ms':>11}{'total ms':>10}"
             f"{'wall ms':>9}{'GB/s':>7}{'vs torch':>10}"]
    for r in rows:
        lines.append(f"{r['dtype']:<9}{r['case']:<10}{r['pack_ms']:>9.1f}{r['unpack_ms']:>11.1f}"
                     f"{r['total_ms']:>10.1f}{r['wall_total_ms']:>9.1f}{r['gb_per_s']:>7.2f}"
                     f"{r['speedup_vs_torch']:>9.1f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ 2. sizes


def gpt_shapes(d: int, layers: int, vocab: int = 32000) -> list[tuple[int, ...]]:
    """A GPT-2-style decoder: embeddings, per layer qkv/out/mlp with biases and 2 norms."""
    s: list[tuple[int, ...]] = [(vocab, d), (1024, d)]
    for _ in range(layers):
        s += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
        s += [(d,), (d,), (d,), (d,)]
    return s + [(d,), (d,), (vocab, d)]


def llama2_7b_shapes() -> list[tuple[int, ...]]:
    d, ff, vocab, layers = 4096, 11008, 32000, 32
    s: list[tuple[int, ...]] = [(vocab, d), (vocab, d), (d,)]
    for _ in range(layers):
        s += [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    return s


def _numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def _body(shapes, group_size=None) -> int:
    """What TernaryWeightSync sends per round: scales and codes, no headers."""
    return sum(S.packed_nbytes(s, group_size=group_size) - (16 + 8 * len(s)) for s in shapes)


def sizes() -> list[dict[str, Any]]:
    out = []
    for d, layers in ((160, 4), (256, 6), (448, 8), (640, 12)):
        sh = gpt_shapes(d, layers)
        n = _numel(sh)
        row, g128 = _body(sh), _body(sh, 128)
        out.append({"model": f"gpt d={d} L={layers}", "params": n, "fp32": 4 * n, "bf16": 2 * n,
                    "packed_per_row": row, "packed_g128": g128,
                    "bits_per_weight": 8 * row / n, "ratio_fp32": 4 * n / row,
                    "ratio_bf16": 2 * n / row})
    return out


def sizes_table(rows) -> str:
    lines = [f"{'model':<18}{'params':>12}{'fp32 MB':>9}{'bf16 MB':>9}{'packed MB':>10}"
             f"{'g128 MB':>9}{'bits/w':>8}{'vs fp32':>9}{'vs bf16':>9}"]
    for r in rows:
        lines.append(
            f"{r['model']:<18}{r['params']:>12,}{r['fp32'] / 1e6:>9.1f}{r['bf16'] / 1e6:>9.1f}"
            f"{r['packed_per_row'] / 1e6:>10.2f}{r['packed_g128'] / 1e6:>9.2f}"
            f"{r['bits_per_weight']:>8.3f}{r['ratio_fp32']:>8.1f}x{r['ratio_bf16']:>8.1f}x")
    return "\n".join(lines)


def seven_b() -> list[dict[str, Any]]:
    sh = llama2_7b_shapes()
    n = _numel(sh)
    out = []
    for g in (None, 256, 128, 64):
        total = sum(S.packed_nbytes(s, group_size=g) for s in sh)
        out.append({"model": "llama-2-7b", "params": n,
                    "groups": "per row" if g is None else str(g), "bytes": total,
                    "gb": total / 1e9, "bits_per_weight": 8 * total / n,
                    "fp16_gb": 2 * n / 1e9})
    # a round 7e9 weights in rows of 4096
    sh7 = [(7_000_000_000 // 4096, 4096)]
    t7 = S.packed_nbytes(sh7[0])
    out.append({"model": "7e9 in rows of 4096", "params": _numel(sh7), "groups": "per row",
                "bytes": t7, "gb": t7 / 1e9, "bits_per_weight": 8 * t7 / _numel(sh7),
                "fp16_gb": 2 * _numel(sh7) / 1e9})
    return out


def seven_b_table(rows) -> str:
    lines = [f"{'model':<22}{'params':>15}{'groups':>9}{'packed GB':>11}{'bits/w':>8}"
             f"{'fp16 GB':>9}"]
    for r in rows:
        lines.append(f"{r['model']:<22}{r['params']:>15,}{r['groups']:>9}{r['gb']:>11.4f}"
                     f"{r['bits_per_weight']:>8.3f}{r['fp16_gb']:>9.2f}")
    return "\n".join(lines)


# -------------------------------------------------------------------------- 4. local SGD


def _lr(step: int, steps: int) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def _train(rank: int, world: int, mode: str, steps: int, h: int, seed: int, size: str):
    from benchmarks import workloads

    torch.manual_seed(seed)
    w = workloads.build("transformer", seed=seed, size=size)
    model = w.model
    n = sum(p.numel() for p in model.parameters())
    net = DDP(model) if mode == "ddp" else model
    opt = torch.optim.AdamW(net.parameters(), lr=w.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps))
    sync = S.TernaryWeightSync(model) if mode == "localsgd-ternary" else None
    sent = 0
    if sync is not None:
        sync.mark_synced()  # identical init (same seed): the shared anchor, no exact round
    t0 = time.perf_counter()
    for step in range(steps):
        loss = w.loss(net, w.batch(rank, world, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if mode == "ddp":
            sent += 2 * (world - 1) / world * 4 * n  # ring all-reduce of fp32 gradients
        elif (step + 1) % h == 0:
            if sync is not None:
                sync.average()
            else:  # exact average: fp32 ring all-reduce of the weights
                with torch.no_grad():
                    for p in model.parameters():
                        dist.all_reduce(p.data)
                        p.data.div_(world)
                sent += 2 * (world - 1) / world * 4 * n
    train_s = time.perf_counter() - t0
    if sync is not None:
        st = sync.stats()
        # all-gather: each rank's body reaches the N-1 others; exact rounds as counted
        sent = (world - 1) * st["bytes_sent"] + st["exact_bytes"]
    digest = hashlib.sha256(
        b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    return {"mode": mode, "eval_loss": w.eval_loss(model), "bytes_per_step": sent / steps,
            "params": n, "train_s": train_s, "digest": digest}


def _worker(rank, world, init, q, job):
    torch.set_num_threads(1)
    tritter_comm.set_num_threads(1)
    error = None
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=_dt.timedelta(seconds=120))
        q.put(("ok", rank, _train(rank, world, **job)))
    except BaseException:
        error = traceback.format_exc()
    # the traceback's frames (and their models) are gone here: our teardown (issue 14)
    try:
        tritter_comm.shutdown()
    except BaseException:
        error = f"{error or ''}teardown failed:\n{traceback.format_exc()}"
    if error is not None:
        q.put(("error", rank, error))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(world: int, job: dict, timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_worker, args=(r, world, init, q, job), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    res: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(res) < world:
            kind, rank, val = q.get(timeout=max(1.0, deadline - time.monotonic()))
            if kind == "error":
                raise RuntimeError(f"rank {rank}:\n{val}")
            res[rank] = val
    finally:
        for p in procs:
            p.join(timeout=30 if len(res) == world else 5)
            if p.is_alive():
                p.kill()
                p.join()
    bad = [f"rank {i} exit {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:  # trained, then died or hung on the way out (issue 14)
        raise RuntimeError(f"{job['mode']}: " + ", ".join(bad))
    if len({r["digest"] for r in res.values()}) != 1:
        raise RuntimeError(f"{job['mode']}: replicas differ at the end")
    return res[0]


def local_sgd(steps: int, h: int, seeds: list[int], size: str, world: int) -> list[dict]:
    out = []
    for mode in ("ddp", "localsgd-fp32", "localsgd-ternary"):
        runs = [run_job(world, dict(mode=mode, steps=steps, h=h, seed=s, size=size), 1800)
                for s in seeds]
        out.append({
            "mode": mode, "H": None if mode == "ddp" else h, "steps": steps, "seeds": seeds,
            "params": runs[0]["params"],
            "eval_loss": statistics.mean(r["eval_loss"] for r in runs),
            "eval_loss_per_seed": [r["eval_loss"] for r in runs],
            "bytes_per_step": statistics.mean(r["bytes_per_step"] for r in runs),
            "train_s": statistics.mean(r["train_s"] for r in runs),
        })
    base = out[0]
    for r in out:
        r["gap_vs_ddp"] = r["eval_loss"] / base["eval_loss"] - 1
        r["bytes_ratio_vs_ddp"] = base["bytes_per_step"] / r["bytes_per_step"]
    return out


def local_sgd_table(rows) -> str:
    lines = [f"{'mode':<18}{'H':>4}{'eval loss':>11}{'vs ddp':>9}{'bytes/step':>13}"
             f"{'fewer bytes':>13}{'train s':>9}"]
    for r in rows:
        lines.append(f"{r['mode']:<18}{r['H'] or '-':>4}{r['eval_loss']:>11.4f}"
                     f"{100 * r['gap_vs_ddp']:>+8.2f}%{r['bytes_per_step']:>13,.0f}"
                     f"{r['bytes_ratio_vs_ddp']:>12.1f}x{r['train_s']:>9.1f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main


def _machine() -> dict[str, Any]:
    return _common.machine(simd=tritter_comm._native.simd_level())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="1,2,3,4", help="comma-separated, of 1-4")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--h", type=int, default=10, help="local steps between averages")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--size", default="small", choices=["small", "large"])
    ap.add_argument("--out", default=str(_ROOT / "benchmarks/results/sync.json"))
    a = ap.parse_args(argv)
    parts = {int(p) for p in a.parts.split(",")}
    seeds = [int(s) for s in a.seeds.split(",")]
    rows, cols, steps = (4096, 4096, a.steps) if not a.quick else (512, 1024, 40)
    if a.quick:
        seeds, a.repeats = seeds[:1], 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result: dict[str, Any] = {"machine": _machine(), "settings": {
        "shape": [rows, cols], "repeats": a.repeats, "steps": steps, "H": a.h, "seeds": seeds,
        "size": a.size, "world": 2, "quick": a.quick}}
    print(f"# tritter-comm sync benchmark  {json.dumps(result['machine'])}")
    if 1 in parts:
        r = speed(rows, cols, a.repeats)
        result["speed"] = r
        print(f"\n## 1. pack + unpack of a {rows}x{cols} matrix, per row (median of "
              f"{a.repeats}; CPU ms)\n" + speed_table(r))
    if 2 in parts:
        r = sizes()
        result["sizes"] = r
        print("\n## 2. bytes of one weight broadcast\n" + sizes_table(r))
    if 3 in parts:
        r = seven_b()
        result["seven_b"] = r
        print("\n## 3. packed size of a 7B model (serialized, headers included)\n"
              + seven_b_table(r))
    if 4 in parts:
        r = local_sgd(steps, a.h, seeds, a.size, 2)
        result["local_sgd"] = r
        print(f"\n## 4. local SGD vs DDP, transformer ({a.size}, {r[0]['params']:,} params), "
              f"2 ranks, {steps} steps, seeds {seeds}\n" + local_sgd_table(r))
    if not a.quick:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        old = {}
        if Path(a.out).exists():
            try:
                old = json.loads(Path(a.out).read_text())
            except ValueError:
                old = {}
        old.update(result)  # a run of some parts keeps the others
        Path(a.out).write_text(json.dumps(old, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

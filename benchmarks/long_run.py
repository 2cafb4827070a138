"""Long run (issue 9): many ranks, many small buckets, many steps on gloo.

Checks that nothing hangs, that resident memory stops growing after warm-up, and that replicas
are bit-identical at the end; reports the memory the residuals take. Prints a table and writes
JSON (default benchmarks/results/long_run.json).

    python benchmarks/long_run.py                 # 3 ranks, 10,000 steps
    python benchmarks/long_run.py --steps 500     # a short check
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rank(rank, world, store_path, args, q):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import tritter_comm

    tritter_comm.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    ddp = None
    try:
        torch.manual_seed(0)
        layers = [nn.Linear(32, args.width), nn.ReLU()]
        for _ in range(args.depth):
            layers += [nn.Linear(args.width, args.width), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(args.width, 10))
        ddp = DDP(model, bucket_cap_mb=args.bucket_cap_mb)
        state = tritter_comm.VSAState(mode=args.mode, start_iter=2, min_compress_numel=1024)
        ddp.register_comm_hook(state, tritter_comm.vsa_hook)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        w = torch.randn(32, 10, generator=torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(rank)
        rss = []
        t0 = time.perf_counter()
        for step in range(args.steps):
            x = torch.randn(32, 32, generator=g)
            loss = nn.functional.cross_entropy(ddp(x), (x @ w).argmax(1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % args.sample_every == 0 or step == args.steps - 1:
                rss.append((step, _rss_mb(), loss.item()))
        elapsed = time.perf_counter() - t0
        digest = hashlib.sha256(
            torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().tobytes()
        ).hexdigest()
        nparams = sum(p.numel() for p in model.parameters())
        res_bytes = sum(r.numel() * r.element_size() for r in state.residuals.values())
        sres_bytes = sum(r.numel() * r.element_size() for r in state.server_residuals.values())
        q.put({"rank": rank, "rss": rss, "elapsed_s": elapsed, "digest": digest,
               "params": nparams, "residual_bytes": res_bytes, "server_residual_bytes": sres_bytes,
               "buckets": len(state.residuals), "stats": state.stats()})
    finally:  # our teardown (issue 14), also when a step raises
        tritter_comm.shutdown(*[m for m in (ddp,) if m is not None])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--bucket-cap-mb", type=float, default=0.02)
    ap.add_argument("--mode", default="ternary")
    ap.add_argument("--sample-every", type=int, default=250)
    ap.add_argument("--warmup", type=int, default=1000, help="steps before RSS is the baseline")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "long_run.json")
    args = ap.parse_args(argv)

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_rank, args=(r, args.world, os.path.join(d, "s"), args, q))
                 for r in range(args.world)]
        for p in procs:
            p.start()
        results = []
        deadline = time.monotonic() + max(600.0, args.steps * 0.5)
        while len(results) < args.world:
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                print("FAILED: a rank died or the run hung", file=sys.stderr)
                return 1
            try:
                results.append(q.get(timeout=1.0))
            except Exception:
                pass
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
        bad = [f"rank {i} exit {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]
        if bad:  # trained, then died or hung on the way out (issue 14)
            print(f"FAILED at exit: {', '.join(bad)}", file=sys.stderr)
            return 1
    results.sort(key=lambda r: r["rank"])
    identical = len({r["digest"] for r in results}) == 1
    print(f"{args.world} ranks, {args.steps} steps, {results[0]['params']:,} parameters in "
          f"{results[0]['buckets']} compressed buckets, mode {args.mode}; "
          f"wall {time.perf_counter() - t0:.0f} s")
    print("| rank | RSS at warm-up (MB) | RSS at end (MB) | growth (MB) | steps/s |")
    print("|---:|---:|---:|---:|---:|")
    growth = []
    for r in results:
        base = next(m for s, m, _ in r["rss"] if s >= min(args.warmup, args.steps - 1))
        end = r["rss"][-1][1]
        growth.append(end - base)
        print(f"| {r['rank']} | {base:.1f} | {end:.1f} | {end - base:+.1f} | "
              f"{args.steps / r['elapsed_s']:.0f} |")
    r0 = results[0]
    print(f"replicas bit-identical: {identical}")
    print(f"residual memory per rank: client {r0['residual_bytes'] / 2**20:.2f} MB "
          f"({r0['residual_bytes'] / (4 * r0['params']):.2f}x the fp32 parameters), server "
          f"{r0['server_residual_bytes'] / 2**20:.2f} MB")
    print(f"loss: first {r0['rss'][0][2]:.3f}, last {r0['rss'][-1][2]:.3f}")
    report = {"benchmark": "long_run", "settings": vars(args) | {"out": str(args.out)},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch": torch.__version__},
              "replicas_identical": identical, "rss_growth_mb": growth, "ranks": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

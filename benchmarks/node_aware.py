"""Node-aware exchange (issue 20): step time and bytes over the slow link, 2 nodes of 2 ranks.

Two network namespaces stand for two nodes, joined by one veth pair shaped with ``tc`` (default
1 Gbit/s, 0.5 ms one way where the kernel has netem: ``benchmarks/network/netns.py``). Ranks 0
and 1 run in the first namespace, 2 and 3 in the second; two ranks of one namespace talk over
its loopback (standing for NVLink), so only traffic between nodes crosses the shaped link.

Rows (every mode on a fresh model with the same init and batches, in one set of 4 processes):

- ``none``: DDP's own all-reduce (fp32);
- ``powersgd4``: PyTorch's PowerSGD hook, rank 4;
- ``flat``: tritter-comm's two-phase exchange over all 4 ranks (today's);
- ``node``: the node-aware exchange (``intra_node_size=2``).

Per mode: warm-up steps, then timed steps (all ranks meet at a barrier, then forward, backward,
optimizer step; a step's time is the slowest rank's; the median is reported) and the bytes that
left each node over the shaped link in them (the veth's ``tx_bytes`` read in each namespace,
per step; the barrier and the timing's gather included), beside what the hook's ``stats()``
counted (``bytes_sent_inter_node`` summed over the node's ranks).

Usage (as root)::

    python benchmarks/node_aware.py                     # transformer (large) and wide MLP
    python benchmarks/node_aware.py --workloads mlp --modes flat,node --timed 3
    python benchmarks/node_aware.py --no-netns          # all 4 ranks on the host's loopback

Writes benchmarks/results/node_aware.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

WORLD, NODE = 4, 2
MODES = {
    "none": ("none", {}),
    "powersgd4": ("powersgd4", {}),
    "flat": ("vsa-ternary", {"start_iter": 2, "intra_node_size": 1}),
    "node": ("vsa-ternary", {"start_iter": 2, "intra_node_size": NODE}),
}
DEFAULT_OUT = _ROOT / "benchmarks" / "results" / "node_aware.json"


# ------------------------------------------------------------------------------- workloads


class WideMLP:
    """A wide MLP (4 x 2048 hidden, ~14M parameters) on random data, 8 samples a rank: little
    compute for its gradient, so the exchange is most of a step."""

    name, size = "mlp", "wide"

    def __init__(self, seed: int, width: int = 2048, depth: int = 4):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers: list[nn.Module] = [nn.Linear(256, width), nn.ReLU()]
            for _ in range(depth - 1):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.model = nn.Sequential(*layers, nn.Linear(width, 10))
        self.seed, self.batch_size, self.lr = seed, 8, 1e-3
        self.info = {"name": "mlp", "params": sum(p.numel() for p in self.model.parameters()),
                     "width": width, "depth": depth, "batch_size_per_rank": self.batch_size}

    def batch(self, rank: int, world: int, step: int):
        g = torch.Generator().manual_seed((self.seed * 1000 + step) * 64 + rank)
        x = torch.randn(self.batch_size, 256, generator=g)
        return x, (x[:, :10]).argmax(1)

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)


def _build(name: str, seed: int):
    if name == "mlp":
        return WideMLP(seed)
    from benchmarks import workloads

    w = workloads.build("transformer", seed=seed, size="large")
    w.batch_size = 1  # as benchmarks/network/run.py's "large": one 128-token sequence a rank
    return w


# ---------------------------------------------------------------------------------- one rank


def _tx_bytes() -> int:
    """Bytes sent on this namespace's shaped interface (0 without namespaces)."""
    try:
        return int(Path("/sys/class/net/tcn0/statistics/tx_bytes").read_text())
    except OSError:
        return 0


def _rank_mode(spec: dict, label: str, rank: int) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from benchmarks import comm

    name, options = MODES[label]
    w = _build(spec["workload"], spec["seed"])
    ddp = DDP(w.model, bucket_cap_mb=comm.bucket_cap_mb_for(name), init_sync=False)
    state = comm.register(ddp, name, **options)
    opt = torch.optim.AdamW(ddp.parameters(), lr=w.lr)

    def step(i: int) -> tuple[float, float]:
        batch = w.batch(rank, WORLD, i)
        dist.barrier()
        t0 = time.perf_counter()
        loss = w.loss(ddp, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, loss.item()

    for i in range(spec["warmup"]):
        step(i)
    dist.barrier()
    snap = dict(state.stats()) if hasattr(state, "stats") else None
    tx0 = _tx_bytes()
    times, losses = [], []
    for i in range(spec["warmup"], spec["warmup"] + spec["timed"]):
        dt, loss = step(i)
        times.append(dt)
        losses.append(loss)
    dist.barrier()
    tx = _tx_bytes() - tx0
    mine = {"times": times, "tx": tx, "losses": losses}
    if snap is not None:
        st = state.stats()
        mine["inter"] = st["bytes_sent_inter_node"] - snap["bytes_sent_inter_node"]
        mine["intra"] = st["bytes_sent_intra_node"] - snap["bytes_sent_intra_node"]
        mine["sent"] = st["bytes_sent"] - snap["bytes_sent"]
    flat = torch.cat([p.detach().flatten() for p in w.model.parameters()])
    import hashlib

    mine["digest"] = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
    every: list = [None] * WORLD
    dist.all_gather_object(every, mine)
    t = spec["timed"]
    per_step = [max(e["times"][i] for e in every) for i in range(t)]
    nodes = [every[n * NODE: (n + 1) * NODE] for n in range(WORLD // NODE)]
    row = {
        "label": label, "comm": name, "options": options, "workload": spec["workload"],
        "step_s": per_step, "step_s_median": statistics.median(per_step),
        "loss_timed": every[0]["losses"],
        # the first rank of each node reads its namespace's veth
        "link_tx_bytes_per_step_per_node": [node[0]["tx"] / t for node in nodes],
        "replicas_identical": len({e["digest"] for e in every}) == 1,
    }
    if "inter" in every[0]:
        row["stats_inter_bytes_per_step_per_node"] = [sum(e["inter"] for e in node) / t
                                                      for node in nodes]
        row["stats_intra_bytes_per_step_per_rank"] = every[0]["intra"] / t
        row["stats_sent_bytes_per_step_per_rank"] = every[0]["sent"] / t
    return row


def rank_main(spec_path: str) -> int:
    import torch.distributed as dist

    from benchmarks import _common

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=WORLD,
                            timeout=_dt.timedelta(seconds=900))
    try:
        for label in spec["modes"]:
            row = _rank_mode(spec, label, rank)
            gc.collect()  # the mode's model, DDP and hook state, before the next is built
            if rank == 0:
                with open(spec["results"], "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{spec['workload']} {label}: {row['step_s_median']:.3f} s", flush=True)
    finally:
        _common.teardown()
    return 0


# ------------------------------------------------------------------------------ orchestrator


def _run_workload(wl: str, args, net, workdir: Path) -> list[dict]:
    results = workdir / f"{wl}.jsonl"
    results.write_text("")
    spec = {"workload": wl, "seed": 0, "warmup": args.warmup, "timed": args.timed,
            "modes": args.modes, "results": str(results)}
    spec_path = workdir / f"{wl}.spec.json"
    spec_path.write_text(json.dumps(spec))
    procs = []
    for r in range(WORLD):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(NODE),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MASTER_PORT=str(args.port))
        if net is None:
            env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
            prefix = []
        else:
            from benchmarks.network import netns

            env.update(MASTER_ADDR=net.addr(0), GLOO_SOCKET_IFNAME=netns.IFNAME)
            prefix = ["ip", "netns", "exec", net.ns(r // NODE)]
        log = open(workdir / f"{wl}.rank{r}.log", "w")
        procs.append(subprocess.Popen(
            prefix + ["nice", "-n", str(args.nice), sys.executable, str(Path(__file__).resolve()),
                      "--rank", str(spec_path)],
            cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()
    try:
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                time.sleep(3)  # let the others write their error
                break
            time.sleep(1)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    if len(rows) < len(args.modes):
        tail = "\n".join((workdir / f"{wl}.rank{r}.log").read_text()[-1500:]
                         for r in range(WORLD))
        print(f"{wl}: {len(rows)} of {len(args.modes)} modes finished\n{tail}", file=sys.stderr)
    return rows


def _table(rows: list[dict], link: str) -> str:
    out = ["| workload | mode | step s (median) | speedup vs none | speedup vs flat | "
           "MB over the slow link a node a step (veth) | (stats) | vs flat | replicas |",
           "|---|---|---|---|---|---|---|---|---|"]
    for wl in dict.fromkeys(r["workload"] for r in rows):
        rs = {r["label"]: r for r in rows if r["workload"] == wl}
        none, flat = rs.get("none"), rs.get("flat")
        for label, r in rs.items():
            link_mb = statistics.mean(r["link_tx_bytes_per_step_per_node"]) / 1e6
            st = r.get("stats_inter_bytes_per_step_per_node")
            flat_mb = (statistics.mean(flat["link_tx_bytes_per_step_per_node"]) / 1e6
                       if flat else None)
            cells = [wl, label, f"{r['step_s_median']:.3f}",
                     f"{none['step_s_median'] / r['step_s_median']:.2f}x" if none else "n/a",
                     f"{flat['step_s_median'] / r['step_s_median']:.2f}x" if flat else "n/a"]
            out.append("| " + " | ".join(cells) + " | ")
            out[-1] += f"{link_mb:.2f} | "
            out[-1] += f"{statistics.mean(st) / 1e6:.2f} | " if st else "- | "
            out[-1] += f"{link_mb / flat_mb:.0%} | " if flat_mb else "n/a | "
            out[-1] += f"{'identical' if r['replicas_identical'] else 'DRIFTED'} |"
    return f"link between the 2 nodes: {link}\n\n" + "\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", metavar="SPEC", help=argparse.SUPPRESS)
    ap.add_argument("--workloads", default="large,mlp", help="large (transformer), mlp")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--mbit", type=float, default=1000.0, help="rate of the link between nodes")
    ap.add_argument("--delay-ms", type=float, default=0.5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timed", type=int, default=4)
    ap.add_argument("--no-netns", action="store_true", help="all ranks on the host's loopback")
    ap.add_argument("--port", type=int, default=29611)
    ap.add_argument("--nice", type=int, default=15)
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds a workload may take")
    ap.add_argument("--workdir", default=None, help="keep the rank logs here")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.rank:
        return rank_main(args.rank)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    net = None
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        d = args.workdir or d
        Path(d).mkdir(parents=True, exist_ok=True)
        try:
            if not args.no_netns:
                from benchmarks.network import netns

                netns.check_available()
                net = netns.Network(world=2, tag=f"{netns.PREFIX}{os.getpid()}n")
                net.__enter__()
                shaping = net.shape(args.mbit, args.delay_ms)
                link = f"{args.mbit:g} Mbit/s, {shaping}"
            else:
                link = "none (host loopback; bytes from stats() only)"
            for wl in [w.strip() for w in args.workloads.split(",") if w.strip()]:
                rows += _run_workload(wl, args, net, Path(d))
        finally:
            if net is not None:
                net.close()
    import platform

    report = {"link": link, "world": WORLD, "ranks_a_node": NODE, "rows": rows,
              "settings": {k: v for k, v in vars(args).items() if k not in ("rank", "out")},
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpus": os.cpu_count(), "platform": platform.platform()},
              "command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    table = _table(rows, link)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a GPU machine allows, and where the CUDA exchange synchronizes with the host.

1. Network namespaces, veth pairs and ``tc``: whether the slow-link benchmark can run there.
2. NCCL with one rank: one process group with gloo for CPU tensors and NCCL for CUDA ones, the
   exchange through its collectives on both, and whether the two results are bit-identical.
3. Host synchronizations: the compressed exchange on CUDA tensors through NCCL under
   ``torch.cuda.set_sync_debug_mode("warn")``; each warning's Python location is printed.

Needs CUDA. ``python -m benchmarks.cuda_probe``
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))

from tritter_comm.codec import MODES  # noqa: E402
from tritter_comm.exchange import Exchange, Plan, Timers  # noqa: E402


def netns() -> None:
    cmds = [
        "ip netns add tcprobe_a",
        "ip link add tcp_va type veth peer name tcp_vb",
        "ip link set tcp_vb netns tcprobe_a",
        "ip addr add 10.77.0.1/24 dev tcp_va",
        "ip link set tcp_va up",
        "ip netns exec tcprobe_a ip addr add 10.77.0.2/24 dev tcp_vb",
        "ip netns exec tcprobe_a ip link set tcp_vb up",
        "tc qdisc add dev tcp_va root tbf rate 1gbit burst 256kb latency 50ms",
        "ping -c 1 -W 2 10.77.0.2",
    ]
    for c in cmds:
        r = subprocess.run(c.split(), capture_output=True, text=True)
        status = "ok" if r.returncode == 0 else f"FAILED rc={r.returncode}: {r.stderr.strip()[:200]}"
        print(f"netns: {c}: {status}", flush=True)
        if r.returncode:
            break
    for c in ("ip link del tcp_va", "ip netns del tcprobe_a"):
        subprocess.run(c.split(), capture_output=True)


def _exchanges(dev: str, steps: int = 3, n: int = 1_000_003, mode: str = "int2"):
    plan = Plan.make(n, 1, 10, MODES[mode], MODES[mode])
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, generator=g) * (1 + s) for s in range(steps)]
    res = torch.zeros(n, device=dev)
    sres = torch.zeros(n, device=dev)
    ys = []
    for step, x in enumerate(xs):
        ex = Exchange(plan, rank=0, group=None, seed=7, step=step, key=0, timers=Timers())
        y = x.to(dev)
        ex.start(y, res)
        ex.reduce(sres)
        ys.append(ex.finish(y).cpu())
    return ys, res.cpu(), sres.cpu()


def nccl_and_syncs() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    try:
        cpu = _exchanges("cpu")
        gpu = _exchanges("cuda")
        same = all(torch.equal(a, b) for a, b in zip(cpu[0], gpu[0]))
        print(f"nccl world 1: outputs bit-identical to gloo/CPU: {same}; residuals: "
              f"{torch.equal(cpu[1], gpu[1])}, server residuals: {torch.equal(cpu[2], gpu[2])}",
              flush=True)
        where: collections.Counter = collections.Counter()
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _exchanges("cuda", steps=2)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        for w in got:
            if "synchroniz" in str(w.message):
                where[f"{Path(w.filename).name}:{w.lineno}"] += 1
        print(f"host synchronizations in 2 exchanges (excluding the final .cpu()): "
              f"{dict(where) or 'none'}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    netns()
    nccl_and_syncs()

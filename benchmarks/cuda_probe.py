"""What a GPU machine allows, and where the CUDA exchange synchronizes with the host.

1. Network namespaces, veth pairs and ``tc``: whether the slow-link benchmark can run there.
2. NCCL with one rank: one process group with gloo for CPU tensors and NCCL for CUDA ones, the
   exchange through its collectives on both, and whether the two results are bit-identical.
3. Host synchronizations: the compressed exchange on CUDA tensors through NCCL under
   ``torch.cuda.set_sync_debug_mode("warn")``, then the DDP hook's calls (the exchange forced
   through NCCL at world size 1, ``VSAState._force_exchange``) after its warm-up; for each
   distinct place a synchronization comes from, the count and the full Python stack.

Needs CUDA. ``python -m benchmarks.cuda_probe``
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
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
        try:
            r = subprocess.run(c.split(), capture_output=True, text=True)
        except FileNotFoundError as e:  # no `ip` or `tc` on this machine
            print(f"netns: {c}: FAILED: {e}", flush=True)
            break
        status = "ok" if r.returncode == 0 else f"FAILED rc={r.returncode}: {r.stderr.strip()[:200]}"
        print(f"netns: {c}: {status}", flush=True)
        if r.returncode:
            break
    for c in ("ip link del tcp_va", "ip netns del tcprobe_a"):
        try:
            subprocess.run(c.split(), capture_output=True)
        except FileNotFoundError:
            pass


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


def _syncs(fn, mode_inside: bool = False) -> dict:
    """Run ``fn`` with CUDA's sync debug mode at "warn" (``fn`` sets it where ``mode_inside``)
    and return ``{place: [count, stack]}`` of the synchronizations it warned of: the place is
    the innermost frame, the stack the whole Python stack of the warning (the thread's own:
    a DDP hook runs on autograd's thread)."""
    found: dict = {}

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        place = f"{filename}:{lineno}"
        if place not in found:
            found[place] = [0, "".join(traceback.format_stack()[:-1]), str(message)]
        found[place][0] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        if not mode_inside:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


def _report(what: str, found: dict) -> None:
    print(f"host synchronizations in {what}: "
          f"{ {k: v[0] for k, v in found.items()} or 'none'}", flush=True)
    for place, (count, stack, message) in found.items():
        print(f"--- {place}: {count}x: {message}\n{stack}", flush=True)


def _ddp_hook(steps: int = 4, start_iter: int = 2) -> None:
    """DDP with the VSA hook on a CUDA model, world 1, the exchange forced through the
    collectives; every hook call from ``start_iter`` on runs under "warn"."""
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import tritter_comm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                          nn.Linear(1024, 10)).cuda()
    ddp = DDP(model, device_ids=[0], bucket_cap_mb=1)
    state = tritter_comm.VSAState(mode="int2", start_iter=start_iter)
    state._force_exchange = True

    def hook(st, bucket):
        warn = st.iter >= st.start_iter
        if warn:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            return tritter_comm.vsa_hook(st, bucket)
        finally:
            if warn:
                torch.cuda.set_sync_debug_mode("default")

    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(256, 32, generator=g).cuda()
        y = torch.randint(0, 10, (256,), generator=g).cuda()
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.cuda.synchronize()
    print(f"ddp hook: {state.stats()['buckets_compressed']} buckets compressed", flush=True)
    del ddp


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
        syncs = _syncs(lambda: _exchanges("cuda", steps=2))
        _report("2 exchanges (the final .cpu() included)", syncs)
        _report("the DDP hook's calls after the warm-up, forced through NCCL at world 1",
                _syncs(_ddp_hook, mode_inside=True))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    netns()
    nccl_and_syncs()

"""Rank functions for tests/test_peers.py (module level: they are pickled into spawned ranks)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # benchmarks/ is a package of the repository, not of the install
    sys.path.append(_ROOT)

from benchmarks import comm  # noqa: E402


class _Counting:
    """Counts the bytes handed to all_to_all_single / all_gather_into_tensor for other ranks."""

    def __init__(self):
        self.sent = 0
        self._a2a, self._ag = dist.all_to_all_single, dist.all_gather_into_tensor

    def __enter__(self):
        world = dist.get_world_size()

        def a2a(out, inp, *a, **k):
            self.sent += inp.numel() * inp.element_size() * (world - 1) // world
            return self._a2a(out, inp, *a, **k)

        def ag(out, inp, *a, **k):
            self.sent += inp.numel() * inp.element_size() * (world - 1)
            return self._ag(out, inp, *a, **k)

        dist.all_to_all_single, dist.all_gather_into_tensor = a2a, ag
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single, dist.all_gather_into_tensor = self._a2a, self._ag


def average(rank: int, world: int, mode: str, numel: int) -> dict:
    """One two-phase average of a per-rank random vector; the exact mean for comparison."""
    xs = [torch.randn(numel, generator=torch.Generator().manual_seed(100 + r))
          for r in range(world)]
    codec = comm._peer_codec(mode)
    with _Counting() as c:
        out = comm.two_phase_average(xs[rank], codec)
    exact = torch.stack(xs).mean(0)
    return {
        "out": out.numpy().tobytes(),
        "rel_err": float((out - exact).norm() / exact.norm()),
        "counted": c.sent,
        "accounted": comm.two_phase_wire_bytes(numel, world, codec),
    }


def _sync_peer_hook(state, bucket):
    """The unpipelined form of comm.peer_hook: each bucket averaged before the call returns."""
    t = bucket.buffer()
    t.copy_(comm.two_phase_average(t, state.codec, group=state.process_group))
    fut = torch.futures.Future()
    fut.set_result(t)
    return fut


def train(rank: int, world: int, mode: str, steps: int, sync: bool = False) -> dict:
    """A few DDP steps with many small buckets under ``mode``; parameters' digest and bytes.
    ``sync``: through :func:`_sync_peer_hook` instead of the pipelined hook."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 300), nn.Tanh(), nn.Linear(300, 300), nn.Tanh(),
                          nn.Linear(300, 5))
    ddp = DDP(model, bucket_cap_mb=0.1)  # several buckets: the order of collectives matters
    if sync:
        state = comm.PeerState(comm._peer_codec(mode))
        ddp.register_comm_hook(state, _sync_peer_hook)
        return {"digest": _train_digest(ddp, model, rank, steps)}
    state = comm.register(ddp, mode)
    with _Counting() as c:
        digest = _train_digest(ddp, model, rank, steps)
    out = {"digest": digest, "counted": c.sent, "stats": state.stats(),
           "per_step": comm.bytes_per_step(mode, ddp, state),
           "buckets": len(ddp.reducer._get_zeros_like_grad_buckets())}
    del ddp
    return out


def _train_digest(ddp: DDP, model: nn.Module, rank: int, steps: int) -> str:
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x = torch.randn(16, 37, generator=g)
        loss = ddp(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()


def powersgd_bucket_check(rank: int, world: int) -> dict:
    """``register`` for PowerSGD on DDP built with DDP's default bucket cap (25 MiB) over a
    model of 32 MiB of gradients: refused; built with ``bucket_cap_mb_for``: registered."""
    model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048))
    out = {}
    try:
        comm.register(DDP(model), "powersgd4")
        out["default_cap"] = "registered"
    except ValueError as err:
        out["default_cap"] = str(err)
    comm.register(DDP(model, bucket_cap_mb=comm.bucket_cap_mb_for("powersgd4")), "powersgd4")
    out["one_bucket"] = "registered"
    return out

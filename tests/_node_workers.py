"""Ranks of tests/test_node_aware.py: DDP with the node-aware exchange (intra_node_size)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tritter_comm
from _ddp_workers import Net, _data


class GroupCounter:
    """Counts the bytes this rank hands to collectives for other ranks, by group: those of
    groups that hold ranks of another node (``node_of``) and the rest."""

    NAMES = ("all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor",
             "all_reduce")

    def __init__(self, size: int):
        self.size = size  # ranks a node
        self.inter = self.intra = 0
        self._orig = {}

    def _add(self, nbytes: int, group) -> None:
        ranks = (list(range(dist.get_world_size())) if group is None
                 else dist.get_process_group_ranks(group))
        if len({r // self.size for r in ranks}) > 1:
            self.inter += nbytes
        else:
            self.intra += nbytes

    def __enter__(self):
        def n_of(k):
            return dist.get_world_size(k.get("group"))

        def a2a(out, inp, *a, **k):
            n = n_of(k)
            self._add(inp.numel() * inp.element_size() * (n - 1) // n, k.get("group"))
            return self._orig["all_to_all_single"](out, inp, *a, **k)

        def ag(out, inp, *a, **k):
            if inp.dtype != torch.int64:  # the one-off config check
                self._add(inp.numel() * inp.element_size() * (n_of(k) - 1), k.get("group"))
            return self._orig["all_gather_into_tensor"](out, inp, *a, **k)

        def rs(out, inp, *a, **k):
            self._add(out.numel() * out.element_size() * (n_of(k) - 1), k.get("group"))
            return self._orig["reduce_scatter_tensor"](out, inp, *a, **k)

        def ar(t, *a, **k):
            n = n_of(k)
            self._add(2 * (n - 1) * t.numel() * t.element_size() // n, k.get("group"))
            return self._orig["all_reduce"](t, *a, **k)

        for name, f in zip(self.NAMES, (a2a, ag, rs, ar)):
            self._orig[name] = getattr(dist, name)
            setattr(dist, name, f)
        return self

    def __exit__(self, *exc):
        for name, f in self._orig.items():
            setattr(dist, name, f)


def train(rank, world, *, steps=6, hook=None, hook_per_rank=None, count_from=None,
          node=2, cap=0.02, depth=2, env=None):
    """DDP training of ``Net``; returns params (bytes), losses, stats, counted bytes."""
    import os

    os.environ.update(env or {})
    torch.manual_seed(0)
    model = Net(tiny=False, depth=depth)
    ddp = DDP(model, bucket_cap_mb=cap)
    if hook_per_rank is not None:
        hook = hook_per_rank[rank]
    state = None
    if hook is not None:
        state = tritter_comm.VSAState(**hook)
        ddp.register_comm_hook(state, tritter_comm.vsa_hook)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    counter, at_count, losses = None, None, []
    try:
        for step in range(steps):
            if step == count_from:
                counter = GroupCounter(node).__enter__()
                at_count = state.stats()
            x, y = _data(rank, step, torch.float32)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        if counter is not None:
            counter.__exit__()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"params": flat.numpy().tobytes(), "losses": losses,
            "stats": state.stats() if state else None, "at_count": at_count,
            "counted": None if counter is None else (counter.inter, counter.intra),
            "buckets": len(ddp.reducer._get_zeros_like_grad_buckets())}


def grads(rank, world, *, hook, steps=3):
    """Each step's synchronized gradient (flat float32 bytes)."""
    torch.manual_seed(0)
    model = Net(tiny=False)
    ddp = DDP(model, bucket_cap_mb=0.05)
    if hook is not None:
        ddp.register_comm_hook(tritter_comm.VSAState(**hook), tritter_comm.vsa_hook)
    out = []
    for step in range(steps):
        x, y = _data(rank, step, torch.float32)
        ddp.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]).numpy().tobytes())
    return out

"""Training loops run inside the spawned ranks of tests/test_diloco.py."""

from __future__ import annotations

import hashlib
import io

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from tritter_comm import VSAConfig
from tritter_comm.optim import DiLoCo

# small blocks and no size floor, so that a small model goes through the compressed exchange
VSA = dict(block_size=256, min_compress_numel=1)


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                         nn.Linear(48, 4))


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 16, generator=g)
    return x, (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4] > 0).long()


def digest(params) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def make(rank, *, init_seed=0, H=4, config=None, fragments=1, outer_lr=1.0, outer_momentum=0.0,
         inner="adamw"):
    model = net(init_seed)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if inner == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.05))
    cfg = None if config is None else VSAConfig(**{**VSA, **config})
    model.init_digest = digest(model.parameters())
    return model, DiLoCo(model, opt, sync_every=H, config=cfg, fragments=fragments,
                         outer_lr=outer_lr, outer_momentum=outer_momentum)


def one_step(model, opt, rank, step):
    x, y = batch(rank, step)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def replicas(rank, world, *, steps=16, **kw):
    """Digests of each fragment's parameters right after its syncs, and of all parameters at
    every step (to show the replicas do drift between syncs: no hidden exchange)."""
    # a different init on every rank: the constructor must start all from rank 0's
    model, opt = make(rank, init_seed=rank, **kw)
    start = model.init_digest
    after_sync, every = [], []
    for step in range(steps):
        one_step(model, opt, rank, step)
        if opt._step % opt.period == 0:
            k = (opt._step // opt.period - 1) % opt.fragments
            after_sync.append((step, k, digest(opt._frags[k].params)))
        every.append(digest(model.parameters()))
    return dict(start=start, after_sync=after_sync, every=every, stats=opt.stats())


def resume(rank, world, *, total=14, cut=7, **kw):
    """``total`` steps uninterrupted vs ``cut`` steps, a state-dict round trip into a freshly
    built model and optimizer (another init), then the rest."""
    model, opt = make(rank, **kw)
    for step in range(total):
        one_step(model, opt, rank, step)
    straight = digest(model.parameters()), counters(opt)

    model, opt = make(rank, **kw)
    for step in range(cut):
        one_step(model, opt, rank, step)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    del model, opt
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt = make(rank, init_seed=7, **kw)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    for step in range(cut, total):
        one_step(model, opt, rank, step)
    return straight, (digest(model.parameters()), counters(opt))


def counters(opt) -> dict:
    """stats() without the codec's timers."""
    return {k: v for k, v in opt.stats().items() if not k.endswith("_seconds")}


def count_bytes(rank, world, *, steps=12, **kw):
    """stats() beside what the collectives were handed (bytes this rank sends to others)."""
    sent = [0]
    a2a, ag, ar = dist.all_to_all_single, dist.all_gather_into_tensor, dist.all_reduce

    def a2a_count(out, inp, *a, **k):
        sent[0] += inp.numel() * inp.element_size() * (world - 1) // world
        return a2a(out, inp, *a, **k)

    def ag_count(out, inp, *a, **k):
        sent[0] += inp.numel() * inp.element_size() * (world - 1)
        return ag(out, inp, *a, **k)

    def ar_count(t, *a, **k):  # a ring all-reduce: 2 (N-1)/N of the tensor
        sent[0] += 2 * (world - 1) * t.numel() * t.element_size() // world
        return ar(t, *a, **k)

    model, opt = make(rank, **kw)  # the constructor's agreement check is not counted
    dist.all_to_all_single, dist.all_gather_into_tensor, dist.all_reduce = (a2a_count, ag_count,
                                                                            ar_count)
    try:
        for step in range(steps):
            one_step(model, opt, rank, step)
    finally:
        dist.all_to_all_single, dist.all_gather_into_tensor, dist.all_reduce = a2a, ag, ar
    numel = sum(p.numel() for p in model.parameters())
    return dict(stats=opt.stats(), counted=sent[0], numel=numel)


def mismatch(rank, world):
    """Ranks passing different options: every rank gets the error, none hangs."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        DiLoCo(model, opt, sync_every=4 + rank)
    except ValueError as e:
        return str(e)
    return None


def wrapped_models(rank, world):
    """The errors for a DDP-wrapped and an FSDP2-sharded model (None: no error)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = []
    for wrap in (DDP, lambda m: fully_shard(m, mesh=init_device_mesh("cpu", (world,)))):
        model = wrap(net())
        try:
            DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=4)
            out.append(None)
        except ValueError as e:
            out.append(str(e))
        del model
    return out

"""Rank functions of tests/test_cuda.py: gloo ranks whose tensors live on the one GPU."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tritter_comm
from tritter_comm.codec import MODES
from tritter_comm.exchange import Exchange, Plan, Timers

import _ddp_workers as W


def exchange_cpu_and_cuda(rank, world, *, n=300_001, steps=3, mode="int2"):
    """The same exchanges (client and server residuals carried over steps) on CPU tensors and
    on CUDA tensors. Compared here (tensors sent back through the queue would be shared by
    file descriptor, which the exiting rank closes): which of them match, and the bytes of the
    CPU outputs, for the comparison across ranks."""
    plan = Plan.make(n, world, 10, MODES[mode], MODES[mode])
    lo, hi = plan.bounds(rank)
    g = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(n, generator=g) * (1 + s) for s in range(steps)]
    out = {}
    for dev in ("cpu", "cuda"):
        res = torch.zeros(n, device=dev)
        sres = torch.zeros(hi - lo, device=dev)
        ys = []
        for step, x in enumerate(xs):
            ex = Exchange(plan, rank=rank, group=None, seed=7, step=step, key=0, timers=Timers())
            y = x.to(dev).clone()
            ex.start(y, res)
            ex.reduce(sres)
            ys.append(ex.finish(y).cpu())
        out[dev] = {"ys": ys, "res": res.cpu(), "sres": sres.cpu()}
    cpu, gpu = out["cpu"], out["cuda"]
    return {
        "outputs_equal": [torch.equal(a, b) for a, b in zip(cpu["ys"], gpu["ys"])],
        "residual_equal": torch.equal(cpu["res"], gpu["res"]),
        "server_residual_equal": torch.equal(cpu["sres"], gpu["sres"]),
        "residual_used": bool(cpu["res"].abs().sum() > 0 and cpu["sres"].abs().sum() > 0),
        "outputs": [y.numpy().tobytes() for y in cpu["ys"]],
    }


def ddp_on_cuda(rank, world, *, steps=30, mode="int2", hook=True, side_stream=None):
    """DDP over gloo with the model on the GPU (and the VSA hook, its CUDA work on a side
    stream or not; None: the state's default): the losses, the parameters and the first step
    after which the replicas differed (None if never)."""
    torch.manual_seed(0)
    model = W.Net(width=256).cuda()
    ddp = DDP(model, device_ids=[0], bucket_cap_mb=0.5)
    state = tritter_comm.VSAState(mode=mode, start_iter=2, min_compress_numel=1000)
    if side_stream is not None:
        state._use_side_stream = side_stream
    if hook:
        ddp.register_comm_hook(state, tritter_comm.vsa_hook)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    losses, first_diff = [], None
    for step in range(steps):
        x, y = W._data(rank, step, torch.float32)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x.cuda()), y.cuda())
        loss.backward()
        opt.step()
        losses.append(loss.item())
        sums = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
        mine = sum(p.detach().double().sum() for p in model.parameters()).cpu().reshape(1)
        dist.all_gather(sums, mine)
        if first_diff is None and any(not torch.equal(sums[0], t) for t in sums):
            first_diff = step
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()
    dist.barrier()
    return {"losses": losses, "params": flat.numpy().tobytes(), "stats": state.stats(),
            "first_diff": first_diff, "side_streams": len(state._side_streams),
            "residual_devices": sorted({str(r.device) for r in state.residuals.values()})}


def side_stream_off_and_on(rank, world, *, worker, **kwargs):
    """``worker`` (a rank function) run twice in this process, the hook's CUDA work on the
    current stream, then on a side stream: ``{"off": ..., "on": ...}``."""
    return {"off": worker(rank, world, side_stream=False, **kwargs),
            "on": worker(rank, world, side_stream=True, **kwargs)}


def exchange_nonfinite_cpu_and_cuda(rank, world, *, n=300_001, mode="int2"):
    """Exchanges whose input holds NaN (step 1) or Inf (step 2) on CPU tensors (the Rust codec
    raises, the slot is poisoned) and on CUDA tensors (the flag stays on the device), with
    float32 and bfloat16 residuals: whether the bits of every output and residual match."""
    plan = Plan.make(n, world, 10, MODES[mode], MODES[mode])
    lo, hi = plan.bounds(rank)
    g = torch.Generator().manual_seed(7 + rank)
    xs = [torch.randn(n, generator=g) for _ in range(4)]
    xs[1][123] = float("nan")
    xs[2][n - 5] = float("inf")
    same = {}
    for rdt in (torch.float32, torch.bfloat16):
        out = {}
        for dev in ("cpu", "cuda"):
            res = torch.zeros(n, dtype=rdt, device=dev)
            sres = torch.zeros(hi - lo, dtype=rdt, device=dev)
            ys, rs = [], []
            for step, x in enumerate(xs):
                ex = Exchange(plan, rank=rank, group=None, seed=3, step=step, key=1,
                              timers=Timers())
                y = x.to(dev).clone()
                ex.start(y, res)
                ex.reduce(sres)
                ys.append(ex.finish(y).cpu())
                rs.append((res.cpu().clone(), sres.cpu().clone()))
            out[dev] = (ys, rs)
        (yc, rc), (yg, rg) = out["cpu"], out["cuda"]
        bits = (lambda t: t.view(torch.int32) if t.dtype == torch.float32
                else t.view(torch.int16))
        def same_output(a, b):
            # NaN where the CPU has NaN, the same bits elsewhere; not the NaNs' own bits: a GPU's
            # arithmetic writes its canonical NaN, a CPU's carries the payload of its operand
            # (on an H200 the outputs' NaN bits differed while the residuals were identical)
            nan = torch.isnan(a)
            return torch.equal(nan, torch.isnan(b)) and torch.equal(bits(a[~nan]), bits(b[~nan]))

        same[str(rdt)] = {
            "outputs": [same_output(a, b) for a, b in zip(yc, yg)],
            "residuals": [torch.equal(bits(a[0]), bits(b[0]))
                          and torch.equal(bits(a[1]), bits(b[1]))
                          for a, b in zip(rc, rg)],
            "nan_steps": [bool(torch.isnan(y).all()) for y in yc],
            "residual_kept": [torch.equal(bits(rc[0][0]), bits(rc[1][0])),
                              torch.equal(bits(rc[1][0]), bits(rc[2][0]))],
        }
    return same

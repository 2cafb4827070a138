"""Training loops run inside the spawned ranks of tests/test_phase.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import tritter_comm
from _ddp_workers import Net, _data
from tritter_comm.optim import PhaseOptimizer

PHASE = dict(warmup_steps=3, full_steps=2, predict_steps=3, correct_every=2)


def params_bytes(model) -> bytes:
    return b"".join(p.detach().contiguous().numpy().tobytes() for p in model.parameters())


def train(rank, world, *, steps=24, hook=None, forward="no_grad", phase=None, cap=0.05,
          save_at=None, save_path=None, load_path=None):
    """DDP training with PhaseOptimizer. ``forward`` on predicted steps: ``"no_grad"`` (a
    forward under torch.no_grad for the loss) or ``"none"`` (no forward)."""
    torch.manual_seed(0)
    model = Net(width=64, tiny=True, depth=2)
    ddp = DDP(model, bucket_cap_mb=cap)
    state = None
    if hook is not None:
        state = tritter_comm.VSAState(**hook)
        ddp.register_comm_hook(state, tritter_comm.vsa_hook)
    inner = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=5, gamma=0.9)
    opt = PhaseOptimizer(inner, **(phase or PHASE))
    start = 0
    if load_path is not None:
        ck = torch.load(load_path, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start = ck["step"]
    phases, losses = [], []
    for step in range(start, steps):
        if save_at is not None and step == save_at and rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step}, save_path)
        x, y = _data(rank, step, torch.float32)
        phases.append(opt.phase.value)
        if opt.needs_backward():
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
        elif forward == "no_grad":
            with torch.no_grad():
                loss = F.cross_entropy(ddp(x), y)
        else:
            loss = None
        opt.step(loss=loss)
        sched.step()
        losses.append(None if loss is None else float(loss.detach()))
    return {
        "params": params_bytes(model),
        "phases": phases,
        "losses": losses,
        "stats": opt.stats(),
        "hook_stats": state.stats() if state is not None else None,
        "lr": inner.param_groups[0]["lr"],
        "adam_steps": int(inner.state[next(iter(ddp.parameters()))]["step"]),
    }


def forward_with_grad_on_predicted_step(rank, world, find_unused=False):
    """A forward with grad enabled and no backward on predicted steps (not the documented
    loop: it builds an autograd graph for nothing). Returns the error or the parameters."""
    torch.manual_seed(0)
    ddp = DDP(Net(width=64, unused=find_unused), bucket_cap_mb=0.05,
              find_unused_parameters=find_unused)
    opt = PhaseOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), warmup_steps=0,
                         full_steps=1, predict_steps=1, correct_every=1, adaptive=False)
    try:
        for step in range(8):
            x, y = _data(rank, step, torch.float32)
            loss = F.cross_entropy(ddp(x), y)  # grad enabled on every step
            if opt.needs_backward():
                opt.zero_grad()
                loss.backward()
            opt.step(loss=loss)
    except RuntimeError as e:
        return str(e)
    return params_bytes(ddp.module)

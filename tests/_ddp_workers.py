"""Training loops run inside the spawned ranks of tests/test_ddp_hook.py."""

from __future__ import annotations

import io

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tritter_comm


class Net(nn.Module):
    """An MLP with an optional branch that gets no gradient (for find_unused_parameters)."""

    def __init__(self, width=256, unused=False, tiny=True, depth=1):
        super().__init__()
        hidden = [m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())]
        self.body = nn.Sequential(nn.Linear(32, width), nn.ReLU(), *hidden,
                                  nn.Linear(width, 10))
        # a 3-element parameter: its own tiny bucket when the cap is small
        self.tiny = nn.Parameter(torch.ones(3)) if tiny else None
        self.unused = nn.Linear(32, 1000) if unused else None

    def forward(self, x):
        y = self.body(x)
        if self.tiny is not None:
            y = y * self.tiny.mean()
        return y


def _data(rank, step, dtype):
    g = torch.Generator().manual_seed(1000 * rank + step)
    w = torch.randn(32, 10, generator=torch.Generator().manual_seed(5))
    x = torch.randn(64, 32, generator=g)
    return x.to(dtype), (x @ w).argmax(1)


class ByteCounter:
    """Counts what this rank hands to collectives for other ranks."""

    def __init__(self):
        self.bytes = 0
        self._orig = {}

    def __enter__(self):
        n = dist.get_world_size()

        def a2a(out, inp, *a, **k):
            self.bytes += inp.numel() * inp.element_size() * (n - 1) // n
            return self._orig["all_to_all_single"](out, inp, *a, **k)

        def ag(out, inp, *a, **k):
            if inp.dtype == torch.uint8:  # payloads; the one-off config check is int64
                self.bytes += inp.numel() * inp.element_size() * (n - 1)
            return self._orig["all_gather_into_tensor"](out, inp, *a, **k)

        def ar(t, *a, **k):
            self.bytes += 2 * (n - 1) * t.numel() * t.element_size() // n
            return self._orig["all_reduce"](t, *a, **k)

        for name, f in (("all_to_all_single", a2a), ("all_gather_into_tensor", ag),
                        ("all_reduce", ar)):
            self._orig[name] = getattr(dist, name)
            setattr(dist, name, f)
        return self

    def __exit__(self, *exc):
        for name, f in self._orig.items():
            setattr(dist, name, f)


def train(rank, world, *, steps=30, hook=None, cap=25.0, ddp_kwargs=None, dtype=torch.float32,
          accumulate=1, count=False, save_at=None, save_path=None, load_path=None,
          width=256, unused=False, lr=1e-3, manual_seed=0, tiny=True, count_from=0,
          hook_per_rank=None, depth=1, optim="adamw"):
    """Train ``Net`` with DDP; ``hook`` is None (DDP's default) or VSAState kwargs."""
    torch.manual_seed(manual_seed)
    model = Net(width=width, unused=unused, tiny=tiny, depth=depth).to(dtype)
    if hook_per_rank is not None:
        hook = hook_per_rank[rank]
    ddp = DDP(model, bucket_cap_mb=cap, **(ddp_kwargs or {}))
    state = None
    if hook is not None:
        state = tritter_comm.VSAState(**hook)
        ddp.register_comm_hook(state, tritter_comm.vsa_hook)
    # pure-fp16 AdamW divides by an eps that underflows; fp16 runs use SGD
    opt = (torch.optim.AdamW(ddp.parameters(), lr=lr) if optim == "adamw"
           else torch.optim.SGD(ddp.parameters(), lr=lr, momentum=0.9))
    start = 0
    if load_path is not None:
        ck = torch.load(load_path, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if state is not None:
            state.load_state_dict(torch.load(f"{load_path}.rank{rank}", weights_only=True))
        start = ck["step"]
    losses = []
    counter = ByteCounter() if count else None
    stats_at_count = None
    try:
        for step in range(start, steps):
            if counter and step == count_from:
                counter.__enter__()
                stats_at_count = state.stats() if state else None
            if save_at is not None and step == save_at:
                if rank == 0:
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                                "step": step}, save_path)
                if state is not None:  # residuals are per rank
                    torch.save(state.state_dict(), f"{save_path}.rank{rank}")
            if save_at is not None and step == save_at:
                dist.barrier()
            opt.zero_grad()
            for micro in range(accumulate):
                x, y = _data(rank, step * accumulate + micro, dtype)
                if micro < accumulate - 1:
                    with ddp.no_sync():
                        nn.functional.cross_entropy(ddp(x).float(), y).backward()
                else:
                    loss = nn.functional.cross_entropy(ddp(x).float(), y)
                    loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        if counter and counter._orig:
            counter.__exit__()
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    out = {"losses": losses, "params": flat.numpy().tobytes(),
           "stats": state.stats() if state else None,
           "buckets": len(ddp.reducer._get_zeros_like_grad_buckets()),
           "counted": counter.bytes if counter else None, "stats_at_count": stats_at_count}
    if state is not None:
        buf = io.BytesIO()
        torch.save(state.state_dict(), buf)
        out["state_bytes"] = buf.getvalue()
    return out


def eval_grads(rank, world, *, hook, steps=3):
    """Return each step's synchronized gradient (flat), to compare hook and no hook."""
    torch.manual_seed(0)
    model = Net(tiny=False)
    ddp = DDP(model, bucket_cap_mb=0.05)
    if hook is not None:
        ddp.register_comm_hook(tritter_comm.VSAState(**hook), tritter_comm.vsa_hook)
    grads = []
    for step in range(steps):
        x, y = _data(rank, step, torch.float32)
        ddp.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).numpy().tobytes())
    return grads


def nan_step(rank, world, *, bad_rank=1, bad_step=3):
    """One rank's gradient holds NaN at ``bad_step``: every rank must see a non-finite
    gradient in that step, GradScaler must skip it everywhere, and no residual is poisoned."""
    torch.manual_seed(0)
    model = Net(tiny=False)
    ddp = DDP(model, bucket_cap_mb=0.05)
    state = tritter_comm.VSAState(start_iter=2, min_compress_numel=1000)
    ddp.register_comm_hook(state, tritter_comm.vsa_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    report = []
    for step in range(6):
        x, y = _data(rank, step, torch.float32)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        if rank == bad_rank and step == bad_step:
            loss = loss * float("nan")
        scaler.scale(loss).backward()
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters())
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        skipped = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        res_ok = all(torch.isfinite(r).all() for r in state.residuals.values())
        sres_ok = all(torch.isfinite(r).all() for r in state.server_residuals.values())
        report.append((step, finite, skipped, res_ok and sres_ok))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {"report": report, "params": flat.numpy().tobytes()}


def die_mid_training(rank, world, *, die_rank=1, die_step=5):
    """``die_rank`` kills itself with SIGKILL at ``die_step``; the others must fail, not hang."""
    import os
    import signal
    import time

    torch.manual_seed(0)
    model = Net(tiny=False)
    ddp = DDP(model, bucket_cap_mb=0.05)
    ddp.register_comm_hook(tritter_comm.VSAState(start_iter=2, min_compress_numel=1000),
                           tritter_comm.vsa_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    t0 = None
    try:
        for step in range(50):
            if step == die_step:
                if rank == die_rank:
                    os.kill(os.getpid(), signal.SIGKILL)
                t0 = time.monotonic()
            x, y = _data(rank, step, torch.float32)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
    except Exception as e:  # the expected outcome on the survivors
        raise RuntimeError(f"survivor stopped after {time.monotonic() - t0:.1f} s: {e}") from e
    return "finished"


def train_with_version(rank, world, *, versions, **kwargs):
    """``train`` with tritter-comm's version number faked per rank (a version-skew job)."""
    import tritter_comm.hooks.state as ddp_mod

    ddp_mod._version_number = lambda: versions[rank]
    return train(rank, world, **kwargs)


class CallCounter:
    """Counts the calls of each collective the exchange and the plain path use."""

    NAMES = ("all_to_all_single", "all_gather_into_tensor", "all_reduce")

    def __init__(self):
        self.calls = dict.fromkeys(self.NAMES, 0)
        self._orig = {}

    def __enter__(self):
        for name in self.NAMES:
            orig = self._orig[name] = getattr(dist, name)

            def counted(*a, _name=name, _orig=orig, **k):
                self.calls[_name] += 1
                return _orig(*a, **k)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, f in self._orig.items():
            setattr(dist, name, f)


def replay_exchanges(state, records):
    """What the hook should have made of each bucket ``(key, iter, input)`` it was given (in
    hook-call order), with ``Exchange`` driven directly on CPU tensors (the Rust codec; gloo at
    world 1): plain buckets (warm-up, small) unchanged (an all-reduce over one rank divided by
    one), compressed ones through start, reduce and finish with the client and server
    residuals of their key. The reference of the forced world-1 exchange (issue 16)."""
    from tritter_comm.codec import MODES, block_log2
    from tritter_comm.exchange import Exchange, Plan, Timers

    res, sres, outs = {}, {}, []
    dtype = getattr(torch, state.residual_format())
    for key, it, x in records:
        x = x.detach().cpu().clone()
        if it < state.start_iter or x.numel() < state.min_compress_numel:
            outs.append(x)
            continue
        plan = Plan.make(x.numel(), 1, block_log2(state.block_size), MODES[state.mode],
                         MODES[state.phase2_mode])
        ex = Exchange(plan, rank=0, group=None, seed=state.seed, step=it, key=key,
                      timers=Timers(), fixed_keys=state.fixed_keys)
        r = (res.setdefault(key, torch.zeros(x.numel(), dtype=dtype))
             if state.error_feedback else None)
        ex.start(x, r)
        s = (sres.setdefault(key, torch.zeros(x.numel(), dtype=dtype))
             if state.server_error_feedback else None)
        ex.reduce(s)
        outs.append(ex.finish(x))
    return outs


def ddp_world1(rank, world, *, device="cpu", steps=6, mode="int2", force=True,
               sync_debug=False, side_stream=None):
    """DDP at world size 1 with the VSA hook (``_force_exchange``: through the collectives),
    each hook call's bucket recorded before and after: whether each output equals what a
    direct ``Exchange`` on CPU makes of its input (``replay_exchanges``), the collectives
    called, the parameters. ``sync_debug``: every hook call after the warm-up runs under
    ``torch.cuda.set_sync_debug_mode("error")`` (the hook's own steps only: a host sync
    there raises, and the step fails). ``side_stream``: the hook's CUDA work on a side
    stream, or not (None: the state's default)."""
    assert world == 1
    torch.manual_seed(0)
    model = Net(width=256).to(device)
    ddp = DDP(model, device_ids=[0] if device == "cuda" else None, bucket_cap_mb=0.01)
    state = tritter_comm.VSAState(mode=mode, start_iter=2, min_compress_numel=1000)
    state._force_exchange = force
    if side_stream is not None:
        state._use_side_stream = side_stream
    pending, records, outs = [], [], []

    def hook(st, bucket):
        x = bucket.buffer().detach().clone()
        it = st.iter
        strict = sync_debug and it >= st.start_iter
        if strict:
            torch.cuda.set_sync_debug_mode("error")
        try:
            fut = tritter_comm.vsa_hook(st, bucket)
        finally:
            if strict:
                torch.cuda.set_sync_debug_mode("default")
        pending.append(fut)
        records.append((bucket.index(), it, x))
        return fut

    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    losses = []
    with CallCounter() as calls:
        for step in range(steps):
            x, y = _data(rank, step, torch.float32)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x.to(device)), y.to(device))
            loss.backward()
            outs.extend(f.wait().detach().clone() for f in pending)  # before DDP reuses them
            pending.clear()
            opt.step()
            losses.append(loss.item())
    ref = replay_exchanges(state, records)
    got = [o.cpu() for o in outs]
    compressed = [it >= state.start_iter and x.numel() >= state.min_compress_numel
                  for _, it, x in records]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()
    return {
        "buckets": len(records),
        "compressed": compressed,
        "equal_ref": [torch.equal(a, b) for a, b in zip(got, ref)],
        "unchanged": [torch.equal(a, x.cpu()) for a, (_, _, x) in zip(got, records)],
        "calls": dict(calls.calls),
        "stats": state.stats(),
        "losses": losses,
        "params": flat.numpy().tobytes(),
        "side_streams": len(state._side_streams),
    }

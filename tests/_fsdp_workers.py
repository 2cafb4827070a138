"""Training loops run inside the spawned ranks of tests/test_fsdp.py (FSDP1 and FSDP2, CPU)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

import tritter_comm
import tritter_comm.fsdp
import tritter_comm.hooks.fsdp

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch without FSDP2
    FSDPModule = ()


class Block(nn.Module):
    """One FSDP unit: a square layer (residual in a chain), so that every unit has the same
    size."""

    def __init__(self, width, residual=True):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.residual = residual

    def forward(self, x):
        y = torch.relu(self.lin(x))
        return x + y if self.residual else y


class Net(nn.Module):
    """``depth`` blocks in a row, or (``branches``) two blocks side by side whose order in the
    forward pass (and so in the backward pass) flips on odd steps without changing the math."""

    def __init__(self, width=64, depth=4, branches=False):
        super().__init__()
        self.inp = nn.Linear(32, width)
        n = 2 if branches else depth
        # branches are not residual: the input's gradient is then the sum of two terms, the
        # same in either order (floating-point addition of more terms is not associative)
        self.blocks = nn.ModuleList(Block(width, residual=not branches) for _ in range(n))
        self.branches = branches
        self.head = nn.Linear(width, 10)
        self.flip = False

    def forward(self, x):
        h = torch.relu(self.inp(x))
        if self.branches:
            a, b = self.blocks
            if self.flip:
                yb = b(h)
                ya = a(h)
            else:
                ya = a(h)
                yb = b(h)
            h = ya + yb
        else:
            for blk in self.blocks:
                h = blk(h)
        return self.head(h)


def _data(rank, step, accumulate=1):
    g = torch.Generator().manual_seed(1000 * rank + step)
    w = torch.randn(32, 10, generator=torch.Generator().manual_seed(5))
    x = torch.randn(32 // accumulate, 32, generator=g)
    return x, (x @ w).argmax(1)


class ByteCounter:
    """Counts what this rank hands to collectives for other ranks: the hooks' all_to_all and
    uint8 all_gather, and float reduce-scatters and all-reduces (FSDP's parameter all-gathers
    are fp32 and not gradient traffic)."""

    def __init__(self):
        self.bytes = 0
        self._orig = {}

    def __enter__(self):
        n = dist.get_world_size()

        def nbytes(t):
            return t.numel() * t.element_size()

        def a2a(out, inp, *a, **k):
            self.bytes += nbytes(inp) * (n - 1) // n
            return self._orig["all_to_all_single"](out, inp, *a, **k)

        def ag(out, inp, *a, **k):
            if inp.dtype == torch.uint8:
                self.bytes += nbytes(inp) * (n - 1)
            return self._orig["all_gather_into_tensor"](out, inp, *a, **k)

        def rs(out, inp, *a, **k):
            self.bytes += nbytes(inp) * (n - 1) // n
            return self._orig[name_rs](out, inp, *a, **k)

        def ar(t, *a, **k):
            self.bytes += 2 * (n - 1) * nbytes(t) // n
            return self._orig["all_reduce"](t, *a, **k)

        name_rs = "reduce_scatter_tensor"
        patches = [("all_to_all_single", a2a), ("all_gather_into_tensor", ag),
                   ("reduce_scatter_tensor", rs), ("all_reduce", ar)]
        if hasattr(dist, "reduce_scatter_single"):  # FSDP's own default path in newer torch
            def rs_single(out, inp, *a, **k):
                self.bytes += nbytes(inp) * (n - 1) // n
                return self._orig["reduce_scatter_single"](out, inp, *a, **k)

            patches.append(("reduce_scatter_single", rs_single))
        for name, f in patches:
            self._orig[name] = getattr(dist, name)
            setattr(dist, name, f)
        return self

    def __exit__(self, *exc):
        for name, f in self._orig.items():
            setattr(dist, name, f)


def _wrap(model, api, world, strategy, reduce_dtype):
    if api == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        mp = MixedPrecision(reduce_dtype=reduce_dtype) if reduce_dtype else None
        return FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Block}),
                    sharding_strategy=ShardingStrategy[strategy], mixed_precision=mp)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world,))
    mp = MixedPrecisionPolicy(reduce_dtype=reduce_dtype) if reduce_dtype else MixedPrecisionPolicy()
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _local(p):
    return p.to_local() if hasattr(p, "to_local") else p


def _full_params(api, model):
    if api == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model):
            return torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().tobytes()
    return torch.cat([p.full_tensor().detach().flatten()
                      for p in model.parameters()]).numpy().tobytes()


def train(rank, world, *, api="fsdp1", strategy="FULL_SHARD", steps=20, hook=None, width=64,
          depth=4, branches=False, flip_odd=False, accumulate=1, reduce_dtype=None,
          count_from=None, save_at=None, save_path=None, load_path=None, lr=3e-3,
          grads_at=(), divide_factor=None, force_sum=False, nan_at=None):
    """Train ``Net`` under FSDP1 (``api="fsdp1"``) or FSDP2 (``"fsdp2"``) with the compressed
    exchange (``hook``: VSAState kwargs) or FSDP's own (``hook=None``). ``nan_at=(rank, step)``:
    that rank's loss is NaN in that step; every step then records whether this rank's gradient
    is finite and whether the hook's residuals are, and a non-finite step is skipped (as
    GradScaler would)."""
    torch.manual_seed(0)
    model = Net(width=width, depth=depth, branches=branches)
    n_params = sum(p.numel() for p in model.parameters())
    model = _wrap(model, api, world, strategy, reduce_dtype)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            if divide_factor is not None:  # PREMUL_SUM(1 / factor), or SUM and post-division
                m.set_gradient_divide_factor(divide_factor)
            if force_sum:
                m.set_force_sum_reduction_for_comms(True)
    state = None
    if hook is not None:
        state = tritter_comm.VSAState(**hook)
        if api == "fsdp1":
            model.register_comm_hook(state, tritter_comm.vsa_fsdp_hook)
        else:
            tritter_comm.fsdp.enable(model, state)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    start = 0
    if load_path is not None:
        ck = torch.load(f"{load_path}.rank{rank}", weights_only=False)
        with torch.no_grad():
            for p, saved in zip(model.parameters(), ck["params"]):
                _local(p).copy_(saved)
        opt.load_state_dict(ck["opt"])
        if state is not None:
            state.load_state_dict(torch.load(f"{load_path}.hook{rank}", weights_only=True))
        start = ck["step"]
    losses, grads, nonfinite = [], [], []
    counter = ByteCounter() if count_from is not None else None
    stats_at_count = None
    with _recording_units() as order:
        try:
            for step in range(start, steps):
                if counter is not None and step == count_from:
                    counter.__enter__()
                    stats_at_count = state.stats() if state else None
                if save_at is not None and step == save_at:
                    torch.save({"params": [_local(p).detach().clone() for p in model.parameters()],
                                "opt": opt.state_dict(), "step": step}, f"{save_path}.rank{rank}")
                    if state is not None:  # residuals are per rank
                        torch.save(state.state_dict(), f"{save_path}.hook{rank}")
                if branches:
                    (model.module if api == "fsdp1" else model).flip = flip_odd and step % 2 == 1
                opt.zero_grad()
                for micro in range(accumulate):
                    x, y = _data(rank, step * accumulate + micro, accumulate)
                    last = micro == accumulate - 1
                    if api == "fsdp2":
                        model.set_requires_gradient_sync(last)
                        ctx = contextlib.nullcontext()
                    else:
                        ctx = contextlib.nullcontext() if last else model.no_sync()
                    with ctx:
                        loss = nn.functional.cross_entropy(model(x), y)
                        if nan_at == (rank, step):
                            loss = loss * float("nan")
                        loss.backward()
                if step in grads_at:
                    grads.append(torch.cat([_local(p.grad).detach().float().flatten()
                                            for p in model.parameters()]).numpy().tobytes())
                if nan_at is not None:
                    finite = all(bool(torch.isfinite(_local(p.grad)).all())
                                 for p in model.parameters() if p.grad is not None)
                    res = [*state.residuals.values(), *state.server_residuals.values()]
                    dense = [r.dequantize() if hasattr(r, "dequantize") else r for r in res]
                    nonfinite.append((step, finite, all(bool(torch.isfinite(r).all())
                                                        for r in dense), len(res)))
                    if not finite:
                        continue
                opt.step()
                losses.append(loss.item())
        finally:
            if counter is not None and counter._orig:
                counter.__exit__()
    return {
        "losses": losses,
        "local": torch.cat([_local(p).detach().flatten()
                            for p in model.parameters()]).numpy().tobytes(),
        "full": _full_params(api, model),
        "stats": state.stats() if state else None,
        "stats_at_count": stats_at_count,
        "counted": counter.bytes if counter else None,
        "n_params": n_params,
        "residual_keys": sorted(state.residuals) if state else None,
        "order": order,
        "grads": grads,
        "nonfinite": nonfinite,
    }


def suite(rank, world, runs, **common):
    """Run several trainings one after another in the same ranks: spawning costs more than
    training these models. ``runs``: name -> ``train`` kwargs; returns name -> result."""
    return {name: train(rank, world, **common, **kw) for name, kw in runs.items()}


@contextlib.contextmanager
def _recording_units():
    """Record the unit key each hook call is booked under, in call order."""
    order: list = []
    mods = (tritter_comm.hooks.fsdp, tritter_comm.hooks.fsdp2)
    orig = tritter_comm.hooks.fsdp.enter

    def enter(state, key):
        order.append(key)
        return orig(state, key)

    for m in mods:
        m.enter = enter
    try:
        yield order
    finally:
        for m in mods:
            m.enter = orig

"""Rank functions for tests/test_sync.py (importable by spawned processes)."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch import nn

from tritter_comm.sync import TernaryWeightSync, pack_ternary, unpack_ternary


def _model(width: int = 64, *, mixed: bool = False) -> nn.Module:
    m = nn.Sequential(
        nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10),
    )
    if mixed:  # a bf16 and an fp16 layer beside fp32 ones
        m[3].to(torch.bfloat16)
        m[5].to(torch.float16)
    return m


def _state_bytes(m: nn.Module) -> bytes:
    out = []
    for t in list(m.parameters()) + list(m.buffers()):
        out.append(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return b"".join(out)


def _randomize(m: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
        for name, b in m.named_buffers():
            if b.dtype.is_floating_point:
                b.copy_(torch.rand(b.shape, generator=g).to(b.dtype) + 0.5)
            else:
                b.fill_(seed + 7)


def _ternarize(m: nn.Module, seed: int) -> None:
    """Make every float parameter scale * {-1, 0, 1} per row (a random scale per row)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            t = torch.randint(-1, 2, p.shape, generator=g).float()
            rows = p.shape[0] if p.dim() >= 2 else 1
            s = torch.rand(rows, generator=g) + 0.01
            s = s.view(-1, *[1] * (p.dim() - 1)) if p.dim() >= 2 else s
            p.copy_((t * s).to(p.dtype))


class _Counter:
    """Bytes of the tensors handed to the collectives (torchao's way of counting the wire)."""

    def __init__(self):
        self.bytes = {"broadcast": 0, "all_gather": 0, "all_reduce": 0}
        self._orig = {}

    def __enter__(self):
        for name in self.bytes:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, _name=name, _orig=orig, **kwargs):
                t = args[1] if _name == "all_gather" else args[0]
                self.bytes[_name] += t.numel() * t.element_size()
                return _orig(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def broadcast_ternary(rank, world, *, mixed=False, src=0):
    """src holds a ternary model; one broadcast() must reproduce it exactly everywhere."""
    m = _model(mixed=mixed)
    _randomize(m, seed=100 + rank)
    if rank == src:
        _ternarize(m, seed=5)
    sync = TernaryWeightSync(m, src=src)
    with _Counter() as c:
        info = sync.broadcast()
    return {"state": _state_bytes(m), "info": info, "counted": c.bytes, "stats": sync.stats()}


def broadcast_rounds(rank, world, *, rounds, error_feedback=True, width=64, mixed=False,
                     group=None, src=None):
    """src holds a random model; the receivers' deviation after each round."""
    m = _model(width, mixed=mixed)
    _randomize(m, seed=100 + rank)
    sync = TernaryWeightSync(m, error_feedback=error_feedback, group=group, src=src)
    devs, counted = [], []
    for _ in range(rounds):
        with _Counter() as c:
            info = sync.broadcast()
        counted.append(c.bytes)
        devs.append(info.get("max_deviation"))
    # rank 0 reports its own weights: the test compares receivers against them
    return {"state": _state_bytes(m), "devs": devs, "counted": counted, "stats": sync.stats(),
            "wmax": max(float(p.detach().float().abs().max()) for p in m.parameters()),
            "params": [p.detach().float().numpy().copy() for p in m.parameters()]}


def _float_params(m):
    return [p.detach().clone() for p in m.parameters() if p.dtype.is_floating_point and p.numel()]


def _residual_error(weights, before, after):
    """Max |residual after - what this rank's own packed delta dropped|: the residual that
    average() keeps must be ``own - unpack(pack(own))`` with ``own = w - anchor + residual``
    (``weights``: the float parameters before the average; ``before``/``after``: state_dicts
    around it)."""
    worst = 0.0
    for p, a, e, new in zip(weights, before["anchor"], before["residual"], after["residual"]):
        own = (p.float() - a.float()).reshape(-1) + e
        dropped = own - unpack_ternary(pack_ternary(own.view(p.shape), rule="adaptive")).reshape(-1)
        worst = max(worst, float((new - dropped).abs().max()))
    return worst


def local_sgd(rank, world, *, rounds, h, mixed=False, width=64, error_feedback=True,
              group=None):
    """H local SGD steps on each rank's own data, then average(); replicas after each round.
    ``rank`` picks the data: in a subgroup, pass the rank in the group."""
    torch.manual_seed(0)
    m = _model(width, mixed=mixed)
    _randomize(m, seed=100 + rank)  # different starting points: the first average is exact
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(width**-0.5)
    for p in m.parameters():
        p.requires_grad_(True)
    sync = TernaryWeightSync(m, error_feedback=error_feedback, group=group)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1000 + rank)
    target = torch.Generator().manual_seed(3)
    w_true = torch.randn(width, 10, generator=target) * width**-0.5
    states, infos, counted, losses, residuals, residual_errors = [], [], [], [], [], []
    for _ in range(rounds):
        for _ in range(h):
            if mixed:  # the layers' dtypes differ: local "steps" are random moves
                with torch.no_grad():
                    for p in m.parameters():
                        p.add_((0.01 * torch.randn(p.shape, generator=g)).to(p.dtype))
                continue
            x = torch.randn(32, width, generator=g)
            loss = ((m(x) - x @ w_true) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        before, weights = sync.state_dict(), _float_params(m)
        with _Counter() as c:
            infos.append(sync.average())
        counted.append(c.bytes)
        states.append(_state_bytes(m))
        after = sync.state_dict()
        residuals.append(b"".join(e.numpy().tobytes() for e in after["residual"]))
        if before["anchor"] is not None and error_feedback:
            residual_errors.append(_residual_error(weights, before, after))
    return {"states": states, "infos": infos, "counted": counted, "losses": losses,
            "stats": sync.stats(), "residuals": residuals, "residual_errors": residual_errors}


def nan_on_one_rank(rank, world, *, method):
    m = _model()
    _randomize(m, seed=1)
    sync = TernaryWeightSync(m)
    if method == "average":
        sync.average()  # exact first round, sets the anchor
    if rank == (0 if method == "broadcast" else world - 1):  # src packs in broadcast()
        with torch.no_grad():
            m[0].weight[0, 0] = float("nan")
    try:
        getattr(sync, method)()
    except ValueError as e:
        return str(e)
    return None


def mismatched_layout(rank, world):
    m = _model(64 if rank == 0 else 32)
    try:
        TernaryWeightSync(m).broadcast()
    except ValueError as e:
        return str(e)
    return None


def resume(rank, world, *, path, resume):
    """Three broadcast rounds; with ``resume``, the third runs on a fresh sync loaded from a
    checkpoint of the first (``torch.load(weights_only=True)``)."""
    m = _model()
    _randomize(m, seed=100 + rank)
    sync = TernaryWeightSync(m)
    sync.broadcast()
    sync.broadcast()
    if resume:
        torch.save(sync.state_dict(), f"{path}.{rank}")
        sync = TernaryWeightSync(m)
        sync.load_state_dict(torch.load(f"{path}.{rank}", weights_only=True))
    info = sync.broadcast()
    return {"state": _state_bytes(m), "info": info}


def mark_synced(rank, world, *, same):
    m = _model()
    _randomize(m, seed=1 if same else rank)
    sync = TernaryWeightSync(m)
    try:
        sync.mark_synced()
    except ValueError as e:
        return str(e)
    sync.average()  # compressed from the first call: the anchor is set
    with _Counter() as c:
        sync.average()
    return {"state": _state_bytes(m), "counted": c.bytes, "stats": sync.stats()}


# ------------------------------------------------------------------------- subgroups (issue 14)


def _outside(rank, group):
    """A rank outside ``group``: a sync built on it refuses every method, and the module is
    left as it was."""
    m = _model()
    _randomize(m, seed=100 + rank)
    before = _state_bytes(m)
    sync = TernaryWeightSync(m, group=group)
    errors = {}
    for method in ("broadcast", "average", "mark_synced"):
        try:
            getattr(sync, method)()
        except ValueError as e:
            errors[method] = str(e)
    return {"outside": True, "errors": errors, "untouched": _state_bytes(m) == before,
            "stats": sync.stats()}


def in_subgroup(rank, world, *, members, job, **kwargs):
    """Every rank makes ``dist.new_group(members)``; the members run ``job`` (a function of
    this module) with their rank in the group as ``rank`` and the group as ``group``; the
    others check that they are refused and left untouched."""
    group = dist.new_group(members)
    try:
        if rank not in members:
            return _outside(rank, group)
        out = globals()[job](members.index(rank), len(members), group=group, **kwargs)
        return {"outside": False, **out}
    finally:
        del group
        gc.collect()  # the syncs holding the group go before destroy_process_group


def src_outside_group(rank, world, *, members, src):
    group = dist.new_group(members)
    try:
        if rank not in members:
            return None
        m = _model()
        _randomize(m, seed=100 + rank)
        before = _state_bytes(m)
        sync = TernaryWeightSync(m, group=group, src=src)
        errors = []
        for method in ("broadcast", "average"):
            try:
                getattr(sync, method)()
            except ValueError as e:
                errors.append(str(e))
        return {"errors": errors, "untouched": _state_bytes(m) == before}
    finally:
        del group
        gc.collect()

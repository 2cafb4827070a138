"""DiLoCo over the compressed exchange: H local steps, then one averaged outer step (issue 18).

Every rank keeps an anchor (the parameters at the last sync) and runs ``sync_every`` (H) steps of
its inner optimizer on its own data, with no exchange at all. Then the pseudo-gradient
``anchor - params`` (float32) is averaged over the ranks and an outer SGD step (Nesterov
momentum) moves the anchor; every rank copies the new anchor into its parameters (DESIGN.md,
"Low-communication training"; Douillard et al., "DiLoCo", arXiv:2311.08105).

The average goes through the two-phase compressed exchange of :mod:`tritter_comm.exchange`
when a :class:`~tritter_comm.VSAConfig` is given, or a plain float32 all-reduce when not. The
exchange keeps client and server error feedback, with **one residual per flat fragment** (not
per parameter tensor): the pseudo-gradient of a fragment is one flat vector, exchanged as one
bucket whose key is the fragment's index, and whose key stream advances with that fragment's
sync count. Every rank decodes the same bytes and runs the same outer step, so the synced
parameters are bit-identical on every rank after every sync.

``fragments=F`` is streaming DiLoCo (Douillard et al., arXiv:2501.18512): the parameters are cut
into F fragments of about equal size along parameter boundaries, and fragment ``k`` syncs after
inner steps ``(k+1) H/F, (k+1) H/F + H, ...``: one fragment every H/F steps, each fragment every
H steps, so the traffic is spread evenly. (The overlap of a fragment's exchange with compute,
the paper's other half, is not done: a sync blocks.)

Usage (a plain module, no DDP wrapper; every rank feeds its own data)::

    model = Net()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = DiLoCo(model, inner, sync_every=30, config=VSAConfig(mode="int2"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, f)   # on the inner optimizer
    for batch in loader:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        sched.step()

Checkpoints are per rank (the local parameters, the inner state and the client residuals differ
between syncs). Resume: build the model, the inner optimizer and ``DiLoCo`` (which broadcasts
rank 0's parameters), then load the rank's ``model.state_dict()`` and ``opt.state_dict()``.

Outer defaults (``outer_lr=1.0, outer_momentum=0.0``: plain averaging of the replicas) come from
measurements on this repository's workloads (benchmarks/diloco.py, docs/USAGE.md "DiLoCo"):
over runs of a few hundred steps the paper's 0.7 / 0.9 Nesterov (tuned for H = 500 over long
runs) was 20+ points worse than plain averaging at H = 10.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..codec import MODES, block_log2
from ..config import VSAConfig
from ..exchange import MAX_BUCKETS, MAX_WORLD, Exchange, Plan, Timers
from ._wrapper import OptimizerWrapper

logger = logging.getLogger(__name__)

__all__ = ["DiLoCo"]

_STATE_VERSION = 1


class _Fragment:
    """One flat float32 fragment of the parameters: its anchor, outer momentum and residuals."""

    __slots__ = ("params", "offsets", "numel", "anchor", "momentum", "residual",
                 "server_residual", "syncs")

    def __init__(self, params: list, device: torch.device):
        self.params = params
        self.offsets = []
        n = 0
        for p in params:
            self.offsets.append((n, n + p.numel()))
            n += p.numel()
        self.numel = n
        self.anchor = torch.zeros(n, dtype=torch.float32, device=device)
        self.momentum: Optional[torch.Tensor] = None  # created at the first sync
        self.residual: Optional[torch.Tensor] = None  # client error feedback (numel)
        self.server_residual: Optional[torch.Tensor] = None  # this rank's chunk only
        self.syncs = 0

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """The fragment's current parameters, flat float32, into ``out``."""
        with torch.no_grad():
            for p, (lo, hi) in zip(self.params, self.offsets):
                out[lo:hi].copy_(p.detach().reshape(-1))
        return out

    def scatter(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, (lo, hi) in zip(self.params, self.offsets):
                p.copy_(flat[lo:hi].view_as(p))


def _int(name: str, v: Any, minimum: int = 1) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _is_sharded(model: torch.nn.Module) -> Optional[str]:
    """Why ``model`` cannot be wrapped (DDP, FSDP, FSDP2), or None."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return ("a DistributedDataParallel model exchanges gradients every step (with or without "
                "a comm hook), which is what DiLoCo removes; pass the plain module "
                "(ddp.module) and drop the DDP wrapper")
    cls = type(model).__name__
    if cls == "FullyShardedDataParallel" or cls.startswith("FSDP"):
        return ("FSDP models are not supported: DiLoCo needs every rank to hold the whole "
                "parameters; pass a plain module")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - older torch
        DTensor = ()  # type: ignore[assignment]
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return ("the model's parameters are DTensors (FSDP2 fully_shard or tensor parallel): "
                "not supported, DiLoCo needs every rank to hold the whole parameters; pass a "
                "plain module")
    return None


class DiLoCo(OptimizerWrapper):
    """An optimizer wrapper that syncs the replicas every ``sync_every`` steps (DiLoCo).

    Args:
        model: a plain ``nn.Module`` (no DDP or FSDP wrapper), the same on every rank.
        inner_optimizer: any ``torch.optim.Optimizer`` over exactly ``model``'s trainable
            parameters; it steps every call and keeps its state across syncs.
        sync_every: H, inner steps between two syncs of each fragment (>= 1).
        outer_lr: the outer SGD learning rate (1.0 with no momentum: plain averaging).
        outer_momentum: the outer momentum (0 to < 1).
        nesterov: Nesterov momentum (as ``torch.optim.SGD``).
        config: a :class:`~tritter_comm.VSAConfig`: the pseudo-gradient goes through the
            compressed two-phase exchange (``mode``, ``phase2_mode``, ``block_size``,
            ``seed``, ``error_feedback``, ``server_error_feedback``, ``fixed_keys``,
            ``min_compress_numel``: a smaller fragment is all-reduced in fp32); ``start_iter``
            does not apply (syncs are rare, and there are no DDP buckets to rebuild) and
            ``auto`` is refused. None: a plain float32 all-reduce.
        fragments: F, streaming DiLoCo: one of F fragments syncs every H/F steps; F must
            divide H.
        process_group: the group to average over (default: the world).

    Raises:
        ValueError: bad options, a wrapped model, an optimizer over other parameters, or ranks
            whose settings or models differ (checked once, in the constructor).
    """

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, *,
                 sync_every: int, outer_lr: float = 1.0, outer_momentum: float = 0.0,
                 nesterov: bool = True, config: Optional[VSAConfig] = None,
                 fragments: int = 1, process_group: Any = None):
        # hyperparameters
        self.sync_every = _int("sync_every", sync_every)
        self.fragments = _int("fragments", fragments)
        if self.sync_every % self.fragments:
            raise ValueError(f"fragments ({fragments}) must divide sync_every ({sync_every}): "
                             f"one fragment syncs every sync_every / fragments steps")
        if not isinstance(outer_lr, (int, float)) or isinstance(outer_lr, bool) \
                or not outer_lr > 0:
            raise ValueError(f"outer_lr must be a positive number, got {outer_lr!r}")
        if not isinstance(outer_momentum, (int, float)) or isinstance(outer_momentum, bool) \
                or not 0 <= outer_momentum < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {outer_momentum!r}")
        if config is not None and not isinstance(config, VSAConfig):
            raise ValueError(f"config must be a VSAConfig or None, got {type(config).__name__}")
        if config is not None and config.auto:
            raise ValueError("config.auto is not supported by DiLoCo (syncs are too rare to "
                             "measure the link); choose compression with config=None or not")
        if not isinstance(inner_optimizer, torch.optim.Optimizer):
            raise ValueError("inner_optimizer must be a torch.optim.Optimizer, got "
                             f"{type(inner_optimizer).__name__}")
        why = _is_sharded(model)
        if why is not None:
            raise ValueError(why)
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        self.nesterov = bool(nesterov)
        self.vsa = config
        self.model = model
        self.optimizer = inner_optimizer
        self.process_group = process_group

        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        owned = {id(p) for g in inner_optimizer.param_groups for p in g["params"]}
        if owned != {id(p) for p in params}:
            raise ValueError("inner_optimizer must optimize exactly the model's trainable "
                             "parameters (build it from model.parameters())")
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError("all parameters must be on one device, found "
                             f"{sorted(map(str, devices))}")
        if not all(p.is_floating_point() for p in params):
            raise ValueError("all trainable parameters must be floating point")
        self._device = devices.pop()
        self.numel = sum(p.numel() for p in params)
        if len(params) < self.fragments:
            raise ValueError(f"fragments ({fragments}) is more than the model's "
                             f"{len(params)} trainable parameter tensors")
        self._frags = [_Fragment(ps, self._device) for ps in self._split(params, self.fragments)]
        if len(self._frags) > MAX_BUCKETS:
            raise ValueError(f"at most {MAX_BUCKETS} fragments")

        # internal state
        self._step = 0  # inner steps taken
        self._bytes_sent = 0
        self._ddp_bytes = 0.0
        self._timers = Timers()
        self._world = self._rank = None
        world, _ = self._rank_world()
        if world > MAX_WORLD:
            raise ValueError(f"tritter-comm supports {MAX_WORLD} ranks")
        if world > 1:
            self._check_agreement()
            self._broadcast_params()
        for f in self._frags:
            f.gather(f.anchor)

    # -- setup -----------------------------------------------------------------------------------

    @staticmethod
    def _split(params: list, k: int) -> list[list]:
        """``k`` contiguous, non-empty groups of parameters of about equal numel."""
        total = sum(p.numel() for p in params)
        groups: list[list] = []
        cur: list = []
        done = 0
        for i, p in enumerate(params):
            later = k - len(groups) - 1  # groups still to fill after the current one
            if cur and later > 0 and (done >= total * (len(groups) + 1) / k
                                      or len(params) - i <= later):
                groups.append(cur)
                cur = []
            cur.append(p)
            done += p.numel()
        groups.append(cur)
        return groups

    def _rank_world(self) -> tuple[int, int]:
        if self._world is None:
            if dist.is_available() and dist.is_initialized():
                self._world = dist.get_world_size(self.process_group)
                self._rank = dist.get_rank(self.process_group)
            else:
                self._world, self._rank = 1, 0
        return self._world, self._rank

    def _settings_row(self) -> list[int]:
        import struct

        def f64(x: float) -> int:
            return struct.unpack("<q", struct.pack("<d", x))[0]

        row = [self.sync_every, self.fragments, f64(self.outer_lr), f64(self.outer_momentum),
               int(self.nesterov), self.numel, *(f.numel for f in self._frags),
               int(self.vsa is not None)]
        if self.vsa is not None:
            row += self.vsa.row()
        return row

    def _check_agreement(self) -> None:
        """Every rank must sync the same fragments with the same exchange: one all_gather."""
        world, _ = self._rank_world()
        row = self._settings_row()
        dev = self._device  # NCCL needs CUDA tensors
        n = torch.tensor([len(row)], dtype=torch.int64, device=dev)
        sizes = torch.empty(world, dtype=torch.int64, device=dev)
        dist.all_gather_into_tensor(sizes, n, group=self.process_group)
        width = int(sizes.max())
        mine = torch.tensor(row + [0] * (width - len(row)), dtype=torch.int64, device=dev)
        rows = torch.empty(world * width, dtype=torch.int64, device=dev)
        dist.all_gather_into_tensor(rows, mine, group=self.process_group)
        rows = rows.view(world, width).tolist()
        if any(r != rows[0] for r in rows) or len(set(sizes.tolist())) != 1:
            raise ValueError(
                "DiLoCo settings differ across ranks (sync_every, fragments, outer_lr, "
                "outer_momentum, nesterov, the model's parameter sizes, config): every rank "
                "must build the same model and pass the same options")

    def _broadcast_params(self) -> None:
        """Start every replica from rank 0's parameters (as DDP does)."""
        src = dist.get_global_rank(self.process_group, 0) if self.process_group is not None else 0
        for f in self._frags:
            buf = f.gather(torch.empty(f.numel, dtype=torch.float32, device=self._device))
            dist.broadcast(buf, src=src, group=self.process_group)
            f.scatter(buf)

    # -- the optimizer interface (param_groups, state, zero_grad: _wrapper.py) -------------

    def __repr__(self) -> str:
        comp = "fp32" if self.vsa is None else self.vsa.describe()
        return (f"DiLoCo(H={self.sync_every}, fragments={self.fragments}, outer_lr="
                f"{self.outer_lr}, outer_momentum={self.outer_momentum}, nesterov="
                f"{self.nesterov}, exchange={comp}, inner={type(self.optimizer).__name__})")

    @property
    def period(self) -> int:
        """Inner steps between two syncs (of consecutive fragments): H / F."""
        return self.sync_every // self.fragments

    def step(self, closure=None):
        """One inner step; after every H/F-th, the sync of the next fragment."""
        out = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self._step += 1
        world, _ = self._rank_world()
        if world > 1:
            self._ddp_bytes += 2 * (world - 1) / world * 4 * self.numel
        if self._step % self.period == 0:
            self.sync((self._step // self.period - 1) % self.fragments)
        return out

    # -- the sync --------------------------------------------------------------------------------

    def sync(self, fragment: int = 0) -> None:
        """Average ``fragment``'s pseudo-gradient over the ranks and step its anchor; the
        fragment's parameters become the new anchor on every rank. ``step`` calls this; call it
        directly only on every rank at once."""
        f = self._frags[fragment]
        world, rank = self._rank_world()
        g = f.gather(torch.empty(f.numel, dtype=torch.float32, device=self._device))
        torch.sub(f.anchor, g, out=g)  # pseudo-gradient: anchor - params
        if world > 1:
            self._average(f, fragment, g, world, rank)
        self._outer_step(f, g)
        f.syncs += 1
        f.scatter(f.anchor)

    def _average(self, f: _Fragment, key: int, g: torch.Tensor, world: int, rank: int) -> None:
        cfg = self.vsa
        if cfg is None or f.numel < cfg.min_compress_numel:
            dist.all_reduce(g, group=self.process_group)
            g /= world
            self._bytes_sent += int(2 * (world - 1) * 4 * f.numel / world)
            return
        plan = Plan.make(f.numel, world, block_log2(cfg.block_size), MODES[cfg.mode],
                         MODES[cfg.phase2])
        ex = Exchange(plan, rank=rank, group=self.process_group, seed=cfg.seed, step=f.syncs,
                      key=key, timers=self._timers, fixed_keys=cfg.fixed_keys)
        if cfg.error_feedback and f.residual is None:
            f.residual = torch.zeros(f.numel, dtype=torch.float32, device=self._device)
        lo, hi = plan.bounds(rank)
        if cfg.server_error_feedback and hi > lo and f.server_residual is None:
            f.server_residual = torch.zeros(hi - lo, dtype=torch.float32, device=self._device)
        ex.start(g, f.residual if cfg.error_feedback else None)
        ex.reduce(f.server_residual if cfg.server_error_feedback and hi > lo else None)
        ex.finish(g)
        self._bytes_sent += plan.wire_bytes

    def _outer_step(self, f: _Fragment, g: torch.Tensor) -> None:
        """SGD with (Nesterov) momentum on the anchor, as ``torch.optim.SGD`` computes it."""
        if self.outer_momentum:
            if f.momentum is None:
                f.momentum = g.clone()
            else:
                f.momentum.mul_(self.outer_momentum).add_(g)
            d = g.add(f.momentum, alpha=self.outer_momentum) if self.nesterov else f.momentum
        else:
            d = g
        f.anchor.add_(d, alpha=-self.outer_lr)

    # -- reporting and checkpoints ---------------------------------------------------------------

    def stats(self) -> dict:
        """``bytes_sent``: this rank's bytes on the wire over the run; ``ddp_bytes``: what DDP's
        fp32 ring all-reduce would have sent over the same steps (``2 (N-1)/N * 4 * params``
        a step); ``ratio``: their quotient."""
        return {
            "steps": self._step,
            "syncs": sum(f.syncs for f in self._frags),
            "bytes_sent": self._bytes_sent,
            "ddp_bytes": int(self._ddp_bytes),
            "ratio": self._ddp_bytes / self._bytes_sent if self._bytes_sent else None,
            "encode_seconds": self._timers.encode_seconds,
            "decode_seconds": self._timers.decode_seconds,
        }

    def config(self) -> dict:
        return {
            "sync_every": self.sync_every,
            "fragments": self.fragments,
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "nesterov": self.nesterov,
            "vsa": None if self.vsa is None else self.vsa.to_dict(),
            "fragment_numels": [f.numel for f in self._frags],
        }

    def state_dict(self) -> dict:
        """This rank's state: the inner optimizer's, the anchors, outer momenta, residuals and
        counters (loadable with ``torch.load(weights_only=True)``). Save the model's
        ``state_dict()`` beside it: between syncs each rank's parameters are its own."""

        def cpu(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.detach().cpu().clone()

        return {
            "version": _STATE_VERSION,
            "config": self.config(),
            "optimizer": self.optimizer.state_dict(),
            "step": self._step,
            "bytes_sent": self._bytes_sent,
            "ddp_bytes": self._ddp_bytes,
            "fragments": [{"anchor": cpu(f.anchor), "momentum": cpu(f.momentum),
                           "residual": cpu(f.residual), "server_residual": cpu(f.server_residual),
                           "syncs": f.syncs} for f in self._frags],
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_saved(state, _STATE_VERSION)

        def dev(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(self._device, torch.float32).clone()

        for f, s in zip(self._frags, state["fragments"]):
            f.anchor = dev(s["anchor"])
            f.momentum = dev(s["momentum"])
            f.residual = dev(s["residual"])
            f.server_residual = dev(s["server_residual"])
            f.syncs = int(s["syncs"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._step = int(state["step"])
        self._bytes_sent = int(state["bytes_sent"])
        self._ddp_bytes = float(state["ddp_bytes"])

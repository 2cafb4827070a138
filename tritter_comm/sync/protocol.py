"""``TernaryWeightSync``: a module's weights sent as packed-ternary deltas over a process group
(broadcast from one rank, or averaged over all), with error feedback."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .format import (
    _DTYPES,
    _MAX_NDIM,
    _check_group_size,
    _check_rule,
    _codes_len,
    _group_of,
    _ngroups,
)
from .pack import _pack_into, _unpack_into

__all__ = ["TernaryWeightSync"]

logger = logging.getLogger(__name__)


class _Ranks(NamedTuple):
    """Where this process stands in the sync's group, at one call."""

    rank: int  # this process's rank in the group (the all_gather's order)
    world: int  # the group's size
    src: int  # the sender, a global rank (what torch.distributed.broadcast takes)
    is_src: bool  # this process is src


@dataclasses.dataclass
class _Slot:
    """One float parameter: where its scales and codes sit in the body."""

    name: str
    param: Tensor
    n: int
    group: int
    s0: int  # first scale (index into the f32 scales)
    ns: int
    c0: int  # first code byte (offset into the codes region)
    nc: int


class TernaryWeightSync:
    """Send a module's weights as packed-ternary deltas over a process group.

    Args:
        module: the model (its parameters and buffers are synced in place).
        group: process group (default: the world). Every rank of it must call the same
            methods in the same order; ranks outside it must not call them (``ValueError``).
            :meth:`average` orders ranks and residuals by their rank in the group.
        src: the rank that sends in :meth:`broadcast` and whose non-float buffers
            :meth:`average` keeps. A global rank, as in ``torch.distributed.broadcast``, and
            one of the group's; ``None`` (the default) is the group's first rank (group rank
            0), which is global rank 0 for the world.
        error_feedback: :meth:`broadcast` sends the difference to what the receivers hold, so
            what one round drops goes out in the next; without it, it sends the change of the
            sender's weights since the last round, and errors stay. :meth:`average` carries
            each rank's quantization residual into its next delta.
        group_size: ``None`` for one scale per row, else elements per group.
        rule: how deltas are quantized (see :func:`pack_ternary`); ``"adaptive"`` (the
            default) converges geometrically under error feedback, ``"absmean"`` stalls.

    Receivers of :meth:`broadcast` hold the replica: their float parameters are overwritten
    (zeros plus the first delta in the first round). Bytes are counted in :meth:`stats`.
    """

    __slots__ = (
        # hyperparameters
        "module", "group", "src", "error_feedback", "group_size", "rule", "_adaptive",
        # internal state
        "_slots", "_other", "_scales_len", "_codes_len", "_replica",
        "_last", "_anchor", "_residual", "_stats", "_checked",
    )

    def __init__(
        self,
        module: nn.Module,
        *,
        group: Optional[Any] = None,
        src: Optional[int] = None,
        error_feedback: bool = True,
        group_size: Optional[int] = None,
        rule: str = "adaptive",
    ):
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if src is not None and (not isinstance(src, int) or isinstance(src, bool) or src < 0):
            raise ValueError(
                f"src must be None (the group's first rank) or a non-negative int (a global "
                f"rank), got {src!r}"
            )
        _check_group_size(group_size)
        self.module = module
        self.group = group
        self.src = src
        self.error_feedback = bool(error_feedback)
        self.group_size = group_size
        self._adaptive = _check_rule(rule)
        self.rule = rule
        slots: List[_Slot] = []
        other: List[Tuple[str, Tensor]] = []
        s0 = c0 = 0
        for name, p in module.named_parameters():
            if p.dtype in _DTYPES and p.numel() > 0:
                if p.dim() > _MAX_NDIM:
                    raise ValueError(f"parameter {name} has more than {_MAX_NDIM} dimensions")
                g = _group_of(tuple(p.shape), group_size)
                ns, nc = _ngroups(p.numel(), g), _codes_len(p.numel(), g)
                slots.append(_Slot(name, p, p.numel(), g, s0, ns, c0, nc))
                s0, c0 = s0 + ns, c0 + nc
            else:
                other.append((name, p))  # non-float parameters go across exactly
        for name, b in module.named_buffers():
            if b.numel() > 0:
                other.append((name, b))
        self._slots = slots
        self._other = other
        self._scales_len = s0
        self._codes_len = c0
        self._replica: Optional[List[Tensor]] = None
        self._last: Optional[List[Tensor]] = None
        self._anchor: Optional[List[Tensor]] = None
        self._residual: Optional[List[Tensor]] = None
        self._checked = False
        self._stats: Dict[str, Any] = {
            "broadcasts": 0, "averages": 0, "bytes_sent": 0, "exact_bytes": 0,
            "fp32_bytes": 0,
        }

    # -------------------------------------------------------------------------- helpers

    def _world(self) -> _Ranks:
        """This process's rank in the group, the group's size and ``src`` as a global rank;
        ``ValueError`` (before anything changes) on a process outside the group or a ``src``
        outside it."""
        if not (dist.is_available() and dist.is_initialized()):
            if self.src not in (None, 0):
                raise ValueError(
                    f"src={self.src}, but there is no process group: this process is the only "
                    "rank, 0"
                )
            return _Ranks(0, 1, 0, True)
        rank = dist.get_rank(self.group)  # -1 outside the group
        if rank < 0:
            raise ValueError(
                f"global rank {dist.get_rank()} is not in the process group of this "
                "TernaryWeightSync; only the group's ranks may call broadcast(), average() "
                "or mark_synced()"
            )
        ranks = dist.get_process_group_ranks(
            self.group if self.group is not None else dist.group.WORLD)
        src = ranks[0] if self.src is None else self.src
        if src not in ranks:
            shown = ranks if len(ranks) <= 16 else f"{len(ranks)} ranks from {min(ranks)}"
            raise ValueError(
                f"src={src} is not in the sync's process group (global ranks {shown}); src is "
                "a global rank, as in torch.distributed.broadcast"
            )
        return _Ranks(rank, len(ranks), src, ranks[rank] == src)

    @property
    def body_nbytes(self) -> int:
        """Bytes of one packed round: all float parameters' scales and codes."""
        return 4 * self._scales_len + self._codes_len

    @property
    def fp32_nbytes(self) -> int:
        """Bytes of the same float parameters as fp32 (what a plain broadcast sends)."""
        return 4 * sum(s.n for s in self._slots)

    def _device(self) -> torch.device:
        return self._slots[0].param.device if self._slots else torch.device("cpu")

    def _new_body(self) -> Tensor:
        return torch.empty(self.body_nbytes, dtype=torch.uint8, device=self._device())

    def _views(self, body: Tensor, s: _Slot) -> Tuple[Tensor, Tensor]:
        scales = body[: 4 * self._scales_len].view(torch.float32)
        codes = body[4 * self._scales_len :]
        return scales[s.s0 : s.s0 + s.ns], codes[s.c0 : s.c0 + s.nc]

    def _layout_digest(self, src: int) -> int:
        h = hashlib.sha256()
        for s in self._slots:
            h.update(f"{s.name}:{tuple(s.param.shape)}:{s.param.dtype}:{s.group};".encode())
        h.update(f"rule={self.rule};ef={self.error_feedback};src={src}".encode())
        for name, t in self._other:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        return int.from_bytes(h.digest()[:7], "little")

    def _agree(self, status: int, src: int) -> None:
        """One small all-reduce: every rank learns whether any rank failed to pack, and (the
        first time) whether all ranks have the same parameter layout. Keeps a failure on one
        rank from hanging the others in the next collective."""
        first = not self._checked
        digest = self._layout_digest(src) if first else 0
        t = torch.tensor([status, digest, -digest], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        self._stats["exact_bytes"] += t.numel() * 8
        if int(t[0]) != 0:
            raise ValueError(
                "a rank could not pack its weights (NaN or Inf?); nothing was changed"
            )
        if first:
            if int(t[1]) != digest or int(t[2]) != -digest:
                raise ValueError(
                    "ranks have different parameters or buffers (names, shapes, dtypes or "
                    "group_size) or options (rule, error_feedback, src): build the same module "
                    "and sync on every rank"
                )
            self._checked = True

    def _sync_other_broadcast(self, src: int) -> None:
        for _, t in self._other:
            dist.broadcast(t.data, src=src, group=self.group)
            self._stats["exact_bytes"] += t.numel() * t.element_size()

    def _exact_mean(self, t: torch.Tensor, world: int) -> torch.Tensor:
        """The mean of ``t`` over the ranks in float64, summed in rank order (identical
        everywhere), in ``t``'s dtype."""
        got = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(got, t.contiguous(), group=self.group)
        acc = got[0].double()
        for g in got[1:]:
            acc += g.double()
        return (acc / world).to(t.dtype)

    def _pack_body(self, body: torch.Tensor, deltas, world: int, src: int) -> None:
        """Pack ``deltas`` (flat float32, one per slot, in slot order; empty on a rank that
        sends nothing) into ``body``, then agree with the other ranks that every one could: a
        NaN or Inf anywhere raises ``ValueError`` on every rank, before any collective that
        would hang."""
        status = 0
        try:
            for s, d in zip(self._slots, deltas):
                sc, cd = self._views(body, s)
                _pack_into(d, s.group, sc, cd, self._adaptive)
        except ValueError:
            if world == 1:
                raise
            status = 1
        if world > 1:
            self._agree(status, src)

    def _sync_other_average(self, world: int, src: int) -> None:
        """Float buffers: the exact mean, summed in rank order (identical everywhere);
        others: ``src``'s value (``src`` a global rank)."""
        for _, t in self._other:
            if t.dtype.is_floating_point:
                t.data.copy_(self._exact_mean(t.data, world))
            else:
                dist.broadcast(t.data, src=src, group=self.group)
            self._stats["exact_bytes"] += t.numel() * t.element_size()

    # ------------------------------------------------------------------------ broadcast

    @torch.no_grad()
    def broadcast(self) -> Dict[str, Any]:
        """One round from ``src`` to the other ranks; returns this round's numbers.

        Collectives: one all-reduce of 3 int64 (status), one broadcast of the packed body, one
        broadcast per buffer or non-float parameter.
        """
        where = self._world()
        world = where.world
        if self._replica is None:
            self._replica = [torch.zeros_like(s.param) for s in self._slots]
            if not self.error_feedback:
                self._last = [torch.zeros_like(s.param) for s in self._slots]
        body = self._new_body()
        sending = where.is_src
        refs = self._replica if self.error_feedback else self._last
        outgoing = ((s.param.float() - ref.float()).reshape(-1)
                    for s, ref in zip(self._slots, refs)) if sending else ()
        self._pack_body(body, outgoing, world, where.src)
        if world > 1:
            dist.broadcast(body, src=where.src, group=self.group)
        deltas = []
        for i, s in enumerate(self._slots):
            sc, cd = self._views(body, s)
            d = torch.empty(s.n, dtype=torch.float32, device=body.device)
            _unpack_into(sc, cd, s.group, d)
            deltas.append(d)
        max_dev = 0.0
        for i, s in enumerate(self._slots):
            new = (self._replica[i].float() + deltas[i].view(s.param.shape)).to(s.param.dtype)
            self._replica[i].copy_(new)
            if sending:
                if not self.error_feedback:
                    self._last[i].copy_(s.param)
                max_dev = max(max_dev, float((s.param.float() - new.float()).abs().max()))
            else:
                s.param.copy_(new)
        if world > 1:
            self._sync_other_broadcast(where.src)
        self._stats["broadcasts"] += 1
        if sending and world > 1:
            self._stats["bytes_sent"] += self.body_nbytes
        self._stats["fp32_bytes"] += self.fp32_nbytes
        out = {"body_nbytes": self.body_nbytes, "fp32_nbytes": self.fp32_nbytes}
        if sending:
            out["max_deviation"] = max_dev  # max |w - replica| after this round
        return out

    # -------------------------------------------------------------------------- average

    @torch.no_grad()
    def average(self) -> Dict[str, Any]:
        """Average the module over the ranks (local SGD's outer step); all end identical.

        Each rank packs ``w - anchor`` (plus its residual with error feedback); the packed
        bodies are all-gathered, decoded and averaged in the order of the ranks in the group;
        the new weights are ``anchor + mean delta``, and they become the anchor. The first call
        has no anchor and averages the exact weights.
        """
        where = self._world()
        rank, world = where.rank, where.world  # rank in the group: its index in the gather
        if self._anchor is None or world == 1:  # one rank: its weights are the average
            return self._average_exact(world, where.src)
        body = self._new_body()
        own = [(s.param.float() - a.float()).reshape(-1)
               for s, a in zip(self._slots, self._anchor)]
        if self.error_feedback:
            for d, e in zip(own, self._residual):
                d += e
        self._pack_body(body, own, world, where.src)
        if world > 1:
            bodies = [torch.empty_like(body) for _ in range(world)]
            dist.all_gather(bodies, body, group=self.group)
        else:
            bodies = [body]
        for i, s in enumerate(self._slots):
            acc = torch.zeros(s.n, dtype=torch.float32, device=body.device)
            d = torch.empty(s.n, dtype=torch.float32, device=body.device)
            for r, b in enumerate(bodies):
                sc, cd = self._views(b, s)
                _unpack_into(sc, cd, s.group, d)
                acc += d
                if r == rank and self.error_feedback:
                    self._residual[i].copy_(own[i] - d)
            new = (self._anchor[i].float() + (acc / world).view(s.param.shape)).to(s.param.dtype)
            s.param.copy_(new)
            self._anchor[i].copy_(new)
        if world > 1:
            self._sync_other_average(world, where.src)
            self._stats["bytes_sent"] += self.body_nbytes
        self._stats["averages"] += 1
        self._stats["fp32_bytes"] += self.fp32_nbytes
        return {"body_nbytes": self.body_nbytes, "fp32_nbytes": self.fp32_nbytes,
                "exact": False}

    def _average_exact(self, world: int, src: int) -> Dict[str, Any]:
        if world > 1:
            self._agree(0, src)
            for s in self._slots:
                s.param.copy_(self._exact_mean(s.param.data, world))
                self._stats["exact_bytes"] += s.n * s.param.element_size()
            self._sync_other_average(world, src)
        self._anchor = [s.param.detach().clone() for s in self._slots]
        if self._residual is None:
            self._residual = [torch.zeros(s.n, dtype=torch.float32, device=s.param.device)
                              for s in self._slots]
        self._stats["averages"] += 1
        return {"body_nbytes": 0, "fp32_nbytes": self.fp32_nbytes, "exact": True}

    @torch.no_grad()
    def mark_synced(self) -> None:
        """Declare the float parameters identical on every rank now (same seed, a loaded
        checkpoint, DDP's initial broadcast): they become the anchor of :meth:`average` and
        the replica of :meth:`broadcast`, so no exact first round is needed. One small
        all-reduce checks a digest of the weights; ranks that differ raise ``ValueError``.
        """
        world = self._world().world
        if world > 1:
            h = hashlib.sha256()
            for sl in self._slots:
                h.update(sl.param.detach().contiguous().view(-1).view(torch.uint8).cpu()
                         .numpy().tobytes())
            d = int.from_bytes(h.digest()[:7], "little")
            t = torch.tensor([d, -d], dtype=torch.int64, device=self._device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            self._stats["exact_bytes"] += 16
            if int(t[0]) != d or int(t[1]) != -d:
                raise ValueError("mark_synced: the ranks' weights differ; use average() or "
                                 "broadcast() to make them equal first")
        self._anchor = [sl.param.detach().clone() for sl in self._slots]
        self._replica = [sl.param.detach().clone() for sl in self._slots]
        if not self.error_feedback:
            self._last = [sl.param.detach().clone() for sl in self._slots]
        self._residual = [torch.zeros(sl.n, dtype=torch.float32, device=sl.param.device)
                          for sl in self._slots]

    # ------------------------------------------------------------------------ state

    def stats(self) -> Dict[str, Any]:
        """Rounds and bytes so far. ``bytes_sent``: packed bodies this rank handed to a
        collective as a sender; ``exact_bytes``: buffers, non-float tensors, control
        tensors and exact first averages; ``fp32_bytes``: what the same rounds would send as
        an fp32 broadcast of the float parameters."""
        st = dict(self._stats)
        st["body_nbytes"] = self.body_nbytes
        st["float_params"] = sum(s.n for s in self._slots)
        return st

    def state_dict(self) -> Dict[str, Any]:
        """Replica, anchor and residuals: tensors and ints only, so ``torch.load(...,
        weights_only=True)`` reads a checkpoint of it."""
        def lst(x):
            return None if x is None else [t.detach().clone() for t in x]

        return {
            "version": 1,
            "replica": lst(self._replica),
            "last": lst(self._last),
            "anchor": lst(self._anchor),
            "residual": lst(self._residual),
            "stats": {k: int(v) for k, v in self._stats.items()},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a TernaryWeightSync state_dict (version 1)")

        def lst(key, like):
            x = state.get(key)
            if x is None:
                return None
            if not isinstance(x, list) or len(x) != len(self._slots):
                raise ValueError(f"state_dict[{key!r}] does not match this module")
            out = []
            for t, s in zip(x, self._slots):
                want = like(s)
                if not isinstance(t, Tensor) or t.shape != want.shape or t.dtype != want.dtype:
                    raise ValueError(
                        f"state_dict[{key!r}] entry for {s.name} does not match this module"
                    )
                out.append(t.detach().clone().to(want.device))
            return out

        param_like = lambda s: s.param  # noqa: E731
        flat_like = lambda s: torch.empty(s.n, dtype=torch.float32)  # noqa: E731
        self._replica = lst("replica", param_like)
        self._last = lst("last", param_like)
        self._anchor = lst("anchor", param_like)
        self._residual = lst("residual", flat_like)
        for k, v in state.get("stats", {}).items():
            if k in self._stats:
                self._stats[k] = int(v)

    def __getstate__(self):
        raise TypeError("TernaryWeightSync holds a process group; save state_dict() instead")

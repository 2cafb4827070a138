"""``VSAState``: the state every hook shares (DDP, FSDP1, FSDP2).

The configuration (a :class:`~tritter_comm.VSAConfig`), the check that every rank agrees on it,
the error-feedback residuals, the exchanges in flight and their release, statistics, and the
state dict that checkpoints carry.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import _teardown, residual as _res
from ..codec import FORMAT_VERSION, PACKAGE_VERSION
from ..config import VSAConfig, field_names
from ..exchange import Timers
from .. import node_exchange
from . import _auto

logger = logging.getLogger(__name__)

__all__ = ["INT2_FSDP_MAX_WORLD", "INT4_FSDP_MAX_WORLD", "RELEASE_TIMEOUT", "VSAState"]

_STATE_VERSION = 1

#: The most ranks at which the FSDP hooks' ``"auto"`` residuals are int4 (``residual_budget=1``).
#: int4 takes 0.5 + 4/64 = 0.5625 bytes an element of a unit's full gradient and the rank's fp32
#: gradient shard 4 / world, so it fits in the shard up to 7 ranks (0.98x there, 1.13x at 8).
INT4_FSDP_MAX_WORLD = int(4 / _res.bytes_per_element("int4"))
#: The most ranks at which they are int2: 0.25 + 4/64 = 0.3125 bytes an element, in the shard up
#: to 12 ranks (0.63x at 8, 0.94x at 12, 1.02x at 13). From 13 on they are ``int2-topk``: int2 on
#: the blocks of most energy, as many as fit in the shard (about 82% at 13 ranks, 17% at 64).
INT2_FSDP_MAX_WORLD = int(4 / _res.bytes_per_element("int2"))
_CONFIG_ROW_LEN = 32

#: Seconds ``close()`` (and a failing step) waits for a collective in flight before it lets go.
RELEASE_TIMEOUT = 10.0


def _version_number() -> int:
    """tritter-comm's version as one integer (1.2.3 -> 1002003), compared across ranks."""
    parts = (PACKAGE_VERSION.split("+")[0].split(".") + ["0", "0"])[:3]
    return sum(int("".join(c for c in p if c.isdigit()) or 0) * 1000**i
               for i, p in enumerate(reversed(parts)))


class VSAState:
    """State of the hooks (DDP's :func:`~tritter_comm.vsa_hook`, FSDP1's and FSDP2's
    reduce-scatter): the configuration, error-feedback residuals, exchanges in flight and
    statistics.

    ``VSAState(process_group=None, config=None, **options)``: ``config`` is a
    :class:`~tritter_comm.VSAConfig` (default: the defaults), and keyword ``options`` (any of its
    fields, e.g. ``mode="ternary"``) override it. The options and the measurements behind their
    defaults are listed in docs/USAGE.md and the README ("Measured"). Every option is readable
    as an attribute (``state.mode``); ``state.config`` is the whole configuration.

    Args:
        process_group: the group to reduce over (default: the default group; FSDP2 reduces
            over the group FSDP hands its reduce-scatter).
        config: the options; None for the defaults.
        options: fields of :class:`~tritter_comm.VSAConfig` overriding ``config``.
    """

    __slots__ = (
        # hyperparameters
        "process_group",
        "config",
        # flags
        "_config_checked",
        "_force_exchange",
        "_use_side_stream",
        # internal state
        "iter",
        "residuals",
        "server_residuals",
        "_pending",
        "_calls",
        "_timers",
        "_bytes_sent",
        "_bytes_uncompressed",
        "_bytes_intra",  # of _bytes_sent, those sent inside the node (node_exchange.py)
        "_nodes",  # id(process group) -> node_exchange.Topology (its groups, made once)
        "_steps",
        "_buckets_compressed",
        "_buckets_plain",
        "_layout",
        "_saved_layout",
        "_param_ids",
        "_auto",
        "_fsdp",
        "_side_streams",
        "__weakref__",  # tritter_comm.shutdown() and the exit handler track states weakly
    )

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None,
                 config: Optional[VSAConfig] = None, **options: Any):
        if config is None:
            config = VSAConfig()
        elif not isinstance(config, VSAConfig):
            raise TypeError(f"config must be a tritter_comm.VSAConfig, got "
                            f"{type(config).__name__} (keyword options go as keywords)")
        if options.get("block_size", 0) is None:  # None meant the default block size
            del options["block_size"]
        self.process_group = process_group
        self.config = config.replace(**options) if options else config
        if (self.config.intra_node_size is not None and process_group is None
                and dist.is_available() and dist.is_initialized()):
            node_exchange.check(self.config.intra_node_size, dist.get_world_size())  # early
        self._auto = _auto.AutoChoice() if self.config.auto else None
        # the groups whose ranks were found to agree on the configuration (by id)
        self._config_checked: set[Optional[int]] = set()
        # For tests only: run the exchange through its collectives at world size 1 too (one
        # GPU allows no more NCCL ranks), where the hook otherwise returns the bucket as it is.
        # TRITTER_COMM_FORCE_EXCHANGE=1, or set the attribute. Not an option: it changes
        # nothing a user wants.
        self._force_exchange = os.environ.get("TRITTER_COMM_FORCE_EXCHANGE") == "1"
        # CUDA buckets: the DDP hook's codec work and collectives on a side stream of its own
        # (hooks/ddp.py, "Streams"), so that they overlap the backward pass. On unless
        # TRITTER_COMM_SIDE_STREAM=0 (or the attribute is set before the first step): on an
        # H200 it gave the same bits as the current stream, through NCCL and on two gloo ranks,
        # with no host sync (tests/test_cuda.py).
        self._use_side_stream = os.environ.get("TRITTER_COMM_SIDE_STREAM", "1") != "0"
        self.iter = 0
        self.residuals: dict[int, torch.Tensor] = {}
        self.server_residuals: dict[int, torch.Tensor] = {}
        # exchanges in flight (DDP: hooks/ddp.py), oldest first, and hook calls this iteration
        self._pending: list = []
        self._calls = 0
        self._timers = Timers()
        self._bytes_sent = 0
        self._bytes_uncompressed = 0
        self._bytes_intra = 0
        self._nodes: dict = {}
        self._steps = 0
        self._buckets_compressed = 0
        self._buckets_plain = 0
        # Bucket index -> ids of its parameters, to map residuals onto DDP's initial buckets
        # when a job resumes. A parameter's id is its position in the order DDP's buckets
        # first list the parameters in a process: the same in every process of the same job.
        self._layout: dict[int, tuple[int, ...]] = {}
        self._saved_layout: Optional[dict[int, tuple[int, ...]]] = None
        self._param_ids: dict[int, int] = {}
        # The FSDP hooks' per-backward bookkeeping (hooks/fsdp.py): None until used.
        self._fsdp = None
        self._side_streams: dict = {}  # CUDA device index -> the DDP hook's side stream
        _teardown.track(self)

    @property
    def phase2_mode(self) -> str:
        """The mode of phase 2 (``config.phase2_mode``, else ``mode``)."""
        return self.config.phase2

    # -- configuration -----------------------------------------------------------------------

    def _config_row(self, world: int = 1, group: Any = None) -> list[int]:
        # intra_node_size as resolved on this rank (LOCAL_WORLD_SIZE may differ between nodes)
        size = node_exchange.node_size(self.config.intra_node_size, world, group)
        row = [FORMAT_VERSION, _version_number(), *self.config.replace(intra_node_size=size).row()]
        # A fixed length, so that versions with more fields still gather rows of one size and
        # fail with the message below (package_version differs), not in the collective.
        return row + [0] * (_CONFIG_ROW_LEN - len(row))

    def _check_config(self, device: torch.device, group: Any = None) -> None:
        """All ranks of ``group`` compare their configuration, once per group, before the
        first exchange branches on it; a difference raises ``ValueError`` on every rank."""
        gid = None if group is None else id(group)
        if gid in self._config_checked:
            return
        world = dist.get_world_size(group)
        mine = torch.tensor(self._config_row(world, group), dtype=torch.int64, device=device)
        rows = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(rows, mine, group=group)
        values = [{"format_version": row[0], "package_version": row[1],
                   **VSAConfig.read_row(row[2:])} for row in rows.view(world, -1).cpu().tolist()]
        diffs = [
            f"{name}: " + ", ".join(f"rank {r}={v[name]!r}" for r, v in enumerate(values))
            for name in values[0]
            if len({v[name] for v in values}) > 1
        ]
        if diffs:
            raise ValueError(
                "tritter-comm: ranks were configured differently; every rank must create "
                "VSAState with the same settings and the same tritter-comm version. Differences: "
                + "; ".join(diffs)
            )
        # the same value on every rank now: a bad one raises on every rank alike
        node_exchange.check(node_exchange.node_size(self.config.intra_node_size, world, group),
                            world)
        self._config_checked.add(gid)

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Let go of every exchange in flight: wait a bounded time for its collectives, fail
        its future, drop its buffers. Idempotent; the state stays usable (a later step starts
        afresh). ``tritter_comm.shutdown()`` calls it for every state in the process."""
        self._release(None)

    def _release(self, error: Optional[BaseException]) -> None:
        pending, self._pending = self._pending, []
        for entry in pending:
            for op in entry.ops:
                op.release(RELEASE_TIMEOUT)
            if not entry.fut.done():
                entry.fut.set_exception(
                    error if isinstance(error, Exception)
                    else RuntimeError("tritter-comm: the hook state was closed with this "
                                      "bucket's exchange in flight"))
        self._calls = 0

    # -- statistics and checkpoints ----------------------------------------------------------

    def stats(self) -> dict:
        """Counters since creation (or the last ``load_state_dict``), per rank.

        ``bytes_sent``: bytes this rank handed to collectives for other ranks (ring formula
        for all-reduce); ``bytes_uncompressed``: what fp32 ring all-reduce of the same buckets
        would send. ``bytes_sent_inter_node`` and ``bytes_sent_intra_node`` split
        ``bytes_sent`` by link (``intra_node_size``; a plain all-reduce by the ring formula, in
        which one link a node leaves it); with one rank a node every byte is inter-node.
        ``state_bytes``: the memory of the hook state on this rank now, every client and
        server residual byte however stored (``residual_dtype``).
        """
        return {
            "steps": self._steps,
            "iter": self.iter,
            "bytes_sent": self._bytes_sent,
            "bytes_uncompressed": self._bytes_uncompressed,
            "bytes_sent_inter_node": self._bytes_sent - self._bytes_intra,
            "bytes_sent_intra_node": self._bytes_intra,
            "compression_ratio": (self._bytes_uncompressed / self._bytes_sent
                                  if self._bytes_sent else 1.0),
            "buckets_compressed": self._buckets_compressed,
            "buckets_uncompressed": self._buckets_plain,
            "encode_seconds": self._timers.encode_seconds,
            "decode_seconds": self._timers.decode_seconds,
            "state_bytes": self.state_bytes(),
            **(_auto.stats(self) if self.config.auto else {}),
        }

    def state_bytes(self) -> int:
        """Bytes of residuals this rank holds (client and server, however stored)."""
        return sum(_res.nbytes(r) for store in (self.residuals, self.server_residuals)
                   for r in store.values())

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return -1, -1

    def state_dict(self) -> dict:
        """Everything needed to resume exactly; loadable with ``torch.load(weights_only=True)``.

        Residuals differ from rank to rank: every rank saves its own state dict (e.g. to
        ``hook_state_rank{rank}.pt``) and loads it back on the same rank.
        """
        rank, world = self._rank_world()
        return {
            "version": _STATE_VERSION,
            "rank": rank,
            "world_size": world,
            "config": self.config.to_dict(),
            "iter": self.iter,
            # a tensor, or (residual_dtype int8/int4/int2) a dict of codes and scales
            "residuals": {k: _res.to_state(v) for k, v in self.residuals.items()},
            "server_residuals": {k: _res.to_state(v) for k, v in self.server_residuals.items()},
            "layout": {k: list(v) for k, v in self._layout.items()},
            "auto": self._auto.state_dict() if self.config.auto else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"not a VSAState state dict of version {_STATE_VERSION}: "
                f"got version {state.get('version') if isinstance(state, dict) else state!r}"
            )
        # checkpoints from before `auto` and `residual_dtype` existed
        saved = {"auto": False, "residual_dtype": "float32", "intra_node_size": None,
                 **state["config"]}
        saved.setdefault("phase2_mode", saved.get("mode"))  # one mode for both phases then
        # residual_dtype and residual_budget may differ: the saved residuals are converted at
        # their next use
        diff = {k: (v, saved.get(k)) for k, v in self.config.to_dict().items()
                if saved.get(k) != v and k not in ("residual_dtype", "residual_budget")}
        if diff:
            raise ValueError(
                "checkpoint was saved with a different configuration "
                + ", ".join(f"{k}: this state {a!r}, checkpoint {b!r}" for k, (a, b) in diff.items())
            )
        rank, world = self._rank_world()
        if rank >= 0 and state.get("rank", -1) >= 0 and (state["rank"], state["world_size"]) != (
            rank, world
        ):
            raise ValueError(
                f"this hook state was saved by rank {state['rank']} of {state['world_size']}, "
                f"and is being loaded on rank {rank} of {world}: residuals are per rank, so "
                "every rank must save and load its own state dict"
            )
        self.iter = int(state["iter"])
        self.residuals = {int(k): _res.from_state(v) for k, v in state["residuals"].items()}
        self.server_residuals = {int(k): _res.from_state(v)
                                 for k, v in state["server_residuals"].items()}
        self._layout = {int(k): tuple(int(n) for n in v) for k, v in state["layout"].items()}
        # DDP starts a new process with its initial buckets and rebuilds them after the first
        # iteration; until then, buckets are split along the saved layout (see _segments).
        self._saved_layout = dict(self._layout)
        self._release(None)
        if self.config.auto:
            self._auto.load_state_dict(state.get("auto"))
        self._fsdp = None

    def __getstate__(self):
        # The process group cannot be pickled; the unpickled state uses the default group.
        return {"config": self.config.to_dict(), "state": self.state_dict()}

    def __setstate__(self, d):
        self.__init__(None, **d["config"])
        self.load_state_dict(d["state"])

    # -- residuals ---------------------------------------------------------------------------

    def residual_format(self, fsdp: bool = False, world: Optional[int] = None) -> str:
        """The format residuals are stored in: ``residual_dtype``, with ``"auto"`` resolved.
        For the FSDP hooks (``fsdp=True``) over ``world`` ranks, the widest form whose bytes fit
        in ``residual_budget`` times the rank's fp32 gradient shard: ``"int4"`` (up to
        ``INT4_FSDP_MAX_WORLD`` ranks at a budget of 1, and where nothing is sharded,
        ``world=None``), ``"int2"`` (up to ``INT2_FSDP_MAX_WORLD``), else ``"int2-topk"``, which
        keeps as many blocks as fit; ``"float32"`` for the other hooks. ``"int2-topk"`` where
        nothing is sharded (DDP, NO_SHARD: the whole gradient is the rank's to keep) is int2."""
        fmt = self.config.residual_dtype
        if fmt == "auto":
            if not fsdp:
                return "float32"
            if world is None:
                return "int4"
            room = 4 * self.config.residual_budget / world  # bytes an element of the full gradient
            return next((f for f in ("int4", "int2") if _res.bytes_per_element(f) <= room),
                        _res.TOPK)
        if fmt == _res.TOPK and not (fsdp and world is not None):
            return "int2"
        return fmt

    def _residual(self, store: dict, key: int, n: int, device,
                  segment: Optional[int] = None, fsdp: bool = False,
                  world: Optional[int] = None) -> _res.Residual:
        """The residual ``store[key]`` of ``n`` elements on ``device``, made (zero) where it is
        missing or of another size, converted where it is in another format (a checkpoint of
        another ``residual_dtype``). ``segment``: the length of the chunks the exchange slices
        it into, where they are not multiples of the codec's block (FSDP's shards); a narrow
        residual (int8, int4, int2) starts a block of scales at every one. ``fsdp``: asked by an
        FSDP hook; ``world``: the ranks its reduce-scatter shards over (``residual_format``;
        None where nothing is sharded, NO_SHARD). An ``int2-topk`` residual may take
        ``residual_budget`` times the rank's fp32 gradient shard, one segment: ``4 x segment``
        bytes."""
        fmt = self.residual_format(fsdp, world)
        budget = (self.config.residual_budget * 4 * (segment or n)) if fmt == _res.TOPK else None
        r = store.get(key)
        if r is not None and r.numel() == n and not _res.is_form(r, fmt, segment, budget):
            dense = r.dequantize() if isinstance(r, _res.QuantizedResidual) else r
            r = _res.make(n, fmt, device, segment, budget)
            r.copy_(dense.to(device=device, dtype=torch.float32))
            store[key] = r
        if r is not None and (r.numel() != n or (
                isinstance(r, _res.QuantizedResidual) and r.segment != (segment or n))):
            # The bucket layout changed (e.g. a resumed job before DDP's rebuild).
            logger.info("bucket %d changed size (%d -> %d): residual reset", key, r.numel(), n)
            r = None
        if r is None:
            r = _res.make(n, fmt, device, segment, budget)
            store[key] = r
        elif r.device != torch.device(device):
            r = r.moved(device) if isinstance(r, _res.QuantizedResidual) else r.to(device)
            store[key] = r
        return r

# Every option is readable as an attribute of the state (``state.mode``), from its config.
for _name in field_names():
    if _name != "phase2_mode":
        setattr(VSAState, _name, property(lambda self, _n=_name: getattr(self.config, _n),
                                          doc=f"``config.{_name}``"))
del _name

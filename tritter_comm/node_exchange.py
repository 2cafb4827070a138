"""The node-aware exchange (issue 20): compress only what crosses the slow link.

With N ranks on M nodes of L ranks each (ranks ``n*L .. n*L+L-1`` on node n, as torchrun
numbers them), a flat vector of D elements is cut into L shards of S = ceil(D / L) elements (the
last padded with zeros) and reduced in three steps:

1. a plain fp32 ``reduce_scatter`` inside the node (the fast link: NVLink, loopback): local rank
   j holds its node's sum of shard j, divided by L;
2. the two-phase compressed exchange (:class:`~tritter_comm.exchange.Exchange`) of shard j
   across nodes, between local rank j of every node (its own client and server residuals, of
   S and about S / M elements): every local rank j decodes the same bytes, so holds the same
   average of shard j, bit for bit;
3. a plain ``all_gather`` of the decoded shards inside the node: it copies bytes, so every rank
   ends with the same D elements, bit for bit.

Only step 2 crosses nodes: a node sends ``L * 2 (M-1) * slot`` bytes, about
``2 (M-1)/M`` times the compressed bucket, where the flat exchange sends L times that (each of
its L ranks sends ``2 (N-L)`` slots of a chunk of D / N elements off the node). The sum within a
node (step 1) may run in any order: only local rank j of node n ever holds that node's sum of
shard j, and what leaves it is the encoded bytes that step 2 makes identical.

Each step is launched from a call of the DDP hook (hooks/ddp.py, "Exchanges in flight"):
``start`` launches step 1, each ``reduce`` launches the next collective (step 2's all_to_all,
its all_gather, step 3), and ``finish`` runs whatever is left and writes the result; the same
protocol as :class:`~tritter_comm.exchange.Exchange`, so the hook drives both alike.

The topology is ``VSAConfig.intra_node_size`` or, when that is None and the hook reduces over
the default group, torchrun's ``LOCAL_WORLD_SIZE`` where it describes more than one node. 1 is
the flat exchange; the world size (one node) reduces plainly, since no link is slow.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from .exchange import Exchange, Plan, Timers, stream_id

__all__ = ["NodeExchange", "Topology", "check", "launch", "node_size", "topology"]

ENV_LOCAL_WORLD = "LOCAL_WORLD_SIZE"


def _is_world(group: Any) -> bool:
    return group is None or group is dist.group.WORLD


def node_size(intra_node_size: Optional[int], world: int, group: Any = None) -> int:
    """The ranks a node holds, as configured (not yet checked against ``world``): the option,
    else torchrun's ``LOCAL_WORLD_SIZE`` where the hook reduces over the default group and it
    describes more than one node (``1 < L < world``, dividing it), else 1 (flat)."""
    if intra_node_size is not None:
        return intra_node_size
    if not _is_world(group):
        return 1  # LOCAL_WORLD_SIZE describes the default group, not this one
    try:
        local = int(os.environ.get(ENV_LOCAL_WORLD, ""))
    except ValueError:
        return 1
    return local if 1 < local < world and world % local == 0 else 1


def check(intra_node_size: int, world: int) -> None:
    """Raise ``ValueError`` unless ``intra_node_size`` ranks a node tile ``world`` ranks."""
    if intra_node_size < 1 or world % intra_node_size:
        raise ValueError(
            f"tritter-comm: intra_node_size={intra_node_size} does not divide the world size "
            f"{world}: it must be the number of ranks on each node (torchrun's "
            f"--nproc-per-node), every node holding as many; 1 for the flat exchange")


class Topology:
    """The node groups of one process group: ``intra`` (this rank's node) and ``inter`` (local
    rank ``local`` of every node); ``node`` and ``local`` are this rank's place."""

    __slots__ = ("size", "nodes", "node", "local", "intra", "inter")

    def __init__(self, group: Any, size: int):
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.size, self.nodes = size, world // size
        self.node, self.local = divmod(rank, size)
        if self.nodes == 1:
            self.intra, self.inter = group, None
            return
        glob = [r if _is_world(group) else dist.get_global_rank(group, r) for r in range(world)]
        local_sync = not _is_world(group)
        # Every rank creates every group, in the same order (new_group is collective over the
        # default group; with a subgroup, over the members of each new group).
        intra = [dist.new_group([glob[n * size + j] for j in range(size)],
                                use_local_synchronization=local_sync)
                 for n in range(self.nodes)]
        inter = [dist.new_group([glob[n * size + j] for n in range(self.nodes)],
                                use_local_synchronization=local_sync)
                 for j in range(size)]
        self.intra, self.inter = intra[self.node], inter[self.local]


def topology(state, world: int) -> Optional[Topology]:
    """The state's node topology (groups created on first use and cached), or None where the
    exchange is flat (one rank a node)."""
    size = node_size(state.config.intra_node_size, world, state.process_group)
    if size == 1:
        return None
    key = id(state.process_group)
    topo = state._nodes.get(key)
    if topo is None:
        check(size, world)
        topo = state._nodes[key] = Topology(state.process_group, size)
    return topo


class _ShardExchange(Exchange):
    """Step 2: the exchange of shard ``local`` across nodes. Its chunks take the key streams of
    chunks ``local * M ..`` of the bucket, so that no two shards share keys."""

    def __init__(self, plan: Plan, *, offset: int, **kwargs: Any):
        super().__init__(plan, **kwargs)
        self.offset = offset

    def _stream(self, chunk: int, phase: int) -> int:
        return stream_id(self.step, self.key, self.offset + chunk, phase)


_NO_PLAN = Plan(0, 1, 8, 0, 0, 0, 0, 0)  # no step 2: its bounds are empty


class NodeExchange:
    """One node-aware exchange of one flat float32 vector; driven like ``Exchange``
    (``start``, ``reduce`` while ``reducing``, ``finish``, ``release``).

    ``plan`` and ``rank`` are those of step 2 (the shard's plan, this node's index), so that the
    hook sizes the server residual of ``key`` as ``plan.bounds(rank)``. ``plan`` is None on a
    single node (no step 2); its ``bounds`` are then empty.
    """

    def __init__(self, topo: Topology, *, numel: int, plan: Optional[Plan], seed: int, step: int,
                 key: int, timers: Timers, fixed_keys: bool,
                 server_residual: Optional[torch.Tensor]):
        self.topo = topo
        self.numel = numel
        self.shard_len = -(-numel // topo.size)
        self.key = key
        self.rank = topo.node
        self.plan = plan if plan is not None else _NO_PLAN
        self._inner = None if plan is None else _ShardExchange(
            plan, offset=topo.local * topo.nodes, rank=topo.node, group=topo.inter, seed=seed,
            step=step, key=key, timers=timers, fixed_keys=fixed_keys)
        self._server_residual = server_residual
        self._residual = None
        self._stage = 0  # 1: reduce-scatter in flight, 2/3: step 2's collectives, 4: all_gather
        self._work = None
        self._input = None
        self._shard = None
        self._gathered = None

    # -- the byte counts of one exchange (per rank) ------------------------------------------

    @property
    def intra_bytes(self) -> int:
        """Bytes this rank sends inside its node: (L-1) fp32 shards in each of steps 1 and 3."""
        return 2 * (self.topo.size - 1) * self.shard_len * 4

    @property
    def inter_bytes(self) -> int:
        """Bytes this rank sends to other nodes (step 2)."""
        return 0 if self._inner is None else self._inner.plan.wire_bytes

    # -- the steps ---------------------------------------------------------------------------

    def start(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
        """Launch step 1 (the node's reduce-scatter) of ``x``; ``residual`` (the shard's
        client residual, ``shard_len`` elements) is used in step 2."""
        size, s = self.topo.size, self.shard_len
        if size * s == x.numel():
            buf = x
        else:
            buf = torch.zeros(size * s, dtype=x.dtype, device=x.device)
            buf[: x.numel()].copy_(x)
        self._input, self._residual = buf, residual
        self._shard = torch.empty(s, dtype=x.dtype, device=x.device)
        self._work = dist.reduce_scatter_tensor(self._shard, buf, group=self.topo.intra,
                                                async_op=True)
        self._stage = 1

    @property
    def reducing(self) -> bool:
        """Whether a collective that must be followed by another is in flight."""
        return 0 < self._stage < 4

    def reduce(self, server_residual: Optional[torch.Tensor] = None) -> None:
        """Wait for the collective in flight and launch the next one. (The server residual
        was given at construction: ``finish`` may run the step that uses it.)"""
        if self._stage == 1:
            self._work.wait()
            self._work = self._input = None
            self._shard /= self.topo.size
            if self._inner is None:
                self._gather(self._shard)
            else:
                self._inner.start(self._shard, self._residual)
                self._stage = 2
        elif self._stage == 2:
            self._inner.reduce(self._server_residual)
            self._stage = 3
        elif self._stage == 3:
            out = self._shard  # its sum was encoded in stage 2: reuse it for the result
            self._inner.finish(out)
            self._gather(out)

    def _gather(self, shard: torch.Tensor) -> None:
        self._gathered = torch.empty(self.topo.size * self.shard_len, dtype=shard.dtype,
                                     device=shard.device)
        self._work = dist.all_gather_into_tensor(self._gathered, shard, group=self.topo.intra,
                                                 async_op=True)
        self._stage = 4

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """Run what is left, wait for the node's all_gather and write the average into
        ``out`` (flat float32, ``numel`` elements)."""
        while self.reducing:
            self.reduce()
        self._work.wait()
        self._work = self._shard = None
        out.copy_(self._gathered[: self.numel])
        self._gathered = None
        self._stage = 5
        return out

    def release(self, timeout: float) -> None:
        """Give up the exchange: wait at most ``timeout`` seconds for what is in flight, then
        drop the buffers. Raises what a wait raises; the buffers are dropped all the same."""
        work, inner, self._work, self._inner = self._work, self._inner, None, None
        try:
            if inner is not None:
                inner.release(timeout)
            if work is not None:
                work.wait(datetime.timedelta(seconds=timeout))
        finally:
            self._input = self._shard = self._gathered = self._residual = None


def launch(state, x: torch.Tensor, key: int, world: int, *, block_log2: int, mode_id: int,
           mode2_id: int) -> Optional[NodeExchange]:
    """Start the node-aware exchange of ``x`` (flat float32) for the DDP hook, with the
    state's residuals and counters; None where the exchange is flat (the caller's)."""
    topo = topology(state, world)
    if topo is None:
        return None
    shard = -(-x.numel() // topo.size)
    plan = None
    if topo.nodes > 1:
        plan = Plan.make(shard, topo.nodes, block_log2, mode_id, mode2_id)
    ex = NodeExchange(topo, numel=x.numel(), plan=plan, seed=state.seed, step=state.iter,
                      key=key, timers=state._timers, fixed_keys=state.fixed_keys,
                      server_residual=None)
    if plan is not None:
        lo, hi = plan.bounds(topo.node)
        if state.server_error_feedback and hi > lo:
            ex._server_residual = state._residual(state.server_residuals, key, hi - lo, x.device)
        res = (state._residual(state.residuals, key, shard, x.device)
               if state.error_feedback else None)
        state._buckets_compressed += 1
    else:
        res = None  # one node: nothing crosses a slow link, nothing is compressed
        state._buckets_plain += 1
    ex.start(x, res)
    account(state, intra=ex.intra_bytes, inter=ex.inter_bytes)
    return ex


def account(state, *, intra: int, inter: int) -> None:
    """Count bytes sent inside the node and across nodes (``stats()``)."""
    state._bytes_sent += intra + inter
    state._bytes_intra += intra  # the rest crosses nodes (stats())


def plain_split(state, nbytes: int, world: int) -> tuple[int, int]:
    """(intra, inter) of ``nbytes`` sent by a plain all-reduce (the ring formula): of the
    ring's N links, one a node crosses to the next node."""
    size = node_size(state.config.intra_node_size, world, state.process_group)
    if size < 1 or world % size:
        size = 1
    nodes = world // size
    if nodes == 1:
        return nbytes, 0
    inter = nbytes * nodes // world
    return nbytes - inter, inter

"""DDP communication hook: the two-phase compressed all-reduce with error feedback.

    ddp_model.register_comm_hook(VSAState(), vsa_hook)    # or tritter_comm.register(ddp_model)

DDP calls the hook once per bucket, in bucket order, on every rank. The hook issues every
collective from that call, never from a future callback (PyTorch's PowerSGD hook does, and hangs
on gloo with two or more buckets), and completes every bucket's future from its own calls too,
never on a backend's thread: see "Exchanges in flight" below.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at run time.

import contextlib
import datetime
import logging
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from ..codec import MODES, block_log2
from .. import node_exchange
from ..exchange import MAX_BUCKETS, MAX_WORLD, Exchange, Plan
from . import _auto
from .state import VSAState

logger = logging.getLogger(__name__)

__all__ = ["VSAState", "vsa_hook"]


def _world(state: VSAState) -> int:
    return dist.get_world_size(state.process_group)


def _future(device: torch.device) -> torch.futures.Future:
    """A future for a result computed on ``device``. On CUDA it is CUDA-aware: ``set_result``
    records an event on the current stream (the one the decode ran on), and whoever waits
    (DDP's reducer) waits for it; a plain future would let DDP read the bucket
    before the decode wrote it (seen as replicas drifting apart on a GPU)."""
    if device.type == "cuda":
        return torch.futures.Future(devices=[device])
    return torch.futures.Future()


def _done(value: torch.Tensor) -> torch.futures.Future:
    fut = _future(value.device)
    fut.set_result(value)
    return fut


# -- exchanges in flight -----------------------------------------------------------------------
#
# No Python of ours runs on a backend's thread (DESIGN.md, "Threads, streams and teardown"):
# gloo and NCCL complete their futures on their own worker threads, and a callback there that
# holds Python objects can outlive the interpreter, which aborts the process at exit. So every
# bucket's DDP future is completed by the hook's own calls. Hook(i) launches bucket i's first
# collective; runs phase 2 (wait for the all_to_all, re-encode, launch the all_gather) of the
# buckets launched in earlier calls; and completes (wait, decode, set the result) the buckets
# whose last collective was launched in an earlier call. The last bucket's hook drains the
# rest. Every collective is launched from a hook call, in the same order on every rank, and
# has at least one hook call's worth of backward pass to run behind.

class _Op:
    """One collective exchange of a flat vector ``x``, reduced in place: compressed (``ex``)
    or a plain all-reduce (``work``, then divided by ``world``)."""

    __slots__ = ("x", "ex", "work", "world", "launched")

    def __init__(self, x: torch.Tensor, launched: int, *, ex: Optional[Exchange] = None,
                 work: Any = None, world: int = 1):
        self.x = x
        self.ex = ex
        self.work = work
        self.world = world
        self.launched = launched  # the hook call that launched its latest collective

    def finish(self) -> None:
        """Wait for the last collective and write the average into ``x``."""
        if self.ex is None:
            work, self.work = self.work, None
            work.wait()
            self.x.div_(self.world)
        else:
            ex, self.ex = self.ex, None
            ex.finish(self.x)

    def release(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the collective in flight, then let it go."""
        ex, work, self.ex, self.work = self.ex, self.work, None, None
        try:
            if ex is not None:
                ex.release(timeout)
            elif work is not None:
                work.wait(datetime.timedelta(seconds=timeout))
        except Exception as e:  # the job is failing already; the first error is what counts
            logger.debug("tritter-comm: letting go of a collective in flight: %s", e)


class _Entry:
    """A bucket's DDP future, the exchanges that produce its result, and what writes the
    bucket once they are done (``done() -> bucket tensor``)."""

    __slots__ = ("fut", "ops", "done")

    def __init__(self, fut: torch.futures.Future, ops: list, done: Callable[[], torch.Tensor]):
        self.fut = fut
        self.ops = ops
        self.done = done


def _allreduce_op(state: VSAState, t: torch.Tensor, world: int) -> _Op:
    """Launch the plain all-reduce of ``t`` (averaged once it is finished)."""
    intra, inter = node_exchange.plain_split(
        state, 2 * (world - 1) * t.numel() * t.element_size() // world, world)
    node_exchange.account(state, intra=intra, inter=inter)
    state._buckets_plain += 1
    work = dist.all_reduce(t, group=state.process_group, async_op=True)
    return _Op(t, state._calls, work=work, world=world)


def _plain(state: VSAState, bucket: dist.GradBucket, world: int) -> _Entry:
    t = bucket.buffer()
    return _Entry(_future(t.device), [_allreduce_op(state, t, world)], lambda: t)


def _param_ids(state: VSAState, bucket: dist.GradBucket) -> tuple[int, ...]:
    ids = state._param_ids
    for p in bucket.parameters():
        ids.setdefault(id(p), len(ids))
    return tuple(ids[id(p)] for p in bucket.parameters())


def _segments(state: VSAState, bucket: dist.GradBucket):
    """The exchanges of a bucket: ``[(key, index)]``, ``index`` None for the whole bucket.

    A resumed process sees DDP's initial buckets in its first iteration, not the rebuilt ones
    the residuals were saved for. Each saved bucket whose parameters all lie in this bucket is
    gathered (``index``, element positions in this bucket) and exchanged with its own key and
    residuals, exactly as the uninterrupted job would.
    """
    idx = bucket.index()
    pids = _param_ids(state, bucket)
    saved = state._saved_layout
    if saved is not None and saved.get(idx) != pids:
        where, off = {}, 0
        for pid, p in zip(pids, bucket.parameters()):
            where[pid] = (off, off + p.numel())
            off += p.numel()
        segs = [
            (k, torch.cat([torch.arange(*where[pid]) for pid in saved[k]]))
            for k in sorted(saved)
            if saved[k] and all(pid in where for pid in saved[k])
        ]
        if sum(i.numel() for _, i in segs) == off:
            return segs
        logger.info("bucket %d does not match the saved layout; its residuals restart", idx)
    state._layout[idx] = pids
    return [(idx, None)]


def _exchange_op(state: VSAState, x: torch.Tensor, key: int, world: int) -> _Op:
    """Encode ``x`` (flat float32) and launch phase 1 of its compressed exchange."""
    if key >= MAX_BUCKETS or world > MAX_WORLD:
        raise ValueError(f"tritter-comm supports {MAX_BUCKETS} buckets and {MAX_WORLD} ranks")
    node = node_exchange.launch(state, x, key, world, block_log2=block_log2(state.block_size),
                                mode_id=MODES[state.mode], mode2_id=MODES[state.phase2_mode])
    if node is not None:  # intra_node_size > 1: compress only across nodes
        return _Op(x, state._calls, ex=node)
    rank = dist.get_rank(state.process_group)
    plan = Plan.make(x.numel(), world, block_log2(state.block_size), MODES[state.mode],
                     MODES[state.phase2_mode])
    ex = Exchange(plan, rank=rank, group=state.process_group, seed=state.seed,
                  step=state.iter, key=key, timers=state._timers, fixed_keys=state.fixed_keys)
    res = (state._residual(state.residuals, key, x.numel(), x.device)
           if state.error_feedback else None)
    ex.start(x, res)
    node_exchange.account(state, intra=0, inter=plan.wire_bytes)
    state._buckets_compressed += 1
    return _Op(x, state._calls, ex=ex)


def _compressed(state: VSAState, bucket: dist.GradBucket, world: int) -> _Entry:
    t = bucket.buffer()
    segs = _segments(state, bucket)
    x = t if t.dtype == torch.float32 else t.float()

    def write() -> torch.Tensor:
        return t if x is t else t.copy_(x)

    if segs[0][1] is None:
        return _Entry(_future(t.device), [_exchange_op(state, x, segs[0][0], world)], write)
    # resuming: exchange each saved bucket gathered from this one, then scatter back
    parts = [(i.to(x.device), x[i.to(x.device)]) for _, i in segs]
    ops = [
        _allreduce_op(state, xs, world) if xs.numel() < state.min_compress_numel
        else _exchange_op(state, xs, key, world)
        for (key, _), (_, xs) in zip(segs, parts)
    ]

    def scatter() -> torch.Tensor:
        for i, xs in parts:
            x[i] = xs
        return write()

    return _Entry(_future(t.device), ops, scatter)


class _Launcher:
    """What ``auto`` (hooks/_auto.py) needs from the hook, so that it does not import it."""

    __slots__ = ("state", "world")

    def __init__(self, state: VSAState, world: int):
        self.state, self.world = state, world

    def plain(self, bucket: dist.GradBucket) -> torch.futures.Future:
        return _launch(self.state, _plain(self.state, bucket, self.world))

    def compressed(self, bucket: dist.GradBucket) -> torch.futures.Future:
        return _launch(self.state, _compressed(self.state, bucket, self.world))

    def drain(self) -> None:
        _advance(self.state, drain=True)


def _launch(state: VSAState, entry: _Entry) -> torch.futures.Future:
    state._pending.append(entry)
    return entry.fut


def _advance(state: VSAState, *, drain: bool) -> None:
    """Phase 2 of the exchanges whose all_to_all was launched in an earlier hook call, then
    complete the buckets whose every collective was launched in an earlier call, in order;
    everything if ``drain``. On an error every bucket in flight fails and is let go."""
    now = state._calls
    try:
        # Draining, an exchange with more steps than two (node_exchange.py) takes them in
        # step with the others, each round launching the next collective of every bucket,
        # rather than one bucket after the other.
        stepped = True
        while stepped:
            stepped = False
            for entry in state._pending:
                for op in entry.ops:
                    if op.ex is not None and op.ex.reducing and (drain or op.launched < now):
                        lo, hi = op.ex.plan.bounds(op.ex.rank)
                        sres = (state._residual(state.server_residuals, op.ex.key, hi - lo,
                                                op.x.device)
                                if state.server_error_feedback and hi > lo else None)
                        op.ex.reduce(sres)
                        op.launched = now
                        stepped = drain
        while state._pending and (drain or all(op.launched < now
                                               for op in state._pending[0].ops)):
            entry = state._pending[0]
            for op in entry.ops:
                op.finish()
            state._pending.pop(0)
            entry.fut.set_result(entry.done())
    except BaseException as e:
        state._release(e)
        raise


# -- streams ------------------------------------------------------------------------------------
#
# With the side stream (VSAState._use_side_stream, CUDA buckets), each hook call makes the side
# stream wait for an event recorded on the current stream (the backward pass's, which wrote the
# bucket) and then runs all of its work with the side stream current: the encodes, the
# collectives (NCCL and gloo order themselves after the current stream at launch, and make the
# current stream wait for them at wait()), the decodes, the writes into the bucket and each
# future's set_result, whose CUDA-aware future records its events on the side stream, so that
# DDP's wait() orders the backward stream after them. All of one hook's work stays on one
# stream, in the order it has without the side stream, so the bits do not change.
# Lifetimes: every buffer of the exchange is allocated on the side stream and used only there
# (the collectives record their own streams); the bucket, allocated by DDP on the backward
# stream and written here, is recorded on the side stream (record_stream), so that its memory
# is not reused before the side stream's work on it is done. Residuals are allocated on the
# side stream and kept for the life of the state: toggle the side stream before the first
# step only.

def _side_stream(state: VSAState, t: torch.Tensor) -> Optional[torch.cuda.Stream]:
    """The side stream for ``t``'s device, once it has waited for the current stream (and
    ``t`` recorded on it); None where the hook runs on the current stream."""
    if not state._use_side_stream or t.device.type != "cuda" or state.auto:
        return None
    side = state._side_streams.get(t.device.index)
    if side is None:
        side = state._side_streams[t.device.index] = torch.cuda.Stream(t.device)
    side.wait_stream(torch.cuda.current_stream(t.device))
    t.record_stream(side)
    return side


def _launch_bucket(state: VSAState, bucket: dist.GradBucket, t: torch.Tensor,
                   world: int) -> torch.futures.Future:
    if (state.iter < state.start_iter or not t.is_floating_point()
            or t.numel() < state.min_compress_numel):
        return _launch(state, _plain(state, bucket, world))
    t0 = time.perf_counter()
    fut = _auto.exchange(state, bucket, _Launcher(state, world)) if state.auto else None
    if fut is None:  # compressed (auto: a probe step or a plain bucket returns its own)
        fut = _launch(state, _compressed(state, bucket, world))
    logger.debug("bucket %d: hook %.1f ms", bucket.index(), 1e3 * (time.perf_counter() - t0))
    return fut


def vsa_hook(state: VSAState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: compressed two-phase all-reduce of ``bucket``, averaged like DDP's."""
    t = bucket.buffer()
    world = _world(state)
    last = bucket.is_last()
    state._calls += 1
    try:
        if world > 1 and not state._config_checked:
            # before anything branches on the configuration: a rank that would all-reduce
            # while another exchanges compressed would hang both
            state._check_config(t.device, state.process_group)
        state._bytes_uncompressed += 2 * (world - 1) * t.numel() * 4 // world
        if not state._layout or state._saved_layout is not None:
            _param_ids(state, bucket)  # number the parameters in the first iteration
        if world == 1 and not state._force_exchange:
            fut = _done(t)
            _advance(state, drain=last)
        else:
            side = _side_stream(state, t)
            with contextlib.nullcontext() if side is None else torch.cuda.stream(side):
                fut = _launch_bucket(state, bucket, t, world)
                _advance(state, drain=last)
        if last and state.auto and world > 1:
            _auto.end_step(state, bucket.index() + 1, t.device)  # collective: hook call only
    except BaseException as e:
        state._release(e)
        raise
    finally:
        if last:
            state.iter += 1
            state._steps += 1
            state._calls = 0
            state._saved_layout = None  # DDP has rebuilt its buckets by the next iteration
    return fut

"""FSDP1 communication hook: phase 1 of the exchange as a compressed reduce-scatter.

    fsdp_model.register_comm_hook(VSAState(), vsa_fsdp_hook)

FSDP1 calls the hook once per unit (``FlatParameter``) in its post-backward hook, in the same
order on every rank, and uses the result as soon as the hook returns; so the hook runs its
collectives to completion inside the call (never from a future callback).

- Sharded strategies (FULL_SHARD, SHARD_GRAD_OP) call ``hook(state, grad, output)``: ``grad`` is
  the unit's padded flat gradient, ``world * output.numel()`` elements, and chunk ``c`` is rank
  ``c``'s shard. Each rank encodes every chunk as a vector of its own (its client residual) and
  sends chunk ``c`` to rank ``c`` (``all_to_all``); rank ``c`` decodes the ``world`` bodies, sums
  them in rank order and divides by the world size into ``output``. No second phase: the shard
  stays on its owner, so there is no re-encoding and no server residual.
- NO_SHARD calls ``hook(state, grad)``: the full two-phase all-reduce of ``grad`` in place.

With a comm hook registered FSDP applies none of its pre- and post-division factors; the hook
averages, as FSDP does without one. Under a ``MixedPrecision`` policy ``grad`` and ``output``
come in the reduce dtype (e.g. bf16): the exchange and the residuals run in float32 and the
result is cast back.

Residuals are keyed by the unit, not by the order of the calls: FSDP1 hands the hook no bucket
index, so the hook reads the ``FlatParamHandle`` being reduced from its caller
(``_reduce_grad``/``_reduce_grad_no_shard``) and keys by its ``_handle_index``, the unit's
position in FSDP's pre-order traversal of the model: the same on every rank, in every process
of a job, and whatever order the units' gradients arrive in. Where a future torch hides the
handle, the hook falls back to keying by call order and logs a warning.

An iteration ends with the backward pass (an autograd final callback); ``no_sync`` backward
passes never call the hook and do not count. ``stats()`` counts, per rank, what the hook hands
to collectives (``bytes_sent``) against an fp32 reduce-scatter (``bytes_uncompressed``;
an fp32 ring all-reduce for NO_SHARD).
"""

# No `from __future__ import annotations`: keep the hook's annotations real objects, as DDP's.

import contextlib
import functools
import logging
import sys
from typing import Optional

import torch
import torch.distributed as dist

from ..codec import MODES, block_log2
from ..exchange import MAX_BUCKETS, MAX_WORLD, Exchange, Plan
from .._warnings import warn as _warn
from .state import RELEASE_TIMEOUT, VSAState

logger = logging.getLogger(__name__)

__all__ = ["vsa_fsdp_hook", "reduce_scatter"]


# -- iterations ------------------------------------------------------------------------------


class _Backward:
    """What the FSDP hooks track within one backward pass (``VSAState._fsdp``)."""

    __slots__ = ("seen", "calls", "queued", "warned")

    def __init__(self, warned: bool = False):
        self.seen: set[int] = set()  # unit keys reduced in this backward
        self.calls = 0
        self.queued = False  # the end-of-backward callback is queued
        self.warned = warned  # the call-order fallback was logged


def _end_backward(state: VSAState, bw: "_Backward") -> None:
    if state._fsdp is not bw:  # the state was reloaded since
        return
    if bw.calls:
        state.iter += 1
        state._steps += 1
    state._fsdp = _Backward(bw.warned)


def enter(state: VSAState, key: Optional[int]) -> int:
    """Book one unit's reduction in the current iteration and return its residual key.

    ``key`` None means the unit is unknown: it gets the call's position in this backward.
    The iteration ends at the end of the backward pass; outside autograd (no callback can be
    queued), it ends when a unit is reduced a second time.
    """
    bw = state._fsdp
    if bw is None:
        bw = state._fsdp = _Backward()
    if key is None:
        if not bw.warned:
            _warn(f"tritter-comm: could not tell which FSDP unit is being reduced (torch "
                  f"{torch.__version__}); residuals are keyed by call order, which is right "
                  "only while every backward reduces the units in the same order")
            bw.warned = True
        key = bw.calls
    elif key in bw.seen:
        _end_backward(state, bw)
        bw = state._fsdp
    bw.seen.add(key)
    bw.calls += 1
    if not bw.queued:
        try:
            torch.autograd.Variable._execution_engine.queue_callback(
                functools.partial(_end_backward, state, bw))
            bw.queued = True
        except RuntimeError:  # not inside a backward pass
            pass
    return key


def plain(state: VSAState, t: torch.Tensor) -> bool:
    """Whether ``t`` goes uncompressed: before ``start_iter``, non-float, or small."""
    return (state.iter < state.start_iter or not t.is_floating_point()
            or t.numel() < state.min_compress_numel)


# -- the exchanges ---------------------------------------------------------------------------


def _check(key: int, world: int) -> None:
    if key >= MAX_BUCKETS or world > MAX_WORLD:
        raise ValueError(f"tritter-comm supports {MAX_BUCKETS} units and {MAX_WORLD} ranks")


@contextlib.contextmanager
def _releasing(ex: Exchange):
    """Run an exchange to completion; on an error, let go of its collectives in flight (a
    bounded wait, so that no backend thread is left holding its buffers) and re-raise."""
    try:
        yield ex
    except BaseException:
        try:
            ex.release(RELEASE_TIMEOUT)
        except Exception as e:
            logger.debug("tritter-comm: letting go of a collective in flight: %s", e)
        raise


def _exchange(state: VSAState, plan: Plan, group, key: int) -> Exchange:
    return Exchange(plan, rank=dist.get_rank(group), group=group, seed=state.seed,
                    step=state.iter, key=key, timers=state._timers, fixed_keys=state.fixed_keys)


def reduce_scatter(state: VSAState, inp: torch.Tensor, out: torch.Tensor, *, key: int, group,
                   divide_by: Optional[float] = None,
                   multiply_by: Optional[float] = None) -> None:
    """Compressed reduce-scatter: ``out`` = the sum over ranks of chunk ``rank`` of ``inp``,
    then divided by ``divide_by`` and multiplied by ``multiply_by`` (where given).

    ``inp`` is flat, ``world * out.numel()`` elements; chunk ``c`` goes to rank ``c``. Every
    chunk is encoded on its own with the client residual ``state.residuals[key]``. Collectives
    run to completion before it returns.
    """
    world = dist.get_world_size(group)
    _check(key, world)
    plan = Plan.even(inp.numel(), world, block_log2(state.block_size), MODES[state.mode])
    if out.numel() != plan.chunk:
        raise ValueError(f"reduce-scatter output has {out.numel()} elements, the input's "
                         f"shards {plan.chunk}")
    ex = _exchange(state, plan, group, key)
    x = inp.reshape(-1)
    x = x if x.dtype == torch.float32 else x.float()
    # a narrow residual starts a block of scales at every shard (they are not block-aligned)
    res = (state._residual(state.residuals, key, plan.numel, x.device, segment=plan.chunk,
                           fsdp=True, world=world)
           if state.error_feedback else None)
    direct = out.dtype == torch.float32 and out.is_contiguous()
    acc = out.view(-1) if direct else torch.empty(plan.chunk, dtype=torch.float32,
                                                  device=out.device)
    with _releasing(ex):
        ex.start(x, res)
        ex.reduce_scatter(acc, average=False)
    if divide_by is not None and divide_by != 1:
        acc /= divide_by
    if multiply_by is not None and multiply_by != 1:
        acc *= multiply_by
    if not direct:
        out.copy_(acc.view_as(out))
    state._bytes_sent += plan.reduce_scatter_wire_bytes
    state._buckets_compressed += 1


def _all_reduce(state: VSAState, grad: torch.Tensor, key: int, world: int) -> None:
    """The two-phase compressed all-reduce of ``grad`` in place, averaged (NO_SHARD)."""
    group = state.process_group
    _check(key, world)
    plan = Plan.make(grad.numel(), world, block_log2(state.block_size), MODES[state.mode],
                     MODES[state.phase2_mode])
    ex = _exchange(state, plan, group, key)
    x = grad if grad.dtype == torch.float32 else grad.float()
    res = (state._residual(state.residuals, key, plan.numel, x.device, fsdp=True)
           if state.error_feedback else None)
    lo, hi = plan.bounds(ex.rank)
    sres = (state._residual(state.server_residuals, key, hi - lo, x.device, fsdp=True)
            if state.server_error_feedback and hi > lo else None)
    with _releasing(ex):
        ex.start(x, res)
        ex.reduce(sres)
        ex.finish(x)
    if x is not grad:
        grad.copy_(x)
    state._bytes_sent += plan.wire_bytes
    state._buckets_compressed += 1


def _predivide_factor(world: int) -> float:
    """FSDP1's default split of the 1/world average around the collective (DefaultState)."""
    factor = 1
    while world % factor == 0 and world / factor > factor:
        factor *= 2
    return float(factor)


def _plain_fsdp1(state: VSAState, grad: torch.Tensor, output: Optional[torch.Tensor],
                 world: int) -> None:
    """Uncompressed, exactly as FSDP1 reduces without a hook (same division factors)."""
    pre = _predivide_factor(world)
    post = world / pre
    if pre > 1:
        grad.div_(pre)
    n = grad.numel() * grad.element_size()
    if output is None:
        dist.all_reduce(grad, group=state.process_group)
        state._bytes_sent += 2 * (world - 1) * n // world
        result = grad
    else:
        dist.reduce_scatter_tensor(output, grad, group=state.process_group)
        state._bytes_sent += (world - 1) * n // world
        result = output
    if post > 1:
        result.div_(post)
    state._buckets_plain += 1


# -- FSDP1 -----------------------------------------------------------------------------------


def _fsdp1_unit(frame) -> Optional[int]:
    """The ``_handle_index`` of the ``FlatParamHandle`` FSDP1 is reducing, read from the
    hook's caller (``_reduce_grad``/``_reduce_grad_no_shard`` hold it as ``handle``)."""
    try:
        for _ in range(3):
            if frame is None:
                return None
            idx = getattr(frame.f_locals.get("handle"), "_handle_index", None)
            if isinstance(idx, int):
                return idx
            frame = frame.f_back
        return None
    finally:
        del frame


def vsa_fsdp_hook(state: VSAState, grad: torch.Tensor,
                  output: Optional[torch.Tensor] = None) -> None:
    """FSDP1 comm hook: compressed reduce-scatter of ``grad`` into ``output`` (sharded
    strategies) or compressed all-reduce of ``grad`` in place (NO_SHARD), averaged like FSDP's
    own reduction. ``state.process_group`` must be FSDP's process group (default: both the
    default group)."""
    world = dist.get_world_size(state.process_group)
    if world > 1:
        state._check_config(grad.device, state.process_group)  # before branching on it
    key = enter(state, _fsdp1_unit(sys._getframe(1)))
    fp32 = grad.numel() * 4
    if output is None:
        state._bytes_uncompressed += 2 * (world - 1) * fp32 // world
        if world == 1:
            return
        if plain(state, grad):
            _plain_fsdp1(state, grad, None, world)
        else:
            _all_reduce(state, grad, key, world)
        return
    state._bytes_uncompressed += (world - 1) * fp32 // world
    if world == 1:
        output.copy_(grad.view_as(output))
    elif plain(state, grad):
        _plain_fsdp1(state, grad, output, world)
    else:
        reduce_scatter(state, grad, output, key=key, group=state.process_group,
                       divide_by=world)

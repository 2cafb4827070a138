"""FSDP2 (``fully_shard``): the compressed reduce-scatter as a custom ``ReduceScatter`` comm.

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    tritter_comm.fsdp.enable(model, VSAState())       # or tritter_comm.register(model)

``enable`` installs one :class:`VSAReduceScatter` on every FSDP module of the model through
``FSDPModule.set_custom_reduce_scatter`` (torch 2.9 or newer). FSDP2 copies each module's
gradients into one flat input of ``world * shard`` elements, chunk ``c`` rank ``c``'s shard,
and calls the comm; the comm encodes each chunk as its own vector (client residual), sends
chunk ``c`` to rank ``c`` (``all_to_all``) and writes the decoded sum of its own chunk, reduced
as FSDP's ``op`` asks (``AVG``, ``SUM`` or ``PREMUL_SUM``: FSDP chooses the op and applies any
pre- and post-division itself), into the output. Phase 1 of the two-phase exchange
(DESIGN.md): no re-encoding, no server residual. Collectives complete inside the call.

Each FSDP module's residual is keyed by its position among the model's FSDP modules
(``model.modules()`` order), so keys do not depend on the order gradients arrive in. Under a
``MixedPrecisionPolicy(reduce_dtype=torch.bfloat16)`` the input and output are bf16; the
exchange and residuals run in float32. An iteration ends with the backward pass;
``set_requires_gradient_sync(False)`` backward passes reduce nothing and do not count.
Residuals and the iteration are in ``state.state_dict()``; each rank saves its own.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .fsdp import enter, plain, reduce_scatter
from .state import VSAState

logger = logging.getLogger(__name__)

__all__ = ["MIN_TORCH", "VSAReduceScatter", "available", "enable", "module_class"]

#: The first torch release with ``FSDPModule.set_custom_reduce_scatter`` (pytorch#155189).
MIN_TORCH = "2.9"


def _api() -> Optional[tuple[type, type]]:
    """``(FSDPModule, ReduceScatter)`` where the installed torch has custom FSDP2 comms."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
    except ImportError:
        return None
    if not hasattr(FSDPModule, "set_custom_reduce_scatter"):
        return None
    return FSDPModule, ReduceScatter


_API = _api()


def module_class() -> Optional[type]:
    """torch's ``FSDPModule`` (what ``fully_shard`` makes a module), or None where this torch
    has no FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def available() -> bool:
    """Whether the installed torch lets :func:`enable` install the compressed reduce-scatter."""
    return _API is not None


def _scale(op: Any, world: int) -> tuple[Optional[float], Optional[float]]:
    """``(divide_by, multiply_by)`` that turn the sum into what ``op`` asks for."""
    kind = getattr(op, "op", op)  # a ReduceOp made with a factor carries its kind in .op
    if kind == dist.ReduceOp.SUM:
        return None, None
    if kind == dist.ReduceOp.AVG:
        return float(world), None
    if kind == dist.ReduceOp.PREMUL_SUM:
        factor = getattr(op, "factor", None)
        if isinstance(factor, torch.Tensor):
            factor = factor.item()  # once per module and step; FSDP passes a float
        if factor is None:
            raise ValueError(f"PREMUL_SUM reduce op without a factor: {op!r}")
        return None, float(factor)
    raise ValueError(f"tritter-comm's reduce-scatter sums gradients (SUM, AVG, PREMUL_SUM); "
                     f"FSDP asked for {op!r}")


class VSAReduceScatter(_API[1] if _API is not None else object):  # type: ignore[misc]
    """Compressed reduce-scatter of one FSDP2 module: pass to ``set_custom_reduce_scatter``.

    Args:
        state: the :class:`~tritter_comm.VSAState` shared by all modules of the model.
        key: the module's residual key, unique within the model and the same on every rank.
    """

    def __init__(self, state: VSAState, key: int):
        if not isinstance(state, VSAState):
            raise ValueError(f"state must be a tritter_comm.VSAState, got {type(state).__name__}")
        if not isinstance(key, int) or key < 0:
            raise ValueError(f"key must be a non-negative int, got {key!r}")
        self.state = state
        self.key = key

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op: Any, async_op: bool = False):
        st = self.state
        world = dist.get_world_size(group)
        if world > 1:
            st._check_config(input_tensor.device, group)  # before branching on it
        enter(st, self.key)
        st._bytes_uncompressed += (world - 1) * input_tensor.numel() * 4 // world
        if plain(st, input_tensor):
            st._bytes_sent += ((world - 1) * input_tensor.numel() * input_tensor.element_size()
                               // world)
            st._buckets_plain += 1
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group,
                                              async_op=async_op)
        divide_by, multiply_by = _scale(op, world)
        reduce_scatter(st, input_tensor, output_tensor, key=self.key, group=group,
                       divide_by=divide_by, multiply_by=multiply_by)
        if not async_op:
            return None
        fut: torch.futures.Future = (torch.futures.Future(devices=[output_tensor.device])
                                     if output_tensor.is_cuda else torch.futures.Future())
        fut.set_result([output_tensor])
        return torch._C._distributed_c10d._create_work_from_future(fut)

    def __repr__(self) -> str:
        return f"VSAReduceScatter(key={self.key}, mode={self.state.mode!r})"


def enable(module: nn.Module, state: VSAState) -> None:
    """Install the compressed reduce-scatter on every ``fully_shard`` module of ``module``.

    Call it after ``fully_shard`` and before the first backward pass. Each FSDP module gets a
    :class:`VSAReduceScatter` keyed by its position among the FSDP modules of ``module``, so
    build and wrap the model the same way on every rank and in every process of a job.

    Raises:
        RuntimeError: the installed torch has no ``FSDPModule.set_custom_reduce_scatter``.
        ValueError: ``state`` is not a ``VSAState``, or no submodule went through
            ``fully_shard``.
    """
    if _API is None:
        raise RuntimeError(
            f"tritter_comm.fsdp.enable needs torch {MIN_TORCH} or newer "
            f"(FSDPModule.set_custom_reduce_scatter); this is torch {torch.__version__}. "
            "Upgrade torch, or use FSDP1 with "
            "fsdp_model.register_comm_hook(state, tritter_comm.hooks.vsa_fsdp_hook)."
        )
    if not isinstance(state, VSAState):
        raise ValueError(f"state must be a tritter_comm.VSAState, got {type(state).__name__}")
    fsdp_module = _API[0]
    mods = [m for m in module.modules() if isinstance(m, fsdp_module)]
    if not mods:
        raise ValueError("no submodule of this model went through fully_shard: call "
                         "fully_shard on its blocks and on the model first, then enable")
    for key, m in enumerate(mods):
        m.set_custom_reduce_scatter(VSAReduceScatter(state, key))
    logger.debug("tritter-comm: compressed reduce-scatter on %d FSDP modules", len(mods))

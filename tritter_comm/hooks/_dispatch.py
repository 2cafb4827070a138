"""``tritter_comm.register(model)``: the right hook for a model, chosen in one place.

DDP gets :func:`~tritter_comm.vsa_hook`, FSDP1 :func:`~tritter_comm.vsa_fsdp_hook`, a model with
FSDP2 (``fully_shard``) modules the compressed reduce-scatter (``tritter_comm.fsdp.enable``), and
a ``torch.compile`` wrapper whatever the model it wraps gets. accelerate's ``attach``,
``launch/train.py`` and the benchmarks all go through here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist
from torch import nn

from ..config import VSAConfig
from . import fsdp2
from .ddp import vsa_hook
from .fsdp import vsa_fsdp_hook
from .fsdp2 import module_class
from .state import VSAState

__all__ = ["register", "wrapper_of"]


def wrapper_of(model: Any) -> Optional[str]:
    """``"ddp"``, ``"fsdp1"`` or ``"fsdp2"``: the data-parallel wrapper of ``model`` (or of the
    model a ``torch.compile`` wrapper holds), or None for none of these."""
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(model, "_orig_mod", model)
    if isinstance(model, DistributedDataParallel):
        return "ddp"
    if not isinstance(model, nn.Module):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return "fsdp1"
    fsdp2 = module_class()
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in model.modules()):
        return "fsdp2"
    return None


def register(model: nn.Module, config: Optional[VSAConfig] = None, *,
             process_group: Optional[dist.ProcessGroup] = None) -> VSAState:
    """Give ``model`` the compressed exchange its wrapper needs; return the hook state.

    Args:
        model: a ``DistributedDataParallel`` model, an FSDP1 ``FullyShardedDataParallel`` model,
            a model whose modules went through FSDP2's ``fully_shard``, or a ``torch.compile``
            wrapper of any of these. Call it after wrapping and before the first backward pass.
        config: the options (default: :class:`~tritter_comm.VSAConfig`'s defaults).
        process_group: the group to reduce over; default: the wrapper's own (DDP's and FSDP1's
            ``process_group``; FSDP2 reduces over the group it hands its reduce-scatter).

    Raises:
        TypeError: ``model`` is none of these (e.g. a plain module: wrap it first).
        RuntimeError: FSDP2 on a torch without custom reduce-scatter comms.
    """
    if config is not None and not isinstance(config, VSAConfig):
        raise TypeError(f"config must be a tritter_comm.VSAConfig, got {type(config).__name__}")
    kind = wrapper_of(model)
    inner = getattr(model, "_orig_mod", model)
    if kind == "ddp":
        state = VSAState(process_group or inner.process_group, config)
        inner.register_comm_hook(state, vsa_hook)
    elif kind == "fsdp1":
        state = VSAState(process_group or inner.process_group, config)
        inner.register_comm_hook(state, vsa_fsdp_hook)
    elif kind == "fsdp2":
        state = VSAState(process_group, config)
        fsdp2.enable(inner, state)
    else:
        raise TypeError(
            f"tritter_comm.register takes a DistributedDataParallel, FSDP1 or FSDP2 "
            f"(fully_shard) model, or a torch.compile wrapper of one; got "
            f"{type(model).__name__}. Wrap the model for data parallelism first.")
    return state

"""A teardown that never aborts (issue 14; DESIGN.md, "Threads, streams and teardown").

A process that exits with a DDP model alive keeps the model's reducer, its buckets and the
works of its process group alive into interpreter finalization. A backend thread that drops
the last reference to a tensor seen from Python then takes the GIL while the interpreter is
being torn down, and the process aborts (``terminate called without an active exception``).
Releasing the model and the hook states while the interpreter is still whole avoids it:
:func:`shutdown` does that in one call, and an ``atexit`` handler closes every hook state
that is still open when a script ends without it.
"""

from __future__ import annotations

import atexit
import gc
import logging
import weakref
from typing import Any

import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["shutdown"]

_STATES: "weakref.WeakSet[Any]" = weakref.WeakSet()
_AT_EXIT = False


def track(state: Any) -> None:
    """Remember a hook state (weakly) so that :func:`shutdown` and the exit handler close it."""
    global _AT_EXIT
    _STATES.add(state)
    if not _AT_EXIT:
        atexit.register(_close_states)
        _AT_EXIT = True


def _close_states() -> None:
    for state in list(_STATES):
        try:
            state.close()
        except Exception as e:  # at exit: report, never raise
            logger.warning("tritter-comm: closing a hook state failed: %s", e)


def _release(module: Any) -> None:
    """Drop a DDP wrapper's reducer and the hook it holds; the module trains no more."""
    from torch.nn.parallel import DistributedDataParallel

    module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper
    if isinstance(module, DistributedDataParallel):
        for name in ("reducer", "logger"):
            if name in module.__dict__:
                delattr(module, name)
        module.__dict__["_comm_hooks"] = []


def shutdown(*modules: nn.Module, destroy_process_group: bool = True) -> None:
    """End a distributed job so that no rank aborts at exit.

    Closes every tritter-comm hook state (pending exchanges are waited for a bounded time and
    let go), releases the reducer of each DDP-wrapped ``modules`` given (the wrapper cannot
    train after this; its parameters stay usable), collects garbage while the interpreter is
    whole, and destroys the default process group if one is initialized. Call it at the end of
    the training script, in a ``finally:`` block so that it also runs when a step raises::

        try:
            train(ddp_model)
        finally:
            tritter_comm.shutdown(ddp_model)

    Args:
        modules: DDP models (or ``torch.compile`` wrappers of them) to release. Other modules
            are accepted and left as they are.
        destroy_process_group: also call ``torch.distributed.destroy_process_group()``.
    """
    _close_states()
    for m in modules:
        _release(m)
    gc.collect()
    if destroy_process_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

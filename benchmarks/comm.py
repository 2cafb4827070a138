"""DDP communication modes by name, and the bytes each one puts on the wire.

Used by the benchmarks to run the same training under different gradient exchanges:

==============  ================================================================================
mode            what the exchange does
==============  ================================================================================
none            DDP's own fp32 all-reduce (no hook)
fp16            PyTorch's ``fp16_compress_hook`` (all-reduce in fp16)
powersgd1/4     PyTorch's ``powerSGD_hook``, matrix approximation rank 1 / 4, error feedback,
                warm start; vanilla all-reduce for the first ``start_iter`` steps
vsa             ``tritter_comm.hooks.vsa_hook`` with ``VSAState()``'s defaults (int2)
vsa-ternary     the same hook with ``VSAState(mode="ternary")``
vsa-sign        same, ``mode="sign"``
vsa-int2        same, ``mode="int2"``
==============  ================================================================================

PyTorch's PowerSGD hook launches its second all-reduce from a future callback and hangs on gloo as
soon as the model has two or more buckets, so PowerSGD runs must build DDP with one bucket::

    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb_for(mode))
    state = register(ddp, mode)
    ... train ...
    print(bytes_per_step(mode, ddp, state))

To add a mode: add its name to :data:`MODES`, a branch to :func:`register` and one to
:func:`bytes_per_step`.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

__all__ = [
    "MODES",
    "VSA_MODES",
    "HookUnavailable",
    "bucket_cap_mb_for",
    "bytes_per_step",
    "fp32_allreduce_bytes",
    "register",
    "vsa_available",
    "vsa_options",
]

VSA_MODES = {"vsa": None, "vsa-ternary": "ternary", "vsa-sign": "sign", "vsa-int2": "int2"}
POWERSGD_RANKS = {"powersgd1": 1, "powersgd4": 4}
MODES = ("none", "fp16", *POWERSGD_RANKS, *VSA_MODES)

# PowerSGD: first steps with vanilla all-reduce (2 is the smallest value PyTorch accepts with error
# feedback / warm start, because DDP rebuilds its buckets after the first step).
POWERSGD_START_ITER = 2
POWERSGD_MIN_COMPRESSION_RATE = 2.0  # PyTorch's default
_ONE_BUCKET_MB = 1024  # larger than any model here: DDP then makes exactly one bucket


class HookUnavailable(RuntimeError):
    """The hook for a mode cannot be imported (e.g. tritter_comm is not built yet)."""


def _world(process_group: Any) -> int:
    return dist.get_world_size(process_group)


def _ring(numel: int, world: int, elem_bytes: float) -> float:
    """Bytes one rank sends in a ring all-reduce of ``numel`` elements."""
    return 2 * (world - 1) / world * numel * elem_bytes


def _grad_params(ddp_model: nn.Module) -> list[nn.Parameter]:
    return [p for p in ddp_model.parameters() if p.requires_grad]


def vsa_available() -> tuple[bool, str]:
    """Whether ``tritter_comm.hooks`` imports, and the reason if not."""
    try:
        from tritter_comm.hooks import VSAState, vsa_hook  # noqa: F401
    except Exception as e:  # ImportError, or the native module failing to load
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def bucket_cap_mb_for(comm: str) -> float | None:
    """The ``bucket_cap_mb`` to build DDP with for ``comm`` (None: DDP's default)."""
    _check(comm)
    return _ONE_BUCKET_MB if comm in POWERSGD_RANKS else None


def register(
    ddp_model: nn.Module, comm: str, *, process_group: Any = None, **kw: Any
) -> object | None:
    """Register the comm hook for ``comm`` on ``ddp_model``; return the hook state (or None).

    Args:
        ddp_model: a ``DistributedDataParallel`` model, built with ``bucket_cap_mb_for(comm)``.
        comm: one of :data:`MODES`.
        process_group: the group to reduce over (None: the default group).
        **kw: options for the hook state. PowerSGD: ``start_iter``, ``min_compression_rate``,
            ``seed``. VSA: passed to ``VSAState`` as keyword arguments (``seed``, ``block_size``,
            ``start_iter``, ...).

    Raises:
        ValueError: unknown mode or options.
        HookUnavailable: a ``vsa-*`` mode while ``tritter_comm.hooks`` does not import.
    """
    _check(comm)
    if comm == "none":
        if kw:
            raise ValueError(f"mode 'none' takes no options, got {sorted(kw)}")
        return None
    if comm == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        if kw:
            raise ValueError(f"mode 'fp16' takes no options, got {sorted(kw)}")
        ddp_model.register_comm_hook(process_group, default_hooks.fp16_compress_hook)
        return process_group
    if comm in POWERSGD_RANKS:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        unknown = set(kw) - {"start_iter", "min_compression_rate", "seed"}
        if unknown:
            raise ValueError(f"unknown PowerSGD options {sorted(unknown)}")
        state = psgd.PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=POWERSGD_RANKS[comm],
            start_powerSGD_iter=kw.get("start_iter", POWERSGD_START_ITER),
            min_compression_rate=kw.get("min_compression_rate", POWERSGD_MIN_COMPRESSION_RATE),
            use_error_feedback=True,
            warm_start=True,
            random_seed=kw.get("seed", 0),
        )
        ddp_model.register_comm_hook(state, psgd.powerSGD_hook)
        return state
    # vsa-*: the one dispatch of the package (tritter_comm.register)
    try:
        import tritter_comm
    except Exception as e:
        raise HookUnavailable(
            f"mode {comm!r} needs tritter_comm, which does not import ({type(e).__name__}: "
            f"{e}); build the package with `maturin develop` first") from e
    return tritter_comm.register(ddp_model, tritter_comm.VSAConfig(**vsa_options(comm, **kw)),
                                 process_group=process_group)


def vsa_options(comm: str, **kw: Any) -> dict[str, Any]:
    """``VSAState`` keyword arguments for the VSA mode ``comm`` (``vsa``: the defaults)."""
    mode = VSA_MODES[comm]
    return kw if mode is None else {"mode": mode, **kw}


def fp32_allreduce_bytes(ddp_model: nn.Module, *, process_group: Any = None) -> float:
    """Bytes per rank per step of DDP's plain fp32 ring all-reduce of all gradients."""
    numel = sum(p.numel() for p in _grad_params(ddp_model))
    return _ring(numel, _world(process_group), 4)


def _powersgd_elements(ddp_model: nn.Module, rank: int, min_rate: float) -> tuple[int, int]:
    """(elements all-reduced uncompressed, elements of P plus Q) per PowerSGD step.

    Mirrors ``powerSGD_hook``: each gradient is viewed as ``(shape[0], -1)``; it is compressed to
    P (n x r) and Q (m x r), r = min(n, m, rank), when n*m > (n+m)*r*min_compression_rate.
    """
    plain, low_rank = 0, 0
    for p in _grad_params(ddp_model):
        n = p.shape[0] if p.dim() > 0 else 1
        m = p.numel() // max(n, 1)
        r = min(n, m, rank)
        if n * m > (n + m) * r * min_rate:
            low_rank += (n + m) * r
        else:
            plain += p.numel()
    return plain, low_rank


def bytes_per_step(
    comm: str,
    ddp_model: nn.Module,
    state: object | None,
    *,
    process_group: Any = None,
    since: dict[str, Any] | None = None,
) -> float:
    """Bytes each rank sends per step under ``comm``.

    Analytic (ring all-reduce, ``2 (N-1)/N`` times the payload) for none, fp16 and PowerSGD (the
    steady state after ``start_iter``); measured from ``state.stats()`` for the VSA modes:
    ``bytes_sent / steps``, or the difference to ``since`` (an earlier ``stats()`` snapshot) to
    leave out warm-up steps.
    """
    _check(comm)
    world = _world(process_group)
    if comm == "none":
        return fp32_allreduce_bytes(ddp_model, process_group=process_group)
    if comm == "fp16":
        return fp32_allreduce_bytes(ddp_model, process_group=process_group) / 2
    if comm in POWERSGD_RANKS:
        min_rate = getattr(state, "min_compression_rate", POWERSGD_MIN_COMPRESSION_RATE)
        plain, low_rank = _powersgd_elements(ddp_model, POWERSGD_RANKS[comm], min_rate)
        # Three all-reduces: the uncompressed tensors, all Ps, all Qs.
        return _ring(plain, world, 4) + _ring(low_rank, world, 4)
    if state is None or not hasattr(state, "stats"):
        raise ValueError(f"mode {comm!r} needs the hook state returned by register()")
    stats = state.stats()
    sent, steps = stats["bytes_sent"], stats["steps"]
    if since is not None:
        sent, steps = sent - since["bytes_sent"], steps - since["steps"]
    if steps <= 0:
        raise ValueError("no steps recorded by the hook state")
    return sent / steps


def _check(comm: str) -> None:
    if comm not in MODES:
        raise ValueError(f"unknown comm mode {comm!r}; choose from {', '.join(MODES)}")

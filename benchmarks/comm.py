"""DDP communication modes by name, and the bytes each one puts on the wire.

Used by the benchmarks to run the same training under different gradient exchanges:

==============  ================================================================================
mode            what the exchange does
==============  ================================================================================
none            DDP's own fp32 all-reduce (no hook)
bf16            PyTorch's ``bf16_compress_hook`` (all-reduce in bf16): what mixed-precision jobs
                run, so the honest baseline
fp16            PyTorch's ``fp16_compress_hook`` (all-reduce in fp16)
fp8-2phase      the torchft pattern: e4m3 with one fp32 scale per row of ``FP8_ROW`` elements,
                all-to-all, fp32 sum, re-quantize, all-gather (see :class:`Fp8Rows`)
int4-2phase     qgZ-like (ZeRO++): symmetric int4 with one fp32 scale per block of
                ``INT4_BLOCK`` elements, the same two phases (see :class:`Int4Blocks`)
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

The two peers (``fp8-2phase``, ``int4-2phase``) are written here from their published
descriptions; no code was copied. Like tritter-comm's exchange, every rank decodes the same
gathered bytes (the owner of a chunk too), so replicas stay bit-identical. They keep no error
feedback (neither torchft's nor qgZ's description has one). Their hook runs both collectives
synchronously inside DDP's hook call: right for convergence and bytes, but it does not overlap
communication with the backward pass, so it understates their speed in a step-time benchmark.

Bytes are counted the same way for every mode: what one rank hands to collectives for other
ranks. A ring all-reduce of D elements of b bytes: ``2 (N-1)/N * D * b``; a two-phase exchange:
``(N-1)`` chunk payloads (codes plus scales, padded chunk) in each phase.

To add a mode: add its name to :data:`MODES`, a branch to :func:`register` and one to
:func:`bytes_per_step`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "FP8_ROW",
    "INT4_BLOCK",
    "MODES",
    "PEER_MODES",
    "VSA_MODES",
    "Fp8Rows",
    "HookUnavailable",
    "Int4Blocks",
    "PeerState",
    "peer_hook",
    "two_phase_average",
    "bucket_cap_mb_for",
    "bytes_per_step",
    "fp32_allreduce_bytes",
    "register",
    "two_phase_wire_bytes",
    "vsa_available",
    "vsa_options",
]

VSA_MODES = {"vsa": None, "vsa-ternary": "ternary", "vsa-sign": "sign", "vsa-int2": "int2"}
POWERSGD_RANKS = {"powersgd1": 1, "powersgd4": 4}
PEER_MODES = ("fp8-2phase", "int4-2phase")
MODES = ("none", "bf16", "fp16", *PEER_MODES, *POWERSGD_RANKS, *VSA_MODES)
HALF_HOOKS = {"bf16": "bf16_compress_hook", "fp16": "fp16_compress_hook"}

# fp8-2phase: torchft quantizes 2-D tensors with one scale per row; a DDP bucket is flat, so it is
# cut into rows of this many elements (our choice: about a hidden size, 0.8% of the bytes are
# scales). int4-2phase: elements per scale block. ZeRO++ quantizes gradients blockwise with one
# scale per block; 128 is the common int4 group size (GPTQ, AWQ), and a small block flatters the
# peer's accuracy, not its bytes (6% of them are scales). We could not confirm the block size of
# the ZeRO++ paper itself in this session.
FP8_ROW = 512
INT4_BLOCK = 128

# PowerSGD: first steps with vanilla all-reduce (2 is the smallest value PyTorch accepts with error
# feedback / warm start, because DDP rebuilds its buckets after the first step).
POWERSGD_START_ITER = 2
POWERSGD_MIN_COMPRESSION_RATE = 2.0  # PyTorch's default
# larger than any model (1 TiB): DDP then makes exactly one bucket. It was 1024, which the 303M
# "xl" transformer (1.21 GB of fp32 gradients) passed: two buckets, and on GPU ranks gloo
# aborted on a collective mismatch (issue 16's H200 run); register() now refuses that.
_ONE_BUCKET_MB = 1 << 20


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
        **kw: options for the hook state. fp8-2phase: ``row``; int4-2phase: ``block``.
            PowerSGD: ``start_iter``, ``min_compression_rate``, ``seed``. VSA: passed to ``VSAState`` as keyword arguments (``seed``, ``block_size``,
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
    if comm in HALF_HOOKS:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        if kw:
            raise ValueError(f"mode {comm!r} takes no options, got {sorted(kw)}")
        ddp_model.register_comm_hook(process_group, getattr(default_hooks, HALF_HOOKS[comm]))
        return process_group
    if comm in PEER_MODES:
        state = PeerState(_peer_codec(comm, **kw), process_group)
        ddp_model.register_comm_hook(state, peer_hook)
        return state
    if comm in POWERSGD_RANKS:
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        unknown = set(kw) - {"start_iter", "min_compression_rate", "seed"}
        if unknown:
            raise ValueError(f"unknown PowerSGD options {sorted(unknown)}")
        grad_bytes = sum(p.numel() * p.element_size() for p in ddp_model.parameters()
                         if p.requires_grad)
        cap = getattr(ddp_model, "bucket_bytes_cap", None)
        if cap is not None and cap < grad_bytes:
            raise ValueError(
                f"mode {comm!r} needs DDP built with one bucket: its bucket cap is {cap:,} bytes "
                f"for {grad_bytes:,} bytes of gradients; build DDP with "
                f"bucket_cap_mb=bucket_cap_mb_for({comm!r}) (PyTorch's PowerSGD hook issues "
                "collectives from future callbacks, which with two buckets can reach the "
                "ranks in different orders: a hang or an abort on gloo)")
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

    Analytic (ring all-reduce, ``2 (N-1)/N`` times the payload) for none, bf16, fp16 and PowerSGD
    (the steady state after ``start_iter``); measured from ``state.stats()`` for the two-phase
    peers and the VSA modes:
    ``bytes_sent / steps``, or the difference to ``since`` (an earlier ``stats()`` snapshot) to
    leave out warm-up steps.
    """
    _check(comm)
    world = _world(process_group)
    if comm == "none":
        return fp32_allreduce_bytes(ddp_model, process_group=process_group)
    if comm in HALF_HOOKS:
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


# ------------------------------------------------------------------------------ two-phase peers


class Fp8Rows:
    """e4m3 codes with one fp32 scale per row of ``row`` elements (torchft's quantized
    all-reduce): ``scale = max|row| / 448`` (448: the largest finite e4m3), codes
    ``round(x / scale)`` to the nearest e4m3, saturated. Payload per row: ``row`` bytes of codes
    then the scale's 4 bytes (all rows' codes first, then all scales)."""

    E4M3_MAX = 448.0

    def __init__(self, row: int = FP8_ROW):
        self.group = row

    def payload_bytes(self, numel: int) -> int:
        return numel + 4 * (numel // self.group)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.view(-1, self.group)
        amax = rows.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / self.E4M3_MAX, torch.ones_like(amax))
        codes = (rows / scale).clamp_(-self.E4M3_MAX, self.E4M3_MAX).to(torch.float8_e4m3fn)
        return torch.cat([codes.view(torch.uint8).reshape(-1), scale.reshape(-1).view(torch.uint8)])

    def decode(self, buf: torch.Tensor, numel: int) -> torch.Tensor:
        codes = buf[:numel].view(torch.float8_e4m3fn).float().view(-1, self.group)
        scale = buf[numel:].view(torch.float32).view(-1, 1)
        return (codes * scale).reshape(-1)


class Int4Blocks:
    """Symmetric int4 with one fp32 scale per block of ``block`` elements (qgZ's blockwise
    gradient quantization): ``scale = max|block| / 7``, codes ``round(x / scale)`` in -7..7,
    stored as ``code + 8`` two to a byte (low nibble first). Payload: all codes, then all
    scales."""

    def __init__(self, block: int = INT4_BLOCK):
        if block % 2:
            raise ValueError("int4 blocks pack two codes a byte: the block size must be even")
        self.group = block

    def payload_bytes(self, numel: int) -> int:
        return numel // 2 + 4 * (numel // self.group)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.view(-1, self.group)
        amax = blocks.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
        q = (blocks / scale).round_().clamp_(-7, 7)
        u = (q + 8).to(torch.uint8).reshape(-1, 2)
        packed = u[:, 0] | (u[:, 1] << 4)
        return torch.cat([packed, scale.reshape(-1).view(torch.uint8)])

    def decode(self, buf: torch.Tensor, numel: int) -> torch.Tensor:
        packed = buf[: numel // 2]
        codes = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1, self.group)
        scale = buf[numel // 2:].view(torch.float32).view(-1, 1)
        return ((codes.float() - 8) * scale).reshape(-1)


def _peer_codec(comm: str, **kw: Any):
    if comm == "fp8-2phase":
        unknown = set(kw) - {"row"}
        codec = Fp8Rows
    else:
        unknown = set(kw) - {"block"}
        codec = Int4Blocks
    if unknown:
        raise ValueError(f"unknown {comm} options {sorted(unknown)}")
    return codec(**kw)


def _chunk_numel(numel: int, world: int, group: int) -> int:
    """Elements per rank's chunk: whole scale groups, the tail zero-padded."""
    groups = -(-numel // group)
    return -(-groups // world) * group


def two_phase_wire_bytes(numel: int, world: int, codec: Any) -> int:
    """Bytes one rank sends in :func:`two_phase_average`: ``N-1`` payloads in each phase."""
    return 2 * (world - 1) * codec.payload_bytes(_chunk_numel(numel, world, codec.group))


class _TwoPhase:
    """One :func:`two_phase_average` of flat ``x``, in the steps a pipelined hook interleaves:
    the constructor encodes and launches the ``all_to_all``; :meth:`phase2` waits for it, sums
    the N decoded payloads in fp32 in rank order, divides by N, re-quantizes and launches the
    ``all_gather``; :meth:`finish` waits for that and decodes every rank's chunk. Every buffer a
    collective in flight reads or writes is held here until it is waited for."""

    __slots__ = ("codec", "group", "world", "n", "chunk", "size", "send", "recv", "mine",
                 "gathered", "work")

    def __init__(self, x: torch.Tensor, codec: Any, group: Any = None):
        self.codec, self.group = codec, group
        self.world = world = dist.get_world_size(group)
        self.n = x.numel()
        self.chunk = chunk = _chunk_numel(self.n, world, codec.group)
        flat = torch.zeros(chunk * world, dtype=torch.float32, device=x.device)
        flat[:self.n] = x.reshape(-1)
        self.size = codec.payload_bytes(chunk)
        self.send = torch.cat([codec.encode(c) for c in flat.view(world, chunk)])
        self.recv = torch.empty_like(self.send)
        self.mine = self.gathered = None
        self.work = dist.all_to_all_single(self.recv, self.send, group=group, async_op=True)

    def phase2(self) -> None:
        self.work.wait()
        total = torch.zeros(self.chunk, dtype=torch.float32, device=self.recv.device)
        for payload in self.recv.view(self.world, self.size):  # rank order: the same sum
            total += self.codec.decode(payload, self.chunk)
        self.send = self.recv = None
        self.mine = self.codec.encode(total.div_(self.world))
        self.gathered = torch.empty(self.world * self.size, dtype=torch.uint8,
                                    device=self.mine.device)
        self.work = dist.all_gather_into_tensor(self.gathered, self.mine, group=self.group,
                                                async_op=True)

    def finish(self) -> torch.Tensor:
        self.work.wait()
        out = torch.cat([self.codec.decode(p, self.chunk)
                         for p in self.gathered.view(self.world, self.size)])
        return out[:self.n]


def two_phase_average(x: torch.Tensor, codec: Any, *, group: Any = None) -> torch.Tensor:
    """The average over ranks of flat ``x``, by the two-phase quantized exchange.

    Every rank quantizes its N chunks and sends chunk c to rank c (``all_to_all``); rank c
    decodes the N payloads (its own included), sums them in fp32 in rank order, divides by N and
    re-quantizes; an ``all_gather`` of those payloads follows, and every rank decodes all of them.
    The result is the same bytes decoded the same way on every rank. Synchronous."""
    op = _TwoPhase(x, codec, group)
    op.phase2()
    return op.finish()


class PeerState:
    """State of :func:`peer_hook`: the codec, the group, and what was sent."""

    __slots__ = (
        # hyperparameters
        "codec", "process_group",
        # internal state
        "_bytes_sent", "_steps", "_pending",
    )

    def __init__(self, codec: Any, process_group: Any = None):
        self.codec = codec
        self.process_group = process_group
        self._bytes_sent = 0
        self._steps = 0
        # buckets in flight, oldest first: [exchange, DDP future, bucket tensor, stage]
        self._pending: list[list] = []

    def stats(self) -> dict[str, int]:
        """``bytes_sent`` (handed to collectives for other ranks) and ``steps`` so far."""
        return {"bytes_sent": self._bytes_sent, "steps": self._steps}


def peer_hook(state, bucket):  # no annotations: DDP checks them at run time
    """DDP comm hook: :func:`two_phase_average` of the bucket, pipelined as the vsa hook's
    exchanges are (tritter_comm/hooks/ddp.py), so that a peer row's step time is not
    understated by waiting where ours overlaps. The call for bucket i launches its
    ``all_to_all``; completes the buckets whose ``all_gather`` an earlier call launched; and runs
    phase 2 of the buckets whose ``all_to_all`` an earlier call launched. The last bucket's call
    drains the rest. Every collective is launched from a hook call, in the same order on every
    rank, and no Python of ours runs on gloo's threads."""
    t = bucket.buffer()
    x = t if t.dtype == torch.float32 else t.float()
    pending = state._pending
    try:
        earlier = list(pending)
        pending.append([_TwoPhase(x, state.codec, state.process_group),
                        torch.futures.Future(), t, 1])
        state._bytes_sent += two_phase_wire_bytes(
            x.numel(), dist.get_world_size(state.process_group), state.codec)
        for e in earlier:
            if e[3] == 2:
                _peer_complete(e)
                pending.remove(e)
        for e in earlier:
            if e[3] == 1:
                e[0].phase2()
                e[3] = 2
        fut = pending[-1][1]
        if bucket.is_last():
            for e in pending:
                if e[3] == 1:
                    e[0].phase2()
                    e[3] = 2
            for e in pending:
                _peer_complete(e)
            pending.clear()
            state._steps += 1
        return fut
    except BaseException as err:
        for e in pending:
            if not e[1].done():
                e[1].set_exception(err)
        pending.clear()
        raise


def _peer_complete(e: list) -> None:
    op, fut, t, _ = e
    t.copy_(op.finish())
    fut.set_result(t)


def _check(comm: str) -> None:
    if comm not in MODES:
        raise ValueError(f"unknown comm mode {comm!r}; choose from {', '.join(MODES)}")

"""The two-phase compressed all-reduce (DESIGN.md, "The exchange"), independent of DDP.

With N ranks a flat vector of D elements is cut into N block-aligned chunks of C elements (the
last ones shorter or empty). Each chunk's payload body travels in a slot of S bytes, the body
size of a full chunk, so every collective has equal splits.

1. every rank encodes its N chunks (client residual) and ``all_to_all``s them: chunk c to rank c;
2. rank c decodes the N bodies of its chunk, sums them in rank order, divides by N, adds its
   server residual and re-encodes;
3. ``all_gather`` of the re-encoded chunks; every rank decodes all of them.

Every rank decodes the same bytes, so every rank ends with the same result, bit for bit. Each
rank sends ``2 (N-1) S`` bytes: the scaling of a ring all-reduce at 1.6 bits an element.

Phase 1 alone is a compressed reduce-scatter (the FSDP hooks): ``Plan.even`` cuts the vector
into the caller's equal shards (FSDP's, padding included; not block-aligned), ``start`` sends
them and ``reduce_scatter`` decodes the owned one.

An int2 encode without a residual (no error feedback in that phase) uses the unbiased scale
(``codec.encode(..., unbiased=True)``): with fresh keys every step its decoded chunk is then an
unbiased estimate of the input, where least squares' shrinks it by about 0.88 with nothing to
carry the difference to a later step. An encode with a residual uses least squares, whose
smaller error is what the residual keeps; one with a partial residual (``int2-topk``, which drops
its blocks of least energy) takes the unbiased scale, as the dropped blocks would lose their
shrinkage.

A rank whose input holds NaN or Inf sends bodies whose scales are NaN (its residual untouched);
the owner's average is then NaN, it sends NaN scales on, and every rank decodes a NaN chunk, so
``GradScaler`` sees the overflow everywhere in the same step.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Callable, Optional

import torch

from .codec import (MODES, body_len, decode_body_into, decode_sum_into, encode_body_into,
                    encode_body_or_poison_into)

#: Streams: bits 0 phase, 1-11 chunk, 12-31 bucket, 32-63 step.
MAX_WORLD = 1 << 11
MAX_BUCKETS = 1 << 20


def stream_id(step: int, bucket: int, chunk: int, phase: int) -> int:
    """The key stream of one chunk in one phase (identical on every rank)."""
    return ((step & 0xFFFFFFFF) << 32) | (bucket << 12) | (chunk << 1) | phase


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a vector of ``numel`` elements is cut for ``world`` ranks, and the mode of each phase
    (phase 1: every rank's chunks; phase 2: each owner's re-encoded average)."""

    numel: int
    world: int
    block_log2: int
    mode_id: int
    chunk: int  # C: a multiple of the block size (make), or numel / world (even)
    slot: int  # S, body bytes of a full chunk in phase 1
    mode2_id: int  # the mode of phase 2
    slot2: int  # body bytes of a full chunk in phase 2

    @staticmethod
    def _slot(chunk: int, mode_id: int, block_log2: int) -> int:
        # slots rounded up to 4 bytes keep every body's f32 scales aligned
        return -(-body_len(chunk, mode_id, block_log2) // 4) * 4

    @classmethod
    def make(cls, numel: int, world: int, block_log2: int, mode_id: int,
             mode2_id: Optional[int] = None) -> "Plan":
        block = 1 << block_log2
        per_rank = -(-numel // world)
        chunk = -(-per_rank // block) * block
        mode2_id = mode_id if mode2_id is None else mode2_id
        return cls(numel, world, block_log2, mode_id, chunk, cls._slot(chunk, mode_id, block_log2),
                   mode2_id, cls._slot(chunk, mode2_id, block_log2))

    @classmethod
    def even(cls, numel: int, world: int, block_log2: int, mode_id: int,
             mode2_id: Optional[int] = None) -> "Plan":
        """Chunks of exactly ``numel / world`` elements, block-aligned or not: FSDP's shards.

        Each chunk is encoded as a vector of its own (its last block padded by the codec).
        """
        if numel <= 0 or numel % world:
            raise ValueError(f"cannot cut {numel} elements into {world} equal chunks")
        chunk = numel // world
        mode2_id = mode_id if mode2_id is None else mode2_id
        return cls(numel, world, block_log2, mode_id, chunk, cls._slot(chunk, mode_id, block_log2),
                   mode2_id, cls._slot(chunk, mode2_id, block_log2))

    def bounds(self, c: int) -> tuple[int, int]:
        lo = min(c * self.chunk, self.numel)
        return lo, min(lo + self.chunk, self.numel)

    def body_nbytes(self, c: int, phase: int = 0) -> int:
        lo, hi = self.bounds(c)
        mode_id = self.mode2_id if phase else self.mode_id
        return body_len(hi - lo, mode_id, self.block_log2) if hi > lo else 0

    @property
    def wire_bytes(self) -> int:
        """Bytes one rank sends in one exchange: (N-1) slots in each phase."""
        return (self.world - 1) * (self.slot + self.slot2)

    @property
    def reduce_scatter_wire_bytes(self) -> int:
        """Bytes one rank sends in phase 1 alone (a compressed reduce-scatter)."""
        return (self.world - 1) * self.slot


@dataclasses.dataclass
class Timers:
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0


_NAN_LE = torch.tensor([0x00, 0x00, 0xC0, 0x7F], dtype=torch.uint8)  # float32 NaN


def _poison(slot: torch.Tensor, nblocks: int) -> None:
    """Mark a body as non-finite: NaN scales, zero codes."""
    slot.zero_()
    slot[: 4 * nblocks].view(nblocks, 4).copy_(_NAN_LE)


def _nblocks(n: int, block_log2: int) -> int:
    return -(-n // (1 << block_log2))


def _encode(x, slot, *, seed, stream, plan, residual, timers, phase=0) -> None:
    """Encode into ``slot``; on NaN/Inf poison it instead and leave ``residual`` as it was.

    CPU tensors (Rust): the codec raises, and the slot is poisoned here. CUDA tensors
    (torch/Triton): the non-finite flag stays on the device and the encode kernel itself
    writes the poisoned body and skips the residual (no host synchronization; issue 16).

    A residual kept in a narrower dtype (``VSAState(residual_dtype=torch.bfloat16)``, half the
    memory) is widened to float32 for the encode and rounded back after it. The widened copy is
    encoded in one pass (``check_finite=False``): on an error it is dropped, so the residual is
    left as it was all the same; in place, the codec needs a second pass to promise that.
    """
    t0 = time.perf_counter()
    n = x.numel()
    work = residual
    if residual is not None and residual.dtype != x.dtype:
        work = residual.to(x.dtype)
    mode_id = plan.mode2_id if phase else plan.mode_id
    unbiased = (residual is None or getattr(residual, "partial", False)) \
        and mode_id == MODES["int2"]
    body = slot[: body_len(n, mode_id, plan.block_log2)]
    if x.device.type != "cpu":  # the codec's torch/Triton backend
        bad = encode_body_or_poison_into(x, body, seed=seed, stream=stream, mode_id=mode_id,
                                         block_log2=plan.block_log2, residual=work,
                                         unbiased=unbiased)
        if work is not residual:
            # on the flag the widened copy is as it was; where() keeps even a NaN's payload
            keep = bad.bool()
            if isinstance(residual, torch.Tensor):
                residual.copy_(torch.where(keep, residual, work.to(residual.dtype)))
            else:  # stored as codes and scales (residual.py): those stay as they are
                residual.copy_(work, keep=keep)
    else:
        try:
            encode_body_into(x, body, seed=seed, stream=stream, mode_id=mode_id,
                             block_log2=plan.block_log2, residual=work,
                             check_finite=work is residual, unbiased=unbiased)
            if work is not residual:
                residual.copy_(work)
        except ValueError:
            _poison(slot, _nblocks(n, plan.block_log2))
    timers.encode_seconds += time.perf_counter() - t0


def _decode(slot, out, *, seed, stream, plan, timers, phase=0) -> None:
    t0 = time.perf_counter()
    n = out.numel()
    mode_id = plan.mode2_id if phase else plan.mode_id
    decode_body_into(slot[: body_len(n, mode_id, plan.block_log2)], out,
                     seed=seed, stream=stream, mode_id=mode_id,
                     block_log2=plan.block_log2)
    timers.decode_seconds += time.perf_counter() - t0


class Exchange:
    """One two-phase exchange of one flat float32 vector; the caller drives its phases.

    ``start`` encodes and launches the ``all_to_all``; ``reduce`` waits for it, averages the
    owned chunk and launches the ``all_gather``; ``finish`` decodes the gathered chunks into the
    output. Phases may interleave with other exchanges as long as every rank calls them in the
    same order (collectives are issued only from these calls, never from callbacks).
    """

    def __init__(self, plan: Plan, *, rank: int, group, seed: int, step: int, key: int,
                 timers: Timers, fixed_keys: bool = False):
        self.plan = plan
        self.rank = rank
        self.group = group
        self.seed = seed
        self.step = 0 if fixed_keys else step
        self.key = key
        self.timers = timers
        # Collectives in flight and the buffers they read and write. Every buffer handed to a
        # collective is held here until the collective has been waited for, so that the last
        # reference to it is dropped on the caller's thread (and stream), never on a backend's.
        self._a2a = None
        self._ag = None
        self._send = None
        self._recv = None
        self._mine = None
        self._gathered = None

    def _stream(self, chunk: int, phase: int) -> int:
        return stream_id(self.step, self.key, chunk, phase)

    def start(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> None:
        """Encode ``x`` (flat float32, with ``residual`` updated) and launch the all_to_all."""
        p = self.plan
        send = torch.zeros(p.world * p.slot, dtype=torch.uint8, device=x.device)
        for c in range(p.world):
            lo, hi = p.bounds(c)
            if hi > lo:
                _encode(x[lo:hi], send[c * p.slot:(c + 1) * p.slot], seed=self.seed,
                        stream=self._stream(c, 0), plan=p,
                        residual=None if residual is None else residual[lo:hi],
                        timers=self.timers)
        self._send, self._recv = send, torch.empty_like(send)
        self._a2a = torch.distributed.all_to_all_single(self._recv, send, group=self.group,
                                                        async_op=True)

    def reduce(self, server_residual: Optional[torch.Tensor]) -> None:
        """Wait for the all_to_all, average the owned chunk, launch the all_gather."""
        p = self.plan
        self._a2a.wait()
        self._a2a = self._send = None
        lo, hi = p.bounds(self.rank)
        mine = torch.zeros(p.slot2, dtype=torch.uint8, device=self._recv.device)
        if hi > lo:
            acc = self._sum_owned(torch.empty(hi - lo, dtype=torch.float32, device=mine.device))
            acc /= p.world
            _encode(acc, mine, seed=self.seed, stream=self._stream(self.rank, 1), plan=p,
                    residual=server_residual, timers=self.timers, phase=1)
        self._recv = None
        self._mine = mine
        self._gathered = torch.empty(p.world * p.slot2, dtype=torch.uint8, device=mine.device)
        self._ag = torch.distributed.all_gather_into_tensor(self._gathered, mine,
                                                            group=self.group, async_op=True)

    def _sum_owned(self, acc: torch.Tensor) -> torch.Tensor:
        """Decode the received bodies of the owned chunk and sum them, in rank order, into
        ``acc`` (flat float32): the same bytes in the same order give the same sum anywhere."""
        p = self.plan
        t0 = time.perf_counter()
        # CUDA: one kernel that writes the sum once; CPU: the Rust decoder, body by body
        decode_sum_into(self._recv, acc, slot=p.slot, seed=self.seed,
                        stream=self._stream(self.rank, 0), mode_id=p.mode_id,
                        block_log2=p.block_log2)
        self.timers.decode_seconds += time.perf_counter() - t0
        return acc

    def reduce_scatter(self, out: torch.Tensor, *, average: bool = True) -> torch.Tensor:
        """Phase 1 only (a reduce-scatter): wait for the all_to_all and write the sum over ranks
        of this rank's chunk (divided by the world size when ``average``) into ``out``, flat
        float32 of the chunk's length. Launches no collective; the exchange ends here."""
        p = self.plan
        self._a2a.wait()
        self._a2a = self._send = None
        lo, hi = p.bounds(self.rank)
        if out.numel() != hi - lo or out.dtype != torch.float32:
            raise ValueError(f"out must be float32 of {hi - lo} elements, got {out.dtype} "
                             f"of {out.numel()}")
        if hi > lo:
            self._sum_owned(out)
            if average:
                out /= p.world
        self._recv = None
        return out

    @property
    def reducing(self) -> bool:
        """Whether phase 1's ``all_to_all`` is in flight (``reduce`` comes next)."""
        return self._a2a is not None

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """Wait for the all_gather and decode every chunk into ``out`` (flat float32,
        ``numel`` elements). Launches no collective."""
        p = self.plan
        self._ag.wait()
        self._ag = self._mine = None
        for c in range(p.world):
            lo, hi = p.bounds(c)
            if hi > lo:
                _decode(self._gathered[c * p.slot2:(c + 1) * p.slot2], out[lo:hi],
                        seed=self.seed, stream=self._stream(c, 1), plan=p, timers=self.timers,
                        phase=1)
        self._gathered = None
        return out

    def release(self, timeout: float) -> None:
        """Give up the exchange: wait at most ``timeout`` seconds for the collective in
        flight, so that no backend thread still holds its buffers, then drop them. Raises
        what the wait raises (a peer gone, the timeout); the buffers are dropped all the same.
        """
        work, self._a2a, self._ag = self._a2a or self._ag, None, None
        try:
            if work is not None:
                work.wait(datetime.timedelta(seconds=timeout))
        finally:
            self._send = self._recv = self._mine = self._gathered = None


Callback = Callable[[torch.Tensor], torch.Tensor]

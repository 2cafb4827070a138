"""Error-feedback residuals stored narrow: int8, int4 or int2 codes with one float32 scale a block.

A client residual covers a bucket's (DDP) or a unit's (FSDP) *full* flat gradient on every rank,
so in float32 it takes as much memory as the gradient, and under FSDP ``N`` times the rank's
gradient shard (issue 19). :class:`QuantizedResidual` keeps it as integer codes with one float32
scale per block of :data:`BLOCK` elements. int8 and int4 are symmetric around zero with an absmax
scale (codes -qmax..qmax). int2 has no code for zero: its four levels are (c - 1.5) x step, c in
0..3, with step = 0.9957 x the block's root mean square (the uniform 4-level quantizer of least
squared error for a Gaussian: about 12% of a Gaussian block's energy is dropped, where int4
drops under 1%).

==========  ==============================  =================================================
format      bytes an element (codes+scale)  vs the fp32 gradient
==========  ==============================  =================================================
``int8``    1 + 4/64 = 1.0625               0.27x (FSDP: 0.53x the shard at 2 ranks, 1.06x at 4)
``int4``    0.5 + 4/64 = 0.5625             0.14x (FSDP: 0.28x the shard at 2 ranks, 0.56x at 4)
``int2``    0.25 + 4/64 = 0.3125            0.078x (FSDP: 0.63x the shard at 8 ranks, 0.94x at 12)
==========  ==============================  =================================================

``int2-topk`` (:class:`TopkResidual`) keeps a fixed number of blocks a segment, the ones of most
energy at each store, as int2 codes with their step and their block index (16 + 4 + 4 = 24 bytes
for 64 elements); the other blocks' residual is dropped. The number is what a byte budget allows
(under FSDP the rank's fp32 gradient shard, one segment: ``4 x segment`` bytes), so its memory
stays within the shard at any rank count: about 82% of the blocks at 13 ranks, 17% at 64.

Rounding is to nearest (deterministic: the same inputs give the same codes on any rank, run or
thread count). What the rounding drops is not fed back: it is the price of the memory.

The exchange (``exchange._encode``) handles a residual kept in a narrower dtype by widening it to
float32 (``residual.to(torch.float32)``), encoding with the wide copy, and writing it back
(``residual.copy_(wide)``); a slice ``residual[lo:hi]`` is one chunk's residual. A
:class:`QuantizedResidual` answers exactly those three calls (``dtype``, ``to``, ``copy_`` and
slicing; see :class:`Window`), so the exchange runs it unchanged, and a non-finite input leaves
it untouched as it leaves a bf16 residual.

Blocks never straddle a chunk: the residual is made with ``segment``, the length of the chunks
it will be sliced into (FSDP's shards: ``numel / world``, not block-aligned), and every segment
starts a new block. DDP's chunks are multiples of the codec's block (256 or more), so one segment
(the default) keeps them aligned too. A slice must start at a block boundary and end at a block
boundary, a segment's end, or the end; an ``int2-topk`` residual is read and written a whole
segment at a time (FSDP's chunks).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["BITS", "BLOCK", "FORMATS", "TOPK", "QuantizedResidual", "TopkResidual", "Window",
           "bytes_per_element", "fmt_of", "is_form", "make", "nbytes", "from_state", "to_state"]

#: Elements per scale.
BLOCK = 64
#: Narrow formats and their largest code: codes are -qmax..qmax (int8, int4); int2's are 0..3,
#: the levels -1.5, -0.5, 0.5, 1.5 times the block's step.
FORMATS = {"int8": 127, "int4": 7, "int2": 3}
#: Bits a code.
BITS = {"int8": 8, "int4": 4, "int2": 2}
#: int2 codes on the blocks of most energy, as many as a byte budget allows.
TOPK = "int2-topk"
#: Bytes a kept block of ``int2-topk`` takes: 64 2-bit codes, a float32 step, an int32 index.
TOPK_BLOCK_BYTES = BLOCK * 2 // 8 + 4 + 4


def bytes_per_element(fmt: str) -> float:
    """Memory an element of a narrow format takes: its code plus its share of a block's float32
    scale (int8 1.0625, int4 0.5625, int2 0.3125)."""
    return BITS[fmt] / 8 + 4 / BLOCK


#: int2's step over the block's root mean square: the uniform 4-level quantizer of least squared
#: error for a Gaussian (Max, 1960).
INT2_STEP = 0.9957


def _int2_encode(v: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks ``v`` (rows of :data:`BLOCK`, zero past ``count`` elements) as packed int2 codes
    (16 bytes a row) and their steps (0.9957 x the rms of the row's ``count`` elements)."""
    step = v.square().sum(dim=1).div_(count).sqrt_().mul_(INT2_STEP)
    inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    u = torch.floor(v * inv.unsqueeze(1)).add_(2).clamp_(0, 3).to(torch.uint8).view(-1, 4)
    return u[:, 0] | (u[:, 1] << 2) | (u[:, 2] << 4) | (u[:, 3] << 6), step


def _nblocks(length: int) -> int:
    """Blocks of :data:`BLOCK` that hold ``length`` elements (the last one may be short)."""
    return -(-length // BLOCK)


def _counts(nblocks: int, length: int, device) -> torch.Tensor:
    """Elements in each of the ``nblocks`` blocks of a segment piece of ``length``: 64, and the
    last block its own (its padding does not count)."""
    count = torch.full((nblocks,), float(BLOCK), device=device)
    if nblocks:
        count[-1] = length - (nblocks - 1) * BLOCK
    return count


def _int2_decode(packed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_int2_encode`: rows of :data:`BLOCK` levels (c - 1.5) x step."""
    q = torch.stack([(packed >> s) & 0x03 for s in (0, 2, 4, 6)], dim=1).reshape(-1, BLOCK)
    return (q.to(torch.float32) - 1.5) * step.unsqueeze(1)


class QuantizedResidual:
    """A residual of ``n`` elements stored as ``fmt`` codes with one float32 scale a block.

    Args:
        n: elements.
        fmt: ``"int8"``, ``"int4"`` or ``"int2"``.
        device: where the codes and scales live.
        segment: the length of the chunks the residual is sliced into (each starts a block);
            default ``n`` (one segment).
    """

    __slots__ = ("n", "fmt", "segment", "codes", "scales")

    #: Whether a store drops part of what it is given beyond rounding (``int2-topk``'s unkept
    #: blocks): the int2 encodes that use such a residual take the unbiased scale
    #: (``exchange._encode``), since it cannot return least squares' shrinkage of what it drops.
    partial = False

    def __init__(self, n: int, fmt: str, device=None, segment: Optional[int] = None):
        if fmt not in FORMATS:
            raise ValueError(f"residual format must be one of {list(FORMATS)}, got {fmt!r}")
        self.n = int(n)
        self.fmt = fmt
        self.segment = self.n if not segment else int(segment)
        nblocks = self._padded_len() // BLOCK
        self.codes = torch.zeros(nblocks * self._block_bytes,
                                 dtype=torch.int8 if fmt == "int8" else torch.uint8, device=device)
        self.scales = torch.zeros(nblocks, dtype=torch.float32, device=device)

    # -- layout ------------------------------------------------------------------------------

    @property
    def _block_bytes(self) -> int:
        """Code bytes a block of :data:`BLOCK` elements."""
        return BLOCK * BITS[self.fmt] // 8

    def _seg_padded(self) -> int:
        return _nblocks(self.segment) * BLOCK

    def _padded_len(self) -> int:
        if self.n == 0:
            return 0
        full, tail = divmod(self.n, self.segment)
        return full * self._seg_padded() + _nblocks(tail) * BLOCK

    def _pos(self, i: int) -> int:
        """Padded position of element ``i``."""
        seg, off = divmod(i, self.segment)
        return seg * self._seg_padded() + off

    # -- what the exchange calls ---------------------------------------------------------------

    def numel(self) -> int:
        return self.n

    @property
    def dtype(self) -> torch.dtype:
        return self.codes.dtype  # never float32: the exchange widens it with .to()

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 4

    def __getitem__(self, s: slice) -> "Window":
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("a QuantizedResidual is sliced by a contiguous range")
        lo, hi, _ = s.indices(self.n)
        return Window(self, lo, max(lo, hi))

    def to(self, *args, **kwargs) -> Union[torch.Tensor, "QuantizedResidual"]:
        return Window(self, 0, self.n).to(*args, **kwargs)

    def copy_(self, src: torch.Tensor,
              keep: Optional[torch.Tensor] = None) -> "QuantizedResidual":
        Window(self, 0, self.n).copy_(src, keep=keep)
        return self

    # -- whole-vector reads, moves and checkpoints ---------------------------------------------

    def dequantize(self) -> torch.Tensor:
        """The residual as float32 (``n`` elements)."""
        out = torch.empty(self.n, dtype=torch.float32, device=self.device)
        seg = self.segment
        for lo in range(0, self.n, max(seg, 1)):  # n == 0: nothing
            hi = min(lo + seg, self.n)
            out[lo:hi] = self._load(lo, hi)
        return out

    def moved(self, device) -> "QuantizedResidual":
        r = object.__new__(QuantizedResidual)
        r.n, r.fmt, r.segment = self.n, self.fmt, self.segment
        r.codes, r.scales = self.codes.to(device), self.scales.to(device)
        return r

    # -- the codes ---------------------------------------------------------------------------

    def _range(self, lo: int, hi: int) -> tuple[int, int]:
        """Blocks [b0, b1) holding elements [lo, hi), which must start a block and not cross
        a segment's end."""
        p = self._pos(lo)
        if p % BLOCK:
            raise ValueError(f"residual slice [{lo}:{hi}] does not start at a block boundary "
                             f"(blocks of {BLOCK} restarting every {self.segment} elements)")
        if hi > lo and (hi - 1) // self.segment != lo // self.segment:
            raise ValueError(f"residual slice [{lo}:{hi}] crosses a segment of {self.segment}")
        return p // BLOCK, _nblocks(p + hi - lo)

    def _load(self, lo: int, hi: int) -> torch.Tensor:
        b0, b1 = self._range(lo, hi)
        per = self._block_bytes
        packed = self.codes[b0 * per:b1 * per]
        if self.fmt == "int8":
            q = packed.to(torch.float32)
        elif self.fmt == "int4":
            q = torch.stack(((packed & 0x0F), (packed >> 4)), dim=1).reshape(-1)
            q = q.to(torch.float32) - 8.0
        else:
            return _int2_decode(packed, self.scales[b0:b1]).reshape(-1)[: hi - lo]
        q = q.view(-1, BLOCK) * (self.scales[b0:b1] / FORMATS[self.fmt]).unsqueeze(1)
        return q.reshape(-1)[: hi - lo]

    def _store(self, lo: int, hi: int, src: torch.Tensor,
               keep: Optional[torch.Tensor] = None) -> None:
        b0, b1 = self._range(lo, hi)
        if b1 == b0:
            return
        v = torch.zeros((b1 - b0) * BLOCK, dtype=torch.float32, device=self.device)
        v[: hi - lo] = src.reshape(-1)
        v = v.view(-1, BLOCK)
        per = self._block_bytes
        cs = slice(b0 * per, b1 * per)
        if self.fmt == "int2":
            codes, scale = _int2_encode(v, _counts(b1 - b0, hi - lo, self.device))
        else:
            qmax = FORMATS[self.fmt]
            scale = v.abs().amax(dim=1)
            inv = torch.where(scale > 0, qmax / scale, torch.zeros_like(scale))
            q = torch.round(v * inv.unsqueeze(1)).clamp_(-qmax, qmax).reshape(-1)
            if self.fmt == "int8":
                codes = q.to(torch.int8)
            else:
                u = (q + 8.0).to(torch.uint8).view(-1, 2)
                codes = u[:, 0] | (u[:, 1] << 4)
        if keep is not None:  # a device flag: where it is set, the stored bits stay as they are
            scale = torch.where(keep, self.scales[b0:b1], scale)
            codes = torch.where(keep, self.codes[cs], codes)
        self.scales[b0:b1] = scale
        self.codes[cs] = codes


class TopkResidual(QuantizedResidual):
    """A residual of ``n`` elements that keeps, in each segment, the ``kept`` blocks of
    :data:`BLOCK` elements of most energy (sum of squares) at each store, as int2 codes with
    their step and block index (:data:`TOPK_BLOCK_BYTES`, 24 bytes a block); the other blocks
    read back as zero. Read and written a whole segment at a time.

    Args:
        n: elements.
        device: where the codes, steps and indices live.
        segment: the length of the chunks it is sliced into; default ``n``.
        kept: blocks kept a segment (a segment with fewer keeps them all);
            :meth:`blocks_within` gives it for a byte budget.
    """

    __slots__ = ("kept", "index")

    def __init__(self, n: int, device=None, segment: Optional[int] = None, kept: int = 0):
        self.n = int(n)
        self.fmt = TOPK
        self.segment = self.n if not segment else int(segment)
        self.kept = int(kept)
        if self.kept < 0:
            raise ValueError(f"an int2-topk residual keeps a count of blocks, got {kept!r}")
        ks = self._kept_per_segment()
        self.codes = torch.zeros(sum(ks) * self._block_bytes, dtype=torch.uint8, device=device)
        self.scales = torch.zeros(sum(ks), dtype=torch.float32, device=device)
        self.index = torch.cat([torch.arange(k, dtype=torch.int32) for k in ks]
                               or [torch.zeros(0, dtype=torch.int32)]).to(device)

    @staticmethod
    def blocks_within(n: int, segment: Optional[int], budget: float) -> int:
        """The blocks a segment may keep so that all of them take at most ``budget`` bytes."""
        seg = int(segment) if segment else int(n)
        nseg = -(-int(n) // seg) if n else 1
        return max(0, int(budget // (nseg * TOPK_BLOCK_BYTES)))

    def _kept_per_segment(self) -> list[int]:
        seg = max(self.segment, 1)
        return [min(self.kept, _nblocks(min(lo + seg, self.n) - lo))
                for lo in range(0, self.n, seg)]

    def _segment(self, lo: int, hi: int) -> tuple[int, int, int]:
        """(first slot, kept, blocks) of the segment [lo, hi), which must be a whole one."""
        seg = max(self.segment, 1)
        if lo % seg or hi != min(lo + seg, self.n):
            raise ValueError(f"an int2-topk residual is read and written a whole segment of "
                             f"{self.segment} at a time, not [{lo}:{hi}]")
        full = min(self.kept, _nblocks(seg))  # every segment before the last is whole
        nb = _nblocks(hi - lo)
        return (lo // seg) * full, min(self.kept, nb), nb

    @property
    def _block_bytes(self) -> int:
        return BLOCK * 2 // 8

    @property
    def partial(self) -> bool:
        return self.n > 0 and self.kept < _nblocks(min(self.segment, self.n))

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 4 + self.index.numel() * 4

    def moved(self, device) -> "TopkResidual":
        r = object.__new__(TopkResidual)
        r.n, r.fmt, r.segment, r.kept = self.n, self.fmt, self.segment, self.kept
        r.codes, r.scales = self.codes.to(device), self.scales.to(device)
        r.index = self.index.to(device)
        return r

    def _load(self, lo: int, hi: int) -> torch.Tensor:
        o, k, nb = self._segment(lo, hi)
        out = torch.zeros(nb, BLOCK, dtype=torch.float32, device=self.device)
        if k:
            per = self._block_bytes
            out.index_copy_(0, self.index[o:o + k].long(),
                            _int2_decode(self.codes[o * per:(o + k) * per], self.scales[o:o + k]))
        return out.reshape(-1)[: hi - lo]

    def _store(self, lo: int, hi: int, src: torch.Tensor,
               keep: Optional[torch.Tensor] = None) -> None:
        o, k, nb = self._segment(lo, hi)
        if k == 0:
            return
        v = torch.zeros(nb * BLOCK, dtype=torch.float32, device=self.device)
        v[: hi - lo] = src.reshape(-1)
        v = v.view(nb, BLOCK)
        if k < nb:  # the blocks of most energy, in block order
            idx = torch.topk(v.square().sum(dim=1), k, sorted=False).indices.sort().values
        else:
            idx = torch.arange(nb, device=self.device)
        count = _counts(nb, hi - lo, self.device).index_select(0, idx)
        codes, step = _int2_encode(v.index_select(0, idx), count)
        idx = idx.to(torch.int32)
        per = self._block_bytes
        cs = slice(o * per, (o + k) * per)
        if keep is not None:  # the exchange's non-finite flag: the stored bits stay
            idx = torch.where(keep, self.index[o:o + k], idx)
            step = torch.where(keep, self.scales[o:o + k], step)
            codes = torch.where(keep, self.codes[cs], codes)
        self.index[o:o + k] = idx
        self.scales[o:o + k] = step
        self.codes[cs] = codes


class Window:
    """``residual[lo:hi]``: what ``exchange._encode`` widens (``.to(float32)``) and writes back
    (``.copy_``); a sub-slice is relative to the window, as a tensor's is."""

    __slots__ = ("parent", "lo", "hi")

    def __init__(self, parent: QuantizedResidual, lo: int, hi: int):
        self.parent, self.lo, self.hi = parent, lo, hi

    @property
    def partial(self) -> bool:
        return self.parent.partial

    def numel(self) -> int:
        return self.hi - self.lo

    @property
    def dtype(self) -> torch.dtype:
        return self.parent.dtype

    @property
    def device(self) -> torch.device:
        return self.parent.device

    def __getitem__(self, s: slice) -> "Window":
        lo, hi, step = s.indices(self.numel())
        if step != 1:
            raise TypeError("a residual window is sliced by a contiguous range")
        return Window(self.parent, self.lo + lo, self.lo + max(lo, hi))

    def to(self, *args, **kwargs) -> torch.Tensor:
        """The window widened: only ``to(torch.float32)`` (or float64) is meaningful."""
        return self._load().to(*args, **kwargs)

    def _load(self) -> torch.Tensor:
        p, seg = self.parent, self.parent.segment
        parts = []
        lo = self.lo
        while lo < self.hi:  # segment by segment (a window of DDP's covers one)
            hi = min(self.hi, (lo // seg + 1) * seg)
            parts.append(p._load(lo, hi))
            lo = hi
        if not parts:
            return torch.empty(0, dtype=torch.float32, device=p.device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def copy_(self, src: torch.Tensor, keep: Optional[torch.Tensor] = None) -> "Window":
        """Store ``src``; where the 0-dim bool device tensor ``keep`` is set, leave the codes
        and scales as they are instead (the exchange's non-finite flag, without a host sync)."""
        if src.numel() != self.numel():
            raise ValueError(f"copying {src.numel()} elements into a residual window of "
                             f"{self.numel()}")
        p, seg = self.parent, self.parent.segment
        src = src.reshape(-1).to(torch.float32)
        lo = self.lo
        while lo < self.hi:
            hi = min(self.hi, (lo // seg + 1) * seg)
            p._store(lo, hi, src[lo - self.lo:hi - self.lo], keep)
            lo = hi
        return self


Residual = Union[torch.Tensor, QuantizedResidual]


def make(n: int, fmt: str, device, segment: Optional[int] = None,
         budget: Optional[float] = None) -> Residual:
    """A zero residual of ``n`` elements in ``fmt`` (``float32``, ``bfloat16``, ``int8``,
    ``int4``, ``int2``, ``int2-topk``); ``segment``: the chunk length it is sliced into (narrow
    formats only); ``budget``: the bytes an ``int2-topk`` residual may take (None: every block)."""
    if fmt == TOPK:
        kept = (TopkResidual.blocks_within(n, segment, budget) if budget is not None
                else _nblocks(segment or n))
        return TopkResidual(n, device, segment, kept)
    if fmt in FORMATS:
        return QuantizedResidual(n, fmt, device, segment)
    return torch.zeros(n, dtype=getattr(torch, fmt), device=device)


def nbytes(r: Residual) -> int:
    """Memory a residual holds, however stored."""
    if isinstance(r, QuantizedResidual):
        return r.nbytes
    return r.numel() * r.element_size()


def to_state(r: Residual) -> Union[torch.Tensor, dict]:
    """A residual as a checkpoint holds it (CPU tensors and ints: ``weights_only`` loads it)."""
    if isinstance(r, QuantizedResidual):
        d = {"format": r.fmt, "numel": r.n, "segment": r.segment,
             "codes": r.codes.detach().cpu().clone(), "scales": r.scales.detach().cpu().clone()}
        if isinstance(r, TopkResidual):
            d.update(kept=r.kept, index=r.index.detach().cpu().clone())
        return d
    return r.detach().cpu().clone()


def from_state(s: Union[torch.Tensor, dict]) -> Residual:
    """The inverse of :func:`to_state` (on the CPU; the hooks move it to the gradient's
    device on first use)."""
    if isinstance(s, torch.Tensor):
        return s.clone()
    topk = s["format"] == TOPK
    r = (TopkResidual(int(s["numel"]), "cpu", int(s["segment"]), int(s["kept"])) if topk else
         QuantizedResidual(int(s["numel"]), str(s["format"]), "cpu", int(s["segment"])))
    names = ("codes", "scales", "index") if topk else ("codes", "scales")
    if any(getattr(r, k).shape != s[k].shape for k in names):
        raise ValueError(f"a saved {s['format']} residual of {s['numel']} elements has "
                         + " and ".join(f"{k} {tuple(s[k].shape)}" for k in names)
                         + "; expected " + " and ".join(f"{tuple(getattr(r, k).shape)}"
                                                       for k in names))
    if topk and s["index"].numel() and not (
            0 <= int(s["index"].min()) and int(s["index"].max()) < _nblocks(r.segment)):
        raise ValueError(f"a saved {TOPK} residual has block indices outside its segments")
    for k in names:
        getattr(r, k).copy_(s[k])
    return r


def is_form(r: Residual, fmt: str, segment: Optional[int] = None,
            budget: Optional[float] = None) -> bool:
    """Whether ``r`` is stored as :func:`make` would make it in ``fmt`` (for ``int2-topk``: the
    blocks that ``budget`` allows a segment; the size and segments are the caller's check)."""
    if fmt_of(r) != fmt:
        return False
    return fmt != TOPK or budget is None or r.kept == TopkResidual.blocks_within(
        r.n, segment, budget)


def fmt_of(r: Residual) -> str:
    """The format a residual is stored in."""
    if isinstance(r, QuantizedResidual):
        return r.fmt
    return str(r.dtype).removeprefix("torch.")

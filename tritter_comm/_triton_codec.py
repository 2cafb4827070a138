"""The encoder's full blocks as one Triton kernel, for CUDA tensors: bit-identical to
``_torch_codec`` (and so to the Rust codec), in one pass over the data instead of some fifty
kernels.

One program encodes one block of ``L`` elements (256 <= L <= 4096): ``u = x (+ e)``, the keys
(the same hash, in uint32), the bind, the butterflies in ascending ``h``, the tree sums by
repeated halving, the scale formulas op by op (IEEE division, ``div_rn``), the codes (one byte
each; ``_torch_codec._pack`` packs them) and, with a residual, ``e = u - (WHT(level) * scale) *
key``. Every float operation is the one ``_torch_codec`` does, on the same operands, so the
results agree bit for bit; the kernels are compiled with ``enable_fp_fusion=False`` so that no
multiply and add are fused.

The butterflies and the tree sums keep the block as one ``(L,)`` vector: a stage views it as
``(L / 2h, 2, h)``, splits the pairs ``(i, i + h)`` and joins ``(a + b, a - b)`` (the tree sums
join ``(a + b, a + b)``: every element then holds the sum). ``TRITON_INTERPRET=1`` runs the kernel
on CPU tensors, which is how the tests check it where there is no GPU.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

try:  # triton comes with torch's CUDA wheels on Linux; without it CUDA uses the torch codec
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

logger = logging.getLogger(__name__)

MIN_BLOCK, MAX_BLOCK = 256, 4096

launches = 0  # kernel launches in this process (the tests check that the kernel ran)
_broken: dict = {}  # (block, mode, dtypes) whose kernel failed to build: the torch codec runs


def available(device: torch.device, block: int) -> bool:
    """Whether the kernel encodes the full blocks of size ``block`` for tensors on ``device``
    (``TRITTER_COMM_TRITON=0`` turns it off)."""
    if triton is None or not MIN_BLOCK <= block <= MAX_BLOCK:
        return False
    if os.environ.get("TRITTER_COMM_TRITON", "1") == "0":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _mix32(x):
        x = x ^ (x >> 16)
        # _torch_codec's _MUL1 and _MUL2, written out: a jit function reads no module globals
        x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
        x = x ^ (x >> 15)
        x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _stage(z, h: tl.constexpr, L: tl.constexpr, SUM: tl.constexpr):
        """One stage at distance ``h``: pairs ``(i, i + h)`` become ``(a + b, a - b)``, or
        ``(a + b, a + b)`` when ``SUM``."""
        v = tl.permute(tl.reshape(z, (L // (2 * h), 2, h)), (0, 2, 1))
        a, b = tl.split(v)
        s = a + b
        if SUM:
            v = tl.join(s, s)
        else:
            v = tl.join(s, a - b)
        return tl.reshape(tl.permute(v, (0, 2, 1)), (L,))

    @triton.jit
    def _wht(z, L: tl.constexpr, LOG2: tl.constexpr):
        for s in tl.static_range(LOG2):
            z = _stage(z, 1 << s, L, False)
        return z

    @triton.jit
    def _tree_sum(v, offs, L: tl.constexpr, LOG2: tl.constexpr):
        """TS of the block: ``v = v[:h] + v[h:]`` for h = L/2, ..., 1, as a scalar."""
        for s in tl.static_range(LOG2):
            v = _stage(v, L >> (s + 1), L, True)
        # every element holds the sum; the others are +0.0 here, and the sums are of values
        # >= 0, so adding them changes nothing
        return tl.sum(tl.where(offs == 0, v, 0.0), axis=0)

    @triton.jit(do_not_specialize=["k1", "k2"])
    def _encode_blocks(x_ptr, e_ptr, codes_ptr, scale_ptr, k1, k2,
                       L: tl.constexpr, LOG2: tl.constexpr, MODE: tl.constexpr,
                       HAS_RES: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, L)
        pos = row * L + offs
        u = tl.load(x_ptr + pos).to(tl.float32)
        if HAS_RES:
            u = u + tl.load(e_ptr + pos).to(tl.float32)
        # keys: word w = pos / 32 hashed twice, bit pos % 32 of it: +1.0 for 0, -1.0 for 1
        w = (pos >> 5).to(tl.uint32)
        w = _mix32(w ^ k1.to(tl.uint32))
        w = _mix32(w + k2.to(tl.uint32))
        bit = ((w >> (pos & 31).to(tl.uint32)) & 1).to(tl.float32)
        key = bit * -2.0 + 1.0
        z = _wht(u * key, L, LOG2)
        a = tl.abs(z)
        lf = L * 1.0
        if MODE == 0:  # ternary
            thr = 0.75 * tl.div_rn(_tree_sum(a, offs, L, LOG2), lf)
            keep = a > thr
            cnt = tl.sum(keep.to(tl.int32), axis=0).to(tl.float32)
            num = _tree_sum(tl.where(keep, a, 0.0), offs, L, LOG2)
            scale = tl.where(cnt > 0, tl.div_rn(tl.div_rn(num, cnt), lf), 0.0)
            codes = 1 + (keep & (z > 0)).to(tl.int32) - (keep & (z < 0)).to(tl.int32)
            level = codes.to(tl.float32) - 1.0
        elif MODE == 1:  # sign
            scale = tl.div_rn(tl.div_rn(_tree_sum(a, offs, L, LOG2), lf), lf)
            codes = (z >= 0).to(tl.int32)
            level = 2.0 * codes.to(tl.float32) - 1.0
        else:  # int2
            thr2 = 0.99142 * tl.div_rn(_tree_sum(z * z, offs, L, LOG2), lf)
            big = (z * z) > thr2
            num = _tree_sum(a * tl.where(big, 3.0, 1.0), offs, L, LOG2)
            den = (L + 8 * tl.sum(big.to(tl.int32), axis=0)).to(tl.float32)
            big = a > 2.0 * tl.div_rn(num, den)
            num = _tree_sum(a * tl.where(big, 3.0, 1.0), offs, L, LOG2)
            den = (L + 8 * tl.sum(big.to(tl.int32), axis=0)).to(tl.float32)
            scale = tl.div_rn(tl.div_rn(num, den), lf)
            pos_ = (z >= 0).to(tl.int32)
            codes = pos_ * 2 + (pos_ == big.to(tl.int32)).to(tl.int32)
            level = 2.0 * codes.to(tl.float32) - 3.0
        tl.store(codes_ptr + pos, codes.to(tl.uint8))
        tl.store(scale_ptr + row, scale)
        if HAS_RES:
            xhat = (_wht(level, L, LOG2) * scale) * key
            e = u - xhat
            if e_ptr.dtype.element_ty == tl.bfloat16:
                # round to nearest even as torch's copy_ does, in integers (the same bits on a
                # GPU and in the interpreter, whose own cast truncates); e is finite here
                bits = e.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                e = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
            elif e_ptr.dtype.element_ty != tl.float32:
                e = e.to(e_ptr.dtype.element_ty)  # float16: round to nearest even
            tl.store(e_ptr + pos, e)


def encode_full_blocks(x: torch.Tensor, residual: Optional[torch.Tensor], *, nfull: int,
                       block_log2: int, mode: int, k1: int, k2: int):
    """Encode the first ``nfull`` blocks of ``x``: ``(scales (nfull,) f32, codes (nfull, L)
    uint8)``, the residual's first ``nfull * L`` elements updated in place; or None where the
    kernel could not be built for this case (logged once; the caller runs the torch codec)."""
    global launches
    length = 1 << block_log2
    case = (length, mode, x.dtype, None if residual is None else residual.dtype)
    if case in _broken:
        return None
    codes = torch.empty(nfull, length, dtype=torch.uint8, device=x.device)
    scales = torch.empty(nfull, dtype=torch.float32, device=x.device)
    try:
        _encode_blocks[(nfull,)](
            x, residual if residual is not None else x, codes, scales, k1, k2,
            L=length, LOG2=block_log2, MODE=mode, HAS_RES=residual is not None,
            enable_fp_fusion=False,
        )
    except (triton.CompilationError, RuntimeError, ValueError, TypeError) as err:
        # a compiler that cannot build it: nothing was written yet
        _broken[case] = repr(err)
        logger.warning("tritter-comm: the Triton encoder failed to build for block %d, mode %d,"
                       " %s (%s); using the torch codec", length, mode, case[2:], err)
        return None
    launches += 1
    return scales, codes

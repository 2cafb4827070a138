"""The codec's kernels for CUDA tensors, in Triton: bit-identical to ``_torch_codec`` and to the
Rust codec (docs/FORMAT.md), one pass over the data instead of some fifty torch kernels.

Two kernels, one program per block of ``L`` elements (256 <= L <= 4096):

- ``_encode_kernel``: ``u = x (+ e)``, the keys (the same hash, in uint32), the bind, the
  butterflies in ascending ``h``, the tree sums by repeated halving, the scale formulas op by op
  (IEEE division, ``div_rn``), the codes, packed into the body with the scale (its four bytes),
  and, with a residual, ``e = cast(u - (WHT(level) * scale) * key)``. Every float operation is
  the one ``_torch_codec`` does, on the same operands, so the results agree bit for bit.
- ``_decode_kernel``: for each of ``nbodies`` bodies (``stride`` bytes apart, the same keys),
  unpack the codes, ``xhat = (WHT(level) * scale) * key``, and sum them in body order into one
  output written once: ``acc = xhat_0``, then ``acc = acc + xhat_j`` (with a bf16/fp16 output,
  each term and each partial sum rounded to it, as decoding into the dtype and ``acc += tmp``
  do). One body is a plain decode; N bodies are phase 2's "decode my chunk's N bodies and sum
  them in rank order" (``Exchange._sum_owned``), optionally divided by N (IEEE division).

The tail block (``T = next_pow2(n % L)`` elements, zero-padded past ``n``) runs in the same
kernel at the size ``L`` (``TAIL``, a second launch of one program): positions ``>= T`` hold
zeros, which leave the first ``T`` outputs of every butterfly stage and of every tree sum what
the size-``T`` transform gives (``a + 0 = a``; only the sign of a zero can differ, which no
code, scale or residual depends on), and they are masked out of the sums, counts and codes.

The transform of the integer levels (decode, and the residual's ``xhat``) is exact in any
order; with ``DOT`` it runs as two matrix products ``H_A (V H_B)`` (``V`` the levels as an
``(A, B)`` matrix, B <= 64), exact with f32, TF32 or bf16 inputs: every input is an integer of
at most 8 significant bits (levels, +-1, and the first product's sums, |s| <= 3 * 64), every
sum an integer below 2^24 (as in ``_torch_codec._wht_levels``); otherwise as the butterflies,
which is the default: on an H200 the products' registers and shared memory cost more than the
butterflies save (``tuning``, benchmarks/codec_cuda_sweep.py).
bf16 and fp16 are read and written directly: conversion to f32 is exact, and back rounds to
nearest even, with NaN kept a quiet NaN as the Rust codec does (``_round``). The kernels are
compiled with ``enable_fp_fusion=False`` so that no multiply and add are fused.

Each kernel has two builds: the fast one (the encoder packs the codes itself, the ternary five
to a byte with ``tl.gather``; the variants of ``tuning``), and the plain one (butterflies; the
encoder writes codes one byte each, packed by ``_torch_codec._pack``): a compiler that cannot
build the first falls back to the second, and one that builds neither to the torch ops, each
logged once.
``TRITON_INTERPRET=1`` runs the kernels on CPU tensors, which is how the tests check them where
there is no GPU.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ._warnings import warn as _warn

try:  # triton comes with torch's CUDA wheels on Linux; without it CUDA uses the torch codec
    import triton
    import triton.language as tl
    from triton.errors import TritonError
except ImportError:  # pragma: no cover - depends on the install
    triton = None

logger = logging.getLogger(__name__)

MIN_BLOCK, MAX_BLOCK = 256, 4096

# encodes and decodes (sums included) served wholly by the kernels in this process, one each,
# however many launches it took (full blocks, tail): the tests check that the kernels ran
launches = 0
_broken: dict = {}  # (kernel, build, block, mode, dtypes, tail[, unbiased]) that failed: reason
_PER_BYTE = (5, 8, 4)  # codes per packed byte: ternary, sign, int2
_BUILDS = ("fast", "plain")  # (packed codes, ``tuning``) and (codes one byte each, butterflies)
# Variants of each kernel's fast build that give the same bits, for benchmarks/codec_cuda_sweep.py
# to time on a GPU: warps a program (None: ``_num_warps``), the keys hashed once a 32-bit word
# and spread to its 32 positions (instead of once a position), the int2/sign codes unpacked from
# the block's bytes loaded once (instead of a byte load a position), and the levels' transform
# as the matrix products (False: the butterflies). The defaults are the fastest of that sweep on
# an H200 at block 1024 (64M fp32 int2: encode 0.374 ms, decode 0.186 ms, against 0.751 and
# 0.450 with 4 warps and the products; every variant gave the same bits).
tuning = {"encode": {"warps": None, "key_words": False, "dot": False},
          "decode": {"warps": None, "key_words": False, "unpack_bytes": False, "dot": False}}


def available(device: torch.device, block: int) -> bool:
    """Whether the kernels encode and decode blocks of size ``block`` for tensors on
    ``device`` (``TRITTER_COMM_TRITON=0`` turns them off)."""
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
    def _keys(pos, k1, k2):
        """The keys (f32 +-1.0) of padded positions ``pos``: bit ``pos % 32`` of the word
        ``pos / 32`` hashed twice; +1.0 for 0, -1.0 for 1."""
        w = (pos >> 5).to(tl.uint32)
        w = _mix32(w ^ k1.to(tl.uint32))
        w = _mix32(w + k2.to(tl.uint32))
        bit = ((w >> (pos & 31).to(tl.uint32)) & 1).to(tl.float32)
        return bit * -2.0 + 1.0

    @triton.jit
    def _block_keys(row, pos, k1, k2, L: tl.constexpr, KEYW: tl.constexpr):
        """``_keys(pos)`` of block ``row`` (``pos = row * L + arange(L)``); with ``KEYW`` each
        of the block's ``L / 32`` words hashed once and its bits spread to their positions."""
        if KEYW:
            w = (row * (L // 32) + tl.arange(0, L // 32)).to(tl.uint32)
            w = _mix32(w ^ k1.to(tl.uint32))
            w = _mix32(w + k2.to(tl.uint32))
            bit = (w[:, None] >> tl.arange(0, 32).to(tl.uint32)[None, :]) & 1
            return tl.reshape(bit.to(tl.float32) * -2.0 + 1.0, (L,))
        else:
            return _keys(pos, k1, k2)

    @triton.jit
    def _wht(z, L: tl.constexpr, LOG2: tl.constexpr):
        """The butterflies, stages h = 1, 2, ..., L/2: pairs ``(i, i + h)`` become
        ``(a + b, a - b)``. The block is one ``(L,)`` vector, viewed as ``(L / 2h, 2, h)``
        in each stage."""
        for s in tl.static_range(LOG2):
            v = tl.reshape(z, (L >> (s + 1), 2, L >> (LOG2 - s)))  # (L / 2h, 2, h), h = 2^s
            v = tl.permute(v, (0, 2, 1))
            a, b = tl.split(v)
            z = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (L,))
        return z

    @triton.jit
    def _hadamard(N: tl.constexpr):
        """The Sylvester Hadamard matrix of order ``N``: ``(-1)^popcount(i & j)``, f32."""
        p = tl.arange(0, N)[:, None] & tl.arange(0, N)[None, :]
        p = p ^ (p >> 8)
        p = p ^ (p >> 4)
        p = p ^ (p >> 2)
        p = p ^ (p >> 1)
        return 1.0 - 2.0 * (p & 1).to(tl.float32)

    @triton.jit
    def _wht_levels(v, L: tl.constexpr, LOG2: tl.constexpr, DOT: tl.constexpr,
                    A: tl.constexpr, BC: tl.constexpr):
        """``_wht`` of integer levels (|v| <= 3): exact in any order, so with ``DOT`` as the
        matrix products ``H_A (V H_B)`` of ``V`` = v viewed as ``(A, BC)`` (H_L = H_A kron H_B);
        inputs below 2^8 and sums below 2^24 are exact under TF32 too."""
        if DOT:
            z = tl.dot(tl.reshape(v, (A, BC)), _hadamard(BC))
            return tl.reshape(tl.dot(_hadamard(A), z), (L,))
        else:
            return _wht(v, L, LOG2)

    @triton.jit
    def _tree_sum(v, L: tl.constexpr, LOG2: tl.constexpr):
        """TS of the block, as a scalar: ``v = v[:h] + v[h:]`` for h = L/2, ..., 1 (a sum over
        an axis of two is the one addition ``v[i] + v[i + h]``)."""
        for s in tl.static_range(LOG2):
            v = tl.sum(tl.reshape(v, (2, L >> (s + 1))), axis=0)
        return tl.sum(v, axis=0)

    @triton.jit
    def _bf16_bits(v):
        """bf16 bits (in a uint32) of f32 ``v``, rounded to nearest even in integers (the same
        on a GPU and in the interpreter, whose own cast truncates); NaN stays a quiet NaN with
        its sign and top payload, as in the Rust codec."""
        bits = v.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(v != v, (bits >> 16) | 0x40, r)

    @triton.jit
    def _round(v, dtype: tl.constexpr):
        """f32 ``v`` as ``dtype``, rounded to nearest even; NaN as the Rust codec makes it."""
        if dtype == tl.bfloat16:
            return _bf16_bits(v).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        elif dtype == tl.float16:
            bits = v.to(tl.uint32, bitcast=True)
            nan = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits & 0x7FFFFF) >> 13)
            return tl.where(v != v, nan.to(tl.uint16).to(tl.float16, bitcast=True),
                            v.to(tl.float16))
        else:
            return v

    @triton.jit
    def _rounded(v, dtype: tl.constexpr):
        """f32 ``v`` rounded to ``dtype`` and back: what a tensor of ``dtype`` holds."""
        if dtype == tl.bfloat16:
            return (_bf16_bits(v) << 16).to(tl.float32, bitcast=True)
        elif dtype == tl.float16:
            return _round(v, dtype).to(tl.float32)
        else:
            return v

    @triton.jit
    def _pack(codes, L: tl.constexpr, MODE: tl.constexpr, P: tl.constexpr):
        """The packed bytes (int32, ``P`` of them, the first ``ceil(L / per byte)`` meant) of
        one block's codes; codes past the block must be 0."""
        if MODE == 0:  # base 3, five a byte: byte j gathers codes 5j .. 5j+4
            k = tl.arange(0, 8)[None, :]
            idx = tl.arange(0, P)[:, None] * 5 + k
            w = tl.where(k == 0, 1, tl.where(k == 1, 3, tl.where(k == 2, 9, tl.where(
                k == 3, 27, tl.where(k == 4, 81, 0)))))
            w = tl.where(idx < L, w, 0)
            g = tl.gather(codes, tl.reshape(tl.minimum(idx, L - 1), (P * 8,)), 0)
            return tl.sum(tl.reshape(g, (P, 8)) * w, axis=1)
        elif MODE == 1:  # bit k of byte j is code 8j + k
            return tl.sum(tl.reshape(codes, (L // 8, 8)) << tl.arange(0, 8)[None, :], axis=1)
        else:  # bits 2k, 2k+1 of byte j are code 4j + k
            return tl.sum(tl.reshape(codes, (L // 4, 4)) << (2 * tl.arange(0, 4))[None, :],
                          axis=1)

    @triton.jit
    def _unpack(pk, offs, MODE: tl.constexpr, PER: tl.constexpr, mask, MASKED: tl.constexpr):
        """The codes (int32) at block offsets ``offs`` of the packed block at ``pk``."""
        if MASKED:
            q = tl.load(pk + offs // PER, mask=mask, other=0).to(tl.int32)
        else:
            q = tl.load(pk + offs // PER).to(tl.int32)
        d = offs % PER
        if MODE == 0:  # digit d: (q // 3^d) % 3, as _torch_codec._unpack
            for s in tl.static_range(1, 5):
                q = tl.where(d >= s, q // 3, q)
            return q % 3
        elif MODE == 1:
            return (q >> d) & 1
        else:
            return (q >> (2 * d)) & 3

    @triton.jit
    def _unpack_bytes(pk, nbytes, L: tl.constexpr, MODE: tl.constexpr, PER: tl.constexpr,
                      MASKED: tl.constexpr):
        """``_unpack`` of a whole block in the sign and int2 modes (``PER`` divides ``L``): the
        ``L / PER`` bytes loaded once, each spread to its ``PER`` codes."""
        j = tl.arange(0, L // PER)
        if MASKED:
            q = tl.load(pk + j, mask=j < nbytes, other=0).to(tl.int32)
        else:
            q = tl.load(pk + j).to(tl.int32)
        d = tl.arange(0, PER)[None, :]
        if MODE == 1:
            c = (q[:, None] >> d) & 1
        else:
            c = (q[:, None] >> (2 * d)) & 3
        return tl.reshape(c, (L,))

    @triton.jit
    def _levels(codes, MODE: tl.constexpr):
        c = codes.to(tl.float32)
        if MODE == 0:
            return c - 1.0
        elif MODE == 1:
            return 2.0 * c - 1.0
        else:
            return 2.0 * c - 3.0

    @triton.jit
    def _int2_sums(a, big, inblk, L: tl.constexpr, LOG2: tl.constexpr, TAIL: tl.constexpr):
        """TS(a * m) and TS(m * m) = blen + 8 #big (exact) with m = 3 where ``big`` else 1."""
        num = _tree_sum(a * tl.where(big, 3.0, 1.0), L, LOG2)
        if TAIL:
            big = big & inblk
        return num, 8 * tl.sum(big.to(tl.int32), axis=0)

    @triton.jit(do_not_specialize=["k1", "k2", "nfull", "n", "tlen", "pk0"])
    def _encode_kernel(x_ptr, e_ptr, out_ptr, codes_ptr, flag_ptr, k1, k2, nfull, n, tlen, pk0,
                       L: tl.constexpr, LOG2: tl.constexpr, MODE: tl.constexpr,
                       HAS_RES: tl.constexpr, HAS_FLAG: tl.constexpr, TAIL: tl.constexpr,
                       PACK: tl.constexpr,
                       DOT: tl.constexpr, A: tl.constexpr, BC: tl.constexpr,
                       PER: tl.constexpr, PB: tl.constexpr, P: tl.constexpr,
                       KEYW: tl.constexpr = False, UNB: tl.constexpr = False):
        if TAIL:  # the one tail block, of tlen (a power of two < L) with n - nfull L elements
            row = nfull.to(tl.int64)
        else:
            row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, L)
        pos = row * L + offs
        valid = offs < n - row * L  # elements of x (all, in a full block)
        inblk = offs < tlen  # positions of the block, padding included
        if TAIL:
            u = tl.load(x_ptr + pos, mask=valid, other=0.0).to(tl.float32)
            if HAS_RES:
                u = u + tl.load(e_ptr + pos, mask=valid, other=0.0).to(tl.float32)
            blen = tlen.to(tl.float32)
        else:
            u = tl.load(x_ptr + pos).to(tl.float32)
            if HAS_RES:
                u = u + tl.load(e_ptr + pos).to(tl.float32)
            blen = L * 1.0
        key = _block_keys(row, pos, k1, k2, L, KEYW)
        z = _wht(u * key, L, LOG2)
        a = tl.abs(z)
        if TAIL:  # past the block, z holds copies of its values: out of every sum and count
            a = tl.where(inblk, a, 0.0)
        if MODE == 0:  # ternary
            thr = 0.75 * tl.div_rn(_tree_sum(a, L, LOG2), blen)
            keep = a > thr  # false past the block: 0 > thr (>= 0 or NaN)
            cnt = tl.sum(keep.to(tl.int32), axis=0).to(tl.float32)
            num = _tree_sum(tl.where(keep, a, 0.0), L, LOG2)
            # cnt = 0 gives 0/0 = NaN, replaced by the spec's 0
            scale = tl.where(cnt > 0, tl.div_rn(tl.div_rn(num, cnt), blen), 0.0)
            codes = 1 + (keep & (z > 0)).to(tl.int32) - (keep & (z < 0)).to(tl.int32)
        elif MODE == 1:  # sign
            scale = tl.div_rn(tl.div_rn(_tree_sum(a, L, LOG2), blen), blen)
            codes = (z >= 0).to(tl.int32)
        else:  # int2
            zz = z * z
            if TAIL:
                zz = tl.where(inblk, zz, 0.0)
            q2 = _tree_sum(zz, L, LOG2)
            thr2 = 0.99142 * tl.div_rn(q2, blen)
            big = zz > thr2
            num, den8 = _int2_sums(a, big, inblk, L, LOG2, TAIL)
            # one Lloyd step: re-split at the midpoint 2 s1 of the levels s1 and 3 s1
            big = a > 2.0 * tl.div_rn(num, blen + den8.to(tl.float32))
            num, den8 = _int2_sums(a, big, inblk, L, LOG2, TAIL)
            if UNB:  # the unbiased scale TS(z z) / TS(|z| m), 0 for a zero block
                scale = tl.where(num == 0, 0.0, tl.div_rn(tl.div_rn(q2, num), blen))
            else:
                scale = tl.div_rn(tl.div_rn(num, blen + den8.to(tl.float32)), blen)
            pos_ = (z >= 0).to(tl.int32)
            codes = pos_ * 2 + (pos_ == big.to(tl.int32)).to(tl.int32)
        if TAIL:
            codes = tl.where(inblk, codes, 0)  # codes past the block count as 0 when packed
        # a NaN scale as _torch_codec writes it (the NaN an operation makes is the device's own)
        sbits = tl.where(scale != scale, 0x7FC00000, scale.to(tl.uint32, bitcast=True))
        if HAS_FLAG:  # non-finite input (flag set on the device): the poisoned body
            bad = tl.load(flag_ptr) != 0
            res_codes = codes  # the residual is not stored when bad: any codes do
            codes = tl.where(bad, 0, codes)  # zero codes pack to zero bytes in every mode
            sbits = tl.where(bad, 0x7FC00000, sbits)  # f32 NaN, as _NAN_LE
            keep = offs < tl.where(bad, 0, L)  # the residual stays as it was
        else:
            res_codes = codes
            keep = offs < L
        # the scale's four bytes (the body need not be 4-aligned)
        sb = tl.arange(0, 4)
        tl.store(out_ptr + 4 * row + sb, ((sbits >> (8 * sb).to(tl.uint32)) & 0xFF).to(tl.uint8))
        if PACK:
            j = tl.arange(0, P)
            if TAIL:
                nbytes = (tlen + PER - 1) // PER
            else:
                nbytes = PB
            tl.store(out_ptr + pk0 + row * PB + j, _pack(codes, L, MODE, P).to(tl.uint8),
                     mask=j < nbytes)
        elif TAIL:  # the plain build: codes one byte each, a row of (rows, L) per block
            tl.store(codes_ptr + offs, codes.to(tl.uint8))
        else:
            tl.store(codes_ptr + pos, codes.to(tl.uint8))
        if HAS_RES:
            level = _levels(res_codes, MODE)
            if TAIL:
                level = tl.where(inblk, level, 0.0)
            xhat = (_wht_levels(level, L, LOG2, DOT, A, BC) * scale) * key
            e = _round(u - xhat, e_ptr.dtype.element_ty)
            if TAIL:
                tl.store(e_ptr + pos, e, mask=valid & keep)
            elif HAS_FLAG:
                tl.store(e_ptr + pos, e, mask=keep)
            else:
                tl.store(e_ptr + pos, e)

    @triton.jit
    def _decode_one(body, row, offs, key, inblk, tlen, pk0, L: tl.constexpr,
                    LOG2: tl.constexpr, MODE: tl.constexpr, TAIL: tl.constexpr,
                    DOT: tl.constexpr, A: tl.constexpr, BC: tl.constexpr, PER: tl.constexpr,
                    PB: tl.constexpr, UNPK: tl.constexpr):
        """``xhat = (WHT(level) * scale) * key`` of block ``row`` of the body at ``body``."""
        sb = tl.arange(0, 4)
        b = tl.load(body + 4 * row + sb).to(tl.uint32)
        scale = tl.sum(b << (8 * sb).to(tl.uint32), axis=0).to(tl.float32, bitcast=True)
        if UNPK and MODE != 0:
            codes = _unpack_bytes(body + pk0 + row * PB, (tlen + PER - 1) // PER, L, MODE, PER,
                                  TAIL)
        else:
            codes = _unpack(body + pk0 + row * PB, offs, MODE, PER, inblk, TAIL)
        level = _levels(codes, MODE)
        if TAIL:
            level = tl.where(inblk, level, 0.0)
        return (_wht_levels(level, L, LOG2, DOT, A, BC) * scale) * key

    @triton.jit(do_not_specialize=["k1", "k2", "nfull", "n", "tlen", "pk0", "nbodies",
                                   "stride"])
    def _decode_kernel(body_ptr, out_ptr, k1, k2, nfull, n, tlen, pk0, nbodies, stride,
                       L: tl.constexpr, LOG2: tl.constexpr, MODE: tl.constexpr,
                       TAIL: tl.constexpr, DOT: tl.constexpr, A: tl.constexpr,
                       BC: tl.constexpr, PER: tl.constexpr, PB: tl.constexpr,
                       AVERAGE: tl.constexpr, KEYW: tl.constexpr = False,
                       UNPK: tl.constexpr = False):
        if TAIL:
            row = nfull.to(tl.int64)
        else:
            row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, L)
        pos = row * L + offs
        inblk = offs < tlen
        key = _block_keys(row, pos, k1, k2, L, KEYW)
        dtype = out_ptr.dtype.element_ty
        # acc = decode(body 0); acc += decode(body j) for j = 1..: in the output's dtype
        acc = _rounded(_decode_one(body_ptr, row, offs, key, inblk, tlen, pk0, L, LOG2, MODE,
                                   TAIL, DOT, A, BC, PER, PB, UNPK), dtype)
        stride64 = stride.to(tl.int64)  # N slots may pass 2^31 bytes
        for j in range(1, nbodies):
            xhat = _decode_one(body_ptr + j * stride64, row, offs, key, inblk, tlen, pk0,
                               L, LOG2, MODE, TAIL, DOT, A, BC, PER, PB, UNPK)
            acc = _rounded(acc + _rounded(xhat, dtype), dtype)
        if AVERAGE:  # f32 only (checked by the caller): IEEE division, as acc / N on a CPU
            acc = tl.div_rn(acc, nbodies.to(tl.float32))
        if TAIL:
            tl.store(out_ptr + pos, _round(acc, dtype), mask=offs < n - row * L)
        else:
            tl.store(out_ptr + pos, _round(acc, dtype))


def _next_pow2(r: int) -> int:
    return 1 << (r - 1).bit_length()


def _i32(k: int) -> int:
    """A u32 key as the int32 of the same bits: every call then passes an i32 (one build)."""
    return k - (1 << 32) if k >= 1 << 31 else k


def _shape(block_log2: int, mode: int) -> dict:
    """The constexprs of a block size: the ``(A, BC)`` of the level products (both >= 16, as
    ``tl.dot`` needs; BC <= 64 keeps every input of the second product below 2^8), the packed
    bytes of a full block and the pow2 slot count of the pack."""
    length = 1 << block_log2
    bc = min(1 << ((block_log2 + 1) // 2), 64)
    pb = -(-length // _PER_BYTE[mode])
    return dict(L=length, LOG2=block_log2, MODE=mode, A=length // bc, BC=bc,
                PER=_PER_BYTE[mode], PB=pb)


_DECODE_FLAGS = {"DOT": "dot", "KEYW": "key_words", "UNPK": "unpack_bytes"}


def _num_warps(kernel: str, length: int) -> int:
    """Warps a program (``tuning[kernel]["warps"]`` where set): one per 512 elements of the
    block, at least one. At block 1024 two warps ran fastest of 2, 4, 8 and 16 on an H200 (both
    kernels, butterflies; benchmarks/codec_cuda_sweep.py); the other sizes keep 16 elements a
    thread, which an sm_90 build (``triton.compile`` for ``GPUTarget("cuda", 90, 32)``,
    ``cuobjdump -res-usage``) gives 64 to 158 registers a thread and no spills, untimed."""
    return tuning[kernel]["warps"] or max(1, length // 512)


def _failed(case: tuple, err: Exception) -> None:
    """Once per case: logged, and warned as a ``TritterCommWarning`` (a fallback)."""
    _broken[case] = repr(err)
    message = (f"tritter-comm: the Triton {case[0]} kernel ({case[1]} build) failed to build "
               f"for block {case[2]}, mode {case[3]}, {case[4]}, "
               f"{'tail' if case[5] else 'full blocks'} ({err}); "
               f"{'trying the plain build' if case[1] == 'fast' else 'using the torch ops'}")
    logger.warning("%s", message)
    _warn(message)


def _build_errors() -> tuple:
    # a compiler that cannot build a kernel raises at the launch, before anything is written
    return (TritonError, RuntimeError, ValueError, TypeError)


def _encode_launch(x, residual, out, *, tail: bool, nfull: int, n: int, tlen: int, pk0: int,
                   shape: dict, k1: int, k2: int, pack_ops, poison, unbiased: bool) -> bool:
    length, mode, pb = shape["L"], shape["MODE"], shape["PB"]
    rows = 1 if tail else nfull
    for build in _BUILDS:
        case = ("encode", build, length, mode,
                (x.dtype, None if residual is None else residual.dtype), tail, unbiased)
        if case in _broken:
            continue
        fast = build == "fast"
        codes = out if fast else torch.empty(rows, length, dtype=torch.uint8, device=x.device)
        try:
            _encode_kernel[(rows,)](
                x, residual if residual is not None else x, out, codes,
                poison if poison is not None else x, _i32(k1), _i32(k2),
                nfull, n, tlen, pk0, HAS_RES=residual is not None,
                HAS_FLAG=poison is not None, TAIL=tail, PACK=fast, UNB=unbiased,
                DOT=fast and tuning["encode"]["dot"],
                KEYW=fast and tuning["encode"]["key_words"],
                P=_next_pow2(-(-length // _PER_BYTE[mode])), **shape,
                num_warps=_num_warps("encode", length), enable_fp_fusion=False,
            )
        except _build_errors() as err:
            _failed(case, err)
            continue
        if not fast:
            lo = pk0 + nfull * pb
            if tail:
                packed = pack_ops(codes[:, :tlen], mode).reshape(-1)
                out[lo:lo + packed.numel()].copy_(packed)
            else:
                out[pk0:lo].view(nfull, pb).copy_(pack_ops(codes, mode))
        return True
    return False


def encode_into(x: torch.Tensor, residual: Optional[torch.Tensor], out: torch.Tensor, *,
                block_log2: int, mode: int, k1: int, k2: int, pack_ops,
                poison: Optional[torch.Tensor] = None, unbiased: bool = False) -> int:
    """Encode 1-D ``x`` (``u = x + residual`` with one, the residual updated in place) into the
    body ``out`` (uint8, ``body_nbytes`` long): the full blocks in one launch, the tail block in
    another. Returns how many leading elements were encoded: ``x.numel()``, or, where a kernel
    could not be built (logged once), 0 or the full blocks' ``nfull * L`` (the caller encodes
    the rest with the torch ops; nothing of the rest was written). ``pack_ops`` packs a
    ``(rows, L)`` uint8 tensor of codes into ``(rows, packed bytes)`` (``_torch_codec._pack``,
    passed in: this module imports nothing of the package), for the plain build.

    ``poison``, a one-element uint8 tensor on ``x``'s device, is read by the kernel: where it is
    nonzero the body is the poisoned one (NaN scales, zero codes) and ``residual`` is not
    written, with no host synchronization. ``unbiased``: int2's unbiased scale
    (``_torch_codec._quantize``)."""
    global launches
    n = x.numel()
    shape = _shape(block_log2, mode)
    length = shape["L"]
    nfull, r = divmod(n, length)
    tlen = _next_pow2(r) if r else 0
    pk0 = 4 * (nfull + (1 if r else 0))
    kw = dict(nfull=nfull, n=n, pk0=pk0, shape=shape, k1=k1, k2=k2, pack_ops=pack_ops,
              poison=poison, unbiased=unbiased)
    if nfull and not _encode_launch(x, residual, out, tail=False, tlen=length, **kw):
        return 0
    if r and not _encode_launch(x, residual, out, tail=True, tlen=tlen, **kw):
        return nfull * length
    launches += 1
    return n


def decode_into(bodies: torch.Tensor, out: torch.Tensor, *, nbodies: int, stride: int,
                block_log2: int, mode: int, k1: int, k2: int, average: bool = False) -> int:
    """Decode the ``nbodies`` bodies at ``bodies[j * stride:]`` (uint8; all of ``out``'s
    length and one stream) and write their sum, in body order, into 1-D contiguous ``out``
    (divided by ``nbodies`` when ``average``; float32 ``out`` only then). With one body, a plain
    decode. Returns how many leading elements were written, as ``encode_into``."""
    global launches
    if average and out.dtype != torch.float32:
        raise ValueError("average needs a float32 output")
    n = out.numel()
    shape = _shape(block_log2, mode)
    length = shape["L"]
    nfull, r = divmod(n, length)
    pk0 = 4 * (nfull + (1 if r else 0))
    parts = [(False, nfull, length, nfull * length)] if nfull else []
    if r:
        parts.append((True, 1, _next_pow2(r), n))
    done = 0
    for tail, rows, tlen, upto in parts:
        for build in _BUILDS:
            case = ("decode", build, length, mode, (out.dtype,), tail)
            if case in _broken:
                continue
            try:
                _decode_kernel[(rows,)](
                    bodies, out, _i32(k1), _i32(k2), nfull, n, tlen, pk0, nbodies, stride,
                    TAIL=tail, AVERAGE=average, **{k: build == "fast" and tuning["decode"][v]
                                                   for k, v in _DECODE_FLAGS.items()}, **shape,
                    num_warps=_num_warps("decode", length), enable_fp_fusion=False,
                )
            except _build_errors() as err:
                _failed(case, err)
                continue
            done = upto
            break
        else:
            return done
    launches += 1
    return done

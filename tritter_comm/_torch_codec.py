"""Pure-torch codec body, bit-compatible with the Rust codec (docs/FORMAT.md is the contract).

Runs on any device with no host synchronization: every step is a vectorized torch op over a
``(blocks, L)`` view, full blocks in one batch and the tail block (if any) as a ``(1, T)`` batch.
Float arithmetic follows the operation order of FORMAT.md literally (butterfly stages in
ascending ``h``, tree sums by repeated halving, scale formulas op by op), because the Rust codec
and this one must agree bit for bit (the transform of the integer levels in decoding is exact in
any order, and runs as matrix products: ``_wht_levels``). Each torch op here is one IEEE
binary32 operation per element (no fused multiply-add: eager kernels do not fuse), so do not run
this under ``torch.compile``.

The body is the payload without its 32-byte header: ``4 * nblocks`` bytes of little-endian f32
scales, then the packed blocks in order.
"""

from __future__ import annotations

import torch

from . import _triton_codec

__all__ = [
    "MODES",
    "block_sizes",
    "body_nbytes",
    "decode_body",
    "encode_body",
    "keys",
    "mix32",
    "stream_keys",
]

MODES = {"ternary": 0, "sign": 1, "int2": 2}

_TERNARY, _SIGN, _INT2 = 0, 1, 2
# Codes per packed byte, by mode.
_PER_BYTE = {_TERNARY: 5, _SIGN: 8, _INT2: 4}

_M32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def mix32(x: int) -> int:
    """The "lowbias32" hash of C. Wellons on a python int (u32 arithmetic)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _MUL1) & _M32
    x ^= x >> 15
    x = (x * _MUL2) & _M32
    x ^= x >> 16
    return x


def stream_keys(seed: int, stream: int) -> tuple[int, int]:
    """The per-stream keys ``(k1, k2)`` of a u64 seed and a u64 stream id."""
    seed &= 0xFFFFFFFFFFFFFFFF
    stream &= 0xFFFFFFFFFFFFFFFF
    k1 = mix32((seed & _M32) ^ 0x9E3779B9)
    k1 = mix32(k1 ^ (seed >> 32))
    k1 = mix32(k1 ^ (stream & _M32))
    k1 = mix32(k1 ^ (stream >> 32))
    k2 = mix32(k1 ^ 0x85EBCA6B)
    return k1, k2


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for int64 tensors holding u32 values, with no int64 overflow.

    The constant is split in 16-bit halves so every intermediate stays below 2^49 (signed int64
    overflow is undefined behaviour in the C++ kernels, so we do not rely on it wrapping).
    """
    lo = x * (c & 0xFFFF)
    hi = (x * (c >> 16)) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _mix32_t(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MUL2)
    return x ^ (x >> 16)


def keys(n_padded: int, k1: int, k2: int, device, start: int = 0) -> torch.Tensor:
    """The keys (float32 +-1.0) of padded positions ``start .. start + n_padded`` (``start`` a
    multiple of 32)."""
    if start % 32:
        raise ValueError(f"start must be a multiple of 32, got {start}")
    nw = (n_padded + 31) // 32
    w = torch.arange(start // 32, start // 32 + nw, device=device, dtype=torch.int64)
    w = _mix32_t(w ^ k1)
    w = _mix32_t((w + k2) & _M32)
    # Reinterpret as signed int32 arithmetically (exact, no out-of-range conversion); an
    # arithmetic shift then still yields bit 31 in the low bit.
    w32 = (w - ((w >> 31) << 32)).to(torch.int32)
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    bits = (w32.unsqueeze(1) >> shifts) & 1
    k = bits.reshape(-1)[:n_padded].to(torch.float32)
    return k.mul_(-2.0).add_(1.0)  # bit 0 -> +1.0, bit 1 -> -1.0 (exact)


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


def _check(mode: int, block_log2: int) -> None:
    if mode not in _PER_BYTE:
        raise ValueError(f"mode must be 0 (ternary), 1 (sign) or 2 (int2), got {mode!r}")
    if not 8 <= block_log2 <= 16:
        raise ValueError(f"block_log2 must be in 8..16, got {block_log2!r}")


def _next_pow2(r: int) -> int:
    return 1 << (r - 1).bit_length()


def block_sizes(n: int, block_log2: int) -> tuple[int, int, int]:
    """``(B, n_full_blocks, T)``: block size, number of full blocks, tail size (0 if none)."""
    b = 1 << block_log2
    nfull, r = divmod(n, b)
    return b, nfull, (_next_pow2(r) if r else 0)


def _packed_nbytes(length: int, mode: int) -> int:
    k = _PER_BYTE[mode]
    return (length + k - 1) // k


def body_nbytes(n: int, mode: int, block_log2: int) -> int:
    """Length of the body: ``4 * nblocks`` scale bytes plus the packed blocks."""
    _check(mode, block_log2)
    b, nfull, t = block_sizes(n, block_log2)
    nb = nfull + (1 if t else 0)
    return 4 * nb + nfull * _packed_nbytes(b, mode) + (_packed_nbytes(t, mode) if t else 0)


# --------------------------------------------------------------------------------------------
# Block kernels: every function takes a (nb, L) batch of blocks.
# --------------------------------------------------------------------------------------------


def _wht(z: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of each row, stages h = 1, 2, ..., L/2.

    Takes ownership of ``z`` (uses it as a ping-pong buffer) and returns the result.
    """
    nb, length = z.shape
    if length == 1:
        return z
    src, dst = z, torch.empty_like(z)
    h = 1
    while h < length:
        s = src.view(nb, length // (2 * h), 2, h)
        d = dst.view(nb, length // (2 * h), 2, h)
        a, b = s[:, :, 0], s[:, :, 1]
        torch.add(a, b, out=d[:, :, 0])
        torch.sub(a, b, out=d[:, :, 1])
        src, dst = dst, src
        h *= 2
    return src


def _tree_sum(v: torch.Tensor) -> torch.Tensor:
    """TS of each row: ``v = v[:, :h] + v[:, h:]`` until one column is left. Returns (nb, 1)."""
    while v.shape[-1] > 1:
        h = v.shape[-1] // 2
        v = v[:, :h] + v[:, h:]
    return v


def _int2_sums(a: torch.Tensor, big: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TS(a * m) and TS(m * m) with m = 3 where ``big`` else 1."""
    num = _tree_sum(a * torch.where(big, 3.0, 1.0))
    # TS(m * m) is a sum of 1s and 9s below 2^24: exact in any order, so count instead.
    den = (length + 8 * big.sum(dim=-1, keepdim=True)).to(torch.float32)
    return num, den


def _quantize(z: torch.Tensor, mode: int,
              unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 5: returns ``(scale (nb, 1) f32, codes (nb, L) uint8)``. ``unbiased``: int2's
    scale is ``TS(z * z) / TS(|z| * m)`` (0 where the block is zero) instead of least squares
    (the Rust codec's ``quant::unbiased_scale``)."""
    length = z.shape[-1]
    a = z.abs()
    if mode == _TERNARY:
        thr = 0.75 * (_tree_sum(a) / length)
        keep = a > thr
        cnt = keep.sum(dim=-1, keepdim=True).to(torch.float32)
        num = _tree_sum(torch.where(keep, a, 0.0))  # a * [t != 0], exact
        # cnt = 0 gives 0/0 = NaN here, replaced by the spec's 0.
        scale = torch.where(cnt > 0, (num / cnt) / length, 0.0)
        # c = t + 1: 2 where kept and z > 0, 0 where kept and z < 0 (z != 0 where kept, since
        # a > thr >= 0), else 1. Computed as 1 + [kept, z > 0] - [kept, z < 0] in uint8.
        codes = (keep & (z > 0)).to(torch.uint8) + 1 - (keep & (z < 0)).to(torch.uint8)
    elif mode == _SIGN:
        scale = (_tree_sum(a) / length) / length
        codes = (z >= 0).to(torch.uint8)
    else:
        q2 = _tree_sum(z * z)
        thr2 = 0.99142 * (q2 / length)
        big = (z * z) > thr2
        num, den = _int2_sums(a, big, length)
        # One Lloyd step: re-split at the midpoint 2 s1 of the levels s1 and 3 s1.
        big = a > 2.0 * (num / den)
        num, den = _int2_sums(a, big, length)
        if unbiased:
            scale = torch.where(num == 0, 0.0, (q2 / num) / length)
        else:  # 0 / den is already 0 when the numerator is 0 (den >= L > 0).
            scale = (num / den) / length
        pos = z >= 0
        # level -3, -1, +1, +3 -> code 0, 1, 2, 3, i.e. c = 2 [z >= 0] + [[z >= 0] == [m = 3]].
        codes = pos.to(torch.uint8) * 2 + (pos == big).to(torch.uint8)
    return scale, codes


def _levels(codes: torch.Tensor, mode: int) -> torch.Tensor:
    """Integer levels (as f32) of codes: ternary c-1, sign 2c-1, int2 2c-3."""
    c = codes.to(torch.float32)
    if mode == _TERNARY:
        return c - 1.0
    if mode == _SIGN:
        return 2.0 * c - 1.0
    return 2.0 * c - 3.0


# The transform of integer levels as two matrix products (Sylvester order: H_L = H_A kron H_B):
# every input, product and partial sum is an integer below 2^24, so any order of the additions
# gives the exact result, the butterflies' bits included, and so does a matmul on TF32 or bf16
# inputs (`torch.set_float32_matmul_precision`), as long as each product's inputs have at most 8
# significant bits: levels (|l| <= 3) in the first, sums of at most B = 64 of them (<= 192) in the
# second. Blocks shorter than this run the butterflies.
_MM_MIN = 64
_MM_B = 64
_HADAMARD: dict = {}


def _hadamard(n: int, device) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order ``n`` (a power of two), f32, cached per device."""
    key = (n, str(device))
    h = _HADAMARD.get(key)
    if h is None:
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = _HADAMARD[key] = h.to(device)
    return h


def _wht_levels(v: torch.Tensor) -> torch.Tensor:
    """``_wht`` of integer levels (|v| <= 3): the same values, in two matrix products."""
    nb, length = v.shape
    if length < _MM_MIN:
        return _wht(v)
    b = min(_MM_B, length)
    a = length // b
    z = torch.matmul(v.view(nb, a, b), _hadamard(b, v.device))
    return torch.matmul(_hadamard(a, v.device), z).view(nb, length)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, key: torch.Tensor, mode: int):
    """Step 6 in f32: ``xhat = (WHT(level) * scale) * key``."""
    w = _wht_levels(_levels(codes, mode))
    return (w * scale) * key


def _pow_weights(mode: int, device) -> torch.Tensor:
    """Weight of each code position inside a byte, as uint8 (made on device: no H2D copy)."""
    if mode == _TERNARY:
        return torch.pow(3, torch.arange(5, device=device, dtype=torch.int64)).to(torch.uint8)
    k = _PER_BYTE[mode]
    step = 8 // k
    return torch.pow(2, torch.arange(0, 8, step, device=device, dtype=torch.int64)).to(
        torch.uint8
    )


def _pack(codes: torch.Tensor, mode: int) -> torch.Tensor:
    """Pack each row of codes separately; returns (nb, ceil(L/k)) uint8."""
    nb, length = codes.shape
    k = _PER_BYTE[mode]
    nbytes = (length + k - 1) // k
    if nbytes * k != length:
        # Codes past L count as 0.
        pad = codes.new_zeros(nb, nbytes * k - length)
        codes = torch.cat([codes, pad], dim=1)
    w = _pow_weights(mode, codes.device)
    # Every product and partial sum fits in a byte (max 242 ternary, 255 otherwise).
    return (codes.view(nb, nbytes, k) * w).sum(dim=-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, length: int, mode: int) -> torch.Tensor:
    """Inverse of ``_pack``: (nb, nbytes) uint8 -> (nb, L) uint8 codes."""
    nb, nbytes = packed.shape
    k = _PER_BYTE[mode]
    p = packed.unsqueeze(-1)
    if mode == _TERNARY:
        w = _pow_weights(mode, packed.device)
        # A byte above 242 is invalid; its top digit comes out >= 3 (not checked: no host sync).
        c = torch.div(p, w, rounding_mode="floor") % 3
    else:
        bits = 8 // k
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        c = (p >> shifts) & ((1 << bits) - 1)
    return c.reshape(nb, nbytes * k)[:, :length]


# --------------------------------------------------------------------------------------------
# Body
# --------------------------------------------------------------------------------------------


def encode_body(
    x: torch.Tensor,
    *,
    seed: int,
    stream: int,
    mode: int,
    block_log2: int,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    poison: torch.Tensor | None = None,
    unbiased: bool = False,
) -> torch.Tensor:
    """Encode 1-D ``x`` to a uint8 body on ``x.device`` (written into ``out`` when given: 1-D
    contiguous uint8 of ``body_nbytes``; returned). ``unbiased``: int2's unbiased scale
    (``_quantize``).

    ``poison``: a one-element uint8 tensor on ``x.device``. Where it is nonzero the body is the
    poisoned one (NaN scales, zero codes: ``exchange._poison``'s bytes) and ``residual`` keeps its
    values, decided on the device (no host synchronization).

    With ``residual`` (same shape, dtype and device as ``x``), encodes ``u = f32(x) + f32(e)``
    and updates ``residual`` in place to ``cast(u - xhat)``. CUDA tensors run the Triton kernels
    (``_triton_codec``) where they are available, the same bytes and residual; the torch ops
    below encode whatever they did not.
    """
    _check(mode, block_log2)
    if unbiased and mode != _INT2:
        raise ValueError(f"the unbiased scale is int2's (mode {_INT2}), got mode {mode}")
    n = x.numel()
    if out is None:
        out = torch.empty(body_nbytes(n, mode, block_log2), dtype=torch.uint8, device=x.device)
    if n == 0:
        return out
    k1, k2 = stream_keys(seed, stream)
    lo = 0
    if (_triton_codec.available(x.device, 1 << block_log2) and x.is_contiguous()
            and out.is_contiguous() and (residual is None or residual.is_contiguous())):
        lo = _triton_codec.encode_into(x, residual, out, block_log2=block_log2, mode=mode,
                                       k1=k1, k2=k2, pack_ops=_pack, poison=poison,
                                       unbiased=unbiased)
    if lo < n:
        _encode_ops(x, residual, out, lo=lo, k1=k1, k2=k2, mode=mode, block_log2=block_log2,
                    poison=poison, unbiased=unbiased)
    return out


_NAN_BITS = 0x7FC00000  # the f32 NaN of a poisoned body's scales


def _encode_ops(x, residual, out, *, lo: int, k1: int, k2: int, mode: int,
                block_log2: int, poison: torch.Tensor | None = None,
                unbiased: bool = False) -> None:
    """Encode the blocks of ``x`` from element ``lo`` (0, or the end of the full blocks) on
    with the torch ops, into their places in the body ``out``."""
    n = x.numel()
    b, nfull, t = block_sizes(n, block_log2)
    dev = x.device
    nb = nfull + (1 if t else 0)
    nf = nfull * b
    u = x[lo:].to(torch.float32)
    if residual is not None:
        u = u + residual[lo:].to(torch.float32)
    key = keys(nf + t - lo, k1, k2, dev, start=lo)

    parts = []  # (u block view, key view, element count) per batch, from element lo on
    if nfull and lo == 0:
        parts.append((u[:nf].view(nfull, b), key[:nf].view(nfull, b), nf))
    if t:
        r = n - nf
        ut = u.new_zeros(1, t)
        ut[0, :r] = u[nf - lo:]
        parts.append((ut, key[nf - lo:].view(1, t), r))

    scales, packed = [], []
    pos = lo
    for ub, kb, cnt in parts:
        z = _wht(ub * kb)
        scale, codes = _quantize(z, mode, unbiased)
        scales.append(scale.reshape(-1))
        packed.append(_pack(codes, mode).reshape(-1))
        if residual is not None:
            xhat = _dequantize(codes, scale, kb, mode)
            e = (ub - xhat).reshape(-1)[:cnt]
            if poison is not None:  # the residual keeps its values on the flag
                r = residual[pos : pos + cnt]
                e = torch.where(poison.bool(), r, e.to(r.dtype))
            residual[pos : pos + cnt].copy_(e)
        pos += cnt

    s0 = 4 * (lo // b)
    p0 = 4 * nb + (lo // b) * _packed_nbytes(b, mode)
    scale_all = torch.cat(scales)
    # a NaN scale (NaN input with the check off) as the one NaN of a poisoned body: the bits of
    # a NaN an operation makes differ between a CPU and a GPU, the body's bytes may not
    sbits = torch.where(torch.isnan(scale_all), _NAN_BITS, scale_all.view(torch.int32))
    codes_packed = torch.cat(packed)
    if poison is not None:  # the poisoned body: NaN scales, zero codes
        sbits = torch.where(poison.bool(), _NAN_BITS, sbits)
        codes_packed = torch.where(poison.bool(), 0, codes_packed)
    out[s0 : 4 * nb].copy_(sbits.view(torch.uint8))
    out[p0:].copy_(codes_packed)


def _scales_view(body: torch.Tensor, nb: int) -> torch.Tensor:
    s = body[: 4 * nb]
    if not s.is_contiguous() or s.storage_offset() % 4 != 0 or s.data_ptr() % 4 != 0:
        s = s.clone()
    return s.view(torch.float32)


def decode_body(
    body: torch.Tensor,
    *,
    n: int,
    dtype: torch.dtype,
    seed: int,
    stream: int,
    mode: int,
    block_log2: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode a body to a 1-D tensor of length ``n`` and ``dtype`` on ``body.device`` (written
    into ``out`` when given: 1-D, ``n`` elements of ``dtype``; returned). CUDA tensors run the
    Triton kernel where it is available."""
    return decode_sum_into(body, out if out is not None else
                           torch.empty(n, dtype=dtype, device=body.device),
                           slot=0, seed=seed, stream=stream, mode=mode, block_log2=block_log2,
                           nbodies=1)


def decode_sum_into(
    bodies: torch.Tensor,
    out: torch.Tensor,
    *,
    slot: int,
    seed: int,
    stream: int,
    mode: int,
    block_log2: int,
    nbodies: int | None = None,
    average: bool = False,
) -> torch.Tensor:
    """Decode the bodies ``bodies[j * slot:]`` (``j = 0 .. nbodies - 1``, by default
    ``bodies.numel() // slot``), all of ``out.numel()`` elements and one key stream, and write
    their sum in body order into ``out``, once: exactly what decoding body 0 into ``out``, then
    each next body into a tensor ``tmp`` of ``out``'s dtype and ``out += tmp`` gives (phase 2 of
    the exchange, ``Exchange._sum_owned``). With ``average`` (float32 ``out`` only) the sum is
    then divided by ``nbodies``, in IEEE division, as ``out /= nbodies`` does on a CPU (on CUDA
    torch multiplies by the reciprocal, which differs in the last bit for some ``nbodies``).

    On CUDA one Triton kernel does it all where the kernels are available; the torch ops do
    whatever it did not (the same bits). Returns ``out``.
    """
    _check(mode, block_log2)
    if nbodies is None:
        nbodies = bodies.numel() // slot
    if nbodies < 1:
        raise ValueError(f"need at least one body, got {nbodies}")
    if average and out.dtype != torch.float32:
        raise ValueError(f"average needs a float32 output, got {out.dtype}")
    n = out.numel()
    if n == 0:
        return out
    k1, k2 = stream_keys(seed, stream)
    dst = out if out.is_contiguous() else torch.empty_like(out)
    lo = 0
    if _triton_codec.available(bodies.device, 1 << block_log2) and bodies.is_contiguous():
        lo = _triton_codec.decode_into(bodies, dst.view(-1), nbodies=nbodies, stride=slot,
                                       block_log2=block_log2, mode=mode, k1=k1, k2=k2,
                                       average=average)
    if lo < n:
        acc = dst.view(-1)[lo:]
        tmp = torch.empty_like(acc) if nbodies > 1 else None
        for j in range(nbodies):
            _decode_ops(bodies[j * slot:], acc if j == 0 else tmp, n=n, lo=lo, k1=k1, k2=k2,
                        mode=mode, block_log2=block_log2)
            if j:
                acc += tmp
        if average:
            # a device tensor as the divisor: IEEE division on CUDA too
            acc.div_(torch.full((), float(nbodies), dtype=torch.float32, device=acc.device))
    if dst is not out:
        out.copy_(dst)
    return out


def _decode_ops(body, out, *, n: int, lo: int, k1: int, k2: int, mode: int,
                block_log2: int) -> None:
    """Decode the blocks of an ``n``-element body from element ``lo`` (0, or the end of the
    full blocks) on into ``out`` (``n - lo`` elements) with the torch ops."""
    b, nfull, t = block_sizes(n, block_log2)
    dev = body.device
    nb = nfull + (1 if t else 0)
    nf = nfull * b
    scales = _scales_view(body, nb)
    key = keys(nf + t - lo, k1, k2, dev, start=lo)

    pb = _packed_nbytes(b, mode)
    off = 4 * nb + (lo // b) * pb
    if nfull and lo == 0:
        packed = body[off : off + nfull * pb].view(nfull, pb)
        codes = _unpack(packed, b, mode)
        xhat = _dequantize(codes, scales[:nfull].view(nfull, 1), key[:nf].view(nfull, b), mode)
        out[:nf].copy_(xhat.reshape(-1))
        off += nfull * pb
    if t:
        pt = _packed_nbytes(t, mode)
        packed = body[off : off + pt].view(1, pt)
        codes = _unpack(packed, t, mode)
        xhat = _dequantize(codes, scales[nfull:].view(1, 1), key[nf - lo:].view(1, t), mode)
        out[nf - lo:].copy_(xhat[0, : n - nf])

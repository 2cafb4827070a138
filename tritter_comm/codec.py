"""The codec's public API: ``encode``, ``decode`` and ``Payload``.

A payload is the VSA-spread, quantized and packed form of one flat float vector
(docs/FORMAT.md). CPU tensors go through the Rust core (``tritter_comm._native``), other devices
through the torch implementation (``tritter_comm._torch_codec``); both write the same bytes.
"""

from __future__ import annotations

import struct
from typing import Optional, Union

try:
    from . import _native
except ImportError:
    # A source checkout without the built extension, found before the installed package (the
    # current directory comes first on sys.path with `python -m`, `python -c` and the REPL).
    # Python's own message blames a circular import; say what happened and what to do. (First
    # of the imports, so that the message comes before torch's seconds of import time.)
    import importlib.machinery
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    if any(os.path.exists(os.path.join(here, "_native" + suffix))
           for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        raise  # the extension is there but does not load: its own error says why
    top = os.path.dirname(here)
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != top]
    installed = importlib.machinery.PathFinder.find_spec(__package__, others)
    raise ImportError(
        f"tritter_comm was imported from the source tree at {here}, which has no built Rust "
        "extension (tritter_comm/_native*.so). "
        + (
            f"It shadows the installed package at {os.path.dirname(installed.origin)}. "
            "Run from another directory, or build the extension into the source tree with "
            "`pip install -e .` or `maturin develop`."
            if installed is not None and installed.origin
            else "No installed tritter_comm was found elsewhere on sys.path. Build the "
            "extension into the source tree with `pip install -e .` or `maturin develop`, or "
            "`pip install .` and run from another directory."
        ),
        name=__package__ + "._native",
    ) from None

import numpy as np
import torch

from . import _torch_codec as _tc

__all__ = [
    "Payload",
    "encode",
    "decode",
    "body_nbytes",
    "DEFAULT_BLOCK_SIZE",
    "MODES",
    "set_num_threads",
    "get_num_threads",
]

#: The payload format version (defined once, in the Rust core).
FORMAT_VERSION: int = _native.FORMAT_VERSION
#: The package version the native module was built as (ranks compare it).
PACKAGE_VERSION: str = _native.__version__
MAGIC = b"TVSA"
_HEADER = struct.Struct("<4sBBBBQQQ")
HEADER_NBYTES = _HEADER.size  # 32

MODES = {"ternary": 0, "sign": 1, "int2": 2}
_MODE_NAMES = {v: k for k, v in MODES.items()}
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPE_OF = {v: k for k, v in _DTYPES.items()}
BACKENDS = ("auto", "rust", "torch")

#: Elements per block: the fastest block of the sweep in benchmarks/codec.py (larger blocks
#: take more passes over more than L1 holds), at 0.031 bits an element of scales and the same
#: error as smaller blocks; the numbers are in benchmarks/results/codec.json.
DEFAULT_BLOCK_SIZE = 1024

_U64 = 1 << 64
_num_threads = 0  # 0: rayon's default pool (all cores)


def set_num_threads(n: int) -> None:
    """Threads the Rust codec uses (0: one per core). Results do not depend on it."""
    global _num_threads
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"num_threads must be a non-negative int, got {n!r}")
    _num_threads = n


def get_num_threads() -> int:
    """Threads the Rust codec uses; 0 means rayon's default of one per core."""
    return _num_threads or _native.default_threads()


def mode_id(mode: str) -> int:
    try:
        return MODES[mode]
    except (KeyError, TypeError):
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}") from None


def block_log2(block_size: Optional[int]) -> int:
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE
    if (
        not isinstance(block_size, int)
        or isinstance(block_size, bool)
        or block_size < 256
        or block_size > 65536
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"block_size must be a power of two from 256 to 65536, got {block_size!r}"
        )
    return block_size.bit_length() - 1


def u64(name: str, v: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < _U64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {v!r}")
    return v


def body_len(n: int, mode_id: int, block_log2: int) -> int:
    """Body bytes of ``n`` elements in the mode and block of these wire ids (the exchange's
    form of :func:`body_nbytes`)."""
    return _native.body_nbytes(n, mode_id, block_log2)


def native_info() -> dict:
    """What the Rust core was built with and runs on (``tritter-comm info``)."""
    return {"format_version": _native.FORMAT_VERSION, "simd_level": _native.simd_level(),
            "cpu_features": list(_native.cpu_features())}


def body_nbytes(n: int, *, mode: str = "ternary", block_size: Optional[int] = None) -> int:
    """Bytes of the scales and packed codes of an ``n``-element vector (the header excluded)."""
    return _native.body_nbytes(n, mode_id(mode), block_log2(block_size))


class Payload:
    """An encoded vector: a 32-byte header (kept as fields) and a ``uint8`` body tensor.

    ``nbytes`` is exactly ``len(to_bytes())``: what would go on the wire.
    """

    __slots__ = ("body", "n", "dtype", "mode", "block_size", "seed", "stream")

    def __init__(self, body, *, n, dtype, mode, block_size, seed, stream):
        self.body: torch.Tensor = body
        self.n: int = n
        self.dtype: torch.dtype = dtype
        self.mode: str = mode
        self.block_size: int = block_size
        self.seed: int = seed
        self.stream: int = stream

    @property
    def nbytes(self) -> int:
        return HEADER_NBYTES + self.body.numel()

    @property
    def device(self) -> torch.device:
        return self.body.device

    def block_log2(self) -> int:
        return self.block_size.bit_length() - 1

    def header(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            MODES[self.mode],
            _DTYPES[self.dtype],
            self.block_log2(),
            self.n,
            self.seed,
            self.stream,
        )

    def to_bytes(self) -> bytes:
        return self.header() + self.body.cpu().numpy().tobytes()

    @classmethod
    def from_bytes(cls, b: Union[bytes, bytearray, memoryview], *, device=None) -> "Payload":
        """Parse and validate a payload. Anything malformed raises ``ValueError``."""
        b = bytes(b)
        if len(b) < HEADER_NBYTES:
            raise ValueError(f"payload of {len(b)} bytes is shorter than its 32-byte header")
        magic, version, mode, dtype, blog, n, seed, stream = _HEADER.unpack_from(b)
        if magic != MAGIC:
            raise ValueError(f"not a tritter-comm payload (magic {magic!r}, expected {MAGIC!r})")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"payload format version {version}, this build reads version {FORMAT_VERSION}"
            )
        if mode not in _MODE_NAMES:
            raise ValueError(f"payload has unknown mode {mode}")
        if dtype not in _DTYPE_OF:
            raise ValueError(f"payload has unknown dtype code {dtype}")
        if not 8 <= blog <= 16:
            raise ValueError(f"payload block size 2^{blog} is outside 256..65536")
        if not 0 < n <= 1 << 37:
            raise ValueError(f"payload length {n} is outside 1..2^37")
        expected = _native.body_nbytes(n, mode, blog)
        if len(b) - HEADER_NBYTES != expected:
            raise ValueError(
                f"payload body is {len(b) - HEADER_NBYTES} bytes, a {n}-element "
                f"{_MODE_NAMES[mode]} vector needs {expected} (truncated or corrupted)"
            )
        body = np.frombuffer(b, dtype=np.uint8, offset=HEADER_NBYTES).copy()
        if mode == MODES["ternary"]:
            nb = _tc.block_sizes(n, blog)
            nblocks = nb[1] + (1 if nb[2] else 0)
            if body.size > 4 * nblocks and body[4 * nblocks :].max() > 242:
                raise ValueError("corrupted payload: a packed ternary byte is above 242")
        t = torch.from_numpy(body)
        if device is not None:
            t = t.to(device)
        return cls(
            t,
            n=n,
            dtype=_DTYPE_OF[dtype],
            mode=_MODE_NAMES[mode],
            block_size=1 << blog,
            seed=seed,
            stream=stream,
        )

    def __eq__(self, other):
        if not isinstance(other, Payload):
            return NotImplemented
        return self.header() == other.header() and torch.equal(
            self.body.cpu(), other.body.cpu()
        )

    __hash__ = None  # mutable body

    def __repr__(self):
        return (
            f"Payload(n={self.n}, dtype={self.dtype}, mode={self.mode!r}, "
            f"block_size={self.block_size}, seed={self.seed}, stream={self.stream}, "
            f"nbytes={self.nbytes}, device={self.device})"
        )


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "rust" if device.type == "cpu" else "torch"
    if backend == "rust" and device.type != "cpu":
        raise ValueError(f"the rust backend needs CPU tensors, got a tensor on {device}")
    return backend


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype == np.float32 or x.dtype == np.float16:
            return torch.from_numpy(x)
        raise ValueError(f"x must be float32, float16 or bfloat16, got numpy {x.dtype}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def _check_vector(x: torch.Tensor, what: str = "x") -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(
            f"{what} must be float32, float16 or bfloat16, got {x.dtype} "
            "(non-float tensors are not compressed; send them as they are)"
        )
    if x.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(x.shape)}; flatten it first")
    if x.numel() == 0:
        raise ValueError(f"cannot encode an empty {what}")
    if not x.is_contiguous():
        raise ValueError(f"{what} must be contiguous; call .contiguous() first")


def _np(t: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor; f16/bf16 as uint16 bits."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _byte_span(t: torch.Tensor):
    """``(first, end)``: the addresses of the bytes ``t`` can touch (any strides, offsets,
    dtype), or ``None`` for an empty tensor."""
    if t.numel() == 0:
        return None
    first = t.data_ptr()  # includes the storage offset
    if t.is_contiguous():  # the codec's case, on the hooks' hot path
        return first, first + t.nbytes
    size = t.element_size()
    end = first
    for n, stride in zip(t.shape, t.stride()):
        reach = (n - 1) * stride * size
        if reach < 0:
            first += reach
        else:
            end += reach
    return first, end + size


def _check_disjoint(*named) -> None:
    """Raise ``ValueError`` if two of the ``(name, tensor)`` pairs share memory.

    The Rust core takes the inputs as ``&[T]`` and the outputs as ``&mut [T]``: aliased, that
    is undefined behaviour, and the torch path would compute from half-written data (issue 14).
    Compares the address ranges themselves, not storages or start pointers, so it also sees two
    tensors built over one numpy buffer, views with offsets, and other dtypes over the same
    bytes. Strided views are taken by their whole span, so interleaved ones count as overlapping
    (the codec takes contiguous tensors only).
    """
    spans = [(name, t, _byte_span(t)) for name, t in named if t is not None]
    for i, (a, ta, sa) in enumerate(spans):
        for b, tb, sb in spans[i + 1 :]:
            if sa is None or sb is None or not (sa[0] < sb[1] and sb[0] < sa[1]):
                continue
            if ta.device != tb.device:  # the same numbers in two address spaces
                continue
            raise ValueError(
                f"{a} and {b} overlap in memory ({a} spans bytes {sa[0]:#x}..{sa[1]:#x}, "
                f"{b} {sb[0]:#x}..{sb[1]:#x}); {b if b in _WRITTEN else a} is written in "
                "place, so it needs memory of its own (e.g. a .clone())"
            )


_WRITTEN = ("residual", "out")


def _rust_encode(x, out, mode_id, block_log2, seed, stream, residual, check_finite,
                 unbiased=False) -> None:
    r = None if residual is None else _np(residual)
    if x.dtype == torch.float32:
        _native.encode_f32(
            _np(x), out.numpy(), mode_id, block_log2, seed, stream, r, _num_threads, check_finite,
            unbiased,
        )
    else:
        _native.encode_u16(
            _np(x),
            out.numpy(),
            x.dtype == torch.bfloat16,
            mode_id,
            block_log2,
            seed,
            stream,
            r,
            _num_threads,
            check_finite,
            unbiased,
        )


def _rust_decode(body, out, mode_id, block_log2, seed, stream) -> None:
    b = body.detach().numpy()
    if out.dtype == torch.float32:
        _native.decode_f32(b, out.numpy(), mode_id, block_log2, seed, stream, _num_threads)
    else:
        _native.decode_u16(
            b, _np(out), out.dtype == torch.bfloat16, mode_id, block_log2, seed, stream,
            _num_threads,
        )


def encode_body_into(
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    seed: int,
    stream: int,
    mode_id: int,
    block_log2: int,
    residual: Optional[torch.Tensor] = None,
    backend: str = "auto",
    check_finite: bool = True,
    unbiased: bool = False,
) -> None:
    """Encode ``x`` into the preallocated ``uint8`` body ``out`` (no validation of ``x``).

    The hooks call this with their buffers; ``encode`` is the checked public form. The one
    check made here is that ``x``, ``residual`` and ``out`` do not overlap in memory
    (``ValueError``): the Rust core must never get aliased slices.
    """
    _check_disjoint(("x", x), ("residual", residual), ("out", out))
    if _resolve_backend(backend, x.device) == "rust":
        _rust_encode(x, out, mode_id, block_log2, seed, stream, residual, check_finite,
                     unbiased)
    else:
        if check_finite and bool(nonfinite(x, residual)):  # a host sync: the public form's
            raise ValueError("input contains NaN or Inf")
        # CUDA: the Triton kernels where available (the torch ops otherwise), straight into out
        _tc.encode_body(x, seed=seed, stream=stream, mode=mode_id, block_log2=block_log2,
                        residual=residual, out=out, unbiased=unbiased)


def nonfinite(x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 (a one-element uint8 tensor on ``x``'s device) where ``x`` or ``residual`` holds NaN or
    Inf, else 0: computed on the device, never read back to the host here."""
    bad = torch.isfinite(x).all().logical_not()
    if residual is not None:
        bad = bad | torch.isfinite(residual).all().logical_not()
    return bad.to(torch.uint8).reshape(1)


def encode_body_or_poison_into(
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    seed: int,
    stream: int,
    mode_id: int,
    block_log2: int,
    residual: Optional[torch.Tensor] = None,
    unbiased: bool = False,
) -> torch.Tensor:
    """``encode_body_into`` for the torch/Triton backend that never raises on NaN or Inf and
    never synchronizes with the host (issue 16): where ``x`` or ``residual`` holds one, ``out``
    gets the poisoned body (NaN scales, zero codes: the bytes of ``exchange._poison``) and
    ``residual`` keeps its values, decided on the device by the kernel that encodes. Returns
    the flag (``nonfinite``). The Rust backend raises instead (``encode_body_into``)."""
    _check_disjoint(("x", x), ("residual", residual), ("out", out))
    flag = nonfinite(x, residual)
    _tc.encode_body(x, seed=seed, stream=stream, mode=mode_id, block_log2=block_log2,
                    residual=residual, out=out, poison=flag, unbiased=unbiased)
    return flag


def decode_body_into(
    body: torch.Tensor,
    out: torch.Tensor,
    *,
    seed: int,
    stream: int,
    mode_id: int,
    block_log2: int,
    backend: str = "auto",
) -> None:
    """Decode ``body`` into the preallocated 1-D float tensor ``out``, which must not overlap
    ``body`` in memory (``ValueError``)."""
    _check_disjoint(("body", body), ("out", out))
    if _resolve_backend(backend, body.device) == "rust":
        _rust_decode(body, out, mode_id, block_log2, seed, stream)
    else:
        _tc.decode_body(body, n=out.numel(), dtype=out.dtype, seed=seed, stream=stream,
                        mode=mode_id, block_log2=block_log2, out=out)


def decode_sum_into(
    bodies: torch.Tensor,
    out: torch.Tensor,
    *,
    slot: int,
    seed: int,
    stream: int,
    mode_id: int,
    block_log2: int,
    average: bool = False,
    backend: str = "auto",
) -> None:
    """Decode the ``N = bodies.numel() // slot`` bodies ``bodies[j * slot:]`` (each of
    ``out.numel()`` elements, one key stream) and write their sum in rank order into the 1-D
    float tensor ``out``: the bits of decoding body 0 into ``out``, then each next body into a
    tensor ``tmp`` like ``out`` and ``out += tmp`` (phase 2 of the exchange). With ``average``
    (float32 ``out``) the sum is then divided by N in IEEE division, as ``out /= N`` on a CPU.

    CUDA tensors: one Triton kernel that writes the sum once (the torch ops where it is not
    available). CPU tensors: the Rust decoder, body by body. ``out`` must not overlap
    ``bodies`` in memory (``ValueError``).
    """
    _check_disjoint(("bodies", bodies), ("out", out))
    if average and out.dtype != torch.float32:
        raise ValueError(f"average needs a float32 output, got {out.dtype}")
    nbodies = bodies.numel() // slot
    if _resolve_backend(backend, bodies.device) == "rust":
        tmp = torch.empty_like(out) if nbodies > 1 else None
        for j in range(nbodies):
            _rust_decode(bodies[j * slot:(j + 1) * slot][: _native.body_nbytes(
                out.numel(), mode_id, block_log2)], out if j == 0 else tmp, mode_id,
                block_log2, seed, stream)
            if j:
                out += tmp
        if average:
            out /= nbodies
    else:
        _tc.decode_sum_into(bodies, out, slot=slot, seed=seed, stream=stream, mode=mode_id,
                            block_log2=block_log2, nbodies=nbodies, average=average)


def encode(
    x,
    *,
    seed: int = 0,
    stream: int = 0,
    mode: str = "ternary",
    block_size: Optional[int] = None,
    residual: Optional[torch.Tensor] = None,
    backend: str = "auto",
    unbiased: bool = False,
) -> Payload:
    """Encode a 1-D float tensor into a :class:`Payload`.

    Args:
        x: 1-D contiguous float32, float16 or bfloat16 tensor (or numpy array), any device.
        seed: shared seed of the keys, an int in [0, 2**64). Every rank must use the same.
        stream: key stream (mix of step and bucket id), an int in [0, 2**64).
        mode: ``"ternary"`` (1.6 bits/element), ``"sign"`` (1 bit) or ``"int2"`` (2 bits).
        block_size: Hadamard block, a power of two from 256 to 65536 (default 1024).
        residual: error-feedback state, a tensor like ``x``. When given, ``x + residual`` is
            encoded and ``residual`` is updated in place to what the payload does not carry.
            It must not overlap ``x`` in memory.
        backend: ``"rust"`` (CPU tensors), ``"torch"`` (any device) or ``"auto"``.
        unbiased: int2 only: each block's scale is ``|z|^2 / <z, m>`` (z the spread block, m
            its levels) instead of least squares' ``<z, m> / <m, m>``. Least squares shrinks
            the decoded vector (by about 0.88 on Gaussian blocks); with this scale its
            projection on the input is the input, so over fresh streams (keys) the decoded
            vectors average to ``x``: the scale for an exchange without error feedback. The
            format and the decoder are the same.

    Raises:
        ValueError: bad arguments (a ``residual`` that overlaps ``x`` too; ``unbiased`` in a
            mode other than int2), or NaN/Inf in ``x`` or ``residual`` (nothing is modified).
    """
    x = _as_tensor(x)
    _check_vector(x)
    mid = mode_id(mode)
    if unbiased and mode != "int2":
        raise ValueError(f"unbiased is a scale of int2, got mode {mode!r}")
    blog = block_log2(block_size)
    seed = u64("seed", seed)
    stream = u64("stream", stream)
    backend = _resolve_backend(backend, x.device)
    if residual is not None:
        residual = _as_tensor(residual)
        _check_vector(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"residual must match x: got {tuple(residual.shape)} {residual.dtype} on "
                f"{residual.device}, x is {tuple(x.shape)} {x.dtype} on {x.device}"
            )
    out = torch.empty(_native.body_nbytes(x.numel(), mid, blog), dtype=torch.uint8,
                      device=x.device)
    encode_body_into(x, out, seed=seed, stream=stream, mode_id=mid, block_log2=blog,
                     residual=residual, backend=backend, unbiased=unbiased)
    return Payload(out, n=x.numel(), dtype=x.dtype, mode=mode, block_size=1 << blog,
                   seed=seed, stream=stream)


def decode(
    payload: Payload, *, out: Optional[torch.Tensor] = None, backend: str = "auto"
) -> torch.Tensor:
    """Decode a :class:`Payload` into a tensor of its length and dtype, on its device.

    Args:
        payload: what :func:`encode` or :meth:`Payload.from_bytes` returned.
        out: a tensor to decode into instead of a new one: 1-D, contiguous, ``payload.n``
            elements of ``payload.dtype`` on ``payload.device``, not requiring grad, and not
            overlapping the payload's body in memory. A buffer reused from call to call saves
            the page faults of fresh memory, which cost more than the Rust decode itself on
            large vectors (benchmarks/codec.py, the ``rust api`` and ``rust api out=`` rows).
        backend: ``"rust"`` (CPU tensors), ``"torch"`` (any device) or ``"auto"``.

    Returns:
        ``out`` if given, else a new tensor.

    Raises:
        ValueError: a malformed payload, or an ``out`` that does not fit (nothing is written).
            A body corrupted by hand (a packed ternary byte above 242, which
            :meth:`Payload.from_bytes` refuses) is found while decoding, and may leave ``out``
            partly written.
    """
    if not isinstance(payload, Payload):
        raise ValueError(f"decode takes a Payload, got {type(payload).__name__}")
    body = payload.body
    if not isinstance(body, torch.Tensor) or body.dtype != torch.uint8 or body.dim() != 1:
        raise ValueError("payload body must be a 1-D uint8 tensor")
    mid = mode_id(payload.mode)
    blog = block_log2(payload.block_size)
    expected = _native.body_nbytes(payload.n, mid, blog)
    if body.numel() != expected:
        raise ValueError(
            f"payload body is {body.numel()} bytes, expected {expected} (truncated or corrupted)"
        )
    backend = _resolve_backend(backend, body.device)
    if out is None:
        out = torch.empty(payload.n, dtype=payload.dtype, device=body.device)
    else:
        _check_out(out, payload)
    decode_body_into(body.contiguous(), out, seed=payload.seed, stream=payload.stream,
                     mode_id=mid, block_log2=blog, backend=backend)
    return out


def _check_out(out, payload: Payload) -> None:
    """``ValueError`` unless ``out`` can take the decoded ``payload`` as it is (overlap with the
    body is checked by ``decode_body_into``)."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"out must be a torch.Tensor, got {type(out).__name__} "
            "(wrap a numpy array with torch.from_numpy)"
        )
    want = f"a 1-D contiguous {payload.dtype} tensor of {payload.n} elements on {payload.device}"
    if out.dtype != payload.dtype:
        raise ValueError(f"out must be {want} (the payload's dtype), got dtype {out.dtype}")
    if out.dim() != 1 or out.numel() != payload.n:
        raise ValueError(f"out must be {want}, got shape {tuple(out.shape)}")
    if out.device != payload.device:
        raise ValueError(f"out must be {want} (the payload's device), got one on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"out must be {want}, got a non-contiguous view")
    if out.requires_grad:
        raise ValueError("out must not require grad (decode writes into it in place)")

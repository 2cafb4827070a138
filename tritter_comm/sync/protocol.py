"""Packed-ternary weight sync: BitNet b1.58 weights packed five trits a byte (issue 8).

``pack_ternary`` / ``unpack_ternary`` quantize one tensor (per row or per group: an absmean
threshold, a least-squares scale) into a :class:`PackedTernary` of 1.6 bits a weight plus one
f32 scale a group (docs/FORMAT.md, "Packed ternary weights"). CPU tensors go through the Rust
core, other devices through the torch twin below; both give the same bytes and the same decoded
values.

:class:`TernaryWeightSync` sends a module's weights as packed deltas:

* ``broadcast()``: ``src`` sends ``pack(w - replica)`` where ``replica`` is what the receivers
  hold (zeros before the first round); everyone adds the decoded delta to the replica. What the
  quantization drops stays in ``w - replica`` and goes out in the next round (error feedback),
  so the receivers converge to ``src``'s weights; an already-ternary model arrives exactly in the
  first round. Use case: trainer to inference or rollout workers.
* ``average()``: every rank packs its delta from a shared anchor (the weights at the last sync),
  all ranks gather the same packed bytes, decode them and average them in rank order, so every
  replica ends bit-identical: the outer step of local SGD. The first ``average()`` (no anchor
  yet) averages the exact weights.

With ``group=``, everything happens within the group: ranks are ranks in the group (the
order of the average, whose residual is whose), ``src`` is a global rank as in
``torch.distributed.broadcast`` (by default the group's first), and only the group's ranks may
call the methods (issue 14).

Buffers (BatchNorm statistics) and non-float parameters go across exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import _native
from .. import codec as _codec

__all__ = [
    "PackedTernary",
    "TernaryWeightSync",
    "pack_ternary",
    "unpack_ternary",
    "packed_nbytes",
    "RULES",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"TPK3"
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPE_OF = {v: k for k, v in _DTYPES.items()}
_MAX_GROUP = 1 << 31
_MAX_NUMEL = 1 << 40
_MAX_NDIM = 8
_FIXED_BITS = 30
RULES = ("absmean", "adaptive")


def _check_rule(rule: str) -> bool:
    """True for the adaptive rule."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return rule == "adaptive"


def _check_group_size(group_size: Optional[int]) -> None:
    if group_size is None:
        return
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or not 1 <= group_size <= _MAX_GROUP
    ):
        raise ValueError(
            f"group_size must be None (one scale per row) or an int from 1 to 2**31, "
            f"got {group_size!r}"
        )


def _group_of(shape: Sequence[int], group_size: Optional[int]) -> int:
    return _native.sync_row_group(list(shape)) if group_size is None else group_size


def _ngroups(n: int, group: int) -> int:
    return -(-n // group)


def _codes_len(n: int, group: int) -> int:
    c = _ngroups(n, group)
    if c == 0:
        return 0
    return (c - 1) * (-(-group // 5)) + -(-(n - (c - 1) * group) // 5)


def packed_nbytes(shape: Sequence[int], *, group_size: Optional[int] = None) -> int:
    """Serialized bytes (``len(to_bytes())``) of a tensor of ``shape``: header, scales, codes.

    This is the format's size function: use it to size a model, e.g. a list of shapes.
    """
    _check_group_size(group_size)
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {shape} has a negative dimension")
    return _native.sync_nbytes(shape, group_size)


class PackedTernary:
    """A packed ternary tensor: one f32 scale per group and five trits a byte.

    ``nbytes`` is exactly ``len(to_bytes())``; ``body_nbytes`` is the scales and codes alone
    (what :class:`TernaryWeightSync` puts on the wire, both ends knowing the shapes).
    """

    __slots__ = ("shape", "dtype", "group_size", "per_row", "scales", "codes")

    def __init__(self, *, shape, dtype, group_size, per_row, scales, codes):
        self.shape: Tuple[int, ...] = tuple(shape)
        self.dtype: torch.dtype = dtype
        self.group_size: int = group_size
        self.per_row: bool = per_row
        self.scales: Tensor = scales  # float32, one per group
        self.codes: Tensor = codes  # uint8

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def header_nbytes(self) -> int:
        return 16 + 8 * len(self.shape)

    @property
    def body_nbytes(self) -> int:
        return 4 * self.scales.numel() + self.codes.numel()

    @property
    def nbytes(self) -> int:
        return self.header_nbytes + self.body_nbytes

    def header(self) -> bytes:
        return _native.sync_header(
            _DTYPES[self.dtype], self.per_row, self.group_size, list(self.shape)
        )

    def to_bytes(self) -> bytes:
        scales = self.scales.detach().cpu().numpy().astype("<f4", copy=False)
        return self.header() + scales.tobytes() + self.codes.detach().cpu().numpy().tobytes()

    @classmethod
    def from_bytes(cls, b: Union[bytes, bytearray, memoryview], *, device=None) -> "PackedTernary":
        """Parse and validate serialized packed weights. Anything malformed (magic, version,
        dtype, shape, group, length, a scale that is not finite and >= 0, a packed byte above
        242, nonzero padding) raises ``ValueError``; sizes are checked against ``len(b)``
        before anything is allocated."""
        if not isinstance(b, (bytes, bytearray, memoryview)):
            raise ValueError(f"from_bytes takes bytes, got {type(b).__name__}")
        b = bytes(b)
        dtype, per_row, group, shape, hl = _native.sync_check(b, _codec._num_threads)
        n = 1
        for d in shape:
            n *= d
        ng = _ngroups(n, group)
        scales = np.frombuffer(b, dtype="<f4", count=ng, offset=hl).astype(np.float32)
        codes = np.frombuffer(b, dtype=np.uint8, offset=hl + 4 * ng).copy()
        s, c = torch.from_numpy(scales), torch.from_numpy(codes)
        if device is not None:
            s, c = s.to(device), c.to(device)
        return cls(shape=shape, dtype=_DTYPE_OF[dtype], group_size=group, per_row=per_row,
                   scales=s, codes=c)

    def __eq__(self, other):
        if not isinstance(other, PackedTernary):
            return NotImplemented
        return (
            self.header() == other.header()
            and torch.equal(self.scales.cpu(), other.scales.cpu())
            and torch.equal(self.codes.cpu(), other.codes.cpu())
        )

    __hash__ = None  # mutable tensors

    def __repr__(self):
        g = "per row" if self.per_row else str(self.group_size)
        return (
            f"PackedTernary(shape={self.shape}, dtype={self.dtype}, group_size={self.group_size} "
            f"({g}), nbytes={self.nbytes}, device={self.device})"
        )


# ------------------------------------------------------------------------------ backends


def _np(t: Tensor) -> np.ndarray:
    return _codec._np(t)


def _rust_pack(x: Tensor, group: int, scales: Tensor, codes: Tensor, adaptive: bool) -> None:
    if x.dtype == torch.float32:
        _native.sync_pack_f32(_np(x), group, scales.numpy(), codes.numpy(), _codec._num_threads,
                              adaptive)
    else:
        _native.sync_pack_u16(_np(x), x.dtype == torch.bfloat16, group, scales.numpy(),
                              codes.numpy(), _codec._num_threads, adaptive)


def _rust_unpack(scales: Tensor, codes: Tensor, group: int, out: Tensor) -> None:
    if out.dtype == torch.float32:
        _native.sync_unpack_f32(scales.numpy(), codes.numpy(), group, out.numpy(),
                                _codec._num_threads)
    else:
        _native.sync_unpack_u16(scales.numpy(), codes.numpy(), group, _np(out),
                                out.dtype == torch.bfloat16, _codec._num_threads)


_POW3 = (1, 3, 9, 27, 81)
_LEVELS: Dict[torch.device, Tensor] = {}


def _levels(device: torch.device) -> Tensor:
    """(243, 5) float32: the trits -1/0/1 of each valid byte."""
    t = _LEVELS.get(device)
    if t is None:
        b = torch.arange(243)
        t = torch.stack([(b // p) % 3 for p in _POW3], 1).float().sub_(1).to(device)
        _LEVELS[device] = t
    return t


def _torch_pack(x: Tensor, group: int, adaptive: bool = False) -> Tuple[Tensor, Tensor]:
    """The torch twin of ``sync::pack`` (any device): the same scales and bytes."""
    n = x.numel()
    ng = _ngroups(n, group)
    dev = x.device
    if ng == 0:
        return torch.empty(0, dtype=torch.float32, device=dev), torch.empty(
            0, dtype=torch.uint8, device=dev)
    xf = x.float()
    if not bool(torch.isfinite(xf).all()):
        raise ValueError("weights contain NaN or Inf")
    pad = ng * group - n
    g = torch.nn.functional.pad(xf, (0, pad)).view(ng, group)
    a = g.abs().double()
    m = a.amax(1)
    # frexp: max|w| = f * 2^e with f in [0.5, 1); |w| * 2^(30 - e) < 2^30 (sync.rs).
    _, e = torch.frexp(m)
    e = torch.where(m > 0, e, torch.full_like(e, -148))
    # 2^(30 - e) built from its bits: exact on every device.
    u = ((1023 + _FIXED_BITS - e.long()) << 52).view(torch.float64)
    q = torch.floor(a * u[:, None]).long()
    lens = torch.full((ng,), group, dtype=torch.float64, device=dev)
    lens[-1] = n - (ng - 1) * group
    gamma = q.sum(1).double() / lens / u

    def candidate(th):
        nz = (2.0 * a) > th[:, None]
        k = nz.sum(1)
        snz = (q * nz).sum(1)
        kd, sd = k.double(), snz.double()
        energy = torch.where(k > 0, sd * (sd / kd.clamp(min=1)), 0.0)
        return nz, k, snz, energy

    nz, k, snz, energy = candidate(gamma)
    if adaptive:  # the better of absmean and |w| > max/2, by captured energy (sync.rs)
        nzb, kb, snzb, eb = candidate(m)
        take = eb > energy
        nz = torch.where(take[:, None], nzb, nz)
        k = torch.where(take, kb, k)
        snz = torch.where(take, snzb, snz)
    scales = torch.where(k > 0, snz.double() / k.clamp(min=1).double() / u, 0.0).float()
    codes = torch.where(nz, torch.where(g > 0, 2, 0), 1).to(torch.uint8)
    if pad:
        codes.view(-1)[n:] = 0
    gb = -(-group // 5)
    codes = torch.nn.functional.pad(codes, (0, 5 * gb - group)).view(ng, gb, 5).long()
    w = torch.tensor(_POW3, dtype=torch.long, device=dev)
    packed = (codes * w).sum(2).to(torch.uint8).view(-1)
    return scales, packed[: _codes_len(n, group)]


def _torch_unpack(scales: Tensor, codes: Tensor, group: int, n: int, dtype) -> Tensor:
    """The torch twin of ``sync::unpack``, with its validation."""
    ng = _ngroups(n, group)
    dev = codes.device
    if ng == 0:
        return torch.empty(0, dtype=dtype, device=dev)
    gb = -(-group // 5)
    full = torch.zeros(ng * gb, dtype=torch.uint8, device=dev)
    full[: codes.numel()] = codes
    full = full.view(ng, gb)
    last_len = n - (ng - 1) * group
    bad = (full > 242).any() | (~torch.isfinite(scales)).any() | torch.signbit(scales).any()
    # The padding codes of each group's last byte are 0: the byte is below 3^(len % 5).
    if group % 5 and ng > 1:
        bad |= (full[: ng - 1, gb - 1] >= 3 ** (group % 5)).any()
    if last_len % 5:
        bad |= full[ng - 1, -(-last_len // 5) - 1] >= 3 ** (last_len % 5)
    if bool(bad):
        raise ValueError(
            "corrupted packed weights: a packed byte above 242, nonzero padding, or a scale "
            "that is not finite and >= 0"
        )
    lv = _levels(dev)[full.long()].view(ng, gb * 5)[:, :group]
    out = (lv * scales[:, None]).reshape(-1)[:n]
    return out.to(dtype)


def _resolve_backend(backend: str, device: torch.device) -> str:
    return _codec._resolve_backend(backend, device)


def _check_weight(w) -> Tensor:
    if not isinstance(w, Tensor):
        raise ValueError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _DTYPES:
        raise ValueError(
            f"w must be float32, float16 or bfloat16, got {w.dtype} "
            "(non-float tensors are not quantized; send them as they are)"
        )
    if w.dim() > _MAX_NDIM:
        raise ValueError(f"w has {w.dim()} dimensions, the format holds at most {_MAX_NDIM}")
    return w


def pack_ternary(
    w: Tensor,
    *,
    group_size: Optional[int] = None,
    rule: str = "absmean",
    backend: str = "auto",
) -> PackedTernary:
    """Quantize ``w`` to ternary (BitNet b1.58) and pack it five trits a byte.

    Each group (a row, ``numel // shape[0]`` elements, by default; else ``group_size``
    consecutive elements of the flattened tensor) gets the codes ``sign(w)`` where
    ``|w| > mean|w| / 2`` (absmean, round and clip) and 0 elsewhere, and the scale
    ``mean |w|`` over its nonzero codes (least squares). Weights that are already
    ``scale * {-1, 0, 1}`` per group round-trip exactly.

    Args:
        w: float32, float16 or bfloat16 tensor of up to 8 dimensions, any device.
        group_size: ``None`` for one scale per row, else elements per group (1 to 2**31).
        rule: ``"absmean"`` (BitNet b1.58's threshold) or ``"adaptive"``: per group the
            better, by squared error, of absmean and ``|w| > max|w| / 2``. Deltas under error
            feedback need the adaptive rule to converge geometrically (their errors become
            heavy-tailed); the decoder does not care which rule chose the codes.
        backend: ``"rust"`` (CPU), ``"torch"`` (any device) or ``"auto"``; same bytes.

    Raises:
        ValueError: bad arguments, or NaN/Inf in ``w``.
    """
    w = _check_weight(w)
    _check_group_size(group_size)
    adaptive = _check_rule(rule)
    backend = _resolve_backend(backend, w.device)
    shape = tuple(w.shape)
    group = _group_of(shape, group_size)
    n = w.numel()
    if n > _MAX_NUMEL:
        raise ValueError(f"tensor of {n} elements exceeds the format's limit of 2**40")
    x = w.detach().reshape(-1).contiguous()
    if backend == "rust":
        scales = torch.empty(_ngroups(n, group), dtype=torch.float32)
        codes = torch.empty(_codes_len(n, group), dtype=torch.uint8)
        if n:
            _rust_pack(x, group, scales, codes, adaptive)
    else:
        scales, codes = _torch_pack(x, group, adaptive)
    return PackedTernary(shape=shape, dtype=w.dtype, group_size=group,
                         per_row=group_size is None, scales=scales, codes=codes)


def unpack_ternary(p: PackedTernary, *, backend: str = "auto") -> Tensor:
    """Decode a :class:`PackedTernary` into a tensor of its shape and dtype, on its device.

    The values are ``scale * t`` in float32 rounded to the dtype: the same bits on every rank
    and with either backend.

    Raises:
        ValueError: a malformed ``p`` (lengths, scales, packed bytes).
    """
    if not isinstance(p, PackedTernary):
        raise ValueError(f"unpack_ternary takes a PackedTernary, got {type(p).__name__}")
    n, group = p.numel, p.group_size
    _check_group_size(group)
    for name, t, dt in (("scales", p.scales, torch.float32), ("codes", p.codes, torch.uint8)):
        if not isinstance(t, Tensor) or t.dtype != dt or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D {dt} tensor")
    if p.scales.numel() != _ngroups(n, group) or p.codes.numel() != _codes_len(n, group):
        raise ValueError(
            f"scales/codes have {p.scales.numel()}/{p.codes.numel()} elements, a tensor of "
            f"shape {p.shape} in groups of {group} needs {_ngroups(n, group)}/"
            f"{_codes_len(n, group)} (truncated or corrupted)"
        )
    if p.dtype not in _DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {p.dtype}")
    backend = _resolve_backend(backend, p.codes.device)
    if backend == "rust":
        out = torch.empty(n, dtype=p.dtype)
        if n:
            _rust_unpack(p.scales.contiguous(), p.codes.contiguous(), group, out)
    else:
        out = _torch_unpack(p.scales, p.codes, group, n, p.dtype)
    return out.view(p.shape)


def _pack_into(x: Tensor, group: int, scales: Tensor, codes: Tensor, adaptive: bool) -> None:
    """Pack the flat contiguous ``x`` into preallocated views (the sync's buffers)."""
    if x.device.type == "cpu":
        _rust_pack(x, group, scales, codes, adaptive)
    else:
        s, c = _torch_pack(x, group, adaptive)
        scales.copy_(s)
        codes.copy_(c)


def _unpack_into(scales: Tensor, codes: Tensor, group: int, out: Tensor) -> None:
    if out.device.type == "cpu":
        _rust_unpack(scales, codes, group, out)
    else:
        out.copy_(_torch_unpack(scales, codes, group, out.numel(), out.dtype))


# --------------------------------------------------------------------------------- the sync


class _Ranks(NamedTuple):
    """Where this process stands in the sync's group, at one call."""

    rank: int  # this process's rank in the group (the all_gather's order)
    world: int  # the group's size
    src: int  # the sender, a global rank (what torch.distributed.broadcast takes)
    is_src: bool  # this process is src


@dataclasses.dataclass
class _Slot:
    """One float parameter: where its scales and codes sit in the body."""

    name: str
    param: Tensor
    n: int
    group: int
    s0: int  # first scale (index into the f32 scales)
    ns: int
    c0: int  # first code byte (offset into the codes region)
    nc: int


class TernaryWeightSync:
    """Send a module's weights as packed-ternary deltas over a process group.

    Args:
        module: the model (its parameters and buffers are synced in place).
        group: process group (default: the world). Every rank of it must call the same
            methods in the same order; ranks outside it must not call them (``ValueError``).
            :meth:`average` orders ranks and residuals by their rank in the group.
        src: the rank that sends in :meth:`broadcast` and whose non-float buffers
            :meth:`average` keeps. A global rank, as in ``torch.distributed.broadcast``, and
            one of the group's; ``None`` (the default) is the group's first rank (group rank
            0), which is global rank 0 for the world.
        error_feedback: :meth:`broadcast` sends the difference to what the receivers hold, so
            what one round drops goes out in the next; without it, it sends the change of the
            sender's weights since the last round, and errors stay. :meth:`average` carries
            each rank's quantization residual into its next delta.
        group_size: ``None`` for one scale per row, else elements per group.
        rule: how deltas are quantized (see :func:`pack_ternary`); ``"adaptive"`` (the
            default) converges geometrically under error feedback, ``"absmean"`` stalls.

    Receivers of :meth:`broadcast` hold the replica: their float parameters are overwritten
    (zeros plus the first delta in the first round). Bytes are counted in :meth:`stats`.
    """

    __slots__ = (
        # hyperparameters
        "module", "group", "src", "error_feedback", "group_size", "rule", "_adaptive",
        # internal state
        "_slots", "_other", "_scales_len", "_codes_len", "_replica",
        "_last", "_anchor", "_residual", "_stats", "_checked",
    )

    def __init__(
        self,
        module: nn.Module,
        *,
        group: Optional[Any] = None,
        src: Optional[int] = None,
        error_feedback: bool = True,
        group_size: Optional[int] = None,
        rule: str = "adaptive",
    ):
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if src is not None and (not isinstance(src, int) or isinstance(src, bool) or src < 0):
            raise ValueError(
                f"src must be None (the group's first rank) or a non-negative int (a global "
                f"rank), got {src!r}"
            )
        _check_group_size(group_size)
        self.module = module
        self.group = group
        self.src = src
        self.error_feedback = bool(error_feedback)
        self.group_size = group_size
        self._adaptive = _check_rule(rule)
        self.rule = rule
        slots: List[_Slot] = []
        other: List[Tuple[str, Tensor]] = []
        s0 = c0 = 0
        for name, p in module.named_parameters():
            if p.dtype in _DTYPES and p.numel() > 0:
                if p.dim() > _MAX_NDIM:
                    raise ValueError(f"parameter {name} has more than {_MAX_NDIM} dimensions")
                g = _group_of(tuple(p.shape), group_size)
                ns, nc = _ngroups(p.numel(), g), _codes_len(p.numel(), g)
                slots.append(_Slot(name, p, p.numel(), g, s0, ns, c0, nc))
                s0, c0 = s0 + ns, c0 + nc
            else:
                other.append((name, p))  # non-float parameters go across exactly
        for name, b in module.named_buffers():
            if b.numel() > 0:
                other.append((name, b))
        self._slots = slots
        self._other = other
        self._scales_len = s0
        self._codes_len = c0
        self._replica: Optional[List[Tensor]] = None
        self._last: Optional[List[Tensor]] = None
        self._anchor: Optional[List[Tensor]] = None
        self._residual: Optional[List[Tensor]] = None
        self._checked = False
        self._stats: Dict[str, Any] = {
            "broadcasts": 0, "averages": 0, "bytes_sent": 0, "exact_bytes": 0,
            "fp32_bytes": 0,
        }

    # -------------------------------------------------------------------------- helpers

    def _world(self) -> _Ranks:
        """This process's rank in the group, the group's size and ``src`` as a global rank;
        ``ValueError`` (before anything changes) on a process outside the group or a ``src``
        outside it."""
        if not (dist.is_available() and dist.is_initialized()):
            if self.src not in (None, 0):
                raise ValueError(
                    f"src={self.src}, but there is no process group: this process is the only "
                    "rank, 0"
                )
            return _Ranks(0, 1, 0, True)
        rank = dist.get_rank(self.group)  # -1 outside the group
        if rank < 0:
            raise ValueError(
                f"global rank {dist.get_rank()} is not in the process group of this "
                "TernaryWeightSync; only the group's ranks may call broadcast(), average() "
                "or mark_synced()"
            )
        ranks = dist.get_process_group_ranks(
            self.group if self.group is not None else dist.group.WORLD)
        src = ranks[0] if self.src is None else self.src
        if src not in ranks:
            shown = ranks if len(ranks) <= 16 else f"{len(ranks)} ranks from {min(ranks)}"
            raise ValueError(
                f"src={src} is not in the sync's process group (global ranks {shown}); src is "
                "a global rank, as in torch.distributed.broadcast"
            )
        return _Ranks(rank, len(ranks), src, ranks[rank] == src)

    @property
    def body_nbytes(self) -> int:
        """Bytes of one packed round: all float parameters' scales and codes."""
        return 4 * self._scales_len + self._codes_len

    @property
    def fp32_nbytes(self) -> int:
        """Bytes of the same float parameters as fp32 (what a plain broadcast sends)."""
        return 4 * sum(s.n for s in self._slots)

    def _device(self) -> torch.device:
        return self._slots[0].param.device if self._slots else torch.device("cpu")

    def _new_body(self) -> Tensor:
        return torch.empty(self.body_nbytes, dtype=torch.uint8, device=self._device())

    def _views(self, body: Tensor, s: _Slot) -> Tuple[Tensor, Tensor]:
        scales = body[: 4 * self._scales_len].view(torch.float32)
        codes = body[4 * self._scales_len :]
        return scales[s.s0 : s.s0 + s.ns], codes[s.c0 : s.c0 + s.nc]

    def _layout_digest(self, src: int) -> int:
        h = hashlib.sha256()
        for s in self._slots:
            h.update(f"{s.name}:{tuple(s.param.shape)}:{s.param.dtype}:{s.group};".encode())
        h.update(f"rule={self.rule};ef={self.error_feedback};src={src}".encode())
        for name, t in self._other:
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        return int.from_bytes(h.digest()[:7], "little")

    def _agree(self, status: int, src: int) -> None:
        """One small all-reduce: every rank learns whether any rank failed to pack, and (the
        first time) whether all ranks have the same parameter layout. Keeps a failure on one
        rank from hanging the others in the next collective."""
        first = not self._checked
        digest = self._layout_digest(src) if first else 0
        t = torch.tensor([status, digest, -digest], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        self._stats["exact_bytes"] += t.numel() * 8
        if int(t[0]) != 0:
            raise ValueError(
                "a rank could not pack its weights (NaN or Inf?); nothing was changed"
            )
        if first:
            if int(t[1]) != digest or int(t[2]) != -digest:
                raise ValueError(
                    "ranks have different parameters or buffers (names, shapes, dtypes or "
                    "group_size) or options (rule, error_feedback, src): build the same module "
                    "and sync on every rank"
                )
            self._checked = True

    def _sync_other_broadcast(self, src: int) -> None:
        for _, t in self._other:
            dist.broadcast(t.data, src=src, group=self.group)
            self._stats["exact_bytes"] += t.numel() * t.element_size()

    def _exact_mean(self, t: torch.Tensor, world: int) -> torch.Tensor:
        """The mean of ``t`` over the ranks in float64, summed in rank order (identical
        everywhere), in ``t``'s dtype."""
        got = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(got, t.contiguous(), group=self.group)
        acc = got[0].double()
        for g in got[1:]:
            acc += g.double()
        return (acc / world).to(t.dtype)

    def _pack_body(self, body: torch.Tensor, deltas, world: int, src: int) -> None:
        """Pack ``deltas`` (flat float32, one per slot, in slot order; empty on a rank that
        sends nothing) into ``body``, then agree with the other ranks that every one could: a
        NaN or Inf anywhere raises ``ValueError`` on every rank, before any collective that
        would hang."""
        status = 0
        try:
            for s, d in zip(self._slots, deltas):
                sc, cd = self._views(body, s)
                _pack_into(d, s.group, sc, cd, self._adaptive)
        except ValueError:
            if world == 1:
                raise
            status = 1
        if world > 1:
            self._agree(status, src)

    def _sync_other_average(self, world: int, src: int) -> None:
        """Float buffers: the exact mean, summed in rank order (identical everywhere);
        others: ``src``'s value (``src`` a global rank)."""
        for _, t in self._other:
            if t.dtype.is_floating_point:
                t.data.copy_(self._exact_mean(t.data, world))
            else:
                dist.broadcast(t.data, src=src, group=self.group)
            self._stats["exact_bytes"] += t.numel() * t.element_size()

    # ------------------------------------------------------------------------ broadcast

    @torch.no_grad()
    def broadcast(self) -> Dict[str, Any]:
        """One round from ``src`` to the other ranks; returns this round's numbers.

        Collectives: one all-reduce of 3 int64 (status), one broadcast of the packed body, one
        broadcast per buffer or non-float parameter.
        """
        where = self._world()
        world = where.world
        if self._replica is None:
            self._replica = [torch.zeros_like(s.param) for s in self._slots]
            if not self.error_feedback:
                self._last = [torch.zeros_like(s.param) for s in self._slots]
        body = self._new_body()
        sending = where.is_src
        refs = self._replica if self.error_feedback else self._last
        outgoing = ((s.param.float() - ref.float()).reshape(-1)
                    for s, ref in zip(self._slots, refs)) if sending else ()
        self._pack_body(body, outgoing, world, where.src)
        if world > 1:
            dist.broadcast(body, src=where.src, group=self.group)
        deltas = []
        for i, s in enumerate(self._slots):
            sc, cd = self._views(body, s)
            d = torch.empty(s.n, dtype=torch.float32, device=body.device)
            _unpack_into(sc, cd, s.group, d)
            deltas.append(d)
        max_dev = 0.0
        for i, s in enumerate(self._slots):
            new = (self._replica[i].float() + deltas[i].view(s.param.shape)).to(s.param.dtype)
            self._replica[i].copy_(new)
            if sending:
                if not self.error_feedback:
                    self._last[i].copy_(s.param)
                max_dev = max(max_dev, float((s.param.float() - new.float()).abs().max()))
            else:
                s.param.copy_(new)
        if world > 1:
            self._sync_other_broadcast(where.src)
        self._stats["broadcasts"] += 1
        if sending and world > 1:
            self._stats["bytes_sent"] += self.body_nbytes
        self._stats["fp32_bytes"] += self.fp32_nbytes
        out = {"body_nbytes": self.body_nbytes, "fp32_nbytes": self.fp32_nbytes}
        if sending:
            out["max_deviation"] = max_dev  # max |w - replica| after this round
        return out

    # -------------------------------------------------------------------------- average

    @torch.no_grad()
    def average(self) -> Dict[str, Any]:
        """Average the module over the ranks (local SGD's outer step); all end identical.

        Each rank packs ``w - anchor`` (plus its residual with error feedback); the packed
        bodies are all-gathered, decoded and averaged in the order of the ranks in the group;
        the new weights are ``anchor + mean delta``, and they become the anchor. The first call
        has no anchor and averages the exact weights.
        """
        where = self._world()
        rank, world = where.rank, where.world  # rank in the group: its index in the gather
        if self._anchor is None or world == 1:  # one rank: its weights are the average
            return self._average_exact(world, where.src)
        body = self._new_body()
        own = [(s.param.float() - a.float()).reshape(-1)
               for s, a in zip(self._slots, self._anchor)]
        if self.error_feedback:
            for d, e in zip(own, self._residual):
                d += e
        self._pack_body(body, own, world, where.src)
        if world > 1:
            bodies = [torch.empty_like(body) for _ in range(world)]
            dist.all_gather(bodies, body, group=self.group)
        else:
            bodies = [body]
        for i, s in enumerate(self._slots):
            acc = torch.zeros(s.n, dtype=torch.float32, device=body.device)
            d = torch.empty(s.n, dtype=torch.float32, device=body.device)
            for r, b in enumerate(bodies):
                sc, cd = self._views(b, s)
                _unpack_into(sc, cd, s.group, d)
                acc += d
                if r == rank and self.error_feedback:
                    self._residual[i].copy_(own[i] - d)
            new = (self._anchor[i].float() + (acc / world).view(s.param.shape)).to(s.param.dtype)
            s.param.copy_(new)
            self._anchor[i].copy_(new)
        if world > 1:
            self._sync_other_average(world, where.src)
            self._stats["bytes_sent"] += self.body_nbytes
        self._stats["averages"] += 1
        self._stats["fp32_bytes"] += self.fp32_nbytes
        return {"body_nbytes": self.body_nbytes, "fp32_nbytes": self.fp32_nbytes,
                "exact": False}

    def _average_exact(self, world: int, src: int) -> Dict[str, Any]:
        if world > 1:
            self._agree(0, src)
            for s in self._slots:
                s.param.copy_(self._exact_mean(s.param.data, world))
                self._stats["exact_bytes"] += s.n * s.param.element_size()
            self._sync_other_average(world, src)
        self._anchor = [s.param.detach().clone() for s in self._slots]
        if self._residual is None:
            self._residual = [torch.zeros(s.n, dtype=torch.float32, device=s.param.device)
                              for s in self._slots]
        self._stats["averages"] += 1
        return {"body_nbytes": 0, "fp32_nbytes": self.fp32_nbytes, "exact": True}

    @torch.no_grad()
    def mark_synced(self) -> None:
        """Declare the float parameters identical on every rank now (same seed, a loaded
        checkpoint, DDP's initial broadcast): they become the anchor of :meth:`average` and
        the replica of :meth:`broadcast`, so no exact first round is needed. One small
        all-reduce checks a digest of the weights; ranks that differ raise ``ValueError``.
        """
        world = self._world().world
        if world > 1:
            h = hashlib.sha256()
            for sl in self._slots:
                h.update(sl.param.detach().contiguous().view(-1).view(torch.uint8).cpu()
                         .numpy().tobytes())
            d = int.from_bytes(h.digest()[:7], "little")
            t = torch.tensor([d, -d], dtype=torch.int64, device=self._device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            self._stats["exact_bytes"] += 16
            if int(t[0]) != d or int(t[1]) != -d:
                raise ValueError("mark_synced: the ranks' weights differ; use average() or "
                                 "broadcast() to make them equal first")
        self._anchor = [sl.param.detach().clone() for sl in self._slots]
        self._replica = [sl.param.detach().clone() for sl in self._slots]
        if not self.error_feedback:
            self._last = [sl.param.detach().clone() for sl in self._slots]
        self._residual = [torch.zeros(sl.n, dtype=torch.float32, device=sl.param.device)
                          for sl in self._slots]

    # ------------------------------------------------------------------------ state

    def stats(self) -> Dict[str, Any]:
        """Rounds and bytes so far. ``bytes_sent``: packed bodies this rank handed to a
        collective as a sender; ``exact_bytes``: buffers, non-float tensors, control
        tensors and exact first averages; ``fp32_bytes``: what the same rounds would send as
        an fp32 broadcast of the float parameters."""
        st = dict(self._stats)
        st["body_nbytes"] = self.body_nbytes
        st["float_params"] = sum(s.n for s in self._slots)
        return st

    def state_dict(self) -> Dict[str, Any]:
        """Replica, anchor and residuals: tensors and ints only, so ``torch.load(...,
        weights_only=True)`` reads a checkpoint of it."""
        def lst(x):
            return None if x is None else [t.detach().clone() for t in x]

        return {
            "version": 1,
            "replica": lst(self._replica),
            "last": lst(self._last),
            "anchor": lst(self._anchor),
            "residual": lst(self._residual),
            "stats": {k: int(v) for k, v in self._stats.items()},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != 1:
            raise ValueError("not a TernaryWeightSync state_dict (version 1)")

        def lst(key, like):
            x = state.get(key)
            if x is None:
                return None
            if not isinstance(x, list) or len(x) != len(self._slots):
                raise ValueError(f"state_dict[{key!r}] does not match this module")
            out = []
            for t, s in zip(x, self._slots):
                want = like(s)
                if not isinstance(t, Tensor) or t.shape != want.shape or t.dtype != want.dtype:
                    raise ValueError(
                        f"state_dict[{key!r}] entry for {s.name} does not match this module"
                    )
                out.append(t.detach().clone().to(want.device))
            return out

        param_like = lambda s: s.param  # noqa: E731
        flat_like = lambda s: torch.empty(s.n, dtype=torch.float32)  # noqa: E731
        self._replica = lst("replica", param_like)
        self._last = lst("last", param_like)
        self._anchor = lst("anchor", param_like)
        self._residual = lst("residual", flat_like)
        for k, v in state.get("stats", {}).items():
            if k in self._stats:
                self._stats[k] = int(v)

    def __getstate__(self):
        raise TypeError("TernaryWeightSync holds a process group; save state_dict() instead")

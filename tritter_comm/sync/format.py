"""The packed-ternary format (docs/FORMAT.md, "Packed ternary weights"): its limits, the group
and size arithmetic, and :class:`PackedTernary` with its serialized form."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .. import codec as _codec
from . import _rust

__all__ = ["PackedTernary", "packed_nbytes", "RULES"]

FORMAT_VERSION = _rust.SYNC_FORMAT_VERSION  # from src/sync.rs (docs/FORMAT.md, "Versions")
MAGIC = _rust.SYNC_MAGIC
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPE_OF = {v: k for k, v in _DTYPES.items()}
_MAX_GROUP = 1 << 31
_MAX_NUMEL = 1 << 40
_MAX_NDIM = 8
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
    return _rust.sync_row_group(list(shape)) if group_size is None else group_size


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
    return _rust.sync_nbytes(shape, group_size)


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
        return _rust.sync_header(
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
        dtype, per_row, group, shape, hl = _rust.sync_check(b, _codec._num_threads)
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

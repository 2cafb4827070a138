"""``pack_ternary`` and ``unpack_ternary``: check the arguments, then run the Rust core on CPU
tensors and the torch twin on other devices (the same bytes and values either way)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import codec as _codec
from ._rust import _rust_pack, _rust_unpack
from ._torch import _torch_pack, _torch_unpack
from .format import (
    _DTYPES,
    _MAX_NDIM,
    _MAX_NUMEL,
    PackedTernary,
    _check_group_size,
    _check_rule,
    _codes_len,
    _group_of,
    _ngroups,
)

__all__ = ["pack_ternary", "unpack_ternary"]


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

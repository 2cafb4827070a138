"""Weight sync's binding to the Rust core (src/sync.rs): the one module of the package that
imports ``_native``. Packs and unpacks CPU tensors in place, and hands ``format.py`` the
format's header, validation and size functions."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import _native
from .. import codec as _codec

# The format's version and magic, its header, validation and sizes (format.py). The version and
# the magic are defined once, in src/sync.rs, which writes and checks the header.
SYNC_FORMAT_VERSION: int = _native.SYNC_FORMAT_VERSION
SYNC_MAGIC: bytes = _native.SYNC_MAGIC
sync_check = _native.sync_check
sync_header = _native.sync_header
sync_nbytes = _native.sync_nbytes
sync_row_group = _native.sync_row_group


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

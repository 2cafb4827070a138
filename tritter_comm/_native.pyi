"""Type stubs of the Rust extension ``tritter_comm._native`` (src/python.rs)."""

from typing import Optional

import numpy as np
import numpy.typing as npt

__version__: str
FORMAT_VERSION: int  # the gradient payload's (src/codec.rs)
SYNC_FORMAT_VERSION: int  # the packed ternary weights' (src/sync.rs VERSION)
SYNC_MAGIC: bytes  # b"TPK3"

def encode_f32(
    x: npt.NDArray[np.float32],
    out: npt.NDArray[np.uint8],
    mode: int,
    block_log2: int,
    seed: int,
    stream: int,
    residual: Optional[npt.NDArray[np.float32]] = None,
    threads: int = 0,
    check_finite: bool = True,
    unbiased: bool = False,
) -> None: ...
def encode_u16(
    x: npt.NDArray[np.uint16],
    out: npt.NDArray[np.uint8],
    bf16: bool,
    mode: int,
    block_log2: int,
    seed: int,
    stream: int,
    residual: Optional[npt.NDArray[np.uint16]] = None,
    threads: int = 0,
    check_finite: bool = True,
    unbiased: bool = False,
) -> None: ...
def decode_f32(
    body: npt.NDArray[np.uint8],
    out: npt.NDArray[np.float32],
    mode: int,
    block_log2: int,
    seed: int,
    stream: int,
    threads: int = 0,
) -> None: ...
def decode_u16(
    body: npt.NDArray[np.uint8],
    out: npt.NDArray[np.uint16],
    bf16: bool,
    mode: int,
    block_log2: int,
    seed: int,
    stream: int,
    threads: int = 0,
) -> None: ...
def body_nbytes(n: int, mode: int, block_log2: int) -> int: ...
def cpu_features() -> list[str]: ...
def simd_level() -> str: ...
def set_simd_level(name: str) -> str: ...
def default_threads() -> int: ...

# Packed-ternary weights (src/sync.rs, tritter_comm/sync.py).
def sync_pack_f32(
    w: npt.NDArray[np.float32],
    group: int,
    scales: npt.NDArray[np.float32],
    codes: npt.NDArray[np.uint8],
    threads: int = 0,
    adaptive: bool = False,
) -> None: ...
def sync_pack_u16(
    w: npt.NDArray[np.uint16],
    bf16: bool,
    group: int,
    scales: npt.NDArray[np.float32],
    codes: npt.NDArray[np.uint8],
    threads: int = 0,
    adaptive: bool = False,
) -> None: ...
def sync_unpack_f32(
    scales: npt.NDArray[np.float32],
    codes: npt.NDArray[np.uint8],
    group: int,
    out: npt.NDArray[np.float32],
    threads: int = 0,
) -> None: ...
def sync_unpack_u16(
    scales: npt.NDArray[np.float32],
    codes: npt.NDArray[np.uint8],
    group: int,
    out: npt.NDArray[np.uint16],
    bf16: bool,
    threads: int = 0,
) -> None: ...
def sync_header(dtype: int, per_row: bool, group: int, shape: list[int]) -> bytes: ...
def sync_check(b: bytes, threads: int = 0) -> tuple[int, bool, int, list[int], int]: ...
def sync_nbytes(shape: list[int], group: Optional[int] = None) -> int: ...
def sync_row_group(shape: list[int]) -> int: ...

# the gradient predictor of tritter_comm.optim (src/predict.rs)
def predict_observe(
    g: npt.NDArray[np.float32],
    sum_g: npt.NDArray[np.float32],
    sum_tg: npt.NDArray[np.float32],
    lag: float,
    decay: float,
    coef: Optional[tuple[float, float]] = None,
    threads: int = 0,
) -> tuple[float, float, float]: ...
def predict_apply(
    sum_g: npt.NDArray[np.float32],
    sum_tg: npt.NDArray[np.float32],
    alpha: float,
    beta: float,
    out: npt.NDArray[np.float32],
    threads: int = 0,
) -> None: ...

"""Packed-ternary weight sync (issue 8): see ``protocol.py``."""

from .protocol import (
    FORMAT_VERSION,
    MAGIC,
    RULES,
    PackedTernary,
    TernaryWeightSync,
    pack_ternary,
    packed_nbytes,
    unpack_ternary,
)

__all__ = [
    "PackedTernary",
    "TernaryWeightSync",
    "pack_ternary",
    "unpack_ternary",
    "packed_nbytes",
    "RULES",
]

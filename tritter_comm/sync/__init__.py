"""Packed-ternary weight sync: BitNet b1.58 weights packed five trits a byte (issue 8).

``pack_ternary`` / ``unpack_ternary`` quantize one tensor (per row or per group: an absmean
threshold, a least-squares scale) into a :class:`PackedTernary` of 1.6 bits a weight plus one
f32 scale a group (docs/FORMAT.md, "Packed ternary weights"). CPU tensors go through the Rust
core, other devices through the torch twin; both give the same bytes and the same decoded
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

Modules, one job each: ``format.py`` the format (its limits, group and size arithmetic,
:class:`PackedTernary` and its serialized form); ``_rust.py`` the binding to the Rust core
(src/sync.rs), the package's one importer of ``_native``; ``_torch.py`` the torch twin of the
Rust packing; ``pack.py`` :func:`pack_ternary` and :func:`unpack_ternary`, which pick between the
two; ``protocol.py`` :class:`TernaryWeightSync`.
"""

from .format import RULES, PackedTernary, packed_nbytes
from .format import FORMAT_VERSION, MAGIC  # noqa: F401  (attributes of the old sync.py)
from .pack import pack_ternary, unpack_ternary
from .protocol import TernaryWeightSync

__all__ = [
    "PackedTernary",
    "TernaryWeightSync",
    "pack_ternary",
    "unpack_ternary",
    "packed_nbytes",
    "RULES",
]

"""Communication hooks: DDP (``vsa_hook``) and FSDP1 (``vsa_fsdp_hook``).

FSDP2 (``fully_shard``) takes a custom reduce-scatter instead: see ``tritter_comm.fsdp``.
"""

from .ddp import vsa_hook
from .state import VSAState
from .fsdp import vsa_fsdp_hook

__all__ = ["VSAState", "vsa_fsdp_hook", "vsa_hook"]

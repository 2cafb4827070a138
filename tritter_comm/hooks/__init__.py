"""Communication hooks: DDP (``vsa_hook``) and, as they land, FSDP."""

from .ddp import VSAState, vsa_hook

__all__ = ["VSAState", "vsa_hook"]

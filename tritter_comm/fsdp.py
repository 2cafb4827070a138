"""FSDP2 (``fully_shard``): the compressed reduce-scatter. The code is in
``tritter_comm/hooks/fsdp2.py``; this module is its public name (``tritter_comm.fsdp.enable``).
"""

from .hooks.fsdp2 import MIN_TORCH, VSAReduceScatter, available, enable, module_class

__all__ = ["MIN_TORCH", "VSAReduceScatter", "available", "enable", "module_class"]

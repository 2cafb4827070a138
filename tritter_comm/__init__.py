"""tritter-comm: gradient compression for PyTorch distributed training.

VSA spread (shared random bipolar keys + Walsh-Hadamard) and ternary quantization packed five
trits a byte, with error feedback, behind DDP and FSDP communication hooks.
"""

from .codec import (
    PACKAGE_VERSION,
    DEFAULT_BLOCK_SIZE,
    MODES,
    Payload,
    body_nbytes,
    decode,
    encode,
    get_num_threads,
    set_num_threads,
)

from ._teardown import shutdown
from ._warnings import TritterCommWarning
from .config import VSAConfig
from .hooks import VSAState, vsa_fsdp_hook, vsa_hook
from .hooks._dispatch import register

__version__ = PACKAGE_VERSION


def __getattr__(name):
    # Submodules loaded on first use, not by `import tritter_comm`: fsdp (FSDP2's enable
    # imports torch.distributed.fsdp, seconds of import time), optim (the phase-based optimizer
    # wrapper), sync (packed-ternary weight sync).
    if name in ("fsdp", "optim", "sync"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")




__all__ = [
    "__version__",
    "DEFAULT_BLOCK_SIZE",
    "MODES",
    "Payload",
    "TritterCommWarning",
    "VSAConfig",
    "VSAState",
    "body_nbytes",
    "decode",
    "encode",
    "fsdp",
    "optim",
    "register",
    "get_num_threads",
    "set_num_threads",
    "shutdown",
    "sync",
    "vsa_fsdp_hook",
    "vsa_hook",
]

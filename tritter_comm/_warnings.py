"""The package's warning class (kept apart so that every module can import it)."""

import warnings


class TritterCommWarning(UserWarning):
    """What tritter-comm warns with: a fallback (a Triton kernel that could not be built, FSDP
    units keyed by call order) or a configuration that compresses nothing (``attach`` without
    one). The tests turn these warnings into errors."""


def warn(message: str, stacklevel: int = 3) -> None:
    warnings.warn(message, TritterCommWarning, stacklevel=stacklevel)

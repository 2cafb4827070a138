"""Optimizer wrappers: phase-based training that skips backward passes and exchanges.

    from tritter_comm.optim import PhaseOptimizer
    opt = PhaseOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))

See :mod:`tritter_comm.optim.phase` for the training-loop pattern (and the DDP one).
"""

from .phase import Phase, PhaseOptimizer

__all__ = ["Phase", "PhaseOptimizer"]

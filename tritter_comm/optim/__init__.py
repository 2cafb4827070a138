"""Optimizer wrappers that skip exchanges: phase-based training (fewer backward passes and
exchanges) and DiLoCo (one averaged outer step every H local steps).

    from tritter_comm.optim import PhaseOptimizer
    opt = PhaseOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))

    from tritter_comm.optim import DiLoCo
    opt = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=1e-3), sync_every=30)

See :mod:`tritter_comm.optim.phase` and :mod:`tritter_comm.optim.diloco` for the training loops.
"""

from .diloco import DiLoCo
from .phase import Phase, PhaseOptimizer

__all__ = ["DiLoCo", "Phase", "PhaseOptimizer"]

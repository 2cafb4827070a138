"""What the optimizer wrappers (``PhaseOptimizer``, ``DiLoCo``) pass through to the optimizer
they wrap (``self.optimizer``): its parameter groups, its state and ``zero_grad``, so that LR
schedulers, gradient clipping and training loops see an optimizer."""

from __future__ import annotations


class OptimizerWrapper:
    """Delegates ``param_groups``, ``state`` and ``zero_grad`` to ``self.optimizer``."""

    __slots__ = ()  # the subclass holds ``optimizer``

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

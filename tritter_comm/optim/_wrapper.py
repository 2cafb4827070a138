"""What the optimizer wrappers (``PhaseOptimizer``, ``DiLoCo``) pass through to the optimizer
they wrap (``self.optimizer``): its parameter groups, its state and ``zero_grad``, so that LR
schedulers, gradient clipping and training loops see an optimizer; and the check both make of
a state dict before loading it."""

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

    def _check_saved(self, state, version: int) -> None:
        """Refuse (``ValueError``) a state dict of another kind or version, or one saved with
        another configuration (``self.config()``)."""
        if not isinstance(state, dict) or state.get("version") != version:
            raise ValueError(f"not a {type(self).__name__} state dict of version {version}")
        diff = {k: (v, state["config"].get(k)) for k, v in self.config().items()
                if state["config"].get(k) != v}
        if diff:
            raise ValueError("checkpoint was saved with a different configuration: " + ", ".join(
                f"{k}: this {a!r}, checkpoint {b!r}" for k, (a, b) in diff.items()))

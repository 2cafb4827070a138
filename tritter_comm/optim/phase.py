"""Phase-based training: skip backward passes and gradient exchanges by predicting gradients.

A wrapper around any ``torch.optim.Optimizer`` that runs phases (DESIGN.md, "Phase-based
training"):

- WARMUP: ordinary steps; the predictor already collects history.
- FULL: real steps (backward pass, exchange) that refresh the history.
- PREDICT: no backward pass and no exchange: the gradient is predicted from the history of
  synchronized gradients (an exponentially weighted least-squares line per element, see
  ``_predictor.py``) and the wrapped optimizer steps on it. Under DDP every rank holds the same
  synchronized gradients and predicts the same thing, so replicas stay bit-identical without
  communicating.
- CORRECT: a real step every ``correct_every`` predicted steps: the prediction for it is
  measured against the real gradient (cosine similarity), the real gradient is folded into the
  history, and the schedule adapts.

The adaptive schedule (the default) predicts only while its predictor measurably beats skipping
the step. On every real step it first measures the prediction it would have made for that step
against the real gradient (the cosine similarity; a skipped step's zero gradient scores 0), and
a predict phase starts only when the mean of the last ``gate_window`` measurements is more than
``gate_sigmas`` standard errors above 0. Where gradients are mostly minibatch noise (the
transformer of ``benchmarks/phase.py``: a cosine of about 0) it does not predict, and trains
exactly as the wrapped optimizer alone would.

The training loop asks :meth:`PhaseOptimizer.needs_backward` before each step::

    opt = PhaseOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, f)   # on the wrapped optimizer
    for batch in loader:
        if opt.needs_backward():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(x), y)
            loss.backward()
        else:
            with torch.no_grad():              # DDP's reducer expects no backward under no_grad;
                loss = loss_fn(ddp(x), y)      # or skip the forward too (loss=None)
        opt.step(loss=loss)
        sched.step()

On predicted steps run the forward under ``torch.no_grad()``, or not at all. A forward with grad
enabled and no backward builds an autograd graph for nothing, and is reported to leave DDP's
reducer expecting a reduction ("Expected to have finished reduction in the prior iteration");
on torch 2.15 it does not (tests/test_phase.py pins both down), but the no_grad pattern is the one
that is safe everywhere. (With ``broadcast_buffers=True`` and a model that has buffers, DDP's
forward still broadcasts them; every rank does, so it stays in step.)

With the VSA hook (``ddp.register_comm_hook(VSAState(...), vsa_hook)``) nothing changes: the
hook runs on real steps only, so its ``iter``, ``start_iter`` and error-feedback residuals count
real steps, and a residual waits across predicted steps for the next exchange.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from ._predictor import BACKENDS, FITS, Predictor, cosine
from ._wrapper import OptimizerWrapper

logger = logging.getLogger(__name__)

__all__ = ["Phase", "PhaseOptimizer"]

_STATE_VERSION = 2
#: A closed gate is checked again after this many real steps.
GATE_RECHECK = 8
#: Measurements the gate needs before it can open.
GATE_MIN_SAMPLES = 8


class Phase(str, enum.Enum):
    WARMUP = "warmup"
    FULL = "full"
    PREDICT = "predict"
    CORRECT = "correct"


_REAL = (Phase.WARMUP, Phase.FULL, Phase.CORRECT)


class _Group:
    """The trainable parameters of one device, flattened, and their predictor."""

    __slots__ = ("params", "offsets", "flat", "predictor", "had_grad")

    def __init__(self, params, device, *, decay, fit, backend, threads):
        self.params = params
        self.offsets = []
        n = 0
        for p in params:
            self.offsets.append((n, n + p.numel()))
            n += p.numel()
        self.flat = torch.zeros(n, dtype=torch.float32, device=device)
        self.predictor = Predictor(n, device, decay=decay, fit=fit, backend=backend, threads=threads)
        # parameters that had a gradient in the newest real step: only they get a prediction
        self.had_grad = [False] * len(params)

    def gather(self) -> bool:
        """Copy the gradients into ``flat`` (missing ones as zeros); False if there were none."""
        any_grad = False
        for i, (p, (lo, hi)) in enumerate(zip(self.params, self.offsets)):
            view = self.flat[lo:hi]
            if p.grad is None:
                view.zero_()
                self.had_grad[i] = False
            else:
                if p.grad.is_sparse:
                    raise ValueError("PhaseOptimizer does not support sparse gradients")
                view.copy_(p.grad.reshape(-1))
                self.had_grad[i] = any_grad = True
        return any_grad

    def scatter(self) -> None:
        """Set each parameter's ``.grad`` to its slice of ``flat``."""
        for i, (p, (lo, hi)) in enumerate(zip(self.params, self.offsets)):
            if self.had_grad[i]:
                g = self.flat[lo:hi].view(p.shape)
                p.grad = g if p.dtype == torch.float32 else g.to(p.dtype)

    def clear(self) -> None:
        for i, p in enumerate(self.params):
            if self.had_grad[i]:
                p.grad = None


def _positive_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


class PhaseOptimizer(OptimizerWrapper):
    """Wrap ``optimizer`` so that some steps use a predicted gradient instead of a backward pass.

    Args:
        optimizer: any ``torch.optim.Optimizer``; its param groups and LR schedulers work as
            usual (build schedulers on ``opt.optimizer``; predicted steps call its ``step``).
        warmup_steps: real steps before the first phase cycle (default 100, as the VSA
            hook's ``start_iter``: early gradients change fastest and Adam's moments need them;
            README, "Phase-based optimizer").
        full_steps: real steps at the start of each cycle that refresh the history (default 1).
        predict_steps: predicted steps in a cycle, the start value when ``adaptive`` (default 2).
        correct_every: a CORRECT step after every ``correct_every`` predicted steps (default
            2). With the defaults a cycle is FULL PREDICT PREDICT CORRECT: half the steps after
            the warm-up run no backward pass (a third of a 300-step run).
        adaptive: adapt ``predict_steps`` to the loss trend and the measured prediction quality
            (default True): one longer predict phase (up to ``max_predict_steps``) after each
            cycle whose real-step loss fell, back to FULL (and a halved phase) when it rose or
            when a CORRECT step measures a cosine similarity below ``min_quality``; and a
            predict phase starts only while the gate (``gate_window``) is open. False: the fixed
            cycle, with no gate.
        max_predict_steps: upper bound of the adaptive predict phase (default 16).
        min_quality: the cosine similarity between predicted and real gradient below which a
            CORRECT step ends the predict phase (default 0.0: minibatch noise keeps the cosine
            of even a useful prediction low, about 0.2 on the digits MLP).
        decay: weight of each older observation in the fit, in (0, 1) (default 0.9: the fit
            spans about ten real steps).
        fit: ``"line"`` (the least-squares line per element, extrapolated: the design's
            predictor), ``"mean"`` (its weighted mean, slope 0) or ``"zero"`` (no prediction:
            the wrapped optimizer steps on a zero gradient and coasts on its momentum). The
            line carries a step where gradients follow a trend (the MLP) and is worse than
            skipping where they are mostly minibatch noise (the transformer), where
            ``fit="mean", decay=0.97`` does better: the measurements are in the README
            ("Phase-based optimizer") and ``benchmarks/results/phase-fits.json``.
        gate_window: with ``adaptive``, the real steps whose measured prediction quality
            (cosine similarity between the prediction for that step and its real gradient,
            measured on every real step with a history) decide whether to predict at all
            (default 64; 0: no gate, the schedule of earlier versions). A predict phase starts
            only when their mean is more than ``gate_sigmas`` standard errors above 0: above a
            skipped step's zero gradient. A closed gate is checked again every
            ``GATE_RECHECK`` (8) real steps; each check is one one-float all-reduce under DDP.
        gate_sigmas: the gate's margin in standard errors of the mean (default 2.0: about
            97.7% one-sided confidence that the prediction points along the real gradient).
        predict_lr_scale: predicted steps run with every param group's ``lr`` multiplied by
            this (restored right after), in [0, 1] (default 1.0; 0.5 measured no better).
        loss_tolerance: relative rise of the cycle's mean loss that counts as rising
            (default 0.0).
        process_group: under DDP, the group whose ranks must agree on the schedule (default:
            the default group when ``torch.distributed`` is initialized). The adaptive schedule
            all-reduces two floats (mean loss and quality) on each CORRECT step so that every
            rank makes the same choice; predicted steps communicate nothing.
        backend: ``"auto"`` (Rust for CPU tensors, torch for the others), ``"rust"`` or
            ``"torch"``. Both give the same bits; all ranks must use the same one.
        threads: threads of the Rust predictor (0: all; results do not depend on it).
    """

    __slots__ = (
        # hyperparameters
        "optimizer",
        "warmup_steps",
        "full_steps",
        "predict_steps",
        "correct_every",
        "adaptive",
        "max_predict_steps",
        "min_quality",
        "gate_window",
        "gate_sigmas",
        "decay",
        "fit",
        "predict_lr_scale",
        "loss_tolerance",
        "process_group",
        "backend",
        "threads",
        # internal state
        "phase",
        "_groups",
        "_param_ids",
        "_step",
        "_in_phase",
        "_predict_len",
        "_predicted_in_phase",
        "_cycle_loss",
        "_cycle_count",
        "_prev_cycle_loss",
        "_last_quality",
        "_quality_sum",
        "_quality_n",
        "_counts",
        "_sync_bytes",
        "_gate",
        "_full_len",
        "_gate_checks",
        "_gate_closed",
        "_gate_lower",
    )

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        warmup_steps: int = 100,
        full_steps: int = 1,
        predict_steps: int = 2,
        correct_every: int = 2,
        adaptive: bool = True,
        max_predict_steps: int = 16,
        min_quality: float = 0.0,
        gate_window: int = 64,
        gate_sigmas: float = 2.0,
        decay: float = 0.9,
        fit: str = "line",
        predict_lr_scale: float = 1.0,
        loss_tolerance: float = 0.0,
        process_group: Optional[Any] = None,
        backend: str = "auto",
        threads: int = 0,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)!r}")
        self.warmup_steps = _positive_int("warmup_steps", warmup_steps, 0)
        self.full_steps = _positive_int("full_steps", full_steps, 1)
        self.predict_steps = _positive_int("predict_steps", predict_steps, 1)
        self.correct_every = _positive_int("correct_every", correct_every, 1)
        self.max_predict_steps = _positive_int("max_predict_steps", max_predict_steps, 1)
        if self.max_predict_steps < self.predict_steps:
            raise ValueError(f"max_predict_steps ({max_predict_steps}) must be >= predict_steps "
                             f"({predict_steps})")
        if not (isinstance(decay, (int, float)) and 0.0 < decay < 1.0):
            raise ValueError(f"decay must be a float in (0, 1), got {decay!r}")
        if not (isinstance(min_quality, (int, float)) and -1.0 <= min_quality <= 1.0):
            raise ValueError(f"min_quality is a cosine similarity in [-1, 1], got {min_quality!r}")
        self.gate_window = _positive_int("gate_window", gate_window, 0)
        if (isinstance(gate_sigmas, bool) or not isinstance(gate_sigmas, (int, float))
                or not 0.0 <= gate_sigmas < math.inf):
            raise ValueError(f"gate_sigmas must be a finite number >= 0, got {gate_sigmas!r}")
        if not (isinstance(loss_tolerance, (int, float)) and loss_tolerance >= 0):
            raise ValueError(f"loss_tolerance must be >= 0, got {loss_tolerance!r}")
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        if not (isinstance(predict_lr_scale, (int, float)) and 0.0 <= predict_lr_scale <= 1.0):
            raise ValueError(f"predict_lr_scale must be in [0, 1], got {predict_lr_scale!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _positive_int("threads", threads, 0)
        self.optimizer = optimizer
        self.adaptive = bool(adaptive)
        self.min_quality = float(min_quality)
        self.gate_sigmas = float(gate_sigmas)
        self.decay = float(decay)
        self.fit = fit
        self.predict_lr_scale = float(predict_lr_scale)
        self.loss_tolerance = float(loss_tolerance)
        self.process_group = process_group
        self.backend = backend
        self.threads = threads

        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            raise ValueError("the optimizer has no parameters that require grad")
        by_device: dict[torch.device, list] = {}
        for p in params:
            if not p.is_floating_point():
                raise ValueError(f"parameters must be floating point, got {p.dtype}")
            by_device.setdefault(p.device, []).append(p)
        self._groups = [_Group(ps, dev, decay=self.decay, fit=fit, backend=backend, threads=threads)
                        for dev, ps in by_device.items()]
        self._param_ids = tuple(id(p) for p in params)
        self._step = 0
        self.phase = Phase.WARMUP if self.warmup_steps else Phase.FULL
        self._in_phase = 0  # steps taken in the current phase
        self._predict_len = self.predict_steps
        self._predicted_in_phase = 0  # predicted steps in the current predict phase
        self._cycle_loss = 0.0  # sum of real-step losses this cycle (local)
        self._cycle_count = 0
        self._prev_cycle_loss: Optional[float] = None
        self._last_quality: Optional[float] = None
        self._quality_sum = 0.0
        self._quality_n = 0
        self._counts = {ph.value: 0 for ph in Phase}
        self._sync_bytes = 0
        # the gate: the newest measured prediction qualities (cosines) of real steps
        self._gate: collections.deque = collections.deque(maxlen=max(1, self.gate_window))
        self._full_len = self.full_steps  # FULL steps before the next gate check
        self._gate_checks = 0
        self._gate_closed = 0
        self._gate_lower: Optional[float] = None  # the last check's lower bound

    @property
    def _gated(self) -> bool:
        return self.adaptive and self.gate_window > 0

    # -- delegation (param_groups, state, zero_grad: _wrapper.py) ---------------------------

    def __repr__(self) -> str:
        return (f"PhaseOptimizer({type(self.optimizer).__name__}, phase={self.phase.value}, "
                f"predict_steps={self._predict_len})")

    # -- the loop's questions ----------------------------------------------------------------

    def needs_backward(self) -> bool:
        """Whether this step needs a real gradient (a backward pass, and under DDP its
        exchange). False: run no backward (a forward under ``torch.no_grad()`` at most)."""
        return self.phase in _REAL

    def step(self, loss: Union[None, float, torch.Tensor] = None, closure=None):
        """Apply the real gradient (``needs_backward()`` was True) or the predicted one.

        Args:
            loss: this step's training loss (a tensor or a float; optional). On real steps it
                drives the adaptive schedule; on predicted steps it is only recorded.
            closure: not supported (a closure re-evaluates the loss with a backward pass).
        """
        if closure is not None:
            raise ValueError("PhaseOptimizer.step does not take a closure")
        if tuple(id(p) for g in self.optimizer.param_groups for p in g["params"]
                 if p.requires_grad) != self._param_ids:
            raise ValueError("the optimizer's parameters changed after PhaseOptimizer was built; "
                             "wrap the optimizer again (and start a new schedule)")
        phase = self.phase
        if phase in _REAL:
            out = self._real_step(phase, loss)
        else:
            out = self._predicted_step()
        self._counts[phase.value] += 1
        self._step += 1
        for g in self._groups:
            g.predictor.tick()
        self._advance()
        return out

    def _real_step(self, phase: Phase, loss) -> Any:
        got = [g.gather() for g in self._groups]
        if not any(got):
            raise RuntimeError(f"step {self._step} is a {phase.value} step "
                               "(needs_backward() is True) but no parameter has a gradient: "
                               "run the backward pass before step()")
        # the gate measures on every real step, the fixed cycle on CORRECT steps only
        measure = phase is Phase.CORRECT or self._gated
        q, measured = [0.0, 0.0, 0.0], False
        for g in self._groups:
            r = g.predictor.observe(g.flat, measure=measure)
            if r is not None:
                q = [a + b for a, b in zip(q, r)]
                measured = True
        if loss is not None:
            self._cycle_loss += float(loss.detach()) if torch.is_tensor(loss) else float(loss)
            self._cycle_count += 1
        if measured:
            quality = cosine(tuple(q))
            if phase is Phase.CORRECT:
                self._last_quality = quality
            if self._gated:
                self._gate.append(quality)
        return self.optimizer.step()

    def _predicted_step(self) -> Any:
        for g in self._groups:
            g.predictor.predict(g.flat)
            g.scatter()
        scale = self.predict_lr_scale
        saved = [pg["lr"] for pg in self.optimizer.param_groups] if scale != 1.0 else None
        try:
            if saved is not None:
                for pg in self.optimizer.param_groups:
                    pg["lr"] = pg["lr"] * scale
            return self.optimizer.step()
        finally:
            if saved is not None:
                for pg, lr in zip(self.optimizer.param_groups, saved):
                    pg["lr"] = lr
            # the prediction lives in a scratch buffer: a later backward must not add into it
            for g in self._groups:
                g.clear()

    # -- the schedule ------------------------------------------------------------------------

    def _world(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    def _agree(self) -> tuple[Optional[float], float]:
        """The cycle's mean loss and the quality, the same on every rank."""
        quality = self._last_quality if self._last_quality is not None else 1.0
        loss = self._cycle_loss / self._cycle_count if self._cycle_count else float("nan")
        loss, quality = self._mean_over_ranks([loss, quality])
        return (None if loss != loss else loss), quality

    def _mean_over_ranks(self, values: list[float]) -> list[float]:
        """``values`` averaged over the process group (float64; one all-reduce, counted in
        ``sync_bytes``); themselves when not distributed."""
        world = self._world()
        if world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._groups[0].flat.device)
        dist.all_reduce(t, group=self.process_group)
        self._sync_bytes += 2 * (world - 1) * t.numel() * 8 // world
        return (t / world).tolist()

    def _gate_open(self) -> bool:
        """Whether the measured prediction quality is above 0 by ``gate_sigmas`` standard errors
        (the same answer on every rank: the bound is averaged over the process group)."""
        xs = list(self._gate)
        if len(xs) >= GATE_MIN_SAMPLES:
            mean = math.fsum(xs) / len(xs)
            var = math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
            lower = mean - self.gate_sigmas * math.sqrt(var / len(xs))
        else:
            lower = -1e300  # closed (finite: it is averaged over the ranks)
        # every rank measured the same synchronized gradients; agree anyway
        (lower,) = self._mean_over_ranks([lower])
        self._gate_checks += 1
        self._gate_lower = lower if lower > -1e299 else None
        if lower > 0.0:
            return True
        self._gate_closed += 1
        logger.debug("step %d: prediction quality %s not above 0: no predict phase",
                     self._step, self._gate_lower)
        return False

    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        self._in_phase = 0

    def _advance(self) -> None:
        """Choose the phase of the next step (the same on every rank)."""
        ph = self.phase
        self._in_phase += 1
        if ph is Phase.WARMUP:
            if self._step >= self.warmup_steps:
                self._enter(Phase.FULL)
        elif ph is Phase.FULL:
            if self._in_phase >= self._full_len:
                if self._gated and not self._gate_open():
                    self._full_len = max(self.full_steps, GATE_RECHECK)
                    self._enter(Phase.FULL)
                    return
                self._full_len = self.full_steps
                self._predicted_in_phase = 0
                self._enter(Phase.PREDICT)
        elif ph is Phase.PREDICT:
            self._predicted_in_phase += 1
            if (self._in_phase >= self.correct_every
                    or self._predicted_in_phase >= self._predict_len):
                self._enter(Phase.CORRECT)
        else:  # CORRECT
            self._after_correct()

    def _after_correct(self) -> None:
        phase_done = self._predicted_in_phase >= self._predict_len
        if not self.adaptive:
            if self._last_quality is not None:
                self._quality_sum += self._last_quality
                self._quality_n += 1
            self._enter(Phase.FULL if phase_done else Phase.PREDICT)
            return
        loss, quality = self._agree()
        self._last_quality = quality
        self._quality_sum += quality
        self._quality_n += 1
        if quality < self.min_quality:
            logger.debug("step %d: prediction quality %.3f < %.3f: back to FULL", self._step,
                         quality, self.min_quality)
            self._predict_len = max(1, self._predict_len // 2)
            self._end_cycle(loss)
            return
        if not phase_done:
            self._enter(Phase.PREDICT)
            return
        prev = self._prev_cycle_loss
        if loss is not None and prev is not None:
            if loss > prev * (1.0 + self.loss_tolerance):
                self._predict_len = max(1, self._predict_len // 2)
            else:
                self._predict_len = min(self.max_predict_steps, self._predict_len + 1)
        self._end_cycle(loss)

    def _end_cycle(self, loss: Optional[float]) -> None:
        if loss is not None:
            self._prev_cycle_loss = loss
        self._cycle_loss, self._cycle_count = 0.0, 0
        self._predicted_in_phase = 0
        self._enter(Phase.FULL)

    # -- statistics and checkpoints ----------------------------------------------------------

    def stats(self) -> dict:
        """Counters since creation (restored by ``load_state_dict``).

        ``backward_passes`` / ``backward_skipped``: real and predicted steps.
        ``exchanges`` / ``exchanges_skipped``: the same under ``torch.distributed`` with more
        than one rank (each real step is one gradient exchange), else 0.
        ``sync_bytes``: bytes this rank sent for the schedule's agreement (ring formula).
        ``gate_checks`` / ``gate_closed``: the adaptive gate's checks, and those that found
        the prediction no better than skipping; ``gate_lower``: the last check's lower bound
        of the mean quality (None before ``GATE_MIN_SAMPLES`` measurements).
        """
        real = sum(self._counts[p.value] for p in _REAL)
        pred = self._counts[Phase.PREDICT.value]
        dist_on = self._world() > 1
        return {
            "steps": self._step,
            "phase": self.phase.value,
            "backward_passes": real,
            "backward_skipped": pred,
            "exchanges": real if dist_on else 0,
            "exchanges_skipped": pred if dist_on else 0,
            "skipped_fraction": pred / self._step if self._step else 0.0,
            "phase_steps": dict(self._counts),
            "predict_steps": self._predict_len,
            "last_quality": self._last_quality,
            "mean_quality": self._quality_sum / self._quality_n if self._quality_n else None,
            "sync_bytes": self._sync_bytes,
            "gate_checks": self._gate_checks,
            "gate_closed": self._gate_closed,
            "gate_lower": self._gate_lower,
        }

    def config(self) -> dict:
        return {
            "warmup_steps": self.warmup_steps,
            "full_steps": self.full_steps,
            "predict_steps": self.predict_steps,
            "correct_every": self.correct_every,
            "adaptive": self.adaptive,
            "max_predict_steps": self.max_predict_steps,
            "min_quality": self.min_quality,
            "gate_window": self.gate_window,
            "gate_sigmas": self.gate_sigmas,
            "decay": self.decay,
            "fit": self.fit,
            "predict_lr_scale": self.predict_lr_scale,
            "loss_tolerance": self.loss_tolerance,
        }

    def state_dict(self) -> dict:
        """The wrapped optimizer's state, the schedule and the predictor; loadable with
        ``torch.load(weights_only=True)``. Under DDP every rank holds the same state."""
        return {
            "version": _STATE_VERSION,
            "config": self.config(),
            "optimizer": self.optimizer.state_dict(),
            "phase": self.phase.value,
            "step": self._step,
            "in_phase": self._in_phase,
            "predict_len": self._predict_len,
            "predicted_in_phase": self._predicted_in_phase,
            "cycle_loss": self._cycle_loss,
            "cycle_count": self._cycle_count,
            "prev_cycle_loss": self._prev_cycle_loss,
            "last_quality": self._last_quality,
            "quality_sum": self._quality_sum,
            "quality_n": self._quality_n,
            "counts": dict(self._counts),
            "sync_bytes": self._sync_bytes,
            "gate": list(self._gate),
            "full_len": self._full_len,
            "gate_checks": self._gate_checks,
            "gate_closed": self._gate_closed,
            "gate_lower": self._gate_lower,
            "predictor": [dict(g.predictor.state_dict(), had_grad=list(g.had_grad))
                          for g in self._groups],
        }

    def load_state_dict(self, state: dict) -> None:
        self._check_saved(state, _STATE_VERSION)
        if len(state["predictor"]) != len(self._groups):
            raise ValueError(f"checkpoint has {len(state['predictor'])} parameter devices, this "
                             f"optimizer {len(self._groups)}")
        for g, s in zip(self._groups, state["predictor"]):
            g.predictor.load_state_dict(s)
            g.had_grad = [bool(b) for b in s["had_grad"]]
        self.optimizer.load_state_dict(state["optimizer"])
        self.phase = Phase(state["phase"])
        self._step = int(state["step"])
        self._in_phase = int(state["in_phase"])
        self._predict_len = int(state["predict_len"])
        self._predicted_in_phase = int(state["predicted_in_phase"])
        self._cycle_loss = float(state["cycle_loss"])
        self._cycle_count = int(state["cycle_count"])
        self._prev_cycle_loss = state["prev_cycle_loss"]
        self._last_quality = state["last_quality"]
        self._quality_sum = float(state["quality_sum"])
        self._quality_n = int(state["quality_n"])
        self._counts = {k: int(v) for k, v in state["counts"].items()}
        self._sync_bytes = int(state["sync_bytes"])
        self._gate.clear()
        self._gate.extend(float(x) for x in state["gate"])
        self._full_len = int(state["full_len"])
        self._gate_checks = int(state["gate_checks"])
        self._gate_closed = int(state["gate_closed"])
        self._gate_lower = state["gate_lower"]

"""The gradient predictor: an exponentially weighted least-squares line per element.

Over the synchronized gradients ``g_s`` observed at steps ``s``, with weight ``w_s = decay**k``
for the observation ``k`` observations old, the line ``a + b*t`` minimizing
``sum_s w_s (g_s - a - b*t_s)**2`` per element is kept as running sums (O(D) memory, not a
window of copies). Time is recentred on the newest observation (0, older ones negative), so the
sums stay bounded whatever the step count:

- scalars, float64, shared by all elements: ``W = sum w``, ``T = sum w*t``, ``TT = sum w*t**2``;
- per element, float32 vectors: ``G = sum w*g``, ``TG = sum w*t*g``.

The prediction ``h`` steps after the newest observation is ``a + b*h`` with
``b = (W*TG - T*G) / (W*TT - T**2)`` and ``a = (G - b*T) / W``, which is linear in the sums:
``alpha*G + beta*TG`` with ``m = h - T/W``, ``alpha = 1/W - m*T/D``, ``beta = m*W/D``. The
scalars are computed here in float64, rounded once to float32, and both backends apply them
element-wise with the same operations in the same order (src/predict.rs): Rust for CPU tensors,
torch for the others, same bits. A degenerate denominator (one observation) falls back to the
weighted mean (``alpha = 1/W``, ``beta = 0``).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .. import _native

__all__ = ["BACKENDS", "FITS", "Predictor"]

BACKENDS = ("auto", "rust", "torch")
# "line": the least-squares line, extrapolated; "mean": its weighted mean only (slope 0);
# "zero": no prediction (the wrapped optimizer coasts on its own momentum)
FITS = ("line", "mean", "zero")
_DEGENERATE = 1e-9  # relative size of W*TT - T**2 below which the line is not fitted


def _f32(x: float) -> float:
    """``x`` rounded to float32 (the value both backends multiply by)."""
    return float(np.float32(x))


class Predictor:
    """Running sums of the fit for one flat float32 vector of ``numel`` elements on ``device``.

    Args:
        numel: elements (all parameters of one device, flattened).
        device: where the sums live.
        decay: weight of an observation relative to the next one, in (0, 1).
        backend: ``"rust"`` (CPU only), ``"torch"`` or ``"auto"`` (Rust for CPU).
        threads: Rust threads (0: rayon's global pool); results do not depend on it.
    """

    __slots__ = ("decay", "fit", "backend", "threads", "sum_g", "sum_tg", "w", "t", "tt",
                 "observations", "since", "_scratch")

    def __init__(self, numel: int, device: torch.device, *, decay: float, fit: str = "line",
                 backend: str = "auto", threads: int = 0):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        device = torch.device(device)
        if backend == "auto":
            backend = "rust" if device.type == "cpu" else "torch"
        if backend == "rust" and device.type != "cpu":
            raise ValueError(f"the Rust predictor runs on CPU tensors; parameters are on {device}: "
                             "use backend='torch' (or 'auto')")
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
        self.decay = float(decay)
        self.fit = fit
        self.backend = backend
        self.threads = int(threads)
        self.sum_g = torch.zeros(numel, dtype=torch.float32, device=device)
        self.sum_tg = torch.zeros(numel, dtype=torch.float32, device=device)
        self.w = self.t = self.tt = 0.0
        self.observations = 0
        self.since = 0  # steps since the newest observation
        self._scratch: Optional[torch.Tensor] = None

    # -- the scalar side ---------------------------------------------------------------------

    def coef(self, h: float) -> tuple[float, float]:
        """``(alpha, beta)``, rounded to float32, of the prediction ``h`` steps ahead."""
        if self.fit == "zero":  # no prediction: the wrapped optimizer coasts on its momentum
            return 0.0, 0.0
        w, t, tt = self.w, self.t, self.tt
        d = w * tt - t * t
        if self.fit == "mean" or d <= _DEGENERATE * w * w:
            return _f32(1.0 / w), 0.0
        m = h - t / w
        return _f32(1.0 / w - m * t / d), _f32(m * w / d)

    def _shift(self, lag: float) -> None:
        w, t, tt, d = self.w, self.t, self.tt, self.decay
        self.w = d * w + 1.0
        self.t = d * (t - lag * w)
        self.tt = d * (tt - 2.0 * lag * t + lag * lag * w)

    # -- the element-wise side ---------------------------------------------------------------

    def observe(self, g: torch.Tensor, *, measure: bool = False) -> Optional[tuple[float, float, float]]:
        """Fold the synchronized gradient ``g`` (flat float32) in, ``since`` steps after the
        previous observation. With ``measure`` (and a history), first compare the prediction
        for this step with ``g``: returns ``(dot, pp, gg)`` in float64, else None."""
        lag = float(max(self.since, 1))
        coef = self.coef(lag) if measure and self.observations else None
        decay = _f32(self.decay)
        if self.backend == "rust":
            q = _native.predict_observe(g.numpy(), self.sum_g.numpy(), self.sum_tg.numpy(),
                                        lag, decay, coef, self.threads)
        else:
            q = None
            if coef is not None:
                p = self._predict_torch(*coef)
                # float64 sums: equal to Rust's to rounding (not bit for bit; used for decisions)
                q = (torch.dot(p.double(), g.double()).item(),
                     torch.dot(p.double(), p.double()).item(),
                     torch.dot(g.double(), g.double()).item())
            # the order of src/predict.rs: tmp = lag*G; TG = (TG - tmp)*d; G = G*d + g
            self.sum_tg.sub_(torch.mul(self.sum_g, lag)).mul_(decay)
            self.sum_g.mul_(decay).add_(g)
        self._shift(lag)
        self.observations += 1
        self.since = 0
        return q if coef is not None else None

    def _predict_torch(self, alpha: float, beta: float, out: Optional[torch.Tensor] = None):
        if self._scratch is None:
            self._scratch = torch.empty_like(self.sum_g)
        out = torch.mul(self.sum_g, alpha, out=out if out is not None else torch.empty_like(self.sum_g))
        torch.mul(self.sum_tg, beta, out=self._scratch)
        return out.add_(self._scratch)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Write the prediction for the step ``since`` steps after the newest observation."""
        if not self.observations:
            raise RuntimeError("the predictor has no history yet")
        alpha, beta = self.coef(float(max(self.since, 1)))
        if self.backend == "rust":
            _native.predict_apply(self.sum_g.numpy(), self.sum_tg.numpy(), alpha, beta,
                                  out.numpy(), self.threads)
            return out
        return self._predict_torch(alpha, beta, out)

    def tick(self) -> None:
        """One optimizer step has passed."""
        self.since += 1

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"sum_g": self.sum_g.detach().cpu().clone(),
                "sum_tg": self.sum_tg.detach().cpu().clone(),
                "w": self.w, "t": self.t, "tt": self.tt,
                "observations": self.observations, "since": self.since}

    def load_state_dict(self, state: dict) -> None:
        for k in ("sum_g", "sum_tg"):
            if state[k].numel() != self.sum_g.numel():
                raise ValueError(f"predictor state has {state[k].numel()} elements, this model "
                                 f"{self.sum_g.numel()}: not the same parameters")
        self.sum_g.copy_(state["sum_g"])
        self.sum_tg.copy_(state["sum_tg"])
        self.w, self.t, self.tt = float(state["w"]), float(state["t"]), float(state["tt"])
        self.observations, self.since = int(state["observations"]), int(state["since"])


def cosine(q: tuple[float, float, float]) -> float:
    dot, pp, gg = q
    d = math.sqrt(pp * gg)
    return dot / d if d > 0 else 0.0

"""Training workloads shared by the benchmarks: small models on data that ships with the toolchain.

Each workload owns a model and a data pipeline that is deterministic in ``(seed, rank, step)``, so a
benchmark can run every comm mode on exactly the same model init and the same batches and compare
them side by side. Nothing is downloaded.

- ``digits``: an MLP on scikit-learn's bundled 8x8 digits (1797 images), standardized with the
  training split's statistics, fixed 80/20 split.
- ``transformer``: a small causal byte-level transformer trained on the Python sources of a fixed,
  sorted list of standard-library modules; the last 10% of the corpus is held out for eval.
- ``wide_mlp``: a stack of wide ``Linear`` layers on a small batch of synthetic inputs labelled by
  a fixed random teacher: little compute for many parameters, so the exchange is the step even
  on a CPU (issue 17's link-bound workload).

``size="small"`` trains in seconds to minutes on one CPU core per rank (convergence benchmark);
``size="large"`` has tens of millions of parameters with a small per-rank batch, so that gradient
exchange dominates the step (network benchmark); ``size="xl"`` (transformer only) has over 300M,
for GPU ranks.

Example::

    from benchmarks.workloads import build
    w = build("transformer", seed=0)
    opt = torch.optim.AdamW(w.model.parameters(), lr=w.lr)
    for step in range(100):
        loss = w.loss(w.model, w.batch(rank=0, world=1, step=step))
        loss.backward(); opt.step(); opt.zero_grad()
    print(w.eval_loss(w.model))
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NAMES", "SIZES", "STDLIB_MODULES", "Workload", "build", "stdlib_corpus"]

NAMES = ("digits", "transformer", "wide_mlp")
SIZES = ("small", "large", "xl")

# Fixed, sorted list of standard-library modules whose sources form the text corpus. A module that
# is a package contributes its __init__.py. Modules missing from this Python are skipped; the list
# actually used and the corpus hash are in Workload.info so results stay comparable. One list for
# the benchmarks and the installed demo (tritter_comm/_demo.py), so both train on the same text.
from tritter_comm._demo import STDLIB_MODULES  # noqa: E402

_HELD_OUT_FRACTION = 0.1
_DIGITS_SPLIT_SEED = 0  # the train/eval split is fixed, independent of the run seed
_TAG_DIGITS, _TAG_TEXT, _TAG_WIDE = 1, 2, 3  # keep the workloads' random streams apart


def _generator(*key: int) -> torch.Generator:
    """A torch generator seeded from a tuple of non-negative ints (same key, same stream)."""
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (eval must not go through DDP's forward)."""
    return getattr(model, "module", model)


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Workload:
    """A model with a deterministic data pipeline.

    Attributes:
        name: workload name as passed to :func:`build`.
        model: the freshly initialized model (same init for the same seed on every rank).
        seed: the seed that fixed the init and the batch order.
        size: ``"small"`` or ``"large"``.
        batch_size: samples per rank per step.
        lr: an AdamW learning rate that trains this workload well.
    """

    name: str
    model: nn.Module
    seed: int
    size: str
    batch_size: int
    lr: float

    def batch(self, rank: int, world: int, step: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets of ``rank``'s share of the global batch at ``step``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Mean cross-entropy of ``model`` (plain or DDP-wrapped) on ``batch``."""
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def eval_loss(self, model: nn.Module) -> float:
        """Mean cross-entropy on the fixed held-out set, without grad, in eval mode."""
        raise NotImplementedError

    @property
    def info(self) -> dict[str, Any]:
        """Facts for a benchmark's JSON output: parameter count, data sizes, shapes."""
        return {
            "name": self.name,
            "size": self.size,
            "params": _numel(self.model),
            "batch_size_per_rank": self.batch_size,
            "lr": self.lr,
        }

    def _eval(self, model: nn.Module, inputs: Tensor, targets: Tensor, chunk: int) -> float:
        module = _unwrap(model)
        was_training = module.training
        module.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, inputs.shape[0], chunk):
                x, y = inputs[i : i + chunk], targets[i : i + chunk]
                logits = module(x)
                total += F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
                ).item()
                count += y.numel()
        module.train(was_training)
        return total / count


# ---------------------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits  # imported here: only this workload needs it

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(_DIGITS_SPLIT_SEED).permutation(len(x))
    n_test = round(0.2 * len(x))
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std == 0] = 1.0  # border pixels are always 0 in the training split
    x = ((x - mean) / std).astype(np.float32)
    as_t = torch.from_numpy
    return as_t(x[train]), as_t(y[train]).long(), as_t(x[test]), as_t(y[test]).long()


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


@dataclass
class DigitsWorkload(Workload):
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def batch(self, rank: int, world: int, step: int) -> tuple[Tensor, Tensor]:
        # One permutation per (seed, step) shared by all ranks: the ranks' shares are disjoint.
        n = self.x_train.shape[0]
        if world * self.batch_size > n:
            raise ValueError(f"world * batch_size = {world * self.batch_size} > {n} samples")
        perm = torch.randperm(n, generator=_generator(_TAG_DIGITS, self.seed, step))
        idx = perm[rank * self.batch_size : (rank + 1) * self.batch_size]
        return self.x_train[idx], self.y_train[idx]

    def eval_loss(self, model: nn.Module) -> float:
        return self._eval(model, self.x_test, self.y_test, chunk=4096)

    @property
    def info(self) -> dict[str, Any]:
        return {
            **super().info,
            "train_samples": int(self.x_train.shape[0]),
            "eval_samples": int(self.x_test.shape[0]),
        }


def _build_digits(seed: int, size: str) -> DigitsWorkload:
    hidden = {"small": [256, 256], "large": [2048, 2048, 2048]}[size]
    x_train, y_train, x_test, y_test = _digits_data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _mlp([x_train.shape[1], *hidden, 10])
    return DigitsWorkload(
        name="digits",
        model=model,
        seed=seed,
        size=size,
        batch_size={"small": 32, "large": 32}[size],
        lr={"small": 1e-3, "large": 3e-4}[size],
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
    )


# ----------------------------------------------------------------------------------- transformer


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> tuple[bytes, tuple[str, ...]]:
    """The concatenated sources of :data:`STDLIB_MODULES` and the files that went in."""
    root = sysconfig.get_paths()["stdlib"]
    parts, used = [], []
    for module in sorted(STDLIB_MODULES):
        for rel in (f"{module}.py", os.path.join(module, "__init__.py")):
            path = os.path.join(root, rel)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    parts.append(f.read())
                used.append(rel)
                break
    if not parts:
        raise FileNotFoundError(f"no standard-library sources found under {root}")
    return b"\n\n".join(parts), tuple(used)


class _CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """GPT-style pre-LN decoder over bytes (vocab 256), learned positions, untied output head."""

    def __init__(self, *, d_model: int, n_layers: int, n_heads: int, context: int) -> None:
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(256, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: scale the residual projections by depth
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


_TRANSFORMER_SIZES: dict[str, dict[str, Any]] = {
    # ~0.47M parameters: a few ms per step on one core.
    "small": dict(
        d_model=128, n_layers=2, n_heads=4, context=64, batch=16, lr=2e-3, eval_windows=256
    ),
    # ~43M parameters, 4 sequences per rank: the exchange dominates the step on a slow link.
    "large": dict(
        d_model=768, n_layers=6, n_heads=12, context=128, batch=4, lr=3e-4, eval_windows=64
    ),
    # ~303M parameters (24 blocks of 12 * 1024^2): the 300M model of issue 16, for GPU ranks.
    "xl": dict(
        d_model=1024, n_layers=24, n_heads=16, context=128, batch=4, lr=1.5e-4, eval_windows=64
    ),
}


@dataclass
class TransformerWorkload(Workload):
    context: int
    train_data: Tensor  # uint8 bytes
    eval_inputs: Tensor  # (windows, context) int64
    eval_targets: Tensor
    corpus_files: tuple[str, ...]
    corpus_sha256: str

    def batch(self, rank: int, world: int, step: int) -> tuple[Tensor, Tensor]:
        # World * batch random windows per (seed, step), shared by all ranks; each takes its slice.
        g = _generator(_TAG_TEXT, self.seed, step)
        starts = torch.randint(
            0, self.train_data.numel() - self.context - 1, (world * self.batch_size,), generator=g
        )
        starts = starts[rank * self.batch_size : (rank + 1) * self.batch_size]
        windows = self.train_data[starts[:, None] + torch.arange(self.context + 1)].long()
        return windows[:, :-1], windows[:, 1:]

    def eval_loss(self, model: nn.Module) -> float:
        return self._eval(model, self.eval_inputs, self.eval_targets, chunk=32)

    @property
    def info(self) -> dict[str, Any]:
        return {
            **super().info,
            "context": self.context,
            "train_bytes": int(self.train_data.numel()),
            "eval_tokens": int(self.eval_targets.numel()),
            "corpus_files": list(self.corpus_files),
            "corpus_sha256": self.corpus_sha256,
        }


def _build_transformer(seed: int, size: str) -> TransformerWorkload:
    cfg = _TRANSFORMER_SIZES[size]
    text, files = stdlib_corpus()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    split = int(len(data) * (1 - _HELD_OUT_FRACTION))
    train, held_out = data[:split], data[split:]
    ctx, n_win = cfg["context"], cfg["eval_windows"]
    # Evenly spaced windows over the held-out tail: the same eval set for every seed and mode.
    starts = torch.linspace(0, held_out.numel() - ctx - 1, n_win).long()
    windows = held_out[starts[:, None] + torch.arange(ctx + 1)].long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CharTransformer(
            d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"], context=ctx
        )
    return TransformerWorkload(
        name="transformer",
        model=model,
        seed=seed,
        size=size,
        batch_size=cfg["batch"],
        lr=cfg["lr"],
        context=ctx,
        train_data=train,
        eval_inputs=windows[:, :-1],
        eval_targets=windows[:, 1:],
        corpus_files=files,
        corpus_sha256=hashlib.sha256(text).hexdigest(),
    )


# ------------------------------------------------------------------------------------ wide MLP

_WIDE_SIZES: dict[str, dict[str, Any]] = {
    # ~2.1M parameters: for tests and smoke runs.
    "small": dict(width=1024, depth=2, batch=8, classes=16, lr=1e-3),
    # ~50M parameters, 3 x Linear(4096, 4096), 8 samples a rank: a few GFLOP a step, 200 MB
    # of fp32 gradients: the exchange is the step on a 1 Gbit/s link, even on one CPU core.
    "large": dict(width=4096, depth=3, batch=8, classes=16, lr=3e-4),
}
_WIDE_EVAL = 512


@dataclass
class WideMLPWorkload(Workload):
    width: int
    teacher: Tensor  # (width, classes): labels are argmax(x @ teacher)
    x_eval: Tensor
    y_eval: Tensor

    def _samples(self, g: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, self.width, generator=g)
        return x, (x @ self.teacher).argmax(dim=1)

    def batch(self, rank: int, world: int, step: int) -> tuple[Tensor, Tensor]:
        # fresh samples per (seed, step, rank): the ranks' shares are disjoint
        return self._samples(_generator(_TAG_WIDE, self.seed, step + 1, rank), self.batch_size)

    def eval_loss(self, model: nn.Module) -> float:
        return self._eval(model, self.x_eval, self.y_eval, chunk=256)

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "width": self.width, "depth": len(self.model) // 2}


def _build_wide_mlp(seed: int, size: str) -> WideMLPWorkload:
    if size not in _WIDE_SIZES:
        raise ValueError(f"wide_mlp has sizes {', '.join(_WIDE_SIZES)}, not {size!r}")
    cfg = _WIDE_SIZES[size]
    width, classes = cfg["width"], cfg["classes"]
    g = _generator(_TAG_WIDE, seed, 0)
    teacher = torch.randn(width, classes, generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _mlp([width] * (cfg["depth"] + 1) + [classes])
    w = WideMLPWorkload(
        name="wide_mlp", model=model, seed=seed, size=size, batch_size=cfg["batch"],
        lr=cfg["lr"], width=width, teacher=teacher, x_eval=torch.empty(0), y_eval=torch.empty(0),
    )
    # the eval set: one fixed draw, the same for every seed's batches (step 0 is never a batch)
    w.x_eval, w.y_eval = w._samples(_generator(_TAG_WIDE, 0, 0, 1 << 20), _WIDE_EVAL)
    return w


def build(name: str, *, seed: int, size: str = "small") -> Workload:
    """Build workload ``name`` with model init and batch order fixed by ``seed``.

    Args:
        name: ``"digits"``, ``"transformer"`` or ``"wide_mlp"``.
        seed: non-negative int; the same seed gives the same init on every rank.
        size: ``"small"`` (CPU convergence runs), ``"large"`` (tens of millions of parameters)
            or ``"xl"`` (the transformer only: over 300M parameters).
    """
    if name not in NAMES:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(NAMES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if name == "wide_mlp":
        return _build_wide_mlp(seed, size)
    if size == "xl" and name != "transformer":
        raise ValueError(f"size 'xl' is for the transformer only, not {name!r}")
    return _build_digits(seed, size) if name == "digits" else _build_transformer(seed, size)

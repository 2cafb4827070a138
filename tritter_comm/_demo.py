"""``tritter-comm demo``: the same small training run with and without compression, side by side.

Local ranks on gloo (CPU, one thread each) train a byte-level transformer on the Python sources of
the standard library (nothing is downloaded). The model and data live here, not in benchmarks/,
so that the demo runs from an installed wheel; they follow ``benchmarks/workloads.py``'s small
transformer (same shapes, init scheme, corpus, held-out split and lr schedule; not the same
batch order or initial values, so numbers are close to, not equal to, the benchmark's).

The parent process only starts ranks, shows their progress, and prints and plots the results;
ranks ignore SIGINT, so Ctrl-C reaches the parent alone, which stops every rank (and ranks die
with the parent if it is killed).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import queue as _queue
import signal
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ------------------------------------------------------------------------------ data and model

# Standard-library modules whose sources form the corpus (the list benchmarks/workloads.py uses).
STDLIB_MODULES = (
    "argparse", "ast", "calendar", "collections", "configparser", "dataclasses", "datetime",
    "difflib", "enum", "fractions", "functools", "inspect", "json", "logging", "pathlib", "pickle",
    "random", "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
    "typing", "zipfile",
)  # fmt: skip
HELD_OUT_FRACTION = 0.1


def stdlib_text() -> bytes:
    """The concatenated sources of :data:`STDLIB_MODULES` found in this Python."""
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for module in sorted(STDLIB_MODULES):
        for rel in (f"{module}.py", os.path.join(module, "__init__.py")):
            path = os.path.join(root, rel)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    parts.append(f.read())
                break
    if not parts:
        raise FileNotFoundError(f"no standard-library sources under {root}")
    return b"\n\n".join(parts)


class TextData:
    """Random windows of the corpus, the same on every rank for the same (seed, step)."""

    def __init__(self, *, context: int = 64, batch_size: int = 16, seed: int = 0,
                 eval_windows: int = 128):
        data = torch.frombuffer(bytearray(stdlib_text()), dtype=torch.uint8)
        split = int(len(data) * (1 - HELD_OUT_FRACTION))
        self.train, held_out = data[:split], data[split:]
        self.context, self.batch_size, self.seed = context, batch_size, seed
        starts = torch.linspace(0, held_out.numel() - context - 1, eval_windows).long()
        windows = held_out[starts[:, None] + torch.arange(context + 1)].long()
        self.eval_inputs, self.eval_targets = windows[:, :-1], windows[:, 1:]

    def batch(self, rank: int, world: int, step: int) -> tuple[Tensor, Tensor]:
        """``rank``'s share of the global batch of ``step``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.train.numel() - self.context - 1,
                               (world * self.batch_size,), generator=g)
        starts = starts[rank * self.batch_size:(rank + 1) * self.batch_size]
        windows = self.train[starts[:, None] + torch.arange(self.context + 1)].long()
        return windows[:, :-1], windows[:, 1:]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A GPT-style decoder over bytes (vocab 256): ~0.47M parameters at the defaults."""

    def __init__(self, *, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 context: int = 64):
        super().__init__()
        self.tok_emb = nn.Embedding(256, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 256, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for block in self.blocks:  # GPT-2: residual projections scaled by depth
            for proj in (block.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def lr_lambda(steps: int, warmup_frac: float = 0.05, final_frac: float = 0.1):
    """Linear warm-up, then cosine decay to ``final_frac`` (benchmarks/convergence.py's)."""
    warmup = max(1, int(warmup_frac * steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def distributed_eval_loss(model: nn.Module, data: TextData, rank: int, world: int) -> float:
    """Mean cross-entropy on the held-out windows, each rank taking a share."""
    import torch.distributed as dist

    module = getattr(model, "module", model)
    module.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        x, y = data.eval_inputs[rank::world], data.eval_targets[rank::world]
        for i in range(0, x.shape[0], 32):
            logits = module(x[i:i + 32])
            total[0] += F.cross_entropy(logits.reshape(-1, 256), y[i:i + 32].reshape(-1),
                                        reduction="sum").item()
            total[1] += y[i:i + 32].numel()
    module.train()
    if world > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1])


# ------------------------------------------------------------------------------------- one run


#: ``tritter`` is VSAState()'s defaults; the others set ``mode``.
MODES = ("none", "fp16", "tritter", "ternary", "int2", "sign")
LABELS = {"none": "fp32 all-reduce", "fp16": "fp16 all-reduce",
          "tritter": "tritter default (int2)", "ternary": "tritter ternary",
          "int2": "tritter int2", "sign": "tritter sign"}


@dataclass(frozen=True)
class Run:
    mode: str
    steps: int
    world: int
    start_iter: int
    seed: int = 0
    lr: float = 2e-3
    eval_points: int = 8
    progress_every: int = 5


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies (a killed demo must not leave ranks behind)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


def _rank_main(rank: int, runs: list, store_path: str, q: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    torch.set_num_threads(1)
    error = None
    try:
        import torch.distributed as dist

        world = runs[0].world
        dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank,
                                world_size=world, timeout=_dt.timedelta(seconds=120))
        q.put(("ready", rank))
        for i, run in enumerate(runs):  # one process group for every run: start-up once
            q.put(("done", rank, i, _train(rank, run, lambda *m, i=i: q.put(("progress", i, *m)))))
    except BaseException:
        error = traceback.format_exc()
    # Past the except block the traceback, and the models its frames held, are gone: the
    # teardown that never aborts (issue 14) closes the hook states, collects them, then
    # destroys the group.
    try:
        from ._teardown import shutdown

        shutdown()
    except BaseException:
        error = f"{error or ''}teardown failed:\n{traceback.format_exc()}"
    if error is not None:
        q.put(("error", rank, error))


def _train(rank: int, run: Run, report) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .hooks import VSAState, vsa_hook

    data = TextData(seed=run.seed)
    torch.manual_seed(run.seed)
    model = DDP(CharTransformer())
    numel = sum(p.numel() for p in model.parameters())
    fp32_step = 2 * (run.world - 1) * numel * 4 // run.world  # ring all-reduce, per rank
    state = None
    if run.mode == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif run.mode != "none":
        mode = {} if run.mode == "tritter" else {"mode": run.mode}
        state = VSAState(start_iter=run.start_iter, seed=run.seed, **mode)
        model.register_comm_hook(state, vsa_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(run.steps))
    eval_at = {round(run.steps * (i + 1) / run.eval_points) for i in range(run.eval_points)}

    def sent(step_done: int) -> int:
        if state is not None:
            return state.stats()["bytes_sent"]
        return step_done * (fp32_step // 2 if run.mode == "fp16" else fp32_step)

    curve = [(0, 0, distributed_eval_loss(model, data, rank, run.world))]
    train_s, at_start, ema = 0.0, None, None
    dist.barrier()
    for step in range(run.steps):
        t0 = time.perf_counter()
        x, y = data.batch(rank, run.world, step)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        value = loss.item()
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        if step + 1 == run.start_iter:
            at_start = sent(step + 1)
        if step + 1 in eval_at:
            curve.append((step + 1, sent(step + 1),
                          distributed_eval_loss(model, data, rank, run.world)))
        if rank == 0 and ((step + 1) % run.progress_every == 0 or step + 1 == run.steps):
            report(step + 1, ema, sent(step + 1))
    dist.barrier()
    total = sent(run.steps)
    compressed_steps = run.steps - run.start_iter
    if state is not None and at_start is not None and compressed_steps > 0:
        per_step = (total - at_start) / compressed_steps  # after compression started
    else:
        per_step = total / run.steps
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                     for p in model.parameters())).hexdigest()
    return {"eval_loss": curve[-1][2], "curve": curve, "bytes_per_step": per_step,
            "fp32_bytes_per_step": fp32_step, "bytes_total": total, "train_s": train_s,
            "params": numel, "digest": digest, "start_iter": run.start_iter,
            "hook_stats": state.stats() if state is not None else None}


class RankFailure(RuntimeError):
    pass


def run_ranks(runs: list, on_message) -> list:
    """Start ``runs[0].world`` ranks that train each of ``runs`` in turn; pass their messages
    (``("ready",)``, ``("progress", run, step, loss, bytes)``, ``("done", run)``) to
    ``on_message`` and return rank 0's result of each run (with ``replicas_identical``).
    Every rank is stopped on any way out, Ctrl-C included."""
    import torch.multiprocessing as mp

    world = runs[0].world
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="tritter-demo-") as d:
        procs = [ctx.Process(target=_rank_main, args=(r, runs, os.path.join(d, "store"), q),
                             daemon=True) for r in range(world)]
        try:
            for p in procs:
                p.start()
            results: list[dict[int, dict]] = [{} for _ in runs]
            ready = 0
            while sum(map(len, results)) < world * len(runs):
                try:
                    msg = q.get(timeout=1.0)
                except _queue.Empty:
                    dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                    if dead:
                        raise RankFailure(f"rank(s) {dead} exited with code(s) "
                                          f"{[procs[i].exitcode for i in dead]}") from None
                    continue
                if msg[0] == "ready":
                    ready += 1
                    if ready == world:
                        on_message(("ready",))
                elif msg[0] == "progress":
                    on_message(msg)
                elif msg[0] == "done":
                    results[msg[2]][msg[1]] = msg[3]
                    if len(results[msg[2]]) == world:
                        on_message(("done", msg[2]))
                else:
                    raise RankFailure(f"rank {msg[1]} failed:\n{msg[2]}")
            for p in procs:
                p.join(timeout=30)
            bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
            if bad:  # trained, then died or hung on the way out (issue 14)
                raise RankFailure("after training, " + ", ".join(
                    f"rank {i} {'did not exit' if c is None else f'exited with code {c}'}"
                    for i, c in bad))
        finally:
            stop_processes(procs)
    out = []
    for per_rank in results:
        r = dict(per_rank[0])
        r["replicas_identical"] = len({x["digest"] for x in per_rank.values()}) == 1
        r["train_s"] = max(x["train_s"] for x in per_rank.values())
        out.append(r)
    return out


def stop_processes(procs) -> None:
    """Terminate (then kill) every process still alive, and reap them all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


# ---------------------------------------------------------------------------------- reporting


def fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1000 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} GB"


def format_table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["mode"] == "none"), None)
    header = ("mode", "eval loss", "vs fp32", "bytes/step/rank", "ratio", "sent/rank",
              "time s", "replicas")
    body = []
    for r in rows:
        gap = (f"{100 * (r['eval_loss'] / base['eval_loss'] - 1):+.1f}%"
               if base is not None and r is not base else "")
        body.append((LABELS[r["mode"]], f"{r['eval_loss']:.4f}", gap,
                     fmt_bytes(r["bytes_per_step"]),
                     f"{r['fp32_bytes_per_step'] / r['bytes_per_step']:.1f}x",
                     fmt_bytes(r["bytes_total"]), f"{r['train_s']:.1f}",
                     "identical" if r["replicas_identical"] else "DIFFER"))
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(b, widths))))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Optional[str]:
    """Eval loss against step and against bytes sent; None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'tritter-comm[demo]')"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        steps = [c[0] for c in r["curve"]]
        mb = [c[1] / 1e6 for c in r["curve"]]
        loss = [c[2] for c in r["curve"]]
        label = f"{LABELS[r['mode']]} ({r['fp32_bytes_per_step'] / r['bytes_per_step']:.1f}x)"
        a.plot(steps, loss, marker=".", label=label)
        b.plot(mb, loss, marker=".", label=label)
    a.set_xlabel("step")
    a.axvline(rows[0]["start_iter"], color="gray", lw=0.8, ls=":")  # compression starts
    b.set_xlabel("MB sent per rank")
    top = max(r["curve"][1][2] for r in rows if len(r["curve"]) > 1) if all(
        len(r["curve"]) > 1 for r in rows) else None
    for ax in (a, b):
        if top is not None:  # the untrained model's loss would flatten the rest
            ax.set_ylim(top=top + 0.1 * (top - min(c[2] for r in rows for c in r["curve"])))
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def machine() -> dict:
    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "tritter_comm": __version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------- main


@dataclass
class DemoArgs:
    steps: int = 300
    start_iter: int = 50
    world: int = 2
    modes: tuple[str, ...] = ("none", "tritter")
    out: Path = field(default_factory=lambda: Path("tritter-comm-demo.png"))
    plot: bool = True
    quick: bool = False


class _Progress:
    """One status line per run: rewritten in place on a terminal, every 20% otherwise."""

    def __init__(self, label: str, run: Run, stream=None):
        self.label, self.run = label, run
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.next_pct = 20
        self.t0: Optional[float] = None

    def __call__(self, step: int, loss: float, sent: int) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()
        phase = ("compressing" if self.run.mode not in ("none", "fp16")
                 and step > self.run.start_iter else "")
        text = (f"{self.label:<22} step {step:>4}/{self.run.steps}  loss {loss:6.3f}  "
                f"sent {fmt_bytes(sent):>9}  {time.perf_counter() - self.t0:5.1f} s  {phase}")
        pct = 100 * step // self.run.steps
        if self.tty:
            self.stream.write("\r" + text.ljust(90))
            if step == self.run.steps:
                self.stream.write("\n")
        elif pct >= self.next_pct or step == self.run.steps:
            self.stream.write(text + "\n")
            while self.next_pct <= pct:
                self.next_pct += 20
        self.stream.flush()


def main(args: DemoArgs) -> int:
    # One thread per rank; children inherit the environment at spawn.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"tritter-comm demo: {args.world} local ranks on gloo (CPU), a 0.47M-parameter byte-level "
          f"transformer on Python's own sources, {args.steps} steps per run.")
    if any(m not in ("none", "fp16") for m in args.modes):
        print(f"Compressed runs use all-reduce for the first {args.start_iter} steps, then "
              f"compress (start_iter={args.start_iter}; the library's default is 100, for "
              f"longer runs).")
    runs = [Run(mode=m, steps=args.steps, world=args.world, start_iter=args.start_iter)
            for m in args.modes]
    bars = [_Progress(f"[{i + 1}/{len(runs)}] {LABELS[r.mode]}", r) for i, r in enumerate(runs)]
    t_start = time.perf_counter()
    print(f"starting {args.world} ranks ...", flush=True)

    def on_message(msg) -> None:
        if msg[0] == "ready":
            print(f"ranks ready after {time.perf_counter() - t_start:.0f} s", flush=True)
            bars[0].t0 = time.perf_counter()
        elif msg[0] == "done" and msg[1] + 1 < len(bars):
            bars[msg[1] + 1].t0 = time.perf_counter()
        elif msg[0] == "progress":
            bars[msg[1]](*msg[2:])

    results = run_ranks(runs, on_message)
    rows = [{"mode": r.mode, **res} for r, res in zip(runs, results)]
    total = time.perf_counter() - t_start
    print()
    print(format_table(rows))
    print(f"\nbytes/step/rank: after compression starts (the whole run for fp32/fp16); ratio: fp32 "
          f"all-reduce bytes / these; sent/rank: the whole run. Total {total:.0f} s.")
    title = (f"tritter-comm demo: {args.world} ranks, {rows[0]['params']:,} params, "
             f"{args.steps} steps, compression from step {args.start_iter}")
    report = {"demo": asdict(Run("", args.steps, args.world, args.start_iter)),
              "machine": machine(), "total_s": total,
              "results": [{k: v for k, v in r.items() if k != "digest"} for r in rows]}
    json_path = args.out.with_suffix(".json")
    if args.plot:
        why = plot(rows, args.out, title)
        print(f"plot: {args.out}" if why is None else f"no plot: {why}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    print(f"results: {json_path}")
    return 0 if all(r["replicas_identical"] for r in rows) else 1

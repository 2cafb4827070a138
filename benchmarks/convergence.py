"""Convergence benchmark: eval loss vs bytes on the wire for each DDP comm mode, side by side.

For every workload (``digits``, ``transformer``) and comm mode (``none``, ``bf16``, ``fp16``,
``fp8-2phase``, ``int4-2phase``, ``powersgd1``, ``powersgd4``, ``vsa``, ``vsa-ternary``,
``vsa-sign``, ``vsa-int2``: see ``benchmarks/comm.py``) and seed, 2 ranks on gloo (CPU, one
thread each) train the same model on the same batches with AdamW for a fixed number of steps. Per
mode it reports bytes per step per rank, the ratio to fp32 all-reduce and to a bf16 all-reduce
(the honest baseline: mixed-precision jobs reduce in bf16), the final eval loss (mean of the
seeds), its gap to ``none`` and the training wall time; it writes JSON (machine, versions,
settings, per-seed results and eval curves) and a PNG of the eval curves.

Usage::

    python benchmarks/convergence.py                      # full run, ~15 min on 2 cores
    python benchmarks/convergence.py --quick              # smoke test, about a minute
    python benchmarks/convergence.py --workloads transformer --modes none,fp16,vsa-int2 --seeds 0
    python benchmarks/convergence.py --render benchmarks/results/convergence.json  # tables again

Each (workload, mode) runs in fresh processes (so a crash or a hang costs one row, not the run):
collectives time out after ``--collective-timeout`` seconds, and the parent kills a group that
sends no progress for ``--stall-timeout`` seconds. The ``vsa-*`` rows are skipped, with a note,
while ``tritter_comm.hooks`` does not import.

Bytes: analytic for none/fp16/PowerSGD (ring all-reduce, ``2 (N-1)/N`` times the payload, PowerSGD
after its warm-up steps); for the VSA hook, measured by the hook's ``stats()`` over the second half
of training (``bytes_per_step_run_mean`` in the JSON includes the warm-up steps).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import datetime as _dt
import hashlib
import json
import math
import os
import queue as _queue
import socket
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    # appended, not prepended: an installed tritter_comm (with its compiled extension) must win
    # over the source tree's, which has none after a non-editable `pip install .`
    sys.path.append(str(_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from benchmarks import _common, comm, workloads  # noqa: E402

DEFAULT_WORKLOADS = ("digits", "transformer")
DEFAULT_MODES = comm.MODES
DEFAULT_SEEDS = (0, 1, 2)
# Chosen so that the full default run takes about 15 minutes on 2 shared CPU cores.
DEFAULT_STEPS = {"digits": 300, "transformer": 300}
QUICK_STEPS = {"digits": 30, "transformer": 30}
DEFAULT_OUT = _ROOT / "benchmarks" / "results" / "convergence.json"
QUICK_OUT = DEFAULT_OUT.with_name("convergence-quick.json")  # a smoke test never overwrites a run


@dataclass(frozen=True)
class Task:
    """One (workload, mode) row: what every rank of one process group runs."""

    workload: str
    mode: str
    seeds: tuple[int, ...]
    steps: int
    world: int = 2
    size: str = "small"
    warmup_frac: float = 0.05  # linear lr warm-up, then cosine decay to final_lr_frac * lr
    final_lr_frac: float = 0.1
    weight_decay: float = 0.01
    eval_points: int = 10  # eval-loss curve resolution (rank 0; not counted in wall time)
    collective_timeout_s: float = 120.0
    hook_options: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # the row name: the mode spec as given (default: mode)

    @property
    def row(self) -> str:
        return self.label or self.mode


# ------------------------------------------------------------------------------------ one rank


def _lr_lambda(task: Task):
    warmup = max(1, int(task.warmup_frac * task.steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, task.steps - warmup)
        return task.final_lr_frac + (1 - task.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _bucket_sizes(ddp: DDP) -> list[int] | None:
    """Bucket sizes in bytes as DDP reports them (a private API: None if it changed)."""
    try:
        sizes = str(ddp._get_ddp_logging_data().get("bucket_sizes", ""))
        return [int(x) for x in sizes.split(",") if x.strip()]
    except Exception:
        return None


def _train_one(rank: int, task: Task, seed: int, q: Any) -> dict[str, Any]:
    torch.manual_seed(seed)
    w = workloads.build(task.workload, seed=seed, size=task.size)
    ddp = DDP(w.model, bucket_cap_mb=comm.bucket_cap_mb_for(task.mode))
    options = dict(task.hook_options)
    if task.mode in comm.POWERSGD_RANKS or task.mode in comm.VSA_MODES:
        options.setdefault("seed", seed)
    state = comm.register(ddp, task.mode, **options)
    opt = torch.optim.AdamW(ddp.parameters(), lr=w.lr, weight_decay=task.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(task))
    eval_at = {round(task.steps * (i + 1) / task.eval_points) for i in range(task.eval_points)}
    half = task.steps // 2
    curve: list[tuple[int, float]] = []
    train_losses: list[float] = []
    snapshot = None
    train_s = 0.0
    dist.barrier()
    for step in range(task.steps):
        t0 = time.perf_counter()
        loss = w.loss(ddp, w.batch(rank, task.world, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        train_losses.append(loss.item())
        if step + 1 == half and hasattr(state, "stats"):
            snapshot = dict(state.stats())
        if rank == 0 and step + 1 in eval_at:
            curve.append((step + 1, w.eval_loss(ddp)))
        if (step + 1) % 50 == 0:
            q.put(("beat", rank))
    dist.barrier()
    out: dict[str, Any] = {
        "seed": seed,
        "rank": rank,
        "train_s": train_s,
        "param_sha256": _param_digest(ddp.module),
        "ddp_bucket_bytes": _bucket_sizes(ddp),
    }
    if rank == 0:
        fp32 = comm.fp32_allreduce_bytes(ddp)
        out.update(
            eval_loss=curve[-1][1] if curve and curve[-1][0] == task.steps else w.eval_loss(ddp),
            eval_curve=curve,
            train_loss_last10=sum(train_losses[-10:]) / len(train_losses[-10:]),
            fp32_bytes_per_step=fp32,
            bytes_per_step=comm.bytes_per_step(task.mode, ddp, state, since=snapshot),
            workload_info=w.info,
        )
        if task.mode in comm.POWERSGD_RANKS:  # vanilla all-reduce during PowerSGD's warm-up
            start = min(task.steps, state.start_powerSGD_iter)
            out["bytes_per_step_run_mean"] = (
                start * fp32 + (task.steps - start) * out["bytes_per_step"]
            ) / task.steps
        elif hasattr(state, "stats"):
            out["bytes_per_step_run_mean"] = comm.bytes_per_step(task.mode, ddp, state)
            out["hook_stats"] = {
                k: v for k, v in state.stats().items() if isinstance(v, (int, float, str, bool))
            }
        else:
            out["bytes_per_step_run_mean"] = out["bytes_per_step"]
    return out


def _worker(rank: int, task: Any, init_method: str, q: Any, train_one: Any) -> None:
    torch.set_num_threads(1)
    error = None
    try:
        dist.init_process_group(
            "gloo",
            init_method=init_method,
            rank=rank,
            world_size=task.world,
            timeout=_dt.timedelta(seconds=task.collective_timeout_s),
        )
        for seed in task.seeds:
            q.put(("result", rank, train_one(rank, task, seed, q)))
    except BaseException:
        error = traceback.format_exc()
    # past the except block, the traceback and the models its frames held are gone: the
    # teardown that never aborts at exit (issue 14) then collects them before the group goes
    try:
        _common.teardown()
    except BaseException:
        error = f"{error or ''}teardown failed:\n{traceback.format_exc()}"
    if error is not None:
        q.put(("error", rank, error))


# ------------------------------------------------------------------------------- process groups


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    task: Any, train_one: Any, *, stall_timeout_s: float, exit_timeout_s: float = 30.0
) -> tuple[dict[int, dict[int, dict[str, Any]]], str | None]:
    """Run ``train_one(rank, task, seed, q)`` for every seed of ``task`` (``world``, ``seeds``,
    ``collective_timeout_s``) on ``task.world`` fresh gloo processes; return the results by
    seed and rank, and the error if a rank failed, exited or stalled. ``train_one`` must be a
    module-level function (it is pickled into spawned processes); it may put ``("beat", rank)``
    on ``q`` to show progress. Once every rank has reported, each must exit within
    ``exit_timeout_s`` seconds (all together) with code 0."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    procs = [
        ctx.Process(target=_worker, args=(r, task, init_method, q, train_one), daemon=True)
        for r in range(task.world)
    ]
    for p in procs:
        p.start()
    per_seed: dict[int, dict[int, dict[str, Any]]] = {s: {} for s in task.seeds}
    expected = len(task.seeds) * task.world
    received, error = 0, None
    last = time.monotonic()
    while received < expected and error is None:
        try:
            msg = q.get(timeout=5)
        except _queue.Empty:
            if time.monotonic() - last > stall_timeout_s:
                error = f"no progress for {stall_timeout_s:.0f} s (hang?)"
            elif any(p.exitcode not in (None, 0) for p in procs):
                error = "a rank exited: " + ", ".join(
                    f"rank {i} exit {p.exitcode}" for i, p in enumerate(procs)
                )
            continue
        last = time.monotonic()
        if msg[0] == "result":
            per_seed[msg[2]["seed"]][msg[1]] = msg[2]
            received += 1
        elif msg[0] == "error":
            error = f"rank {msg[1]}:\n{msg[2]}"
    deadline = time.monotonic() + (exit_timeout_s if error is None else 1)
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
    late = [i for i, p in enumerate(procs) if p.is_alive()]
    for i in late:
        procs[i].kill()
        procs[i].join(timeout=5)
    if error is None:  # every rank reported: each must also have exited cleanly (issue 14)
        bad = [f"rank {i} " + (f"did not exit within {exit_timeout_s:.0f} s" if i in late
                               else f"exit {p.exitcode}")
               for i, p in enumerate(procs) if i in late or p.exitcode != 0]
        if bad:
            error = "trained, then failed on the way out: " + ", ".join(bad)
    return per_seed, error


def run_task(task: Task, *, stall_timeout_s: float, train_one: Any = None,
             exit_timeout_s: float = 30.0) -> dict[str, Any]:
    """Run one row in ``task.world`` fresh processes; return its results or its error.
    ``train_one``: what each rank runs per seed (default: this module's DDP training).
    A row whose ranks all reported but then failed to exit keeps its results, with the
    failure in ``exit_error`` (listed under the table)."""
    per_seed, error = run_ranks(task, train_one or _train_one, stall_timeout_s=stall_timeout_s,
                                exit_timeout_s=exit_timeout_s)
    complete = all(len(per_seed[s]) == task.world for s in task.seeds)
    if error is not None and not (complete and error.startswith("trained, then failed")):
        return {"workload": task.workload, "mode": task.row, "error": error}
    row = _summarize(task, per_seed)
    if error is not None:
        row["exit_error"] = error
    return row


def _summarize(task: Task, per_seed: dict[int, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    seeds = []
    for seed in task.seeds:
        ranks = per_seed[seed]
        r0 = dict(ranks[0])
        r0["replicas_identical"] = len({r["param_sha256"] for r in ranks.values()}) == 1
        r0["train_s_max_rank"] = max(r["train_s"] for r in ranks.values())
        seeds.append(r0)
    losses = [s["eval_loss"] for s in seeds]
    return {
        "workload": task.workload,
        "mode": task.row,
        "comm": task.mode,
        "hook_options": dict(task.hook_options),
        "steps": task.steps,
        "bytes_per_step": seeds[0]["bytes_per_step"],
        "bytes_per_step_run_mean": seeds[0]["bytes_per_step_run_mean"],
        "fp32_bytes_per_step": seeds[0]["fp32_bytes_per_step"],
        "ratio_vs_fp32": seeds[0]["fp32_bytes_per_step"] / seeds[0]["bytes_per_step"],
        "ratio_vs_bf16": ratio_vs_bf16(seeds[0]),
        "eval_loss_mean": statistics.fmean(losses),
        "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "wall_s_median": statistics.median(s["train_s"] for s in seeds),
        "replicas_identical": all(s["replicas_identical"] for s in seeds),
        "workload_info": seeds[0].pop("workload_info"),
        "seeds": [{k: v for k, v in s.items() if k != "workload_info"} for s in seeds],
    }


# ------------------------------------------------------------------------------------- reporting


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1000 or unit == "GB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1000
    raise AssertionError


def ratio_vs_bf16(row: dict[str, Any]) -> float:
    """Bytes of a bf16 ring all-reduce (half of fp32's) over the row's bytes per step."""
    return row["fp32_bytes_per_step"] / 2 / row["bytes_per_step"]


def add_gaps(rows: list[dict[str, Any]]) -> None:
    """Set ``gap_pct`` (mean eval loss vs the ``none`` row, in %) and the per-seed paired gaps."""
    ok = [r for r in rows if "seeds" in r]
    base = next((r for r in ok if r["mode"] == "none"), None)
    if base is None:
        return
    base_loss = {s["seed"]: s["eval_loss"] for s in base["seeds"]}
    for r in ok:
        # against the baseline's mean over this row's seeds (rows may hold fewer seeds)
        paired = [base_loss[s["seed"]] for s in r["seeds"] if s["seed"] in base_loss]
        ref = statistics.fmean(paired) if paired else base["eval_loss_mean"]
        r["gap_pct"] = 100 * (r["eval_loss_mean"] - ref) / ref
        r["gap_pct_per_seed"] = {
            s["seed"]: 100 * (s["eval_loss"] - base_loss[s["seed"]]) / base_loss[s["seed"]]
            for s in r["seeds"]
            if s["seed"] in base_loss
        }


def format_table(workload: str, rows: list[dict[str, Any]]) -> str:
    """A markdown table of one workload's rows (errors and skips listed below it)."""
    add_gaps(rows)
    ok = [r for r in rows if "seeds" in r]
    lines = []
    if ok:
        info = ok[0]["workload_info"]
        n_seeds = len(ok[0]["seeds"])
        lines.append(
            f"### {workload}: {info['params']:,} params, {ok[0]['steps']} steps, {n_seeds} seed(s)"
        )
        lines.append("")
    header = (
        "mode",
        "bytes/step/rank",
        "vs bf16",
        "vs fp32",
        "eval loss (± sd)",
        "gap (seed range)",
        "wall s",
        "replicas",
    )
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 2) + [":---:"]) + "|")
    for r in ok:
        gap = f"{r['gap_pct']:+.2f}%" if "gap_pct" in r else "n/a"
        per_seed = list(r.get("gap_pct_per_seed", {}).values())
        if len(per_seed) > 1 and r["mode"] != "none":
            gap += f" ({min(per_seed):+.1f}..{max(per_seed):+.1f})"
        loss = f"{r['eval_loss_mean']:.4f}"
        if len(r["seeds"]) > 1:
            loss += f" ± {r['eval_loss_std']:.4f}"
        name = r["mode"]
        if len(r["seeds"]) != n_seeds:
            name += " (seed " + ", ".join(str(s["seed"]) for s in r["seeds"]) + ")"
        lines.append(
            "| "
            + " | ".join(
                (
                    name,
                    _fmt_bytes(r["bytes_per_step"]),
                    f"{ratio_vs_bf16(r):.1f}x",
                    f"{r['ratio_vs_fp32']:.1f}x",
                    loss,
                    gap,
                    f"{r['wall_s_median']:.1f}",
                    "identical" if r["replicas_identical"] else "DIFFER",
                )
            )
            + " |"
        )
    for r in rows:
        if "exit_error" in r:
            lines.append(f"\n{r['mode']}: results kept, but {r['exit_error']}")
        lines.extend(failure_lines([r]))
    return "\n".join(lines)


def failure_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The lines under a table for its skipped and failed rows (an error's last line)."""
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append(f"\nskipped {r['mode']}: {r['skipped']}")
        elif "error" in r:
            first = r["error"].strip().splitlines()
            lines.append(f"\nFAILED {r['mode']}: {first[-1] if first else '?'}")
    return lines


def merge_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one (workload, mode, steps) from several runs (seeds run apart) as one row. A
    row that failed in one run and ran in another is shown from the run where it ran."""
    ran = {(r["workload"], r["mode"]) for r in rows if "seeds" in r}
    rows = [r for r in rows if "seeds" in r or (r["workload"], r["mode"]) not in ran]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        key = (r["workload"], r["mode"], r.get("steps"))
        groups.setdefault(key, []).append(r)
    merged = []
    for parts in groups.values():
        ok = [r for r in parts if "seeds" in r]
        if len(ok) < 2:
            merged.append(ok[0] if ok else parts[0])
            continue
        seeds = sorted((s for r in ok for s in r["seeds"]), key=lambda s: s["seed"])
        if len({s["seed"] for s in seeds}) != len(seeds):
            raise ValueError(f"seed run twice in row {parts[0]['mode']!r}")
        row = dict(ok[0])
        losses = [s["eval_loss"] for s in seeds]
        row.update(
            seeds=seeds,
            eval_loss_mean=statistics.fmean(losses),
            eval_loss_std=statistics.stdev(losses),
            wall_s_median=statistics.median(s["train_s"] for s in seeds),
            replicas_identical=all(r["replicas_identical"] for r in ok),
        )
        merged.append(row)
    return merged


def render(paths: list[Path]) -> str:
    """One table per workload over the rows of all ``paths``: runs of one protocol split over
    several invocations (other rows, or other seeds of the same rows, which are merged). The
    gaps are against the ``none`` row, whichever file holds it."""
    results, lines = [], []
    for path in paths:
        report = json.loads(path.read_text())
        st = report["settings"]
        lines.append(f"<!-- {path.name}: seeds {st['seeds']}, steps {st['steps']}, "
                     f"world {st['world']} -->")
        results.extend(report["results"])
    # rows in the order of comm.MODES (none first), whichever file held them
    results = sorted(merge_rows(results),
                     key=lambda r: comm.MODES.index(r["mode"].split(":")[0])
                     if r["mode"].split(":")[0] in comm.MODES else len(comm.MODES))
    for name in dict.fromkeys(r["workload"] for r in results):
        lines += ["", format_table(name, [r for r in results if r["workload"] == name])]
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    return _common.machine("sklearn")


def _plot(results: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(dict.fromkeys(r["workload"] for r in results if "seeds" in r))
    if not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for r in results:
            if r["workload"] != name or "seeds" not in r:
                continue
            curves = [s["eval_curve"] for s in r["seeds"]]
            xs = [x for x, _ in curves[0]]
            ys = [statistics.fmean(c[i][1] for c in curves) for i in range(len(xs))]
            ax.plot(xs, ys, marker=".", label=f"{r['mode']} ({r['ratio_vs_fp32']:.1f}x)")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss (mean of seeds)")
        lo, hi = ax.get_ylim()
        if lo > 0 and hi / lo > 5:  # digits falls by 40x: log scale; the transformer by 2x
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ main


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_mode(spec: str) -> tuple[str, dict[str, Any]]:
    """``"vsa-int2"`` or ``"vsa-int2:block_size=256:start_iter=10"`` -> (mode, hook options).

    Options go to the hook state (see ``comm.register``); values are Python literals, else strings.
    The whole spec names the row, so variants of one mode can run side by side.
    """
    mode, *items = spec.split(":")
    if mode not in comm.MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(comm.MODES)}")
    return mode, parse_options(items, spec)


def parse_options(items: list[str], where: str) -> dict[str, Any]:
    """``["key=value", ...]`` -> options; values are Python literals, else strings."""
    options: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad option {item!r} in {where!r}; write key=value")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    return options


def _parse_steps(text: str, names: list[str]) -> dict[str, int]:
    """``"300"`` (every workload) or ``"digits=300,transformer=400"``."""
    if "=" not in text:
        return {n: int(text) for n in names}
    steps = {}
    for item in _csv(text):
        k, _, v = item.partition("=")
        steps[k.strip()] = int(v)
    return steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS), help="comma-separated")
    ap.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated of {', '.join(comm.MODES)}; a mode may carry hook options, "
        "e.g. vsa-int2:block_size=256:start_iter=10",
    )
    ap.add_argument(
        "--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated ints"
    )
    ap.add_argument(
        "--steps",
        default=None,
        help="N or name=N,... (default: "
        + ",".join(f"{k}={v}" for k, v in DEFAULT_STEPS.items())
        + ")",
    )
    ap.add_argument(
        "--quick", action="store_true", help=f"smoke test: {QUICK_STEPS} steps, seed 0 only"
    )
    ap.add_argument(
        "--render",
        type=Path,
        nargs="+",
        default=None,
        help="print the tables of earlier runs' JSON files (rows of all files merged per "
        "workload) and exit (runs nothing)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="rows run side by side (default 1)")
    ap.add_argument("--world", type=int, default=2, help="ranks per run (default 2)")
    ap.add_argument("--size", default="small", choices=workloads.SIZES)
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON path, a PNG goes beside it (default {DEFAULT_OUT.relative_to(_ROOT)}, "
        f"with --quick {QUICK_OUT.relative_to(_ROOT)})",
    )
    ap.add_argument(
        "--collective-timeout", type=float, default=120.0, help="seconds before a collective fails"
    )
    ap.add_argument(
        "--stall-timeout",
        type=float,
        default=300.0,
        help="seconds without progress before a row is killed",
    )
    ap.add_argument(
        "--exit-timeout",
        type=float,
        default=30.0,
        help="seconds the ranks of a row have to exit once they reported (a slow exit keeps "
        "the row's results and is listed under the table)",
    )
    args = ap.parse_args(argv)
    if args.render:
        print(render(args.render))
        return 0
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT

    names = _csv(args.workloads)
    modes = _csv(args.modes)
    for n in names:
        if n not in workloads.NAMES:
            ap.error(f"unknown workload {n!r}; choose from {', '.join(workloads.NAMES)}")
    specs = {}
    for m in modes:
        try:
            specs[m] = parse_mode(m)
        except ValueError as e:
            ap.error(str(e))
    seeds = tuple(int(s) for s in _csv(args.seeds))
    steps = dict(QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if args.quick and args.seeds == ",".join(map(str, DEFAULT_SEEDS)):
        seeds = seeds[:1]
    if args.steps:
        steps.update(_parse_steps(args.steps, names))

    # One thread per rank (ranks share the cores); children inherit the environment at spawn.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)

    vsa_ok, vsa_why = comm.vsa_available()
    results: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    def one(name: str, mode: str) -> dict[str, Any]:
        base, options = specs[mode]
        if base in comm.VSA_MODES and not vsa_ok:
            print(f"[{name}] {mode}: skipped ({vsa_why})", flush=True)
            return {
                "workload": name,
                "mode": mode,
                "skipped": f"tritter_comm.hooks unavailable ({vsa_why})",
            }
        task = Task(
            workload=name,
            mode=base,
            hook_options=options,
            label=mode,
            seeds=seeds,
            steps=steps[name],
            world=args.world,
            size=args.size,
            collective_timeout_s=args.collective_timeout,
        )
        t0 = time.perf_counter()
        row = run_task(task, stall_timeout_s=args.stall_timeout,
                       exit_timeout_s=args.exit_timeout)
        row["row_wall_s"] = time.perf_counter() - t0
        if "error" in row:
            print(
                f"[{name}] {mode}: FAILED after {row['row_wall_s']:.0f} s\n{row['error']}",
                flush=True,
            )
        else:
            print(
                f"[{name}] {mode}: eval {row['eval_loss_mean']:.4f}, "
                f"bytes {row['ratio_vs_fp32']:.1f}x below fp32, {row['row_wall_s']:.0f} s",
                flush=True,
            )
        return row

    for name in names:
        # --jobs > 1 runs rows side by side (each row's ranks use one thread each): for
        # machines with cores to spare; wall times then include the contention.
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            rows = list(pool.map(lambda m, n=name: one(n, m), modes))
        results.extend(rows)
        print("\n" + format_table(name, rows) + "\n", flush=True)
    total_s = time.perf_counter() - t_start

    report = {
        "benchmark": "convergence",
        "machine": _machine(),
        "settings": {
            "workloads": names,
            "modes": modes,
            "seeds": list(seeds),
            "steps": {n: steps[n] for n in names},
            "world": args.world,
            "size": args.size,
            "backend": "gloo",
            "threads_per_rank": 1,
            "optimizer": "AdamW",
            "task_defaults": {
                k: v
                for k, v in asdict(Task("", "", (), 0)).items()
                if k not in ("workload", "mode", "seeds", "steps")
            },
            "powersgd": {
                "start_iter": comm.POWERSGD_START_ITER,
                "min_compression_rate": comm.POWERSGD_MIN_COMPRESSION_RATE,
                "buckets": 1,
            },
            "quick": args.quick,
        },
        "total_wall_s": total_s,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plotted = _plot(results, args.out.with_suffix(".png"))
    print(
        f"total {total_s:.0f} s; wrote {args.out}"
        + (f" and {args.out.with_suffix('.png')}" if plotted else "")
    )
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Phase-based training benchmark: the plain optimizer vs ``PhaseOptimizer``, side by side.

For each workload of ``benchmarks/workloads.py`` (``digits``, ``transformer``) and seed, 2 ranks on
gloo (CPU, one thread each) train the same model on the same batches with AdamW and the lr schedule
of ``benchmarks/convergence.py`` (linear warm-up, cosine decay) for the same number of optimizer
steps, in four rows:

- ``plain``: DDP's fp32 all-reduce, a backward pass every step;
- ``phase``: the same wrapped in ``tritter_comm.optim.PhaseOptimizer`` (predicted steps run no
  backward pass and no exchange; the loss of a predicted step is not computed at all);
- ``plain+vsa`` / ``phase+vsa``: the same with the VSA hook (``vsa_hook``, ternary);
- ``phase-alt`` / ``phase-alt+vsa`` (with ``--alt-phase-options``): a second configuration.

Per row: backward passes and gradient exchanges per rank, bytes sent per rank over the run
(analytic fp32 ring all-reduce per exchange for the plain rows, the hook's ``stats()`` for the vsa
rows, plus the phase schedule's own scalar all-reduces), training wall time (median over seeds),
final eval loss (mean over seeds) and its gap to ``plain`` (of the ``phase*+vsa`` rows to ``plain+vsa``).

The compute-matched figure: rank 0 evaluates every ``--eval-every`` steps (the held-out set is
fixed and the evaluation draws no random numbers, so training is unchanged), and for each seed
the backward passes a phase row had run when its eval loss first reached its baseline row's
final eval loss ("to plain's loss"; measured at those points only, so an upper bound), as a
fraction of the baseline's backward passes. Prints a markdown table, writes JSON.

Usage::

    python benchmarks/phase.py                                  # 3 seeds, both workloads
    python benchmarks/phase.py --seeds 0 --steps 100 --rows plain,phase --out /tmp/p.json
    python benchmarks/phase.py --phase-options predict_steps=6,correct_every=3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from benchmarks import comm, convergence, workloads  # noqa: E402

ROWS = ("plain", "phase", "plain+vsa", "phase+vsa")
ALT_ROWS = ("phase-alt", "phase-alt+vsa")  # with --alt-phase-options: a second configuration
DEFAULT_STEPS = {"digits": 300, "transformer": 300}
DEFAULT_OUT = _ROOT / "benchmarks" / "results" / "phase.json"


@dataclass(frozen=True)
class Task:
    workload: str
    row: str
    seeds: tuple[int, ...]
    steps: int
    world: int = 2
    size: str = "small"
    warmup_frac: float = 0.05  # the lr schedule of benchmarks/convergence.py
    final_lr_frac: float = 0.1
    weight_decay: float = 0.01
    collective_timeout_s: float = 120.0
    phase_options: dict[str, Any] = field(default_factory=dict)
    hook_options: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 25  # rank 0's eval-loss curve (the compute-matched figure); 0: none


def _train_one(rank: int, task: Task, seed: int, q: Any) -> dict[str, Any]:
    """One seed's training on this rank (``q``: convergence.run_ranks's queue, unused)."""
    from tritter_comm.optim import PhaseOptimizer

    torch.manual_seed(seed)
    w = workloads.build(task.workload, seed=seed, size=task.size)
    ddp = DDP(w.model)
    vsa = task.row.endswith("+vsa")
    state = comm.register(ddp, "vsa-ternary", seed=seed, **task.hook_options) if vsa else None
    inner = torch.optim.AdamW(ddp.parameters(), lr=w.lr, weight_decay=task.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(inner, convergence._lr_lambda(task))
    opt = PhaseOptimizer(inner, **task.phase_options) if task.row.startswith("phase") else None
    backward = 0
    train_s = 0.0
    curve = []  # (steps, backward passes, eval loss) on rank 0
    dist.barrier()
    for step in range(task.steps):
        t0 = time.perf_counter()
        batch = w.batch(rank, task.world, step)
        if opt is None or opt.needs_backward():
            loss = w.loss(ddp, batch)
            inner.zero_grad(set_to_none=True)
            loss.backward()
            backward += 1
        else:
            loss = None  # a predicted step: no forward, no backward, no exchange
        (inner.step() if opt is None else opt.step(loss=loss))
        sched.step()
        train_s += time.perf_counter() - t0
        if rank == 0 and task.eval_every and (step + 1) % task.eval_every == 0:
            curve.append((step + 1, backward, w.eval_loss(ddp)))
    dist.barrier()
    fp32 = comm.fp32_allreduce_bytes(ddp)
    st = opt.stats() if opt is not None else None
    exchanges = st["exchanges"] if st else task.steps
    grad_bytes = state.stats()["bytes_sent"] if vsa else fp32 * exchanges
    out = {
        "seed": seed,
        "rank": rank,
        "train_s": train_s,
        "param_sha256": convergence._param_digest(ddp.module),
        "backward_passes": backward,
        "exchanges": exchanges,
        "bytes": grad_bytes + (st["sync_bytes"] if st else 0),
        "bytes_plain_fp32": fp32 * task.steps,
        "phase_stats": st,
        "hook_stats": ({k: v for k, v in state.stats().items()
                        if isinstance(v, (int, float, str, bool))} if vsa else None),
    }
    if rank == 0:
        out.update(eval_loss=w.eval_loss(ddp), workload_info=w.info, curve=curve)
    return out


def run_task(task: Task, *, stall_timeout_s: float) -> dict[str, Any]:
    """One row in ``task.world`` fresh processes: its per-seed results, or its error."""
    per_seed, error = convergence.run_ranks(task, _train_one, stall_timeout_s=stall_timeout_s)
    if error is not None:
        return {"workload": task.workload, "row": task.row, "error": error}
    seeds = []
    for s in task.seeds:
        ranks = per_seed[s]
        r0 = dict(ranks[0])
        r0["replicas_identical"] = len({r["param_sha256"] for r in ranks.values()}) == 1
        r0["train_s_max_rank"] = max(r["train_s"] for r in ranks.values())
        seeds.append(r0)
    info = seeds[0].pop("workload_info")
    for s in seeds[1:]:
        s.pop("workload_info", None)
    losses = [s["eval_loss"] for s in seeds]
    return {
        "workload": task.workload,
        "row": task.row,
        "steps": task.steps,
        "phase_options": dict(task.phase_options),
        "hook_options": dict(task.hook_options),
        "backward_passes": statistics.fmean(s["backward_passes"] for s in seeds),
        "exchanges": statistics.fmean(s["exchanges"] for s in seeds),
        "bytes": statistics.fmean(s["bytes"] for s in seeds),
        "bytes_plain_fp32": seeds[0]["bytes_plain_fp32"],
        "eval_loss_mean": statistics.fmean(losses),
        "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "wall_s_median": statistics.median(s["train_s_max_rank"] for s in seeds),
        "replicas_identical": all(s["replicas_identical"] for s in seeds),
        "workload_info": info,
        "seeds": seeds,
    }


def _gap(row: dict, base: dict | None) -> tuple[float, list[float]] | None:
    if base is None or "seeds" not in base:
        return None
    b = {s["seed"]: s["eval_loss"] for s in base["seeds"]}
    per = [100 * (s["eval_loss"] - b[s["seed"]]) / b[s["seed"]] for s in row["seeds"]
           if s["seed"] in b]
    return 100 * (row["eval_loss_mean"] - base["eval_loss_mean"]) / base["eval_loss_mean"], per


def to_baseline_loss(row: dict, base: dict | None) -> tuple[list[float], int] | None:
    """Per seed, the backward passes ``row`` had run when its eval loss first reached ``base``'s
    final eval loss, as a fraction of ``base``'s backward passes; and the seeds that never did."""
    if base is None or "seeds" not in base or "seeds" not in row:
        return None
    b = {s["seed"]: s for s in base["seeds"]}
    fracs, missed = [], 0
    for s in row["seeds"]:
        if s["seed"] not in b or not s.get("curve"):
            continue
        target = b[s["seed"]]["eval_loss"]
        hit = next((bw for _, bw, loss in s["curve"] if loss <= target), None)
        if hit is None:
            missed += 1
        else:
            fracs.append(hit / b[s["seed"]]["backward_passes"])
    return fracs, missed


def _matched(m: tuple[list[float], int] | None) -> str:
    if m is None:
        return "—"
    fracs, missed = m
    if not fracs:
        return f"not reached ({missed} seeds)"
    text = f"{100 * statistics.fmean(fracs):.0f}%"
    if len(fracs) > 1:
        text += f" ({100 * min(fracs):.0f}..{100 * max(fracs):.0f})"
    return text + (f", {missed} not reached" if missed else "")


def format_table(workload: str, rows: list[dict]) -> str:
    ok = {r["row"]: r for r in rows if "seeds" in r}
    lines = []
    if ok:
        any_row = next(iter(ok.values()))
        lines += [f"### {workload}: {any_row['workload_info']['params']:,} params, "
                  f"{any_row['steps']} steps, {len(any_row['seeds'])} seed(s), 2 ranks", ""]
    header = ("row", "backward/rank", "exchanges/rank", "fewer backward", "MB sent/rank",
              "eval loss (± sd)", "gap (seed range)", "backward to plain's loss", "wall s",
              "replicas")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---|" + "---:|" * (len(header) - 2) + ":---:|")
    for name in ROWS + ALT_ROWS:
        r = ok.get(name)
        if r is None:
            continue
        base = ok.get("plain+vsa" if name.endswith("+vsa") else "plain")
        g = _gap(r, base) if name not in ("plain", "plain+vsa") else None
        if name == "plain+vsa":
            g = _gap(r, ok.get("plain"))
        gap = "—" if g is None else f"{g[0]:+.2f}%"
        if g is not None and len(g[1]) > 1:
            gap += f" ({min(g[1]):+.1f}..{max(g[1]):+.1f})"
        if name.endswith("+vsa") and name != "plain+vsa" and g is not None:
            gap += " vs plain+vsa"
        fewer = 100 * (1 - r["backward_passes"] / r["steps"])
        matched = (_matched(to_baseline_loss(r, base)) if name not in ("plain", "plain+vsa")
                   else "—")
        loss = f"{r['eval_loss_mean']:.4f}"
        if len(r["seeds"]) > 1:
            loss += f" ± {r['eval_loss_std']:.4f}"
        lines.append("| " + " | ".join((
            name, f"{r['backward_passes']:.0f}", f"{r['exchanges']:.0f}",
            f"{fewer:.1f}%", f"{r['bytes'] / 1e6:.1f}", loss, gap, matched,
            f"{r['wall_s_median']:.1f}", "identical" if r["replicas_identical"] else "DIFFER",
        )) + " |")
    for r in rows:
        if "error" in r:
            lines.append(f"\nFAILED {r['row']}: {r['error'].strip().splitlines()[-1]}")
    return "\n".join(lines)


def _options(text: str) -> dict[str, Any]:
    return convergence.parse_options(convergence._csv(text), text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="digits,transformer")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated of {ROWS}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", default=None, help="N or name=N,... (default 300 each)")
    ap.add_argument("--phase-options", default="", help="PhaseOptimizer kwargs: k=v,k=v")
    ap.add_argument("--alt-phase-options", default=None,
                    help="PhaseOptimizer kwargs of the phase-alt rows (added when given)")
    ap.add_argument("--hook-options", default="", help="VSAState kwargs for the +vsa rows")
    ap.add_argument("--eval-every", type=int, default=25,
                    help="rank 0 evaluates every N steps, for the compute-matched figure "
                    "(default 25; 0: only at the end)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--stall-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    names = convergence._csv(args.workloads)
    rows = convergence._csv(args.rows)
    if args.alt_phase_options is not None:
        rows += [r for r in ALT_ROWS if r.replace("-alt", "") in rows]
    for r in rows:
        if r not in ROWS + ALT_ROWS:
            ap.error(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    if args.eval_every < 0:
        ap.error(f"--eval-every must be >= 0, got {args.eval_every}")
    seeds = tuple(int(s) for s in convergence._csv(args.seeds))
    steps = dict(DEFAULT_STEPS)
    if args.steps:
        steps.update(convergence._parse_steps(args.steps, names))
    popts, hopts = _options(args.phase_options), _options(args.hook_options)
    aopts = _options(args.alt_phase_options or "")

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)
    results, tables = [], []
    t_start = time.perf_counter()
    for name in names:
        wrows = []
        for row in rows:
            task = Task(workload=name, row=row, seeds=seeds, steps=steps[name],
                        phase_options=(aopts if row.startswith("phase-alt")
                                       else popts if row.startswith("phase") else {}),
                        hook_options=hopts if row.endswith("+vsa") else {},
                        eval_every=args.eval_every)
            t0 = time.perf_counter()
            res = run_task(task, stall_timeout_s=args.stall_timeout)
            res["row_wall_s"] = time.perf_counter() - t0
            msg = ("FAILED\n" + res["error"] if "error" in res
                   else f"eval {res['eval_loss_mean']:.4f}, backward {res['backward_passes']:.0f}")
            print(f"[{name}] {row}: {msg} ({res['row_wall_s']:.0f} s)", flush=True)
            wrows.append(res)
        results.extend(wrows)
        tables.append(format_table(name, wrows))
        print("\n" + tables[-1] + "\n", flush=True)
    from tritter_comm.optim import PhaseOptimizer

    defaults = {k: v.default for k, v in
                __import__("inspect").signature(PhaseOptimizer).parameters.items()
                if v.default is not v.empty}
    report = {
        "benchmark": "phase",
        "machine": convergence._machine(),
        "command": " ".join(["python", "benchmarks/phase.py", *(argv or sys.argv[1:])]),
        "settings": {
            "workloads": names, "rows": rows, "seeds": list(seeds),
            "steps": {n: steps[n] for n in names}, "world": 2, "backend": "gloo",
            "threads_per_rank": 1, "optimizer": "AdamW",
            "phase_options": {**defaults, **popts},
            "alt_phase_options": ({**defaults, **aopts} if args.alt_phase_options is not None
                                  else None),
            "hook": {"mode": "ternary", **hopts},
            "task_defaults": {k: v for k, v in asdict(Task("", "", (), 0)).items()
                              if k not in ("workload", "row", "seeds", "steps")},
            "predicted_step": "no forward, no backward, no exchange",
        },
        "total_wall_s": time.perf_counter() - t_start,
        "tables": tables,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"total {report['total_wall_s']:.0f} s; wrote {args.out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

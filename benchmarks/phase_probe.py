"""How well does each gradient predictor point along the next real gradient? (issue 18)

One process trains a workload of ``benchmarks/workloads.py`` with AdamW and the lr schedule of
``benchmarks/convergence.py``, every step a real one, on the mean gradient of 2 ranks' batches
(what DDP would hand ``PhaseOptimizer``). Before each step's gradient is folded in, each
predictor's prediction for that step (h = 1) is compared with it: the cosine similarity, which
``PhaseOptimizer``'s gate averages (a skipped step's zero gradient scores 0). Prints, per
predictor and window of steps, the mean cosine and its spread, and the share of steps after the
warm-up at which the gate (the mean of the last ``--window`` cosines more than ``--sigmas``
standard errors above 0) would be open. Measuring changes nothing in the training.

    python benchmarks/phase_probe.py --workloads digits,transformer --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.append(str(_ROOT))

import torch  # noqa: E402

from benchmarks import convergence, workloads  # noqa: E402

#: name: (fit, decay) of a Predictor
PREDICTORS = {"line 0.9": ("line", 0.9), "mean 0.97": ("mean", 0.97), "line 0.97": ("line", 0.97),
              "previous gradient": ("mean", 0.01)}


def probe(name: str, seed: int, steps: int) -> dict:
    from tritter_comm.optim._predictor import Predictor, cosine

    torch.manual_seed(seed)
    w = workloads.build(name, seed=seed)
    params = [p for p in w.model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=w.lr, weight_decay=0.01)
    task = convergence.Task(workload=name, mode="none", seeds=(seed,), steps=steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, convergence._lr_lambda(task))
    preds = {k: Predictor(n, "cpu", decay=d, fit=f, backend="torch")
             for k, (f, d) in PREDICTORS.items()}
    cos: dict[str, list[tuple[int, float]]] = {k: [] for k in preds}
    flat = torch.zeros(n)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        for r in range(2):
            (w.loss(w.model, w.batch(r, 2, step)) / 2).backward()
        torch.cat([p.grad.reshape(-1) for p in params], out=flat)
        for k, pr in preds.items():
            q = pr.observe(flat, measure=True)
            if q is not None:
                cos[k].append((step, cosine(q)))
            pr.tick()
        opt.step()
        sched.step()
    return {"workload": name, "seed": seed, "steps": steps, "eval_loss": w.eval_loss(w.model),
            "cosines": cos}


def gate_open_share(series: list[tuple[int, float]], *, start: int, window: int,
                    sigmas: float) -> float | None:
    """Share of the steps from ``start`` on where the gate over the preceding cosines is open."""
    vals = [c for _, c in series]
    opened = total = 0
    for i, (step, _) in enumerate(series):
        win = vals[max(0, i - window):i]
        if step < start or len(win) < 8:
            continue
        mean = statistics.fmean(win)
        se = statistics.stdev(win) / math.sqrt(len(win))
        total += 1
        opened += mean - sigmas * se > 0
    return opened / total if total else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="digits,transformer")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=100, help="PhaseOptimizer's warmup_steps")
    ap.add_argument("--window", type=int, default=64, help="the gate's window (gate_window)")
    ap.add_argument("--sigmas", type=float, default=2.0, help="the gate's margin (gate_sigmas)")
    ap.add_argument("--out", type=Path,
                    default=_ROOT / "benchmarks" / "results" / "phase-probe.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    print(f"| workload | seed | predictor | mean cosine, steps {args.warmup}+ | sd | gate open "
          f"(window {args.window}, {args.sigmas:g} se) |")
    print("|---|---:|---|---:|---:|---:|")
    for name in convergence._csv(args.workloads):
        for seed in (int(s) for s in convergence._csv(args.seeds)):
            run = probe(name, seed, args.steps)
            run["gate_open_share"] = {}
            for k, series in run["cosines"].items():
                after = [c for s, c in series if s >= args.warmup]
                share = gate_open_share(series, start=args.warmup, window=args.window,
                                        sigmas=args.sigmas)
                run["gate_open_share"][k] = share
                print(f"| {name} | {seed} | {k} | {statistics.fmean(after):+.3f} | "
                      f"{statistics.stdev(after):.3f} | "
                      f"{'-' if share is None else f'{100 * share:.0f}%'} |", flush=True)
            runs.append(run)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "phase_probe", "machine": convergence._machine(),
        "command": " ".join(["python", "benchmarks/phase_probe.py", *(argv or sys.argv[1:])]),
        "settings": vars(args) | {"out": str(args.out), "predictors": PREDICTORS},
        "runs": runs}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

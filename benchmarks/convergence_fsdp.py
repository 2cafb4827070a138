"""Convergence under FSDP: eval loss vs gradient bytes for FSDP1 and FSDP2, side by side with DDP.

The FSDP rows of the convergence benchmark (benchmarks/convergence.py, whose tasks, process
management, summaries and tables this script reuses). The transformer workload trains on 2 gloo
ranks (CPU, one thread each) with AdamW and the same schedule, batches and seeds, under:

==========================  =========================================================================
row                         what reduces the gradients
==========================  =========================================================================
none                        DDP's fp32 all-reduce (the baseline every gap is measured against)
fsdp1-none                  FSDP1 (``FullyShardedDataParallel``, FULL_SHARD, one unit a block), fp32
fsdp1-vsa-ternary           FSDP1 with ``tritter_comm.register`` (``vsa_fsdp_hook``)
fsdp2-none                  FSDP2 (``fully_shard`` on each block and the model), fp32
fsdp2-vsa-ternary           FSDP2 with ``tritter_comm.register`` (the compressed reduce-scatter)
==========================  =========================================================================

``fsdpN-vsa-int2`` / ``-vsa-sign`` and hook options (``fsdp1-vsa-ternary:start_iter=50``) work as in
convergence.py. Bytes are gradient bytes per step per rank: for FSDP rows, what the reduce-scatter
sends (fp32: ``(N-1)/N`` of the gradient, half of DDP's all-reduce; compressed: measured by the
hook's ``stats()`` over the second half of training), against which "vs fp32" is taken. FSDP's
parameter all-gathers are the same in every FSDP row and not counted. The eval loss is computed on
rank 0 from the gathered full model; "replicas" compares the gathered model across ranks.

Usage::

    python benchmarks/convergence_fsdp.py                 # 3 seeds x 300 steps
    python benchmarks/convergence_fsdp.py --quick         # smoke test
    python benchmarks/convergence_fsdp.py --modes none,fsdp2-none,fsdp2-vsa-int2 --seeds 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks` (and tritter_comm) importable
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks import comm, convergence, workloads  # noqa: E402

APIS = ("fsdp1", "fsdp2")
DEFAULT_MODES = ("none", "fsdp1-none", "fsdp1-vsa-ternary", "fsdp2-none", "fsdp2-vsa-ternary")
WORKLOAD = "transformer"
DEFAULT_OUT = _ROOT / "benchmarks" / "results" / "convergence-fsdp.json"
QUICK_OUT = DEFAULT_OUT.with_name("convergence-fsdp-quick.json")


def parse_mode(spec: str) -> tuple[str | None, str, dict[str, Any]]:
    """``"fsdp1-vsa-int2:block_size=256"`` -> ("fsdp1", "vsa-int2", options); DDP rows give
    api None (``"none"``, ``"vsa-ternary"``, ... as convergence.py takes them)."""
    api, sep, rest = spec.partition("-")
    if api not in APIS or not sep:
        return (None, *convergence.parse_mode(spec))
    mode, options = convergence.parse_mode(rest)
    if mode != "none" and mode not in comm.VSA_MODES:
        raise ValueError(f"{spec!r}: FSDP rows take none or {', '.join(comm.VSA_MODES)}")
    return api, mode, options


# ------------------------------------------------------------------------------------ one rank


def _wrap(api: str, model: torch.nn.Module, world: int) -> torch.nn.Module:
    blocks = list(model.blocks)
    if api == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(model, device_id=torch.device("cpu"),
                    auto_wrap_policy=ModuleWrapPolicy({type(blocks[0])}))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_state(api: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered (a collective: every rank calls it)."""
    if api == "fsdp1":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def _train_one(rank: int, task: convergence.Task, seed: int, q: Any) -> dict[str, Any]:
    api, mode = task.mode.split("-", 1)
    torch.manual_seed(seed)
    w = workloads.build(task.workload, seed=seed, size=task.size)
    eval_model = workloads.build(task.workload, seed=seed, size=task.size).model
    numel = sum(p.numel() for p in w.model.parameters() if p.requires_grad)
    model = _wrap(api, w.model, task.world)
    state = None
    if mode != "none":
        import tritter_comm

        options = {"seed": seed, **task.hook_options}
        state = tritter_comm.register(model, tritter_comm.VSAConfig(**comm.vsa_options(mode,
                                                                                       **options)))
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr, weight_decay=task.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, convergence._lr_lambda(task))
    eval_at = {round(task.steps * (i + 1) / task.eval_points) for i in range(task.eval_points)}
    half = task.steps // 2
    curve: list[tuple[int, float]] = []
    train_losses: list[float] = []
    snapshot = None
    train_s = 0.0
    full: dict[str, torch.Tensor] = {}

    def evaluate() -> float | None:
        nonlocal full
        full = _full_state(api, model)  # every rank takes part in the gather
        if rank != 0:
            return None
        eval_model.load_state_dict(full)
        return w.eval_loss(eval_model)

    dist.barrier()
    for step in range(task.steps):
        t0 = time.perf_counter()
        loss = w.loss(model, w.batch(rank, task.world, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        train_losses.append(loss.item())
        if step + 1 == half and state is not None:
            snapshot = dict(state.stats())
        if step + 1 in eval_at:
            ev = evaluate()
            if rank == 0:
                curve.append((step + 1, ev))
        if (step + 1) % 50 == 0:
            q.put(("beat", rank))
    if task.steps not in eval_at:  # decided alike on every rank: the gather is a collective
        ev = evaluate()
        if rank == 0:
            curve.append((task.steps, ev))
    dist.barrier()
    out: dict[str, Any] = {"seed": seed, "rank": rank, "train_s": train_s,
                           "param_sha256": _digest(full), "fsdp_api": api}
    if rank == 0:
        fp32 = (task.world - 1) / task.world * numel * 4  # an fp32 reduce-scatter
        if state is None:
            per_step = run_mean = fp32
        else:
            st = state.stats()
            per_step = ((st["bytes_sent"] - snapshot["bytes_sent"])
                        / (st["steps"] - snapshot["steps"]))
            run_mean = st["bytes_sent"] / st["steps"]
        out.update(
            eval_loss=curve[-1][1],
            eval_curve=curve,
            train_loss_last10=sum(train_losses[-10:]) / len(train_losses[-10:]),
            fp32_bytes_per_step=fp32,
            bytes_per_step=per_step,
            bytes_per_step_run_mean=run_mean,
            workload_info=w.info,
        )
        if state is not None:
            out["hook_stats"] = {k: v for k, v in state.stats().items()
                                 if isinstance(v, (int, float, str, bool))}
    return out


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help="comma-separated rows: DDP modes of convergence.py, or "
                         "fsdp1-/fsdp2- followed by none or vsa-ternary|int2|sign[:opt=value]")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated ints")
    ap.add_argument("--steps", type=int, default=convergence.DEFAULT_STEPS[WORKLOAD])
    ap.add_argument("--quick", action="store_true", help="smoke test: 30 steps, seed 0")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--size", default="small", choices=workloads.SIZES)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON path (default {DEFAULT_OUT.relative_to(_ROOT)})")
    ap.add_argument("--collective-timeout", type=float, default=120.0)
    ap.add_argument("--stall-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    seeds = tuple(int(s) for s in convergence._csv(args.seeds))
    steps = args.steps
    if args.quick:
        steps, seeds = convergence.QUICK_STEPS[WORKLOAD], seeds[:1]
    specs = {}
    for m in convergence._csv(args.modes):
        try:
            specs[m] = parse_mode(m)
        except ValueError as e:
            ap.error(str(e))

    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)

    vsa_ok, vsa_why = comm.vsa_available()
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for spec, (api, mode, options) in specs.items():
        if mode in comm.VSA_MODES and not vsa_ok:
            rows.append({"workload": WORKLOAD, "mode": spec,
                         "skipped": f"tritter_comm.hooks unavailable ({vsa_why})"})
            continue
        task = convergence.Task(workload=WORKLOAD, mode=mode if api is None else f"{api}-{mode}",
                                hook_options=options, label=spec, seeds=seeds, steps=steps,
                                world=args.world, size=args.size,
                                collective_timeout_s=args.collective_timeout)
        t0 = time.perf_counter()
        row = convergence.run_task(task, stall_timeout_s=args.stall_timeout,
                                   train_one=_train_one if api else None)
        row["row_wall_s"] = time.perf_counter() - t0
        row["fsdp_api"] = api
        if "error" in row:
            print(f"[{WORKLOAD}] {spec}: FAILED after {row['row_wall_s']:.0f} s\n{row['error']}",
                  flush=True)
        else:
            print(f"[{WORKLOAD}] {spec}: eval {row['eval_loss_mean']:.4f}, "
                  f"bytes {row['ratio_vs_fp32']:.1f}x below fp32, {row['row_wall_s']:.0f} s",
                  flush=True)
        rows.append(row)
    total_s = time.perf_counter() - t_start
    print("\n" + convergence.format_table(WORKLOAD, rows))
    print("\nbytes: gradient bytes per step per rank; vs fp32: DDP rows against an fp32 "
          "all-reduce, FSDP rows against an fp32 reduce-scatter (parameter all-gathers not "
          "counted)\n")

    report = {
        "benchmark": "convergence-fsdp",
        "machine": convergence._machine(),
        "settings": {
            "workload": WORKLOAD,
            "modes": list(specs),
            "seeds": list(seeds),
            "steps": steps,
            "world": args.world,
            "size": args.size,
            "backend": "gloo",
            "threads_per_rank": 1,
            "optimizer": "AdamW",
            "fsdp1": "FullyShardedDataParallel, FULL_SHARD, ModuleWrapPolicy(transformer block)",
            "fsdp2": "fully_shard on each transformer block and on the model, CPU device mesh",
            "task_defaults": {k: v for k, v in asdict(replace(
                convergence.Task("", "", (), 0), world=args.world, size=args.size)).items()
                if k not in ("workload", "mode", "seeds", "steps")},
            "quick": args.quick,
        },
        "total_wall_s": total_s,
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"total {total_s:.0f} s; wrote {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

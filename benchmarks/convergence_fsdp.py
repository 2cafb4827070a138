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

Issue 19 (the memory of error feedback): rows take hook options, e.g.
``fsdp1-vsa-ternary:residual_dtype=float32`` (the FSDP rows' default, "auto", is int4 up to 7
ranks, int2 up to 12, then int2-topk), ``:residual_dtype=int2-topk:residual_budget=0.125`` or
``:error_feedback=False``; every table shows the hook
state's memory a rank (``stats()["state_bytes"]``) against the rank's fp32 gradient shard and the
model's own memory a rank, the gap against the same API's fp32-residual row, and a projection for
a 7B model (arithmetic). ``--workloads transformer,digits`` (digits: one FSDP unit, the MLP);
``--baseline fsdp1-none`` measures gaps against uncompressed FSDP. On a loaded machine
``--one-spawn`` runs every row in one set of ranks and appends each finished row to
``<out>.<workload>.partial.jsonl``; ``--from-partial`` tabulates what a run has written so far.

Usage::

    python benchmarks/convergence_fsdp.py                 # 3 seeds x 300 steps
    python benchmarks/convergence_fsdp.py --quick         # smoke test
    python benchmarks/convergence_fsdp.py --modes none,fsdp2-none,fsdp2-vsa-int2 --seeds 0
    python benchmarks/convergence_fsdp.py --one-spawn --workloads digits --baseline fsdp1-none \
        --modes fsdp1-none,fsdp1-vsa-ternary,fsdp1-vsa-ternary:residual_dtype=float32
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
from tritter_comm.residual import (BLOCK, TOPK, TOPK_BLOCK_BYTES, TopkResidual,  # noqa: E402
                                   bytes_per_element)

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


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units below the root: the transformer's blocks; none for the digits MLP (one
    unit, the whole model: its layers alone are below ``min_compress_numel``)."""
    return list(getattr(model, "blocks", []))


def _wrap(api: str, model: torch.nn.Module, world: int) -> torch.nn.Module:
    blocks = _units(model)
    if api == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({type(blocks[0])}) if blocks else None
        return FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=policy)
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
                           "param_sha256": _digest(full), "fsdp_api": api,
                           "numel": numel,  # workload_info counts FSDP1's shard
                           # how this state stored its residuals ("auto" resolved)
                           "residual_format": (state.residual_format(
                               fsdp=api is not None, world=task.world if api else None)
                               if state is not None else None)}
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
    # every rank: its hook memory (residuals, however stored) and its share of the model's own
    out["state_bytes"] = 0 if state is None else state.stats()["state_bytes"]
    out["model_bytes"] = _model_bytes(model, opt)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _model_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state (its shards under FSDP;
    FSDP1's padding included)."""
    def nb(t):
        t = _local(t)
        return t.numel() * t.element_size()
    params = [p for p in model.parameters() if p.requires_grad]
    return {"params": sum(nb(p) for p in params),
            "grads": sum(nb(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(nb(v) for st in opt.state.values() for v in st.values()
                             if isinstance(v, torch.Tensor) and v.dim() > 0)}


def _train_rows(rank: int, task: convergence.Task, seed: int, q: Any) -> dict[str, Any]:
    """Every row of ``task.hook_options["rows"]`` in turn, in the same ranks (``--one-spawn``:
    on a loaded machine spawning and importing cost more than these trainings). After each row
    rank 0 appends every rank's result to ``task.hook_options["partial"]`` (JSON lines)."""
    out = {}
    for spec, api, mode, options in task.hook_options["rows"]:
        sub = replace(task, mode=mode if api is None else f"{api}-{mode}", hook_options=options,
                      label=spec)
        fn = _train_one if api else convergence._train_one
        r = fn(rank, sub, seed, q)
        q.put(("beat", rank))
        gathered: list[Any] = [None] * task.world
        dist.all_gather_object(gathered, r)
        if rank == 0:
            with open(task.hook_options["partial"], "a") as f:
                f.write(json.dumps({"spec": spec, "api": api, "seed": seed,
                                    "ranks": gathered}) + "\n")
        out[spec] = r
    return {"seed": seed, "rows": out}


def _one_spawn(specs: dict, workload: str, seeds: tuple, steps: int, args: Any) -> list[dict]:
    partial = Path(f"{args.out or DEFAULT_OUT}.{workload}.partial.jsonl")
    if not args.from_partial:
        partial.unlink(missing_ok=True)
    rows_arg = [(spec, api, mode, options) for spec, (api, mode, options) in specs.items()]
    task = convergence.Task(workload=workload, mode="rows", label="rows", seeds=seeds,
                            steps=steps, world=args.world, size=args.size,
                            collective_timeout_s=args.collective_timeout,
                            eval_points=args.eval_points,
                            hook_options={"rows": rows_arg, "partial": str(partial)})
    t0 = time.perf_counter()
    error = None
    if not args.from_partial:  # else: the rows a run (killed, or still going) has written
        _, error = convergence.run_ranks(task, _train_rows, stall_timeout_s=args.stall_timeout)
    if error:
        print(f"[{workload}] one-spawn run: {error}", flush=True)
    per_row: dict[str, dict[int, dict[int, Any]]] = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            d = json.loads(line)
            per_row.setdefault(d["spec"], {})[d["seed"]] = dict(enumerate(d["ranks"]))
    rows = []
    for spec, api, mode, options in rows_arg:
        done = per_row.get(spec, {})
        if set(done) != set(seeds):
            rows.append({"workload": workload, "mode": spec,
                         "error": f"not finished ({error or 'no result'})"})
            continue
        sub = replace(task, mode=mode if api is None else f"{api}-{mode}", hook_options=options,
                      label=spec)
        row = convergence._summarize(sub, done)
        for s in row["seeds"]:  # JSON made the eval curves lists of lists
            s["eval_curve"] = [tuple(p) for p in s.get("eval_curve", [])]
        row["fsdp_api"] = api
        row["row_wall_s"] = sum(done[s][0]["train_s"] for s in seeds)
        rows.append(row)
    print(f"[{workload}] one spawn: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


# ------------------------------------------------------------------------------------- reporting

#: The projection's model: 7B parameters, fp32 gradients.
PROJ_PARAMS = 7e9
#: Residual bytes an element of each stored form (tritter_comm/residual.py: one f32 scale per
#: 64 elements for int8/int4/int2); "no EF": error_feedback=False.
RESIDUAL_BYTES = {"float32": 4.0, "bfloat16": 2.0,
                  **{f: bytes_per_element(f) for f in ("int8", "int4", "int2")}, "no EF": 0.0}


def _residual_form(row: dict[str, Any]) -> str:
    opts = row.get("hook_options", {})
    if row.get("comm", "").endswith("none") or row["mode"] == "none":
        return "-"
    if not opts.get("error_feedback", True):
        return "no EF"
    seeds = row.get("seeds") or [{}]
    if seeds[0].get("residual_format"):  # recorded from the hook state
        return str(seeds[0]["residual_format"])
    # rows measured before it was recorded, when the default was float32 everywhere
    return str(opts.get("residual_dtype", "float32"))


def _memory(row: dict[str, Any], world: int) -> tuple[float, float, float]:
    """(hook bytes a rank, its fraction of the rank's fp32 gradient shard, the model's own
    bytes a rank: parameters + gradients + optimizer state)."""
    s0 = row["seeds"][0]
    n = s0.get("numel", row["workload_info"]["params"])
    hook = s0.get("state_bytes", s0.get("hook_stats", {}).get("state_bytes", 0))
    shard = 4 * n / (world if row.get("fsdp_api") else 1)  # DDP: the whole fp32 gradient
    # fp32 parameters, gradients and AdamW's two moments: 16 bytes a parameter, 1/N of them a
    # rank under FSDP (what _model_bytes measured is in the JSON, "model_bytes")
    model_b = 16 * n / (world if row.get("fsdp_api") else 1)
    return hook, hook / shard, model_b


def _vs_fp32_residual(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Gap minus the gap of the same API and mode with float32 residuals, in points."""
    form = _residual_form(r)
    if form in ("-", "float32") or "gap_pct" not in r:
        return ""
    refs = [x for x in rows if x.get("fsdp_api") == r.get("fsdp_api")
            and _residual_form(x) == "float32" and "gap_pct" in x]
    refs.sort(key=lambda x: x.get("comm") != r.get("comm"))  # the same mode first
    ref = refs[0] if refs else None
    if ref is None:
        return ""
    # same bytes on the wire?
    same = abs(ref["bytes_per_step"] - r["bytes_per_step"]) < 1
    return f"{r['gap_pct'] - ref['gap_pct']:+.2f} pt" + ("" if same else " (other bytes)")


def format_table(workload: str, rows: list[dict[str, Any]], world: int, baseline: str) -> str:
    ok = [r for r in rows if "seeds" in r]
    lines = []
    base = next((r for r in ok if r["mode"] == baseline), None)
    if ok:
        n = ok[0]["seeds"][0].get("numel", ok[0]["workload_info"]["params"])
        lines += [f"### {workload}: {n:,} params, {world} ranks, {ok[0]['steps']} "
                  f"steps, {len(ok[0]['seeds'])} seed(s); gap vs {baseline}", ""]
    header = ("row", "residual", "bytes/step/rank", "vs fp32", "eval loss", "gap (seeds)",
              "vs fp32 residual", "hook mem/rank", "x fp32 grad shard", "model mem/rank",
              "replicas")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 3) + [":---:"]) + "|")
    gaps = {}
    for r in ok:  # every gap first: a row is compared with another's
        gap = "n/a"
        if base is not None:
            bl = {s["seed"]: s["eval_loss"] for s in base["seeds"]}
            per = [100 * (s["eval_loss"] - bl[s["seed"]]) / bl[s["seed"]]
                   for s in r["seeds"] if s["seed"] in bl]
            r["gap_pct"] = 100 * (r["eval_loss_mean"] - base["eval_loss_mean"]) / base[
                "eval_loss_mean"]
            gap = f"{r['gap_pct']:+.2f}%"
            if len(per) > 1:
                gap += f" ({min(per):+.1f}..{max(per):+.1f})"
        gaps[id(r)] = gap
    for r in ok:
        gap = gaps[id(r)]
        hook, frac, model_b = _memory(r, world)
        r["hook_bytes_per_rank"], r["hook_fraction_of_shard"] = hook, frac
        r["model_bytes_per_rank"] = model_b
        lines.append("| " + " | ".join((
            r["mode"], _residual_form(r), convergence._fmt_bytes(r["bytes_per_step"]),
            f"{r['ratio_vs_fp32']:.1f}x",
            f"{r['eval_loss_mean']:.4f}" + (f" ± {r['eval_loss_std']:.4f}"
                                            if len(r["seeds"]) > 1 else ""),
            gap, _vs_fp32_residual(r, ok), convergence._fmt_bytes(hook), f"{frac:.2f}x",
            convergence._fmt_bytes(model_b),
            "identical" if r["replicas_identical"] else "DIFFER")) + " |")
    lines.extend(convergence.failure_lines(rows))
    return "\n".join(lines)


def projection() -> str:
    """FSDP client residual memory a rank for a 7B model: arithmetic, not a measurement."""
    from tritter_comm import VSAState
    from tritter_comm.hooks.state import INT2_FSDP_MAX_WORLD, INT4_FSDP_MAX_WORLD

    lines = ["### projection (arithmetic, not measured): FSDP, 7B parameters, fp32 gradients", "",
             "| residual | bytes a rank | 8 ranks: x shard | 64 ranks: x shard | "
             "model's own a rank, 8 / 64 ranks (fp32 params+grads+AdamW) |",
             "|---|---:|---:|---:|---:|"]
    model = f"{16 * PROJ_PARAMS / 8 / 1e9:.1f} / {16 * PROJ_PARAMS / 64 / 1e9:.2f} GB"
    for form, b in RESIDUAL_BYTES.items():
        total = PROJ_PARAMS * b
        lines.append(f"| {form} | {total / 1e9:.2f} GB | {total / (4 * PROJ_PARAMS / 8):.2f}x | "
                     f"{total / (4 * PROJ_PARAMS / 64):.2f}x | {model} |")
    # the default: the widest form that fits in the shard at each rank count; int2-topk keeps
    # the blocks of most energy that fit (TopkResidual.blocks_within), 24 bytes a block
    auto = VSAState()
    forms = {w: auto.residual_format(fsdp=True, world=w) for w in (8, 64)}
    per, kept = {}, {}
    for w, f in forms.items():
        if f == TOPK:
            seg = PROJ_PARAMS / w
            k = min(TopkResidual.blocks_within(PROJ_PARAMS, seg, 4 * seg), seg / BLOCK)
            per[w], kept[w] = w * k * TOPK_BLOCK_BYTES / PROJ_PARAMS, k / (seg / BLOCK)
        else:
            per[w] = RESIDUAL_BYTES[f]
    cells = [f"{per[w] / (4 / w):.2f}x ({forms[w]}"
             + (f", {kept[w]:.0%} of the blocks)" if w in kept else ")") for w in forms]
    lines.append(f"| auto (the default: int4 up to {INT4_FSDP_MAX_WORLD} ranks, int2 up to "
                 f"{INT2_FSDP_MAX_WORLD}, then int2-topk within the shard) | "
                 f"{PROJ_PARAMS * per[8] / 1e9:.2f} GB at 8 ranks, "
                 f"{PROJ_PARAMS * per[64] / 1e9:.2f} GB at 64 | {cells[0]} | {cells[1]} | "
                 f"{model} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help="comma-separated rows: DDP modes of convergence.py, or "
                         "fsdp1-/fsdp2- followed by none or vsa-ternary|int2|sign[:opt=value]")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated ints")
    ap.add_argument("--workloads", default=WORKLOAD, help="comma-separated: transformer, digits")
    ap.add_argument("--baseline", default="none",
                    help="the row every gap is measured against (e.g. fsdp1-none)")
    ap.add_argument("--steps", type=int, default=convergence.DEFAULT_STEPS[WORKLOAD])
    ap.add_argument("--quick", action="store_true", help="smoke test: 30 steps, seed 0")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--size", default="small", choices=workloads.SIZES)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON path (default {DEFAULT_OUT.relative_to(_ROOT)})")
    ap.add_argument("--collective-timeout", type=float, default=120.0)
    ap.add_argument("--one-spawn", action="store_true",
                    help="run every row in one set of ranks (a loaded machine)")
    ap.add_argument("--eval-points", type=int, default=10)
    ap.add_argument("--from-partial", action="store_true",
                    help="with --one-spawn: train nothing, tabulate the rows that the run with "
                         "the same --out has written so far")
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
    tables = []
    t_start = time.perf_counter()
    for workload in convergence._csv(args.workloads):
        wrows = []
        if args.one_spawn:
            wrows = _one_spawn(specs, workload, seeds, steps, args)
            tables.append(format_table(workload, wrows, args.world, args.baseline))
            rows += wrows
            continue
        for spec, (api, mode, options) in specs.items():
            if mode in comm.VSA_MODES and not vsa_ok:
                wrows.append({"workload": workload, "mode": spec,
                              "skipped": f"tritter_comm.hooks unavailable ({vsa_why})"})
                continue
            task = convergence.Task(workload=workload,
                                    mode=mode if api is None else f"{api}-{mode}",
                                    hook_options=options, label=spec, seeds=seeds, steps=steps,
                                    world=args.world, size=args.size,
                                    collective_timeout_s=args.collective_timeout)
            t0 = time.perf_counter()
            row = convergence.run_task(task, stall_timeout_s=args.stall_timeout,
                                       train_one=_train_one if api else None)
            row["row_wall_s"] = time.perf_counter() - t0
            row["fsdp_api"] = api
            if "error" in row:
                print(f"[{workload}] {spec}: FAILED after {row['row_wall_s']:.0f} s\n"
                      f"{row['error']}", flush=True)
            else:
                print(f"[{workload}] {spec}: eval {row['eval_loss_mean']:.4f}, "
                      f"bytes {row['ratio_vs_fp32']:.1f}x below fp32, "
                      f"hook {_memory(row, args.world)[0]:.0f} B, "
                      f"{row['row_wall_s']:.0f} s", flush=True)
            wrows.append(row)
        tables.append(format_table(workload, wrows, args.world, args.baseline))
        rows += wrows
    total_s = time.perf_counter() - t_start
    print("\n" + "\n\n".join(tables))
    print("\nbytes: gradient bytes per step per rank; vs fp32: DDP rows against an fp32 "
          "all-reduce, FSDP rows against an fp32 reduce-scatter (parameter all-gathers not "
          "counted). hook mem: stats()['state_bytes'] on rank 0 at the end (every residual "
          "byte); x fp32 grad shard: that over 4 bytes x params / ranks (DDP rows: over the "
          "whole fp32 gradient); model mem: this rank's parameters + gradients + AdamW state "
          "(16 bytes a parameter, over the ranks for FSDP rows)\n")
    print(projection() + "\n")

    report = {
        "benchmark": "convergence-fsdp",
        "machine": convergence._machine(),
        "settings": {
            "workloads": convergence._csv(args.workloads),
            "baseline": args.baseline,
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

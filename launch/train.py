"""A real data-parallel training script with a choice of gradient exchange.

A byte-level transformer learns Python's own standard-library sources (nothing is downloaded),
data-parallel over every rank torchrun starts, with the gradient exchange chosen by a flag:

    torchrun --standalone --nproc-per-node 2 launch/train.py --comm vsa --mode int2
    torchrun ... launch/train.py --comm none | fp16 | powersgd
    torchrun ... launch/train.py --comm vsa --comm-config launch/tritter_comm.yaml
    torchrun ... launch/train.py --checkpoint-dir ckpt --checkpoint-every 100   # then --resume
    torchrun ... launch/train.py --phase     # predicted steps skip the backward pass (DDP)
    torchrun ... launch/train.py --diloco 30 # DiLoCo: H local steps, then a compressed sync
    bash launch/torchrun.sh ...     # the same, with one- and multi-node launch arguments

CPU ranks use gloo, GPU ranks NCCL (--device). Checkpoints hold the model and optimizer
(torch.distributed.checkpoint, so DDP and FSDP checkpoints are saved and loaded the same way),
the step and scheduler, and one file per rank with that rank's hook state: the VSA hook's
error-feedback residuals (and PowerSGD's) differ from rank to rank, and a resumed job continues
exactly as the uninterrupted one would.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

import tritter_comm
from tritter_comm._demo import CharTransformer, TextData, lr_lambda  # the model and the data
from tritter_comm.config import VSAConfig

SIZES = {  # model shape, per-rank batch, learning rate
    "small": dict(model=dict(d_model=128, n_layers=2, n_heads=4, context=64), batch=16, lr=2e-3),
    "large": dict(model=dict(d_model=768, n_layers=6, n_heads=12, context=128), batch=4,
                  lr=3e-4),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("gradient exchange")
    g.add_argument("--comm", choices=("none", "fp16", "powersgd", "vsa"), default="vsa",
                   help="none: DDP's fp32 all-reduce; fp16 and powersgd: PyTorch's hooks; "
                   "vsa: tritter-comm")
    g.add_argument("--mode", choices=tuple(tritter_comm.MODES), default=None,
                   help="vsa: quantization (default: the config file's, else int2)")
    g.add_argument("--start-iter", type=int, default=None,
                   help="vsa/powersgd: steps of plain all-reduce first (default: vsa 100, "
                   "powersgd 2)")
    g.add_argument("--comm-config", default=os.environ.get("TRITTER_COMM_CONFIG"),
                   help="vsa: a tritter_comm config file (YAML/JSON/TOML); --mode and "
                   "--start-iter override it (default: $TRITTER_COMM_CONFIG)")
    g.add_argument("--powersgd-rank", type=int, default=4, help="powersgd: matrix rank")
    g.add_argument("--fsdp", choices=("none", "fsdp1", "fsdp2"), default="none",
                   help="shard the model with FSDP1 (FullyShardedDataParallel) or FSDP2 "
                   "(fully_shard) instead of DDP")
    g.add_argument("--phase", action="store_true",
                   help="phase-based training (tritter_comm.optim.PhaseOptimizer): after a "
                   "warm-up, predicted steps skip the backward pass and the exchange (DDP only)")
    g.add_argument("--phase-warmup", type=int, default=None,
                   help="--phase: real steps before the first prediction (default: "
                   "PhaseOptimizer's, 100)")
    g.add_argument("--phase-gate-window", type=int, default=None, metavar="N",
                   help="--phase: real steps whose measured prediction quality decides whether "
                   "to predict at all (default: PhaseOptimizer's, 64; 0: predict without the "
                   "gate)")
    g.add_argument("--diloco", type=int, default=None, metavar="H",
                   help="DiLoCo (tritter_comm.optim.DiLoCo): no DDP; each rank takes H AdamW "
                   "steps on its own data, then the replicas are averaged (--comm vsa: with the "
                   "compressed exchange; --comm none: fp32 all-reduce) and an outer step runs")
    g.add_argument("--diloco-fragments", type=int, default=1, metavar="F",
                   help="--diloco: streaming, one of F parameter fragments syncs every H/F steps")
    g.add_argument("--outer-lr", type=float, default=None,
                   help="--diloco: outer learning rate (default: DiLoCo's, 1.0)")
    g.add_argument("--outer-momentum", type=float, default=None,
                   help="--diloco: outer Nesterov momentum (default: DiLoCo's, 0)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--size", choices=tuple(SIZES), default="small",
                   help="small: 0.47M parameters; large: 43M (the exchange dominates)")
    g.add_argument("--lr", type=float, default=None, help="peak AdamW lr (default: per size)")
    g.add_argument("--batch-size", type=int, default=None, help="per rank (default: per size)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--log-every", type=int, default=25)
    g.add_argument("--eval-every", type=int, default=100, help="0: only at the end")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint-dir", default=None, help="where step_N/ checkpoints go")
    g.add_argument("--checkpoint-every", type=int, default=0, help="0: only at the end")
    g.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: the latest checkpoint in --checkpoint-dir; or a step_N folder")
    g.add_argument("--summary-json", default=None, help="rank 0 writes the final numbers here")
    g.add_argument("--fail-at-step", type=int, default=None, metavar="N",
                   help="testing the recovery: on the first attempt (TORCHELASTIC_RESTART_COUNT "
                        "0 or unset) the last rank SIGKILLs itself after the backward pass of "
                        "step N, mid-exchange for the others")
    args = p.parse_args(argv)
    if args.phase and args.fsdp != "none":
        p.error("--phase works with DDP (--fsdp none): predictions of sharded gradients are "
                "not tested")
    if args.phase_warmup is not None and not args.phase:
        p.error("--phase-warmup applies to --phase")
    if args.phase_gate_window is not None and not args.phase:
        p.error("--phase-gate-window applies to --phase")
    if args.comm in ("fp16", "powersgd") and args.fsdp != "none":
        p.error(f"--comm {args.comm} is a DDP hook; with --fsdp use --comm none or vsa")
    if args.mode and args.comm != "vsa":
        p.error("--mode applies to --comm vsa")
    if args.resume == "auto" and not args.checkpoint_dir:
        p.error("--resume auto needs --checkpoint-dir")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.diloco is None:
        for flag in ("diloco_fragments", "outer_lr", "outer_momentum"):
            if getattr(args, flag) != p.get_default(flag):
                p.error(f"--{flag.replace('_', '-')} applies to --diloco")
    else:
        if args.diloco < 1:
            p.error("--diloco H needs H >= 1")
        if args.fsdp != "none" or args.phase:
            p.error("--diloco trains a plain module (no DDP, FSDP or --phase): drop --fsdp and "
                    "--phase")
        if args.comm not in ("none", "vsa"):
            p.error("--diloco averages with --comm vsa (compressed) or none (fp32)")
    return args


# ------------------------------------------------------------------------------- process group


def first_attempt() -> bool:
    """Whether this is the job's first attempt (torchrun counts restarts in the environment)."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def init_distributed(device_arg: str) -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up (or a one-process group when run directly)."""
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a group of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    timeout = _dt.timedelta(minutes=5)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                            **attempt_store(timeout))
    return dist.get_rank(), dist.get_world_size(), device


def attempt_store(timeout: _dt.timedelta) -> dict:
    """Under torchrun, the store of this attempt. The agent's store outlives a restart, and the
    process group's keys are the same in every attempt: a restarted rank could read the address a
    killed rank of the previous attempt published, and gloo then fails to connect ("Connection
    refused"), as happened in tests/test_launch.py. A prefix per attempt keeps them apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dict(store=dist.PrefixStore(f"tritter_comm/attempt_{attempt}", store),
                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


# ------------------------------------------------------------------------------------ wrapping


def comm_config(args) -> VSAConfig:
    config = (VSAConfig.from_file(args.comm_config) if args.comm_config else None) or VSAConfig()
    over = {k: v for k, v in (("mode", args.mode), ("start_iter", args.start_iter))
            if v is not None}
    return config.replace(**over)


def wrap(model, args, device):
    """The model wrapped for data parallelism, with the chosen exchange; (model, hook state)."""
    state = None
    if args.diloco is not None:  # no wrapper: DiLoCo (make_diloco) averages every H steps
        return model, None
    if args.fsdp == "none":
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.comm == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif args.comm == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

            # PyTorch's PowerSGD hook launches collectives from future callbacks and can hang
            # on gloo with several buckets: one bucket on CPU (see benchmarks/comm.py).
            if device.type == "cpu":
                model = DDP(model.module, bucket_cap_mb=1024)
            state = psgd.PowerSGDState(None, matrix_approximation_rank=args.powersgd_rank,
                                       start_powerSGD_iter=args.start_iter or 2,
                                       random_seed=args.seed)
            model.register_comm_hook(state, psgd.powerSGD_hook)
    elif args.fsdp == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({type(model.blocks[0])}),
                     device_id=device, use_orig_params=True)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
    if args.comm == "vsa":
        state = tritter_comm.register(model, comm_config(args))  # the hook for the wrapper
    return model, state


def make_diloco(model, opt, args):
    from tritter_comm.optim import DiLoCo

    kw = {k: v for k, v in (("outer_lr", args.outer_lr), ("outer_momentum", args.outer_momentum))
          if v is not None}
    return DiLoCo(model, opt, sync_every=args.diloco, fragments=args.diloco_fragments,
                  config=comm_config(args) if args.comm == "vsa" else None, **kw)


# --------------------------------------------------------------------------------- checkpoints


def hook_state_dict(state):
    if state is None:
        return None
    if isinstance(state, tritter_comm.VSAState):
        return state.state_dict()
    return state.__getstate__()  # PowerSGDState: its error feedback, minus the process group


def load_hook_state(state, saved) -> None:
    if state is None or saved is None:
        return
    if isinstance(state, tritter_comm.VSAState):
        state.load_state_dict(saved)
    else:
        group = state.process_group
        state.__setstate__(saved)
        state.process_group = group


def save_checkpoint(root: Path, step: int, model, opt, sched, state, rank: int,
                    phase=None, diloco=None) -> Path:
    path = root / f"step_{step}"
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / "dcp"))
    # DiLoCo: between syncs every rank's parameters and inner optimizer are its own, and the
    # replicated dcp checkpoint keeps one copy; each rank's go in its own file
    torch.save({"hook": hook_state_dict(state),
                "phase": phase.state_dict() if phase is not None else None,
                "diloco": None if diloco is None else {"model": model.state_dict(),
                                                       "opt": diloco.state_dict()}},
               path / f"comm_rank{rank}.pt")
    if rank == 0:
        torch.save({"step": step, "sched": sched.state_dict(),
                    "world_size": dist.get_world_size()}, path / "train_state.pt")
    dist.barrier()  # every rank's files are written: mark the checkpoint complete
    if rank == 0:
        (root / "latest").write_text(f"step_{step}\n")
    return path


def load_checkpoint(path: Path, model, opt, sched, state, rank: int, phase=None,
                    diloco=None) -> int:
    train_state = torch.load(path / "train_state.pt", weights_only=True)
    if train_state["world_size"] != dist.get_world_size():
        raise SystemExit(f"{path} was saved by {train_state['world_size']} ranks; this job has "
                         f"{dist.get_world_size()} (hook residuals are per rank)")
    model_sd, optim_sd = get_state_dict(model, opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    sched.load_state_dict(train_state["sched"])
    saved = torch.load(path / f"comm_rank{rank}.pt", weights_only=False)
    load_hook_state(state, saved["hook"])
    if phase is not None:
        if saved.get("phase") is None:
            raise SystemExit(f"{path} was saved without --phase")
        phase.load_state_dict(saved["phase"])
    if diloco is not None:
        if saved.get("diloco") is None:
            raise SystemExit(f"{path} was saved without --diloco")
        model.load_state_dict(saved["diloco"]["model"])
        diloco.load_state_dict(saved["diloco"]["opt"])
    return int(train_state["step"])


def resolve_resume(args) -> Path | None:
    if args.resume is None:
        return None
    if args.resume == "auto":
        marker = Path(args.checkpoint_dir) / "latest"
        return Path(args.checkpoint_dir) / marker.read_text().strip() if marker.is_file() else None
    return Path(args.resume)


# ------------------------------------------------------------------------------------- training


def eval_loss(model, data: TextData, device) -> float:
    """Mean cross-entropy on the held-out windows (every rank computes the same number)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, data.eval_inputs.shape[0], 32):
            x, y = data.eval_inputs[i:i + 32].to(device), data.eval_targets[i:i + 32].to(device)
            logits = model(x)
            total += F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1),
                                     reduction="sum").item()
            count += y.numel()
    model.train()
    return total / count


def bytes_sent(args, state, numel: int, world: int, steps: int) -> float:
    """Bytes this rank sent: measured by DiLoCo or the VSA hook, else the ring all-reduce
    formula."""
    if args.diloco is not None:
        return state.stats()["bytes_sent"]
    if isinstance(state, tritter_comm.VSAState):
        return state.stats()["bytes_sent"]
    per = 2 * (world - 1) / world * numel * 4
    return steps * per * (0.5 if args.comm == "fp16" else 1.0)


def params_digest(model) -> str:
    h = hashlib.sha256()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    for _, v in sorted(full.items()):
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = init_distributed(args.device)
    model = None
    try:
        size = SIZES[args.size]
        data = TextData(context=size["model"]["context"],
                        batch_size=args.batch_size or size["batch"], seed=args.seed)
        torch.manual_seed(args.seed)
        model = CharTransformer(**size["model"]).to(device)
        numel = sum(p.numel() for p in model.parameters())
        model, state = wrap(model, args, device)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr or size["lr"], weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps))
        phase = None
        if args.phase:
            from tritter_comm.optim import PhaseOptimizer

            kw = {} if args.phase_warmup is None else {"warmup_steps": args.phase_warmup}
            if args.phase_gate_window is not None:
                kw["gate_window"] = args.phase_gate_window
            phase = PhaseOptimizer(opt, **kw)  # steps `opt`; checkpoints keep saving `opt` too
        diloco = None
        if args.diloco is not None:
            diloco = make_diloco(model, opt, args)  # steps `opt`, syncs every H
        log = print if rank == 0 else (lambda *a, **k: None)
        what = args.comm if args.comm != "vsa" else f"vsa ({comm_config(args).describe()})"
        how = ("DDP" if args.fsdp == "none" else args.fsdp.upper()) if diloco is None else diloco
        log(f"{world} rank(s) on {device.type}, {numel:,} parameters, "
            f"{how}, exchange: {what}", flush=True)

        start = 0
        resume = resolve_resume(args)
        if resume is not None:
            start = load_checkpoint(resume, model, opt, sched, state, rank, phase, diloco)
            log(f"resumed from {resume} at step {start}", flush=True)
        ckpt_root = Path(args.checkpoint_dir) if args.checkpoint_dir else None
        if ckpt_root is not None and rank == 0:
            ckpt_root.mkdir(parents=True, exist_ok=True)

        t0, sent0 = time.perf_counter(), bytes_sent(args, diloco or state, numel, world, start)
        last_eval = None
        last_loss = float("nan")
        for step in range(start, args.steps):
            loss = None
            if phase is None or phase.needs_backward():
                # A predicted step (--phase) runs no forward, no backward and no exchange.
                x, y = (t.to(device) for t in data.batch(rank, world, step))
                loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                last_loss = loss.item()
            if step + 1 == args.fail_at_step and rank == world - 1 and first_attempt():
                print(f"rank {rank}: --fail-at-step {args.fail_at_step}: SIGKILL", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            if diloco is not None:
                diloco.step()
            elif phase is None:
                opt.step()
            else:
                phase.step(loss=last_loss if loss is not None else None)
            sched.step()
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                sent = bytes_sent(args, diloco or state, numel, world, done) - sent0
                log(f"step {done:>5}/{args.steps}  loss {last_loss:.4f}  "
                    f"lr {sched.get_last_lr()[0]:.2e}  sent {sent / 1e6:8.2f} MB/rank  "
                    f"{(time.perf_counter() - t0) / (done - start):.3f} s/step", flush=True)
            if (args.eval_every and done % args.eval_every == 0) or done == args.steps:
                last_eval = eval_loss(model, data, device)
                log(f"step {done:>5}  eval loss {last_eval:.4f}", flush=True)
            if ckpt_root is not None and (
                    (args.checkpoint_every and done % args.checkpoint_every == 0)
                    or done == args.steps):
                path = save_checkpoint(ckpt_root, done, model, opt, sched, state, rank, phase,
                                       diloco)
                log(f"step {done:>5}  checkpoint {path}", flush=True)

        digest = params_digest(model)
        hooked = isinstance(state, tritter_comm.VSAState)
        summary = {"steps": args.steps, "start": start, "world": world, "comm": args.comm,
                   "fsdp": args.fsdp, "eval_loss": last_eval, "params_sha256": digest,
                   "bytes_sent_per_rank": bytes_sent(args, diloco or state, numel, world,
                                                     args.steps) - sent0,
                   "hook_stats": state.stats() if hooked else None,
                   "diloco_stats": diloco.stats() if diloco is not None else None,
                   "phase_stats": phase.stats() if phase is not None else None}
        if rank == 0 and args.summary_json:
            Path(args.summary_json).write_text(json.dumps(summary, indent=1))
        if phase is not None:
            st = phase.stats()
            log(f"phase: {st['backward_skipped']} of {st['steps']} steps predicted (no backward "
                f"pass, no exchange)", flush=True)
        log(f"done: eval loss {last_eval:.4f}, params sha256 {digest[:16]}", flush=True)
    finally:
        # our teardown (issue 14): hook states closed, DDP's reducer released and garbage
        # collected while the interpreter is whole, then the group destroyed; in `finally`,
        # so that a step that raises ends the same way
        tritter_comm.shutdown(*[m for m in (model,) if m is not None])
    return 0


if __name__ == "__main__":
    sys.exit(main())

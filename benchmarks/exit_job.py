"""One short 2-rank job that ends and exits like a user's script (issue 14): the unit of
``benchmarks/exit_soak.py`` and ``tests/test_soak.py``.

As one rank (what :func:`launch` starts, one fresh interpreter per rank)::

    python benchmarks/exit_job.py --kind ddp --hook --teardown ours \\
        --rank 0 --world 2 --store /tmp/job/store      # or --port N: env://, as torchrun

A small model trains a few steps (``VSAState(start_iter=2, min_compress_numel=1024)``, so
compression runs), then the job tears down and the interpreter exits normally: the abort this
looks for happens in interpreter finalization. The model, the optimizer, the hook state and
the rest stay referenced from a module global until the interpreter exits, as in a script
written at top level.

Kinds (``--hook``: with tritter-comm's exchange; without: the same job on torch's own):

- ``ddp``: DDP, the VSA hook / DDP's all-reduce;
- ``fsdp1``: ``FullyShardedDataParallel``, ``register_comm_hook(state, vsa_fsdp_hook)`` / FSDP's;
- ``fsdp2``: ``fully_shard``, ``tritter_comm.fsdp.enable`` / FSDP2's reduce-scatter;
- ``sync``: local SGD, ``TernaryWeightSync.average()`` after ``mark_synced()`` / an fp32
  all-reduce average;
- ``accelerate``: ``Accelerator`` on CPU ranks, ``integrations.accelerate.attach`` / nothing.

Teardowns: ``ours`` is ``tritter_comm.shutdown(model)`` (accelerate: ``shutdown(model,
destroy_process_group=False)`` and then ``accelerator.end_training()``); ``plain`` is what a
user writes, ``dist.destroy_process_group()`` (accelerate: ``accelerator.end_training()``),
with everything still alive. Both run in a ``finally`` block. A job without the hook and with
the plain teardown never imports tritter_comm.

The last line a rank prints on stdout is ``EXIT_JOB {json}``: what it ran and how much it
compressed. A rank whose hook compressed nothing fails (the job would test nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

KINDS = ("ddp", "fsdp1", "fsdp2", "sync", "accelerate")
TEARDOWNS = ("ours", "plain")
HOOK = dict(start_iter=2, min_compress_numel=1024)
SPEC = "vsa:start_iter=2:min_compress_numel=1024"  # the same, for accelerate's attach()
MARK = "EXIT_JOB "

_T0 = time.perf_counter()  # the interpreter is up; the rest of each rank's time is counted

# Everything the job made, referenced until the interpreter exits (a top-level script's globals)
LIVE: dict[str, Any] = {}


# ------------------------------------------------------------------------------------- the rank


def _net():
    import torch
    from torch import nn

    class Block(nn.Module):  # one FSDP unit
        def __init__(self, width: int):
            super().__init__()
            self.lin = nn.Linear(width, width)

        def forward(self, x):
            return x + torch.relu(self.lin(x))

    class Net(nn.Module):
        def __init__(self, width: int = 256):
            super().__init__()
            self.inp = nn.Linear(32, width)
            self.blocks = nn.ModuleList(Block(width) for _ in range(2))
            self.head = nn.Linear(width, 10)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            for b in self.blocks:
                h = b(h)
            return self.head(h)

    torch.manual_seed(0)  # the same weights on every rank
    return Net(), Block


def _batch(rank: int, step: int):
    import torch

    g = torch.Generator().manual_seed(1000 * rank + step)
    w = torch.randn(32, 10, generator=torch.Generator().manual_seed(5))
    x = torch.randn(64, 32, generator=g)
    return x, (x @ w).argmax(1)


def _train(model, opt, rank: int, steps: int, backward=None) -> float:
    from torch import nn

    loss = None
    for step in range(steps):
        x, y = _batch(rank, step)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        (backward or (lambda t: t.backward()))(loss)
        opt.step()
    return float(loss.detach()) if loss is not None else float("nan")


def _state():
    import tritter_comm

    return tritter_comm.VSAState(**HOOK)


def _ddp(args) -> dict:
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    net, _ = _net()
    LIVE["model"] = model = DDP(net, bucket_cap_mb=0.1)  # a few buckets in flight at once
    if args.hook:
        import tritter_comm

        LIVE["state"] = _state()
        model.register_comm_hook(LIVE["state"], tritter_comm.vsa_hook)
    LIVE["opt"] = opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return {"loss": _train(model, opt, args.rank, args.steps)}


def _fsdp1(args) -> dict:
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    net, block = _net()
    LIVE["model"] = model = FSDP(net, device_id=torch.device("cpu"),
                                 auto_wrap_policy=ModuleWrapPolicy({block}))
    if args.hook:
        import tritter_comm

        LIVE["state"] = _state()
        model.register_comm_hook(LIVE["state"], tritter_comm.vsa_fsdp_hook)
    LIVE["opt"] = opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return {"loss": _train(model, opt, args.rank, args.steps)}


def _fsdp2(args) -> dict:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net, _ = _net()
    LIVE["mesh"] = mesh = init_device_mesh("cpu", (args.world,))
    for b in net.blocks:
        fully_shard(b, mesh=mesh)
    LIVE["model"] = model = fully_shard(net, mesh=mesh)
    if args.hook:
        import tritter_comm.fsdp

        LIVE["state"] = _state()
        tritter_comm.fsdp.enable(model, LIVE["state"])
    LIVE["opt"] = opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return {"loss": _train(model, opt, args.rank, args.steps)}


def _sync(args) -> dict:
    """Local SGD: two rounds of two local steps on this rank's own data, then an average."""
    import torch
    import torch.distributed as dist

    net, _ = _net()
    LIVE["model"] = net
    LIVE["opt"] = opt = torch.optim.SGD(net.parameters(), lr=0.05)
    if args.hook:
        from tritter_comm.sync import TernaryWeightSync

        LIVE["sync"] = sync = TernaryWeightSync(net)
        sync.mark_synced()  # same seed: no exact first round
    rounds = max(1, args.steps // 2)
    loss = float("nan")
    for r in range(rounds):
        loss = _train(net, opt, args.rank + 100 * r, 2)
        if args.hook:
            LIVE["sync"].average()
        else:
            with torch.no_grad():
                for p in net.parameters():
                    dist.all_reduce(p)
                    p.div_(args.world)
    return {"loss": loss}


def _accelerate(args) -> dict:
    """Accelerate adopts the process group this job made (its MULTI_CPU path reads the ranks
    from the environment and initializes only when no group exists)."""
    import torch
    from accelerate import Accelerator

    os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world), LOCAL_RANK=str(args.rank),
                      LOCAL_WORLD_SIZE=str(args.world), ACCELERATE_USE_CPU="true")
    LIVE["accelerator"] = acc = Accelerator()
    if args.hook:
        import tritter_comm.integrations.accelerate as tc_accelerate

        LIVE["attachment"] = tc_accelerate.attach(acc, SPEC)
    net, _ = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    LIVE["model"], LIVE["opt"] = model, opt = acc.prepare(net, opt)
    if args.hook:
        LIVE["state"] = LIVE["attachment"].states[0]
    return {"loss": _train(model, opt, args.rank, args.steps, backward=acc.backward),
            "wrapper": type(model).__name__}


def _teardown(args) -> None:
    import torch.distributed as dist

    model, acc = LIVE.get("model"), LIVE.get("accelerator")
    if args.teardown == "ours":
        import tritter_comm

        if acc is not None:
            tritter_comm.shutdown(*[m for m in (model,) if m is not None],
                                  destroy_process_group=False)
            acc.end_training()  # trackers, then the process group
        else:
            tritter_comm.shutdown(*[m for m in (model,) if m is not None])
    elif acc is not None:
        acc.end_training()
    elif dist.is_initialized():
        dist.destroy_process_group()


def rank_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="one rank of an exit job (see the module doc)")
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument("--hook", action="store_true", help="tritter-comm's exchange (else torch's)")
    p.add_argument("--teardown", choices=TEARDOWNS, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, default=2)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", help="a FileStore path, fresh for each job")
    where.add_argument("--port", type=int, help="init by env:// (a TCPStore that rank 0 "
                       "serves on this port of 127.0.0.1), as a script under torchrun")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--pg-timeout", type=float, default=60.0)
    args = p.parse_args(argv)

    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if args.hook or args.teardown == "ours":
        import tritter_comm

        tritter_comm.set_num_threads(1)
    t = {"import": time.perf_counter()}
    timeout = datetime.timedelta(seconds=args.pg_timeout)
    if args.store is not None:
        dist.init_process_group("gloo", store=dist.FileStore(args.store, args.world),
                                rank=args.rank, world_size=args.world, timeout=timeout)
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port),
                          RANK=str(args.rank), WORLD_SIZE=str(args.world))
        dist.init_process_group("gloo", init_method="env://", timeout=timeout)
    report: dict[str, Any] = {"kind": args.kind, "hook": args.hook, "teardown": args.teardown,
                              "rank": args.rank, "init": "file" if args.store else "env"}
    t["init"] = time.perf_counter()
    try:
        report.update(globals()["_" + args.kind](args))
        if args.hook:  # the job must have exercised the compressed path
            if args.kind == "sync":
                st = LIVE["sync"].stats()
                report["compressed"] = st["bytes_sent"]
            else:
                st = LIVE["state"].stats()
                report["compressed"] = st["buckets_compressed"]
            if not report["compressed"]:
                raise RuntimeError(f"{args.kind}: the hook compressed nothing: {st}")
    finally:
        t["train"] = time.perf_counter()
        _teardown(args)
    t["teardown"] = time.perf_counter()
    last = _T0
    report["seconds"] = {}
    for name, at in t.items():  # seconds spent in each part, imports included
        report["seconds"][name] = round(at - last, 3)
        last = at
    print(MARK + json.dumps(report), flush=True)
    return 0


# ----------------------------------------------------------------------------------- launching


@dataclasses.dataclass
class RankOutcome:
    """How one rank ended: ``ok`` (exit 0), ``abort`` (SIGABRT, or C++'s ``terminate called``
    on stderr), ``hang`` (killed at the job's timeout) or ``error`` (any other exit)."""

    rank: int
    returncode: Optional[int]
    outcome: str
    detail: str  # the last stderr line of a failure ("" when ok)
    stderr_tail: str
    report: Optional[dict]  # the rank's EXIT_JOB line, if it printed one
    cpu_s: Optional[float] = None  # user + system seconds of the process (None if killed)


def _classify(rc: Optional[int], killed: bool, stderr: str) -> tuple[str, str]:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else ""
    if killed:
        return "hang", last or "no output"
    if rc == -signal.SIGABRT or "terminate called" in stderr:
        return "abort", next((ln.strip() for ln in lines if "terminate called" in ln),
                             last or f"exit {rc}")
    if rc == 0:
        return "ok", ""
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return "error", f"{name}: {last}" if last else name
    return "error", last or f"exit {rc}"


def job_env(kind: str) -> dict:
    """The environment of a rank: no tritter-comm configuration, one thread, unbuffered."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRITTER_COMM", "ACCELERATE_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if kind == "accelerate":
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def _reap(p: subprocess.Popen, deadline: float) -> Optional[float]:
    """Wait for ``p`` until ``deadline``; return its CPU seconds (user + system), or None if it
    is still running. CPU time, unlike wall time, does not count a busy machine's neighbours."""
    while True:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, *, hook: bool, teardown: str, world: int = 2, steps: int = 4,
           timeout: float = 150.0, pg_timeout: float = 60.0,
           init: str = "file") -> list[RankOutcome]:
    """Run one job: ``world`` fresh interpreters (``python exit_job.py ...``), waited for
    ``timeout`` seconds in all; ranks still running then are killed (a hang). Returns each
    rank's outcome, in rank order.

    ``init``: ``"file"``, a FileStore in a fresh folder; ``"env"``, env:// on a free port of
    127.0.0.1 (rank 0 serves the TCPStore, as under torchrun without its agent store). A job
    whose port was taken meanwhile (EADDRINUSE) is run again on another, up to 3 times."""
    if init not in ("file", "env"):
        raise ValueError(f"init must be 'file' or 'env', got {init!r}")
    for _ in range(3):
        outcomes = _launch_once(kind, hook, teardown, world, steps, timeout, pg_timeout,
                                _free_port() if init == "env" else None)
        if not any("EADDRINUSE" in o.stderr_tail for o in outcomes):
            break
    return outcomes


def _launch_once(kind: str, hook: bool, teardown: str, world: int, steps: int, timeout: float,
                 pg_timeout: float, port: Optional[int]) -> list[RankOutcome]:
    with tempfile.TemporaryDirectory(prefix="tritter-exit-") as d, \
            contextlib.ExitStack() as files:
        procs, logs = [], []
        killed = [False] * world
        cpu: list[Optional[float]] = [None] * world
        try:
            for r in range(world):
                out = files.enter_context(open(os.path.join(d, f"out{r}"), "w+"))
                err = files.enter_context(open(os.path.join(d, f"err{r}"), "w+"))
                logs.append((out, err))
                cmd = [sys.executable, str(Path(__file__).resolve()), "--kind", kind,
                       "--teardown", teardown, "--rank", str(r), "--world", str(world),
                       *(["--port", str(port)] if port is not None
                         else ["--store", os.path.join(d, "store")]), "--steps", str(steps),
                       "--pg-timeout", str(pg_timeout), *(["--hook"] if hook else [])]
                procs.append(subprocess.Popen(cmd, cwd=d, env=job_env(kind), stdout=out,
                                              stderr=err, stdin=subprocess.DEVNULL))
            deadline = time.monotonic() + timeout
            for i, p in enumerate(procs):
                cpu[i] = _reap(p, deadline)
                killed[i] = cpu[i] is None
        finally:  # a hang, Ctrl-C, a failure to start: no rank is left behind
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outcomes = []
        for r, (p, (out, err)) in enumerate(zip(procs, logs)):
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
            outcome, detail = _classify(p.returncode, killed[r], stderr)
            report = None
            for ln in stdout.splitlines():
                if ln.startswith(MARK):
                    try:
                        report = json.loads(ln[len(MARK):])
                    except ValueError:
                        pass
            outcomes.append(RankOutcome(r, p.returncode, outcome, detail,
                                        stderr[-3000:] if outcome != "ok" else "", report,
                                        None if cpu[r] is None else round(cpu[r], 2)))
    return outcomes


if __name__ == "__main__":
    sys.exit(rank_main())

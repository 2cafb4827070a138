"""One rank of a step-time run: ``python -m benchmarks.network.rank SPEC.json``.

Started by ``benchmarks/network/run.py`` (inside the rank's network namespace when there is one)
with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` and ``GLOO_SOCKET_IFNAME`` set.
It runs every mode of the spec in turn on one gloo process group, each on a fresh model with the
same init and the same batches, and rank 0 appends one JSON line per mode to the results file.
A mode with ``pair_with`` also times a second model (e.g. no hook) step for step beside it.

With ``"device": "cuda"`` in the spec, the model and the batches live on the GPU (every rank on
the same one; gloo takes CUDA tensors) and a step's timing ends with ``torch.cuda.synchronize``.

Per step: the batch is built, all ranks meet at a barrier, then forward, backward (DDP's
exchange) and the optimizer step are timed. A step's time is the slowest rank's; a mode's step
time is the median over its timed steps (``timed`` of them, more while their total stays under
``timed_budget_s``, at most ``max_timed``), after its warm-up steps (with ``auto``, also after
the hook's first decision: the probe and trial steps are not timed).
"""

from __future__ import annotations

import copy
import datetime as _dt
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from benchmarks import _common, comm, workloads  # noqa: E402
from benchmarks.convergence import _bucket_sizes  # noqa: E402


def _append(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


_BUILD: dict[str, Any] = {}

def _bucket_cap_mb(name: str) -> float | None:
    return comm.bucket_cap_mb_for(name)


def _register(ddp: DDP, name: str, options: dict[str, Any]) -> object | None:
    return comm.register(ddp, name, **options)


def _bytes_per_step(name: str, ddp: DDP, state: object | None, since: Any) -> float:
    return comm.bytes_per_step(name, ddp, state, since=since)


def _param_digest(model: torch.nn.Module) -> str:
    """sha256 of the parameters' bytes (copied to the host first: CUDA parameters too)."""
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _native_build() -> dict[str, Any]:
    """Which build of the Rust extension this process loaded (hashed at import, in main: the
    file may be rebuilt while a run goes on)."""
    if not _BUILD:
        import hashlib

        import tritter_comm

        path = Path(tritter_comm._native.__file__)
        _BUILD.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                      version=getattr(tritter_comm, "__version__", None))
    return dict(_BUILD)


def _stop(rank: int, decide: bool) -> bool:
    """Rank 0's decision, the same on every rank."""
    flag = torch.tensor([int(decide) if rank == 0 else 0])
    dist.broadcast(flag, 0)
    return bool(flag.item())


_PRISTINE: dict[tuple, Any] = {}


def _fresh_workload(spec: dict[str, Any]) -> workloads.Workload:
    """The spec's workload with a fresh copy of its initial model. Built once per process and
    copied for each mode: the init is the same either way, and building the 300M model (its
    init draws 600M random numbers on one core) would cost seconds per mode."""
    key = (spec["workload"], spec["size"], spec["seed"], spec.get("batch_size"))
    if key not in _PRISTINE:
        w = workloads.build(spec["workload"], seed=spec["seed"], size=spec["size"])
        if spec.get("batch_size"):
            w.batch_size = spec["batch_size"]
        _PRISTINE.clear()
        _PRISTINE[key] = w
    w = copy.copy(_PRISTINE[key])
    w.model = copy.deepcopy(_PRISTINE[key].model)
    return w


class _Run:
    """One comm mode's model, DDP wrapper, hook state and optimizer, stepped one at a time."""

    def __init__(self, spec: dict[str, Any], name: str, options: dict[str, Any], rank: int,
                 world: int):
        self.rank, self.world, self.name = rank, world, name
        self.device = torch.device(spec.get("device", "cpu"))
        self.cuda = self.device.type == "cuda"
        self.w = _fresh_workload(spec)
        self.w.model.to(self.device)
        # Every rank builds the same init from the seed: skip DDP's broadcast of the
        # parameters, which would cost as much as a step on the slow links.
        self.ddp = DDP(self.w.model, bucket_cap_mb=_bucket_cap_mb(name), init_sync=False,
                       device_ids=[self.device.index or 0] if self.cuda else None)
        self.state = _register(self.ddp, name, options)
        self.opt = torch.optim.AdamW(self.ddp.parameters(), lr=self.w.lr)
        self.auto = bool(options.get("auto"))
        self.steps = 0

    def step(self) -> tuple[float, float]:
        """One timed training step: (seconds, loss)."""
        batch = tuple(t.to(self.device) for t in self.w.batch(self.rank, self.world, self.steps))
        if self.cuda:  # the copy of the batch and anything left of the last step: untimed
            torch.cuda.synchronize(self.device)
        dist.barrier()
        t0 = time.perf_counter()
        loss = self.w.loss(self.ddp, batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.cuda:  # the step ends when the GPU has done its work
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.steps += 1
        return dt, loss.item()

    def warm(self, warmup: int) -> bool:
        """Past ``warmup`` steps and, with ``auto``, past the hook's first decision (the same
        step on every rank)."""
        return self.steps >= warmup and not (self.auto and self.state.stats()["auto_checks"] == 0)


def _slowest(times: list[float], world: int) -> list[float]:
    """Each step's time on the slowest rank."""
    every = [None] * world
    dist.all_gather_object(every, times)
    return [max(ts[i] for ts in every) for i in range(len(times))]


def run_mode(spec: dict[str, Any], mode: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Warm up, then time steps. With ``pair_with``, a second model under that mode (e.g. no
    hook) takes a step between each of this mode's, so that both see the same load on a shared
    machine and their ratio is not drift."""
    def progress(label: str, dt: float, n: int) -> None:
        if rank == 0:
            _append(spec["progress"], {"label": label, "step": n, "s": dt})

    run = _Run(spec, mode["comm"], mode["options"], rank, world)
    while not run.warm(mode["warmup"]):
        progress(mode["label"], run.step()[0], run.steps)
    base = None
    if mode.get("pair_with"):
        base = _Run(spec, mode["pair_with"], {}, rank, world)
        while not base.warm(2):  # DDP rebuilds its buckets after the first step
            progress(f"{mode['label']} (paired {mode['pair_with']})", base.step()[0], base.steps)
    snapshot = dict(run.state.stats()) if hasattr(run.state, "stats") else None
    warmup_steps = run.steps
    times: list[float] = []
    base_times: list[float] = []
    losses: list[float] = []
    timed_s = 0.0
    while True:
        first_base = base is not None and len(times) % 2 == 0  # alternate who goes first
        if first_base:
            base_times.append(base.step()[0])
        dt, loss = run.step()
        if base is not None and not first_base:
            base_times.append(base.step()[0])
        progress(mode["label"], dt, run.steps)
        times.append(dt)
        losses.append(loss)
        timed_s += dt + (base_times[-1] if base is not None else 0.0)
        # at least `timed` steps; more, up to `max_timed`, while they are cheap
        if _stop(rank, len(times) >= mode["max_timed"]
                 or (len(times) >= mode["timed"] and timed_s >= spec["timed_budget_s"])):
            break
    per_step = _slowest(times, world)
    digests = [None] * world
    dist.all_gather_object(digests, _param_digest(run.ddp.module))
    row: dict[str, Any] = {
        "label": mode["label"],
        "comm": run.name,
        "options": mode["options"],
        "warmup_steps": warmup_steps,
        "timed_steps": len(per_step),
        "step_s": per_step,
        "step_s_median": statistics.median(per_step),
        "train_loss_timed": losses,
        "bytes_per_step": _bytes_per_step(run.name, run.ddp, run.state, snapshot),
        "fp32_bytes_per_step": comm.fp32_allreduce_bytes(run.ddp),
        "replicas_identical": len(set(digests)) == 1,
        "ddp_bucket_bytes": _bucket_sizes(run.ddp),
        "workload_info": run.w.info,
        "device": str(run.device) + (f" ({torch.cuda.get_device_name(run.device)})"
                                     if run.cuda else ""),
        "native": _native_build(),
    }
    if base is not None:
        b = _slowest(base_times, world)
        base_digests = [None] * world
        dist.all_gather_object(base_digests, _param_digest(base.ddp.module))
        row["paired"] = {
            "with": mode["pair_with"],
            "replicas_identical": len(set(base_digests)) == 1,
            "step_s": b,
            "step_s_median": statistics.median(b),
            # per pair of neighbouring steps, then the median: drift cancels
            "ratio_median": statistics.median(x / y for x, y in zip(per_step, b)),
        }
    if hasattr(run.state, "stats"):
        st = run.state.stats()
        row["hook_stats"] = {k: v for k, v in st.items()
                             if v is None or isinstance(v, (int, float, str, bool, dict))}
    del run, base
    gc.collect()
    return row


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    if spec.get("device", "cpu").startswith("cuda"):
        torch.cuda.set_device(torch.device(spec["device"]))  # both ranks share the one GPU
    _native_build()
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=spec["collective_timeout_s"]))
    try:
        for mode in spec["modes"]:
            try:
                row = run_mode(spec, mode, rank, world)
            except Exception:
                # the ranks may now be out of step: report and end the group
                _append(spec["results"], {"label": mode["label"], "rank": rank,
                                          "error": traceback.format_exc()})
                return 1
            if rank == 0:
                _append(spec["results"], row)
    finally:  # our teardown (issue 14): hook states closed, garbage collected, group destroyed
        _common.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

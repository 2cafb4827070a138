"""Workers of tests/test_reliability.py: configuration mismatches, failures mid-step, teardown."""

# No `from __future__ import annotations`: DDP checks a hook's annotations at run time.

import gc
import weakref

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import tritter_comm
from _ddp_workers import Net, _data

# One option at a time set differently on rank 1; every value is valid on its own. The hook
# branches on each (or its collectives depend on it), so a mismatch must fail on every rank.
MISMATCHES = {
    "start_iter": (2, 4),
    "min_compress_numel": (1000, 100_000),
    "auto": (False, True),
    "mode": ("int2", "ternary"),
    "phase2_mode": ("int2", "sign"),
    "block_size": (1024, 256),
    "seed": (0, 1),
    "error_feedback": (True, False),
    "server_error_feedback": (True, False),
    "fixed_keys": (False, True),
}
BASE = dict(start_iter=2, min_compress_numel=1000, phase2_mode="int2")  # mode alone may differ


def _step(ddp, rank, step):
    x, y = _data(rank, step, torch.float32)
    ddp.zero_grad()
    nn.functional.cross_entropy(ddp(x), y).backward()


def config_mismatches(rank, world, *, fields):
    """For each field, a fresh DDP model whose hook state differs between ranks in that field
    alone: returns {field: the error message this rank got in its first step, or None}."""
    out = {}
    for field in fields:
        torch.manual_seed(0)
        ddp = DDP(Net(tiny=False), bucket_cap_mb=0.05)
        value = MISMATCHES[field][min(rank, 1)]
        state = tritter_comm.VSAState(**{**BASE, field: value})
        ddp.register_comm_hook(state, tritter_comm.vsa_hook)
        try:
            _step(ddp, rank, 0)
            out[field] = None
        except Exception as e:
            out[field] = f"{type(e).__name__}: {e}"
        del ddp, state
        gc.collect()
    return out


def fail_mid_step(rank, world, *, fail_rank=1, fail_step=3, fail_bucket=2):
    """``fail_rank`` raises inside the hook of its ``fail_bucket``-th bucket at ``fail_step``, with
    exchanges of earlier buckets in flight. Every rank must raise (none may hang), and after
    ``shutdown()`` nothing of the hook's may be left in flight."""
    import time

    torch.manual_seed(0)
    ddp = DDP(Net(tiny=False, depth=3), bucket_cap_mb=0.05)
    state = tritter_comm.VSAState(**BASE)
    calls = {"n": 0}

    def hook(state: tritter_comm.VSAState,
             bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        calls["n"] += 1
        if rank == fail_rank and state.iter == fail_step and bucket.index() == fail_bucket:
            raise RuntimeError("injected failure")
        return tritter_comm.vsa_hook(state, bucket)

    ddp.register_comm_hook(state, hook)
    t0 = time.monotonic()
    error = None
    try:
        for step in range(8):
            _step(ddp, rank, step)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    seconds = time.monotonic() - t0
    tritter_comm.shutdown(ddp, destroy_process_group=False)
    return {"error": error, "seconds": seconds, "pending_after_shutdown": len(state._pending)}


def shutdown_releases(rank, world):
    """``shutdown(ddp)`` after training: the hook state is closed and freed with the reducer."""
    torch.manual_seed(0)
    ddp = DDP(Net(tiny=False), bucket_cap_mb=0.05)
    state = tritter_comm.VSAState(**BASE)
    ddp.register_comm_hook(state, tritter_comm.vsa_hook)
    for step in range(4):
        _step(ddp, rank, step)
    compressed = state.stats()["buckets_compressed"]
    wref = weakref.ref(state)
    del state
    gc.collect()
    alive_before = wref() is not None  # DDP's reducer holds it
    tritter_comm.shutdown(ddp, destroy_process_group=False)
    return {"compressed": compressed, "alive_before": alive_before,
            "freed": wref() is None, "initialized": dist.is_initialized()}


def fsdp2_subgroup(rank, world, *, seeds, steps=3):
    """FSDP2 over 2-rank shard groups of a (2, 2) mesh: ranks {0,1} and {2,3} each shard their
    own model. ``seeds[rank]`` is this rank's hook seed. The configuration check must run on
    the reduce-scatter's group: returns this rank's error message, or None if it trained."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard"))
    torch.manual_seed(0)
    model = Net(tiny=False, depth=2)
    for layer in model.body:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    state = tritter_comm.VSAState(start_iter=2, min_compress_numel=1000, seed=seeds[rank])
    tritter_comm.fsdp.enable(model, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        for step in range(steps):
            x, y = _data(rank // 2, step, torch.float32)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    finally:
        del model, opt
        gc.collect()
    return None

"""Run a function on N real processes over gloo (CPU), with a timeout so a hang fails fast."""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(fn, rank, world, store_path, q, args, kwargs):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=__import__("datetime").timedelta(seconds=60))
        try:
            out = fn(rank, world, *args, **kwargs)
            q.put((rank, "ok", out))
        finally:
            dist.destroy_process_group()
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def run(fn, world: int, *args, timeout: float = 180.0, **kwargs) -> list:
    """Run ``fn(rank, world, *args, **kwargs)`` on ``world`` processes; return their results
    in rank order. A rank's exception is re-raised here; a hang raises ``TimeoutError``."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, store, q, args, kwargs),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        results: dict = {}
        errors: dict = {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) + len(errors) < world:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"ranks {sorted(set(range(world)) - set(results) - set(errors))} did "
                        f"not finish within {timeout:.0f} s (hang?); errors so far: {errors}")
                try:
                    rank, status, value = q.get(timeout=min(left, 1.0))
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs)
                            if p.exitcode not in (None, 0) and r not in results and r not in errors]
                    if dead:
                        errors.update({r: f"exited with code {procs[r].exitcode}" for r in dead})
                    continue
                (results if status == "ok" else errors)[rank] = value
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise RuntimeError("\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items())))
    return [results[r] for r in range(world)]

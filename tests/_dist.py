"""Run a function on N real processes over gloo (CPU), with a timeout so a hang fails fast, and
check how every process exited: a rank that reports success and then dies at exit (an abort
in interpreter finalization, issue 14) fails the test."""

from __future__ import annotations

import datetime
import os
import queue
import signal
import tempfile
import time
import traceback
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _call(fn, rank, world, args, kwargs):
    try:
        return "ok", fn(rank, world, *args, **kwargs)
    except BaseException:
        return "error", traceback.format_exc()


def _entry(fn, rank, world, store_path, q, args, kwargs, backend="gloo"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    status, value = "error", None
    try:
        store = dist.FileStore(store_path, world)
        if "nccl" in backend:
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        # fn's exception is formatted and dropped inside _call: its traceback would keep fn's
        # frames, and so its models and their process group, alive through the teardown
        status, value = _call(fn, rank, world, args, kwargs)
    except BaseException:
        value = traceback.format_exc()
    try:
        # our teardown (tritter_comm.shutdown): hook states closed, garbage collected while
        # the interpreter is whole (fn's models are unreferenced now), then the group destroyed
        import tritter_comm

        tritter_comm.shutdown()
    except BaseException:
        status, value = "error", f"{value or ''}\nteardown failed:\n{traceback.format_exc()}"
    q.put((rank, status, value))


def _describe(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


def run(fn, world: int, *args, timeout: float = 180.0, expect_exit: Optional[dict] = None,
        exit_timeout: float = 60.0, backend: str = "gloo", **kwargs) -> list:
    """Run ``fn(rank, world, *args, **kwargs)`` on ``world`` processes; return their results
    in rank order. A rank's exception is re-raised here; a hang raises ``TimeoutError``.

    Every process must then exit, within ``exit_timeout`` seconds, with code 0, or with the
    code ``expect_exit`` gives its rank (``{1: -9}``: rank 1 is SIGKILLed; such a rank reports
    no result, and its entry is None). Any other exit code fails the run, even when every
    rank reported success.

    ``backend``: the process group's; with NCCL in it (``"cpu:gloo,cuda:nccl"``) each rank
    first takes the GPU of its number."""
    expect = {r: 0 for r in range(world)}
    expect.update(expect_exit or {})
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        store = os.path.join(d, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, store, q, args, kwargs, backend),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        results: dict = {}
        errors: dict = {}
        silent: set = set()  # ranks that exited without reporting
        deadline = time.monotonic() + timeout

        def receive(wait: float) -> bool:
            try:
                rank, status, value = q.get(timeout=wait)
            except queue.Empty:
                return False
            (results if status == "ok" else errors)[rank] = value
            return True

        try:
            while len(results) + len(errors) + len(silent) < world:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(world)) - set(results) - set(errors) - silent)
                    raise TimeoutError(
                        f"ranks {missing} did not finish within {timeout:.0f} s (hang?); "
                        f"errors so far: {errors}")
                if receive(min(left, 1.0)):
                    continue
                exited = [r for r, p in enumerate(procs) if p.exitcode is not None
                          and r not in results and r not in errors and r not in silent]
                if exited:
                    while receive(0.5):  # what they put before exiting is in the pipe by now
                        pass
                    silent.update(r for r in exited if r not in results and r not in errors)
            # every rank has reported (or died): each process must now exit, and as expected
            exit_deadline = time.monotonic() + exit_timeout
            for r, p in enumerate(procs):
                p.join(timeout=max(0.0, exit_deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join()
                    errors[r] = (f"{errors.get(r, '')}\nrank {r} did not exit within "
                                 f"{exit_timeout:.0f} s of reporting (a hang at exit?)").lstrip()
                    continue
                code = p.exitcode
                line = None
                if code != expect[r]:
                    line = f"exited with code {_describe(code)}, expected {expect[r]}"
                    if code == -signal.SIGABRT:
                        line += " (an abort at exit: 'terminate called ...' on its stderr?)"
                elif r in silent and code == 0:
                    line = "exited with code 0 without reporting a result"
                if line:
                    errors[r] = f"{errors[r]}\n{line}" if r in errors else line
            if errors:  # say which ranks died as the test expects, beside the failures
                for r, p in enumerate(procs):
                    if r not in errors and p.exitcode == expect[r] != 0:
                        errors[r] = f"exited with code {_describe(p.exitcode)}, as expected"
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
        if errors:
            raise RuntimeError("\n".join(f"--- rank {r} ---\n{e}"
                                          for r, e in sorted(errors.items())))
    return [results.get(r) for r in range(world)]

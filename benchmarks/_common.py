"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent


def _version(mod: str) -> str | None:
    try:
        return __import__(mod).__version__
    except Exception:  # not installed, or no __version__: recorded as unknown
        return None


def _git_commit() -> str | None:
    try:
        git = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=_ROOT,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return git.stdout.strip() if git.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       None)
    except OSError:
        cpu = None
    return cpu or platform.processor()


def tritter_comm_source() -> dict[str, Any]:
    """Where the imported ``tritter_comm`` comes from, and whether it is this checkout's. An
    installed copy wins over the checkout (the benchmarks append it to ``sys.path``), so a stale
    ``pip install .`` would be measured instead of the code in front of you: warn when it is."""
    import sys

    import tritter_comm

    path = Path(tritter_comm.__file__).resolve().parent
    this = path == _ROOT / "tritter_comm"
    if not this:
        print(f"warning: tritter_comm is imported from {path}, not from this checkout "
              f"({_ROOT}); reinstall it (pip install -e .) to measure this tree", file=sys.stderr)
    return {"tritter_comm_path": str(path), "tritter_comm_is_this_checkout": this}


def machine(*modules: str, **extra: Any) -> dict[str, Any]:
    """Platform, CPU, cores usable, Python and the versions of torch, numpy, tritter_comm and
    ``modules``, where tritter_comm comes from (warning when not from this checkout), the git
    commit of the tree and the date; ``extra`` is added as it is."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        **{m: _version(m) for m in ("torch", "numpy", "tritter_comm", *modules)},
        **tritter_comm_source(),
        "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def teardown(*modules: Any) -> None:
    """End a rank's distributed work the way that never aborts at exit (issue 14):
    ``tritter_comm.shutdown(*modules)`` (hook states closed, DDP reducers released, garbage
    collected, the default group destroyed). Where tritter_comm does not import (the
    benchmarks' baselines run without it), the same steps without the hook states."""
    try:
        from tritter_comm import shutdown
    except ImportError:
        import torch.distributed as dist

        gc.collect()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return
    shutdown(*modules)

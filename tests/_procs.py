"""Run launchers (torchrun, the launch/ scripts, the CLI) as subprocesses with a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def env(**extra: str) -> dict:
    """The environment with no tritter-comm configuration, one thread a rank, plus ``extra``."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("TRITTER_COMM")}
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def run(cmd: list, *, timeout: float = 240, cwd=ROOT, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``cmd``; fail with its output if it exits non-zero."""
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env(**extra_env), capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                             f"--- stdout ---\n{p.stdout[-6000:]}\n--- stderr ---\n{p.stderr[-6000:]}")
    return p


def torchrun(script, *args, nproc: int = 2, timeout: float = 240, **extra_env: str):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", script, *args], timeout=timeout, **extra_env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

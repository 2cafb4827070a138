"""Run launchers (torchrun, the launch/ scripts, the CLI) as subprocesses with a timeout."""

from __future__ import annotations

import os
import signal
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


def run(cmd: list, *, timeout: float = 240, cwd=ROOT,
        **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``cmd``; fail with its output if it exits non-zero or runs past ``timeout``.

    The launchers here (torchrun, accelerate launch) exit non-zero when any rank does, an
    abort at exit included. On a timeout (or Ctrl-C) the launcher and every process under it
    are stopped: torchrun starts each rank in a session of its own, so a killed launcher would
    leave its ranks running."""
    cmd = [str(c) for c in cmd]
    with subprocess.Popen(cmd, cwd=cwd, env=env(**extra_env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_tree(p)
            try:
                out, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                out, err = "", "(no output: the pipes stayed open)"
            raise AssertionError(f"{' '.join(cmd)} ran past {timeout:.0f} s (a hang?); stopped\n"
                                 f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}")
        except BaseException:
            stop_tree(p)
            raise
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n"
                             f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _stat(pid) -> tuple:
    """(parent id, start time) of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[19])


def _descendants(pid: int) -> list:
    """(id, start time) of every process under ``pid`` (Linux: from /proc; elsewhere none)."""
    children: dict = {}
    try:
        entries = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []
    for d in entries:
        try:
            ppid, start = _stat(d)
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append((d, start))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c[0])
    return out


def stop_tree(p: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM ``p`` (torchrun then stops its ranks), wait ``grace`` seconds, then SIGKILL
    ``p`` and what is left of the processes that were under it (each checked by its start
    time, so that a reused process id is left alone)."""
    if p.poll() is not None:
        return
    tree = _descendants(p.pid)
    p.terminate()
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
    for pid, start in tree:
        try:
            if _stat(pid)[1] == start:
                os.kill(pid, signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            pass
    p.wait()


def torchrun(script, *args, nproc: int = 2, timeout: float = 240, **extra_env: str):
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", script, *args], timeout=timeout, **extra_env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

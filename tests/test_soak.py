"""Soak (issue 14): short 2-rank jobs, each rank a fresh interpreter, mixing the DDP hook,
FSDP1, FSDP2, weight sync and accelerate, all ended with our teardown (``tritter_comm.shutdown``).
Every rank must exit 0: no abort in interpreter finalization, no hang, no error.

Each job is ``benchmarks/exit_job.py`` (the unit of ``benchmarks/exit_soak.py``, which also
measures the plain teardown): a small model, 4 steps with ``VSAState(start_iter=2,
min_compress_numel=1024)``, so that the hook compresses, then the teardown and a normal exit.
"""

import importlib.util
import sys

import pytest

from _procs import ROOT

JOBS = 30  # at least this many, over the kinds that can run here


def _exit_job():
    spec = importlib.util.spec_from_file_location("exit_job", ROOT / "benchmarks" / "exit_job.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("exit_job", mod)
    spec.loader.exec_module(mod)
    return mod


exit_job = _exit_job()


def _why_not(kind: str) -> str:
    """Why ``kind`` cannot run here ("" when it can)."""
    if kind == "fsdp2":
        import tritter_comm.fsdp

        if not tritter_comm.fsdp.available():
            return "this torch has no FSDP2 custom reduce-scatter (tritter_comm.fsdp.available())"
    if kind == "accelerate" and importlib.util.find_spec("accelerate") is None:
        return "accelerate is not installed (pip install '.[dev]')"
    return ""


KINDS = [k for k in exit_job.KINDS if not _why_not(k)]
PARAMS = [pytest.param(i, KINDS[i % len(KINDS)], id=f"{i:02d}-{KINDS[i % len(KINDS)]}")
          for i in range(JOBS)]
PARAMS += [pytest.param(None, k, id=k, marks=pytest.mark.skip(reason=f"{k}: {_why_not(k)}"))
           for k in exit_job.KINDS if _why_not(k)]


@pytest.mark.parametrize("index, kind", PARAMS)
def test_job_with_our_teardown_exits_cleanly(index, kind):
    ranks = exit_job.launch(kind, hook=True, teardown="ours", world=2, steps=4, timeout=150)
    bad = [r for r in ranks if r.outcome != "ok"]
    assert not bad, "\n".join(
        f"job {index} ({kind}, hook, our teardown): rank {r.rank} {r.outcome} "
        f"(exit code {r.returncode}): {r.detail}\n--- rank {r.rank} stderr (tail) ---\n"
        f"{r.stderr_tail}" for r in bad)
    for r in ranks:  # each rank ran to its end, and the hook compressed
        assert r.report is not None and r.report["compressed"] > 0, (index, kind, r)

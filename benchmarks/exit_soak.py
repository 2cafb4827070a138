"""Exit soak (issue 14): do short jobs ever abort or hang at exit?

N short 2-rank jobs per row, each rank a fresh interpreter (``benchmarks/exit_job.py``: a small
model, a few steps, the teardown, a normal exit), cycling through the kinds: DDP with the VSA
hook, FSDP1 (``vsa_fsdp_hook``), FSDP2 (``tritter_comm.fsdp.enable``), weight sync
(``TernaryWeightSync.average()``) and accelerate (``integrations.accelerate.attach``). Rows:

- ``ours-hook``: tritter-comm's exchange, ended with ``tritter_comm.shutdown(model)``;
- ``ours-nohook``: the same kinds on torch's own exchange (plain DDP / FSDP / an fp32
  all-reduce average / accelerate without attach), ended with ``tritter_comm.shutdown``;
- ``plain-hook``: tritter-comm's exchange, ended the way a user writes it,
  ``dist.destroy_process_group()`` (accelerate: ``accelerator.end_training()``) only;
- ``plain-nohook``: the same without tritter-comm (not even imported).

Each rank's outcome: ok (exit 0), abort (SIGABRT, or ``terminate called`` on stderr), hang
(killed at the job's timeout), error (any other exit; its last stderr line is kept). Prints a
table of failed jobs by row and kind, and writes JSON (default
``benchmarks/results/exit_soak.json``) with the machine, the versions, the settings and every
failure's stderr tail. Jobs of the rows take turns, so that a neighbour's load falls on every
row alike.

    python benchmarks/exit_soak.py                       # 500 jobs a row, all rows
    python benchmarks/exit_soak.py --jobs 40
    python benchmarks/exit_soak.py --rows plain-hook,plain-nohook --kinds ddp --jobs 100
    python benchmarks/exit_soak.py --combine a.json b.json --out all.json   # runs added up

``--combine`` adds up the jobs of earlier runs (of the same tritter-comm version: each run's
machine, settings and package version are kept beside the total) into one table, so that a
soak too long for one sitting can be run in parts.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import dataclasses
import importlib.util
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable (appended: an
    sys.path.append(str(_ROOT))  # installed tritter_comm must win over the source tree's)

from benchmarks import exit_job  # noqa: E402
from benchmarks._common import machine  # noqa: E402

ROWS = {  # name: (hook, teardown, label)
    "ours-hook": (True, "ours", "our teardown, hook"),
    "ours-nohook": (False, "ours", "our teardown, no hook"),
    "plain-hook": (True, "plain", "plain teardown, hook"),
    "plain-nohook": (False, "plain", "plain teardown, no hook"),
}
OUTCOMES = ("abort", "hang", "error")


def _uncommitted() -> list[str]:
    """Changed or new files of the package in this checkout (the jobs import it as it is)."""
    import subprocess

    try:
        git = subprocess.run(["git", "status", "--porcelain", "--", "tritter_comm", "src"],
                             cwd=_ROOT, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return git.stdout.splitlines()


def available_kinds() -> dict[str, str]:
    """kind -> why it cannot run here ("" when it can)."""
    out = {k: "" for k in exit_job.KINDS}
    try:
        import tritter_comm.fsdp

        if not tritter_comm.fsdp.available():
            out["fsdp2"] = "this torch has no FSDPModule.set_custom_reduce_scatter"
    except ImportError as e:
        out["fsdp2"] = f"tritter_comm.fsdp: {e}"
    if importlib.util.find_spec("accelerate") is None:
        out["accelerate"] = "accelerate is not installed"
    return out


@dataclasses.dataclass
class Job:
    index: int
    row: str
    kind: str


def _run(job: Job, args) -> dict[str, Any]:
    hook, teardown, _ = ROWS[job.row]
    t0 = time.perf_counter()
    ranks = exit_job.launch(job.kind, hook=hook, teardown=teardown, world=args.world,
                            steps=args.steps, timeout=args.timeout,
                            pg_timeout=args.pg_timeout, init=args.init)
    wall = time.perf_counter() - t0
    worst = next((o for o in OUTCOMES if any(r.outcome == o for r in ranks)), "ok")
    return {"index": job.index, "row": job.row, "kind": job.kind, "outcome": worst,
            "wall_s": round(wall, 2),
            "ranks": [{"rank": r.rank, "returncode": r.returncode, "outcome": r.outcome,
                       "detail": r.detail, "report": r.report, "cpu_s": r.cpu_s,
                       **({"stderr_tail": r.stderr_tail} if r.outcome != "ok" else {})}
                      for r in ranks]}


def _cell(results: list[dict]) -> str:
    if not results:
        return "-"
    bad = collections.Counter(r["outcome"] for r in results if r["outcome"] != "ok")
    n = sum(bad.values())
    if not n:
        return f"0/{len(results)}"
    return f"{n}/{len(results)}: " + ", ".join(f"{c} {o}" for o, c in bad.items())


def table(results: list[dict], rows: list[str], kinds: list[str]) -> str:
    """Failed jobs of each row by kind ("2/8: 2 abort" = 2 of 8 jobs had a rank abort)."""
    head = ["row", "jobs", *kinds, "all", "ranks aborted"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        aborted = sum(x["outcome"] == "abort" for r in mine for x in r["ranks"])
        cells = [_cell([r for r in mine if r["kind"] == k]) for k in kinds]
        ranks = sum(len(r["ranks"]) for r in mine)
        lines.append(f"| {ROWS[row][2]} | {len(mine)} | " + " | ".join(cells)
                     + f" | {_cell(mine)} | {aborted} of {ranks} |")
    return "\n".join(lines)


def details(results: list[dict]) -> list[str]:
    """Each distinct failure (row, kind, outcome, last stderr line) with its count."""
    c = collections.Counter((r["row"], r["kind"], x["outcome"], x["detail"][:160])
                            for r in results for x in r["ranks"] if x["outcome"] != "ok")
    return [f"{n} x {row} {kind} rank {outcome}: {detail}"
            for (row, kind, outcome, detail), n in c.most_common()]


def combine(paths: list[Path], out: Path) -> int:
    """Add up the jobs of earlier runs' JSON files into one table (written to ``out``)."""
    if len({p.resolve() for p in paths}) < len(paths):
        raise SystemExit("a run is named twice: its jobs would count twice")
    runs = [json.loads(p.read_text()) for p in paths]
    versions = {r["machine"].get("tritter_comm") for r in runs}
    if len(versions) > 1:
        raise SystemExit(f"runs of different tritter-comm versions: {sorted(map(str, versions))}")
    results = [j for r in runs for j in r["jobs"]]
    rows = [row for row in ROWS if any(j["row"] == row for j in results)]
    kinds = [k for k in exit_job.KINDS if any(j["kind"] == k for j in results)]
    print(table(results, rows, kinds))
    print()
    for line in details(results):
        print(line)
    print(f"{len(results)} jobs from {len(runs)} runs: "
          + ", ".join(f"{p.name} ({len(r['jobs'])} jobs, {r['machine'].get('cpu_count')} cpus, "
                      f"interrupted {r['interrupted']})" for p, r in zip(paths, runs)))
    report_json = {"benchmark": "exit_soak", "combined_from": [
        {"file": p.name, "machine": r["machine"], "settings": r["settings"],
         "interrupted": r["interrupted"], "jobs": len(r["jobs"])} for p, r in zip(paths, runs)],
        "table": table(results, rows, kinds), "jobs": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report_json, indent=1))
    print(f"wrote {out}")
    return int(any(j["outcome"] != "ok" for j in results if j["row"].startswith("ours")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--combine", type=Path, nargs="+", metavar="JSON",
                    help="add up these runs' jobs into one table (--out), run nothing")
    ap.add_argument("--jobs", type=int, default=500, help="jobs per row (default 500)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {list(ROWS)}")
    ap.add_argument("--kinds", default=",".join(exit_job.KINDS),
                    help=f"comma-separated, of {list(exit_job.KINDS)}; jobs cycle through them")
    ap.add_argument("--concurrency", type=int, default=1, help="jobs at once (default 1)")
    ap.add_argument("--steps", type=int, default=4, help="training steps a job (default 4)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=150.0,
                    help="seconds before a job's ranks are killed and counted as hung")
    ap.add_argument("--pg-timeout", type=float, default=60.0,
                    help="the process group's timeout in the jobs (seconds)")
    ap.add_argument("--init", choices=("file", "env"), default="file",
                    help="rendezvous: a FileStore (default), or env:// on a free port (a "
                    "TCPStore served by rank 0, as a script under torchrun)")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "exit_soak.json")
    args = ap.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    rows = [r for r in args.rows.split(",") if r]
    kinds = [k for k in args.kinds.split(",") if k]
    for r in rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; choose from {list(ROWS)}")
    for k in kinds:
        if k not in exit_job.KINDS:
            ap.error(f"unknown kind {k!r}; choose from {list(exit_job.KINDS)}")
    if args.jobs < 1 or args.concurrency < 1:
        ap.error("--jobs and --concurrency must be at least 1")
    why = available_kinds()
    skipped = {k: why[k] for k in kinds if why[k]}
    kinds = [k for k in kinds if not why[k]]
    for k, reason in skipped.items():
        print(f"skipping {k}: {reason}", file=sys.stderr)
    if not kinds:
        ap.error("no kind can run here")

    settings = {"jobs_per_row": args.jobs, "rows": rows, "kinds": kinds, "skipped": skipped,
                "concurrency": args.concurrency, "steps": args.steps, "world": args.world,
                "timeout_s": args.timeout, "pg_timeout_s": args.pg_timeout, "init": args.init,
                "hook": exit_job.HOOK,
                "accelerate_spec": exit_job.SPEC}
    info = machine("accelerate", uncommitted=_uncommitted(), loadavg_start=os.getloadavg())
    print(f"exit soak: {args.jobs} jobs x {len(rows)} rows, kinds {','.join(kinds)}, "
          f"{args.world} ranks a job, {args.steps} steps, init {args.init}, "
          f"concurrency {args.concurrency}, "
          f"timeout {args.timeout:.0f} s; torch {info['torch']}, tritter_comm "
          f"{info['tritter_comm']}, accelerate {info['accelerate']}, python {info['python']}, "
          f"{info['cpu_count']} cpus ({info['cpu_model']}), load average "
          f"{info['loadavg_start'][0]:.1f}", flush=True)

    jobs = [Job(i, row, kinds[i % len(kinds)]) for i in range(args.jobs) for row in rows]
    results: list[dict] = []
    lock = threading.Lock()
    t0 = time.perf_counter()
    interrupted = False

    def report(res: dict) -> None:
        with lock:
            results.append(res)
            n = len(results)
            if res["outcome"] != "ok":
                bad = next(x for x in res["ranks"] if x["outcome"] != "ok")
                print(f"  job {res['index']} {res['row']} {res['kind']}: rank {bad['rank']} "
                      f"{bad['outcome']}: {bad['detail'][:200]}", flush=True)
            if n % 20 == 0 or n == len(jobs):
                el = time.perf_counter() - t0
                print(f"  {n}/{len(jobs)} jobs, {el:.0f} s, {el / n:.1f} s a job", flush=True)

    def on_term(signum, frame):  # SIGTERM as Ctrl-C: what finished is written
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    pool = cf.ThreadPoolExecutor(max_workers=args.concurrency)
    try:
        futures = [pool.submit(_run, j, args) for j in jobs]
        for f in cf.as_completed(futures):
            report(f.result())
    except KeyboardInterrupt:  # keep what finished; running ranks are killed by launch()
        interrupted = True
        print("interrupted: writing the jobs that finished", file=sys.stderr)
        for f in futures:
            f.cancel()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    elapsed = time.perf_counter() - t0
    info["loadavg_end"] = os.getloadavg()  # the machine may be shared: how busy it was
    results.sort(key=lambda r: (r["index"], rows.index(r["row"])))

    walls = [r["wall_s"] for r in results]
    per_kind = {k: round(statistics.median([r["wall_s"] for r in results if r["kind"] == k]), 1)
                for k in kinds if any(r["kind"] == k for r in results)}

    def rank_cpu(r):  # the busiest rank's CPU seconds: a job's wall time on idle cores
        cpus = [x["cpu_s"] for x in r["ranks"] if x["cpu_s"] is not None]
        return max(cpus) if cpus else None

    cpu_kind = {k: round(statistics.median(c), 1) for k in kinds
                if (c := [rank_cpu(r) for r in results
                          if r["kind"] == k and rank_cpu(r) is not None])}
    print()
    print(table(results, rows, kinds))
    print()
    for line in details(results):
        print(line)
    if walls:
        print(f"{len(results)} jobs in {elapsed:.0f} s: {elapsed / len(results):.1f} s a job "
              f"(median job {statistics.median(walls):.1f} s; by kind "
              + ", ".join(f"{k} {v}" for k, v in per_kind.items())
              + f"); load average {info['loadavg_start'][0]:.1f} at the start, "
              f"{info['loadavg_end'][0]:.1f} at the end")
        print("CPU seconds of a job's busiest rank (its wall time on idle cores, about), "
              "median by kind: " + ", ".join(f"{k} {v}" for k, v in cpu_kind.items()))
    summary = {
        row: {"jobs": sum(r["row"] == row for r in results),
              **{o: sum(r["row"] == row and r["outcome"] == o for r in results) for o in OUTCOMES},
              "by_kind": {k: {o: sum(r["row"] == row and r["kind"] == k and r["outcome"] == o
                                     for r in results) for o in ("ok", *OUTCOMES)}
                          for k in kinds}}
        for row in rows}
    report_json = {"benchmark": "exit_soak", "machine": info, "settings": settings,
                   "interrupted": interrupted, "elapsed_s": round(elapsed, 1),
                   "seconds_per_job": round(elapsed / max(1, len(results)), 2),
                   "median_job_s": statistics.median(walls) if walls else None,
                   "median_job_s_by_kind": per_kind, "median_rank_cpu_s_by_kind": cpu_kind,
                   "summary": summary,
                   "table": table(results, rows, kinds),
                   "jobs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report_json, indent=1))
    print(f"wrote {args.out}")
    failed = sum(r["outcome"] != "ok" for r in results if r["row"].startswith("ours"))
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())

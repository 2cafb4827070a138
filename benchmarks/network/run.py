"""Step time on throttled links: DDP comm modes side by side, 2 and 3 ranks in network namespaces.

For each world size, link and workload, the ranks (gloo over TCP, one CPU thread each) train the
same model on the same batches under each comm mode and report the median step time, its
speedup over no hook, and the bytes each rank sends per step. Links:

==========  =====================================================================================
loopback    all ranks in one namespace on its ``lo``: unthrottled
10gbit      each rank in its own namespace, veth pairs (a bridge for 3+ ranks), tc rate 10 Gbit/s
1gbit       same, 1 Gbit/s
100mbit     same, 100 Mbit/s
==========  =====================================================================================

with a 0.5 ms one-way delay where the kernel has ``sch_netem`` (see ``netns.py``). Namespaces and
``tc`` go through iproute2's ``ip`` and ``tc``, or through pyroute2 (netlink from Python) where
those are missing. Without root (or with neither) it says so and runs the ``loopback`` link
only, on the host's loopback.

GPU ranks (issue 16): ``--device cuda`` puts every rank's model and batches on ``cuda:0`` (the
ranks share the one GPU; gloo carries CUDA tensors through host memory) and ends each timed step
with ``torch.cuda.synchronize``. Workloads for it: ``xl`` (the transformer at ~303M parameters)
beside ``large`` (~43M); ``mlp`` (issue 17) is link-bound on a CPU as well.

Time to a fixed eval loss: the loss after a given step does not depend on the link (gloo and
the hooks are deterministic), so ``benchmarks/convergence.py`` trains the small transformer once
per mode (2 ranks, unthrottled) and the steps it needs to reach ``--target-loss`` are turned into
seconds on each link with the step times measured here (steps before a hook's ``start_iter``
cost what a plain all-reduce step costs on that link). The large transformer would need hours of
CPU time to reach a meaningful loss, so its column is n/a.

Usage (as root; on a fresh Debian/Ubuntu machine first ``apt-get install -y iproute2``)::

    python -m benchmarks.network                 # the full matrix (~20-25 min on 2 shared cores)
    python -m benchmarks.network --quick         # smoke test: 2 ranks, loopback and 1 Gbit/s
    python -m benchmarks.network --worlds 2 --links 1gbit --workloads large --modes none,vsa-ternary
    python -m benchmarks.network --cleanup       # remove namespaces left by a killed run
    # GPU ranks, ~3 min on one H200 (one line; benchmarks/device_cuda.sh, NETWORK=1, runs it):
    python -m benchmarks.network --device cuda --worlds 2 --links 1gbit,10gbit
        --workloads large,xl --links-for xl=10gbit --modes none,bf16,powersgd4,vsa,vsa+auto
        --no-ttt --no-pair --timed-budget 3

Every namespace is removed on exit, also on Ctrl-C, SIGTERM and errors. The tables, the
markdown and the plot come from ``report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks import comm  # noqa: E402
from benchmarks.convergence import _fmt_bytes, _machine  # noqa: E402
from benchmarks.network import netns  # noqa: E402
from benchmarks.network.report import (  # noqa: E402
    LINK_LABEL,
    add_speedups,
    add_ttt,
    check_targets,
    render,
)

LINKS = {"loopback": None, "10gbit": 10_000.0, "1gbit": 1_000.0, "100mbit": 100.0}
DELAY_MS = 0.5

# Workloads: the transformer of the convergence benchmark at two sizes. "large" (~43M
# parameters) with one 128-token sequence per rank, so that the exchange matters as much as a
# CPU step allows; "small" (~0.47M parameters, 16 sequences of 64) where it barely does.
# Timed steps: at least `timed`, more (up to `max_timed`) while they add up to less than
# --timed-budget seconds: cheap steps are noisier on a shared machine, so they get more repeats.
# "xl" (~303M parameters, 4 sequences of 128 per rank) is for GPU ranks (--device cuda): a
# step of it takes minutes on one CPU core. "mlp" (issue 17): 3 x Linear(4096, 4096), ~50M
# parameters, 8 samples per rank: far less compute than exchange, on a CPU core too;
# "mlp-small" (~2.1M) for smoke runs.
WORKLOADS = {
    "large": dict(workload="transformer", size="large", batch_size=1, warmup=3, timed=3,
                  max_timed=12),
    "small": dict(workload="transformer", size="small", batch_size=None, warmup=4, timed=10,
                  max_timed=40),
    "xl": dict(workload="transformer", size="xl", batch_size=None, warmup=3, timed=2,
               max_timed=6),
    "mlp": dict(workload="wide_mlp", size="large", batch_size=None, warmup=3, timed=3,
                max_timed=12),
    "mlp-small": dict(workload="wide_mlp", size="small", batch_size=None, warmup=3, timed=4,
                      max_timed=20),
}
# Modes: the label is the row name; options go to the hook state. The step-time runs start
# compressing at iteration 2 (the hook's default start_iter is 100, the convergence choice) so
# that the timed steps are compressed ones; PowerSGD starts at 2 as well (comm.py's default).
HOOK_START = 2
MODES = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),  # PyTorch's bf16_compress_hook
    "powersgd4": ("powersgd4", {}),  # one bucket (comm.bucket_cap_mb_for)
    # the two-phase peers (comm.py: torchft's fp8 pattern, ZeRO++ qgZ-like int4); no start_iter:
    # they compress from the first step
    "fp8-2phase": ("fp8-2phase", {}),
    "int4-2phase": ("int4-2phase", {}),
    "vsa": ("vsa", {"start_iter": HOOK_START}),  # VSAConfig's defaults (int2)
    "vsa-ternary": ("vsa-ternary", {"start_iter": HOOK_START}),
    "vsa-sign": ("vsa-sign", {"start_iter": HOOK_START}),
    "vsa+auto": ("vsa", {"start_iter": HOOK_START, "auto": True}),
    "vsa-ternary+auto": ("vsa-ternary", {"start_iter": HOOK_START, "auto": True}),
}
# --modes default: the rows of the CPU runs so far (the full matrix's run time stays as it was)
DEFAULT_MODES = ("none", "fp16", "powersgd4", "vsa-ternary", "vsa-sign", "vsa-ternary+auto")
STATELESS = ("none", "fp16", "bf16")


def ttt_modes(modes: list[str]) -> list[str]:
    """The run's modes that the time-to-target run trains: all but the ``+auto`` rows, whose
    choice depends on the link (their label is the comm name of convergence.py)."""
    return [m for m in modes if not MODES[m][1].get("auto")]
# The load of a shared machine drifts by tens of percent within minutes, more than the
# differences measured here; so every mode is timed step for step beside a no-hook model in the
# same processes, and its speedup is the median of the per-step ratios. Not where a no-hook
# step takes ~15 s and the differences are many times the drift.
UNPAIRED_LINKS = ("100mbit",)

DEFAULT_OUT = _ROOT / "benchmarks" / "results" / "network.json"
QUICK_OUT = DEFAULT_OUT.with_name("network-quick.json")

_children: list[subprocess.Popen] = []  # rank processes to end on the way out


def _end_children() -> None:
    for p in _children:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # its own session: the rank and nothing else
            except ProcessLookupError:
                pass
            p.wait()
    _children.clear()


_MAIN_PID = os.getpid()


def _on_signal(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked child (a library's helper): not ours to unwind
        os._exit(128 + signum)
    # unwinds through every `finally`: rank processes, then namespaces
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------- one group


def _warmup(mode: str, warmup: int) -> int:
    """Warm-up steps: DDP rebuilds its buckets after step 0; a stateful hook (PowerSGD, VSA)
    compresses from step 2 (allocating its residuals): one more step before timing."""
    return warmup if MODES[mode][0] not in STATELESS else max(2, warmup - 1)


def run_group(*, world: int, link: str, wl: str, modes: list[str], net: Optional[netns.Network],
              workdir: Path, args: argparse.Namespace, steps: dict) -> list[dict[str, Any]]:
    """All modes of one (world, link, workload) on one set of rank processes."""
    tag = f"{wl}-w{world}-{link}"
    results, progress = workdir / f"{tag}.jsonl", workdir / f"{tag}.progress"
    cfg = WORKLOADS[wl]
    spec = {
        "workload": cfg["workload"], "size": cfg["size"], "batch_size": cfg["batch_size"],
        "seed": 0, "timed_budget_s": args.timed_budget,
        "collective_timeout_s": args.collective_timeout,
        "results": str(results), "progress": str(progress), "device": args.device,
        "modes": [{"label": m, "comm": MODES[m][0], "options": MODES[m][1],
                   "warmup": _warmup(m, steps["warmup"]), "timed": steps["timed"],
                   "max_timed": steps["max_timed"],
                   # each mode step for step beside a no-hook model (see add_speedups), except
                   # at 100 Mbit/s, where a no-hook step takes ~15 s and dwarfs the drift
                   "pair_with": ("none" if m != "none" and link not in UNPAIRED_LINKS
                                 and not args.no_pair else None)}
                  for m in modes],
    }
    spec_path = workdir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    for f in (results, progress):
        f.write_text("")
    procs = []
    # a namespace has its own ports; the host's loopback needs a free one
    port = str(args.port if net is not None else _free_port())
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", MASTER_PORT=port)
        if net is None or link == "loopback":
            env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
            prefix = netns.exec_prefix(net.ns(0)) if net is not None else []
        else:
            env.update(MASTER_ADDR=net.addr(0), GLOO_SOCKET_IFNAME=netns.IFNAME)
            prefix = netns.exec_prefix(net.ns(r))
        log = open(workdir / f"{tag}.rank{r}.log", "w")
        p = subprocess.Popen(prefix + [sys.executable, "-m", "benchmarks.network.rank",
                                       str(spec_path)],
                             cwd=_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        log.close()
        _children.append(p)
        procs.append(p)
    error = None
    last, seen = time.monotonic(), 0
    while any(p.poll() is None for p in procs):
        time.sleep(1)
        size = progress.stat().st_size + results.stat().st_size
        if size != seen:
            seen, last = size, time.monotonic()
        if time.monotonic() - last > args.stall_timeout:
            error = f"no progress for {args.stall_timeout:.0f} s (hang?)"
            break
        bad = [(r, p.returncode) for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if bad:
            time.sleep(5)  # let the others report their error
            error = "rank exited: " + ", ".join(f"rank {r} code {c}" for r, c in bad)
            break
    _end_children()
    rows, errors = [], {}
    for line in results.read_text().splitlines():
        rec = json.loads(line)
        if "error" in rec:
            errors.setdefault(rec["label"], f"rank {rec['rank']}:\n{rec['error']}")
        else:
            rows.append(rec)
    done = {r["label"] for r in rows}
    for m in modes:
        if m not in done:
            why = errors.get(m) or error or "did not run (an earlier mode of its group failed)"
            logs = sorted(workdir.glob(f"{tag}.rank*.log"))
            tail = "\n".join(lg.read_text()[-2000:] for lg in logs) if m in errors or error else ""
            rows.append({"label": m, "comm": MODES[m][0], "error": why, "log_tail": tail})
    bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode not in (None, 0)]
    if error is None and bad:  # every mode reported, then a rank died on the way out (issue 14)
        exit_error = "rank exited: " + ", ".join(f"rank {r} code {c}" for r, c in bad)
        print(f"warning: {tag}: {exit_error}", file=sys.stderr)
        for r in rows:
            r["exit_error"] = exit_error
    for r in rows:
        r.update(world=world, link=link, workload=wl)
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- time to target


def run_ttt(args: argparse.Namespace, net: Optional[netns.Network], workdir: Path,
            modes: list[str]) -> dict:
    """Eval-loss curves of the small transformer per mode (benchmarks/convergence.py)."""
    out = workdir / "ttt.json"
    cmd = [sys.executable, str(_ROOT / "benchmarks" / "convergence.py"), "--workloads",
           "transformer", "--modes", ",".join(ttt_modes(modes)), "--seeds", "0", "--steps",
           str(args.ttt_steps), "--out", str(out)]
    if net is not None:  # its ranks use 127.0.0.1: run them on the namespace's own loopback
        cmd = netns.exec_prefix(net.ns(0)) + cmd
    print(f"time to target: {' '.join(cmd[-12:])}", flush=True)
    with open(workdir / "ttt.log", "w") as log:
        p = subprocess.Popen(cmd, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        _children.append(p)
        p.wait()
        _children.remove(p)
    if not out.exists():
        return {"error": (workdir / "ttt.log").read_text()[-2000:]}
    rep = json.loads(out.read_text())
    curves = {}
    for r in rep["results"]:
        if "seeds" in r:
            curves[r["mode"]] = {
                "curve": r["seeds"][0]["eval_curve"],
                "start_iter": (comm.POWERSGD_START_ITER if r["comm"] in comm.POWERSGD_RANKS
                               else _hook_default_start() if r["comm"] in comm.VSA_MODES
                               else 0),
            }
    return {"steps": args.ttt_steps, "target_loss": args.target_loss, "modes": curves,
            "settings": rep["settings"]}


def _hook_default_start() -> int:
    from tritter_comm import VSAConfig

    return VSAConfig().start_iter


# -------------------------------------------------------------------------------------- main


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 ranks, loopback and 1gbit, 2 timed steps, short TTT run")
    ap.add_argument("--worlds", default="2,3")
    ap.add_argument("--links", default=",".join(LINKS), help=f"of {', '.join(LINKS)}")
    ap.add_argument("--workloads", default="large,small", help=f"of {', '.join(WORKLOADS)}")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"of {', '.join(MODES)}")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the ranks' models and batches live: cpu (one thread per rank) "
                         "or cuda (every rank on cuda:0: two processes share the one GPU; gloo "
                         "carries the CUDA tensors)")
    ap.add_argument("--no-pair", action="store_true",
                    help="time every mode alone (speedups: ratios of medians) instead of step "
                         "for step beside a no-hook model: half the no-hook steps, for a "
                         "machine that is not shared")
    ap.add_argument("--links-for", action="append", default=[], metavar="WORKLOAD=LINKS",
                    help="run WORKLOAD on these links only (comma-separated), e.g. "
                         "xl=10gbit: a 300M model's no-hook step takes ~10 s at 1 Gbit/s")
    ap.add_argument("--world3-links", default="1gbit",
                    help="links run with 3 ranks (default: 1gbit only, to keep the full matrix "
                         "near 20 min on 2 cores)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps of the hook modes "
                    "(default: large 3, small 4; none/fp16 one fewer; auto rows also wait for "
                    "the hook's decision)")
    ap.add_argument("--timed", type=int, default=None,
                    help="timed steps (default: large 3, small 10)")
    ap.add_argument("--timed-budget", type=float, default=8.0,
                    help="keep timing a mode's steps (beyond --timed, up to a per-workload "
                         "maximum) while they total less than this many seconds")
    ap.add_argument("--target-loss", type=float, default=None,
                    help="eval loss for time-to-target, small transformer (default 2.35; "
                         "--quick: 2.9)")
    ap.add_argument("--ttt-steps", type=int, default=300)
    ap.add_argument("--no-ttt", action="store_true", help="skip the time-to-target runs")
    ap.add_argument("--no-netns", action="store_true", help="host loopback only, no root needed")
    ap.add_argument("--cleanup", action="store_true",
                    help=f"remove namespaces named {netns.PREFIX}* left by an interrupted run")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="run nothing: rewrite the tables, .md and .png of an earlier run")
    ap.add_argument("--port", type=int, default=29500, help="rendezvous port (in namespaces)")
    ap.add_argument("--collective-timeout", type=float, default=600.0)
    ap.add_argument("--stall-timeout", type=float, default=300.0)
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON path; .png and .md beside it (default "
                         f"{DEFAULT_OUT.relative_to(_ROOT)}, --quick: "
                         f"{QUICK_OUT.relative_to(_ROOT)})")
    args = ap.parse_args(argv)

    if args.render:
        render(json.loads(args.render.read_text()), args.render)
        return 0

    if args.cleanup:
        try:
            removed = netns.cleanup()
        except (FileNotFoundError, ImportError) as e:  # neither iproute2 nor pyroute2
            print(f"cannot clean up ({e}): nothing made here to clean up")
            return 0
        print("removed " + (", ".join(removed) if removed else "nothing"))
        return 0

    if args.quick:
        args.worlds = "2" if args.worlds == "2,3" else args.worlds
        args.links = "loopback,1gbit" if args.links == ",".join(LINKS) else args.links
        args.ttt_steps = min(args.ttt_steps, 60)
    if args.target_loss is None:
        args.target_loss = 2.9 if args.quick else 2.35
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: torch sees no CUDA device here")
        args.device = "cuda:0"
    worlds = [int(w) for w in _csv(args.worlds)]
    links, wls, modes = _csv(args.links), _csv(args.workloads), _csv(args.modes)
    for name, seq, known in (("link", links, LINKS), ("workload", wls, WORKLOADS),
                             ("mode", modes, MODES)):
        bad = [x for x in seq if x not in known]
        if bad:
            ap.error(f"unknown {name} {bad}; choose from {', '.join(known)}")
    if any(w < 2 for w in worlds):
        ap.error("--worlds: 2 or more ranks")
    links_for: dict[str, set] = {}
    for item in args.links_for:
        wl, _, lks = item.partition("=")
        if wl not in WORKLOADS or not lks or any(lk not in LINKS for lk in _csv(lks)):
            ap.error(f"--links-for {item!r}: WORKLOAD=LINK[,LINK] with a workload of "
                     f"{', '.join(WORKLOADS)} and links of {', '.join(LINKS)}")
        links_for[wl] = set(_csv(lks))
    world3_links = set(_csv(args.world3_links))

    notes = []
    use_netns = not args.no_netns
    netns_via = None
    if use_netns:
        try:
            netns_via = netns.check_available()
            print(f"network namespaces: via {netns_via}", flush=True)
        except netns.NetnsUnavailable as e:
            use_netns = False
            notes.append(f"network namespaces unavailable ({e}): ran unthrottled on the "
                         "host's loopback only")
    if not use_netns:
        if args.no_netns:
            notes.append("--no-netns: ran unthrottled on the host's loopback only")
        dropped = [lk for lk in links if lk != "loopback"]
        links = ["loopback"]
        if dropped:
            print(f"NOTE: {notes[-1]}; skipping links {', '.join(dropped)}", flush=True)

    if args.device != "cpu":
        notes.append(f"GPU ranks: every rank's model and batches on {args.device} (the ranks "
                     "share the one GPU); gloo carries the CUDA tensors (through host memory)")
    if args.no_pair:
        notes.append("--no-pair: each mode timed alone; speedups are ratios of median step "
                     "times")

    # also SIGINT: a job started in the background of a script inherits it ignored
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="tritter-network-"))
    rows: list[dict] = []
    goodput: dict = {}
    shaping: dict = {}
    ttt: dict = {}
    t_start = time.perf_counter()
    current: dict = {}  # the group running now: its finished modes survive an interruption
    interrupted = None
    try:
        try:
            for world in worlds:
                net = netns.Network(world) if use_netns else None
                world_links = links
                try:
                    if net is not None:
                        try:
                            net.create()
                        except Exception as e:  # e.g. no bridge for 3 ranks: measure what works
                            net.close()
                            net = None
                            world_links = ["loopback"] if "loopback" in links else []
                            notes.append(f"{world} ranks: the namespaces could not be made "
                                         f"({type(e).__name__}: {e}); ran "
                                         + ("unthrottled on the host's loopback only"
                                            if world_links else "nothing"))
                            print(f"NOTE: {notes[-1]}", flush=True)
                    for link in world_links:
                        if world > 2 and link not in world3_links:
                            continue
                        if net is not None:
                            if link == "loopback":
                                shaping[(world, link)] = {"rate_mbit": None, "qdisc": "lo"}
                            else:
                                shaping[(world, link)] = net.shape(LINKS[link], DELAY_MS)
                                goodput[(world, link)] = netns.goodput_mbit(net, 1.0)
                                if "note" in shaping[(world, link)]:
                                    note = shaping[(world, link)]["note"]
                                    if note not in notes:
                                        notes.append(note)
                                        print(f"NOTE: {note}", flush=True)
                        for wl in wls:
                            if wl in links_for and link not in links_for[wl]:
                                continue
                            cfg = WORKLOADS[wl]
                            timed = args.timed or (2 if args.quick else cfg["timed"])
                            steps = {"warmup": args.warmup or cfg["warmup"], "timed": timed,
                                     "max_timed": timed if args.quick or args.timed
                                     else cfg["max_timed"]}
                            t0 = time.perf_counter()
                            print(f"[{world} ranks, {LINK_LABEL[link]}, {wl}] "
                                  f"{', '.join(modes)} ...", flush=True)
                            current = dict(world=world, link=link, workload=wl,
                                           path=workdir / f"{wl}-w{world}-{link}.jsonl")
                            got = run_group(world=world, link=link, wl=wl, modes=modes, net=net,
                                            workdir=workdir, args=args, steps=steps)
                            current = {}
                            rows.extend(got)
                            for r in got:
                                print("    " + (f"{r['label']}: {r['step_s_median']:.3f} s/step, "
                                                 f"{_fmt_bytes(r['bytes_per_step'])}/step"
                                                 if "step_s_median" in r else
                                                 f"{r['label']}: FAILED {r['error'][-300:]}"),
                                      flush=True)
                            print(f"    ({time.perf_counter() - t0:.0f} s)", flush=True)
                    if (not args.no_ttt and world == 2 and "small" in wls):
                        try:
                            ttt = run_ttt(args, net, workdir, modes)
                        except Exception as e:  # keep the step times measured so far
                            ttt = {"error": f"{type(e).__name__}: {e}"}
                            print(f"time to target FAILED: {ttt['error']}", flush=True)
                finally:
                    _end_children()
                    if net is not None:
                        net.close()
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or `timeout`'s SIGTERM
            interrupted = e
            if current and current["path"].exists():
                for line in current["path"].read_text().splitlines():
                    rec = json.loads(line)
                    if "error" not in rec:
                        rec.update(world=current["world"], link=current["link"],
                                   workload=current["workload"])
                        rows.append(rec)
            notes.append(f"INTERRUPTED ({type(e).__name__}) after "
                         f"{time.perf_counter() - t_start:.0f} s: the rows that finished are here")
            print(f"NOTE: {notes[-1]}", flush=True)
    finally:
        _end_children()
        left = [n for n in (netns.list_namespaces() if use_netns else [])
                if n.startswith(f"{netns.PREFIX}{os.getpid()}")]
        if left:
            print(f"WARNING: namespaces left behind: {left}; run with --cleanup", flush=True)
    total = time.perf_counter() - t_start

    add_speedups(rows)
    add_ttt(rows, ttt)
    topology = ("each rank in its own network namespace: veth pair (2 ranks) or veth pairs to a "
                "bridge (3 ranks); tc on every veth end" if use_netns
                else "all ranks on the host loopback")
    cmd = "python -m benchmarks.network" + (" --quick" if args.quick else "")
    if argv is None and len(sys.argv) > 1:
        cmd = "python -m benchmarks.network " + " ".join(sys.argv[1:])
    report = {
        "benchmark": "network",
        "machine": _machine(),
        "settings": {
            "worlds": worlds, "links": links, "world3_links": sorted(world3_links),
            "workloads": {k: WORKLOADS[k] for k in wls},
            "modes": {m: MODES[m] for m in modes},
            "hook_start_iter": HOOK_START, "delay_ms": DELAY_MS,
            "timed_budget_s": args.timed_budget, "netns": use_netns, "netns_via": netns_via,
            "topology": topology, "device": args.device, "paired": not args.no_pair,
            "links_for": {k: sorted(v) for k, v in links_for.items()},
            "backend": "gloo", "threads_per_rank": 1, "optimizer": "AdamW",
            "quick": args.quick, "notes": notes,
            "step_time": "median over timed steps of the slowest rank's time; a barrier "
                         "(untimed) before each step",
        },
        "shaping": [{"world": w, "link": lk, **v} for (w, lk), v in shaping.items()],
        "goodput_mbit": [{"world": w, "link": lk, "mbit": v} for (w, lk), v in goodput.items()],
        "time_to_target": ttt,
        "command": cmd,
        "targets": check_targets(rows, args.device),
        "total_wall_s": total,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    plotted = render(report, args.out)
    failed = any("error" in r for r in rows) or "error" in ttt
    if failed:
        print(f"logs of the rank processes kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"total {total:.0f} s; wrote {args.out}, {args.out.with_suffix('.md')}"
          + (f" and {args.out.with_suffix('.png')}" if plotted else ""))
    if interrupted is not None:
        return 130 if isinstance(interrupted, KeyboardInterrupt) else 143
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

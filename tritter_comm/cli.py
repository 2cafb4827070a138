"""The ``tritter-comm`` command (also ``python -m tritter_comm``).

    tritter-comm demo [--quick]              2 local CPU ranks, with and without compression
    tritter-comm bench codec|convergence|network [ARGS...]   the scripts in benchmarks/
    tritter-comm info                        versions, backends, CPU features
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence


def _info(_args) -> int:
    import numpy
    import torch

    from . import __version__, get_num_threads
    from .codec import native_info

    native = native_info()

    cuda = torch.cuda.is_available()
    rows = [
        ("tritter-comm", __version__),
        ("wire format", f"v{native['format_version']}"),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("numpy", numpy.__version__),
        ("platform", f"{platform.system()} {platform.machine()}"),
        ("backends", "rust (CPU tensors), torch (" + ("CPU, CUDA" if cuda else "CPU") + ")"),
        ("CUDA", torch.cuda.get_device_name(0) if cuda else "not available"),
        ("rust kernels", native["simd_level"]),
        ("CPU features", " ".join(native["cpu_features"]) or "none detected"),
        ("codec threads", str(get_num_threads())),
        ("distributed", "available" if torch.distributed.is_available() else "not available"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


# -------------------------------------------------------------------------------------- demo

QUICK = dict(steps=24, start_iter=8)


def _demo(args) -> int:
    from . import _demo

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    bad = [m for m in modes if m not in _demo.MODES]
    if bad or not modes:
        args.parser.error(f"--modes: unknown mode(s) {', '.join(bad) or '(none given)'}; "
                          f"choose from {', '.join(_demo.MODES)}")
    steps = args.steps if args.steps is not None else (QUICK["steps"] if args.quick else 300)
    start = (args.start_iter if args.start_iter is not None
             else QUICK["start_iter"] if args.quick else min(50, max(2, steps // 6)))
    if steps < 1:
        args.parser.error("--steps must be >= 1")
    if start < 2:
        args.parser.error("--start-iter must be >= 2 (DDP rebuilds its buckets after the first "
                          "step)")
    if not 2 <= args.ranks <= 16:
        args.parser.error("--ranks must be between 2 and 16")
    try:
        return _demo.main(_demo.DemoArgs(steps=steps, start_iter=start, world=args.ranks,
                                         modes=modes, out=Path(args.out),
                                         plot=not args.no_plot, quick=args.quick))
    except _demo.RankFailure as e:
        print(f"tritter-comm demo: {e}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------------- bench

#: Benchmarks by name: the script (or package with ``__main__.py``) under benchmarks/.
BENCHMARKS = {
    "codec": "encode + decode throughput (benchmarks/codec.py)",
    "convergence": "eval loss vs bytes for each comm mode, 2 ranks (benchmarks/convergence.py)",
    "network": "step time on throttled links (benchmarks/network/)",
}
_SOURCE_HINT = (
    "The benchmarks are scripts in the source repository's benchmarks/ folder; they are not "
    "installed with the wheel. Run this command from a clone of the tritter-comm repository "
    "(or pass --source DIR, or set TRITTER_COMM_SOURCE=DIR)."
)


def _is_checkout(d: Path) -> bool:
    return (d / "benchmarks").is_dir() and (d / "pyproject.toml").is_file() and (
        "tritter-comm" in (d / "pyproject.toml").read_text(encoding="utf-8", errors="replace"))


def find_source(explicit: Optional[str] = None) -> Optional[Path]:
    """The root of a tritter-comm source checkout: --source, TRITTER_COMM_SOURCE, the current
    directory or one above it, or the checkout this package runs from (editable install)."""
    given = explicit or os.environ.get("TRITTER_COMM_SOURCE")
    if given:
        return Path(given).resolve() if _is_checkout(Path(given)) else None
    here = Path.cwd().resolve()
    for d in (here, *here.parents, Path(__file__).resolve().parent.parent):
        if _is_checkout(d):
            return d
    return None


def _bench_command(root: Path, name: str) -> Optional[list[str]]:
    script, package = root / "benchmarks" / f"{name}.py", root / "benchmarks" / name
    if script.is_file():
        return [sys.executable, str(script)]
    if (package / "__main__.py").is_file():
        return [sys.executable, "-m", f"benchmarks.{name}"]
    return None


def _available(root: Path) -> list[str]:
    found = []
    for p in sorted((root / "benchmarks").iterdir()):
        if p.suffix == ".py" and "__main__" in p.read_text(encoding="utf-8", errors="replace"):
            found.append(p.stem)
        elif p.is_dir() and (p / "__main__.py").is_file():
            found.append(p.name)
    return found


def _bench(args) -> int:
    root = find_source(args.source)
    if root is None:
        where = args.source or os.environ.get("TRITTER_COMM_SOURCE")
        print(f"tritter-comm bench: no source checkout found"
              f"{f' at {where}' if where else ''}.\n{_SOURCE_HINT}", file=sys.stderr)
        return 2
    cmd = _bench_command(root, args.name) if args.name.isidentifier() else None
    if cmd is None:
        args.parser.error(f"{root}/benchmarks has no benchmark {args.name!r} (this checkout "
                          f"has: {', '.join(_available(root)) or 'none'})")
    print("+ " + " ".join(cmd[1:] + args.args), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd + args.args, cwd=root, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # The benchmark runs in its own session (so its ranks do not get our terminal's
        # signals twice): pass the interrupt on to its whole group, then make sure it ends.
        _stop_group(proc)
        raise


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tritter-comm",
        description="Gradient compression for PyTorch distributed training.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("info", help="versions, backends and CPU features")
    s.set_defaults(func=_info)

    s = sub.add_parser(
        "demo",
        help="train a small transformer on 2 local CPU ranks with and without compression",
        description="Train a small byte-level transformer on local CPU ranks (gloo), once per "
        "mode, print a table (eval loss, bytes per step, ratio, time) and plot eval loss "
        "against bytes sent. Nothing to configure; under a minute on 2 idle cores.",
    )
    s.add_argument("--quick", action="store_true",
                   help=f"a smoke test: {QUICK['steps']} steps, compression from step "
                   f"{QUICK['start_iter']}")
    s.add_argument("--steps", type=int, default=None, help="steps per run (default 300)")
    s.add_argument("--start-iter", type=int, default=None,
                   help="steps of plain all-reduce before compression starts (default: 50, "
                   "or steps/6 if smaller)")
    s.add_argument("--modes", default="none,tritter",
                   help="comma-separated runs from none, fp16, tritter (the hook's defaults, "
                   "int2), ternary, int2, sign (default none,tritter)")
    s.add_argument("--ranks", type=int, default=2, help="local ranks (default 2)")
    s.add_argument("--out", default="tritter-comm-demo.png",
                   help="the plot's path; the results JSON goes beside it "
                   "(default ./tritter-comm-demo.png)")
    s.add_argument("--no-plot", action="store_true", help="skip the plot")
    s.set_defaults(func=_demo, parser=s)

    s = sub.add_parser(
        "bench",
        help="run a benchmark from benchmarks/ (needs a source checkout)",
        description="Run one of the benchmark scripts of a tritter-comm source checkout; the "
        "arguments after NAME go to the script (e.g. tritter-comm bench convergence --quick). "
        + _SOURCE_HINT,
    )
    s.add_argument("name", metavar="NAME",
                   help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items())
                   + "; or any other script in the checkout's benchmarks/")
    s.add_argument("--source", default=None, metavar="DIR",
                   help="the source checkout (default: the current directory or above)")
    s.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    s.set_defaults(func=_bench, parser=s)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_usage(sys.stderr)
        print("tritter-comm: error: choose a command: demo, bench or info "
              "(tritter-comm -h for help)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ntritter-comm: interrupted; every rank was stopped", file=sys.stderr)
        return 130

"""The ``tritter-comm`` command (also ``python -m tritter_comm``)."""

from __future__ import annotations

import argparse
import platform
import sys
from typing import Optional, Sequence


def _info(_args) -> int:
    import numpy
    import torch

    from . import __version__, _native, get_num_threads

    cuda = torch.cuda.is_available()
    rows = [
        ("tritter-comm", __version__),
        ("wire format", f"v{_native.FORMAT_VERSION}"),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("numpy", numpy.__version__),
        ("platform", f"{platform.system()} {platform.machine()}"),
        ("backends", "rust (CPU tensors), torch (" + ("CPU, CUDA" if cuda else "CPU") + ")"),
        ("CUDA", torch.cuda.get_device_name(0) if cuda else "not available"),
        ("rust kernels", _native.simd_level()),
        ("CPU features", " ".join(_native.cpu_features()) or "none detected"),
        ("codec threads", str(get_num_threads())),
        ("distributed", "available" if torch.distributed.is_available() else "not available"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tritter-comm",
        description="Gradient compression for PyTorch distributed training.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("info", help="versions, backends and CPU features")
    s.set_defaults(func=_info)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)

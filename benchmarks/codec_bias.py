"""Bias of one encode and decode without error feedback (issue 19): what an exchange that keeps
no residual sends, averaged over fresh keys.

For a vector ``x`` that is not one Gaussian (per-element scales ramping from 0.1 to 3), encode
and decode it with ``--draws`` fresh streams (keys), as an exchange does step after step, and
report for each scale:

- ``projection``: <mean of the decoded vectors, x> / <x, x>. 1 is unbiased; least squares
  shrinks it by the cosine squared of each spread block and its levels.
- ``mean's error``: |mean - x| / |x|: the bias, plus the sampling noise of ``--draws`` draws
  (about the one-draw error / sqrt(draws)).
- ``one-draw error``: |decode(encode(x)) - x| / |x|, the mean over draws: what a step's
  estimate costs in variance.

Rows: int2 with least squares (the codec's scale where a residual is kept), int2 with the
unbiased scale (``encode(..., unbiased=True)``, what the exchange uses without a residual),
ternary and sign (least squares; they have no unbiased scale)::

    python benchmarks/codec_bias.py --seeds 0,1 --draws 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from tritter_comm import codec  # noqa: E402

ROWS = (("int2, least squares", "int2", False), ("int2, unbiased", "int2", True),
        ("ternary, least squares", "ternary", False), ("sign, least squares", "sign", False))


def measure(mode: str, unbiased: bool, *, n: int, draws: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.linspace(0.1, 3.0, n)
    mean = torch.zeros(n, dtype=torch.float64)
    one = []
    for s in range(draws):
        y = codec.decode(codec.encode(x, seed=seed, stream=s, mode=mode, unbiased=unbiased))
        mean += y.double() / draws
        one.append(float((y - x).norm() / x.norm()))
    xd = x.double()
    return {"projection": float(mean @ xd / (xd @ xd)),
            "mean_err": float((mean - xd).norm() / xd.norm()),
            "one_err": statistics.fmean(one)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1", help="comma-separated ints: one vector each")
    ap.add_argument("--draws", type=int, default=200, help="fresh streams a vector")
    ap.add_argument("--n", type=int, default=1 << 16)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"n={args.n}, block 1024, {args.draws} draws, seeds {seeds} (mean over seeds)\n")
    print("| scale | projection | mean's error | one-draw error |")
    print("|---|---:|---:|---:|")
    for label, mode, unbiased in ROWS:
        rs = [measure(mode, unbiased, n=args.n, draws=args.draws, seed=s) for s in seeds]
        avg = {k: statistics.fmean(r[k] for r in rs) for k in rs[0]}
        print(f"| {label} | {avg['projection']:.4f} | {avg['mean_err']:.4f} | "
              f"{avg['one_err']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

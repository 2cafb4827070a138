"""What an ``int2-topk`` residual keeps of the error-feedback residual (issue 19).

FSDP's client residual covers a unit's whole gradient, so from 13 ranks the default stores only
the blocks of 64 with the most energy that fit in the rank's fp32 gradient shard
(``residual_dtype="int2-topk"``, 24 bytes a kept block). This measures, on real gradients, how
much of the residual those blocks hold.

One process trains a workload with AdamW on uncompressed gradients. At every step the flat
gradient is int2-encoded with a float32 residual (the codec's error feedback, fresh keys a step,
block 1024), and every ``--every`` steps that residual is stored, as an FSDP hook over ``N``
ranks would store it (``N`` segments, a budget of one segment in float32), in:

- ``int2``: every block, the dense form;
- ``int2-topk`` at ``N`` ranks: the blocks of most energy that fit.

Each cell is the fraction of the float32 residual's energy that the stored form gives back:
``1 - |r - stored(r)|^2 / |r|^2``, averaged over the measured steps and ``--seeds``. The
residual here is the float32 one along an uncompressed trajectory, not the one a top-k residual
would itself carry::

    python benchmarks/topk_energy.py --workloads transformer,digits --seeds 0,1,2
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

from benchmarks import workloads  # noqa: E402
from tritter_comm import codec  # noqa: E402
from tritter_comm import residual as res  # noqa: E402

RANKS = (13, 16, 32, 64, 128)


def _kept(r: torch.Tensor, fmt: str, world: int) -> tuple[float, float]:
    """(energy fraction given back, fraction of the blocks kept) of ``r`` stored in ``fmt``
    as a hook over ``world`` ranks stores it."""
    seg = -(-r.numel() // world)
    padded = torch.zeros(seg * world)
    padded[: r.numel()] = r
    q = res.make(padded.numel(), fmt, "cpu", seg, budget=4 * seg if fmt == res.TOPK else None)
    for lo in range(0, padded.numel(), seg):
        q[lo:lo + seg].copy_(padded[lo:lo + seg])
    back = 1 - float((q.dequantize() - padded).square().sum() / padded.square().sum())
    blocks = q.kept / -(-seg // res.BLOCK) if fmt == res.TOPK else 1.0
    return back, min(blocks, 1.0)


def measure(name: str, seed: int, steps: int, every: int) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    w = workloads.build(name, seed=seed)
    model = w.model
    opt = torch.optim.AdamW(model.parameters(), lr=w.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    r = torch.zeros(sum(p.numel() for p in params))
    out: dict[str, list[float]] = {}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        w.loss(model, w.batch(0, 1, step)).backward()
        g = torch.cat([p.grad.reshape(-1) for p in params])
        codec.encode(g, seed=seed, stream=step, mode="int2", residual=r)  # r: what it dropped
        opt.step()
        if step % every == every - 1:
            out.setdefault("int2", []).append(_kept(r, "int2", 1)[0])
            for n in RANKS:
                back, blocks = _kept(r, res.TOPK, n)
                out.setdefault(f"topk{n}", []).append(back)
                out.setdefault(f"blocks{n}", []).append(blocks)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="transformer,digits")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=30)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.steps} steps, measured every {args.every}, seeds {seeds} "
          "(mean over the seeds and the measured steps)\n")
    print("| workload | int2 (every block) | "
          + " | ".join(f"int2-topk, {n} ranks" for n in RANKS) + " |")
    print("|---|---:|" + "---:|" * len(RANKS))
    for name in args.workloads.split(","):
        runs = [measure(name, s, args.steps, args.every) for s in seeds]
        mean = {k: statistics.fmean(v for r in runs for v in r[k]) for k in runs[0]}
        cells = [f"{mean[f'topk{n}']:.3f} ({mean[f'blocks{n}']:.0%} of blocks)" for n in RANKS]
        print(f"| {name} | {mean['int2']:.3f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

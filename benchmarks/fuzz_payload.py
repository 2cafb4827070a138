"""Fuzz Payload.from_bytes and decode (issue 9): every malformed input must be a ValueError.

Mutates valid payloads of every mode and dtype (bit flips, byte overwrites, truncation,
extension, header fields set to extreme values) and tries random byte strings. A panic in the
Rust core or a crash would end this process; any exception other than ValueError is counted as a
failure. Prints the counts and writes JSON.

    python benchmarks/fuzz_payload.py --inputs 200000
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import tritter_comm as tc

FIELDS = {"version": (4, "<B"), "mode": (5, "<B"), "dtype": (6, "<B"), "block": (7, "<B"),
          "n": (8, "<Q"), "seed": (16, "<Q"), "stream": (24, "<Q")}
EXTREMES = {"<B": [0, 1, 2, 3, 7, 8, 15, 16, 17, 255], "<Q": [0, 1, 255, 256, 1 << 37,
                                                              (1 << 37) + 1, (1 << 64) - 1]}


def seeds(rng):
    out = []
    for mode in ("ternary", "sign", "int2"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for n in (1, 7, 300, 1025, 5000):
                x = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype)
                out.append(tc.encode(x, mode=mode, block_size=256).to_bytes())
    return out


def mutate(rng, base: bytes) -> tuple[str, bytes]:
    b = bytearray(base)
    kind = rng.integers(0, 6)
    if kind == 0:  # bit flips
        for _ in range(int(rng.integers(1, 8))):
            i = int(rng.integers(0, len(b)))
            b[i] ^= 1 << int(rng.integers(0, 8))
        return "bitflip", bytes(b)
    if kind == 1:  # byte overwrite in the body
        for _ in range(int(rng.integers(1, 8))):
            b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        return "overwrite", bytes(b)
    if kind == 2:
        return "truncate", bytes(b[: int(rng.integers(0, len(b)))])
    if kind == 3:
        return "extend", bytes(b) + rng.integers(0, 256, int(rng.integers(1, 64)),
                                                  dtype=np.uint8).tobytes()
    if kind == 4:  # a header field set to an extreme value
        name = list(FIELDS)[int(rng.integers(0, len(FIELDS)))]
        off, fmt = FIELDS[name]
        vals = EXTREMES[fmt]
        struct.pack_into(fmt, b, off, vals[int(rng.integers(0, len(vals)))])
        return f"header:{name}", bytes(b)
    return "random", rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fuzz.json")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    bases = seeds(rng)
    outcome: Counter = Counter()
    failures = []
    t0 = time.perf_counter()
    for i in range(args.inputs):
        kind, blob = mutate(rng, bases[int(rng.integers(0, len(bases)))])
        try:
            p = tc.Payload.from_bytes(blob)
            for backend in ("rust", "torch"):
                tc.decode(p, backend=backend)
            outcome[(kind, "decoded")] += 1
        except ValueError:
            outcome[(kind, "ValueError")] += 1
        except Exception as e:  # noqa: BLE001 - any other exception is a finding
            outcome[(kind, type(e).__name__)] += 1
            if len(failures) < 20:
                failures.append({"kind": kind, "error": repr(e), "bytes": blob[:64].hex()})
    dt = time.perf_counter() - t0
    kinds = sorted({k for k, _ in outcome})
    print(f"{args.inputs} inputs in {dt:.1f} s ({args.inputs / dt:,.0f}/s), seed {args.seed}")
    print("| mutation | decoded (still valid) | ValueError | other exception |")
    print("|---|---:|---:|---:|")
    for k in kinds:
        other = sum(v for (kk, r), v in outcome.items() if kk == k and r not in
                    ("decoded", "ValueError"))
        print(f"| {k} | {outcome[(k, 'decoded')]} | {outcome[(k, 'ValueError')]} | {other} |")
    print(f"other exceptions: {len(failures)}" + ("" if not failures else f" e.g. {failures[0]}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "fuzz_payload", "inputs": args.inputs, "seconds": dt,
        "outcomes": {f"{k}|{r}": v for (k, r), v in sorted(outcome.items())},
        "failures": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

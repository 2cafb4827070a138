"""Issue 19's table from several runs of benchmarks/convergence_fsdp.py: each residual form's
eval-loss gap to the same FSDP API's float32-residual row, seed by seed, then averaged.

A run is deterministic per (ranks, workload, row, seed), so rows and seeds may come from
different invocations (more seeds later, a new row beside old ones): they are joined by seed,
and where the same (ranks, workload, row, seed) appears twice, its parameters' sha256 must agree
(else this script refuses: not the same training). A row is compared on the seeds it shares with
its reference rows.

    python benchmarks/fsdp_residual_table.py benchmarks/results/convergence-fsdp-int2-*.json \\
        benchmarks/results/convergence-fsdp-unbiased-*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

BASE = "fsdp1-none"


def reference(mode: str) -> str | None:
    """The fp32-residual row a compressed FSDP row is compared with (same API and prefix)."""
    api, _, rest = mode.partition("-")
    if not rest.startswith("vsa-"):
        return None
    prefix = rest.split(":")[0] + (":start_iter=10" if ":start_iter=10" in rest else "")
    return f"{api}-{prefix}:residual_dtype=float32"


def load(path: str) -> dict[tuple, dict[int, dict[str, Any]]]:
    """(ranks, workload, row) -> seed -> that seed's record (with the row's memory)."""
    rows: dict[tuple, dict[int, dict[str, Any]]] = {}
    rep = json.load(open(path))
    world = rep["settings"]["world"]
    for r in rep["results"]:
        for s in r.get("seeds", []):
            rows.setdefault((world, r["workload"], r["mode"]), {})[s["seed"]] = {
                **s, "shard_frac": r.get("hook_fraction_of_shard")}
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--tag", action="append", default=[], metavar="FILE=NAME",
                    help="name FILE's rows without error feedback NAME (runs from before int2's "
                         "unbiased scale: the same row names, other training)")
    args = ap.parse_args(argv)
    tags = dict(t.split("=", 1) for t in args.tag)
    rows: dict[tuple, dict[int, dict[str, Any]]] = {}
    for path in args.files:
        for (world, wl, mode), seeds in load(path).items():
            name = (f"{mode} [{tags[path]}]" if path in tags and "error_feedback=False" in mode
                    else mode)
            for seed, s in seeds.items():
                old = rows.setdefault((world, wl, name), {}).get(seed)
                if old is not None and old["param_sha256"] != s["param_sha256"]:
                    raise SystemExit(f"{(world, wl, name)} seed {seed}: two runs trained "
                                     f"differently ({path})")
                rows[(world, wl, name)][seed] = s
    print("| ranks | workload | row | seeds | gap to FSDP1 uncompressed | vs fp32 residuals "
          "(se) | hook memory x shard |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for (world, wl, name) in sorted(rows):
        mode = name.split(" [")[0]
        ref = reference(mode)
        base = rows.get((world, wl, BASE))
        if base is None or name == BASE:
            continue
        v = rows[(world, wl, name)]
        seeds = sorted(set(v) & set(base))
        gaps = [100 * (v[s]["eval_loss"] / base[s]["eval_loss"] - 1) for s in seeds]
        cell = ""
        r = rows.get((world, wl, ref)) if ref else None
        if r is not None and mode != ref:
            both = [s for s in seeds if s in r]
            d = [100 * (v[s]["eval_loss"] - r[s]["eval_loss"]) / base[s]["eval_loss"]
                 for s in both]
            if len(d) > 1:
                cell = (f"{statistics.fmean(d):+.2f} pt ({statistics.stdev(d) / len(d) ** 0.5:.2f},"
                        f" {len(d)} seeds)")
        frac = v[seeds[0]]["shard_frac"] if seeds else None
        print(f"| {world} | {wl} | {name} | {len(seeds)} | {statistics.fmean(gaps):+.2f}% "
              f"({min(gaps):+.1f}..{max(gaps):+.1f}) | {cell} | "
              f"{'' if frac is None else f'{frac:.2f}x'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

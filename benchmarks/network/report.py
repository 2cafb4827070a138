"""The network benchmark's report: from the rows of a run (run.py) to speedups, time to the
target loss, the tables, the targets of issue 4, the markdown and the plot. It reads nothing but
the run's JSON, so ``python -m benchmarks.network --render JSON`` redraws an earlier run."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional

from benchmarks.convergence import _fmt_bytes

LINK_LABEL = {"loopback": "loopback", "10gbit": "10 Gbit/s", "1gbit": "1 Gbit/s",
              "100mbit": "100 Mbit/s"}


def steps_to_target(curve: list, target: float) -> Optional[float]:
    """First step the eval loss reaches ``target``, linear between eval points; None if never."""
    prev = (0, None)
    for step, loss in curve:
        if loss <= target:
            if prev[1] is None or prev[1] == loss:
                return float(step)
            return prev[0] + (step - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (step, loss)
    return None


def add_ttt(rows: list[dict], ttt: dict) -> None:
    """Seconds to the target loss for the small workload's 2-rank rows (after add_speedups: a
    mode's step time is no hook's divided by its speedup, drift-free where steps were paired)."""
    if "modes" not in ttt:
        return
    by = {(r["workload"], r["world"], r["link"], r["label"]): r for r in rows
          if "speedup_vs_none" in r}
    for r in rows:
        if r["workload"] != "small" or r["world"] != 2 or "speedup_vs_none" not in r:
            continue
        m = ttt["modes"].get(r["label"])
        base = by.get(("small", 2, r["link"], "none"))
        if m is None or base is None:
            continue
        k = steps_to_target(m["curve"], ttt["target_loss"])
        r["steps_to_target"] = k
        if k is not None:
            plain = min(k, m["start_iter"])
            t_none = _shown_s(base)
            r["time_to_target_s"] = plain * t_none + (k - plain) * t_none / r["speedup_vs_none"]


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_none``: from the step-for-step pairs where there are any (drift-free),
    else from the medians of separate rows. A group with pairs reports as no hook's step time
    the median of every paired no-hook step (``step_s_median_pooled``)."""
    key = lambda r: (r["workload"], r["world"], r["link"])  # noqa: E731
    pooled: dict = {}
    for r in rows:
        if r.get("paired"):
            pooled.setdefault(key(r), []).extend(r["paired"]["step_s"])
    base = {key(r): r["step_s_median"] for r in rows
            if r["label"] == "none" and "step_s_median" in r}
    for r in rows:
        if "step_s_median" not in r:
            continue
        if r["label"] == "none" and key(r) in pooled:
            r["step_s_median_pooled"] = statistics.median(pooled[key(r)])
            r["speedup_vs_none"] = 1.0
        elif r.get("paired"):
            r["speedup_vs_none"] = 1.0 / r["paired"]["ratio_median"]
        elif key(r) in base:
            r["speedup_vs_none"] = base[key(r)] / r["step_s_median"]


def _shown_s(r: dict) -> float:
    """The step time a table shows: no hook's pooled paired steps where there are any."""
    return r.get("step_s_median_pooled", r["step_s_median"])


def format_tables(rows: list[dict], links: list[str], goodput: dict) -> str:
    out = []
    groups = list(dict.fromkeys((r["workload"], r["world"]) for r in rows))
    for wl, world in groups:
        rs = [r for r in rows if r["workload"] == wl and r["world"] == world]
        ok = [r for r in rs if "workload_info" in r]
        if ok:
            info = ok[0]["workload_info"]
            shape = (f"{info['batch_size_per_rank']} x {info['context']} tokens" if "context"
                     in info else f"{info['batch_size_per_rank']} samples")
            out.append(f"### {info['name']} {wl}: {info['params'] / 1e6:.2f}M params, "
                       f"{shape} per rank, {world} ranks")
        else:
            out.append(f"### {wl}, {world} ranks")
        out.append("")
        present = [lk for lk in links if any(r["link"] == lk for r in rs)]
        head = ["mode", "bytes/step/rank", "vs fp32"] + [
            LINK_LABEL[lk] + (f" ({goodput[(world, lk)]:.0f})" if goodput.get((world, lk))
                              else "") for lk in present]
        out.append("| " + " | ".join(head) + " |")
        out.append("|---|" + "---:|" * (len(head) - 1))
        for label in dict.fromkeys(r["label"] for r in rs):
            cells = [label, "", ""]
            for lk in present:
                r = next((x for x in rs if x["label"] == label and x["link"] == lk), None)
                if r is None:
                    cells.append("")
                elif "error" in r:
                    cells.append("FAILED")
                else:
                    if not cells[1]:
                        cells[1] = _fmt_bytes(r["bytes_per_step"])
                        cells[2] = f"{r['fp32_bytes_per_step'] / r['bytes_per_step']:.1f}x"
                    speedup = r.get("speedup_vs_none", float("nan"))
                    c = f"{_shown_s(r):.3f} s ({speedup:.2f}x)"
                    if not r.get("replicas_identical", True):
                        c += " DRIFT"
                    cells.append(c)
            out.append("| " + " | ".join(cells) + " |")
        autos = [r for r in rs if "hook_stats" in r and "auto" in r["hook_stats"]]
        for r in autos:
            ch = r["hook_stats"]["auto"]
            n_c = sum(v == "compressed" for v in ch.values())
            line = (f"\n`{r['label']}` at {LINK_LABEL[r['link']]}: {n_c} of {len(ch)} "
                    f"buckets compressed")
            out.append(line)
        ttt = [r for r in rs if "steps_to_target" in r]
        if ttt:
            out.append("")
            out.append("Time to the target eval loss (steps from the convergence run x step "
                       "time on each link):")
            out.append("")
            out.append("| mode | steps | " + " | ".join(LINK_LABEL[lk] for lk in present) + " |")
            out.append("|---|---:|" + "---:|" * len(present))
            for label in dict.fromkeys(r["label"] for r in ttt):
                k = next(r["steps_to_target"] for r in ttt if r["label"] == label)
                cells = [label, f"{k:.0f}" if k is not None else "not reached"]
                for lk in present:
                    r = next((x for x in ttt if x["label"] == label and x["link"] == lk), None)
                    cells.append(f"{r['time_to_target_s']:.1f} s"
                                 if r and "time_to_target_s" in r else "n/a")
                out.append("| " + " | ".join(cells) + " |")
        for r in rs:
            if "error" in r:
                first = r["error"].strip().splitlines()
                out.append(f"\nFAILED {r['label']} at {r['link']}: "
                           f"{first[-1] if first else '?'}")
        out.append("")
    return "\n".join(out)


def check_targets(rows: list[dict], device: str = "cpu") -> list[dict]:
    """The issue's targets, each with its measured value and whether it is met (speedups as
    in the tables: from step-for-step pairs where there are any). CPU ranks: issue 4's; GPU
    ranks: issue 16's (43M transformer: 5x no hook and 1.5x PowerSGD rank 4 at 1 Gbit/s, 2x
    no hook at 10 Gbit/s)."""
    def speedup(wl, world, link, label):
        r = next((x for x in rows if (x["workload"], x["world"], x["link"], x["label"])
                  == (wl, world, link, label) and "speedup_vs_none" in x), None)
        return r["speedup_vs_none"] if r else None

    out = []
    if device != "cpu":
        for world in sorted({r["world"] for r in rows}):
            psgd = speedup("large", world, "1gbit", "powersgd4")
            for label in ("vsa", "vsa+auto", "vsa-ternary", "vsa-sign", "vsa-ternary+auto"):
                v, v10 = (speedup("large", world, lk, label) for lk in ("1gbit", "10gbit"))
                where = f"large, {world} ranks, GPU"
                if v:
                    out.append({"target": f"{label} >= 5x faster than none, 1 Gbit/s, {where}",
                                "value": v, "met": v >= 5})
                if v and psgd:
                    out.append({"target": f"{label} >= 1.5x faster than powersgd4, 1 Gbit/s, "
                                f"{where}", "value": v / psgd, "met": v / psgd >= 1.5})
                if v10:
                    out.append({"target": f"{label} >= 2x faster than none, 10 Gbit/s, {where}",
                                "value": v10, "met": v10 >= 2})
        return out
    for world in sorted({r["world"] for r in rows}):
        psgd = speedup("large", world, "1gbit", "powersgd4")
        for label in ("vsa-ternary", "vsa-sign"):
            v = speedup("large", world, "1gbit", label)
            if v:
                out.append({"target": f"{label} >= 3x faster than none, 1 Gbit/s, large, "
                            f"{world} ranks", "value": v, "met": v >= 3})
            if v and psgd:
                out.append({"target": f"{label} >= 1.5x faster than powersgd4, 1 Gbit/s, "
                            f"large, {world} ranks", "value": v / psgd, "met": v / psgd >= 1.5})
        for wl in ("large", "small"):
            a = speedup(wl, world, "loopback", "vsa-ternary+auto")
            if a:
                out.append({"target": f"vsa-ternary+auto <= 5% slower than none, loopback, "
                            f"{wl}, {world} ranks", "value": 1 / a - 1, "met": 1 / a <= 1.05})
    return out


def _plot(rows: list[dict], links: list[str], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r["workload"], r["world"]) for r in rows))
    if not groups:
        return False
    xs = {"100mbit": 0, "1gbit": 1, "10gbit": 2, "loopback": 3}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (wl, world) in zip(axes[0], groups):
        rs = [r for r in rows if (r["workload"], r["world"]) == (wl, world)
              and "speedup_vs_none" in r]
        for label in dict.fromkeys(r["label"] for r in rs):
            pts = sorted((xs[r["link"]], r["speedup_vs_none"]) for r in rs if r["label"] == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xticks(list(xs.values()), [LINK_LABEL[k] for k in xs])
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ticks = [t for t in (0.25, 0.5, 0.75, 0.9, 1, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20)
                 if lo <= t <= hi]
        ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
        ax.minorticks_off()
        ax.set_title(f"{wl}, {world} ranks")
        ax.set_xlabel("link (bandwidth per rank)")
        ax.set_ylabel("speedup over no hook (step time)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def analysis(rows: list[dict], hook_start: int) -> list[str]:
    """What limits the speedups, from the measured numbers (large transformer, per world)."""
    def row(world, link, label):
        return next((x for x in rows if (x["workload"], x["world"], x["link"], x["label"])
                     == ("large", world, link, label) and "speedup_vs_none" in x), None)

    out = []
    for world in sorted({r["world"] for r in rows}):
        n_lo, n_1g = row(world, "loopback", "none"), row(world, "1gbit", "none")
        v_lo, v_1g = row(world, "loopback", "vsa-ternary"), row(world, "1gbit", "vsa-ternary")
        p_1g = row(world, "1gbit", "powersgd4")
        if not (n_1g and v_1g):
            continue
        a = _shown_s(n_1g)
        text = f"Large transformer, {world} ranks: at 1 Gbit/s no hook takes {a:.2f} s a step"
        if n_lo:
            lo = _shown_s(n_lo)
            text += (f", {lo:.2f} s of which it also takes unthrottled: that much is compute "
                     f"(and gloo's own work) on this CPU, so even a free exchange could make "
                     f"the 1 Gbit/s step at most about {a / lo:.2f}x faster than no hook. The "
                     f"3x target assumes a step whose compute is small next to the "
                     f"{a - lo:.2f} s the exchange adds at 1 Gbit/s, as on a GPU.")
        else:
            text += "."
        st = v_1g.get("hook_stats", {})
        compressed_steps = st.get("steps", 0) - hook_start
        text += f" vsa-ternary is {v_1g['speedup_vs_none']:.2f}x faster than no hook there"
        if compressed_steps > 0:
            codec = (st["encode_seconds"] + st["decode_seconds"]) / compressed_steps
            text += (f"; its encode and decode cost {codec:.2f} s a step on each rank, CPU "
                     f"time that competes with the backward pass for the same cores")
        if v_lo:
            text += f" (unthrottled: {v_lo['speedup_vs_none']:.2f}x)"
        text += "."
        if p_1g:
            text += (f" PowerSGD rank 4 is {p_1g['speedup_vs_none']:.2f}x faster than no hook "
                     f"at 1 Gbit/s: 1.5x faster than PowerSGD is "
                     f"{1.5 * p_1g['speedup_vs_none']:.2f}x")
            text += (", beyond the compute bound above." if n_lo and
                     1.5 * p_1g["speedup_vs_none"] > a / lo else ".")
        out.append(text)
    return out


def write_markdown(report: dict, tables: str, path: Path) -> None:
    m = report["machine"]
    hook_start = report["settings"]["hook_start_iter"]  # the run's, not today's HOOK_START
    lines = [
        "# Step time on throttled links",
        "",
        "Reproduce (as root; `apt-get install -y iproute2` on a fresh machine):",
        "",
        "```",
        report.get("command", "python -m benchmarks.network"),
        "```",
        "",
        (f"Machine: {m['cpu_model']}, {m['affinity']} cores usable (shared with other work), "
         f"torch {m['torch']}, {m['date']}. Backend gloo over TCP, one CPU thread per rank"
         + (f", models on {report['settings']['device']}"
            if report["settings"].get("device", "cpu") != "cpu" else "") + "; "
         f"{report['settings']['topology']}. Total run time "
         f"{report['total_wall_s'] / 60:.0f} min."),
        "",
        ("Each cell: median step time (slowest rank, after warm-up) and speedup over no hook. "
         "The load of this shared machine drifts by tens of percent within minutes, so each "
         "mode is timed step for step beside a no-hook model in the same processes (steps "
         "alternate), and its speedup is the median of the per-step ratios; no hook's time is "
         "the median of all those paired steps. At 100 Mbit/s, where a no-hook step takes "
         "~15 s, modes run alone and speedups are ratios of medians. Link headers give the TCP "
         "goodput measured on the shaped link in Mbit/s. Hook rows compress from iteration "
         f"{hook_start} (the hook's default start_iter is 100); PowerSGD rank 4 runs with one "
         "bucket (comm.bucket_cap_mb_for). `vsa-ternary+auto` is timed after the hook's first "
         "decision (its probe and trial steps are warm-up)."),
        "",
        ("Time to target: the steps the small transformer needs to reach the target eval loss "
         "in `benchmarks/convergence.py` (2 ranks, AdamW, cosine schedule, seed 0; the hook at "
         "its default start_iter), times the step times measured here on each link (steps "
         "before a hook's start_iter at no hook's step time). The loss after a step does not "
         "depend on the link. The large transformer would need hours of CPU time to reach a "
         "meaningful loss: n/a."),
        "",
    ]
    for note in report["settings"].get("notes", []):
        lines += [f"Note: {note}", ""]
    builds = {r["native"]["sha256"][:12] for r in report["results"] if r.get("native")}
    if len(builds) > 1:
        lines += [f"Note: the rows ran with {len(builds)} different builds of "
                  "tritter_comm._native (rebuilt during the run; `native` in the JSON says "
                  "which row used which).", ""]
    gpu = report["settings"].get("device", "cpu") != "cpu"
    lines += [tables, "", f"## Targets (issue {16 if gpu else 4})", ""]
    for t in report["targets"]:
        v = t["value"]
        val = f"{100 * v:+.1f}%" if "5%" in t["target"] else f"{v:.2f}x"
        lines.append(f"- {t['target']}: {val}, {'met' if t['met'] else 'NOT met'}")
    lines.append("")
    lines += [p + "\n" for p in analysis(report["results"], hook_start)]
    path.write_text("\n".join(lines) + "\n")


def render(report: dict, out: Path) -> bool:
    """Print the tables; write the markdown and the PNG beside ``out``. True if plotted."""
    rows, links = report["results"], report["settings"]["links"]
    add_speedups(rows)
    add_ttt(rows, report.get("time_to_target") or {})
    report["targets"] = check_targets(rows, report["settings"].get("device", "cpu"))
    goodput = {(g["world"], g["link"]): g["mbit"] for g in report["goodput_mbit"]}
    tables = format_tables(rows, links, goodput)
    print("\n" + tables)
    for t in report["targets"]:
        print(f"target: {t['target']}: {t['value']:.3f} -> {'met' if t['met'] else 'NOT met'}")
    write_markdown(report, tables, out.with_suffix(".md"))
    return _plot(rows, links, out.with_suffix(".png"))

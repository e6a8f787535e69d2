"""Rendering results: a markdown table, JSON lines and a PNG chart.

``python -m benchmarks.report RESULTS.jsonl`` re-renders the .md and .png beside it.
"""

from __future__ import annotations

import json
import math
import statistics

COLUMNS = [
    ("workload", "workload", "{}"),
    ("label", "implementation", "{}"),
    ("batches", "batches", "{}"),
    ("total_s", "total s", "{:.4g}"),
    ("rows_per_s", "rows/s", "{:,.0f}"),
    ("x_numpy_mem", "x numpy_mem", "{:.3f}"),
    ("x_memmap_epoch", "x memmap_epoch", "{:.3f}"),
    ("x_lmdb_row_batched", "x lmdb_row_batched", "{:.2f}"),
    ("median_get_ms", "get ms (median)", "{:.3f}"),
    ("median_put_ms", "put ms (median)", "{:.3f}"),
    ("commit_s", "commit s", "{:.3f}"),
    ("peak_rss_mb", "peak RSS MB", "{:,.0f}"),
    ("peak_anon_mb", "peak RssAnon MB", "{:,.0f}"),
    ("bytes_written", "MB written", None),
    ("verified", "verified", None),
]


BASELINES = ("numpy_mem", "memmap_epoch", "lmdb_row_batched")
_MEDIANS = ("total_s", "rows_per_s", "median_get_ms", "median_put_ms", "commit_s", "bytes_written", "batches")
_MAXIMA = ("peak_rss_mb", "peak_anon_mb", "writer_slowdown")
_SUMS = ("torn_reads", "reader_gets")


def add_ratios(results: list[dict]) -> None:
    """``x_<baseline>``: our throughput over the baseline's, within the same workload and round."""
    by_workload: dict[tuple, dict[str, dict]] = {}
    for r in results:
        by_workload.setdefault((r.get("round", 0), r["workload"]), {})[r["label"]] = r
    for r in results:
        for base in BASELINES:
            ref = by_workload[(r.get("round", 0), r["workload"])].get(base)
            ok = ref and ref.get("rows_per_s") and r.get("rows_per_s")
            r[f"x_{base}"] = r["rows_per_s"] / ref["rows_per_s"] if ok else None


def summarize(results: list[dict]) -> list[dict]:
    """One row per (workload, label) over the rounds: medians, worst memory, ratio spreads.

    Ratios are taken within each round (the machine is shared: an absolute figure from one
    round says little), then their median and min-max across rounds are reported.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r.get("kind", "run"), r["workload"], r["label"]), []).append(r)
    if all(len(g) == 1 for g in groups.values()):
        return results
    summary = []
    for rows in groups.values():
        row = dict(rows[0])
        row["rounds"] = len(rows)
        if any("error" in r for r in rows):
            row["error"] = next(r["error"] for r in rows if "error" in r)
        for key in _MEDIANS:
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if values:
                row[key] = statistics.median(values)
        for key in _MAXIMA:
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if values:
                row[key] = max(values)
        for key in _SUMS:
            values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if values:
                row[key] = sum(values)
        for base in BASELINES:
            values = [r[f"x_{base}"] for r in rows if isinstance(r.get(f"x_{base}"), (int, float))]
            row[f"x_{base}"] = statistics.median(values) if values else None
            row[f"x_{base}_spread"] = (min(values), max(values)) if values else None
        row["verified"] = all(r.get("verified") for r in rows) if all("verified" in r for r in rows) else None
        summary.append(row)
    return summary


def _cell(r: dict, key: str, fmt: str | None) -> str:
    value = r.get(key)
    if key == "verified":
        if "error" in r:
            return "FAILED: " + r["error"][:60]
        if value is None:
            return "n/a"
        return "yes" if value else "NO (" + r.get("verify_detail", "") + ")"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "batches" and r.get("capped"):
        return f"{value} (capped)"
    if key == "bytes_written":
        return f"{value / 1e6:,.1f}"
    spread = r.get(f"{key}_spread")
    if spread and r.get("rounds", 1) > 1:
        return f"{fmt.format(value)} ({fmt.format(spread[0])}-{fmt.format(spread[1])})"
    return fmt.format(value)


def markdown(results: list[dict]) -> str:
    """The table (medians over rounds, with the min-max of each ratio when there were several)."""
    results = summarize(results)
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in results:
        if r.get("kind") == "readers":
            continue
        lines.append("| " + " | ".join(_cell(r, key, fmt) for key, _, fmt in COLUMNS) + " |")
    readers = [r for r in results if r.get("kind") == "readers"]
    if readers:
        lines += ["", "| readers run | writer alone s | writer with readers s | writer slowdown | "
                      "reader rows/s (all) | reader gets | torn reads | verified |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in readers:
            if "error" in r:
                lines.append(f"| {r['workload']} | FAILED: {r['error'][:80]} | | | | | | |")
                continue
            pace = f", a get every {r['reader_pause_s'] * 1e3:g} ms" if r.get("reader_pause_s") else ", busy"
            lines.append(
                f"| {r['workload']} ({r['readers']} readers, batch {r['reader_batch']}{pace}) | "
                f"{r['writer_alone_s']:.3f} | {r['writer_with_readers_s']:.3f} | {r['writer_slowdown']:.2f}x | "
                f"{r['reader_rows_per_s']:,.0f} | {r['reader_gets']:,} | {r['torn_reads']} | "
                f"{'yes' if r['verified'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_jsonl(results: list[dict], path: str) -> None:
    with open(path, "w") as fh:
        for r in results:
            fh.write(json.dumps(r, sort_keys=True) + "\n")


def chart(results: list[dict], path: str) -> None:
    """Throughput (rows/s, log scale) per implementation, grouped by workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summarize(results) if r.get("kind") != "readers" and r.get("rows_per_s")]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(8, 2 * len(workloads) + 3), 5))
    for i, label in enumerate(labels):
        xs, ys = [], []
        for j, wl in enumerate(workloads):
            match = [r for r in rows if r["workload"] == wl and r["label"] == label]
            if match:
                xs.append(j + (i - (len(labels) - 1) / 2) * width)
                ys.append(match[0]["rows_per_s"])
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_yscale("log")
    ax.set_ylabel("rows/s (get + put, commits included; log scale)")
    ax.set_title("lmdb_embeddings vs alternatives: throughput per workload")
    if labels:
        ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main(argv=None) -> None:
    import os
    import sys

    path = (argv or sys.argv[1:])[0]
    results = read_jsonl(path)
    add_ratios(results)
    stem = os.path.splitext(path)[0]
    meta = results[0].get("meta", {}) if results else {}
    with open(stem + ".md", "w") as fh:
        fh.write(f"Suite `{meta.get('suite')}`, {meta.get('started')}, {meta.get('cpus')} CPUs, "
                 f"Python {meta.get('python')}, commit {meta.get('commit')}, {meta.get('rounds', 1)} round(s): "
                 "medians, with the min-max of each ratio over the rounds\n\n")
        fh.write(markdown(results))
    chart(results, stem + ".png")


if __name__ == "__main__":
    main()

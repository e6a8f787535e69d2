#!/usr/bin/env python
"""Run the torture suite (tests/torture) at a chosen size and print its summary table.

    python tools/torture.py                      # the long run (1000 kills, 2000 restore fuzz cases ...)
    python tools/torture.py --scale ci           # the bounded CI run
    python tools/torture.py --set commit_kills=200 --set commit_rows=50000   # any knob
    python tools/torture.py -k crash             # pytest -k filter

Every scenario appends its counters to a JSON-lines report before asserting on them, so
the table is printed even when a scenario fails; the exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COLUMNS = [
    ("kills survived", lambda r: _kills(r)),
    ("rows lost", lambda r: r.get("rows_lost")),
    ("inconsistent opens", lambda r: r.get("inconsistent_opens")),
    ("torn reads", lambda r: _sum(r, "torn_reads", "torn_dumps") if "torn_reads" in r else None),
    ("fuzz cases", lambda r: r.get("fuzz_cases", r.get("faults"))),
    ("clean errors", lambda r: r.get("clean_errors")),
    ("unclean failures", lambda r: _sum(r, "unclean_failures", "wrong_results", "crashes", "reader_errors",
                                        "dump_errors", "backwards")),
]
SHOWN_ELSEWHERE = {"scenario", "scale", "kills", "kills_survived", "rows_lost", "inconsistent_opens", "torn_reads",
                   "torn_dumps", "fuzz_cases", "faults", "clean_errors", "unclean_failures", "wrong_results",
                   "crashes", "reader_errors", "dump_errors", "backwards"}


def _kills(r: dict):
    return f"{r['kills_survived']}/{r['kills']}" if "kills" in r else None


def _sum(r: dict, *keys: str) -> int:
    return sum(int(r.get(k, 0)) for k in keys)


def table(records: list[dict]) -> str:
    head = ["scenario", *(name for name, _ in COLUMNS)]
    rows = [[r["scenario"], *("" if (v := f(r)) is None else str(v) for _, f in COLUMNS)] for r in records]
    totals = ["TOTAL"]
    for i, (name, _) in enumerate(COLUMNS, start=1):
        cells = [row[i] for row in rows if row[i]]
        if name == "kills survived":
            totals.append(f"{sum(int(c.split('/')[0]) for c in cells)}/{sum(int(c.split('/')[1]) for c in cells)}")
        else:
            totals.append(str(sum(int(c) for c in cells)))
    rows.append(totals)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def details(records: list[dict]) -> str:
    lines = []
    for r in records:
        extra = {k: v for k, v in r.items() if k not in SHOWN_ELSEWHERE}
        if extra:
            lines.append(f"- {r['scenario']}: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=("ci", "long"), default="long")
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=N",
                        help="override one size knob (see tests/torture/*.py: tl.knob(...))")
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset of scenarios)")
    parser.add_argument("--report", default=None, help="keep the JSON-lines report at this path")
    args = parser.parse_args()

    report = args.report or tempfile.mktemp(prefix="torture-", suffix=".jsonl")
    if os.path.exists(report):
        os.remove(report)
    env = dict(os.environ, TORTURE_SCALE=args.scale, TORTURE_REPORT=report)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for item in args.set:
        name, _, value = item.partition("=")
        env[f"TORTURE_{name.upper()}"] = str(int(value))
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "torture", "-p", "no:cacheprovider", "tests/torture"]
    if args.k:
        cmd += ["-k", args.k]
    started = time.monotonic()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    minutes = (time.monotonic() - started) / 60
    records = [json.loads(line) for line in open(report)] if os.path.exists(report) else []
    print(f"\n## Torture summary (scale={args.scale}, {minutes:.1f} min, pytest exit {rc})\n")
    print(f"command: {' '.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])}\n")
    if records:
        print(table(records))
        print()
        print(details(records))
    else:
        print("no scenario reported (see the pytest output above)")
    if not args.report:
        os.remove(report) if os.path.exists(report) else None
    return rc


if __name__ == "__main__":
    sys.exit(main())

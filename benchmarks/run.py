"""Run a benchmark suite: ``python -m benchmarks.run --suite quick|full``.

Every (implementation, workload) pair runs in its own subprocess (``benchmarks.worker``)
while this process samples the child's RssAnon; results are printed as a markdown
table and written as JSON lines, a markdown file and a PNG chart into ``--out``.
Timings are only meaningful as ratios within one run (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from . import report
from .procstat import AnonSampler
from .scratch import scratch_dir
from .workloads import suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

_MEDIUM_WRITER = {"n": 100_000, "dim": 128, "batch": 256, "epochs": 2, "commit_every_batches": 50,
                  "readers": 4, "reader_batch": 256}
# busy readers measure CPU contention as much as the store (5 processes on 2 cores here);
# paced readers (a batch every 10 ms each, like DataLoader workers ahead of a trainer)
# measure whether readers get in the writer's way
READERS = {
    "quick": [{"workload": "readers_reduced", "n": 20_000, "dim": 128, "batch": 256, "epochs": 1,
               "commit_every_batches": 10, "readers": 2, "reader_batch": 256}],
    "full": [dict(_MEDIUM_WRITER, workload="readers_busy", reader_pause_s=0.0),
             dict(_MEDIUM_WRITER, workload="readers_paced", reader_pause_s=0.01)],
}


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_child(argv: list[str], timeout: float) -> dict:
    """Run a benchmark child; return its RESULT dict plus peak RssAnon, or an ``error``."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=_child_env())
    with AnonSampler(proc.pid) as sampler:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - start}
        except BaseException:  # SIGTERM or Ctrl-C here: the child goes too (its stores are being removed)
            proc.kill()
            proc.wait()
            raise
    result = {"wall_s": time.perf_counter() - start, "peak_anon_mb": sampler.peak_kib / 1024}
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (err.strip().splitlines() or ["no output"])[-1]
        result["error"] = f"exit {proc.returncode}: {tail}"
        return result
    result.update(json.loads(lines[-1][len("RESULT "):]))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("quick", "full"), default="quick")
    parser.add_argument("--out", default=None, help="directory for results (default: a temp dir for quick, "
                        "benchmarks/results for full)")
    parser.add_argument("--workdir", default=None, help="scratch directory for the stores (default: temp)")
    parser.add_argument("--only", default=None, help="comma-separated workload names to run")
    parser.add_argument("--labels", default=None, help="comma-separated implementation labels to run")
    parser.add_argument("--no-readers", action="store_true", help="skip the readers run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument("--rounds", type=int, default=1, help="run everything this many times, interleaved; the "
                        "table gives medians and the min-max of each ratio (default 1)")
    args = parser.parse_args(argv)
    out_dir = args.out or (RESULTS if args.suite == "full" else tempfile.mkdtemp(prefix="bench-out-"))
    os.makedirs(out_dir, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    labels = set(args.labels.split(",")) if args.labels else None
    meta = {"suite": args.suite, "python": platform.python_version(), "cpus": os.cpu_count(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rounds": args.rounds,
            "commit": _git_commit()}
    results = []
    with scratch_dir("bench-work-", keep=args.workdir) as work:  # the stores: removed on any exit, SIGTERM too
        for round_ in range(args.rounds):
            results += _one_round(args, work, only, labels, round_)
    report.add_ratios(results)
    for r in results:
        r["meta"] = meta
    table = report.markdown(results)
    print(table)
    report.write_jsonl(results, os.path.join(out_dir, f"{args.suite}.jsonl"))
    report.main([os.path.join(out_dir, f"{args.suite}.jsonl")])
    print(f"results in {out_dir}", file=sys.stderr)
    failed = [r for r in results if "error" in r or r.get("verified") is False or r.get("torn_reads")]
    return 1 if failed else 0


def _git_commit() -> str | None:
    """The commit the measured code is at (``+dirty`` with uncommitted changes), for the record."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def _one_round(args, work: str, only, labels, round_: int) -> list[dict]:
    """Every (workload, implementation) pair once, then the readers runs."""
    results = []
    for wl in suite(args.suite):
        if only and wl.name not in only:
            continue
        for label, (impl, options, cap) in _rotated(list(wl.runs.items()), round_):
            if labels and label not in labels:
                continue
            scratch = os.path.join(work, f"{wl.name}-{label}")
            max_batches = cap if cap is not None else wl.max_batches
            spec = {"workload": wl.as_dict() | {"runs": {}, "max_batches": max_batches}, "impl": impl,
                    "options": options, "dir": scratch}
            res = run_child(["-m", "benchmarks.worker", json.dumps(spec)], args.timeout)
            res.update(workload=wl.name, label=label, impl=impl, options=options, n=wl.n, dim=wl.dim,
                       batch=wl.batch, epochs=wl.epochs, order=wl.order, max_batches=max_batches,
                       capped=cap is not None, persistent=impl != "numpy_mem", round=round_)
            if impl == "numpy_mem" and "verified" in res:
                res["verify_detail"] += " (in memory: nothing persistent to reopen)"
            results.append(res)
            shutil.rmtree(scratch, ignore_errors=True)
            _progress(res)
    for readers in [] if args.no_readers else READERS[args.suite]:
        if only and readers["workload"] not in only:
            continue
        scratch = os.path.join(work, readers["workload"])
        spec = dict(readers, dir=scratch)
        res = run_child(["-m", "benchmarks.readers", "writer", json.dumps(spec)], args.timeout)
        res.update(kind="readers", label="ours_default", round=round_, **readers)
        results.append(res)
        shutil.rmtree(scratch, ignore_errors=True)
        _progress(res)
    return results


def _rotated(runs: list, round_: int) -> list:
    """The runs of a workload, starting one further along each round.

    Measured: on this VM the first store run after the baselines is slower than the next
    one of the SAME configuration (medium, fresh store: 0.43-0.98M vs 0.95-1.33M rows/s,
    see PERF_LOG), so a fixed order would always hand that slot to the same label.
    """
    shift = round_ % len(runs) if runs else 0
    return runs[shift:] + runs[:shift]


def _progress(res: dict) -> None:
    state = res.get("error") or ("verified" if res.get("verified") else "NOT VERIFIED")
    speed = f"{res['rows_per_s']:,.0f} rows/s" if "rows_per_s" in res else ""
    print(f"[bench] {res['workload']:>16} {res['label']:>18} {speed:>18} {state}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

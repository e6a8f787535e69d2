"""Two store labels of one workload, A/B with their order swapped every round.

``python -m benchmarks.ab_order [--workload medium] [--labels ours_default,ours_tuned]
[--rounds 4] [--sync] [--pretouch-gb G]`` runs memmap_epoch, then the two labels (A B, then B A next round),
each in its own worker process on a fresh store, and prints rows/s, get/put medians and the
commit time of every run. It separates a label's speed from its slot in the run: on a
shared VM the first store run after the baseline can be the slow one (benchmarks/results/
PERF_LOG.md, "medium: ours_default and ours_tuned are one configuration").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

from .run import run_child
from .scratch import scratch_dir
from .workloads import suite


def pretouch(gb: float) -> None:
    """Write ``gb`` GB of fresh anonymous memory, then free it.

    On this VM, guest memory that was never touched (or that the guest handed back to the
    host as free) costs ~2.9 s/GB at its first touch, and a fresh store's first commits need
    new page-cache pages for LMDB's second copy: the run pays for the VM, not for the store.
    Touching memory first shows what a machine with backed RAM would do (PERF_LOG).
    """
    np.ones(int(gb * (1 << 30)) // 8)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="medium")
    parser.add_argument("--labels", default="ours_default,ours_tuned")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sync", action="store_true", help="os.sync() and wait 1 s before each run")
    parser.add_argument("--pretouch-gb", type=float, default=0.0,
                        help="write this many GB of anonymous memory (then free it) before each run: see below")
    args = parser.parse_args(argv)
    workload = next(w for w in suite("full") if w.name == args.workload)
    first, second = args.labels.split(",")
    with scratch_dir("ab-order-") as work:  # removed on any exit, SIGTERM and Ctrl-C included
        for round_ in range(args.rounds):
            pair = [first, second] if round_ % 2 == 0 else [second, first]
            for label in ["memmap_epoch", *pair]:
                impl, options, _ = workload.runs[label]
                spec = {"workload": workload.as_dict() | {"runs": {}, "max_batches": workload.max_batches},
                        "impl": impl, "options": options, "dir": os.path.join(work, label)}
                if args.pretouch_gb:
                    pretouch(args.pretouch_gb)
                if args.sync:
                    os.sync()
                    time.sleep(1)
                res = run_child(["-m", "benchmarks.worker", json.dumps(spec)], 900)
                print(f"round {round_} {label:>14}: {res.get('rows_per_s', 0):>12,.0f} rows/s  get "
                      f"{res.get('median_get_ms', 0):.3f} ms  put {res.get('median_put_ms', 0):.3f} ms  commit "
                      f"{res.get('commit_s', 0):.3f} s  {res.get('error', '')}", flush=True)
                shutil.rmtree(spec["dir"], ignore_errors=True)


if __name__ == "__main__":
    main()

"""Run one (implementation, workload) pair in this process and print one JSON result line.

Invoked by ``benchmarks.run`` in a fresh subprocess:
``python -m benchmarks.worker SPEC_JSON`` where SPEC holds the workload, the
implementation, its options and a scratch directory.

Verification: before the timed run a sample of rows is read back (the in-memory
reference); the reference then gets the same ``+ 0.01`` per update the run applies, and
after the run the table is closed, reopened from disk and the sample compared bit for bit.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from .impls import IMPLEMENTATIONS
from .procstat import status_kib, write_bytes
from .workloads import Workload, batch_ids, epoch_order

SAMPLE = 2000
STEP = np.float32(0.01)


def _sample_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 99])
    picked = rng.choice(n, size=min(SAMPLE, n), replace=False)
    return np.unique(np.concatenate([picked, [0, n - 1]])).astype(np.int64)


def run(spec: dict) -> dict:
    wl = Workload(**spec["workload"])
    impl = IMPLEMENTATIONS[spec["impl"]](spec["dir"], wl.n, wl.dim, spec.get("options"))
    sample = _sample_rows(wl.n, wl.seed)
    t = time.perf_counter()
    impl.setup(wl.seed)
    setup_s = time.perf_counter() - t
    impl.open()
    anon_open_mb = status_kib("self", "RssAnon") / 1024  # what the process holds before the timed run
    reference = impl.get(sample).copy()
    updates = np.zeros(len(sample), np.int64)

    rng = np.random.default_rng([wl.seed, 1])
    get_ms, put_ms, totals, commits = [], [], [], []
    written0 = write_bytes()
    for _ in range(wl.repeats):
        total, commit, done = _timed_pass(impl, wl, rng, sample, updates, get_ms, put_ms)
        totals.append(total)
        commits.append(commit)
    total_s, commit_s = float(np.median(totals)), float(np.median(commits))
    rows_done = _rows_done(wl, done)
    impl.close()
    written = (write_bytes() - written0) // wl.repeats

    for k in range(int(updates.max(initial=0))):
        reference[updates > k] += STEP
    if impl.persistent:
        impl = IMPLEMENTATIONS[spec["impl"]](spec["dir"], wl.n, wl.dim, spec.get("options"))
        impl.open()
        got = np.array(impl.get(sample), copy=True)
        impl.close()
    else:
        got = impl.get(sample)
    mismatched = int((got.view(np.uint32) != reference.view(np.uint32)).any(axis=1).sum())
    return {
        "total_s": total_s,
        "rows": rows_done,
        "rows_per_s": rows_done / total_s if total_s > 0 else float("inf"),
        "batches": done,
        "repeats": wl.repeats,
        "median_get_ms": float(np.median(get_ms)) if get_ms else 0.0,
        "median_put_ms": float(np.median(put_ms)) if put_ms else 0.0,
        "commit_s": commit_s,
        "setup_s": setup_s,
        "anon_at_open_mb": anon_open_mb,
        "peak_rss_mb": status_kib("self", "VmHWM") / 1024,
        "bytes_written": written,
        "verified": mismatched == 0,
        "verify_detail": f"{mismatched} of {len(sample)} sampled rows differ" if mismatched else
                         f"{len(sample)} sampled rows bit-identical",
        "updated_sample_rows": int((updates > 0).sum()),
    }


def _timed_pass(impl, wl: Workload, rng, sample, updates, get_ms: list, put_ms: list) -> tuple:
    """One timed run of the workload (its epochs, each ending in a commit): (total s, commit s, batches)."""
    commit_s, done = 0.0, 0
    budget = wl.max_batches if wl.max_batches is not None else 1 << 62
    start = time.perf_counter()
    for _ in range(wl.epochs):
        order = epoch_order(wl, rng)
        n_batches = min(wl.batches_per_epoch(), budget - done)
        for b in range(n_batches):
            ids = batch_ids(wl, order, b)
            t0 = time.perf_counter()
            rows = impl.get(ids)
            t1 = time.perf_counter()
            rows = rows + STEP
            t2 = time.perf_counter()
            impl.put(ids, rows)
            t3 = time.perf_counter()
            get_ms.append((t1 - t0) * 1e3)
            put_ms.append((t3 - t2) * 1e3)
        done += n_batches
        t0 = time.perf_counter()
        impl.commit()
        commit_s += time.perf_counter() - t0
        _count_updates(updates, sample, wl, order, n_batches)
        if done >= budget:
            break
    return time.perf_counter() - start, commit_s, done


def _rows_done(wl: Workload, batches: int) -> int:
    per_epoch = wl.batches_per_epoch()
    full_epochs, rest = divmod(batches, per_epoch)
    return full_epochs * wl.n + min(wl.n, rest * wl.batch)


def _count_updates(updates, sample, wl, order, n_batches) -> None:
    """Add 1 for every sampled row that the epoch's first ``n_batches`` batches touched."""
    touched_rows = min(wl.n, n_batches * wl.batch)
    if order is None:
        updates += sample < touched_rows
    else:
        updates += np.isin(sample, order[:touched_rows])


def main(argv=None) -> None:
    spec = json.loads((argv or sys.argv[1:])[0])
    result = run(spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

"""Reads of a table larger than any cache, in shuffled order, against ``np.memmap`` (issue 19's read targets).

``python -m benchmarks.big_reads [--rows 2000000] [--rounds 3] [--only batch,row,workers] [--workdir DIR]``

* ``batch``: a read-only handle with default options, random batches of 256 IDs, against ``mm[ids]`` of an
  ``np.memmap`` holding the same rows (target: >= 0.8x memmap's rows/s);
* ``row``: ``get([i])`` of random rows against ``mm[[i]]`` (target: >= 0.33x);
* ``workers``: four DataLoader workers over ``EmbeddingDataset`` with ``shuffle=True`` (batches of 256) while
  a writer process rewrites the whole table and commits, round after round, against the same workers over an
  ``np.memmap`` written and flushed the same way (target: >= 0.8x memmap's rows/s, 0 torn batches: every row
  of a batch must come from the same round).

Both sides of a target run in the same process (``batch``, ``row``: interleaved call by call) or back to back
(``workers``), on a table in the page cache. Every call is timed twice: wall clock (the figure the targets
are about, meaningful on a quiet machine only) and the calling thread's CPU time (``time.thread_time``: what
to compare while other processes load the CPUs; for ``workers`` summed over the workers' reads). Each round
also checks that ours returned exactly memmap's rows. Results: ``benchmarks/results/big_reads.{jsonl,md}``
with the commit measured. The table takes ``rows x 512`` bytes twice (store + .npy) in ``--workdir``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import lmdb_embeddings as le

from . import targets
from .run import RESULTS, ROOT
from .scratch import scratch_dir

DIM, BATCH = 128, 256
_BLOCK = 65_536  # rows per block when building or rewriting the table (bounded memory)


def build(work: str, rows: int) -> tuple[str, str]:
    """The store (default options, init "normal") and an .npy copy of its rows: (store path, npy path)."""
    path, npy = os.path.join(work, "store"), os.path.join(work, "rows.npy")
    le.EmbeddingStore.create(path, rows, DIM, seed=0, overwrite=True).close()
    copy_rows(path, npy, rows, "w+")
    return path, npy


def copy_rows(path: str, npy: str, rows: int, mode: str = "r+") -> None:
    """Write the store's committed rows into the .npy file (made with ``mode="w+"``), block by block."""
    mm = np.lib.format.open_memmap(npy, mode, np.float32, (rows, DIM))
    with le.EmbeddingStore.open(path, readonly=True) as reader:
        for start in range(0, rows, _BLOCK):
            mm[start : start + _BLOCK] = reader.get(np.arange(start, min(rows, start + _BLOCK)))
    mm.flush()
    del mm


def _warm_page_cache(npy: str, path: str) -> None:
    for name in (npy, os.path.join(path, "data.mdb")):
        with open(name, "rb") as fh:
            while fh.read(1 << 24):
                pass


class _Clock:
    """Wall and thread-CPU seconds of the calls it times."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __call__(self, fn, *args):
        w, c = time.perf_counter(), time.thread_time()
        out = fn(*args)
        self.cpu += time.thread_time() - c
        self.wall += time.perf_counter() - w
        return out


READER_OPTIONS: dict = {}  # the read-only handles' open options (default options unless --cache-mb)


def reads_round(path: str, npy: str, rows: int, calls: int, size: int, seed: int) -> dict:
    """``calls`` gets of ``size`` random IDs, ours and memmap's interleaved call by call."""
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, rows, size) for _ in range(calls)]
    mm = np.load(npy, mmap_mode="r")
    ours, base = _Clock(), _Clock()
    with le.EmbeddingStore.open(path, readonly=True, **READER_OPTIONS) as reader:
        for ids in picks[: max(1, calls // 10)]:  # warm: the reader's first lookups, the first page faults
            reader.get(ids)
            mm[ids]
        checked = True
        for i, ids in enumerate(picks):
            got = ours(reader.get, ids)
            want = base(mm.__getitem__, ids)
            if i % 97 == 0:
                checked &= bool(np.array_equal(got, want))
        stats = reader.stats()
    n = calls * size
    return {"ours_rows_per_s": n / ours.wall, "baseline_rows_per_s": n / base.wall,
            "ratio": base.wall / ours.wall, "ours_cpu_us_per_call": 1e6 * ours.cpu / calls,
            "baseline_cpu_us_per_call": 1e6 * base.cpu / calls, "cpu_ratio": base.cpu / ours.cpu,
            "identical": checked, "map_rows": stats["map_rows"], "chunks_loaded": stats["chunks_loaded"]}


def batch_round(path, npy, rows, scale, seed):
    return reads_round(path, npy, rows, calls=scale, size=BATCH, seed=seed)


def row_round(path, npy, rows, scale, seed):
    return reads_round(path, npy, rows, calls=20 * scale, size=1, seed=seed)


# ----------------------------------------------------------------------------- workers
_WRITER = r"""
import sys, numpy as np, lmdb_embeddings as le
kind, path, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
block = 65536
r = 0
if kind == "ours":
    store = le.EmbeddingStore.open(path)
    while True:
        r += 1
        for start in range(0, rows, block):
            ids = np.arange(start, min(rows, start + block))
            store.put(ids, np.full((len(ids), 128), r, np.float32))
        store.commit()
        print(r, flush=True)
else:
    mm = np.load(path, mmap_mode="r+")
    while True:
        r += 1
        for start in range(0, rows, block):
            mm[start : start + block] = r
        mm.flush()
        print(r, flush=True)
"""


class _MemmapRows(targets.MemmapRows):
    """The baseline dataset: rows of an np.memmap (opened lazily in each worker), a batch per call, as tensors
    (as ``EmbeddingDataset`` gives them)."""

    def __getitems__(self, indices):
        import torch

        if self.mm is None:
            self.mm = np.load(self.path, mmap_mode="r")
        return list(torch.from_numpy(self.mm[np.asarray(indices)]).unbind(0))


class _CpuTimed:
    """A dataset wrapper whose batches carry the worker thread's CPU seconds spent reading them."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitems__(self, indices):
        start = time.thread_time()
        rows = self.inner.__getitems__(indices)
        return rows, time.thread_time() - start


def _collate(item):
    import torch

    rows, cpu = item
    return torch.stack(rows), cpu


def _read_while_writing(dataset, writer: subprocess.Popen, batches: int) -> dict:
    from torch.utils.data import DataLoader

    loader = DataLoader(_CpuTimed(dataset), batch_size=BATCH, shuffle=True, num_workers=4, prefetch_factor=4,
                        collate_fn=_collate)
    torn = got = 0
    cpu = 0.0
    start = time.perf_counter()
    for batch, batch_cpu in loader:
        values = batch[:, 0]
        torn += int(values.min() != values.max())
        cpu += batch_cpu
        got += 1
        if got == batches:
            break
    seconds = time.perf_counter() - start
    if writer.poll() is not None:
        raise RuntimeError(f"the writer process ended early (exit {writer.returncode}): nothing was measured")
    return {"rows_per_s": got * BATCH / seconds, "cpu_us_per_batch": 1e6 * cpu / got, "torn": torn, "batches": got}


def workers_round(path, npy, rows, scale, seed):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = {}
    for kind in ("ours", "baseline"):
        ours = kind == "ours"
        dataset = le.EmbeddingDataset(le.EmbeddingStore.open(path, readonly=True, **READER_OPTIONS)) if ours else \
            _MemmapRows(npy, rows)
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, kind, path if kind == "ours" else npy, str(rows)],
                                  stdout=subprocess.PIPE, env=env, text=True)
        try:
            writer.stdout.readline()  # one whole round written (and committed) before reading starts
            out[kind] = _read_while_writing(dataset, writer, 4 * scale)
        finally:
            writer.kill()
            writer.wait(30)
        if kind == "ours":
            dataset.store.close()
    copy_rows(path, npy, rows)  # the two writers stopped at different rounds: the next rounds compare equal tables
    ours, base = out["ours"], out["baseline"]
    return {"ours_rows_per_s": ours["rows_per_s"], "baseline_rows_per_s": base["rows_per_s"],
            "ratio": ours["rows_per_s"] / base["rows_per_s"], "ours_cpu_us_per_batch": ours["cpu_us_per_batch"],
            "baseline_cpu_us_per_batch": base["cpu_us_per_batch"],
            "cpu_ratio": base["cpu_us_per_batch"] / ours["cpu_us_per_batch"],
            "ours_torn": ours["torn"], "baseline_torn": base["torn"], "identical": ours["torn"] == 0}


TARGETS = {  # name -> (function, what the ratio means, target)
    "batch": (batch_round, "rows/s / memmap rows/s, read-only handle, random batches of 256", ">= 0.8"),
    "row": (row_round, "rows/s / memmap rows/s, get([i]) of random rows", ">= 0.33"),
    "workers": (workers_round, "rows/s / memmap rows/s, 4 DataLoader workers, shuffle=True, writer committing",
                ">= 0.8, 0 torn"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=int, default=2000, help="calls per round (batch: this many batches)")
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument("--workdir", default=None, help="where the table is built (default: a temporary directory)")
    parser.add_argument("--cache-mb", type=float, default=None,
                        help="the readers' cache_mb (default: the default options; small-scale runs pass a cache "
                             "smaller than the table, as 2M rows are larger than the default)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.cache_mb is not None:
        READER_OPTIONS["cache_mb"] = args.cache_mb
    names = [n for n in args.only.split(",") if n]
    results = []
    with scratch_dir("bench-big-reads-", parent=args.workdir) as work:  # removed on any exit, SIGTERM included
        path, npy = build(work, args.rows)
        _warm_page_cache(npy, path)
        for round_ in range(args.rounds):
            for name in names:
                res = TARGETS[name][0](path, npy, args.rows, args.scale, seed=round_)
                res.update(target=name, round=round_, rows=args.rows)
                results.append(res)
                print(f"[big_reads] round {round_} {name}: ratio {res['ratio']:.3f} (thread CPU ratio "
                      f"{res['cpu_ratio']:.3f}), identical {res['identical']}", file=sys.stderr, flush=True)
    meta = targets.run_meta(args.rounds, rows=args.rows)
    targets.write_results(args.out, "big_reads", results, meta, render(results, meta))
    return 0 if all(r["identical"] for r in results) else 1


def render(results: list[dict], meta: dict) -> str:
    lines = [f"Big reads, {meta['started']}, commit {meta['commit']}, {meta['rows']:,} x {DIM} rows, "
             f"{meta['rounds']} round(s), {meta['cpus']} CPUs", "",
             "| target | wall ratio (median) | min-max | thread-CPU ratio (median) | target | detail (median) |",
             "|---|---|---|---|---|---|"]
    for name, (_, meaning, goal) in TARGETS.items():
        rows = [r for r in results if r["target"] == name]
        if not rows:
            continue
        ratios, cpu = [r["ratio"] for r in rows], [r["cpu_ratio"] for r in rows]
        text = targets.median_details(rows, ("ratio", "cpu_ratio", "round", "rows"))
        lines.append(f"| {name}: {meaning} | {statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} "
                     f"| {statistics.median(cpu):.3f} | {goal} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

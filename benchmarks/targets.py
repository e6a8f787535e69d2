"""The issue-11 targets that the workload suite (``benchmarks.run``) does not cover, in interleaved rounds.

``python -m benchmarks.targets [--rounds 3] [--only commit,row_reads,workers,training]`` runs:

* ``commit``: the steady-state commit of D dirty bytes (a whole table rewritten, after three
  warm-up commits) against ``np.memmap.flush`` of the same D bytes;
* ``row_reads``: a read-only handle's ``get([i])`` of random rows of a committed table in
  the page cache, against a row read of an ``np.memmap`` (``mm[[i]]``);
* ``workers``: four DataLoader workers reading random batches of 256 while a writer
  process commits whole-table rounds: ours through ``EmbeddingDataset`` (a batch per get),
  the baseline an ``np.memmap`` read by the same workers and written + flushed by the same
  writer. Every batch is checked for rows of two different rounds (torn reads);
* ``training``: an epoch (every ID once, batches of 1024) with ``SparseAdam``, including
  the epoch-end commit of rows and moments, against ``nn.Embedding(sparse=True)`` +
  ``torch.optim.SparseAdam`` in RAM: the fourth epoch of a fresh store (the ratio), and the
  first (``first_epoch_ratio``: its commit writes every row and moment into new file pages).

Each round runs ours and the baseline back to back; the report gives the median ratio and
its min-max over the rounds (the machine is shared: one round's absolute figures say
little). Results go to ``benchmarks/results/targets.{jsonl,md}`` with the commit measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import lmdb_embeddings as le

from .run import RESULTS, ROOT, _git_commit
from .scratch import scratch_dir

DIM = 128


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ commit
def commit_round(work: str, rows: int) -> dict:
    """Seconds of a steady-state commit of a rewritten table, ours vs memmap's flush."""
    ids = np.arange(rows)
    store = le.EmbeddingStore.create(os.path.join(work, "commit-store"), rows, DIM, init="zeros", overwrite=True)
    ours = []
    for r in range(6):
        store.put(ids, np.full((rows, DIM), r, np.float32))
        ours.append(_timed(store.commit))
    store.close()
    mm = np.lib.format.open_memmap(os.path.join(work, "commit.npy"), "w+", np.float32, (rows, DIM))
    flushes = []
    for r in range(6):
        mm[:] = r
        flushes.append(_timed(mm.flush))
    del mm
    # the first three commits of a fresh store write new pages (copy-on-write): steady state after
    return {"dirty_bytes": rows * DIM * 4, "ours_s": statistics.median(ours[3:]), "baseline_s": statistics.median(
        flushes[3:]), "ours_first_commits_s": ours[:3], "ratio": statistics.median(ours[3:]) / statistics.median(
        flushes[3:])}


# --------------------------------------------------------------------------- row reads
def row_reads_round(work: str, rows: int, reads: int = 20_000) -> dict:
    path = os.path.join(work, "rows-store")
    values = np.random.default_rng(0).standard_normal((rows, DIM)).astype(np.float32)
    le.EmbeddingStore.create(path, rows, DIM, init=values, overwrite=True).close()
    np.save(os.path.join(work, "rows.npy"), values)
    picks = np.random.default_rng(1).integers(0, rows, reads).tolist()
    with le.EmbeddingStore.open(path, readonly=True) as reader:
        for i in picks[:1000]:  # warm: the table is in the page cache and the reader's cache
            reader.get([i])
        ours = _timed(lambda: [reader.get([i]) for i in picks]) / reads
    mm = np.load(os.path.join(work, "rows.npy"), mmap_mode="r")
    for i in picks[:1000]:
        mm[[i]]
    base = _timed(lambda: [mm[[i]] for i in picks]) / reads
    return {"ours_s": ours, "baseline_s": base, "ratio": ours / base}


# ----------------------------------------------------------------------------- workers
_WORKER_WRITER = r"""
import sys, time, numpy as np, lmdb_embeddings as le
kind, path, rows, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = np.arange(rows)
if kind == "ours":
    store = le.EmbeddingStore.open(path)
    for r in range(1, rounds + 1):
        store.put(ids, np.full((rows, 128), r, np.float32)); store.commit(); print(r, flush=True)
    store.close()
else:
    mm = np.load(path, mmap_mode="r+")
    for r in range(1, rounds + 1):
        mm[:] = r; mm.flush(); print(r, flush=True)
"""


class MemmapRows:
    """The baseline dataset: batches of rows of an np.memmap, opened lazily in each worker."""

    def __init__(self, path: str, rows: int):
        self.path, self.rows, self.mm = path, rows, None

    def __len__(self) -> int:
        return self.rows

    def __getitems__(self, indices):
        if self.mm is None:
            self.mm = np.load(self.path, mmap_mode="r")
        return list(np.array(self.mm[np.asarray(indices)]))

    def __getstate__(self):
        return {"path": self.path, "rows": self.rows, "mm": None}


def _read_while_writing(dataset, rows: int, writer: subprocess.Popen, batches: int) -> tuple[float, int, int]:
    """(seconds, batches read, torn batches) of ``batches`` random batches read while ``writer`` writes."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    sampler = RandomSampler(range(rows), replacement=True, num_samples=batches * 256,
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=256, sampler=sampler, num_workers=4, prefetch_factor=4)
    torn = got = 0
    start = time.perf_counter()
    for batch in loader:
        values = np.asarray(batch)[:, 0]
        torn += int(values.min() != values.max())
        got += 1
    seconds = time.perf_counter() - start
    if writer.poll() is not None:
        raise RuntimeError(f"the writer process ended early (exit {writer.returncode}): nothing was measured")
    return seconds, got, torn


def workers_round(work: str, rows: int, batches: int = 800) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = {}
    for kind in ("ours", "baseline"):
        if kind == "ours":
            path = os.path.join(work, "workers-store")
            le.EmbeddingStore.create(path, rows, DIM, init="zeros", overwrite=True).close()
            dataset = le.EmbeddingDataset(le.EmbeddingStore.open(path, readonly=True))
        else:
            path = os.path.join(work, "workers.npy")
            np.save(path, np.zeros((rows, DIM), np.float32))
            dataset = MemmapRows(path, rows)
        writer = subprocess.Popen([sys.executable, "-c", _WORKER_WRITER, kind, path, str(rows), "1000000"],
                                  stdout=subprocess.DEVNULL, env=env)
        try:
            seconds, got, torn = _read_while_writing(dataset, rows, writer, batches)
        finally:
            writer.kill()
            writer.wait(30)
        out[kind] = {"rows_per_s": got * 256 / seconds, "torn_batches": torn, "batches": got}
    return {"ours_rows_per_s": out["ours"]["rows_per_s"], "baseline_rows_per_s": out["baseline"]["rows_per_s"],
            "ours_torn": out["ours"]["torn_batches"], "baseline_torn": out["baseline"]["torn_batches"],
            "ratio": out["ours"]["rows_per_s"] / out["baseline"]["rows_per_s"]}


# ---------------------------------------------------------------------------- training
def training_round(work: str, rows: int, batch: int = 1024) -> dict:
    import torch

    from lmdb_embeddings.torch import SparseAdam, StoreEmbedding

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(rows, generator=gen)
    target = torch.randn(batch, DIM, generator=gen)

    def epoch(module, opts) -> None:
        for start in range(0, rows, batch):
            ids = order[start : start + batch]
            loss = ((module(ids) - target[: len(ids)]) ** 2).mean()
            loss.backward()
            for opt in opts:
                opt.step()
                opt.zero_grad()

    store = le.EmbeddingStore.create(os.path.join(work, "train-store"), rows, DIM, seed=0, overwrite=True)
    emb = StoreEmbedding(store)
    opt = SparseAdam(emb, lr=1e-3)
    epochs = [_timed(lambda: (epoch(emb, [opt]), store.commit())) for _ in range(4)]
    store.close()
    ref = torch.nn.Embedding(rows, DIM, sparse=True)
    ref_opt = torch.optim.SparseAdam(ref.parameters(), lr=1e-3)
    base = min(_timed(lambda: epoch(ref, [ref_opt])) for _ in range(2))
    # the first epochs of a fresh store write their rows AND moments into file pages that never
    # existed (LMDB copy-on-write: steady state from the fourth commit); report both
    return {"ours_s": epochs[-1], "baseline_s": base, "ratio": epochs[-1] / base,
            "first_epoch_s": epochs[0], "first_epoch_ratio": epochs[0] / base}


TARGETS = {  # name -> (function, default size, what the ratio means, target)
    "commit": (commit_round, 500_000, "commit s / memmap flush s (D = 256 MB)", "<= 1.5"),
    "row_reads": (row_reads_round, 100_000, "get([i]) s / memmap mm[[i]] s", "<= 3"),
    "workers": (workers_round, 100_000, "rows/s / memmap rows/s, 4 workers, writer committing", ">= 0.8"),
    "training": (training_round, 1_000_000, "4th epoch incl. commit / in-RAM epoch (SparseAdam, B=1024)", "<= 1.5"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    parser.add_argument("--rows", type=int, default=None, help="override every target's table size (smoke runs)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    results = []
    with scratch_dir("bench-targets-") as work:  # removed on any exit, SIGTERM and Ctrl-C included
        for round_ in range(args.rounds):
            for name in names:
                fn, rows, _, _ = TARGETS[name]
                res = fn(work, args.rows or rows)
                res.update(target=name, round=round_, rows=args.rows or rows)
                results.append(res)
                print(f"[targets] round {round_} {name}: ratio {res['ratio']:.3f}", file=sys.stderr, flush=True)
    meta = run_meta(args.rounds)
    write_results(args.out, "targets", results, meta, render(results, meta))
    return 0


def run_meta(rounds: int, **extra) -> dict:
    """What a results file says about its run: the commit measured, when, how many rounds, the CPUs."""
    return {"commit": _git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rounds": rounds, **extra, "cpus": os.cpu_count()}


def write_results(out: str, name: str, results: list[dict], meta: dict, table: str) -> None:
    """``out/NAME.jsonl`` (a result per line, with ``meta``) and ``out/NAME.md`` (``table``); prints the table."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.jsonl"), "w") as fh:
        for r in results:
            fh.write(json.dumps({**r, "meta": meta}) + "\n")
    with open(os.path.join(out, f"{name}.md"), "w") as fh:
        fh.write(table)
    print(table)


def render(results: list[dict], meta: dict) -> str:
    lines = [f"Targets, {meta['started']}, commit {meta['commit']}, {meta['rounds']} round(s), {meta['cpus']} CPUs",
             "", "| target | ratio (median) | min-max | target | detail (median) |", "|---|---|---|---|---|"]
    for name, (_, _, meaning, goal) in TARGETS.items():
        rows = [r for r in results if r["target"] == name]
        if not rows:
            continue
        ratios = [r["ratio"] for r in rows]
        lines.append(f"| {name}: {meaning} | {statistics.median(ratios):.3f} | {min(ratios):.3f}-{max(ratios):.3f} "
                     f"| {goal} | {median_details(rows, ('ratio', 'round', 'rows'))} |")
    return "\n".join(lines) + "\n"


def median_details(rows: list[dict], skip: tuple[str, ...]) -> str:
    """"name value" for the median of every numeric field of ``rows`` except ``skip``."""
    names = [k for k, v in rows[0].items() if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k} {statistics.median([r[k] for r in rows]):.4g}" for k in names)


if __name__ == "__main__":
    sys.exit(main())

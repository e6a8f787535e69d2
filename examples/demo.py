"""The README's main job: train a per-sample embedding table that lives in a store.

One epoch over a 1M x 64 table (``python examples/demo.py --help`` for the sizes): every
sample ID has a label (``id % 10``); a ``StoreEmbedding`` serves its rows into autograd, a
linear head classifies them, and ``SparseAdamW`` updates exactly the rows of each batch and
keeps their moments in the store. Two DataLoader workers shuffle the IDs. The epoch ends
with ONE commit (rows and optimizer state together). Then two DataLoader workers read the
committed rows through ``EmbeddingDataset`` (each holds a read-only handle) to score a
probe set, their rows are checked against the writer's, and the store is reopened and
checked once more.

Run it with ``bash tools/demo.sh`` (sets up .venv first) or ``python examples/demo.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

import lmdb_embeddings as le
from lmdb_embeddings.torch import SparseAdamW, StoreEmbedding

N_CLASSES = 10


def label_of(ids: torch.Tensor) -> torch.Tensor:
    return ids % N_CLASSES


def train_epoch(emb: StoreEmbedding, head: torch.nn.Module, opts: list, ids: np.ndarray, batch_size: int,
                workers: int, seed: int, progress_lines: int = 10) -> list[float]:
    """One shuffled pass over ``ids``; returns the batch losses. Prints a progress line every
    ``1/progress_lines`` of the epoch (a long epoch is never silent)."""
    loader = DataLoader(torch.from_numpy(ids), batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=False)
    losses = []
    every = max(1, len(loader) // progress_lines)
    started = time.perf_counter()
    for step, batch in enumerate(loader, 1):
        loss = torch.nn.functional.cross_entropy(head(emb(batch)), label_of(batch))
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
        losses.append(loss.item())
        if step % every == 0 and step < len(loader):
            rows = min(step * batch_size, len(ids))
            rate = rows / (time.perf_counter() - started)
            print(f"  {step / len(loader):4.0%} of the epoch: {rows:,} rows, {rate:,.0f} rows/s, "
                  f"batch loss {np.mean(losses[-every:]):.3f}", flush=True)
    return losses


def score_committed(store: le.EmbeddingStore, head: torch.nn.Module, probe: np.ndarray,
                    workers: int) -> tuple[float, float, np.ndarray]:
    """(loss, accuracy, rows) of the probe samples as DataLoader workers read them from the last commit."""
    loader = DataLoader(le.EmbeddingDataset(store, probe), batch_size=256, num_workers=workers)
    rows = torch.cat(list(loader))
    with torch.no_grad():
        logits = head(rows)
        target = label_of(torch.from_numpy(probe))
        loss = torch.nn.functional.cross_entropy(logits, target).item()
        accuracy = (logits.argmax(1) == target).float().mean().item()
    return loss, accuracy, rows.numpy()


def run(path: str, rows: int, dim: int, batch_size: int, workers: int, epochs: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    store = le.EmbeddingStore.create(path, rows, dim, init="normal", seed=seed, overwrite=True)
    print(f"created a {rows:,} x {dim} float32 store at {path} in {time.perf_counter() - t0:.1f} s")
    emb = StoreEmbedding(store)
    head = torch.nn.Linear(dim, N_CLASSES)
    opts = [SparseAdamW(emb, lr=0.05, weight_decay=0.0), torch.optim.Adam(head.parameters(), lr=0.01)]
    probe = np.random.default_rng(seed).choice(store.ids, size=min(2048, rows), replace=False)
    report = {"path": path}
    report["probe_loss_initial"] = score_committed(store, head, probe, workers)[0]
    ids = store.ids
    for epoch in range(epochs):
        t0 = time.perf_counter()
        losses = train_epoch(emb, head, opts, ids, batch_size, workers, seed + epoch)
        t_loop = time.perf_counter() - t0
        t1 = time.perf_counter()
        store.commit()  # rows and their SparseAdamW moments, atomically
        t_commit = time.perf_counter() - t1
        report.update(rows_per_s=len(ids) / (t_loop + t_commit), commit_s=t_commit,
                      first_loss=float(np.mean(losses[:10])), last_loss=float(np.mean(losses[-10:])))
        print(f"epoch {epoch + 1}: {len(ids):,} rows in {t_loop:.1f} s + commit {t_commit:.2f} s = "
              f"{report['rows_per_s']:,.0f} rows/s; batch loss {report['first_loss']:.3f} -> {report['last_loss']:.3f}")
    loss, accuracy, served = score_committed(store, head, probe, workers)
    report.update(probe_loss_trained=loss, probe_accuracy=accuracy)
    print(f"{len(probe)} probe samples read by {workers} DataLoader workers from the last commit: loss "
          f"{report['probe_loss_initial']:.3f} (initial rows) -> {loss:.3f} (trained rows), accuracy {accuracy:.1%}")
    writer_rows = store.get(probe)
    report["workers_match_writer"] = bool(np.array_equal(served, writer_rows))
    stats = store.stats()
    print(f"writer: cache hit rate {stats['hit_rate']:.1%}, {stats['commits']} commit(s), "
          f"{stats['bytes_committed'] / 2**20:,.0f} MiB committed (rows + optimizer state); the workers' rows "
          f"{'match' if report['workers_match_writer'] else 'DO NOT match'} the writer's")
    step = opts[0].step_count
    store.close()
    with le.EmbeddingStore.open(path, readonly=True) as reopened:
        report["reopen_check"] = bool(np.array_equal(reopened.get(probe), writer_rows)
                                      and reopened.attrs.get(opts[0].step_attr) == step)
    print(f"reopened read-only: probe rows and the optimizer's step count ({step}) "
          f"{'match' if report['reopen_check'] else 'DO NOT match'} what training committed")
    if not (report["workers_match_writer"] and report["reopen_check"]):
        raise SystemExit("demo failed: the committed rows differ from what training wrote")
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default=None, help="store directory (default: a new temporary directory)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the store directory afterwards")
    args = parser.parse_args(argv)
    owned = args.path is None
    # SIGTERM (kill, a CI timeout) raises like Ctrl-C does, so the finally below removes the temporary store
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    path = args.path or os.path.join(tempfile.mkdtemp(prefix="lmdb_embeddings_demo_"), "store")
    try:
        return run(path, args.rows, args.dim, args.batch_size, args.workers, args.epochs)
    finally:
        if owned and not args.keep:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)


if __name__ == "__main__":
    main()

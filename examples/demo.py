"""The README's "main job": train against a store while DataLoader workers read it.

One epoch over a 1M x 64 table: two DataLoader worker processes each hold an unpickled
read-only handle and serve batches of (ids, committed rows); the main process computes a
loss through a small linear head, steps the rows with SGD and ``put``s them into the
writable handle; the epoch ends with one ``commit``. Every ID is visited once per epoch,
so the committed row a worker serves is exactly the writer's current row. Afterwards the
store is reopened and a sample of rows is checked against what training wrote.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

from .store import EmbeddingStore

N_CLASSES = 10


class _BatchDataset:
    """Map-style dataset whose item ``b`` is batch ``b`` of this epoch's permutation."""

    def __init__(self, store: EmbeddingStore, order: np.ndarray, batch_size: int):
        self.store, self.order, self.batch_size = store, order, batch_size

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, b: int):
        ids = self.order[b * self.batch_size : (b + 1) * self.batch_size]
        return ids, self.store.get(ids)  # read in the worker process, from the last commit


def run_demo(path: str | None = None, rows: int = 1_000_000, dim: int = 64, batch_size: int = 1024,
             workers: int = 2, epochs: int = 1, keep: bool = False, seed: int = 0) -> dict:
    import torch
    from torch.utils.data import DataLoader

    owned = path is None
    path = path or os.path.join(tempfile.mkdtemp(prefix="lmdb_embeddings_demo_"), "store")
    report: dict = {"path": path}
    try:
        t0 = time.perf_counter()
        store = EmbeddingStore.create(path, rows, dim, chunk_rows=256, init="normal", seed=seed, overwrite=True)
        report["create_s"] = time.perf_counter() - t0
        print(f"created {rows:,} x {dim} float32 store at {path} in {report['create_s']:.1f} s")

        torch.manual_seed(seed)
        head = torch.nn.Linear(dim, N_CLASSES)
        head_opt = torch.optim.SGD(head.parameters(), lr=0.1)
        rng = np.random.default_rng(seed)
        lr_rows = 20.0 * batch_size  # the loss is a batch mean: scale so each row moves visibly
        probe = rng.choice(store.ids, size=min(1000, rows), replace=False)
        probe_initial = torch.from_numpy(store.get(probe))
        expected = None
        for epoch in range(epochs):
            order = rng.permutation(store.ids)
            loader = DataLoader(_BatchDataset(store, order, batch_size), batch_size=None, shuffle=False,
                                num_workers=workers, multiprocessing_context="fork" if workers else None)
            t0 = time.perf_counter()
            losses, n_seen = [], 0
            for ids, committed_rows in loader:
                ids_np = ids.numpy()
                emb = committed_rows.clone().requires_grad_(True)
                target = torch.from_numpy(ids_np % N_CLASSES)
                loss = torch.nn.functional.cross_entropy(head(emb), target)
                head_opt.zero_grad()
                loss.backward()
                head_opt.step()
                with torch.no_grad():
                    new_rows = (emb - lr_rows * emb.grad).numpy()
                store.put(ids_np, new_rows)
                losses.append(loss.item())
                n_seen += len(ids_np)
            t_loop = time.perf_counter() - t0
            t1 = time.perf_counter()
            store.commit()
            t_commit = time.perf_counter() - t1
            expected = store.get(probe)  # the probe rows as training left them
            report.update(epoch_s=t_loop + t_commit, commit_s=t_commit, rows_per_s=n_seen / (t_loop + t_commit),
                          first_loss=float(np.mean(losses[:20])), last_loss=float(np.mean(losses[-20:])))
            print(f"epoch {epoch + 1}: {n_seen:,} rows in {t_loop:.1f} s + commit {t_commit:.2f} s "
                  f"= {report['rows_per_s']:,.0f} rows/s; loss {report['first_loss']:.3f} -> {report['last_loss']:.3f}")
        with torch.no_grad():
            probe_target = torch.from_numpy(probe % N_CLASSES)
            before = torch.nn.functional.cross_entropy(head(probe_initial), probe_target).item()
            after = torch.nn.functional.cross_entropy(head(torch.from_numpy(store.get(probe))), probe_target).item()
        report.update(probe_loss_initial_rows=before, probe_loss_trained_rows=after)
        print(f"loss of {len(probe)} probe samples under the final head: initial rows {before:.3f}, "
              f"trained rows {after:.3f}")
        stats = store.stats()
        report["writer_stats"] = stats
        print(f"writer cache: hit rate {stats['hit_rate']:.1%}, {stats['chunks_loaded']} chunks loaded, "
              f"{stats['cache_bytes'] / 2**20:.0f} MiB cached, {stats['commits']} commit(s), "
              f"{stats['bytes_committed'] / 2**20:.0f} MiB committed")
        store.close()

        with EmbeddingStore.open(path, readonly=True) as reopened:
            got = reopened.get(probe)
            ok = np.array_equal(got, expected)
        report["reopen_check"] = ok
        print(f"reopened read-only: {len(probe)} sampled rows {'match' if ok else 'DO NOT match'} what training wrote")
        if not ok:
            raise SystemExit("demo failed: reopened rows differ from the trained rows")
        return report
    finally:
        if owned and not keep:
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

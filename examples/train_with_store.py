"""Train per-sample embeddings kept in an LMDB store, resumable after kill -9 with identical results.

The model is a StoreEmbedding (one trainable row per sample ID, 1M rows by default) and a
small MLP head that must classify each sample's label from its row. A DataLoader with two
worker processes serves each epoch's batches of (ids, labels); the rows are stepped by
SparseAdamW, whose moments and step count live in the store next to the rows, the head by
torch.optim.AdamW. At the end of every epoch ONE store commit makes all of it durable
together: the rows, the optimizer state, and (as store attrs) the head's weights, the dense
optimizer's state and the number of finished epochs.

Kill the process at any moment (kill -9 included) and run the same command again: it
reopens the store, restores the head from the last commit and replays the interrupted
epoch from its start. Every batch is a pure function of (seed, epoch, batch), so the final
store equals that of a run that was never interrupted, bit for bit.

    python examples/train_with_store.py --path /tmp/train_store            # 1M x 64, 3 epochs
    python examples/train_with_store.py --path /tmp/s --rows 5000 --dim 16 --epochs 2   # quick
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lmdb_embeddings as le
from lmdb_embeddings.torch import SparseAdagrad, SparseAdam, SparseAdamW, StoreEmbedding

log = logging.getLogger("train_with_store")
ATTR = "example."  # prefix of this script's store attrs
SPARSE = {"adamw": SparseAdamW, "adam": SparseAdam, "adagrad": SparseAdagrad}


def labels_of(ids: np.ndarray, classes: int) -> np.ndarray:
    """A fixed pseudo-random label per sample ID (what the embeddings learn to encode)."""
    return ((ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32) % np.uint64(classes)).astype(np.int64)


class EpochBatches(Dataset):
    """Item ``b`` is batch ``b`` of one epoch: a pure function of (seed, epoch, b), so replays match."""

    def __init__(self, n_rows: int, batch_size: int, classes: int, seed: int, epoch: int):
        self.order = np.random.default_rng([seed, epoch]).permutation(n_rows)
        self.batch_size, self.classes = batch_size, classes

    def __len__(self) -> int:
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, b: int):
        ids = self.order[b * self.batch_size : (b + 1) * self.batch_size]
        return torch.from_numpy(ids), torch.from_numpy(labels_of(ids, self.classes))


class Model(nn.Module):
    def __init__(self, store: le.EmbeddingStore, hidden: int, classes: int):
        super().__init__()
        self.emb = StoreEmbedding(store)
        self.head = nn.Sequential(nn.Linear(store.dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def open_or_create(args) -> tuple[le.EmbeddingStore, int]:
    """The store and the number of epochs already committed in it (0 for a new store)."""
    config = {"rows": args.rows, "dim": args.dim, "hidden": args.hidden, "classes": args.classes,
              "batch_size": args.batch_size, "seed": args.seed, "optimizer": args.optimizer, "lr": args.lr,
              "weight_decay": args.weight_decay, "chunk_rows": args.chunk_rows}
    if os.path.exists(args.path):
        store = le.EmbeddingStore.open(args.path, cache_mb=args.cache_mb)
        saved = store.attrs.get(ATTR + "config")
        if saved is not None and saved != config:
            store.close()
            raise SystemExit(f"{args.path} was trained with {saved}; run with the same flags or another --path")
    else:
        store = le.EmbeddingStore.create(args.path, args.rows, args.dim, chunk_rows=args.chunk_rows, seed=args.seed,
                                         init="normal", cache_mb=args.cache_mb)
    store.set_attr(ATTR + "config", config)
    return store, int(store.attrs.get(ATTR + "epochs_done", 0))


def make_sparse_optimizer(args, emb: StoreEmbedding):
    if args.optimizer == "adamw":
        return SparseAdamW(emb, lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "adagrad":
        return SparseAdagrad(emb, lr=args.lr)
    return SparseAdam(emb, lr=args.lr)


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    store, start_epoch = open_or_create(args)
    torch.manual_seed(args.seed)  # the head's initial weights: same on every (re)start
    model = Model(store, args.hidden, args.classes)
    sparse_opt = make_sparse_optimizer(args, model.emb)
    dense_opt = torch.optim.AdamW(model.head.parameters(), lr=args.lr)
    if ATTR + "head" in store.attrs:  # resume: the head as of the last commit
        model.head.load_state_dict(_from_bytes(store.attrs[ATTR + "head"]))
        dense_opt.load_state_dict(_from_bytes(store.attrs[ATTR + "dense_opt"]))
    if start_epoch:
        print(f"resuming at epoch {start_epoch} (sparse optimizer step {sparse_opt.step_count})", flush=True)
    loss_fn = nn.CrossEntropyLoss()
    summary = {"epochs": []}
    for epoch in range(start_epoch, args.epochs):
        data = EpochBatches(args.rows, args.batch_size, args.classes, args.seed, epoch)
        loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=args.workers)
        started, total, correct, seen = time.perf_counter(), 0.0, 0, 0
        for step, (ids, labels) in enumerate(loader):
            logits = model(ids)
            loss = loss_fn(logits, labels)
            sparse_opt.zero_grad()
            dense_opt.zero_grad()
            loss.backward()
            dense_opt.step()
            sparse_opt.step()
            total += loss.item() * len(ids)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(ids)
            if args.log_every and step % args.log_every == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.4f}", flush=True)
            if args.sleep_per_step:
                time.sleep(args.sleep_per_step)
        store.set_attr(ATTR + "head", _to_bytes(model.head.state_dict()))
        store.set_attr(ATTR + "dense_opt", _to_bytes(dense_opt.state_dict()))
        store.set_attr(ATTR + "epochs_done", epoch + 1)
        store.commit()  # rows + optimizer state + head: one atomic, durable commit per epoch
        elapsed = time.perf_counter() - started
        record = {"epoch": epoch, "loss": total / seen, "accuracy": correct / seen, "seconds": round(elapsed, 2),
                  "steps_per_s": round(len(data) / elapsed, 1)}
        summary["epochs"].append(record)
        print(f"committed epoch {epoch}: " + json.dumps(record), flush=True)
    if args.digest:
        summary["digest"] = digest(store, sparse_opt.state_columns.values())
    summary["sparse_step"] = sparse_opt.step_count
    store.close()
    return summary


def digest(store: le.EmbeddingStore, columns) -> str:
    """SHA-256 over every row, every optimizer-state row and the attrs (to compare two runs)."""
    h = hashlib.sha256()
    ids = store.ids
    for start in range(0, len(ids), 65536):
        part = ids[start : start + 65536]
        h.update(store.get(part).tobytes())
        for column in columns:
            h.update(store.get_column(column, part).tobytes())
    for key, value in sorted(store.attrs.items()):
        h.update(key.encode() + repr(value).encode())
    return h.hexdigest()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", required=True, help="store directory (created if missing, else resumed)")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--optimizer", choices=sorted(SPARSE), default="adamw")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-rows", type=int, default=1024)
    p.add_argument("--cache-mb", type=float, default=1024.0, help="store cache (rows + optimizer state)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=100, help="print a progress line every N steps (0: never)")
    p.add_argument("--sleep-per-step", type=float, default=0.0, help="slow down (to demo/test kill -9 mid-epoch)")
    p.add_argument("--digest", action="store_true", help="print a SHA-256 of rows + state at the end")
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = train(parse_args(argv))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

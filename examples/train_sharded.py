"""Data-parallel training of per-sample embeddings sharded over the ranks of a torch.distributed job.

Every rank owns the rows of the sample IDs ``owner_of`` assigns it, in its own shard of a
ShardedEmbeddingStore. The ShardedSampler gives each rank batches of the samples it owns,
so every row lookup is local; a small classifier head, replicated by DistributedDataParallel,
learns each sample's label from its row. Rows step with SparseAdam at their owner, the head
with AdamW (DDP all-reduces its gradients). At the end of every epoch ONE collective commit
makes the rows, their optimizer state and the head (stored as attrs) durable on all shards
together; kill any rank and run the same command again to resume from the last commit.

    torchrun --standalone --nproc_per_node=2 examples/train_sharded.py --path /tmp/sharded
    torchrun --standalone --nproc_per_node=2 examples/train_sharded.py --path /tmp/s --rows 5000 --epochs 2
"""

from __future__ import annotations

import argparse
import io
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmdb_embeddings.distributed import ShardedEmbeddingStore, ShardedSampler
from lmdb_embeddings.torch import SparseAdam, StoreEmbedding

ATTR = "example."


def labels_of(ids: np.ndarray, classes: int) -> np.ndarray:
    """A fixed pseudo-random label per sample ID (what the embeddings learn to encode)."""
    return ((ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(2**32) % np.uint64(classes)).astype(np.int64)


def open_store(args) -> ShardedEmbeddingStore:
    if os.path.exists(os.path.join(args.path, "manifest.json")):
        return ShardedEmbeddingStore.open(args.path, cache_mb=args.cache_mb)
    return ShardedEmbeddingStore.create(args.path, args.rows, args.dim, chunk_rows=1024, seed=0, init="normal",
                                        cache_mb=args.cache_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, help="directory of the sharded store (created on first run)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--cache-mb", type=float, default=256)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() and os.environ.get("USE_NCCL") else "gloo"
    dist.init_process_group(backend)
    try:
        train(args)  # returns with the store closed and the DDP model and optimizers gone
        dist.barrier()  # no rank tears its process group down while another still uses it
    finally:
        dist.destroy_process_group()


def train(args) -> None:
    torch.set_num_threads(1)
    rank = dist.get_rank()
    store = open_store(args)
    emb = StoreEmbedding(store)
    head = nn.Linear(args.dim, args.classes)
    if ATTR + "head" in store.attrs:  # resume: the head of the last commit
        head.load_state_dict(torch.load(io.BytesIO(store.attrs[ATTR + "head"]), weights_only=True))
    model = DistributedDataParallel(head)
    row_opt = SparseAdam(emb, lr=args.lr)
    head_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = ShardedSampler(store, args.batch_size, seed=0)
    start = int(store.attrs.get(ATTR + "epochs_done", 0))
    if rank == 0:
        print(f"{store.world_size} ranks, {len(store)} rows x {store.dim}, {len(sampler)} batches per epoch, "
              f"starting at epoch {start} (commit {store.commit_count})", flush=True)
    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)
        began, seen, correct, total_loss = time.perf_counter(), 0, 0, 0.0
        for batch in sampler:
            ids = np.asarray(batch, np.int64)
            labels = torch.from_numpy(labels_of(ids, args.classes))
            logits = model(emb(torch.from_numpy(ids)))
            loss = nn.functional.cross_entropy(logits, labels)
            row_opt.zero_grad()
            head_opt.zero_grad()
            loss.backward()
            row_opt.step()  # collective: rows step at their owners (here: all local)
            head_opt.step()
            seen += len(ids)
            correct += int((logits.argmax(1) == labels).sum())
            total_loss += float(loss.detach()) * len(ids)
        buffer = io.BytesIO()
        torch.save(head.state_dict(), buffer)
        store.set_attr(ATTR + "head", buffer.getvalue())  # the same on every rank (DDP keeps it in step)
        store.set_attr(ATTR + "epochs_done", epoch + 1)
        store.commit()  # rows, optimizer state, head and epoch count: durable on every shard together
        figures = torch.tensor([seen, correct, total_loss], dtype=torch.float64)
        dist.all_reduce(figures)
        if rank == 0:
            print(f"epoch {epoch}: loss {figures[2] / figures[0]:.4f}, accuracy {figures[1] / figures[0]:.3f}, "
                  f"{figures[0] / (time.perf_counter() - began):.0f} samples/s, commit {store.commit_count}",
                  flush=True)
    store.close()


if __name__ == "__main__":
    main()

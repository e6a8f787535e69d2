"""A user's script written against the README's API, for ``mypy --strict`` and ``pyright --strict``.

tests/project/test_packaging.py type-checks it as a user would (the package installed, not its source
checked) and runs it. Every function returns what the library returns, so an ``Any`` coming
from the library is an error (``--warn-return-any``), and the lazily imported names are used
as types. ``# type: ignore`` lines are checks too: ``--warn-unused-ignores`` (part of
``--strict``) fails if the library stopped rejecting what they reject.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch
from torch.utils.data import DataLoader

import lmdb_embeddings as le
from lmdb_embeddings.torch import SparseAdamW, StoreEmbedding


def make_store(path: str) -> le.EmbeddingStore:
    store = le.EmbeddingStore.create(path, ids=1000, dim=8, init="normal", seed=0, cache_mb=16)
    rows: np.ndarray = store.get([3, 1, 4])
    store.put([3, 1, 4], rows + 0.01)
    store.add([10_000_000, -5])
    store.commit()
    return store


def row_tensor(store: le.EmbeddingStore) -> torch.Tensor:
    return store.get_tensor([-5], device="cpu")


def hit_rate(store: le.EmbeddingStore) -> float:
    return store.stats()["hit_rate"]


def commits(store: le.EmbeddingStore) -> int:
    stats: le.StoreStats = store.stats()
    return stats["commits"] + stats["dirty_chunks"]


def misspelled(store: le.EmbeddingStore) -> object:
    return store.stats()["hitrate"]  # type: ignore[typeddict-item]


def dataset(store: le.EmbeddingStore) -> le.EmbeddingDataset:
    return le.EmbeddingDataset(store)


def train(store: le.EmbeddingStore) -> float | None:
    emb = StoreEmbedding(store)
    head = torch.nn.Linear(store.dim, 1)
    opt = SparseAdamW(emb, lr=1e-3, weight_decay=0.01)
    ids = torch.tensor(store.ids[:64].tolist())  # (torch.from_numpy is partly untyped in torch itself)
    loss = head(emb(ids)).pow(2).mean()
    loss.backward()
    last = opt.step()
    opt.zero_grad()
    store.commit()
    return last


def read_all(store: le.EmbeddingStore) -> int:
    loader = DataLoader(dataset(store), batch_size=256)
    return sum(len(batch) for batch in loader)


def operations(path: str, out: str) -> tuple[int, bool, int, int, bool]:
    info: le.StoreInfo = le.store_info(path)
    report: le.VerifyReport = le.verify_store(path)
    dumped: le.DumpResult = le.dump_store(path, out)
    restored: le.RestoreResult = le.restore_store(out, path + "-restored")
    compacted: le.CompactResult = le.compact_store(path)
    bad = [problem["chunk"] for problem in report["problems"]]
    return info["lmdb"]["page_size"], report["ok"] and not bad, dumped["bytes"], restored["rows"], \
        compacted["compacted"]


def lazily_imported() -> tuple[type[le.ShardedEmbeddingStore], type[le.ShardedSampler],
                               type[le.TrainableEmbeddingManager]]:
    return le.ShardedEmbeddingStore, le.ShardedSampler, le.TrainableEmbeddingManager


def manager(directory: str) -> torch.Tensor:
    m: le.TrainableEmbeddingManager = le.TrainableEmbeddingManager(
        sample_ids=[1, 2, 3], embedding_dim=4, storage_mode="disk", embeddings_dir=directory)
    rows = m.get_embeddings([1, 2])
    m.close()
    return rows


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "emb.lmdb")
        store = make_store(path)
        try:
            assert row_tensor(store).shape == (1, 8)
            assert 0.0 <= hit_rate(store) <= 1.0 and commits(store) >= 1
            train(store)
            assert read_all(store) == len(store)
            try:
                misspelled(store)
            except KeyError:
                pass
        finally:
            store.close()
        page_size, sound, size, rows, _ = operations(path, os.path.join(tmp, "emb.lemb"))
        assert page_size > 0 and sound and size > 0 and rows == 1002
        assert all(isinstance(t, type) for t in lazily_imported())
        assert tuple(manager(os.path.join(tmp, "manager")).shape) == (2, 4)
    print("typed user script ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

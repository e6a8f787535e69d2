"""The implementations compared: ours and what a user would otherwise write.

Every implementation has the same small interface: ``setup`` builds and initializes a
table of ``n`` rows (untimed), ``open`` opens it for the timed run, ``get``/``put`` move
one batch, ``commit`` makes everything so far durable (the epoch-end flush), ``close``
releases it. Persistent implementations are reopened from disk for verification.
"""

from __future__ import annotations

import os
import shutil

import lmdb
import numpy as np

import lmdb_embeddings as le
from lmdb_embeddings.format import chunks as chunk_codec

_INIT_BLOCK = 1 << 16  # rows initialized at a time by the baselines (bounded setup memory)


def init_block(start: int, stop: int, dim: int, seed: int) -> np.ndarray:
    """Baseline initial rows ``start:stop`` (N(0, 0.01^2), deterministic per block)."""
    rng = np.random.default_rng([seed, start])
    return rng.standard_normal((stop - start, dim), dtype=np.float32) * np.float32(0.01)


def _blocks(n: int):
    for start in range(0, n, _INIT_BLOCK):
        yield start, min(n, start + _INIT_BLOCK)


class Implementation:
    name = "base"
    persistent = True

    def __init__(self, path: str, n: int, dim: int, options: dict | None = None):
        self.path, self.n, self.dim, self.options = path, n, dim, dict(options or {})

    def setup(self, seed: int) -> None:
        raise NotImplementedError

    def open(self) -> None:
        raise NotImplementedError

    def get(self, ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def put(self, ids: np.ndarray, values: np.ndarray) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class NumpyMem(Implementation):
    """The physical limit: one numpy array in RAM, nothing durable."""

    name = "numpy_mem"
    persistent = False

    def setup(self, seed):
        n, dim = self.n, self.dim
        self.table = np.empty((n, dim), np.float32)
        for start, stop in _blocks(n):
            self.table[start:stop] = init_block(start, stop, dim, seed)

    def open(self):
        pass

    def get(self, ids):
        return self.table[ids]

    def put(self, ids, values):
        self.table[ids] = values

    def commit(self):
        pass

    def close(self):
        pass


class MemmapEpoch(Implementation):
    """np.memmap of a raw file, flushed (msync) at epoch end: fast, torn by a crash."""

    name = "memmap_epoch"

    def setup(self, seed):
        n, dim = self.n, self.dim
        os.makedirs(self.path, exist_ok=True)
        table = np.lib.format.open_memmap(os.path.join(self.path, "table.npy"), "w+", np.float32, (n, dim))
        for start, stop in _blocks(n):
            table[start:stop] = init_block(start, stop, dim, seed)
        table.flush()
        del table

    def open(self):
        self.table = np.load(os.path.join(self.path, "table.npy"), mmap_mode="r+")

    def get(self, ids):
        return self.table[ids]

    def put(self, ids, values):
        self.table[ids] = values

    def commit(self):
        self.table.flush()

    def close(self):
        self.table.flush()
        del self.table


class LmdbRows(Implementation):
    """Naive LMDB: one key per row (big-endian id), raw float32 bytes as the value."""

    name = "lmdb_rows"
    commit_per_batch = True

    def setup(self, seed):
        n, dim = self.n, self.dim
        os.makedirs(self.path, exist_ok=True)
        env = self._env()
        for start, stop in _blocks(n):
            block = init_block(start, stop, dim, seed)
            with env.begin(write=True) as txn:
                txn.cursor().putmulti(
                    ((chunk_codec.chunk_key(i), block[i - start].tobytes()) for i in range(start, stop)),
                    append=True)
        env.sync(True)
        env.close()

    def _env(self):
        map_size = max(4 * self.n * (self.dim * 4 + 64), 1 << 28)
        return lmdb.open(self.path, map_size=map_size, sync=True, metasync=True, readahead=False,
                         max_spare_txns=1)

    def open(self):
        self.env = self._env()
        self.txn = None

    def _write_txn(self):
        if self.txn is None:
            self.txn = self.env.begin(write=True)
        return self.txn

    def get(self, ids):
        keys = [chunk_codec.chunk_key(i) for i in ids.tolist()]
        if self.txn is not None:
            found = self.txn.cursor().getmulti(keys)
        else:
            with self.env.begin() as txn:
                found = txn.cursor().getmulti(keys)
        return np.frombuffer(b"".join(v for _, v in found), np.float32).reshape(len(ids), self.dim)

    def put(self, ids, values):
        values = np.ascontiguousarray(values, np.float32)
        txn = self._write_txn()
        txn.cursor().putmulti(
            (chunk_codec.chunk_key(i), values[j].tobytes()) for j, i in enumerate(ids.tolist()))
        if self.commit_per_batch:
            self.commit()

    def commit(self):
        if self.txn is not None:
            self.txn.commit()  # sync=True: one fsync
            self.txn = None

    def close(self):
        self.commit()
        self.env.close()


class LmdbRowPerKey(LmdbRows):
    """One key per row, one synced commit per batch (the naive durable version)."""

    name = "lmdb_row_per_key"
    commit_per_batch = True


class LmdbRowBatched(LmdbRows):
    """One key per row, one write transaction per epoch, committed at epoch end."""

    name = "lmdb_row_batched"
    commit_per_batch = False


class Ours(Implementation):
    """lmdb_embeddings.EmbeddingStore; ``options`` = create/open options (chunk_rows, cache_mb, ...)."""

    name = "ours"

    def setup(self, seed):
        if os.path.exists(self.path):
            shutil.rmtree(self.path)
        chunk_rows = self.options.get("chunk_rows", 1024)
        store = le.EmbeddingStore.create(self.path, self.n, self.dim, chunk_rows=chunk_rows, seed=seed,
                                         **self._open_options())
        store.close()

    def _open_options(self):
        return {k: v for k, v in self.options.items() if k != "chunk_rows"}

    def open(self):
        self.store = le.EmbeddingStore.open(self.path, **self._open_options())

    def get(self, ids):
        return self.store.get(ids)

    def put(self, ids, values):
        self.store.put(ids, values)

    def commit(self):
        self.store.commit()

    def close(self):
        self.store.close()


IMPLEMENTATIONS = {cls.name: cls for cls in (NumpyMem, MemmapEpoch, LmdbRowPerKey, LmdbRowBatched, Ours)}

"""Making shards: what ``create`` is given, the initial rows it implies, and the builder every shard comes from.

The sharded table must not depend on the world size: every ID's initial row is the row
``EmbeddingStore.create(path, ids, dim, init=..., seed=...)`` gives it. A single store
generates row ``p`` (its global position: create order, then add order) from a generator
seeded with ``(seed, p // chunk_rows)``; :func:`initial_rows` computes exactly those rows
for any set of global positions, chunk by chunk, so each rank can build its shard (and
``add`` its defaults) without the rest of the table.

A shard is written by a :class:`ShardBuilder` (rows arriving in global order, written in
full chunks of the shard through ``processes.builder.StoreBuilder``): ``create`` (each rank
its own) and ``restore --shards`` (all of them) both build shards this way, under a new
token that no manifest names yet, so a half-built shard is never part of a store. No torch.
"""

from __future__ import annotations

import os

import numpy as np

from ..core.table_spec import TableSpec
from ..errors import EmbeddingStoreError, StoreExistsError, WriterLockedError
from ..format import init as initializers
from ..format.layout import ID_DTYPE, ColumnSpec, TableLayout
from ..format.records import is_store
from ..processes.builder import StoreBuilder
from ..processes.writer_lock import holder_pid
from .manifest import (
    COMMIT_ATTR,
    ROW_COLUMN,
    Manifest,
    is_sharded,
    new_token,
    only_stale_entries,
    read_manifest,
    remove_entries,
    stale_entries,
)
from .ownership import owner_of

ROW_SPEC = ColumnSpec(ROW_COLUMN, 1, np.dtype("<f8"))
_BUILD_BLOCK_CHUNKS = 64  # create: global chunks generated (and handed to the shard builder) per step


def initial_rows(spec: dict, seed: int, chunk_rows: int, dim: int, dtype: np.dtype,
                 positions: np.ndarray) -> np.ndarray:
    """The initial rows at global row ``positions`` of a table with this init ``spec`` and ``seed``."""
    positions = np.asarray(positions, np.int64)
    out = np.empty((len(positions), dim), dtype)
    if len(positions) == 0:
        return out
    chunks = positions // chunk_rows
    order = np.argsort(chunks, kind="stable")
    unique, starts = np.unique(chunks[order], return_index=True)
    bounds = np.append(starts, len(order))
    for chunk, lo, hi in zip(unique.tolist(), bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        picked = order[lo:hi]
        offsets = positions[picked] - chunk * chunk_rows
        rows = initializers.chunk_values(spec, seed, chunk, chunk_rows, dim, 0, int(offsets.max()) + 1, dtype)
        out[picked] = rows[offsets]
    return out


class ShardBuilder:
    """One shard being built: rows arrive in ascending global position, leave in full chunks of the shard.

    ``layout`` is the global table's (columns, chunking, config, attrs); the shard gets the
    same columns plus ``dist.row`` (each row's global position), ``rows`` rows, and the attr
    ``dist.commit = commit``. Memory: at most one shard chunk plus what one append brings.
    """

    def __init__(self, directory: str, layout: TableLayout, rows: int, commit: int):
        self._layout = TableLayout(chunk_rows=layout.chunk_rows, rows=rows, columns=(*layout.columns, ROW_SPEC),
                                   config=dict(layout.config), attrs={**layout.attrs, COMMIT_ATTR: int(commit)},
                                   commit=0, committed_at=layout.committed_at)
        os.makedirs(directory)
        self._builder = StoreBuilder(directory, self._layout)
        self._pending: list[tuple] = []
        self._held = 0
        self._chunk = 0

    def append(self, ids: np.ndarray, parts: list[np.ndarray], positions: np.ndarray) -> None:
        """Rows of this shard (one array per global column) with their global positions, in order."""
        if len(ids):
            column = np.asarray(positions, np.float64).reshape(-1, 1)
            self._pending.append((np.array(ids, ID_DTYPE), [np.array(p) for p in parts] + [column]))
            self._held += len(ids)
        layout = self._layout
        while self._chunk < layout.n_chunks and self._held >= layout.chunk_len(self._chunk):
            self._flush(layout.chunk_len(self._chunk))

    def _flush(self, n: int) -> None:
        ids = np.concatenate([p[0] for p in self._pending])
        parts = [np.concatenate([p[1][i] for p in self._pending]) for i in range(len(self._layout.columns))]
        self._builder.add_ids(self._chunk, ids[:n])
        self._builder.add_chunk(self._chunk, [p[:n] for p in parts])
        rest = len(ids) - n
        self._pending = [(ids[n:], [p[n:] for p in parts])] if rest else []
        self._held = rest
        self._chunk += 1

    def finish(self) -> None:
        self._builder.finish()

    def close(self) -> None:
        self._builder.close()


def build_shard(shard_path: str, table: TableSpec, manifest: Manifest, rank: int) -> None:
    """Write rank ``rank``'s shard of a new table: its owned IDs in global order, their initial rows."""
    os.makedirs(os.path.dirname(shard_path), exist_ok=True)  # on another node, the directory may not exist yet
    block = _BUILD_BLOCK_CHUNKS * table.chunk_rows

    def owned_in(start: int) -> tuple[np.ndarray, np.ndarray]:
        """(global positions, IDs) this rank owns among positions ``start:start+block``."""
        ids = table.ids_at(start, start + block)
        mine = np.flatnonzero(owner_of(ids, manifest.world_size, manifest.buckets) == rank)
        return mine + start, ids[mine]

    count = sum(len(owned_in(start)[0]) for start in range(0, table.rows, block))
    builder = ShardBuilder(shard_path, table.layout(), count, commit=0)
    try:
        for start in range(0, table.rows, block):
            positions, ids = owned_in(start)
            if table.values is not None:
                values = table.values[positions]
            else:
                values = initial_rows(table.init, table.seed, table.chunk_rows, table.dim, table.dtype, positions)
            builder.append(ids, [values], positions)
        builder.finish()
    finally:
        builder.close()


def plan_create(path: str, overwrite: bool) -> dict:
    """Rank 0 of a create: check what is at ``path``, clear leftovers of killed creates; the new token.

    Returns ``{"token", "old"}``: the new shards' token and the shard directories of the store
    being replaced (removed once the new manifest is in place).
    """
    old_shards: list[str] = []
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreExistsError(f"{path} exists and is not a directory")
    if is_sharded(path):
        try:
            old = read_manifest(path)
        except EmbeddingStoreError:
            if not overwrite:
                raise
            old = None
        if not overwrite:
            raise StoreExistsError(f"a sharded store already exists at {path}; pass overwrite=True to replace it")
        if old is not None:
            old_shards = list(old.shards)
            for name in old_shards:
                holder = holder_pid(os.path.join(path, name))
                if holder is not None:
                    raise WriterLockedError(f"{os.path.join(path, name)} is open for writing by pid {holder}; "
                                            "close the old store before replacing it", holder_pid=holder)
    elif is_store(path):
        raise StoreExistsError(f"{path} holds a plain EmbeddingStore; refusing to replace it with a sharded one "
                               "(choose another path, or remove it first)")
    elif os.path.isdir(path) and not only_stale_entries(path):
        raise StoreExistsError(f"{path} is a non-empty directory that is not a store; refusing to write there "
                               "(choose another path or empty it)")
    os.makedirs(path, exist_ok=True)
    remove_entries(stale_entries(path, read_manifest(path) if old_shards else None))
    return {"token": new_token(), "old": old_shards}

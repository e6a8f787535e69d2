"""ShardedTableSink: a table written as a new store sharded for W ranks, in one pass (``restore --shards``).

A dump gives every ID before any row, but a row's owner and its global position come from its
ID: the IDs go to a temporary file (8 bytes per row) while each shard's row count is tallied,
then each row chunk is routed to its owners' :class:`~.creation.ShardBuilder` with the global
positions of its rows. No intermediate plain store; the manifest comes last. No torch.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import EmbeddingStoreError
from ..format.layout import ID_DTYPE, TableLayout
from .creation import ShardBuilder
from .manifest import Manifest, new_token, shard_name, write_manifest
from .ownership import DEFAULT_BUCKETS, owner_of

IDS_FILE = ".ids.restoring"  # the IDs of the table, while its rows arrive (in the directory being built)


class ShardedTableSink:
    """A ``TableSink`` that writes a table as a new store sharded for ``shards`` ranks in ``directory``.

    The IDs arrive first (all of them, before any row): they go to a temporary file, and
    each shard's row count is tallied. The rows then go, chunk by chunk, to each owner's
    :class:`~.creation.ShardBuilder` with their global positions (the IDs read back from
    the file). ``finish`` completes the shards and writes the manifest (at the table's commit).
    """

    def __init__(self, directory: str, layout: TableLayout, shards: int):
        self.directory, self.layout, self.shards = directory, layout, shards
        self._counts = np.zeros(shards, np.int64)
        self._ids = open(os.path.join(directory, IDS_FILE), "w+b")  # noqa: SIM115 - closed by close()
        self._builders: list[ShardBuilder] | None = None
        token = new_token()
        self.manifest = Manifest(commit=layout.commit, world_size=shards, buckets=DEFAULT_BUCKETS, token=token,
                                 dim=layout.dim, dtype=layout.dtype.name, chunk_rows=layout.chunk_rows,
                                 init=dict(layout.config.get("init") or {"kind": "normal", "std": 0.01}),
                                 seed=int(layout.config.get("seed", 0)), rows=layout.rows,
                                 shards=[shard_name(r, token) for r in range(shards)])

    def add_ids(self, chunk: int, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, ID_DTYPE).reshape(-1)
        self._ids.write(ids.tobytes())
        self._counts += np.bincount(owner_of(ids, self.shards), minlength=self.shards)

    def _start_rows(self) -> list[ShardBuilder]:
        if self._builders is None:
            self._ids.flush()
            self._ids.seek(0)
            self._builders = []
            for rank in range(self.shards):
                self._builders.append(ShardBuilder(self.manifest.shard_path(self.directory, rank), self.layout,
                                                   int(self._counts[rank]), commit=self.layout.commit))
        return self._builders

    def add_chunk(self, chunk: int, parts: list[np.ndarray]) -> None:
        builders = self._start_rows()
        n = self.layout.chunk_len(chunk)
        ids = np.frombuffer(self._ids.read(n * ID_DTYPE.itemsize), ID_DTYPE)
        if len(ids) != n:
            raise EmbeddingStoreError(f"reshard: chunk {chunk} has {n} rows but only {len(ids)} ids were given")
        owners = owner_of(ids, self.shards)
        positions = np.arange(chunk * self.layout.chunk_rows, chunk * self.layout.chunk_rows + n, dtype=np.int64)
        for rank, builder in enumerate(builders):
            mine = owners == rank
            builder.append(ids[mine], [p[mine] for p in parts], positions[mine])

    def finish(self) -> None:
        for builder in self._start_rows():
            builder.finish()
        self._ids.close()
        os.unlink(os.path.join(self.directory, IDS_FILE))
        write_manifest(self.directory, self.manifest)

    def close(self) -> None:
        for builder in self._builders or []:
            builder.close()
        self._ids.close()

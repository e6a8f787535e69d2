"""What ``ShardedEmbeddingStore.create`` is given, checked once, and the initial rows it implies.

The sharded table must not depend on the world size: every ID's initial row is the row
``EmbeddingStore.create(path, ids, dim, init=..., seed=...)`` gives it. A single store
generates row ``p`` (its global position: create order, then add order) from a generator
seeded with ``(seed, p // chunk_rows)``; :func:`initial_rows` computes exactly those rows
for any set of global positions, chunk by chunk, so each rank can build its shard (and
``add`` its defaults) without the rest of the table. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

from .. import initializers
from ..store import check_create_args


@dataclass
class TableSpec:
    """The checked arguments of a create: global IDs, shape, dtype, chunking, init and seed."""

    ids: np.ndarray
    dim: int
    dtype: np.dtype
    chunk_rows: int
    init: dict  # the init spec a single store records (initializers.init_spec)
    seed: int
    values: np.ndarray | None  # init given as an array: row i belongs to ids[i]

    @classmethod
    def from_create_args(cls, ids, dim, dtype, chunk_rows, init, seed) -> TableSpec:
        """The same checks as ``EmbeddingStore.create`` (the same function)."""
        return cls(*check_create_args(ids, dim, dtype, chunk_rows, init, seed))

    def fingerprint(self) -> int:
        """A 63-bit digest of everything, to check that every rank was given the same table."""
        h = xxhash.xxh3_64()
        h.update(repr((self.dim, self.dtype.name, self.chunk_rows, sorted(self.init.items()), self.seed)).encode())
        h.update(np.ascontiguousarray(self.ids).tobytes())
        if self.values is not None:
            h.update(np.ascontiguousarray(self.values).tobytes())
        return h.intdigest() >> 1


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

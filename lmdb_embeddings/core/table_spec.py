"""What ``create`` is given, checked once: one :class:`TableSpec` for a plain and a sharded store."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash

from ..errors import InvalidInputError
from ..format.init import NORMAL_STD, init_spec
from ..format.layout import ColumnSpec, TableLayout, choose_chunk_rows, chunk_size_problem
from ..format.records import MAIN
from ..inputs import as_dtype, as_ids, as_positive_int, as_values, check_unique

_FINGERPRINT_BLOCK = 1 << 20


@dataclass(frozen=True)
class TableSpec:
    """The checked arguments of a create: global IDs, shape, dtype, chunking, init and seed."""

    ids: np.ndarray | int  # the global IDs in row order, or N for 0..N-1 (never built as an array)
    dim: int
    dtype: np.dtype
    chunk_rows: int
    init: dict  # the init spec a single store records (format.init.init_spec)
    seed: int
    values: np.ndarray | None  # init given as an array: row i belongs to ids[i]

    @classmethod
    def from_create_args(cls, ids, dim, dtype, chunk_rows, init, seed) -> TableSpec:
        """``create``'s arguments, checked (``InvalidInputError`` / ``InvalidTypeError`` naming the bad one).

        ``ids`` is kept as an int N for 0..N-1 (never built as an array) or the unique int64 IDs.
        ``EmbeddingStore.create`` and ``ShardedEmbeddingStore.create`` both call it, so they accept the same.
        """
        dim = as_positive_int(dim, "dim")
        dt = as_dtype(dtype)
        if chunk_rows is None:  # the store chooses (format.layout.choose_chunk_rows)
            chunk_rows = choose_chunk_rows(dim * dt.itemsize)
        chunk_rows = as_positive_int(chunk_rows, "chunk_rows")
        too_big = chunk_size_problem(chunk_rows, dim * dt.itemsize)
        if too_big:
            raise InvalidInputError(f"create: {too_big}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise InvalidInputError(f"seed must be an int in [0, 2**64), got {seed!r}")
        id_array = _create_ids(ids)
        n = id_array if isinstance(id_array, int) else len(id_array)
        values = None
        if isinstance(init, str):
            spec = init_spec(init, n, dim)
        else:
            values = as_values(init, n, dim, dt, "create(init=array)")
            spec = {"kind": "normal", "std": NORMAL_STD, "name": "array"}
        return cls(id_array, dim, dt, chunk_rows, spec, int(seed), values)

    @property
    def rows(self) -> int:
        return self.ids if isinstance(self.ids, int) else len(self.ids)

    def ids_at(self, start: int, stop: int) -> np.ndarray:
        """The IDs of global positions ``start:stop``."""
        stop = min(stop, self.rows)
        return np.arange(start, stop, dtype=np.int64) if isinstance(self.ids, int) else self.ids[start:stop]

    def fingerprint(self) -> int:
        """A 63-bit digest of everything, to check that every rank was given the same table.

        The IDs are hashed block by block, so ``N`` and ``arange(N)`` are the same table.
        """
        h = xxhash.xxh3_64()
        h.update(repr((self.dim, self.dtype.name, self.chunk_rows, sorted(self.init.items()), self.seed)).encode())
        for start in range(0, self.rows, _FINGERPRINT_BLOCK):
            h.update(np.ascontiguousarray(self.ids_at(start, start + _FINGERPRINT_BLOCK), np.int64).tobytes())
        if self.values is not None:
            h.update(np.ascontiguousarray(self.values).tobytes())
        return h.intdigest() >> 1

    def layout(self) -> TableLayout:
        """The global table as a plain store of it would describe itself."""
        return TableLayout(chunk_rows=self.chunk_rows, rows=self.rows,
                           columns=(ColumnSpec(MAIN, self.dim, self.dtype),),
                           config={"init": self.init, "seed": self.seed})


def _create_ids(ids) -> np.ndarray | int:
    """``create``'s ids: an int N (IDs 0..N-1, never built as an array) or unique int64 IDs."""
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        if ids < 0:
            raise InvalidInputError(f"ids: a row count must be >= 0, got {ids}")
        return int(ids)
    id_array = as_ids(ids, "ids")
    check_unique(id_array, "create")
    return id_array

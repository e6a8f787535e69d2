"""Settings of an open handle, validated when made (``__post_init__``), frozen, and passed on as this object."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields

import numpy as np
import psutil

from .errors import InvalidInputError, InvalidTypeError

READER_CACHE_MB = 256.0  # readers share the OS page cache; each one's decoded cache is private
MIN_WRITER_CACHE_MB = 64.0
WRITER_RAM_SHARE = 0.25
#: A writer's L1 holds at least this many chunks of each column (a put reads, changes and keeps whole chunks).
MIN_WRITER_CHUNKS = 2
#: By how much those minimum chunks may exceed an explicit cache budget before the options are refused.
MIN_CHUNKS_SLACK = 8 << 20


@dataclass(frozen=True)
class StoreOptions:
    """Per-handle settings (``**open_options`` of ``create`` and ``open``).

    cache_mb: total budget of decoded chunks held in memory (L1 + L2), MiB. Default (None):
        a writer's L1 gets room for its whole table (all columns, +10%) up to a quarter of the
        machine's RAM, so random batches do not thrash; a read-only handle gets 256 MiB,
        because DataLoader workers each hold one and the OS page cache below is shared.
    l1_fraction: share of ``cache_mb`` given to the L1 slab; the rest is L2.
    l1_mb / l2_mb: explicit tier budgets (override ``cache_mb`` / ``l1_fraction``).
    commit_every: commit after every K put/add calls (None: only explicit commits).
    readahead: let the OS read ahead in the data file (off helps random access beyond RAM).
    writemap: the writer stores pages straight into LMDB's shared map of the data file
        (default): no private copy of the pending transaction, so memory stays bounded by the
        cache however much changes between commits, and commits copy each byte once. Disk
        blocks are reserved before anything is written, so a full disk is a clean
        ``CommitError``. Turn it off only on a filesystem that cannot ``posix_fallocate``.
    write_buffer: a writer of a table larger than its L1 keeps rows written to chunks not in L1 in a
        row-level write buffer within ``cache_mb`` (default), merged into their chunks (each changed
        chunk rewritten once per merge) when it is full and at commit, instead of loading and later
        rewriting a whole chunk per row (docs/ARCHITECTURE.md, "Writes beyond the cache").

    Internal (not an open option: ``create``/``open`` refuse it; the sharded store sets it on its shards):

    undo_log: every commit of this handle also keeps, in the same LMDB transaction, the values
        it overwrote, so :func:`~lmdb_embeddings.core.undo.revert_last_commit` can undo it (the
        sharded store's two-phase commit; docs/ARCHITECTURE.md, "Scale-out").

    Every instance is checked when it is made (``InvalidInputError`` / ``InvalidTypeError``), so a
    ``StoreOptions`` in hand is a valid one.
    """

    cache_mb: float | None = None
    l1_fraction: float = 0.75
    l1_mb: float | None = None
    l2_mb: float | None = None
    commit_every: int | None = None
    readahead: bool = True
    writemap: bool = True
    write_buffer: bool = True
    undo_log: bool = field(default=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        for name in ("cache_mb", "l1_mb", "l2_mb"):
            value = getattr(self, name)
            if value is not None and (not is_real(value, finite=True) or value < 0):
                raise InvalidInputError(f"{name} must be a finite number of MiB >= 0, got {value!r}")
        if not is_real(self.l1_fraction):
            raise InvalidTypeError(f"l1_fraction must be a number within [0, 1], got {self.l1_fraction!r}")
        if not 0.0 <= float(self.l1_fraction) <= 1.0:  # NaN fails this too
            raise InvalidInputError(f"l1_fraction must be within [0, 1], got {self.l1_fraction!r}")
        ce = self.commit_every
        if ce is not None and (isinstance(ce, bool) or not isinstance(ce, int) or ce < 1):
            raise InvalidInputError(f"commit_every must be a positive int or None, got {ce!r}")
        for name in ("readahead", "writemap", "write_buffer", "undo_log"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidTypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> StoreOptions:
        """The ``**open_options`` of ``create``/``open``: only the public options (not ``undo_log``)."""
        known = open_option_names()
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise InvalidTypeError(
                f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}"
            )
        return cls(**kwargs)

    def resolved_cache_mb(self, table_bytes: int, readonly: bool, floor_bytes: int = 0) -> float:
        """``cache_mb``, or its default for a table of ``table_bytes`` (see the class doc), never below
        ``floor_bytes`` (what a writer's cache needs at least: two chunks of every column)."""
        if self.cache_mb is not None:
            return float(self.cache_mb)
        if readonly:
            return READER_CACHE_MB
        ram_mb = psutil.virtual_memory().total / (1 << 20)
        # the L1 slab alone must hold the table (L2 copies are no substitute), plus 10 %
        want = 1.1 * table_bytes / (1 << 20) / max(self.l1_fraction, 0.25) + 16
        return max(MIN_WRITER_CACHE_MB, min(want, WRITER_RAM_SHARE * ram_mb), floor_bytes / (1 << 20))

    def check_writer_cache(self, chunk_rows: int, row_bytes: int, rows: int, call: str) -> None:
        """Refuse (``InvalidInputError``) a writable handle that could not keep ``MIN_WRITER_CHUNKS`` chunks (rows
        of ``row_bytes`` bytes, all columns) within these options' budget. A chunk is read, changed and kept
        whole, so those chunks are the least a writer holds: with chunks far larger than ``cache_mb`` the handle
        would use many times the memory it was given (up to ``MIN_CHUNKS_SLACK`` over it is a fixed overhead)."""
        need = MIN_WRITER_CHUNKS * chunk_rows * row_bytes
        budget = sum(self.tier_bytes(self.resolved_cache_mb(rows * row_bytes, False, need),
                                     -(-rows // chunk_rows) * chunk_rows * row_bytes))
        if need <= max(budget, MIN_CHUNKS_SLACK):
            return
        mib = 1 << 20
        raise InvalidInputError(
            f"{call}: cache_mb={budget / mib:g} cannot hold the {MIN_WRITER_CHUNKS} chunks a writable handle needs at "
            f"least: a chunk is chunk_rows={chunk_rows} rows x {row_bytes:,} bytes (all columns) = "
            f"{chunk_rows * row_bytes / mib:,.1f} MiB. Open it with cache_mb >= {-(-need // mib)}, or give the "
            "store a smaller chunk_rows (create with chunk_rows=None lets the store choose; an existing store: "
            "dump --format npy, then restore --chunk-rows)")

    def tier_bytes(self, cache_mb: float, table_bytes: int = 0) -> tuple[int, int]:
        """(L1, L2) budgets in bytes, given the resolved total ``cache_mb``.

        A table that fits in the total gets all of it into L1 (``l1_fraction`` is then a floor,
        not a cap): rows served from L1 cost one fancy index, while chunks bouncing between
        the tiers cost a copy each (measured 11x slower gets at ``cache_mb`` = 1.25x the table).
        """
        mib = 1 << 20
        total = cache_mb * mib
        if self.l1_mb is not None:
            l1 = self.l1_mb * mib
        elif table_bytes <= total:
            l1 = max(total * self.l1_fraction, table_bytes)
        else:
            l1 = total * self.l1_fraction  # larger than the budget: L2 keeps recent victims
        l2 = self.l2_mb * mib if self.l2_mb is not None else total - l1
        return int(l1), int(max(l2, 0))


def open_option_names() -> tuple[str, ...]:
    """The options a user may pass to ``create``/``open`` (every field not marked internal)."""
    return tuple(f.name for f in fields(StoreOptions) if not f.metadata.get("internal"))


def is_real(value: object, *, finite: bool = False) -> bool:
    """An int or float (numpy scalars included), not a bool or a string; with ``finite``, not NaN or inf either.
    The one test of a numeric setting (open options here, optimizer hyperparameters in ``torch/optimizers.py``)."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return False
    return not finite or math.isfinite(value)

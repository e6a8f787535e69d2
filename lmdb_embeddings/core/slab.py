"""L1 of a column's cache: one preallocated slab of chunk-sized slots and the bookkeeping of each slot.

``capacity`` slots live in a single 2-D array, so rows of resident chunks are one fancy index
away (``slab[slot * chunk_rows + offset]``). Chunk ``c`` takes slot ``c`` when that slot is free,
so a table that fits L1 maps row slot ``s`` to slab row ``s``. The slab is reserved at once and
mapped lazily by the OS: untouched slots cost no memory, and growth is a re-slice, not a copy.
What to load, keep, evict or read around these slots is ``core/cache.py``'s ``ColumnCache``.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

NO_SLOT = -1  # in ``chunk_slot``: the chunk is not in L1; in ``slot_chunk``: the slot is free


class TableView(Protocol):
    """What the cache needs to know of its table."""

    rows: int  # row slots in the table now (a chunk may have grown since it was loaded)
    validate_against: int | None  # reader: chunks must have been checked at this commit; writer: None


def _reservable_slots(chunk_bytes: int) -> int:
    """Slots worth reserving up front: at most half the physical memory (overcommit-safe)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = 1 << 30
    return max(1, physical // 2 // max(chunk_bytes, 1))


class L1Slab:
    """L1's slots and their bookkeeping: ``capacity`` chunk-sized slots of one 2-D array, which chunk each slot
    holds (its rows, version, last check, last use, dirty flag), and the chunk -> slot index. What to load,
    keep, evict or read around them is :class:`~.cache.ColumnCache`'s."""

    def __init__(self, width: int, dtype: np.dtype, chunk_rows: int, table: TableView):
        self.width, self.dtype, self.chunk_rows, self.table = width, np.dtype(dtype), chunk_rows, table
        self.chunk_bytes = chunk_rows * width * self.dtype.itemsize
        self.capacity = 2
        self._n_slots = 0
        self.slab = np.empty((0, width), self.dtype)
        self._buffer = self.slab  # backing store of ``slab`` (see _grow_slab)
        self.slot_chunk = np.empty(0, np.int64)
        self.slot_rows = np.empty(0, np.int64)
        self.slot_version = np.empty(0, np.int64)
        self.slot_validated = np.empty(0, np.int64)
        self.last_used = np.empty(0, np.int64)
        self.dirty = np.empty(0, bool)
        self.chunk_slot = np.full(0, NO_SLOT, np.int64)
        self._free: list[int] = []  # a stack of free slots; entries taken out of turn are skipped
        self._n_resident = 0  # chunks in L1
        self._n_misplaced = 0  # of which not in the slot numbered like the chunk

    @property
    def resident_chunks(self) -> int:
        return self._n_resident

    @property
    def _chunk_limit(self) -> int:
        """Chunks in the table: the slab never needs more slots."""
        return max(1, -(-self.table.rows // self.chunk_rows))

    def _grow_index(self, n_chunks: int) -> None:
        if n_chunks > len(self.chunk_slot):
            self.chunk_slot = grown(self.chunk_slot, max(n_chunks, 2 * len(self.chunk_slot), 16), NO_SLOT)

    def _grow_slab(self, want_slots: int) -> None:
        limit = self._chunk_limit
        new = min(self.capacity, max(want_slots, min(2 * self._n_slots, limit), 4))
        if self.capacity >= limit:
            new = max(new, limit)  # the whole table fits: a slot for every chunk, at its own number
        if new <= self._n_slots:
            return
        if self._buffer.shape[0] < new * self.chunk_rows:
            # Reserve every slot the slab may ever need at once: np.empty of a large array
            # is mapped lazily by the OS (untouched slots cost no memory), so later growth
            # is a re-slice instead of a copy of the whole slab.
            reserve = max(new, min(self.capacity, limit, _reservable_slots(self.chunk_bytes)))
            buffer = np.empty((reserve * self.chunk_rows, self.width), self.dtype)
            buffer[: self.slab.shape[0]] = self.slab
            self._buffer = buffer
        self.slab = self._buffer[: new * self.chunk_rows]

        self.slot_chunk = grown(self.slot_chunk, new, NO_SLOT)
        self.slot_rows, self.slot_version = grown(self.slot_rows, new, 0), grown(self.slot_version, new, 0)
        self.slot_validated, self.last_used = grown(self.slot_validated, new, 0), grown(self.last_used, new, 0)
        self.dirty = grown(self.dirty, new, False)
        self._free.extend(range(new - 1, self._n_slots - 1, -1))
        self._n_slots = new

    def slots_of(self, chunks: np.ndarray) -> np.ndarray:
        self._grow_index(int(chunks.max()) + 1 if len(chunks) else 0)
        return self.chunk_slot[chunks]

    def _take_slot(self, chunk: int) -> int:
        """A free slot for ``chunk``: its own number when free (see the module doc), else any."""
        if chunk < self._n_slots and self.slot_chunk[chunk] == NO_SLOT:
            return chunk
        while True:
            slot = self._free.pop()
            if self.slot_chunk[slot] == NO_SLOT:
                return slot

    def _release_slot(self, slot: int) -> None:
        chunk = int(self.slot_chunk[slot])
        self.chunk_slot[chunk] = NO_SLOT
        self.slot_chunk[slot] = NO_SLOT
        self.dirty[slot] = False
        self._free.append(slot)
        self._n_resident -= 1
        self._n_misplaced -= slot != chunk

    def _install(self, chunk: int, rows: np.ndarray, version: int) -> None:
        slot = self._take_slot(chunk)
        self._n_resident += 1
        self._n_misplaced += slot != chunk
        n = len(rows)
        base = slot * self.chunk_rows
        self.slab[base : base + n] = rows
        self.slot_chunk[slot], self.slot_rows[slot] = chunk, n
        self.slot_version[slot] = self.slot_validated[slot] = version
        self.dirty[slot] = False
        self.chunk_slot[chunk] = slot

    def rows_in_slot(self, slot: int) -> np.ndarray:
        base = slot * self.chunk_rows
        return self.slab[base : base + int(self.slot_rows[slot])]


def grown(arr: np.ndarray, size: int, fill) -> np.ndarray:
    """``arr`` extended to ``size`` entries with ``fill``."""
    out = np.full(size, fill, arr.dtype)
    out[: len(arr)] = arr
    return out

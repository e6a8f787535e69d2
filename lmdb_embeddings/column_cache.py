"""In-process cache of decoded chunks for one column of the store.

L1 is one preallocated slab: ``capacity`` chunk-sized slots in a single 2-D array.
Gathering or scattering rows that live in L1 is then ONE numpy fancy-index over the slab
(``slab[slot * chunk_rows + offset]``), with no per-chunk Python work: that is what makes
small random batches fast. Dirty (written, uncommitted) chunks live only in L1.

L2 is a victim cache: clean chunks pushed out of L1 are kept, decoded, in an LRU dict
with its own byte budget, so a chunk that comes back soon costs a copy instead of an
LMDB read + checksum. Below both sits the OS page cache under LMDB's memory map.

A dirty chunk is never dropped. When L1 must evict one, it is handed to ``spill`` (the
store writes it into its pending write transaction) before its slot is reused.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import numpy as np

_NO_SLOT = -1


def _reservable_slots(chunk_bytes: int) -> int:
    """Slots worth reserving up front: at most half the physical memory (overcommit-safe)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        physical = 1 << 30
    return max(1, physical // 2 // max(chunk_bytes, 1))


class CacheStats:
    """Counters shared by the caches of all columns of one handle."""

    def __init__(self) -> None:
        self.l1_hits = self.l1_misses = self.l2_hits = self.l2_misses = self.chunks_loaded = 0

    def as_dict(self) -> dict:
        lookups = self.l1_hits + self.l1_misses
        return {
            "l1_hits": self.l1_hits,
            "l1_misses": self.l1_misses,
            "l2_hits": self.l2_hits,
            "l2_misses": self.l2_misses,
            "hit_rate": (self.l1_hits + self.l2_hits) / lookups if lookups else 0.0,
            "chunks_loaded": self.chunks_loaded,
        }


LoadFn = Callable[[list], Iterator[tuple]]  # chunks -> (chunk, rows view, version) while a txn is open
SpillFn = Callable[[int, np.ndarray], None]


class ColumnCache:
    def __init__(self, width: int, dtype: np.dtype, chunk_rows: int, l1_bytes: int, l2_bytes: int,
                 stats: CacheStats):
        self.width, self.dtype, self.chunk_rows = width, np.dtype(dtype), chunk_rows
        self.chunk_bytes = chunk_rows * width * self.dtype.itemsize
        self.capacity = max(2, l1_bytes // max(self.chunk_bytes, 1))
        self.l2_budget = max(0, l2_bytes)
        self.stats = stats
        self.spill: SpillFn | None = None
        self.chunk_limit = 1 << 62  # chunks in the table: the slab never needs more slots
        self._n_slots = 0
        self.slab = np.empty((0, width), self.dtype)
        self._buffer = self.slab  # backing store of ``slab`` (see _grow_slab)
        self.slot_chunk = np.empty(0, np.int64)
        self.slot_rows = np.empty(0, np.int64)
        self.slot_version = np.empty(0, np.int64)
        self.slot_validated = np.empty(0, np.int64)
        self.last_used = np.empty(0, np.int64)
        self.dirty = np.empty(0, bool)
        self.chunk_slot = np.full(0, _NO_SLOT, np.int64)
        self._free: list[int] = []
        self._tick = 0
        # chunk -> (rows, version, commit at which a reader last checked the version)
        self.l2: OrderedDict[int, tuple[np.ndarray, int, int]] = OrderedDict()
        self.l2_bytes = 0

    # -- sizing ------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        return self.slab.nbytes + self.l2_bytes

    def _grow_index(self, n_chunks: int) -> None:
        if n_chunks > len(self.chunk_slot):
            grown = np.full(max(n_chunks, 2 * len(self.chunk_slot), 16), _NO_SLOT, np.int64)
            grown[: len(self.chunk_slot)] = self.chunk_slot
            self.chunk_slot = grown

    def _grow_slab(self, want_slots: int) -> None:
        new = min(self.capacity, max(want_slots, min(2 * self._n_slots, self.chunk_limit), 4))
        if new <= self._n_slots:
            return
        if self._buffer.shape[0] < new * self.chunk_rows:
            # Reserve every slot the slab may ever need at once: np.empty of a large array
            # is mapped lazily by the OS (untouched slots cost no memory), so later growth
            # is a re-slice instead of a copy of the whole slab.
            reserve = max(new, min(self.capacity, self.chunk_limit, _reservable_slots(self.chunk_bytes)))
            buffer = np.empty((reserve * self.chunk_rows, self.width), self.dtype)
            buffer[: self.slab.shape[0]] = self.slab
            self._buffer = buffer
        self.slab = self._buffer[: new * self.chunk_rows]

        def grow(arr, fill):
            out = np.full(new, fill, arr.dtype)
            out[: len(arr)] = arr
            return out

        self.slot_chunk = grow(self.slot_chunk, _NO_SLOT)
        self.slot_rows = grow(self.slot_rows, 0)
        self.slot_version = grow(self.slot_version, 0)
        self.slot_validated = grow(self.slot_validated, 0)
        self.last_used = grow(self.last_used, 0)
        self.dirty = grow(self.dirty, False)
        self._free.extend(range(new - 1, self._n_slots - 1, -1))
        self._n_slots = new

    # -- lookups -----------------------------------------------------------------------
    def slots_of(self, chunks: np.ndarray) -> np.ndarray:
        self._grow_index(int(chunks.max()) + 1 if len(chunks) else 0)
        return self.chunk_slot[chunks]

    def ensure(self, chunks: np.ndarray, load: LoadFn) -> np.ndarray:
        """Make every chunk in ``chunks`` (unique, <= capacity) resident; return their slots."""
        slots = self.slots_of(chunks)
        present = slots != _NO_SLOT
        n_hit = int(np.count_nonzero(present))
        self.stats.l1_hits += n_hit
        self.stats.l1_misses += len(chunks) - n_hit
        if n_hit < len(chunks):
            missing = chunks[~present]
            self._reserve(len(missing), pinned=slots[present])
            from_lmdb = []
            for chunk in missing.tolist():
                entry = self.l2.pop(chunk, None)
                if entry is None:
                    from_lmdb.append(chunk)
                    continue
                self.stats.l2_hits += 1
                self.l2_bytes -= entry[0].nbytes
                self._install(chunk, entry[0], entry[1])
            self.stats.l2_misses += len(from_lmdb)
            if from_lmdb:
                for chunk, rows, version in load(from_lmdb):
                    self._install(chunk, rows, version)
                    self.stats.chunks_loaded += 1
            slots = self.chunk_slot[chunks]
        self._tick += 1
        self.last_used[slots] = self._tick
        return slots

    def touch(self, slots: np.ndarray) -> None:
        """Record L1 hits on resident ``slots`` (duplicates allowed) for LRU and stats."""
        self._tick += 1
        self.last_used[slots] = self._tick
        self.stats.l1_hits += int(np.count_nonzero(self.last_used[: self._n_slots] == self._tick))

    def _install(self, chunk: int, rows: np.ndarray, version: int) -> None:
        slot = self._free.pop()
        n = len(rows)
        base = slot * self.chunk_rows
        self.slab[base : base + n] = rows
        self.slot_chunk[slot], self.slot_rows[slot] = chunk, n
        self.slot_version[slot] = self.slot_validated[slot] = version
        self.dirty[slot] = False
        self.chunk_slot[chunk] = slot

    def _reserve(self, n: int, pinned: np.ndarray) -> None:
        """Free ``n`` slots, growing the slab or evicting least recently used chunks."""
        if len(self._free) < n:
            self._grow_slab(self._n_slots + n - len(self._free))
        short = n - len(self._free)
        if short <= 0:
            return
        used = np.flatnonzero(self.slot_chunk != _NO_SLOT)
        used = used[~np.isin(used, pinned)]
        victims = used[np.argsort(self.last_used[used], kind="stable")[:short]]
        for slot in victims.tolist():
            self._evict(slot)

    def _evict(self, slot: int) -> None:
        chunk = int(self.slot_chunk[slot])
        rows = self.rows_in_slot(slot)
        if self.dirty[slot]:
            if self.spill is None:
                raise RuntimeError("a dirty chunk had to be evicted but no spill target is set")
            self.spill(chunk, rows)
        elif self.l2_budget >= self.chunk_bytes:
            while self.l2 and self.l2_bytes + rows.nbytes > self.l2_budget:
                _, (old, _, _) = self.l2.popitem(last=False)
                self.l2_bytes -= old.nbytes
            self.l2[chunk] = (rows.copy(), int(self.slot_version[slot]), int(self.slot_validated[slot]))
            self.l2_bytes += rows.nbytes
        self.chunk_slot[chunk] = _NO_SLOT
        self.slot_chunk[slot] = _NO_SLOT
        self.dirty[slot] = False
        self._free.append(slot)

    def rows_in_slot(self, slot: int) -> np.ndarray:
        base = slot * self.chunk_rows
        return self.slab[base : base + int(self.slot_rows[slot])]

    # -- changes -----------------------------------------------------------------------
    def mark_dirty(self, slots: np.ndarray) -> None:
        self.dirty[slots] = True

    def dirty_chunks(self) -> list[tuple[int, np.ndarray]]:
        """(chunk, rows view) of every dirty chunk, in key order."""
        slots = np.flatnonzero(self.dirty[: self._n_slots])
        slots = slots[np.argsort(self.slot_chunk[slots])]
        return [(int(self.slot_chunk[s]), self.rows_in_slot(int(s))) for s in slots.tolist()]

    @property
    def n_dirty(self) -> int:
        return int(self.dirty.sum())

    def mark_clean(self, version: int) -> None:
        self.slot_version[self.dirty] = version
        self.slot_validated[self.dirty] = version
        self.dirty[:] = False

    def drop(self, chunks: Iterable[int]) -> None:
        """Forget chunks (stale in a reader, or discarded by rollback)."""
        for chunk in chunks:
            entry = self.l2.pop(chunk, None)
            if entry is not None:
                self.l2_bytes -= entry[0].nbytes
            if chunk < len(self.chunk_slot) and self.chunk_slot[chunk] != _NO_SLOT:
                slot = int(self.chunk_slot[chunk])
                self.chunk_slot[chunk] = _NO_SLOT
                self.slot_chunk[slot] = _NO_SLOT
                self.dirty[slot] = False
                self._free.append(slot)

    def drop_dirty(self) -> None:
        self.drop(self.slot_chunk[np.flatnonzero(self.dirty[: self._n_slots])].tolist())

    def drop_from(self, first_chunk: int) -> None:
        resident = self.slot_chunk[self.slot_chunk >= first_chunk].tolist()
        self.drop(resident + [c for c in list(self.l2) if c >= first_chunk])

    def clear(self) -> None:
        self.drop(self.slot_chunk[self.slot_chunk != _NO_SLOT].tolist())
        self.drop(list(self.l2))

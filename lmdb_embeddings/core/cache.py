"""In-process cache of decoded chunks for one column of the store.

L1 is one preallocated slab: ``capacity`` chunk-sized slots in a single 2-D array.
Gathering or scattering rows that live in L1 is then ONE numpy fancy-index over the slab
(``slab[slot * chunk_rows + offset]``), with no per-chunk Python work: that is what makes
small random batches fast. Dirty (written, uncommitted) chunks live only in L1.

When L1 can hold the whole table, chunk ``c`` lives in slot ``c``: the slab row of table
row slot ``s`` is then ``s`` itself, and a call on a fully resident table is one ``np.take``
(get) or one fancy assignment (put) straight from the row slots, with no chunk lookup.

L2 is a victim cache: clean chunks pushed out of L1 are kept, decoded, in an LRU dict
with its own byte budget, so a chunk that comes back soon costs a copy instead of an
LMDB read. Below both sits the OS page cache under LMDB's memory map.

The cache answers "the rows of these slots" itself: it finds the chunks, brings missing
ones in through its :class:`ChunkIO` (the handle's session, which knows the transaction),
and, in a reader, re-checks chunks cached before the latest commit. A dirty chunk is never
dropped: when L1 must evict one, it goes to ``ChunkIO.spill`` before its slot is reused.

Reads of a table larger than L1 do not load chunks: the rows of chunks that are neither in
L1 nor spilled into the pending transaction are copied straight out of LMDB's map
(``ChunkIO.read_rows``, ``core/directory.py``), so a random row costs a row copy, not a whole
chunk's load, and a read never evicts (nor spills) anything. Writes still make their chunks
resident (read-modify-write). A table that fits L1 is loaded into it as it is read.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

from .write_buffer import BufferedWrites, RowWriteBuffer

_NO_SLOT = -1
_ALL = slice(None)  # "every position of the call"
_BEYOND = np.iinfo(np.int64).max  # past every row slot


class ChunkIO(Protocol):
    """Where a column's chunks come from and go to (implemented by the sessions)."""

    def load(self, chunks: list[int]) -> Iterator[tuple[int, np.ndarray, int]]:
        """(chunk, rows view, version) of each chunk, read while a transaction is open."""

    def versions(self, chunks: list[int]) -> list[int]:
        """The committed version of each chunk (0: never written)."""

    def spill(self, chunk: int, rows: np.ndarray) -> None:
        """Keep a dirty chunk that leaves L1 (written into the pending transaction)."""

    def staging(self, n_rows: int) -> np.ndarray:
        """Room for one chunk's rows that :meth:`spill` writes without copying them first (valid until a spill)."""

    def read_rows(self, slots: np.ndarray) -> np.ndarray:
        """The committed rows of row slots ``slots`` (clean chunks only), copied out of LMDB's map: a fresh array."""

    def read_spilled_rows(self, slots: np.ndarray) -> np.ndarray:
        """The rows of row slots ``slots`` (spilled chunks only) as the pending transaction holds them (a copy)."""

    def warm(self, slots: np.ndarray) -> None:
        """Make reading ``slots`` (clean chunks) from the map cheap soon: chunks looked up, pages read ahead."""


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


class CacheStats:
    """Counters shared by the caches of all columns of one handle."""

    def __init__(self) -> None:
        self.l1_hits = self.l1_misses = self.l2_hits = self.l2_misses = self.chunks_loaded = 0
        self.map_rows = 0  # rows copied straight out of LMDB's map (chunks neither cached nor loaded)
        self.buffer_merges = 0  # write buffers merged into their chunks
        self.merged_chunks = 0  # chunks rewritten by those merges

    def as_dict(self) -> dict:
        lookups = self.l1_hits + self.l1_misses
        return {
            "l1_hits": self.l1_hits,
            "l1_misses": self.l1_misses,
            "l2_hits": self.l2_hits,
            "l2_misses": self.l2_misses,
            "hit_rate": (self.l1_hits + self.l2_hits) / lookups if lookups else 0.0,
            "chunks_loaded": self.chunks_loaded,
            "map_rows": self.map_rows,
            "buffer_merges": self.buffer_merges,
            "merged_chunks": self.merged_chunks,
        }


class VictimCache:
    """L2: clean chunks pushed out of L1, decoded, least recently kept first, within a byte budget."""

    def __init__(self) -> None:
        # chunk -> (rows, version, commit at which a reader last checked the version)
        self._entries: OrderedDict[int, tuple[np.ndarray, int, int]] = OrderedDict()
        self.bytes = 0
        self.budget = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._entries))

    def __contains__(self, chunk: object) -> bool:
        return chunk in self._entries

    def keep(self, chunk: int, rows: np.ndarray, version: int, checked_at: int) -> None:
        """Keep a copy of ``rows`` (if the budget allows a chunk at all), pushing the oldest out."""
        if self.budget < rows.nbytes or not self.budget:
            return
        while self._entries and self.bytes + rows.nbytes > self.budget:
            _, (old, _, _) = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
        self._entries[chunk] = (rows.copy(), version, checked_at)
        self.bytes += rows.nbytes

    def take(self, chunk: int) -> tuple[np.ndarray, int, int] | None:
        """Remove and return ``(rows, version, checked_at)`` of ``chunk``, or None."""
        entry = self._entries.pop(chunk, None)
        if entry is not None:
            self.bytes -= entry[0].nbytes
        return entry

    def checked_before(self, chunks: list[int], commit: int) -> list[int]:
        """Those of ``chunks`` held here and last checked before ``commit`` (a reader)."""
        return [c for c in chunks if c in self._entries and self._entries[c][2] < commit]

    def recheck(self, chunk: int, version: int, commit: int) -> bool:
        """True (and checked at ``commit``) if the held version is ``version``; False if it is stale."""
        rows, held, _ = self._entries[chunk]
        if held != version:
            return False
        self._entries[chunk] = (rows, held, commit)
        return True


class ChunkSet:
    """A set of chunk numbers as a bool array: membership of a whole call's chunks is one fancy index."""

    def __init__(self) -> None:
        self._member = np.zeros(0, bool)
        self._count = 0

    def __bool__(self) -> bool:
        return self._count > 0

    def add(self, chunk: int) -> None:
        if chunk >= len(self._member):
            self._member = _grown(self._member, max(chunk + 1, 2 * len(self._member), 16), False)
        if not self._member[chunk]:
            self._member[chunk] = True
            self._count += 1

    def discard(self, chunk: int) -> None:
        if chunk < len(self._member) and self._member[chunk]:
            self._member[chunk] = False
            self._count -= 1

    def contains(self, chunks: np.ndarray) -> np.ndarray:
        """Membership of each of ``chunks`` (non-negative ints)."""
        if not self._count:
            return np.zeros(len(chunks), bool)
        inside = chunks < len(self._member)
        out = np.zeros(len(chunks), bool)
        out[inside] = self._member[chunks[inside]]
        return out

    def chunks(self) -> list[int]:
        return np.flatnonzero(self._member).tolist()

    def clear(self) -> None:
        if self._count:
            self._member[:] = False
            self._count = 0


class L1Slab:
    """L1's slots and their bookkeeping: ``capacity`` chunk-sized slots of one 2-D array, which chunk each slot
    holds (its rows, version, last check, last use, dirty flag), and the chunk -> slot index. What to load,
    keep, evict or read around them is :class:`ColumnCache`'s."""

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
        self.chunk_slot = np.full(0, _NO_SLOT, np.int64)
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
            self.chunk_slot = _grown(self.chunk_slot, max(n_chunks, 2 * len(self.chunk_slot), 16), _NO_SLOT)

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

        self.slot_chunk = _grown(self.slot_chunk, new, _NO_SLOT)
        self.slot_rows, self.slot_version = _grown(self.slot_rows, new, 0), _grown(self.slot_version, new, 0)
        self.slot_validated, self.last_used = _grown(self.slot_validated, new, 0), _grown(self.last_used, new, 0)
        self.dirty = _grown(self.dirty, new, False)
        self._free.extend(range(new - 1, self._n_slots - 1, -1))
        self._n_slots = new

    def slots_of(self, chunks: np.ndarray) -> np.ndarray:
        self._grow_index(int(chunks.max()) + 1 if len(chunks) else 0)
        return self.chunk_slot[chunks]

    def _take_slot(self, chunk: int) -> int:
        """A free slot for ``chunk``: its own number when free (see the module doc), else any."""
        if chunk < self._n_slots and self.slot_chunk[chunk] == _NO_SLOT:
            return chunk
        while True:
            slot = self._free.pop()
            if self.slot_chunk[slot] == _NO_SLOT:
                return slot

    def _release_slot(self, slot: int) -> None:
        chunk = int(self.slot_chunk[slot])
        self.chunk_slot[chunk] = _NO_SLOT
        self.slot_chunk[slot] = _NO_SLOT
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


class ColumnCache(BufferedWrites, L1Slab):
    """One column's cache (see the module docstring): L1 slots, the L2 victims, spills and reads beside them."""

    def __init__(self, width: int, dtype: np.dtype, chunk_rows: int, fill: float, stats: CacheStats,
                 io: ChunkIO, table: TableView):
        super().__init__(width, dtype, chunk_rows, table)
        self.fill, self.stats, self.io = fill, stats, io
        self._checked_at = -1  # reader: every resident chunk was checked at this commit
        self._tick = 0
        self.l2 = VictimCache()
        # chunks spilled into the pending write transaction since the last commit: their committed
        # rows are not theirs any more, so they are never read from the map
        self.spilled = ChunkSet()
        # a writer of a table larger than L1: rows written to chunks not in L1 (``core/write_buffer.py``);
        # a row slot is never both buffered and in a resident chunk
        self.buffer = RowWriteBuffer(width, dtype)

    # -- sizing ------------------------------------------------------------------------
    def set_budget(self, l1_bytes: int, l2_bytes: int, min_chunks: int = 2, write_buffer: bool = False) -> None:
        """L1 holds ``l1_bytes`` of chunks but never fewer than ``min_chunks`` (a writer's read-modify-write needs
        two; a reader, which reads a table larger than L1 from the map, none).

        A writer (``min_chunks`` > 0) of a table larger than that, with ``write_buffer``, gives the bytes of L1
        beyond its ``min_chunks``, and L2's, to the row write buffer instead: beyond the cache, reads come from
        the map (or the pending transaction) and writes go to the buffer, so nothing would fill them."""
        chunk_bytes = max(self.chunk_bytes, 1)
        self.capacity = max(min_chunks, l1_bytes // chunk_bytes)
        buffer_bytes = 0
        if write_buffer and min_chunks and (self.capacity < self._chunk_limit or len(self.buffer)):
            buffer_bytes = max(0, l1_bytes + l2_bytes - min_chunks * chunk_bytes)  # L2 too: nothing is evicted
            self.capacity, l2_bytes = min_chunks, 0
            for chunk in list(self.l2):
                self.l2.take(chunk)
        self.buffer.set_budget(buffer_bytes)
        self.l2.budget = max(0, l2_bytes) if l2_bytes >= self.chunk_bytes else 0

    @property
    def bytes(self) -> int:
        return self.slab.nbytes + self.l2.bytes + self.buffer.bytes

    # -- rows in, rows out ---------------------------------------------------------------
    def gather(self, slots: np.ndarray) -> np.ndarray:
        """The rows of row slots ``slots`` (any order, duplicates allowed), as a fresh array."""
        if self._n_resident and len(slots) and self._whole_table_in_place():
            if len(slots) == 1:  # one row (a Dataset's __getitem__): scalar work only
                slot = int(slots[0])
                self._touch_one(slot // self.chunk_rows)
                return self.slab[slot : slot + 1].copy()
            self._touch(slots // self.chunk_rows)
            out = np.empty((len(slots), self.width), self.dtype)
            np.take(self.slab, slots, axis=0, out=out)
            return out
        if len(slots) and self.capacity < self._chunk_limit:
            return self._gather_beside(slots)
        return self._gather_cached(slots)

    def _gather_cached(self, slots: np.ndarray) -> np.ndarray:
        """Rows of ``slots`` through L1: chunks made resident (loaded when missing), then one fancy index."""
        out = np.empty((len(slots), self.width), self.dtype)
        for positions, rows, _ in self._locate(slots):
            if positions is _ALL:
                np.take(self.slab, rows, axis=0, out=out)
            else:
                out[positions] = self.slab[rows]
        return out

    def _gather_beside(self, slots: np.ndarray) -> np.ndarray:
        """Rows of a table larger than L1: chunks in L1 or spilled from this cache through L1, the others
        copied straight out of LMDB's map (nothing loaded, nothing evicted)."""
        out = self._gather_unbuffered(slots)
        if len(self.buffer):
            self.buffer.overlay(slots, out)
        return out

    def _gather_unbuffered(self, slots: np.ndarray) -> np.ndarray:
        """``_gather_beside`` but for the rows held in the write buffer (read from under it)."""
        if not (self._n_resident or self.spilled):  # a reader of a large table: every row from the map
            self.stats.map_rows += len(slots)
            return self.io.read_rows(slots)
        chunks = slots // self.chunk_rows
        self._grow_index(int(chunks.max()) + 1)
        resident = self.chunk_slot[chunks] != _NO_SLOT
        spilled = self.spilled.contains(chunks) & ~resident
        if not self._buffering:  # (a writer whose chunks fit L1 again, rows added) spilled chunks come through L1
            resident |= spilled
            spilled[:] = False
        if resident.all():
            return self._gather_cached(slots)
        out = np.empty((len(slots), self.width), self.dtype)
        if resident.any():
            here = np.flatnonzero(resident)
            out[here] = self._gather_cached(slots[here])
        if spilled.any():
            there = np.flatnonzero(spilled)
            out[there] = self.io.read_spilled_rows(slots[there])
        away = np.flatnonzero(~(resident | spilled))
        if len(away):
            self.stats.map_rows += len(away)
            out[away] = self.io.read_rows(slots[away])
        return out

    def scatter(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` (checked, cast) into row slots ``slots`` (unique), marking their chunks dirty."""
        if len(slots) and self._whole_table_in_place():
            chunks = slots // self.chunk_rows
            self._touch(chunks)
            self.slab[slots] = values
            self.dirty[chunks] = True
            return
        if len(slots) and self._buffering:
            self._scatter_buffered(slots, values)
            return
        self._scatter_cached(slots, values)

    def _scatter_cached(self, slots: np.ndarray, values: np.ndarray) -> None:
        for positions, rows, cache_slots in self._locate(slots):
            self.slab[rows] = values[positions]
            self.dirty[cache_slots] = True  # every located chunk receives rows

    def prefetch(self, slots: np.ndarray) -> None:
        """Bring the rows of ``slots`` closer (``store.prefetch``): a table that fits L1 gets their chunks loaded,
        a larger one has the clean chunks warmed in LMDB's map. Never evicts, so never spills."""
        if not len(slots):
            return
        chunks = slots // self.chunk_rows
        if self.capacity >= self._chunk_limit:
            unique = np.unique(chunks)
            if len(unique) <= self.capacity:
                self._resident(unique)
            return
        self._grow_index(int(chunks.max()) + 1)
        clean = (self.chunk_slot[chunks] == _NO_SLOT) & ~self.spilled.contains(chunks)
        if clean.any():
            self.io.warm(slots[clean])

    def fits_at_once(self, slots: np.ndarray) -> bool:
        """True if the chunks of ``slots`` can all be resident at once (a call served in one group).

        Checked without a sort when L1 can hold the whole table or more chunks than ``slots`` has rows.
        """
        if len(slots) <= self.capacity or self.capacity >= self._chunk_limit:
            return True
        if self._buffering and len(slots) <= self.buffer.limit:  # no chunk is made resident
            return True
        return len(np.unique(slots // self.chunk_rows)) <= self.capacity

    def _whole_table_in_place(self) -> bool:
        """Every chunk of the table resident in its own slot, current (reader), none short of rows."""
        if not self._n_resident:  # nothing in L1 (a reader of a large table): no arithmetic
            return False
        limit = self._chunk_limit
        if self._n_misplaced or self._n_resident != limit or self._n_slots < limit:
            return False
        last = limit - 1
        if self.slot_rows[last] < self.table.rows - last * self.chunk_rows:
            return False
        commit = self.table.validate_against
        if commit is None or commit == self._checked_at:
            return True
        if self.slot_validated[: self._n_slots].min() < commit:
            return False
        self._checked_at = commit  # chunks installed later are checked as they come in
        return True

    def _touch_one(self, slot: int) -> None:
        self._tick += 1
        self.last_used[slot] = self._tick
        self.stats.l1_hits += 1

    def _touch(self, slots: np.ndarray) -> None:
        """Record L1 hits on resident ``slots`` (duplicates allowed) for LRU and stats."""
        self._tick += 1
        self.last_used[slots] = self._tick
        self.stats.l1_hits += int(np.count_nonzero(self.last_used[: self._n_slots] == self._tick))

    def _locate(self, slots: np.ndarray) -> Iterator[tuple]:
        """Yield (positions in ``slots``, rows in the slab, cache slots of the chunks).

        All chunks of a call are made resident at once when they fit in L1 (the common
        case: one fancy index); otherwise in groups that fit, one group at a time.
        """
        if len(slots) == 0:
            return
        cr = self.chunk_rows
        chunk_of = slots // cr
        offset = slots - chunk_of * cr
        hot = self._hot_slots(chunk_of, offset)
        if hot is not None:
            yield _ALL, hot * cr + offset, hot
            return
        unique, inverse = _unique_inverse(chunk_of)
        if len(unique) <= self.capacity:
            cache_slots = self._resident(unique)
            yield _ALL, cache_slots[inverse] * cr + offset, cache_slots
            return
        group = max(1, self.capacity // 2)
        for start in range(0, len(unique), group):
            part = unique[start : start + group]
            cache_slots = self._resident(part)
            positions = np.flatnonzero((inverse >= start) & (inverse < start + len(part)))
            yield positions, cache_slots[inverse[positions] - start] * cr + offset[positions], cache_slots

    def _hot_slots(self, chunk_of: np.ndarray, offset: np.ndarray):
        """Slab slot of every row's chunk if all are resident and usable as they are, else None.

        The steady state of training: no unique/inverse and no per-chunk work, so a small
        batch costs a handful of numpy calls. Any miss, a row added since its chunk was
        loaded, or (reader) a chunk not yet checked against the latest commit takes the
        general path.
        """
        if int(chunk_of.max()) >= len(self.chunk_slot):
            return None
        hot = self.chunk_slot[chunk_of]
        if hot.min() < 0 or not (offset < self.slot_rows[hot]).all():
            return None
        commit = self.table.validate_against
        if commit is not None and (self.slot_validated[hot] < commit).any():
            return None
        self._touch(hot)
        return hot

    def _resident(self, chunks: np.ndarray) -> np.ndarray:
        """Slots of ``chunks`` (unique, <= capacity) after making them resident and current."""
        commit = self.table.validate_against
        if commit is not None:
            self._revalidate(chunks, commit)
        slots = self._ensure(chunks)
        if commit is not None:
            self.slot_validated[slots] = commit
        held = self.slot_rows[slots]
        cr = self.chunk_rows
        if held.min() >= cr:  # every chunk full: none can lack rows
            return slots
        expected = np.minimum(self.table.rows - chunks * cr, cr)
        for i in np.flatnonzero(held < expected).tolist():  # chunks grown by add since loaded: pad with fill
            slot = int(slots[i])
            self.slab[slot * cr + int(self.slot_rows[slot]) : slot * cr + int(expected[i])] = self.fill
            self.slot_rows[slot] = expected[i]
        return slots

    def _revalidate(self, chunks: np.ndarray, commit: int) -> None:
        """Reader: forget cached chunks rewritten by commits made since they were checked."""
        slots = self.slots_of(chunks)
        resident = slots >= 0
        check = np.zeros(len(chunks), bool)
        check[resident] = self.slot_validated[slots[resident]] < commit
        in_l2 = self.l2.checked_before(chunks[~resident].tolist(), commit)
        to_check = chunks[check].tolist()
        if not to_check and not in_l2:
            return
        versions = self.io.versions(to_check + in_l2)
        stale = []
        for chunk, slot, version in zip(to_check, slots[check].tolist(), versions[: len(to_check)], strict=True):
            if version != self.slot_version[slot]:
                stale.append(chunk)
            else:
                self.slot_validated[slot] = commit
        for chunk, version in zip(in_l2, versions[len(to_check) :], strict=True):
            if not self.l2.recheck(chunk, version, commit):
                stale.append(chunk)
        self.drop(stale)

    # -- residency -----------------------------------------------------------------------
    def _ensure(self, chunks: np.ndarray) -> np.ndarray:
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
                entry = self.l2.take(chunk)
                if entry is None:
                    from_lmdb.append(chunk)
                    continue
                self.stats.l2_hits += 1
                self._install(chunk, entry[0], entry[1])
            self.stats.l2_misses += len(from_lmdb)
            if from_lmdb:
                for chunk, rows, version in self.io.load(from_lmdb):
                    self._install(chunk, rows, version)
                    self.stats.chunks_loaded += 1
            slots = self.chunk_slot[chunks]
        self._tick += 1
        self.last_used[slots] = self._tick
        return slots

    def _reserve(self, n: int, pinned: np.ndarray) -> None:
        """Free ``n`` slots, growing the slab or evicting least recently used chunks."""
        free = self._n_slots - self._n_resident
        if free < n:
            self._grow_slab(self._n_slots + n - free)
        short = n - (self._n_slots - self._n_resident)
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
            self.io.spill(chunk, rows)
            self.spilled.add(chunk)
        else:
            self.l2.keep(chunk, rows, int(self.slot_version[slot]), int(self.slot_validated[slot]))
        self._release_slot(slot)

    # -- changes -----------------------------------------------------------------------
    def dirty_chunks(self) -> list[tuple[int, np.ndarray]]:
        """(chunk, rows view) of every dirty chunk, in key order."""
        slots = np.flatnonzero(self.dirty[: self._n_slots])
        slots = slots[np.argsort(self.slot_chunk[slots])]
        return [(int(self.slot_chunk[s]), self.rows_in_slot(int(s))) for s in slots.tolist()]

    @property
    def n_dirty(self) -> int:
        return int(self.dirty.sum())

    @property
    def has_changes(self) -> bool:
        """Dirty chunks in L1 or rows in the write buffer (spilled chunks are the session's to count)."""
        return bool(len(self.buffer)) or bool(self.dirty.any())

    def mark_clean(self, version: int) -> None:
        """After a commit: every dirty chunk is the committed one now, and nothing is spilled any more (the
        commit merged the write buffer first)."""
        self.slot_version[self.dirty] = version
        self.slot_validated[self.dirty] = version
        self.dirty[:] = False
        self.spilled.clear()

    def drop(self, chunks: Iterable[int]) -> None:
        """Forget chunks (stale in a reader, or discarded by rollback)."""
        cr = self.chunk_rows
        for chunk in chunks:
            self.l2.take(chunk)
            if chunk < len(self.chunk_slot) and self.chunk_slot[chunk] != _NO_SLOT:
                self._release_slot(int(self.chunk_slot[chunk]))
            self.spilled.discard(chunk)
            if len(self.buffer):
                self.buffer.drop_range(chunk * cr, (chunk + 1) * cr)

    def drop_dirty(self) -> None:
        """Rollback: forget dirty chunks, buffered rows and every chunk spilled into the aborted transaction."""
        self.buffer.clear()
        self.drop(self.slot_chunk[np.flatnonzero(self.dirty[: self._n_slots])].tolist() + self.spilled.chunks())

    def drop_from(self, first_chunk: int) -> None:
        self.buffer.drop_range(first_chunk * self.chunk_rows, _BEYOND)
        resident = self.slot_chunk[self.slot_chunk >= first_chunk].tolist()
        self.drop(resident + [c for c in self.l2 if c >= first_chunk])

    def forget_rows_from(self, first_row: int) -> None:
        """Forget row slots ``first_row`` and above (a failed ``add``): drop the chunks wholly past it,
        shorten the one it cuts (so a later commit never writes rows the table does not have)."""
        cut, keep = divmod(first_row, self.chunk_rows)
        self.drop_from(cut + 1 if keep else cut)
        self.buffer.drop_range(first_row, _BEYOND)
        if keep and cut < len(self.chunk_slot) and self.chunk_slot[cut] != _NO_SLOT:
            slot = int(self.chunk_slot[cut])
            self.slot_rows[slot] = min(int(self.slot_rows[slot]), keep)

    def clear(self) -> None:
        self.drop(self.slot_chunk[self.slot_chunk != _NO_SLOT].tolist())
        self.drop(list(self.l2))
        self.spilled.clear()
        self.buffer.clear()


def _grown(arr: np.ndarray, size: int, fill) -> np.ndarray:
    """``arr`` extended to ``size`` entries with ``fill``."""
    out = np.full(size, fill, arr.dtype)
    out[: len(arr)] = arr
    return out


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` without a sort when the span is small.

    A batch's chunk numbers usually lie in a narrow range (sequential passes, or a
    table of few chunks): a presence bitmap over the range is then O(n) instead of a sort.
    """
    lo, hi = int(values.min()), int(values.max())
    if lo == hi:  # one chunk (small tables, sequential batches within a chunk)
        return np.array([lo], values.dtype), np.zeros(len(values), np.intp)
    span = hi - lo + 1
    if span > 4 * len(values) + 64:
        return np.unique(values, return_inverse=True)
    present = np.zeros(span, bool)
    shifted = values - lo
    present[shifted] = True
    unique = np.flatnonzero(present)
    rank = np.cumsum(present) - 1
    return unique + lo, rank[shifted]


__all__ = ["CacheStats", "ChunkIO", "ColumnCache", "TableView"]

"""A writer's row-level write buffer: rows written to chunks that are not in L1, kept until a merge.

Why: in a table larger than the cache, a shuffled training step touches about one chunk per row.
Making each such chunk resident to write one row costs a whole chunk's load, and later its
spill (a chunk-sized LMDB put) when it leaves L1: hundreds of KiB moved per changed row. The
buffer keeps the changed ROWS instead; a merge then rewrites each changed chunk once, with all
its buffered rows, in chunk order (``ColumnCache.merge_buffer``).

The layout is two parallel int64 arrays, ``keys`` (row slots, sorted, unique) and ``where``
(each key's row in ``log``), and ``log``, an append-only array of rows. A write of a key already
held overwrites its log row in place; a new key appends a log row and is inserted into the
sorted keys (``np.searchsorted`` + ``np.insert`` on the int64 arrays only, never on the rows; keys past
every held one, as a pass in row order writes them, are appended).
Rows taken out (a chunk brought into L1 takes its rows with it, a rollback drops them) leave
garbage in the log; the log is compacted or merged when it is full. Every call is a handful of
numpy calls over the whole batch: no Python loop per row.

Its size is fixed by the cache budget (``limit`` rows, keys and log row counted), so memory does
not grow with the table. Only a writer of a table larger than L1 has one (``limit > 0``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

KEY_BYTES = 16  # per buffered row besides its values: its key and its log position


class RowWriteBuffer:
    """One column's buffered rows (see the module docstring)."""

    def __init__(self, width: int, dtype: np.dtype):
        self.width, self.dtype = width, np.dtype(dtype)
        self.row_bytes = width * self.dtype.itemsize
        self.limit = 0  # log rows it may hold (garbage included): 0 = no buffer
        self.keys = np.empty(0, np.int64)
        self.where = np.empty(0, np.int64)
        self._log = np.empty((0, width), self.dtype)
        self._used = 0  # log rows written since the last merge or compaction
        self._key_room: np.ndarray | None = None  # (2, limit): keys and where, appended in place (a pass in order)

    def set_budget(self, nbytes: int) -> None:
        """Hold at most ``nbytes`` (rows, keys, positions); rows held beyond a smaller budget go at the next merge."""
        self.limit = max(0, nbytes) // (self.row_bytes + KEY_BYTES)
        if not len(self.keys):
            self.clear()

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def bytes(self) -> int:
        room = self._key_room
        if room is None:
            return self._log.nbytes + self.keys.nbytes + self.where.nbytes
        apart = [a.nbytes for a in (self.keys, self.where) if a.base is not room]
        return self._log.nbytes + room.nbytes + sum(apart)

    @property
    def room(self) -> int:
        """New keys that fit without a compaction or a merge."""
        return self.limit - self._used

    # -- reads -------------------------------------------------------------------------
    def find(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in ``slots`` that are buffered, their log rows)."""
        keys = self.keys
        if not len(keys) or not len(slots):
            return np.empty(0, np.intp), np.empty(0, np.int64)
        at = np.searchsorted(keys, slots)
        np.minimum(at, len(keys) - 1, out=at)
        hit = np.flatnonzero(keys[at] == slots)
        return hit, self.where[at[hit]]

    def overlay(self, slots: np.ndarray, out: np.ndarray) -> None:
        """Write the buffered rows among ``slots`` over ``out`` (rows of ``slots`` read from elsewhere)."""
        positions, rows = self.find(slots)
        if len(positions):
            out[positions] = self._log[rows]

    # -- writes ------------------------------------------------------------------------
    def write(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Buffer ``values`` for row slots ``slots`` (unique). The caller made room for them (``room``)."""
        positions, rows = self.find(slots)
        if len(positions):
            self._log[rows] = values[positions]
            new = np.ones(len(slots), bool)
            new[positions] = False
            slots, values = slots[new], values[new]
        n = len(slots)
        if not n:
            return
        if self._used + n > self.limit:
            raise AssertionError("RowWriteBuffer.write without room")  # the cache merges first
        if len(self._log) < self._used + n:  # the log is allocated once, at its limit: untouched pages cost nothing
            log = np.empty((self.limit, self.width), self.dtype)
            log[: self._used] = self._log[: self._used]
            self._log = log
        if n > 1 and not (slots[1:] > slots[:-1]).all():  # in key order: the rows go to the log in that order
            order = np.argsort(slots, kind="stable")
            slots, values = slots[order], values[order]
        new_keys = slots
        self._log[self._used : self._used + n] = values
        new_where = np.arange(self._used, self._used + n, dtype=np.int64)
        if not len(self.keys) or new_keys[0] > self.keys[-1]:  # all past the held keys (a pass in row order)
            self._append_keys(new_keys, new_where)
        else:
            at = np.searchsorted(self.keys, new_keys)
            self.keys = np.insert(self.keys, at, new_keys)
            self.where = np.insert(self.where, at, new_where)
        self._used += n

    def _append_keys(self, new_keys: np.ndarray, new_where: np.ndarray) -> None:
        """Append keys past every held one in place, in a room of ``limit`` keys: no copy of the held keys per call
        (they move into the room once after an insert or a cut replaced them)."""
        held, n = len(self.keys), len(new_keys)
        room = self._key_room
        if room is None or room.shape[1] < held + n:
            room = self._key_room = np.empty((2, max(self.limit, held + n)), np.int64)
            room[0, :held], room[1, :held] = self.keys, self.where
        elif self.keys.base is not room or self.where.base is not room:  # replaced by an insert, a cut, a compaction
            room[0, :held], room[1, :held] = self.keys, self.where
        room[0, held : held + n], room[1, held : held + n] = new_keys, new_where
        self.keys, self.where = room[0, : held + n], room[1, : held + n]

    def compact(self) -> None:
        """Drop the garbage of rows taken out: the log holds exactly the keys' rows, in key order."""
        n = len(self.keys)
        if self._used == n:
            return
        self._log[:n] = self._log[self.where]
        self.where = np.arange(n, dtype=np.int64)
        self._used = n

    # -- taking rows out ------------------------------------------------------------------
    def take(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Remove and return (keys, rows) of the keys in ``[lo, hi)`` (a chunk coming into L1)."""
        a, b = np.searchsorted(self.keys, (lo, hi))
        if a == b:
            return self.keys[:0], self._log[:0]
        keys, rows = self.keys[a:b].copy(), self._log[self.where[a:b]]
        self._cut(int(a), int(b))
        return keys, rows

    def drop_range(self, lo: int, hi: int) -> None:
        a, b = np.searchsorted(self.keys, (lo, hi))
        if a < b:
            self._cut(int(a), int(b))

    def _cut(self, a: int, b: int) -> None:
        self.keys = np.delete(self.keys, np.s_[a:b])
        self.where = np.delete(self.where, np.s_[a:b])
        if not len(self.keys):
            self._used = 0

    def clear(self) -> None:
        self.keys = np.empty(0, np.int64)
        self.where = np.empty(0, np.int64)
        self._used = 0
        if len(self._log) > self.limit:  # the budget shrank while rows were held
            self._log = np.empty((0, self.width), self.dtype)
        if self._key_room is not None and self._key_room.shape[1] > self.limit:
            self._key_room = None

    def by_chunk(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(chunk, offsets in it, their log rows) of every chunk with buffered rows, in chunk order (keys in
        order); :meth:`rows` reads the log rows.

        Nothing is removed: the merge drops a chunk's keys (``drop_range``) once it is written.
        """
        keys, where = self.keys, self.where  # kept: the merge cuts the buffer's arrays as it goes
        if not len(keys):
            return
        chunks = keys // chunk_rows
        starts = np.flatnonzero(np.diff(chunks)) + 1
        bounds = [0, *starts.tolist(), len(keys)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=False):
            chunk = int(chunks[a])
            yield chunk, keys[a:b] - chunk * chunk_rows, where[a:b]

    def rows(self, logged: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The rows at log positions ``logged`` (from :meth:`by_chunk`), gathered into ``out`` if given
        (``mode="clip"``: the positions are valid, and numpy buffers ``out`` in its default mode)."""
        return np.take(self._log, logged, axis=0, out=out, mode="clip")


class BufferedWrites:
    """The write buffer's policy in a column cache (``ColumnCache`` inherits it; its attributes are the cache's):
    writes beyond L1 into the buffer, merges into the pending transaction, a chunk coming into L1 taking its
    buffered rows with it."""

    buffer: RowWriteBuffer
    chunk_rows: int
    capacity: int

    @property
    def _buffering(self) -> bool:
        """Writes to chunks not in L1 go to the row write buffer (a writer of a table larger than L1)."""
        return self.buffer.limit > 0 and self.capacity < self._chunk_limit

    def _scatter_buffered(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Rows of resident chunks into L1, the others into the write buffer (made room for first, so a failed
        merge leaves the call unwritten). A call with more such rows than the buffer holds takes the chunk path
        (``_scatter_cached``: chunks made resident in groups, rows of a chunk written together)."""
        chunks = slots // self.chunk_rows
        self._grow_index(int(chunks.max()) + 1)
        resident = self.chunk_slot[chunks] >= 0
        away = np.flatnonzero(~resident)
        if len(away) > self.buffer.limit:
            self._scatter_cached(slots, values)
            return
        self._make_room(len(away))
        if len(away) < len(slots):
            here = np.flatnonzero(resident)
            self._scatter_cached(slots[here], values[here])
            slots, values = slots[away], values[away]
        self.buffer.write(slots, values)

    def _make_room(self, n: int) -> None:
        """Room in the write buffer for ``n`` new rows: compacted if that frees enough, else merged."""
        buffer = self.buffer
        if buffer.room >= n:
            return
        if buffer.limit - len(buffer) >= max(n, buffer.limit // 4):
            buffer.compact()
        else:
            self.merge_buffer()

    def merge_buffer(self) -> None:
        """Write every buffered row into its chunk: each chunk with buffered rows is rewritten ONCE, in chunk
        order, into the pending transaction (``ChunkIO.spill``), its other rows taken from where its current
        version is (the pending transaction if spilled, else the store). A chunk's rows leave the buffer once
        its spill succeeded, so a failure leaves every row either buffered or spilled."""
        buffer, cr = self.buffer, self.chunk_rows
        if not len(buffer):
            return
        self.stats.buffer_merges += 1
        done = 0  # row slots below this are merged
        try:
            for chunk, offsets, logged in buffer.by_chunk(cr):
                expected = min(self.table.rows - chunk * cr, cr)
                if chunk < len(self.chunk_slot) and self.chunk_slot[chunk] >= 0:  # never: install takes them
                    raise AssertionError(f"chunk {chunk} both buffered and resident")
                whole = self.io.staging(expected)  # assembled where the spill encodes it: no copy there
                if len(offsets) == expected:  # every row of the chunk is buffered (keys sorted: offsets 0..n-1)
                    buffer.rows(logged, out=whole)
                else:
                    held = 0
                    for _, current, _ in self.io.load([chunk]):
                        held = min(len(current), expected)
                        whole[:held] = current[:held]
                    whole[held:] = self.fill  # rows added since the chunk was stored (or a chunk never stored)
                    whole[offsets] = buffer.rows(logged)
                self.io.spill(chunk, whole)
                self.spilled.add(chunk)
                self.l2.take(chunk)  # a clean copy kept before the merge is stale now
                self.stats.merged_chunks += 1
                done = (chunk + 1) * cr
        finally:
            buffer.drop_range(0, done)

    def _install(self, chunk: int, rows: np.ndarray, version: int) -> None:
        """Install a chunk in L1 with its buffered rows (taken out of the buffer: the chunk is dirty then)."""
        super()._install(chunk, rows, version)
        if not len(self.buffer):
            return
        cr = self.chunk_rows
        keys, buffered = self.buffer.take(chunk * cr, (chunk + 1) * cr)
        if not len(keys):
            return
        slot = int(self.chunk_slot[chunk])
        held, needed = int(self.slot_rows[slot]), int(keys[-1]) - chunk * cr + 1
        if held < needed:  # rows added since the chunk was stored: the fill up to the last buffered one
            self.slab[slot * cr + held : slot * cr + needed] = self.fill
            self.slot_rows[slot] = needed
        self.slab[slot * cr + keys - chunk * cr] = buffered
        self.dirty[slot] = True


__all__ = ["KEY_BYTES", "BufferedWrites", "RowWriteBuffer"]

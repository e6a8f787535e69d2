"""Rows read in place from LMDB's memory map: one column's chunk directory.

A read transaction opened with ``buffers=True`` hands out memoryviews into LMDB's map of the
data file. The directory remembers, per chunk, where its payload lies in that map, so the rows of
a chunk that is not in the cache cost a row copy out of the map (one numpy fancy index for the
whole call) instead of a whole chunk's decode, checksum and copy into the cache. Each entry costs
one B-tree lookup, made the first time a chunk is needed after a commit.

Why an address stays valid (docs/ARCHITECTURE.md, "Reads"): the entries describe ONE snapshot,
named by LMDB's transaction id and the map's epoch (``SharedEnv.map_epoch``: a remap moves every
address). LMDB never reuses a page of the latest commit before a newer commit frees it and no
reader holds it, so while the latest transaction id is the one the entries were made under, the
caller's read transaction (which sees that commit and keeps its pages while the rows are copied)
finds every payload where it was. A new transaction id empties the directory (it is refilled
lazily); nothing is held between calls, so readers never pin pages nor block the writer.

Checksums are verified once per committed version: ``verified[c]`` is the version of chunk ``c``
whose checksum passed. A version is the commit number that wrote the chunk and is never reused
for other bytes, so a chunk unchanged by a commit is not hashed again, and a loader that meets a
verified version (``trusted_version``) skips the hash too.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptionError
from ..format.chunks import checked_payload, chunk_key
from ..processes.memory import will_need

UNKNOWN = -(1 << 62)  # not looked up in this snapshot
ABSENT = UNKNOWN + 1  # not in the snapshot (never written): its rows are the column's fill
SHORT = UNKNOWN + 2  # holds fewer rows than the snapshot's table has in it: rows past them are the fill
_IRREGULAR = UNKNOWN + 3  # entries below this take the row-by-row path


class ChunkDirectory:
    """Where each committed chunk of one column lies in LMDB's map, for one snapshot (see the module doc)."""

    def __init__(self, chunk_rows: int, width: int, dtype: np.dtype, fill: float, where: str, required: bool):
        self.chunk_rows, self.width, self.dtype, self.fill = chunk_rows, width, np.dtype(dtype), fill
        self.row_bytes = width * self.dtype.itemsize
        self.where = where  # " of column 'x'" in error messages
        self.required = required  # every chunk holding committed rows exists (the main column)
        self._rows = 0  # rows of the snapshot's table
        # per chunk: the byte offset in the view of row slot 0's place (payload - lo - first slot * row_bytes),
        # so that a row's offset is base[chunk] + slot * row_bytes; or UNKNOWN / ABSENT / SHORT
        self._base = np.full(0, UNKNOWN, np.int64)
        self._payload = np.zeros(0, np.int64)  # absolute address of the payload (known chunks)
        self._stored = np.zeros(0, np.int64)  # rows the chunk holds (known chunks)
        self.verified = np.full(0, -1, np.int64)  # the version whose checksum passed, per chunk
        self._snapshot: tuple[int, int] | None = None  # (LMDB txn id, map epoch) the entries hold for
        self._lo = self._hi = 0  # every known payload lies in [lo, hi) of the map
        self._view: np.ndarray | None = None  # rows of the map: element i = row_bytes bytes from lo + i

    # -- the snapshot --------------------------------------------------------------------
    def follow(self, txnid: int, epoch: int, rows: int) -> None:
        """Adopt the snapshot of the caller's read transaction (its table has ``rows`` committed rows):
        forget entries made under another one."""
        if self._snapshot == (txnid, epoch):
            return
        self._rows = rows
        self._grow(-(-rows // self.chunk_rows))  # a chunk number for every row: rows() needs no bounds check
        if self._snapshot is None or self._snapshot[1] != epoch:  # remapped: every address moved
            self._lo = self._hi = 0
            self._view = None
        self._base.fill(UNKNOWN)
        self._snapshot = (txnid, epoch)

    def note_verified(self, chunk: int, version: int) -> None:
        """A loader checked this committed version's checksum (so the directory need not)."""
        self._grow(chunk + 1)
        self.verified[chunk] = version

    def trusted_version(self, chunk: int) -> int | None:
        return int(self.verified[chunk]) if chunk < len(self.verified) and self.verified[chunk] >= 0 else None

    # -- rows ----------------------------------------------------------------------------
    def rows(self, txn, db, slots: np.ndarray) -> np.ndarray:
        """The committed rows of row slots ``slots`` as of ``txn`` (after :meth:`follow`), a fresh array.

        A chunk missing from the snapshot reads as the fill (corruption if it should hold the main
        column's committed rows), and so do rows past those a chunk holds.
        """
        n = len(slots)
        if n == 1:  # one row (a Dataset's __getitem__): scalar work while its chunk is known
            slot = int(slots[0])
            chunk = slot // self.chunk_rows
            if chunk < len(self._base):
                base = int(self._base[chunk])
                if base >= _IRREGULAR:
                    at = base + slot * self.row_bytes
                    return self._view[at : at + 1].copy().view(self.dtype).reshape(1, self.width)
        elif n == 0:
            return np.empty((0, self.width), self.dtype)
        chunks = slots // self.chunk_rows  # within the snapshot's rows (follow grew the entries for them)
        base = self._base[chunks]
        if np.minimum.reduce(base) < _IRREGULAR:
            unknown = chunks[base == UNKNOWN]
            if len(unknown):
                self._lookup(txn, db, np.unique(unknown).tolist())
                base = self._base[chunks]
            if base.min() < _IRREGULAR:
                return self._irregular_rows(slots, chunks, base)
        offsets = np.multiply(slots, self.row_bytes)
        offsets += base
        return self._view[offsets].view(self.dtype).reshape(n, self.width)

    def _copy(self, offsets: np.ndarray, n: int) -> np.ndarray:
        return self._view[offsets].view(self.dtype).reshape(n, self.width)

    def _irregular_rows(self, slots: np.ndarray, chunks: np.ndarray, base: np.ndarray) -> np.ndarray:
        """Rows of calls touching absent or short chunks: the rows they hold, the fill past them."""
        out = np.empty((len(slots), self.width), self.dtype)
        regular = base >= _IRREGULAR
        if regular.any():
            out[regular] = self._copy(base[regular] + slots[regular] * self.row_bytes, int(regular.sum()))
        rest = np.flatnonzero(~regular)
        offset = slots[rest] - chunks[rest] * self.chunk_rows
        held = (base[rest] == SHORT) & (offset < self._stored[chunks[rest]])
        out[rest[~held]] = self.fill
        if held.any():
            where = self._payload[chunks[rest[held]]] - self._lo + offset[held] * self.row_bytes
            out[rest[held]] = self._copy(where, int(held.sum()))
        return out

    def warm(self, txn, db, slots: np.ndarray) -> None:
        """Look up (and verify) the chunks of ``slots`` now and ask the kernel to read their rows' pages ahead."""
        if not len(slots):
            return
        chunks = slots // self.chunk_rows
        self._grow(int(chunks.max()) + 1)
        unknown = chunks[self._base[chunks] == UNKNOWN]
        if len(unknown):
            self._lookup(txn, db, np.unique(unknown).tolist())
        base = self._base[chunks]
        regular = base >= _IRREGULAR
        if regular.any():
            will_need(base[regular] + slots[regular] * self.row_bytes + self._lo, self.row_bytes)

    # -- lookups ---------------------------------------------------------------------------
    def _lookup(self, txn, db, chunks: list[int]) -> None:
        """Find ``chunks`` in ``txn`` (one B-tree lookup each), verifying versions not verified before.

        Entries are entered only once every offset is consistent with the view: a chunk that fails its
        check (``CorruptionError``) stays unknown, and those found before it are kept.
        """
        found: list[int] = []
        short: list[int] = []
        lo, hi = self._lo, self._hi
        try:
            for chunk in chunks:
                value = txn.get(chunk_key(chunk), db=db) if db is not None else None
                if value is None:
                    if self.required and chunk * self.chunk_rows < self._rows:
                        raise CorruptionError(f"chunk {chunk}{self.where} is missing from the store")
                    self._base[chunk], self._stored[chunk] = ABSENT, 0
                    continue
                trusted = int(self.verified[chunk])
                header, payload = checked_payload(value, chunk, self.row_bytes, self.where,
                                                  trusted if trusted >= 0 else None)
                self.verified[chunk] = header.version
                self._stored[chunk] = header.n_rows
                if header.n_rows == 0:
                    self._base[chunk] = SHORT
                    continue
                address = np.frombuffer(payload, np.uint8).ctypes.data
                self._payload[chunk] = address
                lo, hi = (address, address + payload.nbytes) if hi == 0 else \
                    (min(lo, address), max(hi, address + payload.nbytes))
                # a chunk holding every row the table has in it is read at full speed; else row by row
                complete = header.n_rows >= min(self.chunk_rows, self._rows - chunk * self.chunk_rows)
                (found if complete else short).append(chunk)
        finally:
            self._enter(found, short, lo, hi)

    def _enter(self, found: list[int], short: list[int], lo: int, hi: int) -> None:
        """Make the chunks just found usable: offsets relative to ``lo`` (all again if the view starts lower)."""
        if not found and not short:
            return
        moved = lo != self._lo or self._view is None  # the view starts lower: every entry's offset moves
        if moved or hi != self._hi:
            self._lo, self._hi = lo, hi
            self._view = _rows_view(lo, hi, self.row_bytes)
        self._base[short] = SHORT
        chunks = np.flatnonzero(self._base >= _IRREGULAR) if moved else np.array(found, np.int64)
        if moved and found:
            chunks = np.union1d(chunks, found)
        self._base[chunks] = self._payload[chunks] - lo - chunks * (self.chunk_rows * self.row_bytes)

    def _grow(self, n: int) -> None:
        if n <= len(self._base):
            return
        size = max(n, 2 * len(self._base), 16)

        def grown(arr: np.ndarray, fill: int) -> np.ndarray:
            out = np.full(size, fill, arr.dtype)
            out[: len(arr)] = arr
            return out

        self._base = grown(self._base, UNKNOWN)
        self._payload = grown(self._payload, 0)
        self._stored = grown(self._stored, 0)
        self.verified = grown(self.verified, -1)


class _MapWindow:
    """The bytes ``[lo, hi)`` of LMDB's map as numpy sees them: element ``i`` is the ``row_bytes`` bytes at ``lo + i``
    (read-only, described by ``__array_interface__``: no copy, no ctypes type per size)."""

    def __init__(self, lo: int, hi: int, row_bytes: int):
        self.__array_interface__ = {"version": 3, "data": (lo, True), "typestr": f"|V{row_bytes}",
                                    "shape": (max(0, hi - lo - row_bytes + 1),), "strides": (1,)}


def _rows_view(lo: int, hi: int, row_bytes: int) -> np.ndarray:
    """A row anywhere in the map bytes ``[lo, hi)`` is one element: rows of many chunks are ONE fancy index."""
    return np.asarray(_MapWindow(lo, hi, row_bytes))


__all__ = ["ChunkDirectory"]

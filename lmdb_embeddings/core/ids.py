"""Sample ID -> row slot mapping, vectorized.

Row slot ``s`` is the position of an ID in ``ids`` (row order). Lookups use a sorted copy
of the IDs and ``np.searchsorted``; when the IDs are exactly ``0..N-1`` in order (the
common case) the slot *is* the ID and no search is needed. No Python dict of millions of
entries, no per-row loop.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptionError, InvalidInputError, UnknownIdError
from ..inputs import check_unique, shown_ids

_SHOWN_MISSING = 10


class IdIndex:
    """IDs in row order and their slots. IDs exactly ``0..N-1`` are held as the count alone
    (no array: memory independent of the table); any other IDs as an array plus a sorted copy."""

    def __init__(self, ids: np.ndarray):
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._buf: np.ndarray | None = ids.copy()
        self._n = len(ids)
        self._rebuild()

    @classmethod
    def from_chunks(cls, chunks) -> IdIndex:
        """Build from consecutive ID arrays (a store's ID chunks) without ever holding 0..N-1 as an array.

        Raises CorruptionError if an ID is there twice: only damage does that (``create`` and ``add``
        refuse duplicates), and a lookup would silently pick one of its rows.
        """
        index = cls(np.empty(0, np.int64))
        for part in chunks:
            index.append(part)
        twice = index.first_duplicate()
        if twice is not None:
            raise CorruptionError(f"the store's ids are damaged: id {twice} is stored more than once "
                                  "(run `lmdb-embeddings verify`; restore from a dump)")
        return index

    def first_duplicate(self, block: int = 1 << 20) -> int | None:
        """The smallest ID held twice, or None (a block of the sorted IDs at a time: bounded memory)."""
        if self._contiguous:
            return None
        for start in range(0, max(self._n - 1, 0), block):
            part = self._sorted[start : start + block + 1]
            same = np.flatnonzero(part[1:] == part[:-1])
            if len(same):
                return int(part[same[0]])
        return None

    # -- views -------------------------------------------------------------------------
    @property
    def ids(self) -> np.ndarray:
        """The IDs in row order (for contiguous IDs, a fresh ``arange``)."""
        if self._buf is None:
            return np.arange(self._n, dtype=np.int64)
        return self._buf[: self._n]

    def ids_copy(self) -> np.ndarray:
        """The IDs in row order, as an array the caller owns."""
        return self.ids if self._buf is None else self._buf[: self._n].copy()

    def slice(self, start: int, stop: int) -> np.ndarray:
        """IDs of row slots ``start:stop``, without building the whole array."""
        stop = min(stop, self._n)
        if self._buf is None:
            return np.arange(start, max(start, stop), dtype=np.int64)
        return self._buf[start:stop]

    def __len__(self) -> int:
        return self._n

    def _rebuild(self) -> None:
        ids = self.ids
        self._contiguous = bool(self._n == 0 or (ids[0] == 0 and ids[-1] == self._n - 1 and _is_arange(ids)))
        if self._contiguous:
            self._buf = None  # the count says it all
            self._sorted = self._order = None
        else:
            self._order = np.argsort(ids, kind="stable")
            self._sorted = ids[self._order]

    # -- lookups -----------------------------------------------------------------------
    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (slots, found-mask); slots of missing IDs are undefined."""
        if self._contiguous:
            found = (ids >= 0) & (ids < self._n)
            return np.where(found, ids, 0), found
        if self._n == 0:
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        pos = np.searchsorted(self._sorted, ids)
        pos_clipped = np.minimum(pos, self._n - 1)
        found = self._sorted[pos_clipped] == ids
        return self._order[pos_clipped], found

    def slots(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ``ids``; ``UnknownIdError`` naming some missing IDs if any is absent."""
        if self._contiguous and len(ids):  # IDs 0..N-1 in order: the slot is the ID (no copy)
            if len(ids) == 1:
                if 0 <= int(ids[0]) < self._n:
                    return ids
            elif np.maximum.reduce(ids.view(np.uint64)) < self._n:  # one pass: a negative ID is a huge uint64
                return ids
        slots, found = self.find(ids)
        if not found.all():
            missing = np.unique(ids[~found])
            shown = shown_ids(missing, _SHOWN_MISSING)
            more = f" and {len(missing) - _SHOWN_MISSING} more" if len(missing) > _SHOWN_MISSING else ""
            raise UnknownIdError(f"{len(missing)} unknown sample id(s): {shown}{more}")
        return slots

    def contains(self, ids: np.ndarray) -> np.ndarray:
        return self.find(ids)[1]

    # -- growth ------------------------------------------------------------------------
    def check_new(self, new_ids: np.ndarray) -> None:
        """Raise (changing nothing) unless ``new_ids`` are unique and all absent."""
        check_unique(new_ids, "add")
        present = self.contains(new_ids)
        if present.any():
            shown = shown_ids(new_ids[present])
            raise InvalidInputError(f"add: {int(present.sum())} id(s) already in the store: {shown}")

    def append(self, new_ids: np.ndarray) -> None:
        new_ids = np.asarray(new_ids, dtype=np.int64)
        old_n = self._n
        if self._contiguous and _is_arange(new_ids, start=old_n):
            self._n += len(new_ids)
            return
        if self._buf is None:  # contiguous so far: now it needs the array
            self._buf = np.arange(old_n, dtype=np.int64)
        need = old_n + len(new_ids)
        if need > len(self._buf):
            grown = np.empty(max(need, 2 * len(self._buf), 1024), np.int64)
            grown[:old_n] = self._buf[:old_n]
            self._buf = grown
        self._buf[old_n:need] = new_ids
        self._n = need
        if self._contiguous:
            self._rebuild()
            return
        # merge the new (sorted) ids into the sorted index: O(N), no full re-sort
        order = np.argsort(new_ids, kind="stable")
        pos = np.searchsorted(self._sorted, new_ids[order])
        self._sorted = np.insert(self._sorted, pos, new_ids[order])
        self._order = np.insert(self._order, pos, order + old_n)

    def truncate(self, n: int) -> None:
        """Forget the IDs after the first ``n`` (rollback of uncommitted adds)."""
        if n < self._n:
            self._n = n
            if self._buf is not None:
                self._rebuild()


def _is_arange(ids: np.ndarray, start: int = 0) -> bool:
    if len(ids) == 0:
        return True
    return bool(ids[0] == start and np.array_equal(ids, np.arange(start, start + len(ids), dtype=np.int64)))

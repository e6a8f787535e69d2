"""A model check of the column cache (``core/cache.py``): hypothesis drives random calls, a dict model says
what every call must return (the pattern of zarr's ``testing/stateful.py``).

:class:`CacheMachine` runs one :class:`~lmdb_embeddings.core.cache.ColumnCache` against :class:`FakeChunkIO`,
an in-memory stand-in for the session: a committed store (chunk -> rows, version), the writer's pending
transaction (chunks spilled into it), and "the map", which serves committed rows in place. Each run
picks a writer or a reader, the chunk size, the L1 and L2 budgets and (a writer) whether writes beyond L1
go to the row write buffer (``core/write_buffer.py``), then mixes gets (hits, misses, rows served from the
map or from the pending transaction, buffered rows over them), puts (evictions, spills, buffered rows,
merges), prefetches, adds, merges, commits and rollbacks, and, for a reader, commits by another writer
(revalidation). After every step it checks the bookkeeping
invariants; after every get, the rows against the model. The fake refuses what the session must never
be asked: a spilled or dirty chunk read from the map, a spill by a reader.

Run it with pytest (``tests/testing/test_cache_model.py``)::

    from lmdb_embeddings.testing.cache_model import CacheMachine
    TestCache = CacheMachine.TestCase

Needs hypothesis (the ``testing`` extra; without it, importing this module raises
:class:`~lmdb_embeddings.MissingDependencyError` saying so).
"""

from __future__ import annotations

import numpy as np

from ..core.cache import CacheStats, ColumnCache
from ..optional import import_needing

import_needing("hypothesis", "hypothesis", "lmdb_embeddings.testing.cache_model")

from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

FILL = -0.5  # the column's fill: rows a chunk does not hold read as this


class FakeTable:
    """What the cache sees of its table: the row count and (a reader) the commit to check chunks against."""

    def __init__(self, rows: int, validate_against: int | None):
        self.rows, self.validate_against = rows, validate_against


class FakeChunkIO:
    """The session as the cache sees it, in memory (see the module docstring)."""

    def __init__(self, chunk_rows: int, width: int, writer: bool):
        self.chunk_rows, self.width, self.writer = chunk_rows, width, writer
        self.committed: dict[int, tuple[np.ndarray, int]] = {}  # chunk -> (rows, version)
        self.pending: dict[int, np.ndarray] = {}  # writer: chunks spilled into the pending transaction
        self.commit = 0
        self.dirty_chunks: set[int] = set()  # kept up to date by the machine: never to be read from the map
        self.map_rows = self.loads = 0

    def load(self, chunks):
        for chunk in chunks:
            self.loads += 1
            if chunk in self.pending:
                yield chunk, self.pending[chunk].copy(), self.commit + 1
            elif chunk in self.committed:
                rows, version = self.committed[chunk]
                yield chunk, rows.copy(), version
            else:
                yield chunk, np.empty((0, self.width), np.float32), 0

    def versions(self, chunks):
        return [self.committed[c][1] if c in self.committed else 0 for c in chunks]

    def spill(self, chunk, rows):
        assert self.writer, "a reader spilled a chunk"
        self.pending[chunk] = np.array(rows, copy=True)

    def staging(self, n_rows):
        assert self.writer, "a reader assembled a chunk to spill"
        return np.empty((n_rows, self.width), np.float32)

    def _clean_only(self, slots):
        chunks = set((np.asarray(slots) // self.chunk_rows).tolist())
        spilled = chunks & set(self.pending)
        assert not spilled, f"spilled chunk(s) {sorted(spilled)} read from the map"
        assert not chunks & self.dirty_chunks, f"dirty chunk(s) {sorted(chunks & self.dirty_chunks)} read from the map"

    def read_rows(self, slots):
        self._clean_only(slots)
        self.map_rows += len(slots)
        out = np.full((len(slots), self.width), FILL, np.float32)
        for i, slot in enumerate(np.asarray(slots).tolist()):
            chunk, offset = divmod(slot, self.chunk_rows)
            rows = self.committed.get(chunk, (np.empty((0, self.width), np.float32), 0))[0]
            if offset < len(rows):
                out[i] = rows[offset]
        return out

    def warm(self, slots):
        self._clean_only(slots)

    def read_spilled_rows(self, slots):
        chunks = set((np.asarray(slots) // self.chunk_rows).tolist())
        assert chunks <= set(self.pending), f"chunk(s) {sorted(chunks - set(self.pending))} read as spilled"
        out = np.full((len(slots), self.width), FILL, np.float32)
        for i, slot in enumerate(np.asarray(slots).tolist()):
            chunk, offset = divmod(slot, self.chunk_rows)
            if offset < len(self.pending[chunk]):
                out[i] = self.pending[chunk][offset]
        return out


class CacheMachine(RuleBasedStateMachine):
    """Random calls on one ColumnCache, checked against a model of the table (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.cache: ColumnCache | None = None

    # mostly tables larger than L1 (the case of interest: spills, evictions, rows from the map), some that fit
    @initialize(writer=st.booleans(), chunk_rows=st.sampled_from([2, 3, 4, 1, 8]), width=st.sampled_from([1, 3]),
                rows=st.one_of(st.sampled_from([24, 40, 17, 60]), st.integers(1, 60)),
                l1_chunks=st.one_of(st.sampled_from([2, 3, 4, 0]), st.integers(0, 30)),
                l2_chunks=st.sampled_from([0, 2, 5]), seed=st.integers(0, 2**16),
                write_buffer=st.sampled_from([True, True, False]), buffer_rows=st.integers(1, 12))
    def start(self, writer, chunk_rows, width, rows, l1_chunks, l2_chunks, seed, write_buffer, buffer_rows):
        self.writer, self.chunk_rows, self.width = writer, chunk_rows, width
        self.rng = np.random.default_rng(seed)
        self.io = FakeChunkIO(chunk_rows, width, writer)
        self.table = FakeTable(rows, None if writer else 0)
        self.committed_model = self.rng.standard_normal((rows, width)).astype(np.float32)
        for chunk in range(-(-rows // chunk_rows)):  # the table as created: every chunk committed at version 0
            self.io.committed[chunk] = (self.committed_model[chunk * chunk_rows : (chunk + 1) * chunk_rows].copy(), 0)
        self.model = self.committed_model.copy()
        self.committed_rows = rows
        self.stats = CacheStats()
        self.cache = ColumnCache(width, np.float32, chunk_rows, FILL, self.stats, self.io, self.table)
        chunk_bytes = chunk_rows * width * 4
        l1_bytes = l1_chunks * chunk_bytes
        if write_buffer and writer and l1_chunks < -(-rows // chunk_rows):  # the buffer holds a few rows at least
            l1_bytes = max(l1_bytes, 2 * chunk_bytes + buffer_rows * (width * 4 + 16))
        self.cache.set_budget(l1_bytes, l2_chunks * chunk_bytes, 2 if writer else 0, write_buffer)
        self.budget = l1_bytes + l2_chunks * chunk_bytes

    # -- strategies over the current table --------------------------------------------------
    def _slots(self, data, unique: bool) -> np.ndarray:
        n = self.table.rows
        few = st.lists(st.integers(0, n - 1), min_size=1, max_size=min(n, 4), unique=unique)  # a chunk or two
        many = st.lists(st.integers(0, n - 1), min_size=1, max_size=min(3 * n, 40), unique=unique)  # groups
        return np.array(data.draw(st.one_of(few, few, many)), np.int64)

    def _note_dirty(self) -> None:
        self.io.dirty_chunks = {c for c, _ in self.cache.dirty_chunks()}

    # -- calls ---------------------------------------------------------------------------------
    @precondition(lambda self: self.cache is not None)
    @rule(data=st.data())
    def get(self, data):
        slots = self._slots(data, unique=False)
        got = self.cache.gather(slots)
        expected = self.model[slots]
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.array_equal(got, expected), f"get {slots.tolist()}: {got.tolist()} != {expected.tolist()}"
        self._note_dirty()

    @precondition(lambda self: self.cache is not None and (self.cache.spilled or self.cache.resident_chunks))
    @rule(data=st.data(), spilled=st.booleans())
    def get_a_cached_chunk(self, data, spilled):
        """A get aimed at a chunk in L1 or spilled (random slots rarely meet them in a large table)."""
        cache = self.cache
        chunks = cache.spilled.chunks() if spilled and cache.spilled else \
            cache.slot_chunk[cache.slot_chunk >= 0].tolist() or cache.spilled.chunks()
        chunk = data.draw(st.sampled_from(sorted(chunks)))
        lo, hi = chunk * self.chunk_rows, min(self.table.rows, (chunk + 1) * self.chunk_rows)
        if lo < hi:
            slots = np.arange(lo, hi, dtype=np.int64)
            assert np.array_equal(cache.gather(slots), self.model[slots]), f"get of cached chunk {chunk}"
        self._note_dirty()

    @precondition(lambda self: self.cache is not None and self.writer)
    @rule(data=st.data())
    def put(self, data):
        slots = self._slots(data, unique=True)
        values = self.rng.standard_normal((len(slots), self.width)).astype(np.float32)
        self.cache.scatter(slots, values)
        self.model[slots] = values
        self._note_dirty()

    @precondition(lambda self: self.cache is not None and self.writer and self.table.rows > 0)
    @rule(data=st.data())
    def put_a_run(self, data):
        """A put of consecutive slots, as a pass in row order makes: the write buffer appends its keys."""
        lo = data.draw(st.integers(0, self.table.rows - 1))
        slots = np.arange(lo, data.draw(st.integers(lo + 1, self.table.rows)), dtype=np.int64)
        values = self.rng.standard_normal((len(slots), self.width)).astype(np.float32)
        self.cache.scatter(slots, values)
        self.model[slots] = values
        self._note_dirty()

    @precondition(lambda self: self.cache is not None)
    @rule(data=st.data())
    def prefetch(self, data):
        self.cache.prefetch(self._slots(data, unique=False))
        self._note_dirty()

    @precondition(lambda self: self.cache is not None and self.writer and self.table.rows < 90)
    @rule(n=st.integers(1, 9))
    def add(self, n):
        start = self.table.rows
        values = self.rng.standard_normal((n, self.width)).astype(np.float32)
        self.table.rows += n
        self.cache.scatter(np.arange(start, start + n, dtype=np.int64), values)
        self.model = np.concatenate([self.model, values])
        self._note_dirty()

    @precondition(lambda self: self.cache is not None and self.writer)
    @rule()
    def merge(self):
        """The write buffer merged into its chunks (as when it is full): nothing a get returns changes."""
        self.cache.merge_buffer()
        assert not len(self.cache.buffer)
        self._note_dirty()

    @precondition(lambda self: self.cache is not None and self.writer)
    @rule()
    def commit(self):
        self.cache.merge_buffer()  # as the session's commit does, before it writes the dirty chunks
        version = self.io.commit + 1
        for chunk, rows in self.io.pending.items():  # what was spilled, then what is still dirty (newer)
            self.io.committed[chunk] = (rows.copy(), version)
        for chunk, rows in self.cache.dirty_chunks():
            self.io.committed[chunk] = (np.array(rows, copy=True), version)
        self.io.pending.clear()
        self.cache.mark_clean(version)
        self.io.commit = version
        self.committed_model, self.committed_rows = self.model.copy(), self.table.rows
        self._note_dirty()

    @precondition(lambda self: self.cache is not None and self.writer)
    @rule()
    def rollback(self):
        self.io.pending.clear()
        self.cache.drop_dirty()
        if self.table.rows != self.committed_rows:
            self.cache.drop_from(self.committed_rows // self.chunk_rows)
        self.table.rows = self.committed_rows
        self.model = self.committed_model.copy()
        self._note_dirty()

    @precondition(lambda self: self.cache is not None and not self.writer)
    @rule(data=st.data(), grow=st.integers(0, 6))
    def another_writer_commits(self, data, grow):
        """A reader's table moves on: some chunks rewritten (new version), maybe rows added."""
        version = self.io.commit + 1
        n = self.table.rows + grow
        model = np.concatenate([self.model, self.rng.standard_normal((grow, self.width)).astype(np.float32)])
        n_chunks = -(-n // self.chunk_rows)
        old_chunks = -(-self.table.rows // self.chunk_rows)
        rewritten = set(data.draw(st.lists(st.integers(0, n_chunks - 1), max_size=4)))
        rewritten |= set(range(max(0, old_chunks - 1) if grow else n_chunks, n_chunks))  # chunks the new rows are in
        for chunk in rewritten:
            lo, hi = chunk * self.chunk_rows, min(n, (chunk + 1) * self.chunk_rows)
            if chunk < old_chunks and data.draw(st.booleans()):
                model[lo:hi] = self.rng.standard_normal((hi - lo, self.width)).astype(np.float32)
            self.io.committed[chunk] = (model[lo:hi].copy(), version)
        self.io.commit = version
        self.model = model
        self.table.rows = n
        self.table.validate_against = version

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def bookkeeping_is_consistent(self):
        cache = self.cache
        if cache is None:
            return
        held = cache.slot_chunk[: cache._n_slots]
        resident = np.flatnonzero(held >= 0)
        assert len(resident) == cache.resident_chunks <= max(cache.capacity, 2 if self.writer else 0)
        for slot in resident.tolist():
            assert cache.chunk_slot[int(held[slot])] == slot
        assert cache.slab.shape[0] <= max(cache.capacity, 2) * cache.chunk_rows  # L1 within its budget
        assert cache.l2.bytes <= cache.l2.budget
        assert not set(cache.l2) & set(held[resident].tolist()), "a chunk both in L1 and L2"
        if not self.writer:
            assert cache.n_dirty == 0 and not self.io.pending
        buffer = cache.buffer
        keys = buffer.keys
        assert (np.diff(keys) > 0).all(), "buffered keys not sorted and unique"
        assert len(keys) <= buffer.limit and (not len(keys) or keys[-1] < self.table.rows)
        buffered_chunks = set((keys // self.chunk_rows).tolist())
        assert not buffered_chunks & set(held[resident].tolist()), "a row both buffered and in a resident chunk"
        if buffer.limit:
            assert buffer.limit * (buffer.row_bytes + 16) <= self.budget, "the write buffer beyond the cache budget"


__all__ = ["CacheMachine", "FakeChunkIO", "FakeTable", "FILL"]

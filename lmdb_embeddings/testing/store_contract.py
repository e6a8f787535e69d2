"""The store contract as a reusable pytest suite: subclass :class:`StoreContract` to run it.

Every test of the suite runs once per handle kind that can read a store (``HANDLE_KINDS``):
the writer itself, a read-only handle, an unpickled copy of the writer (a read-only handle
that reopened lazily) and a forked child's inherited copy of the writer (served from a real
child process). A subclass picks the handles' open options, e.g. a cache so small that every
call spills and evicts::

    from lmdb_embeddings.testing import StoreContract

    class TestTinyCache(StoreContract):
        open_options = {"cache_mb": 0.05}

The writer always writes; the handle under test must see exactly what the contract says:
its own uncommitted changes if it is the writer, the latest commit otherwise.

The suite is written against :class:`~lmdb_embeddings.TableHandle`, so it runs on any class
that implements it (``store_class``). A class whose calls are collective (``sharded``, e.g.
``ShardedEmbeddingStore``: ``lmdb_embeddings.testing.sharded_contract``) runs it on every rank in
step: each rank writes its :meth:`StoreContract.share` of every write, and the kinds of handle
it cannot give (``handle_kinds``) are skipped, as are the tests of what only a single process's
handle offers (the whole ID list, ``id in store``).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Callable

import numpy as np
import pytest

from ..errors import ClosedError, EmbeddingStoreError
from ..handle import TableHandle
from ..store import EmbeddingStore

HANDLE_KINDS = ("writer", "readonly", "unpickled", "forked")
ROWS, DIM, CHUNK_ROWS = 3000, 8, 64


class _ForkedHandle:
    """A forked child process that serves calls on its inherited copy of a handle."""

    def __init__(self, handle: TableHandle):
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(handle, child), daemon=True)
        self._proc.start()
        child.close()

    def call(self, method: str, *args):
        self._conn.send((method, args))
        if not self._conn.poll(60):
            raise TimeoutError(f"the forked child did not answer {method} within 60 s")
        ok, value = self._conn.recv()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()


def _serve(handle: TableHandle, conn) -> None:
    while True:
        request = conn.recv()
        if request is None:
            return
        method, args = request
        try:
            value = _CALLS[method](handle, *args)
            conn.send((True, value))
        except Exception as exc:  # sent back to the test process as it was raised
            conn.send((False, exc))


_CALLS = {
    "get": lambda h, ids: h.get(ids),
    "ids": lambda h: h.ids,
    "len": len,
    "contains": lambda h, i: i in h,
    "commit_count": lambda h: h.commit_count,
    "readonly": lambda h: h.readonly,
    "get_column": lambda h, name, ids: h.get_column(name, ids),
    "attrs": lambda h: h.attrs,
    "put": lambda h, ids, values: h.put(ids, values),
}


class Probe:
    """The handle under test, whichever kind it is, behind one interface."""

    def __init__(self, kind: str, writer: TableHandle, open_readonly: Callable[[str], TableHandle]):
        self.kind = kind
        self._forked = None
        if kind == "writer":
            self._handle = writer
        elif kind == "readonly":
            self._handle = open_readonly(writer.path)
        elif kind == "unpickled":
            self._handle = pickle.loads(pickle.dumps(writer))
        elif kind == "forked":
            self._handle = None
            self._forked = _ForkedHandle(writer)
        else:
            raise ValueError(f"unknown handle kind {kind!r}")

    @property
    def sees_uncommitted(self) -> bool:
        return self.kind == "writer"

    def __getattr__(self, method: str):
        if method.startswith("_") or method not in _CALLS:
            raise AttributeError(method)
        if self._forked is not None:
            return lambda *args: self._forked.call(method, *args)
        return lambda *args: _CALLS[method](self._handle, *args)

    def close(self) -> None:
        if self._forked is not None:
            self._forked.close()
        elif self.kind != "writer":
            self._handle.close()


class StoreContract:
    """What every handle kind promises about reads, writes, commits and reopening (see the module doc)."""

    open_options: dict = {}
    store_class: type = EmbeddingStore  # a class implementing TableHandle, with its create/open classmethods
    handle_kinds: tuple[str, ...] = HANDLE_KINDS  # the kinds store_class gives (the others are skipped)

    # -- what a subclass for another kind of handle may change ----------------------------
    @pytest.fixture
    def store_dir(self, tmp_path) -> str:
        """The directory the store is created in."""
        return str(tmp_path)

    def share(self, n: int) -> np.ndarray:
        """The positions, among the ``n`` rows of one write, that this handle writes: all of them. A handle whose
        calls are collective writes its rank's part, so that the ranks write every row once together."""
        return np.arange(n)

    def open_store(self, path: str, **options) -> TableHandle:
        return self.store_class.open(path, **{**self.open_options, **options})

    # -- fixtures --------------------------------------------------------------------------
    @pytest.fixture
    def table_ids(self) -> np.ndarray:
        """The store's IDs in row order (the order given to create)."""
        return np.random.default_rng(7).permutation(np.arange(-ROWS // 2, ROWS // 2, dtype=np.int64) * 3)

    @pytest.fixture
    def writer(self, store_dir, table_ids):
        store = self.store_class.create(os.path.join(store_dir, "store"), table_ids, DIM, chunk_rows=CHUNK_ROWS,
                                        seed=3, **self.open_options)
        yield store
        store.close()

    @pytest.fixture(params=HANDLE_KINDS)
    def probe(self, request):
        if request.param not in self.handle_kinds:  # before the writer fixture: no store is made for nothing
            pytest.skip(f"{self.store_class.__name__} gives no {request.param} handle")
        writer = request.getfixturevalue("writer")
        probe = Probe(request.param, writer, lambda path: self.open_store(path, readonly=True))
        yield probe
        probe.close()

    @pytest.fixture
    def single_process_handle(self) -> None:
        """Skips a test of what only a single process's handle offers (a sharded store, on each rank's shard)."""
        if self.store_class.sharded:
            pytest.skip("a sharded store lists IDs and answers `id in store` on each rank's shard (store.local), "
                        "not for the whole table")

    def _mine(self, ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The (ids, values) of a write that this handle writes (:meth:`share`)."""
        mine = self.share(len(ids))
        return ids[mine], values[mine]

    # -- reads -------------------------------------------------------------------------
    def test_rows_come_in_the_order_asked_with_duplicates(self, probe, writer, table_ids):
        ask = np.concatenate([table_ids[::-7], table_ids[:5], table_ids[:5]])
        expected = writer.get(ask)
        assert np.array_equal(probe.get(ask), expected)
        assert np.array_equal(probe.get(ask[3:4])[0], expected[3])
        assert probe.get([]).shape == (0, DIM)

    def test_len_counts_every_row(self, probe):
        assert probe.len() == ROWS

    def test_ids_in_row_order_and_membership(self, single_process_handle, probe, table_ids):
        assert np.array_equal(probe.ids(), table_ids)
        assert probe.contains(int(table_ids[10])) and not probe.contains(1)  # IDs are multiples of 3

    def test_unknown_ids_raise_key_error_naming_them(self, probe):
        with pytest.raises(KeyError, match="4") as info:
            probe.get([0, 4])
        assert isinstance(info.value, EmbeddingStoreError)

    # -- writes and commits ------------------------------------------------------------
    def test_commit_makes_puts_visible_and_uncommitted_puts_stay_private(self, probe, writer, table_ids):
        touched = table_ids[::5]  # one row in five: every chunk changes
        before = writer.get(touched)
        writer.put(*self._mine(touched, before + 1.0))
        expected_now = before + 1.0 if probe.sees_uncommitted else before
        assert np.array_equal(probe.get(touched), expected_now)
        writer.commit()
        assert np.array_equal(probe.get(touched), before + 1.0)
        assert probe.commit_count() == writer.commit_count
        writer.put(*self._mine(touched[:3], before[:3] - 5.0))
        writer.rollback()
        assert np.array_equal(probe.get(touched), before + 1.0)

    def test_added_ids_appear_with_the_commit_and_go_with_a_rollback(self, probe, writer):
        new = np.array([1, 2, 10**15, -(10**15)], np.int64)
        writer.add(*self._mine(new, np.full((4, DIM), 0.5, np.float32)))
        assert probe.len() == (ROWS + 4 if probe.sees_uncommitted else ROWS)
        writer.commit()
        assert np.array_equal(probe.get(new[::-1]), np.full((4, DIM), 0.5, np.float32))
        assert probe.len() == ROWS + 4  # (a sharded reader counts the rows of the commit its last get served)
        if not self.store_class.sharded:
            assert np.array_equal(probe.ids()[-4:], new)
        later = np.array([7, 8], np.int64)
        writer.add(later[self.share(2)])
        writer.rollback()
        assert len(writer) == ROWS + 4
        with pytest.raises(KeyError):
            writer.get(later)

    def test_every_row_survives_a_full_rewrite_and_reopen(self, probe, writer, table_ids):
        table = writer.get(table_ids)
        for part in np.array_split(np.arange(ROWS), 7):  # more chunks than a tiny cache holds
            writer.put(*self._mine(table_ids[part], table[part] * 2.0 + 1.0))
        writer.commit()
        assert np.array_equal(probe.get(table_ids), table * 2.0 + 1.0)
        path = writer.path
        writer.close()
        with self.open_store(path, readonly=True) as reopened:
            assert np.array_equal(reopened.get(table_ids), table * 2.0 + 1.0)

    def test_columns_and_attrs_are_committed_with_the_rows(self, probe, writer, table_ids):
        ids = table_ids[:100]
        writer.ensure_column("state", 2, "float32", fill=0.25)
        writer.put_column("state", *self._mine(ids[:10], np.ones((10, 2), np.float32)))
        writer.set_attr("step", 7)
        writer.commit()
        got = probe.get_column("state", ids)
        assert np.array_equal(got[:10], np.ones((10, 2))) and np.all(got[10:] == 0.25)
        assert probe.attrs()["step"] == 7

    def test_only_the_writer_writes(self, probe, writer, table_ids):
        assert probe.readonly() == (probe.kind != "writer")
        if probe.kind == "writer":
            return
        with pytest.raises(PermissionError):
            probe.put(table_ids[:1], np.zeros((1, DIM), np.float32))
        assert np.array_equal(probe.get(table_ids[:1]), writer.get(table_ids[:1]))

    def test_commit_every_commits_after_that_many_puts(self, writer, table_ids):
        path = writer.path
        writer.close()
        with self.open_store(path, commit_every=2) as store:
            rows = store.get(table_ids[:4])
            store.put(*self._mine(table_ids[:2], rows[:2] + 1.0))
            assert store.commit_count == 0
            store.put(*self._mine(table_ids[2:4], rows[2:4] + 1.0))  # the second put commits
            assert store.commit_count == 1
        with self.open_store(path, readonly=True) as reader:
            assert np.array_equal(reader.get(table_ids[:4]), rows + 1.0)

    def test_a_closed_handle_refuses_every_call(self, writer, table_ids):
        writer.close()
        writer.close()  # idempotent
        for call in (lambda: writer.get(table_ids[:1]), writer.commit,
                     lambda: writer.put(table_ids[:1], np.zeros((1, DIM), np.float32))):
            with pytest.raises(ClosedError):
                call()

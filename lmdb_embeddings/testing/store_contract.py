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
"""

from __future__ import annotations

import multiprocessing
import pickle

import numpy as np
import pytest

from ..errors import EmbeddingStoreError
from ..store import EmbeddingStore

HANDLE_KINDS = ("writer", "readonly", "unpickled", "forked")
ROWS, DIM, CHUNK_ROWS = 3000, 8, 64


class _ForkedHandle:
    """A forked child process that serves calls on its inherited copy of a handle."""

    def __init__(self, handle: EmbeddingStore):
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


def _serve(handle: EmbeddingStore, conn) -> None:
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

    def __init__(self, kind: str, writer: EmbeddingStore, open_options: dict):
        self.kind = kind
        self._forked = None
        if kind == "writer":
            self._handle = writer
        elif kind == "readonly":
            self._handle = EmbeddingStore.open(writer.path, readonly=True, **open_options)
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

    @pytest.fixture
    def writer(self, tmp_path):
        ids = np.random.default_rng(7).permutation(np.arange(-ROWS // 2, ROWS // 2, dtype=np.int64) * 3)
        store = EmbeddingStore.create(str(tmp_path / "store"), ids, DIM, chunk_rows=CHUNK_ROWS, seed=3,
                                      **self.open_options)
        yield store
        store.close()

    @pytest.fixture(params=HANDLE_KINDS)
    def probe(self, request, writer):
        probe = Probe(request.param, writer, self.open_options)
        yield probe
        probe.close()

    # -- reads -------------------------------------------------------------------------
    def test_rows_come_in_the_order_asked_with_duplicates(self, writer, probe):
        ids = writer.ids
        ask = np.concatenate([ids[::-7], ids[:5], ids[:5]])
        expected = writer.get(ask)
        assert np.array_equal(probe.get(ask), expected)
        assert np.array_equal(probe.get(ask[3:4])[0], expected[3])
        assert probe.get([]).shape == (0, DIM)

    def test_ids_len_and_membership(self, writer, probe):
        assert np.array_equal(probe.ids(), writer.ids)
        assert probe.len() == ROWS
        assert probe.contains(int(writer.ids[10])) and not probe.contains(1)  # IDs are multiples of 3

    def test_unknown_ids_raise_key_error_naming_them(self, probe):
        with pytest.raises(KeyError, match="4") as info:
            probe.get([0, 4])
        assert isinstance(info.value, EmbeddingStoreError)

    # -- writes and commits ------------------------------------------------------------
    def test_commit_makes_puts_visible_and_uncommitted_puts_stay_private(self, writer, probe):
        ids = writer.ids
        touched = ids[::5]  # one row in five: every chunk changes
        before = writer.get(touched)
        writer.put(touched, before + 1.0)
        expected_now = before + 1.0 if probe.sees_uncommitted else before
        assert np.array_equal(probe.get(touched), expected_now)
        writer.commit()
        assert np.array_equal(probe.get(touched), before + 1.0)
        assert probe.commit_count() == writer.commit_count
        writer.put(touched[:3], before[:3] - 5.0)
        writer.rollback()
        assert np.array_equal(probe.get(touched), before + 1.0)

    def test_added_ids_appear_with_the_commit(self, writer, probe):
        new = np.array([1, 2, 10**15, -(10**15)], np.int64)
        writer.add(new, np.full((4, DIM), 0.5, np.float32))
        assert probe.len() == (ROWS + 4 if probe.sees_uncommitted else ROWS)
        writer.commit()
        assert probe.len() == ROWS + 4
        assert np.array_equal(probe.get(new[::-1]), np.full((4, DIM), 0.5, np.float32))
        assert np.array_equal(probe.ids()[-4:], new)

    def test_every_row_survives_a_full_rewrite_and_reopen(self, writer, probe, tmp_path):
        ids = writer.ids
        table = writer.get(ids)
        for part in np.array_split(np.arange(ROWS), 7):  # more chunks than a tiny cache holds
            writer.put(ids[part], table[part] * 2.0 + 1.0)
        writer.commit()
        assert np.array_equal(probe.get(ids), table * 2.0 + 1.0)
        path = writer.path
        writer.close()
        with EmbeddingStore.open(path, readonly=True, **self.open_options) as reopened:
            assert np.array_equal(reopened.get(ids), table * 2.0 + 1.0)

    def test_columns_and_attrs_are_committed_with_the_rows(self, writer, probe):
        ids = writer.ids[:100]
        writer.ensure_column("state", 2, "float32", fill=0.25)
        writer.put_column("state", ids[:10], np.ones((10, 2), np.float32))
        writer.set_attr("step", 7)
        writer.commit()
        got = probe.get_column("state", ids)
        assert np.array_equal(got[:10], np.ones((10, 2))) and np.all(got[10:] == 0.25)
        assert probe.attrs()["step"] == 7

    def test_only_the_writer_writes(self, writer, probe):
        assert probe.readonly() == (probe.kind != "writer")
        if probe.kind == "writer":
            return
        with pytest.raises(PermissionError):
            probe.put(writer.ids[:1], np.zeros((1, DIM), np.float32))
        assert np.array_equal(probe.get(writer.ids[:1]), writer.get(writer.ids[:1]))

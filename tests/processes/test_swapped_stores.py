"""Swapped stores (issue 12, items 2, 3, 6): compact, restore --force and re-create behind open handles or links.

``compact``, ``restore --force`` and ``create(overwrite=True)`` build a new directory and
swap it in at the path. A process that had the old one open must not keep using it
unknowingly: a writer opened afterwards writes the store AT THE PATH, a reader follows it
(same table after a compact) or says clearly that the table there is another one; and a
path that is a symbolic link keeps pointing at the one store.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from guarantees_lib import cli_ok, committed_table, hidden_entries, one_line, py

import lmdb_embeddings as le
from lmdb_embeddings.processes import environment, shared_env
from lmdb_embeddings.processes.snapshot import Snapshot

ROWS, DIM = 2000, 16


def build(path: str, base: float, rows: int = ROWS, dim: int = DIM) -> None:
    """A store whose rows are all ``base + 3`` after three whole-table commits (free pages to compact)."""
    store = le.EmbeddingStore.create(path, rows, dim, chunk_rows=64, init="zeros")
    for r in range(1, 4):
        store.put(store.ids, np.full((rows, dim), base + r, np.float32))
        store.commit()
    store.close()


def other_table_dump(tmp_path, base: float = 50.0) -> str:
    """A dump of a different table of the same shape (rows all ``base + 3``)."""
    other = str(tmp_path / "other")
    build(other, base)
    out = str(tmp_path / "other.dump")
    cli_ok("dump", other, out)
    return out


def swap(kind: str, path: str, tmp_path) -> None:
    """Replace the store at ``path`` from other processes: ``compact``, ``restore`` or ``recreate``."""
    if kind == "compact":
        result = cli_ok("compact", path).stdout
        assert "compacted" in result, result  # the swap really happened (the copy was smaller)
    elif kind == "restore":
        cli_ok("restore", "--force", other_table_dump(tmp_path), path)
    elif kind == "recreate":  # delete + create anew, same shape, other values
        py("import shutil\nshutil.rmtree(sys.argv[1])\n"
           "s = le.EmbeddingStore.create(sys.argv[1], 2000, 16, chunk_rows=64, init='zeros')\n"
           "s.put(s.ids, np.full((2000, 16), 53.0, np.float32))\ns.close()", path)
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["compact", "restore"])
def test_writer_reopened_after_a_swap_commits_to_the_store_at_the_path(tmp_path, kind):
    """Item 2: a process keeps a reader, closes its writer; another process swaps the store; the
    first reopens a writer and commits. Before the fix ``commit()`` returned and the commit
    went into the deleted directory (6/6): a fresh process still read the old rows.
    """
    path = str(tmp_path / "store")
    build(path, 0.0)
    reader = le.EmbeddingStore.open(path, readonly=True)  # keeps this process's environment alive
    reader.get([0])
    le.EmbeddingStore.open(path).close()
    swap(kind, path, tmp_path)
    expected_rest = 3.0 if kind == "compact" else 53.0
    with le.EmbeddingStore.open(path) as writer:
        assert float(writer.get([5])[0, 0]) == expected_rest, "the writer opened another store than the one at path"
        writer.put(writer.ids[:10], np.full((10, DIM), 9.0, np.float32))
        writer.commit()
    seen = committed_table(path)
    reader.close()
    assert seen["values"] == sorted({9.0, expected_rest}), (
        f"after the writer's commit returned, a fresh process reads {seen}: the commit went elsewhere")


def test_reader_follows_the_store_through_a_compact(tmp_path):
    """Item 3: a reader opened before ``compact`` must see the commits made after it (same table).

    Before the fix it kept returning the old rows forever (3/3).
    """
    path = str(tmp_path / "store")
    build(path, 0.0)
    reader = le.EmbeddingStore.open(path, readonly=True)
    assert np.unique(reader.get(reader.ids)).tolist() == [3.0]
    commits = reader.commit_count
    swap("compact", path, tmp_path)
    assert np.unique(reader.get(reader.ids)).tolist() == [3.0]  # same table, same commit
    py("s = le.EmbeddingStore.open(sys.argv[1])\ns.put(s.ids, np.full((len(s), s.dim), 7.0, np.float32))\n"
       "s.close()", path)
    try:
        rows = reader.get(reader.ids)
        count = reader.commit_count
    finally:
        reader.close()
    assert np.unique(rows).tolist() == [7.0], f"the reader still shows {np.unique(rows)[:5]} after the next commit"
    assert count == commits + 1


@pytest.mark.parametrize("kind", ["restore", "recreate"])
def test_reader_refuses_a_different_table_swapped_in(tmp_path, kind):
    """Item 3: after ``restore --force`` of another table, or delete + re-create, an old reader must
    not keep serving the deleted table: a clear ``EmbeddingStoreError`` (one line) instead.

    Before the fix it returned the old rows forever (3/3).
    """
    path = str(tmp_path / "store")
    build(path, 0.0)
    reader = le.EmbeddingStore.open(path, readonly=True)
    assert np.unique(reader.get(reader.ids)).tolist() == [3.0]
    swap(kind, path, tmp_path)
    try:
        with pytest.raises(le.EmbeddingStoreError) as info:
            rows = reader.get(reader.ids)
            pytest.fail(f"the reader returned rows {np.unique(rows)[:5]} of the table that was replaced")
    finally:
        reader.close()
    one_line(info.value)


@pytest.mark.parametrize("kind", ["compact", "restore", "recreate"])
def test_new_reader_in_the_same_process_opens_the_store_at_the_path(tmp_path, kind):
    """Item 3: while an old handle is open, a NEW read-only handle in that process must open the
    store now at the path. Before the fix it shared the old handle's (deleted) environment.
    """
    path = str(tmp_path / "store")
    build(path, 0.0)
    old = le.EmbeddingStore.open(path, readonly=True)
    old.get([0])
    swap(kind, path, tmp_path)
    if kind == "compact":
        py("s = le.EmbeddingStore.open(sys.argv[1])\ns.put(s.ids, np.full((len(s), s.dim), 7.0, np.float32))\n"
           "s.close()", path)
    want = {"compact": [7.0], "restore": [53.0], "recreate": [53.0]}[kind]
    try:
        with le.EmbeddingStore.open(path, readonly=True) as new:
            got = np.unique(new.get(new.ids)).tolist()
    finally:
        old.close()
    assert got == want, f"a new reader in this process reads {got[:5]}, the store at the path holds {want}"


@pytest.mark.parametrize("how", ["compact", "restore", "create-overwrite"])
def test_swap_through_a_symlink_keeps_one_store(tmp_path, how):
    """Item 6: ``compact``/``restore --force``/``create(overwrite=True)`` of a path that is a symlink.

    The real directory must be swapped: the link still points at it, both names show the
    same (new) store, and nothing is left beside them. Before the fix the copy was swapped
    over the link, the link moved into a hidden ``.emb.compacting-*``, and the two names
    became two stores.
    """
    real = str(tmp_path / "real")
    link = str(tmp_path / "emb")
    build(real, 0.0)
    os.symlink(real, link)
    if how == "compact":
        assert "compacted" in cli_ok("compact", link).stdout
        want = [3.0]
    elif how == "restore":
        cli_ok("restore", "--force", other_table_dump(tmp_path), link)
        want = [53.0]
        shutil.rmtree(str(tmp_path / "other"))
        os.remove(str(tmp_path / "other.dump"))
    else:
        le.EmbeddingStore.create(link, ROWS, DIM, chunk_rows=64, init=np.full((ROWS, DIM), 53.0, np.float32),
                                 overwrite=True).close()
        want = [53.0]
    assert os.path.islink(link) and os.readlink(link) == real, "the symlink was replaced"
    assert hidden_entries(str(tmp_path), "emb") == [] and hidden_entries(str(tmp_path), "real") == [], \
        os.listdir(tmp_path)
    assert committed_table(real)["values"] == want
    py("s = le.EmbeddingStore.open(sys.argv[1])\ns.put(s.ids[:4], np.full((4, s.dim), 9.0, np.float32))\n"
       "s.close()", link)
    assert committed_table(real)["values"] == sorted({9.0, *want}), "a commit through the link missed the real store"


def test_reader_in_another_process_follows_a_compact_at_its_next_get(tmp_path, monkeypatch):
    """The swap itself tells the old store's readers: ``compact`` commits a ``replaced`` record into
    the store it replaced, so LMDB's transaction id changes and the reader looks at the path at
    its very next get. The periodic look is switched off here, so only that signal can help."""
    monkeypatch.setattr(environment, "IDENTITY_CHECK_S", 1e9)
    path = str(tmp_path / "store")
    build(path, 0.0)
    reader = le.EmbeddingStore.open(path, readonly=True)
    try:
        assert np.unique(reader.get(reader.ids)).tolist() == [3.0]
        swap("compact", path, tmp_path)
        py("s = le.EmbeddingStore.open(sys.argv[1])\ns.put(s.ids, np.full((len(s), s.dim), 7.0, np.float32))\n"
           "s.close()", path)
        assert np.unique(reader.get(reader.ids)).tolist() == [7.0]
    finally:
        reader.close()


def test_reader_looks_at_the_path_only_when_the_store_changed(tmp_path, monkeypatch):
    """The cost of following swaps: no system call per get while nothing changes, one ``stat`` per
    new commit seen (the periodic look is switched off here)."""
    monkeypatch.setattr(environment, "IDENTITY_CHECK_S", 1e9)
    looks = []
    real = shared_env.data_file_identity
    monkeypatch.setattr(shared_env, "data_file_identity", lambda d: looks.append(d) or real(d))
    path = str(tmp_path / "store")
    build(path, 0.0)
    with le.EmbeddingStore.open(path, readonly=True) as reader:
        reader.get([1, 2, 3])  # the first get looks once
        looks.clear()
        for _ in range(50):
            reader.get([1, 2, 3])
        assert looks == [], looks
        py("s = le.EmbeddingStore.open(sys.argv[1])\ns.put([1], np.full((1, s.dim), 5.0, np.float32))\n"
           "s.close()", path)
        for _ in range(50):
            assert reader.get([1])[0, 0] == 5.0
        assert len(looks) == 1, looks


def test_a_swap_never_ends_a_snapshot_this_process_is_reading(tmp_path):
    """Opening the store swapped in at the path retires this process's environment of the old
    one; while a snapshot (a dump in progress) still reads the old one, that open is refused in
    one line instead, and the snapshot reads on; once it is closed, the open works."""
    path = str(tmp_path / "store")
    build(path, 0.0)
    with Snapshot(path) as snap:
        swap("restore", path, tmp_path)
        with pytest.raises(le.EmbeddingStoreError) as info:
            le.EmbeddingStore.open(path, readonly=True)
        assert "snapshot" in one_line(info.value)
        seen = np.concatenate([parts[0] for _, parts in snap.chunks()])
    assert np.unique(seen).tolist() == [3.0]
    with le.EmbeddingStore.open(path, readonly=True) as reader:
        assert np.unique(reader.get(reader.ids)).tolist() == [53.0]

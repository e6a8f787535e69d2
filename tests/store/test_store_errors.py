"""Every error ../shared/SPEC.md names: raised with a clear message, before anything changes, from
classes deriving from EmbeddingStoreError and the fitting builtin."""

from __future__ import annotations

import os

import lmdb
import msgpack
import numpy as np
import pytest
from checkout import run_python

import lmdb_embeddings as le
from lmdb_embeddings import EmbeddingStore, errors
from lmdb_embeddings.format import chunks as chunk_codec


def test_error_classes_derive_from_base_and_builtins():
    pairs = {
        errors.StoreExistsError: FileExistsError, errors.StoreNotFoundError: FileNotFoundError,
        errors.InvalidInputError: ValueError, errors.InvalidTypeError: TypeError,
        errors.UnknownIdError: KeyError, errors.ReadOnlyError: PermissionError, errors.CommitError: OSError,
    }
    for cls, builtin in pairs.items():
        assert issubclass(cls, le.EmbeddingStoreError) and issubclass(cls, builtin)
    for cls in (le.CorruptionError, le.FormatVersionError, le.NotAStoreError, le.WriterLockedError, le.ClosedError):
        assert issubclass(cls, le.EmbeddingStoreError)


def _assert_unchanged(store, before_ids, before_rows):
    assert np.array_equal(store.ids, before_ids)
    assert np.array_equal(store.get(before_ids), before_rows)
    assert store.stats()["dirty_chunks"] == 0


@pytest.mark.parametrize(
    "ids, values, error, words",
    [
        ([1, 2], np.ones((3, 16)), ValueError, "shape"),
        ([1, 2], np.ones((2, 15)), ValueError, "shape"),
        ([1, 2], np.ones(32), ValueError, "shape"),
        ([1, 1], np.ones((2, 16)), ValueError, "duplicate"),
        ([1, 2], np.array([[1.0] * 16, [np.nan] * 16]), ValueError, "NaN"),
        ([1, 2], np.array([[1.0] * 16, [np.inf] + [0.0] * 15]), ValueError, "NaN or inf"),
        ([1, 5000], np.ones((2, 16)), KeyError, "5000"),
        ([1, 2], np.array([["a"] * 16] * 2), TypeError, "numeric"),
        ([1.5, 2], np.ones((2, 16)), TypeError, "integers"),
        ([[1, 2]], np.ones((2, 16)), ValueError, "1-D"),
    ],
)
def test_bad_put_raises_and_applies_nothing(small_store, ids, values, error, words):
    # chunk 0 holds ids 1 and 2: a partly applied call would show up in it
    before = small_store.get(np.arange(1000))
    with pytest.raises(error, match=words) as info:
        small_store.put(ids, values)
    assert isinstance(info.value, le.EmbeddingStoreError)
    _assert_unchanged(small_store, np.arange(1000), before)


def test_float16_overflow_to_inf_is_refused(store_path):
    with EmbeddingStore.create(store_path, 10, 2, dtype="float16", init="zeros") as store:
        with pytest.raises(ValueError, match="overflow float16"):
            store.put([1, 2], np.array([[1.0, 2.0], [1e6, 0.0]]))
        with pytest.raises(ValueError, match="overflow"):
            store.add([50], np.array([[70000.0, 0.0]], np.float32))
        assert not store.get(np.arange(10)).any() and 50 not in store
        assert store.stats()["dirty_chunks"] == 0


@pytest.mark.parametrize(
    "ids, values, error, words",
    [
        ([5], None, ValueError, "already in the store"),
        ([2000, 5], np.ones((2, 16)), ValueError, "already"),
        ([2000, 2000], None, ValueError, "duplicates"),
        ([2000, 2001], np.ones((3, 16)), ValueError, "shape"),
        ([2000], np.full((1, 16), np.nan), ValueError, "NaN"),
        (["x"], None, TypeError, "integers"),
    ],
)
def test_bad_add_raises_and_applies_nothing(small_store, ids, values, error, words):
    before = small_store.get(np.arange(1000))
    with pytest.raises(error, match=words):
        small_store.add(ids, values)
    _assert_unchanged(small_store, np.arange(1000), before)
    assert len(small_store) == 1000 and 2000 not in small_store


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"ids": [1, 2, 1], "dim": 4}, ValueError, "duplicate"),
        ({"ids": -1, "dim": 4}, ValueError, ">= 0"),
        ({"ids": [[1, 2]], "dim": 4}, ValueError, "1-D"),
        ({"ids": [1.0, 2.0], "dim": 4}, TypeError, "integers"),
        ({"ids": 10, "dim": 0}, ValueError, "dim"),
        ({"ids": 10, "dim": 4.0}, ValueError, "dim"),
        ({"ids": 10, "dim": 4, "dtype": "int8"}, ValueError, "dtype"),
        ({"ids": 10, "dim": 4, "dtype": "bogus"}, ValueError, "dtype"),
        ({"ids": 10, "dim": 4, "chunk_rows": 0}, ValueError, "chunk_rows"),
        ({"ids": 10, "dim": 4, "init": "orthogonal"}, ValueError, "init"),
        ({"ids": 10, "dim": 4, "init": np.ones((10, 5))}, ValueError, "shape"),
        ({"ids": 10, "dim": 4, "init": np.full((10, 4), np.nan)}, ValueError, "NaN"),
        ({"ids": 10, "dim": 4, "seed": -1}, ValueError, "seed"),
        ({"ids": 10, "dim": 4, "cache_mb": -1}, ValueError, "cache_mb"),
        ({"ids": 10, "dim": 4, "commit_every": 0}, ValueError, "commit_every"),
        ({"ids": 10, "dim": 4, "cache_size": 5}, TypeError, "unknown option"),
    ],
)
def test_bad_create_arguments_leave_no_store(store_path, kwargs, error, words):
    with pytest.raises(error, match=words) as info:
        EmbeddingStore.create(store_path, **kwargs)
    assert isinstance(info.value, le.EmbeddingStoreError)
    assert not os.path.exists(store_path)
    assert not [n for n in os.listdir(os.path.dirname(store_path)) if n.startswith(".store")]


def test_unknown_open_option(small_store):
    small_store.close()
    with pytest.raises(TypeError, match="unknown option.*cache_MB.*cache_mb"):
        EmbeddingStore.open(small_store.path, cache_MB=4)


def test_undo_log_is_not_an_open_option(small_store, tmp_path):
    """The undo log belongs to the sharded store's shards: ``create``/``open`` refuse it as an unknown option
    (the error lists the real ones), and change nothing."""
    small_store.close()
    with pytest.raises(TypeError, match="unknown option.*undo_log.*cache_mb") as info:
        EmbeddingStore.open(small_store.path, undo_log=True)
    assert isinstance(info.value, le.EmbeddingStoreError)
    assert "undo_log" not in str(info.value).split("the options are")[1]
    with pytest.raises(TypeError, match="unknown option.*undo_log"):
        EmbeddingStore.create(str(tmp_path / "new"), 10, 4, undo_log=True)
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("kwargs, error", [
    ({"cache_mb": -1}, ValueError), ({"l1_fraction": 2.0}, ValueError), ({"l1_fraction": "a"}, TypeError),
    ({"commit_every": 0}, ValueError), ({"writemap": 1}, TypeError), ({"undo_log": "yes"}, TypeError),
])
def test_store_options_are_checked_when_made(kwargs, error):
    """``StoreOptions`` is checked by its constructor, not only on the way in from ``**open_options``: an
    instance in hand is a valid one (the sharded store and pickled handles pass the object on)."""
    with pytest.raises(error) as info:
        le.StoreOptions(**kwargs)
    assert isinstance(info.value, le.EmbeddingStoreError)


def test_a_pickled_handle_keeps_its_options_object(small_store):
    import pickle

    small_store.close()
    reader = EmbeddingStore.open(small_store.path, readonly=True, cache_mb=3, commit_every=5)
    copy = pickle.loads(pickle.dumps(reader))
    assert copy._options == reader._options == le.StoreOptions(cache_mb=3, commit_every=5)
    assert np.array_equal(copy.get([1]), reader.get([1]))
    reader.close()
    copy.close()


def test_create_over_existing_store(small_store):
    path = small_store.path
    small_store.put([1], np.ones((1, 16)))
    small_store.commit()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        EmbeddingStore.create(path, 5, 2)
    with pytest.raises(le.EmbeddingStoreError, match="close"):  # its writer is open here
        EmbeddingStore.create(path, 5, 2, overwrite=True)
    small_store.close()
    with EmbeddingStore.open(path) as store:  # the refused calls changed nothing
        assert len(store) == 1000 and np.array_equal(store.get([1]), np.ones((1, 16), np.float32))
    with EmbeddingStore.create(path, 5, 2, overwrite=True, init="zeros") as store:
        assert len(store) == 5 and store.dim == 2
    with EmbeddingStore.open(path) as store:
        assert len(store) == 5 and not store.get(np.arange(5)).any()


def test_create_overwrite_refused_while_another_process_writes(small_store, tmp_path):
    other = str(tmp_path / "other")
    EmbeddingStore.create(other, 3, 2).close()
    code = (
        "import sys, lmdb_embeddings as le\n"
        "s = le.EmbeddingStore.open(sys.argv[1])\n"
        "print('ready', flush=True); sys.stdin.readline()\n"
    )
    import subprocess
    import sys

    from checkout import ROOT, subprocess_env

    proc = subprocess.Popen([sys.executable, "-c", code, other], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=subprocess_env(), cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(le.EmbeddingStoreError, match=f"pid {proc.pid}"):
            EmbeddingStore.create(other, 5, 2, overwrite=True)
    finally:
        proc.communicate("\n", timeout=30)
    with EmbeddingStore.open(other) as store:
        assert len(store) == 3


def test_create_in_a_non_store_directory_is_refused(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"meow")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a store"):
            EmbeddingStore.create(str(target), 5, 2, overwrite=overwrite)
    assert os.listdir(target) == ["cat.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        EmbeddingStore.create(str(tmp_path / "file"), 5, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    EmbeddingStore.create(str(empty), 5, 2).close()  # an empty directory is fine


def test_open_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="create"):
        EmbeddingStore.open(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        EmbeddingStore.open(str(tmp_path / "empty"), readonly=True)


def test_open_a_directory_that_is_not_ours(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(le.NotAStoreError, match="not an lmdb_embeddings store"):
        EmbeddingStore.open(str(junk))
    foreign = str(tmp_path / "foreign")  # an LMDB environment of somebody else
    env = lmdb.open(foreign, max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    with pytest.raises(le.NotAStoreError, match="not an lmdb_embeddings store"):
        EmbeddingStore.open(foreign)
    with pytest.raises(le.NotAStoreError):
        EmbeddingStore.open(foreign, readonly=True)
    # the refused writable open released its writer lock: a second try fails the same way
    with pytest.raises(le.NotAStoreError):
        EmbeddingStore.open(foreign)


def _rewrite_meta(path: str, key: bytes, change) -> None:
    """Change a metadata record and re-checksum it, as a buggy or newer writer would."""
    from lmdb_embeddings.format.records import pack_record, unpack_record

    env = lmdb.open(path, max_dbs=64)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        record = unpack_record(txn.get(key, db=meta), key)
        change(record)
        txn.put(key, pack_record(record), db=meta)
    env.close()


def test_newer_format_version_is_refused(small_store):
    path = small_store.path
    small_store.close()
    _rewrite_meta(path, b"format", lambda rec: rec.update(format_version=le.FORMAT_VERSION + 1))
    for readonly in (False, True):
        with pytest.raises(le.FormatVersionError, match=f"version {le.FORMAT_VERSION + 1}.*upgrade") as info:
            EmbeddingStore.open(path, readonly=readonly)
        assert isinstance(info.value, le.EmbeddingStoreError)
    _rewrite_meta(path, b"format", lambda rec: rec.update(format_version=le.FORMAT_VERSION))
    EmbeddingStore.open(path).close()  # the refused writable open released its lock


def test_bad_magic_is_refused(small_store):
    small_store.close()
    _rewrite_meta(small_store.path, b"format", lambda rec: rec.update(magic="something_else"))
    with pytest.raises(le.NotAStoreError, match="bad magic"):
        EmbeddingStore.open(small_store.path)


def test_damaged_config_is_corruption(small_store):
    small_store.close()
    _rewrite_meta(small_store.path, b"config", lambda rec: rec.pop("dim"))
    with pytest.raises(le.CorruptionError, match="configuration"):
        EmbeddingStore.open(small_store.path, readonly=True)


def test_flipped_metadata_record_fails_its_checksum(small_store):
    small_store.close()
    env = lmdb.open(small_store.path, max_dbs=64)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:  # change a field without re-checksumming (bit rot)
        record = msgpack.unpackb(txn.get(b"state", db=meta))
        record["rows"] += 1
        txn.put(b"state", msgpack.packb(record), db=meta)
    env.close()
    with pytest.raises(le.CorruptionError, match="'state' is damaged .checksum mismatch"):
        EmbeddingStore.open(small_store.path, readonly=True)


def test_corrupt_chunk_is_reported_never_returned(small_store):
    path = small_store.path
    small_store.close()
    env = lmdb.open(path, max_dbs=64)
    rows_db = env.open_db(b"col:embeddings")
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(chunk_codec.chunk_key(3), db=rows_db))
        value[-5] ^= 0x40  # one flipped bit in the payload
        txn.put(chunk_codec.chunk_key(3), bytes(value), db=rows_db)
    env.close()
    with EmbeddingStore.open(path, readonly=True) as store:
        assert store.get([0, 191]).shape == (2, 16)  # chunks 0 and 2 are fine
        with pytest.raises(le.CorruptionError, match="chunk 3.*checksum"):
            store.get([1, 3 * 64 + 5])


def test_writes_on_a_closed_handle(small_store):
    small_store.close()
    for call in (lambda: small_store.put([1], np.ones((1, 16))), small_store.commit, lambda: len(small_store)):
        with pytest.raises(le.ClosedError, match="closed"):
            call()


def test_second_writer_in_same_process_names_pid(small_store):
    with pytest.raises(le.EmbeddingStoreError, match=f"pid {os.getpid()}.*this process"):
        EmbeddingStore.open(small_store.path)
    with EmbeddingStore.open(small_store.path, readonly=True) as reader:  # readers are fine
        assert len(reader) == 1000
    small_store.close()
    EmbeddingStore.open(small_store.path).close()


def test_second_writer_in_another_process_is_refused(small_store):
    code = (
        "import sys, lmdb_embeddings as le\n"
        "try:\n"
        "    le.EmbeddingStore.open(sys.argv[1])\n"
        "except le.EmbeddingStoreError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = run_python(code, small_store.path, timeout=60).stdout
    assert out.startswith("WriterLockedError") and f"pid {os.getpid()}" in out


def test_create_removes_what_a_killed_create_left_behind(tmp_path):
    """A create killed mid-build leaves .NAME.creating-PID-XXXXXXXX; the next create removes it."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a pid that has exited
    target = tmp_path / "store"
    leftover = tmp_path / f".store.creating-{dead}-0123abcd"
    leftover.mkdir()
    (leftover / "data.mdb").write_bytes(b"half a store")
    alive = tmp_path / f".store.creating-{os.getpid()}-89abcdef"  # a create still running: kept
    alive.mkdir()
    EmbeddingStore.create(str(target), 10, 4).close()
    assert not leftover.exists()
    assert alive.exists()

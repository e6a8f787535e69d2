"""dump/restore through the real CLI: native and npy round trips are bit-exact."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from checkout import run_cli
from cli_helpers import assert_one_line_error, assert_same_store, make_rich_store, ok, read_store

import lmdb_embeddings as le


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_native_round_trip_is_bit_exact(tmp_path, dtype):
    src, dump, dst = str(tmp_path / "src"), str(tmp_path / "t.lemb"), str(tmp_path / "dst")
    original = make_rich_store(src, dtype=dtype)
    proc = ok("dump", src, dump)
    assert proc.stderr == ""  # not a terminal: no progress bar
    ok("restore", dump, dst)
    assert_same_store(original, read_store(dst))
    assert original["columns"] == {"adam_m": {"width": 12, "dtype": "float32", "fill": 0.25},
                                   "steps": {"width": 1, "dtype": "float64", "fill": 0.0}}
    assert original["attrs"]["nested"]["blob"] == b"\x00\xff"
    # the restored store is a normal writable store that continues where the source stood
    with le.EmbeddingStore.open(dst) as s:
        assert s.commit_count == 2
        s.put([11], np.ones((1, 12)))
    assert json.loads(ok("verify", dst, "--json").stdout)["ok"] is True


def test_npy_round_trip_is_bit_exact_and_plain_numpy_reads_it(tmp_path):
    src, out, dst = str(tmp_path / "src"), str(tmp_path / "npy"), str(tmp_path / "dst")
    original = make_rich_store(src, dtype="float16")
    ok("dump", src, out, "--format", "npy")
    ids = np.load(os.path.join(out, "ids.npy"))
    emb = np.load(os.path.join(out, "embeddings.npy"))
    assert ids.dtype == np.int64 and emb.dtype == np.float16
    assert ids.tobytes() == original["ids"].tobytes()
    assert emb.tobytes() == original["rows"].tobytes()
    ok("restore", out, dst)
    assert_same_store(original, read_store(dst))


def test_plain_npy_directory_from_numpy_restores(tmp_path):
    out, dst = tmp_path / "plain", str(tmp_path / "dst")
    out.mkdir()
    ids = np.array([9, -4, 100, 7, 0], dtype=np.int32)  # any integer dtype is accepted
    emb = np.arange(20, dtype=np.float32).reshape(5, 4) - 3.5
    np.save(out / "ids.npy", ids)
    np.save(out / "embeddings.npy", emb)
    ok("restore", str(out), dst, "--chunk-rows", "2")
    with le.EmbeddingStore.open(dst, readonly=True) as s:
        assert s.chunk_rows == 2 and s.dtype == np.float32
        assert s.ids.tolist() == ids.tolist()
        assert s.get([7, 9]).tobytes() == emb[[3, 0]].tobytes()


def test_npy_input_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "ids.npy", np.array([1, 1, 2]))
    np.save(bad / "embeddings.npy", np.zeros((3, 2), np.float32))
    dst = str(tmp_path / "dst")
    assert_one_line_error(run_cli("restore", str(bad), dst), "more than once")
    np.save(bad / "ids.npy", np.array([1, 2, 3]))
    np.save(bad / "embeddings.npy", np.array([[0, 1], [np.nan, 2], [3, 4]], np.float32))
    assert_one_line_error(run_cli("restore", str(bad), dst), "row 1", "NaN")
    np.save(bad / "embeddings.npy", np.zeros((2, 2), np.float32))
    assert_one_line_error(run_cli("restore", str(bad), dst), "3 ids but 2 embedding rows")
    with open(bad / "embeddings.npy", "r+b") as f:
        f.truncate(os.path.getsize(bad / "embeddings.npy") - 4)
    assert_one_line_error(run_cli("restore", str(bad), dst), "truncated")
    assert not os.path.exists(dst)
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # no temporary directory left behind


def test_restore_refuses_existing_store_and_force_replaces_it(tmp_path):
    a, b, dump = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "a.lemb")
    le.EmbeddingStore.create(a, 300, 4, chunk_rows=64, seed=1).close()
    le.EmbeddingStore.create(b, 50, 3, chunk_rows=16, seed=2).close()
    before = read_store(b)
    ok("dump", a, dump)
    assert_one_line_error(run_cli("restore", dump, b), "already exists", "--force")
    assert_same_store(before, read_store(b))  # untouched
    # a writer holds b: even --force is refused, naming the writer
    writer = le.EmbeddingStore.open(b)
    try:
        proc = run_cli("restore", dump, b, "--force")
        assert_one_line_error(proc, f"pid {os.getpid()}")
        assert proc.returncode == 1
    finally:
        writer.close()
    assert_same_store(before, read_store(b))
    ok("restore", dump, b, "--force")
    assert_same_store(read_store(a), read_store(b))
    # a non-empty directory that is not a store is never replaced, even with --force
    other = tmp_path / "notastore"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    assert_one_line_error(run_cli("restore", dump, str(other), "--force"), "not a store")
    assert (other / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["a", "a.lemb", "b", "notastore"]


def test_dump_carries_the_last_commit_only(tmp_path):
    src, dump, dst = str(tmp_path / "src"), str(tmp_path / "t.lemb"), str(tmp_path / "dst")
    writer = le.EmbeddingStore.create(src, 200, 4, chunk_rows=32)
    writer.put([1], np.full((1, 4), 5.0))
    writer.commit()
    writer.put([1], np.full((1, 4), 9.0))  # uncommitted while the dump runs
    try:
        ok("dump", src, dump)
    finally:
        writer.rollback()
        writer.close()
    ok("restore", dump, dst)
    with le.EmbeddingStore.open(dst, readonly=True) as s:
        assert s.get([1]).tolist() == [[5.0] * 4]


def test_npy_dump_detects_a_changed_file(tmp_path):
    src, out, dst = str(tmp_path / "src"), tmp_path / "npy", str(tmp_path / "dst")
    make_rich_store(src, dtype="float32")
    ok("dump", src, str(out), "--format", "npy")
    for name in ("embeddings.npy", "column-1.npy", "ids.npy"):
        data = bytearray((out / name).read_bytes())
        data[len(data) - 5] ^= 0x04  # a changed value; the file still loads in numpy
        (out / name).write_bytes(bytes(data))
        np.load(out / name)
        assert_one_line_error(run_cli("restore", str(out), dst), name, "checksum mismatch")
        data[len(data) - 5] ^= 0x04
        (out / name).write_bytes(bytes(data))
    assert not os.path.exists(dst)
    ok("restore", str(out), dst)


def test_restore_removes_temp_dirs_of_dead_restores_only(tmp_path):
    src, dump, dst = str(tmp_path / "src"), str(tmp_path / "t.lemb"), str(tmp_path / "dst")
    le.EmbeddingStore.create(src, 100, 4, chunk_rows=32).close()
    ok("dump", src, dump)
    dead = tmp_path / f".dst.restoring-{2**22 + 7}-0123abcd"  # beyond pid_max: that process is gone
    alive = tmp_path / f".dst.restoring-{os.getpid()}-89abcdef"  # a restore still running: kept
    for leftover in (dead, alive):
        leftover.mkdir()
        (leftover / "data.mdb").write_bytes(b"half a store")
    ok("restore", dump, dst)
    assert not dead.exists() and alive.exists()
    assert_same_store(read_store(src), read_store(dst))

"""Faults: disk full and I/O errors during commit, and a writer killed while holding the lock.

Both faults follow the same protocol (``torture_child._retry_protocol``): the store is at
round 1; the child puts round 2 and commits under the fault; the commit must raise an
``OSError``-derived ``EmbeddingStoreError``; another process must still read round 1;
then the fault is lifted and the SAME handle's ``commit()`` must succeed, after which
every row is round 2 (nothing of the uncommitted put was lost).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torture_lib as tl
from guarantees_lib import build_fault_shim

import lmdb_embeddings as le

pytestmark = pytest.mark.torture

ROWS, DIM = 40_000, 64  # 10 MiB of float32: several commits fit in the 48 MiB filesystem


def table_state(path: str) -> dict:
    """Distinct values of the committed table, read by a separate process."""
    proc = tl.run_child("table", path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_round_one(path: str) -> None:
    le.EmbeddingStore.create(path, ROWS, DIM, init="zeros", chunk_rows=1024).close()
    proc = tl.run_child("rounds", path, "--max-rounds", "1", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert table_state(path) == {"rows": ROWS, "values": [1.0]}


def run_retry_protocol(child: subprocess.Popen, path: str, lift_fault) -> dict:
    """Drive a ``diskfull``/``iofault`` child; return what was observed."""
    lines = tl.LineReader(child)
    try:
        failed = lines.wait_for("failed", 120)
        assert failed is not None, f"commit did not fail under the fault: {lines.lines} {tl.stderr_of(child)}"
        _, exc_type, is_oserror, message = failed.split(" ", 3)
        during = table_state(path)
        lift_fault()
        child.stdin.write("view\n")
        child.stdin.flush()
        view = lines.wait_for("handle-view", 120)
        child.stdin.write("retry\n")
        child.stdin.flush()
        retried = lines.wait_for("closed", 120)
        after = table_state(path)
        return {"error": exc_type, "oserror": is_oserror == "1", "message": json.loads(message),
                "during": during, "retried": retried is not None, "after": after,
                "handle_view": json.loads(view.split(" ", 1)[1]) if view else None,
                "reput": any(line.startswith("reput") for line in lines.lines),
                "stderr": "" if retried else tl.stderr_of(child)}
    finally:
        tl.kill9(child)


@pytest.fixture
def small_fs(tmp_path):
    """A 48 MiB tmpfs mounted on a temporary directory (needs root and mount permission)."""
    if os.geteuid() != 0:
        pytest.skip("disk-full scenario needs root to mount a size-limited tmpfs (not root here)")
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"disk-full scenario: mounting a tmpfs was refused ({proc.stderr.strip()})")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_disk_full_during_commit_then_retry_same_handle(small_fs):
    path = os.path.join(small_fs, "store")
    make_round_one(path)
    child = tl.spawn_child("diskfull", path, small_fs, "--round", "2", stdin=subprocess.PIPE)
    seen = run_retry_protocol(child, path, lambda: os.remove(os.path.join(small_fs, "ballast")))
    tl.record("fault: disk full during commit", faults=1, clean_errors=int(seen["oserror"]),
              rows_lost=0 if seen["after"].get("values") == [2.0] else ROWS,
              inconsistent_opens=int(seen["during"].get("values") != [1.0]))
    assert seen["oserror"], seen
    assert "commit" in seen["message"] and "again" in seen["message"], seen["message"]
    assert seen["during"] == {"rows": ROWS, "values": [1.0]}, "the failed commit changed the store"
    assert seen["handle_view"] == [2.0], "the handle lost its uncommitted put"
    assert seen["retried"], f"the same handle could not commit after space was freed: {seen['stderr']}"
    assert not seen["reput"], "the retried commit did not write the kept changes"
    assert seen["after"] == {"rows": ROWS, "values": [2.0]}, "the retried commit lost the uncommitted put"


def test_disk_full_with_spilled_chunks_keeps_the_changes_for_a_retry(small_fs):
    """A cache smaller than the changes spills them into the pending LMDB transaction.

    The disk blocks a transaction writes are reserved before it writes them (writemap), so
    a full disk refuses the commit before anything is written and the pending transaction,
    spilled chunks included, stays as it was: the handle keeps every change and the same
    ``commit()`` succeeds once space is freed (no rollback, nothing to put again). The 6 MiB
    cache holds 6 of the 10 MiB of changes: the commit has to reserve more than the spills did.
    """
    path = os.path.join(small_fs, "store")
    make_round_one(path)
    child = tl.spawn_child("diskfull", path, small_fs, "--round", "2", "--cache-mb", "6", stdin=subprocess.PIPE)
    seen = run_retry_protocol(child, path, lambda: os.remove(os.path.join(small_fs, "ballast")))
    tl.record("fault: disk full during commit (changes spilled)", faults=1, clean_errors=int(seen["oserror"]),
              rows_lost=0 if seen["after"].get("values") == [2.0] else ROWS,
              inconsistent_opens=int(seen["during"].get("values") != [1.0] or seen["handle_view"] != [2.0]))
    assert seen["oserror"], seen
    assert "keeps its uncommitted changes" in seen["message"], seen["message"]
    assert seen["during"] == {"rows": ROWS, "values": [1.0]}, "the failed commit changed the store"
    assert seen["handle_view"] == [2.0], f"the handle shows {seen['handle_view']}, not its uncommitted changes"
    assert seen["retried"] and not seen["reput"], seen["stderr"]
    assert seen["after"] == {"rows": ROWS, "values": [2.0]}


@pytest.fixture(scope="module")
def eio_shim(tmp_path_factory):
    return build_fault_shim(str(tmp_path_factory.mktemp("shim")))


@pytest.mark.parametrize("writemap", [True, False], ids=["writemap", "pwrite"])
@pytest.mark.parametrize("mode", ["data", "sync", "meta"])
def test_io_error_during_commit_then_retry_same_handle(tmp_path, eio_shim, mode, writemap):
    """EIO under LMDB (LD_PRELOAD shim, see eio_shim.c): from msync of the map (writemap, the
    default: data pages, then the meta page) or from write()/fdatasync() (``writemap=False``)."""
    path = str(tmp_path / "store")
    make_round_one(path)
    flag = str(tmp_path / "eio_flag")
    env = tl.child_env(LD_PRELOAD=eio_shim, TORTURE_EIO_FLAG=flag)
    extra = [] if writemap else ["--no-writemap"]
    child = tl.spawn_child("iofault", path, flag, mode, "--round", "2", *extra, env=env, stdin=subprocess.PIPE)
    seen = run_retry_protocol(child, path, lambda: os.remove(flag))
    tl.record(f"fault: EIO in {mode} write during commit", faults=1, clean_errors=int(seen["oserror"]),
              rows_lost=0 if seen["after"].get("values") == [2.0] else ROWS,
              inconsistent_opens=int(seen["during"].get("values") != [1.0]))
    assert seen["oserror"], seen
    assert seen["during"] == {"rows": ROWS, "values": [1.0]}, "the failed commit changed the store"
    assert seen["handle_view"] == [2.0], "the handle lost its uncommitted put"
    assert seen["retried"] and not seen["reput"], f"the same handle could not commit after the I/O error: {seen}"
    assert seen["after"] == {"rows": ROWS, "values": [2.0]}, "the retried commit lost the uncommitted put"


def test_writer_lock_released_by_kill9(tmp_path):
    path = str(tmp_path / "store")
    le.EmbeddingStore.create(path, 1000, 8, init="zeros").close()
    writer = tl.spawn_child("rounds", path, "--pause", "0.05")
    lines = tl.LineReader(writer)
    try:
        assert lines.wait_for("ack", 60) is not None, tl.stderr_of(writer)
        second = tl.run_child("tryopen", path, timeout=60)
        assert second.stdout.startswith("locked"), second.stdout + second.stderr
        assert f"pid {writer.pid}" in second.stdout, second.stdout
    finally:
        tl.kill9(writer)
    after = tl.run_child("tryopen", path, timeout=60)
    tl.record("fault: writer lock after kill -9", kills=1, kills_survived=int(after.stdout.strip() == "opened"))
    assert after.stdout.strip() == "opened", after.stdout + after.stderr

"""Full and read-only filesystems (issue 12, items 8, 9, 10): real tmpfs mounts and read-only bind mounts.

A full disk is a size-limited tmpfs filled with a ballast file (as in
``tests/torture/test_faults.py``); a read-only filesystem is a read-only bind mount. Both
need root; without it the tests are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from checkout import subprocess_env
from guarantees_lib import cli_ok, committed_table, fill_disk, hidden_entries, one_line, py, small_tmpfs

import lmdb_embeddings as le


@pytest.fixture
def small_fs(tmp_path):
    with small_tmpfs(str(tmp_path / "small_fs"), "32m") as mnt:
        yield mnt


@pytest.fixture
def readonly_mount(tmp_path):
    """``(source, view)``: ``view`` is a read-only bind mount of the directory ``source``."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a read-only bind mount")
    source, view = tmp_path / "source", tmp_path / "view"
    source.mkdir()
    view.mkdir()
    for cmd in (["mount", "--bind", str(source), str(view)], ["mount", "-o", "remount,ro,bind", str(view)]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            subprocess.run(["umount", "-l", str(view)], capture_output=True, timeout=30)
            pytest.skip(f"a read-only bind mount was refused ({proc.stderr.strip()})")
    try:
        yield str(source), str(view)
    finally:
        subprocess.run(["umount", "-l", str(view)], capture_output=True, timeout=30)


def test_failed_writer_open_on_a_full_disk_releases_the_writer_lock(small_fs):
    """Item 8: writing the pid into ``writer.lock`` fails on a full disk.

    Before the fix that was a raw ``OSError [Errno 28]`` and the lock's descriptor stayed
    open: every later writer open, in this process and in any other, was refused with
    "already open for writing by pid None" until the process exited.
    """
    path = os.path.join(small_fs, "store")
    le.EmbeddingStore.create(path, 2000, 16, init="zeros").close()
    ballast = fill_disk(small_fs)
    out = _writer_open_protocol(path, ballast)
    seen = json.loads(out.strip().splitlines()[-1])
    problems = []
    if seen["full"].startswith("raw"):
        problems.append(f"on the full disk the writer open failed with {seen['full']}")
    if "\n" in seen["full"]:
        problems.append("the refusal is not one line")
    if seen["after"] != "opened":
        problems.append(f"after freeing space the same process could not open a writer: {seen['after']}")
    if seen["other"] != "opened":
        problems.append(f"after freeing space another process could not open a writer: {seen['other']}")
    assert not problems, problems


def _writer_open_protocol(path: str, ballast: str) -> str:
    """In a child: open a writer on the full disk, free the space, open again in the same process."""
    return py(
        "import os\n"
        "path, ballast = sys.argv[1], sys.argv[2]\n"
        "def attempt():\n"
        "    try:\n"
        "        le.EmbeddingStore.open(path).close()\n"
        "        return 'opened'\n"
        "    except le.EmbeddingStoreError as exc:\n"
        "        return f'refused {type(exc).__name__}: {exc}'\n"
        "    except BaseException as exc:\n"
        "        return f'raw {type(exc).__name__}: {exc}'\n"
        "full = attempt()\n"
        "os.remove(ballast)\n"
        "after = attempt()\n"
        "import subprocess\n"  # another process, while this one is still alive
        "other = subprocess.run([sys.executable, '-c', 'import sys, lmdb_embeddings as le\\n'\n"
        "                        'le.EmbeddingStore.open(sys.argv[1]).close()\\nprint(\"opened\")', path],\n"
        "                       capture_output=True, text=True, timeout=120)\n"
        "print(json.dumps({'full': full, 'after': after,\n"
        "                  'other': other.stdout.strip() or other.stderr.strip().splitlines()[-1]}))\n",
        path, ballast)


def test_add_on_a_nearly_full_disk_fails_cleanly(small_fs):
    """Item 9: adds spilled from a small cache fill the pending transaction on a nearly full disk.

    Before the fix the failing ``add`` raised a raw ``lmdb.MapFullError``, left its IDs in
    the handle (``len`` and ``in`` counted them) and ``get`` then raised ``BadTxnError``.
    The handle must stay usable: either it keeps every add before the failing call, or it
    was rolled back to the last commit and the message says so.
    """
    path = os.path.join(small_fs, "store")
    first = 10_000
    le.EmbeddingStore.create(path, first, 64, init="zeros", chunk_rows=256).close()
    store = le.EmbeddingStore.open(path, cache_mb=1)
    fill_disk(small_fs, leave=16 << 20)
    batch, added, error = 20_000, 0, None
    try:
        for start in range(first, first + 1_200_000, batch):  # ~300 MiB of rows: cannot fit in 16 MiB
            try:
                store.add(np.arange(start, start + batch))
            except Exception as exc:
                error = exc
                break
            added += batch
        if error is None:  # the adds were held back (in memory): then the commit must fail, cleanly
            with pytest.raises(le.EmbeddingStoreError) as info:
                store.commit()
            error, added = info.value, 0
        raw = f"raw {type(error).__module__}.{type(error).__name__}: {error}"
        assert isinstance(error, le.EmbeddingStoreError), raw
        one_line(error)
        failed_ids = np.arange(first + added, first + added + batch)
        n = len(store)
        assert n in (first + added, first), f"the handle holds {n} rows after the failed add"
        if n == first and added:
            assert "rolled back" in str(error), f"the handle was rolled back without saying so: {error}"
        assert int(failed_ids[-1]) not in store and int(failed_ids[0]) not in store, "the failed add's IDs stayed"
        assert (store.get(np.arange(0, first, 997)) == 0).all()
        kept = n
    finally:
        os.remove(os.path.join(small_fs, "ballast"))
    store.rollback()
    store.close()
    assert committed_table(path)["rows"] == first
    assert kept in (first, first + added)
    cli_ok("verify", path)


@pytest.mark.parametrize("free", ["none", "1MiB"])
def test_create_on_a_full_disk_is_a_clear_error_and_leaves_nothing(small_fs, free):
    """Item 10: before the fix ``create`` on a nearly full disk raised a raw ``lmdb.Error``
    (``mdb_txn_commit: Input/output error``), and on a completely full tmpfs the process died
    of SIGBUS (LMDB touches its fresh ``lock.mdb`` through a memory map) — in the child here."""
    fill_disk(small_fs, leave=0 if free == "none" else 1 << 20)
    target = os.path.join(small_fs, "new")
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys, lmdb_embeddings as le\n"
         "try:\n"
         "    le.EmbeddingStore.create(sys.argv[1], 200_000, 16).close()\n"
         "    print('created')\n"
         "except le.EmbeddingStoreError as exc:\n"
         "    print('refused', type(exc).__name__, repr(str(exc)))\n"
         "except BaseException as exc:\n"
         "    print('raw', type(exc).__module__, type(exc).__name__, repr(str(exc)))\n",
         target], capture_output=True, text=True, timeout=120, env=subprocess_env())
    out = proc.stdout.strip()
    assert proc.returncode == 0, f"the creating process died (rc {proc.returncode}): {proc.stderr[-1500:]}"
    assert out.startswith("refused"), out
    assert sorted(os.listdir(small_fs)) == ["ballast"], f"create left {os.listdir(small_fs)}"


def test_writable_open_on_a_read_only_filesystem_is_a_permission_error(readonly_mount):
    """Item 10: before the fix a raw ``OSError [Errno 30] Read-only file system`` (README promises
    ``PermissionError``). Reading through the read-only mount keeps working."""
    source, view = readonly_mount
    le.EmbeddingStore.create(os.path.join(source, "store"), 100, 4, seed=4).close()
    want = committed_table(os.path.join(source, "store"))
    path = os.path.join(view, "store")
    with pytest.raises(le.EmbeddingStoreError) as info:
        le.EmbeddingStore.open(path)
    assert isinstance(info.value, PermissionError), type(info.value).__mro__
    one_line(info.value)
    assert committed_table(path) == want
    with le.EmbeddingStore.open(path, readonly=True) as reader:
        assert len(reader) == 100


def test_create_on_a_read_only_filesystem_is_a_permission_error(readonly_mount):
    """Before the fix a raw ``OSError [Errno 30]`` from the hidden ``.store.creating-*`` directory."""
    source, view = readonly_mount
    with pytest.raises(le.EmbeddingStoreError) as info:
        le.EmbeddingStore.create(os.path.join(view, "store"), 100, 4)
    assert isinstance(info.value, PermissionError), type(info.value).__mro__
    one_line(info.value)
    assert os.listdir(source) == [] and hidden_entries(view, "store") == []

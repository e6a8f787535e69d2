"""Inputs that break promises (issue 12, items 5, 9, 10): dump targets, calls that fail halfway, raw errors.

The rule under test: a call either does what it says or raises an ``EmbeddingStoreError``
(also the builtin that fits) with a one-line message, and then nothing has changed: no
half-applied put, no store left at the path, no file replaced.
"""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from checkout import ROOT, subprocess_env
from cli_helpers import assert_same_store, make_rich_store, read_store
from guarantees_lib import (
    assert_one_line_cli_error,
    cli,
    cli_ok,
    committed_table,
    damage_stored_row,
    hidden_entries,
    one_line,
)

import lmdb_embeddings as le


def small_store(path: str, rows: int = 300, dim: int = 4) -> dict:
    le.EmbeddingStore.create(path, rows, dim, chunk_rows=64, seed=3).close()
    return read_store(path)


def listing(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


# ------------------------------------------------------------------ item 5: dump targets
def _make_target(kind: str, tmp_path) -> tuple[str, callable]:
    """A non-regular OUT and a function returning what it is now (type, link target, bytes behind it)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = str(tmp_path / f"out-{kind}")
    if kind == "symlink":
        os.symlink(str(victim), out)
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "device":  # a private copy of /dev/null (never the real one)
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        raise ValueError(kind)

    def state():
        st = os.lstat(out)
        return (stat.S_IFMT(st.st_mode), os.readlink(out) if kind == "symlink" else None,
                (st.st_rdev if kind == "device" else None), victim.read_text())

    return out, state


@pytest.mark.parametrize("kind", ["symlink", "fifo", "device"])
def test_dump_refuses_a_target_that_is_not_a_regular_file(tmp_path, kind):
    """Item 5: before the fix a symlink, FIFO or device node at OUT was replaced by a regular file
    (as root against ``/dev/null`` it replaced ``/dev/null``), exit 0."""
    path = str(tmp_path / "store")
    small_store(path)
    out, state = _make_target(kind, tmp_path)
    before = state()
    proc = cli("dump", path, out, timeout=60)
    assert_one_line_cli_error(proc)
    assert state() == before, f"dump changed the {kind} at OUT"
    assert hidden_entries(str(tmp_path), os.path.basename(out)) == []


@pytest.mark.parametrize("target", ["data.mdb", "lock.mdb", "writer.lock", "new.dump", "npy-in-store"])
def test_dump_refuses_a_target_inside_the_store(tmp_path, target):
    """Item 5: before the fix ``dump S S/data.mdb`` exited 0 and destroyed the store."""
    path = str(tmp_path / "store")
    want = small_store(path)
    files = listing(path)
    if target == "npy-in-store":
        proc = cli("dump", "--format", "npy", path, path, timeout=60)
    else:
        proc = cli("dump", path, os.path.join(path, target), timeout=60)
    assert_one_line_cli_error(proc)
    assert listing(path) == files, "dump wrote into the store directory"
    cli_ok("verify", path)
    assert_same_store(read_store(path), want)


def _popen_cli(*args: str, cwd: str, stdin=None, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmdb_embeddings", *args], cwd=cwd, env=subprocess_env(),
                            stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)


def test_dump_to_stdout_piped_into_restore_from_stdin_is_bit_exact(tmp_path):
    """Item 5: ``dump S - | restore - T`` streams through a pipe (``| ssh``, ``| zstd``).

    Before the fix ``dump S -`` wrote a file named ``-`` in the working directory and
    printed its summary on stdout. The two ends run in different directories, so neither
    can pass the table through a file named ``-``.
    """
    src, target = str(tmp_path / "src"), str(tmp_path / "restored")
    want = make_rich_store(src)
    here_dump, here_restore = tmp_path / "cwd-dump", tmp_path / "cwd-restore"
    here_dump.mkdir()
    here_restore.mkdir()
    dump = _popen_cli("dump", src, "-", cwd=str(here_dump))
    restore = _popen_cli("restore", "-", target, cwd=str(here_restore), stdin=dump.stdout)
    dump.stdout.close()  # restore holds the only reading end now
    try:
        _, restore_err = restore.communicate(timeout=120)
        dump_err = dump.stderr.read()
        dump.wait(timeout=60)
    finally:
        for p in (dump, restore):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert listing(str(here_dump)) == [] and listing(str(here_restore)) == [], "a file named '-' was written"
    assert dump.returncode == 0, dump_err.decode(errors="replace")
    assert restore.returncode == 0, restore_err.decode(errors="replace")
    assert_same_store(read_store(target), want)


def test_restore_of_garbage_on_stdin_fails_cleanly_and_leaves_nothing(tmp_path):
    target = str(tmp_path / "restored")
    (tmp_path / "cwd").mkdir()
    proc = subprocess.run([sys.executable, "-m", "lmdb_embeddings", "restore", "-", target], input=b"not a dump" * 50,
                          capture_output=True, timeout=60, env=subprocess_env(), cwd=str(tmp_path / "cwd"))
    line = assert_one_line_cli_error(proc)
    assert "no dump at" not in line, f"'-' was taken as a file name: {line}"
    assert listing(str(tmp_path)) == ["cwd"] and listing(str(tmp_path / "cwd")) == []


@pytest.mark.parametrize("damage", ["truncated", "extended"])
def test_restore_from_stdin_refuses_a_truncated_or_extended_stream(tmp_path, damage):
    """A stream has no size to check up front: a short one fails where it ends, bytes after the
    trailer fail at the end; either way nothing is left at the target."""
    path = str(tmp_path / "store")
    small_store(path)
    dump = str(tmp_path / "full.dump")
    cli_ok("dump", path, dump)
    data = open(dump, "rb").read()
    data = data[: len(data) - 100] if damage == "truncated" else data + b"\0" * 16
    target = str(tmp_path / "restored")
    proc = subprocess.run([sys.executable, "-m", "lmdb_embeddings", "restore", "-", target], input=data,
                          capture_output=True, timeout=60, env=subprocess_env(), cwd=ROOT)
    line = assert_one_line_cli_error(proc)
    assert ("truncated" if damage == "truncated" else "after the trailer") in line, line
    assert not os.path.exists(target) and hidden_entries(str(tmp_path), "restored") == []


def test_dump_npy_to_stdout_is_refused(tmp_path):
    """``--format npy`` writes a directory: ``-`` cannot be one (and must not become a directory named ``-``)."""
    path = str(tmp_path / "store")
    small_store(path)
    (tmp_path / "cwd").mkdir()
    proc = cli("dump", "--format", "npy", path, "-", cwd=str(tmp_path / "cwd"), timeout=60)
    assert_one_line_cli_error(proc)
    assert listing(str(tmp_path / "cwd")) == []


# ----------------------------------------------------------- item 9: calls that fail halfway
def test_put_that_meets_a_corrupt_chunk_changes_nothing(tmp_path):
    """Item 9: a put over more chunks than the cache holds meets a corrupt chunk.

    Before the fix it raised ``CorruptionError`` after the groups before the bad chunk were
    already written (here 24 dirty chunks), and the next ``close()`` committed them.
    """
    path = str(tmp_path / "store")
    rows, dim, cr = 16384, 16, 256
    values = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim)
    le.EmbeddingStore.create(path, rows, dim, init=values, chunk_rows=cr).close()
    damage_stored_row(path, values[40 * cr + 7].tobytes())  # a row of chunk 40
    # a cache of a quarter of the table (12 chunks of L1): the put goes in groups
    store = le.EmbeddingStore.open(path, cache_mb=0.25)
    try:
        assert store.stats()["cache_budget_bytes"] < values.nbytes
        with pytest.raises(le.CorruptionError):
            store.put(store.ids, values + 0.5)
        assert store.get(store.ids[:cr]).tobytes() == values[:cr].tobytes(), \
            "the failed put left its first rows in the handle"
        assert store.stats()["dirty_chunks"] == 0
    finally:
        store.close()
    with le.EmbeddingStore.open(path, readonly=True) as reader:
        assert reader.commit_count == 0, "close() committed part of the failed put"
        assert reader.get(reader.ids[:cr]).tobytes() == values[:cr].tobytes()


BAD_OPTIONS = [
    ("cache_mb", math.nan), ("cache_mb", math.inf), ("l1_mb", math.inf), ("l2_mb", math.nan),
    ("l1_fraction", "0.5"), ("readahead", "no"),
]


@pytest.mark.parametrize(("name", "value"), BAD_OPTIONS, ids=[f"{n}={v!r}" for n, v in BAD_OPTIONS])
def test_bad_open_options_are_refused_before_anything_is_built(tmp_path, name, value):
    """Items 9 and 10: before the fix ``cache_mb=nan``/``inf``, ``l1_mb=inf``, ``l2_mb=nan`` and
    ``l1_fraction="0.5"`` failed with raw ``ValueError``/``OverflowError``/``TypeError`` only after
    the store was built and left at the path; ``readahead="no"`` was taken as true."""
    path = str(tmp_path / "store")
    with pytest.raises(le.EmbeddingStoreError) as info:
        le.EmbeddingStore.create(path, 100, 4, **{name: value}).close()
    assert isinstance(info.value, (ValueError, TypeError)), type(info.value).__mro__
    one_line(info.value)
    assert listing(str(tmp_path)) == [], "create left something behind"
    small_store(path)
    want = committed_table(path)
    with pytest.raises(le.EmbeddingStoreError) as info:
        le.EmbeddingStore.open(path, readonly=True, **{name: value}).close()
    assert isinstance(info.value, (ValueError, TypeError))
    assert committed_table(path) == want


# --------------------------------------------------------------- item 10: raw errors
def test_seed_beyond_uint64_is_a_clear_error(tmp_path):
    """Before the fix: a raw ``OverflowError``."""
    path = str(tmp_path / "store")
    with pytest.raises(le.EmbeddingStoreError) as info:
        le.EmbeddingStore.create(path, 10, 4, seed=2**64)
    assert isinstance(info.value, ValueError)
    one_line(info.value)
    assert listing(str(tmp_path)) == []


def test_put_casts_a_bfloat16_tensor_like_any_dtype(tmp_path):
    """Before the fix: a raw ``TypeError: Got unsupported ScalarType BFloat16``."""
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "store")
    values = (torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7).to(torch.bfloat16)
    with le.EmbeddingStore.create(path, 10, 4) as store:
        store.put([1, 2, 3], values)
        got = store.get([1, 2, 3])
    assert got.tobytes() == values.float().numpy().tobytes()


def test_a_chunk_too_large_to_allocate_is_a_clear_error(tmp_path):
    """``dim=10**9``: one chunk of 1024 rows is 4 TB. Before the fix: a raw ``MemoryError``.

    Run in a child with its address space capped (16 GiB), so a fix that allocates it anyway
    fails here instead of swamping the machine.
    """
    path = str(tmp_path / "store")
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))\n"
        "import lmdb_embeddings as le\n"
        "try:\n"
        "    le.EmbeddingStore.create(sys.argv[1], 1, 10**9).close()\n"
        "except le.EmbeddingStoreError as exc:\n"
        "    print('refused', repr(str(exc)))\n"
        "except BaseException as exc:\n"
        "    print('raw', type(exc).__name__, repr(str(exc)))\n"
        "else:\n"
        "    print('created')\n")
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), cwd=ROOT)
    out = proc.stdout.strip()
    assert out.startswith("refused"), f"rc={proc.returncode} {out} {proc.stderr[-2000:]}"
    assert "\\n" not in out
    assert listing(str(tmp_path)) == []


@pytest.mark.parametrize("opener", ["create", "open"])
def test_none_path_is_a_clear_error(tmp_path, opener):
    """Before the fix: a raw ``TypeError: expected str, bytes or os.PathLike object``."""
    with pytest.raises(le.EmbeddingStoreError) as info:
        if opener == "create":
            le.EmbeddingStore.create(None, 10, 4)
        else:
            le.EmbeddingStore.open(None)
    assert isinstance(info.value, TypeError)
    one_line(info.value)


def test_bytes_path_works_or_is_a_clear_error(tmp_path):
    """Before the fix: a raw ``TypeError: a bytes-like object is required, not 'str'``.

    Either outcome is right: the store is made at the decoded path, or an
    ``EmbeddingStoreError`` that is a ``TypeError`` says to pass a str, and nothing is made.
    """
    path = str(tmp_path / "store")
    try:
        store = le.EmbeddingStore.create(os.fsencode(path), 10, 4, seed=1)
    except le.EmbeddingStoreError as exc:
        assert isinstance(exc, TypeError), type(exc).__mro__
        one_line(exc)
        assert listing(str(tmp_path)) == []
        return
    rows = store.get([3])
    store.close()
    assert listing(str(tmp_path)) == ["store"]
    with le.EmbeddingStore.open(path, readonly=True) as reader:
        assert reader.get([3]).tobytes() == rows.tobytes()


def test_long_store_names_work(tmp_path):
    """A 250-character name is legal (255 is the limit). Before the fix ``create``, ``dump`` and
    ``restore`` failed with ``ENAMETOOLONG`` from their hidden temporary sibling's name."""
    name = "n" * 250
    path = str(tmp_path / name)
    with le.EmbeddingStore.create(path, 500, 4, seed=2) as store:
        store.put([1], np.ones((1, 4), np.float32))
    want = read_store(path)
    out_dir = tmp_path / "dumps"
    out_dir.mkdir()
    dump = str(out_dir / ("d" * 250))
    cli_ok("dump", path, dump)
    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    restored = str(restored_dir / ("r" * 250))
    cli_ok("restore", dump, restored)
    assert_same_store(read_store(restored), want)
    cli_ok("compact", path)
    assert_same_store(read_store(path), want)
    assert sorted(os.listdir(tmp_path)) == sorted(["dumps", "restored", name])


@pytest.mark.parametrize("command", ["restore", "import-cosir"])
def test_huge_chunk_rows_option_is_a_clear_cli_error(tmp_path, command):
    """Before the fix: ``unexpected error: OverflowError: Integer value out of range``."""
    if command == "restore":
        src = tmp_path / "npy"
        src.mkdir()
        np.save(str(src / "ids.npy"), np.arange(100, dtype=np.int64))
        np.save(str(src / "embeddings.npy"), np.zeros((100, 4), np.float32))
    else:
        torch = pytest.importorskip("torch")
        src = tmp_path / "cosir"
        src.mkdir()
        torch.save({i: torch.zeros(4) for i in range(10)}, str(src / "embeddings_chunk_0.pt"))
    target = str(tmp_path / "store")
    proc = cli(command, str(src), target, "--chunk-rows", "99999999999999999999", timeout=120)
    assert_one_line_cli_error(proc, "chunk")
    assert not os.path.exists(target) and hidden_entries(str(tmp_path), "store") == []

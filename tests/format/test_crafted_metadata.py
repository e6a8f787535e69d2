"""Hostile metadata with VALID checksums (issue 18, items 10, 11, 12): stores and dumps whose records claim
what the data cannot back (2**33 rows), or hold values nothing can use (an unknown init, commit 2**64-1).

The rule under test: work and memory follow the data, not the claim; what ``restore`` accepts opens and
works, anything else is refused in one line and leaves nothing at PATH; a crafted store directory is an
``EmbeddingStoreError`` at open, never a raw ``OverflowError``/``MemoryError``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import lmdb
import numpy as np
import pytest
from checkout import ROOT, subprocess_env
from guarantees_lib import assert_one_line_cli_error, cli, cli_ok, hidden_entries

import lmdb_embeddings as le
from lmdb_embeddings.format import dump_file, records
from lmdb_embeddings.format.chunks import chunk_key, encode_chunk
from lmdb_embeddings.format.layout import copy_table
from lmdb_embeddings.ops.verify import MAX_LISTED


# ------------------------------------------------------------------------------ crafting
def refused(proc, *needles: str) -> str:
    """A failed operation on bad input: exit 1, one line on stderr, no traceback."""
    line = assert_one_line_cli_error(proc, *needles)
    assert proc.returncode == 1, (proc.returncode, line)
    return line


def set_record(path: str, key: bytes, **changes) -> None:
    """Rewrite one metadata record of the store at ``path`` with ``changes``, its checksum recomputed."""
    env = lmdb.open(path, max_dbs=64)
    try:
        with env.begin(write=True) as txn:
            db = env.open_db(b"meta", txn=txn)
            record = records.unpack_record(txn.get(key, db=db), key)
            record.update(changes)
            txn.put(key, records.pack_record(record), db=db)
    finally:
        env.close()


def put_chunk(path: str, db_name: bytes, index: int, rows: np.ndarray, version: int) -> None:
    """Store a well-formed chunk value (valid checksum) under ``index`` of database ``db_name``."""
    env = lmdb.open(path, max_dbs=64)
    try:
        with env.begin(write=True) as txn:
            txn.put(chunk_key(index), encode_chunk(rows, index, version), db=env.open_db(db_name, txn=txn))
    finally:
        env.close()


class _Table:
    """A table held in memory (a ``TableSource``): what a dump file held, under another layout."""

    def __init__(self, src: str):
        with dump_file.DumpReader(src) as reader:
            self.layout = reader.layout
            self._ids = [ids.copy() for _, ids in reader.id_chunks()]
            self._chunks = [[p.copy() for p in parts] for _, parts in reader.chunks()]

    def id_chunks(self):
        yield from enumerate(self._ids)

    def chunks(self):
        yield from enumerate(self._chunks)


def craft_dump(src: str, out: str, **layout_changes) -> None:
    """Rewrite the dump ``src`` into ``out`` with layout fields changed: every checksum valid."""
    table = _Table(src)
    table.layout = dataclasses.replace(table.layout, **layout_changes)
    with open(out, "wb") as f:
        copy_table(table, dump_file.DumpWriter(f, table.layout, {"path": "crafted"}))


def small_store(path: str) -> None:
    with le.EmbeddingStore.create(path, 100, 4, chunk_rows=8) as store:
        store.ensure_column("m", 4, fill=0.5)
        store.set_attr("step", 3)


# --------------------------------------------------------------------- item 10: verify
VERIFY_PEAK = r"""
import json, sys
from lmdb_embeddings.cli.commands import main
rc = main(["verify", sys.argv[1], *sys.argv[2:]])
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "peak_kib": peak}), file=sys.stderr)
"""  # VmHWM: this program's peak RSS (ru_maxrss would also count the parent's pages forked before exec)


def _verify_with_peak(path: str, *args: str) -> tuple[str, dict]:
    proc = subprocess.run([sys.executable, "-c", VERIFY_PEAK, path, *args], capture_output=True, text=True,
                          timeout=120, env=subprocess_env(), cwd=ROOT)
    assert proc.stderr.strip(), proc
    return proc.stdout, json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("claimed", [2**24, 2**33])
def test_verify_of_a_store_claiming_far_more_rows_than_it_holds_follows_the_data(tmp_path, claimed):
    """Before: 2**33 claimed -> MemoryError (a 64 GiB array of IDs); 2**24 over 100 real rows -> 760 MB and
    two million lines of "missing". Now one problem per run of missing chunks, memory of the real rows."""
    path = str(tmp_path / "store")
    small_store(path)
    set_record(path, b"state", rows=claimed)
    out, run = _verify_with_peak(path)
    assert run["rc"] == 1 and run["peak_kib"] < 200 * 1024, run
    lines = out.splitlines()
    assert lines[0].startswith("FAILED:") and len(lines) < 10, out
    assert f"the state record claims {claimed} rows" in out and f"chunks 13 to {claimed // 8 - 1}" in out, out
    out, run = _verify_with_peak(path, "--json")
    report = json.loads(out)
    assert run["rc"] == 1 and not report["ok"] and len(report["problems"]) <= 6 and report["problems_not_listed"] == 0


def test_verify_lists_a_bounded_number_of_problems_and_counts_the_rest(tmp_path):
    path = str(tmp_path / "store")
    le.EmbeddingStore.create(path, 300 * 8, 4, chunk_rows=8).close()
    env = lmdb.open(path, max_dbs=64)
    with env.begin(write=True) as txn:  # every chunk of the embeddings fails its checksum
        db = env.open_db(b"col:embeddings", txn=txn)
        for chunk in range(300):
            value = bytearray(txn.get(chunk_key(chunk), db=db))
            value[-1] ^= 0x40
            txn.put(chunk_key(chunk), bytes(value), db=db)
    env.close()
    proc = cli("verify", path)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and lines[0].startswith(f"FAILED: {path}: 300 problem(s)"), proc.stdout[:500]
    assert len(lines) == MAX_LISTED + 2 and lines[-1] == f"  ... and {300 - MAX_LISTED} more problem(s), not listed"
    report = json.loads(cli("verify", path, "--json").stdout)
    assert len(report["problems"]) == MAX_LISTED and report["problems_not_listed"] == 300 - MAX_LISTED


# ----------------------------------------------------------------- item 11: restore
CRAFTED_DUMPS = {
    "init-zzz": lambda layout: {"config": {**layout.config, "init": "zzz"}},
    "init-unknown-kind": lambda layout: {"config": {**layout.config, "init": {"kind": "bogus"}}},
    "init-std-nan": lambda layout: {"config": {**layout.config, "init": {"kind": "normal", "std": float("nan")}}},
    "init-bound-overflows-float32": lambda layout: {"config": {**layout.config,
                                                               "init": {"kind": "uniform", "bound": 1e39}}},
    "seed-negative": lambda layout: {"config": {**layout.config, "seed": -1}},
    "seed-text": lambda layout: {"config": {**layout.config, "seed": "x"}},
    "commit-2**63": lambda layout: {"commit": 2**63},
    "commit-2**64-1": lambda layout: {"commit": 2**64 - 1},
    "committed-at-1e300": lambda layout: {"committed_at": 1e300},
    "fill-nan": lambda layout: {"columns": (layout.columns[0], dataclasses.replace(layout.columns[1],
                                                                                 fill=float("nan")))},
    "fill-beyond-float16": lambda layout: {"columns": (layout.columns[0], dataclasses.replace(
        layout.columns[1], dtype=np.dtype("float16"), fill=1e6))},
}


@pytest.fixture(scope="module")
def source_dump(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dump")
    path = str(directory / "store")
    small_store(path)
    with le.EmbeddingStore.open(path) as store:
        store.put_column("m", [1, 2], np.ones((2, 4)))
    cli_ok("dump", path, str(directory / "source.lemb"))
    return str(directory / "source.lemb")


@pytest.mark.parametrize("case", sorted(CRAFTED_DUMPS))
def test_restore_refuses_a_crafted_dump_with_valid_checksums_and_leaves_nothing(tmp_path, source_dump, case):
    """Before: init "zzz" and commit 2**63 restored with exit 0 into stores that could not open or commit."""
    crafted, target = str(tmp_path / "crafted.lemb"), str(tmp_path / "restored")
    with dump_file.DumpReader(source_dump) as reader:
        changes = CRAFTED_DUMPS[case](reader.layout)
    if case.startswith("fill-beyond"):  # the column's rows must be of the crafted dtype too
        table = _Table(source_dump)
        table._chunks = [[parts[0], parts[1].astype(np.float16)] for parts in table._chunks]
        table.layout = dataclasses.replace(table.layout, **changes)
        with open(crafted, "wb") as f:
            copy_table(table, dump_file.DumpWriter(f, table.layout, {}))
    else:
        craft_dump(source_dump, crafted, **changes)
    proc = cli("restore", crafted, target)
    line = refused(proc, "crafted.lemb")
    assert any(word in line for word in ("is invalid", "is damaged", "is not valid")), line
    assert not os.path.exists(target) and hidden_entries(str(tmp_path), "restored") == []


def test_what_restore_accepts_opens_and_commits(tmp_path, source_dump):
    """The control: the dump the crafted ones were made from restores, opens, takes a put and commits."""
    target = str(tmp_path / "restored")
    cli_ok("restore", source_dump, target)
    with le.EmbeddingStore.open(target) as store:
        store.put([1], np.ones((1, 4)))
        store.add([1000])
    with dump_file.DumpReader(source_dump) as reader:
        dumped = reader.layout.commit
    with le.EmbeddingStore.open(target, readonly=True) as store:
        assert store.commit_count == dumped + 1 and np.all(store.get([1]) == 1.0) and 1000 in store


# --------------------------------------------------- item 11: crafted store directories
CRAFTED_STORES = {
    "state-commit-2**64-1": lambda p: set_record(p, b"state", commit=2**64 - 1),
    "state-commit-2**63": lambda p: set_record(p, b"state", commit=2**63),
    "state-rows-text": lambda p: set_record(p, b"state", rows="100"),
    "state-committed-at-nan": lambda p: set_record(p, b"state", committed_at=float("nan")),
    "state-reverts-malformed": lambda p: set_record(p, b"state", reverts=[[1]]),
    "state-column-fill-nan": lambda p: set_record(p, b"state", columns={
        "embeddings": {"width": 4, "dtype": "float32", "fill": 0.0}, "m": {"width": 4, "dtype": "float32",
                                                                         "fill": float("nan")}}),
    "config-init-zzz": lambda p: set_record(p, b"config", init="zzz"),
    "config-seed-negative": lambda p: set_record(p, b"config", seed=-1),
    "chunk-version-2**64-1": lambda p: put_chunk(p, b"col:embeddings", 0, np.zeros((8, 4), np.float32), 2**64 - 1),
    "ids-duplicated": lambda p: put_chunk(p, b"ids", 0, np.zeros((8, 1), np.int64), 1),
}
METADATA_ONLY = {"info": ("chunk-version-2**64-1", "ids-duplicated"), "dump": ("ids-duplicated",)}


@pytest.mark.parametrize("case", sorted(CRAFTED_STORES))
def test_a_crafted_store_directory_is_a_clear_error_at_every_entry_point(tmp_path, case):
    """Before: commit 2**64-1 opened and raised a raw OverflowError at the first get (2**63: at the next
    commit); a chunk version beyond int64 did the same; an ID stored twice opened and served one of its
    rows. (``info`` reads the metadata only; ``dump`` copies IDs as they are and ``restore`` refuses them.)"""
    path = str(tmp_path / "store")
    small_store(path)
    CRAFTED_STORES[case](path)
    for readonly in (True, False):
        with pytest.raises(le.CorruptionError):
            with le.EmbeddingStore.open(path, readonly=readonly) as store:
                store.get(store.ids)
                store.put(store.ids[:3], np.zeros((3, 4)))
    for command in ("info", "dump", "verify"):
        args = (command, path, str(tmp_path / "out.lemb")) if command == "dump" else (command, path)
        proc = cli(*args)
        if command == "verify":
            assert proc.returncode == 1 and proc.stdout.startswith("FAILED:") and not proc.stderr, proc
        elif case in METADATA_ONLY.get(command, ()):
            assert proc.returncode == 0, proc.stderr
        else:
            refused(proc)
            assert not os.path.exists(tmp_path / "out.lemb")


# ------------------------------------------------------------ item 12: restore from stdin
def test_a_header_claiming_2_to_the_62_rows_is_truncated_from_a_file_and_from_stdin(tmp_path, source_dump):
    """Before: from stdin "unexpected error: OverflowError" (the new store's map was sized from the claim
    before a byte of data was read); from the file "truncated". Now the map grows with the data."""
    crafted, target = str(tmp_path / "huge.lemb"), str(tmp_path / "restored")
    with dump_file.DumpReader(source_dump) as reader:
        layout = dataclasses.replace(reader.layout, rows=2**62)
    with open(crafted, "wb") as f:
        dump_file.DumpWriter(f, layout, {})  # the header alone: the file ends there
    from_file = refused(cli("restore", crafted, target))
    with open(crafted, "rb") as f:
        from_stdin = refused(cli("restore", "-", target, stdin=f))
    for line in (from_file, from_stdin):
        assert "truncated" in line and "id block 0" in line, line
    assert not os.path.exists(target) and hidden_entries(str(tmp_path), "restored") == []


def test_the_restored_store_grows_its_map_with_the_data(tmp_path, monkeypatch):
    """The builder's map starts small and grows: a table larger than the first map restores bit-exact."""
    from lmdb_embeddings.ops import dump_store, restore_store
    from lmdb_embeddings.processes import builder
    from lmdb_embeddings.processes.space import SpaceBudget

    monkeypatch.setattr(builder, "_FIRST_MAP_MAX", 4 << 20)
    monkeypatch.setattr(builder, "_TXN_BYTES", 1 << 20)
    monkeypatch.setattr(SpaceBudget, "MIN_MAP", 1 << 20)  # else the first transaction makes 256 MiB of room
    monkeypatch.setattr(SpaceBudget, "MAP_SLACK", 1 << 20)
    path, dump, target = str(tmp_path / "store"), str(tmp_path / "d.lemb"), str(tmp_path / "restored")
    rows = (4 << 20) // (64 * 4) * 4  # a 16 MiB table: four times the first map
    values = np.random.default_rng(1).standard_normal((rows, 64)).astype(np.float32)
    le.EmbeddingStore.create(path, rows, 64, chunk_rows=512, init=values).close()
    dump_store(path, dump)
    restore_store(dump, target)
    with le.EmbeddingStore.open(target, readonly=True) as store:
        assert store.get(np.arange(rows)).tobytes() == values.tobytes()


LIVE_STATES = {"commit-2**64-1": "commit=2**64 - 1", "reverts-malformed": "commit=5, reverts=[[1]]",
               "columns-list": "commit=5, columns=[1]"}
CRAFT_IN_CHILD = r"""
import sys, lmdb
from lmdb_embeddings.format import records
env = lmdb.open(sys.argv[1], max_dbs=64)
with env.begin(write=True) as txn:
    db = env.open_db(b"meta", txn=txn)
    record = records.unpack_record(txn.get(b"state", db=db), b"state")
    exec("record.update(" + sys.argv[2] + ")")
    txn.put(b"state", records.pack_record(record), db=db)
"""


@pytest.mark.parametrize("case", sorted(LIVE_STATES))
def test_a_reader_catching_up_with_a_crafted_state_record_gets_a_clear_error(tmp_path, case):
    """A read-only handle that is open when another process writes a crafted state record (valid checksum).
    Before: a raw OverflowError (commit 2**64-1 into the cache's int64 versions) or AttributeError."""
    path = str(tmp_path / "store")
    small_store(path)
    with le.EmbeddingStore.open(path, readonly=True) as reader:
        reader.get([1])
        subprocess.run([sys.executable, "-c", CRAFT_IN_CHILD, path, LIVE_STATES[case]], check=True, timeout=60,
                       env=subprocess_env(), cwd=ROOT)
        with pytest.raises(le.CorruptionError, match="state record is damaged"):
            reader.get([1])

"""info, verify and compact through the real CLI, and dump while a writer commits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from checkout import ROOT, run_cli, subprocess_env
from cli_helpers import assert_one_line_error, assert_same_store, make_rich_store, ok, read_store, stderr_on_tty

import lmdb_embeddings as le
from lmdb_embeddings.fsutil import allocated_bytes

WRITER = r"""
import sys, time
import numpy as np
import lmdb_embeddings as le
from lmdb_embeddings.fsutil import allocated_bytes
store = le.EmbeddingStore.open(sys.argv[1])
ids = store.ids
k = 0
print("ready", flush=True)
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    k += 1
    store.put(ids, np.full((len(ids), store.dim), float(k), np.float32))  # the whole table, one value
    store.commit()
    print(k, time.time(), flush=True)  # when commit k became visible
print("done", flush=True)
store.close()
"""


def test_dump_while_a_writer_commits_sees_one_commit(tmp_path):
    src = str(tmp_path / "src")
    le.EmbeddingStore.create(src, 100_000, 32, chunk_rows=1024, init="zeros").close()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, src, "8"], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env(), cwd=ROOT)
    try:
        assert writer.stdout.readline().strip() == "ready"
        seen, windows = [], []
        for i in range(4):
            out = str(tmp_path / f"npy{i}")
            started = time.time()
            ok("dump", src, out, "--format", "npy")
            windows.append((started, time.time()))
            rows = np.load(os.path.join(out, "embeddings.npy"))
            values = np.unique(rows)
            assert len(values) == 1, f"dump {i} mixes commits: values {values[:10]}"
            seen.append(float(values[0]))
        dump = str(tmp_path / "t.lemb")
        ok("dump", src, dump)
        ok("restore", dump, str(tmp_path / "restored"))
        with le.EmbeddingStore.open(str(tmp_path / "restored"), readonly=True) as s:
            assert len(np.unique(s.get(s.ids))) == 1
            assert s.commit_count == int(np.unique(s.get(s.ids))[0])  # commit k wrote value k
    finally:
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0 and out.splitlines()[-1] == "done"
    commit_times = [float(line.split()[1]) for line in out.splitlines()[:-1]]
    # the writer really committed while the dumps ran (else this test would prove nothing)
    assert any(lo < t < hi for lo, hi in windows for t in commit_times), (windows, commit_times[:5])
    assert min(seen) >= 1


def test_info_json_reports_the_store_and_its_writer(tmp_path):
    path = str(tmp_path / "s")
    make_rich_store(path)
    info = json.loads(ok("info", path, "--json").stdout)
    assert (info["rows"], info["dim"], info["dtype"], info["chunk_rows"], info["chunks"]) == (1503, 12, "float16",
                                                                                              100, 16)
    assert info["commit_count"] == 2 and info["format_version"] == le.FORMAT_VERSION
    assert info["writer_active"] is False and info["writer_pid"] is None
    assert info["bytes_on_disk"] >= info["data_file_bytes"] > 0
    assert info["lmdb"]["map_size"] >= info["lmdb"]["pages_in_use"] * info["lmdb"]["page_size"]
    assert set(info["columns"]) == {"adam_m", "steps"}
    assert info["last_commit"].startswith(time.strftime("%Y-", time.gmtime()))
    with le.EmbeddingStore.open(path):
        info = json.loads(ok("info", path, "--json").stdout)
        assert info["writer_active"] is True and info["writer_pid"] == os.getpid()
        assert f"yes (pid {os.getpid()})" in ok("info", path).stdout


def test_info_reports_the_format_version_recorded_in_the_store(tmp_path):
    """The store's own format record, not the library's constant (an older store says so)."""
    import lmdb

    from lmdb_embeddings.format import records

    path = str(tmp_path / "s")
    le.EmbeddingStore.create(path, 10, 4).close()
    env = lmdb.open(path, max_dbs=64)
    with env.begin(write=True) as txn:
        txn.put(b"format", records.pack_record({"magic": records.MAGIC, "format_version": 0}),
                db=env.open_db(b"meta", txn=txn))
    env.close()
    assert json.loads(ok("info", path, "--json").stdout)["format_version"] == 0
    assert "format version:  0" in ok("info", path).stdout


def _payload_offset(data_file: str, payload: bytes) -> int:
    with open(data_file, "rb") as f:
        data = f.read()
    at = data.find(payload)
    assert at >= 0 and data.find(payload, at + 1) == -1, "payload must occur exactly once"
    return at


def _flip_a_byte_of_chunk_3(path: str, values: np.ndarray) -> None:
    """Flip one bit inside chunk 3's payload (128 rows per chunk) in the data file."""
    at = _payload_offset(os.path.join(path, "data.mdb"), values[3 * 128 : 4 * 128].tobytes())
    with open(os.path.join(path, "data.mdb"), "r+b") as f:
        f.seek(at + 1000)
        byte = f.read(1)
        f.seek(at + 1000)
        f.write(bytes([byte[0] ^ 0x01]))


def test_verify_finds_a_flipped_byte_in_a_chunk_payload(tmp_path):
    path = str(tmp_path / "s")
    values = np.arange(2000 * 8, dtype=np.float32).reshape(2000, 8)  # every row distinct
    le.EmbeddingStore.create(path, 2000, 8, chunk_rows=128, init=values).close()
    report = json.loads(ok("verify", path, "--json").stdout)
    assert report["ok"] is True and report["chunks_checked"] == 16 and report["problems"] == []
    _flip_a_byte_of_chunk_3(path, values)
    proc = run_cli("verify", path)
    assert proc.returncode == 1
    assert "bad chunks: 3" in proc.stdout and "checksum mismatch" in proc.stdout
    proc = run_cli("verify", path, "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["bad_chunks"] == [3]
    assert report["problems"][0]["part"] == "column 'embeddings'"
    # dump refuses to copy a corrupt store
    proc = run_cli("dump", path, str(tmp_path / "t.lemb"))
    assert "chunk 3" in assert_one_line_error(proc)
    assert proc.returncode == 1 and not os.path.exists(tmp_path / "t.lemb")


def test_verify_store_returns_a_report_dataclass_that_still_reads_as_its_mapping(tmp_path):
    """``verify_store`` returns a ``VerifyReport`` dataclass with ``Problem`` entries: attributes for new code,
    ``report["ok"]`` / ``p["chunk"]`` / ``dict(report)`` / ``==`` with a dict as before, and ``as_dict()`` plain
    dicts and lists that ``json.dumps`` takes, equal to what ``verify --json`` prints."""
    from lmdb_embeddings.results import Problem

    path = str(tmp_path / "s")
    values = np.arange(2000 * 8, dtype=np.float32).reshape(2000, 8)
    le.EmbeddingStore.create(path, 2000, 8, chunk_rows=128, init=values).close()
    _flip_a_byte_of_chunk_3(path, values)
    report = le.verify_store(path)
    assert isinstance(report, le.VerifyReport) and report.ok is False and report["ok"] is False
    assert report.bad_chunks == report["bad_chunks"] == [3] and report.rows == report.get("rows") == 2000
    first = report.problems[0]
    assert isinstance(first, Problem) and first.chunk == first["chunk"] == 3
    assert first.part == "column 'embeddings'" and "checksum" in first.error
    plain = report.as_dict()
    assert type(plain) is dict and all(type(p) is dict for p in plain["problems"])
    assert report == plain and dict(report) == plain and set(report) == set(plain)
    assert json.loads(json.dumps(plain)) == json.loads(run_cli("verify", path, "--json").stdout)
    assert "world_size" not in report and report.get("world_size") is None  # absent, as the key was


def test_compact_keeps_data_and_never_grows(tmp_path):
    path = str(tmp_path / "s")
    original = make_rich_store(path, dtype="float32", rows=3000)
    with le.EmbeddingStore.open(path) as s:  # rewrite the table a few times: free pages pile up
        for k in range(4):
            s.put(s.ids, np.full((len(s), 12), k, np.float32))
            s.commit()
        s.put(s.ids, original["rows"])
    original = read_store(path)
    data_file = os.path.join(path, "data.mdb")
    before = allocated_bytes(data_file)
    free_before = json.loads(ok("info", path, "--json").stdout)["lmdb"]["free_pages"]
    assert free_before > 0
    ok("compact", path)
    after = allocated_bytes(data_file)
    assert after < before
    assert_same_store(original, read_store(path))
    ok("compact", path)  # already compact: unchanged, never larger
    assert allocated_bytes(data_file) <= after
    assert_same_store(original, read_store(path))
    assert json.loads(ok("verify", path, "--json").stdout)["ok"]
    with le.EmbeddingStore.open(path):
        proc = run_cli("compact", path)
        assert "writer" in assert_one_line_error(proc) and proc.returncode == 1
    assert sorted(os.listdir(tmp_path)) == ["s"]


def test_progress_bar_only_on_a_terminal_and_not_with_quiet(tmp_path):
    path, out = str(tmp_path / "s"), str(tmp_path / "t.lemb")
    le.EmbeddingStore.create(path, 5000, 8, chunk_rows=64).close()

    assert "verify" in stderr_on_tty("verify", path) and "%" in stderr_on_tty("dump", path, out)
    assert stderr_on_tty("--quiet", "verify", path) == ""
    assert stderr_on_tty("dump", "-q", path, out, "--force") == ""
    assert run_cli("verify", path).stderr == ""  # a pipe is not a terminal


def test_verify_checks_auxiliary_columns_too(tmp_path):
    path = str(tmp_path / "s")
    state = np.arange(600 * 6, dtype=np.float32).reshape(600, 6) + 0.5
    with le.EmbeddingStore.create(path, 600, 4, chunk_rows=100, init="zeros") as s:
        s.ensure_column("moments", 6, "float32")
        s.put_column("moments", np.arange(600), state)
    at = _payload_offset(os.path.join(path, "data.mdb"), state[200:300].tobytes())
    with open(os.path.join(path, "data.mdb"), "r+b") as f:
        f.seek(at + 7)
        byte = f.read(1)
        f.seek(at + 7)
        f.write(bytes([byte[0] ^ 0x80]))
    proc = run_cli("verify", path, "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["bad_chunks"] == [2]
    assert [p["part"] for p in report["problems"]] == ["column 'moments'"]


def test_a_store_from_a_newer_format_is_refused_by_name(tmp_path):
    import lmdb
    import msgpack

    from lmdb_embeddings.format import records as store_module

    path = str(tmp_path / "s")
    le.EmbeddingStore.create(path, 10, 4).close()
    env = lmdb.open(path, max_dbs=64)
    with env.begin(write=True) as txn:  # a future format, with a checksum scheme we do not know
        record = {"magic": store_module.MAGIC, "format_version": 99, store_module.RECORD_CHECKSUM: 12345}
        txn.put(b"format", msgpack.packb(record), db=env.open_db(b"meta", txn=txn))
    env.close()
    for command in (("info", path), ("verify", path), ("dump", path, str(tmp_path / "d")), ("compact", path)):
        proc = run_cli(*command)
        assert "format version 99" in assert_one_line_error(proc) and proc.returncode == 1, command

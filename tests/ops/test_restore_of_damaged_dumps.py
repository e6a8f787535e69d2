"""restore of a damaged dump: non-zero exit, one line naming the damage, nothing left at PATH."""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from checkout import run_cli
from cli_helpers import assert_one_line_error, ok

import lmdb_embeddings as le

N_CASES = 20


@pytest.fixture(scope="module")
def dump_10k(tmp_path_factory):
    base = tmp_path_factory.mktemp("dump10k")
    src, dump = str(base / "src"), str(base / "t.lemb")
    with le.EmbeddingStore.create(src, np.arange(10_000) * 2 - 5000, 16, chunk_rows=512, seed=5) as s:
        s.ensure_column("state", 4, "float32")
        s.put_column("state", [0, 2], np.ones((2, 4)))
        s.set_attr("step", 3)
    ok("dump", src, dump)
    with open(dump, "rb") as f:
        return f.read()


def _restore_damaged(tmp_path, name: str, data: bytes):
    case = tmp_path / name
    case.mkdir()
    path = case / "t.lemb"
    path.write_bytes(data)
    proc = run_cli("restore", str(path), str(case / "store"), timeout=120)
    return case, proc


def _check_failed_cleanly(case, proc) -> str:
    line = assert_one_line_error(proc)
    assert not os.path.exists(case / "store")
    assert sorted(os.listdir(case)) == ["t.lemb"], os.listdir(case)  # no temporary directory either
    return line


def test_intact_dump_restores(tmp_path, dump_10k):
    case, proc = _restore_damaged(tmp_path, "intact", dump_10k)
    assert proc.returncode == 0, proc.stderr
    with le.EmbeddingStore.open(str(case / "store"), readonly=True) as s:
        assert len(s) == 10_000 and s.attrs == {"step": 3}


def test_truncation_at_random_offsets_is_detected(tmp_path, dump_10k):
    offsets = sorted(np.random.default_rng(11).choice(len(dump_10k), N_CASES, replace=False).tolist())
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda o: _restore_damaged(tmp_path, f"cut{o}", dump_10k[:o]), offsets))
    for offset, (case, proc) in zip(offsets, results, strict=True):
        line = _check_failed_cleanly(case, proc)
        assert "truncated" in line or "only" in line, (offset, line)
        assert proc.returncode == 1


def test_single_byte_flips_are_detected(tmp_path, dump_10k):
    rng = np.random.default_rng(12)
    offsets = sorted(rng.choice(len(dump_10k), N_CASES, replace=False).tolist())
    offsets[0] = len(dump_10k) // 2  # certainly inside a chunk's rows
    cases = []
    for offset in offsets:
        damaged = bytearray(dump_10k)
        damaged[offset] ^= int(rng.integers(1, 256))
        cases.append((offset, bytes(damaged)))
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: _restore_damaged(tmp_path, f"flip{c[0]}", c[1]), cases))
    for (offset, _), (case, proc) in zip(cases, results, strict=True):
        line = _check_failed_cleanly(case, proc)
        assert any(word in line for word in ("checksum mismatch", "magic", "version", "damaged", "trailer",
                                              "truncated", "unexpected bytes")), (offset, line)
    middle_line = results[0][1].stderr
    assert "chunk" in middle_line and "checksum mismatch at byte" in middle_line


def test_wrong_magic_and_newer_version(tmp_path, dump_10k):
    case, proc = _restore_damaged(tmp_path, "magic", b"NOTADUMP" + dump_10k[8:])
    assert "bad magic" in _check_failed_cleanly(case, proc)
    newer = dump_10k[:8] + struct.pack("<I", 2) + dump_10k[12:]
    case, proc = _restore_damaged(tmp_path, "version", newer)
    assert "version 2" in _check_failed_cleanly(case, proc)
    case, proc = _restore_damaged(tmp_path, "extra", dump_10k + b"\0")
    assert "unexpected bytes" in _check_failed_cleanly(case, proc)
    case, proc = _restore_damaged(tmp_path, "empty", b"")
    _check_failed_cleanly(case, proc)


def test_missing_inputs_and_paths_are_one_line_errors(tmp_path):
    missing = str(tmp_path / "nope")
    for args in (("info", missing), ("verify", missing), ("dump", missing, str(tmp_path / "x")),
                 ("compact", missing), ("restore", missing, str(tmp_path / "s")),
                 ("info", str(tmp_path)), ("verify", "--json", str(tmp_path))):
        proc = run_cli(*args)
        assert_one_line_error(proc)
        assert proc.returncode == 1, args
    assert os.listdir(tmp_path) == []

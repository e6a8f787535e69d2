"""Corruption: flipped bytes in chunk payloads and metadata, and a truncated data file.

Bytes are flipped in the real ``data.mdb`` file (found by searching for the stored
values), then the store is read by a separate process. The rule: a damaged store raises
``CorruptionError`` (or another ``EmbeddingStoreError`` with a clear message) or, if the
flip hit something that does not matter, returns exactly the undamaged table; it never
returns different IDs or numbers.
"""

from __future__ import annotations

import json
import os

import lmdb
import numpy as np
import pytest
import torture_lib as tl

import lmdb_embeddings as le
from lmdb_embeddings.format import chunks as chunk_codec

pytestmark = pytest.mark.torture

ROWS, DIM, CHUNK = 4096, 8, 256
XORS = (0x40,) if tl.SCALE == "ci" else (0x01, 0x40, 0x80, 0xFF)


@pytest.fixture
def sample_store(tmp_path):
    """Non-contiguous IDs, distinctive row values, one commit after create."""
    path = str(tmp_path / "store")
    values = np.arange(ROWS * DIM, dtype=np.float32).reshape(ROWS, DIM)
    with le.EmbeddingStore.create(path, np.arange(ROWS) * 3 + 5, DIM, init=values, chunk_rows=CHUNK) as store:
        store.put([5], values[:1] + 0.5)
    return path, values


def stored_value(path: str, db_name: bytes, key: bytes) -> bytes:
    env = lmdb.open(path, readonly=True, lock=False, max_dbs=64, subdir=True)
    try:
        db = env.open_db(db_name, create=False)
        with env.begin(db=db) as txn:
            return bytes(txn.get(key))
    finally:
        env.close()


def offset_in_file(path: str, needle: bytes) -> int:
    data = open(os.path.join(path, "data.mdb"), "rb").read()
    offset = data.find(needle)
    assert offset >= 0 and data.find(needle, offset + 1) < 0, "the stored bytes must occur exactly once"
    return offset


def all_offsets(path: str, needle: bytes) -> list[int]:
    """Every place ``needle`` occurs (LMDB keeps stale copies of rewritten pages as free pages)."""
    data = open(os.path.join(path, "data.mdb"), "rb").read()
    found, at = [], data.find(needle)
    while at >= 0:
        found.append(at)
        at = data.find(needle, at + 1)
    assert found, "the stored bytes are not in data.mdb"
    return found


def flip(path: str, offset: int, xor: int = 0x40) -> None:
    with open(os.path.join(path, "data.mdb"), "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ xor]))


def test_flipped_payload_byte_is_detected_by_get_and_verify(sample_store):
    path, values = sample_store
    chunk = 7
    payload = values[chunk * CHUNK : (chunk + 1) * CHUNK].tobytes()
    flip(path, offset_in_file(path, payload) + len(payload) // 2)
    ids_in_chunk = np.arange(chunk * CHUNK, (chunk + 1) * CHUNK) * 3 + 5
    for readonly in (True, False):
        with le.EmbeddingStore.open(path, readonly=readonly) as store:
            with pytest.raises(le.CorruptionError, match=f"chunk {chunk}\\b"):
                store.get(ids_in_chunk[:3])
            other = np.arange(8 * CHUNK, 9 * CHUNK)
            assert np.array_equal(store.get(other * 3 + 5), values[other]), "undamaged chunks must still read"
    proc = tl.cli("verify", "--quiet", path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"chunk {chunk}" in proc.stdout + proc.stderr
    tl.record("corruption: payload flip", fuzz_cases=1, clean_errors=1)


def test_flipped_metadata_bytes_never_return_wrong_rows(sample_store):
    """Every byte of the format/config/state records and of one ID chunk, flipped one at a time."""
    path, _ = sample_store
    offsets = []
    for key in (b"format", b"config", b"state"):
        raw = stored_value(path, b"meta", key)
        for start in all_offsets(path, raw):
            offsets += range(start, start + len(raw))
    ids_value = stored_value(path, b"ids", chunk_codec.chunk_key(3))
    for start in all_offsets(path, ids_value):
        offsets += range(start, start + len(ids_value), 3 if tl.SCALE == "long" else 97)
    outcomes: dict[str, int] = {}
    wrong, crashed = [], 0
    for xor in XORS:
        proc = tl.run_child("flips", path, json.dumps(offsets), "--xor", str(xor), timeout=600)
        crashed += proc.returncode != 0
        assert proc.returncode == 0, f"the reader crashed on a damaged store: {proc.stderr[-2000:]}"
        for line in proc.stdout.splitlines():
            case = json.loads(line)
            outcomes[case["outcome"]] = outcomes.get(case["outcome"], 0) + 1
            if case["outcome"] == "wrong":
                wrong.append((case["offset"], xor))
    cases = sum(outcomes.values())
    tl.record("corruption: metadata byte flips", fuzz_cases=cases, clean_errors=outcomes.get("error", 0),
              harmless=outcomes.get("ok", 0), wrong_results=len(wrong), crashes=crashed)
    assert cases == len(offsets) * len(XORS)
    assert not wrong, f"{len(wrong)} flipped metadata bytes gave a store with different ids/rows: {wrong[:10]}"


def test_truncated_data_file_fails_to_open_with_a_clear_message(sample_store):
    path, _ = sample_store
    data = os.path.join(path, "data.mdb")
    size = le.store_info(path)["committed_bytes"]  # a writer's file is sized to its map (sparse) beyond this
    results = []
    for keep in (size // 2, 3 * size // 4, size - 4096):
        os.truncate(data, keep)
        proc = tl.run_child("table", path, timeout=120)
        results.append((keep, proc.returncode, proc.stdout.strip(), proc.stderr[-500:]))
    tl.record("corruption: truncated data file", fuzz_cases=len(results),
              clean_errors=sum(1 for r in results if r[1] == 0 and "error" in r[2]))
    for keep, rc, out, err in results:
        assert rc == 0, f"truncated to {keep} bytes: the opener crashed (exit {rc}): {err}"
        error = json.loads(out)["error"]
        assert "trunc" in error.lower(), f"truncated to {keep} bytes: unclear error {error!r}"

"""The CLI on sharded directories, without a process group (and without torch): info, verify and dump
of all shards; ``restore IN PATH --shards W`` reshards any dump bit-exact, to any world size and back."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from checkout import run_cli, run_python
from cli_helpers import assert_one_line_error, assert_same_store, make_rich_store, ok, read_store

import lmdb_embeddings as le
from lmdb_embeddings.distributed import owner_of
from lmdb_embeddings.sharding import table_sink
from lmdb_embeddings.sharding.manifest import read_manifest


@pytest.fixture
def plain(tmp_path):
    """A rich plain store (shuffled huge/negative IDs, awkward values, aux columns, attrs) and its dump."""
    path, dump = str(tmp_path / "plain"), str(tmp_path / "plain.lemb")
    original = make_rich_store(path, dtype="float32")
    ok("dump", path, dump)
    return original, dump, path


def _shard_ids(path: str) -> list[np.ndarray]:
    manifest = read_manifest(path)
    out = []
    for rank in range(manifest.world_size):
        with le.EmbeddingStore.open(manifest.shard_path(path, rank), readonly=True) as shard:
            out.append(shard.ids)
    return out


def test_restore_with_shards_puts_every_id_on_its_owner(tmp_path, plain):
    original, dump, _ = plain
    sharded = str(tmp_path / "s3")
    proc = ok("restore", dump, sharded, "--shards", "3")
    assert "sharded for 3 ranks" in proc.stdout
    parts = _shard_ids(sharded)
    for rank, ids in enumerate(parts):
        assert len(ids) and (owner_of(ids, 3) == rank).all()
    assert sorted(np.concatenate(parts).tolist()) == sorted(original["ids"].tolist())
    assert read_manifest(sharded).world_size == 3


@pytest.mark.parametrize("fmt", ["native", "npy"])
def test_a_sharded_dump_restores_bit_exact_into_any_world_size_and_back(tmp_path, plain, fmt):
    original, dump, source = plain
    s3, s2 = str(tmp_path / "s3"), str(tmp_path / "s2")
    d3, d2, back = str(tmp_path / "d3"), str(tmp_path / "d2"), str(tmp_path / "back")
    fmt_args = ["--format", fmt]
    ok("restore", dump, s3, "--shards", "3")
    ok("dump", s3, d3, *fmt_args)
    ok("restore", d3, s2, "--shards", "2")  # 3 ranks -> 2 ranks
    ok("dump", s2, d2, *fmt_args)
    ok("restore", d2, back)  # -> a plain store
    assert_same_store(original, read_store(back))  # row order, rows, aux columns, attrs: bit for bit
    if fmt == "npy":
        plain_npy = str(tmp_path / "plain-npy")
        ok("dump", source, plain_npy, "--format", "npy")
        for name in ("ids.npy", "embeddings.npy"):
            assert np.array_equal(np.load(os.path.join(plain_npy, name)), np.load(os.path.join(d2, name)))


def test_info_and_verify_describe_all_shards(tmp_path, plain):
    original, dump, _ = plain
    sharded = str(tmp_path / "s2")
    ok("restore", dump, sharded, "--shards", "2")
    info = json.loads(ok("info", sharded, "--json").stdout)
    assert info["rows"] == len(original["ids"]) and info["sharded"]["world_size"] == 2
    assert sum(s["rows"] for s in info["sharded"]["shards"]) == info["rows"]
    assert set(info["columns"]) == {"adam_m", "steps"}  # the shard-internal dist.row column is not shown
    assert "shards:          2" in ok("info", sharded).stdout
    report = json.loads(ok("verify", sharded, "--json").stdout)
    assert report["ok"] and report["sharded"] and report["chunks_checked"] >= 15
    assert ok("verify", sharded).stdout.startswith("OK:")


def test_verify_fails_on_a_damaged_manifest_or_a_missing_shard(tmp_path, plain):
    _, dump, _ = plain
    sharded = str(tmp_path / "s2")
    ok("restore", dump, sharded, "--shards", "2")
    manifest_file = os.path.join(sharded, "manifest.json")
    text = open(manifest_file).read()
    with open(manifest_file, "w") as f:
        f.write(text.replace('"rows": ', '"rows": 1'))
    proc = run_cli("verify", sharded)
    assert proc.returncode == 1 and "manifest" in proc.stdout and "checksum" in proc.stdout
    with open(manifest_file, "w") as f:
        f.write(text)
    os.rename(read_manifest(sharded).shard_path(sharded, 1), os.path.join(tmp_path, "moved"))
    proc = run_cli("verify", sharded)
    assert proc.returncode == 1 and "shard 1" in proc.stdout


def test_restore_refuses_an_existing_store_without_force_and_replaces_it_with(tmp_path, plain):
    original, dump, _ = plain
    sharded = str(tmp_path / "s2")
    ok("restore", dump, sharded, "--shards", "2")
    assert_one_line_error(run_cli("restore", dump, sharded, "--shards", "3"), "--force")
    ok("restore", dump, sharded, "--shards", "3", "--force")
    assert read_manifest(sharded).world_size == 3 and len(os.listdir(sharded)) == 4  # old shards are gone
    bad = str(tmp_path / "bad.lemb")
    with open(dump, "rb") as f:
        data = f.read()
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated: fails, nothing left behind
    target = str(tmp_path / "never")
    proc = run_cli("restore", bad, target, "--shards", "2")
    assert proc.returncode != 0 and not os.path.exists(target)
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".never")]


def test_the_cli_reads_sharded_directories_without_torch(tmp_path, plain):
    _, dump, _ = plain
    sharded = str(tmp_path / "s2")
    ok("restore", dump, sharded, "--shards", "2")
    run_python("import sys\nfrom lmdb_embeddings import cli\n"
               "for args in (['info', sys.argv[1]], ['verify', sys.argv[1]], ['dump', sys.argv[1], sys.argv[2]]):\n"
               "    assert cli.main(['--quiet', *args]) == 0\n"
               "assert 'torch' not in sys.modules, 'torch was imported'\n", sharded, str(tmp_path / "out.lemb"))


def test_restore_with_shards_streams_into_the_shards_without_an_intermediate_store(tmp_path, plain, monkeypatch):
    """While the dump streams in, the staging directory holds the W shard builders and the IDs file, nothing
    else (no plain copy of the table); the IDs file is gone once the shards are finished."""
    original, dump, _ = plain
    seen = {}
    real_finish = table_sink.ShardedTableSink.finish

    def finish(sink):
        seen["during"] = sorted(os.listdir(sink.directory))
        seen["ids_bytes"] = os.path.getsize(os.path.join(sink.directory, table_sink.IDS_FILE))
        real_finish(sink)
        seen["after"] = sorted(os.listdir(sink.directory))

    monkeypatch.setattr(table_sink.ShardedTableSink, "finish", finish)
    target = str(tmp_path / "s2")
    le.restore_store(dump, target, shards=2)
    manifest = read_manifest(target)
    assert seen["during"] == sorted([table_sink.IDS_FILE, *manifest.shards])
    assert seen["ids_bytes"] == 8 * len(original["ids"])
    assert seen["after"] == sorted(["manifest.json", *manifest.shards])
    assert sorted(os.listdir(target)) == seen["after"]
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".s2.")]  # no staging leftovers


def test_the_sharded_classes_are_exported_lazily_from_the_package():
    proc = run_python("import sys, lmdb_embeddings as le\n"
                      "assert 'torch' not in sys.modules\n"
                      "from lmdb_embeddings.distributed import ShardedEmbeddingStore, ShardedSampler\n"
                      "assert le.ShardedEmbeddingStore is ShardedEmbeddingStore\n"
                      "assert le.ShardedSampler is ShardedSampler\n"
                      "print('ok')")
    assert proc.stdout.strip() == "ok"

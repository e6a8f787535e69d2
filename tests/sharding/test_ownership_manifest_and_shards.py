"""The torch-free parts of the sharded store: the ownership hash, the initial rows of any global
position, the manifest (the decision record), and a shard's prepare / revert_to."""

from __future__ import annotations

import json
import os
import pickle
import threading

import numpy as np
import pytest
from checkout import rows_like, run_python

import lmdb_embeddings as le
from lmdb_embeddings.distributed import owner_of
from lmdb_embeddings.distributed.shard import Shard, global_commit_of
from lmdb_embeddings.format.init import init_spec
from lmdb_embeddings.sharding.creation import initial_rows
from lmdb_embeddings.sharding.manifest import Manifest, read_manifest, write_manifest
from lmdb_embeddings.sharding.ownership import DEFAULT_BUCKETS, bucket_of, splitmix64


# ------------------------------------------------------------------------------ ownership
def test_the_hash_is_splitmix64_of_the_id():
    # the first outputs of SplitMix64 seeded with 0 and 1 (Steele, Lea & Flood; java.util.SplittableRandom)
    assert splitmix64(np.array([0, 1])).tolist() == [0xE220A8397B1DCDAF, 0x910A2DEC89025CC1]
    ids = np.array([-1, 2**63 - 1, -(2**63)])
    assert bucket_of(ids).tolist() == (splitmix64(ids) % np.uint64(DEFAULT_BUCKETS)).astype(np.int64).tolist()


@pytest.mark.parametrize("world", [2, 3, 4, 7])
@pytest.mark.parametrize("kind", ["sequential", "strided", "negative", "random"])
def test_owner_of_balances_any_id_set(world, kind):
    n = 60_000
    ids = {"sequential": np.arange(n), "strided": np.arange(n) * 1024, "negative": -np.arange(n) * 7 - 1,
           "random": np.random.default_rng(3).integers(-(2**62), 2**62, n)}[kind]
    counts = np.bincount(owner_of(ids, world), minlength=world)
    assert counts.sum() == n and (np.abs(counts - n / world) < 0.05 * n / world).all(), counts


def test_owner_depends_on_the_id_only_and_buckets_map_to_contiguous_ranks():
    ids = np.random.default_rng(1).integers(-(10**12), 10**12, 5000)
    perm = np.random.default_rng(2).permutation(len(ids))
    assert np.array_equal(owner_of(ids[perm], 4), owner_of(ids, 4)[perm])
    assert np.array_equal(owner_of(ids, 4), bucket_of(ids) * 4 // DEFAULT_BUCKETS)
    order = np.argsort(bucket_of(ids))
    assert (np.diff(owner_of(ids, 4)[order]) >= 0).all()  # rank r owns one contiguous range of buckets
    assert owner_of(7, 1).tolist() == [0] and owner_of([], 3).shape == (0,)
    with pytest.raises(ValueError):
        owner_of(ids, 0)
    with pytest.raises(TypeError):
        owner_of(["x"], 2)


def test_importing_the_package_and_the_cli_side_does_not_import_torch():
    run_python("import sys\nimport lmdb_embeddings.distributed as d\n"
               "from lmdb_embeddings.distributed import owner_of\n"
               "from lmdb_embeddings.sharding import manifest, snapshot, table_sink\n"
               "owner_of([1, 2], 2)\nassert 'torch' not in sys.modules")


# --------------------------------------------------------------------------- initial rows
@pytest.mark.parametrize("init", ["normal", "uniform", "xavier", "zeros"])
def test_initial_rows_of_any_positions_equal_a_single_store(store_path, init):
    ids = np.random.default_rng(4).permutation(np.arange(-500, 500))
    with le.EmbeddingStore.create(store_path, ids, 6, chunk_rows=64, init=init, seed=9) as store:
        store.add(np.arange(5000, 5100))  # defaults of add continue the same sequence
        positions = np.random.default_rng(5).permutation(1100)[:300]
        expected = store.get(store.ids[positions])
    spec = init_spec(init, 1000, 6)  # what create records for 1000 rows
    assert np.array_equal(initial_rows(spec, 9, 64, 6, np.dtype("float32"), positions), expected)
    assert initial_rows(spec, 9, 64, 6, np.dtype("float32"), []).shape == (0, 6)


# ------------------------------------------------------------------------------- manifest
def _manifest(**changes) -> Manifest:
    fields = dict(commit=3, world_size=2, buckets=DEFAULT_BUCKETS, token="0123abcd", dim=4, dtype="float32",
                  chunk_rows=16, init={"kind": "zeros"}, seed=0, rows=10,
                  shards=["shard-00000-0123abcd", "shard-00001-0123abcd"])
    return Manifest(**{**fields, **changes})


def test_the_manifest_round_trips_and_is_replaced_atomically(tmp_path):
    root = str(tmp_path)
    write_manifest(root, _manifest())
    write_manifest(root, _manifest(commit=4))
    got = read_manifest(root)
    assert got.commit == 4 and got.shards == _manifest().shards and got.committed_at is not None
    assert os.listdir(root) == ["manifest.json"]  # no temporary left behind


def test_a_damaged_newer_or_missing_manifest_is_refused_clearly(tmp_path):
    root = str(tmp_path / "s")
    with pytest.raises(FileNotFoundError):
        read_manifest(root)
    os.makedirs(root)
    with pytest.raises(FileNotFoundError):
        read_manifest(root)
    write_manifest(root, _manifest())
    path = os.path.join(root, "manifest.json")
    record = json.loads(open(path).read())
    with open(path, "w") as f:
        json.dump({**record, "commit": 99}, f)
    with pytest.raises(le.CorruptionError, match="checksum"):
        read_manifest(root)
    with open(path, "w") as f:
        json.dump({**record, "version": 99}, f)
    with pytest.raises(le.FormatVersionError):
        read_manifest(root)
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(le.CorruptionError):
        read_manifest(root)
    plain = str(tmp_path / "plain")
    le.EmbeddingStore.create(plain, 3, 2).close()
    with pytest.raises(le.NotAStoreError, match="plain EmbeddingStore"):
        read_manifest(plain)


# ----------------------------------------------------------------------------- one shard
def test_a_prepared_shard_commit_can_be_reverted_and_only_that_one(store_path):
    with le.EmbeddingStore.create(store_path, 300, 4, chunk_rows=32) as store:
        store.set_attr("dist.commit", 0)
    shard = Shard(store_path, readonly=False, options=le.StoreOptions(cache_mb=8))
    before = shard.store.get(np.arange(300))
    with shard.writing() as store:
        store.put(np.arange(0, 300, 3), rows_like(100, 4, 1.0))
        store.add(np.arange(1000, 1040))
    shard.prepare(1)
    assert shard.global_commit == 1
    shard.revert_to(1)  # already there: nothing to undo
    shard.revert_to(0)
    assert shard.global_commit == 0 and len(shard.store) == 300
    assert np.array_equal(shard.store.get(np.arange(300)), before)
    shard.prepare(1)
    with shard.writing() as store:
        store.put([1], rows_like(1, 4, 2.0))
    shard.prepare(2)
    with pytest.raises(le.CorruptionError, match="only a prepared commit"):
        shard.revert_to(0)  # two commits back: the undo log covers one
    shard.close()


def test_the_shard_handle_given_out_as_store_local_reads_but_refuses_writes(store_path):
    """``store.local`` is the writable shard itself: a write or commit on it alone would not be a global commit."""
    with le.EmbeddingStore.create(store_path, 50, 4, chunk_rows=16) as store:
        store.set_attr("dist.commit", 0)
    shard = Shard(store_path, readonly=False, options=le.StoreOptions())
    local = shard.store
    assert isinstance(local, le.EmbeddingStore) and local.get([3]).shape == (1, 4) and len(local) == 50
    refused = {"put": lambda: local.put([1], rows_like(1, 4, 1.0)), "add": lambda: local.add([99]),
               "commit": local.commit, "rollback": local.rollback, "set_attr": lambda: local.set_attr("a", 1),
               "ensure_column": lambda: local.ensure_column("m", 2), "close": local.close}
    for name, call in refused.items():
        with pytest.raises(PermissionError, match="sharded store") as info:
            call()
        assert isinstance(info.value, le.ReadOnlyError), name
    copy = pickle.loads(pickle.dumps(local))  # what a DataLoader worker gets: a plain read-only store
    assert type(copy) is le.EmbeddingStore and copy.readonly
    with shard.writing() as store:  # the sharded store's own way in
        store.put([1], rows_like(1, 4, 5.0))
    shard.prepare(1)
    np.testing.assert_array_equal(copy.get([1]), rows_like(1, 4, 5.0))
    copy.close()
    shard.close()
    with le.EmbeddingStore.open(store_path, readonly=True) as reader:
        assert global_commit_of(reader) == 1


@pytest.mark.parametrize("call", ["put", "close"])
def test_another_thread_cannot_write_through_store_local_while_the_sharded_store_writes(store_path, call):
    """The write gate of ``store.local`` is read and toggled under the handle's mutex: a thread calling
    ``store.local.put`` (or ``close``) while the sharded store's own thread is inside ``Shard.writing()`` is
    refused once that block ends; it never slips through the open gate."""
    with le.EmbeddingStore.create(store_path, 50, 4, chunk_rows=16) as store:
        store.set_attr("dist.commit", 0)
    shard = Shard(store_path, readonly=False, options=le.StoreOptions())
    local, outcome, done = shard.store, [], threading.Event()
    calls = {"put": lambda: local.put([1], rows_like(1, 4, 7.0)), "close": local.close}

    def other_thread():
        try:
            calls[call]()
            outcome.append("went through")
        except le.ReadOnlyError:
            outcome.append("refused")
        done.set()

    with shard.writing():
        thread = threading.Thread(target=other_thread)
        thread.start()
        done.wait(2.0)  # the gate is open in this block: a call that is not refused finishes in it
    thread.join(30)
    assert outcome == ["refused"]
    assert not np.array_equal(shard.store.get([1]), rows_like(1, 4, 7.0))
    shard.close()


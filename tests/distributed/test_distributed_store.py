"""ShardedEmbeddingStore on 2 and 4 real gloo ranks (subprocesses): what only a sharded store promises (lookups
and create equal a single store's for any world size, collective errors, visibility of other ranks' calls,
recovery, failed commits, world-size mismatch, the sampler). The store contract itself (reads, writes, commits,
rollback, read-only handles, commit_every, closing) runs on it in tests/testing/test_contracts.py.

Each world size runs ONE multi-rank scenario (tests/_support/dist_scenarios.py ``sharded``) that checks the
sharded store against single stores and reports; the tests below assert on every rank's report.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

import numpy as np
import pytest
from cli_helpers import ok, read_store

import lmdb_embeddings as le
import lmdb_embeddings.errors as errors
from lmdb_embeddings.distributed.collective import ERROR_CLASSES, class_of, error_code

KEY, VALUE, TYPE = "KeyError", "ValueError", "TypeError"
EXPECTED = {"get_unknown": KEY, "get_bad_type": TYPE, "put_unknown": KEY, "put_shape": VALUE, "put_nan": VALUE,
            "put_twice_in_call": VALUE, "put_by_two_ranks": VALUE, "add_existing": VALUE, "add_by_two_ranks": VALUE,
            "add_nan": VALUE, "add_shape": VALUE, "put_column_unknown": VALUE, "set_attr_not_msgpack": VALUE,
            "ensure_column_bad_width": VALUE}


def _error_classes_defined_anywhere_in_the_package() -> set[type]:
    for module in pkgutil.walk_packages(le.__path__, "lmdb_embeddings."):
        if not module.name.endswith("__main__"):  # that one runs the CLI
            importlib.import_module(module.name)
    found, stack = set(), [errors.EmbeddingStoreError]
    while stack:
        cls = stack.pop()
        if cls.__module__.startswith("lmdb_embeddings") and cls not in found:
            found.add(cls)
            stack.extend(cls.__subclasses__())
    return found


def test_every_error_class_of_the_package_travels_between_ranks_as_itself():
    ours = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.EmbeddingStoreError)}
    assert set(ERROR_CLASSES) == ours and len(ours) > 10
    elsewhere = sorted(c.__qualname__ for c in _error_classes_defined_anywhere_in_the_package() - ours)
    assert not elsewhere, f"error classes that would cross ranks as their base class: {elsewhere}"
    for cls in ours:
        assert class_of(error_code(cls("a message"))) is cls
    assert class_of(error_code(RuntimeError("not ours"))) is errors.EmbeddingStoreError
    assert error_code(None) == 0


@pytest.fixture
def run(dist_suite):
    """(world, every rank's report of what only a sharded store promises, workdir) of the session's launch."""
    world, results, workdir = dist_suite
    return world, [r["sharded"] for r in results], workdir


def test_lookups_of_local_and_remote_ids_equal_a_single_store(run):
    world, results, _ = run
    for r in results:
        assert r["lookup_equal"] and r["tensor_equal"]
        assert r["owners_asked"] == world  # the IDs asked for live on every rank: remote rows were fetched


def test_create_gives_every_id_the_single_store_row_for_every_init(run):
    world, results, _ = run
    for r in results:
        assert r["init_equal"] == {"uniform": True, "xavier": True, "array": True}
        assert r["local_ids_ok"] and r["len"] == 700
    shares = [r["local_len"] for r in results]
    assert sum(shares) == 700 and min(shares) > 700 / world * 0.7  # owner_of balances the IDs


def test_every_rank_sees_uncommitted_puts_and_adds_of_earlier_calls(run):
    _, results, _ = run
    for r in results:
        assert r["uncommitted_visible"] and r["len_after_add"][0] == r["len_after_add"][1]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_an_invalid_call_on_one_rank_raises_the_same_class_on_every_rank(run, case):
    world, results, _ = run
    outcomes = {r["errors"][case]["outcome"] for r in results}
    assert len(outcomes) == 1, outcomes  # the same class everywhere
    (outcome,) = outcomes
    assert EXPECTED[case] in outcome.split("|") and outcome.endswith("ESE")  # the builtin and EmbeddingStoreError
    assert sum(r["errors"][case]["bad"] for r in results) == 1


def test_a_failed_collective_call_changes_nothing_on_any_rank(run):
    _, results, _ = run
    assert all(r["unchanged_after_errors"] for r in results)


def test_commit_and_reopen_keep_every_rank_s_changes(run):
    _, results, _ = run
    for r in results:
        assert r["commit_count"] == 1 and r["reopened_equal"]


def test_an_undecided_prepared_commit_is_undone_at_open(run):
    _, results, _ = run
    assert results[0]["prepared_then_recovered"] == [2, 1]  # rank 0 had prepared commit 2; reopened at 1
    assert all(r["recovered"] for r in results)


def test_a_commit_that_fails_anywhere_fails_everywhere_and_leaves_every_shard_at_the_old_commit(run):
    _, results, _ = run
    # a failed manifest sync reaches every rank as itself (a CommitError whose commit is decided), since
    # errors.py holds every error class; it used to arrive as its base class
    assert issubclass(errors.ManifestSyncError, errors.CommitError)
    expected = {"prepare_fails": "CommitError|ESE", "manifest_fails": "CommitError|ESE",
                "manifest_sync_fails": "ManifestSyncError|ESE"}
    for case, name in expected.items():
        assert {r[case] for r in results} == {name}, case
    for r in results:
        assert r["after_failed_prepare"] == [True, 1, 1, True]  # rows, commit, each shard's commit, length
        assert r["after_failed_manifest"] == [True, 1, 1]
        assert r["commit_after_failures"]
        assert r["made_despite_sync_failure"]  # renamed into place = decided: kept, and reported


def test_a_second_writer_is_refused_on_every_rank(run):
    _, results, _ = run
    assert {r["second_writer"] for r in results} == {"WriterLockedError|ESE"}


def test_create_over_a_store_of_another_world_size_replaces_all_its_shards(run):
    _, results, _ = run
    listing = results[0]["replaced_shards"]
    assert listing[0] == "manifest.json" and len(listing) == 2 and listing[1].startswith("shard-00000-")


def test_opening_with_another_world_size_names_both_sizes(run):
    world, results, _ = run
    message = results[0]["other_world_size"]
    assert f"world size {world}" in message and "world size 1" in message and "--shards 1" in message


def test_sharded_sampler_gives_each_rank_its_own_ids_in_equal_batches(run):
    world, results, _ = run
    samplers = [r["sampler"] for r in results]
    assert len({s["len"] for s in samplers}) == 1 and all(s["batches"] == s["len"] for s in samplers)
    assert len({tuple(s["sizes"]) for s in samplers}) == 1  # the same batch sizes: collectives stay in step
    for s in samplers:
        assert s["only_owned"] and s["covers_owned"] and s["unshuffled_is_row_order"]
        assert s["same_without_set_epoch"] and s["reshuffled"] and s["reproducible"]
        assert np.all(np.array(s["sizes"][:-1]) == 16)


def test_sharded_sampler_prefetch_hints_each_next_batch_to_the_rank_shard(run):
    _, results, _ = run
    for r in results:
        assert r["sampler"]["prefetch"] == {"same_batches": True, "hints_next_batches": True}


def test_sharded_sampler_with_blocks_keeps_each_batch_within_two_windows_of_the_shard(run):
    _, results, _ = run
    for r in results:
        blocks = r["sampler"]["blocks"]
        assert blocks["len"] == r["sampler"]["len"] and blocks["covers_owned"] and blocks["reshuffled"]
        assert blocks["max_chunks_per_batch"] <= 4  # 2 windows x 2 blocks x 1 chunk (a full shuffle: up to 16)
        assert blocks["needs_shuffle"] == "InvalidInputError|ValueError|ESE"


def test_the_cli_dumps_a_store_sharded_by_real_ranks_in_single_store_row_order(run):
    _, _, workdir = run
    sharded, dump, plain = (os.path.join(workdir, name) for name in ("sharded", "dump.lemb", "plain"))
    assert ok("verify", sharded).stdout.startswith("OK:")
    ok("dump", sharded, dump)
    ok("restore", dump, plain)
    got, single = read_store(plain), read_store(os.path.join(workdir, "single-contract-0"))
    assert np.array_equal(got["ids"], single["ids"])  # create order, then the ranks' adds in rank order
    assert got["rows"].tobytes() == single["rows"].tobytes()


@pytest.mark.parametrize("dist_suite", [4], indirect=True, ids=["4ranks"])
def test_a_read_only_get_serves_one_decided_commit_while_a_writer_group_commits(dist_suite):
    """Ranks 0-1 commit round after round (their own process group); ranks 2-3 read rows of every owner."""
    _, results, _ = dist_suite
    readers = [r["two_groups"] for r in results[2:]]
    assert [r["group_rank"] for r in readers] == [0, 1]  # a store over a group that is not the default one
    for r in readers:
        assert r["mixed"] == 0 and r["wrong"] == 0, r
        assert r["commits_seen"] >= 2, r  # the reads did overlap the writers' commits
    assert all(r["two_groups"]["commits"] > 2 for r in results[:2])

"""The reusable contract suites of ``lmdb_embeddings.testing``, over several kinds of open options, and the store
contract on a sharded store at world size 1 and 2 (real gloo ranks, each running it with pytest in step)."""

from __future__ import annotations

import pytest
from dist_harness import launch

from lmdb_embeddings.testing import StoreContract, TableContract


class TestStoreTinyCache(StoreContract):
    """A cache of a few chunks: every multi-chunk call evicts, every rewrite spills."""

    open_options = {"cache_mb": 0.02}


class TestStoreDefaultOptions(StoreContract):
    open_options = {}


class TestStoreHugeCacheAllInL1(StoreContract):
    open_options = {"cache_mb": 2048, "l1_fraction": 1.0}


class TestStoreSmallL1LargeL2(StoreContract):
    """Chunks bounce between the tiers: L1 holds a few, L2 the rest."""

    open_options = {"l1_mb": 0.02, "l2_mb": 64}


class TestTables(TableContract):
    pass


# --------------------------------------------------------------------- on a sharded store
CONTRACT_TESTS = sorted(name for name in dir(StoreContract) if name.startswith("test_"))
SINGLE_PROCESS_ONLY = {"test_ids_in_row_order_and_membership"}  # what a sharded store offers per shard only


@pytest.fixture(scope="module", params=[1, 2], ids=lambda w: f"{w}ranks")
def sharded_contract(request, tmp_path_factory):
    """(world, every rank's outcomes) of ONE launch in which every rank runs tests/_support/dist_contract.py in step."""
    world = request.param
    results = launch("store_contract", world, str(tmp_path_factory.mktemp(f"contract{world}")), timeout=900)
    return world, results


@pytest.mark.parametrize("name", CONTRACT_TESTS)
def test_the_store_contract_holds_on_a_sharded_store_on_every_rank(sharded_contract, name):
    world, results = sharded_contract
    ran = [{node: outcome for node, outcome in r["outcomes"].items() if node.split("::")[-1].split("[")[0] == name}
           for r in results]
    assert ran[0] and all(set(r) == set(ran[0]) for r in ran), "every rank runs the same tests"
    for rank, outcomes in enumerate(ran):
        failed = {node: outcome for node, outcome in outcomes.items() if outcome not in ("passed", "skipped")}
        assert not failed, f"rank {rank} of {world}: {failed}"
        skipped = {node for node, outcome in outcomes.items() if outcome == "skipped"}
        # skipped: the handle kinds a sharded store cannot give, and what only a single process's handle offers
        expected = set(outcomes) if name in SINGLE_PROCESS_ONLY else {
            node for node in outcomes if "[unpickled]" in node or "[forked]" in node}
        assert skipped == expected, outcomes

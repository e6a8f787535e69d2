"""What each rank runs in the distributed tests (started by dist_worker.py, one process per rank).

Every scenario compares the sharded store with single ``EmbeddingStore``s that each rank
builds privately and feeds with ALL ranks' calls (every rank can compute every rank's
inputs: they are seeded by rank), and returns JSON for the test to assert on; checks that
need all ranks' answers (the same exception class everywhere) are asserted by the test.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

import lmdb_embeddings as le
from lmdb_embeddings.distributed import ShardedEmbeddingStore, ShardedSampler, owner_of
from lmdb_embeddings.fsutil import fsync_dir
from lmdb_embeddings.sharding import manifest as manifest_module
from lmdb_embeddings.sharding.manifest import read_manifest
from lmdb_embeddings.torch import SparseAdagrad, SparseAdam, SparseAdamW, SparseSGD, StoreEmbedding

HERE = os.path.dirname(os.path.abspath(__file__))
DIM, CR = 8, 32
GLOBAL_IDS = np.random.default_rng(7).choice(np.arange(-3000, 3000), 700, replace=False)
UNKNOWN = 999_999
OPTIMIZERS = {"SparseAdam": (SparseAdam, {"lr": 0.05}), "SparseAdagrad": (SparseAdagrad, {"lr": 0.1}),
              "SparseSGD": (SparseSGD, {"lr": 0.1}), "SparseAdamW": (SparseAdamW, {"lr": 0.05, "weight_decay": 0.1})}


def _single(workdir: str, rank: int, name: str, **kwargs) -> le.EmbeddingStore:
    """A plain store private to this rank, created like the sharded one."""
    return le.EmbeddingStore.create(os.path.join(workdir, f"single-{name}-{rank}"), GLOBAL_IDS, DIM,
                                    chunk_rows=CR, overwrite=True, cache_mb=8, **kwargs)


def _values(seed, n: int, shift: float = 0.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, DIM)) + shift).astype(np.float32)


def _fail_with(exc: Exception):
    def fail(*args, **kwargs):
        raise exc

    return fail


def _same(a, b) -> bool:
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _outcome(call) -> str:
    """The class of the exception ``call`` raised, with the builtins and library base it derives from."""
    try:
        call()
    except Exception as exc:
        bases = [b.__name__ for b in (KeyError, ValueError, TypeError, PermissionError) if isinstance(exc, b)]
        return "|".join([type(exc).__name__, *bases, "ESE" if isinstance(exc, le.EmbeddingStoreError) else "-"])
    return "no error"


def _puts_of(rank: int, world: int, shift: float):
    """The (ids, rows) rank ``rank`` puts: a slice of every owner's IDs, disjoint between ranks."""
    ids = GLOBAL_IDS[rank::world][:40]
    return ids, _values([rank, int(shift * 10)], len(ids), shift)


def _new_ids(rank: int, batch: int = 0) -> np.ndarray:
    return 10_000 + 1000 * batch + 100 * rank + np.arange(30)


# ------------------------------------------------------------------------- the store contract
def store_contract(rank: int, world: int, workdir: str) -> dict:
    """Every rank runs ``StoreContract`` on the sharded store (tests/_support/dist_contract.py) with pytest, in step:
    ``{"exit": pytest's exit code, "outcomes": {test id: "passed" | "skipped" | "failed in <when>: <report>"}}``."""
    outcomes: dict[str, str] = {}

    class Outcomes:
        @staticmethod
        def pytest_runtest_logreport(report) -> None:
            if report.failed:
                outcomes[report.nodeid] = f"failed in {report.when}: {report.longreprtext[-3000:]}"
            elif report.skipped or (report.when == "call" and report.nodeid not in outcomes):
                outcomes[report.nodeid] = report.outcome

    code = pytest.main([os.path.join(HERE, "dist_contract.py"), "-q", "-p", "no:cacheprovider",
                        f"--basetemp={os.path.join(workdir, f'pytest-rank{rank}')}"], plugins=[Outcomes()])
    return {"exit": int(code), "outcomes": outcomes}


# ------------------------------------------------------------------- what only a sharded store promises
def sharded(rank: int, world: int, workdir: str) -> dict:
    """What a sharded store promises beyond the store contract (StoreContract runs on it:
    tests/_support/dist_contract.py): the table equals a single store fed every rank's calls, for any world size;
    collective errors; the two-phase commit's failures and recovery; the rules of a collective open; the sampler.
    Each part reports to ``out``."""
    out: dict = {}
    path = os.path.join(workdir, "sharded")
    store = ShardedEmbeddingStore.create(path, GLOBAL_IDS, DIM, chunk_rows=CR, seed=3, cache_mb=8)
    single = _single(workdir, rank, "contract", seed=3)  # the test dumps the sharded store and compares with it
    _lookups_and_create(out, store, single, rank, world, workdir)
    _calls_of_every_rank(out, store, single, rank, world)
    store.commit()
    single.commit()
    out["commit_count"] = store.commit_count
    store.close()
    store = ShardedEmbeddingStore.open(path, cache_mb=8)
    out["reopened_equal"] = _same(store.get(single.ids), single.get(single.ids)) and store.commit_count == 1
    store = _undecided_commit_recovered(out, store, single, path, rank, world)
    _commits_that_fail(out, store, single, rank, world)
    rank0 = dist.new_group([0])  # (every rank of the default group makes every new group)
    _opening_rules(out, path, rank, rank0)
    single.close()
    out["sampler"] = _sampler_checks(store, rank, world)
    store.close()
    if rank == 0:  # a create over a store made for another world size replaces all of its shards
        ShardedEmbeddingStore.create(os.path.join(workdir, "other"), 10, DIM, overwrite=True, group=rank0).close()
        out["replaced_shards"] = sorted(os.listdir(os.path.join(workdir, "other")))
    dist.barrier()
    return out


def _lookups_and_create(out: dict, store, single, rank: int, world: int, workdir: str) -> None:
    """Lookups of local and remote IDs equal a single store's; create is independent of the world size."""
    ask = np.random.default_rng(100 + rank).choice(GLOBAL_IDS, 200)
    out["owners_asked"] = len(np.unique(owner_of(ask, world)))
    out["lookup_equal"] = _same(store.get(ask), single.get(ask))
    out["tensor_equal"] = _same(store.get_tensor(ask).numpy(), single.get(ask))
    out["local_ids_ok"] = _same(store.local.ids, GLOBAL_IDS[owner_of(GLOBAL_IDS, world) == rank])
    out["len"] = len(store)
    out["local_len"] = len(store.local)
    out["init_equal"] = {}
    array = _values(55, len(GLOBAL_IDS))
    for name, init in (("uniform", "uniform"), ("xavier", "xavier"), ("array", array)):
        other = ShardedEmbeddingStore.create(os.path.join(workdir, "other"), GLOBAL_IDS, DIM, chunk_rows=CR,
                                             init=init, seed=5, overwrite=True, cache_mb=8)
        ref = _single(workdir, rank, f"init-{name}", init=init, seed=5)
        out["init_equal"][name] = _same(other.get(GLOBAL_IDS), ref.get(GLOBAL_IDS))
        other.close()
        ref.close()


def _calls_of_every_rank(out: dict, store, single, rank: int, world: int) -> None:
    """Every rank sees every put/add of earlier collective calls (defaults of add included) before any commit;
    an invalid call on one rank raises the same class on every rank and changes nothing anywhere."""
    store.put(*_puts_of(rank, world, 1.0))
    for r in range(world):
        single.put(*_puts_of(r, world, 1.0))
    store.add(_new_ids(rank), _values([9, rank], 30) if rank == 0 else None)  # defaults on the other ranks
    for r in range(world):
        single.add(_new_ids(r), _values([9, r], 30) if r == 0 else None)
    all_ids = single.ids
    out["uncommitted_visible"] = _same(store.get(all_ids), single.get(all_ids))
    out["len_after_add"] = [len(store), len(single)]
    store.ensure_column("state", DIM, "float32")
    before = (store.columns, store.attrs)
    out["errors"] = _error_cases(store, rank, world)
    out["unchanged_after_errors"] = (_same(store.get(all_ids), single.get(all_ids)) and len(store) == len(single)
                                     and (store.columns, store.attrs) == before)


def _undecided_commit_recovered(out: dict, store, single, path: str, rank: int, world: int):
    """A prepared commit that was never decided (the decision rank died before the manifest): reopening undoes it.
    Returns the reopened store."""
    store.put(*_puts_of(rank, world, 5.0))
    if rank == 0:
        store._shard.prepare(store.commit_count + 1)  # phase 1 on rank 0 only, then everyone "crashes"
    prepared = store.local.attrs["dist.commit"]
    store._shard.rollback()
    store._shard.close()
    store._closed = True
    dist.barrier()
    store = ShardedEmbeddingStore.open(path, cache_mb=8)
    out["prepared_then_recovered"] = [prepared, store.local.attrs["dist.commit"]]
    out["recovered"] = _same(store.get(single.ids), single.get(single.ids)) and store.commit_count == 1
    return store


def _commits_that_fail(out: dict, store, single, rank: int, world: int) -> None:
    """A shard that cannot commit, a manifest that cannot be written: CommitError everywhere, every shard back at
    the old commit, the changes dropped on every rank; a manifest renamed into place whose directory cannot be
    synced: the commit is made, and every rank is told that its durability is in doubt."""
    all_ids = single.ids
    store.put(*_puts_of(rank, world, 6.0))
    if rank == world - 1:
        store._shard.prepare = _fail_with(le.CommitError("commit failed (disk full, simulated)"))
    out["prepare_fails"] = _outcome(store.commit)
    vars(store._shard).pop("prepare", None)  # back to Shard.prepare
    out["after_failed_prepare"] = [_same(store.get(all_ids), single.get(all_ids)), store.commit_count,
                                   store.local.attrs["dist.commit"], len(store) == len(single)]
    store.put(*_puts_of(rank, world, 6.0))
    if rank == 0:
        manifest_module.open = _fail_with(OSError(28, "No space left on device (simulated)"))
    out["manifest_fails"] = _outcome(store.commit)
    vars(manifest_module).pop("open", None)
    out["after_failed_manifest"] = [_same(store.get(all_ids), single.get(all_ids)), store.commit_count,
                                    store.local.attrs["dist.commit"]]
    store.put(*_puts_of(rank, world, 6.0))
    store.commit()
    for r in range(world):
        single.put(*_puts_of(r, world, 6.0))
    single.commit()
    out["commit_after_failures"] = _same(store.get(all_ids), single.get(all_ids)) and store.commit_count == 2
    store.put(*_puts_of(rank, world, 8.0))
    if rank == 0:
        manifest_module.fsync_dir = _fail_with(OSError(5, "Input/output error (simulated)"))
    out["manifest_sync_fails"] = _outcome(store.commit)
    manifest_module.fsync_dir = fsync_dir
    for r in range(world):
        single.put(*_puts_of(r, world, 8.0))
    single.commit()
    out["made_despite_sync_failure"] = _same(store.get(all_ids), single.get(all_ids)) and store.commit_count == 3


def _opening_rules(out: dict, path: str, rank: int, rank0) -> None:
    """A second writable open is refused on every rank; another world size (``rank0``, a group of rank 0 alone)
    is refused, naming both sizes."""
    out["second_writer"] = _outcome(lambda: ShardedEmbeddingStore.open(path))
    if rank == 0:
        try:
            ShardedEmbeddingStore.open(path, group=rank0)
            out["other_world_size"] = "opened"
        except le.EmbeddingStoreError as exc:
            out["other_world_size"] = str(exc)
    dist.barrier()


def _error_cases(store: ShardedEmbeddingStore, rank: int, world: int) -> dict:
    """Each case: rank ``bad`` makes the call invalid, every other rank passes a valid call that would change rows."""
    existing = GLOBAL_IDS[rank::world][:10]
    vals = _values([rank, 77], len(existing), 9.0)
    neighbour = GLOBAL_IDS[((rank + 1) % world)::world][:10]

    def cases(bad: bool):
        nan = vals.copy()
        nan[1, 2] = np.nan
        return {
            "get_unknown": lambda: store.get(np.append(existing, UNKNOWN) if bad else existing),
            "get_bad_type": lambda: store.get(["a", "b"] if bad else existing),
            "put_unknown": lambda: store.put(np.append(existing[:-1], UNKNOWN) if bad else existing, vals),
            "put_shape": lambda: store.put(existing, vals[:, :-1] if bad else vals),
            "put_nan": lambda: store.put(existing, nan if bad else vals),
            "put_twice_in_call": lambda: store.put(np.append(existing[:-1], existing[0]) if bad else existing, vals),
            "put_by_two_ranks": lambda: store.put(np.append(existing[:-1], neighbour[0]) if bad else existing, vals),
            "add_existing": lambda: store.add(np.append(_new_ids(rank, 5)[:-1], existing[0]) if bad
                                              else _new_ids(rank, 5)),
            "add_by_two_ranks": lambda: store.add(np.append(_new_ids(rank, 6)[:-1], _new_ids((rank + 1) % world, 6)[0])
                                                  if bad else _new_ids(rank, 6)),
            "add_nan": lambda: store.add(_new_ids(rank, 7)[:10], nan if bad else vals),
            "add_shape": lambda: store.add(_new_ids(rank, 8)[:10], vals[:5] if bad else vals),
            "put_column_unknown": lambda: store.put_column("nope" if bad else "state", existing, vals),
            "set_attr_not_msgpack": lambda: store.set_attr("note", object() if bad else "fine"),
            "ensure_column_bad_width": lambda: store.ensure_column("extra", 0 if bad else 2),
        }

    results = {}
    for i, name in enumerate(cases(False)):
        bad = rank == i % world
        results[name] = {"bad": bad, "outcome": _outcome(cases(bad)[name])}
    return results


def _sampler_checks(store: ShardedEmbeddingStore, rank: int, world: int) -> dict:
    owned = set(GLOBAL_IDS[owner_of(GLOBAL_IDS, world) == rank].tolist()) | {
        int(x) for r in range(world) for x in _new_ids(r) if owner_of([x], world)[0] == rank}
    sampler = ShardedSampler(store, 16, seed=4)
    first = list(sampler)
    again = list(sampler)
    sampler.set_epoch(1)
    other = list(sampler)
    sampler.set_epoch(0)
    replay = list(sampler)
    flat = [x for batch in first for x in batch]
    plain = list(ShardedSampler(store, 16, shuffle=False))
    blocks = ShardedSampler(store, 16, seed=4, block_chunks=1, window_blocks=2)
    block_flat = [x for batch in blocks for x in batch]
    slot = {x: s for s, x in enumerate(store.local.ids.tolist())}  # the shard's row slots
    chunks = [slot[x] // store.local.chunk_rows for x in block_flat[: len(owned)]]
    blocks.set_epoch(1)
    hinted: list = []  # what prefetch=2 hints: each later batch's IDs once, none of the batches change
    local = store.local
    local_prefetch, local.prefetch = local.prefetch, hinted.append
    try:
        with_hints = list(ShardedSampler(store, 16, seed=4, prefetch=2))
    finally:
        local.prefetch = local_prefetch
    return {"prefetch": {"same_batches": with_hints == first,
                         "hints_next_batches": [list(h) for h in hinted] == [list(b) for b in first[1:]]},
            "blocks": {"len": len(blocks), "covers_owned": set(block_flat) == owned,
                       # windows of 2 one-chunk blocks: a batch of 16 <= a window's rows spans <= 2 windows
                       "max_chunks_per_batch": max(len(set(chunks[i : i + 16])) for i in range(0, len(chunks), 16)),
                       "reshuffled": sum(blocks, []) != block_flat,
                       "needs_shuffle": _outcome(lambda: ShardedSampler(store, 16, shuffle=False, block_chunks=1))},
            "len": len(sampler), "batches": len(first), "sizes": [len(b) for b in first],
            "only_owned": set(flat) <= owned, "covers_owned": set(flat) == owned,
            "same_without_set_epoch": first == again,
            "reshuffled": other != first and set(sum(other, [])) == set(flat),
            "reproducible": replay == first,
            "unshuffled_is_row_order": sum(plain, [])[: len(owned)] == store.local.ids.tolist()}


# ------------------------------------------------------------------------------ training
def training(rank: int, world: int, workdir: str, optimizers: list) -> dict:
    """Each optimizer on a sharded store vs a single store that sees all ranks' batches, losses summed."""
    out = {}
    target = torch.linspace(-1.0, 1.0, DIM)
    for name in optimizers:
        cls, kwargs = OPTIMIZERS[name]
        store = ShardedEmbeddingStore.create(os.path.join(workdir, f"train-{name}"), GLOBAL_IDS, DIM, chunk_rows=CR,
                                             seed=11, cache_mb=8)
        single = _single(workdir, rank, f"train-{name}", seed=11)
        initial = single.get(GLOBAL_IDS)
        emb, single_emb = StoreEmbedding(store), StoreEmbedding(single)
        opt, single_opt = cls(emb, **kwargs), cls(single_emb, **kwargs)
        for step in range(4):
            batches = [_batch(r, step, world) for r in range(world)]
            if step < 3:  # step 3: nobody looked anything up; the step changes nothing anywhere
                ((emb(torch.tensor(batches[rank], dtype=torch.int64)) - target) ** 2).sum().backward()
                sum(((single_emb(torch.tensor(b, dtype=torch.int64)) - target) ** 2).sum() for b in batches).backward()
            opt.step()
            single_opt.step()
            opt.zero_grad()
            single_opt.zero_grad()
        result = _compare_tables(store, single, opt, initial)
        result["step_count"] = [opt.step_count, single_opt.step_count]
        result["remote_lookups"] = int((owner_of(_batch(rank, 0, world), world) != rank).sum())

        # a NaN gradient on one rank: the step fails on every rank and writes nothing anywhere
        before = store.get(GLOBAL_IDS)
        loss = ((emb(torch.tensor(batches[rank], dtype=torch.int64)) - target) ** 2).sum()
        (loss * (float("nan") if rank == world - 1 else 1.0)).backward()
        result["nan_step"] = _outcome(opt.step)
        result["nan_step_wrote_nothing"] = _same(store.get(GLOBAL_IDS), before)

        store.commit()
        single.commit()
        store.close()
        store = ShardedEmbeddingStore.open(os.path.join(workdir, f"train-{name}"), cache_mb=8)
        emb = StoreEmbedding(store)
        opt = cls(emb, **kwargs)
        batches = [_batch(r, 10, world) for r in range(world)]
        ((emb(torch.tensor(batches[rank], dtype=torch.int64)) - target) ** 2).sum().backward()
        sum(((single_emb(torch.tensor(b, dtype=torch.int64)) - target) ** 2).sum() for b in batches).backward()
        opt.step()
        single_opt.step()
        result["resumed"] = _compare_tables(store, single, opt, initial)
        store.close()
        single.close()
        out[name] = result
    return out


def _batch(rank: int, step: int, world: int) -> list[int]:
    """Lookups of one rank at one step: shared IDs (so ranks overlap), duplicates, some steps empty on one rank."""
    if step == 1 and rank == world - 1:
        return []
    return np.random.default_rng([rank, step]).choice(GLOBAL_IDS[:60], 24).tolist()


def _compare_tables(store, single, opt, initial: np.ndarray) -> dict:
    rows = np.allclose(store.get(GLOBAL_IDS), single.get(GLOBAL_IDS), rtol=1e-5, atol=1e-7)
    state = all(np.allclose(store.get_column(c, GLOBAL_IDS), single.get_column(c, GLOBAL_IDS), rtol=1e-5, atol=1e-7)
                for c in opt.state_columns.values())
    diff = float(np.abs(store.get(GLOBAL_IDS) - single.get(GLOBAL_IDS)).max())
    changed = not np.allclose(single.get(GLOBAL_IDS), initial)
    return {"rows_close": bool(rows), "state_close": bool(state), "max_abs_diff": diff, "trained": bool(changed),
            "attrs_equal": store.attrs == single.attrs}


def habits(rank: int, world: int, workdir: str) -> dict:
    """nn.Embedding's habits on a sharded store: zero_grad through a parent, padding_idx, freezing,
    checkpoints of the module and the optimizer; what cannot work there is refused on every rank."""
    target = torch.linspace(-1.0, 1.0, DIM)
    padding = int(GLOBAL_IDS[0])
    store = ShardedEmbeddingStore.create(os.path.join(workdir, "habits"), GLOBAL_IDS, DIM, chunk_rows=CR, seed=5,
                                         cache_mb=8)
    single = _single(workdir, rank, "habits", seed=5)
    initial = single.get(GLOBAL_IDS)
    initial_padding = single.get([padding])
    models = [torch.nn.Sequential(StoreEmbedding(s, padding_idx=padding)) for s in (store, single)]
    opts = [SparseAdam(m[0], lr=0.05) for m in models]
    batches = [[padding, *_batch(r, 20, world)] for r in range(world)]

    def loss(model, ids) -> torch.Tensor:
        return ((model(torch.tensor(ids, dtype=torch.int64)) - target) ** 2).sum()

    for model, opt, mine in ((models[0], opts[0], [batches[rank]]), (models[1], opts[1], batches)):
        sum(loss(model, b) for b in mine).backward()
        model.zero_grad()  # through the parent: this backward is dropped
        sum(loss(model, b) for b in mine).backward()
        opt.step()
    out = _compare_tables(store, single, opts[0], initial)
    out["padding_unchanged"] = _same(store.get([padding]), initial_padding) and _same(single.get([padding]),
                                                                                     initial_padding)
    models[0].requires_grad_(False)
    out["frozen_output_requires_grad"] = bool(models[0](torch.tensor(batches[rank])).requires_grad)
    state = models[0].state_dict()
    out["state_uuid_is_the_token"] = state["0._extra_state"]["uuid"] == store.uuid
    models[0].load_state_dict(state)
    opt_state = opts[0].state_dict()
    opts[0].load_state_dict(opt_state)
    out["opt_state_step"] = opt_state["step"]
    out["max_norm"] = _outcome(lambda: StoreEmbedding(store, max_norm=1.0))
    out["deepcopy"] = _outcome(lambda: __import__("copy").deepcopy(models[0]))
    store.close()
    single.close()
    return out


# --------------------------------------------------------------------------- commit loop
def commit_loop(rank: int, world: int, workdir: str, path: str, min_commit: int, rows: int, rounds: int) -> dict:
    """Create (first run) or open (recovering) the store, check it holds ONE round, then commit rounds.

    Round k puts the value k into every row, so a store holding exactly one commit has a
    single value everywhere, equal to its commit number. Prints ``opened K`` and ``acked K``.
    """
    ids = np.arange(rows, dtype=np.int64)
    mine = ids[rank::world]  # rows of every owner
    ahead = []
    if os.path.exists(os.path.join(path, "manifest.json")):
        manifest = read_manifest(path)
        with le.EmbeddingStore.open(manifest.shard_path(path, rank), readonly=True) as shard:
            if shard.attrs["dist.commit"] != manifest.commit:
                ahead = [rank]  # this shard prepared a commit that was never decided: open must undo it
        store = ShardedEmbeddingStore.open(path, cache_mb=16)
    else:
        store = ShardedEmbeddingStore.create(path, rows, DIM, init="zeros", chunk_rows=256, cache_mb=16)
    values = np.unique(store.get(mine))
    opened = store.commit_count
    if len(values) != 1 or float(values[0]) != float(opened) or opened < min_commit:
        raise AssertionError(f"rank {rank}: opened at commit {opened} (at least {min_commit} acknowledged) "
                             f"holding values {values[:5]}")
    print(f"opened {opened} ahead {len(ahead)}", flush=True)
    for _ in range(rounds):
        k = store.commit_count + 1
        store.put(mine, np.full((len(mine), DIM), k, np.float32))
        store.commit()
        print(f"acked {store.commit_count}", flush=True)
    store.close()
    return {"opened": opened, "final": k}


# ------------------------------------------------------------- a reader group beside a writer group
def writer_and_readers(rank: int, world: int, workdir: str, rows: int = 2000, reads: int = 40,
                       pause: float = 0.01) -> dict:
    """Two process groups of one job (``group=``): the first half commits round k (the value k in every
    row) round after round; the second half reads rows of every owner through a READ-ONLY store.

    A get that mixed two global commits would hold two values; a get of a commit not yet decided could
    be undone by a crash. Each must hold ONE value: the commit it reports, decided by the manifest.
    """
    half = world // 2
    writers, readers = dist.new_group(list(range(half))), dist.new_group(list(range(half, world)))
    path, stop = os.path.join(workdir, "two-groups"), os.path.join(workdir, "two-groups.stop")
    if rank < half:
        store = ShardedEmbeddingStore.create(path, rows, DIM, init="zeros", chunk_rows=CR, cache_mb=8, group=writers)
        mine = np.arange(rows, dtype=np.int64)[rank::half]
        store.put(mine, np.full((len(mine), DIM), 1.0, np.float32))
        store.commit()
    dist.barrier()  # the readers open only once the store exists
    if rank < half:
        while not store.collective.all_gather_ints([os.path.exists(stop)])[:, 0].any():  # stop together
            store.put(mine, np.full((len(mine), DIM), store.commit_count + 1, np.float32))
            store.commit()
            time.sleep(pause)
        out = {"commits": store.commit_count}
    else:
        store = ShardedEmbeddingStore.open(path, readonly=True, group=readers)
        ask = np.arange(rows, dtype=np.int64)[rank - half :: world - half]
        mixed, wrong, seen = 0, 0, set()
        for _ in range(reads):
            values = np.unique(store.get(ask))
            commit = store.commit_count
            mixed += int(len(values) != 1)
            wrong += int(len(values) == 1 and float(values[0]) != float(commit))
            wrong += int(commit > read_manifest(path).commit)  # never a commit the manifest has not decided
            seen.add(commit)
        store.collective.barrier()
        if store.rank == 0:
            with open(stop, "w"):
                pass
        out = {"mixed": mixed, "wrong": wrong, "commits_seen": len(seen), "group_rank": store.rank}
    store.close()
    dist.barrier()
    return out


def suite(rank: int, world: int, workdir: str, optimizers: list, two_groups: bool) -> dict:
    """Everything one launch checks (one process start per rank for all of it: CI time)."""
    out = {"sharded": sharded(rank, world, workdir), "training": training(rank, world, workdir, optimizers),
           "habits": habits(rank, world, workdir)}
    if two_groups:
        out["two_groups"] = writer_and_readers(rank, world, workdir)
    return out


if __name__ == "__main__":  # pragma: no cover - run through dist_worker.py
    sys.exit("run through dist_worker.py")

"""Issue 13: the drop-in runs what every upstream CoSiR manager version's callers do.

Each replay follows, on small synthetic data, the call sequence of CoSiR's own scripts in one
upstream era (construct with that era's default config, initialise, train chunk by chunk or batch
by batch, sync, save, second run from the template, phase-2 load, eval reopen) and compares the
rows with what the upstream manager of that era produced on the same data (``tests/data/cosir/``,
made by running the upstream code, see its README) or with a small re-derivation of the upstream
math. Where upstream is deterministic the comparison is bitwise; the PCA initialisations are
compared to float tolerance (upstream used scikit-learn, ours must not depend on it).

Eras (upstream blob, first commit):
  2025-09-30  embedding_manager.py 4944ad2 (212a5b3): chunk files + multi-tier cache (the one we replaced)
  2025-10-14  embedding_manager_nocache.py 5e8bb22 (edfc7de): no cache, a torch.save per update
  2026-03-09  embedding_manager_nocache.py 6cb64ac (c46b42d): + txt/img init, load_phase_1_template (main)
  2026-04-06  embedding_manager_nocache.py 96cc2ec (0d5b5fe): PCA(2) init by chunk position (branch)
  2026-04-07  embedding_manager_nocache.py 32603ef (16a3de7): np.memmap rewrite, mode="ram"|"mmap"
  2026-04-14  88d2edb (64ca494): normalize=; 2026-04-20 296c3a3: manager.embeddings is the nn.Parameter
  2026-04-28  76705dc (fec794f): template_config.json + TemplateIncompatibleError

Where the upstream scripts open a second manager on a directory whose first manager is still open,
so do these replays: managers of one process share one store (issue 21; tests/compat/test_manager_sharing.py).
"""

from __future__ import annotations

import gc
import pickle
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from checkout import FIXTURES, ROOT, run_cli, run_python

import lmdb_embeddings as le

DATA = Path(FIXTURES) / "cosir"

N = 230            # sample ids 0..N-1: CoSiR's ids are dataset indices
CLIP = 12          # feature width
DIM = 2            # label embedding width (CoSiR's default)
CHUNK = 50         # feature chunk size = manager chunk size in train_cosir.py
BATCH = 64         # batch size of the 2026-04 batch loop
EPOCHS = 2


# --------------------------------------------------------------------------- synthetic data
def hashed(rows: int, cols: int, salt: int) -> np.ndarray:
    """A deterministic pseudo-random float32 table computed with integer arithmetic (no RNG stream)."""
    i = np.arange(rows, dtype=np.int64)[:, None]
    j = np.arange(cols, dtype=np.int64)[None, :]
    v = (i * 7919 + j * 104729 + salt * 1299709 + (i * j) % 97 * 31) % 2003
    return (v.astype(np.float64) / 2003.0 - 0.5).astype(np.float32)


IMG = hashed(N, CLIP, 1)                                 # row = sample id
TXT = (0.6 * hashed(N, CLIP, 2) + 0.3 * IMG).astype(np.float32)
EXTRACTION_ORDER = [(i * 97 + 31) % N for i in range(N)]  # the shuffled feature-extraction order
PROJECTION = hashed(CLIP, DIM, 3)                        # label_proj_layer.weight, [clip, label]
TARGET = torch.from_numpy(hashed(CLIP, DIM, 4))


class ChunkFeatures:
    """The FeatureManager surface of 2025-09 .. 2026-04-06: numbered chunks in extraction order."""

    def __init__(self):
        self.chunk_size = CHUNK
        self.index_mapping = {}
        self.order = list(EXTRACTION_ORDER)

    def get_num_chunks(self) -> int:
        return -(-len(self.order) // self.chunk_size)

    def chunk_ids(self, chunk_id: int) -> list:
        return self.order[chunk_id * self.chunk_size:(chunk_id + 1) * self.chunk_size]

    def get_features_by_chunk(self, chunk_id, feature_types=None, async_prefetch=True) -> dict:
        ids = self.chunk_ids(chunk_id)
        img, txt = torch.from_numpy(IMG[ids]), torch.from_numpy(TXT[ids])
        return {"img_features": img, "txt_features": txt, "txt_full": torch.zeros_like(txt), "sample_ids": ids}


class ShardFeatures(ChunkFeatures):
    """The shard FeatureManager of 2026-04-07 on: int64 tensor ids, ``get_all_sample_ids()``."""

    def get_features_by_chunk(self, chunk_id, feature_types=None, async_prefetch=True) -> dict:
        ids = self.chunk_ids(chunk_id)
        return {"img_features": torch.from_numpy(IMG[ids]), "txt_features": torch.from_numpy(TXT[ids]),
                "sample_ids": torch.tensor(ids, dtype=torch.int64)}

    def get_all_sample_ids(self) -> list:
        return list(self.order)


class TinyCoSiR(nn.Module):
    """Just the part of the CoSiR model the projection initialisers read."""

    def __init__(self):
        super().__init__()
        self.combiner = nn.Module()
        self.combiner.label_proj_layer = nn.Linear(DIM, CLIP, bias=False)
        with torch.no_grad():
            self.combiner.label_proj_layer.weight.copy_(torch.from_numpy(PROJECTION))


def loss_of(rows: torch.Tensor, ids) -> torch.Tensor:
    ids = list(ids)
    target = torch.from_numpy(IMG[ids] - TXT[ids]) @ TARGET
    return ((rows - target) ** 2).sum(1).mean() + 0.1 * (rows ** 2).mean()


def fresh_param_step(rows: torch.Tensor, ids) -> nn.Parameter:
    """The chunk/batch step of train_cosir.py: a new nn.Parameter and a new AdamW per step."""
    param = nn.Parameter(rows.detach().clone(), requires_grad=True)
    opt = torch.optim.AdamW([param], lr=0.05, weight_decay=0.01)
    loss = loss_of(param, ids)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return param


def batches(epoch: int) -> list:
    order = [(i * 53 + 7 * epoch) % N for i in range(N)]
    return [order[i:i + BATCH] for i in range(0, N, BATCH)]


def by_id(ids, rows) -> np.ndarray:
    """Rows re-indexed by sample id (every id must appear)."""
    ids = np.asarray(list(ids), dtype=np.int64)
    rows = rows.detach().cpu().numpy() if torch.is_tensor(rows) else np.asarray(rows)
    assert len(ids) == len(rows) == N and len(np.unique(ids)) == N
    out = np.empty((N, rows.shape[1]), dtype=rows.dtype)
    out[ids] = rows
    return out


def table(manager) -> np.ndarray:
    ids, rows = manager.get_all_embeddings()
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert rows.dtype == torch.float32 and not rows.requires_grad
    return by_id(ids, rows)


def ref(name: str) -> np.ndarray:
    return np.load(DATA / f"{name}.npy")


def chunk_projection(strategy: str, factor: float = 1.0) -> np.ndarray:
    """The 2025-10-14 .. 2026-03 initialisation: feature chunk k, row i -> manager chunk k, row i.

    Upstream computes ``(img - txt) @ w_t * factor`` (or ``txt``/``img``) per feature chunk in
    float32 torch and writes it to the k-th chunk of the manager (sorted ids k*chunk..), pairing by
    position exactly as the chunk training loop pairs feature chunk k with embedding chunk k.
    """
    fm, w_t = ChunkFeatures(), torch.from_numpy(PROJECTION)
    out = np.empty((N, DIM), np.float32)
    for k in range(fm.get_num_chunks()):
        f = fm.get_features_by_chunk(k)
        src = {"imgtxt": f["img_features"] - f["txt_features"], "img": f["img_features"],
               "txt": f["txt_features"]}[strategy]
        out[k * CHUNK:k * CHUNK + len(src)] = (src @ w_t * factor).numpy()
    return out


def era_config(era: str, embeddings_dir: Path, **overrides) -> dict:
    """The constructor keywords train_cosir.py passes in that era (configs/experiment|infra/default.yaml)."""
    common = dict(embedding_dim=DIM, device="cpu", initialization_strategy="zeros",
                  embeddings_dir=str(embeddings_dir), enable_l3_cache=True)
    if era == "2025-09-30":
        kw = dict(storage_mode="disk", cache_l1_size_mb=128, cache_l2_size_mb=256, auto_sync=False,
                  sync_batch_size=10, chunk_size=min(max(16 * 4, 100), CHUNK))
    elif era == "2025-10-14":
        kw = dict(storage_mode="disk", cache_l1_size_mb=128, cache_l2_size_mb=256, auto_sync=True,
                  sync_batch_size=0, chunk_size=min(max(16 * 4, 100), CHUNK))
    elif era in ("2026-03-09", "2026-04-06"):
        kw = dict(storage_mode="disk", cache_l1_size_mb=512, cache_l2_size_mb=1024, auto_sync=True,
                  sync_batch_size=0, chunk_size=CHUNK)
    elif era in ("2026-04-07", "2026-04-14"):
        kw = dict(storage_mode="disk", cache_l1_size_mb=512, cache_l2_size_mb=1024, auto_sync=True,
                  sync_batch_size=0, chunk_size=None)
    else:  # 2026-04-20 .. 2026-05: configs/infra/default.yaml
        kw = dict(storage_mode="memory", cache_l1_size_mb=512, cache_l2_size_mb=1024, auto_sync=True,
                  sync_batch_size=0, chunk_size=None)
    return {**common, **kw, **overrides}


def chunk_train(manager, fm, epochs=EPOCHS) -> np.ndarray:
    for _ in range(epochs):
        for chunk_id in range(fm.get_num_chunks()):
            fm.get_features_by_chunk(chunk_id)
            ids, rows = manager.get_embeddings_by_chunk(chunk_id)
            manager.update_embeddings_by_chunk(chunk_id, ids, fresh_param_step(rows, ids))
    return table(manager)


def write_by_chunk(manager, rows_by_id: np.ndarray) -> None:
    for chunk_id in sorted(manager.chunk_mapping):
        ids, _ = manager.get_embeddings_by_chunk(chunk_id)
        manager.update_embeddings_by_chunk(chunk_id, ids, torch.from_numpy(rows_by_id[ids]))


def experiment(tmp_path: Path, name: str) -> Path:
    """results_dir/<dataset>/<experiment>: the template lives in results_dir/<dataset>/template_embeddings."""
    return tmp_path / "res" / "coco" / name


# ============================================================================ constructor
@pytest.mark.parametrize("era", ["2025-09-30", "2025-10-14", "2026-03-09", "2026-04-07", "2026-04-28"])
def test_every_eras_default_config_constructs_and_trains(tmp_path, era):
    """Item 1: main's default config passes sync_batch_size=0 (auto_sync=True); every version accepts it."""
    config = era_config(era, tmp_path / "emb")
    m = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER), **config)
    m.update_embeddings([3, 7], torch.ones(2, DIM))
    assert torch.equal(m.get_embeddings([7, 3]).detach(), torch.ones(2, DIM))
    if not config["auto_sync"]:
        m.force_sync_all_chunks()  # 2025-09: without auto_sync only a sync persists (upstream and ours)
    m.close()
    again = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER), **era_config(era, tmp_path / "emb"))
    assert torch.equal(again.get_embeddings([3]).detach(), torch.ones(1, DIM))
    again.close()


def test_random_strategy_reopens_but_cannot_create(tmp_path):
    """Item 4: eval scripts reopen with initialization_strategy="random"; only a new table needs a real one."""
    d = tmp_path / "final_embeddings"
    m = le.TrainableEmbeddingManager(sample_ids=list(range(N)), **era_config("2026-03-09", d))
    m.update_embeddings([5], torch.full((1, DIM), 4.0))
    m.close()
    for mode in ("disk", "memory"):
        ev = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER), embedding_dim=DIM, storage_mode=mode,
                                          device="cpu", initialization_strategy="random", embeddings_dir=str(d),
                                          auto_sync=False)
        assert torch.equal(ev.get_embeddings([5]).detach(), torch.full((1, DIM), 4.0))
        ev.close()
    with pytest.raises(ValueError, match="random"):
        le.TrainableEmbeddingManager(sample_ids=list(range(N)), embedding_dim=DIM, device="cpu",
                                     initialization_strategy="random", embeddings_dir=str(tmp_path / "new"))
    assert not list(tmp_path.joinpath("new").rglob("data.mdb"))  # a refused create leaves no store behind


def test_memmap_signature_positional_dir_and_mode(tmp_path):
    """Item 5: the 2026-04 signature (sample_ids, embedding_dim, embeddings_dir, mode="ram", ...)."""
    ids = [17, 3, 9, 1, 12]
    m = le.TrainableEmbeddingManager(ids, DIM, str(tmp_path / "a"), "mmap")
    assert m.mode == "mmap"
    got_ids, rows = m.get_all_embeddings()
    assert got_ids == ids and torch.equal(rows, torch.zeros(5, DIM))  # caller's order; default init "zeros"
    m.update_embeddings([9, 17], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    got_ids, rows = m.get_all_embeddings()
    assert got_ids == ids and rows[0].tolist() == [3.0, 4.0] and rows[2].tolist() == [1.0, 2.0]
    m.close()

    ram = le.TrainableEmbeddingManager(sample_ids=ids, embedding_dim=DIM, embeddings_dir=str(tmp_path / "b"),
                                       mode="ram")
    assert ram.mode == "ram" and isinstance(ram.embeddings, nn.Parameter)
    assert ram.embeddings.shape == (5, DIM) and ram.embeddings.device.type == "cpu"
    ram.close()
    legacy = le.TrainableEmbeddingManager(sample_ids=list(range(10)), embedding_dim=8,
                                          embeddings_dir=str(tmp_path / "c"), storage_mode="memory")
    assert legacy.mode == "ram"
    legacy.close()
    disk = le.TrainableEmbeddingManager(sample_ids=list(range(10)), embedding_dim=8,
                                        embeddings_dir=str(tmp_path / "d"), storage_mode="disk")
    assert disk.mode == "mmap"
    disk.close()


def test_memmap_initialize_handles_every_strategy(tmp_path):
    """``initialize(strategy, feature_manager=None, model=None, device="cpu", factor=1.0, normalize=False)``."""
    fm = ShardFeatures()
    m = le.TrainableEmbeddingManager(sample_ids=fm.get_all_sample_ids(), embedding_dim=DIM,
                                     embeddings_dir=str(tmp_path / "e"), mode="ram")
    for strategy in ("normal", "uniform"):
        m.initialize(strategy)
        rows = table(m)
        assert np.isfinite(rows).all() and np.abs(rows).max() > 0
    m.initialize("zeros")
    assert not table(m).any()
    m.initialize("imgtxt", feature_manager=fm, device="cpu", factor=1.0)
    np.testing.assert_allclose(table(m), ref("memmap_2026_04_07_after_init") / 10.0, rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match="bogus"):
        m.initialize("bogus")
    m.close()


# ============================================================== rows, dtypes and attributes
def test_memory_mode_rows_are_autograd_views_of_one_parameter(tmp_path):
    """Item 7: in memory/ram mode callers train through the returned rows or ``manager.embeddings`` itself."""
    m = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER), **era_config("2026-04-28", tmp_path / "m"))
    emb = m.embeddings
    assert isinstance(emb, nn.Parameter) and emb.requires_grad and emb.shape == (N, DIM)
    assert all(m.id_to_index[s] == i for i, s in enumerate(m.sample_ids))
    rows = m.get_embeddings([4, 9])
    assert rows.requires_grad and rows.grad_fn is not None
    rows.sum().backward()
    touched = emb.grad.abs().sum(1).nonzero().flatten().tolist()
    assert sorted(touched) == sorted([m.id_to_index[4], m.id_to_index[9]])
    with torch.no_grad():
        emb.data[m.id_to_index[9]] = torch.tensor([5.0, 6.0])
    assert m.get_embeddings([9]).tolist() == [[5.0, 6.0]]  # direct writes are what get returns
    m._save_all_chunks_to_disk()
    m.close()
    again = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER),
                                         **era_config("2026-04-28", tmp_path / "m"))
    assert again.get_embeddings([9]).tolist() == [[5.0, 6.0]]
    again.close()

    chunked = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER),
                                           **era_config("2026-03-09", tmp_path / "c", storage_mode="memory"))
    ids, rows = chunked.get_embeddings_by_chunk(0)
    assert ids == list(range(CHUNK)) and rows.requires_grad and rows.grad_fn is not None
    chunked.close()

    disk = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER), **era_config("2026-03-09", tmp_path / "d"))
    rows = disk.get_embeddings([4, 9])
    assert not rows.requires_grad and rows.device.type == "cpu"  # disk mode: plain CPU rows, as main
    disk.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_updates_in_other_dtypes_are_cast_to_float32(tmp_path, dtype, mode):
    """Item 8: bf16/float64 updates are stored as float32 (the memmap versions' ``.float()``)."""
    m = le.TrainableEmbeddingManager(sample_ids=list(range(N)),
                                     **era_config("2026-03-09", tmp_path / "e", storage_mode=mode))
    value = torch.tensor([[0.1, -2.5], [3.3, 1e-3]], dtype=dtype)
    m.update_embeddings([60, 61], value)
    ids, rows = m.get_embeddings_by_chunk(1)
    param = nn.Parameter(rows.detach().to(dtype))  # a requires-grad parameter, as the training loop passes
    m.update_embeddings_by_chunk(1, ids, param)
    got = m.get_embeddings([60, 61])
    assert got.dtype == torch.float32 and torch.equal(got.detach(), value.float())
    m.close()


def test_chunk_mappings_are_plain_dicts_callers_pickle_and_assign(tmp_path):
    """Item 3: train_cosir pickles chunk_mapping / id_to_chunk_index; phase 2 assigns them back."""
    m = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER), **era_config("2026-03-09", tmp_path / "e"))
    expected = {k: list(range(k * CHUNK, min(N, (k + 1) * CHUNK))) for k in range(5)}
    assert dict(m.chunk_mapping) == expected
    assert dict(m.id_to_chunk_index) == {s: (s // CHUNK, s % CHUNK) for s in range(N)}
    mapping = pickle.loads(pickle.dumps(m.chunk_mapping))
    index = pickle.loads(pickle.dumps(m.id_to_chunk_index))
    assert mapping == expected and all(type(s) is int for ids in mapping.values() for s in ids)
    m.id_to_chunk_index = index
    m.chunk_mapping = mapping
    assert m.get_embeddings_by_chunk(3)[0] == expected[3]
    custom = dict(expected)
    custom[0] = expected[0][::-1]
    try:
        m.chunk_mapping = custom
    except le.EmbeddingStoreError:
        assert m.get_embeddings_by_chunk(0)[0] == expected[0]  # refused: nothing changed
    else:
        assert m.get_embeddings_by_chunk(0)[0] == custom[0]  # honoured: never silently ignored
    assert m.sample_ids == sorted(EXTRACTION_ORDER)
    m.close()


def test_sept_attributes_dirty_chunks_performance_stats_cache(tmp_path):
    """Item 3: the 2025-09 scripts read dirty_chunks, performance_stats and manager.cache."""
    m = le.TrainableEmbeddingManager(sample_ids=list(range(N)), **era_config("2025-09-30", tmp_path / "e"))
    assert len(m.dirty_chunks) == 0
    m.update_embeddings([120, 121], torch.ones(2, DIM))
    m.update_embeddings_by_chunk(4, [201], torch.ones(1, DIM))
    assert set(m.dirty_chunks) == {2, 4}
    syncs = m.performance_stats["sync_operations"]
    m.sync_dirty_chunks_to_disk()
    assert len(m.dirty_chunks) == 0 and m.performance_stats["sync_operations"] == syncs + 1
    assert set(m.performance_stats) == {"cache_hits", "cache_misses", "disk_loads", "sync_operations"}
    info = m.cache.get_cache_info()
    assert set(info) == {"l1_items", "l1_size_mb", "l1_max_mb", "l2_items", "l2_size_mb", "l2_max_mb",
                         "l3_enabled", "stats", "hit_rate"}
    assert set(info["stats"]) == {"hits", "misses", "evictions"} and info["l1_max_mb"] == 128
    assert m.cache.adaptive_eviction() is None
    m.close()


def test_exit_without_close_keeps_the_updates(tmp_path):
    """Item 9: main saved every update; a normal exit (or garbage collection) must commit, not discard.

    Both main's config (sync_batch_size=0) and one whose count is never reached (100) keep the updates.
    """
    for sync_batch_size in (0, 100):
        d = tmp_path / f"emb{sync_batch_size}"
        code = textwrap.dedent(f"""
            import torch, lmdb_embeddings as le
            m = le.TrainableEmbeddingManager(sample_ids=list(range({N})), embedding_dim={DIM}, device="cpu",
                                             storage_mode="disk", initialization_strategy="zeros",
                                             embeddings_dir={str(d)!r}, auto_sync=True,
                                             sync_batch_size={sync_batch_size}, chunk_size={CHUNK})
            ids, rows = m.get_embeddings_by_chunk(1)
            m.update_embeddings_by_chunk(1, ids, rows + 2.0)
            m.update_embeddings([7], torch.full((1, {DIM}), 9.0))
        """)
        run_python(code)
        m = le.TrainableEmbeddingManager(sample_ids=list(range(N)),
                                         **era_config("2026-03-09", d, sync_batch_size=sync_batch_size))
        assert torch.equal(m.get_embeddings_by_chunk(1)[1], torch.full((CHUNK, DIM), 2.0))
        assert torch.equal(m.get_embeddings([7]), torch.full((1, DIM), 9.0))
        m.update_embeddings([8], torch.full((1, DIM), 3.0))
        del m
        gc.collect()
        m = le.TrainableEmbeddingManager(sample_ids=list(range(N)), **era_config("2026-03-09", d))
        assert torch.equal(m.get_embeddings([8]), torch.full((1, DIM), 3.0))
        m.close()


# ===================================================================== chunk-era replays
@pytest.mark.parametrize("era,strategy,expected,mode", [
    ("2025-10-14", "imgtxt", "nocache_2025_10_14_epoch1", "disk"),
    ("2026-03-09", "img", "main_2026_03_09_epoch1", "disk"),
    ("2026-03-09", "img", "main_2026_03_09_epoch1", "memory"),
])
def test_chunk_era_train_cosir_replay(tmp_path, capsys, era, strategy, expected, mode):
    """train_cosir.py 2025-10-14 .. 2026-03-17 (main), then train_cosir_phase2.py and eval_cosir.py."""
    fm, model = ChunkFeatures(), TinyCoSiR()
    sample_ids_list = list(fm.order)
    exp1 = experiment(tmp_path, "exp1")
    template_dir = exp1.parent / "template_embeddings"
    m = le.TrainableEmbeddingManager(sample_ids=sample_ids_list,
                                     **era_config(era, exp1 / "training_embeddings", storage_mode=mode))
    assert m.sample_ids == sorted(sample_ids_list)
    assert not (template_dir.exists() and list(template_dir.glob("embeddings_chunk_*.pt")))
    getattr(m, f"initialize_embeddings_{strategy}")(fm, model, "cpu")
    after_init = table(m)
    assert np.array_equal(after_init, chunk_projection(strategy))
    m.store_imgtxt_template()
    assert list(template_dir.glob("embeddings_chunk_*.pt"))  # what the next run's train_cosir.py looks for
    m.optimize_cache_settings(fm.chunk_size)
    trained = chunk_train(m, fm)
    assert np.array_equal(trained, ref(expected))
    m.save_final_embeddings(str(exp1 / "final_embeddings"))
    (exp1 / "embeddings").mkdir()
    for name in ("chunk_mapping", "id_to_chunk_index"):
        (exp1 / "embeddings" / f"{name}.pkl").write_bytes(pickle.dumps(getattr(m, name)))
    m.close()

    # a second run on the same dataset: the template exists now
    exp2 = experiment(tmp_path, "exp2")
    second = le.TrainableEmbeddingManager(sample_ids=sample_ids_list,
                                          **era_config(era, exp2 / "training_embeddings", storage_mode=mode))
    second.load_imgtxt_template()
    assert np.array_equal(table(second), after_init)
    second.close()

    # phase 2: a new manager in its own directory loads the phase-1 result and the pickled mappings
    phase2 = le.TrainableEmbeddingManager(sample_ids=sample_ids_list,
                                          **era_config(era, exp1 / "phase2" / "training_embeddings"))
    phase2.load_phase_1_template(str(exp1 / "final_embeddings"))
    phase2.id_to_chunk_index = pickle.loads((exp1 / "embeddings" / "id_to_chunk_index.pkl").read_bytes())
    phase2.chunk_mapping = pickle.loads((exp1 / "embeddings" / "chunk_mapping.pkl").read_bytes())
    phase2.optimize_cache_settings(fm.chunk_size)
    assert np.array_equal(table(phase2), trained)
    for chunk_id in range(fm.get_num_chunks()):
        ids, rows = phase2.get_embeddings_by_chunk(chunk_id)
        assert np.array_equal(rows.detach().numpy(), trained[ids])
    phase2.close()

    # eval_cosir.py: reopen final_embeddings with "random", auto_sync=False and no chunk_size
    # (upstream's default chunk size 1000 then misses every id >= 50: KeyError; the ids are what count)
    ev = le.TrainableEmbeddingManager(sample_ids=sample_ids_list, embedding_dim=DIM, storage_mode="disk",
                                      device="cpu", initialization_strategy="random",
                                      embeddings_dir=str(exp1 / "final_embeddings"), cache_l1_size_mb=512,
                                      cache_l2_size_mb=1024, enable_l3_cache=True, auto_sync=False)
    assert np.array_equal(table(ev), trained)
    assert np.array_equal(ev.get_embeddings([77]).numpy(), trained[[77]])
    ev.close()
    assert capsys.readouterr().out == ""  # the upstream managers print; ours logs


def test_sept_2025_replay_keeps_what_training_wrote(tmp_path):
    """train_cosir.py 2025-09-30: auto_sync=False and the epoch-end sync commented out.

    Upstream's final_embeddings/ got the chunk files as last synced: the zeros of the constructor
    (a bug: save_final_embeddings(dir) copied the files without syncing the dirty chunks). Ours
    saves what training wrote. The in-process rows match upstream bitwise.
    """
    fm = ChunkFeatures()
    exp1 = experiment(tmp_path, "exp1")
    m = le.TrainableEmbeddingManager(sample_ids=list(fm.order),
                                     **era_config("2025-09-30", exp1 / "training_embeddings"))
    write_by_chunk(m, ref("sept_2025_09_30_disk_after_init"))  # upstream's (buggy) init, taken as given
    m.optimize_cache_settings(fm.chunk_size)
    trained = chunk_train(m, fm)
    assert np.array_equal(trained, ref("sept_2025_09_30_disk_epoch1"))
    m.save_final_embeddings(str(exp1 / "final_embeddings"))
    m.close()
    ev = le.TrainableEmbeddingManager(sample_ids=list(fm.order), embedding_dim=DIM, storage_mode="disk", device="cpu",
                                      initialization_strategy="random", embeddings_dir=str(exp1 / "final_embeddings"),
                                      auto_sync=False)
    assert np.array_equal(table(ev), trained)
    ev.close()


def test_pca_by_chunk_position_2026_04_06(tmp_path):
    """The new_phase_1 branch (2026-03-26 .. 2026-04-06): PCA(2) of the chunked features, by position.

    Reached with model=None (upstream ignored the model there); with a model and chunk features the
    2026-03 projection above applies.
    """
    fm = ChunkFeatures()
    m = le.TrainableEmbeddingManager(sample_ids=list(fm.order),
                                     **era_config("2026-04-06", experiment(tmp_path, "e") / "training_embeddings"))
    m.initialize_embeddings_imgtxt(fm, None, "cpu", factor=10.0)
    np.testing.assert_allclose(table(m), ref("pca_chunks_2026_04_06_after_init"), rtol=1e-5, atol=1e-4)
    write_by_chunk(m, ref("pca_chunks_2026_04_06_after_init"))
    assert np.array_equal(chunk_train(m, fm), ref("pca_chunks_2026_04_06_epoch1"))
    m.close()


# ==================================================================== 2026-04 replays
@pytest.mark.parametrize("era,normalize,expected", [
    ("2026-04-07", None, "memmap_2026_04_07"),
    ("2026-04-14", True, "memmap_2026_04_14"),
    ("2026-04-28", False, "memmap_2026_04_28"),
])
def test_memmap_era_train_cosir_replay(tmp_path, era, normalize, expected):
    """train_cosir.py 2026-04-07 .. 2026-05-05, train_cosir_phase2.py and eval_cosir2.py of that era."""
    fm, model = ShardFeatures(), TinyCoSiR()
    sample_ids_list = fm.get_all_sample_ids()
    direct = era >= "2026-04-20"
    exp1 = experiment(tmp_path, "exp1")
    m = le.TrainableEmbeddingManager(sample_ids=sample_ids_list, **era_config(era, exp1 / "training_embeddings"))
    kw = {} if normalize is None else {"normalize": normalize}
    m.initialize_embeddings_imgtxt(fm, model, "cpu", factor=10.0, **kw)
    after_init = table(m)
    np.testing.assert_allclose(after_init, ref(f"{expected}_after_init"), rtol=1e-5, atol=1e-4)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(after_init, axis=1), 1.0, rtol=1e-6)
    template_kw = dict(strategy="imgtxt", factor=10.0, normalize=bool(normalize)) if era >= "2026-04-28" else {}
    m.store_imgtxt_template(**template_kw)
    upstream_init = ref(f"{expected}_after_init")
    m.update_embeddings(sample_ids_list, torch.from_numpy(upstream_init[sample_ids_list]))

    if direct:
        opt = torch.optim.AdamW([m.embeddings], lr=0.05, weight_decay=0)
    for epoch in range(EPOCHS):
        for b in batches(epoch):
            if direct:
                idx = [m.id_to_index[s] for s in b]
                loss = loss_of(m.embeddings[idx], b)
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                m.update_embeddings(b, fresh_param_step(m.get_embeddings(b), b))
        if direct:
            m._save_all_chunks_to_disk()
    trained = table(m)
    assert np.array_equal(trained, ref(f"{expected}_epoch1"))

    final = exp1 / "final_embeddings"
    m._copy_to(final)
    ids = np.load(final / "sample_ids.npy")
    rows = np.load(final / "embeddings.npy")
    assert ids.dtype == np.int64 and rows.dtype == np.float32 and rows.shape == (N, DIM)
    assert ids.tolist() == list(m.sample_ids)  # position-indexed, as the pickled sample_ids list
    assert np.array_equal(by_id(ids, rows), trained)
    assert (final / "metadata.json").read_text().replace(" ", "").replace("\n", "") == \
        f'{{"total_samples":{N},"embedding_dim":{DIM}}}'
    m.close()

    if era >= "2026-04-28":
        exp2 = experiment(tmp_path, "exp2")
        assert (exp1.parent / "template_embeddings" / "embeddings.npy").exists()  # the next run's check
        second = le.TrainableEmbeddingManager(sample_ids=sample_ids_list,
                                              **era_config(era, exp2 / "training_embeddings"))
        with pytest.raises(le.TemplateIncompatibleError, match="factor"):
            second.load_imgtxt_template(strategy="imgtxt", factor=1.0, normalize=False)
        assert not table(second).any()  # a refused template changes nothing
        second.load_imgtxt_template(**template_kw)
        np.testing.assert_allclose(table(second), after_init, rtol=0, atol=0)
        second.close()

    # phase 2 reads the phase-1 files with another id list (upstream mapped rows by position: a bug)
    other_order = sorted(sample_ids_list)
    phase2 = le.TrainableEmbeddingManager(sample_ids=other_order,
                                          **era_config(era, exp1 / "phase2" / "training_embeddings"))
    phase2.load_phase_1_template(str(final))
    assert np.array_equal(table(phase2), trained)
    assert np.array_equal(phase2.get_embeddings(other_order[:BATCH]).detach().numpy(), trained[other_order[:BATCH]])
    phase2.close()

    ev = le.TrainableEmbeddingManager(sample_ids=sample_ids_list, embedding_dim=DIM,
                                      storage_mode=era_config(era, final)["storage_mode"], device="cpu",
                                      initialization_strategy="random", embeddings_dir=str(final),
                                      auto_sync=False)
    assert np.array_equal(table(ev), trained)
    ev.close()


# ============================================================ upstream files and formats
def test_reads_the_files_the_upstream_managers_wrote(tmp_path):
    """Item 2/10: chunk .pt files, memmap .npy files and a 2026-04-28 template, as upstream left them."""
    pt_dir = tmp_path / "pt"
    shutil.copytree(DATA / "pt_files_2026_03_09", pt_dir)
    npy_dir = tmp_path / "npy"
    shutil.copytree(DATA / "npy_files_2026_04_28", npy_dir)
    for src, expected in ((pt_dir, "main_2026_03_09_epoch1"), (npy_dir, "memmap_2026_04_28_epoch1")):
        fresh = le.TrainableEmbeddingManager(sample_ids=list(range(N)),
                                             **era_config("2026-03-09", tmp_path / f"load_{src.name}"))
        fresh.load_phase_1_template(str(src))
        assert np.array_equal(table(fresh), ref(expected))
        fresh.close()
        reopened = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER), embedding_dim=DIM,
                                                device="cpu", initialization_strategy="random",
                                                storage_mode="disk", embeddings_dir=str(src), auto_sync=False)
        assert np.array_equal(table(reopened), ref(expected))
        reopened.close()

    exp = experiment(tmp_path, "exp")
    shutil.copytree(DATA / "template_2026_04_28", exp.parent / "template_embeddings")
    m = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER),
                                     **era_config("2026-04-28", exp / "training_embeddings"))
    param = m.embeddings
    with pytest.raises(le.TemplateIncompatibleError) as info:
        m.load_imgtxt_template(strategy="imgtxt", factor=10.0, normalize=True)
    assert isinstance(info.value, le.EmbeddingStoreError) and "normalize" in str(info.value)
    m.load_imgtxt_template(strategy="imgtxt", factor=10.0, normalize=False)
    assert m.embeddings is param  # loaded in place: an optimizer built before keeps working
    assert np.array_equal(table(m), ref("memmap_2026_04_28_after_init"))
    m.close()

    chunk_exp = experiment(tmp_path / "chunk", "exp")
    shutil.copytree(DATA / "pt_files_2026_03_09", chunk_exp.parent / "template_embeddings")
    c = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER),
                                     **era_config("2026-03-09", chunk_exp / "training_embeddings"))
    c.load_imgtxt_template()
    assert np.array_equal(table(c), ref("main_2026_03_09_epoch1"))
    c.close()


def test_export_cosir_writes_the_original_chunk_files(tmp_path):
    """Item 10: ``lmdb-embeddings export-cosir PATH DIR`` and ``save_final_embeddings(dir, format="cosir")``."""
    m = le.TrainableEmbeddingManager(sample_ids=list(EXTRACTION_ORDER), **era_config("2026-03-09", tmp_path / "e"))
    write_by_chunk(m, ref("main_2026_03_09_epoch1"))
    m.save_final_embeddings(str(tmp_path / "final"), format="cosir")
    store_path = m.store_path
    m.close()
    proc = run_cli("export-cosir", store_path, str(tmp_path / "cli"))
    assert proc.returncode == 0, proc.stderr
    for out in (tmp_path / "final", tmp_path / "cli"):
        files = sorted(out.glob("embeddings_chunk_*.pt"))
        assert [f.name for f in files] == [f"embeddings_chunk_{k}.pt" for k in range(5)]
        for k, f in enumerate(files):
            chunk = torch.load(f, weights_only=True)
            assert list(chunk) == list(range(k * CHUNK, min(N, (k + 1) * CHUNK)))
            assert all(type(s) is int and v.dtype == torch.float32 and v.shape == (DIM,) for s, v in chunk.items())
            assert np.array_equal(torch.stack(list(chunk.values())).numpy(), ref("main_2026_03_09_epoch1")[list(chunk)])
    back = run_cli("import-cosir", str(tmp_path / "cli"), str(tmp_path / "back"))
    assert back.returncode == 0, back.stderr
    with le.EmbeddingStore.open(str(tmp_path / "back"), readonly=True) as store:
        assert np.array_equal(by_id(store.ids, store.get(store.ids)), ref("main_2026_03_09_epoch1"))


# ====================================================== the upstream scripts' own checks
def test_upstream_template_script_sequence(tmp_path):
    """tests/test_template_embedding.py (2025-10-14): store, train on, load into a sibling experiment."""
    ids = list(range(100))
    exp = tmp_path / "CoSiR_Experiment" / "test_dataset"
    m = le.TrainableEmbeddingManager(sample_ids=ids, embedding_dim=DIM, storage_mode="disk", device="cpu",
                                     initialization_strategy="normal",
                                     embeddings_dir=str(exp / "20251013_test" / "training_embeddings"), chunk_size=20)
    assert len(m.chunk_mapping) == 5
    original_ids, original = m.get_embeddings_by_chunk(0)
    m.store_imgtxt_template()
    assert list((exp / "template_embeddings").glob("embeddings_chunk_*.pt"))
    for chunk_id in range(len(m.chunk_mapping)):
        chunk_ids, rows = m.get_embeddings_by_chunk(chunk_id)
        m.update_embeddings_by_chunk(chunk_id, chunk_ids, rows + 0.5)
    m.sync_dirty_chunks_to_disk()
    assert not torch.equal(m.get_embeddings_by_chunk(0)[1], original)
    m.close()
    new = le.TrainableEmbeddingManager(sample_ids=ids, embedding_dim=DIM, storage_mode="disk", device="cpu",
                                       initialization_strategy="normal",
                                       embeddings_dir=str(exp / "20251013_test2" / "training_embeddings"),
                                       chunk_size=20)
    new.load_imgtxt_template()
    loaded_ids, loaded = new.get_embeddings_by_chunk(0)
    assert loaded_ids == original_ids and torch.equal(loaded, original)
    new.close()


def test_upstream_feature_embedding_script_sequence(tmp_path):
    """src/test/20260406_feature_embedding_test (2026-04-07): every manager API of the memmap version."""
    fm = ShardFeatures()
    sample_ids = fm.get_all_sample_ids()
    base = tmp_path / "embeddings"
    for strategy in ("zeros", "normal", "uniform"):
        em = le.TrainableEmbeddingManager(sample_ids=sample_ids, embedding_dim=DIM,
                                          embeddings_dir=str(base / f"init_{strategy}"), mode="ram",
                                          initialization_strategy=strategy)
        assert (np.abs(table(em)).max() == 0) == (strategy == "zeros")
        em.close()
    for strategy in ("imgtxt", "txt", "img"):
        em = le.TrainableEmbeddingManager(sample_ids=sample_ids, embedding_dim=DIM,
                                          embeddings_dir=str(base / f"pca_{strategy}"), mode="ram")
        em.initialize(strategy, feature_manager=fm, device="cpu", factor=1.0)
        rows = table(em)
        assert rows.shape == (N, DIM) and np.abs(rows).max() > 0
        np.testing.assert_allclose(rows.mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(rows.std(0), 1.0, rtol=1e-4)  # zero mean, unit std per column
        em.close()
    em = le.TrainableEmbeddingManager(sample_ids=sample_ids, embedding_dim=DIM,
                                      embeddings_dir=str(base / "roundtrip"), mode="ram")
    batch_ids = sample_ids[10:74]
    new = torch.arange(2 * len(batch_ids), dtype=torch.float32).reshape(-1, DIM)
    em.update_embeddings(batch_ids, new)
    assert torch.equal(em.get_embeddings(batch_ids).detach(), new)
    untouched = em.get_embeddings(sample_ids[:5]).detach().clone()
    em.update_embeddings(batch_ids, -new)
    assert torch.equal(em.get_embeddings(sample_ids[:5]).detach(), untouched)
    em.store_imgtxt_template()
    phase1 = base / "phase1_save"
    em._copy_to(phase1)
    _, original = em.get_all_embeddings()
    reload = le.TrainableEmbeddingManager(sample_ids=sample_ids, embedding_dim=DIM,  # 2d: `em` is still open
                                          embeddings_dir=str(base / "roundtrip"), mode="ram")
    assert torch.equal(reload.get_embeddings(batch_ids).detach(), -new)
    em.update_embeddings(batch_ids, new)  # section 3 trains through `em`: `reload` sees it
    assert torch.equal(reload.get_embeddings(batch_ids).detach(), new)
    em.update_embeddings(batch_ids, -new)
    reload.close()
    em.close()
    mm = le.TrainableEmbeddingManager(sample_ids=sample_ids, embedding_dim=DIM, embeddings_dir=str(base / "mmap"),
                                      mode="mmap")
    mm.update_embeddings(batch_ids, new)
    assert torch.equal(mm.get_embeddings(batch_ids), new)
    mm.close()
    fresh = le.TrainableEmbeddingManager(sample_ids=sample_ids, embedding_dim=DIM,
                                         embeddings_dir=str(base / "fresh_for_template"), mode="ram",
                                         initialization_strategy="zeros")
    assert not table(fresh).any()
    fresh.load_imgtxt_template()
    assert torch.equal(fresh.get_all_embeddings()[1], original)
    fresh.close()
    p1 = le.TrainableEmbeddingManager(sample_ids=sample_ids, embedding_dim=DIM, embeddings_dir=str(base / "p1_dest"),
                                      mode="ram", initialization_strategy="zeros")
    p1.load_phase_1_template(str(phase1))
    assert torch.equal(p1.get_all_embeddings()[1], original)
    p1.close()
    single = le.TrainableEmbeddingManager(sample_ids=list(range(100)), embedding_dim=8,
                                          embeddings_dir=str(base / "single"), mode="ram")
    single.update_embeddings([42], torch.ones(1, 8))
    assert torch.equal(single.get_embeddings([42]).detach(), torch.ones(1, 8))
    single.close()


def test_migrating_has_a_table_per_upstream_version():
    """Item 11: docs/MIGRATING.md covers each upstream version, not only the September one."""
    text = (Path(ROOT) / "docs" / "MIGRATING.md").read_text()
    for needle in ("embedding_manager_nocache.py", "2025-09-30", "2025-10-14", "2026-03-09", "2026-04-07",
                   "2026-04-28", 'mode="ram"', "embeddings.npy", "TemplateIncompatibleError", "export-cosir"):
        assert needle in text, needle
    assert text.count("\n|") >= 10  # tables, one row per behaviour and version

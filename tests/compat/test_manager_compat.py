"""The CoSiR drop-in's compatibility features beyond the replays: export-cosir, the exit/GC finalizer,
dtype casts, attribute assignment, caller-order reopen, bad template sources, failed initialisations,
bounded PCA memory (issue 13)."""

from __future__ import annotations

import gc
import json
import logging
import os
import textwrap
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from checkout import run_cli, run_python  # noqa: E402

import lmdb_embeddings as le  # noqa: E402

DIM = 4


def write_memmap_files(directory, ids, groups, dim):
    """The three files of the 2026-04 memmap manager, written with numpy as upstream wrote them."""
    rows = np.concatenate(list(groups)).astype(np.float32)
    assert rows.shape == (len(ids), dim)
    np.save(os.path.join(directory, "embeddings.npy"), rows)
    np.save(os.path.join(directory, "sample_ids.npy"), np.asarray(ids, np.int64))
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump({"total_samples": len(ids), "embedding_dim": dim}, f)


def manager(path, ids=range(120), **kw):
    args = dict(sample_ids=list(ids), embedding_dim=DIM, device="cpu", storage_mode="disk",
                initialization_strategy="normal", embeddings_dir=str(path), chunk_size=25, seed=1)
    args.update(kw)
    return le.TrainableEmbeddingManager(**args)


def committed(store_path) -> tuple[np.ndarray, np.ndarray]:
    with le.EmbeddingStore.open(store_path, readonly=True) as store:
        return store.ids, store.get(store.ids)


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}")


# ------------------------------------------------------------------------------ export-cosir
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_export_cosir_is_bit_exact_on_reimport_and_exports_the_committed_state(tmp_path, dtype):
    rng = np.random.default_rng(3)
    ids = rng.choice(10**9, size=530, replace=False) - 5 * 10**8  # unsorted, negative too
    rows = rng.standard_normal((530, 6)).astype(dtype)
    src = str(tmp_path / "src")
    with le.EmbeddingStore.create(src, ids, 6, dtype=dtype, chunk_rows=100, init=rows):
        pass
    writer = le.EmbeddingStore.open(src)
    writer.put(ids[:3], np.zeros((3, 6)))  # uncommitted: an export shows the committed state only
    proc = run_cli("export-cosir", src, str(tmp_path / "out"))
    writer.rollback()
    writer.close()
    assert proc.returncode == 0, proc.stderr
    assert "530 rows" in proc.stdout and "6 chunk files" in proc.stdout
    chunk = torch.load(tmp_path / "out" / "embeddings_chunk_5.pt", weights_only=True)
    assert list(chunk) == ids[500:].tolist() and all(v.dtype == getattr(torch, dtype) for v in chunk.values())
    back = run_cli("import-cosir", str(tmp_path / "out"), str(tmp_path / "back"))
    assert back.returncode == 0, back.stderr
    with le.EmbeddingStore.open(str(tmp_path / "back"), readonly=True) as store:
        assert np.array_equal(store.ids, ids) and store.chunk_rows == 100 and store.dtype == np.dtype(dtype)
        assert np.array_equal(bits(store.get(ids)), bits(rows))


def test_export_cosir_replaces_only_cosir_files(tmp_path):
    m = manager(tmp_path / "e")
    m.close()
    out = tmp_path / "out"
    assert le.export_cosir(m.store_path, out)["files"] == 5
    again = run_cli("export-cosir", m.store_path, str(out))
    assert again.returncode == 1 and "--force" in again.stderr and "Traceback" not in again.stderr
    (out / "embeddings_chunk_9.pt").write_bytes(b"stale")  # a leftover of a bigger table
    assert run_cli("export-cosir", "--force", m.store_path, str(out)).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [f"embeddings_chunk_{k}.pt" for k in range(5)]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    refused = run_cli("export-cosir", "--force", m.store_path, str(tmp_path / "other"))
    assert refused.returncode == 1 and "notes.txt" in refused.stderr
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
    with pytest.raises(le.CosirExportError):
        le.export_cosir(m.store_path, os.path.join(m.store_path, "inside"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging leftovers


def test_save_final_embeddings_formats_reopen(tmp_path):
    m = manager(tmp_path / "e", storage_mode="memory")
    m.update_embeddings([7, 3], torch.full((2, DIM), 2.5))
    _, table = m.get_all_embeddings()
    m.save_final_embeddings(str(tmp_path / "npy"), format="memmap")
    m.save_final_embeddings(str(tmp_path / "pt"), format="cosir")
    with pytest.raises(ValueError, match="format"):
        m.save_final_embeddings(str(tmp_path / "x"), format="hdf5")
    m.close()
    assert np.array_equal(np.load(tmp_path / "npy" / "sample_ids.npy"), np.arange(120))
    for name in ("npy", "pt"):
        ev = manager(tmp_path / name, initialization_strategy="random", auto_sync=False)
        assert torch.equal(ev.get_all_embeddings()[1], table)
        ev.close()


# ------------------------------------------------------------------------------ finalizer
def test_normal_exit_commits_with_auto_sync_and_discards_without(tmp_path):
    code = textwrap.dedent("""
        import logging, sys, torch, lmdb_embeddings as le
        logging.basicConfig(level=logging.INFO)
        auto = sys.argv[2] == "on"
        m = le.TrainableEmbeddingManager(sample_ids=list(range(120)), embedding_dim=4, device="cpu",
                                         storage_mode="memory", initialization_strategy="zeros",
                                         embeddings_dir=sys.argv[1], auto_sync=auto, sync_batch_size=100)
        m.update_embeddings([3], torch.full((1, 4), 7.0))
        with torch.no_grad():
            m.embeddings.data[m.id_to_index[5]] = 9.0  # a direct write, as the 2026-04-20 loop does
    """)
    for auto in ("on", "off"):
        d = tmp_path / auto
        proc = run_python(code, str(d), auto)
        ids, rows = committed(os.path.join(d, "embeddings.lmdb"))
        kept = auto == "on"
        assert (rows[3] == 7.0).all() == kept and (rows[5] == 9.0).all() == kept
        assert ("committed 1 pending updates" in proc.stderr) == kept
        assert ("discarding 1 uncommitted updates" in proc.stderr) == (not kept)


def test_a_forked_child_exiting_never_commits_its_parents_manager(tmp_path):
    code = textwrap.dedent("""
        import os, sys, torch, lmdb_embeddings as le
        m = le.TrainableEmbeddingManager(sample_ids=list(range(120)), embedding_dim=4, device="cpu",
                                         storage_mode="disk", initialization_strategy="zeros",
                                         embeddings_dir=sys.argv[1], auto_sync=True, sync_batch_size=100)
        m.update_embeddings([3], torch.full((1, 4), 7.0))
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a normal exit runs the child's atexit hooks (and so its inherited finalizers)
        os.waitpid(pid, 0)
        with le.EmbeddingStore.open(m.store_path, readonly=True) as reader:
            print("CHILD-COMMITTED" if (reader.get([3]) == 7.0).all() else "NOT-COMMITTED")
        m.close()
    """)
    proc = run_python(code, str(tmp_path / "e"))
    assert "NOT-COMMITTED" in proc.stdout, proc.stdout + proc.stderr
    assert (committed(str(tmp_path / "e" / "embeddings.lmdb"))[1][3] == 7.0).all()  # the parent's close did


def test_an_unreachable_manager_is_released_at_once(tmp_path):
    gc.disable()  # no cycle collection: the manager must not be part of a reference cycle
    try:
        m = manager(tmp_path / "e", storage_mode="memory")
        for name in ("chunk_mapping", "id_to_chunk_index", "id_to_index", "sample_ids", "cache", "dirty_chunks",
                     "performance_stats", "embeddings"):
            getattr(m, name)
        m.cache.get_cache_info()
        m.update_embeddings([1], torch.ones(1, DIM))
        del m
        again = manager(tmp_path / "e")
        assert torch.equal(again.get_embeddings([1]), torch.ones(1, DIM))  # committed by the finalizer
        again.close()
    finally:
        gc.enable()


# ------------------------------------------------------------------------------ dtypes and values
@pytest.mark.parametrize("mode", ["disk", "memory"])
def test_update_dtypes_and_refused_values_change_nothing(tmp_path, mode):
    m = manager(tmp_path / "e", storage_mode=mode)
    before = m.get_all_embeddings()[1].clone()
    m.update_embeddings([1, 2], torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]))  # integers are cast
    m.update_embeddings([3], torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.bfloat16, requires_grad=True))
    m.update_embeddings([4], np.array([[1e-40, 2.0, 3.0, 4.0]], dtype=np.float64))
    got = m.get_embeddings([1, 2, 3, 4]).detach()
    assert got.dtype == torch.float32
    assert torch.equal(got[:2], torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]))
    assert torch.equal(got[2], torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.bfloat16).float())
    assert torch.equal(got[3], torch.tensor([1e-40, 2.0, 3.0, 4.0], dtype=torch.float64).float())
    expected = before.clone()
    expected[1:5] = got
    for bad, error in ((torch.full((1, DIM), float("nan")), ValueError),
                       (torch.ones(1, DIM, dtype=torch.complex64), TypeError),
                       (torch.ones(2, DIM), ValueError)):
        with pytest.raises(error) as info:
            m.update_embeddings([9], bad)
        assert isinstance(info.value, le.EmbeddingStoreError)
    assert torch.equal(m.get_all_embeddings()[1], expected)  # nothing of a refused call was applied
    if mode == "memory":
        with torch.no_grad():
            m.embeddings.data[0, 0] = float("inf")
        with pytest.raises(ValueError, match="NaN or inf"):
            m.force_sync_all_chunks()
    m.close() if mode == "disk" else m.__exit__(RuntimeError, None, None)


def test_float16_store_takes_float32_updates(tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    rows = torch.arange(40, dtype=torch.float16).reshape(10, 4)
    torch.save({i: rows[i] for i in range(10)}, d / "embeddings_chunk_0.pt")
    m = manager(d, ids=range(10), storage_mode="memory")
    assert m.embeddings.dtype == torch.float16
    m.update_embeddings([2], torch.tensor([[0.1, 0.2, 0.3, 70000.0 / 2]]))
    assert torch.equal(m.get_embeddings([2]).detach(), torch.tensor([[0.1, 0.2, 0.3, 35000.0]]).half())
    m.close()


# ------------------------------------------------------------------------------ attributes
def test_assignments_are_honoured_or_refused_never_ignored(tmp_path):
    m = manager(tmp_path / "e", storage_mode="memory", auto_sync=True, sync_batch_size=50)
    for name, value in (("embeddings", torch.nn.Parameter(torch.zeros(120, DIM))), ("embedding_dim", 8),
                        ("device", "cuda"), ("storage_mode", "disk"), ("embeddings_dir", str(tmp_path)),
                        ("chunk_size", 10), ("dirty_chunks", set()), ("performance_stats", {}), ("cache", None),
                        ("mode", "mmap"), ("enable_l3_cache", False), ("cache_l1_size_mb", 1)):
        before = getattr(m, name)
        with pytest.raises(le.EmbeddingStoreError) as info:
            setattr(m, name, value)
        assert isinstance(info.value, (AttributeError, ValueError)) and name in str(info.value)
        if name not in ("cache", "performance_stats", "dirty_chunks"):
            assert getattr(m, name) is before or getattr(m, name) == before
    for name in ("chunk_mapping", "id_to_chunk_index", "id_to_index", "sample_ids", "chunk_size"):
        setattr(m, name, getattr(m, name))  # an equal value is accepted
    m.sample_ids = np.arange(120)
    with pytest.raises(ValueError, match="sample_ids"):
        m.sample_ids = list(range(1, 121))
    with pytest.raises(ValueError, match="id_to_index"):
        m.id_to_index = {0: 1}
    with pytest.raises(ValueError):
        m.sync_batch_size = -1
    m.sync_batch_size = 2  # honoured: the next commit comes after two updates
    m.update_embeddings([0], torch.ones(1, DIM))
    assert not (committed(m.store_path)[1][0] == 1.0).all()
    m.update_embeddings([1], torch.ones(1, DIM))
    assert (committed(m.store_path)[1][:2] == 1.0).all()
    m.auto_sync = False  # honoured: close discards from now on
    m.update_embeddings([2], torch.ones(1, DIM))
    m.close()
    assert not (committed(m.store_path)[1][2] == 1.0).all()


# ------------------------------------------------------------------------------ caller order
def test_memmap_style_reopen_in_another_order_matches_rows_by_id(tmp_path):
    m = le.TrainableEmbeddingManager([5, 3, 9], DIM, str(tmp_path / "e"), "ram")
    m.update_embeddings([5, 3, 9], torch.tensor([[5.0] * DIM, [3.0] * DIM, [9.0] * DIM]))
    m.close()
    again = le.TrainableEmbeddingManager([9, 5, 3, 11], DIM, str(tmp_path / "e"), mode="ram")
    ids, rows = again.get_all_embeddings()
    assert ids == [9, 5, 3, 11] and rows[:3, 0].tolist() == [9.0, 5.0, 3.0] and (rows[3] == 0).all()
    assert again.id_to_index == {9: 0, 5: 1, 3: 2, 11: 3}
    assert torch.equal(again.embeddings[again.id_to_index[3]].detach(), torch.full((DIM,), 3.0))
    again._copy_to(tmp_path / "copy")
    assert np.load(tmp_path / "copy" / "sample_ids.npy").tolist() == [9, 5, 3, 11]
    again.close()


# ------------------------------------------------------------------------------ template sources
def test_phase_1_loads_check_their_source_first(tmp_path, caplog):
    m = manager(tmp_path / "e")
    base = m.get_all_embeddings()[1].clone()
    src = tmp_path / "partial"
    src.mkdir()
    write_memmap_files(str(src), np.arange(100, 130), [np.full((30, DIM), 4.0, np.float32)], DIM)
    with caplog.at_level(logging.WARNING, logger="lmdb_embeddings"):
        m.load_phase_1_template(str(src))  # ids 100..119 are ours, 120..129 are not
    assert any("20 of this manager's 120" in r.getMessage() for r in caplog.records)
    rows = m.get_all_embeddings()[1]
    assert (rows[100:] == 4.0).all() and torch.equal(rows[:100], base[:100])
    loaded = rows.clone()
    bad = tmp_path / "bad"
    bad.mkdir()
    nan_rows = np.full((120, DIM), 1.0, np.float32)
    nan_rows[77] = np.nan
    write_memmap_files(str(bad), np.arange(120), [nan_rows], DIM)
    for source, error in ((bad, ValueError), (tmp_path / "missing", FileNotFoundError)):
        with pytest.raises(error) as info:
            m.load_phase_1_template(str(source))
        assert isinstance(info.value, le.EmbeddingStoreError)
    other = tmp_path / "other"
    other.mkdir()
    write_memmap_files(str(other), np.arange(500, 510), [np.ones((10, DIM), np.float32)], DIM)
    wide = tmp_path / "wide"
    wide.mkdir()
    write_memmap_files(str(wide), np.arange(120), [np.ones((120, DIM + 1), np.float32)], DIM + 1)
    for source in (other, wide):
        with pytest.raises(le.TemplateIncompatibleError):
            m.load_phase_1_template(str(source))
    assert torch.equal(m.get_all_embeddings()[1], loaded)  # every refused load changed nothing
    m.close()


# ------------------------------------------------------------------------------ initialisations
class Chunks:
    """A chunk FeatureManager whose chunk 2 is shorter than the manager's chunk 2."""

    chunk_size = 25

    def get_num_chunks(self):
        return 4

    def get_features_by_chunk(self, k, feature_types=None, async_prefetch=True):
        n = 20 if k == 2 else 25
        feats = torch.full((n, 6), float(k + 1)) + torch.arange(6.0)
        return {"img_features": feats, "txt_features": feats * 0.5, "sample_ids": list(range(k * 25, k * 25 + n))}


class ShortShards(Chunks):
    """A shard FeatureManager that has no features for sample ids 95..119."""

    def get_all_sample_ids(self):
        return list(range(95))


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.combiner = torch.nn.Module()
        self.combiner.label_proj_layer = torch.nn.Linear(DIM, 6, bias=False)


def test_a_failed_initialisation_changes_nothing(tmp_path):
    m = manager(tmp_path / "e", storage_mode="memory")
    before = m.get_all_embeddings()[1].clone()
    commits = m.store.commit_count
    with pytest.raises(ValueError, match="Length mismatch: feature chunk 2"):
        m.initialize_embeddings_imgtxt(Chunks(), Model(), "cpu")  # chunks 0 and 1 were written, then rolled back
    with pytest.raises(ValueError, match="have no features"):
        m.initialize("img", feature_manager=ShortShards())
    with pytest.raises(ValueError, match="bogus"):
        m.initialize("bogus")
    assert torch.equal(m.get_all_embeddings()[1], before) and torch.equal(m.embeddings.detach(), before)
    assert m.store.commit_count == commits and not m.dirty_chunks
    m.close()


def test_pca_memory_does_not_grow_with_the_feature_table(tmp_path):
    class Shards:
        def __init__(self, n):
            self.n = n

        def get_num_chunks(self):
            return self.n // 250

        def get_features_by_chunk(self, k):
            g = torch.Generator().manual_seed(k)
            img, txt = torch.randn(250, 512, generator=g), torch.randn(250, 512, generator=g)
            return {"img_features": img, "txt_features": txt, "sample_ids": torch.arange(k * 250, (k + 1) * 250)}

        def get_all_sample_ids(self):
            return list(range(self.n))

    peaks = {}
    for n in (2000, 8000):
        m = le.TrainableEmbeddingManager(sample_ids=list(range(n)), embedding_dim=2,
                                         embeddings_dir=str(tmp_path / f"e{n}"), mode="mmap")
        tracemalloc.start()
        m.initialize_embeddings_imgtxt(Shards(n), None, "cpu", factor=1.0)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        m.close()
    features = 2 * 8000 * 512 * 8  # the float64 img and txt features of the bigger table: 62.5 MiB
    assert peaks[8000] < features / 4, peaks
    assert peaks[8000] < peaks[2000] + (1 << 20), peaks


def test_constructor_arguments_are_checked(tmp_path):
    m = le.TrainableEmbeddingManager([3, 1, 2], DIM, 0 if torch.cuda.is_available() else "cpu",
                                     embeddings_dir=str(tmp_path / "a"))  # a CUDA index is a device
    assert m.sample_ids == [1, 2, 3]  # chunk-style: sorted
    with pytest.raises(ValueError, match="own store"):
        m.load_phase_1_template(str(tmp_path / "a"))
    m.close()
    for args, kwargs, error in (((), {"embeddings_dir": 3.5}, TypeError), (("ram",), {"mode": "ram"}, TypeError),
                                ((), {"mode": "disk"}, ValueError), ((), {"sync_batch_size": -1}, ValueError),
                                ((), {"bogus": 1}, TypeError), ((), {"initialization_strategy": "imgtxt"}, ValueError)):
        with pytest.raises(error) as info:
            le.TrainableEmbeddingManager([1, 2], DIM, *args, **{"embeddings_dir": str(tmp_path / "b"), **kwargs})
        assert isinstance(info.value, le.EmbeddingStoreError)
    assert not (tmp_path / "b").exists()  # a refused call creates nothing

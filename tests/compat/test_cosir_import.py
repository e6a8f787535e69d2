"""import-cosir: original ``embeddings_chunk_{i}.pt`` directories -> a store, streaming, with clear errors."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from checkout import run_cli  # noqa: E402
from upstream_managers import write_original  # noqa: E402

import lmdb_embeddings as le  # noqa: E402
from lmdb_embeddings.compat.files import CosirImportError, import_cosir  # noqa: E402


def sample(n=530, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(10**6, size=n, replace=False)).astype(np.int64)
    return ids, rng.standard_normal((n, dim)).astype(np.float32)


def no_leftovers(parent) -> bool:
    return not [n for n in os.listdir(parent) if n.startswith(".")]


def test_import_is_bit_exact_and_keeps_chunking(tmp_path):
    ids, rows = sample()
    write_original(tmp_path / "src", ids, rows, chunk_size=100)
    summary = import_cosir(tmp_path / "src", tmp_path / "store")
    assert summary == {"files": 6, "rows": 530, "dim": 12, "dtype": "float32", "chunk_rows": 100,
                       "path": str(tmp_path / "store")}
    with le.EmbeddingStore.open(str(tmp_path / "store"), readonly=True) as store:
        assert np.array_equal(store.ids, ids)
        assert np.array_equal(store.get(ids), rows)
        assert store.chunk_rows == 100


def test_files_are_taken_in_numeric_chunk_order(tmp_path):
    ids, rows = sample(n=1200, dim=4)
    write_original(tmp_path / "src", ids, rows, chunk_size=100)  # chunk_10, chunk_11 sort after chunk_1 as text
    import_cosir(tmp_path / "src", tmp_path / "store")
    with le.EmbeddingStore.open(str(tmp_path / "store"), readonly=True) as store:
        assert np.array_equal(store.ids, ids)


def test_cli_import_cosir(tmp_path):
    ids, rows = sample(n=250, dim=6)
    write_original(tmp_path / "src", ids, rows, chunk_size=100)
    proc = run_cli("import-cosir", str(tmp_path / "src"), str(tmp_path / "store"))
    assert proc.returncode == 0, proc.stderr
    assert "250 rows x 6" in proc.stdout and proc.stderr == ""  # no progress bar when not a TTY
    with le.EmbeddingStore.open(str(tmp_path / "store"), readonly=True) as store:
        assert np.array_equal(store.get(ids), rows)
    again = run_cli("import-cosir", str(tmp_path / "src"), str(tmp_path / "store"))
    assert again.returncode != 0 and "exists" in again.stderr and "Traceback" not in again.stderr
    forced = run_cli("import-cosir", str(tmp_path / "src"), str(tmp_path / "store"), "--force")
    assert forced.returncode == 0, forced.stderr
    missing = run_cli("import-cosir", str(tmp_path / "nowhere"), str(tmp_path / "s2"))
    assert missing.returncode != 0 and "nowhere" in missing.stderr and len(missing.stderr.splitlines()) == 1


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory") as info:
        import_cosir(tmp_path / "nowhere", tmp_path / "store")
    assert isinstance(info.value, le.EmbeddingStoreError)
    assert not os.path.exists(tmp_path / "store")


def test_directory_without_chunk_files(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("x")
    with pytest.raises(CosirImportError, match="no embeddings_chunk"):
        import_cosir(tmp_path / "src", tmp_path / "store")
    assert not os.path.exists(tmp_path / "store")


def test_mixed_dims(tmp_path):
    ids, rows = sample(n=300, dim=8)
    write_original(tmp_path / "src", ids, rows, chunk_size=100)
    torch.save({10**7 + i: torch.zeros(9) for i in range(5)}, tmp_path / "src" / "embeddings_chunk_3.pt")
    with pytest.raises(CosirImportError, match="embeddings_chunk_3.pt.*mixed dims"):
        import_cosir(tmp_path / "src", tmp_path / "store")
    assert not os.path.exists(tmp_path / "store") and no_leftovers(tmp_path)


def test_corrupt_file_names_the_file_and_leaves_no_store(tmp_path):
    ids, rows = sample(n=300, dim=8)
    files = write_original(tmp_path / "src", ids, rows, chunk_size=100)
    with open(files[1], "r+b") as f:
        f.truncate(os.path.getsize(files[1]) // 2)
    with pytest.raises(CosirImportError, match="embeddings_chunk_1.pt") as info:
        import_cosir(tmp_path / "src", tmp_path / "store")
    assert isinstance(info.value, ValueError) and isinstance(info.value, le.EmbeddingStoreError)
    assert not os.path.exists(tmp_path / "store") and no_leftovers(tmp_path)


def test_existing_store_is_kept_when_an_overwrite_fails(tmp_path):
    ids, rows = sample(n=200, dim=8)
    write_original(tmp_path / "good", ids, rows, chunk_size=100)
    import_cosir(tmp_path / "good", tmp_path / "store")
    files = write_original(tmp_path / "bad", ids, rows + 1, chunk_size=100)
    with open(files[1], "wb") as f:
        f.write(b"not a torch file")
    with pytest.raises(CosirImportError):
        import_cosir(tmp_path / "bad", tmp_path / "store", overwrite=True)
    with le.EmbeddingStore.open(str(tmp_path / "store"), readonly=True) as store:
        assert np.array_equal(store.get(ids), rows)


def test_non_unique_ids_across_files(tmp_path):
    ids, rows = sample(n=200, dim=8)
    write_original(tmp_path / "src", ids, rows, chunk_size=100)
    torch.save({int(ids[5]): torch.zeros(8)}, tmp_path / "src" / "embeddings_chunk_2.pt")
    with pytest.raises(CosirImportError, match="embeddings_chunk_2.pt.*unique"):
        import_cosir(tmp_path / "src", tmp_path / "store")
    assert not os.path.exists(tmp_path / "store")


def test_numpy_integer_sample_ids(tmp_path):
    """The original kept sample IDs as passed: numpy integers end up as the file's keys."""
    (tmp_path / "src").mkdir()
    rows = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({np.int64(10 + i): rows[i] for i in range(3)}, tmp_path / "src" / "embeddings_chunk_0.pt")
    import_cosir(tmp_path / "src", tmp_path / "store")
    with le.EmbeddingStore.open(str(tmp_path / "store"), readonly=True) as store:
        assert store.ids.tolist() == [10, 11, 12]
        assert np.array_equal(store.get([10, 11, 12]), rows.numpy())


class Payload:
    """Not a tensor: a weights_only load must refuse to unpickle it."""


def test_pickled_objects_are_refused(tmp_path):
    (tmp_path / "src").mkdir()
    torch.save({0: torch.zeros(4), 1: Payload()}, tmp_path / "src" / "embeddings_chunk_0.pt")
    with pytest.raises(CosirImportError, match="embeddings_chunk_0.pt"):
        import_cosir(tmp_path / "src", tmp_path / "store")


def test_wrong_content_types(tmp_path):
    (tmp_path / "src").mkdir()
    torch.save([torch.zeros(4)], tmp_path / "src" / "embeddings_chunk_0.pt")
    with pytest.raises(CosirImportError, match="expected a dict"):
        import_cosir(tmp_path / "src", tmp_path / "store")
    torch.save({"a": torch.zeros(4)}, tmp_path / "src" / "embeddings_chunk_0.pt")
    with pytest.raises(CosirImportError, match="not an integer"):
        import_cosir(tmp_path / "src", tmp_path / "store")
    torch.save({0: torch.zeros(2, 4)}, tmp_path / "src" / "embeddings_chunk_0.pt")
    with pytest.raises(CosirImportError, match="1-D"):
        import_cosir(tmp_path / "src", tmp_path / "store")


def test_memory_stays_bounded(tmp_path):
    """Peak Python/numpy memory depends on one file, not on the table size."""
    rng = np.random.default_rng(0)
    peaks = {}
    for n_files in (4, 16):
        n = n_files * 100
        ids = np.arange(n, dtype=np.int64)
        rows = rng.standard_normal((n, 1024)).astype(np.float32)  # 400 KiB per file
        write_original(tmp_path / f"src{n_files}", ids, rows, chunk_size=100)
        del rows
        tracemalloc.start()
        import_cosir(tmp_path / f"src{n_files}", tmp_path / f"store{n_files}")
        peaks[n_files] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    table_16 = 16 * 100 * 1024 * 4
    assert peaks[16] < table_16 / 2, peaks  # far below the 6.4 MiB table
    assert peaks[16] < peaks[4] + (2 << 20), peaks  # 4x the rows, about the same peak

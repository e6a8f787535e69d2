"""Upstream CoSiR files written and read through the one table path: full disks, and each .pt file loaded once.

The round trips themselves are the shipped ``TableContract`` (tests/testing/test_contracts.py, kinds
``memmap`` and ``cosir``) and the replays of tests/compat/test_cosir_versions.py.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from checkout import run_python  # noqa: E402
from guarantees_lib import hidden_entries, small_tmpfs  # noqa: E402

import lmdb_embeddings as le  # noqa: E402

DIM = 32


@pytest.mark.parametrize("fmt", ["memmap", "cosir"])
def test_saving_upstream_files_on_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path, fmt):
    """Before: ``format="memmap"`` wrote through ``np.lib.format.open_memmap``, a shared mapping of a
    sparse file, and a full disk killed the process with SIGBUS (exit -7); ``format="cosir"`` raised a
    bare ``OSError`` (or torch's ``RuntimeError``), not an ``EmbeddingStoreError``."""
    code = textwrap.dedent("""
        import sys, torch, lmdb_embeddings as le
        m = le.TrainableEmbeddingManager(sample_ids=list(range(20000)), embedding_dim=32, device="cpu",
                                         storage_mode="disk", initialization_strategy="normal",
                                         embeddings_dir=sys.argv[1], seed=1)
        try:
            m.save_final_embeddings(sys.argv[2], format=sys.argv[3])
        except le.StorageError as exc:
            print("refused:", exc)
        m.save_final_embeddings(sys.argv[4], format=sys.argv[3])  # the manager keeps working
        m.close()
    """)
    with small_tmpfs(str(tmp_path / "small_fs"), "1m") as mnt:  # the table takes 2.4 MiB
        proc = run_python(code, str(tmp_path / "e"), os.path.join(mnt, "out"), fmt, str(tmp_path / "ok"), check=False)
        assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
        assert "refused:" in proc.stdout and "No space left" in proc.stdout, proc.stdout
        assert os.listdir(mnt) == [] and hidden_entries(mnt, "out") == []
    assert os.listdir(tmp_path / "ok")


def test_import_cosir_on_a_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = torch.randn(4000, DIM)
    for k in range(4):
        torch.save({k * 1000 + i: rows[k * 1000 + i] for i in range(1000)}, src / f"embeddings_chunk_{k}.pt")
    with small_tmpfs(str(tmp_path / "small_fs"), "256k") as mnt:  # the rows alone take 500 KiB
        with pytest.raises(le.StorageError):
            le.import_cosir(src, os.path.join(mnt, "store"))
        assert os.listdir(mnt) == []


def test_a_phase_1_load_of_chunk_files_loads_each_file_once(tmp_path, monkeypatch):
    """Before: the source was read twice (checked, then written), and each .pt file loaded twice."""
    src = tmp_path / "phase1"
    m = le.TrainableEmbeddingManager(sample_ids=list(range(300)), embedding_dim=DIM, device="cpu",
                                     storage_mode="disk", initialization_strategy="normal",
                                     embeddings_dir=str(tmp_path / "e1"), chunk_size=100, seed=1)
    m.save_final_embeddings(str(src), format="cosir")
    want = m.get_all_embeddings()[1]
    m.close()
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, *a, **kw: loads.append(os.path.basename(path)) or
                        real_load(path, *a, **kw))
    fresh = le.TrainableEmbeddingManager(sample_ids=list(range(300)), embedding_dim=DIM, device="cpu",
                                         storage_mode="disk", initialization_strategy="zeros",
                                         embeddings_dir=str(tmp_path / "e2"), chunk_size=100)
    fresh.load_phase_1_template(str(src))
    assert sorted(loads) == [f"embeddings_chunk_{k}.pt" for k in range(3)]
    assert torch.equal(fresh.get_all_embeddings()[1], want)
    assert [n for n in os.listdir(tmp_path / "e2") if n.startswith(".") or n.startswith("tmp")] == []
    fresh.close()


def test_upstream_memmap_files_with_a_repeated_sample_id_are_refused_before_anything_is_built(tmp_path):
    directory = tmp_path / "e"
    directory.mkdir()
    np.save(directory / "embeddings.npy", np.ones((3, DIM), np.float32))
    np.save(directory / "sample_ids.npy", np.array([5, 7, 5], np.int64))
    with pytest.raises(ValueError, match="sample id 5 more than once") as info:
        le.TrainableEmbeddingManager([5, 7], DIM, str(directory), mode="ram")
    assert isinstance(info.value, le.EmbeddingStoreError)
    assert sorted(os.listdir(directory)) == ["embeddings.npy", "sample_ids.npy"]

"""The CUDA paths: rows served to and gradients taken from a CUDA device (skipped without one).

Run on a machine with a GPU: ``python -m pytest -q -m gpu``. The math runs on the CPU (the
store lives in host memory), so a CUDA run must give the same numbers as a CPU run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmdb_embeddings as le
from lmdb_embeddings.torch import SparseAdam, StoreEmbedding

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_get_tensor_on_cuda_equals_the_cpu_rows(small_store):
    ids = [5, 1, 5, 999]
    t = small_store.get_tensor(ids, device="cuda")
    assert t.device.type == "cuda" and t.dtype == torch.float32
    assert np.array_equal(t.cpu().numpy(), small_store.get(ids))


def _train(path: str, device: str) -> tuple[np.ndarray, np.ndarray]:
    with le.EmbeddingStore.create(path, 500, 16, chunk_rows=64, seed=4) as store:
        emb = StoreEmbedding(store).to(device)
        head = torch.nn.Linear(16, 3).to(device)
        torch.nn.init.constant_(head.weight, 0.1)
        torch.nn.init.zeros_(head.bias)
        opt = SparseAdam(emb, lr=0.01)
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            ids = torch.randint(0, 500, (64,), generator=gen)
            out = emb(ids.to(device))
            assert out.device.type == torch.device(device).type
            loss = torch.nn.functional.cross_entropy(head(out), (ids % 3).to(device))
            loss.backward()
            opt.step()
            opt.zero_grad()
        return store.get(store.ids), store.get_column(opt.state_columns["exp_avg"], store.ids)


def test_training_on_cuda_gives_the_cpu_numbers(tmp_path):
    cpu_rows, cpu_state = _train(str(tmp_path / "cpu"), "cpu")
    gpu_rows, gpu_state = _train(str(tmp_path / "gpu"), "cuda")
    np.testing.assert_allclose(gpu_rows, cpu_rows, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gpu_state, cpu_state, rtol=1e-5, atol=1e-7)


def test_embedding_dataset_batches_pin_to_cuda(small_store):
    loader = torch.utils.data.DataLoader(le.EmbeddingDataset(small_store), batch_size=100, pin_memory=True)
    batch = next(iter(loader))
    assert batch.is_pinned()
    assert np.array_equal(batch.to("cuda", non_blocking=True).cpu().numpy(), small_store.get(small_store.ids[:100]))


def test_cosir_manager_on_cuda(tmp_path):
    """The drop-in on a CUDA device: memory mode's Parameter and its rows live there, updates from CUDA
    tensors of any float dtype are cast, direct writes are saved, disk-mode rows come back on the device."""
    ids = list(range(300))
    m = le.TrainableEmbeddingManager(sample_ids=ids, embedding_dim=8, device="cuda", storage_mode="memory",
                                     initialization_strategy="zeros", embeddings_dir=str(tmp_path / "m"),
                                     chunk_size=64, auto_sync=True, sync_batch_size=100)
    assert m.embeddings.device.type == "cuda"
    rows = m.get_embeddings([3, 7])
    assert rows.device.type == "cuda" and rows.requires_grad
    m.update_embeddings([3], torch.full((1, 8), 0.5, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        m.embeddings.data[m.id_to_index[7]] = 2.0
    m.force_sync_all_chunks()
    m.close()
    disk = le.TrainableEmbeddingManager(sample_ids=ids, embedding_dim=8, device="cuda", storage_mode="disk",
                                        embeddings_dir=str(tmp_path / "m"))
    got = disk.get_embeddings([3, 7])
    assert got.device.type == "cuda" and got.dtype == torch.float32
    assert torch.equal(got.cpu(), torch.tensor([[0.5] * 8, [2.0] * 8]))
    disk.close()

"""Training against a store: ``StoreEmbedding`` and row-wise optimizers that keep their state in it.

Imported on demand (``import lmdb_embeddings`` never imports torch)::

    from lmdb_embeddings.torch import StoreEmbedding, SparseAdam
    emb = StoreEmbedding(store)
    opt = SparseAdam(emb, lr=1e-3)
    loss = model(emb(ids)).sum(); loss.backward(); opt.step(); opt.zero_grad()
    store.commit()   # rows AND optimizer state become durable together

The optimizers reproduce ``torch.optim.SGD`` / ``Adagrad`` / ``SparseAdam`` on the sparse
gradients of ``nn.Embedding(sparse=True)`` bit for bit (``SparseAdamW`` adds decoupled
weight decay on the rows it touches). Their state lives in auxiliary columns of the store
(docs/FORMAT.md, "Optimizer state"), so a reopened store resumes exactly.

``StoreEmbedding`` keeps ``nn.Embedding``'s habits (``zero_grad`` from any parent,
``requires_grad_``, ``.half()``/``.to(dtype)``, ``padding_idx``, ``max_norm``, deepcopy/pickle/
``torch.save``, ``state_dict``); ``clip_grad_norm_`` is torch's, seeing the rows' gradients too.
"""

from __future__ import annotations

from ..handle import ShardedTableHandle, TableHandle
from .clipping import clip_grad_norm_
from .embedding import StoreEmbedding
from .optimizers import SparseAdagrad, SparseAdam, SparseAdamW, SparseSGD, StoreOptimizer

__all__ = ["StoreEmbedding", "StoreOptimizer", "SparseSGD", "SparseAdagrad", "SparseAdam", "SparseAdamW",
           "clip_grad_norm_", "TableHandle", "ShardedTableHandle"]

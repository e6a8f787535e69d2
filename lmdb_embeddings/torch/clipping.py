"""clip_grad_norm_: torch's gradient clipping, over the dense parameters AND the rows a StoreEmbedding serves.

``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)`` cannot see the rows' gradients:
they are not in any parameter's ``.grad`` (a StoreEmbedding keeps them for its optimizer;
its only parameter, ``proxy``, has zero elements). This function takes the same arguments
(``model.parameters()``, a list of tensors, a module) and counts each StoreEmbedding's
pending gradient in the total norm, as the gradient of an ``nn.Embedding`` table would be
counted, then scales it by the same factor as the dense gradients.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import InvalidInputError
from ..handle import is_sharded
from .embedding import StoreEmbedding, owner_of_proxy

ParametersLike = nn.Module | torch.Tensor | Iterable[torch.Tensor | nn.Module]


def clip_grad_norm_(parameters: ParametersLike, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also clips the gradients StoreEmbeddings hold for their next step.

    Args:
        parameters: what torch's takes (``model.parameters()``, tensors), or modules: every
            StoreEmbedding among them, or whose ``proxy`` parameter is among them, counts.
        max_norm, norm_type, error_if_nonfinite, foreach: as torch's.
    Returns:
        The total norm of all the gradients (dense and rows), as one tensor, as torch's.

    The rows' gradient counts as the (coalesced) gradient of their table, so the result equals
    torch's on a model whose ``nn.Embedding`` holds the same rows.
    """
    tensors, embeddings = _split(parameters)
    for emb in embeddings:
        if is_sharded(emb.store):
            raise InvalidInputError("clip_grad_norm_: the rows' gradients of a StoreEmbedding on a "
                                    "ShardedEmbeddingStore are summed at their owners during the step, so their norm "
                                    "is not known on this rank; clipping them is not supported")
    dense = [p for p in tensors if p.grad is not None]
    pending = [(emb, emb.pending_gradients()) for emb in embeddings]
    rows = [(emb, grads.coalesced_values()) for emb, grads in pending if grads is not None]
    all_grads = [p.grad for p in dense if p.grad is not None] + [values for _, values in rows]
    if not all_grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(all_grads, norm_type, error_if_nonfinite, foreach)
    torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total, foreach)
    coefficient = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # torch's clip_coef_clamped
    if coefficient < 1.0:
        for emb, _ in rows:
            emb.scale_gradients_(coefficient)
    return total


def _split(parameters: ParametersLike) -> tuple[list[torch.Tensor], list[StoreEmbedding]]:
    """(dense tensors, StoreEmbeddings) named by ``parameters``, each once, in order."""
    items = [parameters] if isinstance(parameters, (nn.Module, torch.Tensor)) else list(parameters)
    tensors: list[torch.Tensor] = []
    embeddings: list[StoreEmbedding] = []
    for item in items:
        if isinstance(item, nn.Module):
            embeddings.extend(m for m in item.modules() if isinstance(m, StoreEmbedding))
            tensors.extend(item.parameters())
        elif isinstance(item, torch.Tensor):
            owner = owner_of_proxy(item)
            if owner is not None:
                embeddings.append(owner)
            else:
                tensors.append(item)
        else:
            raise InvalidInputError(f"clip_grad_norm_: parameters must be tensors or modules, got "
                                    f"{type(item).__name__}")
    unique_embeddings = list({id(e): e for e in embeddings}.values())
    proxies = {id(e.proxy) for e in unique_embeddings}
    unique_tensors = list({id(t): t for t in tensors if id(t) not in proxies}.values())
    return unique_tensors, unique_embeddings

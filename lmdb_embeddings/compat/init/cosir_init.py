"""The CoSiR initialisations of the label embeddings, from a FeatureManager's features.

Three upstream methods exist, and their callers use the very same call
(``initialize_embeddings_imgtxt(feature_manager, model, device, factor=...)``), so the
method is chosen from the arguments:

* a shard FeatureManager (it has ``get_all_sample_ids``, 2026-04 on): PCA to
  ``embedding_dim`` components, rows paired with samples **by sample id**, optional L2
  normalisation of the features before and of the rows after (``normalize``);
* a chunk FeatureManager and a model with ``combiner.label_proj_layer`` (2025-10 .. 2026-03,
  upstream main): ``source @ label_proj_layer.weight * factor`` per feature chunk, feature
  chunk ``k`` row ``i`` -> manager chunk ``k`` row ``i`` (the pairing the chunk training loop uses);
* a chunk FeatureManager and ``model=None`` (the 2026-03/04 PCA branch): PCA with the
  chunk-position pairing.

``source`` is ``img - txt`` (imgtxt), ``txt`` or ``img``. Features are streamed chunk by
chunk (two passes for the PCA); nothing holds the whole feature table.
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import InvalidInputError
from ...format.init import INIT_KINDS, chunk_values, init_spec
from ...inputs import as_ids
from .pca import PrincipalAxes, StreamingMoments

FEATURE_STRATEGIES = ("imgtxt", "txt", "img")
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def check_strategy(strategy) -> None:
    if strategy not in INIT_KINDS and strategy not in FEATURE_STRATEGIES:
        raise InvalidInputError(f"Unknown strategy {strategy!r}: use one of {', '.join(INIT_KINDS)} or "
                                f"{', '.join(FEATURE_STRATEGIES)} (with a feature_manager)")


def fill(table, strategy: str, seed: int) -> None:
    """Every row from the store's own initialiser (same ``seed`` -> the same table as ``create`` gives)."""
    spec = init_spec(strategy, len(table.store_ids), table.dim)
    with table.bulk_write(f"initialize({strategy!r})"):
        for chunk in range(table.n_chunks):
            ids = table.chunk_ids(chunk)
            table.write(ids, chunk_values(spec, seed, chunk, table.chunk_rows, table.dim, 0, len(ids), table.dtype))


def from_features(table, strategy: str, feature_manager, model, device, factor, normalize: bool) -> None:
    """The imgtxt / txt / img initialisation: the method is chosen from the arguments (module docstring)."""
    if strategy not in FEATURE_STRATEGIES:
        raise InvalidInputError(f"{strategy!r} is not a feature initialisation; use one of "
                                f"{', '.join(FEATURE_STRATEGIES)}")
    if feature_manager is None:
        raise InvalidInputError(f"the {strategy!r} initialisation reads features: pass feature_manager=")
    if callable(getattr(feature_manager, "get_all_sample_ids", None)):
        pca_by_sample_id(table, strategy, feature_manager, factor, normalize)
    elif model is None:
        pca_by_chunk_position(table, strategy, feature_manager, factor, normalize)
    else:
        if normalize:
            raise InvalidInputError("normalize=True belongs to the PCA initialisation (a shard FeatureManager, or "
                                    "model=None); the projection through the model's label_proj_layer has none")
        project_by_chunk_position(table, strategy, feature_manager, model, device, factor)


def _source(features: dict, strategy: str, device=None) -> torch.Tensor:
    img, txt = features.get("img_features"), features.get("txt_features")
    needed = {"imgtxt": (img, txt), "txt": (txt,), "img": (img,)}[strategy]
    if any(t is None for t in needed):
        raise InvalidInputError(f"the feature manager's chunks lack img_features/txt_features, which the "
                                f"{strategy!r} initialisation needs")
    if device is not None:
        img = img.to(device) if img is not None else None
        txt = txt.to(device) if txt is not None else None
    if strategy == "imgtxt":
        return img - txt
    return txt if strategy == "txt" else img


def _float64(t: torch.Tensor, normalize: bool) -> np.ndarray:
    t = t.detach()
    if t.dtype not in _NUMPY_FLOATS:
        t = t.float()
    x = t.cpu().numpy().astype(np.float64)
    if not np.isfinite(x).all():
        raise InvalidInputError("the feature manager's features contain NaN or inf; nothing was written")
    if normalize:
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def project_by_chunk_position(table, strategy, fm, model, device, factor) -> None:
    """``source @ w_t * factor`` per chunk, in torch on ``device``, exactly as the 2025-10 .. 2026-03 managers."""
    layer = getattr(getattr(model, "combiner", None), "label_proj_layer", None)
    if layer is None or not hasattr(layer, "weight"):
        raise InvalidInputError("the projection initialisation reads model.combiner.label_proj_layer.weight; "
                                "pass the CoSiR model (or model=None for the PCA initialisation)")
    w_t = layer.weight.data.clone().detach().to(device)
    n_chunks = _chunk_count(table, fm)
    with table.bulk_write(f"initialize_embeddings_{strategy}"):
        for chunk in range(n_chunks):
            rows = _source(fm.get_features_by_chunk(chunk), strategy, device) @ w_t * factor
            ids = _chunk_ids_of_length(table, chunk, len(rows))
            table.write(ids, table.cast(rows, len(ids)))


def pca_by_chunk_position(table, strategy, fm, factor, normalize) -> None:
    """PCA of every feature chunk, feature chunk ``k`` row ``i`` -> manager chunk ``k`` row ``i``."""
    n_chunks = _chunk_count(table, fm)
    moments = StreamingMoments()
    for chunk in range(n_chunks):
        x = _float64(_source(fm.get_features_by_chunk(chunk), strategy), normalize)
        _chunk_ids_of_length(table, chunk, len(x))
        moments.add(x)
    axes = PrincipalAxes(moments, table.dim)
    with table.bulk_write(f"initialize_embeddings_{strategy}"):
        for chunk in range(n_chunks):
            x = _float64(_source(fm.get_features_by_chunk(chunk), strategy), normalize)
            ids = _chunk_ids_of_length(table, chunk, len(x))
            table.write(ids, _finish(axes.normalised(x), factor, normalize, table.dtype))


def pca_by_sample_id(table, strategy, fm, factor, normalize) -> None:
    """PCA of every feature chunk, each row written to the sample id the feature chunk names."""
    n_chunks = fm.get_num_chunks()
    moments = StreamingMoments()
    seen = np.zeros(len(table.view_ids), bool)
    for chunk in range(n_chunks):
        features = fm.get_features_by_chunk(chunk)
        x = _float64(_source(features, strategy), normalize)
        positions = _positions_in_chunk(table, features, chunk, len(x))
        if seen[positions].any() or len(np.unique(positions)) != len(positions):
            raise InvalidInputError(f"feature chunk {chunk} repeats sample ids of this or an earlier chunk")
        seen[positions] = True
        moments.add(x)
    if not seen.all():
        missing = table.view_ids[~seen]
        shown = ", ".join(map(str, missing[:10].tolist()))
        raise InvalidInputError(f"{len(missing)} sample ids of this manager have no features in the feature "
                                f"manager ({shown}); nothing was written")
    axes = PrincipalAxes(moments, table.dim)
    with table.bulk_write(f"initialize_embeddings_{strategy}"):
        for chunk in range(n_chunks):
            features = fm.get_features_by_chunk(chunk)
            x = _float64(_source(features, strategy), normalize)
            ids = as_ids(features["sample_ids"], "the feature chunk's sample_ids")
            keep = table.view_index.contains(ids)
            rows = _finish(axes.normalised(x[keep]), factor, normalize, table.dtype)
            table.write(ids[keep], rows)


def _finish(projected: np.ndarray, factor, normalize: bool, dtype) -> np.ndarray:
    """``* factor`` and, with ``normalize``, unit rows (2026-04-14 on), in the store dtype."""
    rows = projected * float(factor)
    if normalize:
        rows /= np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows.astype(dtype)


def _positions_in_chunk(table, features: dict, chunk: int, n: int) -> np.ndarray:
    if "sample_ids" not in features:
        raise InvalidInputError(f"feature chunk {chunk} has no sample_ids: the PCA by sample id needs them")
    ids = as_ids(features["sample_ids"], f"feature chunk {chunk}'s sample_ids")
    if len(ids) != n:
        raise InvalidInputError(f"feature chunk {chunk}: {len(ids)} sample_ids for {n} feature rows")
    positions, found = table.view_index.find(ids)
    return positions[found]


def _chunk_count(table, fm) -> int:
    n_chunks = fm.get_num_chunks()
    if n_chunks > table.n_chunks:
        raise InvalidInputError(f"the feature manager has {n_chunks} chunks, this manager {table.n_chunks}: the "
                                "chunk pairing needs the manager's chunk_size to equal the feature manager's")
    return n_chunks


def _chunk_ids_of_length(table, chunk: int, n: int) -> np.ndarray:
    ids = table.chunk_ids(chunk)
    if len(ids) != n:
        raise InvalidInputError(f"Length mismatch: feature chunk {chunk} has {n} rows, embedding chunk {chunk} "
                                f"{len(ids)}; create the manager with chunk_size equal to the feature manager's")
    return ids

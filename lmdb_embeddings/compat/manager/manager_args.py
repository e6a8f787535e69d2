"""The manager's constructor: which upstream signature a call uses, its defaults, and the argument checks.

Two upstream signatures are in use, and both are accepted:

* the chunk-file managers (2025-09 .. 2026-04-06)::

      (sample_ids, embedding_dim, device=None, initialization_strategy="normal", storage_mode="memory",
       embeddings_dir=None, chunk_size=None, feature_manager=None, auto_sync=True, cache_l1_size_mb=256,
       cache_l2_size_mb=512, enable_l3_cache=True, sync_batch_size=10)

  rows in sorted sample-id order (what ``chunk_mapping`` and the chunk loop rely on);
* the np.memmap manager (2026-04-07 on)::

      (sample_ids, embedding_dim, embeddings_dir, mode="ram", initialization_strategy="zeros",
       device="cpu", storage_mode=None, ...same keywords...)

  rows in the caller's order (``get_all_embeddings()`` is used positionally against it).

A call is memmap-style when it passes ``mode=`` or a third positional argument that is
not a device (a directory); otherwise it is chunk-style. ``storage_mode`` maps onto
``mode`` as upstream did: it wins when ``mode`` is ``"ram"``. Both keep the ``seed=``
extension keyword.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import InvalidInputError, InvalidTypeError
from ...inputs import as_ids, as_positive_int, check_unique

STORAGE_MODES = ("memory", "disk")
MODES = ("ram", "mmap")


def _chunk_style(sample_ids, embedding_dim, device=None, initialization_strategy="normal", storage_mode="memory",
                 embeddings_dir=None, chunk_size=None, feature_manager=None, auto_sync=True, cache_l1_size_mb=256,
                 cache_l2_size_mb=512, enable_l3_cache=True, sync_batch_size=10, *, seed=None):
    """The 2025-09 .. 2026-04-06 signature (only its parameters are used)."""


def _memmap_style(sample_ids, embedding_dim, embeddings_dir=None, mode="ram", initialization_strategy="zeros",
                  device="cpu", storage_mode=None, chunk_size=None, feature_manager=None, auto_sync=True,
                  cache_l1_size_mb=256, cache_l2_size_mb=512, enable_l3_cache=True, sync_batch_size=10, *,
                  seed=None):
    """The 2026-04-07 .. signature (only its parameters are used)."""


_SIGNATURES = {"chunk": inspect.signature(_chunk_style), "memmap": inspect.signature(_memmap_style)}


def init_signature() -> inspect.Signature:
    """What ``inspect.signature`` and ``help()`` show for the constructor: the chunk-style keywords with their
    defaults (the SPEC's list), then ``mode`` (a memmap-style call) and ``seed``, keyword-only."""
    chunk = _SIGNATURES["chunk"]
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [p for p in chunk.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    params.append(inspect.Parameter("mode", inspect.Parameter.KEYWORD_ONLY, default=None))
    params += [p for p in chunk.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return chunk.replace(parameters=params, return_annotation=inspect.Signature.empty)


@dataclass(frozen=True)
class ManagerArgs:
    """The constructor's arguments, checked, with the defaults of the signature the call used."""

    style: str                      # "chunk" or "memmap"
    ids: np.ndarray                 # sample ids in the order new rows get (sorted, or the caller's)
    embedding_dim: int
    device: str | torch.device
    strategy: str
    memory: bool                    # storage_mode "memory" / mode "ram"
    embeddings_dir: Path | None
    chunk_size: int | None          # None: not given (a resumed store keeps its own)
    auto_sync: bool
    sync_batch_size: int            # 0 commits after every update, as 1 does
    cache_l1_size_mb: float
    cache_l2_size_mb: float
    enable_l3_cache: bool
    seed: int | None

    @property
    def caller_order(self) -> bool:
        return self.style == "memmap"

    @property
    def storage_mode(self) -> str:
        return "memory" if self.memory else "disk"

    @property
    def mode(self) -> str:
        return "ram" if self.memory else "mmap"


def parse(sample_ids, embedding_dim, args: tuple, kwargs: dict) -> ManagerArgs:
    """Bind a constructor call to its upstream signature and check every argument."""
    style = "memmap" if "mode" in kwargs or (args and not is_device(args[0])) else "chunk"
    try:
        bound = _SIGNATURES[style].bind(sample_ids, embedding_dim, *args, **kwargs)
    except TypeError as exc:
        raise InvalidTypeError(f"TrainableEmbeddingManager(): {exc}") from None
    bound.apply_defaults()
    a = bound.arguments
    memory = _memory_of(style, a)
    ids = as_ids(a["sample_ids"], "sample_ids")
    check_unique(ids, "TrainableEmbeddingManager", "sample_ids", "sample id")
    chunk_size = a["chunk_size"]
    fm_chunk = getattr(a["feature_manager"], "chunk_size", None) if a["feature_manager"] is not None else None
    if fm_chunk is not None:  # the feature manager's chunk size wins, as in the 2025-09 manager
        chunk_size = fm_chunk
    return ManagerArgs(
        style=style,
        ids=ids if style == "memmap" else np.sort(ids),
        embedding_dim=as_positive_int(a["embedding_dim"], "embedding_dim"),
        device=_device(a["device"]),
        strategy=a["initialization_strategy"],
        memory=memory,
        embeddings_dir=_directory(a["embeddings_dir"]),
        chunk_size=None if chunk_size is None else as_positive_int(chunk_size, "chunk_size"),
        auto_sync=bool(a["auto_sync"]),
        sync_batch_size=check_sync_batch_size(a["sync_batch_size"]),
        cache_l1_size_mb=_mib(a["cache_l1_size_mb"], "cache_l1_size_mb"),
        cache_l2_size_mb=_mib(a["cache_l2_size_mb"], "cache_l2_size_mb"),
        enable_l3_cache=bool(a["enable_l3_cache"]),
        seed=a["seed"],
    )


def is_device(value) -> bool:
    """True for None, a ``torch.device``, a CUDA index or a device string such as ``"cpu"`` / ``"cuda:1"``."""
    if value is None or isinstance(value, torch.device):
        return True
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return value >= 0
    if not isinstance(value, str):
        return False
    try:
        torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def _device(value):
    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not is_device(value):
        raise InvalidInputError(f"device {value!r} is not a torch device; use e.g. 'cpu' or 'cuda'")
    return value


def _directory(value) -> Path | None:
    if value is None:
        return None
    try:
        return Path(os.fspath(value))
    except TypeError:
        raise InvalidTypeError(f"embeddings_dir must be a path, got {type(value).__name__} {value!r}") from None


def _memory_of(style: str, a: dict) -> bool:
    storage_mode = a["storage_mode"]
    if storage_mode is not None and storage_mode not in STORAGE_MODES:
        raise InvalidInputError(f"Unknown storage_mode: {storage_mode!r}; use 'memory' or 'disk'")
    if style == "chunk":
        return storage_mode == "memory"
    mode = a["mode"]
    if mode not in MODES:
        raise InvalidInputError(f"Unknown mode: {mode!r}; use 'ram' or 'mmap'")
    if storage_mode is not None and mode == "ram":  # the upstream rule: storage_mode wins over the default
        return storage_mode == "memory"
    return mode == "ram"


def check_sync_batch_size(value) -> int:
    """An int >= 0 (every upstream version accepts 0: a commit after every update)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidInputError(f"sync_batch_size must be an int >= 0, got {value!r}")
    return int(value)


def _mib(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidInputError(f"{name} must be a number of MiB >= 0, got {value!r}")
    return value

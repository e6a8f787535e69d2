"""The optional dependencies, imported on first use with an error that says what to install.

The core, the formats, the operations and the CLI run without torch; the tensor API
(``get_tensor``, ``EmbeddingDataset``, ``lmdb_embeddings.torch``, the CoSiR drop-in and its
``.pt`` files, the sharded store) needs it, and ``lmdb_embeddings.testing`` needs pytest.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# torch is pinned exactly: an unpinned requirement pulls the CUDA build (gigabytes)
INSTALL = {"torch": "torch==2.13.0", "pytest": "pytest"}


def import_needing(module: str, package: str, what: str) -> ModuleType:
    """``importlib.import_module(module)``; if ``package`` is what is missing, a
    :class:`MissingDependencyError` saying that ``what`` needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != package:
            raise
        raise MissingDependencyError(f"{what} needs {package}: pip install {INSTALL.get(package, package)}") from None

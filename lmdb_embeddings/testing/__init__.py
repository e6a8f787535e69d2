"""Reusable contract suites (pytest): run the same promises against every kind of handle or table file.

* :class:`StoreContract` — read/write/commit/reopen over every handle kind (writer,
  read-only, unpickled, forked child), for the open options a subclass picks; written against
  ``TableHandle``, so ``ShardedStoreContract`` (``lmdb_embeddings.testing.sharded_contract``, needs
  torch) runs it on a ``ShardedEmbeddingStore``, every rank of a process group in step;
* :class:`TableContract` — every table sink written and read back by its source (store
  builder -> snapshot, dump writer -> dump reader, npy writer -> npy reader, CoSiR memmap files
  and ``.pt`` chunk files), bit-exact on what each format keeps.

Needs pytest, which the library itself does not: ``pip install pytest`` (or the ``testing``
extra, ``pip install "lmdb-embedding-store[testing]"``); without it, importing this package
raises :class:`~lmdb_embeddings.MissingDependencyError` saying so.
"""

from ..optional import import_needing

import_needing("pytest", "pytest", "lmdb_embeddings.testing")  # before the suites import it

from .store_contract import HANDLE_KINDS, StoreContract  # noqa: E402
from .table_contract import TableContract  # noqa: E402

__all__ = ["StoreContract", "TableContract", "HANDLE_KINDS"]

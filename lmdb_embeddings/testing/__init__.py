"""Reusable contract suites (pytest): run the same promises against every kind of handle or table file.

* :class:`StoreContract` — read/write/commit/reopen over every handle kind (writer,
  read-only, unpickled, forked child), for the open options a subclass picks;
* :class:`TableContract` — every table sink written and read back by its source (store
  builder -> snapshot, dump writer -> dump reader, npy writer -> npy reader, CoSiR memmap files
  and ``.pt`` chunk files), bit-exact on what each format keeps.

Needs pytest (a test dependency, not a dependency of the library).
"""

from .store_contract import HANDLE_KINDS, StoreContract
from .table_contract import TableContract

__all__ = ["StoreContract", "TableContract", "HANDLE_KINDS"]

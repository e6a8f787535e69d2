"""The operations on a whole store, as library functions (the CLI is a thin shell over them).

Each reads one consistent snapshot or builds beside the store and swaps in, so all are safe
while a writer trains (``compact`` and a replacing ``restore`` wait for no writer: they refuse).
One function per verb serves a plain store and a sharded store's directory alike (``info``,
``verify``, ``dump``; ``restore_store(..., shards=W)`` builds a sharded store); ``compact``
takes plain stores.
"""

from .backup import dump_store, restore_store
from .compact import compact_store
from .info import store_info
from .verify import verify_store

__all__ = ["dump_store", "restore_store", "verify_store", "store_info", "compact_store"]

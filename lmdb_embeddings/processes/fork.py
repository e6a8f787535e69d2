"""The one fork guard: everything a forked child must forget or reset, in one place.

LMDB environments must never be used after ``fork`` and a lock held by another thread of
the parent stays held forever in the child (that thread does not exist there). Modules
register what their child must do with :func:`in_child`; objects with per-instance locks
(store handles) register themselves with :func:`track` and get ``_after_fork_in_child()``
called. Everything runs from ONE ``os.register_at_fork`` hook, in registration order.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

_hooks: list[Callable[[], None]] = []
_tracked: weakref.WeakSet = weakref.WeakSet()


def in_child(hook: Callable[[], None]) -> Callable[[], None]:
    """Run ``hook()`` in every forked child, before any other code of the child (a decorator too)."""
    _hooks.append(hook)
    return hook


def track(obj) -> None:
    """Call ``obj._after_fork_in_child()`` in forked children while ``obj`` is alive."""
    _tracked.add(obj)


def _after_fork_in_child() -> None:
    for hook in _hooks:
        hook()
    for obj in list(_tracked):
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)

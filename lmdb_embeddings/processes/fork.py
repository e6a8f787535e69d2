"""The one fork guard: everything a fork must wait for, and everything a forked child must forget or reset.

LMDB environments must never be used after ``fork``, and a lock held by another thread of
the parent stays held forever in the child (that thread does not exist there). Worse,
py-lmdb waits, when the child closes an inherited environment, for LMDB calls that were in
flight in other threads at the instant of the fork: they never finish there, so the child
hangs. Hence, around every ``os.fork``:

* **before** (in the forking thread): take every tracked handle's mutex, then whatever the
  modules registered with :func:`holding` (the environment registry and each
  environment's lock). The fork waits until no other thread is inside a store call, so
  none is inside LMDB: the child inherits a quiet process.
* **after, in the parent**: give all of it back, in reverse order.
* **after, in the child**: run the modules' :func:`in_child` hooks (close inherited
  environments, drop the writer-lock descriptor), then give every tracked handle a fresh
  mutex (``_after_fork_in_child``).

One thing outlives a store call: a write transaction a thread began to spill changes that
no longer fit in its cache, open until the next commit. Only the thread that began it can
end it, so a child cannot close that environment; it leaves it alone and refuses, in one
line, to open that store (``processes/environment.py``).

Lock order (the same everywhere, so the ``before`` step cannot deadlock with a store call):
handle mutex, then the registry lock, then an environment's lock. No store call holds one
handle's mutex while it waits for another's.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

_hooks: list[Callable[[], None]] = []
_holds: list[tuple[Callable[[], None], Callable[[], None]]] = []
_tracked: weakref.WeakSet = weakref.WeakSet()
_held_mutexes: list = []


def in_child(hook: Callable[[], None]) -> Callable[[], None]:
    """Run ``hook()`` in every forked child, before any other code of the child (a decorator too)."""
    _hooks.append(hook)
    return hook


def holding(take: Callable[[], None], give_back: Callable[[], None]) -> None:
    """Call ``take()`` just before every fork (after the handles' mutexes) and ``give_back()``
    just after it in the parent; the child resets that state in its own :func:`in_child` hook."""
    _holds.append((take, give_back))


def track(obj) -> None:
    """While ``obj`` is alive, hold ``obj._mutex`` across every fork and call
    ``obj._after_fork_in_child()`` in forked children."""
    _tracked.add(obj)


def _before() -> None:
    for obj in list(_tracked):
        mutex = getattr(obj, "_mutex", None)
        if mutex is not None:
            mutex.acquire()
            _held_mutexes.append(mutex)
    for take, _ in _holds:
        take()


def _after_in_parent() -> None:
    for _, give_back in reversed(_holds):
        give_back()
    while _held_mutexes:
        _held_mutexes.pop().release()


def _after_in_child() -> None:
    _held_mutexes.clear()  # held by this (the forking) thread; every handle gets a fresh one below
    for hook in _hooks:
        hook()
    for obj in list(_tracked):
        obj._after_fork_in_child()


os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child)

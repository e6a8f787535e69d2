"""The pending write transaction: the ONE object through which anything writes an LMDB environment.

A :class:`WriteTransaction` begins, writes, commits or aborts one LMDB write transaction and
owns everything that lives as long as it does: the write lease on the environment (only the
thread that began it may end it; a forked child and the registry see it), the databases
created in it (invalid if it aborts), the disk blocks reserved for it, the meta pages saved
before its commit, and the undo log's pre-images (``core/undo.py``). The writer's session,
``revert_last_commit``, a swap's ``replaced`` record and the store builder all write through it.

**A commit is decided by what LMDB did, never by whether Python raised afterwards.** A signal
handler (Ctrl-C's ``KeyboardInterrupt``, a SIGTERM handler's ``SystemExit``, torch
DataLoader's SIGCHLD handler) runs at the first bytecode after a C call returns, so
``txn.commit()`` may "raise" after LMDB committed and synced. :meth:`WriteTransaction.commit`
and :meth:`WriteTransaction.settle` are the one place that decides: an ``lmdb.Error`` from the
call is LMDB's refusal (not committed); anything else raised around it is answered by LMDB's
meta page (``last_txnid`` at least this transaction's id: committed). Only a refused commit
ever gets the saved meta pages written back; nothing is ever written over a meta page LMDB
committed. The outcome is kept until the caller has applied it (``outcome``), so even a second
signal during that bookkeeping leaves the decision to be applied at the next call.

Disk (``writemap``): every block the transaction may write is allocated before it writes any
(``processes/data_file``), so a full disk is a clean error. A value written twice in one
transaction is rewritten in place by LMDB (its pages are already dirty): the reservation counts
the DISTINCT values the transaction holds, not every write (``SpaceBudget`` has the formulas).
"""

from __future__ import annotations

import enum
import errno
import logging
from contextlib import ExitStack
from typing import TYPE_CHECKING

import lmdb

from ..errors import ReservationError

if TYPE_CHECKING:  # the environment writes its ``replaced`` record through this module
    from .shared_env import SharedEnv

log = logging.getLogger(__name__)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class Outcome(enum.Enum):
    NEW = "new"  # not begun (a reservation may be made already)
    OPEN = "open"
    COMMITTED = "committed"  # LMDB committed it
    ABORTED = "aborted"  # aborted, or LMDB refused the commit


def describe_os_error(exc: OSError, need: int) -> str:
    """What an ``OSError`` of a reservation means, in a few words."""
    if exc.errno in NO_SPACE:
        return f"the disk is full: {need:,} bytes of disk needed"
    if exc.errno == errno.ENOENT:
        return "its data file is gone: the store's directory was removed or replaced while this handle had it open"
    return f"allocating {need:,} bytes of disk for it failed: {exc.strerror or exc}"


class WriteTransaction:
    """One LMDB write transaction on a shared environment (see the module docstring).

    ``undo``: an ``UndoLog`` keeping each key's pre-image (a revertible commit), or None.
    """

    def __init__(self, env: SharedEnv, undo=None):
        self.env, self.undo = env, undo
        self.budget = env.budget
        self.txn: lmdb.Transaction | None = None
        self.txn_id = 0
        self.outcome = Outcome.NEW
        self.committing = False  # commit() was entered; LMDB's decision not read yet
        self.refused = False  # LMDB's commit returned an error (its return code)
        self.created: list[bytes] = []  # databases created in this transaction
        self.held_bytes = 0  # disk the distinct values written so far take
        self._held: dict[tuple[bytes, bytes], int] = {}  # (db, key) -> disk of the largest value written
        self._start = 0  # LMDB's committed end when the transaction began
        self._reserved = 0  # held_bytes the disk is known to hold
        self._lease = ExitStack()

    @property
    def is_open(self) -> bool:
        return self.outcome is Outcome.OPEN

    # -- begin -----------------------------------------------------------------------------------
    def begin(self, headroom: int = 0) -> WriteTransaction:
        """Begin the transaction, after making ``headroom`` bytes of map room (impossible once open)."""
        env = self.env
        if headroom:
            env.ensure_headroom(headroom)
        start = env.used_bytes()
        env.clear_stale_readers()  # a killed reader's slot would pin its snapshot's pages for good
        self._lease.enter_context(env.write_lease())
        try:
            self.txn = env.env.begin(write=True, buffers=True)
        except BaseException:
            self._lease.close()
            raise
        self._start, self.txn_id, self.outcome = start, self.txn.id(), Outcome.OPEN
        if self.undo is not None:
            self.undo.start(self)
        return self

    def db(self, name: bytes):
        """The named database's handle, created inside this transaction if new."""
        handle = self.env.cached_db(name)
        if handle is None:
            handle = self.env.create_db(name, self.txn)
            self.created.append(name)
        return handle

    # -- disk ------------------------------------------------------------------------------------
    def disk_needed(self, writes) -> int:
        """Disk the transaction holds once ``writes`` (``(db name, key, value bytes)`` each) are written:
        a key written before counts only if its new value takes more pages; the undo log keeps one
        pre-image per key."""
        copies = 2 if self.undo is not None else 1
        extra = 0
        for db_name, key, size in writes:
            pages = self.budget.value_bytes(size)
            held = self._held.get((db_name, bytes(key)))
            extra += copies * pages if held is None else max(0, pages - held)
        return self.held_bytes + extra

    def reserve(self, need: int, ahead: int = 0) -> None:
        """Make sure the disk holds ``need`` bytes of values for this transaction, and ``ahead`` more if it can
        (one ``fallocate`` then serves many writes). Raises :class:`ReservationError`; nothing is written."""
        if not self.env.writemap or need <= self._reserved:
            return
        start = self._start if self.outcome is Outcome.OPEN else self.env.used_bytes()
        data_file = self.env.data_file
        if ahead:
            try:
                data_file.reserve(self.budget.reservation_end(start, need + ahead))
                self._reserved = need + ahead
                return
            except OSError as exc:
                if exc.errno not in NO_SPACE:
                    raise ReservationError(describe_os_error(exc, need)) from None
            # the disk cannot hold the ahead amount: reserve just what is needed
        try:
            data_file.reserve(self.budget.reservation_end(start, need))
        except OSError as exc:
            raise ReservationError(describe_os_error(exc, need)) from None
        self._reserved = need

    # -- writing ---------------------------------------------------------------------------------
    def put(self, db_name: bytes, key: bytes, value, *, ahead: int = 0, cursor=None, append: bool = False) -> None:
        """Write ``key`` of the database ``db_name`` (created if new), its disk reserved first.

        An ``lmdb.Error`` means LMDB gave up on the transaction: it is aborted (``outcome``) and the
        error raised; a ``ReservationError`` means nothing was written and the transaction is as it was.
        """
        size = len(value)
        self.reserve(self.disk_needed(((db_name, key, size),)), ahead)
        db = self.db(db_name)
        try:
            if self.undo is not None:
                self.undo.capture(self, db_name, db, key)
            if cursor is not None:
                cursor.put(key, value)
            else:
                self.txn.put(key, value, db=db, append=append)
        except lmdb.Error:
            self.abort()
            raise
        self._hold(db_name, key, size)

    def cursor(self, db_name: bytes) -> lmdb.Cursor:
        return self.txn.cursor(db=self.db(db_name))

    def _hold(self, db_name: bytes, key: bytes, size: int) -> None:
        self.held_bytes = self.disk_needed(((db_name, key, size),))
        k = (db_name, bytes(key))
        self._held[k] = max(self._held.get(k, 0), self.budget.value_bytes(size))

    # -- the end: commit decided by LMDB, or abort -----------------------------------------------
    def commit(self) -> None:
        """Commit; afterwards :attr:`outcome` holds what LMDB did, whatever was raised.

        Raises ``lmdb.Error`` when LMDB refused (``ABORTED``: the saved meta pages are back),
        ``OSError`` when the meta pages could not be saved first (still ``OPEN``: commit again), or
        whatever a signal handler raised around the call (``COMMITTED`` if LMDB had committed).
        """
        saved = self.env.data_file.save_meta() if self.env.writemap else None
        self.committing = True
        try:
            self.txn.commit()  # one synced commit (sync=True)
        except lmdb.Error:
            self.refused = True  # LMDB's return code: not committed (set before anything can interrupt)
            self._restore_meta(saved)
            raise
        finally:
            self.settle()

    def settle(self) -> None:
        """Read LMDB's decision about a commit that was entered and not yet decided (the one rule).

        Refused by LMDB -> ABORTED. Else LMDB's meta page says: its last transaction id is this
        transaction's (or later) -> COMMITTED; otherwise the call never reached LMDB (a signal
        before it) and the transaction is still OPEN, to commit again.
        """
        if not self.committing:
            return
        if self.refused:
            self._end(Outcome.ABORTED)
        elif self.env.last_txnid() >= self.txn_id:
            self._end(Outcome.COMMITTED)
        elif self._txn_alive():
            self.committing = False
        else:  # pragma: no cover - py-lmdb raises lmdb.Error for every failed commit
            self._end(Outcome.ABORTED)

    def abort(self) -> None:
        """Abort if open (a commit in doubt is settled first: nothing LMDB committed is aborted)."""
        self.settle()
        if self.outcome is Outcome.OPEN:
            try:
                self.txn.abort()
            except lmdb.Error:
                pass
            self._end(Outcome.ABORTED)
        elif self.outcome is Outcome.NEW:
            self.outcome = Outcome.ABORTED

    def _txn_alive(self) -> bool:
        try:
            self.txn.id()
            return True
        except lmdb.Error:
            return False

    def _end(self, outcome: Outcome) -> None:
        self.outcome, self.committing = outcome, False
        self.txn = None
        if outcome is Outcome.ABORTED:
            for name in self.created:  # handles opened in an aborted transaction are invalid
                self.env.forget_db(name)
        self._lease.close()

    def _restore_meta(self, saved: bytes | None) -> None:
        """After LMDB refused the commit: put back the meta pages it may have written into the map."""
        if saved is not None and self.env.data_file.restore_meta(saved):
            log.warning("%s: the failed commit had written its meta page; the previous one was put back",
                        self.env.path)

"""The undo log: a commit that keeps what it overwrote, so it can be taken back (``revert_last_commit``).

The sharded store's two-phase commit needs a shard commit that is durable AND revertible
("prepared"): a shard opened with the open option ``undo_log=True`` keeps, in the SAME
LMDB transaction as each commit, the committed value of every key that commit writes, in
the named database ``undo`` (docs/FORMAT.md):

* entry ``b"k" + u16le(len(db)) + db + key`` -> ``b"\\x01" + pre-image``, or ``b"\\x00"`` if
  the key did not exist before the commit;
* mark ``b"m"`` -> ``{"undoes": c, "restores": c_prev}`` (a checksummed record), written last.

An entry is captured just before the FIRST write of a key in the pending transaction (a
spill, or the commit itself), by reading the key in that transaction, which still holds the
committed value; later writes of the key (a chunk spilled twice) keep the first entry. The
log is emptied inside the next pending transaction, so an aborted transaction (rollback, a
failed commit) leaves the last commit's log intact. :func:`revert_last_commit` applies it.
"""

from __future__ import annotations

import logging
import os
import struct

from ..errors import CommitError, CorruptionError, EmbeddingStoreError, ReservationError
from ..format.records import META_DB, check_store_dir, pack_record, read_record, unpack_record
from ..processes import environment
from ..processes.transaction import WriteTransaction
from ..processes.writer_lock import WriterLock

log = logging.getLogger(__name__)

UNDO_DB = b"undo"
MARK = b"m"
_ENTRY = b"k"
_ABSENT, _VALUE = b"\x00", b"\x01"
STATE_KEY = b"state"
MAX_REVERTS = 16


def entry_key(db_name: bytes, key: bytes) -> bytes:
    return _ENTRY + struct.pack("<H", len(db_name)) + db_name + bytes(key)


def split_entry_key(entry: bytes) -> tuple[bytes, bytes]:
    (length,) = struct.unpack_from("<H", entry, 1)
    return entry[3 : 3 + length], entry[3 + length :]


class UndoLog:
    """The writer's side, inside a :class:`~lmdb_embeddings.processes.transaction.WriteTransaction`:
    empty the log when the transaction begins, capture pre-images, write the mark."""

    def start(self, pending: WriteTransaction) -> None:
        """A new pending transaction: empty the log (it described the previous commit)."""
        existing = pending.env.cached_db(UNDO_DB)
        db = pending.db(UNDO_DB)  # created in the transaction if new (forgotten if it aborts)
        if existing is not None:
            pending.txn.drop(db, delete=False)

    def capture(self, pending: WriteTransaction, db_name: bytes, db, key: bytes) -> None:
        """Before ``pending`` first writes ``key`` of ``db``: keep its committed value (or its absence).

        The pre-image is copied out of LMDB's map before anything is written (a write may
        move the page it lives on).
        """
        txn, undo = pending.txn, pending.db(UNDO_DB)
        entry = entry_key(db_name, key)
        if txn.get(entry, db=undo) is not None:
            return
        old = txn.get(key, db=db) if db is not None else None
        txn.put(entry, _ABSENT if old is None else _VALUE + bytes(old), db=undo)

    def mark(self, pending: WriteTransaction, undoes: int, restores: int) -> None:
        pending.txn.put(MARK, pack_record({"undoes": int(undoes), "restores": int(restores)}), db=pending.db(UNDO_DB))


def revert_history(history, commit: int, rows: int) -> list[list[int]]:
    """The state record's ``reverts`` after a revert to ``rows`` rows as ``commit``: [[commit, rows], ...].

    A reader whose table is at commit r must forget the rows past ``min(rows)`` of every
    entry with commit > r (a revert removed them, later adds may have reused the slots).
    At most :data:`MAX_REVERTS` entries: the two oldest merge into the newer commit with the
    smaller row count, which is conservative (a reader re-reads more IDs, never too few).
    """
    out = [[int(c), int(r)] for c, r in (history or [])] + [[int(commit), int(rows)]]
    while len(out) > MAX_REVERTS:
        out[:2] = [[out[1][0], min(out[0][1], out[1][1])]]
    return out


def rows_kept_after(history, commit: int) -> int | None:
    """Rows a table at ``commit`` may keep given the ``reverts`` history (None: no revert since)."""
    floors = [int(r) for c, r in (history or []) if int(c) > commit]
    return min(floors) if floors else None


def revert_last_commit(path) -> dict:
    """Undo the store's last commit from the undo log it kept (it was made with ``undo_log=True``).

    ONE write transaction puts back every value that commit overwrote, deletes every key it
    created and restores its state record (row count, columns, attrs) under a NEW, higher
    commit number, recorded in its ``reverts`` history, so readers in other processes notice the change and
    follow it (rows it added disappear); then the log is emptied: a store can be reverted
    by one commit only. No writable handle may be open on the store (the writer lock is taken).

    Returns ``{"undone": c, "restored": c_prev, "commit": new}``: commit ``c`` was undone, the
    store holds the contents of commit ``c_prev`` as commit number ``new``.

    Raises:
        EmbeddingStoreError: no undo log, or it does not describe the last commit (the store
            was committed without ``undo_log`` since); nothing is changed then.
        WriterLockedError: a writer holds the store. CommitError: no disk space for the revert.
    """
    path = os.path.abspath(os.fspath(path))
    check_store_dir(path)
    lock = WriterLock(path)
    lock.acquire()
    try:
        shared = environment.acquire(path, write=True, writemap=True)
        try:
            return _apply(shared, path)
        finally:
            environment.release(shared)
    finally:
        lock.release()


def _apply(shared: environment.SharedEnv, path: str) -> dict:
    undo_db, meta_db = shared.cached_db(UNDO_DB), shared.cached_db(META_DB)
    if undo_db is None or meta_db is None:
        raise EmbeddingStoreError(f"{path} has no undo log: its last commit was not made with undo_log=True")
    with shared.reading() as txn:
        stat = txn.stat(undo_db)
    size = (stat["leaf_pages"] + stat["branch_pages"] + stat["overflow_pages"] + 16) * stat["psize"]
    with shared.lock:
        pending = WriteTransaction(shared)
        try:
            pending.reserve(2 * size)  # each pre-image put back, and the log's own pages
        except ReservationError as exc:
            raise CommitError(f"undoing the last commit of {path} failed ({exc.reason}); nothing was changed: "
                              "free space and retry", reason=exc.reason) from None
        pending.begin(headroom=size)
        try:
            txn = pending.txn
            raw_mark = txn.get(MARK, db=undo_db)
            state = read_record(txn, STATE_KEY, meta_db, path)
            if raw_mark is None:
                raise EmbeddingStoreError(f"{path} has no undo log to apply (it was applied already, or the "
                                          "last commit was not made with undo_log=True); nothing was changed")
            mark = unpack_record(raw_mark, MARK)
            if mark.get("undoes") != state["commit"]:
                raise EmbeddingStoreError(
                    f"{path}: the undo log belongs to commit {mark.get('undoes')}, but the store is at commit "
                    f"{state['commit']} (committed without undo_log since); nothing was changed")
            new_commit = int(state["commit"]) + 1
            # one entry in memory at a time; the log's own pages are not written before the loop ends
            with txn.cursor(db=undo_db) as cursor:
                for raw_entry, raw_value in cursor:
                    entry, value = bytes(raw_entry), bytes(raw_value)  # copied out before any write
                    if entry != MARK:
                        _undo_entry(txn, shared, path, entry, value, new_commit)
            txn.drop(undo_db, delete=False)
            pending.commit()  # decided by LMDB: an interruption after it leaves the revert made
        finally:
            pending.abort()  # if still open (a failure before the commit); never undoes a commit
    log.info("%s: commit %s undone; the store holds commit %s's contents as commit %s",
             path, mark["undoes"], mark.get("restores"), new_commit)
    return {"undone": int(mark["undoes"]), "restored": int(mark.get("restores", -1)), "commit": new_commit}


def _undo_entry(txn, shared: environment.SharedEnv, path: str, entry: bytes, value: bytes, new_commit: int) -> None:
    """Put one pre-image back (or delete a key the commit created); the state record gets ``new_commit``."""
    db_name, key = split_entry_key(entry)
    db = shared.cached_db(db_name)
    if db is None:
        raise CorruptionError(f"{path}: the undo log names a database {db_name!r} that is missing")
    if (db_name, key) == (META_DB, STATE_KEY):
        previous = unpack_record(value[1:], STATE_KEY)
        reverts = revert_history(previous.get("reverts"), new_commit, int(previous["rows"]))
        value = _VALUE + pack_record({**previous, "commit": new_commit, "reverts": reverts})
    if value[:1] == _ABSENT:
        txn.delete(key, db=db)
    else:
        txn.put(key, value[1:], db=db)

"""RowWrites: the part of an ``EmbeddingStore`` handle that changes the table (puts, adds, columns, attrs) and
commits or discards the changes. Every call checks all of its arguments first, then the writer's session
applies it whole or not at all (``core.writes.WriterSession``)."""

from __future__ import annotations

from collections.abc import Mapping

import msgpack
import numpy as np

from .core.writes import WriterSession
from .errors import InvalidInputError
from .format.layout import ColumnSpec
from .format.records import MAIN
from .inputs import IdsLike, ValuesLike, as_dtype, as_ids, as_positive_int, as_values, check_unique
from .store_base import StoreBase
from .store_reads import column_of


class RowWrites(StoreBase):
    """Writes, commits and rollbacks (a part of ``EmbeddingStore``: store_base.py)."""

    def put(self, ids: IdsLike, values: ValuesLike) -> None:
        """Overwrite the rows of existing ``ids``; durable at the next :meth:`commit`.

        ``values``: numpy array or torch tensor (any device) of shape (len(ids), dim),
        cast to the store dtype. A rejected call changes nothing.

        Raises:
            ValueError: wrong shape, duplicate ids, non-finite values.
            KeyError: unknown ids. PermissionError: read-only handle.
        """
        with self._mutex:
            session = self._writer("put")
            _put(session, MAIN, ids, values, "put")
            if session.note_update():
                session.commit()

    def put_column(self, name: str, ids: IdsLike, values: ValuesLike) -> None:
        """Overwrite rows of an auxiliary column (same rules as :meth:`put`, not counted by ``commit_every``)."""
        with self._mutex:
            _put(self._writer("put_column"), name, ids, values, "put_column")

    def add(self, ids: IdsLike, values: ValuesLike | None = None) -> None:
        """Append NEW ids (readable at once, durable at commit); values default to the init.

        Raises:
            ValueError: an id already exists, duplicates, bad values. PermissionError: read-only.
        """
        with self._mutex:
            session = self._writer("add")
            table = session.table
            new_ids = as_ids(ids)
            table.index.check_new(new_ids)
            if values is None:
                vals = table.init_values(table.rows, len(new_ids))
            else:
                vals = as_values(values, len(new_ids), table.dim, table.dtype, "add")
            session.append_rows(new_ids, vals)
            if session.note_update():
                session.commit()

    def commit(self) -> None:
        """Make every put/add so far durable, atomically (one transaction, one fsync).

        After it returns, a crash of the process or the OS leaves exactly this state. If
        the disk is full or another I/O error occurs, ``CommitError`` (an ``OSError``) is
        raised, the store keeps its previous commit, and this handle keeps its changes so
        the same ``commit()`` can be retried (unless changes had been spilled to the
        failed transaction, which the message then says: the handle is rolled back).
        """
        with self._mutex:
            self._writer("commit").commit()

    def rollback(self) -> None:
        """Discard every put/add (and new column or attr) since the last commit."""
        with self._mutex:
            self._writer("rollback").rollback()

    # ------------------------------------------------------- auxiliary columns (state)
    def ensure_column(self, name: str, width: int, dtype: str | np.dtype = "float32", fill: float = 0.0) -> None:
        """Declare an auxiliary per-row column (e.g. optimizer moments); rows start at ``fill``.

        The column shares the store's IDs and chunking, is committed atomically with the
        embeddings, and is carried by dump/restore. Declaring it again is a no-op.
        """
        with self._mutex:
            spec = column_to_declare(self._caught_up().describe_columns(), name, width, dtype, fill)
            if spec is not None:
                self._writer("ensure_column").table.declare_column(spec)

    def set_attr(self, key: str, value: object) -> None:
        """Set one attr; durable at the next commit, discarded by rollback."""
        with self._mutex:
            session = self._writer("set_attr")
            session.table.set_attr(checked_attr(key, value), value)


# ----------------------------------------------------------------------- helpers
def _put(session: WriterSession, name: str, ids, values, call: str) -> None:
    """``put``/``put_column``: every check first, then the session writes the rows, all or nothing."""
    table = session.table
    column = column_of(table, name)
    ids = as_ids(ids)
    check_unique(ids, call)
    vals = as_values(values, len(ids), column.spec.width, column.spec.dtype, call)
    session.put_rows(column, table.index.slots(ids), vals, call)


def column_to_declare(columns: Mapping[str, Mapping], name: str, width: int, dtype: str | np.dtype,
                      fill: float) -> ColumnSpec | None:
    """What ``ensure_column(name, width, dtype, fill)`` declares: a new column, or None if ``columns`` (name ->
    ``{width, dtype, fill}``, as ``store.columns`` describes them) has it already. A name that is reserved or
    invalid, or the name of a column declared with another width or dtype, is a clear error.
    """
    if not isinstance(name, str) or not name or name == MAIN or "/" in name:
        raise InvalidInputError(f"column name {name!r} is reserved or invalid")
    width = as_positive_int(width, "width")
    dt = as_dtype(dtype)
    existing = columns.get(name)
    if existing is None:
        return ColumnSpec(name, width, dt, float(fill))
    if (int(existing["width"]), as_dtype(existing["dtype"])) != (width, dt):
        raise InvalidInputError(f"column {name!r} exists with width {existing['width']} and dtype "
                                f"{existing['dtype']}, not {width} and {dt}")
    return None


def checked_attr(key: str, value: object) -> str:
    """``set_attr``'s key as stored (a str), once ``value`` is known to be msgpack-serializable."""
    try:
        msgpack.packb(value)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"attr {key!r}: value is not msgpack-serializable ({exc})") from None
    return str(key)

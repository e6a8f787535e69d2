"""What identifies the table a checkpoint was taken from, and the check when one is loaded.

A ``StoreEmbedding``'s rows and a store optimizer's state live in the store, not in
``state_dict()``: a checkpoint of the model or of the optimizer records which table (and
which commit, which step) it goes with, so that loading it next to another store, or next
to a store that is older than the checkpoint, is said instead of silently mixing the two.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidInputError
from ..handle import TableHandle


def table_identity(store: TableHandle) -> dict[str, Any]:
    """``{"path", "uuid", "commit", "rows", "dim", "dtype"}`` of ``store`` now (plain values: any pickle loads them)."""
    return {"path": store.path, "uuid": store.uuid, "commit": int(store.commit_count), "rows": len(store),
            "dim": int(store.dim), "dtype": store.dtype.name}


def other_table(saved: Mapping[str, Any], store: TableHandle) -> str | None:
    """Why ``saved`` (a :func:`table_identity`) is not ``store``'s table; None if it is."""
    if not isinstance(saved, Mapping) or "uuid" not in saved:
        return f"it records no table (got {type(saved).__name__}), so it was not saved by this library's torch API"
    current = table_identity(store)
    key = "uuid" if current["uuid"] is not None else "path"  # a store older than store_uuid: its path, at least
    if saved.get(key) != current[key] or saved.get("dim") != current["dim"]:
        return (f"it was saved with the table at {saved.get('path')!r} (uuid {saved['uuid']}, dim {saved.get('dim')}), "
                f"and the store here is another table: {current['path']!r} (uuid {current['uuid']}, dim "
                f"{current['dim']}); a store rebuilt by create or restore is another table")
    return None


def check_model_checkpoint(saved: Mapping[str, Any], store: TableHandle) -> None:
    """Refuse a StoreEmbedding checkpoint that does not go with ``store`` as it is now; warn when the store moved on.

    Another table, or a store at an OLDER commit than the checkpoint (it lacks commits the rest
    of the checkpoint was trained with), raise. A store that moved on since the checkpoint
    warns: its rows are newer than the checkpoint's other weights.
    """
    problem = other_table(saved, store)
    have, had = int(store.commit_count), int(saved.get("commit", 0)) if problem is None else 0
    if problem is None and have < had:
        problem = (f"it was taken at commit {had} of {store.path!r}, and the store is at commit {have}: it is older "
                   f"than the checkpoint (its rows lack {had - have} commit(s) the checkpoint's other weights were "
                   "trained with)")
    if problem is not None:
        raise InvalidInputError(
            f"StoreEmbedding.load_state_dict: {problem}. Open the store the checkpoint was taken with; to load the "
            "other weights anyway, delete the entry ending in '_extra_state' and pass strict=False")
    if have > had:
        warnings.warn(f"StoreEmbedding: loading a checkpoint taken at commit {had} of {store.path!r}, which is now at "
                      f"commit {have}: the rows in the store are newer than the checkpoint's other weights",
                      UserWarning, stacklevel=4)

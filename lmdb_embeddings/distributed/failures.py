"""When the process group itself fails: a rank died (kill -9, out of memory), hung past the group's
timeout, or the network broke.

torch raises a raw ``RuntimeError`` from inside the collective; :meth:`Collective.run` turns it into
:class:`ProcessGroupError` and refuses every later collective of that handle (the ranks are out of
step for good). The messages built here say what the user needs next: where the store on disk stands
(:func:`where_it_stands` for any call, :func:`commit_failed` for a commit, :func:`collective_open` for
``open``/``create``) and what to do. A failed group never leaves the store inconsistent: each shard
commits in one LMDB transaction, the manifest decides, and the next collective ``open`` brings every
shard to the manifest's commit (twophase.py). The handle is then only good for ``close()``, which
releases this rank's shard without any collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import ProcessGroupCommitError, ProcessGroupError

REOPEN = ("close this handle (it takes part in no more collective calls) and open the store again on every rank "
          "(in a new process group if a rank died)")


def where_it_stands(protocol, readonly: bool) -> str:
    """What a failure of the group leaves, for a handle at ``protocol``'s commit (Collective.where_it_stands)."""
    if readonly:
        return "nothing was changed (a read-only handle)"
    return (f"the store on disk is consistent at commit {protocol.commit_count}; the changes made since that "
            "commit are lost on this handle")


@contextlib.contextmanager
def collective_open(call: str, path: str) -> Iterator[None]:
    """Around a collective ``open``/``create``: a failure of the process group says where the store stands."""
    try:
        yield
    except ProcessGroupError as exc:
        if call == "create":
            where = (f"the store at {path} exists only if its manifest.json names the new shards (then it is "
                     "complete, at commit 0); otherwise the next create removes the unfinished shards")
            todo = "Run create again on every rank (overwrite=True if the store was made)"
        else:
            where = f"nothing was opened; the store at {path} is consistent (the next open finishes any recovery)"
            todo = "Open it again on every rank"
        raise ProcessGroupError(f"{call}: {exc}; {where}. {todo}, in a new process group if a rank died") from exc


def commit_failed(failure: str, path: str, commit: int, rank: int, made: bool | None) -> ProcessGroupError:
    """The error of a sharded commit (of ``commit``) whose process group failed.

    ``made``: what this rank knows of the decision: True (rank 0 renamed the manifest of ``commit``
    into place), False (it did not, and will not), None (only the manifest knows: another rank writes it).
    """
    if made is True:
        where = f"commit {commit} was made (rank 0 wrote its manifest): the store is at commit {commit}"
    elif made is False:
        where = (f"commit {commit} was not made: the store is at commit {commit - 1} (the next open undoes any "
                 f"shard that prepared it) and the changes since are lost on this handle")
    else:
        where = (f"whether commit {commit} was made is decided by the manifest in {path} (rank 0 writes it only once "
                 f"every shard prepared it): the store is at commit {commit - 1} or {commit} on every shard, "
                 "and the next open settles which")
    text = f"commit (rank {rank}): the process group failed ({failure}); {where}. To go on, {REOPEN}"
    return ProcessGroupCommitError(text)

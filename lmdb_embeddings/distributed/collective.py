"""Collective validation: every rank checks its part, the ranks agree, and only then anything changes.

Every collective call of the sharded store runs as: each rank validates what it was given
(and, once the IDs have reached their owners, what it received), turns the outcome into a
small integer (0 = fine, else the code of the exception class), and the ranks exchange
those integers in ONE small all-gather (:meth:`Collective.all_gather_ints`, which also
carries the per-destination counts of the exchange that follows). If any rank failed,
every rank raises the same class (the lowest failing rank's), with that rank's message
broadcast to all, before anything is applied anywhere; no rank is left waiting in a
collective the others skipped, so nothing hangs.

Every torch collective goes through :meth:`Collective.run`: a failure of the group itself (a rank
killed or hung past the timeout) cannot be agreed on, so it becomes ``ProcessGroupError`` there,
saying where the store stands (failures.py), and the handle attempts no collective after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from .. import errors
from ..errors import EmbeddingStoreError, ProcessGroupError, one_line
from .failures import REOPEN

# Every error class of the package, most specific first (a class before its bases): an
# exception gets the code of the first class it is an instance of. Derived from errors.py,
# so a new error class travels between ranks without being listed twice.
ERROR_CLASSES: tuple[type[EmbeddingStoreError], ...] = tuple(sorted(
    (cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, EmbeddingStoreError)),
    key=lambda cls: (-len(cls.__mro__), cls.__name__)))
_UNEXPECTED = len(ERROR_CLASSES) + 1  # not one of ours: every rank raises EmbeddingStoreError
T = TypeVar("T")


def error_code(error: BaseException | None) -> int:
    if error is None:
        return 0
    for code, cls in enumerate(ERROR_CLASSES, start=1):
        if isinstance(error, cls):
            return code
    return _UNEXPECTED


def class_of(code: int) -> type[EmbeddingStoreError]:
    return ERROR_CLASSES[code - 1] if 1 <= code <= len(ERROR_CLASSES) else EmbeddingStoreError


def communication_device(group) -> torch.device:
    """Where collective tensors live: the CPU for gloo (or a group with a CPU backend), else this rank's GPU."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend or "cpu:" in backend:
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class Collective:
    """The store's view of its process group: rank, size, and the agreement steps."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise EmbeddingStoreError("the sharded store needs an initialized torch.distributed process group; "
                                      "call torch.distributed.init_process_group first (torchrun sets it up)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.device = communication_device(group)
        self.failure: str | None = None  # why the group failed: then no collective is attempted any more
        self.where_it_stands: Callable[[], str] | None = None  # the store's state, said when the group fails

    def global_rank(self, rank: int) -> int:
        """The default group's rank of this group's ``rank`` (what broadcast's ``src`` wants)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def run(self, name: str, collective, *args, **kwargs):
        """``collective(*args, **kwargs)``, one torch.distributed call; a failure of the group raises
        :class:`ProcessGroupError` here and at every later call (the ranks are out of step for good)."""
        if self.failure is not None:
            raise self._failed(f"the process group failed earlier ({self.failure})")
        try:
            return collective(*args, **kwargs)
        except RuntimeError as exc:  # gloo/NCCL (DistError is one): a rank died, hung past the timeout, ...
            self.failure = _torch_failure(exc)
            raise self._failed(f"the process group failed in {name} ({self.failure})") from exc

    def _failed(self, what: str) -> ProcessGroupError:
        if self.where_it_stands is None:  # no store handle yet (create, open): they say it
            return ProcessGroupError(what)
        return ProcessGroupError(f"{what}; {self.where_it_stands()}. To go on, {REOPEN}")

    def all_gather_ints(self, values) -> np.ndarray:
        """Every rank's int64 vector (same length everywhere), as a (world_size, k) array."""
        mine = torch.as_tensor(np.asarray(values, np.int64).reshape(-1), device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        self.run("all_gather", dist.all_gather, parts, mine, group=self.group)
        return torch.stack(parts).cpu().numpy()

    def broadcast_object(self, obj, src: int):
        box = [obj]
        self.run("broadcast", dist.broadcast_object_list, box, src=self.global_rank(src), group=self.group,
                 device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, recv_counts: list, send_counts: list) -> None:
        self.run("all_to_all", dist.all_to_all_single, out, inp, output_split_sizes=recv_counts,
                 input_split_sizes=send_counts, group=self.group)

    def barrier(self) -> None:
        self.all_gather_ints([0])

    def agreed(self, step: Callable[..., T], *args) -> T:
        """``step(*args)`` on every rank, then :meth:`agree` on its outcome: if it raised on any rank, every rank
        raises (the same class); otherwise every rank gets its own result."""
        value, error = attempt(step, *args)
        self.agree(error)
        return value

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if ``error`` is not None on any rank (see :meth:`raise_if_failed`)."""
        self.raise_if_failed(self.all_gather_ints([error_code(error)])[:, 0], error)

    def raise_if_failed(self, codes: np.ndarray, error: BaseException | None, context: str = "") -> None:
        """Given every rank's code, raise the lowest failing rank's exception class everywhere.

        That rank re-raises its own exception (when it is of exactly that class); the others
        raise the class with the failing rank's message, prefixed by where it happened.
        """
        failed = np.flatnonzero(codes)
        if len(failed) == 0:
            return
        src = int(failed[0])
        code = int(codes[src])
        message = self.broadcast_object(_describe(error) if self.rank == src else None, src)
        cls = class_of(code)
        if self.rank == src and error is not None and type(error) is cls and not context:
            raise error
        text = f"{context}{message}" if self.rank == src else f"{context}rank {src} of {self.world_size}: {message}"
        raise cls(text) from (error if self.rank == src else None)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = str(error) or type(error).__name__
    if error_code(error) == _UNEXPECTED:
        text = f"{type(error).__name__}: {text}"
    return text


def _torch_failure(exc: BaseException) -> str:
    """torch's message in one short line (gloo's starts with a source location and ends in advice)."""
    text = one_line(exc)
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    text = text.split(" This is typically caused", 1)[0]
    return f"{type(exc).__name__}: {text[:300]}"


def attempt(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), None)``, or ``(None, exception)`` if it raised an Exception."""
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # every rank must reach the agreement step, whatever went wrong here
        return None, exc

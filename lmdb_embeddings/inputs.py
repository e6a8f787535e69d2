"""Turning user arguments (lists, numpy arrays, torch tensors) into checked numpy arrays.

Every check runs before the store changes anything, so a rejected call has no effect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InvalidInputError, InvalidTypeError

#: sample IDs: an int, a sequence of ints, a 1-D integer numpy array or torch tensor (any device)
IdsLike = int | Sequence[int] | np.ndarray | Any
#: rows: a (n, width) numpy array, nested sequence, or torch tensor (any device, any float/int dtype)
ValuesLike = np.ndarray | Sequence[Sequence[float]] | Any

_INT64_MAX = np.iinfo(np.int64).max
SUPPORTED_DTYPES = ("float32", "float16", "float64")


def is_tensor(obj) -> bool:
    """True for a torch.Tensor, without importing torch."""
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")


def to_numpy(obj: Any) -> Any:
    if is_tensor(obj):
        tensor = obj.detach().cpu()
        try:
            return tensor.numpy()
        except TypeError:  # a dtype numpy has no type for (bfloat16, float8...): cast it like any other
            if not tensor.is_floating_point():
                raise InvalidTypeError(f"a tensor of {tensor.dtype} cannot be read as numbers") from None
            return tensor.float().numpy()
    return obj


def as_ids(ids, what: str = "ids") -> np.ndarray:
    """A 1-D int64 array of sample IDs (a single int becomes a 1-element array)."""
    if type(ids) is np.ndarray and ids.dtype == np.int64 and ids.ndim == 1:
        return ids  # already what we need (the common case of a batch): nothing to check or copy
    ids = to_numpy(ids)
    if isinstance(ids, (bool, np.bool_)):
        raise InvalidTypeError(f"{what} must be integers, got a bool")
    if isinstance(ids, (str, bytes)):
        raise InvalidTypeError(f"{what} must be integers, got {type(ids).__name__}")
    try:
        arr = np.asarray(ids)
    except (OverflowError, ValueError) as exc:
        raise InvalidInputError(f"{what} cannot be read as int64 sample ids: {exc}") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise InvalidInputError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, np.int64)
    if arr.dtype == object:  # numpy found no integer dtype (Python objects, > 64-bit ints): the error path
        try:
            arr = np.array([int(x) if isinstance(x, (int, np.integer)) and not isinstance(x, bool) else _bad(x, what)
                            for x in arr.tolist()], dtype=np.int64)
        except OverflowError:
            raise InvalidInputError(f"{what} contain values outside the int64 range") from None
        return arr
    if arr.dtype.kind == "u":
        if int(arr.max()) > _INT64_MAX:
            raise InvalidInputError(f"{what} contain values outside the int64 range")
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and not isinstance(ids, np.ndarray) and _all_python_ints(ids):
        # numpy turns a list mixing negative ints and ints >= 2**63 into float64
        raise InvalidInputError(f"{what} contain values outside the int64 range")
    if arr.dtype.kind != "i":
        raise InvalidTypeError(f"{what} must be integers, got an array of {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _all_python_ints(seq) -> bool:
    """Only called on the error path (a list numpy read as floats)."""
    try:
        return all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in seq)
    except TypeError:
        return False


def _bad(x, what):
    raise InvalidTypeError(f"{what} must be integers, got {type(x).__name__} {x!r}")


def repeated_ids(ids: np.ndarray) -> np.ndarray:
    """The IDs that appear more than once, sorted; empty if none (a sort and one comparison)."""
    if len(ids) < 2:
        return ids[:0]
    ordered = np.sort(ids)
    same = ordered[1:] == ordered[:-1]
    return np.unique(ordered[1:][same]) if same.any() else ordered[:0]


def shown_ids(ids: np.ndarray, limit: int = 10) -> str:
    """The first ``limit`` of ``ids`` for a message: ``"3, 5, 8"``."""
    return ", ".join(str(int(x)) for x in ids[:limit])


def check_unique(ids: np.ndarray, call: str, what: str = "ids", each: str = "id") -> None:
    """Refuse IDs given more than once (``InvalidInputError`` naming some of them): the one check of
    the package that a call's IDs are unique."""
    repeated = repeated_ids(ids)
    if len(repeated):
        raise InvalidInputError(f"{call}: the {what} contain duplicates ({shown_ids(repeated)}); pass each {each} once")


def as_values(values, n: int, width: int, dtype: np.dtype, call: str) -> np.ndarray:
    """Values of shape (n, width) cast to ``dtype``, all finite after the cast."""
    values = to_numpy(values)
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"{call}: values cannot be read as an array: {exc}") from None
    if arr.dtype.kind not in "fiu":
        raise InvalidTypeError(f"{call}: values must be numeric, got {arr.dtype}")
    if arr.shape != (n, width):
        raise InvalidInputError(f"{call}: values have shape {arr.shape}, expected ({n}, {width}) = (len(ids), dim)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InvalidInputError(f"{call}: values contain NaN or inf; nothing was written")
    if arr.dtype == dtype:  # nothing to cast (the common case): checked once, no copy
        return np.ascontiguousarray(arr)
    with np.errstate(over="ignore"):
        cast = np.ascontiguousarray(arr, dtype=dtype)
    if not np.isfinite(cast).all():
        raise InvalidInputError(f"{call}: values overflow {dtype} (largest {np.finfo(dtype).max}); nothing was written")
    return cast


def as_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        choices = ", ".join(SUPPORTED_DTYPES)
        raise InvalidInputError(f"dtype {dtype!r} is not understood; use one of {choices}") from None
    if dt.name not in SUPPORTED_DTYPES:
        raise InvalidInputError(f"dtype {dt.name} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    return dt.newbyteorder("<") if dt.byteorder == ">" else dt


def as_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def as_non_negative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InvalidInputError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)

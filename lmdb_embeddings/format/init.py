"""Initial row values, reproducible per row slot.

Values for a chunk come from a generator seeded with ``(seed, chunk_index)``, so the same
seed gives the same table however it was built (create at once, or create + add later),
and a chunk can be generated on its own without the rest of the table.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidInputError

INIT_KINDS = ("normal", "zeros", "uniform", "xavier", "kaiming")
NORMAL_STD = 0.01  # the original manager's N(0, 0.01^2)
UNIFORM_BOUND = 0.01


def init_spec(kind: str, n_rows: int, dim: int) -> dict:
    """Freeze an init kind into the parameters stored in the metadata."""
    if kind == "normal":
        return {"kind": "normal", "std": NORMAL_STD}
    if kind == "zeros":
        return {"kind": "zeros"}
    if kind == "uniform":
        return {"kind": "uniform", "bound": UNIFORM_BOUND}
    if kind == "xavier":  # torch.nn.init.xavier_uniform_ on a (n_rows, dim) weight
        return {"kind": "uniform", "bound": math.sqrt(6.0 / (dim + max(n_rows, 1))), "name": "xavier"}
    if kind == "kaiming":  # torch.nn.init.kaiming_uniform_ (a=0, fan_in=dim, relu gain)
        return {"kind": "uniform", "bound": math.sqrt(2.0) * math.sqrt(3.0 / dim), "name": "kaiming"}
    raise InvalidInputError(
        f"init={kind!r} is not known; use one of {', '.join(INIT_KINDS)} or an array of shape (len(ids), dim)"
    )


def spec_problem(spec, dtype: np.dtype) -> str | None:
    """Why a stored init ``spec`` cannot make rows of ``dtype`` (None if it can): it is what ``add``
    and ``create`` use, so a store or dump that carries a broken one is refused at open or restore."""
    if not isinstance(spec, dict):
        return f"init {spec!r} is not an init spec (a map with a 'kind')"
    kind = spec.get("kind")
    if kind == "zeros":
        return None
    scale = {"normal": "std", "uniform": "bound"}.get(kind) if isinstance(kind, str) else None
    if scale is None:
        return f"unknown init kind {kind!r}"
    value = spec.get(scale)
    # the rows are drawn in float32, then cast to the store dtype: both must hold them (normal: 16 sigma)
    largest = min(float(np.finfo(np.float32).max), float(np.finfo(dtype).max)) / (16 if kind == "normal" else 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= largest:
        return f"init {kind} {scale} {value!r} is not a number in [0, {largest:.3g}]"
    return None


def chunk_values(spec: dict, seed: int, chunk_index: int, chunk_rows: int, dim: int,
                 start: int, stop: int, dtype: np.dtype) -> np.ndarray:
    """Rows ``start:stop`` (offsets inside the chunk) of chunk ``chunk_index``."""
    kind = spec["kind"]
    if kind == "zeros":
        return np.zeros((stop - start, dim), dtype)
    rng = np.random.default_rng([seed, chunk_index])
    if kind == "normal":
        full = rng.standard_normal((chunk_rows, dim), dtype=np.float32)
        full *= np.float32(spec["std"])
    elif kind == "uniform":
        bound = spec["bound"]
        full = rng.uniform(-bound, bound, (chunk_rows, dim)).astype(np.float32)
    else:
        raise InvalidInputError(f"unknown init kind {kind!r} in the store's metadata")
    return full[start:stop].astype(dtype, copy=False)

"""Settings of an open handle, validated once, frozen."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import InvalidInputError, InvalidTypeError

DEFAULT_CACHE_MB = 512.0


@dataclass(frozen=True)
class StoreOptions:
    """Per-handle settings (``**open_options`` of ``create`` and ``open``).

    cache_mb: total budget of decoded chunks held in memory (L1 + L2), MiB.
    l1_fraction: share of ``cache_mb`` given to the L1 slab; the rest is L2.
    l1_mb / l2_mb: explicit tier budgets (override ``cache_mb`` / ``l1_fraction``).
    commit_every: commit after every K put/add calls (None: only explicit commits).
    readahead: let the OS read ahead in the data file (off helps random access beyond RAM).
    """

    cache_mb: float = DEFAULT_CACHE_MB
    l1_fraction: float = 0.75
    l1_mb: float | None = None
    l2_mb: float | None = None
    commit_every: int | None = None
    readahead: bool = True

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> StoreOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidTypeError(
                f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}"
            )
        opts = cls(**kwargs)
        for name in ("cache_mb", "l1_mb", "l2_mb"):
            value = getattr(opts, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise InvalidInputError(f"{name} must be a number of MiB >= 0, got {value!r}")
        if not 0.0 <= float(opts.l1_fraction) <= 1.0:
            raise InvalidInputError(f"l1_fraction must be within [0, 1], got {opts.l1_fraction!r}")
        ce = opts.commit_every
        if ce is not None and (isinstance(ce, bool) or not isinstance(ce, int) or ce < 1):
            raise InvalidInputError(f"commit_every must be a positive int or None, got {ce!r}")
        return opts

    def tier_bytes(self) -> tuple[int, int]:
        mib = 1 << 20
        l1 = self.l1_mb if self.l1_mb is not None else self.cache_mb * self.l1_fraction
        l2 = self.l2_mb if self.l2_mb is not None else self.cache_mb - l1
        return int(l1 * mib), int(max(l2, 0) * mib)

    def as_kwargs(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

"""Progress bars for long operations: on stderr, and only when asked for (the CLI asks on a terminal)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar(total: int, desc: str, enabled: bool, unit: str = "B") -> tqdm:
    """A tqdm bar on stderr (a disabled one costs nothing); use as a context manager."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)

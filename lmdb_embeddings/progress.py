"""Progress bars for long operations: on stderr, and only when someone is watching."""

from __future__ import annotations

import sys


def wanted(quiet: bool) -> bool:
    """A bar is shown only on a terminal and without ``--quiet``."""
    return not quiet and sys.stderr.isatty()


def bar(total: int, desc: str, enabled: bool, unit: str = "B"):
    """A tqdm bar on stderr (a disabled one costs nothing); use as a context manager."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024 if unit == "B" else 1000,
                file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)

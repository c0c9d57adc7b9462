"""One-line messages of the loaders: a few names of a long list, then how many more."""

from __future__ import annotations

__all__ = ["KEYS_SHOWN", "listing"]

#: How many keys an error message lists before it says "+N more".
KEYS_SHOWN = 5


def listing(keys: list[str] | tuple[str, ...] | set[str]) -> str:
    """The first :data:`KEYS_SHOWN` of ``keys`` (sorted when a set), and ``(+N more)``."""
    keys = sorted(keys) if isinstance(keys, set) else list(keys)
    shown = ", ".join(keys[:KEYS_SHOWN])
    more = len(keys) - KEYS_SHOWN
    return f"{shown} (+{more} more)" if more > 0 else shown

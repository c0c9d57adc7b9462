"""Floats as reports hold them: finite, or None where not (JSON has no NaN)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["Floats", "finite_or_none", "floats"]


def finite_or_none(x: float | None) -> float | None:
    """``float(x)`` or ``None`` when missing or not finite (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def floats(values: Iterable[float]) -> tuple[float | None, ...]:
    return tuple(finite_or_none(v) for v in values)


class Floats(Sequence["float | None"]):
    """The per-channel figures of a report: the tuple ``floats(values)``, made when first read.

    A scan measures a few thousand channels over both paths and keeps eight figures per
    channel; as Python floats, made at once, they were a sixth of a 20-layer scan's fixed cost
    (issue 16), and most scans never read them.  This holds the read-only float64 ``values``
    and behaves as the tuple it stands for: indexing, slicing (to a tuple), iteration, ``len``,
    ``==``, ``hash`` and ``+`` (to a tuple) against tuples and other ``Floats``; it pickles as
    that tuple and JSON writes it as a list.  ``tuple(x)`` gives the plain tuple.
    """

    __slots__ = ("_tuple", "_values")

    def __init__(self, values: Any) -> None:
        self._values = values
        self._tuple: tuple[float | None, ...] | None = None

    def _items(self) -> tuple[float | None, ...]:
        if self._tuple is None:
            listed = self._values.tolist()
            finite = bool(np.isfinite(self._values).all())
            self._tuple = tuple(listed) if finite else floats(listed)
        return self._tuple

    def __len__(self) -> int:
        return int(self._values.size)

    def __getitem__(self, index: Any) -> Any:
        return self._items()[index]

    def __iter__(self) -> Iterator[float | None]:
        return iter(self._items())

    def __contains__(self, value: object) -> bool:
        return value in self._items()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Floats):
            return self._items() == other._items()
        return self._items() == other if isinstance(other, tuple) else NotImplemented

    def __add__(self, other: object) -> Any:
        if isinstance(other, Floats):
            return self._items() + other._items()
        return self._items() + other if isinstance(other, tuple) else NotImplemented

    def __radd__(self, other: object) -> Any:
        return other + self._items() if isinstance(other, tuple) else NotImplemented

    def __mul__(self, n: int) -> tuple[float | None, ...]:
        return self._items() * n

    __rmul__ = __mul__

    def __hash__(self) -> int:
        return hash(self._items())

    def __repr__(self) -> str:
        return repr(self._items())

    def __reduce__(self) -> tuple[type, tuple[tuple[float | None, ...]]]:
        return tuple, (self._items(),)

    def __copy__(self) -> Floats:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, Any]) -> Floats:
        return self

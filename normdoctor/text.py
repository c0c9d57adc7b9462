"""Numbers and words for people: one precision for a column, plurals, reasons merged over
layers.  Plain functions on strings and floats (no normdoctor imports)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = ["NUMBER", "clip", "merge_numbers", "number_ranges", "plural", "significant"]


def significant(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits, trailing zeros kept (0.350, 0.0765, 12.0), so
    that a column of them reads at one precision; "-" for a missing value."""
    if x is None or not math.isfinite(x):
        return "-"
    text = f"{x:#.{digits}g}"
    return text[:-1] if text.endswith(".") else text


def plural(n: int, noun: str) -> str:
    """The count and its noun: 1 sample, 2 samples, 3 batches."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "sh", "ch", "x")) else f"{n} {noun}s"


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# A number in a text ("shift 0.287", "1e-12", "3.2x"), not a digit inside a name ("BatchNorm1d").
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def merge_numbers(reasons: Sequence[str]) -> str:
    """One text for texts (layers' reasons) that differ only in their numbers: each number becomes
    the range it takes over the layers ("population shift 0.102–0.451")."""
    parts = [NUMBER.split(r) for r in reasons]
    numbers = [NUMBER.findall(r) for r in reasons]
    out = parts[0][0]
    for slot, text in enumerate(parts[0][1:]):
        values = {n[slot] for n in numbers}
        if len(values) == 1:
            out += values.pop()
        else:
            floats = sorted(float(v) for v in values)
            out += f"{significant(floats[0])}–{significant(floats[-1])}"
        out += text
    return out


def number_ranges(numbers: Sequence[int], limit: int = 6) -> str:
    """Layer numbers as runs: "#1–3, 7, 9–150"; after ``limit`` runs, "…"."""
    runs: list[tuple[int, int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    text = ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in runs[:limit])
    return "#" + text + (", …" if len(runs) > limit else "")

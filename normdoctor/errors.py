"""The exceptions normdoctor raises on purpose.

Library code raises these; only the CLI turns them into a one-line message and an exit
code.  Anything else escaping the library is a bug.
"""

from __future__ import annotations

import re

__all__ = [
    "CompositionError",
    "ConversionError",
    "DataError",
    "LoadError",
    "NormDoctorError",
    "ScanError",
    "UnsafeFileError",
    "one_line",
]


class NormDoctorError(Exception):
    """Base class: a problem with the user's model, data or request, explained in one line."""


class LoadError(NormDoctorError):
    """A model or checkpoint file could not be opened or rebuilt."""


class UnsafeFileError(LoadError):
    """A model file was refused: reading it could run code stored in it, or its structure is
    ambiguous (two readers could see different contents)."""


class DataError(NormDoctorError):
    """The data could not be read, batched or fed to the model."""


class ScanError(NormDoctorError):
    """The model failed while being scanned (the forward pass raised)."""


class CompositionError(DataError):
    """The model cannot run batches composed like this (a graph with a fixed batch size asked
    for larger batches on the train path): that composition is not measurable, others may be."""


class ConversionError(NormDoctorError):
    """A layer conversion cannot be expressed or does not fit the model."""


def one_line(exc: BaseException | str, limit: int = 240) -> str:
    """The first line of an exception's message (its type's name when it has none), shortened,
    ANSI escapes removed: what a one-line error shows of a cause."""
    text = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
    line = text.splitlines()[0].strip() if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."

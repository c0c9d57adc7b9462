"""The exceptions normdoctor raises on purpose.

Library code raises these; only the CLI turns them into a one-line message and an exit
code.  Anything else escaping the library is a bug.
"""

from __future__ import annotations

__all__ = [
    "ConversionError",
    "DataError",
    "LoadError",
    "NormDoctorError",
    "ScanError",
    "UnsafeFileError",
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


class ConversionError(NormDoctorError):
    """A layer conversion cannot be expressed or does not fit the model."""

"""Deprecated import path: the ONNX source lives in :mod:`normdoctor.sources.onnx`.

Kept so that ``from normdoctor.onnx_backend import OnnxModel`` goes on working; like the new
package, importing it never imports onnx.
"""

from __future__ import annotations

from typing import Any

from ..sources.onnx import EXTRA_HINT, OnnxUnavailableError, require

__all__ = ["EXTRA_HINT", "OnnxModel", "OnnxUnavailableError", "require"]


def __getattr__(name: str) -> Any:
    if name == "OnnxModel":
        from ..sources import onnx

        return onnx.OnnxModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

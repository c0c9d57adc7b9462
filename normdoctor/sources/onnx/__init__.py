"""ONNX backend: find, scan and rewrite the normalization nodes of an ONNX graph.

One statistics and metrics pipeline serves every source (DESIGN.md): a graph delivers the input
of each ``BatchNormalization`` node by exposing it as an extra graph output and running
onnxruntime (:mod:`.source`); the numbers go through the same
:class:`~normdoctor.recording.Recorder` and the same driver (:func:`normdoctor.scan.scan`) as a
PyTorch model's.

Importing this package never imports onnx; asking for :class:`OnnxModel` does, and raises
:class:`OnnxUnavailableError` (a :class:`~normdoctor.errors.LoadError` and an ``ImportError``)
naming the extra to install when onnx or onnxruntime is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._deps import EXTRA_HINT, OnnxUnavailableError, require

if TYPE_CHECKING:
    from .model import OnnxModel

__all__ = ["EXTRA_HINT", "OnnxModel", "OnnxUnavailableError", "require"]


def __getattr__(name: str) -> Any:
    if name == "OnnxModel":
        require()
        from .model import OnnxModel

        globals()["OnnxModel"] = OnnxModel
        return OnnxModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

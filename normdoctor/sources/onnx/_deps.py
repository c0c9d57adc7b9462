"""The optional dependencies of the ONNX backend, imported on demand."""

from __future__ import annotations

from ...errors import LoadError

__all__ = ["EXTRA_HINT", "OnnxUnavailableError", "require"]

EXTRA_HINT = "pip install normdoctor[onnx]"


class OnnxUnavailableError(LoadError, ImportError):
    """onnx or onnxruntime is not installed."""


def require() -> None:
    """Import onnx and onnxruntime, or raise :class:`OnnxUnavailableError` naming the extra."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        missing = exc.name or str(exc)
        raise OnnxUnavailableError(
            f"the ONNX backend needs onnx and onnxruntime ({missing} is not installed): "
            f"{EXTRA_HINT}"
        ) from exc

"""normdoctor: find and fix the train/inference mismatch of normalization layers.

The names that need torch (scanning, patching, loading models) are imported on first use, so
that reading saved results (``normdoctor report scan.json``, ``diff``, ``ScanReport.from_json``)
never pays torch's import, about 2 s.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from . import render  # noqa: F401  (serves the deprecated ScanReport.plot / save_report)
from ._version import __version__
from .errors import (
    ConversionError,
    DataError,
    LoadError,
    NormDoctorError,
    ScanError,
    UnsafeFileError,
)
from .metrics import Recommendation
from .report import LayerReport, ScanReport, Verdict

if TYPE_CHECKING:
    from .io import load_model
    from .layers import NormLayer, find_norm_layers
    from .monitor import Monitor, MonitorWarning, monitor
    from .patch import autopatch, impact, patch, revert
    from .patch.recalibrate import recalibrate
    from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
    from .scan import scan, sweep_batch_sizes

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ConversionError",
    "DataError",
    "LayerReport",
    "LoadError",
    "Monitor",
    "MonitorWarning",
    "NormDoctorError",
    "NormLayer",
    "Recommendation",
    "ScanError",
    "ScanReport",
    "UnsafeFileError",
    "Verdict",
    "__version__",
    "autopatch",
    "find_norm_layers",
    "impact",
    "load_model",
    "monitor",
    "patch",
    "recalibrate",
    "revert",
    "scan",
    "sweep_batch_sizes",
]

#: Public name -> the module that defines it (each imports torch).
_LAZY = {
    "load_model": "io",
    "NormLayer": "layers",
    "find_norm_layers": "layers",
    "Monitor": "monitor",
    "MonitorWarning": "monitor",
    "monitor": "monitor",
    "autopatch": "patch",
    "impact": "patch",
    "patch": "patch",
    "recalibrate": "patch",
    "revert": "patch",
    "BatchRenorm1d": "renorm",
    "BatchRenorm2d": "renorm",
    "BatchRenorm3d": "renorm",
    "scan": "scan",
    "sweep_batch_sizes": "scan",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """``normdoctor.scan``, ``.patch`` and ``.monitor`` are functions that share their name with
    a submodule.  Importing the submodule binds it on the package; as before the imports were
    lazy, the package's attribute stays the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

"""normdoctor: find and fix the train/inference mismatch of normalization layers."""

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
from .io import load_model
from .layers import NormLayer, find_norm_layers
from .metrics import Recommendation
from .monitor import Monitor, MonitorWarning, monitor
from .patch import autopatch, impact, patch, recalibrate, revert
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .report import LayerReport, ScanReport, Verdict
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

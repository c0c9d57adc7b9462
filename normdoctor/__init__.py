"""normdoctor: find and fix the train/inference mismatch of normalization layers."""

__version__ = "0.1.0"

from .errors import ConversionError, DataError, LoadError, NormDoctorError, ScanError
from .layers import NormLayer, find_norm_layers
from .metrics import Recommendation
from .report import LayerReport, ScanReport
from .scan import scan, sweep_batch_sizes

__all__ = [
    "ConversionError",
    "DataError",
    "LayerReport",
    "LoadError",
    "NormDoctorError",
    "NormLayer",
    "Recommendation",
    "ScanError",
    "ScanReport",
    "__version__",
    "find_norm_layers",
    "load_model",
    "scan",
    "sweep_batch_sizes",
]

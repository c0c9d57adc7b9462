"""Module conversions and their exact inverses, and the one patched-model file format.

========== ====================================================================================
``to``     what the layer becomes
========== ====================================================================================
renorm     :class:`~normdoctor.renorm.BatchRenorm2d` (1d/3d): same function at inference until
           the model is fine-tuned in train mode; then training matches inference.
instance   :class:`InstanceNormFromBN2d` (1d/3d): InstanceNorm with the same affine parameters.
           A model trained at batch size 1 normalized each sample on its own: this reproduces
           its training behaviour exactly.
batchstats :class:`BatchStatsNorm2d` (1d/3d): always normalizes with the current batch's
           statistics, optionally blended with the running ones (``prior``).
recalibrate running statistics set to the exact pooled statistics of data
           (:func:`normdoctor.patch.recalibrate`, which runs the model: not part of this package).
========== ====================================================================================

Layout: :mod:`.targets` (the fix vocabulary), :mod:`.modules` (the replacement modules),
:mod:`.core` (converting one module and a tree, the subclass checks, :func:`revert`),
:mod:`.select` (which layers, which options), :mod:`.record` (the record a patched model
carries), :mod:`.manifest` (the file format).  Nothing here runs a model on data:
:func:`normdoctor.patch.patch` measures input shapes and recalibrates, then calls
:func:`~normdoctor.convert.core.convert_layers`.
"""

from __future__ import annotations

from .core import convert_layers, revert
from .manifest import (
    MANIFEST_KEY,
    MANIFEST_VERSION,
    apply_manifest,
    check_file_manifest,
    load_patched,
    save_patched,
    validate_entries,
)
from .modules import (
    BatchStatsNorm,
    BatchStatsNorm1d,
    BatchStatsNorm2d,
    BatchStatsNorm3d,
    InstanceNormFromBN,
    InstanceNormFromBN1d,
    InstanceNormFromBN2d,
    InstanceNormFromBN3d,
    kind_of,
)
from .record import RECORD_ATTR, records
from .select import Layers, resolve, split_options
from .targets import (
    AUTO,
    BATCHSTATS,
    CONVERSIONS,
    INSTANCE,
    RECALIBRATE,
    RENORM,
    TARGETS,
)

__all__ = [
    "AUTO",
    "BATCHSTATS",
    "CONVERSIONS",
    "INSTANCE",
    "MANIFEST_KEY",
    "MANIFEST_VERSION",
    "RECALIBRATE",
    "RECORD_ATTR",
    "RENORM",
    "TARGETS",
    "BatchStatsNorm",
    "BatchStatsNorm1d",
    "BatchStatsNorm2d",
    "BatchStatsNorm3d",
    "InstanceNormFromBN",
    "InstanceNormFromBN1d",
    "InstanceNormFromBN2d",
    "InstanceNormFromBN3d",
    "Layers",
    "apply_manifest",
    "check_file_manifest",
    "convert_layers",
    "kind_of",
    "load_patched",
    "records",
    "resolve",
    "revert",
    "save_patched",
    "split_options",
    "validate_entries",
]

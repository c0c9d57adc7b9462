"""Fixing what a scan finds: layer conversions, exact recalibration, automatic patching.

Conversions follow PyTorch's ``SyncBatchNorm.convert_sync_batchnorm`` as refined by timm
(STYLE.md): recurse over ``named_children``, build the replacement from the original's
hyper-parameters, take over its tensors, ``training`` flag and ``qconfig``, re-add a child only
when it changed, return the (possibly new) root; ``inplace=False`` deep-copies first so the
user's model is never modified; every conversion has its inverse (:func:`revert`).

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
recalibrate running statistics set to the exact pooled statistics of data (:func:`recalibrate`).
========== ====================================================================================

Subclasses of BatchNorm keep their behaviour or are refused: a subclass that applies child
modules after normalizing (timm's ``BatchNormAct2d``: dropout, then activation) is checked
numerically, in eval and in train mode, against "BatchNorm, then its children in some order";
the order that reproduces it is kept in the converted layer.  Anything else that overrides
``forward`` raises :class:`~normdoctor.errors.ConversionError`.  (PyTorch's own
``convert_sync_batchnorm`` silently drops such an activation.)

Patched models are saved as one file (:func:`save_patched`): the state dict plus a manifest of
the conversions, re-applied to a freshly built original architecture by :func:`apply_manifest`.

Layout: the conversions, their inverse and the file format are :mod:`normdoctor.convert`'s
(nothing there runs a model); here are what runs the model on data: :mod:`.fix`
(:func:`patch`), :mod:`.recalibrate` and :mod:`.auto` (:func:`impact`, :func:`autopatch`,
:func:`verify_patch`).  Every name is re-exported here.
"""

from __future__ import annotations

from ..convert.core import revert
from ..convert.manifest import (
    MANIFEST_VERSION,
    apply_manifest,
    load_patched,
    save_patched,
)
from ..convert.manifest import RECORD_ATTR as RECORD_ATTR
from ..convert.modules import (
    BatchStatsNorm1d,
    BatchStatsNorm2d,
    BatchStatsNorm3d,
    InstanceNormFromBN1d,
    InstanceNormFromBN2d,
    InstanceNormFromBN3d,
)
from ..convert.select import Layers as Layers
from ..convert.targets import CONVERSIONS
from ..convert.targets import TARGETS as TARGETS
from .auto import PatchCheck as PatchCheck
from .auto import autopatch, impact
from .auto import verify_patch as verify_patch
from .fix import patch
from .recalibrate import Forward as Forward
from .recalibrate import recalibrate

# Also importable from here, as before the split, though not in __all__: TARGETS, Layers,
# Forward, PatchCheck, verify_patch, RECORD_ATTR.

__all__ = [
    "CONVERSIONS",
    "MANIFEST_VERSION",
    "BatchStatsNorm1d",
    "BatchStatsNorm2d",
    "BatchStatsNorm3d",
    "InstanceNormFromBN1d",
    "InstanceNormFromBN2d",
    "InstanceNormFromBN3d",
    "apply_manifest",
    "autopatch",
    "impact",
    "load_patched",
    "patch",
    "recalibrate",
    "revert",
    "save_patched",
]

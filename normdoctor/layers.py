"""What counts as a normalization layer, and how to find them in a model."""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["NormFamily", "NormLayer", "find_norm_layers", "is_batch_dependent", "select_layers"]


class NormFamily(enum.StrEnum):
    """How a layer normalizes; decides whether it can drift between train and eval."""

    BATCH = "batch"  # BatchNorm*, SyncBatchNorm, subclasses: batch stats in train, running in eval
    FROZEN = "frozen"  # duck-typed BN with running buffers only (FrozenBatchNorm2d): always running
    INSTANCE_TRACKED = "instance_tracked"  # InstanceNorm(track_running_stats=True): the eval trap
    BATCH_STATS_ONLY = (
        "batch_stats_only"  # BatchNorm(track_running_stats=False): batch stats always
    )
    INSTANCE = "instance"  # per-sample statistics in both modes
    GROUP = "group"
    LAYER = "layer"
    RMS = "rms"
    LOCAL_RESPONSE = "local_response"


#: Families measured by a scan: they hold running statistics that stand in for batch statistics
#: at inference.  FROZEN layers never switch to batch statistics themselves, but their running
#: statistics can still be measured against the data they see.
BATCH_DEPENDENT = frozenset({NormFamily.BATCH, NormFamily.FROZEN, NormFamily.INSTANCE_TRACKED})


@dataclass(frozen=True, slots=True, kw_only=True)
class NormLayer:
    """One normalization layer of a model, described by plain values.

    Attributes:
        name: qualified module name (``""`` for the root module).
        kind: the module's class name, e.g. ``"BatchNorm2d"`` or ``"BatchNormAct2d"``.
        family: how it normalizes (see :class:`NormFamily`).
        num_features: channels normalized (0 for an unmaterialized lazy layer).
        eps: the epsilon added to the variance.
        momentum: running-statistics momentum in PyTorch's convention (new = (1-m)·old + m·batch);
            ``None`` means a cumulative average.
        affine: has a learnable per-channel scale and shift.
        track_running_stats: holds ``running_mean``/``running_var`` buffers.
        materialized: ``False`` for a lazy layer that has not seen an input yet.
    """

    name: str
    kind: str
    family: NormFamily
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    materialized: bool = True

    @property
    def batch_dependent(self) -> bool:
        """True when eval mode (running statistics) differs from train mode (batch statistics)."""
        return self.family in BATCH_DEPENDENT


def _has_running_buffers(module: nn.Module) -> bool:
    buffers = module._buffers
    return isinstance(buffers.get("running_mean"), torch.Tensor) and isinstance(
        buffers.get("running_var"), torch.Tensor
    )


def _family(module: nn.Module) -> NormFamily | None:
    # Most specific first: InstanceNorm and BatchNorm share _NormBase.
    if isinstance(module, _InstanceNorm):
        return NormFamily.INSTANCE_TRACKED if _has_running_buffers(module) else NormFamily.INSTANCE
    if isinstance(module, _BatchNorm):
        return NormFamily.BATCH if _has_running_buffers(module) else NormFamily.BATCH_STATS_ONLY
    if isinstance(module, nn.GroupNorm):
        return NormFamily.GROUP
    if isinstance(module, nn.LayerNorm):
        return NormFamily.LAYER
    if isinstance(module, nn.RMSNorm):
        return NormFamily.RMS
    if isinstance(module, nn.LocalResponseNorm):
        return NormFamily.LOCAL_RESPONSE
    if _has_running_buffers(module) and not list(module.children()):
        # FrozenBatchNorm2d (torchvision, detectron2) and friends: BN semantics, no train mode.
        return NormFamily.FROZEN
    return None


def _as_float(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _describe(name: str, module: nn.Module, family: NormFamily) -> NormLayer:
    lazy = isinstance(module, _LazyNormBase) and module.has_uninitialized_params()
    if family in (NormFamily.GROUP,):
        num_features = int(module.num_channels)
    elif family in (NormFamily.LAYER, NormFamily.RMS):
        shape = tuple(module.normalized_shape)
        num_features = int(shape[-1]) if shape else 0
    elif family is NormFamily.LOCAL_RESPONSE or lazy:
        num_features = 0
    else:
        num_features = int(getattr(module, "num_features", 0) or module.running_mean.numel())
    eps = _as_float(getattr(module, "eps", None))
    affine = getattr(module, "affine", None)
    if affine is None:
        affine = getattr(module, "elementwise_affine", None)
    if affine is None:
        affine = isinstance(module._parameters.get("weight"), torch.Tensor) or isinstance(
            module._buffers.get("weight"), torch.Tensor
        )
    momentum = getattr(module, "momentum", None) if family in BATCH_DEPENDENT else None
    return NormLayer(
        name=name,
        kind=type(module).__name__,
        family=family,
        num_features=num_features,
        eps=eps if eps is not None else 0.0,
        momentum=_as_float(momentum),
        affine=bool(affine),
        track_running_stats=_has_running_buffers(module),
        materialized=not lazy,
    )


def find_norm_layers(model: nn.Module) -> list[NormLayer]:
    """Every normalization layer of ``model``, in registration order.

    Registration order is the forward order for sequential models; :func:`normdoctor.scan`
    reports layers in the order they actually executed.

    Args:
        model: any ``nn.Module``; not modified.

    Returns:
        One :class:`NormLayer` per normalization module (shared modules listed once).
    """
    found = []
    for name, module in model.named_modules():
        family = _family(module)
        if family is not None:
            found.append(_describe(name, module, family))
    return found


def is_batch_dependent(module: nn.Module) -> bool:
    """True for modules whose train-mode output depends on the batch (and eval uses running stats)."""
    family = _family(module)
    return family is not None and family in BATCH_DEPENDENT


def select_layers(
    layers: Iterable[NormLayer], patterns: str | Iterable[str] | None
) -> list[NormLayer]:
    """The layers whose name matches any of the glob ``patterns`` (all layers for ``None``)."""
    layers = list(layers)
    if patterns is None:
        return layers
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    return [layer for layer in layers if any(fnmatch.fnmatchcase(layer.name, p) for p in patterns)]

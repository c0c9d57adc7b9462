"""What counts as a normalization layer, and how to find them in a model.

torch's norm classes (and their subclasses) are known by class.  Any other module is judged by
what it holds and computes (:func:`_duck_family`): per-channel ``running_var`` (with or without
``running_mean``) or a class named ``...Norm...`` with a per-channel ``weight``; children that
only post-process (dropout, activations: timm's FrozenBatchNormAct2d); and a numerical check,
run once per module on random inputs with everything restored, of whether its output for some
samples depends on the others, in train and in eval mode.
"""

from __future__ import annotations

import enum
import fnmatch
import itertools
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = [
    "BATCH_DEPENDENT",
    "BATCH_NORMS",
    "INSTANCE_NORMS",
    "RUNNING_STATS",
    "NormFamily",
    "NormLayer",
    "NormState",
    "find_norm_layers",
    "is_batch_dependent",
    "module_state",
    "norm_layers",
    "select_layers",
]


class NormFamily(enum.StrEnum):
    """How a layer normalizes; decides whether it can drift between train and eval."""

    BATCH = "batch"  # BatchNorm*, SyncBatchNorm, subclasses: batch stats in train, running in eval
    FROZEN = "frozen"  # BN running buffers used in train mode too (FrozenBatchNorm2d, ...Act2d)
    INSTANCE_TRACKED = "instance_tracked"  # InstanceNorm(track_running_stats=True): the eval trap
    BATCH_STATS_ONLY = (
        "batch_stats_only"  # BatchNorm(track_running_stats=False): batch stats always
    )
    # Batch variance in train mode, ``running_var`` in eval mode, no mean subtracted and no
    # ``running_mean`` (timm's EvoNorm2dB0): batch-dependent, not measured (see BATCH_DEPENDENT).
    BATCH_VAR = "batch_var"
    # BatchNorm semantics (batch statistics in train mode, running_mean/running_var in eval) in
    # a class that is no torch BatchNorm (hand-written): not measured (see BATCH_DEPENDENT).
    BATCH_OTHER = "batch_other"
    INSTANCE = "instance"  # per-sample statistics in both modes
    GROUP = "group"
    LAYER = "layer"
    RMS = "rms"
    LOCAL_RESPONSE = "local_response"
    # Other per-sample normalizations (EvoNorm S0/S0a, FilterResponseNorm, hand-written RMS or
    # layer norms): batch-independent, found by name, per-channel weight and a numerical check.
    PER_SAMPLE = "per_sample"


#: Families measured by a scan: they hold running statistics that stand in for batch statistics
#: at inference.  FROZEN layers never switch to batch statistics themselves, but their running
#: statistics can still be measured against the data they see.  BATCH_VAR and BATCH_OTHER are
#: batch-dependent too but left out: the recorder needs ``running_mean`` (BATCH_VAR has none),
#: and the train path can only keep torch's own norm classes from updating their running
#: statistics (``track_running_stats=False``), which a hand-written class may ignore.
BATCH_DEPENDENT = frozenset({NormFamily.BATCH, NormFamily.FROZEN, NormFamily.INSTANCE_TRACKED})
#: Families whose running statistics stand in for batch statistics at inference, measured or not.
RUNNING_STATS = BATCH_DEPENDENT | {NormFamily.BATCH_VAR, NormFamily.BATCH_OTHER}


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
        track_running_stats: holds running statistics (``running_var``, with ``running_mean``
            except for BATCH_VAR layers).
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
        """True for the layers a scan measures: running statistics stand in for batch statistics
        at inference (see :data:`BATCH_DEPENDENT` for the batch-dependent families left out)."""
        return self.family in BATCH_DEPENDENT


@dataclass(frozen=True, slots=True)
class NormState:
    """The tensors of a norm layer that the metrics need (any may be missing)."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None


def module_state(module: nn.Module) -> NormState:
    """What ``module`` stores: its running statistics and its weight (parameter or buffer)."""
    weight: torch.Tensor | None = module._parameters.get("weight")
    if weight is None:
        weight = module._buffers.get("weight")
    return NormState(
        module._buffers.get("running_mean"), module._buffers.get("running_var"), weight
    )


def _has_running_buffers(module: nn.Module) -> bool:
    buffers = module._buffers
    return isinstance(buffers.get("running_mean"), torch.Tensor) and isinstance(
        buffers.get("running_var"), torch.Tensor
    )


# ------------------------------------------------------------------ modules torch does not know


def _vector(module: nn.Module, key: str) -> torch.Tensor | None:
    """``module``'s own 1-D floating tensor ``key`` (parameter or buffer), else None."""
    t: torch.Tensor | None = module._parameters.get(key)
    if t is None:
        t = module._buffers.get(key)
    if isinstance(t, torch.Tensor) and t.dim() == 1 and t.is_floating_point() and t.numel() > 0:
        return t
    return None


def _channels(module: nn.Module) -> int | None:
    """The channel count a module's own per-channel tensors agree on, else None.

    ``running_var`` (or, without it, ``weight``) sets it; ``running_mean``, ``weight`` and
    ``bias`` must match where present.
    """
    anchor = _vector(module, "running_var")
    if anchor is None:
        anchor = _vector(module, "weight")
    if anchor is None:
        return None
    c = anchor.numel()
    for key in ("running_mean", "weight", "bias"):
        present = module._parameters.get(key, module._buffers.get(key))
        if present is not None and (
            not isinstance(present, torch.Tensor) or present.numel() != c or present.dim() != 1
        ):
            return None
    return c


def _leaf_like(module: nn.Module, c: int) -> bool:
    """The children only post-process (dropout, activations): no buffers, no norm layers and
    at most per-channel parameters of their own, so the module itself does the normalizing."""
    for child in module.children():
        for m in child.modules():
            if any(b is not None for b in m._buffers.values()):
                return False
            if any(p is not None and p.numel() > c for p in m._parameters.values()):
                return False
            if norm_family(m) is not None:
                return False
    return True


#: Input shapes tried, in order, by the batch-dependence check: (N, C, H, W) first (most such
#: layers are 2d and some refuse anything else), then (N, C, L), (N, C), (N, C, D, H, W).
_PROBE_SHAPES = ((4, 5, 5), (4, 7), (4,), (4, 3, 3, 3))
#: Outputs of the first samples that agree this closely do not depend on the other samples; a
#: batch-dependent layer moves them by O(1) (the other samples are scaled by 4 and shifted by 3).
_PROBE_RTOL = 1e-3
_PROBE_ATOL = 1e-3


def _depends_on_batch(module: nn.Module, c: int) -> tuple[bool, bool] | None:
    """(train mode, eval mode): does the output for some samples change with the others?

    Runs ``module.forward`` (its own hooks skipped) on random inputs in its dtype and device,
    with its children in eval mode (dropout off, as on the train path), and restores every
    ``training`` flag and buffer value afterwards.  ``None`` when no input shape is accepted or
    the module lives on the meta device.
    """
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.is_meta for t in tensors):
        return None
    ref = _vector(module, "running_var")
    ref = ref if ref is not None else _vector(module, "weight")
    device, dtype = (ref.device, ref.dtype) if ref is not None else (None, torch.float32)
    flags = [(m, m.training) for m in module.modules()]
    saved = [
        (m, k, t, t.detach().clone())
        for m in module.modules()
        for k, t in m._buffers.items()
        if t is not None
    ]

    def restore_buffers() -> None:
        with torch.no_grad():
            for m, k, t, value in saved:
                m._buffers[k] = t
                t.copy_(value)

    gen = torch.Generator().manual_seed(0)
    devices = [device] if device is not None and device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for m in module.modules():
                m.training = False
            for tail in _PROBE_SHAPES:
                shape = (tail[0], c, *tail[1:])
                a = torch.randn(shape, generator=gen, dtype=torch.float64)
                b = a.clone()
                b[2:] = b[2:] * 4 + 3
                a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
                result = []
                try:
                    for training in (True, False):
                        module.training = training
                        outs = []
                        for x in (a, b):
                            torch.manual_seed(0)
                            y = module.forward(x.clone())
                            restore_buffers()
                            if not isinstance(y, torch.Tensor) or y.shape[:1] != (4,):
                                raise TypeError("not a per-sample tensor output")
                            outs.append(y[:2].detach().to(torch.float64))
                        same = torch.allclose(
                            outs[0], outs[1], rtol=_PROBE_RTOL, atol=_PROBE_ATOL, equal_nan=True
                        )
                        result.append(not same)
                except Exception:  # this shape is not what the module takes: try the next
                    restore_buffers()
                    continue
                return result[0], result[1]
            return None
    finally:
        for m, flag in flags:
            m.training = flag
        restore_buffers()


#: Classification of modules torch does not know, cached per module: (signature, family).
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, NormFamily | None]] = (
    weakref.WeakKeyDictionary()
)


def _signature(module: nn.Module) -> tuple:
    own = tuple(
        (k, tuple(t.shape), t.dtype, str(t.device))
        for k, t in itertools.chain(module._parameters.items(), module._buffers.items())
        if t is not None
    )
    return type(module), own, tuple((n, type(m)) for n, m in module.named_children())


def _duck_family(module: nn.Module) -> NormFamily | None:
    """Family of a module that is no torch norm class, from what it holds and computes."""
    buffers = module._buffers
    named = "Norm" in type(module).__name__
    if not named and "running_var" not in buffers and "running_var" not in module._parameters:
        return None  # what the checks below find too, for most modules of a model, at less cost
    has_var = _vector(module, "running_var") is not None
    has_mean = _vector(module, "running_mean") is not None
    named_norm = named and _vector(module, "weight") is not None
    if "running_mean" in buffers and not has_mean:
        return None  # a running_mean that is not a per-channel vector: not BatchNorm-like
    if not (has_var or named_norm):
        return None
    c = _channels(module)
    if c is None or not _leaf_like(module, c):
        return None
    key = _signature(module)
    cached = _CACHE.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    found = _depends_on_batch(module, c)
    if found is None:  # cannot run it: fall back on what it holds
        family = NormFamily.FROZEN if has_var and has_mean else None
        family = NormFamily.PER_SAMPLE if family is None and named_norm else family
    else:
        train, infer = found
        if infer:
            family = NormFamily.BATCH_STATS_ONLY  # batch statistics at inference too
        elif not train:
            # Running statistics in train mode too (FrozenBatchNorm2d, FrozenBatchNormAct2d);
            # without a running mean it cannot be a BatchNorm: a per-sample normalization.
            family = NormFamily.FROZEN if has_var and has_mean else NormFamily.PER_SAMPLE
        elif has_var:
            family = NormFamily.BATCH_OTHER if has_mean else NormFamily.BATCH_VAR
        else:
            family = NormFamily.BATCH_OTHER  # batch statistics in training, kept elsewhere
    _CACHE[module] = (key, family)
    return family


def norm_family(module: nn.Module) -> NormFamily | None:
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
    # FrozenBatchNorm2d (torchvision, detectron2), timm's FrozenBatchNormAct2d (with drop and
    # act children), EvoNorm, FilterResponseNorm, hand-written BatchNorms: by what they hold and
    # compute, not by their class.
    return _duck_family(module)


def _as_float(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


_ABSENT = object()


def _describe(name: str, module: nn.Module, family: NormFamily) -> NormLayer:
    lazy = isinstance(module, _LazyNormBase) and module.has_uninitialized_params()
    attrs = cast(Any, module)  # plain attributes, which nn.Module's stubs type as tensors
    if family in (NormFamily.GROUP,):
        num_features = int(attrs.num_channels)
    elif family in (NormFamily.LAYER, NormFamily.RMS):
        shape = tuple(attrs.normalized_shape)
        num_features = int(shape[-1]) if shape else 0
    elif family is NormFamily.LOCAL_RESPONSE or lazy:
        num_features = 0
    else:
        num_features = int(getattr(module, "num_features", 0) or _channels(module) or 0)
    eps: Any = getattr(module, "eps", _ABSENT)
    if eps is _ABSENT:  # looked up only then: a missing attribute raises inside nn.Module
        eps = getattr(module, "variance_epsilon", None)
    eps = _as_float(eps)
    affine = getattr(module, "affine", None)
    if affine is None:
        affine = getattr(module, "elementwise_affine", None)
    if affine is None:
        affine = isinstance(module._parameters.get("weight"), torch.Tensor) or isinstance(
            module._buffers.get("weight"), torch.Tensor
        )
    momentum = getattr(module, "momentum", None) if family in RUNNING_STATS else None
    return NormLayer(
        name=name,
        kind=type(module).__name__,
        family=family,
        num_features=num_features,
        eps=eps if eps is not None else 0.0,
        momentum=_as_float(momentum),
        affine=bool(affine),
        track_running_stats=_has_running_buffers(module) or family is NormFamily.BATCH_VAR,
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
    return norm_layers(model.named_modules())


def norm_layers(named: Iterable[tuple[str, nn.Module]]) -> list[NormLayer]:
    """:func:`find_norm_layers` of the modules ``named`` (a model's ``named_modules()``, or a
    dict of them the caller already has)."""
    found = []
    for name, module in named:
        family = norm_family(module)
        if family is not None:
            found.append(_describe(name, module, family))
    return found


def is_batch_dependent(module: nn.Module) -> bool:
    """True for modules whose train-mode output depends on the batch (and eval uses running stats)."""
    family = norm_family(module)
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


#: torch's BatchNorm and InstanceNorm classes by the dimensionality of their inputs (1d/2d/3d).
BATCH_NORMS: dict[int, type[_BatchNorm]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INSTANCE_NORMS: dict[int, type[_InstanceNorm]] = {
    1: nn.InstanceNorm1d,
    2: nn.InstanceNorm2d,
    3: nn.InstanceNorm3d,
}

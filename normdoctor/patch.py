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
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import itertools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from . import distributed as _dist
from ._globals import preserved_globals
from .batching import Batch, GroupBy, plan_batches
from .errors import ConversionError, DataError, LoadError, NormDoctorError, ScanError
from .layers import RUNNING_STATS, NormFamily, NormLayer, find_norm_layers, norm_family
from .metrics import Recommendation
from .outputs import write_atomic
from .recording import LayerMeasurement
from .renorm import (
    BN_TENSORS,
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    RenormSchedule,
)
from .report import ScanReport
from .scan import path_outcomes, scan
from .search import agreement as search_agreement
from .search import divergence as search_divergence
from .sources.torch import Probe, default_forward, model_device_dtype, output_tensor, to_device

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

#: Structural conversions (recorded in the manifest); ``recalibrate`` only changes buffers.
CONVERSIONS = ("renorm", "instance", "batchstats")
TARGETS = (*CONVERSIONS, "recalibrate")
MANIFEST_VERSION = 1
#: Attribute of a patched root module: the conversions applied, as manifest entries.
RECORD_ATTR = "normdoctor_conversions"
_TEMPLATE_ATTR = "_normdoctor_template"

Forward = Callable[[nn.Module, Any], Any]

_RENORM_OPTIONS = ("r_max", "d_max", "hold_steps", "r_max_steps", "d_max_steps", "schedule")
_OPTIONS: dict[str, tuple[str, ...]] = {
    "renorm": (*_RENORM_OPTIONS, "dim"),
    "instance": ("dim",),
    "batchstats": ("prior", "dim"),
}
_RECAL_OPTIONS = ("mode", "batch_size", "shuffle", "seed", "group_by", "max_batches", "device")

#: Relative and absolute tolerance of the behaviour check of BatchNorm subclasses: the same
#: float operations in a possibly different order (a subclass may call F.batch_norm itself), so
#: a few float32 ulps; a real difference in behaviour (an activation, a scale) is far larger.
_BEHAVIOUR_RTOL = 1e-5
_BEHAVIOUR_ATOL = 1e-6


# =========================================================================== target modules


class _KeepsBatchNorm:
    """Mixin: holds the replaced BatchNorm's running statistics as ``bn_running_mean``,
    ``bn_running_var`` and ``bn_num_batches_tracked`` (so :func:`revert` restores them and the
    scan sees no running statistics to drift), applies post-normalization children in
    ``_post`` order, and names itself in errors."""

    _post: tuple[str, ...]
    normdoctor_name: str

    def _init_kept(self, device: Any, dtype: Any, c: int) -> None:
        # Neutral values (mean 0, variance 1) until a BatchNorm's tensors are taken over.
        module: nn.Module = self  # type: ignore[assignment]
        f = {"device": device, "dtype": dtype}
        module.register_buffer("bn_running_mean", torch.zeros(c, **f))
        module.register_buffer("bn_running_var", torch.ones(c, **f))
        module.register_buffer(
            "bn_num_batches_tracked", torch.zeros((), dtype=torch.long, device=device)
        )
        self._post = ()
        self.normdoctor_name = ""

    def _take_tensors(self, bn: _BatchNorm) -> None:
        module: nn.Module = self  # type: ignore[assignment]
        for key in ("weight", "bias"):
            if bn._parameters.get(key) is not None:
                module._parameters[key] = bn._parameters[key]
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            module._buffers["bn_" + key] = bn._buffers.get(key)

    def _apply_post(self, out: torch.Tensor) -> torch.Tensor:
        module: nn.Module = self  # type: ignore[assignment]
        for name in self._post:
            out = module._modules[name](out)  # type: ignore[misc]
        return out

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # An original BatchNorm state dict loads too: its running statistics are the kept ones.
        # (Module.load_state_dict hands every module a private copy of the dict.)
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            if prefix + key in state_dict and prefix + "bn_" + key not in state_dict:
                state_dict[prefix + "bn_" + key] = state_dict.pop(prefix + key)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class _BatchStatsNorm(_KeepsBatchNorm, _BatchNorm):
    """Shared implementation of :class:`BatchStatsNorm1d`/``2d``/``3d``."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        prior: float = 0.0,
    ) -> None:
        # track_running_stats=False: running_mean/running_var are None, so BatchNorm itself (and
        # the scan) treats the layer as one that uses batch statistics in train and eval mode.
        super().__init__(num_features, eps, momentum, affine, False, device, dtype)
        self.prior = _check_prior(prior)
        self._init_kept(device, dtype, num_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.prior == 0.0 or self.bn_running_mean is None or self.bn_running_var is None:
            out = F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        else:
            # Schneider et al. 2020: the running statistics count as `prior` samples, the batch
            # as its n samples.
            dims = [0, *range(2, input.dim())]
            batch_var, batch_mean = torch.var_mean(input, dim=dims, correction=0)
            n = input.shape[0]
            total = self.prior + n
            mean = (self.prior * self.bn_running_mean + n * batch_mean) / total
            var = (self.prior * self.bn_running_var + n * batch_var) / total
            shape = [1, -1] + [1] * (input.dim() - 2)
            out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
            if self.weight is not None and self.bias is not None:
                out = out * self.weight.view(shape) + self.bias.view(shape)
        return self._apply_post(out)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, prior={self.prior}"

    @classmethod
    def _carry(cls, bn: _BatchNorm, prior: float = 0.0) -> _BatchStatsNorm:
        device, dtype = _device_dtype(bn)
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, device, dtype, prior=prior)
        new._take_tensors(bn)
        return new


class BatchStatsNorm1d(_BatchStatsNorm, nn.BatchNorm1d):
    """BatchNorm1d that normalizes with the current batch's statistics in train and eval mode.

    Running statistics are never used for normalization nor updated, unless ``prior > 0``:
    then the batch statistics are blended with the kept running ones (``bn_running_mean``,
    ``bn_running_var``) as if these came from ``prior`` samples (Schneider et al., 2020, "Improving
    robustness against common corruptions by covariate shift adaptation"); with batch size n,
    ``mean = (prior * mean_R + n * mean_B) / (prior + n)`` and the same for the (biased batch,
    stored running) variance, so batch size 1 stays usable at inference.
    """


class BatchStatsNorm2d(_BatchStatsNorm, nn.BatchNorm2d):
    """BatchNorm2d that normalizes with the current batch's statistics in train and eval mode.

    See :class:`BatchStatsNorm1d` for ``prior`` (blending with the kept running statistics).
    """


class BatchStatsNorm3d(_BatchStatsNorm, nn.BatchNorm3d):
    """BatchNorm3d that normalizes with the current batch's statistics in train and eval mode.

    See :class:`BatchStatsNorm1d` for ``prior`` (blending with the kept running statistics).
    """


class _InstanceNormFromBN(_KeepsBatchNorm):
    """Shared implementation of :class:`InstanceNormFromBN1d`/``2d``/``3d``."""

    _batch_dims: int

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            num_features, eps, momentum, affine, False, device=device, dtype=dtype
        )
        self._init_kept(device, dtype, num_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != self._batch_dims or math.prod(input.shape[2:]) < 2:
            what = "(N, C)" if input.dim() == 2 else f"of shape {tuple(input.shape)}"
            raise ConversionError(
                f"layer {self.normdoctor_name or type(self).__name__!r}: InstanceNorm cannot "
                f"replace this BatchNorm: it is fed inputs {what}, which leave nothing to "
                "normalize per sample (need spatial dimensions with at least 2 elements); "
                "use to='batchstats' or 'renorm' for this layer"
            )
        return self._apply_post(super().forward(input))  # type: ignore[misc]

    @classmethod
    def _carry(cls, bn: _BatchNorm) -> _InstanceNormFromBN:
        device, dtype = _device_dtype(bn)
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, device, dtype)  # type: ignore[call-arg]
        new._take_tensors(bn)
        return new


class InstanceNormFromBN1d(_InstanceNormFromBN, nn.InstanceNorm1d):
    """InstanceNorm1d standing in for a BatchNorm1d fed ``(N, C, L)`` inputs.

    Same ``weight``/``bias`` (affine iff the BatchNorm was), same ``eps``, no running
    statistics in use: each sample is normalized over its own length, which is what the
    BatchNorm computed in training at batch size 1.  The BatchNorm's running statistics are
    kept (``bn_running_*``) for :func:`revert`.  ``(N, C)`` inputs raise ConversionError.
    """

    _batch_dims = 3


class InstanceNormFromBN2d(_InstanceNormFromBN, nn.InstanceNorm2d):
    """InstanceNorm2d standing in for a BatchNorm2d; see :class:`InstanceNormFromBN1d`."""

    _batch_dims = 4


class InstanceNormFromBN3d(_InstanceNormFromBN, nn.InstanceNorm3d):
    """InstanceNorm3d standing in for a BatchNorm3d; see :class:`InstanceNormFromBN1d`."""

    _batch_dims = 5


_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_TARGET_CLASSES: dict[str, dict[int, type[nn.Module]]] = {
    "renorm": {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d},
    "batchstats": {1: BatchStatsNorm1d, 2: BatchStatsNorm2d, 3: BatchStatsNorm3d},
    "instance": {1: InstanceNormFromBN1d, 2: InstanceNormFromBN2d, 3: InstanceNormFromBN3d},
}
_OURS = (BatchRenorm, _BatchStatsNorm, _InstanceNormFromBN)


def _kind_of(module: nn.Module) -> str | None:
    """Which conversion produced ``module`` (None: not one of ours)."""
    if isinstance(module, BatchRenorm):
        return "renorm"
    if isinstance(module, _BatchStatsNorm):
        return "batchstats"
    if isinstance(module, _InstanceNormFromBN):
        return "instance"
    return None


def _check_prior(prior: object) -> float:
    if isinstance(prior, bool) or not isinstance(prior, (int, float)):
        raise ConversionError(f"prior must be a number of samples, got {prior!r}")
    value = float(prior)
    if not (math.isfinite(value) and value >= 0):
        raise ConversionError(
            f"prior must be finite and non-negative, got {prior!r} "
            "(for running statistics only, revert the layer to BatchNorm)"
        )
    return value


def _device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for key in ("weight", "running_mean", "bn_running_mean", "bias", "running_var"):
        t = getattr(module, key, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.device, t.dtype
    return None, None


_IN = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def _dim(module: nn.Module) -> int | None:
    for table in (_BN, _IN):
        for d, cls in table.items():
            if isinstance(module, cls):
                return d
    return None


# ============================================================ conversion of single modules


def _tensor_names(module: nn.Module) -> set[str]:
    return {
        k
        for k, v in itertools.chain(module._parameters.items(), module._buffers.items())
        if v is not None
    }


def _check_convertible(module: nn.Module, name: str, to: str) -> None:
    """Raise ConversionError unless ``module`` can become ``to`` (before any change).

    The dimensionality of layers whose class does not fix it (SyncBatchNorm) is checked where
    data or ``dim=`` can settle it (:func:`_conversion_dims`).
    """
    kind = type(module).__name__
    family = norm_family(module)
    lazy = isinstance(module, _LazyNormBase) and module.has_uninitialized_params()
    if lazy:
        raise ConversionError(
            f"layer {name!r} is a lazy {kind} that never ran: run one forward pass first"
        )
    if to == "recalibrate":
        if family is NormFamily.BATCH_VAR:
            raise ConversionError(
                f"layer {name!r} ({kind}) divides by the batch variance in training and by "
                "running_var at inference, without a mean (EvoNorm B0-like): normdoctor does "
                "not recalibrate such layers yet"
            )
        if family is NormFamily.BATCH_OTHER:
            raise ConversionError(
                f"layer {name!r} ({kind}) behaves like BatchNorm but is no torch BatchNorm "
                "class: normdoctor cannot keep it from updating its running statistics while "
                "measuring, so it does not recalibrate it; convert it to nn.BatchNorm first"
            )
        if not _has_running_stats(module):
            raise ConversionError(
                f"layer {name!r} ({kind}) holds no running statistics to recalibrate"
            )
        return
    if isinstance(module, _OURS):
        return
    if isinstance(module, _InstanceNorm) and to == "instance" and type(module) in _IN.values():
        if not _has_running_stats(module):
            raise ConversionError(
                f"layer {name!r} is an InstanceNorm without running statistics: it already "
                "normalizes each sample on its own"
            )
        return
    if family is NormFamily.FROZEN:
        raise ConversionError(
            f"layer {name!r} ({kind}) is frozen: it normalizes with its running statistics in "
            "training too, so batch statistics never entered what it learned and a conversion "
            f"to {to!r} has nothing to reproduce; only to='recalibrate' applies to it"
        )
    if not isinstance(module, _BatchNorm):
        raise ConversionError(
            f"layer {name!r} is a {kind}, not a BatchNorm layer: it cannot be converted to {to!r}"
        )


def _has_running_stats(module: nn.Module) -> bool:
    return isinstance(module._buffers.get("running_mean"), torch.Tensor) and isinstance(
        module._buffers.get("running_var"), torch.Tensor
    )


def _probe_inputs(module: nn.Module, dim: int | None = None) -> list[torch.Tensor]:
    """Random inputs of the shapes a BatchNorm of this dimensionality takes."""
    c = int(module.num_features)  # type: ignore[arg-type]
    device, dtype = _device_dtype(module)
    dtype = dtype or torch.float32
    gen = torch.Generator(device="cpu").manual_seed(1234)
    shapes = {1: [(6, c, 5), (6, c)], 2: [(6, c, 5, 5)], 3: [(4, c, 3, 3, 3)]}[
        dim or _dim(module) or 2
    ]
    return [
        (torch.randn(s, generator=gen, dtype=torch.float64) * 2 + 0.5).to(
            device=device, dtype=dtype
        )
        for s in shapes
    ]


def _run_seeded(fn: Callable[[], torch.Tensor], device: torch.device | None) -> torch.Tensor:
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(4321)
        return fn()


def _same(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    return bool(torch.allclose(a, b, rtol=_BEHAVIOUR_RTOL, atol=_BEHAVIOUR_ATOL, equal_nan=True))


def _reproduces(module: nn.Module, chain: tuple[str, ...], x: torch.Tensor) -> bool:
    """Does "BatchNorm's own forward, then children ``chain``" compute what ``module`` does, in
    eval and train mode (outputs and running-statistics updates)?"""
    device, _ = _device_dtype(module)
    for training in (False, True):
        a, b = copy.deepcopy(module), copy.deepcopy(module)
        a.train(training)
        b.train(training)

        def reference(b: nn.Module = b) -> torch.Tensor:
            out = _BatchNorm.forward(b, x)  # type: ignore[arg-type]
            for n in chain:
                out = b._modules[n](out)  # type: ignore[misc]
            return out

        with torch.no_grad():
            out_a = _run_seeded(lambda a=a: a(x), device)
            out_b = _run_seeded(reference, device)
        if not _same(out_a, out_b):
            return False
        for ta, tb in zip(a.buffers(), b.buffers(), strict=True):
            if not (_same(ta, tb) if ta.is_floating_point() else torch.equal(ta, tb)):
                return False
    return True


def _post_chain(module: nn.Module, name: str, to: str, dim: int | None = None) -> tuple[str, ...]:
    """The children that a BatchNorm subclass applies after normalizing, in order.

    Plain BatchNorm classes (SyncBatchNorm included) and subclasses that do not override
    ``forward`` give ``()``; ``dim`` chooses the test inputs where the class does not.
    Raises ConversionError when no order of (a subset of) the children reproduces the
    subclass: its behaviour cannot be kept by a conversion.
    """
    if isinstance(module, _OURS):
        return tuple(getattr(module, "_post", ()))
    cls = type(module)
    if cls in _BN.values() or cls in _IN.values() or cls is nn.SyncBatchNorm:
        return ()
    refuse = f"layer {name!r} is a {cls.__name__}, a BatchNorm subclass that changes its behaviour"
    extra = _tensor_names(module) - BN_TENSORS
    if extra:
        raise ConversionError(
            f"{refuse} with its own tensors ({', '.join(sorted(extra))}); converting it to "
            f"{to!r} would drop them: exclude it (layers=...) or convert it by hand"
        )
    if cls.forward is _BatchNorm.forward:
        return ()
    children = [n for n, _ in module.named_children()]
    if len(children) > 3:
        raise ConversionError(
            f"{refuse} in forward() with {len(children)} child modules; normdoctor does not "
            f"know how to keep that behaviour in {to!r}: exclude it (layers=...)"
        )
    candidates = [
        perm
        for k in range(len(children), -1, -1)
        for subset in itertools.combinations(children, k)
        for perm in itertools.permutations(subset)
    ]
    error: Exception | None = None
    for x in _probe_inputs(module, dim):
        try:
            with torch.no_grad():
                copy.deepcopy(module).eval()(x)
        except Exception as exc:  # this input shape is not what the subclass takes
            error = exc
            continue
        for chain in candidates:
            if _reproduces(module, chain, x):
                return chain
        error = None
        break
    why = f" (it rejects BatchNorm-shaped inputs: {error})" if error is not None else ""
    raise ConversionError(
        f"{refuse} in forward(){why}: it is not 'BatchNorm, then its child modules', so a "
        f"conversion to {to!r} would silently change it; exclude it (layers=...) or convert it "
        "by hand"
    )


def _template(module: nn.Module) -> nn.Module:
    """A tensor-free (meta) copy of the original module, from which :func:`revert` rebuilds it."""
    existing = module.__dict__.get(_TEMPLATE_ATTR)
    if existing is not None:
        return existing
    return copy.deepcopy(module).to("meta")


def _convert_one(
    module: nn.Module,
    name: str,
    to: str,
    options: dict[str, Any],
    chain: tuple[str, ...],
    dim: int | None = None,
) -> nn.Module:
    """``module`` converted to ``to`` (tensors, children, training flag taken over); ``dim``
    for a class that does not fix its dimensionality (see :func:`_conversion_dims`)."""
    options = {k: v for k, v in options.items() if k != "dim"}
    dim = _dim(module) or dim
    if isinstance(module, _OURS):
        if _kind_of(module) == to and not options:
            return module
        module = _revert_one(module)
    if dim is None:  # _conversion_dims refuses this before any change
        raise ConversionError(f"layer {name!r}: dimensionality unknown, pass dim=1, 2 or 3")
    cls = _TARGET_CLASSES[to][dim]
    template = _template(module)
    new = cls._carry(module, **options)  # type: ignore[attr-defined]
    for child_name, child in module.named_children():
        new.add_module(child_name, child)
    new._post = chain
    new.normdoctor_name = name
    new.__dict__[_TEMPLATE_ATTR] = template
    new.training = module.training
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def _original(module: nn.Module) -> nn.Module:
    """The module a conversion started from (its meta template), or ``module`` itself."""
    if isinstance(module, _OURS):
        template = module.__dict__.get(_TEMPLATE_ATTR)
        if template is not None:
            return template
    return module


def _revert_one(module: nn.Module) -> nn.Module:
    """The original BatchNorm (class, children, hyper-parameters) with ``module``'s tensors."""
    kind = _kind_of(module)
    assert kind is not None
    template = module.__dict__.get(_TEMPLATE_ATTR)
    prefix = "" if kind == "renorm" else "bn_"
    running = module._buffers.get(prefix + "running_mean") is not None
    if template is None:
        dim = _dim(module)
        assert dim is not None
        original: nn.Module = _BN[dim](
            module.num_features,  # type: ignore[arg-type]
            module.eps,  # type: ignore[arg-type]
            module.momentum,  # type: ignore[arg-type]
            module.affine,  # type: ignore[arg-type]
            running,
            device="meta",
        )
    else:
        original = copy.deepcopy(template)
    for key in ("weight", "bias"):
        if key in original._parameters:
            original._parameters[key] = module._parameters.get(key)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        if key in original._buffers:
            original._buffers[key] = module._buffers.get(prefix + key)
    for child_name in list(original._modules):
        original._modules[child_name] = module._modules.get(child_name)
    original.eps = module.eps
    original.momentum = module.momentum
    original.training = module.training
    if hasattr(module, "qconfig"):
        original.qconfig = module.qconfig
    leftover = [
        n
        for n, t in itertools.chain(original.named_parameters(), original.named_buffers())
        if t.is_meta
    ]
    if leftover:
        raise ConversionError(
            f"cannot revert layer {getattr(module, 'normdoctor_name', '') or kind!r}: "
            f"no values for {', '.join(leftover)}"
        )
    return original


def _convert_tree(
    module: nn.Module,
    convert: Callable[[str, nn.Module], nn.Module],
    prefix: str = "",
    memo: dict[int, nn.Module] | None = None,
) -> nn.Module:
    """convert_sync_batchnorm's recursion; shared modules are converted once."""
    memo = {} if memo is None else memo
    key = id(module)
    if key in memo:
        return memo[key]
    out = convert(prefix, module)
    if out is module:
        # _modules, not named_children(): that one skips a child module's second occurrence.
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = _convert_tree(
                child, convert, f"{prefix}.{child_name}" if prefix else child_name, memo
            )
            if new_child is not child:
                module.add_module(child_name, new_child)
    memo[key] = out
    return out


# ============================================================================ selection

Layers = str | Sequence[str] | ScanReport | None


def _norm_layers(model: nn.Module) -> list[NormLayer]:
    return find_norm_layers(model)


def _default_selected(module: nn.Module, layer: NormLayer, to: str) -> bool:
    if to == "recalibrate":  # every layer with running statistics (refused where unsupported)
        return layer.family in RUNNING_STATS
    if to == "instance" and layer.family is NormFamily.INSTANCE_TRACKED:
        return type(module) in _IN.values()
    return layer.family is NormFamily.BATCH and isinstance(module, _BatchNorm)


def _resolve(model: nn.Module, layers: Layers, to: str) -> dict[str, str]:
    """Selected layer name -> target kind, in model order; validated, nothing changed."""
    modules = dict(model.named_modules())
    norm = _norm_layers(model)
    names = [layer.name for layer in norm]
    listing = ", ".join(repr(n) for n in names) or "none"
    if isinstance(layers, ScanReport):
        missing = [r.name for r in layers.flagged_layers if r.name not in modules]
        if missing:
            raise ConversionError(
                f"the scan report flags layers this model does not have: {', '.join(missing)} "
                "(was it made for another model?)"
            )
        plan: dict[str, str] = {}
        for r in layers.flagged_layers:
            kind = str(r.recommendation) if to == "auto" else to
            if kind == str(Recommendation.OK):
                continue
            _check_convertible(modules[r.name], r.name, kind)
            plan[r.name] = kind
        return plan
    if to == "auto":
        raise ConversionError(
            "to='auto' needs a ScanReport as layers (each flagged layer gets its recommendation)"
        )
    if layers is None:
        plan = {
            layer.name: to for layer in norm if _default_selected(modules[layer.name], layer, to)
        }
        for n in plan:  # every one of them, or none: nothing is skipped silently
            _check_convertible(modules[n], n, to)
        return plan
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise ConversionError("layers is an empty list: name at least one layer")
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConversionError(f"layer patterns must be strings, got {pattern!r}")
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ConversionError(
                f"layer pattern {pattern!r} matches no normalization layer "
                f"(the model's norm layers: {listing})"
            )
        if any(ch in pattern for ch in "*?["):
            ok = []
            for n in matched:
                try:
                    _check_convertible(modules[n], n, to)
                except ConversionError:
                    continue
                ok.append(n)
            if not ok:
                kinds = ", ".join(f"{n!r} ({type(modules[n]).__name__})" for n in matched)
                raise ConversionError(
                    f"layer pattern {pattern!r} matches only layers that cannot become "
                    f"{to!r}: {kinds}"
                )
            matched = ok
        else:
            _check_convertible(modules[pattern], pattern, to)
        chosen.update(matched)
    return {n: to for n in names if n in chosen}


def _split_options(kinds: Iterable[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    kinds = set(kinds)
    per_kind: dict[str, dict[str, Any]] = {k: {} for k in kinds}
    for key, value in options.items():
        takers = [
            k
            for k in kinds
            if key in _OPTIONS.get(k, ()) or (k == "recalibrate" and key in _RECAL_OPTIONS)
        ]
        if not takers:
            known = sorted(
                {o for k in kinds for o in _OPTIONS.get(k, ())}
                | (set(_RECAL_OPTIONS) if "recalibrate" in kinds else set())
            )
            raise TypeError(
                f"unknown option {key!r} for {', '.join(sorted(kinds)) or 'this patch'} "
                f"(accepted: {', '.join(known) or 'none'})"
            )
        for k in takers:
            per_kind[k][key] = value
    if "batchstats" in per_kind and "prior" in per_kind["batchstats"]:
        per_kind["batchstats"]["prior"] = _check_prior(per_kind["batchstats"]["prior"])
    for opts in per_kind.values():
        if "dim" in opts and (isinstance(opts["dim"], bool) or opts["dim"] not in (1, 2, 3)):
            raise ConversionError(
                f"dim must be 1, 2 or 3 (BatchNorm1d/2d/3d inputs), got {opts['dim']!r}"
            )
    if "renorm" in per_kind:
        # Validate now (RenormSchedule raises ValueError on bad limits), not half-way.
        plain = {k: v for k, v in per_kind["renorm"].items() if k not in ("schedule", "dim")}
        try:
            RenormSchedule(**plain)
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"renorm options: {exc}") from exc
        sched = per_kind["renorm"].get("schedule")
        if sched is not None and not callable(sched):
            raise ConversionError(
                "renorm option 'schedule' must be a callable step -> (r_max, d_max)"
            )
    return per_kind


def _manifest_options(to: str, module: nn.Module) -> dict[str, Any]:
    """The plain-valued options that rebuild ``module`` (recorded in the manifest)."""
    if to == "renorm":
        c = module.schedule_config  # type: ignore[attr-defined]
        out: dict[str, Any] = {
            "r_max": c.r_max,
            "d_max": c.d_max,
            "hold_steps": c.hold_steps,
            "r_max_steps": c.r_max_steps,
            "d_max_steps": c.d_max_steps,
        }
        if module.schedule is not c:  # type: ignore[attr-defined]
            out["schedule"] = "callable"  # marks it unsaveable; see save_patched
        return out
    if to == "batchstats":
        return {"prior": float(module.prior)}  # type: ignore[attr-defined]
    return {}


def _record(root: nn.Module, entries: list[dict[str, Any]], previous: list[dict[str, Any]]) -> None:
    names = {e["name"] for e in entries}
    merged = [e for e in previous if e["name"] not in names] + entries
    root.__dict__[RECORD_ATTR] = merged


def _records(model: nn.Module) -> list[dict[str, Any]]:
    return [dict(e) for e in model.__dict__.get(RECORD_ATTR, [])]


# ====================================================================== input inspection


def _batches(
    data: Any,
    *,
    batch_size: int | None,
    shuffle: bool,
    seed: int,
    group_by: GroupBy,
    max_batches: int | None,
    shard: tuple[int, int] | None = None,
) -> Callable[[], Iterator[Batch]]:
    """A re-iterable source of batches (one-shot iterators are kept in memory); ``shard``
    (rank, world size) keeps this rank's share of the batches normdoctor forms."""
    opts = dict(
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by=group_by,
        max_batches=max_batches,
    )
    if isinstance(data, Iterator):
        kept = list(plan_batches(data, **opts).batches)  # type: ignore[arg-type]
        return lambda: iter(kept)
    first = plan_batches(data, **opts)  # validate now: DataError before any work
    if shard is not None and first.source != "batches":  # deal formed batches round-robin
        rank, world = shard
        return lambda: (
            b
            for i, b in enumerate(plan_batches(data, **opts).batches)  # type: ignore[arg-type]
            if i % world == rank
        )
    return lambda: iter(plan_batches(data, **opts).batches)  # type: ignore[arg-type]


def _input_shapes(
    model: nn.Module, data: Any, names: Sequence[str], forward: Forward | None, **batch_opts: Any
) -> dict[str, tuple[int, ...]]:
    """The input shape each named layer sees on the first batch (eval mode, model restored)."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    fwd = forward or default_forward
    device, dtype = model_device_dtype(model)
    batch_opts = {**batch_opts, "max_batches": 1}
    handles = []
    with Probe(model, [], paths=("eval",)) as probe, torch.no_grad():
        try:
            for n in names:

                def hook(_m: nn.Module, args: tuple, n: str = n) -> None:
                    if args and isinstance(args[0], torch.Tensor) and n not in shapes:
                        shapes[n] = tuple(args[0].shape)

                handles.append(modules[n].register_forward_pre_hook(hook))
            for batch in _batches(data, **batch_opts)():
                with probe.path("eval"):
                    fwd(model, to_device(batch, device, dtype).inputs)
        finally:
            for h in handles:
                h.remove()
    return shapes


def _check_instance_inputs(shapes: dict[str, tuple[int, ...]], names: Iterable[str]) -> None:
    for n in names:
        shape = shapes.get(n)
        if shape is None:
            continue
        if len(shape) < 3 or math.prod(shape[2:]) < 2:
            what = "(N, C)" if len(shape) == 2 else f"of shape {shape}"
            raise ConversionError(
                f"layer {n!r}: InstanceNorm cannot replace this BatchNorm: it is fed inputs "
                f"{what}, which leave nothing to normalize per sample; use to='batchstats' or "
                "'renorm' for this layer"
            )


def _rank_dim(name: str, module: nn.Module, shape: tuple[int, ...] | None) -> int:
    """The BatchNorm1d/2d/3d dimensionality of inputs of ``shape`` (the first one seen)."""
    kind = type(module).__name__
    if shape is None:
        raise ConversionError(
            f"layer {name!r} is a {kind}, which takes inputs of any dimensionality, and no batch "
            "of the data reached it: pass dim=1, 2 or 3 (BatchNorm1d/2d/3d inputs)"
        )
    dim = {2: 1, 3: 1, 4: 2, 5: 3}.get(len(shape))
    if dim is None:
        raise ConversionError(
            f"layer {name!r} ({kind}) is fed inputs of shape {shape}: no BatchNorm1d/2d/3d "
            "takes that, so it cannot be converted"
        )
    return dim


def _conversion_dims(
    modules: dict[str, nn.Module],
    structural: dict[str, str],
    per_kind: dict[str, dict[str, Any]],
    shapes: dict[str, tuple[int, ...]] | None,
) -> dict[str, int]:
    """Per converted layer, the dimensionality of its replacement (1, 2 or 3).

    The class fixes it for BatchNorm1d/2d/3d; for a class that takes any input (SyncBatchNorm)
    it is the ``dim`` option or the rank of the first input the layer saw (``shapes``, from
    data).  Raises ConversionError, before any change, where neither says.
    """
    dims: dict[str, int] = {}
    for n, kind in structural.items():
        module = modules[n]
        dim = _dim(module) or per_kind.get(kind, {}).get("dim")
        if dim is None:
            if shapes is None:
                raise ConversionError(
                    f"layer {n!r} is a {type(module).__name__}, which takes inputs of any "
                    f"dimensionality: to convert it to {kind!r}, pass data=... (its first input "
                    "tells) or dim=1, 2 or 3 (BatchNorm1d/2d/3d inputs)"
                )
            dim = _rank_dim(n, module, shapes.get(n))
        dims[n] = dim
    return dims


# ================================================================================ patch


@preserved_globals()
def patch(
    model: nn.Module,
    to: str = "auto",
    layers: Layers = None,
    *,
    inplace: bool = False,
    data: Any = None,
    forward: Forward | None = None,
    **options: Any,
) -> nn.Module:
    """Convert norm layers of ``model``: ``to`` in ``"renorm"``, ``"instance"``,
    ``"batchstats"``, ``"recalibrate"``, or ``"auto"`` (each flagged layer of a ScanReport to
    its recommendation).

    Args:
        model: the model; with ``inplace=False`` (default) it is deep-copied first and never
            modified.
        to: the conversion.
        layers: which layers: ``None`` (every BatchNorm with running statistics; for
            ``"instance"`` also tracked InstanceNorm, for ``"recalibrate"`` every layer with
            running statistics: every one of them is converted, or the call refuses), a glob such as ``"layer4.*"``, a list of names or globs, or a
            :class:`ScanReport` (its flagged layers).  A pattern that matches no norm layer
            raises ConversionError.
        inplace: convert ``model`` itself.
        data: calibration data for ``"recalibrate"`` (any form :func:`normdoctor.scan` takes);
            for ``"instance"`` it also lets the conversion check, before changing anything, that
            each layer's input has spatial dimensions to normalize over; for SyncBatchNorm it
            tells the dimensionality of the replacement.
        forward: ``forward(model, inputs)`` for models with several inputs (used whenever
            ``data`` is run through the model).
        options: ``prior`` (batchstats: strength of the running statistics in samples);
            ``r_max``, ``d_max``, ``hold_steps``, ``r_max_steps``, ``d_max_steps``,
            ``schedule`` (renorm); ``mode``, ``batch_size``, ``shuffle``, ``seed``,
            ``group_by``, ``max_batches``, ``device`` (recalibrate, see :func:`recalibrate`);
            ``dim`` (1, 2 or 3: the BatchNorm1d/2d/3d inputs of converted layers whose class
            does not fix it, SyncBatchNorm; without it ``data`` tells, from the rank of the first
            input each such layer sees; ignored for layers whose class fixes it).

    Returns:
        The converted root module (a new object if the root itself was converted), carrying the
        list of conversions applied in ``normdoctor_conversions`` (manifest entries for
        :func:`save_patched`).

    Raises:
        ConversionError: a layer cannot be converted (named in the message); nothing changed.
        DataError: ``"recalibrate"`` without data, or data that never reaches a layer.
    """
    if to not in (*TARGETS, "auto"):
        raise ConversionError(f"to must be one of {', '.join((*TARGETS, 'auto'))}; got {to!r}")
    plan = _resolve(model, layers, to)
    kinds = set(plan.values()) if to == "auto" else {to}
    per_kind = _split_options(kinds, options)
    recal = [n for n, k in plan.items() if k == "recalibrate"]
    if recal and data is None:
        raise DataError(
            f"recalibrating {', '.join(repr(n) for n in recal)} needs data: pass data=... "
            "(samples like those seen at inference)"
        )
    if not plan:
        if isinstance(layers, ScanReport):
            warnings.warn("the scan report flags no layer: nothing to patch", stacklevel=2)
        out = model if inplace else copy.deepcopy(model)
        _record(out, [], _records(model))
        return out
    if forward is not None and "recalibrate" in per_kind:
        per_kind["recalibrate"]["forward"] = forward
    return _apply(model, plan, per_kind, inplace=inplace, data=data, forward=forward)


def _apply(
    model: nn.Module,
    plan: dict[str, str],
    per_kind: dict[str, dict[str, Any]],
    *,
    inplace: bool,
    data: Any,
    forward: Forward | None = None,
) -> nn.Module:
    modules = dict(model.named_modules())
    structural = {n: k for n, k in plan.items() if k in CONVERSIONS}
    # Every check before any change: dimensionality, input shapes for InstanceNorm, then
    # subclass behaviour.
    instance = [n for n, k in structural.items() if k == "instance"]
    unknown = [
        n
        for n, k in structural.items()
        if _dim(modules[n]) is None and per_kind.get(k, {}).get("dim") is None
    ]
    recal_opts = per_kind.get("recalibrate", {})
    shapes: dict[str, tuple[int, ...]] | None = None
    if (instance or unknown) and data is not None:
        batch_opts = {
            k: recal_opts[k]
            for k in ("batch_size", "shuffle", "seed", "group_by")
            if k in recal_opts
        }
        batch_opts.setdefault("batch_size", 2)
        batch_opts.setdefault("shuffle", False)
        batch_opts.setdefault("seed", 0)
        batch_opts.setdefault("group_by", None)
        fwd = forward or recal_opts.get("forward")
        shapes = _input_shapes(model, data, [*instance, *unknown], fwd, **batch_opts)
        _check_instance_inputs(shapes, instance)
    dims = _conversion_dims(modules, structural, per_kind, shapes)
    chains = {n: _post_chain(modules[n], n, k, dims[n]) for n, k in structural.items()}
    previous = _records(model)
    target = model if inplace else copy.deepcopy(model)
    entries: list[dict[str, Any]] = []

    def convert(name: str, module: nn.Module) -> nn.Module:
        kind = structural.get(name)
        if kind is None:
            return module
        new = _convert_one(module, name, kind, per_kind.get(kind, {}), chains[name], dims[name])
        options = _manifest_options(kind, new)
        if _dim(_original(module)) is None:  # the class does not say: the manifest must
            options["dim"] = dims[name]
        entries.append({"name": name, "to": kind, "options": options})
        return new

    root = _convert_tree(target, convert) if structural else target
    recal = [n for n, k in plan.items() if k == "recalibrate"]
    if recal:
        try:
            root = recalibrate(root, data, layers=recal, inplace=True, **recal_opts)
        except BaseException:
            if inplace and structural:
                revert(root, layers=list(structural), inplace=True)
            raise
    order = [n for n in modules if n in structural]
    entries.sort(key=lambda e: order.index(e["name"]))
    _record(root, entries, previous)
    return root


def revert(
    model: nn.Module, layers: str | Sequence[str] | None = None, *, inplace: bool = False
) -> nn.Module:
    """Undo conversions: every converted layer (or those matching ``layers``) becomes the
    original BatchNorm again, same class (subclasses included), parameters and buffers.

    Recalibration is not undone (it only wrote running statistics).  Returns the (possibly new)
    root; with ``inplace=False`` the model is deep-copied first.
    """
    patterns = None if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    converted = [n for n, m in model.named_modules() if _kind_of(m) is not None]
    if patterns is not None:
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in converted):
                raise ConversionError(
                    f"layer pattern {p!r} matches no converted layer "
                    f"(converted: {', '.join(repr(n) for n in converted) or 'none'})"
                )
    chosen = {
        n for n in converted if patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns)
    }
    previous = _records(model)
    target = model if inplace else copy.deepcopy(model)

    def convert(name: str, module: nn.Module) -> nn.Module:
        return _revert_one(module) if name in chosen and _kind_of(module) else module

    root = _convert_tree(target, convert)
    root.__dict__[RECORD_ATTR] = [e for e in previous if e["name"] not in chosen]
    return root


# ========================================================================== recalibrate


class _StopForward(BaseException):
    """Raised from a hook to end a forward pass once the measured layer has its input.

    A BaseException so that a model's own ``except Exception`` does not swallow it.
    """


@preserved_globals()
def recalibrate(
    model: nn.Module,
    data: Any,
    *,
    layers: str | Sequence[str] | ScanReport | None = None,
    inplace: bool = False,
    mode: str = "sequential",
    distributed: bool = False,
    batch_size: int | None = 64,
    shuffle: bool = False,
    seed: int = 0,
    group_by: GroupBy = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    forward: Forward | None = None,
) -> nn.Module:
    """Set running statistics to the exact pooled statistics of ``data``.

    For each layer, ``running_mean`` becomes the mean and ``running_var`` the *unbiased*
    variance (what BatchNorm stores) of the layer's input over every sample and position of
    ``data`` — computed exactly with the core's streaming float64 moments, not an exponential
    moving average and not an average of per-batch variances — and ``num_batches_tracked``
    the number of batches that reached the layer (so that a later ``momentum=None`` cumulative
    average continues as if those batches had been averaged).

    Note:
        ``mode="sequential"`` (default) measures the layers one at a time in forward order, in
        eval mode, each with its upstream layers already recalibrated: the statistics are exactly
        those of the inputs the layer sees at inference.  Each layer costs one pass over the
        data that stops right after the layer's input is recorded, so L layers cost about L/2
        full forward passes (for a chain).  ``mode="single-pass"`` measures all layers in one
        pass on the train path (every norm layer normalizes with batch statistics, dropout off),
        like ``torch.optim.swa_utils.update_bn`` and fvcore's precise BN but exact: one forward
        pass, but each layer sees inputs normalized upstream by *batch* statistics, which differ
        from inference when batches are small or correlated.  In that pass plain BatchNorm
        layers normalize with the batch statistics normdoctor has just measured (exactly, in
        float64), through the inference kernel, instead of recomputing them in BatchNorm's
        training kernel; subclasses keep their own forward.  Measured on a ResNet-18-shaped CNN
        (``benchmarks/bench_recalibrate.py``): single-pass costs about 0.95-1.0x
        ``torch.optim.swa_utils.update_bn``, sequential about 11x.

        InstanceNorm with ``track_running_stats=True`` gets the same pooled statistics (over
        every sample and position), not the average of per-sample statistics its own update
        tracks: in eval mode it then gives its inputs over the data mean 0 and variance 1 per
        channel, as per-sample normalization does in training, and the scan's population shift
        is what this removes.  Where per-sample noise dominates, ``to="instance"`` reproduces
        training exactly.  ``num_batches_tracked`` counts its calls.

    Args:
        model: the model (deep-copied first unless ``inplace``).
        data: calibration data (any form :func:`normdoctor.scan` accepts).  Batch size and order
            do not change the result in sequential mode; in single-pass mode they do.
        layers: which layers (default: every layer with running statistics, BatchNorm,
            frozen BatchNorm and tracked InstanceNorm; a layer normdoctor cannot measure, such
            as EvoNorm B0 or a hand-written BatchNorm class, is refused rather than skipped);
            names, globs or a ScanReport (its flagged layers).
        mode: ``"sequential"`` or ``"single-pass"``.
        batch_size, shuffle, seed, group_by, max_batches: how batches are formed.
        device: run on this device (the model is moved there and back).
        forward: ``forward(model, inputs)`` for models with several inputs.

    Returns:
        The recalibrated model; with ``inplace=False`` a copy, ``model`` unchanged.

    Raises:
        DataError: no data, data that yields no batches, or a layer that no batch reaches (named);
            with ``inplace=True`` the model is restored before this propagates.
        ScanError: the model's forward raised.
    """
    if mode not in ("sequential", "single-pass"):
        raise ValueError(f"mode must be 'sequential' or 'single-pass', got {mode!r}")
    plan = _resolve(model, layers, "recalibrate")
    names = list(plan)
    if data is None:
        raise DataError(
            "recalibrate needs data: no data given for norm layers "
            f"{', '.join(repr(n) for n in names) or '(none)'}"
        )
    if not names:
        raise ConversionError("no layer with running statistics to recalibrate")
    sharded = distributed and _dist.is_distributed()
    batches = _batches(
        data,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by=group_by,
        max_batches=max_batches,
        shard=(_dist.dist.get_rank(), _dist.dist.get_world_size()) if sharded else None,
    )
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    by_name = {layer.name: layer for layer in _norm_layers(target)}
    chosen = [by_name[n] for n in names]
    saved = {
        n: {k: v.detach().clone() for k, v in modules[n]._buffers.items() if v is not None}
        for n in names
    }
    fwd = forward or default_forward
    home, dtype = model_device_dtype(target)
    run_device = torch.device(device) if device is not None else home
    moved = run_device != home
    if moved:
        target.to(run_device)
    try:
        if mode == "single-pass":
            results, counts, _ = _measure(
                target,
                chosen,
                batches,
                fwd,
                run_device,
                dtype,
                "train",
                sharded=sharded,
                reuse_stats=True,
            )
            _require_reached(results, names)
            for n in names:
                _write(modules[n], n, results[n], counts.get(n))
        else:
            results, counts, order = _measure(
                target, chosen, batches, fwd, run_device, dtype, "eval", sharded=sharded
            )
            _require_reached(results, names)
            ordered = [n for n in order if n in plan]
            first, rest = ordered[0], ordered[1:]
            _write(modules[first], first, results[first], counts.get(first))
            for n in rest:
                # A layer called once per forward: stop the pass after recording its input.
                stop = counts.get(n, 0) <= counts.get("__batches__", 0)
                res, calls, _ = _measure(
                    target,
                    [by_name[n]],
                    batches,
                    fwd,
                    run_device,
                    dtype,
                    "eval",
                    stop_at=n if stop else None,
                    sharded=sharded,
                )
                _require_reached(res, [n])
                _write(modules[n], n, res[n], calls.get(n))
    except BaseException:
        with torch.no_grad():
            for n, values in saved.items():
                for k, v in values.items():
                    modules[n]._buffers[k].copy_(v)  # type: ignore[union-attr]
        raise
    finally:
        if moved:
            target.to(home)
    return target


def _measure(
    model: nn.Module,
    layers: Sequence[NormLayer],
    batches: Callable[[], Iterator[Batch]],
    fwd: Forward,
    device: torch.device,
    dtype: torch.dtype | None,
    path: str,
    stop_at: str | None = None,
    sharded: bool = False,
    reuse_stats: bool = False,
) -> tuple[dict[str, LayerMeasurement | None], dict[str, int], list[str]]:
    """One pass over the data on ``path`` recording the inputs of ``layers`` (with ``sharded``,
    this rank's share, merged exactly over all ranks).

    With ``reuse_stats`` (train path), plain BatchNorm layers normalize with the batch
    statistics the probe has just measured instead of computing them again (see
    :func:`_normalize_with_measured`)."""
    modules = dict(model.named_modules())
    counts: dict[str, int] = {"__batches__": 0}
    handles = []
    with Probe(model, layers, paths=(path,)) as probe, torch.no_grad():
        swapped = _normalize_with_measured(probe, path, modules) if reuse_stats else []
        try:
            for layer in layers:

                def count(_m: nn.Module, _a: tuple, n: str = layer.name) -> None:
                    counts[n] = counts.get(n, 0) + 1
                    if n == stop_at:
                        raise _StopForward

                # Registered after the probe's hook, so it runs after the input is recorded.
                handles.append(modules[layer.name].register_forward_pre_hook(count))
            error: BaseException | None = None
            try:
                for i, batch in enumerate(batches()):
                    batch = to_device(batch, device, dtype)
                    counts["__batches__"] += 1
                    try:
                        with probe.path(path):
                            fwd(model, batch.inputs)
                    except _StopForward:
                        pass
                    except Exception as exc:
                        where = (
                            f" after norm layer {probe.last_layer!r}" if probe.last_layer else ""
                        )
                        first = str(exc).splitlines()[0] if str(exc) else ""
                        raise ScanError(
                            f"forward failed on batch {i} while recalibrating{where}: "
                            f"{type(exc).__name__}: {first}"
                        ) from exc
                    except SystemExit as exc:  # the model's code tried to end the process
                        raise ScanError(
                            f"forward failed on batch {i} while recalibrating: the model "
                            f"called sys.exit({exc.code})"
                        ) from None
            except Exception as exc:
                if not sharded:
                    raise
                error = exc
            if sharded:
                _dist.raise_if_any_failed(error)
                _dist.merge_recorders(list(probe._recorders[path].values()))
                keys = ["__batches__", *(layer.name for layer in layers)]  # same on every rank
                summed = _dist.all_reduce_sums(
                    {k: torch.tensor(float(v)) for k, v in counts.items()}, keys
                )
                counts = {k: int(v) for k, v in summed.items()}
            if counts["__batches__"] == 0:
                raise DataError("the data yielded no batches")
            results = probe.results(path)
            order = list(probe.order)
        finally:
            for h in handles:
                h.remove()
            for module in swapped:
                del module.forward
    return results, counts, order


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _normalize_with_measured(probe: Probe, path: str, modules: dict[str, nn.Module]) -> list:
    """On the train path, let plain BatchNorm layers reuse the probe's batch statistics.

    The probe's pre-hook has just reduced the layer's input to its exact batch mean and biased
    variance; normalizing with them through the inference kernel gives what train mode gives
    (up to float32 rounding of the normalized values) without BatchNorm's own training
    kernel, which on CPU costs several times the inference one.  Only exact BatchNorm1d/2d/3d
    types are swapped (a subclass keeps its own forward); anything the probe did not record
    (a batch of one value per channel, other dtypes) goes through the layer's own forward, so
    its errors stay its own.  Returns the modules whose ``forward`` was replaced (the caller
    deletes the instance attribute again).
    """
    swapped = []
    recorders = probe._recorders[path]
    for name, rec in recorders.items():
        module = modules[name]
        if type(module) not in _PLAIN_BN or "forward" in module.__dict__:
            continue

        def forward(x: torch.Tensor, module: nn.Module = module, rec: Any = rec) -> torch.Tensor:
            stats = rec.last_batch_stats() if module.training else None
            if stats is None or stats[2] < 2 or x.dtype not in (torch.float32, torch.float64):
                return type(module).forward(module, x)
            mean, var, _ = stats
            return F.batch_norm(
                x,
                mean.to(x.dtype),
                var.to(x.dtype),
                module.weight,
                module.bias,
                False,
                0.0,
                module.eps,
            )

        module.forward = forward
        swapped.append(module)
    return swapped


def _require_reached(results: dict[str, LayerMeasurement | None], names: Sequence[str]) -> None:
    missing = [n for n in names if results.get(n) is None or results[n].pooled.count == 0]  # type: ignore[union-attr]
    if missing:
        raise DataError(
            f"no batch reached norm layer(s) {', '.join(repr(n) for n in missing)}: "
            "the data never flows through them, so they cannot be recalibrated "
            "(exclude them with layers=..., or feed data that takes that branch)"
        )


def _write(
    module: nn.Module, name: str, m: LayerMeasurement | None, calls: int | None = None
) -> None:
    """Write the pooled statistics ``m`` as running statistics; ``num_batches_tracked`` counts
    the layer's calls (batches, or ``calls`` for InstanceNorm, whose units are samples)."""
    assert m is not None
    pooled = m.pooled
    if pooled.count < 2:
        raise DataError(
            f"norm layer {name!r} saw {int(pooled.count)} value per channel; "
            "recalibration needs at least 2 (more data, or larger batches)"
        )
    if m.nonfinite_units:
        warnings.warn(
            f"{name}: {m.nonfinite_units} batch(es) with NaN/Inf inputs left out of recalibration",
            stacklevel=3,
        )
    rm, rv = module._buffers["running_mean"], module._buffers["running_var"]
    assert rm is not None and rv is not None
    with torch.no_grad():
        rm.copy_(pooled.mean.to(device=rm.device, dtype=rm.dtype))
        rv.copy_(pooled.unbiased_var.to(device=rv.device, dtype=rv.dtype))
        nbt = module._buffers.get("num_batches_tracked")
        if nbt is not None:
            per_sample = isinstance(module, _InstanceNorm) and calls is not None
            nbt.fill_(calls if per_sample else m.units)


# =============================================================================== impact


def impact(
    model: nn.Module,
    data: Any,
    layers: str | Sequence[str] | ScanReport | None = None,
    *,
    batch_size: int | None = 32,
    shuffle: bool = True,
    seed: int = 0,
    group_by: GroupBy = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    forward: Forward | None = None,
) -> list[tuple[str, float]]:
    """How much each layer's drift alone changes the model's output, largest first.

    For each layer: on the train path (every norm layer normalizes with its batch's statistics,
    as in training), switch only that layer to its running statistics and measure the relative
    RMS change of the output, ``sqrt(sum (y_L - y_train)^2 / sum y_train^2)`` over all batches
    (the scan's end-to-end divergence, restricted to one layer).  Batches should be composed like
    training's (batch size, order, grouping), as for :func:`normdoctor.scan`.

    Args:
        layers: ``None`` (every BatchNorm with running statistics), names/globs, or a ScanReport
            (its flagged layers).

    Returns:
        ``[(name, output_change), ...]`` sorted by decreasing change (NaN last).  The model is
        left exactly as it was.
    """
    modules = dict(model.named_modules())
    # BatchNorm layers with running statistics: those the train path can switch to them.
    selected = _resolve(model, layers, "batchstats" if layers is None else "recalibrate")
    names = [
        n for n in selected if isinstance(modules[n], _BatchNorm) and _has_running_stats(modules[n])
    ]
    if not names:
        return []
    batches = _batches(
        data,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by=group_by,
        max_batches=max_batches,
    )
    fwd = forward or default_forward
    home, dtype = model_device_dtype(model)
    run_device = torch.device(device) if device is not None else home
    moved = run_device != home
    diff = {n: 0.0 for n in names}
    norm = 0.0
    if moved:
        model.to(run_device)
    try:
        with Probe(model, [], paths=("train",)) as probe, torch.no_grad():
            for batch in batches():
                batch = to_device(batch, run_device, dtype)
                with probe.path("train"):
                    ref = output_tensor(fwd(model, batch.inputs))
                    if ref is None:
                        raise DataError("the model's output holds no tensor to compare")
                    ref64 = ref.double()
                    norm += float(ref64.square().sum())
                    for n in names:
                        module = modules[n]
                        module.training = False
                        try:
                            out = output_tensor(fwd(model, batch.inputs))
                        finally:
                            module.training = True
                        assert out is not None
                        diff[n] += float((out.double() - ref64).square().sum())
    finally:
        if moved:
            model.to(home)
    result = [
        (n, math.sqrt(d / norm) if norm > 0 else (0.0 if d == 0 else math.inf))
        for n, d in diff.items()
    ]
    result.sort(key=lambda t: (math.isnan(t[1]), -t[1] if not math.isnan(t[1]) else 0.0))
    return result


# ============================================================================ autopatch


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PatchCheck:
    """Whether a patched model measures at least as good as its original, on the same samples.

    ``metric``: "accuracy" or "mse"/"loss" (eval mode of both models, labels or targets), or
    "agreement" (no labels or targets: agreement of each model's eval mode with the original's
    train path under training's composition, the reference the scan judged against).
    """

    ok: bool
    metric: str
    before: float | None
    after: float | None
    samples: int
    text: str


def verify_patch(
    original: nn.Module,
    patched: nn.Module,
    data: Any,
    report: ScanReport,
    *,
    max_batches: int | None = None,
    forward: Forward | None = None,
    device: Any = None,
    loss: Any = None,
) -> PatchCheck:
    """Measure ``patched`` against ``original`` in eval mode on the samples ``report`` scanned.

    With labels or targets the patched model must be at least as accurate (or its loss at most
    as large) as the original; without them its eval-mode outputs must agree with the
    original's train path (under the report's composition) at least as well as the original's
    eval mode does.  Costs two eval passes (three without labels or targets).
    """
    c = report.composition
    if c.batch_size is None:
        return PatchCheck(
            ok=True,
            metric="none",
            before=None,
            after=None,
            samples=0,
            text="not verified per sample: the data came as formed batches",
        )
    opts = dict(
        batch_size=c.batch_size,
        group_by=c.group_by,
        seed=c.seed or 0,
        max_batches=max_batches,
        forward=forward,
        device=device,
        loss=loss,
    )
    a = path_outcomes(original, data, "eval", **opts)
    b = path_outcomes(patched, data, "eval", **opts)
    mask = a.seen & b.seen
    n = int(mask.sum())
    ea, eb = a.evidence(), b.evidence()
    if ea is not None and eb is not None:
        labels = a.correct is not None
        qa, qb = float(ea[mask].mean()), float(eb[mask].mean())
        metric = "accuracy" if labels else ("mse" if loss is None else "loss")
        ok = qb >= qa if labels else qb <= qa
        shown = (lambda q: f"{q:.1%}") if labels else (lambda q: f"{q:.4g}")
        text = f"eval-mode {metric} {shown(qa)} -> {shown(qb)} on {n} samples"
        return PatchCheck(ok=ok, metric=metric, before=qa, after=qb, samples=n, text=text)
    ref = path_outcomes(original, data, "train", **opts)
    mask &= ref.seen
    before = search_agreement(a, ref, mask)
    after = search_agreement(b, ref, mask)
    what = "prediction agreement"
    if before is None or after is None:
        before, after = search_divergence(ref, a, mask), search_divergence(ref, b, mask)
        what = "output divergence"
        ok = before is not None and after is not None and after <= before
    else:
        ok = after >= before
    text = (
        f"{what} with the original's train path ({c.description}) {before:.3g} -> {after:.3g}"
        if before is not None and after is not None
        else "outputs could not be compared"
    )
    return PatchCheck(
        ok=ok,
        metric="agreement" if what.startswith("prediction") else "divergence",
        before=before,
        after=after,
        samples=int(mask.sum()),
        text=text,
    )


@preserved_globals()
def autopatch(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    group_by: GroupBy = None,
    max_batches: int | None = None,
    calib_data: Any = None,
    renorm_as: str = "batchstats",
    minimal: bool = False,
    prior: float = 0.0,
    recalibrate_mode: str = "sequential",
    **scan_options: Any,
) -> tuple[nn.Module, ScanReport, ScanReport]:
    """Scan, apply each flagged layer's recommendation, scan again with the same batches.

    1. ``before = scan(model, data, ...)``.  Nothing flagged: a copy of the model is returned
       unchanged (``after is before``).
    2. The flagged layers are ranked by :func:`impact` (reported in a note of ``after``) and
       each gets its recommendation.  With ``minimal=True``, only the shortest prefix of that
       ranking whose fix reproduces training as well as fixing every flagged layer is changed:
       the patched model's eval-mode outputs are compared with the original's train-path
       outputs on the scan's batches (prediction agreement for classifiers, relative RMS
       difference otherwise); layers whose fix changes nothing that matters stay untouched.
    3. ``after = scan(patched, data, ...)`` under the composition ``before`` judged against
       (the composition search's reference by default), and :func:`verify_patch` measures the
       patched model against the original on the same samples (eval-mode accuracy or loss
       with labels or targets; agreement with the original's train path without).  Its
       :class:`PatchCheck` is ``patched.normdoctor_verification``; a patch that measures worse
       is warned about (the CLI writes nothing then).

    Nothing is patched (a copy of the model comes back, ``after is before``) unless the scan
    found eval mode harmful: a model whose eval mode is as good as batch statistics, or whose
    verdict is undetermined, has no measured harm to fix.

    A ``renorm`` recommendation needs fine-tuning, which autopatch cannot do: it applies
    ``renorm_as`` instead (``"batchstats"`` by default, an inference-time fix that reproduces
    training when inference batches are composed like the scan's), and says so in a note;
    ``renorm_as="renorm"`` converts to BatchRenorm (unchanged until fine-tuned).

    Args:
        data, batch_size, shuffle, seed, group_by, max_batches: the scan's data and batch
            composition; use training's (batch size 1 for per-sample training,
            ``shuffle=False, group_by="label"`` for class-sorted training).
        calib_data: data for recalibration (default: ``data``).
        renorm_as: ``"batchstats"``, ``"renorm"`` or ``"skip"``.
        minimal: change as few layers as needed (see 2.); default ``False``: every flagged layer
            is fixed, which lowers the drift of each.
        prior: ``prior`` of batchstats conversions.
        recalibrate_mode: ``mode`` of :func:`recalibrate`.
        scan_options: more options of :func:`normdoctor.scan` (thresholds, device, forward...).

    Returns:
        ``(patched_model, before, after)``; the patched model carries ``normdoctor_conversions``.
    """
    if renorm_as not in ("batchstats", "renorm", "skip"):
        raise ValueError(f"renorm_as must be 'batchstats', 'renorm' or 'skip', got {renorm_as!r}")
    if "paths" in scan_options:
        raise TypeError("autopatch compares both paths: do not pass paths")
    composition = dict(
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by=group_by,
        max_batches=max_batches,
    )
    before = scan(model, data, **composition, **scan_options)
    if not before.flagged:
        unchanged = copy.deepcopy(model)
        _record(unchanged, [], _records(model))
        return unchanged, before, before
    # Fix and verify under the composition the scan judged against (the search's reference).
    c = before.composition
    if c.batch_size is not None:
        composition.update(
            batch_size=c.batch_size,
            group_by=c.group_by if c.group_by != "key" else composition["group_by"],
            shuffle=c.order == "shuffle",
            seed=c.seed if c.seed is not None else seed,
        )
    scan_options = {
        k: v
        for k, v in scan_options.items()
        if k not in ("search", "train_batch_size", "train_group_by")
    }
    notes: list[str] = []
    plan: dict[str, str] = {}
    for r in before.flagged_layers:
        kind = str(r.recommendation)
        if kind == "renorm" and renorm_as != "renorm":
            if renorm_as == "skip":
                notes.append(f"{r.name}: renorm recommended; skipped (renorm_as='skip')")
                continue
            notes.append(
                f"{r.name}: renorm recommended (fine-tune with patch(to='renorm') for a fix that "
                f"does not depend on batch composition); applied {renorm_as}, which reproduces "
                "training only when inference batches are composed like the scan's "
                f"({before.composition.description})"
            )
            kind = renorm_as
        elif kind == "renorm":
            notes.append(
                f"{r.name}: converted to BatchRenorm; inference is unchanged until the "
                "model is fine-tuned in train mode"
            )
        plan[r.name] = kind
    fwd = scan_options.get("forward")
    run_device = scan_options.get("device")
    calib = data if calib_data is None else calib_data
    recal_opts = {"mode": recalibrate_mode, "device": run_device}

    def build(names: Sequence[str]) -> nn.Module:
        sub = {n: plan[n] for n in names}
        kinds = set(sub.values())
        opts: dict[str, Any] = {}
        if "batchstats" in kinds:
            opts["prior"] = prior
        if "recalibrate" in kinds:
            opts.update({k: v for k, v in recal_opts.items() if v is not None})
        per_kind = _split_options(kinds, opts)
        if fwd is not None and "recalibrate" in per_kind:
            per_kind["recalibrate"]["forward"] = fwd
        return _apply(model, sub, per_kind, inplace=False, data=calib, forward=fwd)

    ranking = impact(model, data, list(plan), forward=fwd, device=run_device, **composition)
    # Layers impact cannot switch (no BatchNorm running statistics) go last, in scan order.
    ranked = [n for n, _ in ranking] + [n for n in plan if n not in dict(ranking)]
    if len(ranking) > 1:
        notes.append(
            "impact ranking (relative output change from this layer's drift alone): "
            + ", ".join(f"{n} {c:.3g}" for n, c in ranking)
        )
    full = build(ranked)
    chosen = ranked
    if minimal and len(ranked) > 1:
        reference = _train_path_outputs(model, data, composition, fwd, run_device)
        target = _fidelity(full, data, composition, fwd, run_device, reference)
        for k in range(1, len(ranked)):
            candidate = build(ranked[:k])
            score = _fidelity(candidate, data, composition, fwd, run_device, reference)
            if _as_good(score, target):
                chosen, full = ranked[:k], candidate
                notes.append(
                    f"minimal fix: {', '.join(chosen)} reproduce(s) training as well as fixing "
                    f"every flagged layer; left unchanged: {', '.join(ranked[k:])}"
                )
                break
    patched = full if chosen else copy.deepcopy(model)
    after = scan(patched, data, **composition, **scan_options)
    check = verify_patch(
        model,
        patched,
        data,
        before,
        max_batches=max_batches,
        forward=fwd,
        device=run_device,
        loss=scan_options.get("loss"),
    )
    patched.normdoctor_verification = check  # type: ignore[assignment]
    if not check.ok:
        message = f"autopatch: the patched model measures worse than the original ({check.text})"
        warnings.warn(message, stacklevel=2)
        notes.append("WARNING: " + message)
    else:
        notes.append(f"verified: {check.text}")
    if notes:
        after = dataclasses.replace(after, notes=(*after.notes, *notes))
    return patched, before, after


def _train_path_outputs(
    model: nn.Module,
    data: Any,
    composition: dict[str, Any],
    forward: Forward | None,
    device: Any,
) -> list[torch.Tensor]:
    fwd = forward or default_forward
    home, dtype = model_device_dtype(model)
    run = torch.device(device) if device is not None else home
    outs = []
    with Probe(model, [], paths=("train",)) as probe, torch.no_grad():
        for batch in _batches(data, **composition)():
            with probe.path("train"):
                out = output_tensor(fwd(model, to_device(batch, run, dtype).inputs))
            assert out is not None
            outs.append(out.detach())
    return outs


def _fidelity(
    candidate: nn.Module,
    data: Any,
    composition: dict[str, Any],
    forward: Forward | None,
    device: Any,
    reference: list[torch.Tensor],
) -> tuple[float | None, float]:
    """(prediction agreement or None, relative RMS difference): the candidate in eval mode
    against the original model's train-path outputs on the same batches."""
    fwd = forward or default_forward
    home, dtype = model_device_dtype(candidate)
    run = torch.device(device) if device is not None else home
    agree = total = 0
    diff = norm = 0.0
    classifier = True
    flags = [(m, m.training) for m in candidate.modules()]
    candidate.eval()
    try:
        with torch.no_grad():
            for batch, ref in zip(_batches(data, **composition)(), reference, strict=True):
                out = output_tensor(fwd(candidate, to_device(batch, run, dtype).inputs))
                assert out is not None
                diff += float((out.double() - ref.double()).square().sum())
                norm += float(ref.double().square().sum())
                if out.dim() == 2 and out.shape[1] > 1:
                    agree += int((out.argmax(1) == ref.argmax(1)).sum())
                    total += out.shape[0]
                else:
                    classifier = False
    finally:
        for m, flag in flags:
            m.training = flag
    rel = math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
    return (agree / total if classifier and total else None), rel


#: How much larger than the full fix's relative output difference a minimal fix may be (for
#: models that are not classifiers): 1% of the output RMS, far below the scan's divergence
#: threshold, so a layer is left alone only when fixing it changes next to nothing.
_MINIMAL_DIVERGENCE_SLACK = 0.01


def _as_good(score: tuple[float | None, float], target: tuple[float | None, float]) -> bool:
    if score[0] is not None and target[0] is not None:
        return score[0] >= target[0]
    return score[1] <= target[1] + _MINIMAL_DIVERGENCE_SLACK


# ============================================================================ save / load


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _validate_entries(conversions: Any) -> list[dict[str, Any]]:
    if not isinstance(conversions, (list, tuple)):
        raise ConversionError(
            f"conversions must be a list of entries, got {type(conversions).__name__}"
        )
    out = []
    for i, e in enumerate(conversions):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or "to" not in e:
            raise ConversionError(
                f"conversion #{i} is not a {{'name', 'to', 'options'}} entry: {e!r}"
            )
        if e["to"] not in CONVERSIONS:
            raise ConversionError(
                f"conversion of layer {e['name']!r}: 'to' must be one of {', '.join(CONVERSIONS)}, "
                f"got {e['to']!r}"
            )
        options = e.get("options") or {}
        if not isinstance(options, dict):
            raise ConversionError(f"conversion of layer {e['name']!r}: options must be a dict")
        unknown = set(options) - set(_OPTIONS[e["to"]])
        if unknown:
            raise ConversionError(
                f"conversion of layer {e['name']!r} to {e['to']!r}: unknown option(s) "
                f"{', '.join(sorted(unknown))}"
            )
        bad = [k for k, v in options.items() if not _plain(v) or (k == "schedule")]
        if bad:
            raise ConversionError(
                f"conversion of layer {e['name']!r}: option(s) {', '.join(bad)} are not plain "
                "values (a callable renorm schedule cannot be saved; use the step-based one)"
            )
        out.append({"name": e["name"], "to": e["to"], "options": dict(options)})
    return out


def save_patched(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    conversions: Sequence[dict[str, Any]] | None = None,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a patched model to ONE ``.pt`` file, atomically.

    The file holds ``{"normdoctor_patch": {"version": 1, "conversions": [{"name", "to",
    "options"}, ...]}, "state_dict": model.state_dict()}``, loadable with
    ``torch.load(path, weights_only=True)``.  Rebuild with :func:`load_patched` (or
    :func:`apply_manifest` on the original architecture, then ``load_state_dict``).

    Args:
        conversions: manifest entries; default: the record the patch functions left on the
            model (``model.normdoctor_conversions``).
        source: the file the model was loaded from (also read from ``model.normdoctor_source``):
            it is never overwritten.

    Raises:
        NormDoctorError: ``path`` is the input file.
        ConversionError: an entry is not plain data.
    """
    entries = _validate_entries(_records(model) if conversions is None else list(conversions))
    path = Path(path)
    for src in (source, getattr(model, "normdoctor_source", None)):
        if src is None:
            continue
        src_path = Path(src)
        same = (
            path.exists() and src_path.exists() and os.path.samefile(path, src_path)
        ) or path.resolve() == src_path.resolve()
        if same:
            raise NormDoctorError(f"refusing to overwrite the input model file {str(src_path)!r}")
    payload = {
        "normdoctor_patch": {"version": MANIFEST_VERSION, "conversions": entries},
        "state_dict": model.state_dict(),
    }
    write_atomic(path, lambda f: torch.save(payload, f))
    return path


def apply_manifest(
    model: nn.Module, manifest: dict[str, Any], *, inplace: bool = False
) -> nn.Module:
    """Re-apply saved conversions to a freshly built original architecture.

    Args:
        model: the original (unpatched) architecture.
        manifest: ``{"version": 1, "conversions": [...]}`` or a whole saved file's dict (with a
            ``"normdoctor_patch"`` key).

    Returns:
        The converted model, ready for ``load_state_dict(saved["state_dict"])``.

    Raises:
        ConversionError: the manifest does not fit the architecture (a layer name it lacks, a
            layer that is not a BatchNorm, an unknown version or kind); the model is unchanged.
    """
    if not isinstance(manifest, dict):
        raise ConversionError(f"a manifest is a dict, got {type(manifest).__name__}")
    inner = manifest.get("normdoctor_patch", manifest)
    if not isinstance(inner, dict) or inner.get("version") != MANIFEST_VERSION:
        got = inner.get("version") if isinstance(inner, dict) else None
        raise ConversionError(
            f"unsupported normdoctor patch manifest version {got!r} (expected {MANIFEST_VERSION})"
        )
    entries = _validate_entries(inner.get("conversions", []))
    modules = dict(model.named_modules())
    missing = [e["name"] for e in entries if e["name"] not in modules]
    if missing:
        raise ConversionError(
            f"the manifest converts layer(s) {', '.join(repr(n) for n in missing)}, which this "
            "model does not have: it was saved from another architecture"
        )
    seen: set[str] = set()
    for e in entries:
        if e["name"] in seen:
            raise ConversionError(f"the manifest converts layer {e['name']!r} twice")
        seen.add(e["name"])
        module = modules[e["name"]]
        if isinstance(module, _OURS):
            raise ConversionError(
                f"layer {e['name']!r} is already converted ({type(module).__name__}): apply a "
                "manifest to the original architecture"
            )
        _check_convertible(module, e["name"], e["to"])
    plan = {e["name"]: e["to"] for e in entries}
    per_layer = {e["name"]: e["options"] for e in entries}
    for e in entries:
        _split_options({e["to"]}, e["options"])
    dims: dict[str, int] = {}
    for n, k in plan.items():
        dim = _dim(modules[n]) or per_layer[n].get("dim")
        if dim is None:
            raise ConversionError(
                f"the manifest converts layer {n!r}, a {type(modules[n]).__name__} (any input "
                f"dimensionality), to {k!r} without saying which (option 'dim'): it was not "
                "written by this version of normdoctor"
            )
        dims[n] = dim
    chains = {n: _post_chain(modules[n], n, k, dims[n]) for n, k in plan.items()}
    previous = _records(model)
    target = model if inplace else copy.deepcopy(model)
    records: list[dict[str, Any]] = []

    def convert(name: str, module: nn.Module) -> nn.Module:
        kind = plan.get(name)
        if kind is None:
            return module
        options = dict(per_layer[name])
        if kind == "batchstats" and "prior" in options:
            options["prior"] = _check_prior(options["prior"])
        new = _convert_one(module, name, kind, options, chains[name], dims[name])
        saved = _manifest_options(kind, new)
        if _dim(_original(module)) is None:
            saved["dim"] = dims[name]
        records.append({"name": name, "to": kind, "options": saved})
        return new

    root = _convert_tree(target, convert)
    _record(root, records, previous)
    return root


def load_patched(
    path: str | os.PathLike[str], model: nn.Module, *, inplace: bool = False
) -> nn.Module:
    """Load a file written by :func:`save_patched` into the original architecture ``model``."""
    try:
        # An open file, not the path: torch picks a reader by a path's extension (a ".safetensors"
        # name would go to safetensors whatever the file holds).
        with open(path, "rb") as fh:
            saved = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoadError(f"cannot read patched model {str(path)!r}: {exc}") from exc
    if not isinstance(saved, dict) or "normdoctor_patch" not in saved or "state_dict" not in saved:
        raise LoadError(f"{str(path)!r} is not a normdoctor patched-model file")
    patched = apply_manifest(model, saved, inplace=inplace)
    patched.load_state_dict(saved["state_dict"])
    return patched

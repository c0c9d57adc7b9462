"""The modules a conversion puts in place of a BatchNorm, and which conversion made a module.

``renorm`` gives :class:`~normdoctor.renorm.BatchRenorm2d` (1d/3d); ``instance`` gives
:class:`InstanceNormFromBN2d` (1d/3d), ``batchstats`` :class:`BatchStatsNorm2d` (1d/3d).  The
last two keep the replaced BatchNorm's running statistics (``bn_running_*``) so that
:func:`~normdoctor.convert.revert` restores them exactly.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from ..errors import ConversionError
from ..layers import BATCH_NORMS, INSTANCE_NORMS
from ..renorm import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    bn_device_dtype,
    carry_tensors,
)
from .targets import BATCHSTATS, INSTANCE, RENORM

__all__ = [
    "CONVERTED",
    "TARGET_CLASSES",
    "BatchStatsNorm",
    "BatchStatsNorm1d",
    "BatchStatsNorm2d",
    "BatchStatsNorm3d",
    "Converted",
    "InstanceNormFromBN",
    "InstanceNormFromBN1d",
    "InstanceNormFromBN2d",
    "InstanceNormFromBN3d",
    "KeepsBatchNorm",
    "check_prior",
    "dim_of",
    "kind_of",
]


class KeepsBatchNorm(nn.Module):
    """Mixin: holds the replaced BatchNorm's running statistics as ``bn_running_mean``,
    ``bn_running_var`` and ``bn_num_batches_tracked`` (so :func:`revert` restores them and the
    scan sees no running statistics to drift), applies post-normalization children in
    ``_post`` order, and names itself in errors."""

    _post: tuple[str, ...]
    normdoctor_name: str
    bn_running_mean: torch.Tensor | None
    bn_running_var: torch.Tensor | None
    bn_num_batches_tracked: torch.Tensor | None

    def _init_kept(self, device: Any, dtype: Any, c: int) -> None:
        # Neutral values (mean 0, variance 1) until a BatchNorm's tensors are taken over.
        f = {"device": device, "dtype": dtype}
        self.register_buffer("bn_running_mean", torch.zeros(c, **f))
        self.register_buffer("bn_running_var", torch.ones(c, **f))
        self.register_buffer(
            "bn_num_batches_tracked", torch.zeros((), dtype=torch.long, device=device)
        )
        self._post = ()
        self.normdoctor_name = ""

    def _apply_post(self, out: torch.Tensor) -> torch.Tensor:
        for name in self._post:
            child = self._modules[name]
            assert child is not None
            out = child(out)
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
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class BatchStatsNorm(KeepsBatchNorm, _BatchNorm):
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
        self.prior = check_prior(prior)
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
    def carry(cls, bn: _NormBase, prior: float = 0.0) -> BatchStatsNorm:
        """Build from ``bn``'s hyper-parameters and take over its tensors (no checks)."""
        device, dtype = bn_device_dtype(bn)
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, device, dtype, prior=prior)
        carry_tensors(bn, new, dst_prefix="bn_")
        return new


class BatchStatsNorm1d(BatchStatsNorm, nn.BatchNorm1d):
    """BatchNorm1d that normalizes with the current batch's statistics in train and eval mode.

    Running statistics are never used for normalization nor updated, unless ``prior > 0``:
    then the batch statistics are blended with the kept running ones (``bn_running_mean``,
    ``bn_running_var``) as if these came from ``prior`` samples (Schneider et al., 2020, "Improving
    robustness against common corruptions by covariate shift adaptation"); with batch size n,
    ``mean = (prior * mean_R + n * mean_B) / (prior + n)`` and the same for the (biased batch,
    stored running) variance, so batch size 1 stays usable at inference.
    """


class BatchStatsNorm2d(BatchStatsNorm, nn.BatchNorm2d):
    """BatchNorm2d that normalizes with the current batch's statistics in train and eval mode.

    See :class:`BatchStatsNorm1d` for ``prior`` (blending with the kept running statistics).
    """


class BatchStatsNorm3d(BatchStatsNorm, nn.BatchNorm3d):
    """BatchNorm3d that normalizes with the current batch's statistics in train and eval mode.

    See :class:`BatchStatsNorm1d` for ``prior`` (blending with the kept running statistics).
    """


class InstanceNormFromBN(KeepsBatchNorm):
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
        # The next class in the MRO is nn.InstanceNorm1d/2d/3d.
        super().__init__(num_features, eps, momentum, affine, False, device=device, dtype=dtype)
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
        if input.shape[0] == 1:
            # One sample: BatchNorm's train-mode kernel over (N=1, spatial) is InstanceNorm,
            # and on CPU about 3x faster than torch.instance_norm at these sizes (bench_patch).
            weight, bias = self._parameters.get("weight"), self._parameters.get("bias")
            eps = cast(float, self.eps)  # a float attribute; nn.Module's stub says tensor
            out = F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
        else:
            out = super().forward(input)
        return self._apply_post(out)

    @classmethod
    def carry(cls, bn: _NormBase) -> InstanceNormFromBN:
        """Build from ``bn``'s hyper-parameters and take over its tensors (no checks)."""
        device, dtype = bn_device_dtype(bn)
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, device, dtype)
        carry_tensors(bn, new, dst_prefix="bn_")
        return new


class InstanceNormFromBN1d(InstanceNormFromBN, nn.InstanceNorm1d):
    """InstanceNorm1d standing in for a BatchNorm1d fed ``(N, C, L)`` inputs.

    Same ``weight``/``bias`` (affine iff the BatchNorm was), same ``eps``, no running
    statistics in use: each sample is normalized over its own length, which is what the
    BatchNorm computed in training at batch size 1.  The BatchNorm's running statistics are
    kept (``bn_running_*``) for :func:`revert`.  ``(N, C)`` inputs raise ConversionError.
    """

    _batch_dims = 3


class InstanceNormFromBN2d(InstanceNormFromBN, nn.InstanceNorm2d):
    """InstanceNorm2d standing in for a BatchNorm2d; see :class:`InstanceNormFromBN1d`."""

    _batch_dims = 4


class InstanceNormFromBN3d(InstanceNormFromBN, nn.InstanceNorm3d):
    """InstanceNorm3d standing in for a BatchNorm3d; see :class:`InstanceNormFromBN1d`."""

    _batch_dims = 5


#: A module some conversion produced.
Converted = BatchRenorm | BatchStatsNorm | InstanceNormFromBN
CONVERTED = (BatchRenorm, BatchStatsNorm, InstanceNormFromBN)
#: Per conversion, the replacement class by dimensionality (BatchNorm1d/2d/3d inputs).
TARGET_CLASSES: dict[
    str, dict[int, type[BatchRenorm] | type[BatchStatsNorm] | type[InstanceNormFromBN]]
] = {
    RENORM: {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d},
    BATCHSTATS: {1: BatchStatsNorm1d, 2: BatchStatsNorm2d, 3: BatchStatsNorm3d},
    INSTANCE: {1: InstanceNormFromBN1d, 2: InstanceNormFromBN2d, 3: InstanceNormFromBN3d},
}


def kind_of(module: nn.Module) -> str | None:
    """Which conversion produced ``module`` (None: not one of ours)."""
    if isinstance(module, BatchRenorm):
        return RENORM
    if isinstance(module, BatchStatsNorm):
        return BATCHSTATS
    if isinstance(module, InstanceNormFromBN):
        return INSTANCE
    return None


def check_prior(prior: object) -> float:
    """``prior`` of a batchstats conversion as a float; ConversionError unless a finite,
    non-negative number of samples."""
    if isinstance(prior, bool) or not isinstance(prior, (int, float)):
        raise ConversionError(f"prior must be a number of samples, got {prior!r}")
    value = float(prior)
    if not (math.isfinite(value) and value >= 0):
        raise ConversionError(
            f"prior must be finite and non-negative, got {prior!r} "
            "(for running statistics only, revert the layer to BatchNorm)"
        )
    return value


def dim_of(module: nn.Module) -> int | None:
    """1, 2 or 3 for a BatchNorm/InstanceNorm class that fixes its inputs' dimensionality."""
    for table in (BATCH_NORMS, INSTANCE_NORMS):
        for d, cls in table.items():
            if isinstance(module, cls):
                return d
    return None

"""Drift metrics: pure functions from per-channel statistics to scores.

All definitions follow DESIGN.md.  For channel c with batch statistics (mu_b, var_b) (biased)
and reference statistics (mu_r, var_r), s = sqrt(var + eps):

    m^2 = var_b * (1/s_b - 1/s_r)^2 + (mu_b - mu_r)^2 / s_r^2

is exactly the mean square over the batch of (y_train - y_eval) / gamma, since the cross term
sums to zero.  A layer's score weighs channels by gamma^2, so it equals
RMS(y_train - y_eval) / RMS(gamma) over the whole batch.

No function here holds state or touches an ``nn.Module``.
"""

from __future__ import annotations

import enum
import math
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:  # imported where used: reading saved reports never loads torch
    import torch

Array = TypeVar("Array", "torch.Tensor", np.ndarray)

__all__ = [
    "DEFAULT_NONIID_THRESHOLD",
    "DEFAULT_THRESHOLD",
    "Recommendation",
    "channel_weights",
    "layer_score",
    "mismatch_sq",
    "noise_sq_from_sums",
    "recommend",
]

#: Per-layer drift score above which a layer counts as drifting (calibration: README).
DEFAULT_THRESHOLD = 0.1
#: Between-batch over i.i.d.-predicted variance of batch means above which batches look correlated.
DEFAULT_NONIID_THRESHOLD = 4.0


class Recommendation(enum.StrEnum):
    """The fix normdoctor suggests for a layer."""

    OK = "ok"
    RECALIBRATE = "recalibrate"  # running statistics are stale: set them to the exact pooled ones
    INSTANCE = "instance"  # trained on per-sample batches: InstanceNorm reproduces training
    BATCHSTATS = "batchstats"  # use batch statistics at inference
    RENORM = "renorm"  # Batch Renormalization plus fine-tuning


def _ns(x: Array) -> Any:
    """The array namespace of ``x``: the fold math runs on torch tensors or NumPy arrays."""
    if isinstance(x, np.ndarray):
        return np
    import torch

    return torch


def mismatch_sq(
    batch_mean: Array,
    batch_var: Array,
    ref_mean: Array,
    ref_var: Array,
    eps: float | Array,
) -> Array:
    """Per-channel mean square of (y_batch - y_ref)/gamma when normalizing with either statistics.

    Args:
        batch_mean, batch_var: the statistics the train path normalizes with (biased variance).
        ref_mean, ref_var: the statistics the eval path normalizes with (e.g. running stats).
        eps: the layer's epsilon.

    Returns:
        ``m^2`` per channel (and per batch if batched), broadcast from the inputs: a tensor for
        tensors, an array for NumPy arrays.
    """
    xp = _ns(batch_var)
    inv_b = 1.0 / xp.sqrt(batch_var + eps)
    inv_r = 1.0 / xp.sqrt(ref_var + eps)
    return batch_var * (inv_b - inv_r) ** 2 + (batch_mean - ref_mean) ** 2 * inv_r**2


def channel_weights(weight: Array | None, valid: Array) -> Array:
    """gamma^2 per channel (ones without affine or when every gamma is 0), zero where not valid.

    Tensors give a float64 tensor on ``valid``'s device, NumPy arrays a float64 array.
    """
    if isinstance(valid, np.ndarray):
        ones = valid.astype(np.float64)
        if weight is None:
            return ones
        w = np.square(np.asarray(weight, dtype=np.float64)) * ones
        w = np.where(np.isfinite(w), w, 0.0)
    else:
        import torch

        ones = valid.to(torch.float64)
        if weight is None:
            return ones
        assert isinstance(weight, torch.Tensor)
        w = weight.detach().to(device=ones.device, dtype=torch.float64).square() * ones
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    if float(w.sum()) == 0.0:
        return ones
    return w


def layer_score(m2: Array, weights: Array) -> Array:
    """sqrt(sum_c w_c m2_c / sum_c w_c) over the last dimension; NaN when no channel has weight."""
    xp = _ns(m2)
    total = float(weights.sum())
    if total == 0.0:
        if isinstance(m2, np.ndarray):
            return np.full(m2.shape[:-1], math.nan)
        import torch

        return torch.full(m2.shape[:-1], math.nan, dtype=torch.float64, device=m2.device)
    m2 = xp.where(weights > 0, m2, 0.0)
    return xp.sqrt(xp.clip((m2 * weights).sum(-1) / total, 0, None))


def noise_sq_from_sums(
    *,
    batches: Array | float,
    sum_r1: Array,
    sum_r2: Array,
    sum_var: Array,
    mean_dev_sq: Array,
    pooled_var: Array,
    eps: float | Array,
) -> Array:
    """Batch-averaged ``m^2`` of each batch against the pooled statistics, from streaming sums.

    ``mismatch_sq(mu_b, var_b, mu_P, var_P)`` averaged over batches expands into sums that can be
    accumulated one batch at a time, before the pooled statistics are known:

        sum_r1 = sum_b var_b / (var_b + eps),  sum_r2 = sum_b var_b / s_b,  sum_var = sum_b var_b,
        mean_dev_sq = sum_b (mu_b - mu_P)^2.
    """
    xp = _ns(pooled_var)
    inv_p = 1.0 / xp.sqrt(pooled_var + eps)
    total = sum_r1 - 2.0 * inv_p * sum_r2 + inv_p**2 * (sum_var + mean_dev_sq)
    return xp.clip(total / batches, 0, None)


def recommend(
    *,
    drift: float,
    shift: float,
    noise: float,
    noniid: float | None,
    per_sample: bool,
    spatial: bool,
    degenerate: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    noniid_threshold: float = DEFAULT_NONIID_THRESHOLD,
    tracked_instance: bool = False,
) -> tuple[Recommendation, str]:
    """The fix for one layer and the reason, in one line.

    Args:
        drift: RMS over batches of the layer mismatch (train path).
        shift: mismatch of the exact pooled statistics against the running ones.
        noise: RMS over batches of the mismatch of batch statistics against the pooled ones.
        noniid: observed over i.i.d.-predicted spread of batch means (None when not measurable).
        per_sample: every batch held one sample.
        spatial: the layer's input has dimensions beyond (N, C) to normalize over per sample.
        degenerate: channels whose running statistics are unusable (var <= 0, NaN, Inf).
        tracked_instance: the layer is an InstanceNorm with running statistics, whose stale
            statistics are fixed by recalibration (see below for BatchNorm).
    """
    if degenerate:
        return (
            Recommendation.RECALIBRATE,
            f"{degenerate} channel(s) have unusable running statistics (var <= 0, NaN or Inf)",
        )
    if not math.isfinite(drift) or drift <= threshold:
        return Recommendation.OK, f"drift {drift:.3g} within threshold {threshold:g}"
    # BatchNorm on per-sample batches over spatial dimensions: InstanceNorm is training's own
    # computation whatever the running statistics hold, while recalibrating leaves the batch
    # noise (drift^2 is about shift^2 + noise^2): stale statistics are the fix only where the
    # noise alone is within the threshold.  (At batch size 1 the monitor read shift 0.1538
    # against noise 0.1536, 0.15 over the threshold: "recalibrate" by a hair, a fix that would
    # leave the layer flagged.)
    exact_instance = per_sample and spatial and noise > threshold and not tracked_instance
    if shift >= noise and not exact_instance:
        return (
            Recommendation.RECALIBRATE,
            f"running statistics are stale: population shift {shift:.3g} ≥ batch noise {noise:.3g}",
        )
    if per_sample:
        if spatial:
            return (
                Recommendation.INSTANCE,
                f"batch noise {noise:.3g} from per-sample batches: InstanceNorm reproduces training",
            )
        return (
            Recommendation.RENORM,
            f"batch noise {noise:.3g} from per-sample batches with nothing to normalize per sample",
        )
    if noniid is not None and noniid >= noniid_threshold:
        return (
            Recommendation.RENORM,
            f"correlated batches (batch-mean spread {noniid:.3g}x i.i.d.): "
            "no running estimate matches training; fine-tune with BatchRenorm",
        )
    return (
        Recommendation.BATCHSTATS,
        f"batch noise {noise:.3g} ≥ population shift {shift:.3g}: the layer depends on its batch",
    )

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
    "close_rows",
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


def close_rows(
    totals: np.ndarray,
    sums: np.ndarray,
    vectors: tuple[np.ndarray, ...],
    eps: np.ndarray,
    sizes: list[int],
) -> np.ndarray:
    """``recording.finish_all``'s closing arithmetic over every channel of every layer at once:
    from a path's accumulators (``totals`` (layers, 4), ``sums`` (11, channels); names in
    ``Recorder.SCALARS`` and ``VECTORS``) and ``vectors`` (shift, safe mean, safe var, weights,
    running mean, running var), the rows ``stats.BLOCK``, then m2 and the non-i.i.d. ratio,
    float64 (10, channels).  ``_fused.close`` compiles the same expressions."""
    p1, p2, sum_m2, r1, r2, rv, u1, u2, z1, z2, between = sums
    k, safe_mean, safe_var, weights, running_mean, running_var = vectors
    count, samples, units = (np.repeat(totals[:, j], sizes) for j in range(3))
    eps = np.repeat(eps, sizes)
    units1 = np.maximum(units, 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        seen = count > 0
        dev = np.where(seen, p1 / count, math.nan)
        mean = k + dev
        m2 = np.where(seen, np.clip(p2 - p1**2 / count, 0, None), math.nan)
        pooled_var = m2 / count  # NaN where nothing was seen (Moments.var)
        mean_dev_sq = np.clip(u2 - 2 * dev * u1 + units * dev**2, 0, None)
        noise = noise_sq_from_sums(
            batches=units1,
            sum_r1=r1,
            sum_r2=r2,
            sum_var=rv,
            mean_dev_sq=mean_dev_sq,
            pooled_var=pooled_var,
            eps=eps,  # per channel: each layer's own
        )
        per_unit = np.where(units > 0, count / units, math.nan)
        unbiased = np.where(per_unit > 1, per_unit / (per_unit - 1), math.nan)
        fit = mismatch_sq(k + u1 / units1, rv / units1 * unbiased, safe_mean, safe_var, eps)
        total = z2 - z1**2 / samples
        spread = between - z1**2 / samples
        ratio = np.where(total > 0, (spread / (units - 1)) / (total / (samples - 1)), math.nan)
    rows = (weights, running_mean, running_var, mean, pooled_var, sum_m2 / units1, noise, fit)
    return np.stack([*rows, m2, ratio], dtype=np.float64)

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

import torch

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


def mismatch_sq(
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    ref_mean: torch.Tensor,
    ref_var: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Per-channel mean square of (y_batch - y_ref)/gamma when normalizing with either statistics.

    Args:
        batch_mean, batch_var: the statistics the train path normalizes with (biased variance).
        ref_mean, ref_var: the statistics the eval path normalizes with (e.g. running stats).
        eps: the layer's epsilon.

    Returns:
        Tensor broadcast from the inputs, ``m^2`` per channel (and per batch if batched).
    """
    inv_b = torch.rsqrt(batch_var + eps)
    inv_r = torch.rsqrt(ref_var + eps)
    return batch_var * (inv_b - inv_r).square() + (batch_mean - ref_mean).square() * inv_r.square()


def channel_weights(weight: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    """gamma^2 per channel (ones without affine or when every gamma is 0), zero where not valid."""
    valid = valid.to(torch.float64)
    if weight is None:
        return valid
    w = weight.detach().to(device=valid.device, dtype=torch.float64).square() * valid
    w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    if float(w.sum()) == 0.0:
        return valid
    return w


def layer_score(m2: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sqrt(sum_c w_c m2_c / sum_c w_c) over the last dimension; NaN when no channel has weight."""
    total = weights.sum()
    if float(total) == 0.0:
        return torch.full(m2.shape[:-1], float("nan"), dtype=torch.float64, device=m2.device)
    m2 = torch.where(weights > 0, m2, torch.zeros_like(m2))
    return ((m2 * weights).sum(-1) / total).clamp_min(0).sqrt()


def noise_sq_from_sums(
    *,
    batches: torch.Tensor | float,
    sum_r1: torch.Tensor,
    sum_r2: torch.Tensor,
    sum_var: torch.Tensor,
    mean_dev_sq: torch.Tensor,
    pooled_var: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Batch-averaged ``m^2`` of each batch against the pooled statistics, from streaming sums.

    ``mismatch_sq(mu_b, var_b, mu_P, var_P)`` averaged over batches expands into sums that can be
    accumulated one batch at a time, before the pooled statistics are known:

        sum_r1 = sum_b var_b / (var_b + eps),  sum_r2 = sum_b var_b / s_b,  sum_var = sum_b var_b,
        mean_dev_sq = sum_b (mu_b - mu_P)^2.
    """
    inv_p = torch.rsqrt(pooled_var + eps)
    total = sum_r1 - 2.0 * inv_p * sum_r2 + inv_p.square() * (sum_var + mean_dev_sq)
    return (total / batches).clamp_min(0)


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
    """
    if degenerate:
        return (
            Recommendation.RECALIBRATE,
            f"{degenerate} channel(s) have unusable running statistics (var <= 0, NaN or Inf)",
        )
    if not math.isfinite(drift) or drift <= threshold:
        return Recommendation.OK, f"drift {drift:.3g} within threshold {threshold:g}"
    if shift >= noise:
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

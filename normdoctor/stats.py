"""Exact, streaming per-channel moments.

A :class:`Moments` holds, per channel, the element count, the mean and M2 (the sum of squared
deviations from the mean) in float64.  Two of them merge exactly with the pairwise update of
Chan, Golub and LeVeque (1979), so statistics gathered over batches, shards or processes combine
to exactly what one pass over the concatenated data would give, up to float64 rounding.
A :class:`LayerMeasurement` is what the recording of one layer on one path reduces to
(:func:`normdoctor.recording.finish_all`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["BLOCK", "LayerMeasurement", "Moments", "channel_moments"]


def _reduce_dims(x: torch.Tensor, channel_dim: int = 1) -> tuple[int, ...]:
    return tuple(d for d in range(x.dim()) if d != channel_dim)


@dataclass(frozen=True, slots=True)
class Moments:
    """Per-channel count, mean and M2 in float64.

    ``var`` is the biased (population) variance ``m2 / count``, what BatchNorm normalizes with;
    ``unbiased_var`` is ``m2 / (count - 1)``, what BatchNorm stores in ``running_var``.
    """

    count: float
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def empty(num_channels: int, device: torch.device | str | None = None) -> Moments:
        zeros = torch.zeros(num_channels, dtype=torch.float64, device=device)
        return Moments(0.0, zeros, zeros.clone())

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / self.count if self.count > 0 else torch.full_like(self.m2, float("nan"))

    @property
    def unbiased_var(self) -> torch.Tensor:
        if self.count > 1:
            return self.m2 / (self.count - 1)
        return torch.full_like(self.m2, float("nan"))

    def merge(self, other: Moments) -> Moments:
        """Exact pairwise merge (Chan et al.): the moments of both data sets together."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta.square() * (self.count * other.count / n)
        return Moments(n, mean, m2)

    @staticmethod
    def merge_all(parts: Sequence[Moments]) -> Moments:
        """Merge many at once: mean of means weighted by count, then within + between M2."""
        parts = [p for p in parts if p.count > 0]
        if not parts:
            raise ValueError("no moments to merge")
        counts = torch.tensor(
            [p.count for p in parts], dtype=torch.float64, device=parts[0].mean.device
        )
        means = torch.stack([p.mean for p in parts])
        total = float(counts.sum())
        mean = (counts[:, None] * means).sum(0) / total
        m2 = torch.stack([p.m2 for p in parts]).sum(0) + (
            counts[:, None] * (means - mean).square()
        ).sum(0)
        return Moments(total, mean, m2)

    def to(self, device: torch.device | str) -> Moments:
        return Moments(self.count, self.mean.to(device), self.m2.to(device))


def channel_moments(x: torch.Tensor, channel_dim: int = 1) -> Moments:
    """The exact per-channel moments of ``x`` (two-pass, float64): the reference for one tensor."""
    x64 = x.detach().to(torch.float64)
    dims = _reduce_dims(x64, channel_dim)
    count = float(x64.numel() // max(x64.shape[channel_dim], 1))
    mean = x64.mean(dim=dims)
    shape = [1] * x64.dim()
    shape[channel_dim] = -1
    m2 = (x64 - mean.view(shape)).square().sum(dim=dims)
    return Moments(count, mean, m2)


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerMeasurement:
    """What one path recorded for one layer, reduced to CPU float64 tensors.

    ``units`` are batches, except for InstanceNorm with running statistics, whose train mode
    normalizes each sample on its own: there the unit is the sample.
    """

    units: int
    samples: int
    pooled: Moments
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weights: torch.Tensor  # normalized gamma^2 over valid channels (sum 1), zeros if none
    channel_m2: torch.Tensor  # per-channel m^2 averaged over units, against running stats
    unit_scores: torch.Tensor  # per-unit layer mismatch D_b (NaN for non-finite units)
    noise_m2: torch.Tensor  # per-channel m^2 of units against pooled stats, averaged
    # per-channel m^2 of the average unit statistics (mean of unit means, mean of unbiased unit
    # variances: what BatchNorm's running estimates average in training) against running stats
    fit_m2: torch.Tensor
    noniid: torch.Tensor | None  # per channel: between-unit spread over i.i.d. prediction
    nonfinite_units: int
    per_sample: bool  # every unit held exactly one sample
    spatial: bool  # the input had dims beyond (N, C)
    # One float64 array (rows BLOCK, then others) shared by the measurements of one
    # finish_all, and this layer's columns: assemble gathers every layer's channels at once.
    block: tuple[np.ndarray, int, int] | None = field(default=None, compare=False, repr=False)


#: The first rows of ``LayerMeasurement.block``: the channels of these fields, as float64.
BLOCK = ("weights", "running_mean", "running_var", "pooled_mean", "pooled_var", "channel_m2",
         "noise_m2", "fit_m2")  # fmt: skip

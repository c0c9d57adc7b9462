"""Exact, streaming per-channel moments.

A :class:`Moments` holds, per channel, the element count, the mean and M2 (the sum of squared
deviations from the mean) in float64.  Two of them merge exactly with the pairwise update of
Chan, Golub and LeVeque (1979), so statistics gathered over batches, shards or processes combine
to exactly what one pass over the concatenated data would give, up to float64 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Moments", "channel_moments"]


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

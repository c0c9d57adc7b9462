"""Look-alikes of the building blocks real model zoos are made of (timm, torchvision).

timm and torchvision are not dependencies: these classes reproduce their structure (class
names, parameter and buffer names, children, what forward computes) closely enough that
normdoctor meets here what it meets in those zoos.  Written from the published descriptions;
the semantics that matter to normdoctor are noted on each class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BatchNormAct2d",
    "EvoNorm2dB0",
    "EvoNorm2dS0",
    "EvoNorm2dS0a",
    "FilterResponseNormTlu2d",
    "FrozenBatchNorm2d",
    "FrozenBatchNormAct2d",
    "SelectiveKernelAttn",
    "SplitAttn",
    "SqueezeExcite",
]


def _per_channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d: BatchNorm with every tensor a buffer, no children.

    Always normalizes with its running statistics, in train mode too.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _frozen(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * _per_channel(scale, x) + _per_channel(shift, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._frozen(x)


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm's FrozenBatchNormAct2d (what ``freeze_batch_norm_2d`` makes of a BatchNormAct2d):
    the frozen buffers plus two children, ``drop`` (Identity or Dropout) then ``act`` (ReLU)."""

    def __init__(self, num_features: int, eps: float = 1e-5, drop: float = 0.0) -> None:
        super().__init__(num_features, eps)
        self.num_features = num_features
        self.affine = True
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self._frozen(x)))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass (same state-dict keys) that applies
    ``drop`` then ``act`` to the normalized output."""

    def __init__(self, num_features: int, drop: float = 0.0) -> None:
        super().__init__(num_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _instance_std(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x.float().var(dim=(2, 3), unbiased=False, keepdim=True).add(eps).sqrt().to(x.dtype)


def _group_std(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    n, c, h, w = x.shape
    g = x.reshape(n, groups, c // groups, h, w)
    std = g.float().var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(eps).sqrt()
    return std.to(x.dtype).expand(g.shape).reshape(n, c, h, w)


class EvoNorm2dB0(nn.Module):
    """timm's EvoNorm2dB0: parameters ``weight``, ``bias``, ``v``; one buffer, ``running_var``.

    Batch-dependent: in train mode it divides by the larger of the batch standard deviation
    (biased, over N, H, W) and ``x * v + instance std``, and moves ``running_var`` towards the
    unbiased batch variance; in eval mode ``running_var`` stands in for the batch variance.
    It never subtracts a mean, so it holds no ``running_mean``.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-3) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        if self.training:
            var = x.float().var(dim=(0, 2, 3), unbiased=False)
            n = x.numel() / x.shape[1]
            with torch.no_grad():
                self.running_var.mul_(1 - self.momentum).add_(
                    var.detach() * (self.momentum * n / (n - 1))
                )
        else:
            var = self.running_var
        left = _per_channel(var.add(self.eps).sqrt(), x)
        right = x * _per_channel(self.v, x) + _instance_std(x, self.eps)
        x = x / torch.maximum(left, right)
        return x * _per_channel(self.weight, x) + _per_channel(self.bias, x)


class EvoNorm2dS0(nn.Module):
    """timm's EvoNorm2dS0: per-sample (group statistics), batch-independent, no buffers."""

    def __init__(self, num_features: int, groups: int = 2, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        x = x * (x * _per_channel(self.v, x)).sigmoid() / _group_std(x, self.groups, self.eps)
        return x * _per_channel(self.weight, x) + _per_channel(self.bias, x)


class EvoNorm2dS0a(EvoNorm2dS0):
    """timm's EvoNorm2dS0a: S0 with the group statistics taken before the gate."""

    def __init__(self, num_features: int, groups: int = 2, eps: float = 1e-3) -> None:
        super().__init__(num_features, groups, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        d = _group_std(x, self.groups, self.eps)
        x = x * (x * _per_channel(self.v, x)).sigmoid() / d
        return x * _per_channel(self.weight, x) + _per_channel(self.bias, x)


class FilterResponseNormTlu2d(nn.Module):
    """timm's FilterResponseNormTlu2d: divides by each sample's channel RMS (no mean, no running
    statistics), then a learned threshold ``tau``; batch-independent."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.float().square().mean(dim=(2, 3), keepdim=True).add(self.eps).rsqrt()
        x = x * rms.to(x.dtype)
        x = x * _per_channel(self.weight, x) + _per_channel(self.bias, x)
        return torch.maximum(x, _per_channel(self.tau, x))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate (MobileNetV3, EfficientNet): no norm inside."""

    def __init__(self, channels: int, reduced: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.fc2(self.act(self.fc1(s))).sigmoid()


class SelectiveKernelAttn(nn.Module):
    """timm's SelectiveKernelAttn: BatchNorm2d over pooled (N, C, 1, 1) attention features."""

    def __init__(self, channels: int, paths: int = 2, attn_channels: int = 4) -> None:
        super().__init__()
        self.paths = paths
        self.fc_reduce = nn.Conv2d(channels, attn_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(attn_channels)
        self.act = nn.ReLU()
        self.fc_select = nn.Conv2d(attn_channels, channels * paths, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, paths, C, H, W)
        s = x.sum(1).mean((2, 3), keepdim=True)
        s = self.fc_select(self.act(self.bn(self.fc_reduce(s))))
        n, c = x.shape[0], x.shape[2]
        return torch.softmax(s.view(n, self.paths, c, 1, 1), dim=1)


class SplitAttn(nn.Module):
    """ResNeSt's split attention (timm's SplitAttn): a radix convolution with BatchNorm, then
    attention whose ``bn1`` normalizes pooled (N, C, 1, 1) features."""

    def __init__(self, channels: int, radix: int = 2, attn_channels: int = 4) -> None:
        super().__init__()
        self.radix = radix
        self.conv = nn.Conv2d(channels, channels * radix, 3, padding=1, groups=radix, bias=False)
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.act0 = nn.ReLU()
        self.fc1 = nn.Conv2d(channels, attn_channels, 1)
        self.bn1 = nn.BatchNorm2d(attn_channels)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Conv2d(attn_channels, channels * radix, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.bn0(self.conv(x)))
        n, rc, h, w = x.shape
        splits = x.view(n, self.radix, rc // self.radix, h, w)
        gap = splits.sum(1).mean((2, 3), keepdim=True)
        attn = self.fc2(self.act1(self.bn1(self.fc1(gap))))
        attn = F.softmax(attn.view(n, self.radix, -1), dim=1).view(n, self.radix, -1, 1, 1)
        return (splits * attn).sum(1)

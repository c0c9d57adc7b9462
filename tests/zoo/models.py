"""The zoo: one tiny model per building block, as data (``ZooCase``) for one generic suite.

Each case says, written by hand and independently of normdoctor, which norm layers its model
holds and how each normalizes (``layers``: qualified name -> family value), which of them run
on the zoo input (``unused``: those that do not), and which normalize one value per channel at
batch size 1 (``pooled``: BatchNorm over (N, C) or (N, C, 1, 1) features, not measurable there).

Models build in milliseconds, the same every time (``ZooCase.model()``) (``torch.compile`` with the eager backend: about a second the
first time), hold 4 to 8 channels, and come with running statistics moved away from their
initial values (a few train-mode passes on shifted data, or seeded values for layers that never
update them), so that every measurement has something to find.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import (
    BatchNormAct2d,
    EvoNorm2dB0,
    EvoNorm2dS0,
    EvoNorm2dS0a,
    FilterResponseNormTlu2d,
    FrozenBatchNorm2d,
    FrozenBatchNormAct2d,
    SelectiveKernelAttn,
    SplitAttn,
    SqueezeExcite,
)

__all__ = ["CASES", "ZooCase", "eager"]

IMAGE = (4, 3, 8, 8)


@dataclass(frozen=True)
class ZooCase:
    id: str
    build: Callable[[], nn.Module]
    layers: dict[str, str]  # qualified name -> NormFamily value, counted by hand
    shape: tuple[int, ...] = IMAGE
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    unused: frozenset[str] = frozenset()  # norm layers the input never reaches
    pooled: frozenset[str] = frozenset()  # one value per channel at batch size 1
    note: str = ""

    def model(self) -> nn.Module:
        """The case's model, the same every time (seeded, global RNG state left alone)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return self.build()

    def inputs(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(self.shape, generator=gen, dtype=torch.float64) * 1.5 + 0.3
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def eager(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper runs (the model itself otherwise)."""
    return getattr(model, "_orig_mod", model)


# ------------------------------------------------------------------------- running statistics


def _aged(model: nn.Module, shape: tuple[int, ...] = IMAGE, steps: int = 3) -> nn.Module:
    """A few train-mode passes on shifted, scaled data: running statistics look trained (and
    stale for the zoo input); then eval mode.  Frozen layers get seeded statistics instead."""
    gen = torch.Generator().manual_seed(3)
    for module in model.modules():
        buffers = module._buffers
        if isinstance(module, (FrozenBatchNorm2d, EvoNorm2dB0)):
            c = buffers["running_var"].numel()
            with torch.no_grad():
                buffers["running_var"].copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if "running_mean" in buffers:
                    buffers["running_mean"].copy_(torch.randn(c, generator=gen) * 0.5)
                if "weight" in buffers:
                    buffers["weight"].copy_(torch.rand(c, generator=gen) + 0.5)
                    buffers["bias"].copy_(torch.randn(c, generator=gen) * 0.1)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(shape, generator=gen) * 2.0 - 0.5)
    return model.eval()


# ----------------------------------------------------------------------------------- models


class Net(nn.Module):
    """Features, global pooling, classifier: the shape of most image classifiers."""

    def __init__(self, features: nn.Module, channels: int, head: nn.Module | None = None):
        super().__init__()
        self.features = features
        self.head = head if head is not None else nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def _conv_bn(cin: int, cout: int, norm: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), norm, nn.ReLU())


def bn2d_convnet() -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    )  # fmt: skip
    return _aged(Net(features, 8))


class PooledBN(nn.Module):
    """BatchNorm2d over (N, C, 1, 1) pooled features, then BatchNorm1d over (N, C): heads of
    EfficientNet-style and re-identification models."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 4, nn.BatchNorm2d(4))
        self.pool_bn = nn.BatchNorm2d(4)
        self.neck = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.pool_bn(self.stem(x).mean((2, 3), keepdim=True))
        return self.fc(self.neck(s.flatten(1)))


def pooled_bn() -> nn.Module:
    return _aged(PooledBN())


class SEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv_bn(3, 4, nn.BatchNorm2d(4))
        self.se = SqueezeExcite(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.se(self.conv(x)).mean((2, 3)))


def se_block() -> nn.Module:
    return _aged(SEBlock())


class SKBlock(nn.Module):
    """Selective kernel (SKNet, timm's SelectiveKernel): two conv-BN paths, BN in the attention."""

    def __init__(self) -> None:
        super().__init__()
        self.paths = nn.ModuleList(
            [
                _conv_bn(3, 4, nn.BatchNorm2d(4)),
                nn.Sequential(
                    nn.Conv2d(3, 4, 3, padding=2, dilation=2, bias=False),
                    nn.BatchNorm2d(4),
                    nn.ReLU(),
                ),
            ]
        )
        self.attn = SelectiveKernelAttn(4, paths=2, attn_channels=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([p(x) for p in self.paths], dim=1)
        out = (stacked * self.attn(stacked)).sum(1)
        return self.fc(out.mean((2, 3)))


def sk_attention() -> nn.Module:
    return _aged(SKBlock())


def split_attention() -> nn.Module:
    features = nn.Sequential(_conv_bn(3, 4, nn.BatchNorm2d(4)), SplitAttn(4, radix=2))
    return _aged(Net(features, 4))


def bn1d_head() -> nn.Module:
    features = _conv_bn(3, 4, nn.BatchNorm2d(4))
    head = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return _aged(Net(features, 4, head))


class SeqNet(nn.Module):
    """BatchNorm1d over (N, C, L): 1d convolutions over sequences (audio, time series)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
            nn.Conv1d(4, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(2))


def bn1d_sequence() -> nn.Module:
    return _aged(SeqNet(), (4, 3, 16))


class VolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3, 4)))


def bn3d() -> nn.Module:
    return _aged(VolNet(), (4, 3, 4, 6, 6))


def frozen_bn() -> nn.Module:
    """torchvision's frozen backbones (detection models): FrozenBatchNorm2d, no children."""
    features = nn.Sequential(
        _conv_bn(3, 4, FrozenBatchNorm2d(4)), _conv_bn(4, 4, FrozenBatchNorm2d(4))
    )
    return _aged(Net(features, 4))


def frozen_bn_act(drop: float = 0.0) -> Callable[[], nn.Module]:
    """timm's ``freeze_batch_norm_2d`` of BatchNormAct2d layers: children ``drop`` and ``act``."""

    def build() -> nn.Module:
        features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            FrozenBatchNormAct2d(4, drop=drop),
            nn.Conv2d(4, 4, 3, padding=1, bias=False),
            FrozenBatchNormAct2d(4, drop=drop),
        )
        return _aged(Net(features, 4))

    return build


def half_frozen() -> nn.Module:
    """A partly frozen network (frozen stem, trainable rest): fine-tuned detection backbones."""
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        FrozenBatchNormAct2d(4),
        _conv_bn(4, 4, nn.BatchNorm2d(4)),
    )
    return _aged(Net(features, 4))


def bn_act(drop: float = 0.25) -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        BatchNormAct2d(4, drop=drop),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        BatchNormAct2d(4),
    )
    return _aged(Net(features, 4))


def evonorm_b0() -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), EvoNorm2dB0(4),
        nn.Conv2d(4, 4, 3, padding=1), EvoNorm2dB0(4),
    )  # fmt: skip
    return _aged(Net(features, 4))


def evonorm_s0() -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), EvoNorm2dS0(4),
        nn.Conv2d(4, 4, 3, padding=1), EvoNorm2dS0a(4),
    )  # fmt: skip
    return _aged(Net(features, 4))


def frn() -> nn.Module:
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), FilterResponseNormTlu2d(4))
    return _aged(Net(features, 4))


class SyncNet(nn.Module):
    """SyncBatchNorm as ``convert_sync_batchnorm`` leaves it: over (N, C, H, W) and (N, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 4, nn.SyncBatchNorm(4))
        self.fc1 = nn.Linear(4, 8)
        self.bn_head = nn.SyncBatchNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.bn_head(self.fc1(self.stem(x).mean((2, 3)))))


def sync_bn() -> nn.Module:
    return _aged(SyncNet())


def instance_tracked() -> nn.Module:
    """InstanceNorm2d(track_running_stats=True), statistics from other data: the eval trap."""
    norm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
    model = Net(_conv_bn(3, 4, norm), 4)
    _aged(model)
    with torch.no_grad():  # stale: far from what the zoo input gives, unevenly per channel
        norm.running_mean.add_(torch.tensor([1.5, -1.0, 0.5, 2.0]))
        norm.running_var.mul_(torch.tensor([4.0, 0.25, 2.0, 1.0]))
    return model


def batch_independent() -> nn.Module:
    """torch's batch-independent norms (style transfer, transformers): listed, never measured."""
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4, affine=True), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.LocalResponseNorm(2),
    )  # fmt: skip
    head = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.RMSNorm(4), nn.Linear(4, 3))
    return _aged(Net(features, 4, head))


def no_affine_no_tracking() -> nn.Module:
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
    )  # fmt: skip
    return _aged(Net(features, 4))


def lazy_bn() -> nn.Module:
    """LazyBatchNorm2d after its first forward (materialized: a BatchNorm2d from then on)."""
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU())
    model = Net(features, 4)
    with torch.no_grad():
        model.eval()(torch.zeros(IMAGE))
    return _aged(model)


class SharedBN(nn.Module):
    """One BatchNorm module called twice per forward (weight sharing, siamese branches)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.bn(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def shared_bn() -> nn.Module:
    return _aged(SharedBN())


class Containers(nn.Module):
    """BatchNorm inside ModuleList and ModuleDict; one head (aux) never runs, as in Inception's
    auxiliary classifier at inference."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_conv_bn(3, 4, nn.BatchNorm2d(4)), nn.BatchNorm2d(4)])
        self.heads = nn.ModuleDict(
            {
                "main": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)),
                "aux": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        feats = x.mean((2, 3))
        if self.training:
            return self.heads["main"](feats) + self.heads["aux"](feats)
        return self.heads["main"](feats)


def containers() -> nn.Module:
    return _aged(Containers())


def compiled() -> nn.Module:
    return torch.compile(bn2d_convnet(), backend="eager")


def channels_last() -> nn.Module:
    return bn2d_convnet().to(memory_format=torch.channels_last)


def low_precision(dtype: torch.dtype) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return bn2d_convnet().to(dtype)

    return build


class HandWrittenBN(nn.Module):
    """A BatchNorm written from scratch (research code): batch statistics in train mode,
    running ones in eval, no torch BatchNorm class."""

    def __init__(self, c: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            with torch.no_grad():
                n = x.numel() / x.shape[1]
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        shape = (1, -1, 1, 1)
        x = (x - mean.view(shape)) * (var.view(shape) + self.eps).rsqrt()
        return x * self.weight.view(shape) + self.bias.view(shape)


def hand_written_bn() -> nn.Module:
    return _aged(Net(_conv_bn(3, 4, HandWrittenBN(4)), 4))


_B, _F, _I = "batch", "frozen", "instance_tracked"
_CONVNET = {"features.1": _B, "features.4": _B}

CASES: list[ZooCase] = [
    ZooCase("bn2d-convnet", bn2d_convnet, _CONVNET),
    ZooCase(
        "bn-pooled-features",
        pooled_bn,
        {"stem.1": _B, "pool_bn": _B, "neck": _B},
        pooled=frozenset({"pool_bn", "neck"}),
    ),
    ZooCase("se-block", se_block, {"conv.1": _B}),
    ZooCase(
        "sk-attention",
        sk_attention,
        {"paths.0.1": _B, "paths.1.1": _B, "attn.bn": _B},
        pooled=frozenset({"attn.bn"}),
    ),
    ZooCase(
        "split-attention",
        split_attention,
        {"features.0.1": _B, "features.1.bn0": _B, "features.1.bn1": _B},
        pooled=frozenset({"features.1.bn1"}),
    ),
    ZooCase(
        "bn1d-head",
        bn1d_head,
        {"features.1": _B, "head.1": _B},
        pooled=frozenset({"head.1"}),
    ),
    ZooCase("bn1d-sequence", bn1d_sequence, {"body.1": _B, "body.4": _B}, shape=(4, 3, 16)),
    ZooCase("bn3d", bn3d, {"body.1": _B}, shape=(4, 3, 4, 6, 6)),
    ZooCase("frozen-bn", frozen_bn, {"features.0.1": _F, "features.1.1": _F}),
    ZooCase("frozen-bn-act", frozen_bn_act(), {"features.1": _F, "features.3": _F}),
    ZooCase("frozen-bn-act-dropout", frozen_bn_act(0.25), {"features.1": _F, "features.3": _F}),
    ZooCase("half-frozen", half_frozen, {"features.1": _F, "features.2.1": _B}),
    ZooCase("bn-act-subclass", bn_act, {"features.1": _B, "features.3": _B}),
    ZooCase(
        "evonorm-b0",
        evonorm_b0,
        {"features.1": "batch_var", "features.3": "batch_var"},
        note="batch-dependent with running_var only: listed, not measured yet",
    ),
    ZooCase("evonorm-s0", evonorm_s0, {"features.1": "per_sample", "features.3": "per_sample"}),
    ZooCase("filter-response-norm", frn, {"features.1": "per_sample"}),
    ZooCase(
        "sync-bn",
        sync_bn,
        {"stem.1": _B, "bn_head": _B},
        pooled=frozenset({"bn_head"}),
    ),
    ZooCase("instance-tracked", instance_tracked, {"features.1": _I}),
    ZooCase(
        "batch-independent",
        batch_independent,
        {
            "features.1": "instance",
            "features.4": "group",
            "features.7": "local_response",
            "head.0": "layer",
            "head.2": "rms",
        },
    ),
    ZooCase(
        "bn-no-affine-no-tracking",
        no_affine_no_tracking,
        {"features.1": _B, "features.4": "batch_stats_only"},
    ),
    ZooCase("lazy-bn", lazy_bn, {"features.1": _B}),
    ZooCase("shared-bn", shared_bn, {"bn": _B}),
    ZooCase(
        "modulelist-moduledict",
        containers,
        {"blocks.0.1": _B, "blocks.1": _B, "heads.main.1": _B, "heads.aux.1": _B},
        unused=frozenset({"heads.aux.1"}),
        pooled=frozenset({"heads.main.1"}),
    ),
    ZooCase(
        "compiled",
        compiled,
        {f"_orig_mod.{n}": f for n, f in _CONVNET.items()},
    ),
    ZooCase("channels-last", channels_last, _CONVNET, channels_last=True),
    ZooCase("float16", low_precision(torch.float16), _CONVNET, dtype=torch.float16),
    ZooCase("bfloat16", low_precision(torch.bfloat16), _CONVNET, dtype=torch.bfloat16),
    ZooCase(
        "hand-written-bn",
        hand_written_bn,
        {"features.1": "batch_other"},
        note="BatchNorm semantics in a class of its own: listed, not measured yet",
    ),
]

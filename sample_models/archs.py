"""Architectures of the sample models (plain ``torch.nn`` only).

Every constructor takes keyword arguments with defaults only, so a tool can build a
model from a spec such as ``sample_models.archs:DigitsCNN`` or
``sample_models/archs.py:DigitsCNN`` plus the ``arch_kwargs`` recorded in
``sample_models/MANIFEST.json``.

Inputs are digits from ``sklearn.datasets.load_digits``: float32 tensors of shape
``(N, 1, 8, 8)``, already normalized (see ``MANIFEST.json`` -> ``data``).
"""

from __future__ import annotations

from torch import Tensor, cat, nn

__all__ = ["DigitsCNN", "DigitsMLP", "DigitsUNet"]


def _norm2d(kind: str, channels: int, spatial: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(groups, channels)
    if kind == "layer":
        # A real nn.LayerNorm over (C, H, W); ties the model to its input size.
        return nn.LayerNorm([channels, spatial, spatial])
    raise ValueError(f"norm must be 'batch', 'group' or 'layer', got {kind!r}")


class DigitsCNN(nn.Module):
    """Small CNN that pools globally before its classifier.

    conv(1->16, 3x3) - norm - ReLU - conv(16->32, 3x3) - norm - ReLU -
    conv(32->32, 3x3, stride 2) - norm - ReLU - AdaptiveAvgPool2d(1) - Linear(32->10)

    All convolutions use padding 1, so an 8x8 input gives 8x8, 8x8, 4x4 feature maps.
    ``norm`` selects ``nn.BatchNorm2d`` ("batch"), ``nn.GroupNorm(groups, C)`` ("group")
    or ``nn.LayerNorm([C, H, W])`` ("layer"; needs ``image_size``).
    """

    def __init__(
        self,
        norm: str = "batch",
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        groups: int = 4,
        image_size: int = 8,
    ) -> None:
        super().__init__()
        w1, w2 = width, 2 * width
        s1, s3 = image_size, (image_size + 1) // 2
        self.conv1 = nn.Conv2d(in_channels, w1, 3, padding=1, bias=False)
        self.norm1 = _norm2d(norm, w1, s1, groups)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(w1, w2, 3, padding=1, bias=False)
        self.norm2 = _norm2d(norm, w2, s1, groups)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(w2, w2, 3, stride=2, padding=1, bias=False)
        self.norm3 = _norm2d(norm, w2, s3, groups)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.norm1(self.conv1(x)))
        x = self.relu2(self.norm2(self.conv2(x)))
        x = self.relu3(self.norm3(self.conv3(x)))
        return self.fc(self.pool(x).flatten(1))


class DigitsMLP(nn.Module):
    """MLP with BatchNorm1d; flattens its input, so it takes (N, 1, 8, 8) or (N, 64).

    Linear(64->128) - BatchNorm1d - ReLU - Linear(128->64) - BatchNorm1d - ReLU - Linear(64->10)
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden1: int = 128,
        hidden2: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden1)
        self.bn1 = nn.BatchNorm1d(hidden1)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.bn2 = nn.BatchNorm1d(hidden2)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        x = self.relu1(self.bn1(self.fc1(x)))
        x = self.relu2(self.bn2(self.fc2(x)))
        return self.fc3(x)


class DigitsUNet(nn.Module):
    """Small BatchNorm UNet for 8x8 image-to-image tasks: (N, C, 8, 8) -> (N, C_out, 8, 8).

    Encoder (3x3 convs, padding 1, no bias; each followed by BatchNorm2d and ReLU)::

        enc1: conv(in -> w)                8x8
        enc2: conv(w -> 2w, stride 2)      4x4
        enc3: conv(2w -> 2w, stride 2)     2x2   (bottleneck)

    Decoder (ConvTranspose2d(k=2, stride=2) upsampling, skip connections by concatenation;
    every conv / transposed conv followed by BatchNorm2d and ReLU)::

        up2:  convT(2w -> w)               4x4, concat enc2 -> 3w, dec2: conv(3w -> w)
        up1:  convT(w -> w)                8x8, concat enc1 -> 2w, dec1: conv(2w -> w)
        out:  conv 1x1 (w -> out), with bias, no norm, no activation

    ``width=16`` gives 28,865 parameters and 7 BatchNorm2d layers.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn_enc1 = nn.BatchNorm2d(w)
        self.enc2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bn_enc2 = nn.BatchNorm2d(2 * w)
        self.enc3 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bn_enc3 = nn.BatchNorm2d(2 * w)
        self.up2 = nn.ConvTranspose2d(2 * w, w, 2, stride=2, bias=False)
        self.bn_up2 = nn.BatchNorm2d(w)
        self.dec2 = nn.Conv2d(3 * w, w, 3, padding=1, bias=False)
        self.bn_dec2 = nn.BatchNorm2d(w)
        self.up1 = nn.ConvTranspose2d(w, w, 2, stride=2, bias=False)
        self.bn_up1 = nn.BatchNorm2d(w)
        self.dec1 = nn.Conv2d(2 * w, w, 3, padding=1, bias=False)
        self.bn_dec1 = nn.BatchNorm2d(w)
        self.out = nn.Conv2d(w, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = nn.functional.relu(self.bn_enc1(self.enc1(x)))
        e2 = nn.functional.relu(self.bn_enc2(self.enc2(e1)))
        e3 = nn.functional.relu(self.bn_enc3(self.enc3(e2)))
        d2 = nn.functional.relu(self.bn_up2(self.up2(e3)))
        d2 = nn.functional.relu(self.bn_dec2(self.dec2(cat([d2, e2], dim=1))))
        d1 = nn.functional.relu(self.bn_up1(self.up1(d2)))
        d1 = nn.functional.relu(self.bn_dec1(self.dec1(cat([d1, e1], dim=1))))
        return self.out(d1)

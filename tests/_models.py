"""Tiny models trained in seconds on real data (sklearn's digits), for tests of known truth."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn


class SmallCNN(nn.Module):
    """Pools globally before the classifier: the batch-size-1 effect shows clearly."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(
                2 * width, 2 * width, 3, padding=1
            ),  # no norm: pooled features vary per sample
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 8x8 digits scaled to [0, 1], a fixed 1400/397 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def train(
    model: nn.Module,
    batch_size: int,
    epochs: int = 1,
    lr: float = 0.05,
    seed: int = 0,
    order: str = "shuffle",
    samples: int | None = None,
    momentum: float = 0.9,
) -> nn.Module:
    """SGD with momentum; ``order="class-sorted"`` gives one-class batches (non-i.i.d.)."""
    torch.manual_seed(seed)
    x, y, _, _ = digits()
    x, y = x[:samples], y[:samples]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        if order == "class-sorted":
            batches = [
                idx for c in range(10) for idx in torch.nonzero(y == c).flatten().split(batch_size)
            ]
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen)]
        else:
            batches = list(torch.randperm(len(x), generator=gen).split(batch_size))
        for idx in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

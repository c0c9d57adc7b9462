"""Helpers for a project's own test suite: keep eval-mode parity as a regression test.

Example (pytest)::

    from normdoctor.testing import assert_no_drift

    def test_model_has_eval_parity():
        model = build_model().eval()
        assert_no_drift(model, validation_batch, batch_size=32)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .report import ScanReport

__all__ = ["StaleStack", "assert_no_drift", "stale_stack"]


def assert_no_drift(
    model: nn.Module, data: Any, *, width: int = 100, **scan_kwargs: Any
) -> ScanReport:
    """Scan ``model`` on ``data`` and fail with the layer table when any layer is flagged.

    Args:
        model: the model under test (left unchanged).
        data: anything :func:`normdoctor.scan` accepts.
        width: console width of the table in the failure message.
        **scan_kwargs: passed to :func:`normdoctor.scan` (``batch_size``, ``group_by``, ...).

    Returns:
        The report, for further assertions.

    Raises:
        AssertionError: the message is the verdict and the layer table, without colour.
    """
    from rich.console import Console

    from .render.console import print_scan
    from .scan import scan

    report = scan(model, data, **scan_kwargs)
    if report.flagged:
        # A terminal console without colour: the table is laid out at ``width`` columns.
        console = Console(width=width, color_system=None, force_terminal=True)
        with console.capture() as capture:
            print_scan(report, console)
        raise AssertionError(f"normalization drift: {report.verdict}\n{capture.get()}")
    return report


class StaleStack(nn.Sequential):
    """``depth`` blocks of Conv2d(3x3)-BatchNorm2d-ReLU on ``channels`` channels, global average
    pooling and a linear classifier: the architecture of :func:`stale_stack` (usable as
    ``--arch normdoctor.testing:StaleStack``).

    The blocks sit under ``stem`` (dots nest modules): the norm layers are named
    ``f"{stem}.{3 * i + 1}"``, so a long ``stem`` gives long names, as exported graphs have.
    """

    def __init__(
        self, depth: int = 150, channels: int = 4, classes: int = 4, stem: str = "blocks"
    ) -> None:
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks += [
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
        body: nn.Module = nn.Sequential(*blocks)
        parts = stem.split(".")
        for part in reversed(parts[1:]):
            body = nn.Sequential(OrderedDict([(part, body)]))
        super().__init__(
            OrderedDict(
                [
                    (parts[0], body),
                    ("pool", nn.AdaptiveAvgPool2d(1)),
                    ("flatten", nn.Flatten()),
                    ("head", nn.Linear(channels, classes)),
                ]
            )
        )


def stale_stack(
    depth: int = 150,
    *,
    fresh: int = 2,
    channels: int = 4,
    samples: int = 128,
    size: int = 6,
    classes: int = 4,
    stem: str = "blocks",
    seed: int = 0,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A deep model whose running statistics are stale, with data that shows it: for testing how
    big models are reported.

    A :class:`StaleStack` whose convolutions are close to the identity (so that the stack stays
    well conditioned).  The running statistics are the exact statistics of the returned inputs,
    except in every layer after the first ``fresh`` ones, where the mean is off by about 0.3
    standard deviations and the variance by a factor of about exp(±0.3).  The labels are what
    the model predicts with the exact statistics: the train path (batch statistics, batches of
    32) gets most of them right, eval mode few, so a scan finds eval mode harmful and recommends
    recalibrating the stale layers.

    Returns:
        ``(model, inputs, labels)``: the model in eval mode, inputs
        ``(samples, channels, size, size)``, integer labels ``(samples,)``.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    model = StaleStack(depth, channels, classes, stem)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                weight = 0.1 * randn(channels, channels, 3, 3)
                weight[:, :, 1, 1] += torch.eye(channels)
                m.weight.copy_(weight)
        head = model.get_submodule("head")
        assert isinstance(head, nn.Linear)
        head.weight.copy_(randn(classes, channels))
        head.bias.zero_()
        inputs = randn(samples, channels, size, size)
        for m in norms:
            m.momentum = None  # one batch: exactly these inputs' statistics
        model.train()(inputs)
        labels = model.eval()(inputs).argmax(1)
        for m in norms[fresh:]:
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean += 0.3 * m.running_var.sqrt() * randn(channels)
            m.running_var *= torch.exp(0.3 * randn(channels))
    for m in norms:
        m.momentum = 0.1
    return model.eval(), inputs, labels

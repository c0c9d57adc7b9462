"""Helpers for a project's own test suite: keep eval-mode parity as a regression test.

Example (pytest)::

    from normdoctor.testing import assert_no_drift

    def test_model_has_eval_parity():
        model = build_model().eval()
        assert_no_drift(model, validation_batch, batch_size=32)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .report import ScanReport

__all__ = ["assert_no_drift"]


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
        console = Console(width=width, color_system=None, force_terminal=False)
        with console.capture() as capture:
            print_scan(report, console)
        raise AssertionError(f"normalization drift: {report.verdict}\n{capture.get()}")
    return report

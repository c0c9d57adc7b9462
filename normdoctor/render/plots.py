"""matplotlib figures of a :class:`~normdoctor.report.ScanReport`: the pictures people send around.

Every function returns a new :class:`matplotlib.figure.Figure` on an Agg canvas (no pyplot, no
global state; save it with ``fig.savefig(path)``).  Titles say what to conclude.  A figure that
would be empty is not drawn: the function raises :class:`NothingToPlot` with the reason, which
the HTML page prints instead.  :func:`caption` gives a one-sentence caption for each figure.

Large models stay readable: the drift overview switches from named bars to numbered bars (the
``#`` of the report's table) with the worst layers listed beside, and the other figures show the
worst ``k`` layers only, the rest as grey context.

Each figure is two steps: a pure function computes what it shows as a frozen dataclass
(:mod:`normdoctor.render.specs`, :mod:`normdoctor.render.trends`: ``drift_spec(report)`` and
so on, testable without drawing), and a drawing function turns that into the ``Figure``
(:mod:`normdoctor.render.draw`, :mod:`normdoctor.render.draw_trends`).  This module is the
public entry: one function per figure, both steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..report import ScanReport
from . import draw, draw_trends
from .draw import caption, headline
from .end_to_end import end_to_end_spec
from .specs import (
    MAX_NAMED_BARS,
    MAX_POINTS,
    NothingToPlot,
    batches_spec,
    channels_spec,
    decomposition_gap,
    drift_spec,
    measured_layers,
    percent_up,
)
from .trends import MAX_SERIES_TICKS, series_spec, sweep_batch_size, sweep_spec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MAX_NAMED_BARS",
    "MAX_POINTS",
    "MAX_SERIES_TICKS",
    "NothingToPlot",
    "batch_distribution_figure",
    "caption",
    "channels_figure",
    "decomposition_gap",
    "drift_figure",
    "end_to_end_figure",
    "headline",
    "measured_layers",
    "percent_up",
    "plot",
    "series_figure",
    "sweep_batch_size",
    "sweep_figure",
]


def plot(report: ScanReport, kind: str = "drift", **kwargs: Any) -> Figure:
    """One figure of one report: ``kind`` is "drift", "channels", "batches" or "end_to_end".

    ``kwargs`` go to the figure's function (:func:`drift_figure`, :func:`channels_figure`,
    :func:`batch_distribution_figure`, :func:`end_to_end_figure`).
    """
    by_kind: dict[str, Callable[..., Figure]] = {
        "drift": drift_figure,
        "channels": channels_figure,
        "batches": batch_distribution_figure,
        "end_to_end": end_to_end_figure,
    }
    if kind not in by_kind:
        raise ValueError(f"kind must be one of {sorted(by_kind)}, got {kind!r}")
    return by_kind[kind](report, **kwargs)


def drift_figure(
    report: ScanReport,
    *,
    max_named: int = MAX_NAMED_BARS,
    list_worst: int = 10,
    axis_top: float | None = None,
) -> Figure:
    """Drift score per batch-dependent layer in forward order, split into shift and noise shares.

    Each bar is as long as the layer's drift score.  Its two colours divide that length in
    proportion to shift² and noise² (population shift: what recalibration removes; batch noise:
    what no running estimate removes).  shift² + noise² approximates drift² but does not equal it
    (the variance terms do not decompose), so the split shows proportions, not exact parts.
    Flagged layers are hatched and marked with a triangle, harmless drifters dotted and marked
    ○; the dashed line is the threshold.

    Args:
        report: the scan.
        max_named: up to this many layers, horizontal bars named on the axis; above it, vertical
            bars numbered by ``#`` (position in ``report.layers``) with the worst layers listed.
        list_worst: how many of the worst layers the numbered view lists by name.
        axis_top: draw the value axis to at least this drift (two figures compared side by
            side, before and after a patch, share one scale).

    Raises:
        NothingToPlot: no batch-dependent layer was measured.
    """
    spec = drift_spec(report, max_named=max_named, list_worst=list_worst, axis_top=axis_top)
    return draw.drift(spec)


def channels_figure(report: ScanReport, k: int = 4) -> Figure:
    """Per channel, running statistics against the observed population ones, for the worst layers.

    Left: running mean (what eval mode uses) against the exact mean of the layer input over all
    scanned samples; right: the same for the variance, on log scales.  Points on the dashed
    identity line mean the running statistics are right for this data; points off it are a
    population shift that recalibration removes.  Observed variances are biased (as BatchNorm
    normalizes), running ones unbiased; the factor n/(n−1) is invisible at these scales.
    Channels with γ ≈ 0 are drawn hollow (they do not affect the output).

    Raises:
        NothingToPlot: no measured layer carries per-channel running statistics.
    """
    return draw.channels(channels_spec(report, k))


def batch_distribution_figure(report: ScanReport, k: int = 6) -> Figure:
    """How the per-batch mismatch D_b spreads over the scanned batches, for the worst layers.

    Per layer: one point per batch (at most ``MAX_POINTS`` drawn, all counted), a thick bar from
    the 25th to the 75th percentile, a thin line from the 5th to the 95th, the median as a tick
    and the drift score (the RMS over batches) as a diamond.

    Raises:
        NothingToPlot: nothing measured, or every layer saw a single batch.
    """
    return draw.batches(batches_spec(report, k))


def end_to_end_figure(report: ScanReport, patched: ScanReport | None = None) -> Figure:
    """What the drift does to the model's outputs: train path (batch statistics) against eval path.

    Panels, as measured: accuracy of each path (labels given), the fraction of equal predictions
    (classifiers), the relative RMS difference of the outputs; each before and, given the scan
    of a patched model, after the patch.

    Raises:
        NothingToPlot: no end-to-end comparison was measured.
    """
    return draw.end_to_end(end_to_end_spec(report, patched))


def sweep_figure(
    reports_by_batch_size: Mapping[int, ScanReport] | Iterable[ScanReport],
    train_batch_size: int | None = None,
    *,
    k: int = 6,
) -> Figure:
    """Drift against batch size per layer (from :func:`~normdoctor.scan.sweep_batch_sizes`).

    The ``k`` layers with the highest drift anywhere in the sweep are drawn in colour with
    distinct markers; every other layer is a thin grey line.  When eval-mode agreement (or the
    output divergence) was measured, a second panel shows it against the batch size.

    Args:
        reports_by_batch_size: ``{batch_size: report}``, or reports in any order (their
            composition gives the batch size).
        train_batch_size: the batch size training used, marked by a vertical line.
        k: layers singled out.

    Raises:
        NothingToPlot: fewer than two batch sizes, or no batch-dependent layer measured.
        ValueError: two reports share a batch size.
    """
    return draw_trends.sweep(sweep_spec(reports_by_batch_size, train_batch_size, k=k))


def series_figure(reports: Sequence[ScanReport], *, k: int = 6) -> Figure:
    """Drift per layer over a series of checkpoints of one model, in the order given.

    One line per batch-dependent layer (the ``k`` with the highest drift anywhere in the series
    in colour with distinct markers, every other layer a thin grey line), against the position in
    the series; the axis is labelled with each report's ``model`` (the checkpoint's file name).
    A black triangle above a point marks a layer flagged in that checkpoint, a hollow circle one
    that drifts harmlessly; the dashed line is the threshold and a dotted vertical line the first
    flagged checkpoint.  When the end-to-end comparison was measured, a lower panel shows the
    prediction agreement of the two paths per checkpoint, and the accuracy of both paths when
    labels were given (the output divergence for models that are not classifiers).

    Args:
        reports: one scan per checkpoint, in training order (as ``normdoctor scan a.pt b.pt``
            gives them).
        k: layers singled out.

    Raises:
        NothingToPlot: fewer than two checkpoints, or no batch-dependent layer measured in any.
    """
    return draw_trends.series(series_spec(reports, k=k))

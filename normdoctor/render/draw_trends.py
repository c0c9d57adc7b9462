"""Drawing the figures over several reports (:mod:`normdoctor.render.trends`): sweep, series."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..report import LayerStatus
from . import style as S
from .draw import conclude, threshold_handle
from .trends import Curves, Lower, SeriesSpec, SweepSpec

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["series", "sweep"]

#: How far above a point its flag marker sits (points): the marker points down at the value.
FLAG_OFFSET_PT = 7.0


def _layer_lines(
    ax: Axes, xs: Sequence[float], curves: Curves, pairs: Sequence[tuple[str, str]]
) -> list[Any]:
    """Drift curves: the chosen layers in colour, the rest thin and grey, and their median once
    there are more layers than colours (the grey lines merge); returns the legend handles."""
    from matplotlib.lines import Line2D

    others = curves.others
    for n in others:
        ax.plot(xs, curves.of(n), color=S.OTHER_COLOR, linewidth=0.7, alpha=0.8, zorder=1)
    handles: list[Any] = []
    for j, n in enumerate(curves.chosen):
        color, marker = pairs[j % len(pairs)]
        (line,) = ax.plot(
            xs,
            curves.of(n),
            color=color,
            marker=marker,
            markersize=5,
            linewidth=1.5,
            zorder=3,
            label=S.esc(S.shorten(S.named(n), 30)),
        )
        handles.append(line)
    if others:
        handles.append(
            Line2D([], [], color=S.OTHER_COLOR, linewidth=0.7, label=f"{len(others)} other layers")
        )
    if curves.median is not None:
        (mline,) = ax.plot(
            xs,
            curves.median,
            color=S.EDGE_COLOR,
            linestyle="-.",
            linewidth=2,
            zorder=2,
            label=f"median of all {len(curves.curves)} layers",
        )
        handles.append(mline)
    return handles


def _two_panels(fig: Figure, lower: Lower | None) -> tuple[Axes, Axes | None]:
    if lower is None:
        return fig.add_subplot(), None
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
    return ax, ax2


def _lower_limits(ax2: Axes, lower: Lower) -> None:
    bottom, top = lower.ylim
    if top is None:
        ax2.set_ylim(bottom=bottom)
    else:
        ax2.set_ylim(bottom, top)


# -- 3. batch-size sweep ---------------------------------------------------------------------

#: The sweep's lower-panel lines, by the EndToEnd field they show.
_SWEEP_LINES: dict[str, dict[str, Any]] = {
    "acc_train": {
        "color": S.TRAIN_COLOR,
        "marker": "o",
        "linewidth": 1.8,
        "label": "accuracy with batch statistics (train path)",
    },
    "acc_eval": {
        "color": S.EVAL_COLOR,
        "marker": "s",
        "linestyle": "--",
        "linewidth": 1.5,
        "label": "accuracy in eval mode (running statistics)",
    },
    "agreement": {"color": S.EDGE_COLOR, "marker": "s", "linewidth": 1.5},
    "rel_divergence": {"color": S.EDGE_COLOR, "marker": "s", "linewidth": 1.5},
}


def _sweep_lower(ax2: Axes, spec: SweepSpec, lower: Lower) -> list[Any]:
    S.style_axes(ax2, grid="y")
    handles: list[Any] = []
    for curve in lower.lines:
        (line,) = ax2.plot(spec.sizes, curve.values, **_SWEEP_LINES[curve.name])
        if lower.kind == "acc":
            handles.append(line)
    if lower.threshold is not None:
        ax2.axhline(lower.threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
    ax2.set_ylabel(lower.ylabel, fontsize=S.LABEL_SIZE)
    _lower_limits(ax2, lower)
    return handles


def sweep(spec: SweepSpec) -> Figure:
    """Draw drift against batch size, and what eval mode does at each batch size below."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    fig = S.new_figure(8.0, 6.6) if spec.lower is not None else S.new_figure(8.0, 4.8)
    ax, ax2 = _two_panels(fig, spec.lower)
    handles = _layer_lines(ax, spec.sizes, spec.curves, S.SERIES)
    ax.axhline(spec.threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
    handles.append(threshold_handle(spec.threshold))
    ax.set_ylabel(S.DRIFT_LABEL, fontsize=S.LABEL_SIZE)
    ax.set_ylim(bottom=0)
    S.style_axes(ax, grid="y")

    last = ax2 if ax2 is not None else ax
    train = spec.train_batch_size
    for a in (ax, ax2):
        if a is None:
            continue
        a.set_xscale("log", base=2)
        a.xaxis.set_minor_locator(NullLocator())
        if train is not None:
            a.axvline(train, color=S.OKABE_ITO["green"], linestyle=":", linewidth=2)
    last.set_xticks(spec.ticks, labels=[str(t) for t in spec.ticks])
    last.set_xlabel(spec.xlabel, fontsize=S.LABEL_SIZE)
    if train is not None:
        handles.append(
            Line2D(
                [],
                [],
                color=S.OKABE_ITO["green"],
                linestyle=":",
                linewidth=2,
                label=f"training batch size {train}",
            )
        )
    if ax2 is not None and spec.lower is not None:
        handles += _sweep_lower(ax2, spec, spec.lower)
    S.legend_below(fig, handles, ncols=3)
    conclude(fig, spec.title, spec.caption)
    return fig


# -- 3b. checkpoint series -------------------------------------------------------------------

#: The series' lower-panel lines, by the EndToEnd field they show.
_SERIES_LINES: dict[str, dict[str, Any]] = {
    "acc_train": {
        "color": S.TRAIN_COLOR,
        "marker": "o",
        "markersize": 4.5,
        "linewidth": 1.8,
        "zorder": 3,
        "label": "accuracy with batch statistics (train path)",
    },
    "acc_eval": {
        "color": S.EVAL_COLOR,
        "marker": "s",
        "markersize": 4.5,
        "linestyle": "--",
        "linewidth": 1.5,
        "zorder": 3,
        "label": "accuracy in eval mode (running statistics)",
    },
    "agreement": {
        "color": S.EDGE_COLOR,
        "marker": "D",
        "markersize": 4,
        "linewidth": 1.5,
        "zorder": 2,  # under eval-mode accuracy, which often runs alongside it
        "label": "predictions equal in both paths",
    },
    "rel_divergence": {
        "color": S.EDGE_COLOR,
        "marker": "D",
        "markersize": 4,
        "linewidth": 1.5,
        "label": "output divergence RMS(y_train − y_eval) / RMS(y_train)",
    },
}


def _series_marks(ax: Axes, fig: Figure, spec: SeriesSpec) -> list[Any]:
    """Status marks just above their points (offset in points, data offsets exact)."""
    from matplotlib.lines import Line2D
    from matplotlib.transforms import ScaledTranslation

    lift = ax.transData + ScaledTranslation(0, FLAG_OFFSET_PT / 72, fig.dpi_scale_trans)
    handles: list[Any] = []
    for status, marker, fill, size, label in (
        (
            LayerStatus.FLAGGED,
            S.FLAG_MARKER,
            S.EDGE_COLOR,
            30,
            "flagged in that checkpoint (drifts and eval mode harms outputs)",
        ),
        (
            LayerStatus.HARMLESS,
            S.HARMLESS_MARKER,
            "none",
            22,
            "drifts, harmless on that checkpoint's data",
        ),
    ):
        if not spec.marks[status]:
            continue
        px, py = zip(*spec.marks[status], strict=True)
        ax.scatter(
            px,
            py,
            marker=marker,
            s=size,
            facecolors=fill,
            edgecolors=S.EDGE_COLOR,
            linewidths=0.8,
            zorder=4,
            transform=lift,
            label=f"_{status.value}",  # found by tests; left out of the axes' own legend
        )
        handles.append(
            Line2D(
                [],
                [],
                marker=marker,
                linestyle="",
                markerfacecolor=fill,
                markeredgecolor=S.EDGE_COLOR,
                markersize=6,
                label=label,
            )
        )
    return handles


def _series_upper(ax: Axes, fig: Figure, spec: SeriesSpec) -> list[Any]:
    """Drift per layer over the checkpoints, status marks, the threshold(s)."""
    xs = list(range(spec.n))
    # The flag marker is a downward triangle: no series may use it as its own marker.
    pairs = [p for p in S.SERIES if p[1] != S.FLAG_MARKER]
    handles = _layer_lines(ax, xs, spec.curves, pairs)
    handles += _series_marks(ax, fig, spec)
    if len(set(spec.thresholds)) == 1:
        ax.axhline(spec.thresholds[0], color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
    else:  # scanned with different thresholds: each checkpoint's own
        ax.plot(
            xs,
            spec.thresholds,
            color=S.THRESHOLD_COLOR,
            linestyle="--",
            linewidth=1,
            drawstyle="steps-mid",
        )
    top = spec.drift_top
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_ylabel(spec.ylabel, fontsize=S.LABEL_SIZE)
    S.style_axes(ax, grid="y")
    return handles


def _series_lower(ax2: Axes, spec: SeriesSpec, lower: Lower) -> list[Any]:
    """What the drift does to the outputs, per checkpoint."""
    S.style_axes(ax2, grid="y")
    xs = list(range(spec.n))
    handles: list[Any] = []
    for curve in lower.lines:
        (line,) = ax2.plot(xs, curve.values, **_SERIES_LINES[curve.name])
        handles.append(line)
    if lower.threshold is not None:
        ax2.axhline(lower.threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
    _lower_limits(ax2, lower)
    ax2.set_ylabel(lower.ylabel, fontsize=S.LABEL_SIZE)
    return handles


def _series_axis(last: Axes, spec: SeriesSpec) -> None:
    last.set_xticks(spec.ticks, labels=list(spec.tick_labels))
    last.set_xlim(-0.4, spec.n - 0.6)
    if spec.rotate:
        for t in last.get_xticklabels():
            t.set_rotation(35)
            t.set_horizontalalignment("right")
            t.set_rotation_mode("anchor")
    for t, bold in zip(last.get_xticklabels(), spec.bold, strict=True):
        if bold:
            t.set_fontweight("bold")
    last.set_xlabel(spec.xlabel, fontsize=S.LABEL_SIZE)


def series(spec: SeriesSpec) -> Figure:
    """Draw drift per layer over the checkpoints, and what eval mode does below."""
    from matplotlib.lines import Line2D

    base = 6.8 if spec.lower is not None else 5.0
    fig = S.new_figure(8.0, base + spec.extra_height)
    ax, ax2 = _two_panels(fig, spec.lower)
    handles = _series_upper(ax, fig, spec)
    if ax2 is not None and spec.lower is not None:
        handles += _series_lower(ax2, spec, spec.lower)
    handles.append(
        Line2D(
            [], [], color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1, label=spec.threshold_label
        )
    )
    if spec.first is not None:
        for a in (ax, ax2):
            if a is not None:
                a.axvline(spec.first, color=S.EDGE_COLOR, linestyle=":", linewidth=1.4, zorder=0)
        handles.append(
            Line2D([], [], color=S.EDGE_COLOR, linestyle=":", linewidth=1.4, label=spec.first_label)
        )
    _series_axis(ax2 if ax2 is not None else ax, spec)
    S.legend_below(fig, handles, ncols=2)
    conclude(fig, spec.title, spec.caption)
    return fig

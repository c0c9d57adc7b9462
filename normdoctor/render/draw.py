"""Drawing: a figure spec (:mod:`normdoctor.render.specs`) to a matplotlib ``Figure``.

Every function returns a new ``Figure`` on an Agg canvas (no pyplot, no global state) and
records the spec's title and caption for :func:`headline` and :func:`caption`.  Colours, sizes
and layout are decided here, what to show is decided by the spec.  matplotlib is imported
inside the functions only.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..report import LayerStatus
from . import style as S
from .end_to_end import EndToEndSpec
from .specs import BatchesSpec, ChannelPanel, ChannelsSpec, DriftSpec

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .end_to_end import EndToEndPanel

__all__ = [
    "batches",
    "caption",
    "channels",
    "conclude",
    "drift",
    "end_to_end",
    "headline",
    "status_handles",
    "threshold_handle",
]

_CAPTIONS: weakref.WeakKeyDictionary[Figure, str] = weakref.WeakKeyDictionary()
_HEADLINES: weakref.WeakKeyDictionary[Figure, str] = weakref.WeakKeyDictionary()


def caption(fig: Figure) -> str:
    """The one-sentence caption written for ``fig`` by the function that drew it ("" if none)."""
    return _CAPTIONS.get(fig, "")


def headline(fig: Figure) -> str:
    """The conclusion ``fig`` states in its title, unwrapped ("" if none): alt text, summaries."""
    return _HEADLINES.get(fig, "")


def conclude(fig: Figure, title: str, text: str) -> None:
    """Put the conclusion ``title`` on ``fig`` and remember it and the caption ``text``."""
    _HEADLINES[fig] = title
    S.title(fig, title)
    _CAPTIONS[fig] = text
    S.clipped_out_of_layout(fig)


def status_handles(statuses: set[LayerStatus], flag_marker: str) -> list[Any]:
    """Legend entries (hatched patch and marker) for the flagged and harmless layers shown."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []
    for status, hatch, marker, fill, label in (
        (
            LayerStatus.FLAGGED,
            S.FLAG_HATCH,
            flag_marker,
            S.EDGE_COLOR,
            "flagged: drifts and eval mode harms outputs",
        ),
        (
            LayerStatus.HARMLESS,
            S.HARMLESS_HATCH,
            S.HARMLESS_MARKER,
            "none",
            "drifts, harmless on this data",
        ),
    ):
        if status in statuses:
            patch = Patch(facecolor="white", edgecolor=S.EDGE_COLOR, hatch=hatch)
            mark = Line2D(
                [],
                [],
                marker=marker,
                linestyle="",
                markerfacecolor=fill,
                markeredgecolor=S.EDGE_COLOR,
                markersize=6,
            )
            handles.append((label, (patch, mark)))
    return handles


def threshold_handle(threshold: float) -> Any:
    from matplotlib.lines import Line2D

    return Line2D(
        [],
        [],
        color=S.THRESHOLD_COLOR,
        linestyle="--",
        linewidth=1,
        label=f"threshold {threshold:g}",
    )


# -- 1. drift per layer ----------------------------------------------------------------------


#: A scatter of more points than this is rasterized in vector files.
RASTER_POINTS = 1000
#: The labels of the drift bars' collections, per part of a bar.
DRIFT_PARTS = ("shift share", "noise share", "no split")


def _hatch(status: LayerStatus) -> str:
    if status is LayerStatus.FLAGGED:
        return S.FLAG_HATCH
    return S.HARMLESS_HATCH if status is LayerStatus.HARMLESS else ""


def _drift_bars(ax: Axes, spec: DriftSpec, pos: list[int]) -> None:
    """The three stacked parts of every bar (shift share, noise share, unsplit rest), hatched
    by status.

    One collection per part and hatch instead of one patch per bar and part: a 150-layer
    overview is 450 bars, and matplotlib costs about as much per patch as per collection
    (the same rectangles, one draw call).  Each collection is labelled with its part.
    """
    from matplotlib.collections import PolyCollection

    linewidth = 0.4 if spec.named else 0.0
    half = 0.35 if spec.named else (0.85 if len(spec.bars) < 400 else 1.0) / 2
    groups: dict[tuple[int, str], list[list[tuple[float, float]]]] = {}
    for p, b in zip(pos, spec.bars, strict=True):
        start, hatch = 0.0, _hatch(b.status)
        for part, length in enumerate((b.shift_part, b.noise_part, b.rest_part)):
            end = start + length
            lo, hi = p - half, p + half
            if spec.named:  # horizontal: length along x
                box = [(start, lo), (start, hi), (end, hi), (end, lo)]
            else:
                box = [(lo, start), (lo, end), (hi, end), (hi, start)]
            groups.setdefault((part, hatch), []).append(box)
            start = end
    colors = (S.SHIFT_COLOR, S.NOISE_COLOR, S.UNSPLIT_COLOR)
    for (part, hatch), boxes in sorted(groups.items()):
        ax.add_collection(
            PolyCollection(
                boxes,
                facecolors=colors[part],
                edgecolors=S.EDGE_COLOR,
                linewidths=linewidth,
                hatch=hatch or None,
                label=DRIFT_PARTS[part],
            ),
            autolim=True,
        )
    ax.autoscale_view()


def _drift_marks(ax: Axes, spec: DriftSpec, pos: list[int], pad: float) -> None:
    """Hatching, and markers beyond the bar ends: flags survive where bars are too thin."""
    _drift_bars(ax, spec, pos)
    for status, marker, fill in (
        (LayerStatus.FLAGGED, S.FLAG_MARKER, S.EDGE_COLOR),
        (LayerStatus.HARMLESS, S.HARMLESS_MARKER, "none"),
    ):
        sel = [
            (p, b.drift + pad) for p, b in zip(pos, spec.bars, strict=True) if b.status is status
        ]
        if sel:
            xs, ys = zip(*sel, strict=True)
            if spec.named:
                xs, ys = ys, xs
            ax.scatter(
                xs,
                ys,
                marker="<" if (spec.named and marker == S.FLAG_MARKER) else marker,
                s=22,
                facecolors=fill,
                edgecolors=S.EDGE_COLOR,
                linewidths=0.8,
                zorder=3,
            )


def _drift_named_axes(ax: Axes, spec: DriftSpec, pos: list[int]) -> None:
    ax.axvline(spec.threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
    ax.set_yticks(pos, labels=[S.esc(S.shorten(b.name)) for b in spec.bars])
    for tick, b in zip(ax.get_yticklabels(), spec.bars, strict=True):
        if b.status is LayerStatus.FLAGGED:
            tick.set_fontweight("bold")
    ax.invert_yaxis()  # forward order reads top to bottom
    ax.set_xlim(0, spec.top * 1.12)
    ax.set_xlabel(spec.value_label, fontsize=S.LABEL_SIZE)
    ax.set_ylabel(spec.layer_label, fontsize=S.LABEL_SIZE)
    S.style_axes(ax, grid="x")


def _drift_numbered_axes(ax: Axes, side: Axes, spec: DriftSpec, pad: float) -> None:
    ax.axhline(spec.threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
    ax.set_ylim(0, spec.top * 1.12)
    ax.set_xlim(0, spec.n_layers + 1)
    ax.set_ylabel(spec.value_label, fontsize=S.LABEL_SIZE)
    ax.set_xlabel(spec.layer_label, fontsize=S.LABEL_SIZE)
    S.style_axes(ax, grid="y")
    for b in spec.worst:
        ax.annotate(
            f"#{b.index}",
            (b.index, b.drift + 2 * pad),
            ha="center",
            va="bottom",
            fontsize=S.SMALL_SIZE - 1,
        )
    side.axis("off")
    side.text(
        0.0,
        1.0,
        "\n".join(spec.worst_lines),
        transform=side.transAxes,
        va="top",
        ha="left",
        fontsize=S.SMALL_SIZE,
        family="monospace",
    )


def drift(spec: DriftSpec) -> Figure:
    """Draw the drift overview: named horizontal bars, or numbered vertical ones beside a list."""
    from matplotlib.patches import Patch

    if spec.named:
        fig = S.new_figure(8.0, max(3.0, 0.32 * len(spec.bars) + 2.2))
        ax = fig.add_subplot()
        pos = list(range(len(spec.bars)))
    else:
        fig = S.new_figure(10.0, 5.2)
        grid = fig.add_gridspec(1, 2, width_ratios=(3.2, 1))
        ax = fig.add_subplot(grid[0, 0])
        side = fig.add_subplot(grid[0, 1])
        pos = [b.index for b in spec.bars]
    pad = 0.03 * spec.top
    _drift_marks(ax, spec, pos, pad)
    if spec.named:
        _drift_named_axes(ax, spec, pos)
    else:
        _drift_numbered_axes(ax, side, spec, pad)
    handles: list[Any] = [
        Patch(facecolor=S.SHIFT_COLOR, label="population shift share (recalibration removes it)"),
        Patch(facecolor=S.NOISE_COLOR, label="batch noise share (no running estimate removes it)"),
    ]
    if any(b.rest_part for b in spec.bars):
        handles.append(Patch(facecolor=S.UNSPLIT_COLOR, label="shift/noise not measured"))
    handles += status_handles(set(spec.statuses), "<" if spec.named else S.FLAG_MARKER)
    handles.append(threshold_handle(spec.threshold))
    S.legend_below(fig, handles)
    conclude(fig, spec.title, spec.caption)
    return fig


# -- 2. per-channel statistics ---------------------------------------------------------------


def _identity(ax: Axes, lo: float, hi: float) -> None:
    ax.plot([lo, hi], [lo, hi], color=S.THRESHOLD_COLOR, linestyle="--", linewidth=0.9, zorder=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)


def _channel_panel(ax: Axes, panel: ChannelPanel) -> None:
    if panel.log:
        S.log_axis(ax, "x")
        S.log_axis(ax, "y")
    S.style_axes(ax, grid="both")
    if panel.limits is None:
        ax.text(0.5, 0.5, f"no finite {panel.what}s", transform=ax.transAxes, ha="center")
        return
    _identity(ax, *panel.limits)
    (lx, ly), (dx, dy) = panel.live, panel.dead
    alpha = 0.85 if len(lx) < 200 else 0.55
    ax.scatter(
        list(lx),
        list(ly),
        s=14,
        color=S.SHIFT_COLOR,
        alpha=alpha,
        linewidths=0,
        zorder=2,
        # In the SVG, thousands of channels as one embedded image at the PNG's resolution
        # rather than an element each (axes, labels and lines stay vectors; PNGs unchanged).
        rasterized=len(lx) > RASTER_POINTS,
    )
    if dx:
        ax.scatter(list(dx), list(dy), s=16, facecolors="none", edgecolors=S.OTHER_COLOR, zorder=2)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(panel.xlabel, fontsize=S.LABEL_SIZE - 1)
    ax.set_ylabel(panel.ylabel, fontsize=S.LABEL_SIZE - 1)


def _channel_axes(fig: Figure, rows_n: int, height: float) -> Any:
    # Fixed margins instead of constrained layout: with 2k equal-aspect axes the layout engine
    # costs more than the drawing, and the geometry here is regular anyway (inches).
    top_in, bottom_in, gap_in = 0.95, 0.85, 0.9
    axes_h = (height - top_in - bottom_in - (rows_n - 1) * gap_in) / rows_n
    return fig.subplots(
        rows_n,
        2,
        squeeze=False,
        gridspec_kw={
            "left": 0.1,
            "right": 0.98,
            "top": 1 - top_in / height,
            "bottom": bottom_in / height,
            "hspace": gap_in / axes_h,
            "wspace": 0.32,
        },
    )


def channels(spec: ChannelsSpec) -> Figure:
    """Draw running against observed statistics: a mean and a variance panel per layer."""
    from matplotlib.lines import Line2D

    height = 2.9 * len(spec.rows) + 1.3
    fig = S.new_figure(8.0, height, constrained=False)
    axes = _channel_axes(fig, len(spec.rows), height)
    for row, (ax_m, ax_v) in zip(spec.rows, axes, strict=True):
        _channel_panel(ax_m, row.mean)
        _channel_panel(ax_v, row.var)
        ax_m.set_title(row.label, fontsize=S.LABEL_SIZE, loc="left")
    handles: list[Any] = [
        Line2D([], [], marker="o", linestyle="", color=S.SHIFT_COLOR, label="one channel"),
        Line2D(
            [], [], color=S.THRESHOLD_COLOR, linestyle="--", label="identity: running = observed"
        ),
    ]
    if spec.any_dead:
        handles.append(
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                markerfacecolor="none",
                color=S.OTHER_COLOR,
                label="γ ≈ 0 (no effect on output)",
            )
        )
    S.legend_below(fig, handles, ncols=len(handles), outside=False)
    conclude(fig, spec.title, spec.caption)
    return fig


# -- 4. per-batch distribution ---------------------------------------------------------------


def _batch_legend(threshold: float) -> list[Any]:
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], marker="o", linestyle="", color=S.SHIFT_COLOR, alpha=0.6, label="one batch"),
        Line2D([], [], color=S.EDGE_COLOR, linewidth=5, label="middle 50% of batches"),
        Line2D([], [], color=S.EDGE_COLOR, linewidth=1, label="5th–95th percentile"),
        Line2D(
            [],
            [],
            marker="D",
            linestyle="",
            color=S.NOISE_COLOR,
            markeredgecolor=S.EDGE_COLOR,
            label="drift score (RMS over batches)",
        ),
        threshold_handle(threshold),
    ]


def batches(spec: BatchesSpec) -> Figure:
    """Draw the per-batch mismatch: points, quantile bars, median and drift score per layer."""
    import numpy as np

    fig = S.new_figure(8.0, 0.62 * len(spec.rows) + 2.4)
    ax = fig.add_subplot()
    for y, row in enumerate(spec.rows):
        pts, jitter = np.asarray(row.points), np.asarray(row.jitter)
        ax.scatter(pts, y + jitter, s=8, color=S.SHIFT_COLOR, alpha=0.45, linewidths=0, zorder=2)
        q05, q25, q50, q75, q95 = row.quantiles
        ax.plot([q05, q95], [y, y], color=S.EDGE_COLOR, linewidth=1, zorder=3)
        ax.plot(
            [q25, q75], [y, y], color=S.EDGE_COLOR, linewidth=5, solid_capstyle="butt", zorder=3
        )
        ax.plot([q50], [y], marker="|", markersize=13, color="white", markeredgewidth=2, zorder=4)
        ax.plot(
            [row.drift],
            [y],
            marker="D",
            markersize=6,
            color=S.NOISE_COLOR,
            markeredgecolor=S.EDGE_COLOR,
            zorder=5,
        )
    ax.axvline(spec.threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
    ax.set_yticks(range(len(spec.rows)), labels=[row.label for row in spec.rows])
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.set_xlabel(spec.xlabel, fontsize=S.LABEL_SIZE)
    S.style_axes(ax, grid="x")
    S.legend_below(fig, _batch_legend(spec.threshold), ncols=3)
    conclude(fig, spec.title, spec.caption)
    return fig


# -- 5. end to end ---------------------------------------------------------------------------


def _missing(ax: Axes, x: float, why: str, y: float, rotate: bool) -> None:
    ax.text(
        x, y, why, ha="center", va="bottom", fontsize=S.SMALL_SIZE, rotation=90 if rotate else 0
    )


def _value(ax: Axes, x: float, v: float, text: str) -> None:
    ax.annotate(
        text,
        (x, v),
        xytext=(0, 2),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=S.SMALL_SIZE + 0.5,
        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85},
    )


#: Per panel kind: each bar's (offset, width, colour, hatch) within its scenario's group.
_E2E_BARS: dict[str, tuple[tuple[float, float, str, str], ...]] = {
    "acc": ((-0.38 / 2, 0.38, S.TRAIN_COLOR, ""), (0.38 / 2, 0.38, S.EVAL_COLOR, "\\\\")),
    "agree": ((0.0, 0.55, S.OKABE_ITO["green"], ""),),
    "div": ((0.0, 0.55, S.OKABE_ITO["purple"], ""),),
}


def _e2e_panel(ax: Axes, panel: EndToEndPanel, spec: EndToEndSpec) -> None:
    S.style_axes(ax, grid="y")
    xs = list(range(len(spec.labels)))
    for x, values, texts, why in zip(xs, panel.values, panel.texts, spec.missing, strict=True):
        if values is None:
            _missing(ax, x, why, panel.missing_y, len(xs) > 2)
            continue
        for (dx, w, color, hatch), v, text in zip(
            _E2E_BARS[panel.kind], values, texts, strict=True
        ):
            style: dict[str, Any] = {"hatch": hatch} if panel.kind == "acc" else {}
            ax.bar(x + dx, v, width=w, color=color, **style, edgecolor=S.EDGE_COLOR, linewidth=0.5)
            _value(ax, x + dx, v, text)
    if panel.threshold is not None:
        ax.axhline(panel.threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
    ax.set_ylim(0, panel.ylim)
    ax.set_ylabel(panel.ylabel, fontsize=S.LABEL_SIZE)
    ax.set_title(panel.title, fontsize=S.LABEL_SIZE)
    ax.set_xticks(xs, labels=list(spec.labels))
    ax.set_xlim(-0.6, len(xs) - 0.4)


def _e2e_handles(kinds: Sequence[str]) -> list[Any]:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = []
    if "acc" in kinds:
        handles += [
            Patch(
                facecolor=S.TRAIN_COLOR,
                edgecolor=S.EDGE_COLOR,
                label="train path: batch statistics",
            ),
            Patch(
                facecolor=S.EVAL_COLOR,
                edgecolor=S.EDGE_COLOR,
                hatch="\\\\",
                label="eval path: running statistics (inference)",
            ),
        ]
    handles.append(
        Line2D([], [], color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1, label="harm threshold")
    )
    return handles


def end_to_end(spec: EndToEndSpec) -> Figure:
    """Draw the train path against the eval path: one panel per comparison measured."""
    fig = S.new_figure(min(8.0, 1.2 + 2.3 * sum(spec.widths)), 4.4)
    axes = fig.subplots(1, len(spec.panels), squeeze=False, width_ratios=list(spec.widths))[0]
    for ax, panel in zip(axes, spec.panels, strict=True):
        _e2e_panel(ax, panel, spec)
    S.legend_below(fig, _e2e_handles([p.kind for p in spec.panels]), ncols=3)
    conclude(fig, spec.title, spec.caption)
    return fig

"""matplotlib figures of a :class:`~normdoctor.report.ScanReport`: the pictures people send around.

Every function returns a new :class:`matplotlib.figure.Figure` on an Agg canvas (no pyplot, no
global state; save it with ``fig.savefig(path)``).  Titles say what to conclude.  A figure that
would be empty is not drawn: the function raises :class:`NothingToPlot` with the reason, which
the HTML page prints instead.  :func:`caption` gives a one-sentence caption for each figure.

Large models stay readable: the drift overview switches from named bars to numbered bars (the
``#`` of the report's table) with the worst layers listed beside, and the other figures show the
worst ``k`` layers only, the rest as grey context.
"""

from __future__ import annotations

import math
import statistics
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..report import LayerReport, LayerStatus, ScanReport
from . import style as S

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "NothingToPlot",
    "batch_distribution_figure",
    "caption",
    "channels_figure",
    "decomposition_gap",
    "drift_figure",
    "end_to_end_figure",
    "headline",
    "measured_layers",
    "plot",
    "series_figure",
    "sweep_batch_size",
    "sweep_figure",
]

#: Up to this many layers, the drift overview names every bar; above, it numbers them.
MAX_NAMED_BARS = 40
#: Batches drawn as points per layer in the distribution figure (all of them enter the quantiles).
MAX_POINTS = 400

_CAPTIONS: weakref.WeakKeyDictionary[Figure, str] = weakref.WeakKeyDictionary()
_HEADLINES: weakref.WeakKeyDictionary[Figure, str] = weakref.WeakKeyDictionary()


class NothingToPlot(ValueError):
    """The figure would be empty; the message says why (shown on the page instead)."""


def plot(report: ScanReport, kind: str = "drift", **kwargs: Any) -> Figure:
    """One figure of one report: ``kind`` is "drift", "channels", "batches" or "end_to_end".

    ``kwargs`` go to the figure's function (:func:`drift_figure`, :func:`channels_figure`,
    :func:`batch_distribution_figure`, :func:`end_to_end_figure`).
    """
    draw: dict[str, Callable[..., Figure]] = {
        "drift": drift_figure,
        "channels": channels_figure,
        "batches": batch_distribution_figure,
        "end_to_end": end_to_end_figure,
    }
    if kind not in draw:
        raise ValueError(f"kind must be one of {sorted(draw)}, got {kind!r}")
    return draw[kind](report, **kwargs)


def caption(fig: Figure) -> str:
    """The one-sentence caption written for ``fig`` by the function that drew it ("" if none)."""
    return _CAPTIONS.get(fig, "")


def headline(fig: Figure) -> str:
    """The conclusion ``fig`` states in its title, unwrapped ("" if none): alt text, summaries."""
    return _HEADLINES.get(fig, "")


def _title(fig: Figure, text: str) -> None:
    _HEADLINES[fig] = text
    S.title(fig, text)


def measured_layers(report: ScanReport) -> list[tuple[int, LayerReport]]:
    """``(#, layer)`` for batch-dependent layers with a drift score, in forward order.

    ``#`` is the 1-based position in ``report.layers`` (execution order), the number the HTML
    table and the numbered drift overview share.
    """
    return [
        (i, layer)
        for i, layer in enumerate(report.layers, 1)
        if layer.batch_dependent and layer.drift is not None
    ]


def _why_nothing_measured(report: ScanReport) -> str:
    if not report.layers:
        return "the model has no normalization layers: nothing can drift"
    dependent = [layer for layer in report.layers if layer.batch_dependent]
    if not dependent:
        kinds = sorted({layer.kind for layer in report.layers})
        return (
            f"no batch-dependent normalization layer (only {', '.join(kinds)}): "
            "train and eval mode compute the same thing, so there is no drift to plot"
        )
    return "no batch-dependent layer was measured (no batch reached any of them)"


def _by_drift(rows: Iterable[tuple[int, LayerReport]], k: int) -> list[tuple[int, LayerReport]]:
    """The ``k`` worst layers, worst first (ties keep forward order)."""
    return sorted(rows, key=lambda r: -(r[1].drift or 0.0))[: max(k, 0)]


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _split(layer: LayerReport) -> tuple[float, float, float]:
    """Drift split into (shift part, noise part, unsplit part) in proportion to shift², noise².

    The parts always add up to the drift exactly; shift² + noise² itself only approximates
    drift² (the variance terms of the mismatch do not decompose), so this is a share, not a sum.
    """
    d = layer.drift or 0.0
    s, n = layer.shift, layer.noise
    if s is None or n is None or s * s + n * n <= 0.0:
        return 0.0, 0.0, d
    share = s * s / (s * s + n * n)
    return d * share, d - d * share, 0.0


def decomposition_gap(report: ScanReport) -> float | None:
    """Largest |shift² + noise² − drift²| / drift² over measured layers (None: nothing to compare)."""
    gaps = [
        abs(layer.shift**2 + layer.noise**2 - layer.drift**2) / layer.drift**2
        for _, layer in measured_layers(report)
        if layer.shift is not None and layer.noise is not None and layer.drift
    ]
    return max(gaps) if gaps else None


def percent_up(fraction: float) -> int:
    """A fraction as whole percent, rounded up (a bound must not be understated), at least 1."""
    return max(1, math.ceil(100 * fraction - 1e-9))


def _status_handles(statuses: set[LayerStatus], flag_marker: str) -> list[Any]:
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


def _threshold_handle(threshold: float) -> Any:
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


def _drift_title(report: ScanReport, rows: list[tuple[int, LayerReport]]) -> str:
    _, worst = max(rows, key=lambda r: r[1].drift or 0.0)
    n_dep = sum(1 for layer in report.layers if layer.batch_dependent)
    tail = f"worst: {S.named(worst.name)} ({S.num(worst.drift)})"
    flagged = report.flagged_layers
    if flagged:
        return f"{len(flagged)} of {n_dep} layers drift; {tail}"
    drifting = report.drifting_layers
    if drifting:
        return f"{len(drifting)} of {n_dep} layers drift, harmless on this data; {tail}"
    if report.harmful:
        return f"No layer exceeds {report.threshold:g}, yet outputs diverge: the drift compounds; {tail}"
    return f"No layer drifts above {report.threshold:g}; {tail}"


def drift_figure(
    report: ScanReport, *, max_named: int = MAX_NAMED_BARS, list_worst: int = 10
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

    Raises:
        NothingToPlot: no batch-dependent layer was measured.
    """
    from matplotlib.patches import Patch

    rows = measured_layers(report)
    if not rows:
        raise NothingToPlot(_why_nothing_measured(report))
    parts = [_split(layer) for _, layer in rows]
    shift_p = [p[0] for p in parts]
    noise_p = [p[1] for p in parts]
    rest_p = [p[2] for p in parts]
    statuses = [layer.status for _, layer in rows]
    hatches = [
        S.FLAG_HATCH
        if s is LayerStatus.FLAGGED
        else S.HARMLESS_HATCH
        if s is LayerStatus.HARMLESS
        else ""
        for s in statuses
    ]
    drifts = [layer.drift or 0.0 for _, layer in rows]
    top = max(max(drifts), report.threshold)
    named = len(rows) <= max_named

    if named:
        fig = S.new_figure(8.0, max(3.0, 0.32 * len(rows) + 2.2))
        ax = fig.add_subplot()
        pos = list(range(len(rows)))
        bar = ax.barh
        kw: dict[str, Any] = {"height": 0.7}
        base = "left"
    else:
        fig = S.new_figure(10.0, 5.2)
        grid = fig.add_gridspec(1, 2, width_ratios=(3.2, 1))
        ax = fig.add_subplot(grid[0, 0])
        side = fig.add_subplot(grid[0, 1])
        pos = [i for i, _ in rows]
        bar = ax.bar
        kw = {"width": 0.85 if len(rows) < 400 else 1.0}
        base = "bottom"

    edge = {"edgecolor": S.EDGE_COLOR, "linewidth": 0.4 if named else 0.0}
    containers = [
        bar(pos, shift_p, color=S.SHIFT_COLOR, label="shift share", **kw, **edge),
        bar(
            pos, noise_p, color=S.NOISE_COLOR, label="noise share", **kw, **{base: shift_p}, **edge
        ),
        bar(
            pos,
            rest_p,
            color=S.UNSPLIT_COLOR,
            label="no split",
            **kw,
            **{base: [a + b for a, b in zip(shift_p, noise_p, strict=True)]},
            **edge,
        ),
    ]
    for container in containers:
        for patch, hatch in zip(container.patches, hatches, strict=True):
            if hatch:
                patch.set_hatch(hatch)
                patch.set_edgecolor(S.EDGE_COLOR)
    # Markers beyond the bar ends: flags survive even where bars are too thin to show hatching.
    pad = 0.03 * top
    for status, marker, fill in (
        (LayerStatus.FLAGGED, S.FLAG_MARKER, S.EDGE_COLOR),
        (LayerStatus.HARMLESS, S.HARMLESS_MARKER, "none"),
    ):
        sel = [(p, d + pad) for p, d, s in zip(pos, drifts, statuses, strict=True) if s is status]
        if sel:
            xs, ys = zip(*sel, strict=True)
            if named:
                xs, ys = ys, xs
            ax.scatter(
                xs,
                ys,
                marker="<" if (named and marker == S.FLAG_MARKER) else marker,
                s=22,
                facecolors=fill,
                edgecolors=S.EDGE_COLOR,
                linewidths=0.8,
                zorder=3,
            )

    if named:
        ax.axvline(report.threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
        ax.set_yticks(pos, labels=[S.esc(S.shorten(layer.name)) for _, layer in rows])
        for tick, status in zip(ax.get_yticklabels(), statuses, strict=True):
            if status is LayerStatus.FLAGGED:
                tick.set_fontweight("bold")
        ax.invert_yaxis()  # forward order reads top to bottom
        ax.set_xlim(0, top * 1.12)
        ax.set_xlabel(S.DRIFT_LABEL, fontsize=S.LABEL_SIZE)
        ax.set_ylabel("layer (forward order)", fontsize=S.LABEL_SIZE)
        S.style_axes(ax, grid="x")
    else:
        ax.axhline(report.threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
        ax.set_ylim(0, top * 1.12)
        ax.set_xlim(0, len(report.layers) + 1)
        ax.set_ylabel(S.DRIFT_LABEL, fontsize=S.LABEL_SIZE)
        ax.set_xlabel(
            "layer # in forward order (the report's table lists every #)", fontsize=S.LABEL_SIZE
        )
        S.style_axes(ax, grid="y")
        worst = _by_drift(rows, list_worst)
        for i, layer in worst:
            ax.annotate(
                f"#{i}",
                (i, (layer.drift or 0.0) + 2 * pad),
                ha="center",
                va="bottom",
                fontsize=S.SMALL_SIZE - 1,
            )
        lines = [f"worst {len(worst)} of {len(rows)} layers"] + [
            f"#{i:<4d} {S.num(layer.drift):>6}  {S.esc(S.shorten(layer.name, 28))}"
            for i, layer in worst
        ]
        side.axis("off")
        side.text(
            0.0,
            1.0,
            "\n".join(lines),
            transform=side.transAxes,
            va="top",
            ha="left",
            fontsize=S.SMALL_SIZE,
            family="monospace",
        )

    handles: list[Any] = [
        Patch(facecolor=S.SHIFT_COLOR, label="population shift share (recalibration removes it)"),
        Patch(facecolor=S.NOISE_COLOR, label="batch noise share (no running estimate removes it)"),
    ]
    if any(rest_p):
        handles.append(Patch(facecolor=S.UNSPLIT_COLOR, label="shift/noise not measured"))
    handles += _status_handles(set(statuses), "<" if named else S.FLAG_MARKER)
    handles.append(_threshold_handle(report.threshold))
    S.legend_below(fig, handles)
    _title(fig, _drift_title(report, rows))

    gap = decomposition_gap(report)
    gap_text = (
        f" (they add up to drift² only approximately, here within {percent_up(gap)}%)"
        if gap is not None
        else ""
    )
    marks = []
    if LayerStatus.FLAGGED in statuses:
        marks.append("flagged layers are hatched and marked with a triangle")
    if LayerStatus.HARMLESS in statuses:
        marks.append("layers that drift harmlessly are dotted and marked ○")
    _CAPTIONS[fig] = (
        f"Drift of each of the {len(rows)} measured batch-dependent layers in forward order, "
        f"each bar split in proportion to population shift² and batch noise²{gap_text}; "
        + "".join(f"{m}, " for m in marks)
        + ("and " if marks else "")
        + f"the dashed line is the threshold {report.threshold:g}."
    )
    return fig


# -- 2. per-channel statistics ---------------------------------------------------------------


def _pairs(
    xs: Sequence[float | None],
    ys: Sequence[float | None],
    idx: Iterable[int],
    positive: bool = False,
) -> tuple[list[float], list[float]]:
    out_x, out_y = [], []
    for c in idx:
        if c >= len(xs) or c >= len(ys):
            continue
        x, y = xs[c], ys[c]
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            continue
        if positive and (x <= 0 or y <= 0):
            continue
        out_x.append(float(x))
        out_y.append(float(y))
    return out_x, out_y


def _identity(ax: Axes, lo: float, hi: float) -> None:
    ax.plot([lo, hi], [lo, hi], color=S.THRESHOLD_COLOR, linestyle="--", linewidth=0.9, zorder=1)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)


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
    from matplotlib.lines import Line2D

    rows = [
        (i, layer)
        for i, layer in measured_layers(report)
        if layer.running_mean and layer.headline is not None and layer.headline.pooled_mean
    ]
    if not rows:
        raise NothingToPlot(
            _why_nothing_measured(report)
            if not measured_layers(report)
            else "no measured layer carries per-channel running statistics"
        )
    worst = _by_drift(rows, k)
    # Fixed margins instead of constrained layout: with 2k equal-aspect axes the layout engine
    # costs more than the drawing, and the geometry here is regular anyway (inches).
    rows_n, top_in, bottom_in, gap_in = len(worst), 0.95, 0.85, 0.9
    height = 2.9 * rows_n + 1.3
    axes_h = (height - top_in - bottom_in - (rows_n - 1) * gap_in) / rows_n
    fig = S.new_figure(8.0, height, constrained=False)
    axes = fig.subplots(
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
    any_dead = False
    for (i, layer), (ax_m, ax_v) in zip(worst, axes, strict=True):
        head = layer.headline
        assert head is not None
        n = min(len(layer.running_mean), len(head.pooled_mean))
        dead = set(layer.dead_channels)
        any_dead |= bool(dead)
        live_idx = [c for c in range(n) if c not in dead]
        dead_idx = sorted(dead & set(range(n)))
        flag = " [flagged]" if layer.flagged else ""
        for ax, xs, ys, positive, what in (
            (ax_m, layer.running_mean, head.pooled_mean, False, "mean"),
            (ax_v, layer.running_var, head.pooled_var, True, "variance"),
        ):
            lx, ly = _pairs(xs, ys, live_idx, positive)
            dx, dy = _pairs(xs, ys, dead_idx, positive)
            vals = lx + ly + dx + dy
            if positive:
                S.log_axis(ax, "x")
                S.log_axis(ax, "y")
            S.style_axes(ax, grid="both")
            if not vals:
                ax.text(0.5, 0.5, f"no finite {what}s", transform=ax.transAxes, ha="center")
                continue
            lo, hi = min(vals), max(vals)
            if positive:
                lo, hi = lo / 1.5, hi * 1.5
            else:
                span = hi - lo if hi > lo else max(abs(hi), 1.0)
                lo, hi = lo - 0.08 * span, hi + 0.08 * span
            _identity(ax, lo, hi)
            alpha = 0.85 if len(lx) < 200 else 0.55
            ax.scatter(lx, ly, s=14, color=S.SHIFT_COLOR, alpha=alpha, linewidths=0, zorder=2)
            if dx:
                ax.scatter(dx, dy, s=16, facecolors="none", edgecolors=S.OTHER_COLOR, zorder=2)
            ax.set_aspect("equal", adjustable="box")
            ax.set_xlabel(f"running {what} (used in eval mode)", fontsize=S.LABEL_SIZE - 1)
            ax.set_ylabel(f"observed {what} (all scanned samples)", fontsize=S.LABEL_SIZE - 1)
        ax_m.set_title(
            S.esc(
                f"#{i} {S.shorten(layer.name, 30)}{flag}: drift {S.num(layer.drift)}, shift {S.num(layer.shift)}"
            ),
            fontsize=S.LABEL_SIZE,
            loc="left",
        )
    handles: list[Any] = [
        Line2D([], [], marker="o", linestyle="", color=S.SHIFT_COLOR, label="one channel"),
        Line2D(
            [], [], color=S.THRESHOLD_COLOR, linestyle="--", label="identity: running = observed"
        ),
    ]
    if any_dead:
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
    off = [layer for _, layer in worst if (layer.shift or 0.0) > report.threshold]
    stale = [layer for layer in off if (layer.shift or 0.0) >= (layer.noise or 0.0)]
    noisy = [layer for layer in off if layer not in stale]

    def names(layers: list[LayerReport]) -> str:
        return ", ".join(S.named(layer.name) for layer in layers[:3]) + (
            " …" if len(layers) > 3 else ""
        )

    if stale:
        verdict = (
            f"Running statistics of {names(stale)} miss the observed ones: stale, "
            "recalibration targets them"
        )
    elif noisy:
        top = noisy[0]
        verdict = (
            f"Running statistics of {names(noisy)} miss the observed ones (shift "
            f"{S.num(top.shift)}), yet batch noise ({S.num(top.noise)}) dominates: "
            "recalibration alone will not fix it"
        )
    else:
        top_shift = max((layer.shift or 0.0) for _, layer in worst)
        verdict = (
            f"Running statistics sit near the observed ones (shift ≤ {top_shift:.2g}): "
            "the drift is not stale statistics"
        )
    _title(fig, verdict)
    _CAPTIONS[fig] = (
        f"For the {len(worst)} worst layer(s), each channel's running mean and variance (used in eval "
        "mode) against the exact ones observed over all scanned samples; points off the dashed "
        "identity line are the population shift that recalibration removes."
    )
    return fig


# -- 3. batch-size sweep ---------------------------------------------------------------------


def sweep_batch_size(report: ScanReport) -> int:
    """The batch size a sweep report was scanned at (the largest batch when batches were given)."""
    c = report.composition
    return int(c.batch_size) if c.batch_size is not None else int(c.max_batch)


def _sweep_items(
    reports: Mapping[int, ScanReport] | Iterable[ScanReport],
) -> list[tuple[int, ScanReport]]:
    if isinstance(reports, Mapping):
        items = [(int(b), r) for b, r in reports.items()]
    else:
        items = [(sweep_batch_size(r), r) for r in reports]
    items.sort(key=lambda item: item[0])
    sizes = [b for b, _ in items]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"the sweep has repeated batch sizes: {sizes}")
    return items


def _layer_lines(
    ax: Axes,
    xs: Sequence[float],
    curves: dict[str, list[float]],
    chosen: Sequence[str],
    k: int,
    pairs: Sequence[tuple[str, str]],
) -> list[Any]:
    """Drift curves: the chosen layers in colour, the rest thin and grey, and their median once
    there are more than ``k`` (the grey lines merge); returns the legend handles."""
    from matplotlib.lines import Line2D

    others = [n for n in curves if n not in chosen]
    for n in others:
        ax.plot(xs, curves[n], color=S.OTHER_COLOR, linewidth=0.7, alpha=0.8, zorder=1)
    handles: list[Any] = []
    for j, n in enumerate(chosen):
        color, marker = pairs[j % len(pairs)]
        (line,) = ax.plot(
            xs,
            curves[n],
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
    if len(curves) > k:
        median = [
            statistics.median(v)
            if (v := [ys[j] for ys in curves.values() if math.isfinite(ys[j])])
            else math.nan
            for j in range(len(xs))
        ]
        (mline,) = ax.plot(
            xs,
            median,
            color=S.EDGE_COLOR,
            linestyle="-.",
            linewidth=2,
            zorder=2,
            label=f"median of all {len(curves)} layers",
        )
        handles.append(mline)
    return handles


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
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    items = _sweep_items(reports_by_batch_size)
    if len(items) < 2:
        raise NothingToPlot("a batch-size sweep needs at least two batch sizes")
    sizes = [b for b, _ in items]
    names: dict[str, None] = {}
    for _, r in items:
        for _, layer in measured_layers(r):
            names.setdefault(layer.name)
    if not names:
        raise NothingToPlot(_why_nothing_measured(items[0][1]))
    curves: dict[str, list[float]] = {}
    for name in names:
        ys = []
        for _, r in items:
            try:
                d = r.layer(name).drift
            except KeyError:
                d = None
            ys.append(math.nan if d is None else d)
        curves[name] = ys
    threshold = items[0][1].threshold
    peak = {n: max((y for y in ys if math.isfinite(y)), default=0.0) for n, ys in curves.items()}
    chosen = sorted(curves, key=lambda n: -peak[n])[:k]
    e2e = [r.end_to_end for _, r in items]
    # Lower panel, the most telling measurement available: accuracy of both paths (labels
    # given) shows at which batch size batch statistics work, which drift alone cannot (drift
    # always grows as batches shrink, whatever the training batch size was).
    use_acc = any(e is not None and e.acc_train is not None and e.acc_eval is not None for e in e2e)
    use_agree = not use_acc and any(e is not None and e.agreement is not None for e in e2e)
    use_div = (
        not use_acc
        and not use_agree
        and any(e is not None and e.rel_divergence is not None for e in e2e)
    )

    if use_acc or use_agree or use_div:
        fig = S.new_figure(8.0, 6.6)
        ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
    else:
        fig = S.new_figure(8.0, 4.8)
        ax, ax2 = fig.add_subplot(), None
    handles = _layer_lines(ax, sizes, curves, chosen, k, S.SERIES)
    ax.axhline(threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
    handles.append(_threshold_handle(threshold))
    ax.set_ylabel(S.DRIFT_LABEL, fontsize=S.LABEL_SIZE)
    ax.set_ylim(bottom=0)
    S.style_axes(ax, grid="y")

    last = ax2 if ax2 is not None else ax
    for a in (ax, ax2):
        if a is None:
            continue
        a.set_xscale("log", base=2)
        a.xaxis.set_minor_locator(NullLocator())
        if train_batch_size is not None:
            a.axvline(train_batch_size, color=S.OKABE_ITO["green"], linestyle=":", linewidth=2)
    ticks = sorted(set(sizes) | ({train_batch_size} if train_batch_size else set()))
    last.set_xticks(ticks, labels=[str(t) for t in ticks])
    last.set_xlabel("batch size of the scan (samples per batch, log scale)", fontsize=S.LABEL_SIZE)
    if train_batch_size is not None:
        handles.append(
            Line2D(
                [],
                [],
                color=S.OKABE_ITO["green"],
                linestyle=":",
                linewidth=2,
                label=f"training batch size {train_batch_size}",
            )
        )

    acc_text = ""
    if ax2 is not None:
        S.style_axes(ax2, grid="y")
        if use_acc:
            acc_t = [
                100 * e.acc_train if e is not None and e.acc_train is not None else math.nan
                for e in e2e
            ]
            acc_e = [
                100 * e.acc_eval if e is not None and e.acc_eval is not None else math.nan
                for e in e2e
            ]
            (lt,) = ax2.plot(
                sizes,
                acc_t,
                color=S.TRAIN_COLOR,
                marker="o",
                linewidth=1.8,
                label="accuracy with batch statistics (train path)",
            )
            (le,) = ax2.plot(
                sizes,
                acc_e,
                color=S.EVAL_COLOR,
                marker="s",
                linestyle="--",
                linewidth=1.5,
                label="accuracy in eval mode (running statistics)",
            )
            handles += [lt, le]
            ax2.set_ylabel("accuracy on the\nscanned data (%)", fontsize=S.LABEL_SIZE)
            ax2.set_ylim(0, 104)
            finite = [j for j, v in enumerate(acc_t) if math.isfinite(v)]
            if finite:
                best = max(finite, key=lambda j: acc_t[j])
                b, at, ae = sizes[best], acc_t[best], acc_e[best]
                acc_text = f"batch statistics are most accurate at batch size {b} ({at:.1f}%), " + (
                    f"eval mode loses accuracy ({ae:.1f}%)"
                    if math.isfinite(ae) and at - ae > 1.0
                    else f"eval mode matches them ({ae:.1f}%)"
                )
        elif use_agree:
            ys = [
                100 * e.agreement if e is not None and e.agreement is not None else math.nan
                for e in e2e
            ]
            ax2.plot(sizes, ys, color=S.EDGE_COLOR, marker="s", linewidth=1.5)
            ax2.axhline(
                100 * items[0][1].agreement_threshold,
                color=S.THRESHOLD_COLOR,
                linestyle="--",
                linewidth=1,
            )
            ax2.set_ylabel("predictions equal in\ntrain and eval path (%)", fontsize=S.LABEL_SIZE)
            ax2.set_ylim(0, 104)
        else:
            ys = [
                e.rel_divergence if e is not None and e.rel_divergence is not None else math.nan
                for e in e2e
            ]
            ax2.plot(sizes, ys, color=S.EDGE_COLOR, marker="s", linewidth=1.5)
            ax2.axhline(
                items[0][1].divergence_threshold,
                color=S.THRESHOLD_COLOR,
                linestyle="--",
                linewidth=1,
            )
            ax2.set_ylabel("output divergence\nRMS(y_t − y_e)/RMS(y_t)", fontsize=S.LABEL_SIZE)
            ax2.set_ylim(bottom=0)
    S.legend_below(fig, handles, ncols=3)

    above = {
        b: sum(1 for ys in curves.values() if math.isfinite(ys[j]) and ys[j] > threshold)
        for j, b in enumerate(sizes)
    }
    total = len(curves)
    if not any(above.values()):
        text = (
            f"no layer drifts above {threshold:g} at any batch size from {sizes[0]} to {sizes[-1]}"
        )
    elif all(above.values()):
        text = (
            f"drift above {threshold:g} at every batch size tried ({above[sizes[-1]]} of {total} "
            f"layers at {sizes[-1]}): not only a batch-size effect"
        )
    elif above[sizes[-1]]:
        text = (
            f"{above[sizes[-1]]} of {total} layers still drift above {threshold:g} at batch "
            f"size {sizes[-1]}"
        )
    else:
        clean = min(b for b in sizes if all(above[c] == 0 for c in sizes if c >= b))
        text = (
            f"drift grows as batches shrink: {above[sizes[0]]} of {total} layers exceed "
            f"{threshold:g} at batch size {sizes[0]}, none from {clean} up"
        )
    if train_batch_size is not None:
        at_train = above.get(train_batch_size)
        text += f"; training batch size {train_batch_size}" + (
            (f": {at_train} drifting" if at_train else ": none drifting")
            if at_train is not None
            else " (not scanned)"
        )
    text = (
        f"{acc_text[:1].upper()}{acc_text[1:]}; {text}" if acc_text else text[:1].upper() + text[1:]
    )
    _title(fig, text)
    comp = items[0][1].composition
    grouping = f", each batch from one {comp.group_by}" if comp.group_by else ""
    _CAPTIONS[fig] = (
        f"Drift of every measured layer when scanned at batch sizes {', '.join(map(str, sizes))}"
        f"{grouping} (the {len(chosen)} highest in colour, the others grey)"
        + (", with the accuracy of both paths below" if use_acc else "")
        + (", with the agreement of the two paths below" if use_agree else "")
        + (", with the output divergence below" if use_div else "")
        + (
            "; drift always grows as batches shrink, but the batch size at which batch "
            "statistics are most accurate hints at the one training used."
            if use_acc
            else "; drift always grows as batches shrink, so drift alone does not reveal the "
            "training batch size (labels would)."
        )
    )
    return fig


# -- 3b. checkpoint series -------------------------------------------------------------------

#: Checkpoints named on the series figure's axis; above, every n-th (first flagged and last kept).
MAX_SERIES_TICKS = 24
#: How far above a point its flag marker sits (points): the marker points down at the value.
_FLAG_OFFSET_PT = 7.0


def _series_first_flagged(reports: Sequence[ScanReport]) -> int | None:
    return next((j for j, r in enumerate(reports) if r.flagged), None)


def _series_effect(report: ScanReport) -> str:
    """The end-to-end number of one checkpoint, for the title ("" when none was measured)."""
    e = report.end_to_end
    if e is None:
        return ""
    if e.agreement is not None:
        return f"agreement {S.pct(e.agreement)}"
    if e.acc_train is not None and e.acc_eval is not None:
        return f"eval-mode accuracy {S.pct(e.acc_eval)}, {S.pct(e.acc_train)} with batch statistics"
    if e.rel_divergence is not None:
        return f"output divergence {S.num(e.rel_divergence)}"
    return ""


def _series_title(reports: Sequence[ScanReport], curves: Mapping[str, list[float]]) -> str:
    first = _series_first_flagged(reports)
    if first is None:
        best = (-1.0, "", 0)
        for name, ys in curves.items():
            for j, y in enumerate(ys):
                if math.isfinite(y) and y > best[0]:
                    best = (y, name, j)
        drift, name, j = best
        text = (
            f"No checkpoint flagged; worst drift {S.num(drift)} "
            f"({S.named(name)}, {reports[j].model})"
        )
        worst = {layer.name: layer for layer in reports[j].layers}.get(name)
        if worst is not None and worst.status is LayerStatus.HARMLESS:
            text += ", harmless on that checkpoint's data"
        return text
    r = reports[first]
    n_dep = sum(1 for layer in r.layers if layer.batch_dependent)
    effect = _series_effect(r)
    what = f"{len(r.flagged_layers)} of {n_dep} layers flagged" + (f" ({effect})" if effect else "")
    if first == 0:
        text = f"Drift already at the first checkpoint, {r.model}: {what}"
    else:
        text = f"Drift appeared at {r.model}: {what}"
    last = reports[-1]
    if not last.flagged:
        text += f"; the last checkpoint, {last.model}, is not flagged"
    return text


def _common_affixes(names: Sequence[str]) -> tuple[str, str]:
    """What every long name shares at the start and end, cut at a separator (``run3_``, ``.ckpt``).

    ``("", "")`` when the names are short anyway, or stripping would leave a name empty.
    """
    if len(names) < 2 or max(len(x) for x in names) <= 14:
        return "", ""
    seps = "_-. /"

    def shared(strings: Iterable[str]) -> str:
        out = ""
        for chars in zip(*strings, strict=False):
            if len(set(chars)) > 1:
                break
            out += chars[0]
        return out

    head = shared(names)
    prefix = head[: max(head.rfind(c) for c in seps) + 1]
    tail = shared(x[::-1] for x in names)[::-1]
    starts = [i for i, c in enumerate(tail) if c in seps]
    suffix = tail[starts[0] :] if starts else ""
    if any(len(x) <= len(prefix) + len(suffix) for x in names):
        return "", ""
    return prefix, suffix


def _series_ticks(n: int, keep: Iterable[int]) -> list[int]:
    """Positions to label: all of them, or every n-th plus ``keep`` (neighbours dropped)."""
    if n <= MAX_SERIES_TICKS:
        return list(range(n))
    step = math.ceil(n / MAX_SERIES_TICKS)
    must = set(keep)
    ticks = {j for j in range(0, n, step) if all(abs(j - m) > step // 2 for m in must)}
    return sorted(ticks | must)


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
    from matplotlib.lines import Line2D
    from matplotlib.transforms import ScaledTranslation

    reports = list(reports)
    if len(reports) < 2:
        raise NothingToPlot(
            f"a checkpoint series needs at least two checkpoints (got {len(reports)})"
        )
    by_name = [{layer.name: layer for layer in r.layers} for r in reports]
    names: dict[str, None] = {}
    for r in reports:
        for _, layer in measured_layers(r):
            names.setdefault(layer.name)
    if not names:
        raise NothingToPlot(
            f"none of the {len(reports)} checkpoints has a measured batch-dependent layer: "
            + _why_nothing_measured(reports[-1])
        )
    n = len(reports)
    xs = list(range(n))
    at: dict[str, list[LayerReport | None]] = {
        name: [layers.get(name) for layers in by_name] for name in names
    }
    curves: dict[str, list[float]] = {
        name: [
            float(layer.drift)
            if layer is not None
            and layer.batch_dependent
            and layer.drift is not None
            and math.isfinite(layer.drift)
            else math.nan
            for layer in row
        ]
        for name, row in at.items()
    }
    peak = {nm: max((y for y in ys if math.isfinite(y)), default=0.0) for nm, ys in curves.items()}
    chosen = sorted(curves, key=lambda nm: -peak[nm])[: max(k, 0)]
    others = [nm for nm in curves if nm not in chosen]
    first = _series_first_flagged(reports)

    e2e = [r.end_to_end for r in reports]
    has_acc = any(e is not None and e.acc_train is not None and e.acc_eval is not None for e in e2e)
    has_agree = any(e is not None and e.agreement is not None for e in e2e)
    has_div = (
        not has_acc
        and not has_agree
        and any(e is not None and e.rel_divergence is not None for e in e2e)
    )
    ticks = _series_ticks(n, [j for j in (first, n - 1) if j is not None])
    prefix, suffix = _common_affixes([r.model for r in reports])
    labels = [
        S.esc(S.shorten(reports[j].model[len(prefix) : len(reports[j].model) - len(suffix)], 24))
        for j in ticks
    ]
    # ~5 px a character at 8 pt over ~680 px of axis: rotate when names would run together,
    # and make the figure taller by what the slanted names take.
    longest = max(len(t) for t in labels)
    rotate = longest * 5.0 > 0.9 * 680 / len(ticks)
    extra = 0.045 * longest if rotate else 0.0
    if has_acc or has_agree or has_div:
        fig = S.new_figure(8.0, 6.8 + extra)
        ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1))
    else:
        fig = S.new_figure(8.0, 5.0 + extra)
        ax, ax2 = fig.add_subplot(), None

    # -- upper panel: drift per layer
    # The flag marker is a downward triangle: no series may use it as its own marker.
    pairs = [p for p in S.SERIES if p[1] != S.FLAG_MARKER]
    handles = _layer_lines(ax, xs, curves, chosen, k, pairs)
    # Status marks sit just above their points (offset in points, data offsets exact).
    lift = ax.transData + ScaledTranslation(0, _FLAG_OFFSET_PT / 72, fig.dpi_scale_trans)
    marks: dict[LayerStatus, list[tuple[float, float]]] = {
        LayerStatus.FLAGGED: [],
        LayerStatus.HARMLESS: [],
    }
    for nm, row in at.items():
        for j, layer in enumerate(row):
            y = curves[nm][j]
            if layer is not None and math.isfinite(y) and layer.status in marks:
                marks[layer.status].append((float(j), y))
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
        if not marks[status]:
            continue
        px, py = zip(*marks[status], strict=True)
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
    thresholds = [r.threshold for r in reports]
    if len(set(thresholds)) == 1:
        ax.axhline(thresholds[0], color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
    else:  # scanned with different thresholds: each checkpoint's own
        ax.plot(
            xs,
            thresholds,
            color=S.THRESHOLD_COLOR,
            linestyle="--",
            linewidth=1,
            drawstyle="steps-mid",
        )
    top = max([*(peak.values()), *thresholds])
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_ylabel(S.DRIFT_LABEL.replace(", ", "\n", 1), fontsize=S.LABEL_SIZE)
    S.style_axes(ax, grid="y")

    # -- lower panel: what the drift does to the outputs
    lower = ""
    if ax2 is not None:
        S.style_axes(ax2, grid="y")

        def series_of(attr: str, scale: float) -> list[float]:
            out = []
            for e in e2e:
                v = None if e is None else getattr(e, attr)
                out.append(scale * v if v is not None and math.isfinite(v) else math.nan)
            return out

        if has_acc or has_agree:
            if has_acc:
                (lt,) = ax2.plot(
                    xs,
                    series_of("acc_train", 100),
                    color=S.TRAIN_COLOR,
                    marker="o",
                    markersize=4.5,
                    linewidth=1.8,
                    zorder=3,
                    label="accuracy with batch statistics (train path)",
                )
                (le,) = ax2.plot(
                    xs,
                    series_of("acc_eval", 100),
                    color=S.EVAL_COLOR,
                    marker="s",
                    markersize=4.5,
                    linestyle="--",
                    linewidth=1.5,
                    zorder=3,
                    label="accuracy in eval mode (running statistics)",
                )
                handles += [lt, le]
            if has_agree:
                (la,) = ax2.plot(
                    xs,
                    series_of("agreement", 100),
                    color=S.EDGE_COLOR,
                    marker="D",
                    markersize=4,
                    linewidth=1.5,
                    zorder=2,  # under eval-mode accuracy, which often runs alongside it
                    label="predictions equal in both paths",
                )
                handles.append(la)
                ax2.axhline(
                    100 * reports[-1].agreement_threshold,
                    color=S.THRESHOLD_COLOR,
                    linestyle="--",
                    linewidth=1,
                )
            ax2.set_ylim(0, 104)
            ax2.set_ylabel(
                "accuracy / agreement (%)"
                if has_acc and has_agree
                else "accuracy on the\nscanned data (%)"
                if has_acc
                else "predictions equal in\ntrain and eval path (%)",
                fontsize=S.LABEL_SIZE,
            )
            lower = (
                "the prediction agreement of the two paths and the accuracy of each"
                if has_acc and has_agree
                else "the accuracy of each path"
                if has_acc
                else "the prediction agreement of the two paths"
            )
        else:
            (ld,) = ax2.plot(
                xs,
                series_of("rel_divergence", 1),
                color=S.EDGE_COLOR,
                marker="D",
                markersize=4,
                linewidth=1.5,
                label="output divergence RMS(y_train − y_eval) / RMS(y_train)",
            )
            handles.append(ld)
            ax2.axhline(
                reports[-1].divergence_threshold,
                color=S.THRESHOLD_COLOR,
                linestyle="--",
                linewidth=1,
            )
            ax2.set_ylim(bottom=0)
            ax2.set_ylabel("output divergence", fontsize=S.LABEL_SIZE)
            lower = "the output divergence of the two paths"

    # -- thresholds, first flagged checkpoint, checkpoint names
    drift_t = f"drift {thresholds[0]:g}" if len(set(thresholds)) == 1 else "drift (per checkpoint)"
    harm_t = (
        f", agreement {100 * reports[-1].agreement_threshold:g}% (bottom)"
        if ax2 is not None and has_agree
        else f", divergence {reports[-1].divergence_threshold:g} (bottom)"
        if ax2 is not None and has_div
        else ""
    )
    handles.append(
        Line2D(
            [],
            [],
            color=S.THRESHOLD_COLOR,
            linestyle="--",
            linewidth=1,
            label=f"threshold: {drift_t}{' (top)' if harm_t else ''}{harm_t}",
        )
    )
    if first is not None:
        for a in (ax, ax2):
            if a is not None:
                a.axvline(first, color=S.EDGE_COLOR, linestyle=":", linewidth=1.4, zorder=0)
        handles.append(
            Line2D(
                [],
                [],
                color=S.EDGE_COLOR,
                linestyle=":",
                linewidth=1.4,
                label=S.esc(f"first flagged: {S.shorten(reports[first].model, 30)}"),
            )
        )
    last = ax2 if ax2 is not None else ax
    last.set_xticks(ticks, labels=labels)
    last.set_xlim(-0.4, n - 0.6)
    if rotate:
        for t in last.get_xticklabels():
            t.set_rotation(35)
            t.set_horizontalalignment("right")
            t.set_rotation_mode("anchor")
    for t, j in zip(last.get_xticklabels(), ticks, strict=True):
        if reports[j].flagged:
            t.set_fontweight("bold")
    common = f" ({prefix}*{suffix})" if prefix or suffix else ""
    last.set_xlabel(
        S.esc(
            f"checkpoint{common}, in the order given"
            + ("; flagged ones in bold" if first is not None else "")
        ),
        fontsize=S.LABEL_SIZE,
    )
    S.legend_below(fig, handles, ncols=2)
    _title(fig, _series_title(reports, curves))
    phrases = []
    if marks[LayerStatus.FLAGGED]:
        phrases.append("a triangle above a point marks a layer flagged in that checkpoint")
    if marks[LayerStatus.HARMLESS]:
        phrases.append(
            "a circle one that drifts harmlessly"
            if phrases
            else "a circle above a point marks a layer that drifts harmlessly"
        )
    marks_text = "".join(f"{p}, " for p in phrases)
    _CAPTIONS[fig] = (
        f"Drift of every measured batch-dependent layer in each of the {n} checkpoints, in the "
        f"order given"
        + (
            f" (the {len(chosen)} highest in colour, the other {len(others)} grey)"
            if others
            else ""
        )
        + f"; {marks_text}the dashed line is the threshold"
        + (f" {thresholds[0]:g}" if len(set(thresholds)) == 1 else "")
        + (f", with {lower} below" if lower else "")
        + "."
    )
    return fig


# -- 4. per-batch distribution ---------------------------------------------------------------


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def batch_distribution_figure(report: ScanReport, k: int = 6) -> Figure:
    """How the per-batch mismatch D_b spreads over the scanned batches, for the worst layers.

    Per layer: one point per batch (at most ``MAX_POINTS`` drawn, all counted), a thick bar from
    the 25th to the 75th percentile, a thin line from the 5th to the 95th, the median as a tick
    and the drift score (the RMS over batches) as a diamond.

    Raises:
        NothingToPlot: nothing measured, or every layer saw a single batch.
    """
    import numpy as np
    from matplotlib.lines import Line2D

    rows = [
        (i, layer, vals)
        for i, layer in measured_layers(report)
        if layer.headline is not None and (vals := _finite(layer.headline.batch_drift))
    ]
    if not rows:
        raise NothingToPlot(
            _why_nothing_measured(report)
            if not measured_layers(report)
            else "no per-batch mismatch recorded"
        )
    if max(len(v) for _, _, v in rows) < 2:
        raise NothingToPlot(
            "every layer saw a single batch: there is no distribution over batches to show"
        )
    worst = sorted(rows, key=lambda r: -(r[1].drift or 0.0))[:k]
    threshold = report.threshold
    fig = S.new_figure(8.0, 0.62 * len(worst) + 2.4)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)
    for y, (_, layer, vals) in enumerate(worst):
        pts = np.asarray(vals)
        if len(pts) > MAX_POINTS:
            pts = rng.choice(pts, MAX_POINTS, replace=False)
        jitter = rng.uniform(-0.22, 0.22, len(pts))
        ax.scatter(pts, y + jitter, s=8, color=S.SHIFT_COLOR, alpha=0.45, linewidths=0, zorder=2)
        sv = sorted(vals)
        q05, q25, q50, q75, q95 = (_quantile(sv, q) for q in (0.05, 0.25, 0.5, 0.75, 0.95))
        ax.plot([q05, q95], [y, y], color=S.EDGE_COLOR, linewidth=1, zorder=3)
        ax.plot(
            [q25, q75], [y, y], color=S.EDGE_COLOR, linewidth=5, solid_capstyle="butt", zorder=3
        )
        ax.plot([q50], [y], marker="|", markersize=13, color="white", markeredgewidth=2, zorder=4)
        ax.plot(
            [layer.drift],
            [y],
            marker="D",
            markersize=6,
            color=S.NOISE_COLOR,
            markeredgecolor=S.EDGE_COLOR,
            zorder=5,
        )
    ax.axvline(threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1)
    ax.set_yticks(
        range(len(worst)),
        labels=[
            S.esc(
                f"#{i} {S.shorten(layer.name, 26)}"
                + (" [flagged]" if layer.flagged else "")
                + f"\n{len(v)} batches"
            )
            for i, layer, v in worst
        ],
    )
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.set_xlabel(
        "per-batch mismatch D_b = RMS(y_train − y_eval) / RMS(γ) on one batch",
        fontsize=S.LABEL_SIZE,
    )
    S.style_axes(ax, grid="x")
    handles = [
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
        _threshold_handle(threshold),
    ]
    S.legend_below(fig, handles, ncols=3)
    _, top, vals = worst[0]
    frac = sum(1 for v in vals if v > threshold) / len(vals)
    name = S.named(top.name)
    if frac >= 0.5:
        text = f"{name}: {frac:.0%} of batches exceed {threshold:g}: the mismatch is systematic, not a few bad batches"
    elif (top.drift or 0.0) > threshold:
        text = (
            f"{name}: a few batches dominate ({frac:.0%} exceed {threshold:g}; "
            f"worst batch {top.headline.worst_batch if top.headline else '?'} at {S.num(top.drift_worst)})"
        )
    else:
        text = (
            f"Per-batch mismatch stays below {threshold:g} in {1 - frac:.0%} of batches, "
            f"even for the worst layer ({top.name})"
        )
    _title(fig, text)
    _CAPTIONS[fig] = (
        f"Distribution over the scanned batches of each of the {len(worst)} worst layers' per-batch "
        "mismatch, whose root mean square is the drift score (diamond): a wide spread means the layer "
        "depends on which samples share its batch."
    )
    return fig


# -- 5. end to end ---------------------------------------------------------------------------


def end_to_end_figure(report: ScanReport, patched: ScanReport | None = None) -> Figure:
    """What the drift does to the model's outputs: train path (batch statistics) against eval path.

    Panels, as measured: accuracy of each path (labels given), the fraction of equal predictions
    (classifiers), the relative RMS difference of the outputs; each before and, given the scan
    of a patched model, after the patch.

    Raises:
        NothingToPlot: no end-to-end comparison was measured.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    scenarios: list[tuple[str, ScanReport]] = [("before patch" if patched else "this scan", report)]
    if patched is not None:
        scenarios.append(("after patch", patched))
    if patched is None and not any(layer.batch_dependent for layer in report.layers):
        # Both paths are the same computation: a chart of 100% agreement would say nothing.
        raise NothingToPlot(_why_nothing_measured(report))
    measured = [(lbl, r, r.end_to_end) for lbl, r in scenarios]
    if all(e is None for _, _, e in measured):
        raise NothingToPlot(
            "the end-to-end comparison was not measured (it needs both the train and the eval path"
            + (
                ", and a batch-dependent layer to run them for)"
                if not measured_layers(report)
                else ")"
            )
        )
    has_acc = any(
        e is not None and e.acc_train is not None and e.acc_eval is not None for _, _, e in measured
    )
    has_agree = any(e is not None and e.agreement is not None for _, _, e in measured)
    has_div = any(e is not None and e.rel_divergence is not None for _, _, e in measured)
    panels = [p for p, on in (("acc", has_acc), ("agree", has_agree), ("div", has_div)) if on]
    if not panels:
        raise NothingToPlot("the end-to-end comparison recorded no finite number")
    widths = {"acc": 1.5 if patched else 1.1, "agree": 1.0, "div": 1.0}
    fig = S.new_figure(min(8.0, 1.2 + 2.3 * sum(widths[p] for p in panels)), 4.4)
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=[widths[p] for p in panels])[0]
    xs = list(range(len(scenarios)))
    labels = [lbl for lbl, _ in scenarios]

    def missing(ax: Axes, x: float, r: ScanReport, top: float) -> None:
        why = (
            "n/a: no batch-dependent\nlayers, paths identical" if not measured_layers(r) else "n/a"
        )
        ax.text(
            x,
            0.04 * top,
            why,
            ha="center",
            va="bottom",
            fontsize=S.SMALL_SIZE,
            rotation=90 if len(xs) > 2 else 0,
        )

    def value(ax: Axes, x: float, v: float, text: str) -> None:
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

    handles: list[Any] = []
    for ax, panel in zip(axes, panels, strict=True):
        S.style_axes(ax, grid="y")
        if panel == "acc":
            w = 0.38
            for x, (_, r, e) in zip(xs, measured, strict=True):
                if e is None or e.acc_train is None or e.acc_eval is None:
                    missing(ax, x, r, 100)
                    continue
                for dx, v, color, hatch in (
                    (-w / 2, e.acc_train, S.TRAIN_COLOR, ""),
                    (w / 2, e.acc_eval, S.EVAL_COLOR, "\\\\"),
                ):
                    ax.bar(
                        x + dx,
                        100 * v,
                        width=w,
                        color=color,
                        hatch=hatch,
                        edgecolor=S.EDGE_COLOR,
                        linewidth=0.5,
                    )
                    value(ax, x + dx, 100 * v, f"{100 * v:.1f}%")
            ax.set_ylim(0, 110)
            ax.set_ylabel("accuracy on the scanned data (%)", fontsize=S.LABEL_SIZE)
            ax.set_title("accuracy per path", fontsize=S.LABEL_SIZE)
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
        elif panel == "agree":
            for x, (_, r, e) in zip(xs, measured, strict=True):
                if e is None or e.agreement is None:
                    missing(ax, x, r, 100)
                    continue
                ax.bar(
                    x,
                    100 * e.agreement,
                    width=0.55,
                    color=S.OKABE_ITO["green"],
                    edgecolor=S.EDGE_COLOR,
                    linewidth=0.5,
                )
                value(ax, x, 100 * e.agreement, f"{100 * e.agreement:.1f}%")
            ax.axhline(
                100 * report.agreement_threshold,
                color=S.THRESHOLD_COLOR,
                linestyle="--",
                linewidth=1,
            )
            ax.set_ylim(0, 110)
            ax.set_ylabel("predictions equal in both paths (%)", fontsize=S.LABEL_SIZE)
            ax.set_title("prediction agreement", fontsize=S.LABEL_SIZE)
        else:
            vals = [
                e.rel_divergence
                for _, _, e in measured
                if e is not None and e.rel_divergence is not None
            ]
            top = max([*vals, report.divergence_threshold]) * 1.2
            for x, (_, r, e) in zip(xs, measured, strict=True):
                if e is None or e.rel_divergence is None:
                    missing(ax, x, r, top)
                    continue
                ax.bar(
                    x,
                    e.rel_divergence,
                    width=0.55,
                    color=S.OKABE_ITO["purple"],
                    edgecolor=S.EDGE_COLOR,
                    linewidth=0.5,
                )
                value(ax, x, e.rel_divergence, S.num(e.rel_divergence))
            ax.axhline(
                report.divergence_threshold, color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1
            )
            ax.set_ylim(0, top)
            ax.set_ylabel("RMS(y_train − y_eval) / RMS(y_train)", fontsize=S.LABEL_SIZE)
            ax.set_title("output divergence", fontsize=S.LABEL_SIZE)
        ax.set_xticks(xs, labels=labels)
        ax.set_xlim(-0.6, len(xs) - 0.4)
    handles.append(
        Line2D([], [], color=S.THRESHOLD_COLOR, linestyle="--", linewidth=1, label="harm threshold")
    )
    S.legend_below(fig, handles, ncols=3)
    _title(fig, _end_to_end_title(report, patched))
    _CAPTIONS[fig] = (
        "The model's outputs with batch statistics (train path, as in training) against running "
        "statistics (eval path, as at inference) on the same batches"
        + (", before and after the patch" if patched is not None else "")
        + "; the dashed lines are the levels above/below which eval mode counts as harmful."
    )
    return fig


def _end_to_end_title(report: ScanReport, patched: ScanReport | None) -> str:
    e = report.end_to_end
    if patched is not None:
        p = patched.end_to_end
        if e is not None and p is not None:
            if e.acc_eval is not None and p.acc_eval is not None:
                return f"After the patch, eval-mode accuracy is {S.pct(p.acc_eval)} (was {S.pct(e.acc_eval)})"
            if e.agreement is not None and p.agreement is not None:
                return f"After the patch, {S.pct(p.agreement)} of predictions agree across paths (was {S.pct(e.agreement)})"
            if e.rel_divergence is not None and p.rel_divergence is not None:
                return f"After the patch, output divergence is {S.num(p.rel_divergence)} (was {S.num(e.rel_divergence)})"
        if p is None and not measured_layers(patched):
            return "After the patch no batch-dependent layer is left: eval mode computes what training did"
    if e is None:
        return "Eval mode was compared with the train path only after the patch"
    acc = (
        f": accuracy {S.pct(e.acc_train)} with batch statistics, {S.pct(e.acc_eval)} in eval mode"
        if e.acc_train is not None and e.acc_eval is not None
        else ""
    )
    if e.agreement is not None:
        if report.harmful:
            return f"Eval mode changes {S.pct(1 - e.agreement)} of predictions{acc}"
        return f"Eval mode keeps {S.pct(e.agreement)} of predictions{acc}"
    if e.rel_divergence is not None:
        verb = "harmful" if report.harmful else "within tolerance"
        return f"Eval-mode outputs differ by {S.num(e.rel_divergence)} (relative RMS): {verb}"
    return "End-to-end comparison: outputs not finite"

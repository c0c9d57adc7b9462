"""What each figure of one report shows, as data: the layers, values, marks, labels and title.

A ``*_spec`` function reads a :class:`~normdoctor.report.ScanReport` and returns a small frozen
dataclass; :mod:`normdoctor.render.draw` turns it into a matplotlib ``Figure``.  Nothing here
imports matplotlib, so tests (and other front ends) can check what a figure says without
drawing it.  A figure that would be empty raises :class:`NothingToPlot` with the reason.
The end-to-end figure is in :mod:`normdoctor.render.end_to_end`, the figures over several
reports (batch-size sweep, checkpoint series) in :mod:`normdoctor.render.trends`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..report import LayerReport, LayerStatus, ScanReport
from . import style as S

__all__ = [
    "MAX_NAMED_BARS",
    "MAX_POINTS",
    "BatchRow",
    "BatchesSpec",
    "ChannelPanel",
    "ChannelRow",
    "ChannelsSpec",
    "DriftBar",
    "DriftSpec",
    "NothingToPlot",
    "batches_spec",
    "by_drift",
    "channels_spec",
    "decomposition_gap",
    "drift_spec",
    "measured_layers",
    "percent_up",
    "why_nothing_measured",
]

#: Up to this many layers, the drift overview names every bar; above, it numbers them.
MAX_NAMED_BARS = 40
#: Batches drawn as points per layer in the distribution figure (all of them enter the quantiles).
MAX_POINTS = 400


class NothingToPlot(ValueError):
    """The figure would be empty; the message says why (shown on the page instead)."""


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


def why_nothing_measured(report: ScanReport) -> str:
    """Why ``report`` has no measured layer to draw, in one clause."""
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


def by_drift(rows: Iterable[tuple[int, LayerReport]], k: int) -> list[tuple[int, LayerReport]]:
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


# -- 1. drift per layer ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DriftBar:
    """One measured layer's bar: its drift split into shift, noise and unsplit parts."""

    index: int  # the layer's # (1-based position in report.layers)
    name: str
    drift: float
    shift_part: float
    noise_part: float
    rest_part: float  # the part whose shift/noise split was not measured
    status: LayerStatus


@dataclass(frozen=True, slots=True)
class DriftSpec:
    """The drift overview: one bar per measured layer in forward order, and the threshold."""

    bars: tuple[DriftBar, ...]
    threshold: float
    named: bool  # bars named on the axis (else numbered by # with the worst listed beside)
    n_layers: int  # len(report.layers): the numbered axis runs to it
    worst: tuple[DriftBar, ...]  # numbered view: the worst layers, worst first
    value_label: str
    layer_label: str
    title: str
    caption: str
    axis_top: float | None = None  # at least this much axis (a before/after pair shares one)

    @property
    def top(self) -> float:
        """The largest value the axis must show: the worst drift, the threshold, ``axis_top``."""
        return max(max(b.drift for b in self.bars), self.threshold, self.axis_top or 0.0)

    @property
    def statuses(self) -> tuple[LayerStatus, ...]:
        return tuple(b.status for b in self.bars)

    @property
    def worst_lines(self) -> tuple[str, ...]:
        """The numbered view's list of the worst layers (monospace text beside the bars)."""
        head = f"worst {len(self.worst)} of {len(self.bars)} layers"
        rows = (
            f"#{b.index:<4d} {S.num(b.drift):>6}  {S.esc(S.shorten(b.name, 28))}"
            for b in self.worst
        )
        return (head, *rows)


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


def _drift_caption(report: ScanReport, n: int, statuses: set[LayerStatus]) -> str:
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
    return (
        f"Drift of each of the {n} measured batch-dependent layers in forward order, "
        f"each bar split in proportion to population shift² and batch noise²{gap_text}; "
        + "".join(f"{m}, " for m in marks)
        + ("and " if marks else "")
        + f"the dashed line is the threshold {report.threshold:g}."
    )


def drift_spec(
    report: ScanReport,
    *,
    max_named: int = MAX_NAMED_BARS,
    list_worst: int = 10,
    axis_top: float | None = None,
) -> DriftSpec:
    """What :func:`~normdoctor.render.plots.drift_figure` shows (its docstring says how)."""
    rows = measured_layers(report)
    if not rows:
        raise NothingToPlot(why_nothing_measured(report))
    bars = tuple(
        DriftBar(i, layer.name, layer.drift or 0.0, *_split(layer), layer.status)
        for i, layer in rows
    )
    by_index = {b.index: b for b in bars}
    named = len(rows) <= max_named
    layer_label = (
        "layer (forward order)"
        if named
        else "layer # in forward order (the report's table lists every #)"
    )
    return DriftSpec(
        bars=bars,
        threshold=report.threshold,
        named=named,
        n_layers=len(report.layers),
        worst=tuple(by_index[i] for i, _ in by_drift(rows, list_worst)),
        value_label=S.DRIFT_LABEL,
        layer_label=layer_label,
        title=_drift_title(report, rows),
        caption=_drift_caption(report, len(rows), {b.status for b in bars}),
        axis_top=axis_top,
    )


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


@dataclass(frozen=True, slots=True)
class ChannelPanel:
    """One statistic of one layer: running (x) against observed (y), one point per channel."""

    what: str  # "mean" or "variance"
    log: bool  # log scales (variances)
    live: tuple[tuple[float, ...], tuple[float, ...]]  # (xs, ys) of channels with γ ≠ 0
    dead: tuple[tuple[float, ...], tuple[float, ...]]  # (xs, ys) of channels with γ ≈ 0
    limits: tuple[float, float] | None  # both axes' range (None: no finite value)

    @property
    def xlabel(self) -> str:
        return f"running {self.what} (used in eval mode)"

    @property
    def ylabel(self) -> str:
        return f"observed {self.what} (all scanned samples)"


@dataclass(frozen=True, slots=True)
class ChannelRow:
    index: int
    name: str
    label: str  # the row's heading, above the mean panel
    has_dead: bool  # some channel has γ ≈ 0 (drawn hollow)
    mean: ChannelPanel
    var: ChannelPanel


@dataclass(frozen=True, slots=True)
class ChannelsSpec:
    rows: tuple[ChannelRow, ...]  # the worst layers, worst first
    any_dead: bool
    title: str
    caption: str


def _channel_panel(
    what: str,
    xs: Sequence[float | None],
    ys: Sequence[float | None],
    live: list[int],
    dead: list[int],
) -> ChannelPanel:
    positive = what == "variance"
    lx, ly = _pairs(xs, ys, live, positive)
    dx, dy = _pairs(xs, ys, dead, positive)
    vals = lx + ly + dx + dy
    limits = None
    if vals:
        lo, hi = min(vals), max(vals)
        if positive:
            lo, hi = lo / 1.5, hi * 1.5
        else:
            span = hi - lo if hi > lo else max(abs(hi), 1.0)
            lo, hi = lo - 0.08 * span, hi + 0.08 * span
        limits = (lo, hi)
    return ChannelPanel(what, positive, (tuple(lx), tuple(ly)), (tuple(dx), tuple(dy)), limits)


def _channel_row(i: int, layer: LayerReport) -> ChannelRow:
    head = layer.headline
    assert head is not None
    n = min(len(layer.running_mean), len(head.pooled_mean))
    dead = set(layer.dead_channels)
    live_idx = [c for c in range(n) if c not in dead]
    dead_idx = sorted(dead & set(range(n)))
    flag = " [flagged]" if layer.flagged else ""
    label = S.esc(
        f"#{i} {S.shorten(layer.name, 30)}{flag}: drift {S.num(layer.drift)}, shift {S.num(layer.shift)}"
    )
    return ChannelRow(
        i,
        layer.name,
        label,
        bool(dead),
        _channel_panel("mean", layer.running_mean, head.pooled_mean, live_idx, dead_idx),
        _channel_panel("variance", layer.running_var, head.pooled_var, live_idx, dead_idx),
    )


def _channels_title(report: ScanReport, worst: list[tuple[int, LayerReport]]) -> str:
    off = [layer for _, layer in worst if (layer.shift or 0.0) > report.threshold]
    stale = [layer for layer in off if (layer.shift or 0.0) >= (layer.noise or 0.0)]
    noisy = [layer for layer in off if layer not in stale]

    def names(layers: list[LayerReport]) -> str:
        return ", ".join(S.named(layer.name) for layer in layers[:3]) + (
            " …" if len(layers) > 3 else ""
        )

    if stale:
        return (
            f"Running statistics of {names(stale)} miss the observed ones: stale, "
            "recalibration targets them"
        )
    if noisy:
        top = noisy[0]
        return (
            f"Running statistics of {names(noisy)} miss the observed ones (shift "
            f"{S.num(top.shift)}), yet batch noise ({S.num(top.noise)}) dominates: "
            "recalibration alone will not fix it"
        )
    top_shift = max((layer.shift or 0.0) for _, layer in worst)
    return (
        f"Running statistics sit near the observed ones (shift ≤ {top_shift:.2g}): "
        "the drift is not stale statistics"
    )


def channels_spec(report: ScanReport, k: int = 4) -> ChannelsSpec:
    """What :func:`~normdoctor.render.plots.channels_figure` shows (its docstring says how)."""
    rows = [
        (i, layer)
        for i, layer in measured_layers(report)
        if layer.running_mean and layer.headline is not None and layer.headline.pooled_mean
    ]
    if not rows:
        raise NothingToPlot(
            why_nothing_measured(report)
            if not measured_layers(report)
            else "no measured layer carries per-channel running statistics"
        )
    worst = by_drift(rows, k)
    panels = tuple(_channel_row(i, layer) for i, layer in worst)
    return ChannelsSpec(
        rows=panels,
        any_dead=any(row.has_dead for row in panels),
        title=_channels_title(report, worst),
        caption=(
            f"For the {len(worst)} worst layer(s), each channel's running mean and variance (used "
            "in eval mode) against the exact ones observed over all scanned samples; points off "
            "the dashed identity line are the population shift that recalibration removes."
        ),
    )


# -- 4. per-batch distribution ---------------------------------------------------------------


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class BatchRow:
    """One layer's per-batch mismatch: the points drawn and the quantiles of all batches."""

    index: int
    name: str
    label: str  # the tick label: #, name, flag, number of batches
    points: tuple[float, ...]  # D_b of the batches drawn (at most MAX_POINTS, sampled)
    jitter: tuple[float, ...]  # each point's vertical offset
    quantiles: tuple[float, float, float, float, float]  # 5th, 25th, 50th, 75th, 95th
    drift: float  # the drift score: RMS over all batches


@dataclass(frozen=True, slots=True)
class BatchesSpec:
    rows: tuple[BatchRow, ...]  # the worst layers, worst first
    threshold: float
    xlabel: str
    title: str
    caption: str


def _batches_title(report: ScanReport, top: LayerReport, vals: list[float]) -> str:
    threshold = report.threshold
    frac = sum(1 for v in vals if v > threshold) / len(vals)
    name = S.named(top.name)
    if frac >= 0.5:
        return f"{name}: {frac:.0%} of batches exceed {threshold:g}: the mismatch is systematic, not a few bad batches"
    if (top.drift or 0.0) > threshold:
        return (
            f"{name}: a few batches dominate ({frac:.0%} exceed {threshold:g}; "
            f"worst batch {top.headline.worst_batch if top.headline else '?'} at {S.num(top.drift_worst)})"
        )
    return (
        f"Per-batch mismatch stays below {threshold:g} in {1 - frac:.0%} of batches, "
        f"even for the worst layer ({top.name})"
    )


def batches_spec(report: ScanReport, k: int = 6) -> BatchesSpec:
    """What :func:`~normdoctor.render.plots.batch_distribution_figure` shows."""
    import numpy as np

    rows = [
        (i, layer, vals)
        for i, layer in measured_layers(report)
        if layer.headline is not None and (vals := _finite(layer.headline.batch_drift))
    ]
    if not rows:
        raise NothingToPlot(
            why_nothing_measured(report)
            if not measured_layers(report)
            else "no per-batch mismatch recorded"
        )
    if max(len(v) for _, _, v in rows) < 2:
        raise NothingToPlot(
            "every layer saw a single batch: there is no distribution over batches to show"
        )
    worst = sorted(rows, key=lambda r: -(r[1].drift or 0.0))[:k]
    rng = np.random.default_rng(0)  # the same points and jitter every time
    out = []
    for i, layer, vals in worst:
        pts = np.asarray(vals)
        if len(pts) > MAX_POINTS:
            pts = rng.choice(pts, MAX_POINTS, replace=False)
        jitter = rng.uniform(-0.22, 0.22, len(pts))
        sv = sorted(vals)
        q05, q25, q50, q75, q95 = (_quantile(sv, q) for q in (0.05, 0.25, 0.5, 0.75, 0.95))
        label = S.esc(
            f"#{i} {S.shorten(layer.name, 26)}"
            + (" [flagged]" if layer.flagged else "")
            + f"\n{len(vals)} batches"
        )
        points = tuple(float(v) for v in pts)
        out.append(
            BatchRow(
                i,
                layer.name,
                label,
                points,
                tuple(float(j) for j in jitter),
                (q05, q25, q50, q75, q95),
                layer.drift or 0.0,  # measured: never None
            )
        )
    return BatchesSpec(
        rows=tuple(out),
        threshold=report.threshold,
        xlabel="per-batch mismatch D_b = RMS(y_train − y_eval) / RMS(γ) on one batch",
        title=_batches_title(report, worst[0][1], worst[0][2]),
        caption=(
            f"Distribution over the scanned batches of each of the {len(worst)} worst layers' "
            "per-batch mismatch, whose root mean square is the drift score (diamond): a wide "
            "spread means the layer depends on which samples share its batch."
        ),
    )

"""What the figures over several reports show, as data: the batch-size sweep and the series.

Like :mod:`normdoctor.render.specs`, nothing here imports matplotlib: each ``*_spec`` function
returns a frozen dataclass that :mod:`normdoctor.render.draw_trends` draws.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..report import EndToEnd, LayerReport, LayerStatus, ScanReport
from . import style as S
from .specs import NothingToPlot, measured_layers, why_nothing_measured

__all__ = [
    "MAX_SERIES_TICKS",
    "Curve",
    "Curves",
    "Lower",
    "SeriesSpec",
    "SweepSpec",
    "series_spec",
    "sweep_batch_size",
    "sweep_spec",
]

#: Checkpoints named on the series figure's axis; above, every n-th (first flagged and last kept).
MAX_SERIES_TICKS = 24


@dataclass(frozen=True, slots=True)
class Curve:
    """One line: a name (its legend label where it has one) and one value per x (NaN: none)."""

    name: str
    values: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Curves:
    """Drift per layer over the x axis: the ``chosen`` in colour, the rest grey, their median."""

    curves: tuple[Curve, ...]  # every layer, in the order first measured
    chosen: tuple[str, ...]  # the highest peaks, highest first
    median: tuple[float, ...] | None  # once there are more layers than colours (k)

    @property
    def others(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.curves if c.name not in self.chosen)

    def of(self, name: str) -> tuple[float, ...]:
        return next(c.values for c in self.curves if c.name == name)


@dataclass(frozen=True, slots=True)
class Lower:
    """The lower panel: what the drift does to the outputs, one line per quantity.

    ``kind`` "acc" (the lines are "acc_train", "acc_eval" and maybe "agreement"), "agree" or
    "div"; a line's ``name`` is the :class:`~normdoctor.report.EndToEnd` field it shows.
    """

    kind: str
    lines: tuple[Curve, ...]
    threshold: float | None  # the harm level in the panel's units
    ylabel: str
    ylim: tuple[float, float | None]  # (bottom, top; None: automatic)
    text: str = ""  # what the panel shows, for the caption


def _curves(
    names: Iterable[str], values: Mapping[str, list[float]], k: int, n_x: int, limit: int
) -> Curves:
    """``limit`` layers in colour (the highest peaks), a median once there are more than ``k``."""
    peak = {nm: max((y for y in ys if math.isfinite(y)), default=0.0) for nm, ys in values.items()}
    chosen = sorted(values, key=lambda nm: -peak[nm])[:limit]
    median = None
    if len(values) > k:
        median = tuple(
            statistics.median(v)
            if (v := [ys[j] for ys in values.values() if math.isfinite(ys[j])])
            else math.nan
            for j in range(n_x)
        )
    return Curves(tuple(Curve(nm, tuple(values[nm])) for nm in names), tuple(chosen), median)


def _peak(curves: Curves) -> float:
    return max(
        (max((y for y in c.values if math.isfinite(y)), default=0.0) for c in curves.curves),
        default=0.0,
    )


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


@dataclass(frozen=True, slots=True)
class SweepSpec:
    sizes: tuple[int, ...]  # the batch sizes scanned, ascending
    curves: Curves
    threshold: float
    train_batch_size: int | None
    lower: Lower | None
    ticks: tuple[int, ...]
    xlabel: str
    title: str
    caption: str


def _sweep_lower(items: list[tuple[int, ScanReport]], e2e: list[EndToEnd | None]) -> Lower | None:
    # Lower panel, the most telling measurement available: accuracy of both paths (labels
    # given) shows at which batch size batch statistics work, which drift alone cannot (drift
    # always grows as batches shrink, whatever the training batch size was).
    def of(attr: str, scale: float) -> tuple[float, ...]:
        vals = [None if e is None else getattr(e, attr) for e in e2e]
        return tuple(scale * v if v is not None else math.nan for v in vals)

    if any(e is not None and e.acc_train is not None and e.acc_eval is not None for e in e2e):
        lines = (Curve("acc_train", of("acc_train", 100)), Curve("acc_eval", of("acc_eval", 100)))
        return Lower("acc", lines, None, "accuracy on the\nscanned data (%)", (0, 104))
    if any(e is not None and e.agreement is not None for e in e2e):
        return Lower(
            "agree",
            (Curve("agreement", of("agreement", 100)),),
            100 * items[0][1].agreement_threshold,
            "predictions equal in\ntrain and eval path (%)",
            (0, 104),
        )
    if any(e is not None and e.rel_divergence is not None for e in e2e):
        return Lower(
            "div",
            (Curve("rel_divergence", of("rel_divergence", 1)),),
            items[0][1].divergence_threshold,
            "output divergence\nRMS(y_t − y_e)/RMS(y_t)",
            (0, None),
        )
    return None


def _sweep_accuracy_text(sizes: Sequence[int], lower: Lower | None) -> str:
    if lower is None or lower.kind != "acc":
        return ""
    acc_t, acc_e = lower.lines[0].values, lower.lines[1].values
    finite = [j for j, v in enumerate(acc_t) if math.isfinite(v)]
    if not finite:
        return ""
    best = max(finite, key=lambda j: acc_t[j])
    b, at, ae = sizes[best], acc_t[best], acc_e[best]
    return f"batch statistics are most accurate at batch size {b} ({at:.1f}%), " + (
        f"eval mode loses accuracy ({ae:.1f}%)"
        if math.isfinite(ae) and at - ae > 1.0
        else f"eval mode matches them ({ae:.1f}%)"
    )


def _sweep_title(
    spec_sizes: Sequence[int], curves: Curves, threshold: float, train: int | None
) -> str:
    sizes = list(spec_sizes)
    above = {
        b: sum(1 for c in curves.curves if math.isfinite(c.values[j]) and c.values[j] > threshold)
        for j, b in enumerate(sizes)
    }
    total = len(curves.curves)
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
    if train is not None:
        at_train = above.get(train)
        text += f"; training batch size {train}" + (
            (f": {at_train} drifting" if at_train else ": none drifting")
            if at_train is not None
            else " (not scanned)"
        )
    return text


def _sweep_caption(items: list[tuple[int, ScanReport]], curves: Curves, lower: Lower | None) -> str:
    sizes = [b for b, _ in items]
    comp = items[0][1].composition
    grouping = f", each batch from one {comp.group_by}" if comp.group_by else ""
    kind = lower.kind if lower is not None else None
    return (
        f"Drift of every measured layer when scanned at batch sizes {', '.join(map(str, sizes))}"
        f"{grouping} (the {len(curves.chosen)} highest in colour, the others grey)"
        + (", with the accuracy of both paths below" if kind == "acc" else "")
        + (", with the agreement of the two paths below" if kind == "agree" else "")
        + (", with the output divergence below" if kind == "div" else "")
        + (
            "; drift always grows as batches shrink, but the batch size at which batch "
            "statistics are most accurate hints at the one training used."
            if kind == "acc"
            else "; drift always grows as batches shrink, so drift alone does not reveal the "
            "training batch size (labels would)."
        )
    )


def sweep_spec(
    reports_by_batch_size: Mapping[int, ScanReport] | Iterable[ScanReport],
    train_batch_size: int | None = None,
    *,
    k: int = 6,
) -> SweepSpec:
    """What :func:`~normdoctor.render.plots.sweep_figure` shows (its docstring says how)."""
    items = _sweep_items(reports_by_batch_size)
    if len(items) < 2:
        raise NothingToPlot("a batch-size sweep needs at least two batch sizes")
    sizes = [b for b, _ in items]
    names: dict[str, None] = {}
    for _, r in items:
        for _, layer in measured_layers(r):
            names.setdefault(layer.name)
    if not names:
        raise NothingToPlot(why_nothing_measured(items[0][1]))
    values: dict[str, list[float]] = {}
    for name in names:
        ys = []
        for _, r in items:
            try:
                d = r.layer(name).drift
            except KeyError:
                d = None
            ys.append(math.nan if d is None else d)
        values[name] = ys
    threshold = items[0][1].threshold
    curves = _curves(names, values, k, len(sizes), k)
    lower = _sweep_lower(items, [r.end_to_end for _, r in items])
    text = _sweep_title(sizes, curves, threshold, train_batch_size)
    acc_text = _sweep_accuracy_text(sizes, lower)
    text = (
        f"{acc_text[:1].upper()}{acc_text[1:]}; {text}" if acc_text else text[:1].upper() + text[1:]
    )
    return SweepSpec(
        sizes=tuple(sizes),
        curves=curves,
        threshold=threshold,
        train_batch_size=train_batch_size,
        lower=lower,
        ticks=tuple(sorted(set(sizes) | ({train_batch_size} if train_batch_size else set()))),
        xlabel="batch size of the scan (samples per batch, log scale)",
        title=text,
        caption=_sweep_caption(items, curves, lower),
    )


# -- 3b. checkpoint series -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeriesSpec:
    n: int  # checkpoints, at x = 0 .. n-1
    curves: Curves
    marks: Mapping[LayerStatus, tuple[tuple[float, float], ...]]  # flagged, harmless points
    thresholds: tuple[float, ...]  # per checkpoint
    drift_top: float  # the highest drift or threshold shown
    lower: Lower | None
    threshold_label: str
    first: int | None  # the first flagged checkpoint
    first_label: str
    ticks: tuple[int, ...]
    tick_labels: tuple[str, ...]
    bold: tuple[bool, ...]  # per tick: the checkpoint is flagged
    rotate: bool  # slanted tick labels (they would run together)
    extra_height: float  # inches the slanted labels take
    ylabel: str
    xlabel: str
    title: str
    caption: str


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


def _series_title(reports: Sequence[ScanReport], curves: Curves) -> str:
    first = _series_first_flagged(reports)
    if first is None:
        best = (-1.0, "", 0)
        for c in curves.curves:
            for j, y in enumerate(c.values):
                if math.isfinite(y) and y > best[0]:
                    best = (y, c.name, j)
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


def _series_lower(reports: Sequence[ScanReport]) -> Lower | None:
    e2e = [r.end_to_end for r in reports]

    def series_of(attr: str, scale: float) -> Curve:
        out = []
        for e in e2e:
            v = None if e is None else getattr(e, attr)
            out.append(scale * v if v is not None and math.isfinite(v) else math.nan)
        return Curve(attr, tuple(out))

    has_acc = any(e is not None and e.acc_train is not None and e.acc_eval is not None for e in e2e)
    has_agree = any(e is not None and e.agreement is not None for e in e2e)
    if has_acc or has_agree:
        lines = ((series_of("acc_train", 100), series_of("acc_eval", 100)) if has_acc else ()) + (
            (series_of("agreement", 100),) if has_agree else ()
        )
        return Lower(
            "acc" if has_acc else "agree",
            lines,
            100 * reports[-1].agreement_threshold if has_agree else None,
            "accuracy / agreement (%)"
            if has_acc and has_agree
            else "accuracy on the\nscanned data (%)"
            if has_acc
            else "predictions equal in\ntrain and eval path (%)",
            (0, 104),
            "the prediction agreement of the two paths and the accuracy of each"
            if has_acc and has_agree
            else "the accuracy of each path"
            if has_acc
            else "the prediction agreement of the two paths",
        )
    if any(e is not None and e.rel_divergence is not None for e in e2e):
        return Lower(
            "div",
            (series_of("rel_divergence", 1),),
            reports[-1].divergence_threshold,
            "output divergence",
            (0, None),
            "the output divergence of the two paths",
        )
    return None


def _series_curves(
    reports: Sequence[ScanReport], k: int
) -> tuple[Curves, list[list[LayerReport | None]]]:
    """Drift per layer and checkpoint, and each layer's report per checkpoint (None: absent)."""
    by_name = [{layer.name: layer for layer in r.layers} for r in reports]
    names: dict[str, None] = {}
    for r in reports:
        for _, layer in measured_layers(r):
            names.setdefault(layer.name)
    if not names:
        raise NothingToPlot(
            f"none of the {len(reports)} checkpoints has a measured batch-dependent layer: "
            + why_nothing_measured(reports[-1])
        )
    at = [[layers.get(name) for layers in by_name] for name in names]
    values: dict[str, list[float]] = {
        name: [
            float(layer.drift)
            if layer is not None
            and layer.batch_dependent
            and layer.drift is not None
            and math.isfinite(layer.drift)
            else math.nan
            for layer in row
        ]
        for name, row in zip(names, at, strict=True)
    }
    return _curves(names, values, k, len(reports), max(k, 0)), at


def _series_marks(
    curves: Curves, at: list[list[LayerReport | None]]
) -> dict[LayerStatus, tuple[tuple[float, float], ...]]:
    marks: dict[LayerStatus, list[tuple[float, float]]] = {
        LayerStatus.FLAGGED: [],
        LayerStatus.HARMLESS: [],
    }
    for curve, row in zip(curves.curves, at, strict=True):
        for j, layer in enumerate(row):
            y = curve.values[j]
            if layer is not None and math.isfinite(y) and layer.status in marks:
                marks[layer.status].append((float(j), y))
    return {status: tuple(points) for status, points in marks.items()}


def _series_threshold_label(reports: Sequence[ScanReport], lower: Lower | None) -> str:
    thresholds = [r.threshold for r in reports]
    drift_t = f"drift {thresholds[0]:g}" if len(set(thresholds)) == 1 else "drift (per checkpoint)"
    has_agree = lower is not None and any(c.name == "agreement" for c in lower.lines)
    harm_t = (
        f", agreement {100 * reports[-1].agreement_threshold:g}% (bottom)"
        if has_agree
        else f", divergence {reports[-1].divergence_threshold:g} (bottom)"
        if lower is not None and lower.kind == "div"
        else ""
    )
    return f"threshold: {drift_t}{' (top)' if harm_t else ''}{harm_t}"


def _series_caption(
    n: int,
    curves: Curves,
    marks: Mapping[LayerStatus, Sequence[tuple[float, float]]],
    thresholds: Sequence[float],
    lower: Lower | None,
) -> str:
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
    others = curves.others
    below = lower.text if lower is not None else ""
    return (
        f"Drift of every measured batch-dependent layer in each of the {n} checkpoints, in the "
        f"order given"
        + (
            f" (the {len(curves.chosen)} highest in colour, the other {len(others)} grey)"
            if others
            else ""
        )
        + f"; {marks_text}the dashed line is the threshold"
        + (f" {thresholds[0]:g}" if len(set(thresholds)) == 1 else "")
        + (f", with {below} below" if below else "")
        + "."
    )


def _series_axis(
    reports: Sequence[ScanReport], first: int | None
) -> tuple[list[int], list[str], bool, float, str]:
    """(ticks, their labels, slanted, the height they add, the axis label)."""
    n = len(reports)
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
    common = f" ({prefix}*{suffix})" if prefix or suffix else ""
    xlabel = S.esc(
        f"checkpoint{common}, in the order given"
        + ("; flagged ones in bold" if first is not None else "")
    )
    return ticks, labels, rotate, extra, xlabel


def series_spec(reports: Sequence[ScanReport], *, k: int = 6) -> SeriesSpec:
    """What :func:`~normdoctor.render.plots.series_figure` shows (its docstring says how)."""
    reports = list(reports)
    if len(reports) < 2:
        raise NothingToPlot(
            f"a checkpoint series needs at least two checkpoints (got {len(reports)})"
        )
    curves, at = _series_curves(reports, k)
    first = _series_first_flagged(reports)
    lower = _series_lower(reports)
    ticks, labels, rotate, extra, xlabel = _series_axis(reports, first)
    marks = _series_marks(curves, at)
    thresholds = tuple(r.threshold for r in reports)
    return SeriesSpec(
        n=len(reports),
        curves=curves,
        marks=marks,
        thresholds=thresholds,
        drift_top=max([_peak(curves), *thresholds]),
        lower=lower,
        threshold_label=_series_threshold_label(reports, lower),
        first=first,
        first_label=""
        if first is None
        else S.esc(f"first flagged: {S.shorten(reports[first].model, 30)}"),
        ticks=tuple(ticks),
        tick_labels=tuple(labels),
        bold=tuple(reports[j].flagged for j in ticks),
        rotate=rotate,
        extra_height=extra,
        ylabel=S.DRIFT_LABEL.replace(", ", "\n", 1),
        xlabel=xlabel,
        title=_series_title(reports, curves),
        caption=_series_caption(len(reports), curves, marks, thresholds, lower),
    )

"""What the end-to-end figure shows, as data: the model's outputs on the train and eval path.

Like :mod:`normdoctor.render.specs`, nothing here imports matplotlib: :func:`end_to_end_spec`
returns a frozen dataclass that :func:`normdoctor.render.draw.end_to_end` draws.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..report import EndToEnd, ScanReport
from . import style as S
from .specs import NothingToPlot, measured_layers, why_nothing_measured

__all__ = ["EndToEndPanel", "EndToEndSpec", "end_to_end_spec"]


# -- 5. end to end ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndToEndPanel:
    """One comparison of the two paths, one group of bars per scenario (None: not measured).

    ``kind`` "acc": (train path, eval path) accuracy in percent; "agree": (agreement in percent,);
    "div": (relative output divergence,).
    """

    kind: str
    title: str
    ylabel: str
    values: tuple[tuple[float, ...] | None, ...]
    texts: tuple[tuple[str, ...], ...]  # the value printed over each bar
    ylim: float  # the axis' upper limit
    missing_y: float  # where "n/a" is written
    threshold: float | None  # the harm level drawn as a dashed line


@dataclass(frozen=True, slots=True)
class EndToEndSpec:
    labels: tuple[str, ...]  # the scenarios: "this scan", or "before patch", "after patch"
    missing: tuple[str, ...]  # per scenario, what a panel says where it was not measured
    panels: tuple[EndToEndPanel, ...]
    widths: tuple[float, ...]  # the panels' relative widths
    title: str
    caption: str


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


def _e2e_panel(kind: str, report: ScanReport, measured: list[EndToEnd | None]) -> EndToEndPanel:
    values: list[tuple[float, ...] | None] = []
    if kind == "acc":
        for e in measured:
            if e is None or e.acc_train is None or e.acc_eval is None:
                values.append(None)
            else:
                values.append((100 * e.acc_train, 100 * e.acc_eval))
        texts = tuple(tuple(f"{v:.1f}%" for v in vs) if vs else () for vs in values)
        return EndToEndPanel(
            kind,
            "accuracy per path",
            "accuracy on the scanned data (%)",
            tuple(values),
            texts,
            110,
            0.04 * 100,
            None,
        )
    if kind == "agree":
        for e in measured:
            values.append(
                (100 * e.agreement,) if e is not None and e.agreement is not None else None
            )
        texts = tuple(tuple(f"{v:.1f}%" for v in vs) if vs else () for vs in values)
        return EndToEndPanel(
            kind,
            "prediction agreement",
            "predictions equal in both paths (%)",
            tuple(values),
            texts,
            110,
            0.04 * 100,
            100 * report.agreement_threshold,
        )
    divs = [e.rel_divergence if e is not None else None for e in measured]
    top = max([*(v for v in divs if v is not None), report.divergence_threshold]) * 1.2
    values = [(v,) if v is not None else None for v in divs]
    texts = tuple((S.num(vs[0]),) if vs else () for vs in values)
    return EndToEndPanel(
        kind,
        "output divergence",
        "RMS(y_train − y_eval) / RMS(y_train)",
        tuple(values),
        texts,
        top,
        0.04 * top,
        report.divergence_threshold,
    )


def end_to_end_spec(report: ScanReport, patched: ScanReport | None = None) -> EndToEndSpec:
    """What :func:`~normdoctor.render.plots.end_to_end_figure` shows (its docstring says how)."""
    scenarios: list[tuple[str, ScanReport]] = [("before patch" if patched else "this scan", report)]
    if patched is not None:
        scenarios.append(("after patch", patched))
    if patched is None and not any(layer.batch_dependent for layer in report.layers):
        # Both paths are the same computation: a chart of 100% agreement would say nothing.
        raise NothingToPlot(why_nothing_measured(report))
    measured = [r.end_to_end for _, r in scenarios]
    if all(e is None for e in measured):
        raise NothingToPlot(
            "the end-to-end comparison was not measured (it needs both the train and the eval path"
            + (
                ", and a batch-dependent layer to run them for)"
                if not measured_layers(report)
                else ")"
            )
        )
    has_acc = any(
        e is not None and e.acc_train is not None and e.acc_eval is not None for e in measured
    )
    has_agree = any(e is not None and e.agreement is not None for e in measured)
    has_div = any(e is not None and e.rel_divergence is not None for e in measured)
    kinds = [p for p, on in (("acc", has_acc), ("agree", has_agree), ("div", has_div)) if on]
    if not kinds:
        raise NothingToPlot("the end-to-end comparison recorded no finite number")
    widths = {"acc": 1.5 if patched else 1.1, "agree": 1.0, "div": 1.0}
    return EndToEndSpec(
        labels=tuple(lbl for lbl, _ in scenarios),
        missing=tuple(
            "n/a: no batch-dependent\nlayers, paths identical" if not measured_layers(r) else "n/a"
            for _, r in scenarios
        ),
        panels=tuple(_e2e_panel(kind, report, measured) for kind in kinds),
        widths=tuple(widths[kind] for kind in kinds),
        title=_end_to_end_title(report, patched),
        caption=(
            "The model's outputs with batch statistics (train path, as in training) against "
            "running statistics (eval path, as at inference) on the same batches"
            + (", before and after the patch" if patched is not None else "")
            + "; the dashed lines are the levels above/below which eval mode counts as harmful."
        ),
    )

"""Terminal rendering with rich: layer tables, the verdict, the batch-size sweep.

Colour carries meaning but never alone: every status is also a word and a symbol, so output
without colour (a CI log, ``NO_COLOR``) reads the same.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..report import LayerReport, LayerStatus, ScanReport, Verdict

if TYPE_CHECKING:
    from ..checks import Finding
    from ..layers import NormLayer

__all__ = [
    "drift_grid",
    "layers_table",
    "print_scan",
    "print_series",
    "print_sweep",
    "scan_table",
    "sweep_table",
]

STATUS_STYLE = {
    LayerStatus.FLAGGED: ("✗ flagged", "bold red"),
    LayerStatus.HARMLESS: ("~ harmless", "yellow"),
    LayerStatus.DRIFTS: ("? drifts", "yellow"),
    LayerStatus.OK: ("✓ ok", "green"),
    LayerStatus.NOT_EXECUTED: ("? not run", "magenta"),
    LayerStatus.NOT_MEASURABLE: ("? n/m at bs", "magenta"),
    LayerStatus.NOT_MEASURED: ("- n/a", "dim"),
}


def _num(x: float | None, decimals: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{decimals}f}" if abs(x) < 1000 else f"{x:.3g}"


def _status(layer: LayerReport) -> Text:
    word, style = STATUS_STYLE[layer.status]
    return Text(word, style=style)


def scan_table(report: ScanReport, *, width: int | None = None) -> Table:
    """Layers in forward order with drift, shift, noise, non-i.i.d. ratio, status and fix.

    Below 100 columns the kind and worst-batch columns are dropped so the rest stays readable.
    """
    wide = width is None or width >= 100
    table = Table(title=None, box=None, pad_edge=False, header_style="bold", show_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("layer", overflow="fold", ratio=3)
    if wide:
        table.add_column("kind")
    table.add_column("ch", justify="right")
    table.add_column("drift", justify="right")
    if wide:
        table.add_column("worst", justify="right")
    table.add_column("shift", justify="right")
    table.add_column("noise", justify="right")
    table.add_column("noniid", justify="right")
    table.add_column("status", no_wrap=True)
    table.add_column("fix", no_wrap=True)
    for i, layer in enumerate(report.layers):
        drift = Text(_num(layer.drift), style="bold" if layer.flagged else "")
        row: list[str | Text] = [str(i), layer.name or "<root>"]
        if wide:
            row.append(layer.kind)
        row += [str(layer.num_features), drift]
        if wide:
            row.append(_num(layer.drift_worst))
        noniid = layer.eval.noniid if layer.eval is not None else layer.noniid
        fix = str(layer.recommendation) if layer.recommendation != "ok" else "-"
        row += [_num(layer.shift), _num(layer.noise), _num(noniid, 1), _status(layer), fix]
        table.add_row(*row)
    return table


def _end_to_end_line(report: ScanReport) -> str | None:
    e = report.end_to_end
    if e is None or not e.describe():
        return None
    return "end to end (train vs eval path): " + "; ".join(e.describe())


VERDICT_STYLE = {
    Verdict.OK: "bold green",
    Verdict.HARMLESS: "yellow",
    Verdict.HARMFUL: "bold red",
    Verdict.COMPOUNDING: "bold red",
    Verdict.UNDETERMINED: "bold yellow",
    Verdict.CANNOT_CHECK: "magenta",
    Verdict.NOT_MEASURABLE: "magenta",
}


def _verdict(report: ScanReport) -> Text:
    return Text(f"{report.status.symbol} {report.verdict}", style=VERDICT_STYLE[report.status])


def evidence_table(report: ScanReport) -> Table | None:
    """The compositions tried as training's: train-path quality, agreement, fit; the reference
    marked ``*``."""
    ev = report.evidence
    if ev is None or len(ev.candidates) < 2:
        return None
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    labels = ev.kind == "labels"
    quality = "train acc" if labels else (f"train {ev.metric}" if ev.metric else None)
    columns = ["composition", *([quality] if quality else []), "agreement", "fit"]
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for i, c in enumerate(ev.candidates):
        mark = "*" if i == ev.reference else " "
        if not c.measurable:
            row = [f"{c.description}{mark}", *(["-"] if quality else []), "-", "-"]
        else:
            q = (
                [
                    (
                        "-"
                        if c.quality is None
                        else (f"{c.quality:.1%}" if labels else f"{c.quality:.4g}")
                    )
                ]
                if quality
                else []
            )
            agree = "-" if c.agreement is None else f"{c.agreement:.1%}"
            row = [f"{c.description}{mark}", *q, agree, _num(c.fit)]
        table.add_row(*row)
    return table


def _evidence_line(report: ScanReport) -> str | None:
    ev = report.evidence
    if ev is None or ev.eval_quality is None or len(ev.candidates) < 2:
        return None
    q = f"{ev.eval_quality:.1%}" if ev.kind == "labels" else f"{ev.eval_quality:.4g}"
    return f"eval mode: {q} ({ev.metric}); * = the reference composition"


def print_scan(report: ScanReport, console: Console, *, verbose: bool = False) -> None:
    """Composition, the layer table, the end-to-end line, the verdict and what to do."""
    console.print(
        f"[bold]{report.model}[/]  batches: {report.composition.description}", highlight=False
    )
    if report.layers:
        console.print(scan_table(report, width=console.width))
    line = _end_to_end_line(report)
    if line:
        console.print(line, highlight=False)
    table = evidence_table(report)
    if table is not None:
        console.print("compositions tried as training's:", highlight=False)
        console.print(table)
        extra = _evidence_line(report)
        if extra:
            console.print(extra, highlight=False)
    console.print(_verdict(report))
    for layer in report.flagged_layers if not verbose else report.layers:
        if layer.flagged or (verbose and layer.batch_dependent):
            console.print(f"  {layer.name}: {layer.reason}", highlight=False, markup=False)
    if report.flagged:
        console.print(
            "  fix: normdoctor patch MODEL --data DATA --to auto -o PATCHED  (then scan PATCHED)",
            highlight=False,
            markup=False,
        )
    for note in report.notes:
        console.print(f"note: {note}", style="dim", highlight=False, markup=False)


def drift_grid(
    reports: Sequence[ScanReport], columns: Sequence[str], corner: str = "layer"
) -> Table:
    """Drift per layer (rows) and scan (columns), flagged cells marked with ``*``."""
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    table.add_column(corner, overflow="fold")
    for label in columns:
        table.add_column(label, justify="right")
    by_scan = [{layer.name: layer for layer in r.layers} for r in reports]
    for layer in reports[0].layers:
        if not layer.batch_dependent:
            continue
        cells: list[str | Text] = [layer.name]
        for layers in by_scan:
            lr = layers.get(layer.name)
            if lr is None or lr.drift is None:
                cells.append("-")
            else:
                mark = "*" if lr.flagged else " "
                cells.append(Text(f"{lr.drift:.3f}{mark}", style="bold red" if lr.flagged else ""))
        table.add_row(*cells)
    agree: list[str | Text] = [Text("agreement", style="italic")]
    for r in reports:
        e = r.end_to_end
        agree.append("-" if e is None or e.agreement is None else f"{e.agreement:.1%}")
    table.add_row(*agree)
    return table


def sweep_table(reports: Sequence[ScanReport]) -> Table:
    """Drift per layer and batch size: how drift grows as batches shrink."""
    return drift_grid(reports, [f"bs {r.composition.batch_size}" for r in reports])


def print_sweep(reports: Sequence[ScanReport], console: Console) -> None:
    first = reports[0]
    console.print(f"[bold]{first.model}[/]  drift by batch size (* = flagged)", highlight=False)
    console.print(sweep_table(reports))
    for r in reports:
        console.print(f"  bs {r.composition.batch_size}: ", _verdict(r), highlight=False)


def print_series(reports: Sequence[ScanReport], console: Console) -> None:
    """Drift per layer over checkpoints: when did the drift appear."""
    console.print(
        f"drift by checkpoint (* = flagged); batches: {reports[0].composition.description}",
        highlight=False,
    )
    console.print(drift_grid(reports, [r.model for r in reports]))
    console.print(Text(series_headline(reports), style=VERDICT_STYLE[series_status(reports)]))
    for r in reports:
        console.print(f"  {r.model}: ", _verdict(r), highlight=False)


def series_status(reports: Sequence[ScanReport]) -> Verdict:
    """The series' verdict: harmful if any checkpoint is, else the least certain one's."""
    rank = [
        Verdict.HARMFUL,
        Verdict.COMPOUNDING,
        Verdict.UNDETERMINED,
        Verdict.NOT_MEASURABLE,
        Verdict.CANNOT_CHECK,
        Verdict.HARMLESS,
        Verdict.OK,
    ]
    return min((r.status for r in reports), key=rank.index)


def series_headline(reports: Sequence[ScanReport]) -> str:
    """The headline of a checkpoint series: where eval mode first became harmful."""
    first = next((r for r in reports if r.status.harmful), None)
    status = series_status(reports)
    if first is not None:
        return f"{status.symbol} {status}: eval mode first harmful at {first.model}: {first.reason}"
    return f"{status.symbol} {status}: no checkpoint harmful ({len(reports)} scanned)"


def print_patch(before: ScanReport, after: ScanReport, console: Console) -> None:
    """Drift before/after per layer, accuracy before/after, and the verdict after the fix."""
    console.print(
        f"[bold]{before.model}[/]  batches: {before.composition.description}", highlight=False
    )
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for col in ("layer", "fix", "drift before", "drift after", "status after"):
        table.add_column(col, justify="right" if "drift" in col else "left")
    after_layers = {layer.name: layer for layer in after.layers}
    for layer in before.layers:
        if not layer.batch_dependent:
            continue
        now = after_layers.get(layer.name)
        fix = str(layer.recommendation) if layer.flagged else "-"
        if now is None:
            table.add_row(layer.name, fix, _num(layer.drift), "-", Text("replaced", style="dim"))
        elif now.batch_dependent:
            table.add_row(layer.name, fix, _num(layer.drift), _num(now.drift), _status(now))
        else:
            table.add_row(
                layer.name,
                fix,
                _num(layer.drift),
                "-",
                Text(f"✓ {now.kind}", style="green"),
            )
    console.print(table)
    b, a = before.end_to_end, after.end_to_end
    if b is not None and a is not None and b.acc_eval is not None and a.acc_eval is not None:
        console.print(
            f"eval-mode accuracy: {b.acc_eval:.1%} before, {a.acc_eval:.1%} after "
            f"(batch statistics: {b.acc_train:.1%})",
            highlight=False,
        )
    elif b is not None and a is not None and b.agreement is not None and a.agreement is not None:
        console.print(
            f"prediction agreement with training behaviour: {b.agreement:.1%} before, "
            f"{a.agreement:.1%} after",
            highlight=False,
        )
    console.print("before: ", _verdict(before), highlight=False)
    console.print("after: ", _verdict(after), highlight=False)
    for note in after.notes:
        console.print(f"note: {note}", style="dim", highlight=False, markup=False)


def _momentum(layer: NormLayer, unknown: Collection[str]) -> str:
    if "momentum" in unknown:
        return "unknown"
    if layer.momentum is None:
        return "cumulative" if layer.batch_dependent else "-"
    return f"{layer.momentum:g}"


def layers_table(
    layers: Sequence[NormLayer],
    findings: Sequence[Finding],
    running: dict[str, tuple],
    unknown: Mapping[str, Collection[str]] | None = None,
) -> Group:
    """Static view: every norm layer with its running-statistics summary, then the findings.

    ``unknown``: per layer, the attributes the file does not store (shown as unknown, not as
    torch's defaults); a stored momentum of None is BatchNorm's cumulative average.
    """
    unknown = unknown or {}
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    table.add_column("layer", overflow="fold")
    table.add_column("kind")
    table.add_column("ch", justify="right")
    table.add_column("running mean", justify="right")
    table.add_column("running var", justify="right")
    table.add_column("momentum", justify="right")
    table.add_column("can drift")
    for layer in layers:
        mean, var = running.get(layer.name, (None, None))
        table.add_row(
            layer.name or "<root>",
            layer.kind,
            str(layer.num_features),
            mean or "-",
            var or "-",
            _momentum(layer, unknown.get(layer.name, ())),
            "yes" if layer.batch_dependent else "no",
        )
    parts: list = [table]
    for f in findings:
        style = {"error": "bold red", "warning": "yellow"}.get(str(f.severity), "dim")
        parts.append(
            Text(f"{str(f.severity).upper():7} {f.layer}: {f.message} [{f.code}]", style=style)
        )
    if not findings:
        parts.append(Text("no static findings", style="green"))
    return Group(*parts)

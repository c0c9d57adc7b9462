"""Terminal rendering with rich: layer tables, the verdict, the batch-size sweep.

Colour carries meaning but never alone: every status is also a word and a symbol, so output
without colour (a CI log, ``NO_COLOR``) reads the same.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from ..report import LayerReport, LayerStatus, ScanReport, Verdict
from ..text import plural, significant

if TYPE_CHECKING:
    from ..checks import Finding
    from ..layers import NormLayer

__all__ = [
    "ScanView",
    "drift_grid",
    "layers_table",
    "print_layers",
    "print_patch",
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

WORST = 10  # layers shown in full when a model has more


def _num(x: float | None) -> str:
    """Three significant digits, so that a column reads at one precision (0.350 above 0.0765)."""
    return significant(x)


def _status(layer: LayerReport) -> Text:
    word, style = STATUS_STYLE[layer.status]
    return Text(word, style=style)


# -- layout: tables at their natural width, paragraphs wrapped with their indent ---------------
# A console that is not a terminal (a pipe, a file, a CI log) gets nothing wrapped: a table is
# as wide as its content, a paragraph is one line.  A terminal gets paragraphs wrapped at its
# width with their indent kept, and tables that never break a layer name (a table wider than the
# terminal is left to the terminal).  No line ends in whitespace.


def piped(console: Console) -> bool:
    """Output that is not looked at in a terminal (or a notebook): do not wrap it."""
    return not console.is_terminal and not console.is_jupyter


@dataclass(frozen=True)
class Para:
    """A paragraph: ``text`` after ``indent`` spaces, wrapped lines ``hang`` spaces further in."""

    text: Text
    indent: int = 0
    hang: int = 2


Block = Para | Table


def para(text: str | Text, indent: int = 0, hang: int = 2, style: str = "") -> Para:
    return Para(text if isinstance(text, Text) else Text(text, style=style), indent, hang)


_UNBOUNDED = 100_000


def _rstrip(line: list[Segment]) -> list[Segment]:
    out = list(line)
    while out:
        last = out[-1]
        if last.control:
            break
        kept = last.text.rstrip()
        if kept:
            out[-1] = Segment(kept, last.style)
            break
        out.pop()
    return out


def render_blocks(
    blocks: Iterable[Block],
    console: Console,
    options: ConsoleOptions,
    unwrapped: bool | None = None,
) -> Iterator[Segment]:
    """The segments of ``blocks``, one line at a time (see the comment above); ``unwrapped``
    default: whether ``console`` is :func:`piped`."""
    unwrapped = piped(console) if unwrapped is None else unwrapped
    width = options.max_width
    for block in blocks:
        if isinstance(block, Para):
            lines = (
                [Text(" " * block.indent) + block.text]
                if unwrapped
                else _wrap(console, block, width)
            )
            for line in lines:
                yield from _rstrip(list(line.render(console)))
                yield Segment.line()
            continue
        size = Measurement.get(console, options.update_width(_UNBOUNDED), block)
        # Squeezed to the terminal if it can be without breaking a name; else at its natural
        # width (the terminal folds its lines, the names stay whole for copying).
        fits = not unwrapped and size.minimum <= width
        table_width = min(size.maximum, width) if fits else size.maximum
        for row in console.render_lines(block, options.update_width(table_width), pad=False):
            yield from _rstrip(row)
            yield Segment.line()


def _wrap(console: Console, block: Para, width: int) -> list[Text]:
    """``block`` wrapped at ``width`` columns: the first line after its indent, the others
    after indent + hang; only a word longer than a line is folded."""
    first_width = max(width - block.indent, 20)
    first = block.text.wrap(console, first_width, overflow="fold")
    if len(first) <= 1:
        return [Text(" " * block.indent) + line for line in first]
    head = first[0]
    rest = block.text[len(head.plain) :]
    skip = len(rest.plain) - len(rest.plain.lstrip())
    rest = rest[skip:]
    others = rest.wrap(console, max(first_width - block.hang, 20), overflow="fold")
    pad = " " * (block.indent + block.hang)
    return [Text(" " * block.indent) + head, *(Text(pad) + line for line in others)]


class Blocks:
    """A rich renderable of paragraphs and tables laid out as :func:`render_blocks` does."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        self.blocks = list(blocks)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from render_blocks(self.blocks, console, options)


def emit(console: Console, blocks: Sequence[Block]) -> None:
    """Print ``blocks`` on ``console``, never cropped or re-wrapped by it."""
    console.print(Blocks(blocks), crop=False, soft_wrap=True)


# -- the scan --------------------------------------------------------------------------------
def scan_table(
    report: ScanReport,
    *,
    width: int | None = None,
    rows: Sequence[tuple[int, LayerReport]] | None = None,
) -> Table:
    """Layers with drift, shift, noise, non-i.i.d. ratio (eval path), status and fix; ``#`` is
    the 1-based position in forward order.

    ``rows``: (number, layer) pairs to show (default: every layer in forward order).  Below 100
    columns the kind and worst-batch columns are dropped so the rest stays readable; a layer
    name is never broken.
    """
    wide = width is None or width >= 100
    table = Table(title=None, box=None, pad_edge=False, header_style="bold", show_edge=False)
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    table.add_column("layer", no_wrap=True)
    if wide:
        table.add_column("kind", no_wrap=True)
    for col in ("ch", "drift", *(["worst"] if wide else []), "shift", "noise", "noniid"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("status")
    table.add_column("fix", no_wrap=True)
    for i, layer in rows if rows is not None else enumerate(report.layers, 1):
        drift = Text(_num(layer.drift), style="bold" if layer.flagged else "")
        row: list[str | Text] = [str(i), layer.name or "<root>"]
        if wide:
            row.append(layer.kind)
        row += [str(layer.num_features), drift]
        if wide:
            row.append(_num(layer.drift_worst))
        fix = str(layer.recommendation) if layer.recommendation != "ok" else "-"
        row += [_num(layer.shift), _num(layer.noise), _num(layer.noniid), _status(layer), fix]
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
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
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
                        else (f"{c.quality:.1%}" if labels else significant(c.quality))
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
    q = f"{ev.eval_quality:.1%}" if ev.kind == "labels" else significant(ev.eval_quality)
    return f"eval mode: {q} ({ev.metric}); * = the reference composition"


GENERIC_FIX = "normdoctor patch MODEL --data DATA --to auto -o PATCHED"


def scan_blocks(
    report: ScanReport,
    *,
    width: int | None = None,
    verbose: bool = False,
    all_layers: bool = False,
    worst: int = WORST,
    fix_command: str | None = None,
) -> list[Block]:
    """The terminal view of a scan, top down: the model and its batches, the verdict and the
    fix, the evidence (end to end, the compositions tried), then the layers.

    Up to ``worst`` layers (or every layer with ``all_layers``) are tabled in forward order;
    a bigger model gets its layer counts, its identical findings grouped on one line each, and
    the ``worst`` layers with the highest drift in the table, worst first.
    """
    out: list[Block] = [
        para(
            Text.assemble((report.model, "bold"), f"  batches: {report.composition.description}"),
            hang=4,
        ),
        Para(_verdict(report), hang=4),
    ]
    if report.flagged:
        then = "(then scan the patched model)" if fix_command else "(then scan PATCHED)"
        out.append(para(f"fix: {fix_command or GENERIC_FIX}  {then}", indent=2, hang=4))
    line = _end_to_end_line(report)
    if line:
        out.append(para(line, hang=4))
    table = evidence_table(report)
    if table is not None:
        out += [para("compositions tried as training's:"), table]
        extra = _evidence_line(report)
        if extra:
            out.append(para(extra, hang=4))
    n = len(report.layers)
    if n:
        grouped = n > worst and not all_layers
        if n > worst:
            counts = ", ".join(f"{k} {STATUS_STYLE[s][0][2:]}" for s, k in report.counts().items())
            out.append(para(f"{plural(n, 'layer')}: {counts}", style="bold"))
            for group in report.groups():
                style = STATUS_STYLE[group.status][1]
                out.append(para(group.describe(), indent=2, hang=4, style=style))
        rows = list(report.worst(worst)) if grouped else list(enumerate(report.layers, 1))
        if grouped:
            out.append(para(f"the {len(rows)} layers with the highest drift, worst first:"))
        out.append(scan_table(report, width=None if width is None else width, rows=rows))
        # Grouped, a layer's reason is said by its group's line unless it is alone in it.
        alone = {g.numbers[0] for g in report.groups() if len(g.numbers) == 1}
        for i, layer in rows:
            if grouped and not verbose and i not in alone:
                continue
            if layer.flagged or (verbose and layer.batch_dependent):
                out.append(para(f"#{i} {layer.name}: {layer.reason}", indent=2, hang=4))
        hidden = n - len(rows)
        if hidden:
            out.append(
                para(
                    f"{plural(hidden, 'more layer')} not shown: all_layers=True (--all) lists them"
                )
            )
    for note in report.notes:
        out.append(para(f"note: {note}", hang=6, style="dim"))
    return out


class ScanView:
    """A scan as :func:`print_scan` lays it out, as a rich renderable (``ScanReport.__rich__``).

    Laid out at the width it is given, as on a terminal: a console that prints it crops at its
    own width (use :func:`print_scan` for output that is never wrapped).
    """

    def __init__(
        self,
        report: ScanReport,
        *,
        verbose: bool = False,
        all_layers: bool = False,
        worst: int = WORST,
        fix_command: str | None = None,
    ) -> None:
        self.report = report
        self.verbose, self.all_layers, self.worst = verbose, all_layers, worst
        self.fix_command = fix_command

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        blocks = scan_blocks(
            self.report,
            width=options.max_width,
            verbose=self.verbose,
            all_layers=self.all_layers,
            worst=self.worst,
            fix_command=self.fix_command,
        )
        yield from render_blocks(blocks, console, options, unwrapped=False)


def print_scan(
    report: ScanReport,
    console: Console,
    *,
    verbose: bool = False,
    all_layers: bool = False,
    worst: int = WORST,
    fix_command: str | None = None,
) -> None:
    """Print a scan, verdict first (:func:`scan_blocks`).

    Args:
        report: the scan.
        console: where; when it is not a terminal nothing is wrapped (tables at their natural
            width, every line whole), on a terminal text wraps at its width.
        verbose: the reason of every batch-dependent layer shown, not only the flagged ones.
        all_layers: every layer in the table (the CLI's ``--all``), however many.
        worst: how many layers a bigger model shows in full.
        fix_command: the command printed as the fix (default: a generic ``normdoctor patch``).
    """
    width = console.width  # the columns shown; a pipe still gets every line whole
    emit(
        console,
        scan_blocks(
            report,
            width=width,
            verbose=verbose,
            all_layers=all_layers,
            worst=worst,
            fix_command=fix_command,
        ),
    )


def drift_grid(
    reports: Sequence[ScanReport], columns: Sequence[str], corner: str = "layer"
) -> Table:
    """Drift per layer (rows) and scan (columns), flagged cells marked with ``*``."""
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    table.add_column(corner, no_wrap=True)
    for label in columns:
        table.add_column(label, justify="right", no_wrap=True)
    by_scan = [{layer.name: layer for layer in r.layers} for r in reports]
    for layer in reports[0].layers:
        if not layer.batch_dependent:
            continue
        cells: list[str | Text] = [layer.name]
        for layers in by_scan:
            lr = layers.get(layer.name)
            if lr is None or lr.drift is None:
                cells.append("- ")  # the mark's place kept: the column stays aligned
            else:
                mark = "*" if lr.flagged else " "
                cells.append(
                    Text(f"{_num(lr.drift)}{mark}", style="bold red" if lr.flagged else "")
                )
        table.add_row(*cells)
    agree: list[str | Text] = [Text("agreement", style="italic")]
    for r in reports:
        e = r.end_to_end
        agree.append("- " if e is None or e.agreement is None else f"{e.agreement:.1%} ")
    table.add_row(*agree)
    return table


def sweep_table(reports: Sequence[ScanReport]) -> Table:
    """Drift per layer and batch size: how drift grows as batches shrink."""
    return drift_grid(reports, [f"bs {r.composition.batch_size}" for r in reports])


def print_sweep(reports: Sequence[ScanReport], console: Console) -> None:
    first = reports[0]
    blocks: list[Block] = [
        para(Text.assemble((first.model, "bold"), "  drift by batch size (* = flagged)")),
        sweep_table(reports),
    ]
    for r in reports:
        blocks.append(
            Para(Text(f"bs {r.composition.batch_size}: ") + _verdict(r), indent=2, hang=4)
        )
    emit(console, blocks)


def print_series(reports: Sequence[ScanReport], console: Console) -> None:
    """Drift per layer over checkpoints: when did the drift appear."""
    blocks: list[Block] = [
        para(f"drift by checkpoint (* = flagged); batches: {reports[0].composition.description}"),
        drift_grid(reports, [r.model for r in reports]),
        para(series_headline(reports), hang=4, style=VERDICT_STYLE[series_status(reports)]),
    ]
    for r in reports:
        blocks.append(Para(Text(f"{r.model}: ") + _verdict(r), indent=2, hang=4))
    emit(console, blocks)


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
    blocks: list[Block] = [
        para(Text.assemble((before.model, "bold"), f"  batches: {before.composition.description}"))
    ]
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for col in ("layer", "fix", "drift before", "drift after", "status after"):
        table.add_column(col, justify="right" if "drift" in col else "left", no_wrap=True)
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
    blocks.append(table)
    b, a = before.end_to_end, after.end_to_end
    if b is not None and a is not None and b.acc_eval is not None and a.acc_eval is not None:
        blocks.append(
            para(
                f"eval-mode accuracy: {b.acc_eval:.1%} before, {a.acc_eval:.1%} after "
                f"(batch statistics: {b.acc_train:.1%})",
                hang=4,
            )
        )
    elif b is not None and a is not None and b.agreement is not None and a.agreement is not None:
        blocks.append(
            para(
                f"prediction agreement with training behaviour: {b.agreement:.1%} before, "
                f"{a.agreement:.1%} after",
                hang=4,
            )
        )
    blocks.append(Para(Text("before: ") + _verdict(before), hang=4))
    blocks.append(Para(Text("after: ") + _verdict(after), hang=4))
    for note in after.notes:
        blocks.append(para(f"note: {note}", hang=6, style="dim"))
    emit(console, blocks)


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
    table.add_column("layer", no_wrap=True)
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
    blocks = _layers_blocks(table, findings)
    return Group(*(b if isinstance(b, Table) else Text(" " * b.indent) + b.text for b in blocks))


def _layers_blocks(table: Table, findings: Sequence[Finding]) -> list[Block]:
    parts: list[Block] = [table]
    for f in findings:
        style = {"error": "bold red", "warning": "yellow"}.get(str(f.severity), "dim")
        parts.append(
            para(
                f"{str(f.severity).upper():7} {f.layer}: {f.message} [{f.code}]",
                hang=8,
                style=style,
            )
        )
    if not findings:
        parts.append(para("no static findings", style="green"))
    return parts


def print_layers(
    console: Console,
    layers: Sequence[NormLayer],
    findings: Sequence[Finding],
    running: dict[str, tuple],
    unknown: Mapping[str, Collection[str]] | None = None,
) -> None:
    """:func:`layers_table` printed the way :func:`print_scan` prints: unwrapped when piped."""
    group = layers_table(layers, findings, running, unknown)
    table = group.renderables[0]
    assert isinstance(table, Table)
    emit(console, _layers_blocks(table, findings))

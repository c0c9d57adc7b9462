"""A self-contained HTML page for a scan: verdict, composition, layers, figures, how to reproduce.

The page needs nothing but a browser: CSS is inline, figures are embedded as base64 PNG data
URIs, and no external URL appears anywhere.  It reads on a phone (responsive layout: layer
tables become one card per layer, figure conclusions repeated as text) and prints (print
stylesheet).  The figures are also written beside it as PNG
(and SVG) files.  An existing folder is never written into without ``force``, and the page is
written atomically (:class:`normdoctor.outputs.Outputs`): everything is rendered into a temporary
folder next to the destination, which becomes the destination in one rename (or, with ``force``,
whose files replace those of the same names, ``index.html`` last).
"""

from __future__ import annotations

import base64
import io
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..outputs import Outputs
from ..report import LayerReport, LayerStatus, ScanReport, Verdict
from . import plots
from .style import PAGE_CSS, num, pct

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FIGURE_NAMES", "figures", "save_report"]

#: Figure keys, in page order, with their section headings.
FIGURE_NAMES = {
    "end_to_end": "What eval mode does to the outputs",
    "series": "Drift over the checkpoint series",
    "drift": "Drift per layer",
    "drift_after": "Drift per layer after the patch",
    "sweep": "Drift against batch size",
    "batches": "Per-batch mismatch",
    "channels": "Running against observed statistics",
}
#: Above this many layers the page shows the worst ones in full and the rest grouped by finding.
MAX_TABLE_ROWS = 40
WORST_ROWS = 20
PNG_DPI = 144
#: On a narrow screen a figure is shown no smaller than this many CSS px per figure inch (it
#: scrolls sideways in its box instead): 7.5 pt legend text is then 10 px, 8 pt ticks 10.7 px.
READABLE_PX_PER_INCH = 96
#: SVG text stays text (searchable, editable in slides), in the figures' font or a near one.
SVG_FONTS = ["DejaVu Sans", "Bitstream Vera Sans", "Verdana", "Arial", "Helvetica", "sans-serif"]

Sweep = Mapping[int, ScanReport] | Sequence[ScanReport]


def _build(
    report: ScanReport,
    sweep: Sweep | None,
    patched: ScanReport | None,
    train_batch_size: int | None,
    series: Sequence[ScanReport] | None = None,
) -> tuple[dict[str, Figure], dict[str, str]]:
    """(figures by key, reasons for the figures left out)."""
    top = _shared_drift_top(report, patched)
    makers: dict[str, Callable[[], Figure]] = {
        "end_to_end": lambda: plots.end_to_end_figure(report, patched),
        "drift": lambda: plots.drift_figure(report, axis_top=top),
        "batches": lambda: plots.batch_distribution_figure(report),
        "channels": lambda: plots.channels_figure(report),
    }
    if patched is not None:
        makers["drift_after"] = lambda: plots.drift_figure(patched, axis_top=top)
    if sweep is not None:
        makers["sweep"] = lambda: plots.sweep_figure(sweep, train_batch_size)
    if series is not None:
        makers["series"] = lambda: plots.series_figure(series)
    figs: dict[str, Figure] = {}
    skipped: dict[str, str] = {}
    for key in FIGURE_NAMES:
        if key not in makers:
            continue
        try:
            figs[key] = makers[key]()
        except plots.NothingToPlot as exc:
            skipped[key] = str(exc)
    return figs, skipped


def _shared_drift_top(report: ScanReport, patched: ScanReport | None) -> float | None:
    """One drift scale for the before and after figures (None without a patched scan)."""
    if patched is None:
        return None
    drifts = [
        layer.drift or 0.0 for r in (report, patched) for _, layer in plots.measured_layers(r)
    ]
    return max([*drifts, report.threshold, patched.threshold])


def figures(
    report: ScanReport,
    sweep: Sweep | None = None,
    patched: ScanReport | None = None,
    *,
    train_batch_size: int | None = None,
    series: Sequence[ScanReport] | None = None,
) -> dict[str, Figure]:
    """Every figure that has something to show, keyed ``end_to_end``, ``series``, ``drift``,
    ``sweep``, ``batches``, ``channels`` (page order).

    Figures that would be empty are left out (:func:`save_report` says why on the page).
    Given ``patched``, ``drift_after`` is the patched model's drift per layer, on the same
    scale as ``drift``.

    Args:
        report: the scan.
        sweep: reports of a batch-size sweep (``{batch_size: report}`` or a sequence, e.g. from
            :func:`~normdoctor.scan.sweep_batch_sizes`).
        patched: the scan of the patched model, for the before/after comparison.
        train_batch_size: marked on the sweep figure.
        series: scans of several checkpoints of one model, in training order (``report`` is
            usually the last of them), shown as drift over the series.
    """
    return _build(report, sweep, patched, train_batch_size, series)[0]


# -- files -----------------------------------------------------------------------------------


def _check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    fmts = tuple(dict.fromkeys(f.lower().lstrip(".") for f in formats))
    bad = [f for f in fmts if f not in ("png", "svg")]
    if bad:
        raise ValueError(f"formats must be 'png' and/or 'svg', got {bad}")
    return fmts


def _render(fig: Figure, fmt: str) -> bytes:
    import matplotlib as mpl

    if fmt == "png":
        return _render_png(fig)
    buf = io.BytesIO()
    # No date/creator metadata: identical reports give identical files.
    meta = {"Date": None, "Creator": None}
    # SVG: text as <text> elements, not glyph outlines.  The font stack is what the SVG names
    # for the generic family the figures use; PNGs are drawn as before.
    rc: dict[str, Any] = {"svg.fonttype": "none", "font.sans-serif": SVG_FONTS}
    with mpl.rc_context(rc):  # type: ignore[arg-type]
        fig.savefig(buf, format=fmt, dpi=PNG_DPI, metadata=meta)
    return buf.getvalue()


def _render_png(fig: Figure) -> bytes:
    """The figure as PNG: RGB when every pixel is opaque (the same pixels as matplotlib's RGBA
    PNG; a quarter less to compress, a tenth smaller), RGBA otherwise."""
    import PIL.Image

    raw = io.BytesIO()
    fig.savefig(raw, format="rgba", dpi=PNG_DPI)
    # The canvas size as the Agg renderer computes it (int of inches times dots per inch).
    size = (int(fig.get_figwidth() * PNG_DPI), int(fig.get_figheight() * PNG_DPI))
    buf = io.BytesIO()
    if len(raw.getbuffer()) != 4 * size[0] * size[1]:  # not the Agg canvas: matplotlib's PNG
        fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
        return buf.getvalue()
    image = PIL.Image.frombuffer("RGBA", size, raw.getvalue(), "raw", "RGBA", 0, 1)
    alpha = image.getchannel("A").getextrema()
    if isinstance(alpha, tuple) and alpha[0] == 255:
        image = image.convert("RGB")
    # No software/date metadata: identical reports give identical files.
    image.save(buf, format="png", dpi=(PNG_DPI, PNG_DPI))
    return buf.getvalue()


def _lay_out(fig: Figure) -> None:
    """Solve the figure's layout once, at the PNG's resolution, and keep it for every file.

    ``savefig`` with a layout engine first draws the whole figure without output to lay it
    out, then draws it; and the SVG would solve the layout again.  Solving it here, as that
    first pass does, leaves one draw per file (the same PNG pixels).
    """
    engine = fig.get_layout_engine()
    if engine is None:
        return
    dpi = fig.dpi
    fig.dpi = PNG_DPI
    try:
        engine.execute(fig)
    finally:
        fig.dpi = dpi
    fig.set_layout_engine("none")


@dataclass(frozen=True)
class _Shown:
    key: str
    png: bytes
    headline: str
    caption: str
    files: tuple[str, ...]
    width_in: float  # the figure's width in inches (its readable size on a narrow screen)


def save_report(
    report: ScanReport,
    out_dir: str | os.PathLike[str],
    *,
    sweep: Sweep | None = None,
    patched: ScanReport | None = None,
    command: str | None = None,
    force: bool = False,
    formats: Iterable[str] = ("png", "svg"),
    train_batch_size: int | None = None,
    series: Sequence[ScanReport] | None = None,
    outputs: Outputs | None = None,
    provenance: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out_dir/index.html`` (self-contained) and the figures as image files.

    Args:
        report: the scan to show.
        out_dir: folder to create; its parent is created if needed.
        sweep: reports of a batch-size sweep, shown as drift against batch size.
        patched: the scan of the patched model: before/after on the page.
        command: the exact command that reproduces the report, printed on the page.
        force: write into an existing folder (even an empty one needs it): files of the same
            names are replaced, figure files of an earlier report that this one lacks are
            removed, anything else is left alone.
        formats: image files written beside the page: ``"png"`` and/or ``"svg"`` (the page
            itself always embeds PNG).
        train_batch_size: the batch size training used, if known (marked on the sweep).
        series: scans of several checkpoints of one model, in training order, shown as drift
            over the series; ``report`` is then the checkpoint the page details (the command
            line passes the last one), and the page's header says so.
        outputs: a plan in which ``out_dir`` was declared (with its ``force``) and checked: the
            report is rendered and staged there, and appears when the plan commits.
        provenance: what the report was made from, printed in the page's footer, e.g.
            ``{"model_sha256": ..., "data_sha256": ...}`` (the command line passes the sha256 of
            the model and data files); keys are shown with ``_`` as spaces, in the order given.

    Returns:
        The path of ``index.html``.

    Raises:
        FileExistsError: ``out_dir`` exists (without ``force``), or is a file; or it was
            created by someone else while this report rendered (of two concurrent writers of
            one new folder, exactly one succeeds).
        ValueError: an unknown format.

    Note:
        Rendering happens in a temporary folder beside ``out_dir``; if anything fails, nothing in
        ``out_dir`` changes.  With ``force``, files are replaced one by one, ``index.html`` last,
        so the page never points at half-written figures.
    """
    fmts = _check_formats(formats)

    def build(folder: Path) -> None:
        _write_files(
            folder, report, fmts, sweep, patched, command, train_batch_size, series, provenance
        )

    owned = [f"{key}.{fmt}" for key in FIGURE_NAMES for fmt in ("png", "svg")]
    if outputs is not None:
        outputs.write_folder(out_dir, build, last=("index.html",), owned=owned)
    else:
        with Outputs() as plan:
            plan.folder(out_dir, force=force, force_hint="force=True (--force on the command line)")
            plan.check()
            plan.write_folder(out_dir, build, last=("index.html",), owned=owned)
            plan.commit()
    return Path(out_dir).absolute() / "index.html"


def _write_files(
    folder: Path,
    report: ScanReport,
    fmts: tuple[str, ...],
    sweep: Sweep | None,
    patched: ScanReport | None,
    command: str | None,
    train_batch_size: int | None,
    series: Sequence[ScanReport] | None,
    provenance: Mapping[str, str] | None = None,
) -> None:
    """Render the figures and the page into ``folder``."""
    figs, skipped = _build(report, sweep, patched, train_batch_size, series)
    shown = []
    for key, fig in figs.items():
        _lay_out(fig)
        png = _render(fig, "png")
        files = []
        for fmt in fmts:
            data = png if fmt == "png" else _render(fig, fmt)
            (folder / f"{key}.{fmt}").write_bytes(data)
            files.append(f"{key}.{fmt}")
        shown.append(
            _Shown(
                key,
                png,
                plots.headline(fig),
                plots.caption(fig),
                tuple(files),
                float(fig.get_figwidth()),
            )
        )
    page = _page(
        report,
        shown=shown,
        skipped=skipped,
        sweep=sweep,
        patched=patched,
        command=command,
        series=series,
        provenance=provenance,
    )
    (folder / "index.html").write_text(page, encoding="utf-8")


# -- the page --------------------------------------------------------------------------------


_STATUS_TEXT = {
    LayerStatus.OK: "ok",
    LayerStatus.HARMLESS: "drifts (harmless)",
    LayerStatus.DRIFTS: "drifts (undetermined)",
    LayerStatus.FLAGGED: "▲ FLAGGED",
    LayerStatus.NOT_EXECUTED: "not executed",
    LayerStatus.NOT_MEASURABLE: "not measurable at this batch size",
    LayerStatus.NOT_MEASURED: "not measured",
}


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _verdict_class(report: ScanReport) -> str:
    """The verdict box's colour follows the one verdict: never green beside harm."""
    if report.status.harmful:
        return "bad"
    if report.status is Verdict.OK:
        return "good"
    return "warn"


def _end_to_end_line(report: ScanReport) -> str:
    e = report.end_to_end
    if e is None:
        if not plots.measured_layers(report):
            return ""
        return (
            "The effect on the model's outputs was not measured (scan both paths to see it): "
            "per-layer drift alone does not tell whether predictions change."
        )
    parts = []
    if e.agreement is not None:
        parts.append(f"{pct(e.agreement)} of predictions are equal in both paths")
    if e.acc_train is not None and e.acc_eval is not None:
        parts.append(
            f"accuracy {pct(e.acc_train)} with batch statistics, {pct(e.acc_eval)} in eval mode"
        )
    if e.rel_divergence is not None:
        parts.append(f"relative output divergence {num(e.rel_divergence)}")
    judged = (
        "eval mode is measurably worse"
        if report.harmful
        else "eval mode is not worse than the training-like path"
        if report.harmful is False
        else "which path is right is undetermined"
    )
    return f"End to end, on {e.samples} samples: {'; '.join(parts)}: {judged}."


def _series_line(report: ScanReport, series: Sequence[ScanReport], shown: list[_Shown]) -> str:
    """Which checkpoint of the series this page details, and where drift was first flagged."""
    models = [r.model for r in series]
    n = len(models)
    listed = ", ".join(models) if n <= 6 else f"{models[0]}, {models[1]}, … {models[-1]}"
    pos = next((j for j, r in enumerate(series) if r is report), None)
    if pos is None:
        pos = next((j for j, r in enumerate(series) if r == report), None)
    scanned = f"{n} checkpoint{'s' if n != 1 else ''} scanned ({listed})"
    if pos == n - 1:
        where = f"This page details {report.model}, the last of the {scanned}."
    elif pos is not None:
        where = f"This page details {report.model}, checkpoint {pos + 1} of the {scanned}."
    else:
        where = f"Also scanned: {scanned}."
    first = next((r for r in series if r.status.harmful), None)
    when = (
        f" Eval mode first became harmful at {first.model}."
        if first is not None
        else " No checkpoint of the series was harmful."
    )
    link = (
        f' <a href="#fig-series">{_e(FIGURE_NAMES["series"])}</a> shows every checkpoint.'
        if any(s.key == "series" for s in shown)
        else ""
    )
    return f'<p class="series">{_e(where + when)}{link}</p>'


def _fix_lines(report: ScanReport, patched: ScanReport | None) -> list[str]:
    by_fix: dict[str, list[str]] = {}
    for layer in report.flagged_layers:
        by_fix.setdefault(str(layer.recommendation), []).append(layer.name)
    lines = []
    for fix, names in sorted(by_fix.items()):
        shown = ", ".join(f"<code>{_e(n)}</code>" for n in names[:8])
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        lines.append(f"Recommended fix <strong>{_e(fix)}</strong> for {shown}{more}.")
    if by_fix and patched is None:
        lines.append(
            "Not yet verified: a wrong fix does harm, so apply it and scan the patched model "
            "again before relying on it."
        )
    return lines


def _verdict_box(report: ScanReport, items: list[str], label: str = "") -> str:
    """The verdict, its colour, and its bullet points (``label``: "Before the patch" ...)."""
    lis = "".join(f"<li>{item}</li>" for item in items)
    head = f'<p class="when">{_e(label)}</p>' if label else ""
    return (
        f'<section class="verdict {_verdict_class(report)}">{head}'
        f'<p class="big">{_e(report.verdict[:1].upper() + report.verdict[1:])}</p>'
        + (f"<ul>{lis}</ul>" if lis else "")
        + "</section>"
    )


def _verdicts(report: ScanReport, patched: ScanReport | None) -> str:
    """One verdict box, or before and after side by side (stacked on a narrow screen)."""
    items = _fix_lines(report, patched)
    e2e = _end_to_end_line(report)
    if e2e:
        items.append(_e(e2e))
    if patched is None:
        return _verdict_box(report, items)
    after = [_e(line) for line in (_end_to_end_line(patched),) if line]
    return (
        '<div class="pair">'
        + _verdict_box(report, items, "Before the patch")
        + _verdict_box(patched, after, "After the patch")
        + "</div>"
    )


def _layer_rows(rows: Iterable[tuple[int, LayerReport]]) -> str:
    out = []
    for i, layer in rows:
        cls = {LayerStatus.FLAGGED: "flagged", LayerStatus.HARMLESS: "harmless"}.get(
            layer.status, ""
        )
        rec = str(layer.recommendation)
        values = [
            ("#", "num", str(i)),
            ("layer", "name", _e(layer.name)),
            ("kind", "", _e(layer.kind)),
            ("channels", "num", str(layer.num_features)),
            ("drift", "num", _e(num(layer.drift)) if layer.batch_dependent else "–"),
            ("shift", "num", _e(num(layer.shift)) if layer.shift is not None else "–"),
            ("noise", "num", _e(num(layer.noise)) if layer.noise is not None else "–"),
            ("non-iid", "num", _e(num(layer.noniid)) if layer.noniid is not None else "–"),
            ("status", "status", _e(_STATUS_TEXT.get(layer.status, str(layer.status)))),
            ("fix", "", _e(rec) if rec != "ok" else "–"),
            ("reason", "reason", _e(layer.reason)),
        ]
        cells = [
            f'<td data-label="{label}"' + (f' class="{c}"' if c else "") + f">{v}</td>"
            for label, c, v in values
        ]
        out.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    return "\n".join(out)


_TABLE_HEAD = (
    "<thead><tr><th>#</th><th>layer</th><th>kind</th><th>channels</th>"
    '<th title="RMS(y_train − y_eval) / RMS(γ), RMS over batches">drift</th>'
    '<th title="pooled statistics against running ones: what recalibration removes">shift</th>'
    '<th title="batch statistics against pooled ones: what no running estimate removes">noise</th>'
    '<th title="spread of batch means over the spread i.i.d. batches would give">non-iid</th>'
    "<th>status</th><th>fix</th><th>reason</th></tr></thead>"
)


def _table(rows: list[tuple[int, LayerReport]], kind: str = "cards") -> str:
    return (
        f'<div class="scroll"><table class="{kind}">{_TABLE_HEAD}<tbody>\n{_layer_rows(rows)}\n'
        "</tbody></table></div>"
    )


_LEGEND = (
    '<p class="muted">drift, shift and noise are dimensionless: RMS(y_train − y_eval) / '
    "RMS(γ) on the train path; shift scores the exact pooled statistics against the running "
    "ones, noise each batch against the pooled ones; non-iid is the spread of batch means "
    "over what i.i.d. batches would give (1 ≈ i.i.d.), on the eval path, as in the terminal. "
    "# is the position in forward order, as in the figures.</p>"
)


def _finding(layer: LayerReport) -> str:
    """What a group of layers shares: its status, what dominates its drift, and its fix."""
    status = _STATUS_TEXT.get(layer.status, str(layer.status))
    drifts = layer.status in (LayerStatus.FLAGGED, LayerStatus.HARMLESS, LayerStatus.DRIFTS)
    if drifts and layer.shift is not None and layer.noise is not None:
        cause = (
            "stale running statistics (shift)"
            if layer.shift >= layer.noise
            else "batch noise (no running estimate fits)"
        )
        status = f"{status}, {cause}"
    rec = str(layer.recommendation)
    return status + (f" → {rec}" if rec != "ok" else "")


def _layers_section(report: ScanReport, *, nested: bool = False) -> str:
    """Every layer once: in one table, or (many layers) the worst in full and the rest grouped
    by finding, each group's rows behind a ``<details>``.  ``nested``: inside another section
    (h3/h4 headings, no anchor)."""
    h, sub = ("h3", "h4") if nested else ("h2", "h3")
    rows = list(enumerate(report.layers, 1))
    if not rows:
        return f"<{h}>Layers</{h}><p>No normalization layers were found.</p>"
    legend = _LEGEND if any(layer.drift is not None for layer in report.layers) else ""
    if len(rows) <= MAX_TABLE_ROWS:
        return f"<{h}>Layers</{h}>{legend}{_table(rows)}"
    measured = [(i, layer) for i, layer in rows if layer.drift is not None]
    worst = sorted(measured, key=lambda r: -(r[1].drift or 0.0))[:WORST_ROWS]
    keep = {i for i, _ in worst}
    groups: dict[str, list[tuple[int, LayerReport]]] = {}
    for i, layer in rows:
        if i not in keep:
            groups.setdefault(_finding(layer), []).append((i, layer))
    counts = Counter(_finding(layer) for _, layer in rows)
    summary = "".join(
        f"<li><strong>{n} layer{'s' if n != 1 else ''}</strong>: {_e(f)}</li>"
        for f, n in counts.most_common()
    )
    details = "".join(
        f"<details><summary>{len(g)} more layer{'s' if len(g) != 1 else ''}: {_e(f)}</summary>"
        f"{_table(g, 'all')}</details>"
        for f, g in sorted(groups.items(), key=lambda kv: -len(kv[1]))
    )
    anchor = "" if nested else ' id="all-layers"'
    return (
        f"<{h}>Layers: {len(rows)}</{h}>{legend}"
        f'<ul class="groups">{summary}</ul>'
        f"<{sub}>The {len(worst)} highest drift scores, worst first</{sub}>{_table(worst)}"
        f"<{sub}{anchor}>The other {len(rows) - len(worst)} layers, grouped by finding "
        f"(forward order within a group)</{sub}>{details}"
    )


def _compare_section(report: ScanReport, patched: ScanReport) -> str:
    """Before and after the patch, layer by layer (matched by name), then each scan's table."""
    after = {layer.name: layer for layer in patched.layers}
    rows = list(enumerate(report.layers, 1))
    if len(rows) > MAX_TABLE_ROWS:
        rows = sorted(rows, key=lambda r: -(r[1].drift or 0.0))[:WORST_ROWS]
    head = (
        '<thead><tr><th rowspan="2">#</th><th rowspan="2">layer</th>'
        '<th colspan="3" class="grp">before the patch</th>'
        '<th colspan="3" class="grp">after the patch</th></tr>'
        "<tr><th>kind</th><th>drift</th><th>status</th><th>kind</th><th>drift</th>"
        "<th>status</th></tr></thead>"
    )

    def cells(layer: LayerReport | None, when: str) -> list[tuple[str, str, str]]:
        if layer is None:
            return [
                (f"{when} kind", "", "–"),
                (f"{when} drift", "num", "–"),
                (f"{when} status", "status", "not in the patched model"),
            ]
        drift = _e(num(layer.drift)) if layer.batch_dependent else "–"
        status = _e(_STATUS_TEXT.get(layer.status, str(layer.status)))
        return [
            (f"{when} kind", "", _e(layer.kind)),
            (f"{when} drift", "num", drift),
            (f"{when} status", "status flag" if layer.flagged else "status", status),
        ]

    body = []
    for i, layer in rows:
        values = [("#", "num", str(i)), ("layer", "name", _e(layer.name))]
        values += cells(layer, "before") + cells(after.get(layer.name), "after")
        cls = "flagged" if layer.flagged else ""
        body.append(
            f'<tr class="{cls}">'
            + "".join(
                f'<td data-label="{label}"' + (f' class="{c}"' if c else "") + f">{v}</td>"
                for label, c, v in values
            )
            + "</tr>"
        )
    note = (
        f"<p>The {len(rows)} layers that drifted most before the patch.</p>"
        if len(rows) < len(report.layers)
        else ""
    )
    return (
        f"<h2>Layers before and after the patch</h2>{note}"
        f'<div class="scroll"><table class="cards compare">{head}<tbody>\n'
        + "\n".join(body)
        + "\n</tbody></table></div>"
        + "<details><summary>Before the patch: every column</summary>"
        + _layers_section(report, nested=True)
        + "</details><details><summary>After the patch: every column</summary>"
        + _layers_section(patched, nested=True)
        + "</details>"
    )


def _composition_section(report: ScanReport, sweep: Sweep | None) -> str:
    c = report.composition
    paths = " and ".join(report.paths)
    if not c.num_batches:
        ran = "<p><strong>Batches:</strong> none were run: no layer depends on its batch.</p>"
    elif not any(layer.batch_dependent for layer in report.layers):
        ran = (
            f"<p><strong>Batches:</strong> {_e(c.description)}. No layer depends on its batch, "
            "so the composition does not matter here.</p>"
        )
    else:
        ran = f"<p><strong>Batches:</strong> {_e(c.description)}.</p>"
    if not plots.measured_layers(report):
        return f"<h2>What the scan could see</h2>{ran}"
    caveat = (
        "Batch composition decides what a scan can see. The train/eval gap shows only when the "
        "scan's batches are built the way training's were: the same batch size and the same "
        "correlation (one sample at a time, class-sorted or one-domain batches). Scanned with "
        "large random batches, a model trained at batch size 1 or on one-class batches looks "
        "healthy. Without a stated training composition the scan searches it (batch sizes 1 to "
        "128 and one-label batches) and judges against the one that reproduces training best."
    )
    if sweep is None:
        caveat += (
            " If the training batch size is unknown, a batch-size sweep "
            "(<code>normdoctor scan --batch-sizes 1,2,8,32</code>, or "
            "<code>sweep_batch_sizes()</code>) is the view to show."
        )
    return (
        "<h2>What the scan could see</h2>"
        f"{ran}<p><strong>Paths measured:</strong> {_e(paths)}. "
        f"<strong>Per-layer threshold:</strong> drift {report.threshold:g}. "
        "<strong>Harm:</strong> eval mode measurably worse than the training-like path "
        "(paired test on the same samples, p &lt; 0.01, by at least 1 accuracy point or 10% "
        "in loss); without labels or targets the paths disagree below "
        f"{100 * report.agreement_threshold:g}% equal predictions (classifiers) or above "
        f"output divergence {report.divergence_threshold:g}, and only a stated training "
        "composition makes that harm.</p>"
        f'<p class="muted">{caveat}</p>' + _evidence_table(report)
    )


def _evidence_table(report: ScanReport) -> str:
    """The compositions tried as training's, the reference marked: the verdict's evidence."""
    ev = report.evidence
    if ev is None or len(ev.candidates) < 2:
        return ""
    labels = ev.kind == "labels"
    quality = "train-path accuracy" if labels else f"train-path {ev.metric}" if ev.metric else None

    def q(value: float | None) -> str:
        if value is None:
            return "–"
        return pct(value) if labels else num(value)

    head = ["composition", *([quality] if quality else []), "agreement", "divergence", "fit"]
    rows = []
    for i, c in enumerate(ev.candidates):
        name = _e(c.description) + (" <strong>(reference)</strong>" if i == ev.reference else "")
        if not c.measurable:
            cells = [name, *(["–"] if quality else []), "–", "–", _e(c.reason or "not measurable")]
        else:
            cells = [
                name,
                *([q(c.quality)] if quality else []),
                "–" if c.agreement is None else pct(c.agreement),
                "–" if c.rel_divergence is None else num(c.rel_divergence),
                "–" if c.fit is None else num(c.fit),
            ]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    eval_line = (
        f" Eval mode: {q(ev.eval_quality)}." if ev.eval_quality is not None and quality else ""
    )
    return (
        "<h3>Compositions tried as training's</h3>"
        f"<p>The train path under each candidate composition, on the same samples as the eval "
        f"path; fit: running statistics against the average batch statistics (lower: closer "
        f"to how training batched).{eval_line}</p>"
        '<div class="scroll"><table class="evidence"><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div>"
    )


def _figure_html(s: _Shown) -> str:
    data = base64.b64encode(s.png).decode("ascii")
    files = ", ".join(f'<a href="{_e(f)}">{_e(f)}</a>' for f in s.files)
    # Never narrower than readable: on a narrow screen the figure scrolls sideways in its box.
    readable = round(s.width_in * READABLE_PX_PER_INCH)
    img = (
        f'<img src="data:image/png;base64,{data}" alt="{_e(s.headline)}" '
        f'style="min-width:{readable}px">'
    )
    if f"{s.key}.png" in s.files:
        img = f'<a href="{_e(s.key)}.png" title="full size">{img}</a>'
    return (
        f'<figure id="fig-{_e(s.key)}"><h3>{_e(FIGURE_NAMES[s.key])}</h3>'
        # The title inside the image is small on a phone: repeat it as text there.
        + f'<p class="concl">{_e(s.headline)}</p>'
        + f'<div class="fig">{img}</div>'
        + '<p class="swipe">Scroll sideways for the whole figure.</p>'
        + f"<figcaption>{_e(s.caption)}"
        + (f' <span class="files">Files: {files}.</span>' if files else "")
        + "</figcaption></figure>"
    )


def _figure_section(shown: list[_Shown], skipped: dict[str, str]) -> str:
    parts = ["<h2>Figures</h2>"]
    skipped = dict(skipped)
    after_missing = skipped.pop("drift_after", None)
    by_reason: dict[str, list[str]] = {}
    for key, reason in skipped.items():
        by_reason.setdefault(reason, []).append(FIGURE_NAMES[key])
    if not shown:
        if len(by_reason) == 1:  # one reason for everything: say it once
            return f"<h2>Figures</h2><p>No figures: {_e(next(iter(by_reason)))}.</p>"
        parts.append("<p>No figures: there is nothing to draw for this scan.</p>")
    keys = {x.key for x in shown}
    for x in shown:
        if x.key == "drift_after" and "drift" in keys:
            continue  # drawn beside the drift figure
        html = _figure_html(x)
        if x.key == "drift" and ("drift_after" in keys or after_missing):
            after = next((y for y in shown if y.key == "drift_after"), None)
            # The two drift figures on one scale, one above the other: the bars are horizontal,
            # so a shared value axis lines their lengths up.
            html = (
                '<div class="before-after">'
                + html
                + (
                    _figure_html(after)
                    if after is not None
                    else f'<div class="figure-missing"><h3>{_e(FIGURE_NAMES["drift_after"])}'
                    f"</h3><p>Nothing to draw after the patch: {_e(after_missing)}.</p></div>"
                )
                + "</div>"
            )
        parts.append(html)
    if by_reason:
        parts.append("<h3>Left out</h3><ul>")
        parts.extend(
            f"<li><strong>{_e(', '.join(names))}</strong>: {_e(reason)}.</li>"
            for reason, names in by_reason.items()
        )
        parts.append("</ul>")
    return "\n".join(parts)


def _notes_section(report: ScanReport, patched: ScanReport | None) -> str:
    notes = list(report.notes)
    gap = plots.decomposition_gap(report)
    if gap is not None:
        notes.append(
            "shift² + noise² approximates drift² but does not equal it (the variance terms of the "
            f"mismatch do not decompose); here they differ by at most {plots.percent_up(gap)}%, so the "
            "drift figure splits each bar in proportion to shift² and noise²"
        )
    if report.harmful is False and report.drifting_layers:
        notes.append(
            "drift is not damage: these layers drift, but eval mode does not change the "
            "predictions on this data; other data or batch compositions may differ"
        )
    if patched is not None:
        notes.extend(f"after the patch: {n}" for n in patched.notes)
    if not notes:
        return ""
    return "<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"


def _footer(report: ScanReport, provenance: Mapping[str, str] | None) -> str:
    """Versions, the date, and what the report was made from (when known)."""
    bits = [f"normdoctor {_e(report.normdoctor_version)}"]
    torch_version = _torch_version()
    if torch_version:
        bits.append(f"torch {_e(torch_version)}")
    bits.append(f"report schema {report.schema_version}")
    bits.append(f"written {_today()}")
    prov = "".join(
        f'<li>{_e(key.replace("_", " "))}: <code class="hash">{_e(value)}</code></li>'
        for key, value in (provenance or {}).items()
    )
    return (
        f"<footer><p>{'; '.join(bits)}. Self-contained page: no network access needed.</p>"
        + (f"<ul>{prov}</ul>" if prov else "")
        + "</footer>"
    )


def _torch_version() -> str | None:
    """The installed torch's version, without importing torch (a page from JSON needs none)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return None


def _today() -> str:
    """Today's date (UTC), or that of ``SOURCE_DATE_EPOCH`` (reproducible builds)."""
    from datetime import UTC, datetime

    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    when = datetime.fromtimestamp(int(epoch), UTC) if epoch.isdigit() else datetime.now(UTC)
    return when.strftime("%Y-%m-%d")


def _page(
    report: ScanReport,
    *,
    shown: list[_Shown],
    skipped: dict[str, str],
    sweep: Sweep | None = None,
    patched: ScanReport | None = None,
    command: str | None = None,
    series: Sequence[ScanReport] | None = None,
    provenance: Mapping[str, str] | None = None,
) -> str:
    """The HTML text of the page (figures already rendered)."""
    verdict = _verdicts(report, patched)
    layers = _layers_section(report) if patched is None else _compare_section(report, patched)
    reproduce = (
        f"<h2>Reproduce</h2><pre><code>{_e(command)}</code></pre>"
        if command
        else "<h2>Reproduce</h2><p>The command was not recorded (the report was built through "
        "the Python API).</p>"
    )
    title = f"normdoctor: {report.model}: {report.verdict}"
    if patched is not None:
        title += f" → after the patch: {patched.verdict}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="color-scheme" content="light">',
            f"<title>{_e(title)}</title>",
            f"<style>{PAGE_CSS}</style>",
            "</head>",
            "<body><main>",
            f'<header><p class="muted">normdoctor report</p><h1>{_e(report.model)}</h1>'
            + (_series_line(report, series, shown) if series else "")
            + f"{verdict}</header>",
            _composition_section(report, sweep),
            layers,
            _figure_section(shown, skipped),
            _notes_section(report, patched),
            reproduce,
            _footer(report, provenance),
            "</main></body>",
            "</html>",
            "",
        ]
    )

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
from typing import TYPE_CHECKING

from ..outputs import Outputs
from ..report import LayerReport, LayerStatus, ScanReport, Verdict
from . import plots
from .style import num, pct

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["FIGURE_NAMES", "figures", "save_report"]

#: Figure keys, in page order, with their section headings.
FIGURE_NAMES = {
    "end_to_end": "What eval mode does to the outputs",
    "series": "Drift over the checkpoint series",
    "drift": "Drift per layer",
    "sweep": "Drift against batch size",
    "batches": "Per-batch mismatch",
    "channels": "Running against observed statistics",
}
#: Above this many layers the page shows the worst ones first and every layer in an appendix.
MAX_TABLE_ROWS = 40
WORST_ROWS = 20
PNG_DPI = 144

Sweep = Mapping[int, ScanReport] | Sequence[ScanReport]


def _build(
    report: ScanReport,
    sweep: Sweep | None,
    patched: ScanReport | None,
    train_batch_size: int | None,
    series: Sequence[ScanReport] | None = None,
) -> tuple[dict[str, Figure], dict[str, str]]:
    """(figures by key, reasons for the figures left out)."""
    makers: dict[str, Callable[[], Figure]] = {
        "end_to_end": lambda: plots.end_to_end_figure(report, patched),
        "drift": lambda: plots.drift_figure(report),
        "batches": lambda: plots.batch_distribution_figure(report),
        "channels": lambda: plots.channels_figure(report),
    }
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
    buf = io.BytesIO()
    # No software/date metadata: identical reports give identical files.
    meta = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
    fig.savefig(buf, format=fmt, dpi=PNG_DPI, metadata=meta)
    return buf.getvalue()


@dataclass(frozen=True)
class _Shown:
    key: str
    png: bytes
    headline: str
    caption: str
    files: tuple[str, ...]


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
        _write_files(folder, report, fmts, sweep, patched, command, train_batch_size, series)

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
) -> None:
    """Render the figures and the page into ``folder``."""
    figs, skipped = _build(report, sweep, patched, train_batch_size, series)
    shown = []
    for key, fig in figs.items():
        png = _render(fig, "png")
        files = []
        for fmt in fmts:
            data = png if fmt == "png" else _render(fig, fmt)
            (folder / f"{key}.{fmt}").write_bytes(data)
            files.append(f"{key}.{fmt}")
        shown.append(_Shown(key, png, plots.headline(fig), plots.caption(fig), tuple(files)))
    page = _page(
        report,
        shown=shown,
        skipped=skipped,
        sweep=sweep,
        patched=patched,
        command=command,
        series=series,
    )
    (folder / "index.html").write_text(page, encoding="utf-8")


# -- the page --------------------------------------------------------------------------------

_CSS = """
:root { --fg:#1d1d1f; --muted:#5b5b66; --line:#d9d9de; --bg:#ffffff; --soft:#f5f5f7;
  --bad:#D55E00; --warn:#E69F00; --good:#009E73; --info:#0072B2; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; text-size-adjust: 100%; }
body { margin: 0; color: var(--fg); background: var(--bg);
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 1rem 1rem 3rem; }
h1 { font-size: 1.5rem; margin: .5rem 0 .75rem; overflow-wrap: anywhere; }
h2 { font-size: 1.2rem; margin: 2rem 0 .5rem; padding-bottom: .2rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1rem; margin: 1.25rem 0 .4rem; }
p, li { max-width: 75ch; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .9em; }
.verdict { border-left: 6px solid var(--info); background: var(--soft); padding: .75rem 1rem; border-radius: 4px; }
.verdict.bad { border-color: var(--bad); } .verdict.warn { border-color: var(--warn); }
.verdict.good { border-color: var(--good); }
.verdict .big { font-size: 1.2rem; font-weight: 700; margin: 0 0 .35rem; }
.verdict ul { margin: .25rem 0 0; padding-left: 1.2rem; }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; border: 1px solid var(--line); border-radius: 4px; }
table { border-collapse: collapse; width: 100%; font-size: .85rem; }
th, td { padding: .3rem .5rem; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: var(--soft); position: sticky; top: 0; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; min-width: 8rem; }
td.reason { min-width: 16rem; color: var(--muted); }
tr.flagged td:first-child { box-shadow: inset 5px 0 0 var(--bad); }
tr.harmless td:first-child { box-shadow: inset 5px 0 0 var(--warn); }
.status { font-weight: 600; white-space: nowrap; }
tr.flagged .status { color: #a34400; }
figure { margin: 1rem 0 1.5rem; }
figure img { display: block; width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
.concl { display: none; font-weight: 600; margin: .2rem 0 .4rem; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .4rem; max-width: 75ch; }
.files { font-size: .8rem; color: var(--muted); }
pre { background: var(--soft); padding: .75rem; border-radius: 4px; overflow-x: auto; white-space: pre-wrap; overflow-wrap: anywhere; }
.muted { color: var(--muted); }
footer { margin-top: 2rem; font-size: .8rem; color: var(--muted); }
@media (max-width: 600px) {
  body { font-size: 15px; } main { padding: .6rem .6rem 2rem; }
  h1 { font-size: 1.25rem; } .verdict .big { font-size: 1.05rem; }
  /* Layer tables become one card per layer: every column readable without sideways
     scrolling.  The all-layers appendix stays a table of the four columns that matter. */
  .scroll { border: none; overflow: visible; }
  table.cards, table.cards tbody { display: block; width: 100%; }
  table.cards thead { display: none; }
  table.cards tr { display: grid; grid-template-columns: 1fr 1fr; column-gap: .8rem;
    border: 1px solid var(--line); border-radius: 4px; margin: 0 0 .6rem; padding: .3rem .5rem; }
  table.cards td.name, table.cards td.reason, table.cards td.status { grid-column: 1 / -1; }
  table.cards tr.flagged { border-left: 6px solid var(--bad); }
  table.cards tr.harmless { border-left: 6px solid var(--warn); }
  table.cards tr td:first-child { box-shadow: none; }
  table.cards td { border: none; padding: .1rem 0; display: grid;
    grid-template-columns: 4.2rem 1fr; gap: .4rem; }
  table.cards td.num { text-align: left; }
  table.cards td.reason { min-width: 0; }
  table.cards td::before { content: attr(data-label); color: var(--muted);
    font-family: system-ui, sans-serif; font-weight: 400; }
  table.all th:nth-child(n+3):nth-child(-n+4), table.all td:nth-child(n+3):nth-child(-n+4),
  table.all th:nth-child(n+6):nth-child(-n+8), table.all td:nth-child(n+6):nth-child(-n+8),
  table.all th:nth-child(n+10), table.all td:nth-child(n+10) { display: none; }
  table.all td.name { min-width: 0; }
  .concl { display: block; }
}
@media print {
  body { font-size: 10pt; } main { max-width: none; padding: 0; }
  .scroll { overflow: visible; border: none; }
  th { position: static; }
  table { font-size: 8pt; } td.name { min-width: 10em; } td.reason { min-width: 16em; }
  figure, tr, .verdict { break-inside: avoid; page-break-inside: avoid; }
  h2 { break-after: avoid; page-break-after: avoid; }
  .files { display: none; }
  .verdict, th, tr.flagged td:first-child, tr.harmless td:first-child {
    -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""

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


def _patched_line(patched: ScanReport) -> str:
    e = patched.end_to_end
    bits = [f"After the patch: {_e(patched.verdict)}"]
    if e is not None:
        if e.agreement is not None:
            bits.append(f"{pct(e.agreement)} of predictions equal in both paths")
        if e.acc_eval is not None:
            bits.append(f"eval-mode accuracy {pct(e.acc_eval)}")
    return "; ".join(bits) + "."


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


def _layers_section(report: ScanReport) -> tuple[str, str]:
    """(the section near the top, the appendix with every layer or "")."""
    rows = list(enumerate(report.layers, 1))
    legend = (
        '<p class="muted">drift, shift and noise are dimensionless: RMS(y_train − y_eval) / '
        "RMS(γ) on the train path; shift scores the exact pooled statistics against the running "
        "ones, noise each batch against the pooled ones; non-iid is the spread of batch means "
        "over what i.i.d. batches would give (1 ≈ i.i.d.). # is the position in forward order, as "
        "in the figures.</p>"
    )
    if not rows:
        return "<h2>Layers</h2><p>No normalization layers were found.</p>", ""
    if not any(layer.drift is not None for layer in report.layers):
        legend = ""
    if len(rows) <= MAX_TABLE_ROWS:
        return f"<h2>Layers</h2>{legend}{_table(rows)}", ""
    measured = [(i, layer) for i, layer in rows if layer.drift is not None]
    worst = sorted(measured, key=lambda r: -(r[1].drift or 0.0))[:WORST_ROWS]
    drifting = [
        (i, layer)
        for i, layer in rows
        if layer.status in (LayerStatus.FLAGGED, LayerStatus.HARMLESS)
    ]
    keep = {i for i, _ in worst} | {i for i, _ in drifting}
    top_rows = sorted((r for r in rows if r[0] in keep), key=lambda r: -(r[1].drift or 0.0))
    top = (
        f"<h2>Layers: the {len(top_rows)} worst of {len(rows)}</h2>{legend}"
        f"<p>Every drifting layer and the {len(worst)} highest drift scores, worst first; "
        '<a href="#all-layers">all layers in forward order</a> are listed at the end.</p>'
        f"{_table(top_rows)}"
    )
    counts = Counter(_STATUS_TEXT.get(layer.status, str(layer.status)) for _, layer in rows)
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    appendix = (
        f'<h2 id="all-layers">All {len(rows)} layers in forward order</h2>'
        f"<p>{_e(summary)}.</p>{_table(rows, 'all')}"
    )
    return top, appendix


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


def _figure_section(shown: list[_Shown], skipped: dict[str, str]) -> str:
    parts = ["<h2>Figures</h2>"]
    by_reason: dict[str, list[str]] = {}
    for key, reason in skipped.items():
        by_reason.setdefault(reason, []).append(FIGURE_NAMES[key])
    if not shown:
        if len(by_reason) == 1:  # one reason for everything: say it once
            return f"<h2>Figures</h2><p>No figures: {_e(next(iter(by_reason)))}.</p>"
        parts.append("<p>No figures: there is nothing to draw for this scan.</p>")
    for s in shown:
        data = base64.b64encode(s.png).decode("ascii")
        files = ", ".join(f'<a href="{_e(f)}">{_e(f)}</a>' for f in s.files)
        img = f'<img src="data:image/png;base64,{data}" alt="{_e(s.headline)}">'
        parts.append(
            f'<figure id="fig-{_e(s.key)}"><h3>{_e(FIGURE_NAMES[s.key])}</h3>'
            # The title inside the image is too small on a phone: repeat it as text there.
            + f'<p class="concl">{_e(s.headline)}</p>'
            + (
                f'<a href="{_e(s.key)}.png" title="full size">{img}</a>'
                if f"{s.key}.png" in s.files
                else img
            )
            + f"<figcaption>{_e(s.caption)}"
            + (f' <span class="files">Files: {files}.</span>' if files else "")
            + "</figcaption></figure>"
        )
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


def _page(
    report: ScanReport,
    *,
    shown: list[_Shown],
    skipped: dict[str, str],
    sweep: Sweep | None = None,
    patched: ScanReport | None = None,
    command: str | None = None,
    series: Sequence[ScanReport] | None = None,
) -> str:
    """The HTML text of the page (figures already rendered)."""
    verdict_items = _fix_lines(report, patched)
    e2e = _end_to_end_line(report)
    if e2e:
        verdict_items.append(_e(e2e))
    if patched is not None:
        verdict_items.append(_patched_line(patched))
    items = "".join(f"<li>{item}</li>" for item in verdict_items)
    verdict = (
        f'<section class="verdict {_verdict_class(report)}">'
        f'<p class="big">{_e(report.verdict[:1].upper() + report.verdict[1:])}</p>'
        + (f"<ul>{items}</ul>" if items else "")
        + "</section>"
    )
    layers_top, appendix = _layers_section(report)
    reproduce = (
        f"<pre><code>{_e(command)}</code></pre>"
        if command
        else "<p>The command was not recorded (the report was built through the Python API).</p>"
    )
    title = f"normdoctor: {report.model}: {report.verdict}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            '<meta name="color-scheme" content="light">',
            f"<title>{_e(title)}</title>",
            f"<style>{_CSS}</style>",
            "</head>",
            "<body><main>",
            f'<header><p class="muted">normdoctor report</p><h1>{_e(report.model)}</h1>'
            + (_series_line(report, series, shown) if series else "")
            + f"{verdict}</header>",
            _composition_section(report, sweep),
            layers_top,
            _figure_section(shown, skipped),
            _notes_section(report, patched),
            "<h2>Reproduce</h2>",
            reproduce,
            appendix,
            f"<footer>normdoctor {_e(report.normdoctor_version)}, report schema "
            f"{report.schema_version}. Self-contained page: no network access needed.</footer>",
            "</main></body>",
            "</html>",
            "",
        ]
    )

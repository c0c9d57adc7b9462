"""A scan in a notebook: ``ScanReport._repr_html_`` and ``ScanReport.__rich__``.

:mod:`normdoctor.render` registers :func:`notebook_html` and :func:`rich_view` as presenters
(:func:`normdoctor.report.register_presenter`); the report itself never imports rendering.
Nothing here imports rich or matplotlib until a report is shown.
"""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Any

from ..report import LayerReport, ScanReport
from ..text import plural, significant
from .specs import NothingToPlot

__all__ = ["WORST", "notebook_html", "rich_view"]

WORST = 10  # layers tabled in full when a model has more

_CSS = (
    "<style>.nd-scan td,.nd-scan th{padding:1px 8px;text-align:right}"
    ".nd-scan td.l,.nd-scan th.l{text-align:left}.nd-scan .flagged{color:#b00020}</style>"
)


def _row(i: int, layer: LayerReport, reason: bool) -> str:
    cls = ' class="flagged"' if layer.flagged else ""
    fix = str(layer.recommendation) if layer.recommendation != "ok" else "–"
    cells = [
        str(i),
        f'<td class="l">{escape(layer.name or "<root>")}</td>',
        *(significant(v) for v in (layer.drift, layer.shift, layer.noise, layer.noniid)),
        f'<td class="l">{escape(str(layer.status))}</td>',
        f'<td class="l">{escape(fix)}</td>',
        *([f'<td class="l">{escape(layer.reason)}</td>'] if reason else []),
    ]
    tds = "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in cells)
    return f"<tr{cls}>{tds}</tr>"


def _figure(report: ScanReport) -> str:
    """The drift figure as an inline PNG, or why there is none."""
    from .plots import drift_figure

    try:
        fig = drift_figure(report)
    except NothingToPlot as why:
        return f"<p><em>{escape(str(why))}</em></p>"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="drift per layer" style="max-width:100%" src="data:image/png;base64,{data}">'


def notebook_html(report: ScanReport, *, worst: int = WORST, figure: bool = True) -> str:
    """The verdict, the evidence line, the layer table (grouped findings and the ``worst``
    layers when there are more) and the drift figure inline, as one HTML fragment."""
    parts = [
        _CSS,
        '<div class="nd-scan">',
        f"<p><strong>{escape(report.status.symbol)} {escape(report.verdict)}</strong></p>",
        f"<p>{escape(report.model)}; batches: {escape(report.composition.description)}</p>",
    ]
    e = report.end_to_end
    if e is not None and e.describe():
        parts.append(f"<p>end to end (train vs eval path): {escape('; '.join(e.describe()))}</p>")
    ev = report.evidence
    reference = ev.reference_candidate if ev is not None else None
    if ev is not None and reference is not None and len(ev.candidates) > 1:
        tried = plural(len(ev.candidates), "composition")
        parts.append(
            f"<p>judged at {escape(reference.description)}, the one of {tried} tried that "
            "reproduces training best</p>"
        )
    n = len(report.layers)
    if n > worst:
        counts = ", ".join(f"{k} {s}" for s, k in report.counts().items())
        items = "".join(f"<li>{escape(g.describe())}</li>" for g in report.groups())
        parts.append(f"<p>{plural(n, 'layer')}: {escape(counts)}</p><ul>{items}</ul>")
        rows = list(report.worst(worst))
        parts.append(f"<p>the {len(rows)} layers with the highest drift, worst first:</p>")
    else:
        rows = list(enumerate(report.layers, 1))
    if rows:
        reason = n <= worst  # bigger models: the groups above say the reasons
        columns = ("#", "layer", "drift", "shift", "noise", "noniid", "status", "fix")
        head = "".join(
            f'<th class="l">{h}</th>'
            if h in ("layer", "status", "fix", "reason")
            else f"<th>{h}</th>"
            for h in (*columns, *(["reason"] if reason else []))
        )
        body = "".join(_row(i, layer, reason) for i, layer in rows)
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    if figure and any(layer.drift is not None for layer in report.layers):
        parts.append(_figure(report))
    parts.extend(f"<p><small>note: {escape(note)}</small></p>" for note in report.notes)
    parts.append("</div>")
    return "\n".join(parts)


def rich_view(report: ScanReport, **options: Any) -> Any:
    """The terminal rendering (:class:`normdoctor.render.console.ScanView`) as a renderable."""
    from .console import ScanView

    return ScanView(report, **options)

"""Plain-text renderings for CI: GitHub-flavoured markdown (a job summary, a PR comment) and
GitHub Actions workflow annotations (``::error``/``::warning`` lines, as ``ruff
--output-format github`` writes them).

Pure functions from reports to ``str``; nothing here prints. Layers are numbered from 1, as in
the terminal and the HTML report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..report import LayerReport, LayerStatus, ScanReport, Verdict

if TYPE_CHECKING:
    from ..diff import ScanDiff

__all__ = [
    "diff_markdown",
    "patch_markdown",
    "scan_annotations",
    "scan_markdown",
    "scans_annotations",
    "scans_markdown",
    "significant",
]

_STATUS_WORD = {
    LayerStatus.FLAGGED: "✗ flagged",
    LayerStatus.HARMLESS: "~ harmless",
    LayerStatus.DRIFTS: "? drifts",
    LayerStatus.OK: "✓ ok",
    LayerStatus.NOT_EXECUTED: "? not run",
    LayerStatus.NOT_MEASURABLE: "? not measurable",
    LayerStatus.NOT_MEASURED: "- n/a",
}


def significant(x: float | None) -> str:
    """Three significant digits, trailing zeros kept (0.350 beside 0.0765), ``-`` when missing."""
    if x is None:
        return "-"
    text = f"{x:#.3g}"
    return text[:-1] if text.endswith(".") else text


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _cell(text: str) -> str:
    """A table cell: pipes escaped, one line."""
    return " ".join(text.replace("|", "\\|").split())


def _code(text: str) -> str:
    """Inline code that survives backticks in ``text``."""
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _end_to_end(report: ScanReport) -> str | None:
    e = report.end_to_end
    if e is None or not e.describe():
        return None
    return "end to end (train vs eval path): " + "; ".join(e.describe())


def _layer_table(layers: Sequence[LayerReport]) -> list[str]:
    lines = [
        "| # | layer | kind | ch | drift | shift | noise | non-i.i.d. | status | fix |",
        "|--:|:--|:--|--:|--:|--:|--:|--:|:--|:--|",
    ]
    for i, layer in enumerate(layers, start=1):
        drift = significant(layer.drift)
        if layer.flagged:
            drift = f"**{drift}**"
        fix = str(layer.recommendation) if layer.recommendation != "ok" else "-"
        cells = [
            str(i),
            _code(layer.name or "<root>"),
            layer.kind,
            str(layer.num_features),
            drift,
            significant(layer.shift),
            significant(layer.noise),
            significant(layer.noniid),
            _STATUS_WORD[layer.status],
            fix,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def scan_markdown(report: ScanReport, *, fix_command: str | None = None, level: int = 3) -> str:
    """A scan as GitHub-flavoured markdown: heading, the verdict line, the evidence (end to end
    and the composition), the layer table and, when harmful, the fix command."""
    h = "#" * level
    lines = [
        f"{h} normdoctor: {_code(report.model)}",
        "",
        # the verdict line: "status: reason; N of M layers flagged, ..." with the word in bold
        f"**{report.status.symbol} {report.status}**{report.verdict[len(str(report.status)) :]}",
        "",
    ]
    evidence = [f"batches: {report.composition.description}"]
    line = _end_to_end(report)
    if line:
        evidence.append(line)
    lines += [f"- {e}" for e in evidence] + [""]
    if report.layers:
        lines += [*_layer_table(report.layers), ""]
    flagged = report.flagged_layers
    if flagged:
        lines += [f"- {_code(layer.name)}: {layer.reason}" for layer in flagged] + [""]
        if fix_command:
            lines += ["Fix (then scan the patched model):", "", "```sh", fix_command, "```", ""]
    lines += [f"> note: {note}" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def scans_markdown(reports: Sequence[ScanReport], *, fix_command: str | None = None) -> str:
    """Several scans (a sweep or a checkpoint series), one section each."""
    if len(reports) == 1:
        return scan_markdown(reports[0], fix_command=fix_command)
    return "\n".join(scan_markdown(r, level=3) for r in reports)


def patch_markdown(before: ScanReport, after: ScanReport) -> str:
    """``patch``: drift before and after per layer, the end-to-end line and both verdicts."""
    lines = [
        f"### normdoctor patch: {_code(before.model)}",
        "",
        f"- before: **{before.status.symbol} {before.status}**",
        f"- after: **{after.status.symbol} {after.status}**",
    ]
    b, a = before.end_to_end, after.end_to_end
    if b is not None and a is not None and b.acc_eval is not None and a.acc_eval is not None:
        lines.append(f"- eval-mode accuracy: {_pct(b.acc_eval)} before, {_pct(a.acc_eval)} after")
    elif b is not None and a is not None and b.agreement is not None:
        lines.append(
            f"- agreement with training behaviour: {_pct(b.agreement)} before, "
            f"{_pct(a.agreement)} after"
        )
    lines += [
        "",
        "| # | layer | fix | drift before | drift after | status after |",
        "|--:|:--|:--|--:|--:|:--|",
    ]
    now = {layer.name: layer for layer in after.layers}
    for i, layer in enumerate(before.layers, start=1):
        if not layer.batch_dependent:
            continue
        later = now.get(layer.name)
        fix = str(layer.recommendation) if layer.flagged else "-"
        if later is None:
            cells = [significant(None), "replaced"]
        elif later.batch_dependent:
            cells = [significant(later.drift), _STATUS_WORD[later.status]]
        else:
            cells = ["-", f"✓ {later.kind}"]
        row = [str(i), _code(layer.name), fix, significant(layer.drift), *cells]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def diff_markdown(diff: ScanDiff) -> str:
    """A comparison of two scans (:class:`normdoctor.diff.ScanDiff`) as markdown."""
    word = "worse" if diff.worse else "not worse"
    lines = [
        f"### normdoctor diff: {_code(diff.before_model)} → {_code(diff.after_model)}",
        "",
        f"**{diff.before_status} → {diff.after_status}** ({word})",
        "",
    ]
    for change in diff.end_to_end:
        lines.append(
            f"- {change.name}: {change.format(change.before)} → {change.format(change.after)}"
            + (f" ({change.delta_text})" if change.delta_text else "")
        )
    lines += [f"- worse: {why}" for why in diff.reasons]
    lines += [
        "",
        "| # | layer | drift before | drift after | status before | status after |",
        "|--:|:--|--:|--:|:--|:--|",
    ]
    for i, layer in enumerate(diff.layers, start=1):
        row = [
            str(i),
            _code(layer.name),
            significant(layer.drift_before),
            significant(layer.drift_after),
            str(layer.status_before or "-"),
            str(layer.status_after or "-") + (" (new)" if layer.newly_flagged else ""),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


# -- GitHub Actions workflow annotations ------------------------------------------------------


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _annotation(level: str, title: str, message: str) -> str:
    return f"::{level} title={_escape_property(title)}::{_escape_data(message)}"


_VERDICT_LEVEL = {
    Verdict.HARMFUL: "error",
    Verdict.COMPOUNDING: "error",
    Verdict.UNDETERMINED: "warning",
    Verdict.CANNOT_CHECK: "warning",
    Verdict.NOT_MEASURABLE: "warning",
    Verdict.HARMLESS: "notice",
    Verdict.OK: "notice",
}


def scan_annotations(report: ScanReport) -> str:
    """One workflow annotation per flagged layer (``::error``) and per layer whose drift is
    undetermined (``::warning``), then one for the model's verdict."""
    lines = []
    for i, layer in enumerate(report.layers, start=1):
        if layer.status is LayerStatus.FLAGGED:
            level = "error"
        elif layer.status is LayerStatus.DRIFTS:
            level = "warning"
        else:
            continue
        fix = f"; fix: {layer.recommendation}" if layer.recommendation != "ok" else ""
        message = (
            f"{report.model}: layer {i} {layer.name} ({layer.kind}) drifts {significant(layer.drift)} "
            f"(threshold {report.threshold:.3g}): {layer.reason}{fix}"
        )
        lines.append(_annotation(level, "normdoctor", message))
    lines.append(
        _annotation(
            _VERDICT_LEVEL[report.status], "normdoctor", f"{report.model}: {report.verdict}"
        )
    )
    return "\n".join(lines) + "\n"


def scans_annotations(reports: Sequence[ScanReport]) -> str:
    """The annotations of several scans, in turn."""
    return "".join(scan_annotations(r) for r in reports)

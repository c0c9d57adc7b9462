"""``normdoctor diff``: what changed between two scans, with an exit code for "got worse"."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ..diff import DEFAULT_TOLERANCE, ScanDiff, compare, scans_to_compare
from ..errors import NormDoctorError, one_line
from ..render.markdown import significant
from .common import EXIT_DRIFT, EXIT_OK, stdout

__all__ = ["EPILOG", "diff"]

EPILOG = """Examples:

\b
  normdoctor scan model.pt --data val.npz --json before.json
  normdoctor scan fixed.pt --data val.npz --json after.json
  normdoctor diff before.json after.json
  normdoctor diff patch.json   # what patch --json wrote: before and after
"""


class DiffFormat(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NormDoctorError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NormDoctorError(f"{path}: cannot read ({one_line(exc, limit=sys.maxsize)})") from exc
    except json.JSONDecodeError as exc:
        raise NormDoctorError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(value, dict):
        raise NormDoctorError(f"{path}: not a normdoctor JSON (expected an object)")
    return value


def print_diff(d: ScanDiff) -> None:
    """The comparison for people: the verdicts, the end-to-end numbers, the layer table, and
    why the second scan is worse (laid out as the scan is: unwrapped when piped)."""
    from ..render.console import emit, para

    blocks: list[Any] = [
        para(f"{d.before_model} -> {d.after_model}", style="bold"),
        para(f"before: {d.before_verdict}", hang=8),
        para(f"after: {d.after_verdict}", hang=7),
    ]
    for m in d.end_to_end:
        delta = f" ({m.delta_text})" if m.delta_text else ""
        blocks.append(para(f"{m.name}: {m.format(m.before)} -> {m.format(m.after)}{delta}"))
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("layer", no_wrap=True)
    table.add_column("drift before", justify="right")
    table.add_column("drift after", justify="right")
    table.add_column("status before", no_wrap=True)
    table.add_column("status after", no_wrap=True)
    for i, layer in enumerate(d.layers, start=1):
        after = str(layer.status_after or "-")
        table.add_row(
            str(i),
            layer.name or "<root>",
            significant(layer.drift_before),
            significant(layer.drift_after),
            str(layer.status_before or "-"),
            Text(
                after + (" (new)" if layer.newly_flagged else ""),
                style="bold red" if layer.newly_flagged else "",
            ),
        )
    if d.layers:
        blocks.append(table)
    if d.worse:
        blocks += [para(f"✗ worse: {why}", hang=4, style="bold red") for why in d.reasons]
    else:
        blocks.append(para("✓ not worse", style="green"))
    emit(stdout(), blocks)


def diff(
    before: Annotated[
        Path,
        typer.Argument(
            metavar="BEFORE",
            help="A JSON written by `scan --json` (or by `patch --json`, alone: its before and "
            "after).",
        ),
    ],
    after: Annotated[
        Path | None,
        typer.Argument(
            metavar="AFTER", help="A JSON written by `scan --json`, compared to BEFORE."
        ),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance",
            min=0.0,
            metavar="X",
            help="How far eval-mode accuracy or prediction agreement may drop (as a fraction: "
            "0.01 = 1 point) before AFTER counts as worse.",
        ),
    ] = DEFAULT_TOLERANCE,
    output_format: Annotated[
        DiffFormat,
        typer.Option(
            "--format",
            case_sensitive=False,
            help="What stdout holds: text, json or markdown.",
        ),
    ] = DiffFormat.text,
) -> int:
    """Compare two scans per layer (by name) and end to end: drift, status, verdict, accuracy.

    Exit 1 when AFTER is worse than BEFORE: its verdict is worse (ok < drifts-harmless <
    undetermined < harmful), a layer is newly flagged, or eval-mode accuracy or prediction
    agreement dropped by more than --tolerance; 0 otherwise; 2 on unreadable or mismatched files.
    """
    first = _read(before)
    second = None if after is None else _read(after)
    names = (str(before),) if after is None else (str(before), str(after))
    a, b = scans_to_compare(first, second, names=names)
    result = compare(a, b, tolerance=tolerance)
    if output_format is DiffFormat.json:
        print(json.dumps(result.to_dict(), indent=1, allow_nan=False), flush=True)
    elif output_format is DiffFormat.markdown:
        from ..render.markdown import diff_markdown

        print(diff_markdown(result), end="", flush=True)
    else:
        print_diff(result)
    return EXIT_DRIFT if result.worse else EXIT_OK

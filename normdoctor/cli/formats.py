"""``--format`` and ``--json``: which output goes where.

* ``text`` (the default): the human rendering on stdout; ``--json FILE`` beside it.
* ``json``: the JSON on stdout and nothing else (``| jq .`` works), as with ``--json -``;
  ``--json FILE`` also writes it to FILE.
* ``markdown``: GitHub-flavoured markdown on stdout (``>> $GITHUB_STEP_SUMMARY``, a PR comment).
* ``github``: GitHub Actions workflow annotations on stdout (``::error title=normdoctor::...``).

With ``--json -`` or ``--format json`` stdout holds only the JSON: the human rendering is not
printed (progress, notes and warnings stay on stderr).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from ..report import ScanReport

__all__ = [
    "FormatOpt",
    "ListingFormat",
    "ListingFormatOpt",
    "OutputFormat",
    "PatchFormat",
    "PatchFormatOpt",
    "Presentation",
    "presentation",
    "print_scan",
]


class OutputFormat(str, Enum):
    text = "text"
    json = "json"
    markdown = "markdown"
    github = "github"


class ListingFormat(str, Enum):
    """``layers --format``: a listing has no markdown or annotation form."""

    text = "text"
    json = "json"


class PatchFormat(str, Enum):
    """``patch --format``: the before/after table as text, JSON or markdown."""

    text = "text"
    json = "json"
    markdown = "markdown"


_FORMAT_HELP = {
    "text": "text (for people)",
    "json": "json (only the JSON, as with --json -)",
    "markdown": "markdown (a CI job summary or a PR comment)",
    "github": "github (GitHub Actions workflow annotations)",
}


def _format_option(kind: type[Enum]) -> Any:
    words = [_FORMAT_HELP[str(member.value)] for member in kind]
    return typer.Option(
        "--format",
        case_sensitive=False,
        help="What stdout holds: " + ", ".join(words[:-1]) + " or " + words[-1] + ".",
    )


FormatOpt = Annotated[OutputFormat, _format_option(OutputFormat)]
ListingFormatOpt = Annotated[ListingFormat, _format_option(ListingFormat)]
PatchFormatOpt = Annotated[PatchFormat, _format_option(PatchFormat)]


@dataclass(frozen=True)
class Presentation:
    """Where a command's results go: ``format`` on stdout, and the JSON files to write."""

    format: OutputFormat
    json_targets: tuple[Path, ...]  # Path("-") is stdout

    @property
    def text(self) -> bool:
        """The human rendering goes to stdout."""
        return self.format is OutputFormat.text and Path("-") not in self.json_targets


def presentation(chosen: Enum, json_out: Path | None) -> Presentation:
    """Check ``--format`` against ``--json``: which output goes to stdout, which JSON where."""
    fmt = OutputFormat(chosen.value)
    to_stdout = json_out is not None and str(json_out) == "-"
    if to_stdout and fmt in (OutputFormat.markdown, OutputFormat.github):
        raise typer.BadParameter(
            f"--json - and --format {fmt.value} both write stdout; give --json a file",
            param_hint="'--json'",
        )
    targets: list[Path] = []
    if fmt is OutputFormat.json or to_stdout:
        targets.append(Path("-"))
    if json_out is not None and not to_stdout:
        targets.append(json_out)
    return Presentation(fmt, tuple(targets))


def print_scan(
    report: ScanReport,
    console: Console,
    *,
    verbose: bool = False,
    all_layers: bool = False,
    fix_command: str | None = None,
) -> None:
    """:func:`normdoctor.render.console.print_scan`: ``fix_command`` is the fix hint (the
    user's own command), ``all_layers`` lists every layer of a big model in full."""
    from ..render import console as render

    render.print_scan(
        report, console, verbose=verbose, all_layers=all_layers, fix_command=fix_command
    )

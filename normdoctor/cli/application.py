"""The ``normdoctor`` Typer application: its global options and its commands, in the order
``--help`` lists them."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from .._version import __version__
from . import layers_command, patch_command, report_command, scan_command

__all__ = ["app"]

app = typer.Typer(
    name="normdoctor",
    help="Find and fix the train/inference mismatch of normalization layers.\n\n"
    "Exit codes: 0 no layer flagged, 1 drift found, 2 usage, input or internal error, "
    "130 interrupted.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state: dict[str, Any] = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"normdoctor {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    _state["debug"] = debug


app.command(epilog=layers_command.EPILOG)(layers_command.layers)
app.command(epilog=scan_command.EPILOG)(scan_command.scan)
app.command(epilog=patch_command.EPILOG)(patch_command.patch)
app.command(epilog=report_command.EPILOG)(report_command.report)

"""The ``normdoctor`` Typer application: its global options and its commands, in the order
``--help`` lists them."""

from __future__ import annotations

from typing import Annotated, Any

import typer
import typer.core

from .._version import __version__
from . import diff_command, layers_command, patch_command, report_command, scan_command

__all__ = ["Command", "app"]


def _argument_name(param: Any) -> str:
    """An argument as click writes it: MODEL, MODEL... (several), [MODEL] (optional)."""
    name = (param.metavar or (param.name or "arg").upper()).rstrip(".")
    if param.nargs != 1:
        name += "..."
    return name if param.required else f"[{name}]"


class Command(typer.core.TyperCommand):
    """A command whose usage line and help name arguments as click does (``MODEL...``), not
    as typer 0.2x does (``{models}...`` and the Python type ``<list[Path]>``)."""

    # typer's click (typer._click) is not the click package: parameters are told apart by kind

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_argument_name(param))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append((_argument_name(param), record[1]))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


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


app.command(cls=Command, epilog=layers_command.EPILOG)(layers_command.layers)
app.command(cls=Command, epilog=scan_command.EPILOG)(scan_command.scan)
app.command(cls=Command, epilog=patch_command.EPILOG)(patch_command.patch)
app.command(cls=Command, epilog=report_command.EPILOG)(report_command.report)
app.command(cls=Command, epilog=diff_command.EPILOG)(diff_command.diff)

"""The entry point: every error becomes one line on stderr and an exit code; SIGINT and
SIGTERM unwind the command like Ctrl-C.

Every message normdoctor itself prints on stderr has one of two prefixes:
``normdoctor: error:`` (usage errors after click's usage line; input and internal errors
alone) and ``normdoctor: warning:`` (Python warnings, one line each, without the source
line Python's own format shows)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any, TextIO

import click
import typer

from ..errors import NormDoctorError, one_line
from ..outputs import Interrupted, interrupt_on_signals, remove_temporaries
from .application import app
from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from .invocation import recorded_argv

__all__ = ["main"]


def _interrupted() -> int:
    print("normdoctor: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _vendored(name: str, default: type[BaseException]) -> type[BaseException]:
    """typer >= 0.2x raises its own copy of click's exceptions (``typer._click``)."""
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        return default
    return getattr(vendored, name, default)


_CLICK_ERRORS = (click.ClickException, _vendored("ClickException", click.ClickException))
_ABORTS = (click.exceptions.Abort, getattr(typer.exceptions, "Abort", click.exceptions.Abort))


def _show_click_error(exc: Any) -> None:
    """A click error as normdoctor says errors: a usage error keeps click's usage line and its
    'Try ... for help' line, then one ``normdoctor: error:`` line."""
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        print(ctx.get_usage(), file=sys.stderr)
        names = ctx.command.get_help_option_names(ctx)
        if names:
            print(f"Try '{ctx.command_path} {max(names, key=len)}' for help.", file=sys.stderr)
    print(
        f"normdoctor: error: {one_line(exc.format_message(), limit=sys.maxsize)}", file=sys.stderr
    )


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the command line: one line, no source path."""
    print(f"normdoctor: warning: {one_line(message, limit=sys.maxsize)}", file=file or sys.stderr)


def _invoke(args: list[str]) -> int | None:
    """Run the command; every error becomes one line on stderr and an exit code."""
    command = typer.main.get_command(app)
    debug = "--debug" in args
    try:
        with recorded_argv(args, command):
            code = command.main(args=args, prog_name="normdoctor", standalone_mode=False)
        # typer answers a KeyboardInterrupt it caught with 130 and no word
        return _interrupted() if code == EXIT_INTERRUPTED else code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except _ABORTS as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            return _interrupted()
        print("normdoctor: aborted", file=sys.stderr)
        return EXIT_ERROR
    except _CLICK_ERRORS as exc:
        _show_click_error(exc)
        return EXIT_ERROR
    except (
        NormDoctorError,
        FileExistsError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
    ) as exc:
        if debug:
            raise
        print(f"normdoctor: error: {one_line(exc, limit=sys.maxsize)}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, Interrupted):
        return _interrupted()
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        if debug:
            raise
        print(
            f"normdoctor: internal error: {type(exc).__name__}: {one_line(exc, limit=sys.maxsize)} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the exit code.

    SIGINT and SIGTERM unwind the command like Ctrl-C (exit 130, ``normdoctor: interrupted``);
    the previous handlers are back on return, and no temporary file of the command survives.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    with interrupt_on_signals(), warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            code = _invoke(args)
        except (KeyboardInterrupt, Interrupted):  # arrived while an error was being reported
            code = _interrupted()
        finally:
            remove_temporaries()
    if code is None:
        code = EXIT_OK
    if argv is None:
        sys.exit(code)
    return int(code)

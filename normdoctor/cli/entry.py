"""The entry point: every error becomes one line on stderr and an exit code; SIGINT and
SIGTERM unwind the command like Ctrl-C."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click
import typer

from ..errors import NormDoctorError, one_line
from ..outputs import Interrupted, interrupt_on_signals, remove_temporaries
from .application import app
from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK

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


def _invoke(args: list[str]) -> int | None:
    """Run the command; every error becomes one line on stderr and an exit code."""
    command = typer.main.get_command(app)
    debug = "--debug" in args
    try:
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
        exc.show(file=sys.stderr)  # type: ignore[attr-defined]
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
    with interrupt_on_signals():
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

"""The ``normdoctor`` command: the only place that parses arguments, prints and exits.

Exit codes, as linters taught CI users (ruff, ESLint):

* 0: no layer flagged (``--exit-zero``: also when layers are flagged);
* 1: drift found (``scan``, ``patch``), or an error-level static finding (``layers``);
* 2: usage, input or internal error: one line on stderr, no traceback (``--debug`` shows it);
* 130: interrupted (SIGINT or SIGTERM): ``normdoctor: interrupted``, no output written, no
  temporary file left (the shell's convention for Ctrl-C).

Outputs (``--json``, ``-o``, ``--report``) are declared and checked before any work and written
together at the end (:mod:`normdoctor.outputs`): a failing command writes nothing.

Findings go to stdout (or ``--json``); progress and notes go to stderr.

The modules: :mod:`.application` (the Typer app, global options, the commands' order),
:mod:`.options` (shared options, their parsing, :class:`~.options.ScanOptions`),
:mod:`.common` (consoles, the output plan, loading, progress, exit codes), :mod:`.backend`
(what a command does with a loaded model), one ``*_command`` module per command,
:mod:`.formats` (``--format`` and ``--json``: what goes to stdout), :mod:`.invocation` (the
command as typed: the fix hint, the command a report records) and :mod:`.entry` (errors,
warnings, exit codes and signals around a run).
"""

from __future__ import annotations

from .application import app
from .backend import run_scan
from .common import EXIT_DRIFT, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from .diff_command import diff
from .entry import main
from .layers_command import layers
from .options import Device, Fix
from .patch_command import patch
from .report_command import report
from .scan_command import scan

__all__ = [
    "EXIT_DRIFT",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "Device",
    "Fix",
    "app",
    "diff",
    "layers",
    "main",
    "patch",
    "report",
    "run_scan",
    "scan",
]

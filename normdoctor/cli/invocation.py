"""The command as the user typed it: recorded by :func:`normdoctor.cli.main` for the messages
that repeat it (the fix hint after a harmful scan, the command a patched report records)."""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["command_line", "current_argv", "fix_command", "patched_path", "recorded_argv"]

# a stack of (argv, the normdoctor command group): main() may be re-entered (tests, notebooks)
_ARGV: list[tuple[list[str], Any]] = []

# scan's options that patch does not take, or that only shape scan's output, by parameter
# name: every other option scan was given goes into the patch command as typed.
SCAN_ONLY = frozenset(
    {"batch_sizes", "strict", "paths", "device", "input_shape", "image_size", "verbose"}
)
PRESENTATION = frozenset({"json_out", "output_format", "exit_zero", "all_layers"})


@contextmanager
def recorded_argv(argv: Sequence[str], root: Any = None) -> Iterator[None]:
    """Record ``argv`` (the arguments after ``normdoctor``) and the click group ``root`` that
    parses them while a command runs."""
    _ARGV.append((list(argv), root))
    try:
        yield
    finally:
        _ARGV.pop()


def current_argv() -> list[str] | None:
    """The arguments of the running command (``None`` outside :func:`normdoctor.cli.main`)."""
    return list(_ARGV[-1][0]) if _ARGV else None


def command_line(argv: Sequence[str] | None = None) -> str | None:
    """``normdoctor ARGS...`` shell-quoted, runnable as printed (``None`` when not recorded)."""
    args = current_argv() if argv is None else list(argv)
    return None if args is None else shlex.join(["normdoctor", *args])


def patched_path(model: str) -> str:
    """Where the fix hint writes the patched model: ``<stem>-patched.pt`` (``.onnx`` for an ONNX
    model) in the working directory, beside nothing the user named."""
    path = Path(model.rstrip("/\\") or model)
    suffix = ".onnx" if path.suffix.lower() == ".onnx" else ".pt"
    return f"{path.stem if path.suffix else path.name}-patched{suffix}"


# typer's click (typer._click) is not the click package: parameters are told apart by kind


def _options(command: Any) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for param in command.params:
        if param.param_type_name == "option":
            for name in (*param.opts, *param.secondary_opts):
                table[name] = param
    return table


def _takes_value(param: Any) -> bool:
    return not (param.param_type_name == "option" and (param.is_flag or param.count))


def _kept(param: Any, patch_options: dict[str, Any], name: str) -> bool:
    return name in patch_options and param.name not in SCAN_ONLY | PRESENTATION


def _root(root: Any) -> Any:
    if root is None and _ARGV:
        root = _ARGV[-1][1]
    if root is None or not hasattr(root, "get_command"):
        raise TypeError("fix_command needs the normdoctor command group")
    return root


def fix_command(argv: Sequence[str], root: Any = None) -> str:
    """The ``patch`` command that fixes what the ``scan`` in ``argv`` found, runnable as printed.

    ``argv`` holds the arguments after ``normdoctor`` (global options, ``scan``, the model, its
    options). The result is the user's own command with ``scan`` replaced by ``patch`` and
    ``-o PATCHED`` added: the model, ``--arch``/``--arch-kwargs``, ``--data``, the batch
    composition (``-b``, ``--train-batch-size``, ``--train-group-by-label``, ``--group-by-label``,
    ``--shuffle``, ``--seed``, ``--search``), ``--threshold``, ``--normalize``, ``--max-batches``
    and ``--trust-pickle`` are kept as typed; options that only ``scan`` takes or that only shape
    its output (``--json``, ``--format``, ``--device``, ...) are dropped. Shell-quoted
    (:func:`shlex.join`). ``root``: the ``normdoctor`` click group (default: the one
    :func:`recorded_argv` recorded for the running command).
    """
    group = _root(root)
    scan, patch = group.get_command(None, "scan"), group.get_command(None, "patch")
    if scan is None or patch is None:
        raise TypeError("the command group has no scan or patch command")
    scan_options, patch_options = _options(scan), _options(patch)
    global_options = _options(group)
    args = list(argv)
    out: list[str] = []
    i = 0
    while i < len(args) and args[i] != "scan":  # global options (--debug) stay
        if args[i] in global_options:
            out.append(args[i])
        i += 1
    if i == len(args):
        raise ValueError("not a scan command")
    out.append("patch")
    i += 1
    models: list[str] = []
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            models.extend(args[i:])
            out.extend(["--", *args[i:]])
            break
        if not token.startswith("-") or token == "-":
            models.append(token)
            out.append(token)
            continue
        name, attached = token, None
        if token.startswith("--") and "=" in token:
            name, attached = token.split("=", 1)
        elif not token.startswith("--") and len(token) > 2:
            name, attached = token[:2], token[2:]  # -b1, or bundled flags -qv
        param = scan_options.get(name)
        if param is None:  # not a scan option: click rejected the scan already; keep it
            out.append(token)
            continue
        if attached is not None and not token.startswith("--") and not _takes_value(param):
            # bundled short flags: keep those patch takes
            flags = [name, *(f"-{c}" for c in attached)]
            out.extend(
                f for f in flags if f in scan_options and _kept(scan_options[f], patch_options, f)
            )
            continue
        value: list[str] = []
        if _takes_value(param) and attached is None and i < len(args):
            value = [args[i]]
            i += 1
        if _kept(param, patch_options, name):
            out.extend([token, *value])
    out.extend(["-o", patched_path(models[0]) if models else "PATCHED"])
    return shlex.join(["normdoctor", *out])

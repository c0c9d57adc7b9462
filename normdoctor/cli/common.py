"""What every command does: its consoles, its output plan, loading the model, the progress bar
and the exit code of its findings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console

from ..outputs import Outputs
from .options import arch_kwargs

if TYPE_CHECKING:
    from rich.progress import TaskID

__all__ = [
    "EXIT_DRIFT",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "Progress",
    "exit_code",
    "file_sha256",
    "load",
    "make_console",
    "output_plan",
    "stderr",
    "stdout",
    "write_json",
]

EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 130


def make_console(**kwargs: Any) -> Console:
    # In a pipe or a CI log, a sentence hard-wrapped at Rich's default 80 columns
    # breaks grep and line-oriented tools; only a terminal gets wrapped text.
    console = Console(highlight=False, **kwargs)
    console.soft_wrap = not console.is_terminal
    return console


def stdout() -> Console:
    return make_console()


def stderr(quiet: bool = False) -> Console:
    return make_console(stderr=True, quiet=quiet)


def output_plan(
    models: Sequence[Path] = (),
    *,
    data: str | None = None,
    arch: str | None = None,
    label: str = "input model",
) -> Outputs:
    """An output plan that knows every input of the command: no output may replace one."""
    plan = Outputs()
    for model in models:
        plan.add_input(model, label if len(models) == 1 else "series member")
    plan.add_input_spec(data, "data")
    plan.add_input_spec(arch, "--arch source")
    return plan


def write_json(plan: Outputs, target: Path | None, payload: dict[str, Any]) -> None:
    """Stage ``payload`` for ``--json`` (declared in ``plan``); the plan's commit writes it."""
    if target is not None:
        plan.write_text(target, json.dumps(payload, indent=1, allow_nan=False) + "\n")


def load(
    model: Path,
    arch: str | None,
    arch_kwargs_text: str | None,
    trust_pickle: bool,
    *,
    quiet: bool = False,
) -> Any:
    """The model, loaded; what loading decided (hyper-parameters taken from a Lightning
    checkpoint, a model built from a Hugging Face config) is said on stderr."""
    from ..io import load_model

    net = load_model(
        model, arch, arch_kwargs=arch_kwargs(arch_kwargs_text), trust_pickle=trust_pickle
    )
    err = stderr(quiet)
    for note in getattr(net, "normdoctor_load_notes", ()):
        err.print(f"note: {note}", markup=False, highlight=False)
    return net


def file_sha256(path: str | Path | None) -> str | None:
    """The sha256 of a file, read in 1 MiB chunks (``None``: not a regular file, e.g. a folder,
    ``random:...`` or ``module:function`` data)."""
    if path is None:
        return None
    p = Path(path)
    try:
        if not p.is_file():
            return None
        digest = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


class Progress:
    """A rich progress bar over batches on stderr, shown only on a terminal."""

    def __init__(self, console: Console, label: str, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as RichProgress

        self.enabled = enabled and console.is_terminal
        self.progress = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not self.enabled,
        )
        self.label = label
        self.task: TaskID | None = None
        self.total: int | None = None
        self.done = 0

    def __enter__(self) -> Progress:
        self.progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def __call__(self, done: int, total: int | None) -> None:
        # one bar per pass: a command that scans twice (patch: before and after) starts anew
        if self.task is None or total != self.total or done < self.done:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(self.label, total=total)
            self.total = total
        self.done = done
        self.progress.update(self.task, completed=done)


def exit_code(reports: Sequence[Any], exit_zero: bool, strict: bool) -> int:
    """1 when eval mode is harmful (or, with --strict, when nothing decided or nothing was
    measurable), else 0; --exit-zero always 0."""
    from ..report import Verdict

    unsure = (Verdict.UNDETERMINED, Verdict.CANNOT_CHECK, Verdict.NOT_MEASURABLE)
    bad = any(r.status.harmful or (strict and r.status in unsure) for r in reports)
    return EXIT_DRIFT if bad and not exit_zero else EXIT_OK

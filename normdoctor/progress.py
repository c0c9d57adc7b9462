"""What the API's ``progress=`` argument means: ``True`` a bar on stderr, ``False``/``None``
nothing, a callable ``progress(batches_done, total_or_None)`` called after each batch.

The bar is rich's progress display on a stderr console, so it also renders in Jupyter.  rich is
imported only when a bar is asked for (the data layers never need it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

__all__ = ["Bar", "Progress", "ProgressArg", "as_callback", "bar", "with_progress"]

Progress = Callable[[int, int | None], None]
ProgressArg = bool | Progress | None

P = ParamSpec("P")
R = TypeVar("R")


class Bar:
    """A progress bar over batches on stderr, as a ``progress(done, total)`` callback.

    It appears at the first call and stays drawn (in its final state) after :meth:`close`; a
    total that grows while it runs (a composition search adds passes) is followed.
    """

    def __init__(self, label: str = "scanning") -> None:
        self.label = label
        self._progress: RichProgress | None = None
        self._task: TaskID | None = None

    def __call__(self, done: int, total: int | None) -> None:
        if self._progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=total)
        assert self._task is not None
        self._progress.update(self._task, completed=done, total=total)

    def close(self) -> None:
        """Stop drawing (the bar's last state stays on stderr); idempotent."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None


def as_callback(progress: ProgressArg, label: str = "scanning") -> Progress | None:
    """``progress`` as a callback: ``True`` a new :class:`Bar` (close it when done: :func:`bar`
    does), ``False`` or ``None`` no callback, a callable itself.

    Raises:
        TypeError: anything else.
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        return Bar(label)
    if callable(progress):
        return progress
    raise TypeError(
        "progress must be True (a bar on stderr), False/None (nothing) or a callable "
        f"progress(done, total); got {type(progress).__name__}"
    )


@contextmanager
def bar(progress: ProgressArg, label: str = "scanning") -> Iterator[Progress | None]:
    """``with bar(progress) as callback``: the callback of :func:`as_callback`; a bar it opened
    is closed when the block ends, however it ends."""
    callback = as_callback(progress, label)
    try:
        yield callback
    finally:
        if isinstance(callback, Bar) and progress is True:
            callback.close()


def with_progress(function: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function with a ``progress`` keyword so that it accepts ``True``/``False``/a
    callable: the function itself receives a callback or ``None``, and a bar drawn for ``True``
    is closed when it returns or raises."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        given: Any = kwargs.get("progress")
        if given is None or callable(given):
            return function(*args, **kwargs)
        with bar(given) as callback:
            kwargs["progress"] = callback
            return function(*args, **kwargs)

    return wrapper

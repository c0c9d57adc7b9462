"""Taps: see a module's input on every call, at a fraction of a forward pre-hook's cost.

A registered hook sends every call of the module through ``nn.Module._call_impl``'s general
path, which walks the hook dictionaries, handles keyword hooks and ``always_call`` and costs
about 10 µs of Python per call on CPU: at batch size 1 that is as much as a small BatchNorm
layer itself (issue 16).  A tap instead puts a wrapper in the instance's ``forward`` (as
accelerate's module hooks do), so that ``_call_impl`` keeps its fast path and the wrapper costs
one Python call.  The user's own hooks on the module still run, around the wrapper, so the tap
sees what the layer's ``forward`` is handed.

Removing a tap puts back exactly what the instance had (its own ``forward`` attribute, or none).
If something else wrapped ``forward`` after the tap (so that the tap is no longer the outermost
attribute), the tap turns itself into a pass-through instead of tearing the other wrapper out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["Tap", "tap"]

#: ``before(module, args)``: called with the positional arguments of each call; a true result
#: means "call ``release(module)`` once this call's forward has returned (or raised)".
Before = Callable[[nn.Module, tuple], Any]
Release = Callable[[nn.Module], None]

_MISSING = object()


class Tap:
    """One installed tap; :meth:`remove` takes it out (idempotent)."""

    __slots__ = ("_live", "_module", "_saved", "_wrapper")

    def __init__(
        self,
        module: nn.Module,
        make: Callable[[Callable[..., Any], list[bool]], Callable[..., Any]],
    ) -> None:
        """``make(inner, live)`` builds the wrapper around ``inner`` (the bound method, or the
        instance's own forward); it must pass straight through while ``live[0]`` is false."""
        self._module = module
        self._live = [True]
        self._saved: Any = module.__dict__.get("forward", _MISSING)
        self._wrapper: Callable[..., Any] | None = make(module.forward, self._live)
        module.__dict__["forward"] = self._wrapper

    def remove(self) -> None:
        if self._wrapper is None or not self._live[0]:
            return
        self._live[0] = False  # a pass-through from now on, wherever it still sits
        attrs = self._module.__dict__
        if attrs.get("forward") is self._wrapper:
            if self._saved is _MISSING:
                del attrs["forward"]
            else:
                attrs["forward"] = self._saved
        self._wrapper = None


def tap(module: nn.Module, before: Before, release: Release | None = None) -> Tap:
    """Call ``before(module, args)`` ahead of every call of ``module``'s forward.

    With ``release``, a call for which ``before`` returned a true value is followed by
    ``release(module)`` once the forward has returned or raised.
    """

    def make(inner: Callable[..., Any], live: list[bool]) -> Callable[..., Any]:
        if release is None:

            def forward(*args: Any, **kwargs: Any) -> Any:
                if live[0]:
                    before(module, args)
                return inner(*args, **kwargs)

            return forward
        after = release

        def held(*args: Any, **kwargs: Any) -> Any:
            if live[0] and before(module, args):
                try:
                    return inner(*args, **kwargs)
                finally:
                    after(module)
            return inner(*args, **kwargs)

        return held

    return Tap(module, make)

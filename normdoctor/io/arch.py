"""Architectures named on the command line: importing ``package.module:attr`` or
``path/to/file.py:attr`` and building the model with its keyword arguments (completed by a
Lightning checkpoint's hyper-parameters).

Importing runs the named module's code: that is the user's explicit request, unlike anything
stored inside a model file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import LoadError, one_line
from ._messages import listing

__all__ = ["build_arch", "import_object", "on_sys_path", "resolve_arch"]


@contextlib.contextmanager
def on_sys_path(folder: str) -> Iterator[None]:
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def import_object(spec: str, *, what: str = "arch", error: type[Exception] = LoadError) -> Any:
    """The object named by ``package.module:attr`` or ``path/to/file.py:attr``.

    Importing runs the named module's code: that is the user's explicit request, unlike
    anything stored inside a model file.  A dotted ``attr`` walks attributes (``Outer.Inner``).
    A module not found on ``sys.path`` is looked for in the current directory too.

    Raises:
        ``error`` (LoadError by default) with a one-line reason.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise error(f"{what} {spec!r} must be 'package.module:name' or 'path/to/file.py:name'")
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise error(f"{what} {spec!r} must be 'package.module:name' or 'path/to/file.py:name'")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    try:
        if is_file:
            module = _import_file(Path(target), spec, what, error)
        else:
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as exc:
                top = target.split(".")[0]
                if exc.name not in (top, target) or os.getcwd() in sys.path:
                    raise
                with on_sys_path(os.getcwd()):
                    module = importlib.import_module(target)
    except error:
        raise
    except Exception as exc:
        raise error(
            f"cannot import {target!r} for {what} {spec!r}: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise error(f"{target!r} has no attribute {attr!r} ({what} {spec!r})") from exc
    return obj


def _import_file(file: Path, spec: str, what: str, error: type[Exception]) -> Any:
    if not file.is_file():
        raise error(f"{what} {spec!r}: no such file {str(file)!r}")
    resolved = file.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"_normdoctor_user_{re.sub(r'[^0-9A-Za-z_]', '_', file.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{what} {spec!r}: cannot import {str(file)!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        with on_sys_path(str(resolved.parent)):
            module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def resolve_arch(
    arch: str | Callable[..., nn.Module], arch_kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """Build the architecture named by ``arch`` (a spec string or a callable) with ``arch_kwargs``."""
    return build_arch(arch, arch_kwargs)[0]


def build_arch(
    arch: str | Callable[..., nn.Module],
    arch_kwargs: Mapping[str, Any] | None,
    hyper_parameters: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, str | None]:
    """(model, note): ``arch`` built with ``arch_kwargs``, completed by a checkpoint's
    ``hyper_parameters`` that the factory takes; the note says which were used."""
    if arch_kwargs is not None and not isinstance(arch_kwargs, Mapping):
        raise LoadError(f"arch_kwargs must be a dict, not {type(arch_kwargs).__name__}")
    factory = import_object(arch) if isinstance(arch, str) else arch
    label = arch if isinstance(arch, str) else getattr(arch, "__name__", repr(arch))
    if not callable(factory):
        raise LoadError(f"arch {label!r} names a {type(factory).__name__}, not a class or function")
    kwargs, note = dict(arch_kwargs or {}), None
    if hyper_parameters:
        short = label.rpartition(":")[2] if isinstance(arch, str) else label
        kwargs, note = _with_hyper_parameters(factory, short, hyper_parameters, arch_kwargs)
    try:
        model = factory(**kwargs)
    except Exception as exc:
        hint = (
            " (with the checkpoint's hyper-parameters; --arch-kwargs overrides them)"
            if note and "built with" in note
            else ""
        )
        raise LoadError(
            f"building arch {label!r} failed{hint}: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    if not isinstance(model, nn.Module):
        raise LoadError(f"arch {label!r} returned a {type(model).__name__}, not an nn.Module")
    return model, note


def _kwarg_names(factory: Callable[..., Any]) -> set[str] | None:
    """The keyword arguments ``factory`` takes; ``None`` when it takes any (or cannot tell)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _with_hyper_parameters(
    factory: Callable[..., Any],
    label: str,
    hyper_parameters: Mapping[str, Any],
    arch_kwargs: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], str | None]:
    """``arch_kwargs`` completed by the checkpoint's hyper-parameters that ``factory`` takes
    (explicit ``arch_kwargs`` win), and a note saying what was used."""
    explicit = dict(arch_kwargs or {})
    names = _kwarg_names(factory)
    used = {
        k: v
        for k, v in hyper_parameters.items()
        if k not in explicit and (names is None or k in names)
    }
    ignored = [k for k in hyper_parameters if k not in explicit and k not in used]
    overridden = [k for k in hyper_parameters if k in explicit]
    if not used and not overridden:
        return explicit, None

    def shown(keys: list[str]) -> str:
        return ", ".join(f"{k}={_short(hyper_parameters[k])}" for k in keys)

    parts = []
    if used:
        parts.append(f"arch {label} built with the checkpoint's hyper-parameters {shown([*used])}")
    if overridden:
        lead = "" if used else f"arch {label}: "
        parts.append(f"{lead}--arch-kwargs override the checkpoint's {shown(overridden)}")
    if ignored:
        parts.append(f"not arguments of {label}: {listing(ignored)}")
    return {**used, **explicit}, "; ".join(parts)

"""Fixes of models that are not ``nn.Module`` objects (ONNX graphs), behind the same
:func:`~normdoctor.patch.patch` and :func:`~normdoctor.patch.autopatch` as PyTorch models.

A graph rewrites itself (:meth:`normdoctor.sources.onnx.OnnxModel.patch`: ``recalibrate``,
``instance``, ``batchstats``); this module maps the fix vocabulary onto those rewrites.  A
graph cannot be fine-tuned, so ``renorm`` is refused where it is asked for and applied as
``batchstats`` where a scan recommends it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from ..convert.manifest import save_patched
from ..convert.targets import AUTO, BATCHSTATS, RENORM, TARGETS
from ..errors import ConversionError
from ..report import ScanReport

__all__ = ["apply_groups", "is_graph", "patch_graph", "save_fixed"]

#: patch() options a graph rewrite takes (the rest are PyTorch-only).
GRAPH_OPTIONS = ("batch_size", "max_batches", "progress", "providers")


def is_graph(model: Any) -> bool:
    """A model that rewrites itself (an :class:`~normdoctor.sources.onnx.OnnxModel`)."""
    return callable(getattr(model, "as_source", None)) and callable(getattr(model, "patch", None))


def _names(layers: Any) -> list[str] | None:
    if layers is None:
        return None
    if isinstance(layers, ScanReport):
        return [r.name for r in layers.flagged_layers]
    if isinstance(layers, str):
        return [layers]
    return list(layers)


def patch_graph(
    model: Any,
    to: str,
    layers: Any,
    data: Any,
    options: Mapping[str, Any],
) -> Any:
    """``model`` with ``to`` applied (a new graph; the original is never changed).

    ``to="auto"`` gives each flagged layer of the :class:`ScanReport` in ``layers`` its
    recommendation, ``renorm`` applied as ``batchstats``.
    """
    unknown = sorted(set(options) - set(GRAPH_OPTIONS))
    if unknown:
        raise ConversionError(f"an ONNX graph takes no {', '.join(unknown)} option(s)")
    if to not in (*TARGETS, AUTO):
        raise ConversionError(f"to must be one of {', '.join((*TARGETS, AUTO))}; got {to!r}")
    if to == RENORM:
        raise ConversionError(
            "renorm needs fine-tuning, which an ONNX graph cannot do: use batchstats or patch "
            "the PyTorch model"
        )
    if to != AUTO:
        return model.patch(to, data=data, layers=_names(layers), **options)
    if not isinstance(layers, ScanReport):
        raise ConversionError("to='auto' needs the ScanReport whose flagged layers to fix")
    groups: dict[str, list[str]] = {}
    for r in layers.flagged_layers:
        fix = BATCHSTATS if str(r.recommendation) == RENORM else str(r.recommendation)
        groups.setdefault(fix, []).append(r.name)
    return apply_groups(model, groups, data, options)


def apply_groups(
    model: Any, groups: Mapping[str, Iterable[str]], data: Any, options: Mapping[str, Any]
) -> Any:
    """Each group's rewrite in turn (``{fix: layer names}``), on the result of the previous."""
    patched = model
    for fix, names in groups.items():
        patched = patched.patch(fix, data=data, layers=list(names), **options)
    return patched


def save_fixed(
    model: Any, path: str | os.PathLike[str], *, source: str | os.PathLike[str] | None = None
) -> object:
    """Write a fixed model so that it loads back: a graph as a new checked ONNX file, a
    PyTorch model as its state_dict plus the conversion manifest (:func:`save_patched`)."""
    if is_graph(model):
        return model.save(path)
    return save_patched(model, path, source=source)

"""``patch()``: the one entry point of fixes, conversions and recalibration alike.

The conversions themselves are :mod:`normdoctor.convert`'s; what this adds is what needs the
model run on data: the input shapes a conversion checks before changing anything (InstanceNorm
needs spatial dimensions, SyncBatchNorm's replacement takes the rank of its first input), and
recalibration.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._globals import preserved_globals
from ..convert.core import (
    check_instance_inputs,
    conversion_dims,
    convert_layers,
    revert,
)
from ..convert.modules import dim_of
from ..convert.record import record, records
from ..convert.select import Layers, resolve, split_options
from ..convert.targets import AUTO, CONVERSIONS, INSTANCE, RECALIBRATE, TARGETS
from ..errors import ConversionError, DataError
from ..report import ScanReport
from ..sources.torch import Probe, default_forward, model_device_dtype, to_device
from .graph import is_graph, patch_graph
from .recalibrate import Forward, batch_source, recalibrate

__all__ = ["apply_plan", "input_shapes", "patch"]


def input_shapes(
    model: nn.Module, data: Any, names: Sequence[str], forward: Forward | None, **batch_opts: Any
) -> dict[str, tuple[int, ...]]:
    """The input shape each named layer sees on the first batch (eval mode, model restored)."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    fwd = forward or default_forward
    device, dtype = model_device_dtype(model)
    batch_opts = {**batch_opts, "max_batches": 1}
    handles = []
    with Probe(model, [], paths=("eval",)) as probe, torch.no_grad():
        try:
            for n in names:

                def hook(_m: nn.Module, args: tuple, n: str = n) -> None:
                    if args and isinstance(args[0], torch.Tensor) and n not in shapes:
                        shapes[n] = tuple(args[0].shape)

                handles.append(modules[n].register_forward_pre_hook(hook))
            for batch in batch_source(data, **batch_opts)():
                with probe.path("eval"):
                    fwd(model, to_device(batch, device, dtype).inputs)
        finally:
            for h in handles:
                h.remove()
    return shapes


@preserved_globals()
def patch(
    model: nn.Module,
    to: str = AUTO,
    layers: Layers = None,
    *,
    inplace: bool = False,
    data: Any = None,
    forward: Forward | None = None,
    **options: Any,
) -> nn.Module:
    """Convert norm layers of ``model``: ``to`` in ``"renorm"``, ``"instance"``,
    ``"batchstats"``, ``"recalibrate"``, or ``"auto"`` (each flagged layer of a ScanReport to
    its recommendation).

    Args:
        model: the model; with ``inplace=False`` (default) it is deep-copied first and never
            modified.  An :class:`~normdoctor.sources.onnx.OnnxModel` is rewritten into a new
            graph (``recalibrate``, ``instance``, ``batchstats``; options ``batch_size``,
            ``max_batches``, ``progress``, ``providers``).
        to: the conversion.
        layers: which layers: ``None`` (every BatchNorm with running statistics; for
            ``"instance"`` also tracked InstanceNorm, for ``"recalibrate"`` every layer with
            running statistics: every one of them is converted, or the call refuses), a glob such as ``"layer4.*"``, a list of names or globs, or a
            :class:`ScanReport` (its flagged layers).  A pattern that matches no norm layer
            raises ConversionError.
        inplace: convert ``model`` itself.
        data: calibration data for ``"recalibrate"`` (any form :func:`normdoctor.scan` takes);
            for ``"instance"`` it also lets the conversion check, before changing anything, that
            each layer's input has spatial dimensions to normalize over; for SyncBatchNorm it
            tells the dimensionality of the replacement.
        forward: ``forward(model, inputs)`` for models with several inputs (used whenever
            ``data`` is run through the model).
        options: ``prior`` (batchstats: strength of the running statistics in samples);
            ``r_max``, ``d_max``, ``hold_steps``, ``r_max_steps``, ``d_max_steps``,
            ``schedule`` (renorm); ``mode``, ``batch_size``, ``shuffle``, ``seed``,
            ``group_by``, ``max_batches``, ``device`` (recalibrate, see :func:`recalibrate`);
            ``dim`` (1, 2 or 3: the BatchNorm1d/2d/3d inputs of converted layers whose class
            does not fix it, SyncBatchNorm; without it ``data`` tells, from the rank of the first
            input each such layer sees; ignored for layers whose class fixes it).

    Returns:
        The converted root module (a new object if the root itself was converted), carrying the
        list of conversions applied in ``normdoctor_conversions`` (manifest entries for
        :func:`save_patched`).

    Raises:
        ConversionError: a layer cannot be converted (named in the message); nothing changed.
        DataError: ``"recalibrate"`` without data, or data that never reaches a layer.
    """
    if is_graph(model):  # an ONNX graph rewrites itself
        return patch_graph(model, to, layers, data, options)
    if to not in (*TARGETS, AUTO):
        raise ConversionError(f"to must be one of {', '.join((*TARGETS, AUTO))}; got {to!r}")
    plan = resolve(model, layers, to)
    kinds = set(plan.values()) if to == AUTO else {to}
    per_kind = split_options(kinds, options)
    recal = [n for n, k in plan.items() if k == RECALIBRATE]
    if recal and data is None:
        raise DataError(
            f"recalibrating {', '.join(repr(n) for n in recal)} needs data: pass data=... "
            "(samples like those seen at inference)"
        )
    if not plan:
        if isinstance(layers, ScanReport):
            warnings.warn("the scan report flags no layer: nothing to patch", stacklevel=2)
        out = model if inplace else copy.deepcopy(model)
        record(out, [], records(model))
        return out
    if forward is not None and RECALIBRATE in per_kind:
        per_kind[RECALIBRATE]["forward"] = forward
    return apply_plan(model, plan, per_kind, inplace=inplace, data=data, forward=forward)


def apply_plan(
    model: nn.Module,
    plan: dict[str, str],
    per_kind: dict[str, dict[str, Any]],
    *,
    inplace: bool,
    data: Any,
    forward: Forward | None = None,
) -> nn.Module:
    """Apply a validated ``plan`` (layer name -> fix, from :func:`~normdoctor.convert.resolve`)
    with options ``per_kind`` (from :func:`~normdoctor.convert.split_options`): every check
    first, then the conversions, then recalibration (with ``inplace``, conversions are undone
    if it fails).  The conversions are recorded on the returned root."""
    modules = dict(model.named_modules())
    structural = {n: k for n, k in plan.items() if k in CONVERSIONS}
    # Every check before any change: dimensionality, input shapes for InstanceNorm, then
    # subclass behaviour.
    instance = [n for n, k in structural.items() if k == INSTANCE]
    unknown = [
        n
        for n, k in structural.items()
        if dim_of(modules[n]) is None and per_kind.get(k, {}).get("dim") is None
    ]
    recal_opts = per_kind.get(RECALIBRATE, {})
    shapes: dict[str, tuple[int, ...]] | None = None
    if (instance or unknown) and data is not None:
        batch_opts = {
            k: recal_opts[k]
            for k in ("batch_size", "shuffle", "seed", "group_by")
            if k in recal_opts
        }
        batch_opts.setdefault("batch_size", 2)
        batch_opts.setdefault("shuffle", False)
        batch_opts.setdefault("seed", 0)
        batch_opts.setdefault("group_by", None)
        fwd = forward or recal_opts.get("forward")
        shapes = input_shapes(model, data, [*instance, *unknown], fwd, **batch_opts)
        check_instance_inputs(shapes, instance)
    dims = conversion_dims(modules, structural, per_kind, shapes)
    options = {n: per_kind.get(k, {}) for n, k in structural.items()}
    root = convert_layers(model, structural, options, dims, inplace=inplace)
    recal = [n for n, k in plan.items() if k == RECALIBRATE]
    if recal:
        try:
            root = recalibrate(root, data, layers=recal, inplace=True, **recal_opts)
        except BaseException:
            if inplace and structural:
                revert(root, layers=list(structural), inplace=True)
            raise
    return root

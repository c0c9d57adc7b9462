"""Exact recalibration: running statistics set to the pooled statistics of data.

Also the passes over data that fixing shares (:func:`batch_source`): recalibration, the input
shapes a conversion checks, :func:`~normdoctor.patch.impact` and autopatch's comparisons.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .. import distributed as _dist
from .._globals import preserved_globals
from ..batching import Batch, BatchPlan, GroupBy, plan_batches
from ..convert.select import resolve
from ..errors import ConversionError, DataError
from ..layers import BATCH_NORMS, NormLayer, find_norm_layers
from ..recording import LayerMeasurement
from ..report import ScanReport
from ..sources.torch import Probe, default_forward, forward_failed, model_device_dtype, to_device

__all__ = ["Forward", "batch_source", "recalibrate"]

Forward = Callable[[nn.Module, Any], Any]


def batch_source(
    data: Any,
    *,
    batch_size: int | None,
    shuffle: bool,
    seed: int,
    group_by: GroupBy,
    max_batches: int | None,
    shard: tuple[int, int] | None = None,
) -> Callable[[], Iterator[Batch]]:
    """A re-iterable source of batches (one-shot iterators are kept in memory); ``shard``
    (rank, world size) keeps this rank's share of the batches normdoctor forms."""

    def plan() -> BatchPlan:
        return plan_batches(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            group_by=group_by,
            max_batches=max_batches,
        )

    if isinstance(data, Iterator):
        kept = list(plan().batches)
        return lambda: iter(kept)
    first = plan()  # validate now: DataError before any work
    if shard is not None and first.source != "batches":  # deal formed batches round-robin
        rank, world = shard
        return lambda: (b for i, b in enumerate(plan().batches) if i % world == rank)
    return lambda: iter(plan().batches)


# ========================================================================== recalibrate


class _StopForward(BaseException):
    """Raised from a hook to end a forward pass once the measured layer has its input.

    A BaseException so that a model's own ``except Exception`` does not swallow it.
    """


@preserved_globals()
def recalibrate(
    model: nn.Module,
    data: Any,
    *,
    layers: str | Sequence[str] | ScanReport | None = None,
    inplace: bool = False,
    mode: str = "sequential",
    distributed: bool = False,
    batch_size: int | None = 64,
    shuffle: bool = False,
    seed: int = 0,
    group_by: GroupBy = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    forward: Forward | None = None,
) -> nn.Module:
    """Set running statistics to the exact pooled statistics of ``data``.

    For each layer, ``running_mean`` becomes the mean and ``running_var`` the *unbiased*
    variance (what BatchNorm stores) of the layer's input over every sample and position of
    ``data`` — computed exactly with the core's streaming float64 moments, not an exponential
    moving average and not an average of per-batch variances — and ``num_batches_tracked``
    the number of batches that reached the layer (so that a later ``momentum=None`` cumulative
    average continues as if those batches had been averaged).

    Note:
        ``mode="sequential"`` (default) measures the layers one at a time in forward order, in
        eval mode, each with its upstream layers already recalibrated: the statistics are exactly
        those of the inputs the layer sees at inference.  Each layer costs one pass over the
        data that stops right after the layer's input is recorded, so L layers cost about L/2
        full forward passes (for a chain).  ``mode="single-pass"`` measures all layers in one
        pass on the train path (every norm layer normalizes with batch statistics, dropout off),
        like ``torch.optim.swa_utils.update_bn`` and fvcore's precise BN but exact: one forward
        pass, but each layer sees inputs normalized upstream by *batch* statistics, which differ
        from inference when batches are small or correlated.  In that pass plain BatchNorm
        layers normalize with the batch statistics normdoctor has just measured (exactly, in
        float64), through the inference kernel, instead of recomputing them in BatchNorm's
        training kernel; subclasses keep their own forward.  Measured on a ResNet-18-shaped CNN
        (``benchmarks/bench_recalibrate.py``): single-pass costs about 0.95-1.0x
        ``torch.optim.swa_utils.update_bn``, sequential about 11x.

        InstanceNorm with ``track_running_stats=True`` gets the same pooled statistics (over
        every sample and position), not the average of per-sample statistics its own update
        tracks: in eval mode it then gives its inputs over the data mean 0 and variance 1 per
        channel, as per-sample normalization does in training, and the scan's population shift
        is what this removes.  Where per-sample noise dominates, ``to="instance"`` reproduces
        training exactly.  ``num_batches_tracked`` counts its calls.

    Args:
        model: the model (deep-copied first unless ``inplace``).
        data: calibration data (any form :func:`normdoctor.scan` accepts).  Batch size and order
            do not change the result in sequential mode; in single-pass mode they do.
        layers: which layers (default: every layer with running statistics, BatchNorm,
            frozen BatchNorm and tracked InstanceNorm; a layer normdoctor cannot measure, such
            as EvoNorm B0 or a hand-written BatchNorm class, is refused rather than skipped);
            names, globs or a ScanReport (its flagged layers).
        mode: ``"sequential"`` or ``"single-pass"``.
        batch_size, shuffle, seed, group_by, max_batches: how batches are formed.
        device: run on this device (the model is moved there and back).
        forward: ``forward(model, inputs)`` for models with several inputs.

    Returns:
        The recalibrated model; with ``inplace=False`` a copy, ``model`` unchanged.

    Raises:
        DataError: no data, data that yields no batches, or a layer that no batch reaches (named);
            with ``inplace=True`` the model is restored before this propagates.
        ScanError: the model's forward raised.
    """
    if mode not in ("sequential", "single-pass"):
        raise ValueError(f"mode must be 'sequential' or 'single-pass', got {mode!r}")
    plan = resolve(model, layers, "recalibrate")
    names = list(plan)
    if data is None:
        raise DataError(
            "recalibrate needs data: no data given for norm layers "
            f"{', '.join(repr(n) for n in names) or '(none)'}"
        )
    if not names:
        raise ConversionError("no layer with running statistics to recalibrate")
    sharded = distributed and _dist.is_distributed()
    batches = batch_source(
        data,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by=group_by,
        max_batches=max_batches,
        shard=(_dist.dist.get_rank(), _dist.dist.get_world_size()) if sharded else None,
    )
    target = model if inplace else copy.deepcopy(model)
    modules = dict(target.named_modules())
    by_name = {layer.name: layer for layer in find_norm_layers(target)}
    chosen = [by_name[n] for n in names]
    saved = {
        n: {k: v.detach().clone() for k, v in modules[n]._buffers.items() if v is not None}
        for n in names
    }
    fwd = forward or default_forward
    home, dtype = model_device_dtype(target)
    run_device = torch.device(device) if device is not None else home
    moved = run_device != home
    if moved:
        target.to(run_device)
    try:
        if mode == "single-pass":
            results, counts, _ = _measure(
                target,
                chosen,
                batches,
                fwd,
                run_device,
                dtype,
                "train",
                sharded=sharded,
                reuse_stats=True,
            )
            _require_reached(results, names)
            for n in names:
                _write(modules[n], n, results[n], counts.get(n))
        else:
            results, counts, order = _measure(
                target, chosen, batches, fwd, run_device, dtype, "eval", sharded=sharded
            )
            _require_reached(results, names)
            ordered = [n for n in order if n in plan]
            first, rest = ordered[0], ordered[1:]
            _write(modules[first], first, results[first], counts.get(first))
            for n in rest:
                # A layer called once per forward: stop the pass after recording its input.
                stop = counts.get(n, 0) <= counts.get("__batches__", 0)
                res, calls, _ = _measure(
                    target,
                    [by_name[n]],
                    batches,
                    fwd,
                    run_device,
                    dtype,
                    "eval",
                    stop_at=n if stop else None,
                    sharded=sharded,
                )
                _require_reached(res, [n])
                _write(modules[n], n, res[n], calls.get(n))
    except BaseException:
        with torch.no_grad():
            for n, values in saved.items():
                for k, v in values.items():
                    buffer = modules[n]._buffers[k]
                    if buffer is not None:  # saved only where it was a tensor
                        buffer.copy_(v)
        raise
    finally:
        if moved:
            target.to(home)
    return target


def _measure(
    model: nn.Module,
    layers: Sequence[NormLayer],
    batches: Callable[[], Iterator[Batch]],
    fwd: Forward,
    device: torch.device,
    dtype: torch.dtype | None,
    path: str,
    stop_at: str | None = None,
    sharded: bool = False,
    reuse_stats: bool = False,
) -> tuple[dict[str, LayerMeasurement | None], dict[str, int], list[str]]:
    """One pass over the data on ``path`` recording the inputs of ``layers`` (with ``sharded``,
    this rank's share, merged exactly over all ranks).

    With ``reuse_stats`` (train path), plain BatchNorm layers normalize with the batch
    statistics the probe has just measured instead of computing them again (see
    :func:`_normalize_with_measured`)."""
    modules = dict(model.named_modules())
    counts: dict[str, int] = {"__batches__": 0}
    handles = []
    with Probe(model, layers, paths=(path,)) as probe, torch.no_grad():
        swapped = _normalize_with_measured(probe, path, modules) if reuse_stats else []
        try:
            for layer in layers:

                def count(_m: nn.Module, _a: tuple, n: str = layer.name) -> None:
                    counts[n] = counts.get(n, 0) + 1
                    if n == stop_at:
                        raise _StopForward

                # Registered after the probe's hook, so it runs after the input is recorded.
                handles.append(modules[layer.name].register_forward_pre_hook(count))
            error: BaseException | None = None
            try:
                for i, batch in enumerate(batches()):
                    batch = to_device(batch, device, dtype)
                    counts["__batches__"] += 1
                    try:
                        with probe.path(path):
                            fwd(model, batch.inputs)
                    except _StopForward:
                        pass
                    except (Exception, SystemExit) as exc:
                        during = "while recalibrating"
                        raise forward_failed(exc, i, during, probe.last_layer) from exc
            except Exception as exc:
                if not sharded:
                    raise
                error = exc
            if sharded:
                _dist.raise_if_any_failed(error)
                _dist.merge_recorders(probe.recorders(path))
                keys = ["__batches__", *(layer.name for layer in layers)]  # same on every rank
                summed = _dist.all_reduce_sums(
                    {k: torch.tensor(float(v)) for k, v in counts.items()}, keys
                )
                counts = {k: int(v) for k, v in summed.items()}
            if counts["__batches__"] == 0:
                raise DataError("the data yielded no batches")
            results = probe.results(path)
            order = list(probe.order)
        finally:
            for h in handles:
                h.remove()
            for module in swapped:
                del module.forward
    return results, counts, order


def _normalize_with_measured(probe: Probe, path: str, modules: dict[str, nn.Module]) -> list:
    """On the train path, let plain BatchNorm layers reuse the probe's batch statistics.

    The probe's pre-hook has just reduced the layer's input to its exact batch mean and biased
    variance; normalizing with them through the inference kernel gives what train mode gives
    (up to float32 rounding of the normalized values) without BatchNorm's own training
    kernel, which on CPU costs several times the inference one.  Only exact BatchNorm1d/2d/3d
    types are swapped (a subclass keeps its own forward); anything the probe did not record
    (a batch of one value per channel, other dtypes) goes through the layer's own forward, so
    its errors stay its own.  Returns the modules whose ``forward`` was replaced (the caller
    deletes the instance attribute again).
    """
    swapped = []
    for layer in probe.layers:
        name, rec = layer.name, probe.recorder(path, layer.name)
        module = modules[name]
        if type(module) not in BATCH_NORMS.values() or "forward" in module.__dict__:
            continue
        assert isinstance(module, _BatchNorm)

        def forward(x: torch.Tensor, module: _BatchNorm = module, rec: Any = rec) -> torch.Tensor:
            stats = rec.last_batch_stats() if module.training else None
            if stats is None or stats[2] < 2 or x.dtype not in (torch.float32, torch.float64):
                return type(module).forward(module, x)
            mean, var, _ = stats
            return F.batch_norm(
                x,
                mean.to(x.dtype),
                var.to(x.dtype),
                module.weight,
                module.bias,
                False,
                0.0,
                module.eps,
            )

        swapped.append(module)
        # Through nn.Module, which declares forward an attribute: this instance gets its own.
        replaced: nn.Module = module
        replaced.forward = forward
    return swapped


def _require_reached(results: dict[str, LayerMeasurement | None], names: Sequence[str]) -> None:
    missing = [n for n in names if (m := results.get(n)) is None or m.pooled.count == 0]
    if missing:
        raise DataError(
            f"no batch reached norm layer(s) {', '.join(repr(n) for n in missing)}: "
            "the data never flows through them, so they cannot be recalibrated "
            "(exclude them with layers=..., or feed data that takes that branch)"
        )


def _write(
    module: nn.Module, name: str, m: LayerMeasurement | None, calls: int | None = None
) -> None:
    """Write the pooled statistics ``m`` as running statistics; ``num_batches_tracked`` counts
    the layer's calls (batches, or ``calls`` for InstanceNorm, whose units are samples)."""
    assert m is not None
    pooled = m.pooled
    if pooled.count < 2:
        raise DataError(
            f"norm layer {name!r} saw {int(pooled.count)} value per channel; "
            "recalibration needs at least 2 (more data, or larger batches)"
        )
    if m.nonfinite_units:
        warnings.warn(
            f"{name}: {m.nonfinite_units} batch(es) with NaN/Inf inputs left out of recalibration",
            stacklevel=3,
        )
    rm, rv = module._buffers["running_mean"], module._buffers["running_var"]
    assert rm is not None and rv is not None
    with torch.no_grad():
        rm.copy_(pooled.mean.to(device=rm.device, dtype=rm.dtype))
        rv.copy_(pooled.unbiased_var.to(device=rv.device, dtype=rv.dtype))
        nbt = module._buffers.get("num_batches_tracked")
        if nbt is not None:
            per_sample = isinstance(module, _InstanceNorm) and calls is not None
            nbt.fill_(calls if per_sample and calls is not None else m.units)

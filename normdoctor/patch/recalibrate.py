"""Exact recalibration: running statistics set to the pooled statistics of data.

Sequential mode advances every batch's forward in lockstep from one norm layer to the next
(:class:`_Lockstep`), so that inference-exact statistics cost about one pass, not one per layer.

Also the passes over data that fixing shares (:func:`batch_source`): recalibration, the input
shapes a conversion checks, :func:`~normdoctor.patch.impact` and autopatch's comparisons.
"""

from __future__ import annotations

import contextlib
import copy
import threading
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
from ..recording import LayerMeasurement, Recorder, Scratch
from ..report import ScanReport
from ..sources.torch import Probe, default_forward, forward_failed, model_device_dtype, to_device

__all__ = ["Forward", "batch_source", "recalibrate"]

Forward = Callable[[nn.Module, Any], Any]

#: Sequential mode: bytes of layer inputs the paused forwards may hold (1 GiB).
DEFAULT_RESIDENT_BYTES = 1 << 30
#: Sequential mode: at most this many paused forwards (one thread each), whatever their size:
#: small batches of small inputs would otherwise start thousands of threads.
MAX_HELD_FORWARDS = 256


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
    max_resident_bytes: int = DEFAULT_RESIDENT_BYTES,
) -> nn.Module:
    """Set running statistics to the exact pooled statistics of ``data``.

    For each layer, ``running_mean`` becomes the mean and ``running_var`` the *unbiased*
    variance (what BatchNorm stores) of the layer's input over every sample and position of
    ``data`` — computed exactly with the core's streaming float64 moments, not an exponential
    moving average and not an average of per-batch variances — and ``num_batches_tracked``
    the number of batches that reached the layer (so that a later ``momentum=None`` cumulative
    average continues as if those batches had been averaged).

    Note:
        ``mode="sequential"`` (default) gives each layer, in forward order, the statistics of
        its eval-mode inputs with every upstream layer already recalibrated: exactly the
        inputs the layer sees at inference (the model's own eval-path statistics, up to the
        float32 rounding of the stored buffers, about 6e-8; no tolerance or iteration is
        involved).  It gets there in about one eval-mode pass: each batch's forward runs in its
        own thread, paused at every measured layer until all batches have handed that layer
        their input and its statistics are written, then all go on to the next layer (one
        thread runs at a time, the batches in their usual order; the numbers are those of
        measuring one layer per pass).  The paused forwards hold their activations: past
        ``max_resident_bytes`` of held layer inputs (or 256 forwards), further batches are run
        again from the start for each layer instead (one pass per layer stopped after its
        input, as earlier versions did for every batch: same result, up to about L/2 passes for
        L layers).  A
        model whose batches reach different layers (a data-dependent branch), that calls a
        layer twice in one forward or hands it a non-tensor, is measured that way too, with
        ``distributed=True`` as well.  Thread-local state set around the call does not reach
        the forwards, except autocast, which is carried over.

        ``mode="single-pass"`` measures all layers in one pass on the train path (every norm
        layer normalizes with batch statistics, dropout off), like
        ``torch.optim.swa_utils.update_bn`` and fvcore's precise BN but exact: one forward
        pass, but each layer sees inputs normalized upstream by *batch* statistics, which differ
        from inference when batches are small or correlated.  In that pass plain BatchNorm
        layers normalize with the batch statistics normdoctor has just measured (exactly, in
        float64), through the inference kernel, instead of recomputing them in BatchNorm's
        training kernel; subclasses keep their own forward.  Measured on a ResNet-18-shaped CNN
        (``benchmarks/bench_recalibrate.py``, one thread): single-pass costs about 0.95x
        ``torch.optim.swa_utils.update_bn``, sequential about 0.85x (1.1 eval-mode passes;
        one layer per pass, ``max_resident_bytes=0``, 10x).

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
        max_resident_bytes: sequential mode: how many bytes of layer inputs the paused
            forwards may hold (default 1 GiB); batches beyond it are run again for each layer
            (slower, same result).  0 runs every batch again for each layer.

    Returns:
        The recalibrated model; with ``inplace=False`` a copy, ``model`` unchanged.

    Raises:
        DataError: no data, data that yields no batches, or a layer that no batch reaches (named);
            with ``inplace=True`` the model is restored before this propagates.
        ScanError: the model's forward raised.
    """
    if mode not in ("sequential", "single-pass"):
        raise ValueError(f"mode must be 'sequential' or 'single-pass', got {mode!r}")
    if isinstance(max_resident_bytes, bool) or not isinstance(max_resident_bytes, int):
        raise TypeError(f"max_resident_bytes must be an int, got {max_resident_bytes!r}")
    if max_resident_bytes < 0:
        raise ValueError(f"max_resident_bytes must be >= 0, got {max_resident_bytes}")
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
            done = None
            if not sharded:
                done = _Lockstep(
                    target, chosen, batches, fwd, run_device, dtype, max_resident_bytes
                ).run()
            if done is None:  # sharded, or a model the lockstep cannot follow
                _layer_by_layer(target, chosen, batches, fwd, run_device, dtype, sharded)
            else:
                results, calls = done
                _require_reached(results, names)
                for n in names:
                    _write(modules[n], n, results[n], calls.get(n))
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


def _layer_by_layer(
    model: nn.Module,
    chosen: Sequence[NormLayer],
    batches: Callable[[], Iterator[Batch]],
    fwd: Forward,
    device: torch.device,
    dtype: torch.dtype | None,
    sharded: bool,
) -> None:
    """Sequential mode one layer at a time: one eval-mode pass per layer in forward order,
    stopped after the layer's input where the layer runs once per forward (what every model
    allows; :class:`_Lockstep` is the same result in about one pass)."""
    modules = dict(model.named_modules())
    by_name = {layer.name: layer for layer in chosen}
    names = list(by_name)
    results, counts, order = _measure(
        model, chosen, batches, fwd, device, dtype, "eval", sharded=sharded
    )
    _require_reached(results, names)
    ordered = [n for n in order if n in by_name]
    first, rest = ordered[0], ordered[1:]
    _write(modules[first], first, results[first], counts.get(first))
    for n in rest:
        # A layer called once per forward: stop the pass after recording its input.
        stop = counts.get(n, 0) <= counts.get("__batches__", 0)
        res, calls, _ = _measure(
            model,
            [by_name[n]],
            batches,
            fwd,
            device,
            dtype,
            "eval",
            stop_at=n if stop else None,
            sharded=sharded,
        )
        _require_reached(res, [n])
        _write(modules[n], n, res[n], calls.get(n))


class _Worker:
    """One batch's forward pass, run in its own thread and paused at each measured layer."""

    __slots__ = (
        "error", "go", "index", "inputs", "layer", "nbytes", "passed", "state", "stop", "thread"
    )  # fmt: skip

    def __init__(self, index: int, inputs: Any) -> None:
        self.index = index
        self.inputs = inputs
        self.go = threading.Semaphore(0)  # the coordinator lets this forward go on
        self.stop = False  # ... or end it (_StopForward from where it is paused)
        self.state = "new"  # paused | twice | irregular | finished | stopped | failed
        self.layer: str | None = None  # where it is paused
        self.nbytes = 0  # the size of the input it holds there
        self.passed: set[str] = set()  # measured layers this forward has passed
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None


class _Lockstep:
    """Sequential recalibration in about one eval-mode pass: every batch's forward runs in its
    own thread, all advance together from one measured layer to the next, and each layer's
    statistics are written once every batch has handed it its input, before any batch goes on.

    So each layer sees exactly the inputs the layer-by-layer method gives it (upstream layers
    recalibrated, eval mode, the same batches in the same order: the same numbers), without
    running the upstream part once per layer.  One thread runs at a time (the coordinator
    hands the turn on), so the model, the recorders and the kernels see no concurrency.  The
    paused batches keep their activations: past ``budget`` bytes of held layer inputs, a batch
    is ended after handing its input and run again from the start for the next layer (what the
    layer-by-layer method does for every batch).  A model the lockstep cannot follow (a layer
    called twice in one forward, batches that reach different layers, a non-tensor input)
    makes :meth:`run` return ``None``: the caller then measures layer by layer.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[NormLayer],
        batches: Callable[[], Iterator[Batch]],
        fwd: Forward,
        device: torch.device,
        dtype: torch.dtype | None,
        budget: int,
    ) -> None:
        self.model, self.batches, self.fwd = model, batches, fwd
        self.device, self.dtype, self.budget = device, dtype, budget
        self.modules = dict(model.named_modules())
        self.names = [layer.name for layer in layers]
        measured = [layer for layer in layers if layer.batch_dependent and layer.materialized]
        self.recorders = {
            layer.name: Recorder.for_module(self.modules[layer.name], layer) for layer in measured
        }
        self.calls = dict.fromkeys(self.recorders, 0)
        self.final: dict[str, LayerMeasurement | None] = {}
        self.workers: dict[int, _Worker] = {}
        self.local = threading.local()
        self.report = threading.Semaphore(0)  # a worker paused or ended: the coordinator's turn
        self.scratch = Scratch()
        self.last_layer: str | None = None
        # Autocast is thread-local: the workers run under the caller's.
        self.autocast = [
            (kind, torch.get_autocast_dtype(kind))
            for kind in ("cpu", "cuda")
            if torch.is_autocast_enabled(kind)
        ]

    def run(self) -> tuple[dict[str, LayerMeasurement | None], dict[str, int]] | None:
        """Measure every layer; ``None`` where the model does not allow the lockstep (the
        model is then as it was)."""
        handles = [self.modules[n].register_forward_pre_hook(self._hook(n)) for n in self.recorders]
        try:
            # The probe measures nothing: it puts the model in eval mode and restores every
            # flag and norm buffer on exit (the caller writes the results afterwards).
            with Probe(self.model, []):
                count: int | None = None
                while True:
                    outcome, count = self._round(count)
                    if outcome == "irregular":
                        return None
                    if outcome == "done":
                        break
        finally:
            self._end_all()
            for h in handles:
                h.remove()
        results = {n: self.final.get(n) for n in self.names}
        return results, dict(self.calls)

    # -- the coordinator -------------------------------------------------------------------
    def _round(self, expected: int | None) -> tuple[str, int]:
        """Move every batch to its next measured layer (batches not held are run again from the
        start); then write that layer.  Returns ("next" | "done" | "irregular", batches)."""
        target: str | None = None
        held = kept = finished = count = 0
        for i, batch in self._source(expected):
            count += 1
            w = self.workers.get(i)
            if w is None:
                assert batch is not None
                w = self._spawn(i, to_device(batch, self.device, self.dtype))
            self._step(w)
            if w.state == "failed":
                assert w.error is not None
                exc = w.error
                if isinstance(exc, (Exception, SystemExit)):
                    during = "while recalibrating"
                    raise forward_failed(exc, i, during, self.last_layer) from exc
                raise exc
            if w.state == "finished":
                finished += 1
                self._forget(w)
                continue
            if w.state != "paused" or (target is not None and w.layer != target):
                return "irregular", count
            target = w.layer
            if held + w.nbytes <= self.budget and kept < MAX_HELD_FORWARDS:
                held += w.nbytes
                kept += 1
            else:  # over the budget: end it here, run it again for the next layer
                self._step(w, stop=True)
                self._forget(w)
        if count == 0:
            raise DataError("the data yielded no batches")
        if expected is not None and count != expected:
            return "irregular", count  # the data changed between passes
        if finished:  # every batch ran to the end, or some skip a layer the others reach
            return ("done" if finished == count else "irregular"), count
        assert target is not None
        m = self.recorders[target].finish()
        self.final[target] = m
        if m is not None:
            _copy_stats(self.modules[target], m)
        return "next", count

    def _source(self, expected: int | None) -> Iterator[tuple[int, Batch | None]]:
        """This round's batches: the data again where a batch has no forward held, else the
        held ones by index (no pass over the data when every batch is held)."""
        if expected is not None and len(self.workers) == expected:
            yield from ((i, None) for i in sorted(self.workers))
            return
        yield from enumerate(self.batches())

    def _spawn(self, index: int, batch: Batch) -> _Worker:
        w = _Worker(index, batch.inputs)
        w.thread = threading.Thread(
            target=self._work, args=(w,), name=f"normdoctor-recalibrate-{index}", daemon=True
        )
        self.workers[index] = w
        w.thread.start()
        return w

    def _step(self, w: _Worker, stop: bool = False) -> None:
        """Hand the turn to ``w`` until it pauses or ends."""
        w.stop = stop
        w.go.release()
        self.report.acquire()

    def _forget(self, w: _Worker) -> None:
        assert w.thread is not None
        w.thread.join()
        del self.workers[w.index]

    def _end_all(self) -> None:
        """End every forward still held (each raises _StopForward where it is paused)."""
        for w in list(self.workers.values()):
            w.stop = True
            w.go.release()
        for w in list(self.workers.values()):
            assert w.thread is not None
            w.thread.join()
        self.workers.clear()

    # -- the workers -----------------------------------------------------------------------
    def _work(self, w: _Worker) -> None:
        self.local.worker = w
        w.go.acquire()
        try:
            if w.stop:
                raise _StopForward
            with torch.no_grad(), contextlib.ExitStack() as stack:
                for kind, cast in self.autocast:
                    stack.enter_context(torch.autocast(kind, dtype=cast))
                self.fwd(self.model, w.inputs)
            w.state = "finished"
        except _StopForward:
            w.state = "stopped"
        except BaseException as exc:
            w.state, w.error = "failed", exc
        finally:
            w.inputs = None
            self.report.release()

    def _pause(self, w: _Worker, state: str) -> None:
        w.state = state
        self.report.release()
        w.go.acquire()
        if w.stop:
            raise _StopForward

    def _hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            w = getattr(self.local, "worker", None)
            if w is None:
                return  # a call from another thread: not ours
            if w.stop:  # told to end: a forward that caught _StopForward records nothing more
                raise _StopForward
            if name in w.passed:
                self._pause(w, "twice")  # the coordinator ends it
            w.passed.add(name)
            if name in self.final:
                return  # a batch run again passes the layers already written
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                self._pause(w, "irregular")
                return
            self.last_layer = name
            self.recorders[name].observe(x, self.scratch)
            self.calls[name] += 1
            w.layer, w.nbytes = name, x.numel() * x.element_size()
            self._pause(w, "paused")

        return hook


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

                def count(_m: nn.Module, _a: tuple, _o: Any, n: str = layer.name) -> None:
                    counts[n] = counts.get(n, 0) + 1
                    if n == stop_at:
                        raise _StopForward

                # After the layer's forward: the probe has recorded its input, however it taps.
                handles.append(modules[layer.name].register_forward_hook(count))
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
    _copy_stats(module, m)
    with torch.no_grad():
        nbt = module._buffers.get("num_batches_tracked")
        if nbt is not None:
            per_sample = isinstance(module, _InstanceNorm) and calls is not None
            nbt.fill_(calls if per_sample and calls is not None else m.units)


def _copy_stats(module: nn.Module, m: LayerMeasurement) -> None:
    """``running_mean`` and ``running_var`` (unbiased) set to the pooled statistics ``m``."""
    rm, rv = module._buffers["running_mean"], module._buffers["running_var"]
    assert rm is not None and rv is not None
    with torch.no_grad():
        rm.copy_(m.pooled.mean.to(device=rm.device, dtype=rm.dtype))
        rv.copy_(m.pooled.unbiased_var.to(device=rv.device, dtype=rv.dtype))

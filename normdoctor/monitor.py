"""Watch the train/inference mismatch while a model trains: :func:`monitor`.

A scan after the fact has to guess how the model was trained; while it trains, the batches
*are* training's batches.  :class:`Monitor` hooks the live training forward, without switching
anything:

* a tap (:mod:`normdoctor.taps`: a wrapper in the instance's ``forward``, cheaper than a hook)
  on each batch-dependent norm layer hands the layer's input, when the layer is in train mode,
  to the same :class:`~normdoctor.recording.Recorder` the scan uses (exact, streaming, no host
  synchronisation per batch);
* a tap on the model counts the training forwards (steps) and, every ``every`` steps, runs
  that same batch once more in eval mode under ``no_grad``, with every module's
  ``training`` flag, every buffer and the RNG states (torch CPU and CUDA, Python ``random``,
  NumPy) restored bit for bit, and compares the outputs with the training-mode ones
  (:class:`~normdoctor.assemble.EndToEndMeter`; labels or targets through :meth:`observe`).

Steps are grouped into windows of ``window`` steps.  At the end of each window the recorders
are reduced and judged by the scan's rules (:func:`~normdoctor.assemble.assemble_report`,
training's composition as stated), a :class:`HistoryPoint` is kept (at most ``history`` of
them: constant memory), fresh recorders start with the running statistics of that moment, and a
harmful verdict warns once per cause (:class:`MonitorWarning`, :mod:`logging`, ``on_flag``).
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

from . import _fused
from ._globals import rng_state, set_rng_state
from .assemble import EndToEndMeter, LossFn, assemble_report
from .batching import first_tensor
from .deferred import MONITOR_BUDGET, Deferred
from .layers import NormLayer, module_state, norm_layers
from .metrics import DEFAULT_NONIID_THRESHOLD, DEFAULT_THRESHOLD
from .recording import Recorder, Scratch, finish_all
from .report import Composition, LayerReport, ScanReport, Verdict
from .sources.torch import eval_mode, output_tensor
from .taps import Tap
from .verdict import ALPHA

__all__ = [
    "Flag",
    "HistoryPoint",
    "LayerPoint",
    "Monitor",
    "MonitorWarning",
    "history_figure",
    "monitor",
]

log = logging.getLogger("normdoctor.monitor")

#: Windows hold this many checks by default (``window = CHECKS_PER_WINDOW * every``).
CHECKS_PER_WINDOW = 20


class MonitorWarning(UserWarning):
    """Eval mode will not behave like training: raised once per cause while training runs."""


@dataclass(frozen=True, slots=True)
class LayerPoint:
    """One layer's numbers over one window (train path, training's own batches)."""

    name: str
    drift: float | None
    shift: float | None
    noise: float | None
    noniid: float | None


@dataclass(frozen=True, slots=True)
class HistoryPoint:
    """One window of steps ``first_step``..``step``: its verdict and its numbers."""

    first_step: int
    step: int
    batches: int
    checks: int
    status: Verdict
    agreement: float | None
    rel_divergence: float | None
    acc_train: float | None
    acc_eval: float | None
    layers: tuple[LayerPoint, ...]


@dataclass(frozen=True, slots=True)
class Flag:
    """One cause of a harmful verdict, reported once: what ``on_flag`` receives."""

    cause: str  # "instance", "renorm", "recalibrate", "batchstats" or "compounding"
    message: str
    layers: tuple[str, ...]
    step: int
    report: ScanReport


def _clone_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Detached copies of the tensors of a call (the forward may change its inputs in place)."""
    if not kwargs and all(type(a) is torch.Tensor for a in args):  # model(x): no pytree walk
        return tuple(a.detach().clone() for a in args), {}

    def copy(t: Any) -> Any:
        return t.detach().clone() if isinstance(t, torch.Tensor) else t

    return tree_map(copy, args), tree_map(copy, kwargs)


class Monitor:
    """The train/inference mismatch of ``model``'s norm layers, watched while it trains.

    Use :func:`monitor` (a context manager).  See the module's docstring for what it does.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 50,
        window: int | None = None,
        history: int = 100,
        on_flag: Callable[[Flag], object] | None = None,
        loss: LossFn | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        noniid_threshold: float = DEFAULT_NONIID_THRESHOLD,
        agreement_threshold: float | None = None,
        divergence_threshold: float | None = None,
        alpha: float = ALPHA,
        warn: bool = True,
        warmup: int | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        window = CHECKS_PER_WINDOW * every if window is None else window
        if window < every:
            raise ValueError(f"window ({window}) must hold at least one check (every={every})")
        self.model = model
        self.every = every
        self.window = window
        self.on_flag = on_flag
        self.loss = loss
        self.warn = warn
        # Running statistics start at their initial values and weights move fastest early on:
        # the first window is judged and kept, but warns only from ``warmup`` steps on.
        self.warmup = window if warmup is None else warmup
        self.noniid_threshold = noniid_threshold
        self.judging: dict[str, Any] = dict(
            threshold=threshold, noniid_threshold=noniid_threshold, alpha=alpha
        )
        if agreement_threshold is not None:
            self.judging["agreement_threshold"] = agreement_threshold
        if divergence_threshold is not None:
            self.judging["divergence_threshold"] = divergence_threshold
        self._modules = dict(model.named_modules())
        self.layers: list[NormLayer] = norm_layers(self._modules.items())
        self.measured = [l for l in self.layers if l.batch_dependent and l.materialized]
        self.history: deque[HistoryPoint] = deque(maxlen=history)
        self.flags: list[Flag] = []
        self._causes: set[str] = set()
        self.step = 0  # training forwards of the model so far
        self.checks = 0  # eval-mode checks so far
        self.stopped: str | None = None  # why the checks stopped (a model writing its weights)
        self._taps: list[Tap] = []
        self._threads: int | None = None
        self._checking = False
        self._captured: tuple[tuple, dict] | None = None
        self._pending: tuple[Any, int, Any] | None = None
        # Small layer inputs held across steps and reduced together when a window closes or
        # 2^20 elements are held: then on the training thread, not in parallel, whose threads
        # would spin beside torch's own in the steps after
        self._deferred = Deferred(budget=MONITOR_BUDGET, stage=False, serial=True, detach=True)
        self._order: list[str] = []
        self._seen: set[str] = set()
        self._last: ScanReport | None = None
        self._new_window()

    # -- windows ---------------------------------------------------------------------------
    def _new_window(self) -> None:
        self._scratch = Scratch()
        made = Recorder.for_layers(self.measured, self._modules)
        Recorder.preallocate(made, full=True)
        self._recorders = {layer.name: rec for layer, rec in zip(self.measured, made, strict=True)}
        self._meter = EndToEndMeter(self.loss, defer=True)  # see _compare
        self._first = self.step + 1
        self._sizes: list[int] = []  # one int per step of this window (at most ``window``)
        self._window_checks = 0

    def _close_window(self) -> None:
        self._flush_pending()
        report = self._judge()
        self._last = report
        e = report.end_to_end
        self.history.append(
            HistoryPoint(
                first_step=self._first,
                step=self.step,
                batches=len(self._sizes),
                checks=self._window_checks,
                status=report.status,
                agreement=e.agreement if e else None,
                rel_divergence=e.rel_divergence if e else None,
                acc_train=e.acc_train if e else None,
                acc_eval=e.acc_eval if e else None,
                layers=tuple(
                    LayerPoint(r.name, r.drift, r.shift, r.noise, r.noniid)
                    for r in report.layers
                    if r.train is not None
                ),
            )
        )
        self._raise_flags(report)
        self._new_window()

    # -- the hooks -------------------------------------------------------------------------
    def __enter__(self) -> Monitor:
        # The kernel runs on the training thread: as many threads as torch uses there.
        self._threads = _fused.match_threads() if _fused.kernel() is not None else None
        try:
            for layer in self.layers:  # taps, not hooks: a fraction of a hook's cost per call
                self._taps.append(self._norm_tap(layer))
            self._taps.append(self._model_tap())
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()
        self._deferred.flush()
        self._flush_pending()
        if self._threads is not None:
            _fused.restore_threads(self._threads)
            self._threads = None

    def _remove(self) -> None:
        for t in reversed(self._taps):
            t.remove()
        self._taps.clear()

    def _norm_tap(self, layer: NormLayer) -> Tap:
        """A tap whose wrapper records the layer's train-mode input itself: inside a training
        step each Python frame costs several times what it costs alone, and at batch size 1 the
        monitor's frames per layer call are most of what it adds to a step (issue 18)."""
        name = layer.name
        module = self._modules[name]
        measured = layer.batch_dependent and layer.materialized
        seen = self._seen
        record = self._deferred.observe

        def make(inner: Callable[..., Any], live: list[bool]) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                if live[0] and not self._checking and module.training:
                    if name not in seen:
                        seen.add(name)
                        self._order.append(name)
                    if measured and args and isinstance(args[0], torch.Tensor):
                        record(self._recorders[name], args[0], self._scratch)
                return inner(*args, **kwargs)

            return forward

        return Tap(module, make)

    def _model_tap(self) -> Tap:
        """A tap around the model's forward that counts training steps and runs the checks:
        one Python frame per step where a hook pair through a generic wrapper took four
        (measured at batch size 1: 0.4 k instructions a step fewer, equal in time)."""
        model = self.model

        def make(inner: Callable[..., Any], live: list[bool]) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                if not live[0] or self._checking:
                    return inner(*args, **kwargs)
                if model.training:  # a training step (a validation pass in eval mode is not)
                    if self._pending is not None:
                        self._flush_pending()
                    if len(self._sizes) >= self.window:
                        self._close_window()
                    self.step += 1
                    t = args[0] if args and type(args[0]) is torch.Tensor else None
                    if t is None:
                        t = first_tensor((args, kwargs))
                    self._sizes.append(int(t.shape[0]) if t is not None and t.dim() else 1)
                    if self.step % self.every == 0 and self.stopped is None:
                        self._captured = _clone_inputs(args, kwargs)
                out = inner(*args, **kwargs)
                if self._deferred.watch:  # the first step: whether each layer's input outlives it
                    self._deferred.flush()
                if self._captured is not None:
                    self._check(out)
                return out

            return forward

        return Tap(model, make)

    def _check(self, out: Any) -> None:
        """The captured batch once in eval mode, its outputs held beside the training step's
        (compared at the next step or :meth:`observe`)."""
        assert self._captured is not None
        captured, self._captured = self._captured, None
        out_eval = self._eval_forward(*captured)
        if out_eval is None:
            return
        t = output_tensor(out)
        size = int(t.shape[0]) if t is not None and t.dim() else 1
        self._pending = (out_eval, size, tree_map(_detach, out))
        self.checks += 1
        self._window_checks += 1

    def _eval_forward(self, args: tuple, kwargs: dict) -> Any:
        """The batch once in eval mode, everything it could touch restored bit for bit."""
        modules = list(self.model.modules())
        # Per module its flag and what its dicts hold; per parameter and buffer its version
        # (and a buffer's value): one pass each, for the restore below to undo any of it.
        saved = [(m, m.training, dict(m._parameters), dict(m._buffers)) for m in modules]
        versions = [
            (m, k, p, p._version) for m, _f, ps, _b in saved for k, p in ps.items() if p is not None
        ]
        copies = [
            (b, b._version, b.clone())
            for _m, _f, _p, bs in saved
            for b in bs.values()
            if b is not None
        ]
        rng = rng_state()
        self._checking = True
        try:
            with torch.no_grad():
                eval_mode(self.model, modules)
                return self.model(*args, **kwargs)
        finally:
            self._checking = False
            for m, flag, params, buffers in saved:
                object.__setattr__(m, "training", flag)  # a bool: skip nn.Module.__setattr__
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(buffers)
            set_rng_state(rng)
            for b, version, copy in copies:
                # Only where the forward wrote: copying bumps the version counter, and a
                # buffer saved for the backward pass must keep its own.
                if b._version != version:
                    with torch.no_grad():
                        b.copy_(copy)
            changed = [f"{_name(self.model, m)}.{k}" for m, k, p, v in versions if p._version != v]
            if changed:
                self.stopped = (
                    f"the model wrote its parameters in place in an eval-mode forward "
                    f"({', '.join(changed[:3])}); normdoctor.monitor cannot undo that and stops "
                    "its eval-mode checks"
                )
                warnings.warn(self.stopped, MonitorWarning, stacklevel=2)
                log.warning(self.stopped)

    def observe(self, outputs: Any = None, targets: Any = None) -> None:
        """Hand the labels or targets of the batch just run (optional, after the forward).

        On a step that was checked they make the comparison per-path accuracy or loss (the
        verdict's paired evidence); on other steps this costs nothing.
        """
        if self._pending is None:
            return
        out_eval, size, out_train = self._pending
        self._pending = None
        if outputs is not None and output_tensor(out_train) is None:
            out_train = outputs
        labels = targets if isinstance(targets, torch.Tensor) else None
        self._compare(out_train, out_eval, labels, size)

    def _flush_pending(self) -> None:
        if self._pending is not None:
            out_eval, size, out_train = self._pending
            self._pending = None
            self._compare(out_train, out_eval, None, size)

    def _compare(self, out_train: Any, out_eval: Any, labels: Any, size: int) -> None:
        """Hand a checked step to the meter, which holds up to 64 and compares them together.
        The training loop's own tensors are copied first: the loop may change or reuse them
        (the eval-mode output is the monitor's own)."""
        t = output_tensor(out_train)
        if t is not None:
            out_train = t.detach().clone()
        if labels is not None:
            labels = labels.detach().clone()
        self._meter.update(out_train, out_eval, labels, size)

    # -- the verdict -----------------------------------------------------------------------
    def _judge(self) -> ScanReport:
        self._deferred.flush()  # what the recorders have not reduced yet
        sizes = self._sizes
        same = bool(sizes) and min(sizes) == max(sizes)
        composition = Composition(
            source="batches",
            batch_size=sizes[0] if same else None,
            order="as-given",
            seed=None,
            group_by=None,
            num_batches=len(sizes),
            num_samples=sum(sizes),
            min_batch=min(sizes, default=0),
            max_batch=max(sizes, default=0),
        )
        recorders = self._recorders
        results = {"train": dict(zip(recorders, finish_all(list(recorders.values())), strict=True))}
        note = (
            f"training batches, observed by normdoctor.monitor: steps {self._first}-{self.step}, "
            f"{self._window_checks} checked in eval mode (every {self.every} steps)"
        )
        notes = [note] + ([self.stopped] if self.stopped else [])
        lost = self._deferred.note()
        if lost:
            notes.append(lost)
        return assemble_report(
            model_name=type(self.model).__name__,
            layers=self.layers,
            states={l.name: module_state(self._modules[l.name]) for l in self.layers},
            results=results,
            order=self._order,
            end_to_end=self._meter.result(),
            composition=composition,
            paths=("train",),
            notes=notes,
            stated=True,
            **self.judging,
        )

    def report(self) -> ScanReport:
        """The verdict on the latest window: the current one once it holds half a window of
        steps (or when no window has closed yet), else the last closed one."""
        self._flush_pending()
        if self._last is None or len(self._sizes) >= self.window // 2:
            return self._judge()
        return self._last

    def current(self) -> ScanReport:
        """The verdict on the window still open (what closing it now would judge)."""
        self._flush_pending()
        return self._judge()

    def figure(self) -> Any:
        """A matplotlib figure of drift and eval-mode agreement over training steps."""
        return history_figure(self.history)

    # -- warnings --------------------------------------------------------------------------
    def _raise_flags(self, report: ScanReport) -> None:
        if not report.status.harmful or self.step <= self.warmup:
            return
        causes: dict[str, list[LayerReport]] = {}
        for r in report.flagged_layers:
            causes.setdefault(_cause(r, self.noniid_threshold), []).append(r)
        if not causes:
            causes["compounding"] = []
        for cause, layers in causes.items():
            if cause in self._causes:
                continue
            self._causes.add(cause)
            flag = Flag(
                cause=cause,
                message=_message(report, cause, layers, self._first, self.step),
                layers=tuple(r.name for r in layers),
                step=self.step,
                report=report,
            )
            self.flags.append(flag)
            if self.warn:
                warnings.warn(flag.message, MonitorWarning, stacklevel=4)
            log.warning(flag.message)
            if self.on_flag is not None:
                self.on_flag(flag)


def _detach(t: Any) -> Any:
    return t.detach() if isinstance(t, torch.Tensor) else t


def _name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name or "<root>"
    return "?"


def _cause(r: LayerReport, noniid_threshold: float) -> str:
    """Why a flagged layer drifts.  Correlated batches come first: they also make the running
    statistics follow the last few batches, which reads as stale statistics."""
    if r.noniid is not None and r.noniid >= noniid_threshold:
        return "non-iid"
    return str(r.recommendation)


def _names(layers: list[LayerReport]) -> str:
    names = [r.name for r in layers]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _message(
    report: ScanReport, cause: str, layers: list[LayerReport], first: int, last: int
) -> str:
    e = report.end_to_end
    how = []
    if e is not None:
        if e.agreement is not None:
            how.append(f"agreement {e.agreement:.0%}")
        if e.acc_train is not None and e.acc_eval is not None:
            how.append(f"accuracy {e.acc_eval:.0%} in eval mode vs {e.acc_train:.0%} in training")
        elif e.loss_train is not None and e.loss_eval is not None:
            how.append(f"loss {e.loss_eval:.4g} in eval mode vs {e.loss_train:.4g} in training")
        if not how and e.rel_divergence is not None:
            how.append(f"output divergence {e.rel_divergence:.3g}")
    checked = (
        f"{e.batches} checked batches of steps {first}-{last}" if e else f"steps {first}-{last}"
    )
    head = f"eval mode diverges from training ({', '.join(how) or 'eval mode worse'} on {checked})"
    names = _names(layers)
    size = report.composition.batch_size
    worst = max(layers, key=lambda r: r.drift or 0.0) if layers else None
    numbers = (
        f" (drift {worst.drift:.3g}, batch noise {worst.noise:.3g}, shift {worst.shift:.3g})"
        if worst is not None
        and worst.drift is not None
        and worst.noise is not None
        and worst.shift is not None
        else ""
    )
    if cause == "instance":
        what = "per-sample batches" if size != 1 else "batch size 1"
        body = (
            f"{what} makes {names} depend on its batch{numbers}; use InstanceNorm "
            "(`normdoctor.patch(model, to='instance')`) or train with BatchRenorm"
        )
    elif cause == "non-iid":
        top = max(layers, key=lambda r: r.noniid or 0.0)
        body = (
            f"the batches are not i.i.d. (correlated, e.g. sorted by class): batch means spread "
            f"{top.noniid or 0.0:.3g}x what i.i.d. batches give at {top.name}, so no running "
            f"estimate matches training at {names}; shuffle the data or train with BatchRenorm "
            "(`normdoctor.patch(model, to='renorm')`)"
        )
    elif cause == "recalibrate":
        body = (
            f"the running statistics of {names} are stale{numbers}; recalibrate them "
            "(`normdoctor.recalibrate(model, data)`) or raise BatchNorm's momentum"
        )
    elif cause == "batchstats":
        body = (
            f"batch noise makes {names} depend on its batch{numbers}; train with larger "
            "batches or BatchRenorm (`normdoctor.patch(model, to='renorm')`)"
        )
    elif cause == "renorm":
        body = (
            f"{names} cannot be normalized per sample{numbers}; train with BatchRenorm "
            "(`normdoctor.patch(model, to='renorm')`) or larger batches"
        )
    else:
        body = "no single layer exceeds the threshold: the drift compounds over layers"
    return f"{head}: {body}"


def history_figure(history: Any) -> Any:
    """Drift per layer (top) and eval-mode agreement or divergence (bottom) over steps."""
    from matplotlib.figure import Figure  # lazily: matplotlib is only needed for figures

    points = list(history)
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    steps = [p.step for p in points]
    names = [lp.name for lp in points[-1].layers] if points else []
    for name in names:
        values = [next((lp.drift for lp in p.layers if lp.name == name), None) for p in points]
        top.plot(steps, [np.nan if v is None else v for v in values], marker=".", label=name)
    top.set_ylabel("drift (train path)")
    top.set_title("Norm-layer drift while training")
    if names:
        top.legend(fontsize="small", ncol=min(len(names), 4))
    agreement = [p.agreement for p in points]
    if any(a is not None for a in agreement):
        bottom.plot(steps, [np.nan if a is None else a for a in agreement], marker=".")
        bottom.set_ylabel("eval/train agreement")
        bottom.set_ylim(0, 1.05)
    else:
        div = [p.rel_divergence for p in points]
        bottom.plot(steps, [np.nan if d is None else d for d in div], marker=".")
        bottom.set_ylabel("output divergence")
    bottom.set_xlabel("training step")
    return fig


def monitor(
    model: nn.Module,
    *,
    every: int = 50,
    window: int | None = None,
    on_flag: Callable[[Flag], object] | None = None,
    **kwargs: Any,
) -> Monitor:
    """Watch ``model``'s norm layers while it trains; a context manager around the loop::

        with normdoctor.monitor(model, every=50) as mon:
            for x, y in loader:
                out = model(x)
                mon.observe(out, y)  # optional: labels make the comparison accuracy
                loss = F.cross_entropy(out, y)
                ...
        report = mon.report()  # a ScanReport, judged by the scan's rules

    Args:
        every: run one batch in eval mode every ``every`` training forwards.
        window: steps per verdict (default ``20 * every``).
        on_flag: called with a :class:`Flag` once per cause of a harmful verdict.
        kwargs: ``history`` (windows kept, default 100), ``warmup`` (steps before the first
            warning, default one window), ``loss`` (per-sample loss for the
            comparison), the verdict's thresholds, ``warn=False`` (no ``warnings``).
    """
    return Monitor(model, every=every, window=window, on_flag=on_flag, **kwargs)

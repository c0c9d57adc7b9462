"""The PyTorch source: an ``nn.Module``'s norm layers, the two paths, taps on their inputs.

:class:`Probe` owns everything that touches the model: it attaches one tap per measured layer
(a forward wrapper, cheaper than a pre-hook: :mod:`normdoctor.taps`), switches the model between
the two paths (DESIGN.md), and on exit, normal or not, removes every tap and restores every
module's ``training`` flag, every attribute it changed and every norm buffer bit for bit.  The
tap is the hot path: it runs once per layer per batch and hands the input to the layer's
:class:`~normdoctor.recording.Recorder`.

:class:`TorchSource` is the :class:`~normdoctor.sources.Source` the scan driver runs; the
forward helpers (:func:`default_forward`, :func:`model_device_dtype`, :func:`output_tensor`,
:func:`to_device`) are shared with the fixes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .. import _fused
from .._globals import paused_gc
from ..batching import Batch, first_tensor
from ..checks import Finding, static_checks
from ..deferred import Deferred
from ..errors import ScanError
from ..layers import (
    BATCH_DEPENDENT,
    NormFamily,
    NormLayer,
    NormState,
    module_state,
    norm_family,
    norm_layers,
)
from ..recording import PATHS, LayerMeasurement, PathName, Recorder, Scratch, finish_all
from ..report import ScanReport
from ..taps import Tap, tap

__all__ = [
    "Probe",
    "Snapshot",
    "TorchSession",
    "TorchSource",
    "default_forward",
    "eval_mode",
    "forward_failed",
    "model_device_dtype",
    "output_tensor",
    "to_device",
]


Forward = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for t in itertools.chain(model.parameters(), model.buffers()):  # lazily: the first decides
        if t.is_floating_point():
            return t.device, t.dtype
    for t in model.buffers():
        return t.device, None
    return torch.device("cpu"), None


def output_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor of a model's output (``.logits`` of output objects)."""
    for name in ("logits", "last_hidden_state"):
        if not isinstance(out, (torch.Tensor, dict, list, tuple)) and hasattr(out, name):
            return getattr(out, name)
    return first_tensor(out)


def to_device(batch: Batch, device: torch.device, dtype: torch.dtype | None) -> Batch:
    inputs, labels = batch.inputs, batch.labels
    if (
        type(inputs) is torch.Tensor
        and inputs.device == device
        and (dtype is None or not inputs.is_floating_point() or inputs.dtype == dtype)
        and (labels is None or labels.device == device)
    ):
        return batch  # already there: the common case, no tree walk per batch

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point() and dtype is not None and t.dtype != dtype:
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    labels = batch.labels.to(device) if batch.labels is not None else None
    return Batch(tree_map(move, batch.inputs), labels, batch.size, batch.index)


def forward_failed(
    exc: BaseException, index: int, during: str, last_layer: str | None = None
) -> ScanError:
    """The one-line error for a model's forward that raised (or called ``sys.exit``) on batch
    ``index`` ``during`` a stage ("(train path)", "while recalibrating"), with where it was."""
    if isinstance(exc, SystemExit):  # the model's code tried to end the process
        return ScanError(
            f"forward failed on batch {index} {during}: the model called sys.exit({exc.code})"
        )
    where = f" after norm layer {last_layer!r}" if last_layer else ""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return ScanError(
        f"forward failed on batch {index} {during}{where}: {type(exc).__name__}: {first}"
    )


_set = object.__setattr__  # plain attributes (bools), never tensors or modules
_GONE = object()
_TRAIN = nn.Module.train
_EVAL = nn.Module.eval


def eval_mode(model: nn.Module, modules: Iterable[nn.Module]) -> None:
    """``model.eval()``: through ``train(False)`` where some module overrides ``train`` or
    ``eval`` (to keep a frozen part frozen, say), else the flags set directly (at 2000 modules
    ``nn.Module.__setattr__`` cost about 5 ms a scan, issue 16)."""
    modules = list(modules)
    if type(model).eval is not _EVAL or any(type(m).train is not _TRAIN for m in modules):
        model.eval()
        return
    for module in modules:
        _set(module, "training", False)


class Snapshot:
    """Bit-exact copies of many tensors, taken in a few ops and put back only where changed.

    One-dimensional and zero-dimensional tensors are joined per dtype and device (one ``cat``
    or ``stack``), others cloned one by one.  :meth:`restore` joins them again, compares the
    bits (a NaN equals itself, -0.0 differs from 0.0) and copies back only a group that
    differs: at 1500 norm buffers, a few tenths of a millisecond instead of a clone and a copy
    of each (several milliseconds a scan, issue 16).
    """

    __slots__ = ("_groups", "_loose")

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        groups: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self._groups: list[tuple[list[torch.Tensor], list[Any], list[int], torch.Tensor]]
        self._loose: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for t in tensors:
                dim = t.dim()
                if dim <= 1 and not t.is_meta:  # Tensor.device builds an object: is_cpu first
                    key = (t.dtype, None if t.is_cpu else t.device, dim)
                    groups.setdefault(key, []).append(t)
                else:
                    self._loose.append((t, t.detach().clone()))
            self._groups = [
                (ts, [t.shape for t in ts], [t.numel() for t in ts], _joined(ts))
                for ts in groups.values()
            ]

    def restore(self) -> None:
        with torch.no_grad():
            for ts, shapes, sizes, saved in self._groups:
                if not _same_bits(_joined(ts), saved):
                    for t, shape, value in zip(ts, shapes, saved.split(sizes), strict=True):
                        t.copy_(value.view(shape))
            for t, value in self._loose:
                t.copy_(value)


def _joined(ts: list[torch.Tensor]) -> torch.Tensor:
    """The values of same-dtype tensors of one dimension (0 or 1) in one new flat tensor."""
    return torch.stack(ts) if ts[0].dim() == 0 else torch.cat(ts)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point() or a.is_complex():
        bits = _BITS.get(a.element_size())
        if bits is None:
            return False  # copy back: always right
        a, b = a.view(bits), b.view(bits)
    return bool(torch.equal(a, b))


def _one_value_per_channel(x: torch.Tensor, module: nn.Module) -> bool:
    """The input leaves one value per channel to normalize over in train mode (torch raises)."""
    if x.dim() < 2:
        return False
    per_channel = x.numel() // max(x.shape[1], 1)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return x.dim() > 2 and per_channel // max(x.shape[0], 1) == 1
    return per_channel == 1


class Probe:
    """Context manager that records the inputs of batch-dependent norm layers.

    Example::

        with Probe(model, layers) as probe:
            for x in batches:
                with probe.path("train"):
                    model(x)
        measurements = probe.results("train")

    On exit every tap is removed and the model is restored exactly: ``training`` flags of every
    module, ``track_running_stats`` and the norm buffers (values and objects).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[NormLayer],
        paths: Sequence[PathName] = PATHS,
        *,
        modules: dict[str, nn.Module] | None = None,
        hold_across: bool = False,
    ):
        """``modules``: ``dict(model.named_modules())`` where the caller has it (a traversal
        of a 2000-module model costs several milliseconds).  ``hold_across``: small calls may
        stay held past their forward until results are read (``Deferred.end_forward``); for
        callers that read the recorders only through :meth:`results` and :meth:`recorders`."""
        self.model = model
        self.layers = [layer for layer in layers if layer.batch_dependent and layer.materialized]
        self._order_only = [layer for layer in layers if not layer.batch_dependent]
        self.paths = tuple(paths)
        self._modules = dict(model.named_modules()) if modules is None else modules
        self._taps: list[Tap] = []
        self._recorders: dict[PathName, dict[str, Recorder]] = {}
        self._active: dict[str, Recorder] | None = None
        self._train_active = False
        self._last_path: PathName | None = None
        self._lazy = hold_across  # see exit_path
        self._train_mode = False  # the switched layers are in the train path's mode
        # Layers the train path switches (module -> family), and per layer the calls whose input
        # held one value per channel (N x spatial = 1): BatchNorm cannot normalize that in train
        # mode, so the layer runs in eval mode for that call and records nothing.
        self._switched: dict[nn.Module, NormFamily] = {}
        self.single_value: dict[str, int] = {}
        self._held: list[nn.Module] = []
        self._scratch = Scratch()
        # Small inputs, see exit_path.  Held across forwards, a flush holds many calls: each a
        # job of one kernel call, booked a recorder's run at a time, beats a copy into a stage.
        self._deferred = Deferred(across=hold_across, stage=not hold_across)
        self.order: list[str] = []
        self._seen: set[str] = set()
        self.last_layer: str | None = None

    # -- state saving ----------------------------------------------------------------------
    def _save(self) -> None:
        self._flags = [(m, m.training) for m in self._modules.values()]
        self._norm_state = []
        measured = {layer.name for layer in self.layers}
        values: list[torch.Tensor] = []
        norm_base = nn.modules.batchnorm._NormBase
        for name, module in self._modules.items():
            if isinstance(module, norm_base) or name in measured:
                buffers = dict(module._buffers)
                values += [v for v in buffers.values() if v is not None]
                self._norm_state.append(
                    (module, getattr(module, "track_running_stats", None), buffers)
                )
        self._values = Snapshot(values)
        # Layers the train path switches to batch statistics (frozen ones have no such mode).
        self._switch = []
        for module, track, buffers in self._norm_state:
            family = norm_family(module)
            if family in BATCH_DEPENDENT and family is not NormFamily.FROZEN:
                self._switch.append((module, family, track, buffers))

    def _restore(self) -> None:
        """Every flag, attribute and norm buffer back as saved (objects and values)."""
        for module, flag in self._flags:
            _set(module, "training", flag)  # a plain bool: nn.Module.__setattr__ is slow
        for module, track, buffers in self._norm_state:
            if track is not None:
                _set(module, "track_running_stats", track)
            own = module._buffers
            for key, tensor in buffers.items():
                if own.get(key, _GONE) is not tensor:
                    own[key] = tensor
        self._values.restore()

    # -- context manager -------------------------------------------------------------------
    @paused_gc()
    def __enter__(self) -> Probe:
        self._save()
        try:
            if _fused.kernel() is not None:
                _fused.match_threads()
            eval_mode(self.model, self._modules.values())
            made = Recorder.for_layers(self.layers, self._modules)
            first = {layer.name: rec for layer, rec in zip(self.layers, made, strict=True)}
            for i, path in enumerate(self.paths):
                self._recorders[path] = first if i == 0 else {n: r.like() for n, r in first.items()}
                Recorder.preallocate(list(self._recorders[path].values()))
            self._switched = {module: family for module, family, _t, _b in self._switch}
            for layer in self.layers:
                module = self._modules[layer.name]
                release = self._release if module in self._switched else None
                self._taps.append(tap(module, self._hook_for(layer.name), release))
            for layer in self._order_only:  # batch-independent: only where it runs in the order
                module = self._modules[layer.name]
                self._taps.append(tap(module, self._order_hook(layer.name)))
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    @paused_gc()
    def _close(self) -> None:
        self._deferred.flush()
        for t in reversed(self._taps):  # innermost last: nested wrappers come off in order
            t.remove()
        self._taps.clear()
        self._active = None
        self._scratch = Scratch()  # let the buffer go
        self._restore()
        self._train_mode = False

    def _hook_for(self, name: str) -> Callable[[nn.Module, tuple], bool]:
        seen = self._seen
        checked: list[Any] = [None, False]  # the last input shape checked, and the answer
        record = self._deferred.observe

        def hook(module: nn.Module, args: tuple) -> bool:
            """Record the call's input; True: the call runs held in eval mode (release it)."""
            active = self._active
            if active is None or not args:
                return False
            x = args[0]
            if not isinstance(x, torch.Tensor):
                return False
            self.last_layer = name
            if name not in seen:
                seen.add(name)
                self.order.append(name)
            if self._train_active and module.training:
                if x.shape != checked[0]:
                    checked[0], checked[1] = x.shape, _one_value_per_channel(x, module)
                if checked[1]:
                    # BatchNorm over pooled features at batch size 1: torch raises in train
                    # mode.  This call runs in eval mode instead and is not recorded (not
                    # measurable).
                    _set(module, "training", False)
                    self._held.append(module)
                    self.single_value[name] = self.single_value.get(name, 0) + 1
                    return True
            record(active[name], x, self._scratch)
            return False

        return hook

    def _release(self, module: nn.Module) -> None:
        """After a call held in eval mode by the hook: back to train mode."""
        if self._held and self._held[-1] is module:
            self._held.pop()
            _set(module, "training", True)

    def _order_hook(self, name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if self._active is not None and name not in self._seen:
                self._seen.add(name)
                self.order.append(name)

        return hook

    # -- the two paths ---------------------------------------------------------------------
    @contextmanager
    def path(self, path: PathName) -> Iterator[None]:
        """Run the body on ``path``: "train" (norm layers use batch statistics, nothing else
        changes mode, running statistics untouched) or "eval" (``model.eval()``).

        The whole model was put in eval mode on entering the probe; a path only switches the
        batch-dependent norm layers, so the cost per batch does not grow with the model's size.
        """
        self.enter_path(path)
        try:
            yield
        finally:
            self.exit_path()

    def enter_path(self, path: PathName) -> None:
        """:meth:`path` without the context manager (the per-batch loop): pair with
        :meth:`exit_path` in a ``finally``."""
        active = self._recorders.get(path)
        if active is None:
            raise ValueError(f"path {path!r} not recorded by this probe (paths: {self.paths})")
        if path != self._last_path:  # calls stay held across forwards of one path only
            self._deferred.flush()
            self._last_path = path
        train = path == "train"
        if train != self._train_mode:
            self._switch_train(train)
        self._active = active
        self._train_active = train

    def exit_path(self) -> None:
        """Back to the state between paths (every switched layer in eval mode; with
        ``hold_across``, from the next eval path or the probe's exit on, so that a run of
        train-path forwards switches once)."""
        self._deferred.end_forward()  # the forward has returned: reduce what it held, or hold
        train = self._train_active
        self._active = None
        self._train_active = False
        if self._held:
            if self._lazy:  # layers run in eval mode for one call (one value per channel)
                for module in self._held:
                    _set(module, "training", True)
            self._held.clear()
        if train and not self._lazy:
            self._switch_train(False)

    def _switch_train(self, on: bool) -> None:
        """The switched layers to the train path's mode (batch statistics, nothing updated)
        or back.  object.__setattr__: nn.Module.__setattr__ checks its parameter, buffer and
        submodule dicts on every call, which at batch size 1 costs more than the layer."""
        for module, family, track, buffers in self._switch:
            _set(module, "training", on)
            _set(module, "track_running_stats", False if on else track)
            if family is NormFamily.INSTANCE_TRACKED:
                # InstanceNorm updates running stats whenever it is handed them.
                module._buffers["running_mean"] = None if on else buffers["running_mean"]
                module._buffers["running_var"] = None if on else buffers["running_var"]
        self._train_mode = on

    @property
    def lost(self) -> dict[str, int]:
        """Per layer, calls not recorded: the model wrote to the layer's input after the layer
        had read it, before the held call was reduced (see :class:`~normdoctor.deferred.Deferred`)."""
        self._deferred.flush()
        return self._deferred.lost

    def lost_note(self) -> str | None:
        """What :attr:`lost` means for a report (``None``: nothing lost)."""
        self._deferred.flush()
        return self._deferred.note()

    @paused_gc()
    def results(self, path: PathName) -> dict[str, LayerMeasurement | None]:
        """Per layer name, what ``path`` recorded (``None``: the layer never ran)."""
        self._deferred.flush()
        recorders = self._recorders[path]
        return dict(zip(recorders, finish_all(list(recorders.values())), strict=True))

    def recorders(self, path: PathName | None = None) -> list[Recorder]:
        """The recorders of ``path`` (default: of every path, path by path) in layer order:
        what the exact merge over ranks combines."""
        self._deferred.flush()
        paths = self.paths if path is None else (path,)
        return [r for p in paths for r in self._recorders[p].values()]

    def recorder(self, path: PathName, name: str) -> Recorder:
        """The recorder of layer ``name`` on ``path``."""
        self._deferred.flush()
        return self._recorders[path][name]


class TorchSession:
    """One recording stage on an ``nn.Module`` (see :class:`normdoctor.sources.Session`)."""

    def __init__(self, source: TorchSource, paths: Sequence[PathName]) -> None:
        self.source = source
        self.probe = Probe(
            source.model, source.layers, paths, modules=source.modules, hold_across=True
        )
        self.order: list[str] = self.probe.order
        self.single_value: dict[str, int] = self.probe.single_value
        self._notes: list[str] = []

    @property
    def notes(self) -> list[str]:
        lost = self.probe.lost_note()
        return [*self._notes, lost] if lost else self._notes

    def __enter__(self) -> TorchSession:
        self._grad = torch.no_grad()
        self._grad.__enter__()
        try:
            self.probe.__enter__()
        except BaseException:
            self._grad.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.probe.__exit__(*exc)
        finally:
            self._grad.__exit__(*exc)

    def prepare(self, batch: Batch) -> Batch:
        return to_device(batch, self.source.target, self.source.dtype)

    def run(self, path: PathName, batch: Batch, index: int) -> Any:
        probe = self.probe
        probe.enter_path(path)
        try:
            return self.source.forward(self.source.model, batch.inputs)
        except (Exception, SystemExit) as exc:
            raise forward_failed(exc, index, f"({path} path)", probe.last_layer) from exc
        finally:
            probe.exit_path()

    def results(self, path: PathName) -> dict[str, LayerMeasurement | None]:
        return self.probe.results(path)

    def recorders(self) -> list[Recorder]:
        return self.probe.recorders()


class TorchSource:
    """An ``nn.Module`` as a scan source (see :class:`normdoctor.sources.Source`).

    Args:
        model: the model; left exactly as it was.
        forward: ``forward(model, inputs) -> output`` (default :func:`default_forward`).
        device: run there (the model is moved there and back); default: where it is.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        forward: Forward | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.name = type(model).__name__
        self.forward: Forward = forward or default_forward
        self.modules = dict(model.named_modules())
        self.layers: list[NormLayer] = norm_layers(self.modules.items())
        self.home, self.dtype = model_device_dtype(model)
        self.target = torch.device(device) if device is not None else self.home
        self.measures = bool(self.layers)  # batch-independent layers' order is measured too
        self.folded = False

    def notes(self) -> list[str]:
        unmaterialized = [layer.name for layer in self.layers if not layer.materialized]
        if unmaterialized:  # saving their state would fail; a forward would materialize them
            raise ScanError(
                f"lazy layer(s) never materialized: {', '.join(unmaterialized)}; run one "
                "forward pass of the model first"
            )
        return list(getattr(self.model, "normdoctor_load_notes", ()))  # what loading decided

    def states(self) -> dict[str, NormState]:
        return {layer.name: module_state(self.modules[layer.name]) for layer in self.layers}

    def static_checks(self) -> list[Finding]:
        return static_checks(self.model)

    def input_files(self) -> tuple[Path, ...]:
        return ()

    @contextmanager
    def placed(self) -> Iterator[None]:
        if self.target != self.home:
            self.model.to(self.target)
        try:
            yield
        finally:
            if self.target != self.home:
                self.model.to(self.home)

    def session(self, paths: Sequence[PathName]) -> TorchSession:
        return TorchSession(self, paths)

    def finish(self, report: ScanReport) -> ScanReport:
        return report

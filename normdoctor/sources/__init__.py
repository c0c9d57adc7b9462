"""Sources: what a scan runs on.

One statistics and metrics pipeline serves every source (DESIGN.md).  A :class:`Source` says
which norm layers a model has and what they store; a :class:`Session` runs one batch on one
path and feeds the layers' inputs to :class:`~normdoctor.recording.Recorder` objects, and
restores everything it changed on exit.  The driver (:func:`normdoctor.scan.scan`) owns the
rest: the batch plan, the composition search, sharding over ranks, the exact merge, the
end-to-end comparison and the report.

Two sources ship:

* :class:`~normdoctor.sources.torch.TorchSource`: an ``nn.Module``; forward pre-hooks deliver
  the inputs, the train path switches only the batch-dependent norm layers.
* :class:`~normdoctor.sources.onnx.source.OnnxSource`: an ONNX graph
  (:class:`~normdoctor.sources.onnx.OnnxModel`); each BatchNormalization's input is an extra
  graph output, the train path is a rewritten graph, both run in onnxruntime.

:func:`as_source` picks the source of a model.  Importing this package never imports onnx.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..batching import Batch
from ..checks import Finding
from ..layers import NormLayer, NormState
from ..recording import LayerMeasurement, PathName, Recorder
from ..report import ScanReport
from .torch import TorchSource

__all__ = ["Scannable", "Session", "Source", "as_source"]


@runtime_checkable
class Session(Protocol):
    """One stage of a scan on a source: recorders for ``paths``, fed by :meth:`run`.

    Entered once per stage (``with source.session(paths) as s``); on exit the model is exactly
    as it was.
    """

    #: Measured layers in the order they first ran.
    order: list[str]
    #: Per layer, the calls whose input held one value per channel (not measurable in train
    #: mode: the layer ran in eval mode for them).
    single_value: dict[str, int]

    def prepare(self, batch: Batch) -> Batch:
        """The batch as this source runs it (moved to the device, cast, converted to feeds);
        done once per batch, shared by both paths."""
        ...

    def run(self, path: PathName, batch: Batch, index: int) -> Any:
        """The model's output for one prepared batch on ``path``, recording its norm inputs.

        Raises :class:`~normdoctor.errors.ScanError` (the model failed on batch ``index``) or
        :class:`~normdoctor.errors.CompositionError` (this source cannot run a batch composed
        so, e.g. a graph with a fixed batch size).
        """
        ...

    def results(self, path: PathName) -> dict[str, LayerMeasurement | None]:
        """Per measured layer, what ``path`` recorded (``None``: it never ran)."""
        ...

    def recorders(self) -> list[Recorder]:
        """Every recorder of every path, in a fixed order (for the exact merge over ranks)."""
        ...

    @property
    def notes(self) -> list[str]:
        """What the source noticed while running (a graph whose batch size had to be relaxed)."""
        ...


@runtime_checkable
class Source(Protocol):
    """A model as the scan driver sees it."""

    #: How reports name the model by default.
    name: str
    #: Every norm layer found (measured or not), in the source's own order.
    layers: list[NormLayer]
    #: Whether running batches measures anything (else a scan runs none).
    measures: bool
    #: Batch normalization was folded away (into convolutions): nothing is left to measure.
    folded: bool

    def notes(self) -> list[str]:
        """What the source says before any batch runs (loading decisions, folded layers)."""
        ...

    def states(self) -> dict[str, NormState]:
        """Per layer, the stored running statistics and affine weight."""
        ...

    def static_checks(self) -> list[Finding]:
        """What the stored statistics tell without data (:mod:`normdoctor.checks`)."""
        ...

    def input_files(self) -> tuple[Path, ...]:
        """Files the model reads beside its own (an ONNX graph's external data): inputs that
        no output may replace."""
        ...

    def placed(self) -> AbstractContextManager[None]:
        """Run the body with the model where it should run (and put it back on exit)."""
        ...

    def session(self, paths: Sequence[PathName]) -> AbstractContextManager[Session]:
        """A recording stage over ``paths``."""
        ...

    def finish(self, report: ScanReport) -> ScanReport:
        """The report with what only this source can say added (called once per scan)."""
        ...


class Scannable(Protocol):
    """A model that is not an ``nn.Module`` but knows its source (an ONNX graph)."""

    def as_source(self, *, providers: Sequence[str] | None = None) -> Source: ...


def as_source(
    model: nn.Module | Scannable | Source,
    *,
    forward: Any = None,
    device: torch.device | str | None = None,
    providers: Sequence[str] | None = None,
) -> Source:
    """The :class:`Source` of ``model``: an ``nn.Module``, a model with an ``as_source()``
    method (:class:`~normdoctor.sources.onnx.OnnxModel`), or a source already."""
    if isinstance(model, nn.Module):
        return TorchSource(model, forward=forward, device=device)
    if isinstance(model, Source):
        return model
    make = getattr(model, "as_source", None)
    if callable(make):
        source = make(providers=providers)
        if isinstance(source, Source):
            return source
    raise TypeError(
        f"cannot scan a {type(model).__name__}: expected a torch.nn.Module or an OnnxModel"
    )

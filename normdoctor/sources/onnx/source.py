"""The ONNX source: an :class:`~normdoctor.sources.onnx.OnnxModel` as the scan driver runs it.

The eval path is the graph as shipped, each measured BatchNormalization's input exposed as an
extra graph output; the train path is the rewritten graph of :mod:`.model` (each measured node
normalizes with the current batch's statistics).  Both run in onnxruntime through one
:class:`~normdoctor.sources.onnx.runner.Engine`, built once per source and shared by every
stage of a scan (its sessions are the expensive part), and their taps feed the same
:class:`~normdoctor.recording.Recorder` as a PyTorch model's hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import ModelProto

from ...batching import Batch
from ...checks import Finding
from ...errors import NormDoctorError, ScanError
from ...layers import NormLayer, NormState
from ...recording import LayerMeasurement, PathName, Recorder, finish_all
from ...report import LayerStatus, ScanReport
from .graph import NormNode, Shapes
from .rewrite import train_variant
from .runner import Engine

__all__ = ["GraphAnalysis", "OnnxSession", "OnnxSource", "first_line", "node_state"]


@dataclass(frozen=True, slots=True)
class GraphAnalysis:
    """What discovery found in a graph: the graph onnxruntime runs (upgraded to opset 7 if
    older, batch dimension named), its shapes, the norm nodes and what the graph tells."""

    run_model: ModelProto
    shapes: Shapes
    nodes: tuple[NormNode, ...]
    notes: tuple[str, ...]


def _t(value: Any) -> torch.Tensor:
    return torch.from_numpy(np.array(value, copy=True)).reshape(-1)


def node_state(rec: NormNode) -> NormState:
    """A node's stored running statistics and (per-channel) scale."""
    scale = rec.state.get("scale")
    weight = _t(scale) if scale is not None and np.ndim(scale) == 1 else None
    mean, var = rec.state.get("mean"), rec.state.get("var")
    return NormState(
        _t(mean) if mean is not None else None,
        _t(var) if var is not None else None,
        weight,
    )


def first_line(exc: BaseException) -> str:
    """``Type: first line`` of an onnxruntime or onnx error (their messages run long)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


class OnnxSession:
    """One recording stage on an ONNX graph (see :class:`normdoctor.sources.Session`)."""

    def __init__(self, source: OnnxSource, paths: Sequence[PathName]) -> None:
        self.source = source
        self.paths = tuple(paths)
        self._recorders = {
            p: {
                rec.name: Recorder(
                    rec.layer, _t(rec.state["mean"]), _t(rec.state["var"]), _t(rec.state["scale"])
                )
                for rec in source.measured
            }
            for p in self.paths
        }
        self.order: list[str] = []
        self.single_value: dict[str, int] = {}

    @property
    def notes(self) -> list[str]:
        """What the engine noticed so far (a fixed batch size relaxed or split)."""
        return list(self.source.engine.notes)

    def __enter__(self) -> OnnxSession:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def prepare(self, batch: Batch) -> Batch:
        return dataclasses.replace(batch, inputs=self.source.engine.feeds(batch.inputs))

    def run(self, path: PathName, batch: Batch, index: int) -> Any:
        try:
            out, taps = self.source.engine.run(path, batch.inputs, batch.size)
        except NormDoctorError:  # a composition the graph cannot run, inputs that do not fit
            raise
        except Exception as exc:
            raise ScanError(
                f"onnxruntime failed on batch {index} ({path} path): {first_line(exc)}"
            ) from exc
        for key, value in taps.items():
            self._recorders[path][key].observe(torch.from_numpy(np.asarray(value)))
        if not self.order:
            self.order = list(self.source.order)
        return torch.from_numpy(np.asarray(out[0])) if out else None

    def results(self, path: PathName) -> dict[str, LayerMeasurement | None]:
        recorders = self._recorders[path]
        return dict(zip(recorders, finish_all(list(recorders.values())), strict=True))

    def recorders(self) -> list[Recorder]:
        return [r for p in self.paths for r in self._recorders[p].values()]


class OnnxSource:
    """An ONNX graph as a scan source (see :class:`normdoctor.sources.Source`)."""

    def __init__(
        self,
        name: str,
        analysis: GraphAnalysis,
        *,
        providers: Sequence[str] | None = None,
        checks: Callable[[], list[Finding]] = list,
        files: Sequence[Path] = (),
    ) -> None:
        a = analysis
        self.name = name
        self._checks = checks
        self._files = tuple(files)
        self.nodes = a.nodes
        self.layers: list[NormLayer] = [rec.layer for rec in a.nodes]
        self.measured = [rec for rec in a.nodes if rec.measurable]
        self.order = [rec.name for rec in a.nodes if rec.where is None]
        self.measures = bool(self.measured)
        self._static_notes = list(a.notes)
        self.folded = any("folded at export, nothing to measure" in n for n in a.notes)
        self.engine = Engine(
            a.run_model,
            {"train": train_variant(self.measured, a.shapes)},
            {rec.name: rec.inputs["x"] for rec in self.measured},
            a.shapes,
            providers=providers,
            label=self.name,
        )

    def notes(self) -> list[str]:
        notes = list(self._static_notes)
        for rec in self.nodes:
            if rec.where is None and rec.is_batchnorm and rec.why and not rec.measurable:
                notes.append(f"{rec.name}: {rec.why}")
        return notes

    def states(self) -> dict[str, NormState]:
        return {rec.name: node_state(rec) for rec in self.nodes}

    def static_checks(self) -> list[Finding]:
        return self._checks()

    def input_files(self) -> tuple[Path, ...]:
        return self._files

    @contextmanager
    def placed(self) -> Iterator[None]:
        yield  # onnxruntime runs on its providers' devices

    def session(self, paths: Sequence[PathName]) -> OnnxSession:
        return OnnxSession(self, paths)

    def finish(self, report: ScanReport) -> ScanReport:
        """Nodes that were not run say why (in a subgraph, statistics fed at run time)."""
        why = {rec.name: rec.why for rec in self.nodes if rec.why and not rec.measurable}
        fixed = tuple(
            dataclasses.replace(r, reason=why[r.name])
            if r.name in why and r.status is LayerStatus.NOT_EXECUTED
            else r
            for r in report.layers
        )
        return dataclasses.replace(report, layers=fixed)

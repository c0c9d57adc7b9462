"""``OnnxModel``: an ONNX graph as a source for scans, static checks and rewrites.

What is measured
    The eval path is the graph as shipped, each measured BatchNormalization's input exposed as
    an extra graph output.  The train path is a rewritten copy of the graph in which each
    measured BatchNormalization is replaced by the computation it performs in training:
    ``x3 = reshape(x, (N, C, L))``, ``mu_B = ReduceMean(x3, axes=[0, 2])``,
    ``var_B = ReduceMean((x3 - mu_B)^2, axes=[0, 2])`` (biased), ``y = (x3 - mu_B) /
    sqrt(var_B + eps) * gamma + beta`` reshaped back; the running statistics are never
    updated.  Everything else runs as in the shipped graph (inference graphs hold no active
    dropout).  Both paths run in onnxruntime (CPUExecutionProvider by default) and their taps
    feed the same :class:`~normdoctor.probe.Recorder` and
    :func:`~normdoctor.scan.assemble_report` as PyTorch models.

Opset 6 and older
    onnxruntime has no kernel for BatchNormalization-6, so such graphs run after an in-memory
    upgrade to opset 7 with ``onnx.version_converter``; rewrites are written in the original
    opset.  Nothing falls back to ``onnx.reference``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import ModelProto, TensorProto, numpy_helper

from ..._version import __version__
from ...batching import GroupBy, plan_batches
from ...checks import Finding
from ...convert.targets import BATCHSTATS, INSTANCE, RECALIBRATE
from ...errors import ConversionError, DataError, LoadError, NormDoctorError, ScanError
from ...layers import NormFamily, NormLayer, select_layers
from ...metrics import DEFAULT_NONIID_THRESHOLD, DEFAULT_THRESHOLD
from ...outputs import Outputs
from ...progress import ProgressArg, with_progress
from ...recording import PATHS
from ...report import ScanReport
from ...scan import (
    DEFAULT_AGREEMENT_THRESHOLD,
    DEFAULT_DIVERGENCE_THRESHOLD,
)
from ...stats import Moments, channel_moments
from .graph import (
    Constants,
    NormNode,
    Shapes,
    data_inputs,
    default_opset,
    discover,
    is_folded_note,
    subgraphs,
)
from .rewrite import (
    Names,
    batchstats_nodes,
    copy_model,
    dynamic_dims,
    feed_running_stats,
    node_index,
    replace_nodes,
    set_running_stats,
    subgraph_reads,
    to_instance_nodes,
)
from .runner import Engine
from .source import GraphAnalysis, OnnxSource, first_line

__all__ = ["PATCHES", "OnnxModel"]

#: Rewrites :meth:`OnnxModel.patch` knows.
PATCHES = (RECALIBRATE, INSTANCE, BATCHSTATS)
_METADATA_KEY = "normdoctor.patches"
Progress = Callable[[int, int | None], None]
_LARGE = 1_800_000_000  # bytes: above this a model is written with external data


class OnnxModel:
    """An ONNX model: its normalization nodes, scans through onnxruntime, graph rewrites.

    Build one with :meth:`load`; every rewrite returns a new ``OnnxModel`` (the original is
    never changed) that :meth:`save` writes as a new, checked ONNX file.
    """

    def __init__(
        self,
        proto: ModelProto,
        *,
        path: str | os.PathLike[str] | None = None,
        name: str | None = None,
        history: Sequence[str] = (),
        protected: Iterable[str] = (),
        external_data: bool = False,
    ) -> None:
        self.proto = proto
        self.path = Path(path) if path is not None else None
        self.name = name or (self.path.stem if self.path is not None else proto.graph.name)
        self.history = tuple(history)
        self._protected = frozenset(protected)
        self._external_data = external_data
        self._analysis_cache: GraphAnalysis | None = None

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OnnxModel:
        """Read an ONNX file, with its external data if it has some.

        Raises:
            LoadError: the file is missing or not ONNX, or an external-data location points
                outside the model's folder (absolute, ``..``, or a link leading out).
        """
        p = Path(path)
        if not p.is_file():
            raise LoadError(f"no such ONNX file: {p}")
        try:
            proto = onnx.load(str(p), load_external_data=False)
        except Exception as exc:
            raise LoadError(f"{p}: not a readable ONNX model ({first_line(exc)})") from exc
        if not proto.graph.node and not proto.graph.output:
            raise LoadError(f"{p}: not an ONNX model (no graph)")
        base = p.resolve().parent
        protected = {str(p.resolve())}
        files = _external_files(proto, base, p.name)
        protected |= {str(f) for f in files}
        if files:
            try:
                onnx.external_data_helper.load_external_data_for_model(proto, str(base))
            except Exception as exc:
                raise LoadError(f"{p}: cannot read its external data ({first_line(exc)})") from exc
        return cls(proto, path=p, protected=protected, external_data=bool(files))

    # -- analysis --------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        """The opset of the default (ai.onnx) domain."""
        return default_opset(self.proto)

    def analysis(self) -> GraphAnalysis:
        if self._analysis_cache is None:
            notes = []
            run_model = self.proto
            if 0 < self.opset < 7:
                try:
                    run_model = onnx.version_converter.convert_version(self.proto, 7)
                    notes.append(
                        f"opset {self.opset} graph: run in onnxruntime after an in-memory upgrade "
                        "to opset 7 (onnxruntime has no BatchNormalization-6 kernel); rewrites "
                        f"keep opset {self.opset}"
                    )
                except Exception as exc:
                    notes.append(
                        f"opset {self.opset} graph could not be upgraded for onnxruntime "
                        f"({first_line(exc)}); scans may fail"
                    )
            # Families follow the file's own opset (BatchNormalization-6 without is_test is in
            # training mode); values and shapes come from the graph onnxruntime runs.
            run_model = dynamic_dims(run_model)  # -1 or 0 for a dynamic batch: a named dim
            shapes = Shapes(run_model)
            consts = Constants(self.proto, run_model)
            nodes, found_notes = discover(self.proto, shapes, consts)
            if _patched_with(self.proto, "batchstats") and not any(r.is_batchnorm for r in nodes):
                found_notes = [
                    n for n in found_notes if not n.startswith("no BatchNormalization left")
                ]
                found_notes.append(
                    "no BatchNormalization left: replaced by batch-statistics computation "
                    "(normdoctor patch 'batchstats'), nothing can drift"
                )
            if not nodes:
                found_notes = found_notes or ["no normalization nodes in the graph"]
            self._analysis_cache = GraphAnalysis(
                run_model, shapes, tuple(nodes), tuple(found_notes + notes)
            )
        return self._analysis_cache

    def find_norm_layers(self) -> list[NormLayer]:
        """Every normalization node as a :class:`NormLayer`, main graph first in node order.

        ``kind`` is the op type; ``name`` the node name (its first output when unnamed); nodes
        inside If/Loop/Scan bodies come last, named ``<parent>/<attribute>/<node>``, listed but
        never scanned.  ``momentum`` is converted to PyTorch's convention (1 - ONNX momentum).
        """
        return [rec.layer for rec in self.analysis().nodes]

    def norm_nodes(self) -> list[NormNode]:
        """The discovery records behind :meth:`find_norm_layers` (inputs, constants, scope)."""
        return list(self.analysis().nodes)

    def notes(self) -> list[str]:
        """What the graph itself tells: folded BatchNorm, nodes in subgraphs, unscannable nodes."""
        a = self.analysis()
        out = list(a.notes)
        out += [
            f"{rec.name}: {rec.why}"
            for rec in a.nodes
            if rec.where is None and rec.is_batchnorm and rec.why and not rec.measurable
        ]
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Each main-graph BatchNormalization's constants under PyTorch's key names.

        Keys are ``<node name>.weight``, ``.bias``, ``.running_mean`` and ``.running_var``
        (only those that are constants of the graph), values CPU tensors in the graph's dtype.
        """
        out: dict[str, torch.Tensor] = {}
        for rec in self.analysis().nodes:
            if not rec.is_batchnorm or rec.where is not None:
                continue
            for role, key in (
                ("scale", "weight"),
                ("bias", "bias"),
                ("mean", "running_mean"),
                ("var", "running_var"),
            ):
                if role in rec.state:
                    out[f"{rec.name}.{key}"] = torch.from_numpy(np.array(rec.state[role]))
        return out

    def static_checks(self) -> list[Finding]:
        """Checks that need no data: :func:`normdoctor.checks.static_checks` on
        :meth:`state_dict` (with each node's kind, epsilon and momentum), plus what only the
        graph tells.

        Graph findings (severity ``info``): ``batchnorm-folded`` (no BatchNormalization left,
        or most convolutions look folded: nothing to measure there), ``no-running-stats`` (a
        BatchNormalization in training mode normalizes with batch statistics at inference),
        ``norm-in-subgraph`` (listed, not scanned), ``running-stats-not-constant`` (statistics
        fed at run time).
        """
        from ...checks import Finding, Severity, static_checks

        a = self.analysis()
        info = {
            rec.name: {"kind": rec.op_type, "eps": rec.layer.eps, "momentum": rec.layer.momentum}
            for rec in a.nodes
            if rec.is_batchnorm and rec.where is None
        }
        graph: list[Finding] = [
            Finding(layer="", code="batchnorm-folded", severity=Severity.INFO, message=note)
            for note in a.notes
            if is_folded_note(note)
        ]
        for rec in a.nodes:
            if rec.where is not None:
                code = "norm-in-subgraph"
            elif rec.is_batchnorm and rec.layer.family is NormFamily.BATCH_STATS_ONLY:
                code = "no-running-stats"
            elif rec.is_batchnorm and rec.why and "fed at run time" in rec.why:
                code = "running-stats-not-constant"
            else:
                continue
            message = rec.why or ""
            if code == "no-running-stats":
                message = f"BatchNormalization with {message}: predictions depend on the batch"
            graph.append(
                Finding(layer=rec.name, code=code, severity=Severity.INFO, message=message)
            )
        return graph + static_checks(self.state_dict(), layer_info=info)

    # -- running ---------------------------------------------------------------------------
    def run(self, inputs: Any, *, providers: Sequence[str] | None = None) -> list[np.ndarray]:
        """Plain inference (eval path) in onnxruntime: the graph outputs for one batch."""
        a = self.analysis()
        engine = Engine(a.run_model, {}, {}, a.shapes, providers=providers, label=self.name)
        feeds = engine.feeds(inputs)
        size = int(next(iter(feeds.values())).shape[0]) if feeds else 0
        outs, _ = engine.run("eval", feeds, size)
        return outs

    def scan(
        self,
        data: Any,
        *,
        batch_size: int | None = 32,
        shuffle: bool = True,
        seed: int = 0,
        group_by: GroupBy = None,
        max_batches: int | None = None,
        paths: Sequence[str] = PATHS,
        threshold: float = DEFAULT_THRESHOLD,
        noniid_threshold: float = DEFAULT_NONIID_THRESHOLD,
        agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
        divergence_threshold: float = DEFAULT_DIVERGENCE_THRESHOLD,
        progress: Progress | None = None,
        model_name: str | None = None,
        providers: Sequence[str] | None = None,
        stated: bool = False,
    ) -> ScanReport:
        """Measure each BatchNormalization's train/eval drift, as :func:`normdoctor.scan` does.

        The options mean what they mean for :func:`normdoctor.scan` (``stated``: the batch
        composition is training's, as the user stated; there is no composition search for ONNX
        graphs yet, so a scan judges at the composition given).  A batch's inputs are a
        tensor or array (one graph input), a tuple in graph-input order, or a dict keyed by
        input name; they are cast to the input's declared dtype.

        Note:
            The train path is a rewritten graph in which each measured BatchNormalization
            normalizes with the current batch's mean and biased variance over N and all spatial
            positions (module docstring); running statistics are never changed.  With a fixed
            batch dimension of 1 the train path needs the batch dimension made dynamic; when
            the graph hard-codes it, only ``batch_size=1`` (or ``paths=("eval",)``) can run.

        Raises:
            DataError: the data cannot be batched or does not fit the graph's inputs.
            ScanError: onnxruntime failed on a batch.
        """
        from ...scan import scan  # the one driver for every source

        composition: dict[str, Any] = (
            {"train_batch_size": batch_size, "train_group_by": group_by}  # as training's
            if stated
            else {"batch_size": batch_size, "group_by": group_by}
        )
        return scan(
            self,
            data,
            **composition,
            shuffle=shuffle,
            seed=seed,
            max_batches=max_batches,
            paths=paths,
            threshold=threshold,
            noniid_threshold=noniid_threshold,
            agreement_threshold=agreement_threshold,
            divergence_threshold=divergence_threshold,
            progress=progress,
            model_name=model_name,
            providers=providers,
            search=False,
        )

    def as_source(self, *, providers: Sequence[str] | None = None) -> OnnxSource:
        """This graph as the scan driver runs it (:class:`~normdoctor.sources.onnx.source.OnnxSource`)."""
        return OnnxSource(
            self.name,
            self.analysis(),
            providers=providers,
            checks=self.static_checks,
            files=self.input_files,
        )

    @property
    def input_files(self) -> tuple[Path, ...]:
        """The files this model was read from (the graph and its external data): inputs no
        output may replace."""
        return tuple(Path(p) for p in sorted(self._protected))

    # -- rewrites --------------------------------------------------------------------------
    @with_progress
    def patch(
        self,
        to: str,
        *,
        data: Any = None,
        layers: str | Iterable[str] | None = None,
        batch_size: int | None = 64,
        max_batches: int | None = None,
        progress: ProgressArg = None,
        output: str | os.PathLike[str] | None = None,
        providers: Sequence[str] | None = None,
    ) -> OnnxModel:
        """Rewrite BatchNormalization nodes; returns the patched model (saved to ``output``).

        Args:
            to: ``"recalibrate"``: running statistics set to the exact pooled mean and unbiased
                variance of each node's input over ``data``, layer by layer in topological
                order, each measured with the upstream nodes already recalibrated (nodes at the
                same depth share a pass: none is upstream of another).  ``"instance"``: each
                node becomes InstanceNormalization with the same scale, bias and epsilon (inputs
                with spatial dimensions only).  ``"batchstats"``: each node normalizes with the
                current batch's statistics at inference.
            data: the data ``recalibrate`` measures (any source :func:`normdoctor.scan` takes;
                batches are formed in data order, their size does not change the result).
            layers: node names or glob patterns; default every BatchNormalization that uses its
                running statistics at inference.
            output: also write the result there (see :meth:`save`).

        Raises:
            ConversionError: unknown ``to``, nothing to rewrite, or a node that cannot take it
                (InstanceNorm of a (N, C) input, batchstats below opset 7).
            DataError: ``recalibrate`` without usable data.
        """
        if to not in PATCHES:
            raise ConversionError(f"unknown patch {to!r}: expected one of {', '.join(PATCHES)}")
        a = self.analysis()
        batchnorms = [rec for rec in a.nodes if rec.is_batchnorm]
        if not batchnorms:
            reason = next((n for n in a.notes if n.startswith("no BatchNormalization")), None)
            raise ConversionError(
                f"{self.name}: " + (reason or "no BatchNormalization node to rewrite")
            )
        chosen = select_layers([rec.layer for rec in batchnorms], layers)
        if not chosen:
            raise ConversionError(
                f"{self.name}: no BatchNormalization node matches {layers!r} "
                f"(nodes: {', '.join(rec.name for rec in batchnorms)})"
            )
        names_chosen = {layer.name for layer in chosen}
        targets, skipped = [], []
        for rec in batchnorms:
            if rec.name not in names_chosen:
                continue
            if rec.where is not None:
                skipped.append(f"{rec.name} ({rec.where})")
            elif rec.layer.family is not NormFamily.BATCH:
                skipped.append(f"{rec.name} (already normalizes with batch statistics)")
            elif to == "recalibrate" and not rec.measurable:
                skipped.append(f"{rec.name} ({rec.why})")
            else:
                targets.append(rec)
        if not targets:
            raise ConversionError(
                f"{self.name}: nothing to rewrite with {to!r}: " + "; ".join(skipped)
            )
        new = copy_model(self.proto)
        names = Names(new)
        shapes = Shapes(self.proto)
        opset = self.opset
        record: dict[str, Any] = {"to": to, "layers": [rec.name for rec in targets]}
        if to == "recalibrate":
            if data is None:
                raise DataError("recalibrate needs data: the samples to measure statistics on")
            callback = progress if callable(progress) else None  # with_progress resolved it
            stats, samples = self._recalibrated_stats(
                targets, data, batch_size, max_batches, callback, providers
            )
            set_running_stats(new, stats, names)
            record["samples"] = samples
            what = f"recalibrated {len(targets)} BatchNormalization node(s) on {samples} samples"
        else:
            replacements = {}
            for rec in targets:
                node = new.graph.node[node_index(new, rec.output)]
                if to == "instance":
                    replacements[rec.output] = to_instance_nodes(
                        new, node, shapes, names, rec.layer.eps
                    )
                else:
                    replacements[rec.output] = batchstats_nodes(
                        new, node, shapes, names, rec.layer.eps, opset
                    )
            replace_nodes(new, replacements)
            what = (
                f"{len(targets)} BatchNormalization node(s) replaced by InstanceNormalization"
                if to == "instance"
                else f"{len(targets)} BatchNormalization node(s) normalize with batch statistics"
            )
        if skipped:
            what += "; left unchanged: " + "; ".join(skipped)
        _stamp(new, record)
        try:
            onnx.checker.check_model(new)
        except Exception as exc:
            raise ConversionError(
                f"{self.name}: the rewritten graph fails onnx.checker ({first_line(exc)})"
            ) from exc
        patched = OnnxModel(
            new,
            name=self.name,
            history=(*self.history, what),
            protected=self._protected,
            external_data=self._external_data,
        )
        if output is not None:
            patched.save(output)
        return patched

    def _recalibrated_stats(
        self,
        targets: Sequence[NormNode],
        data: Any,
        batch_size: int | None,
        max_batches: int | None,
        progress: Progress | None,
        providers: Sequence[str] | None,
    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
        a = self.analysis()
        base = copy_model(a.run_model)
        fed = feed_running_stats(base, [rec.output for rec in targets], Names(base))
        depth = _depths(base, {rec.output for rec in targets})
        current = {
            rec.output: (np.asarray(rec.state["mean"]), np.asarray(rec.state["var"]))
            for rec in targets
        }
        dtypes = {rec.output: np.asarray(rec.state["mean"]).dtype for rec in targets}
        engine = Engine(
            base,
            {},
            {rec.output: rec.inputs["x"] for rec in targets},
            a.shapes,
            providers=providers,
            label=self.name,
            extra_inputs=[name for pair in fed.values() for name in pair],
        )
        if isinstance(data, Iterator):  # read once, measured once per depth
            data = list(data)
        levels = sorted(set(depth.values()))
        samples = 0
        for done, level in enumerate(levels, 1):
            layer_outputs = [rec.output for rec in targets if depth[rec.output] == level]
            moments: dict[str, Moments] = {}
            plan = plan_batches(
                data,
                batch_size=batch_size,
                shuffle=False,
                seed=0,
                group_by=None,
                max_batches=max_batches,
            )
            samples = 0
            for batch in plan.batches:
                feeds = engine.feeds(batch.inputs)
                extra = {}
                for out, (mean_in, var_in) in fed.items():
                    mean, var = current[out]
                    extra[mean_in] = np.asarray(mean, dtype=dtypes[out])
                    extra[var_in] = np.asarray(var, dtype=dtypes[out])
                try:
                    _outs, taps = engine.run("eval", feeds, batch.size, extra)
                except NormDoctorError:
                    raise
                except Exception as exc:
                    raise ScanError(
                        f"onnxruntime failed while recalibrating: {first_line(exc)}"
                    ) from exc
                samples += batch.size
                for out in layer_outputs:
                    m = channel_moments(torch.from_numpy(np.asarray(taps[out])))
                    moments[out] = moments[out].merge(m) if out in moments else m
            if not moments:
                raise DataError("the data yielded no batches")
            for out in layer_outputs:
                m = moments[out]
                if m.count < 2:
                    raise DataError(
                        "recalibration needs at least 2 values per channel (got "
                        f"{int(m.count)}): give more samples"
                    )
                current[out] = (m.mean.numpy(), m.unbiased_var.numpy())
            if progress is not None:
                progress(done, len(levels))
        return {rec.output: current[rec.output] for rec in targets}, samples

    def with_running_stats(self, stats: Mapping[str, tuple[Any, Any]]) -> OnnxModel:
        """A copy whose named BatchNormalization nodes hold the given running statistics.

        ``stats`` maps node names (as :meth:`find_norm_layers` gives them) to ``(mean, var)``
        (``var`` unbiased, as stored).  The values are written into the initializers, in their
        dtype.
        """
        recs = {rec.name: rec for rec in self.analysis().nodes if rec.is_batchnorm}
        unknown = sorted(set(stats) - {n for n, r in recs.items() if r.where is None})
        if unknown:
            raise ConversionError(f"no BatchNormalization node of the main graph named {unknown}")
        new = copy_model(self.proto)
        values = {
            recs[n].output: (
                np.asarray(torch.as_tensor(m).detach().cpu().double().numpy()),
                np.asarray(torch.as_tensor(v).detach().cpu().double().numpy()),
            )
            for n, (m, v) in stats.items()
        }
        set_running_stats(new, values, Names(new))
        onnx.checker.check_model(new)
        return OnnxModel(
            new,
            name=self.name,
            history=(*self.history, f"running statistics set for {len(stats)} node(s)"),
            protected=self._protected,
            external_data=self._external_data,
        )

    def bind_inputs(self, values: Mapping[str, Any]) -> OnnxModel:
        """A copy in which the named graph inputs become constants (initializers).

        For graphs that take their parameters as inputs (``BatchNormalization(x, s, bias,
        mean, var)`` with all five fed), so that a scan can read the running statistics.
        """
        new = copy_model(self.proto)
        g = new.graph
        fed = {i.name: i for i in data_inputs(g)}
        unknown = sorted(set(values) - set(fed))
        if unknown:
            raise ConversionError(
                f"{self.name}: no graph input named {unknown} to bind (inputs: {sorted(fed)})"
            )
        for key, value in values.items():
            arr = np.asarray(
                value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
            )
            elem = fed[key].type.tensor_type.elem_type
            if elem:
                arr = arr.astype(onnx.helper.tensor_dtype_to_np_dtype(elem), copy=False)
            g.initializer.append(numpy_helper.from_array(arr, key))
        if new.ir_version >= 4:  # IR 3 keeps initializers listed as inputs
            kept = [i for i in g.input if i.name not in values]
            del g.input[:]
            g.input.extend(kept)
        return OnnxModel(
            new,
            name=self.name,
            history=(*self.history, f"inputs bound as constants: {', '.join(values)}"),
            protected=self._protected,
            external_data=self._external_data,
        )

    # -- saving ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model as a new ONNX file: checked, atomically, never over its input.

        ``onnx.checker.check_model`` must pass.  The file (and, for models with external data
        or above ~1.8 GB, its ``<name>.data`` file beside it) is written under a temporary
        name in the target folder and moved into place with ``os.replace``, by the rules of
        :class:`normdoctor.outputs.Outputs` (a symlink is written through, a device directly).

        Raises:
            ConversionError: the target is the file this model was loaded from (or one of its
                external-data files), or the graph fails the checker.
            OutputError: the file cannot be written (``cannot write X: reason``).
        """
        target = Path(path)
        resolved = target.resolve()
        if str(resolved) in self._protected:
            raise ConversionError(f"refusing to write over the input model file {target}")
        try:
            onnx.checker.check_model(self.proto)
        except Exception as exc:
            raise ConversionError(f"{self.name}: fails onnx.checker ({first_line(exc)})") from exc
        external = self._external_data or self.proto.ByteSize() > _LARGE
        location = resolved.parent / f"{resolved.name}.data"
        if external and str(location) in self._protected:
            raise ConversionError(
                f"refusing to write over the input model's external data {location}"
            )
        with Outputs(("input model", f) for f in self._protected) as plan:
            plan.file(target)
            plan.check()
            if external:
                plan.write_with(target, self._save_external)
            else:
                plan.write_bytes(target, self.proto.SerializeToString())
            plan.commit()
        return target

    def _save_external(self, path: Path) -> None:
        """The graph at ``path``, every large tensor in ``<name>.data`` beside it."""
        out = copy_model(self.proto)  # saving as external data empties the tensors
        onnx.save_model(
            out,
            os.fspath(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=f"{path.name}.data",
            size_threshold=1024,
        )

    def __repr__(self) -> str:
        n = len(self._analysis_cache.nodes) if self._analysis_cache else "?"
        return f"OnnxModel({self.name!r}, opset={self.opset}, norm_nodes={n})"


# -- helpers ----------------------------------------------------------------------------------


def _depths(model: ModelProto, targets: set[str]) -> dict[str, int]:
    """Per target BatchNormalization (by first output): 1 + the largest depth upstream."""
    level: dict[str, int] = {}
    depth: dict[str, int] = {}
    for node in model.graph.node:
        reads = [i for i in node.input if i]
        if subgraphs(node):
            reads += sorted(subgraph_reads(node))
        lv = max((level.get(v, -1) for v in reads), default=-1)
        out0 = node.output[0] if node.output else None
        if out0 in targets:
            d = level.get(node.input[0], -1) + 1
            depth[out0] = d
            lv = max(lv, d)
        for o in node.output:
            level[o] = lv
    return depth


def _stamp(model: ModelProto, record: dict[str, Any]) -> None:
    """Append the rewrite to the model's metadata (key ``normdoctor.patches``, a JSON list)."""
    history: list[Any] = []
    keep = []
    for prop in model.metadata_props:
        if prop.key == _METADATA_KEY:
            try:
                history = list(json.loads(prop.value))
            except ValueError:
                history = []
        else:
            keep.append((prop.key, prop.value))
    history.append({**record, "normdoctor_version": __version__})
    del model.metadata_props[:]
    for k, v in keep:
        model.metadata_props.add(key=k, value=v)
    model.metadata_props.add(key=_METADATA_KEY, value=json.dumps(history))


def _patched_with(model: ModelProto, to: str) -> bool:
    for prop in model.metadata_props:
        if prop.key == _METADATA_KEY:
            try:
                return any(r.get("to") == to for r in json.loads(prop.value))
            except (ValueError, AttributeError):
                return False
    return False


def _all_tensors(model: ModelProto) -> Iterator[TensorProto]:
    def graph_tensors(g: onnx.GraphProto) -> Iterator[TensorProto]:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
            for _name, body in subgraphs(node):
                yield from graph_tensors(body)

    yield from graph_tensors(model.graph)


def _external_files(model: ModelProto, base: Path, label: str) -> set[Path]:
    """The external-data files of ``model``; LoadError for one outside ``base``."""
    files: set[Path] = set()
    for tensor in _all_tensors(model):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        inside = (
            location
            and not os.path.isabs(location)
            and not Path(location).drive
            and os.path.commonpath([str(target), str(base)]) == str(base)
        )
        if not inside:
            raise LoadError(
                f"{label}: external data {location!r} of tensor {tensor.name!r} points outside "
                f"the model's folder {base}: refused"
            )
        if not target.is_file():
            raise LoadError(f"{label}: external data file {location!r} is missing")
        files.add(target)
    return files

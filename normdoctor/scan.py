"""``scan()``: run batches through both paths, record, score, judge."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

from . import __version__
from . import distributed as _dist
from .batching import Batch, GroupBy, _first_tensor, plan_batches
from .errors import DataError, ScanError
from .layers import NormFamily, NormLayer, find_norm_layers
from .metrics import (
    DEFAULT_NONIID_THRESHOLD,
    DEFAULT_THRESHOLD,
    Recommendation,
    layer_score,
    mismatch_sq,
    recommend,
)
from .probe import PATHS, LayerMeasurement, NormState, Probe, module_state
from .report import (
    Composition,
    EndToEnd,
    LayerReport,
    LayerStatus,
    PathReport,
    ScanReport,
    finite_or_none,
    floats,
)

__all__ = [
    "DEFAULT_AGREEMENT_THRESHOLD",
    "DEFAULT_DIVERGENCE_THRESHOLD",
    "EndToEndMeter",
    "assemble_report",
    "scan",
    "sweep_batch_sizes",
]

#: Below this fraction of equal predictions between the two paths, eval mode harms a classifier.
DEFAULT_AGREEMENT_THRESHOLD = 0.95
#: Above this relative RMS output difference, eval mode harms a model that is not a classifier.
DEFAULT_DIVERGENCE_THRESHOLD = 0.3

Forward = Callable[[nn.Module, Any], Any]
Progress = Callable[[int, int | None], None]


def _default_forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype | None]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in model.buffers():
        return t.device, None
    return torch.device("cpu"), None


def _output_tensor(out: Any) -> torch.Tensor | None:
    """The first tensor of a model's output (``.logits`` of output objects)."""
    for name in ("logits", "last_hidden_state"):
        if not isinstance(out, (torch.Tensor, dict, list, tuple)) and hasattr(out, name):
            return getattr(out, name)
    return _first_tensor(out)


class EndToEndMeter:
    """Device-side sums comparing the outputs of both paths (one small tensor, one add a batch)."""

    KEYS = ("nonfinite", "diff", "norm", "agree", "correct_t", "correct_e")

    def __init__(self) -> None:
        self._acc: torch.Tensor | None = None
        self._present = len(self.KEYS)  # how many of KEYS every update so far gave (a prefix)
        self.batches = 0
        self.samples = 0
        self.classifier = True
        self.labelled = True

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        if self._acc is None:
            return {}
        return dict(zip(self.KEYS[: self._present], self._acc[: self._present], strict=True))

    def update(self, out_t: Any, out_e: Any, labels: torch.Tensor | None, size: int) -> None:
        t, e = _output_tensor(out_t), _output_tensor(out_e)
        if t is None or e is None or t.shape != e.shape:
            self.classifier = self.labelled = False
            return
        self.batches += 1
        self.samples += size
        t64, e64 = t.detach().double(), e.detach().double()
        finite = torch.isfinite(t64) & torch.isfinite(e64)
        parts = [
            (~finite).sum(),
            torch.where(finite, t64 - e64, 0.0).square().sum(),
            torch.where(finite, t64, 0.0).square().sum(),
        ]
        if t.dim() == 2 and t.shape[1] > 1 and t.shape[0] == size:
            pt, pe = t.argmax(1), e.argmax(1)
            parts.append((pt == pe).sum())
            if (
                labels is not None
                and labels.dim() == 1
                and labels.shape[0] == size
                and not labels.is_floating_point()
            ):
                labels = labels.to(pt.device)
                parts += [(pt == labels).sum(), (pe == labels).sum()]
            else:
                self.labelled = False
        else:
            self.classifier = self.labelled = False
        values = torch.stack(parts).to(torch.float64)  # the keys are always a prefix of KEYS
        if self._acc is None:
            self._acc = torch.zeros(len(self.KEYS), dtype=torch.float64, device=values.device)
        self._present = min(self._present, len(parts))
        self._acc[: len(parts)] += values

    def all_reduce(self) -> None:
        """Sum the comparison over ranks (torch.distributed)."""
        keys = (
            "diff",
            "norm",
            "agree",
            "correct_t",
            "correct_e",
            "nonfinite",
            "batches",
            "samples",
            "classifier",
            "labelled",
        )
        mine = dict(self.sums)
        mine.update(
            batches=torch.tensor(float(self.batches)),
            samples=torch.tensor(float(self.samples)),
            classifier=torch.tensor(float(not self.classifier)),
            labelled=torch.tensor(float(not self.labelled)),
        )
        merged = _dist.all_reduce_sums(mine, keys)
        self.batches = int(merged.pop("batches"))
        self.samples = int(merged.pop("samples"))
        self.classifier = float(merged.pop("classifier", 0)) == 0  # no rank said "not a classifier"
        self.labelled = float(merged.pop("labelled", 0)) == 0
        present = [k for k in self.KEYS if k in merged]
        self._present = len(present)
        self._acc = (
            torch.stack([merged[k].to(torch.float64).reshape(()) for k in present])
            if present
            else None
        )

    def result(self) -> EndToEnd | None:
        if self.batches == 0:
            return None
        s = {k: float(v) for k, v in self.sums.items()}
        rel = (
            math.sqrt(s["diff"] / s["norm"])
            if s["norm"] > 0
            else (0.0 if s["diff"] == 0 else math.inf)
        )
        n = self.samples
        return EndToEnd(
            batches=self.batches,
            samples=n,
            rel_divergence=finite_or_none(rel),
            agreement=s["agree"] / n if self.classifier and "agree" in s else None,
            acc_train=s["correct_t"] / n if self.labelled and "correct_t" in s else None,
            acc_eval=s["correct_e"] / n if self.labelled and "correct_e" in s else None,
            nonfinite_outputs=int(s.get("nonfinite", 0)),
        )


def _floats(a: np.ndarray | torch.Tensor) -> tuple[float | None, ...]:
    """A float64 vector as a tuple of floats, non-finite values as None (fast when all finite)."""
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    values = a.tolist()
    return tuple(values) if np.isfinite(a).all() else floats(values)


def _path_report(m: LayerMeasurement, eps: float) -> PathReport:
    # NumPy on CPU views: a few dozen operations on vectors of C floats per layer.  Degenerate
    # running statistics (var < -eps, NaN) give NaN here, reported as null, not as warnings.
    with np.errstate(invalid="ignore", divide="ignore"):
        return _path_report_unchecked(m, eps)


def _path_report_unchecked(m: LayerMeasurement, eps: float) -> PathReport:
    w = m.weights.numpy()
    rm, rv = m.running_mean.numpy(), m.running_var.numpy()
    pm, pv = m.pooled.mean.numpy(), m.pooled.var.numpy()
    channel_m2, scores = m.channel_m2.numpy(), m.unit_scores.numpy()
    drift = finite_or_none(float(layer_score(channel_m2, w)))
    finite = np.isfinite(scores)
    if finite.any():
        worst_idx = int(np.where(finite, scores, -math.inf).argmax())
        worst = float(scores[worst_idx])
    else:
        worst_idx, worst = None, None
    s_r = np.sqrt(rv + eps)
    shift = finite_or_none(float(layer_score(mismatch_sq(pm, pv, rm, rv, eps), w)))
    noise = finite_or_none(float(layer_score(m.noise_m2.numpy(), w)))
    noniid = None
    if m.noniid is not None:
        ratio = m.noniid.numpy()
        ok = np.isfinite(ratio) & (w > 0)
        if ok.any():
            values = np.sort(ratio[ok])
            noniid = finite_or_none(float(values[(values.size - 1) // 2]))  # the lower median
    mean_shift = (pm - rm) / s_r
    var_log_ratio = 0.5 * np.log((pv + eps) / (rv + eps))
    return PathReport(
        batches=m.units,
        samples=m.samples,
        nonfinite_batches=m.nonfinite_units,
        drift=drift,
        drift_worst=finite_or_none(worst),
        worst_batch=worst_idx,
        shift=shift,
        noise=noise,
        noniid=noniid,
        pooled_mean=_floats(pm),
        pooled_var=_floats(pv),
        channel_drift=_floats(np.sqrt(channel_m2)),
        mean_shift=_floats(mean_shift),
        var_log_ratio=_floats(var_log_ratio),
        batch_drift=_floats(scores),
    )


def _static_channels(state: NormState) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(dead channels with gamma ~ 0, degenerate channels with unusable running stats)."""
    dead: tuple[int, ...] = ()
    weight = state.weight
    if isinstance(weight, torch.Tensor) and weight.numel():
        g = np.abs(_numpy64(weight))
        gmax = float(g.max()) if np.isfinite(g).all() else float(np.nanmax(g, initial=0.0))
        dead = tuple(np.flatnonzero(g <= 1e-6 * gmax if gmax > 0 else g >= 0).tolist())
    degenerate: tuple[int, ...] = ()
    rm, rv = state.running_mean, state.running_var
    if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
        m, v = _numpy64(rm), _numpy64(rv)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(m) | ~np.isfinite(v) | (v <= 0)
        degenerate = tuple(np.flatnonzero(bad).tolist())
    return dead, degenerate


def _numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _layer_report(
    layer: NormLayer,
    state: NormState,
    measured: dict[str, LayerMeasurement | None],
    order: int | None,
    threshold: float,
    noniid_threshold: float,
    harmful: bool | None,
    agreement_note: str,
) -> LayerReport:
    base: dict[str, Any] = dict(
        name=layer.name,
        kind=layer.kind,
        family=str(layer.family),
        num_features=layer.num_features,
        eps=layer.eps,
        momentum=layer.momentum,
        affine=layer.affine,
        track_running_stats=layer.track_running_stats,
        batch_dependent=layer.batch_dependent,
        order=order,
    )
    if state.running_mean is not None and state.running_var is not None:
        base["running_mean"] = _floats(_numpy64(state.running_mean))
        base["running_var"] = _floats(_numpy64(state.running_var))
    dead, degenerate = _static_channels(state)
    base["dead_channels"], base["degenerate_channels"] = dead, degenerate
    if not layer.batch_dependent:
        return LayerReport(
            **base,
            executed=order is not None,
            status=LayerStatus.NOT_MEASURED,
            flagged=False,
            recommendation=Recommendation.OK,
            reason=(
                "uses batch statistics in train and eval mode: nothing to drift"
                if layer.family is NormFamily.BATCH_STATS_ONLY
                else "batch-independent: same statistics in train and eval mode"
            ),
        )
    paths = {p: _path_report(m, layer.eps) for p, m in measured.items() if m is not None}
    if not paths:
        why = (
            "lazy layer never materialized"
            if not layer.materialized
            else "no batch reached this layer"
        )
        return LayerReport(
            **base,
            executed=False,
            status=LayerStatus.NOT_EXECUTED,
            flagged=False,
            recommendation=Recommendation.OK,
            reason=why,
        )
    head_path = "train" if "train" in paths else "eval"
    head, m = paths[head_path], measured[head_path]
    assert m is not None
    drift = head.drift if head.drift is not None else math.nan
    # On the eval path a sample's layer input does not depend on its batch mates, so the spread
    # of batch means tests batch composition alone; on the train path upstream BatchNorm layers
    # pull every batch mean together and the ratio reads low.
    noniid = paths["eval"].noniid if "eval" in paths else head.noniid
    rec, reason = recommend(
        drift=drift,
        shift=head.shift if head.shift is not None else math.nan,
        noise=head.noise if head.noise is not None else math.nan,
        noniid=noniid,
        per_sample=m.per_sample,
        spatial=m.spatial,
        degenerate=len(degenerate),
        threshold=threshold,
        noniid_threshold=noniid_threshold,
    )
    drifting = rec is not Recommendation.OK
    if not drifting:
        status, flagged = LayerStatus.OK, False
    elif harmful is False and not degenerate:
        status, flagged = LayerStatus.HARMLESS, False
        reason = (
            f"drift {drift:.3g} but harmless on this data ({agreement_note}); if it mattered: {rec}"
        )
        rec = Recommendation.OK
    else:
        status, flagged = LayerStatus.FLAGGED, True
    return LayerReport(
        **base,
        executed=True,
        status=status,
        flagged=flagged,
        recommendation=rec,
        reason=reason,
        train=paths.get("train"),
        eval=paths.get("eval"),
    )


def _validate(paths: Sequence[str], threshold: float) -> tuple[str, ...]:
    if isinstance(paths, str):
        paths = tuple(p.strip() for p in paths.split(","))
    paths = tuple(dict.fromkeys(paths))
    if not paths or any(p not in PATHS for p in paths):
        raise ValueError(f"paths must be a non-empty subset of {PATHS}, got {paths!r}")
    if not (threshold > 0):
        raise ValueError(f"threshold must be positive, got {threshold!r}")
    return paths


def scan(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int | None = 32,
    shuffle: bool = True,
    seed: int = 0,
    group_by: GroupBy = None,
    max_batches: int | None = None,
    paths: Sequence[str] = PATHS,
    device: torch.device | str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    noniid_threshold: float = DEFAULT_NONIID_THRESHOLD,
    agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
    divergence_threshold: float = DEFAULT_DIVERGENCE_THRESHOLD,
    forward: Forward | None = None,
    progress: Progress | None = None,
    model_name: str | None = None,
    distributed: bool = False,
) -> ScanReport:
    """Measure how far each norm layer's eval-mode behaviour drifts from its train-mode behaviour.

    Args:
        model: the model; left exactly as it was (parameters, buffers, ``training`` flags, hooks).
        data: a tensor or array (split into batches of ``batch_size``), an ``(inputs, labels)``
            tuple of tensors, a dict with ``inputs``/``labels``, a map-style ``Dataset``, or an
            iterable of batches (tensors, ``(inputs, labels)`` tuples or dicts; a ``DataLoader``).
        batch_size, shuffle, seed, group_by: how batches are formed from sample-level data.  The
            train/eval gap only shows with batches built the way training's were (DESIGN.md):
            ``batch_size=1`` for per-sample training, ``shuffle=False`` to keep the data's order,
            ``group_by="label"`` (or per-sample keys, or a function of the index) for one-group
            batches.
        max_batches: stop after this many batches.
        paths: ``("train", "eval")`` by default; per-layer scores come from the train path, the
            end-to-end divergence needs both.
        device: run on this device (the model is moved there and back); default: the model's.
        threshold: per-layer drift above which a layer drifts.
        agreement_threshold, divergence_threshold: end-to-end levels below/above which drift is
            judged harmful (classifiers: prediction agreement; other models: relative RMS).
        forward: ``forward(model, inputs) -> output`` for models with several inputs.
        progress: called as ``progress(batches_done, total_or_None)`` after each batch.
        model_name: how the report names the model.
        distributed: with an initialised ``torch.distributed`` process group of several ranks,
            scan this rank's shard (batches formed by normdoctor are dealt round-robin; batches
            given as an iterable are taken as this rank's shard, e.g. from a
            ``DistributedSampler``) and merge the statistics exactly; every rank returns the
            merged report.

    Returns:
        A :class:`ScanReport` with layers in execution order.

    Raises:
        DataError: the data cannot be read or batched.
        ScanError: the model's forward raised; the model is restored before this propagates.
    """
    paths = _validate(paths, threshold)
    plan = plan_batches(
        data,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by=group_by,
        max_batches=max_batches,
    )
    layers = find_norm_layers(model)
    modules = dict(model.named_modules())
    name = model_name or type(model).__name__
    notes: list[str] = []
    fwd = forward or _default_forward
    home_device, dtype = _model_device_dtype(model)
    target = torch.device(device) if device is not None else home_device
    if not layers:
        notes.append("no normalization layers found in the model: nothing can drift")
        warnings.warn(f"{name}: no normalization layers found; nothing to scan", stacklevel=2)
    unmaterialized = [layer.name for layer in layers if not layer.materialized]
    if unmaterialized:
        notes.append(
            f"lazy layers never materialized (run one forward first): {', '.join(unmaterialized)}"
        )
    sizes: list[int] = []
    e2e = EndToEndMeter()
    sharded = bool(distributed) and _dist.is_distributed()
    batches = plan.batches
    total = plan.total
    if sharded and plan.source != "batches":  # deal normdoctor's own batches round-robin
        rank, world = _dist.dist.get_rank(), _dist.dist.get_world_size()
        batches = (b for i, b in enumerate(plan.batches) if i % world == rank)
        total = None if total is None else len(range(rank, total, world))
    moved = target != home_device
    if moved:
        model.to(target)
    try:
        with Probe(model, layers, paths) as probe, torch.no_grad():
            error: BaseException | None = None
            try:
                if layers:
                    _run_batches(
                        model,
                        batches,
                        total,
                        paths,
                        probe,
                        fwd,
                        target,
                        dtype,
                        sizes,
                        e2e,
                        progress,
                    )
            except Exception as exc:
                if not sharded:
                    raise
                error = exc
            if sharded:
                _dist.raise_if_any_failed(error)
                _dist.merge_recorders([r for p in paths for r in probe._recorders[p].values()])
                e2e.all_reduce()
                sizes = _dist.gather_in_batch_order(sizes)
            results = {p: probe.results(p) for p in paths}
            order = probe.order
    finally:
        if moved:
            model.to(home_device)
    if layers and not sizes:
        raise DataError("the data yielded no batches")
    composition = plan.composition(sizes)
    return assemble_report(
        model_name=name,
        layers=layers,
        states={layer.name: module_state(modules[layer.name]) for layer in layers},
        results=results,
        order=order,
        end_to_end=e2e.result(),
        composition=composition,
        paths=paths,
        threshold=threshold,
        noniid_threshold=noniid_threshold,
        agreement_threshold=agreement_threshold,
        divergence_threshold=divergence_threshold,
        notes=notes,
    )


def _run_batches(
    model, batches, total, paths, probe, fwd, target, dtype, sizes, e2e, progress
) -> None:
    """The scan loop: every batch through every path, hooks recording; fills sizes and e2e."""
    for i, batch in enumerate(batches):
        batch = _to_device(batch, target, dtype)
        sizes.append(batch.size)
        outs = {}
        for path in paths:
            try:
                with probe.path(path):
                    outs[path] = fwd(model, batch.inputs)
            except Exception as exc:  # the model's own error, with where it happened
                where = f" after norm layer {probe.last_layer!r}" if probe.last_layer else ""
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise ScanError(
                    f"forward failed on batch {i} ({path} path){where}: {type(exc).__name__}: {first}"
                ) from exc
        if len(outs) == 2:
            e2e.update(outs["train"], outs["eval"], batch.labels, batch.size)
        if progress is not None:
            progress(i + 1, total)


def assemble_report(
    *,
    model_name: str,
    layers: Sequence[NormLayer],
    states: dict[str, NormState],
    results: dict[str, dict[str, LayerMeasurement | None]],
    order: Sequence[str],
    end_to_end: EndToEnd | None,
    composition: Composition,
    paths: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
    noniid_threshold: float = DEFAULT_NONIID_THRESHOLD,
    agreement_threshold: float = DEFAULT_AGREEMENT_THRESHOLD,
    divergence_threshold: float = DEFAULT_DIVERGENCE_THRESHOLD,
    notes: Sequence[str] = (),
) -> ScanReport:
    """Measurements to a judged :class:`ScanReport`; shared by every backend (torch, ONNX).

    Args:
        layers: every norm layer found (batch-independent ones included).
        states: per layer name, its running statistics and gamma.
        results: per path, per layer name, what a :class:`~normdoctor.probe.Recorder` measured.
        order: layer names in execution order.
    """
    notes = list(notes)
    harmful, agreement_note = _judge(end_to_end, agreement_threshold, divergence_threshold)
    position = {n: i for i, n in enumerate(order)}
    reports = [
        _layer_report(
            layer,
            states[layer.name],
            {p: results.get(p, {}).get(layer.name) for p in paths},
            position.get(layer.name),
            threshold,
            noniid_threshold,
            harmful,
            agreement_note,
        )
        for layer in layers
    ]
    reports.sort(key=lambda r: (r.order is None, r.order if r.order is not None else 0))
    for r in reports:
        if r.train is not None and r.train.nonfinite_batches:
            notes.append(
                f"{r.name}: {r.train.nonfinite_batches} batch(es) with NaN/Inf inputs were skipped"
            )
        if r.degenerate_channels:
            notes.append(
                f"{r.name}: {len(r.degenerate_channels)} channel(s) with running_var <= 0, NaN or Inf"
            )
    if end_to_end is not None and end_to_end.nonfinite_outputs:
        notes.append(
            f"{end_to_end.nonfinite_outputs} NaN/Inf output values were left out of the comparison"
        )
    if harmful and not any(r.flagged for r in reports):
        notes.append(
            "outputs diverge although no single layer exceeds the threshold: the drift compounds"
        )
    return ScanReport(
        normdoctor_version=__version__,
        model=model_name,
        composition=composition,
        paths=tuple(paths),
        threshold=threshold,
        agreement_threshold=agreement_threshold,
        divergence_threshold=divergence_threshold,
        layers=tuple(reports),
        end_to_end=end_to_end,
        harmful=harmful,
        notes=tuple(notes),
    )


def _judge(
    e: EndToEnd | None, agreement_threshold: float, divergence_threshold: float
) -> tuple[bool | None, str]:
    """Does eval mode change the model's outputs enough to matter?"""
    if e is None:
        return None, "end-to-end not measured"
    if e.agreement is not None:
        return e.agreement < agreement_threshold, f"prediction agreement {e.agreement:.1%}"
    if e.rel_divergence is None:
        return True, "outputs not finite"
    return e.rel_divergence > divergence_threshold, f"output divergence {e.rel_divergence:.3g}"


def _to_device(batch: Batch, device: torch.device, dtype: torch.dtype | None) -> Batch:
    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point() and dtype is not None and t.dtype != dtype:
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    labels = batch.labels.to(device) if batch.labels is not None else None
    return Batch(tree_map(move, batch.inputs), labels, batch.size)


def sweep_batch_sizes(
    model: nn.Module, data: Any, batch_sizes: Sequence[int], **kwargs: Any
) -> tuple[ScanReport, ...]:
    """One :func:`scan` per batch size: how drift grows as batches shrink."""
    if not batch_sizes:
        raise ValueError("batch_sizes is empty")
    return tuple(scan(model, data, batch_size=int(b), **kwargs) for b in batch_sizes)

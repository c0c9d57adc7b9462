"""``scan()``: run batches through both paths, record, score, judge."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data._utils.collate import default_collate

from . import distributed as _dist
from ._globals import preserved_globals
from ._version import __version__
from .batching import Batch, GroupBy, plan_batches, sample_level, split_batch
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
from .recording import PATHS, LayerMeasurement, NormState, module_state
from .report import (
    Candidate,
    Composition,
    EndToEnd,
    Evidence,
    LayerReport,
    LayerStatus,
    PathReport,
    ScanReport,
    Verdict,
    finite_or_none,
    floats,
)
from .search import (
    Outcomes,
    Spec,
    Trial,
    candidate_specs,
    overall_fit,
    sample_plan,
)
from .search import agreement as search_agreement
from .search import divergence as search_divergence
from .sources.torch import Probe, default_forward, model_device_dtype, output_tensor, to_device
from .verdict import ALPHA, Paired, choose_reference, judge, mcnemar_p, paired_z_p

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


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_outcomes(
    out: torch.Tensor, labels: torch.Tensor | None, size: int, loss: LossFn | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Per-sample (prediction, correct, loss) of one path's output; None where not defined.

    Predictions exist for classifier outputs (N, K > 1); ``correct`` for integer labels (N,);
    ``loss`` for targets of the output's shape (mean squared error per sample) or, with
    ``loss``, whatever per-sample loss it returns (averaged over non-batch dimensions).
    """
    pred = out.argmax(1) if out.dim() == 2 and out.shape[1] > 1 and out.shape[0] == size else None
    if labels is None or labels.dim() == 0 or labels.shape[0] != size:
        return pred, None, None
    labels = labels.to(out.device)
    if loss is not None:
        value = loss(out, labels)
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != size:
            raise DataError(
                "loss must return one loss per sample (shape (N,) or (N, ...), "
                "as with reduction='none')"
            )
        return pred, None, value.detach().double().reshape(size, -1).mean(1)
    if pred is not None and labels.dim() == 1 and not labels.is_floating_point():
        return pred, pred == labels, None
    if labels.is_floating_point() and labels.numel() == out.numel():
        diff = out.detach().double() - labels.double().reshape(out.shape)
        return pred, None, diff.square().reshape(size, -1).mean(1)
    return pred, None, None


class EndToEndMeter:
    """Device-side sums comparing the outputs of both paths (one small tensor, one add a batch).

    The keys a batch gives depend on what it allows (classifier output, labels, targets); the
    accumulator keeps those every batch so far gave.
    """

    def __init__(self, loss: LossFn | None = None) -> None:
        self._acc: torch.Tensor | None = None
        self._keys: tuple[str, ...] = ()
        self.loss = loss
        self.batches = 0
        self.samples = 0

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        if self._acc is None:
            return {}
        return dict(zip(self._keys, self._acc, strict=True))

    def update(self, out_t: Any, out_e: Any, labels: torch.Tensor | None, size: int) -> None:
        t, e = output_tensor(out_t), output_tensor(out_e)
        if t is None or e is None or t.shape != e.shape:
            return
        self.batches += 1
        self.samples += size
        t64, e64 = t.detach().double(), e.detach().double()
        finite = torch.isfinite(t64) & torch.isfinite(e64)
        parts = {
            "nonfinite": (~finite).sum(),
            "diff": torch.where(finite, t64 - e64, 0.0).square().sum(),
            "norm": torch.where(finite, t64, 0.0).square().sum(),
        }
        pred_t, correct_t, loss_t = sample_outcomes(t, labels, size, self.loss)
        pred_e, correct_e, loss_e = sample_outcomes(e, labels, size, self.loss)
        if pred_t is not None and pred_e is not None:
            parts["agree"] = (pred_t == pred_e).sum()
        if correct_t is not None and correct_e is not None:
            parts.update(
                correct_t=correct_t.sum(),
                correct_e=correct_e.sum(),
                t_only=(correct_t & ~correct_e).sum(),
                e_only=(correct_e & ~correct_t).sum(),
            )
        if loss_t is not None and loss_e is not None:
            ok = torch.isfinite(loss_t) & torch.isfinite(loss_e)
            d = torch.where(ok, loss_e - loss_t, 0.0)
            parts.update(
                loss_n=ok.sum(),
                loss_t=torch.where(ok, loss_t, 0.0).sum(),
                loss_e=torch.where(ok, loss_e, 0.0).sum(),
                loss_d2=d.square().sum(),
            )
        keys = tuple(parts)
        values = torch.stack([v.to(torch.float64) for v in parts.values()])
        if self._acc is None:
            self._keys, self._acc = keys, values
        elif keys == self._keys:
            self._acc += values
        else:  # a batch that allows fewer comparisons: keep the ones every batch gave
            common = tuple(k for k in self._keys if k in parts)
            old = self.sums
            self._keys = common
            self._acc = torch.stack([old[k] + parts[k].to(torch.float64) for k in common])

    def all_reduce(self) -> None:
        """Sum the comparison over ranks (torch.distributed); ranks keep the keys all gave."""
        mine = dict(self.sums)
        mine.update(
            batches=torch.tensor(float(self.batches)), samples=torch.tensor(float(self.samples))
        )
        order = [
            "nonfinite",
            "diff",
            "norm",
            "agree",
            "correct_t",
            "correct_e",
            "t_only",
            "e_only",
            "loss_n",
            "loss_t",
            "loss_e",
            "loss_d2",
            "batches",
            "samples",
        ]
        merged = _dist.all_reduce_sums(mine, tuple(order))
        self.batches = int(merged.pop("batches"))
        self.samples = int(merged.pop("samples"))
        present = [k for k in order if k in merged]
        self._keys = tuple(present)
        self._acc = (
            torch.stack([merged[k].to(torch.float64).reshape(()) for k in present])
            if present
            else None
        )

    def result(self) -> EndToEnd | None:
        if self.batches == 0 or self._acc is None:
            return None
        s = {k: float(v) for k, v in self.sums.items()}
        n = self.samples
        kwargs: dict[str, Any] = {}
        if "correct_t" in s:
            kwargs.update(
                metric="accuracy",
                acc_train=s["correct_t"] / n,
                acc_eval=s["correct_e"] / n,
                p_value=mcnemar_p(s["t_only"], s["e_only"]),
            )
        elif "loss_t" in s and s["loss_n"] > 0:
            m = int(s["loss_n"])
            kwargs.update(
                metric="mse" if self.loss is None else "loss",
                loss_train=s["loss_t"] / m,
                loss_eval=s["loss_e"] / m,
                p_value=paired_z_p(m, s["loss_e"] - s["loss_t"], s["loss_d2"]),
            )
        return EndToEnd(
            batches=self.batches,
            samples=n,
            rel_divergence=finite_or_none(_relative(s["diff"], s["norm"])),
            agreement=s["agree"] / n if "agree" in s else None,
            acc_train=kwargs.pop("acc_train", None),
            acc_eval=kwargs.pop("acc_eval", None),
            nonfinite_outputs=int(s.get("nonfinite", 0)),
            **kwargs,
        )


def _relative(diff: float, norm: float) -> float:
    """sqrt(diff / norm): the relative RMS difference of two outputs."""
    if norm > 0:
        return math.sqrt(diff / norm)
    return 0.0 if diff == 0 else math.inf


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
    fit = finite_or_none(float(layer_score(m.fit_m2.numpy(), w)))
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
        fit=fit,
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
            reason=_unmeasured_reason(layer.family),
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
    if layer.family is NormFamily.FROZEN and rec not in (
        Recommendation.OK,
        Recommendation.RECALIBRATE,
    ):
        # A frozen layer normalized with its running statistics in training too: batch noise
        # never reached it, only a population shift can be wrong, and recalibration fixes that.
        s = head.shift if head.shift is not None else math.nan
        rec, reason = (
            (Recommendation.RECALIBRATE, f"frozen: population shift {s:.3g} over {threshold:g}")
            if s > threshold
            else (
                Recommendation.OK,
                f"frozen (running statistics in training too): batch noise does not apply; "
                f"shift {s:.3g}",
            )
        )
    drifting = rec is not Recommendation.OK
    if not drifting:
        status, flagged = LayerStatus.OK, False
    elif harmful is False and not degenerate:
        status, flagged = LayerStatus.HARMLESS, False
        reason = (
            f"drift {drift:.3g}, but eval mode is not worse on this data; if it mattered: {rec}"
        )
        rec = Recommendation.OK
    elif harmful is None and not degenerate:
        status, flagged = LayerStatus.DRIFTS, False
        reason = f"{reason}; whether eval mode is wrong is undetermined (if it is: {rec})"
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


def _unmeasured_reason(family: NormFamily) -> str:
    """Why a layer that is not measured is not (it is listed all the same)."""
    if family is NormFamily.BATCH_STATS_ONLY:
        return "uses batch statistics in train and eval mode: nothing to drift"
    if family is NormFamily.BATCH_VAR:
        return (
            "batch-dependent (batch variance in training, running_var at inference, no "
            "running_mean): not measured"
        )
    if family is NormFamily.BATCH_OTHER:
        return "BatchNorm semantics in a class of its own: not measured"
    return "batch-independent: same statistics in train and eval mode"


def _validate(paths: Sequence[str], threshold: float) -> tuple[str, ...]:
    if isinstance(paths, str):
        paths = tuple(p.strip() for p in paths.split(","))
    paths = tuple(dict.fromkeys(paths))
    if not paths or any(p not in PATHS for p in paths):
        raise ValueError(f"paths must be a non-empty subset of {PATHS}, got {paths!r}")
    if not (threshold > 0):
        raise ValueError(f"threshold must be positive, got {threshold!r}")
    return paths


@preserved_globals()
def scan(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int | None = None,
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
    train_batch_size: int | None = None,
    train_group_by: GroupBy = None,
    search: bool | None = None,
    loss: LossFn | None = None,
    alpha: float = ALPHA,
) -> ScanReport:
    """Measure how far each norm layer's eval-mode behaviour drifts from its train-mode behaviour,
    and judge from evidence which of the two paths the model should run.

    Args:
        model: the model; left exactly as it was (parameters, buffers, ``training`` flags, hooks).
        data: a tensor or array (split into batches of ``batch_size``), an ``(inputs, labels)``
            tuple of tensors (labels (N,) for classifiers, or targets shaped like the output),
            a dict with ``inputs``/``labels``, a map-style ``Dataset``, or an iterable of batches
            (tensors, ``(inputs, labels)`` tuples or dicts; a ``DataLoader``).
        batch_size, shuffle, seed, group_by: how the scan's batches are formed from sample-level
            data.  ``batch_size=None`` (the default): the composition search chooses (below);
            32 where it cannot run.
        max_batches: stop after this many batches (the search uses the same samples).
        paths: ``("train", "eval")`` by default; the verdict needs both.
        device: run on this device (the model is moved there and back); default: the model's.
        threshold: per-layer drift above which a layer drifts.
        agreement_threshold, divergence_threshold: without labels or targets, the levels
            below/above which the two paths' outputs disagree.
        forward: ``forward(model, inputs) -> output`` for models with several inputs.
        progress: called as ``progress(batches_done, total_or_None)`` after each batch.
        model_name: how the report names the model.
        distributed: scan this rank's shard of an initialised ``torch.distributed`` group and
            merge the statistics exactly (no composition search).
        train_batch_size, train_group_by: training's composition, when known.  It is scanned,
            the train path under it is taken as what training did, and no search runs.
        search: try candidate compositions (batch sizes 1, 2, 4, 8, 32, 128, the scan's own,
            one-label batches with labels), judge against the one that reproduces training best
            and report at it.  Default: when no ``batch_size`` is given, training's composition
            is not stated and normdoctor forms the batches (the CLI also searches with
            ``--batch-size``, which adds a candidate).  Costs one train-path pass per candidate
            plus one eval pass.
        loss: ``loss(output, target) -> per-sample losses`` for targets (default: mean squared
            error per sample for targets shaped like the output).
        alpha: significance level of the paired tests.

    Returns:
        A :class:`ScanReport` with layers in execution order, ``status`` its verdict.

    Raises:
        DataError: the data cannot be read or batched.
        ScanError: the model's forward raised; the model is restored before this propagates.
    """
    paths = _validate(paths, threshold)
    stated = train_batch_size is not None or train_group_by is not None
    notes: list[str] = []
    if stated:
        if train_batch_size is not None and batch_size not in (None, train_batch_size):
            notes.append(
                f"scanned at training's batch size {train_batch_size} (as stated), "
                f"not at batch size {batch_size}"
            )
        batch_size = train_batch_size if train_batch_size is not None else batch_size
        group_by = train_group_by if train_group_by is not None else group_by
    samples = sample_info(data)
    sharded = bool(distributed) and _dist.is_distributed()
    searchable = samples is not None and len(paths) == 2 and not stated and not sharded
    if search is None:
        search = searchable and batch_size is None
    elif search and not searchable:
        why = (
            "training's composition was stated"
            if stated
            else "the data comes as formed batches"
            if samples is None
            else "it needs both paths"
            if len(paths) != 2
            else "distributed scans do not search"
        )
        notes.append(f"no composition search: {why}")
        search = False
    name = model_name or type(model).__name__
    notes.extend(getattr(model, "normdoctor_load_notes", ()))  # what loading decided
    described = getattr(data, "normalization", None)  # image folders say how pixels were read
    if isinstance(described, str):
        notes.append(f"data: {described}")
    layers = find_norm_layers(model)
    if not layers:
        notes.append("no normalization layers found in the model: nothing can drift")
        warnings.warn(f"{name}: no normalization layers found; nothing to scan", stacklevel=2)
    if not any(layer.batch_dependent and layer.materialized for layer in layers):
        search = False  # nothing depends on the batch: every composition is the same
    unmaterialized = [layer.name for layer in layers if not layer.materialized]
    if unmaterialized:  # saving their state would fail; a forward would materialize them
        raise ScanError(
            f"lazy layer(s) never materialized: {', '.join(unmaterialized)}; run one forward "
            "pass of the model first"
        )
    run = _Run(
        model=model,
        layers=layers,
        fwd=forward or default_forward,
        device=device,
        loss=loss,
        progress=progress,
    )
    options = dict(
        model_name=name,
        threshold=threshold,
        noniid_threshold=noniid_threshold,
        agreement_threshold=agreement_threshold,
        divergence_threshold=divergence_threshold,
        alpha=alpha,
    )
    plan = plan_batches(  # validates the composition before any forward
        data,
        batch_size=32 if batch_size is None else batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by=group_by,
        max_batches=max_batches,
    )
    with run:
        if search:
            assert samples is not None
            return _search_scan(
                run, data, samples, batch_size, shuffle, seed, group_by, max_batches, notes, options
            )
        results, order, sizes, e2e = run.both_paths(plan, paths, sharded)
    if run.single_value:
        notes.append(
            f"{len(run.single_value)} layer(s) got one value per channel at this batch size "
            f"({', '.join(sorted(run.single_value))}): BatchNorm cannot normalize that in train "
            "mode, so they ran in eval mode on the train path and are not measurable here; the "
            "model cannot have been trained at this composition"
        )
    if layers and not sizes:
        raise DataError("the data yielded no batches")
    composition = plan.composition(sizes)
    return assemble_report(
        layers=layers,
        states={layer.name: module_state(run.modules[layer.name]) for layer in layers},
        results=results,
        order=order,
        end_to_end=e2e,
        composition=composition,
        paths=paths,
        notes=notes,
        stated=stated,
        unmeasurable=run.single_value,
        **options,
    )


def sample_info(data: Any) -> tuple[int, bool] | None:
    """(number of samples, has integer labels) when normdoctor forms the batches, else None."""
    level = sample_level(data)
    if level is None:
        return None
    source, inputs, labels = level
    if source == "dataset" and len(inputs):
        labels = split_batch(default_collate([inputs[0]]))[1]
    labelled = (
        isinstance(labels, torch.Tensor)
        and labels.dim() == 1
        and not labels.is_floating_point()
        and not labels.is_complex()
    )
    return len(inputs), labelled


_ONE_VALUE = (
    "a layer gets one value per channel (pooled features at this batch size) and cannot "
    "normalize it in train mode: the model was not trained this way"
)


def _is_one_sample_error(exc: BaseException) -> bool:
    return "Expected more than 1 value per channel" in str(exc)


class _Run:
    """One scan's model handling: device moves, forward, the batch loops of each stage."""

    def __init__(self, *, model, layers, fwd, device, loss, progress) -> None:
        self.model = model
        self.layers = layers
        self.modules = dict(model.named_modules())
        self.fwd = fwd
        self.loss = loss
        self.progress = progress
        self.home, self.dtype = model_device_dtype(model)
        self.target = torch.device(device) if device is not None else self.home
        self.done = 0
        self.total: int | None = None
        self.single_value: dict[str, int] = {}

    def __enter__(self) -> _Run:
        if self.target != self.home:
            self.model.to(self.target)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.target != self.home:
            self.model.to(self.home)

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def forward(self, probe: Probe, path: str, batch: Batch, i: int) -> Any:
        try:
            with probe.path(path):
                return self.fwd(self.model, batch.inputs)
        except Exception as exc:  # the model's own error, with where it happened
            where = f" after norm layer {probe.last_layer!r}" if probe.last_layer else ""
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise ScanError(
                f"forward failed on batch {i} ({path} path){where}: {type(exc).__name__}: {first}"
            ) from exc
        except SystemExit as exc:  # the model's code tried to end the process
            raise ScanError(
                f"forward failed on batch {i} ({path} path): the model called sys.exit({exc.code})"
            ) from None

    def both_paths(
        self, plan: Any, paths: Sequence[str], sharded: bool
    ) -> tuple[
        dict[str, dict[str, LayerMeasurement | None]], list[str], list[int], EndToEnd | None
    ]:
        """Every batch through every path, recording; per-layer results, order, sizes, e2e."""
        sizes: list[int] = []
        e2e = EndToEndMeter(self.loss)
        batches, total = plan.batches, plan.total
        if sharded and plan.source != "batches":  # deal normdoctor's own batches round-robin
            rank, world = _dist.dist.get_rank(), _dist.dist.get_world_size()
            batches = (b for i, b in enumerate(plan.batches) if i % world == rank)
            total = None if total is None else len(range(rank, total, world))
        self.total = total
        with Probe(self.model, self.layers, paths) as probe, torch.no_grad():
            error: BaseException | None = None
            try:
                if self.layers:
                    for i, batch in enumerate(batches):
                        batch = to_device(batch, self.target, self.dtype)
                        sizes.append(batch.size)
                        outs = {p: self.forward(probe, p, batch, i) for p in paths}
                        if len(outs) == 2:
                            e2e.update(outs["train"], outs["eval"], batch.labels, batch.size)
                        self.tick()
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
            order = list(probe.order)
            self.single_value = dict(probe.single_value)
        return results, order, sizes, e2e.result()

    def one_path(self, plan: Any, path: str, samples: int) -> Trial:
        """The batches of ``plan`` through one path: outcomes by sample, layer measurements."""
        trial = Trial(spec=Spec(0))
        outcomes = Outcomes(samples)
        with Probe(self.model, self.layers, (path,)) as probe, torch.no_grad():
            try:
                for i, batch in enumerate(plan.batches):
                    batch = to_device(batch, self.target, self.dtype)
                    out = output_tensor(self.forward(probe, path, batch, i))
                    trial.sizes.append(batch.size)
                    if out is not None and batch.index is not None:
                        outcomes.add(
                            batch.index,
                            out,
                            *sample_outcomes(out, batch.labels, batch.size, self.loss),
                        )
                    self.tick()
            except ScanError as exc:
                if path != "train" or not _is_one_sample_error(exc.__cause__ or exc):
                    raise
                trial.error = _ONE_VALUE
                return trial
            if probe.single_value:  # the train path could not run as training would have
                trial.error = _ONE_VALUE + f" ({', '.join(sorted(probe.single_value))})"
                return trial
            trial.results = probe.results(path)
            trial.order = list(probe.order)
        trial.outcomes = outcomes
        return trial


def _fit_of(results: dict[str, LayerMeasurement | None] | None) -> float | None:
    if not results:
        return None
    fits = []
    for m in results.values():
        if m is not None:
            fits.append(float(layer_score(m.fit_m2.numpy(), m.weights.numpy())))
    return overall_fit(fits)


def _search_scan(
    run: _Run,
    data: Any,
    samples: tuple[int, bool],
    batch_size: int | None,
    shuffle: bool,
    seed: int,
    group_by: GroupBy,
    max_batches: int | None,
    notes: list[str],
    options: dict[str, Any],
) -> ScanReport:
    """Train path per candidate composition, eval path once at the reference: the report."""
    n, labelled = samples
    grouping = None if group_by is None else ("label" if isinstance(group_by, str) else "key")
    if grouping == "key":  # a user's own grouping: scanned as asked, searched beside
        notes.append("the one-label candidate is left out: the scan groups by the user's keys")
    subset = None
    if max_batches is not None:  # the samples the scan as asked would see, for every candidate
        asked = plan_batches(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            group_by=group_by,
            max_batches=max_batches,
        )
        subset = torch.cat([b.index for b in asked.batches])
    count = n if subset is None else int(subset.numel())
    specs = candidate_specs(count, batch_size, grouping if grouping == "label" else None, labelled)
    plans = [sample_plan(data, spec, seed, subset) for spec in specs]
    run.total = sum(p.total for p in plans)
    trials = []
    for spec, plan in zip(specs, plans, strict=True):
        trial = run.one_path(plan, "train", n)
        trial.spec = spec
        trials.append(trial)
    measured = [t for t in trials if t.outcomes is not None]
    if not measured:
        raise ScanError(
            "no candidate composition runs on the train path: " + (trials[0].error or "")
        )
    first = measured[0].outcomes
    assert first is not None
    kind = (
        "labels" if first.correct is not None else "targets" if first.loss is not None else "none"
    )
    mask = first.seen.copy()
    for t in measured:
        assert t.outcomes is not None
        mask &= t.outcomes.seen
    fits = [_fit_of(t.results) for t in trials]
    evid = [
        (
            t.outcomes.evidence()[mask]
            if t.outcomes is not None and t.outcomes.evidence() is not None
            else None
        )
        for t in trials
    ]
    ref = choose_reference(kind, evid, fits, [t.spec.group_by is not None for t in trials])
    assert ref is not None
    reference = trials[ref]
    eval_plan = sample_plan(data, reference.spec, seed, subset)
    run.total = run.done + (eval_plan.total or 0)
    eval_trial = run.one_path(eval_plan, "eval", n)
    ev = eval_trial.outcomes
    assert ev is not None and eval_trial.results is not None
    eval_evidence = ev.evidence()
    candidates = []
    for t, fit in zip(trials, fits, strict=True):
        if t.outcomes is None:
            candidates.append(
                Candidate(
                    description=t.spec.description,
                    batch_size=t.spec.batch_size,
                    group_by=t.spec.group_by,
                    measurable=False,
                    reason=t.error,
                )
            )
            continue
        o = t.outcomes
        quality = p_value = None
        train_evidence = o.evidence()
        if kind != "none" and train_evidence is not None and eval_evidence is not None:
            paired = Paired.from_arrays(kind, train_evidence[mask], eval_evidence[mask])
            quality, p_value = paired.quality_a, paired.p_value
        candidates.append(
            Candidate(
                description=t.spec.description,
                batch_size=t.spec.batch_size,
                group_by=t.spec.group_by,
                samples=int(mask.sum()),
                quality=finite_or_none(quality),
                agreement=search_agreement(o, ev, mask),
                rel_divergence=finite_or_none(search_divergence(o, ev, mask)),
                fit=finite_or_none(fit),
                p_value=p_value,
            )
        )
    metric = {"labels": "accuracy", "targets": "mse" if run.loss is None else "loss"}.get(kind)
    eval_quality = (
        float(eval_evidence[mask].mean()) if kind != "none" and eval_evidence is not None else None
    )
    evidence = Evidence(
        kind=kind,
        metric=metric,
        higher_is_better=kind == "labels",
        eval_quality=finite_or_none(eval_quality),
        reference=ref,
        searched=True,
        p_value=candidates[ref].p_value,
        candidates=tuple(candidates),
    )
    ro = reference.outcomes
    assert ro is not None
    c = candidates[ref]
    end_to_end = EndToEnd(
        batches=len(eval_trial.sizes),
        samples=c.samples,
        rel_divergence=c.rel_divergence,
        agreement=c.agreement,
        acc_train=c.quality if kind == "labels" else None,
        acc_eval=evidence.eval_quality if kind == "labels" else None,
        metric=metric,
        loss_train=c.quality if kind == "targets" else None,
        loss_eval=evidence.eval_quality if kind == "targets" else None,
        p_value=c.p_value,
    )
    asked = Spec(batch_size, grouping) if batch_size is not None else None
    if asked is not None and asked != reference.spec:
        notes.append(
            f"asked for {asked.description}; shown at {reference.spec.description}, the "
            "composition that reproduces training best (see the evidence; state training's "
            "composition with train_batch_size / --train-batch-size to scan it as asked)"
        )
    composition = Composition(
        source=eval_plan.source,
        batch_size=reference.spec.batch_size,
        order="shuffle",
        seed=seed,
        group_by=reference.spec.group_by,
        num_batches=len(reference.sizes),
        num_samples=sum(reference.sizes),
        min_batch=min(reference.sizes, default=0),
        max_batch=max(reference.sizes, default=0),
    )
    assert reference.results is not None
    return assemble_report(
        layers=run.layers,
        states={layer.name: module_state(run.modules[layer.name]) for layer in run.layers},
        results={"train": reference.results, "eval": eval_trial.results},
        order=reference.order,
        end_to_end=end_to_end,
        composition=composition,
        paths=PATHS,
        notes=notes,
        evidence=evidence,
        **options,
    )


def _not_measurable(r: LayerReport) -> LayerReport:
    """A layer that got one value per channel on the train path (its train-path numbers, if any
    came from other batches, are kept)."""
    if r.train is not None and r.train.batches:
        return r
    return dataclasses.replace(
        r,
        status=LayerStatus.NOT_MEASURABLE,
        flagged=False,
        recommendation=Recommendation.OK,
        reason="one value per channel at this batch size (pooled features): BatchNorm cannot "
        "normalize it in train mode, so the model was not trained this way; scan with larger "
        "batches to measure it",
        train=None,
    )


def single_evidence(e: EndToEnd | None, composition: Composition, stated: bool) -> Evidence | None:
    """The evidence of a scan at one composition (no search): its paired comparison."""
    if e is None:
        return None
    kind = (
        "labels" if e.acc_train is not None else "targets" if e.loss_train is not None else "none"
    )
    quality = e.acc_train if kind == "labels" else e.loss_train
    spec = Spec(composition.batch_size or 0, composition.group_by)
    description = spec.description if composition.source != "batches" else composition.description
    candidate = Candidate(
        description=description,
        batch_size=composition.batch_size,
        group_by=composition.group_by,
        samples=e.samples,
        quality=quality,
        agreement=e.agreement,
        rel_divergence=e.rel_divergence,
        p_value=e.p_value,
    )
    return Evidence(
        kind=kind,
        metric=e.metric,
        higher_is_better=kind == "labels",
        eval_quality=e.acc_eval if kind == "labels" else e.loss_eval,
        reference=0,
        stated=stated,
        p_value=e.p_value,
        candidates=(candidate,),
    )


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
    alpha: float = ALPHA,
    notes: Sequence[str] = (),
    evidence: Evidence | None = None,
    stated: bool = False,
    folded: bool = False,
    unmeasurable: dict[str, int] | None = None,
) -> ScanReport:
    """Measurements to a judged :class:`ScanReport`; shared by every backend (torch, ONNX).

    Args:
        layers: every norm layer found (batch-independent ones included).
        states: per layer name, its running statistics and gamma.
        results: per path, per layer name, what a :class:`~normdoctor.probe.Recorder` measured.
        order: layer names in execution order.
        evidence: what the composition search found; default: the paired comparison of
            ``end_to_end`` at ``composition`` (``stated``: training's composition, as stated).
        folded: BatchNorm was folded into convolutions at export (nothing left to measure).
        unmeasurable: per layer name, the train-path calls that held one value per channel.
    """
    notes = list(notes)
    if evidence is None:
        evidence = single_evidence(end_to_end, composition, stated)
    if evidence is None:
        harmful, why = None, "the two paths were not both run: nothing compares them end to end"
    else:
        harmful, why = judge(evidence, agreement_threshold, divergence_threshold, alpha)
    position = {n: i for i, n in enumerate(order)}

    def build(harm: bool | None, layer_threshold: float) -> list[LayerReport]:
        return [
            _layer_report(
                layer,
                states[layer.name],
                {p: results.get(p, {}).get(layer.name) for p in paths},
                position.get(layer.name),
                layer_threshold,
                noniid_threshold,
                harm,
            )
            for layer in layers
        ]

    reports = build(harmful, threshold)
    if unmeasurable:
        reports = [_not_measurable(r) if r.name in unmeasurable else r for r in reports]
    measured = [r for r in reports if r.batch_dependent]
    executed = [r for r in measured if r.executed]
    drifting = [
        r
        for r in reports
        if r.status in (LayerStatus.FLAGGED, LayerStatus.DRIFTS, LayerStatus.HARMLESS)
    ]
    if not layers:
        status, why = (
            (
                Verdict.CANNOT_CHECK,
                "BatchNorm folded into convolutions at export: nothing to measure",
            )
            if folded
            else (Verdict.OK, "no normalization layers: nothing can drift")
        )
    elif not measured:
        status = Verdict.CANNOT_CHECK if folded else Verdict.OK
        why = (
            "BatchNorm folded into convolutions at export: nothing to measure"
            if folded
            else "no batch-dependent normalization layers: nothing can drift"
        )
    elif not executed:
        status, why = Verdict.NOT_MEASURABLE, "no batch-dependent layer could be measured"
    elif harmful:
        status = Verdict.HARMFUL
        if not any(r.flagged for r in reports):
            # Eval mode is worse although no layer passes the threshold: the drift compounds.
            status = Verdict.COMPOUNDING
            reports = build(True, 0.0)
    elif harmful is False:
        status = Verdict.HARMLESS if drifting else Verdict.OK
    else:
        status = Verdict.UNDETERMINED if drifting or evidence is not None else Verdict.OK
        if status is Verdict.OK:
            why = f"{len(executed)} batch-dependent layers within threshold {threshold:g}"
    if status is Verdict.OK and harmful is False and not drifting and executed:
        why = f"{len(executed)} batch-dependent layers within threshold {threshold:g}; {why}"
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
    if status is Verdict.COMPOUNDING:
        notes.append(
            "outputs are worse in eval mode although no single layer exceeds the threshold: "
            "the drift compounds; every layer carries its would-be fix"
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
        harmful=True if status.harmful else (False if harmful is False else None),
        notes=tuple(notes),
        status=status,
        reason=why,
        evidence=evidence,
    )


def sweep_batch_sizes(
    model: nn.Module, data: Any, batch_sizes: Sequence[int], **kwargs: Any
) -> tuple[ScanReport, ...]:
    """One :func:`scan` per batch size: how drift grows as batches shrink."""
    if not batch_sizes:
        raise ValueError("batch_sizes is empty")
    return tuple(scan(model, data, batch_size=int(b), **kwargs) for b in batch_sizes)


def path_outcomes(
    model: nn.Module,
    data: Any,
    path: str,
    *,
    batch_size: int,
    group_by: str | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    forward: Forward | None = None,
    device: torch.device | str | None = None,
    loss: LossFn | None = None,
) -> Outcomes:
    """One path's per-sample outcomes over shuffled batches of ``batch_size`` (by sample index).

    For comparing two models on the same samples (a patched model against its original): the
    model is left exactly as it was.  Raises :class:`DataError` for data normdoctor cannot batch
    itself (it needs sample indices).
    """
    info = sample_info(data)
    if info is None:
        raise DataError("comparing per-sample outcomes needs sample-level data, not formed batches")
    plan = plan_batches(
        data,
        batch_size=batch_size,
        shuffle=True,
        seed=seed,
        group_by=group_by,
        max_batches=max_batches,
    )
    run = _Run(
        model=model,
        layers=find_norm_layers(model),
        fwd=forward or default_forward,
        device=device,
        loss=loss,
        progress=None,
    )
    with run:
        trial = run.one_path(plan, path, info[0])
    if trial.outcomes is None:
        raise ScanError(trial.error or f"the {path} path could not run")
    return trial.outcomes

"""From measurements to a report: per-layer scores, the end-to-end comparison, the verdict.

Whatever source recorded them (:mod:`normdoctor.sources`), the driver (:mod:`normdoctor.scan`)
hands this module the per-layer :class:`~normdoctor.recording.LayerMeasurement` of each path,
the stored states and the paired end-to-end comparison; :func:`assemble_report` scores every
layer, judges the model from the evidence (:mod:`normdoctor.verdict`) and builds the
:class:`~normdoctor.report.ScanReport`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed as _dist
from ._version import __version__
from .batching import Gather
from .checks import DEAD_GAMMA_RTOL
from .errors import DataError
from .layers import NormFamily, NormLayer, NormState
from .metrics import (
    DEFAULT_NONIID_THRESHOLD,
    DEFAULT_THRESHOLD,
    Recommendation,
    mismatch_sq,
    recommend,
)
from .recording import BLOCK, LayerMeasurement
from .report import (
    Candidate,
    Composition,
    EndToEnd,
    Evidence,
    Floats,
    LayerReport,
    LayerStatus,
    PathReport,
    ScanReport,
    Verdict,
    finite_or_none,
)
from .search import (
    Spec,
)
from .sources.torch import output_tensor
from .verdict import ALPHA, judge, mcnemar_p, paired_z_p

__all__ = [
    "DEFAULT_AGREEMENT_THRESHOLD",
    "DEFAULT_DIVERGENCE_THRESHOLD",
    "EndToEndMeter",
    "LossFn",
    "assemble_report",
    "not_measurable",
    "sample_outcomes",
    "single_evidence",
    "unmeasured_reason",
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

    With ``defer`` (the scan's loop), batches whose outputs and labels line up sample by sample
    are held (:class:`~normdoctor.batching.Gather`) and compared in one go:
    every quantity is a sum over samples, so the result is the same up to float64 rounding of
    the sums, and at batch size 1 the twenty-odd small operations a comparison takes are paid
    once per 64 batches instead of once per batch.  The held outputs must not change in place
    afterwards (a model's fresh outputs do not); the monitor, which sees a training loop's
    outputs, hands copies.
    """

    def __init__(self, loss: LossFn | None = None, *, defer: bool = False) -> None:
        self._acc: torch.Tensor | None = None
        self._keys: tuple[str, ...] = ()
        self.loss = loss
        self.batches = 0
        self.samples = 0
        self._defer = defer and loss is None  # a user's loss may not be per sample
        self._held = Gather(lambda t, e, labels: self._compare(t, e, labels, t.shape[0]))

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        self._held.flush()
        if self._acc is None:
            return {}
        return dict(zip(self._keys, self._acc, strict=True))

    def update(self, out_t: Any, out_e: Any, labels: torch.Tensor | None, size: int) -> None:
        t, e = output_tensor(out_t), output_tensor(out_e)
        if t is None or e is None or t.shape != e.shape:
            return
        self.batches += 1
        self.samples += size
        if t.requires_grad or e.requires_grad:  # (a scan's no_grad forwards: neither does)
            t, e = t.detach(), e.detach()
        if (
            self._defer
            and t.dim() >= 1
            and t.shape[0] == size
            and (labels is None or (labels.dim() >= 1 and labels.shape[0] == size))
        ):
            self._held.add(t, e, labels)
            return
        self._held.flush()
        self._compare(t, e, labels, size)

    def _compare(
        self, t: torch.Tensor, e: torch.Tensor, labels: torch.Tensor | None, size: int
    ) -> None:
        t64, e64 = t.double(), e.double()
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
            old = dict(zip(self._keys, self._acc, strict=True))
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
        sums = self.sums  # compares what is still held
        if self.batches == 0 or self._acc is None:
            return None
        s = {k: float(v) for k, v in sums.items()}
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


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices of the ranges [starts[i], starts[i] + lengths[i]), one after another."""
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())


def _channel_rows(
    measured: Sequence[LayerMeasurement], starts: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """The fields :data:`~normdoctor.recording.BLOCK` of ``measured`` over their concatenated
    channels (``starts``, ``sizes``: each one's columns), float64: one gather from each array
    that ``finish_all`` shares between measurements, else joined from the tensors."""
    rows = np.empty((len(BLOCK), int(sizes.sum())))
    shared: dict[int, tuple[np.ndarray, list[int], list[int]]] = {}
    for i, m in enumerate(measured):
        if m.block is None:
            a = starts[i]
            for r, t in enumerate((m.weights, m.running_mean, m.running_var, m.pooled.mean,
                                   m.pooled.var, m.channel_m2, m.noise_m2, m.fit_m2)):  # fmt: skip
                rows[r, a : a + sizes[i]] = t.numpy()
        else:
            block, column, _end = m.block
            group = shared.setdefault(id(block), (block, [], []))
            group[1].append(i)
            group[2].append(column)
    for block, which, columns in shared.values():
        n = sizes[which]
        a, c = int(starts[which[0]]), columns[0]
        total = int(n.sum())
        if (np.diff(starts[which]) == n[:-1]).all() and (np.diff(columns) == n[:-1]).all():
            rows[:, a : a + total] = block[: len(BLOCK), c : c + total]  # one run: a slice
        else:
            rows[:, _ranges(starts[which], n)] = block[: len(BLOCK), _ranges(np.array(columns), n)]
    return rows


def _unit_figures(
    units: Sequence[np.ndarray],
) -> tuple[list[int | None], list[float | None], list[Floats]]:
    """Per layer, from its per-unit scores: the index and score of the worst unit (the first of
    the largest finite score; None where none is finite) and the scores as floats, by segment
    reductions over every layer's scores at once."""
    lengths = np.array([u.size for u in units], dtype=np.intp)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    scores = np.concatenate(units) if units else np.empty(0)
    index: list[int | None] = [None] * len(units)
    worst: list[float | None] = [None] * len(units)
    live = np.flatnonzero(lengths)  # reduceat needs segments that are not empty
    if live.size:
        masked = np.where(np.isfinite(scores), scores, -math.inf)
        top = np.maximum.reduceat(masked, starts[live])
        hits = np.flatnonzero(masked == np.repeat(top, lengths[live]))
        first = hits[np.searchsorted(hits, starts[live])] - starts[live]
        for k, i, t in zip(live.tolist(), first.tolist(), top.tolist(), strict=True):
            if t > -math.inf:
                index[k], worst[k] = i, t
    return index, worst, _as_floats(scores, starts, ends)


def _path_reports(items: Sequence[tuple[LayerMeasurement, float]]) -> list[PathReport]:
    """One :class:`PathReport` per (measurement, eps), in one pass over every layer's channels.

    NumPy on the concatenated channels of all layers, with per-layer weighted means taken by
    segment sums: a few dozen operations for the whole model instead of per layer, which at
    twenty layers and two paths was most of a scan's fixed cost (issue 16).  Degenerate running
    statistics (var < -eps, NaN) give NaN here, reported as null, not as warnings.
    """
    if not items:
        return []
    sizes = [m.weights.numel() for m, _ in items]
    assert min(sizes) > 0  # a layer without channels records nothing (Recorder.observe)
    ends = np.cumsum(sizes)
    starts = (ends - sizes).astype(np.intp)
    w, rm, rv, pm, pv, channel_m2, noise_m2, fit_m2 = _channel_rows(
        [m for m, _ in items], starts, np.asarray(sizes)
    )
    eps = np.repeat(np.array([e for _, e in items], dtype=np.float64), sizes)
    weighted = w > 0
    total = np.add.reduceat(w, starts)

    def scores(m2: np.ndarray) -> list[float | None]:
        """Per layer: sqrt(sum_c w_c m2_c / sum_c w_c) (metrics.layer_score, segmented)."""
        num = np.add.reduceat(np.where(weighted, m2, 0.0) * w, starts)
        value = np.where(total == 0, math.nan, np.sqrt(np.clip(num / total, 0, None)))
        listed = value.tolist()
        return listed if np.isfinite(value).all() else [finite_or_none(v) for v in listed]

    with np.errstate(invalid="ignore", divide="ignore"):
        drift = scores(channel_m2)
        shift = scores(mismatch_sq(pm, pv, rm, rv, eps))
        noise = scores(noise_m2)
        fit = scores(fit_m2)
        vectors = {
            "pooled_mean": pm,
            "pooled_var": pv,
            "channel_drift": np.sqrt(channel_m2),
            "mean_shift": (pm - rm) / np.sqrt(rv + eps),
            "var_log_ratio": 0.5 * np.log((pv + eps) / (rv + eps)),
        }
    # Per layer, a view of each quantity, made into floats when read (report.Floats).
    as_floats = {name: _as_floats(values, starts, ends) for name, values in vectors.items()}
    worst_batch, worst_score, batch_drift = _unit_figures([m.unit_scores.numpy() for m, _ in items])
    reports = []
    for i, (m, _eps) in enumerate(items):
        noniid = None
        if m.noniid is not None:
            ratio = m.noniid.numpy()
            keep = np.isfinite(ratio) & (m.weights.numpy() > 0)
            if keep.any():
                values = np.sort(ratio[keep])
                noniid = finite_or_none(float(values[(values.size - 1) // 2]))  # lower median
        reports.append(
            PathReport(
                batches=m.units,
                samples=m.samples,
                nonfinite_batches=m.nonfinite_units,
                drift=drift[i],
                drift_worst=worst_score[i],
                worst_batch=worst_batch[i],
                shift=shift[i],
                noise=noise[i],
                noniid=noniid,
                pooled_mean=as_floats["pooled_mean"][i],
                pooled_var=as_floats["pooled_var"][i],
                channel_drift=as_floats["channel_drift"][i],
                mean_shift=as_floats["mean_shift"][i],
                var_log_ratio=as_floats["var_log_ratio"][i],
                batch_drift=batch_drift[i],
                fit=fit[i],
            )
        )
    return reports


#: Per layer: (running mean, running var as float tuples or None, dead, degenerate channels).
Statics = tuple[
    Floats | None,
    Floats | None,
    tuple[int, ...],
    tuple[int, ...],
]


def _joined64(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """The tensors flattened into one CPU float64 array (one cat where they share a device)."""
    try:
        with torch.no_grad():  # cat without a detach per tensor (the weights are parameters)
            flat = torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors])
        return flat.to("cpu", torch.float64).numpy()
    except RuntimeError:  # on several devices
        return np.concatenate([_numpy64(t).reshape(-1) for t in tensors])


def _segments(mask: np.ndarray, starts: np.ndarray) -> list[tuple[int, ...]]:
    """Per segment (``starts`` into ``mask``), the indices in it where ``mask`` holds."""
    idx = np.flatnonzero(mask)
    if not idx.size:  # the usual case: no dead or degenerate channel anywhere
        return [()] * len(starts)
    within = (idx - starts[np.searchsorted(starts, idx, side="right") - 1]).tolist()
    cuts = [0, *np.searchsorted(idx, starts[1:]).tolist(), len(within)]
    return [tuple(within[a:b]) for a, b in itertools.pairwise(cuts)]


def _as_floats(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> list[Floats]:
    """Per segment, its values as :class:`~normdoctor.report.Floats` (made into floats, the
    non-finite ones None, when read).  ``values`` must be an array of this scan's own that
    nothing writes to later (it is made read-only here)."""
    values.flags.writeable = False
    return [Floats(values[a:b]) for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def _statics(states: Sequence[NormState]) -> list[Statics]:
    """:data:`Statics` of every layer, in one NumPy pass over all their channels (per layer, a
    dozen small-array operations were a tenth of a 500-layer scan's fixed cost, issue 16)."""
    out: list[list[Any]] = [[None, None, (), ()] for _ in states]

    def group(get: Callable[[NormState], Any]) -> tuple[list[int], list[torch.Tensor]]:
        which, tensors = [], []
        for i, state in enumerate(states):
            t = get(state)
            if isinstance(t, torch.Tensor) and t.numel():
                which.append(i)
                tensors.append(t)
        return which, tensors

    def bounds(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        ends = np.cumsum([t.numel() for t in tensors])
        return np.concatenate([[0], ends[:-1]]).astype(np.intp), ends

    which, weights = group(lambda s: s.weight)
    if weights:
        starts, ends = bounds(weights)
        g = np.abs(_joined64(weights))
        gmax = np.maximum.reduceat(np.where(np.isnan(g), 0.0, g), starts)  # NaN: ignored
        top = np.repeat(gmax, ends - starts)
        dead = np.where(top > 0, g <= DEAD_GAMMA_RTOL * top, g >= 0)
        for i, channels in zip(which, _segments(dead, starts), strict=True):
            out[i][2] = channels
    both: list[int] = []
    means: list[torch.Tensor] = []
    variances: list[torch.Tensor] = []
    for i, state in enumerate(states):
        mean, var = state.running_mean, state.running_var
        if isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor):
            if mean.numel() == var.numel():
                both.append(i)
                means.append(mean)
                variances.append(var)
            else:  # malformed buffers (the layer itself would fail): no channel analysis
                whole = [(np.array([0]), np.array([t.numel()])) for t in (mean, var)]
                out[i][0] = _as_floats(_numpy64(mean).copy(), *whole[0])[0]
                out[i][1] = _as_floats(_numpy64(var).copy(), *whole[1])[0]
    if both:
        starts, ends = bounds(means)
        m, v = _joined64(means), _joined64(variances)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(m) | ~np.isfinite(v) | (v <= 0)
        for i, mean_t, var_t, channels in zip(
            both, _as_floats(m, starts, ends), _as_floats(v, starts, ends),
            _segments(bad, starts), strict=True,
        ):  # fmt: skip
            out[i][0], out[i][1], out[i][3] = mean_t, var_t, channels
    return [tuple(o) for o in out]  # type: ignore[misc]


def _numpy64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _layer_report(
    layer: NormLayer,
    statics: Statics,
    measured: dict[str, LayerMeasurement | None],
    order: int | None,
    threshold: float,
    noniid_threshold: float,
    harmful: bool | None,
    path_reports: dict[str, dict[str, PathReport]],
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
    mean, var, dead, degenerate = statics
    if mean is not None and var is not None:
        base["running_mean"], base["running_var"] = mean, var
    base["dead_channels"], base["degenerate_channels"] = dead, degenerate
    if not layer.batch_dependent:
        return LayerReport(
            **base,
            executed=order is not None,
            status=LayerStatus.NOT_MEASURED,
            flagged=False,
            recommendation=Recommendation.OK,
            reason=unmeasured_reason(layer.family),
        )
    paths = path_reports.get(layer.name, {})
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
        tracked_instance=layer.family is NormFamily.INSTANCE_TRACKED,
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


def unmeasured_reason(family: NormFamily) -> str:
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


def not_measurable(r: LayerReport) -> LayerReport:
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
    keys, items = [], []
    for p in paths:  # path by path: each path's measurements share one block, in layer order
        for layer in layers:
            m = results.get(p, {}).get(layer.name) if layer.batch_dependent else None
            if m is not None:
                keys.append((layer.name, p))
                items.append((m, layer.eps))
    path_reports: dict[str, dict[str, PathReport]] = {}
    for (name, p), report in zip(keys, _path_reports(items), strict=True):
        path_reports.setdefault(name, {})[p] = report

    statics = dict(zip(
        (layer.name for layer in layers), _statics([states[layer.name] for layer in layers]),
        strict=True,
    ))  # fmt: skip

    def build(harm: bool | None, layer_threshold: float) -> list[LayerReport]:
        return [
            _layer_report(
                layer,
                statics[layer.name],
                {p: results.get(p, {}).get(layer.name) for p in paths},
                position.get(layer.name),
                layer_threshold,
                noniid_threshold,
                harm,
                path_reports,
            )
            for layer in layers
        ]

    reports = build(harmful, threshold)
    if unmeasurable:
        reports = [not_measurable(r) if r.name in unmeasurable else r for r in reports]
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

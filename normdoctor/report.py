"""Scan results as frozen data, with an exact JSON round trip.

The JSON written by :meth:`ScanReport.to_json` is a contract for CI scripts (README, "JSON
schema"): fields may be added, none renamed without bumping :data:`SCHEMA_VERSION`.  Non-finite
floats become ``null`` (JSON has no NaN), here and in the dataclasses alike, so that
``ScanReport.from_json(r.to_json()) == r`` holds exactly.
"""

from __future__ import annotations

import dataclasses
import enum
import html
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .metrics import Recommendation
from .text import NUMBER, clip, merge_numbers, number_ranges, plural, significant
from .values import Floats, finite_or_none, floats

if TYPE_CHECKING:
    from .checks import Finding
    from .layers import NormLayer

__all__ = [
    "SCHEMA_VERSION",
    "Candidate",
    "Composition",
    "EndToEnd",
    "Evidence",
    "FindingGroup",
    "Floats",
    "LayerListing",
    "LayerReport",
    "LayerStatus",
    "LayersReport",
    "PatchReport",
    "PathReport",
    "ScanReport",
    "SeriesReport",
    "SweepReport",
    "Verdict",
    "finite_or_none",
    "floats",
    "number_ranges",
    "register_presenter",
    "scan_result_from_dict",
    "significant",
]

SCHEMA_VERSION = 1


class LayerStatus(enum.StrEnum):
    OK = "ok"
    HARMLESS = "drifts-harmless"  # drifts, but the model's outputs do not change on this data
    FLAGGED = "flagged"
    DRIFTS = (
        "drifts"  # drifts; whether that harms is undetermined (no evidence which path is right)
    )
    NOT_EXECUTED = "not-executed"  # batch-dependent, but no batch reached it
    NOT_MEASURABLE = "not-measurable"  # one value per channel at this composition (train mode)
    NOT_MEASURED = "not-measured"  # batch-independent (GroupNorm, LayerNorm, ...): cannot drift


class Verdict(enum.StrEnum):
    """What a scan concludes about the model as a whole: one vocabulary for every surface."""

    OK = "ok"  # no layer drifts, or nothing can drift
    HARMLESS = "drifts-harmless"  # layers drift, but eval mode is not measurably worse
    HARMFUL = "harmful"  # eval mode is measurably worse; the drifting layers are flagged
    COMPOUNDING = "harmful-compounding"  # eval mode is worse, no single layer over the threshold
    UNDETERMINED = "undetermined"  # the paths disagree and nothing says which one is right
    CANNOT_CHECK = "cannot-check"  # BatchNorm folded at export: nothing left to measure
    NOT_MEASURABLE = "not-measurable"  # batch-dependent layers, but none could be measured

    @property
    def symbol(self) -> str:
        return {
            Verdict.OK: "✓",
            Verdict.HARMLESS: "~",
            Verdict.HARMFUL: "✗",
            Verdict.COMPOUNDING: "✗",
            Verdict.UNDETERMINED: "?",
            Verdict.CANNOT_CHECK: "?",
            Verdict.NOT_MEASURABLE: "?",
        }[self]

    @property
    def harmful(self) -> bool:
        return self in (Verdict.HARMFUL, Verdict.COMPOUNDING)


@dataclass(frozen=True, slots=True, kw_only=True)
class PathReport:
    """One layer measured on one path ("train" or "eval").

    ``drift`` is the headline: sqrt of the mean over batches of the squared layer mismatch
    D_b = RMS(y_batchstats - y_running) / RMS(gamma).  ``shift`` scores the exact pooled
    statistics against the running ones (what recalibration removes), ``noise`` each batch's
    statistics against the pooled ones (what no running estimate can remove).
    """

    batches: int
    samples: int
    nonfinite_batches: int = 0
    drift: float | None
    drift_worst: float | None
    worst_batch: int | None
    shift: float | None
    noise: float | None
    noniid: float | None
    pooled_mean: Sequence[float | None]
    pooled_var: Sequence[float | None]  # biased, as BatchNorm normalizes
    channel_drift: Sequence[float | None]
    mean_shift: Sequence[float | None]  # (mu_P - mu_R) / s_R
    var_log_ratio: Sequence[float | None]  # log(s_P / s_R)
    batch_drift: Sequence[float | None]  # D_b for every batch, in scan order
    # Running statistics against the average batch statistics (mean of batch means, mean of
    # unbiased batch variances: what BatchNorm's running estimates average in training).
    fit: float | None = None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PathReport:
        return PathReport(
            **{f.name: _tuples(d[f.name]) for f in dataclasses.fields(PathReport) if f.name in d}
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerReport:
    """One normalization layer: what it is, what was measured, and what to do about it."""

    name: str
    kind: str
    family: str
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    batch_dependent: bool
    executed: bool
    order: int | None  # position in execution order (None: never ran or not measured)
    running_mean: Sequence[float | None] = ()
    running_var: Sequence[float | None] = ()
    dead_channels: tuple[int, ...] = ()  # |gamma| ~ 0
    degenerate_channels: tuple[int, ...] = ()  # running_var <= 0, NaN or Inf
    status: LayerStatus
    flagged: bool
    recommendation: Recommendation
    reason: str
    train: PathReport | None = None
    eval: PathReport | None = None

    @property
    def headline(self) -> PathReport | None:
        """The path the headline numbers come from: train if measured, else eval."""
        return self.train if self.train is not None else self.eval

    def _get(self, attr: str) -> Any:
        h = self.headline
        return None if h is None else getattr(h, attr)

    @property
    def drift(self) -> float | None:
        return self._get("drift")

    @property
    def drift_worst(self) -> float | None:
        return self._get("drift_worst")

    @property
    def shift(self) -> float | None:
        return self._get("shift")

    @property
    def noise(self) -> float | None:
        return self._get("noise")

    @property
    def noniid(self) -> float | None:
        """The non-i.i.d. ratio as the README defines it: measured on the eval path, where a
        sample's layer input does not depend on its batch mates (on the train path upstream
        BatchNorm layers pull batch means together and the ratio reads low).  The train path's
        only when the eval path was not measured.  The one value every surface shows: the
        terminal, the HTML page, the layer's top-level ``noniid`` in the JSON."""
        path = self.eval if self.eval is not None else self.train
        return None if path is None else path.noniid

    @property
    def batches(self) -> int:
        return self._get("batches") or 0

    @property
    def pooled_mean(self) -> Sequence[float | None]:
        return self._get("pooled_mean") or ()

    @property
    def pooled_var(self) -> Sequence[float | None]:
        return self._get("pooled_var") or ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("train", "eval"):
                continue
            d[f.name] = _plain(value)
        # Headline fields at top level, for `jq '.layers[] | .drift'`; paths in full below.
        h = self.headline
        for key in (
            "batches",
            "drift",
            "drift_worst",
            "shift",
            "noise",
            "noniid",
            "pooled_mean",
            "pooled_var",
        ):
            d[key] = _plain(getattr(h, key)) if h is not None else (0 if key == "batches" else None)
        d["noniid"] = _plain(self.noniid)  # the eval path's, as documented (issue 15)
        d["paths"] = {
            p: _plain(dataclasses.asdict(r))
            for p in ("train", "eval")
            if (r := getattr(self, p)) is not None
        }
        return d

    def __repr__(self) -> str:
        numbers = ", ".join(
            f"{key} {significant(getattr(self, key))}"
            for key in ("drift", "shift", "noise", "noniid")
            if getattr(self, key) is not None
        )
        fix = f", fix {self.recommendation}" if self.recommendation != "ok" else ""
        return (
            f"<LayerReport {self.name or '<root>'!r} {self.kind}({self.num_features}): "
            f"{self.status}{', ' + numbers if numbers else ''}{fix}>"
        )

    @staticmethod
    def from_dict(d: dict[str, Any]) -> LayerReport:
        kwargs = {
            f.name: _tuples(d[f.name])
            for f in dataclasses.fields(LayerReport)
            if f.name in d and f.name not in ("train", "eval")
        }
        kwargs["status"] = LayerStatus(kwargs["status"])
        kwargs["recommendation"] = Recommendation(kwargs["recommendation"])
        for p, r in d.get("paths", {}).items():
            kwargs[p] = PathReport.from_dict(r)
        return LayerReport(**kwargs)


@dataclass(frozen=True, slots=True, kw_only=True)
class EndToEnd:
    """The model's outputs on the train path against the eval path, on the same batches."""

    batches: int
    samples: int
    rel_divergence: float | None  # sqrt(sum (y_train - y_eval)^2 / sum y_train^2)
    agreement: float | None  # fraction of equal argmax predictions (classifier outputs only)
    acc_train: float | None  # accuracy with batch statistics (labels given)
    acc_eval: float | None  # accuracy in eval mode (labels given)
    nonfinite_outputs: int = 0
    # With targets shaped like the output (or a loss function): mean per-sample loss per path.
    metric: str | None = None  # "accuracy", "mse" or "loss"; None without labels or targets
    loss_train: float | None = None
    loss_eval: float | None = None
    # Paired test of the eval path against the train path on the same samples (McNemar on the
    # samples only one path gets right; a z-test of per-sample loss differences).
    p_value: float | None = None

    def describe(self) -> list[str]:
        """The measured comparisons as short phrases, for people."""
        parts = []
        if self.agreement is not None:
            parts.append(f"predictions agree on {self.agreement:.1%}")
        if self.rel_divergence is not None:
            parts.append(f"output divergence {self.rel_divergence:.3g}")
        if self.acc_train is not None and self.acc_eval is not None:
            parts.append(
                f"accuracy {self.acc_train:.1%} with batch statistics, {self.acc_eval:.1%} in eval mode"
            )
        if self.loss_train is not None and self.loss_eval is not None:
            parts.append(
                f"{self.metric or 'loss'} {self.loss_train:.4g} with batch statistics, "
                f"{self.loss_eval:.4g} in eval mode"
            )
        return parts

    @staticmethod
    def from_dict(d: dict[str, Any]) -> EndToEnd:
        return EndToEnd(**{f.name: d[f.name] for f in dataclasses.fields(EndToEnd) if f.name in d})


@dataclass(frozen=True, slots=True, kw_only=True)
class Composition:
    """How the scanned batches were formed: it decides what a scan can see (DESIGN.md)."""

    source: str  # "tensor", "dataset" (normdoctor formed the batches) or "batches" (given)
    batch_size: int | None
    order: str  # "shuffle", "keep" or "as-given"
    seed: int | None
    group_by: str | None  # None, "label" or "key"
    num_batches: int
    num_samples: int
    min_batch: int
    max_batch: int

    @property
    def description(self) -> str:
        """How the batches were formed, by their real sizes: "batches of 32, shuffled (seed 0):
        12 batches of 8-32 samples, 360 samples"; grouped batches, which hold what their group
        has, "31-45 samples per batch, one label each, in data order: 8 batches, 300 samples"."""
        sizes = (
            f"{self.min_batch}"
            if self.min_batch == self.max_batch
            else f"{self.min_batch}-{self.max_batch}"
        )
        samples = "sample" if self.max_batch == 1 else "samples"
        order = f"shuffled (seed {self.seed})" if self.order == "shuffle" else "in data order"
        if self.group_by and self.source != "batches":
            one = "one label each" if self.group_by == "label" else "one group each"
            return (
                f"{sizes} {samples} per batch, {one}, {order}: {plural(self.num_batches, 'batch')}, "
                f"{plural(self.num_samples, 'sample')}"
            )
        if self.source == "batches":
            what = "batches as given by the data"
        else:
            what = f"batches of {self.batch_size}, {order}"
        return (
            f"{what}: {plural(self.num_batches, 'batch')} of {sizes} {samples}, "
            f"{plural(self.num_samples, 'sample')}"
        )

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Composition:
        return Composition(
            **{f.name: d[f.name] for f in dataclasses.fields(Composition) if f.name in d}
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One batch composition tried as training's: how the train path did under it.

    ``quality`` is the train path's accuracy (labels) or mean per-sample loss (targets), on the
    same samples as the eval path's ``Evidence.eval_quality``; ``p_value`` is the paired test of
    the eval path against this train path (McNemar on discordant samples for accuracy, a paired
    z-test of per-sample loss differences otherwise).  ``fit`` is the RMS over layers of the
    running statistics against the average batch statistics under this composition.
    """

    description: str
    batch_size: int | None
    group_by: str | None
    measurable: bool = True
    reason: str | None = None  # why not measurable
    samples: int = 0
    quality: float | None = None
    agreement: float | None = None
    rel_divergence: float | None = None
    fit: float | None = None
    p_value: float | None = None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Candidate:
        return Candidate(
            **{f.name: d[f.name] for f in dataclasses.fields(Candidate) if f.name in d}
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """What decides which path is right: labels or targets, and the compositions tried."""

    kind: str  # "labels", "targets" or "none"
    metric: str | None  # "accuracy", "mse" or "loss" (a user's loss function); None without
    higher_is_better: bool = True
    eval_quality: float | None = None  # the eval path on the reference's samples
    reference: int | None = None  # index into candidates: the composition judged against
    stated: bool = False  # the user stated training's composition (no search)
    searched: bool = False  # the candidates were searched
    p_value: float | None = None  # eval path against the reference (paired)
    candidates: tuple[Candidate, ...] = ()

    @property
    def reference_candidate(self) -> Candidate | None:
        return None if self.reference is None else self.candidates[self.reference]

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Evidence:
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(Evidence) if f.name in d}
        kwargs["candidates"] = tuple(Candidate.from_dict(c) for c in d.get("candidates", ()))
        return Evidence(**kwargs)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanReport:
    """Everything one scan measured: layers in execution order, the composition, the verdict."""

    schema_version: int = SCHEMA_VERSION
    normdoctor_version: str
    model: str
    composition: Composition
    paths: tuple[str, ...]
    threshold: float
    agreement_threshold: float
    divergence_threshold: float
    layers: tuple[LayerReport, ...]
    end_to_end: EndToEnd | None = None
    harmful: bool | None = None  # eval mode is measurably worse (None: undetermined)
    notes: tuple[str, ...] = field(default=())
    status: Verdict = Verdict.OK  # the judgement, in one word of the verdict vocabulary
    reason: str = ""  # the judgement's evidence, in one sentence
    evidence: Evidence | None = None

    # -- derived -----------------------------------------------------------------------------
    @property
    def flagged_layers(self) -> tuple[LayerReport, ...]:
        return tuple(layer for layer in self.layers if layer.flagged)

    @property
    def flagged(self) -> bool:
        return bool(self.flagged_layers)

    @property
    def drifting_layers(self) -> tuple[LayerReport, ...]:
        return tuple(
            l for l in self.layers if l.status in (LayerStatus.FLAGGED, LayerStatus.HARMLESS)
        )

    @property
    def verdict(self) -> str:
        """One line: the verdict word, its evidence and, when harmful, the fixes."""
        text = f"{self.status}: {self.reason}" if self.reason else str(self.status)
        if self.flagged:
            fixes = sorted({str(l.recommendation) for l in self.flagged_layers})
            measured = [l for l in self.layers if l.batch_dependent]
            text += (
                f"; {len(self.flagged_layers)} of {len(measured)} layers flagged, "
                f"recommended fix: {', '.join(fixes)}"
            )
        return text

    def layer(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    # -- for people: big models summarised (layer numbers are 1-based, in forward order) -----
    def counts(self) -> dict[LayerStatus, int]:
        """How many layers have each status, the most severe status first."""
        found = {layer.status for layer in self.layers}
        return {s: sum(layer.status == s for layer in self.layers) for s in _SEVERITY if s in found}

    def worst(self, k: int = 10) -> tuple[tuple[int, LayerReport], ...]:
        """The ``k`` measured layers with the highest drift, worst first, as (number, layer)."""
        measured = [(i, layer) for i, layer in enumerate(self.layers, 1) if layer.drift is not None]
        return tuple(sorted(measured, key=lambda r: -(r[1].drift or 0.0))[:k])

    def groups(self) -> tuple[FindingGroup, ...]:
        """Layers with identical findings (same status, fix and reason up to its numbers), the
        most severe status first, then the biggest group."""
        found: dict[tuple[LayerStatus, Recommendation, str], list[tuple[int, LayerReport]]] = {}
        for i, layer in enumerate(self.layers, 1):
            key = (layer.status, layer.recommendation, NUMBER.sub("#", layer.reason))
            found.setdefault(key, []).append((i, layer))
        out = [
            FindingGroup(
                status=status,
                recommendation=rec,
                reason=merge_numbers([layer.reason for _, layer in members]),
                numbers=tuple(i for i, _ in members),
                layers=tuple(layer for _, layer in members),
            )
            for (status, rec, _), members in found.items()
        ]
        return tuple(sorted(out, key=lambda g: (_SEVERITY.index(g.status), -len(g.layers))))

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "layers":
                d["layers"] = [layer.to_dict() for layer in value]
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                d[f.name] = _plain(dataclasses.asdict(value))
            else:
                d[f.name] = _plain(value)
        d["composition"]["description"] = self.composition.description
        d["flagged"] = self.flagged
        d["verdict"] = self.verdict
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ScanReport:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"unsupported ScanReport schema_version {version!r} (expected {SCHEMA_VERSION})"
            )
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(ScanReport) if f.name in d}
        kwargs["composition"] = Composition.from_dict(d["composition"])
        kwargs["layers"] = tuple(LayerReport.from_dict(x) for x in d["layers"])
        kwargs["paths"] = tuple(d["paths"])
        kwargs["notes"] = tuple(d.get("notes", ()))
        if d.get("end_to_end") is not None:
            kwargs["end_to_end"] = EndToEnd.from_dict(d["end_to_end"])
        if "status" in kwargs:
            kwargs["status"] = Verdict(kwargs["status"])
        if d.get("evidence") is not None:
            kwargs["evidence"] = Evidence.from_dict(d["evidence"])
        return ScanReport(**kwargs)

    @staticmethod
    def from_json(text: str) -> ScanReport:
        return ScanReport.from_dict(json.loads(text))

    # -- rendering: normdoctor.render draws reports; these two stay for notebooks ---------------
    def plot(self, kind: str = "drift", **kwargs: Any) -> Any:
        """A matplotlib ``Figure``: ``kind`` is "drift", "channels", "batches" or "end_to_end".

        Deprecated: call :func:`normdoctor.render.plot` (``render.plot(report, kind)``).
        """
        warnings.warn(
            "ScanReport.plot() is deprecated: use normdoctor.render.plot(report, kind)",
            DeprecationWarning,
            stacklevel=2,
        )
        return _presenter("plot")(self, kind, **kwargs)

    def save_report(self, out_dir: Any, **kwargs: Any) -> Any:
        """Write the self-contained HTML drift report; see :func:`normdoctor.render.save_report`.

        Deprecated: call :func:`normdoctor.render.save_report` (``save_report(report, out_dir)``).
        """
        warnings.warn(
            "ScanReport.save_report() is deprecated: use "
            "normdoctor.render.save_report(report, out_dir)",
            DeprecationWarning,
            stacklevel=2,
        )
        return _presenter("save_report")(self, out_dir, **kwargs)

    def __repr__(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        worst = "; ".join(
            f"#{i} {clip(repr(layer.name), 60)} drift {significant(layer.drift)} {layer.status}"
            + (f" -> {layer.recommendation}" if layer.recommendation != "ok" else "")
            for i, layer in self.worst(3)
        )
        lines = [
            f"<ScanReport of {clip(repr(self.model), 120)}: {self.status.symbol} {self.status}, "
            f"{plural(len(self.layers), 'layer')}" + (f" ({counts})" if counts else ""),
            f"  verdict: {clip(self.verdict, 700)}",
            f"  batches: {clip(self.composition.description, 250)}",
        ]
        if worst:
            lines.append(f"  worst: {worst}")
        return "\n".join(lines) + ">"

    def _repr_html_(self) -> str:
        """The notebook view: verdict, evidence, grouped layer table and the drift figure (drawn
        by :mod:`normdoctor.render`; plain text in a ``<pre>`` without it)."""
        function = _PRESENTERS.get("notebook_html")
        if function is None:
            return f"<pre>{html.escape(self.summary())}</pre>"
        return str(function(self))

    def __rich__(self) -> Any:
        """What ``rich`` prints: the terminal rendering of :mod:`normdoctor.render.console`."""
        function = _PRESENTERS.get("rich")
        if function is None:
            return self.summary().replace("[", "\\[")  # rich markup, escaped
        return function(self)

    def summary(self) -> str:
        """A few plain-text lines: composition, verdict, end-to-end, flagged layers."""
        lines = [f"normdoctor scan of {self.model}", f"batches: {self.composition.description}"]
        if self.end_to_end is not None and self.end_to_end.describe():
            lines.append(
                "end to end (train vs eval path): " + "; ".join(self.end_to_end.describe())
            )
        lines.append(f"verdict: {self.verdict}")
        for layer in self.flagged_layers:
            lines.append(
                f"  {layer.name}: drift {_fmt(layer.drift)} -> {layer.recommendation} ({layer.reason})"
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


# -- the rendering hook ----------------------------------------------------------------------
# This module is data: it never imports normdoctor.render (render imports it).  The deprecated
# ScanReport.plot()/save_report() reach render's functions through this table instead, which
# normdoctor.render fills when it is imported (normdoctor/__init__ imports it).

_PRESENTERS: dict[str, Callable[..., Any]] = {}


def register_presenter(name: str, function: Callable[..., Any]) -> None:
    """Make ``function(report, ...)`` what ``ScanReport.<name>(...)`` calls ("plot", "save_report").

    Called by :mod:`normdoctor.render` when it is imported; nothing else needs it.
    """
    _PRESENTERS[name] = function


def _presenter(name: str) -> Callable[..., Any]:
    function = _PRESENTERS.get(name)
    if function is None:
        raise RuntimeError(
            f"ScanReport.{name}() needs normdoctor.render: import it and call "
            f"normdoctor.render.{name}(report, ...)"
        )
    return function


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


_SEVERITY = (
    LayerStatus.FLAGGED,
    LayerStatus.DRIFTS,
    LayerStatus.HARMLESS,
    LayerStatus.NOT_MEASURABLE,
    LayerStatus.NOT_EXECUTED,
    LayerStatus.OK,
    LayerStatus.NOT_MEASURED,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class FindingGroup:
    """Layers with the same finding (:meth:`ScanReport.groups`): one status, one fix, one reason
    whose numbers are the group's ranges."""

    status: LayerStatus
    recommendation: Recommendation
    reason: str
    numbers: tuple[int, ...]  # 1-based positions in forward order
    layers: tuple[LayerReport, ...]

    def describe(self) -> str:
        """One line: 148 layers (#3–150) flagged → recalibrate: running statistics are ..."""
        fix = f" → {self.recommendation}" if self.recommendation != "ok" else ""
        where = number_ranges(self.numbers)
        return f"{plural(len(self.layers), 'layer')} ({where}) {self.status}{fix}: {self.reason}"


def _plain(value: Any) -> Any:
    """JSON-ready: enums to str, tuples to lists, non-finite floats to None."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, Floats)):
        return [_plain(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    """Lists back to tuples (the dataclasses hold tuples)."""
    if isinstance(value, list):
        flat = tuple(value)
        if list in map(type, flat):  # nested; else numbers, converted at C speed
            return tuple(_tuples(v) for v in flat)
        return flat
    return value


# -- what a command writes around its scans (sweep, series, patch) and the layers listing --------
# Each envelope's to_dict() is the JSON the command writes (README, "JSON schema"): the same
# keys in the same order; from_dict() reads it back, so that ``X.from_dict(x.to_dict()) == x``.


def _check_schema(what: str, d: Mapping[str, Any], kind: str | None = None) -> None:
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"unsupported {what} schema_version {version!r} (expected {SCHEMA_VERSION})"
        )
    if kind is not None and d.get("kind") != kind:
        raise ValueError(f"expected a {kind!r} JSON, got kind {d.get('kind')!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepReport:
    """One model scanned once per batch size (``scan --batch-sizes``): how drift grows as
    batches shrink.  The first batch size is the main scan."""

    schema_version: int = SCHEMA_VERSION
    batch_sizes: tuple[int, ...]
    reports: tuple[ScanReport, ...]

    @property
    def main(self) -> ScanReport:
        return self.reports[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": "sweep",
            "batch_sizes": list(self.batch_sizes),
            "reports": [r.to_dict() for r in self.reports],
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> SweepReport:
        _check_schema("SweepReport", d, "sweep")
        return SweepReport(
            schema_version=d["schema_version"],
            batch_sizes=tuple(d["batch_sizes"]),
            reports=tuple(ScanReport.from_dict(r) for r in d["reports"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SeriesReport:
    """Checkpoints of one architecture scanned in turn (``scan run_dir/*.pt``): drift per
    layer over checkpoints.  The last checkpoint is the main scan."""

    schema_version: int = SCHEMA_VERSION
    models: tuple[str, ...]  # the files as given on the command line
    reports: tuple[ScanReport, ...]

    @property
    def main(self) -> ScanReport:
        return self.reports[-1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": "series",
            "models": list(self.models),
            "reports": [r.to_dict() for r in self.reports],
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> SeriesReport:
        _check_schema("SeriesReport", d, "series")
        return SeriesReport(
            schema_version=d["schema_version"],
            models=tuple(d["models"]),
            reports=tuple(ScanReport.from_dict(r) for r in d["reports"]),
        )


def scan_result_from_dict(d: Mapping[str, Any]) -> ScanReport | SweepReport | SeriesReport:
    """What ``scan --json`` wrote: one scan, a sweep or a series (by its ``kind``)."""
    kind = d.get("kind")
    if kind == "sweep":
        return SweepReport.from_dict(d)
    if kind == "series":
        return SeriesReport.from_dict(d)
    return ScanReport.from_dict(dict(d))


@dataclass(frozen=True, slots=True, kw_only=True)
class PatchReport:
    """``patch``: the scan of the original model and the scan of the patched one."""

    schema_version: int = SCHEMA_VERSION
    before: ScanReport
    after: ScanReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": "patch",
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> PatchReport:
        _check_schema("PatchReport", d, "patch")
        return PatchReport(
            schema_version=d["schema_version"],
            before=ScanReport.from_dict(d["before"]),
            after=ScanReport.from_dict(d["after"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerListing:
    """One normalization layer as ``layers`` lists it; values the file does not carry are
    ``None`` and named in ``unknown`` (a ``None`` momentum that is not unknown is PyTorch's
    cumulative average)."""

    name: str
    kind: str
    family: str
    num_features: int
    eps: float | None
    momentum: float | None
    affine: bool
    track_running_stats: bool
    batch_dependent: bool
    unknown: tuple[str, ...] = ()

    @staticmethod
    def from_layer(layer: NormLayer, unknown: Sequence[str] = ()) -> LayerListing:
        return LayerListing(
            name=layer.name,
            kind=layer.kind,
            family=str(layer.family),
            num_features=layer.num_features,
            eps=None if "eps" in unknown else layer.eps,
            momentum=None if "momentum" in unknown else layer.momentum,
            affine=layer.affine,
            track_running_stats=layer.track_running_stats,
            batch_dependent=layer.batch_dependent,
            unknown=tuple(unknown),
        )

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["unknown"] = list(self.unknown)
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> LayerListing:
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(LayerListing) if f.name in d}
        kwargs["unknown"] = tuple(d.get("unknown", ()))
        return LayerListing(**kwargs)


@dataclass(frozen=True, slots=True, kw_only=True)
class LayersReport:
    """``layers``: every normalization layer of a model file and the static findings."""

    schema_version: int = SCHEMA_VERSION
    model: str  # the file as given on the command line
    layers: tuple[LayerListing, ...]
    findings: tuple[Finding, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "layers": [layer.to_dict() for layer in self.layers],
            "findings": [f.to_dict() for f in self.findings],
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> LayersReport:
        from .checks import Finding  # imports torch, which reading a scan never needs

        _check_schema("LayersReport", d)
        return LayersReport(
            schema_version=d["schema_version"],
            model=d["model"],
            layers=tuple(LayerListing.from_dict(x) for x in d["layers"]),
            findings=tuple(Finding.from_dict(f) for f in d["findings"]),
        )

"""Two scans compared: per layer (matched by name) and end to end, and whether the second is
worse than the first (what ``normdoctor diff`` gates CI on).

Worse means any of: the verdict moved down the order ok < drifts-harmless < undetermined,
cannot-check, not-measurable < harmful, harmful-compounding; a layer is flagged in the second
scan that was not flagged in the first; the eval-mode accuracy or the prediction agreement
(train path against eval path) dropped by more than ``tolerance`` (absolute, as fractions).

Data only: this module reads reports and writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import NormDoctorError
from .report import SCHEMA_VERSION, LayerStatus, PatchReport, ScanReport, Verdict

__all__ = [
    "DEFAULT_TOLERANCE",
    "LayerChange",
    "MetricChange",
    "ScanDiff",
    "compare",
    "scans_to_compare",
    "verdict_rank",
]

DEFAULT_TOLERANCE = 0.01

_RANK = {
    Verdict.OK: 0,
    Verdict.HARMLESS: 1,
    Verdict.UNDETERMINED: 2,
    Verdict.CANNOT_CHECK: 2,
    Verdict.NOT_MEASURABLE: 2,
    Verdict.HARMFUL: 3,
    Verdict.COMPOUNDING: 3,
}


def verdict_rank(status: Verdict) -> int:
    """0 (ok) to 3 (harmful): a higher rank is a worse verdict; the unsure ones share 2."""
    return _RANK[status]


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerChange:
    """One layer in both scans (``None`` where a scan lacks it)."""

    name: str
    kind_before: str | None
    kind_after: str | None
    drift_before: float | None
    drift_after: float | None
    status_before: LayerStatus | None
    status_after: LayerStatus | None

    @property
    def newly_flagged(self) -> bool:
        return self.status_after is LayerStatus.FLAGGED and (
            self.status_before is not LayerStatus.FLAGGED
        )

    @property
    def status_changed(self) -> bool:
        return self.status_before != self.status_after

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind_before": self.kind_before,
            "kind_after": self.kind_after,
            "drift_before": self.drift_before,
            "drift_after": self.drift_after,
            "status_before": None if self.status_before is None else str(self.status_before),
            "status_after": None if self.status_after is None else str(self.status_after),
            "status_changed": self.status_changed,
            "newly_flagged": self.newly_flagged,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricChange:
    """One end-to-end number in both scans."""

    key: str  # the EndToEnd field: acc_eval, acc_train, agreement, rel_divergence, loss_eval
    name: str
    before: float | None
    after: float | None
    higher_is_better: bool
    percent: bool  # a fraction, shown as a percentage

    @property
    def delta(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before

    def format(self, value: float | None) -> str:
        if value is None:
            return "-"
        if self.percent:
            return f"{value:.1%}"
        text = f"{value:#.3g}"  # three significant digits, trailing zeros kept
        return text[:-1] if text.endswith(".") else text

    @property
    def delta_text(self) -> str:
        d = self.delta
        if d is None:
            return ""
        return f"{d * 100:+.1f} points" if self.percent else f"{d:+.3g}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "before": self.before,
            "after": self.after,
            "delta": self.delta,
            "higher_is_better": self.higher_is_better,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanDiff:
    """What changed from ``before`` to ``after``; ``reasons`` say why ``after`` is worse."""

    before_model: str
    after_model: str
    before_status: Verdict
    after_status: Verdict
    before_verdict: str
    after_verdict: str
    tolerance: float
    layers: tuple[LayerChange, ...]
    end_to_end: tuple[MetricChange, ...]
    reasons: tuple[str, ...]

    @property
    def worse(self) -> bool:
        return bool(self.reasons)

    @property
    def verdict_changed(self) -> bool:
        return self.before_status != self.after_status

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "diff",
            "before": {
                "model": self.before_model,
                "status": str(self.before_status),
                "verdict": self.before_verdict,
            },
            "after": {
                "model": self.after_model,
                "status": str(self.after_status),
                "verdict": self.after_verdict,
            },
            "verdict_changed": self.verdict_changed,
            "tolerance": self.tolerance,
            "worse": self.worse,
            "reasons": list(self.reasons),
            "end_to_end": [m.to_dict() for m in self.end_to_end],
            "layers": [layer.to_dict() for layer in self.layers],
        }


_METRICS = (  # (key, name, higher is better, a fraction, gated by the tolerance)
    ("acc_eval", "eval-mode accuracy", True, True, True),
    ("acc_train", "accuracy with batch statistics", True, True, False),
    ("agreement", "prediction agreement (train vs eval path)", True, True, True),
    ("loss_eval", "eval-mode loss", False, False, False),
    ("rel_divergence", "output divergence (train vs eval path)", False, False, False),
)


def compare(
    before: ScanReport, after: ScanReport, *, tolerance: float = DEFAULT_TOLERANCE
) -> ScanDiff:
    """Compare two scans of one model's layers (by layer name).

    Raises :class:`~normdoctor.errors.NormDoctorError` when both scans measured layers but no
    layer name is common to them (two different models).
    """
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    old = {layer.name: layer for layer in before.layers}
    new = {layer.name: layer for layer in after.layers}
    if old and new and not old.keys() & new.keys():
        raise NormDoctorError(
            f"{before.model} and {after.model} have no layer name in common: "
            "diff compares scans of one model (before/after a fix, two checkpoints, two data sets)"
        )
    names = [*old, *(name for name in new if name not in old)]
    layers = []
    for name in names:
        a, b = old.get(name), new.get(name)
        layers.append(
            LayerChange(
                name=name,
                kind_before=None if a is None else a.kind,
                kind_after=None if b is None else b.kind,
                drift_before=None if a is None else a.drift,
                drift_after=None if b is None else b.drift,
                status_before=None if a is None else a.status,
                status_after=None if b is None else b.status,
            )
        )
    metrics = []
    reasons = []
    if verdict_rank(after.status) > verdict_rank(before.status):
        reasons.append(f"verdict {before.status} -> {after.status}")
    fresh = [layer.name for layer in layers if layer.newly_flagged]
    if fresh:
        reasons.append(f"newly flagged: {', '.join(fresh)}")
    e0, e1 = before.end_to_end, after.end_to_end
    for key, name, higher, percent, gated in _METRICS:
        x = None if e0 is None else getattr(e0, key)
        y = None if e1 is None else getattr(e1, key)
        if x is None and y is None:
            continue
        change = MetricChange(
            key=key, name=name, before=x, after=y, higher_is_better=higher, percent=percent
        )
        metrics.append(change)
        d = change.delta
        if gated and d is not None and -d > tolerance:
            reasons.append(
                f"{name} {change.format(x)} -> {change.format(y)} "
                f"({change.delta_text}, tolerance {tolerance:g})"
            )
    return ScanDiff(
        before_model=before.model,
        after_model=after.model,
        before_status=before.status,
        after_status=after.status,
        before_verdict=before.verdict,
        after_verdict=after.verdict,
        tolerance=tolerance,
        layers=tuple(layers),
        end_to_end=tuple(metrics),
        reasons=tuple(reasons),
    )


def _one_scan(d: Mapping[str, Any], what: str) -> ScanReport:
    kind = d.get("kind")
    if kind in ("sweep", "series", "layers"):
        raise NormDoctorError(
            f"{what}: a {kind} JSON; diff compares single scans (scan --json, or one patch --json)"
        )
    if kind == "patch":
        raise NormDoctorError(
            f"{what}: a patch JSON holds two scans: pass it alone to compare its before and after"
        )
    try:
        return ScanReport.from_dict(dict(d))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NormDoctorError(f"{what}: not a normdoctor scan JSON ({exc})") from exc


def scans_to_compare(
    first: Mapping[str, Any],
    second: Mapping[str, Any] | None = None,
    *,
    names: tuple[str, ...] = (),
) -> tuple[ScanReport, ScanReport]:
    """(before, after) from what ``scan --json`` or ``patch --json`` wrote: two scan JSONs, or
    one patch JSON (its before and after). ``names`` label the inputs in errors."""
    label = (
        names[0] if names else "first file",
        names[1] if len(names) > 1 else "second file",
    )
    if second is None:
        if first.get("kind") != "patch":
            raise NormDoctorError(
                f"{label[0]}: one file must be a patch JSON (patch --json); "
                "otherwise give two scan JSONs"
            )
        try:
            patch = PatchReport.from_dict(first)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NormDoctorError(f"{label[0]}: not a normdoctor patch JSON ({exc})") from exc
        return patch.before, patch.after
    return _one_scan(first, label[0]), _one_scan(second, label[1])

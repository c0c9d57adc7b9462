"""Which path should the model run?  Paired evidence, the reference composition, the verdict.

Pure functions over per-sample outcomes and their sums; no torch, no modules.  DESIGN.md:
"which path is right is a measurement, not an assumption".  With labels or targets the train
path under the composition that reproduces training best (the *reference*) is compared with
the eval path on the same samples, as a paired test; without them the running statistics'
fit to each composition's batch statistics is the only trace of how the model was trained, and
the verdict says "undetermined" when the paths disagree there.

The levels below were chosen on the sample models whose truth is known (README, "Verdicts").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .report import Candidate, Evidence

__all__ = [
    "ALPHA",
    "FIT_SLACK",
    "MIN_ACCURACY_DROP",
    "MIN_LOSS_RATIO",
    "Paired",
    "choose_reference",
    "judge",
    "mcnemar_p",
    "paired_z_p",
]

#: Significance level of the paired tests.
ALPHA = 0.01
#: Eval mode must lose at least this much accuracy (1 point) to count as worse...
MIN_ACCURACY_DROP = 0.01
#: ...or have at least this ratio of mean per-sample loss.
MIN_LOSS_RATIO = 1.10
#: Without labels: compositions whose fit is within this factor of the best one count as
#: equally likely to be training's.
FIT_SLACK = 1.25


def mcnemar_p(a_only: float, b_only: float) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts.

    Under the null each discordant sample is equally likely to favour either path: the smaller
    count is Binomial(a_only + b_only, 1/2).  Exact up to 2,000 discordant pairs, the normal
    approximation with continuity correction beyond (relative error below 1e-3 there).
    """
    n = round(a_only + b_only)
    if n == 0:
        return 1.0
    k = round(min(a_only, b_only))
    if n <= 2000:
        log_half = n * math.log(0.5)
        terms = [
            math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half
            for i in range(k + 1)
        ]
        top = max(terms)
        tail = math.exp(top) * sum(math.exp(t - top) for t in terms)
        return min(1.0, 2.0 * tail)
    z = (abs(a_only - b_only) - 1.0) / math.sqrt(n)
    return min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2.0)))


def paired_z_p(n: int, sum_d: float, sum_d2: float) -> float:
    """Two-sided p-value that the mean of n paired differences is zero (normal approximation).

    Fewer than 20 pairs are too few for the approximation: 1.0 (no evidence) is returned.
    """
    if n < 20:
        return 1.0
    mean = sum_d / n
    var = max(sum_d2 - n * mean * mean, 0.0) / (n - 1)
    if var == 0.0:
        return 0.0 if mean != 0.0 else 1.0
    z = mean / math.sqrt(var / n)
    return math.erfc(abs(z) / math.sqrt(2.0))


@dataclass(frozen=True, slots=True)
class Paired:
    """Per-sample outcomes of two paths (a, b) on the same samples, reduced to sums.

    ``kind`` "labels": ``sum_a``/``sum_b`` count correct predictions, ``a_only``/``b_only`` the
    samples only one path got right.  ``kind`` "targets": ``sum_a``/``sum_b`` add per-sample
    losses, ``sum_d``/``sum_d2`` the differences loss_b - loss_a and their squares.
    """

    kind: str
    n: int
    sum_a: float
    sum_b: float
    a_only: float = 0.0
    b_only: float = 0.0
    sum_d: float = 0.0
    sum_d2: float = 0.0

    @staticmethod
    def from_arrays(kind: str, a: np.ndarray, b: np.ndarray) -> Paired:
        """From per-sample outcomes (bool correct, or float losses) of equal length."""
        if kind == "labels":
            a, b = a.astype(bool), b.astype(bool)
            return Paired(
                kind,
                int(a.size),
                float(a.sum()),
                float(b.sum()),
                a_only=float((a & ~b).sum()),
                b_only=float((b & ~a).sum()),
            )
        a, b = a.astype(np.float64), b.astype(np.float64)
        ok = np.isfinite(a) & np.isfinite(b)
        a, b = a[ok], b[ok]
        d = b - a
        return Paired(
            kind,
            int(a.size),
            float(a.sum()),
            float(b.sum()),
            sum_d=float(d.sum()),
            sum_d2=float((d * d).sum()),
        )

    @property
    def quality_a(self) -> float:
        return self.sum_a / self.n if self.n else math.nan

    @property
    def quality_b(self) -> float:
        return self.sum_b / self.n if self.n else math.nan

    @property
    def p_value(self) -> float:
        if self.kind == "labels":
            return mcnemar_p(self.a_only, self.b_only)
        return paired_z_p(self.n, self.sum_d, self.sum_d2)

    def _material(self) -> bool:
        """b is worse than a by at least the practical margin (whatever the significance)."""
        if self.kind == "labels":
            return self.quality_b <= self.quality_a - MIN_ACCURACY_DROP
        qa, qb = self.quality_a, self.quality_b
        return qb >= MIN_LOSS_RATIO * qa and qb > qa

    def b_worse(self, alpha: float = ALPHA) -> bool:
        """b is materially and significantly worse than a."""
        return self.n > 0 and self._material() and self.p_value < alpha

    def b_maybe_worse(self, alpha: float = ALPHA) -> bool:
        """b is worse by the practical margin, but the samples do not make it significant."""
        return self.n > 0 and self._material() and not self.p_value < alpha


def choose_reference(
    kind: str,
    outcomes: Sequence[np.ndarray | None],
    fits: Sequence[float | None],
    grouped: Sequence[bool],
    alpha: float = ALPHA,
) -> int | None:
    """The candidate composition that reproduces training best.

    With evidence (``kind`` "labels" or "targets", ``outcomes`` the train path's per-sample
    outcomes under each candidate, on the same samples in the same order): the candidates not
    materially and significantly worse than the best one are contenders; i.i.d. compositions
    are preferred to grouped ones unless a grouped one beats every i.i.d. one (a model trained
    per sample also does well on one-label batches); the best contender wins, the running
    statistics' fit breaking ties.  Without evidence the best fit decides.  ``None``: no candidate.
    """
    arrays = {i: o for i, o in enumerate(outcomes) if o is not None and o.size}
    usable = list(arrays)
    if kind not in ("labels", "targets"):
        fitted = [i for i in range(len(fits)) if fits[i] is not None]
        return min(fitted, key=lambda i: _fit(fits[i])) if fitted else (0 if fits else None)
    if not usable:
        return None
    sign = 1.0 if kind == "labels" else -1.0
    quality = {i: sign * float(np.mean(arrays[i])) for i in usable}
    best = max(usable, key=lambda i: quality[i])

    def worse(i: int, than: int) -> bool:
        a, b = outcomes[than], outcomes[i]
        assert a is not None and b is not None
        return Paired.from_arrays(kind, a, b).b_worse(alpha)

    contenders = [i for i in usable if not worse(i, best)]
    iid = [i for i in contenders if not grouped[i]]
    if iid:
        contenders = iid
    return max(contenders, key=lambda i: (quality[i], -_fit(fits[i])))


def _fit(value: float | None) -> float:
    return math.inf if value is None or not math.isfinite(value) else value


def _disagree(c: Candidate, agreement_threshold: float, divergence_threshold: float) -> bool | None:
    """Do the two paths' outputs differ enough to matter at this composition (None: unknown)?"""
    if c.agreement is not None:
        return c.agreement < agreement_threshold
    if c.rel_divergence is not None:
        return c.rel_divergence > divergence_threshold
    return None


def _quality(value: float | None, metric: str | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1%}" if metric == "accuracy" else f"{metric} {value:.4g}"


def _p(p: float | None) -> str:
    if p is None:
        return ""
    return "p < 1e-12" if p < 1e-12 else f"p = {p:.2g}"


def judge(
    evidence: Evidence,
    agreement_threshold: float,
    divergence_threshold: float,
    alpha: float = ALPHA,
) -> tuple[bool | None, str]:
    """(harmful, the evidence in one sentence): is eval mode measurably worse than training's path?

    ``harmful`` is None when nothing decides (no labels or targets, and the paths disagree where
    training's composition may have been).
    """
    ref = evidence.reference_candidate
    if ref is None:
        return None, "no composition could be run on the train path"
    where = ref.description
    metric = evidence.metric
    if evidence.kind in ("labels", "targets") and ref.quality is not None:
        e, t = evidence.eval_quality, ref.quality
        assert e is not None
        paired = Paired(
            evidence.kind,
            ref.samples,
            t * ref.samples,
            e * ref.samples,
        )
        material = paired._material()
        p = evidence.p_value if evidence.p_value is not None else 1.0
        paths = f"{_quality(e, metric)} in eval mode vs {_quality(t, metric)} with batch statistics"
        trained = (
            " (the composition training used, as stated)"
            if evidence.stated
            else " (the composition that reproduces training best)"
            if evidence.searched
            else ""
        )
        if material and p < alpha:
            return True, f"eval mode is worse: {paths} at {where}{trained}, {_p(p)}"
        if material:
            return None, (
                f"eval mode looks worse ({paths} at {where}) but {ref.samples} samples do not "
                f"make it significant ({_p(p)}): scan more data"
            )
        text = f"eval mode is as good as batch statistics or better: {paths} at {where}{trained}"
        worse = [
            c
            for c in evidence.candidates
            if c.measurable and c.quality is not None and _worse_than_eval(c, e, evidence, alpha)
        ]
        if worse:
            w = min(worse, key=lambda c: c.batch_size or 0)
            text += (
                f"; batch statistics at {w.description} are the worse choice "
                f"({_quality(w.quality, metric)}): the model was not trained that way"
            )
        return False, text
    # No labels or targets: only the outputs' agreement, and the running statistics' fit.
    disagree = _disagree(ref, agreement_threshold, divergence_threshold)
    if disagree is None:
        return None, "the two paths' outputs could not be compared"
    how = _how(ref)
    if evidence.stated:
        if disagree:
            return True, f"eval mode changes the outputs at training's composition ({where}): {how}"
        return False, f"eval mode reproduces training's composition ({where}): {how}"
    fits = [c.fit for c in evidence.candidates if c.measurable and c.fit is not None]
    near = [
        c
        for c in evidence.candidates
        if c.measurable and c.fit is not None and fits and c.fit <= FIT_SLACK * min(fits)
    ] or [ref]
    split = [c for c in near if _disagree(c, agreement_threshold, divergence_threshold)]
    if not split:
        fit_note = (
            f" (the composition the running statistics fit best, fit {ref.fit:.3g})"
            if evidence.searched and ref.fit is not None
            else ""
        )
        return False, f"eval mode matches the train path at {where}{fit_note}: {how}"
    hint = (
        f"; the running statistics fit {where} best (fit {ref.fit:.3g}): the model was likely "
        f"trained with {where}"
        if evidence.searched and ref.fit is not None
        else ""
    )
    return None, (
        f"the paths disagree at {split[0].description} ({_how(split[0])}) and no labels or "
        f"targets say which is right{hint}; labels, targets or the training batch size "
        "(--train-batch-size) decide"
    )


def _how(c: Candidate) -> str:
    if c.agreement is not None:
        return f"predictions agree on {c.agreement:.1%}"
    return f"output divergence {c.rel_divergence:.3g}"


def _worse_than_eval(c: Candidate, eval_quality: float, evidence: Evidence, alpha: float) -> bool:
    """The train path under ``c`` is materially and significantly worse than eval mode."""
    if c.quality is None or c.p_value is None or c.p_value >= alpha:
        return False
    if evidence.kind == "labels":
        return c.quality <= eval_quality - MIN_ACCURACY_DROP
    return c.quality >= MIN_LOSS_RATIO * eval_quality and c.quality > eval_quality

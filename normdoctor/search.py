"""The composition search: which batch composition reproduces training?

Users do not know how a checkpoint was trained, and the train path shows training's behaviour
only with batches composed like training's (DESIGN.md).  The search runs the train path once
per candidate composition (batch sizes 1, 2, 4, 8, 32, 128 as the data allows, the scan's own,
and with labels one-label batches), keeps each path's per-sample outcomes by sample index, and
then runs the eval path once, at the composition chosen as the reference: number of candidates
+ 1 passes in all.  Eval-mode outputs of a sample do not depend on its batch mates, so that one
eval pass pairs with every candidate's train pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .batching import plan_batches
from .recording import LayerMeasurement

__all__ = ["CANDIDATE_BATCH_SIZES", "Outcomes", "Spec", "candidate_specs"]

#: The batch sizes tried (those the data allows), besides the scan's own.
CANDIDATE_BATCH_SIZES = (1, 2, 4, 8, 32, 128)
#: Batch size of the one-label candidate (class-sorted training), unless the scan's is larger.
GROUPED_BATCH_SIZE = 32
#: Outputs kept per candidate for the output comparison (float32 elements, 128 MB).
MAX_KEPT_OUTPUTS = 1 << 25


@dataclass(frozen=True, slots=True)
class Spec:
    """A candidate composition: batches of ``batch_size``, shuffled, optionally one label each."""

    batch_size: int
    group_by: str | None = None

    @property
    def description(self) -> str:
        if self.group_by:
            return f"batches of {self.batch_size} from one label"
        return "batch size 1" if self.batch_size == 1 else f"batches of {self.batch_size}"


def candidate_specs(
    samples: int, batch_size: int | None, group_by: str | None, labelled: bool
) -> list[Spec]:
    """The compositions to try: the scan's own first, then the standard batch sizes."""
    specs: list[Spec] = []
    if batch_size is not None:
        specs.append(Spec(batch_size, group_by))
    specs += [Spec(b) for b in CANDIDATE_BATCH_SIZES if b <= max(samples // 2, 1)]
    if labelled:
        specs.append(Spec(max(GROUPED_BATCH_SIZE, batch_size or 0), "label"))
    return list(dict.fromkeys(specs))


@dataclass
class Outcomes:
    """One path's per-sample outcomes, by sample index (CPU NumPy; NaN/-1 where not seen)."""

    samples: int
    kind: str | None = None  # "labels", "targets" or None
    pred: np.ndarray | None = None
    correct: np.ndarray | None = None
    loss: np.ndarray | None = None
    outputs: np.ndarray | None = None
    seen: np.ndarray = field(init=False)
    keep_outputs: bool = True

    def __post_init__(self) -> None:
        self.seen = np.zeros(self.samples, dtype=bool)

    def add(
        self,
        index: torch.Tensor,
        out: torch.Tensor,
        pred: torch.Tensor | None,
        correct: torch.Tensor | None,
        loss: torch.Tensor | None,
    ) -> None:
        idx = index.numpy()
        self.seen[idx] = True
        n = self.samples
        if pred is not None:
            if self.pred is None:
                self.pred = np.full(n, -1, dtype=np.int64)
            self.pred[idx] = pred.cpu().numpy()
        if correct is not None:
            if self.correct is None:
                self.correct = np.zeros(n, dtype=bool)
            self.correct[idx] = correct.cpu().numpy()
        if loss is not None:
            if self.loss is None:
                self.loss = np.full(n, np.nan)
            self.loss[idx] = loss.cpu().numpy()
        if self.keep_outputs:
            flat = out.detach().reshape(out.shape[0], -1)
            if self.outputs is None:
                if n * flat.shape[1] > MAX_KEPT_OUTPUTS:
                    self.keep_outputs = False
                    return
                self.outputs = np.full((n, flat.shape[1]), np.nan, dtype=np.float32)
            if flat.shape[1] != self.outputs.shape[1]:
                self.keep_outputs, self.outputs = False, None
                return
            self.outputs[idx] = flat.float().cpu().numpy()

    def evidence(self) -> np.ndarray | None:
        """The per-sample outcome that decides: correct (labels) or loss (targets)."""
        return self.correct if self.correct is not None else self.loss


@dataclass
class Trial:
    """What one candidate's train pass left: outcomes, layer measurements, batch sizes."""

    spec: Spec
    outcomes: Outcomes | None = None
    results: dict[str, LayerMeasurement | None] | None = None
    order: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    error: str | None = None  # why this composition cannot be run on the train path


def sample_plan(data: Any, spec: Spec, seed: int, subset: torch.Tensor | None) -> Any:
    """Batches of ``spec`` over the chosen samples (shuffled with ``seed``)."""
    return plan_batches(
        data,
        batch_size=spec.batch_size,
        shuffle=True,
        seed=seed,
        group_by=spec.group_by,
        max_batches=None,
        subset=subset,
    )


def agreement(a: Outcomes, b: Outcomes, mask: np.ndarray) -> float | None:
    if a.pred is None or b.pred is None or not mask.any():
        return None
    return float((a.pred[mask] == b.pred[mask]).mean())


def divergence(train: Outcomes, eval_: Outcomes, mask: np.ndarray) -> float | None:
    """Relative RMS difference of the outputs over the samples both kept (finite values)."""
    if train.outputs is None or eval_.outputs is None or not mask.any():
        return None
    t = train.outputs[mask].astype(np.float64)
    e = eval_.outputs[mask].astype(np.float64)
    ok = np.isfinite(t) & np.isfinite(e)
    diff = float(np.square(np.where(ok, t - e, 0.0)).sum())
    norm = float(np.square(np.where(ok, t, 0.0)).sum())
    if norm > 0:
        return float(np.sqrt(diff / norm))
    return 0.0 if diff == 0 else None


def overall_fit(fits: Sequence[float | None]) -> float | None:
    """RMS over layers of the per-layer fit (None when no layer has one)."""
    values = [f for f in fits if f is not None and np.isfinite(f)]
    return float(np.sqrt(np.mean(np.square(values)))) if values else None

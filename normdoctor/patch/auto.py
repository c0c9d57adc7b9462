"""Automatic patching: which layers matter (:func:`impact`), scan -> fix -> scan again
(:func:`autopatch`), and whether the patched model measures at least as good as its original
(:func:`verify_patch`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._globals import preserved_globals
from ..batching import GroupBy
from ..convert.core import has_running_stats
from ..convert.record import record, records
from ..convert.select import resolve, split_options
from ..convert.targets import BATCHSTATS, RECALIBRATE, RENORM
from ..errors import ConversionError, DataError
from ..report import ScanReport
from ..scan import path_outcomes, scan
from ..search import agreement as search_agreement
from ..search import divergence as search_divergence
from ..sources import Scannable
from ..sources.torch import Probe, default_forward, model_device_dtype, output_tensor, to_device
from .fix import apply_plan
from .graph import apply_groups, is_graph
from .recalibrate import Forward, batch_source

__all__ = ["PatchCheck", "autopatch", "impact", "verify_patch"]


# =============================================================================== impact


def impact(
    model: nn.Module,
    data: Any,
    layers: str | Sequence[str] | ScanReport | None = None,
    *,
    batch_size: int | None = 32,
    shuffle: bool = True,
    seed: int = 0,
    group_by: GroupBy = None,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    forward: Forward | None = None,
) -> list[tuple[str, float]]:
    """How much each layer's drift alone changes the model's output, largest first.

    For each layer: on the train path (every norm layer normalizes with its batch's statistics,
    as in training), switch only that layer to its running statistics and measure the relative
    RMS change of the output, ``sqrt(sum (y_L - y_train)^2 / sum y_train^2)`` over all batches
    (the scan's end-to-end divergence, restricted to one layer).  Batches should be composed like
    training's (batch size, order, grouping), as for :func:`normdoctor.scan`.

    Args:
        layers: ``None`` (every BatchNorm with running statistics), names/globs, or a ScanReport
            (its flagged layers).

    Returns:
        ``[(name, output_change), ...]`` sorted by decreasing change (NaN last).  The model is
        left exactly as it was.
    """
    modules = dict(model.named_modules())
    # BatchNorm layers with running statistics: those the train path can switch to them.
    selected = resolve(model, layers, BATCHSTATS if layers is None else RECALIBRATE)
    names = [
        n for n in selected if isinstance(modules[n], _BatchNorm) and has_running_stats(modules[n])
    ]
    if not names:
        return []
    batches = batch_source(
        data,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by=group_by,
        max_batches=max_batches,
    )
    fwd = forward or default_forward
    home, dtype = model_device_dtype(model)
    run_device = torch.device(device) if device is not None else home
    moved = run_device != home
    diff = {n: 0.0 for n in names}
    norm = 0.0
    if moved:
        model.to(run_device)
    try:
        with Probe(model, [], paths=("train",)) as probe, torch.no_grad():
            for batch in batches():
                batch = to_device(batch, run_device, dtype)
                with probe.path("train"):
                    ref = output_tensor(fwd(model, batch.inputs))
                    if ref is None:
                        raise DataError("the model's output holds no tensor to compare")
                    ref64 = ref.double()
                    norm += float(ref64.square().sum())
                    for n in names:
                        module = modules[n]
                        module.training = False
                        try:
                            out = output_tensor(fwd(model, batch.inputs))
                        finally:
                            module.training = True
                        assert out is not None
                        diff[n] += float((out.double() - ref64).square().sum())
    finally:
        if moved:
            model.to(home)
    result = [
        (n, math.sqrt(d / norm) if norm > 0 else (0.0 if d == 0 else math.inf))
        for n, d in diff.items()
    ]
    result.sort(key=lambda t: (math.isnan(t[1]), -t[1] if not math.isnan(t[1]) else 0.0))
    return result


# ============================================================================ autopatch


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PatchCheck:
    """Whether a patched model measures at least as good as its original, on the same samples.

    ``metric``: "accuracy" or "mse"/"loss" (eval mode of both models, labels or targets), or
    "agreement" (no labels or targets: agreement of each model's eval mode with the original's
    train path under training's composition, the reference the scan judged against).
    """

    ok: bool
    metric: str
    before: float | None
    after: float | None
    samples: int
    text: str


def verify_patch(
    original: nn.Module | Scannable,
    patched: nn.Module | Scannable,
    data: Any,
    report: ScanReport,
    *,
    max_batches: int | None = None,
    forward: Forward | None = None,
    device: Any = None,
    loss: Any = None,
) -> PatchCheck:
    """Measure ``patched`` against ``original`` in eval mode on the samples ``report`` scanned.

    With labels or targets the patched model must be at least as accurate (or its loss at most
    as large) as the original; without them its eval-mode outputs must agree with the
    original's train path (under the report's composition) at least as well as the original's
    eval mode does.  Costs two eval passes (three without labels or targets).
    """
    c = report.composition
    if c.batch_size is None:
        return PatchCheck(
            ok=True,
            metric="none",
            before=None,
            after=None,
            samples=0,
            text="not verified per sample: the data came as formed batches",
        )
    opts: dict[str, Any] = dict(
        batch_size=c.batch_size,
        group_by=c.group_by,
        seed=c.seed or 0,
        max_batches=max_batches,
        forward=forward,
        device=device,
        loss=loss,
    )
    a = path_outcomes(original, data, "eval", **opts)
    b = path_outcomes(patched, data, "eval", **opts)
    mask = a.seen & b.seen
    n = int(mask.sum())
    ea, eb = a.evidence(), b.evidence()
    if ea is not None and eb is not None:
        labels = a.correct is not None
        qa, qb = float(ea[mask].mean()), float(eb[mask].mean())
        metric = "accuracy" if labels else ("mse" if loss is None else "loss")
        ok = qb >= qa if labels else qb <= qa
        shown = (lambda q: f"{q:.1%}") if labels else (lambda q: f"{q:.4g}")
        text = f"eval-mode {metric} {shown(qa)} -> {shown(qb)} on {n} samples"
        return PatchCheck(ok=ok, metric=metric, before=qa, after=qb, samples=n, text=text)
    ref = path_outcomes(original, data, "train", **opts)
    mask &= ref.seen
    before = search_agreement(a, ref, mask)
    after = search_agreement(b, ref, mask)
    what = "prediction agreement"
    if before is None or after is None:
        before, after = search_divergence(ref, a, mask), search_divergence(ref, b, mask)
        what = "output divergence"
        ok = before is not None and after is not None and after <= before
    else:
        ok = after >= before
    text = (
        f"{what} with the original's train path ({c.description}) {before:.3g} -> {after:.3g}"
        if before is not None and after is not None
        else "outputs could not be compared"
    )
    return PatchCheck(
        ok=ok,
        metric="agreement" if what.startswith("prediction") else "divergence",
        before=before,
        after=after,
        samples=int(mask.sum()),
        text=text,
    )


@preserved_globals()
def autopatch(
    model: nn.Module | Scannable,
    data: Any,
    *,
    batch_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    group_by: GroupBy = None,
    max_batches: int | None = None,
    calib_data: Any = None,
    renorm_as: str = BATCHSTATS,
    minimal: bool = False,
    prior: float = 0.0,
    recalibrate_mode: str = "sequential",
    **scan_options: Any,
) -> tuple[Any, ScanReport, ScanReport]:
    """Scan, apply each flagged layer's recommendation, scan again with the same batches.

    1. ``before = scan(model, data, ...)``.  Nothing flagged: a copy of the model is returned
       unchanged (``after is before``).
    2. The flagged layers are ranked by :func:`impact` (reported in a note of ``after``) and
       each gets its recommendation.  With ``minimal=True``, only the shortest prefix of that
       ranking whose fix reproduces training as well as fixing every flagged layer is changed:
       the patched model's eval-mode outputs are compared with the original's train-path
       outputs on the scan's batches (prediction agreement for classifiers, relative RMS
       difference otherwise); layers whose fix changes nothing that matters stay untouched.
    3. ``after = scan(patched, data, ...)`` under the composition ``before`` judged against
       (the composition search's reference by default), and :func:`verify_patch` measures the
       patched model against the original on the same samples (eval-mode accuracy or loss
       with labels or targets; agreement with the original's train path without).  Its
       :class:`PatchCheck` is ``patched.normdoctor_verification``; a patch that measures worse
       is warned about (the CLI writes nothing then).

    Nothing is patched (a copy of the model comes back, ``after is before``) unless the scan
    found eval mode harmful: a model whose eval mode is as good as batch statistics, or whose
    verdict is undetermined, has no measured harm to fix.

    A ``renorm`` recommendation needs fine-tuning, which autopatch cannot do: it applies
    ``renorm_as`` instead (``"batchstats"`` by default, an inference-time fix that reproduces
    training when inference batches are composed like the scan's), and says so in a note;
    ``renorm_as="renorm"`` converts to BatchRenorm (unchanged until fine-tuned).

    Args:
        data, batch_size, shuffle, seed, group_by, max_batches: the scan's data and batch
            composition; use training's (batch size 1 for per-sample training,
            ``shuffle=False, group_by="label"`` for class-sorted training).
        calib_data: data for recalibration (default: ``data``).
        renorm_as: ``"batchstats"``, ``"renorm"`` or ``"skip"``.
        minimal: change as few layers as needed (see 2.); default ``False``: every flagged layer
            is fixed, which lowers the drift of each.
        prior: ``prior`` of batchstats conversions.
        recalibrate_mode: ``mode`` of :func:`recalibrate`.
        scan_options: more options of :func:`normdoctor.scan` (thresholds, device, forward...).

    An :class:`~normdoctor.sources.onnx.OnnxModel` goes through the same scan, plan and
    verification; its flagged nodes are rewritten by the graph itself (``renorm`` as
    ``batchstats``; no ``minimal`` ranking, which switches modules one at a time).

    Returns:
        ``(patched_model, before, after)``; a patched PyTorch model carries
        ``normdoctor_conversions``.
    """
    if renorm_as not in (BATCHSTATS, RENORM, "skip"):
        raise ValueError(f"renorm_as must be 'batchstats', 'renorm' or 'skip', got {renorm_as!r}")
    if "paths" in scan_options:
        raise TypeError("autopatch compares both paths: do not pass paths")
    composition: dict[str, Any] = dict(
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by=group_by,
        max_batches=max_batches,
    )
    graph = is_graph(model)
    if graph and renorm_as == RENORM:
        raise ConversionError("renorm needs fine-tuning, which an ONNX graph cannot do")
    if graph and minimal:
        raise ConversionError("minimal=True ranks layers by switching modules: PyTorch only")
    before = scan(model, data, **composition, **scan_options)
    if not before.flagged:
        unchanged = copy.deepcopy(model)
        if isinstance(model, nn.Module) and isinstance(unchanged, nn.Module):
            record(unchanged, [], records(model))
        return unchanged, before, before
    # Fix and verify under the composition the scan judged against (the search's reference).
    c = before.composition
    if c.batch_size is not None:
        composition.update(
            batch_size=c.batch_size,
            group_by=c.group_by if c.group_by != "key" else composition["group_by"],
            shuffle=c.order == "shuffle",
            seed=c.seed if c.seed is not None else seed,
        )
    scan_options = {
        k: v
        for k, v in scan_options.items()
        if k not in ("search", "train_batch_size", "train_group_by")
    }
    notes: list[str] = []
    plan: dict[str, str] = {}
    for r in before.flagged_layers:
        kind = str(r.recommendation)
        if kind == RENORM and renorm_as != RENORM:
            if renorm_as == "skip":
                notes.append(f"{r.name}: renorm recommended; skipped (renorm_as='skip')")
                continue
            notes.append(
                f"{r.name}: renorm recommended (fine-tune with patch(to='renorm') for a fix that "
                f"does not depend on batch composition); applied {renorm_as}, which reproduces "
                "training only when inference batches are composed like the scan's "
                f"({before.composition.description})"
            )
            kind = renorm_as
        elif kind == RENORM:
            notes.append(
                f"{r.name}: converted to BatchRenorm; inference is unchanged until the "
                "model is fine-tuned in train mode"
            )
        plan[r.name] = kind
    fwd = scan_options.get("forward")
    run_device = scan_options.get("device")
    calib = data if calib_data is None else calib_data
    if graph:
        groups: dict[str, list[str]] = {}
        for name, kind in plan.items():
            groups.setdefault(kind, []).append(name)
        rewrite = {"batch_size": composition["batch_size"] or 64, "max_batches": max_batches}
        providers = scan_options.get("providers")
        if providers is not None:
            rewrite["providers"] = providers
        patched_graph = apply_groups(model, groups, calib, rewrite)
        return _verified(model, patched_graph, data, before, composition, scan_options, notes)
    assert isinstance(model, nn.Module)
    recal_opts = {"mode": recalibrate_mode, "device": run_device}

    def build(names: Sequence[str]) -> nn.Module:
        sub = {n: plan[n] for n in names}
        kinds = set(sub.values())
        opts: dict[str, Any] = {}
        if BATCHSTATS in kinds:
            opts["prior"] = prior
        if RECALIBRATE in kinds:
            opts.update({k: v for k, v in recal_opts.items() if v is not None})
        per_kind = split_options(kinds, opts)
        if fwd is not None and RECALIBRATE in per_kind:
            per_kind[RECALIBRATE]["forward"] = fwd
        return apply_plan(model, sub, per_kind, inplace=False, data=calib, forward=fwd)

    ranking = impact(model, data, list(plan), forward=fwd, device=run_device, **composition)
    # Layers impact cannot switch (no BatchNorm running statistics) go last, in scan order.
    ranked = [n for n, _ in ranking] + [n for n in plan if n not in dict(ranking)]
    if len(ranking) > 1:
        notes.append(
            "impact ranking (relative output change from this layer's drift alone): "
            + ", ".join(f"{n} {c:.3g}" for n, c in ranking)
        )
    full = build(ranked)
    chosen = ranked
    if minimal and len(ranked) > 1:
        reference = _train_path_outputs(model, data, composition, fwd, run_device)
        target = _fidelity(full, data, composition, fwd, run_device, reference)
        for k in range(1, len(ranked)):
            candidate = build(ranked[:k])
            score = _fidelity(candidate, data, composition, fwd, run_device, reference)
            if _as_good(score, target):
                chosen, full = ranked[:k], candidate
                notes.append(
                    f"minimal fix: {', '.join(chosen)} reproduce(s) training as well as fixing "
                    f"every flagged layer; left unchanged: {', '.join(ranked[k:])}"
                )
                break
    patched = full if chosen else copy.deepcopy(model)
    return _verified(model, patched, data, before, composition, scan_options, notes)


def _verified(
    model: Any,
    patched: Any,
    data: Any,
    before: ScanReport,
    composition: dict[str, Any],
    scan_options: dict[str, Any],
    notes: list[str],
) -> tuple[Any, ScanReport, ScanReport]:
    """Scan ``patched`` again under ``composition`` and measure it against ``model``."""
    fwd = scan_options.get("forward")
    run_device = scan_options.get("device")
    max_batches = composition.get("max_batches")
    after = scan(patched, data, **composition, **scan_options)
    check = verify_patch(
        model,
        patched,
        data,
        before,
        max_batches=max_batches,
        forward=fwd,
        device=run_device,
        loss=scan_options.get("loss"),
    )
    patched.normdoctor_verification = check  # type: ignore[assignment]
    if not check.ok:
        message = f"autopatch: the patched model measures worse than the original ({check.text})"
        warnings.warn(message, stacklevel=2)
        notes.append("WARNING: " + message)
    else:
        notes.append(f"verified: {check.text}")
    if notes:
        after = dataclasses.replace(after, notes=(*after.notes, *notes))
    return patched, before, after


def _train_path_outputs(
    model: nn.Module,
    data: Any,
    composition: dict[str, Any],
    forward: Forward | None,
    device: Any,
) -> list[torch.Tensor]:
    fwd = forward or default_forward
    home, dtype = model_device_dtype(model)
    run = torch.device(device) if device is not None else home
    outs = []
    with Probe(model, [], paths=("train",)) as probe, torch.no_grad():
        for batch in batch_source(data, **composition)():
            with probe.path("train"):
                out = output_tensor(fwd(model, to_device(batch, run, dtype).inputs))
            assert out is not None
            outs.append(out.detach())
    return outs


def _fidelity(
    candidate: nn.Module,
    data: Any,
    composition: dict[str, Any],
    forward: Forward | None,
    device: Any,
    reference: list[torch.Tensor],
) -> tuple[float | None, float]:
    """(prediction agreement or None, relative RMS difference): the candidate in eval mode
    against the original model's train-path outputs on the same batches."""
    fwd = forward or default_forward
    home, dtype = model_device_dtype(candidate)
    run = torch.device(device) if device is not None else home
    agree = total = 0
    diff = norm = 0.0
    classifier = True
    flags = [(m, m.training) for m in candidate.modules()]
    candidate.eval()
    try:
        with torch.no_grad():
            for batch, ref in zip(batch_source(data, **composition)(), reference, strict=True):
                out = output_tensor(fwd(candidate, to_device(batch, run, dtype).inputs))
                assert out is not None
                diff += float((out.double() - ref.double()).square().sum())
                norm += float(ref.double().square().sum())
                if out.dim() == 2 and out.shape[1] > 1:
                    agree += int((out.argmax(1) == ref.argmax(1)).sum())
                    total += out.shape[0]
                else:
                    classifier = False
    finally:
        for m, flag in flags:
            m.training = flag
    rel = math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
    return (agree / total if classifier and total else None), rel


#: How much larger than the full fix's relative output difference a minimal fix may be (for
#: models that are not classifiers): 1% of the output RMS, far below the scan's divergence
#: threshold, so a layer is left alone only when fixing it changes next to nothing.
_MINIMAL_DIVERGENCE_SLACK = 0.01


def _as_good(score: tuple[float | None, float], target: tuple[float | None, float]) -> bool:
    if score[0] is not None and target[0] is not None:
        return score[0] >= target[0]
    return score[1] <= target[1] + _MINIMAL_DIVERGENCE_SLACK

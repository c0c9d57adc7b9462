"""Automatic patching: which layers matter (:func:`impact`), scan -> fix -> scan again
(:func:`autopatch`), and whether the patched model measures at least as good as its original
(:func:`verify_patch`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._globals import preserved_globals
from ..assemble import sample_outcomes
from ..batching import Batch, GroupBy, plan_batches, sample_level
from ..convert.core import has_running_stats
from ..convert.record import record, records
from ..convert.select import resolve, split_options
from ..convert.targets import BATCHSTATS, RECALIBRATE, RENORM
from ..errors import ConversionError, DataError
from ..recording import PathName
from ..report import ScanReport
from ..scan import path_outcomes, sample_info, scan
from ..search import MAX_KEPT_OUTPUTS, Outcomes
from ..search import agreement as search_agreement
from ..search import divergence as search_divergence
from ..sources import Scannable, Session, Source, as_source
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


# ================================================================= passes kept for reuse


@dataclasses.dataclass
class _Pass:
    """What one path of one scan session returned, batch by batch: sample indices, labels,
    size and output (the output's first tensor, as ``path_outcomes`` reads it)."""

    path: str
    batches: list[tuple[torch.Tensor | None, torch.Tensor | None, int, torch.Tensor | None]] = (
        dataclasses.field(default_factory=list)
    )
    elements: int = 0
    kept: bool = True

    def keep(self, batch: Batch, out: torch.Tensor | None) -> None:
        if not self.kept:
            return
        self.elements += out.numel() if out is not None else 0
        if self.elements > MAX_KEPT_OUTPUTS:  # as much as the search keeps of one pass
            self.kept, self.batches = False, []
            return
        self.batches.append((batch.index, batch.labels, batch.size, out))

    def ran(self, indices: list[torch.Tensor]) -> bool:
        """Whether this pass ran exactly these batches (the same samples, in the same order)."""
        return len(indices) == len(self.batches) and all(
            index is not None and torch.equal(index, wanted)
            for (index, _, _, _), wanted in zip(self.batches, indices, strict=True)
        )

    def outcomes(self, samples: int, loss: Any) -> Outcomes:
        """The per-sample outcomes, exactly as ``path_outcomes`` computes them from a pass."""
        outcomes = Outcomes(samples)
        for index, labels, size, out in self.batches:
            if out is not None and index is not None:
                outcomes.add(index, out, *sample_outcomes(out, labels, size, loss))
        return outcomes


class _TapedSession:
    """A :class:`~normdoctor.sources.Session` that hands each output to a :class:`_Pass`."""

    def __init__(self, session: Session, paths: Sequence[PathName]) -> None:
        self.session = session
        self.passes = {p: _Pass(p) for p in paths}

    # The wrapped session's own attributes, read when asked (a session may rebind them).
    @property
    def order(self) -> list[str]:
        return self.session.order

    @order.setter
    def order(self, value: list[str]) -> None:
        self.session.order = value

    @property
    def single_value(self) -> dict[str, int]:
        return self.session.single_value

    @single_value.setter
    def single_value(self, value: dict[str, int]) -> None:
        self.session.single_value = value

    @property
    def notes(self) -> list[str]:
        return self.session.notes

    def prepare(self, batch: Batch) -> Batch:
        return self.session.prepare(batch)

    def run(self, path: PathName, batch: Batch, index: int) -> Any:
        out = self.session.run(path, batch, index)
        self.passes[path].keep(batch, output_tensor(out))
        return out

    def results(self, path: PathName) -> Any:
        return self.session.results(path)

    def recorders(self) -> Any:
        return self.session.recorders()


class _Tape:
    """A model's :class:`~normdoctor.sources.Source` that keeps what each path of each of its
    sessions returned, so that :func:`autopatch`'s verification takes the outcomes of a pass
    its scans already ran (the same model, path and batches) instead of running it again.

    Kept: passes whose session ended normally, with every batch's output (the batches that ran
    before a candidate composition failed are a pass over those batches).  Not kept: a session
    with layers that got one value per channel (``path_outcomes`` refuses it), a pass whose
    outputs hold more than the search keeps of one pass.
    """

    def __init__(self, source: Source, loss: Any) -> None:
        self.source = source
        self.loss = loss
        self.name = source.name
        self.layers = source.layers
        self.measures = source.measures
        self.folded = source.folded
        self.passes: list[_Pass] = []

    def notes(self) -> list[str]:
        return self.source.notes()

    def states(self) -> Any:
        return self.source.states()

    def static_checks(self) -> Any:
        return self.source.static_checks()

    def input_files(self) -> Any:
        return self.source.input_files()

    def placed(self) -> contextlib.AbstractContextManager[None]:
        return self.source.placed()

    def finish(self, report: ScanReport) -> ScanReport:
        return self.source.finish(report)

    @contextlib.contextmanager
    def session(self, paths: Sequence[PathName]) -> Iterator[Session]:
        with self.source.session(paths) as session:
            taped = _TapedSession(session, paths)
            yield taped
            if session.single_value:
                return
        self.passes.extend(p for p in taped.passes.values() if p.kept)

    def outcomes(self, path: str, data: Any, plan: dict[str, Any]) -> Outcomes | None:
        """The outcomes of the kept pass on ``path`` over the batches ``path_outcomes(data,
        path, **plan)`` forms, or None when no kept pass ran exactly those."""
        info = sample_info(data)
        indices = _planned_indices(data, plan)
        if info is None or indices is None:
            return None
        for kept in self.passes:
            if kept.path == path and kept.ran(indices):
                return kept.outcomes(info[0], self.loss)
        return None

    def prune(self, data: Any, plan: dict[str, Any] | None) -> None:
        """Forget every pass but those over the batches of ``plan`` (memory)."""
        indices = _planned_indices(data, plan) if plan is not None else None
        self.passes = [p for p in self.passes if indices is not None and p.ran(indices)]


def _taped(model: Any, scan_options: dict[str, Any]) -> _Tape | None:
    """A tape of ``model``'s source as :func:`~normdoctor.scan.path_outcomes` builds it (None
    where the scan's source would differ from it: ONNX execution providers chosen)."""
    if scan_options.get("providers") is not None:
        return None
    fwd, run_device = scan_options.get("forward"), scan_options.get("device")
    return _Tape(as_source(model, forward=fwd, device=run_device), scan_options.get("loss"))


def _planned_indices(data: Any, plan: dict[str, Any]) -> list[torch.Tensor] | None:
    """The sample indices of the shuffled batches ``path_outcomes`` forms under ``plan``,
    without reading a sample: batches depend on the number of samples and their labels only.
    None where that needs the data read (one-label batches from a Dataset) or fails."""
    level = sample_level(data)
    if level is None:
        return None
    _, inputs, labels = level
    n = len(inputs)
    group_by = plan["group_by"]
    if group_by is not None and (not isinstance(group_by, str) or labels is None):
        return None
    stand_in: Any = torch.zeros(n) if group_by is None else (torch.zeros(n), labels)
    try:
        formed = plan_batches(stand_in, shuffle=True, **plan)
    except DataError:
        return None
    return [b.index for b in formed.batches if b.index is not None]


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
    run = dict(max_batches=max_batches, forward=forward, device=device, loss=loss)
    return _verify(original, patched, data, report, run, None, None)


def _verify_plan(report: ScanReport, max_batches: int | None) -> dict[str, Any] | None:
    """The batches :func:`verify_patch` compares on (``path_outcomes``' plan options)."""
    c = report.composition
    if c.batch_size is None:
        return None
    return dict(
        batch_size=c.batch_size, group_by=c.group_by, seed=c.seed or 0, max_batches=max_batches
    )


def _verify(
    original: Any,
    patched: Any,
    data: Any,
    report: ScanReport,
    run: dict[str, Any],
    kept_original: _Tape | None,
    kept_patched: _Tape | None,
) -> PatchCheck:
    """:func:`verify_patch`, taking each pass from a tape of the same model's scan when it ran
    exactly these batches on that path (the same outcomes as running it again)."""
    c = report.composition
    plan = _verify_plan(report, run["max_batches"])
    if plan is None:
        return PatchCheck(
            ok=True,
            metric="none",
            before=None,
            after=None,
            samples=0,
            text="not verified per sample: the data came as formed batches",
        )
    opts: dict[str, Any] = {**run, **plan}
    loss = run["loss"]

    def outcomes(model: Any, kept: _Tape | None, path: PathName) -> Outcomes:
        found = kept.outcomes(path, data, plan) if kept is not None else None
        return found if found is not None else path_outcomes(model, data, path, **opts)

    a = outcomes(original, kept_original, "eval")
    b = outcomes(patched, kept_patched, "eval")
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
    ref = outcomes(original, kept_original, "train")
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
    2. Each flagged layer gets its recommendation.  With ``minimal=True``, the flagged layers
       are ranked by :func:`impact` (reported in a note of ``after``) and only the shortest
       prefix of that ranking whose fix reproduces training as well as fixing every flagged
       layer is changed: the patched model's eval-mode outputs are compared with the
       original's train-path outputs on the scan's batches (prediction agreement for
       classifiers, relative RMS difference otherwise); layers whose fix changes nothing that
       matters stay untouched.  The ranking costs a pass per flagged layer, so the default
       (fix them all) does not compute it (:func:`impact` with ``before`` and the batch
       composition ``before`` reports gives it).
    3. ``after = scan(patched, data, ...)`` under the composition ``before`` judged against
       (the composition search's reference by default), and :func:`verify_patch` measures the
       patched model against the original on the same samples (eval-mode accuracy or loss
       with labels or targets; agreement with the original's train path without).  Its
       :class:`PatchCheck` is ``patched.normdoctor_verification``; a patch that measures worse
       is warned about (the CLI writes nothing then).  The verification takes each pass from
       the two scans where they ran it (the same model, path and batches: the original's
       eval and train paths from ``before``, the patched model's eval path from ``after``),
       so it runs a pass itself only where they did not (an unshuffled composition, ONNX
       execution providers chosen): the same numbers either way.

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
    kept = _taped(model, scan_options)  # the verification's passes of the original
    before = scan(model if kept is None else kept, data, **composition, **scan_options)
    if not before.flagged:
        unchanged = copy.deepcopy(model)
        if isinstance(model, nn.Module) and isinstance(unchanged, nn.Module):
            record(unchanged, [], records(model))
        return unchanged, before, before
    if kept is not None:  # keep only the passes over the verification's batches
        kept.prune(data, _verify_plan(before, max_batches))
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
        return _verified(model, patched_graph, data, before, composition, scan_options, notes, kept)
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

    ranked = list(plan)  # scan order
    if minimal and len(plan) > 1:  # only a minimal fix needs the ranking (a pass per layer)
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
    return _verified(model, patched, data, before, composition, scan_options, notes, kept)


def _verified(
    model: Any,
    patched: Any,
    data: Any,
    before: ScanReport,
    composition: dict[str, Any],
    scan_options: dict[str, Any],
    notes: list[str],
    kept: _Tape | None,
) -> tuple[Any, ScanReport, ScanReport]:
    """Scan ``patched`` again under ``composition`` and measure it against ``model``, with the
    passes the two scans ran where they are the verification's (``kept``: the original's)."""
    kept_patched = _taped(patched, scan_options)
    after = scan(
        patched if kept_patched is None else kept_patched, data, **composition, **scan_options
    )
    run = dict(
        max_batches=composition.get("max_batches"),
        forward=scan_options.get("forward"),
        device=scan_options.get("device"),
        loss=scan_options.get("loss"),
    )
    check = _verify(model, patched, data, before, run, kept, kept_patched)
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

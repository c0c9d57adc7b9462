"""``scan()``: run batches through both paths, record, score, judge."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

import torch
from torch import nn
from torch.utils.data._utils.collate import default_collate

from . import distributed as _dist
from ._globals import paused_gc, preserved_globals
from .assemble import (
    DEFAULT_AGREEMENT_THRESHOLD,
    DEFAULT_DIVERGENCE_THRESHOLD,
    EndToEndMeter,
    LossFn,
    assemble_report,
    sample_outcomes,
)
from .batching import Gather, GroupBy, first_tensor, plan_batches, sample_level, split_batch
from .errors import CompositionError, DataError, ScanError
from .metrics import (
    DEFAULT_NONIID_THRESHOLD,
    DEFAULT_THRESHOLD,
    layer_score,
)
from .progress import ProgressArg, with_progress
from .recording import PATHS, LayerMeasurement
from .report import (
    Candidate,
    Composition,
    EndToEnd,
    Evidence,
    ScanReport,
    finite_or_none,
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
from .sources import Scannable, Session, Source, as_source
from .sources.torch import output_tensor
from .verdict import ALPHA, Paired, choose_reference

__all__ = [
    "DEFAULT_AGREEMENT_THRESHOLD",
    "DEFAULT_DIVERGENCE_THRESHOLD",
    "EndToEndMeter",
    "assemble_report",
    "scan",
    "sweep_batch_sizes",
]

Forward = Callable[[nn.Module, Any], Any]
Progress = Callable[[int, int | None], None]


def _validate(paths: Sequence[str], threshold: float) -> tuple[str, ...]:
    if isinstance(paths, str):
        paths = tuple(p.strip() for p in paths.split(","))
    paths = tuple(dict.fromkeys(paths))
    if not paths or any(p not in PATHS for p in paths):
        raise ValueError(f"paths must be a non-empty subset of {PATHS}, got {paths!r}")
    if not (threshold > 0):
        raise ValueError(f"threshold must be positive, got {threshold!r}")
    return paths


@with_progress
@preserved_globals()
def scan(
    model: nn.Module | Scannable | Source,
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
    progress: ProgressArg = None,
    model_name: str | None = None,
    distributed: bool = False,
    train_batch_size: int | None = None,
    train_group_by: GroupBy = None,
    search: bool | None = None,
    loss: LossFn | None = None,
    alpha: float = ALPHA,
    providers: Sequence[str] | None = None,
) -> ScanReport:
    """Measure how far each norm layer's eval-mode behaviour drifts from its train-mode behaviour,
    and judge from evidence which of the two paths the model should run.

    Args:
        model: the model: an ``nn.Module``, an :class:`~normdoctor.sources.onnx.OnnxModel` or
            any :class:`~normdoctor.sources.Source`; left exactly as it was (parameters,
            buffers, ``training`` flags, hooks).
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
        progress: ``True``: a progress bar on stderr (rich's; it renders in Jupyter too);
            ``False`` or ``None`` (the default): none; a callable: called as
            ``progress(batches_done, total_or_None)`` after each batch.
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
    with paused_gc():
        source = as_source(model, forward=forward, device=device, providers=providers)
    name = model_name or source.name
    notes.extend(source.notes())
    described = getattr(data, "normalization", None)  # image folders say how pixels were read
    if isinstance(described, str):
        notes.append(f"data: {described}")
    layers = source.layers
    if not layers:
        notes.append("no normalization layers found in the model: nothing can drift")
        warnings.warn(f"{name}: no normalization layers found; nothing to scan", stacklevel=2)
    if not any(layer.batch_dependent and layer.materialized for layer in layers):
        search = False  # nothing depends on the batch: every composition is the same
    assert progress is None or callable(progress)  # with_progress resolved True and False
    run = _Run(source, loss=loss, progress=progress)
    options: dict[str, Any] = dict(
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
    with source.placed():
        if search:
            assert samples is not None
            report = _search_scan(
                run, data, samples, batch_size, shuffle, seed, group_by, max_batches, notes, options
            )
            return source.finish(report)
        results, order, sizes, e2e = run.both_paths(plan, paths, sharded)
    if run.single_value:
        notes.append(
            f"{len(run.single_value)} layer(s) got one value per channel at this batch size "
            f"({', '.join(sorted(run.single_value))}): BatchNorm cannot normalize that in train "
            "mode, so they ran in eval mode on the train path and are not measurable here; the "
            "model cannot have been trained at this composition"
        )
    if source.measures and not sizes:
        raise DataError("the data yielded no batches")
    composition = plan.composition(sizes)
    with paused_gc():
        report = assemble_report(
            layers=layers,
            states=source.states(),
            results=results,
            order=order,
            end_to_end=e2e,
            composition=composition,
            paths=paths,
            notes=[*notes, *run.notes],
            stated=stated,
            folded=source.folded,
            unmeasurable=run.single_value,
            **options,
        )
    return source.finish(report)


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


#: Both paths run a chunk of batches at a time, path after path: at batch size 1, switching
#: paths batch by batch (and running the other path's code in between) was a tenth of what a
#: scan adds (issue 16).  A chunk holds up to 64 batches and, going by the first batch's inputs
#: and outputs, about 2^20 elements of them.
_CHUNK_BATCHES = 64
_CHUNK_ELEMENTS = 1 << 20


def _chunk_batches(batch: Any, outputs: Sequence[Any]) -> int:
    """Batches per chunk after the first ``batch`` and its outputs (one per path)."""
    tensors = [first_tensor(batch.inputs), *(output_tensor(o) for o in outputs)]
    if any(t is None for t in tensors):
        return 1  # what it holds is not known: batch by batch, as before
    held = sum(t.numel() for t in tensors if t is not None)
    return max(1, min(_CHUNK_BATCHES, _CHUNK_ELEMENTS // max(held, 1)))


def _is_one_sample_error(exc: BaseException) -> bool:
    return "Expected more than 1 value per channel" in str(exc)


class _Run:
    """One scan's batch loops on a source: both paths at one composition, or one path."""

    def __init__(self, source: Source, *, loss: LossFn | None, progress: Progress | None) -> None:
        self.source = source
        self.layers = source.layers
        self.loss = loss
        self.progress = progress
        self.done = 0
        self.total: int | None = None
        self.single_value: dict[str, int] = {}
        self.notes: list[str] = []  # what the source said while running (once each)

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def _noted(self, session: Session) -> None:
        for note in session.notes:
            if note not in self.notes:
                self.notes.append(note)

    def both_paths(
        self, plan: Any, paths: Sequence[str], sharded: bool
    ) -> tuple[
        dict[str, dict[str, LayerMeasurement | None]], list[str], list[int], EndToEnd | None
    ]:
        """Every batch through every path, recording; per-layer results, order, sizes, e2e."""
        sizes: list[int] = []
        e2e = EndToEndMeter(self.loss, defer=True)
        batches, total = plan.batches, plan.total
        if sharded and plan.source != "batches":  # deal normdoctor's own batches round-robin
            rank, world = _dist.rank_and_world()
            batches = (b for i, b in enumerate(plan.batches) if i % world == rank)
            total = None if total is None else len(range(rank, total, world))
        self.total = total
        with self.source.session(paths) as session:
            error: BaseException | None = None
            try:
                if self.source.measures:
                    numbered = enumerate(batches)
                    n = 1  # the first batch alone: it measures what a batch holds
                    while chunk := [(i, session.prepare(b)) for i, b in islice(numbered, n)]:
                        outs = {p: [session.run(p, b, i) for i, b in chunk] for p in paths}
                        for k, (_i, batch) in enumerate(chunk):
                            sizes.append(batch.size)
                            if len(outs) == 2:
                                e2e.update(outs["train"][k], outs["eval"][k], batch.labels,
                                           batch.size)  # fmt: skip
                            self.tick()
                        if len(sizes) == 1 and plan.source != "batches":
                            # (batches of the caller's own come one at a time: an iterable may
                            # fill one tensor in place for every batch)
                            n = _chunk_batches(chunk[0][1], [o[0] for o in outs.values()])
            except Exception as exc:
                if not sharded:
                    raise
                error = exc
            if sharded:
                _dist.raise_if_any_failed(error)
                _dist.merge_recorders(session.recorders())
                e2e.all_reduce()
                sizes = _dist.gather_in_batch_order(sizes)
            results = {p: session.results(p) for p in paths}
            order = list(session.order) if sizes else []
            self.single_value = dict(session.single_value)
            self._noted(session)
        return results, order, sizes, e2e.result()

    def one_path(self, plan: Any, path: str, samples: int) -> Trial:
        """The batches of ``plan`` through one path: outcomes by sample, layer measurements."""
        trial = Trial(spec=Spec(0))
        outcomes = Outcomes(samples)
        loss = self.loss

        def add(out: torch.Tensor, index: torch.Tensor, labels: torch.Tensor | None) -> None:
            outcomes.add(index, out, *sample_outcomes(out, labels, index.shape[0], loss))

        # Per-sample outcomes of many batches at once (a user's loss may not be per sample).
        held = Gather(add, batches=64 if loss is None else 1)
        with self.source.session((path,)) as session:
            try:
                for i, batch in enumerate(plan.batches):
                    batch = session.prepare(batch)
                    out = output_tensor(session.run(path, batch, i))
                    trial.sizes.append(batch.size)
                    if out is not None and batch.index is not None:
                        labels = batch.labels
                        if (
                            out.dim() >= 1
                            and out.shape[0] == batch.size
                            and (
                                labels is None
                                or (labels.dim() >= 1 and labels.shape[0] == batch.size)
                            )
                        ):
                            held.add(out.detach(), batch.index, labels)
                        else:  # outcomes not per sample: this batch on its own
                            held.flush()
                            outcomes.add(
                                batch.index,
                                out,
                                *sample_outcomes(out, batch.labels, batch.size, loss),
                            )
                    self.tick()
                held.flush()
            except CompositionError as exc:  # this source cannot run batches composed so
                trial.error = str(exc)
                return trial
            except ScanError as exc:
                if path != "train" or not _is_one_sample_error(exc.__cause__ or exc):
                    raise
                trial.error = _ONE_VALUE
                return trial
            self._noted(session)
            if session.single_value:  # the train path could not run as training would have
                trial.error = _ONE_VALUE + f" ({', '.join(sorted(session.single_value))})"
                return trial
            trial.results = session.results(path)
            trial.order = list(session.order)
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
        subset = torch.cat([b.index for b in asked.batches if b.index is not None])
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
    evid = []
    for t in trials:
        found = t.outcomes.evidence() if t.outcomes is not None else None
        evid.append(found[mask] if found is not None else None)
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
    wanted = Spec(batch_size, grouping) if batch_size is not None else None
    if wanted is not None and wanted != reference.spec:
        notes.append(
            f"asked for {wanted.description}; shown at {reference.spec.description}, the "
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
        states=run.source.states(),
        results={"train": reference.results, "eval": eval_trial.results},
        order=reference.order,
        end_to_end=end_to_end,
        composition=composition,
        paths=PATHS,
        notes=[*notes, *run.notes],
        evidence=evidence,
        folded=run.source.folded,
        **options,
    )


def sweep_batch_sizes(
    model: nn.Module, data: Any, batch_sizes: Sequence[int], **kwargs: Any
) -> tuple[ScanReport, ...]:
    """One :func:`scan` per batch size: how drift grows as batches shrink."""
    if not batch_sizes:
        raise ValueError("batch_sizes is empty")
    return tuple(scan(model, data, batch_size=int(b), **kwargs) for b in batch_sizes)


def path_outcomes(
    model: nn.Module | Scannable | Source,
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
    source = as_source(model, forward=forward, device=device)
    run = _Run(source, loss=loss, progress=None)
    with source.placed():
        trial = run.one_path(plan, path, info[0])
    if trial.outcomes is None:
        raise ScanError(trial.error or f"the {path} path could not run")
    return trial.outcomes

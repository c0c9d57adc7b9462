"""``normdoctor patch``: apply a fix, scan again, and write the patched model only if it
measures at least as good."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from ..outputs import Outputs
from ..report import PatchReport, ScanReport
from . import backend
from .common import (
    EXIT_DRIFT,
    Progress,
    exit_code,
    file_sha256,
    load,
    output_plan,
    stderr,
    stdout,
    write_json,
)
from .formats import OutputFormat, PatchFormat, PatchFormatOpt, Presentation, presentation
from .invocation import command_line
from .options import (
    ArchKwOpt,
    ArchOpt,
    BatchSizeOpt,
    Device,
    ExitZeroOpt,
    Fix,
    GroupByLabelOpt,
    JsonOpt,
    MaxBatchesOpt,
    ModelArg,
    NormalizeOpt,
    QuietOpt,
    ScanOptions,
    SearchOpt,
    SeedOpt,
    ShuffleOpt,
    ThresholdOpt,
    TrainBatchOpt,
    TrainGroupOpt,
    TrustOpt,
)

__all__ = ["EPILOG", "patch"]

EPILOG = """Example:

\b
  normdoctor patch sample_models/tiny-batch.pt \\
      --arch sample_models.archs:DigitsCNN \\
      --data sample_models/data/test.npz --train-batch-size 1 \\
      --to auto -o tiny-fixed.pt
"""


def patch(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", "-d", metavar="DATA", help="Data, as for scan.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            metavar="PATH",
            help="Where to write the patched model "
            "(never over the input; .pt for torch, .onnx for ONNX).",
        ),
    ],
    to: Annotated[
        Fix, typer.Option("--to", help="The fix: auto applies each flagged layer's recommendation.")
    ] = Fix.auto,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            metavar="GLOB",
            help="Glob of layer names to change (explicit --to only).",
        ),
    ] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    batch_size: BatchSizeOpt = None,
    train_batch_size: TrainBatchOpt = None,
    train_group_by_label: TrainGroupOpt = False,
    search: SearchOpt = None,
    normalize: NormalizeOpt = None,
    shuffle: ShuffleOpt = True,
    group_by_label: GroupByLabelOpt = False,
    seed: SeedOpt = 0,
    max_batches: MaxBatchesOpt = None,
    threshold: ThresholdOpt = None,
    prior: Annotated[
        float,
        typer.Option(
            "--prior",
            min=0.0,
            metavar="N",
            help="batchstats: blend with the running statistics as N prior samples.",
        ),
    ] = 0.0,
    report_dir: Annotated[
        Path | None,
        typer.Option(
            "--report",
            metavar="DIR",
            help="Also write the HTML report with before/after to the new folder DIR.",
        ),
    ] = None,
    json_out: JsonOpt = None,
    output_format: PatchFormatOpt = PatchFormat.text,
    exit_zero: ExitZeroOpt = False,
    quiet: QuietOpt = False,
) -> int:
    """Apply a fix, scan again, and write the patched model only if it measures at least as good.

    --to auto fixes only a model whose eval mode the scan found harmful. The patched model is
    measured against the original on the same samples (eval-mode accuracy or loss with labels
    or targets; agreement with the original's train path without). Exit 0: a verified model
    was written; 1: nothing written (nothing to fix, or the fix measured worse), or eval mode
    still harmful after the fix; 2: error.
    """
    from ..io import load_data

    shown = presentation(output_format, json_out)
    plan = output_plan([model], data=data, arch=arch)
    plan.file(out, "--out")
    for target in shown.json_targets:
        plan.file(target, "--json", stdout=True)
    plan.folder(report_dir, "--report")
    plan.check()  # every output, before the model is even loaded
    net = load(model, arch, arch_kwargs, trust_pickle, quiet=quiet)
    for companion in backend.input_files(net):  # an ONNX model's external-data files
        plan.add_input(companion, "input model data")
    dataset = load_data(data, seed=seed, normalize=normalize)
    stated = train_batch_size is not None or train_group_by_label
    options = ScanOptions(
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by_label=group_by_label,
        max_batches=max_batches,
        threshold=threshold,
        device=Device.cpu,
        train_batch_size=train_batch_size,
        train_group_by_label=train_group_by_label,
        search=(not stated) if search is None else search,
    ).kwargs()
    options["model_name"] = model.name
    asked = f", batches of {batch_size}" if batch_size else ""
    err = stderr(quiet)
    err.print(f"patching {model.name}: --to {to.value}{asked}", markup=False, highlight=False)
    with Progress(err, model.name, not quiet) as progress:
        options["progress"] = progress
        patched, before, after = backend.fix(net, dataset, to, layers, options, prior)
    options.pop("progress")
    if shown.format is OutputFormat.markdown:
        from ..render.markdown import patch_markdown

        print(patch_markdown(before, after), end="", flush=True)
    elif shown.text:
        from ..render.console import print_patch

        print_patch(before, after, stdout())
    refusal = _patch_refusal(to, patched, before, after)
    if refusal:
        stderr().print(f"normdoctor: {refusal}: nothing written", markup=False, highlight=False)
        return EXIT_DRIFT
    check = getattr(patched, "normdoctor_verification", None)
    if check is not None:
        stderr(quiet).print(f"verified: {check.text}", markup=False, highlight=False)
    _commit_patch_outputs(
        plan,
        patched,
        before,
        after,
        model=model,
        data=data,
        out=out,
        shown=shown,
        report_dir=report_dir,
        quiet=quiet,
    )
    return exit_code([after], exit_zero, False)


def _patch_refusal(to: Fix, patched: Any, before: ScanReport, after: ScanReport) -> str:
    """Why ``patch`` must not write its model ('' if it may): a fix is written only when it
    measures at least as good as the original (DESIGN.md: a wrong fix does harm)."""
    if to is Fix.auto and not before.status.harmful:
        return f"nothing to fix (verdict {before.status}: {before.reason})"
    check = getattr(patched, "normdoctor_verification", None)
    if check is not None and not check.ok:
        return f"the patched model measures worse than the original ({check.text})"
    b, a = before.end_to_end, after.end_to_end
    if check is None and b is not None and a is not None:  # ONNX: the same batches, eval mode
        if b.acc_eval is not None and a.acc_eval is not None and a.acc_eval < b.acc_eval:
            return f"eval-mode accuracy {b.acc_eval:.1%} -> {a.acc_eval:.1%}: worse"
        if b.loss_eval is not None and a.loss_eval is not None and a.loss_eval > b.loss_eval:
            return f"eval-mode {b.metric} {b.loss_eval:.4g} -> {a.loss_eval:.4g}: worse"
    return ""


def _commit_patch_outputs(
    plan: Outputs,
    patched: Any,
    before: ScanReport,
    after: ScanReport,
    *,
    model: Path,
    data: str,
    out: Path,
    shown: Presentation,
    report_dir: Path | None,
    quiet: bool,
) -> None:
    """The one place ``patch`` writes: everything is computed; stage every output, then publish.

    A rule that refuses to write (the patch made things worse) belongs before the staging: it
    then leaves every output untouched.  A failure while staging (disk full, the report folder
    appeared meanwhile) writes nothing either.
    """
    err = stderr(quiet)
    with plan:
        plan.write_with(out, backend.model_writer(patched, model))
        payload = PatchReport(before=before, after=after).to_dict()
        for target in shown.json_targets:
            write_json(plan, target, payload)
        if report_dir is not None:
            from ..render import save_report

            extra: dict[str, Any] = {}
            if "provenance" in inspect.signature(save_report).parameters:
                digests = {"model_sha256": file_sha256(model), "data_sha256": file_sha256(data)}
                extra["provenance"] = {k: v for k, v in digests.items() if v is not None}
            save_report(
                before, report_dir, patched=after, command=command_line(), outputs=plan, **extra
            )
        plan.commit()
    err.print(f"wrote {out}")

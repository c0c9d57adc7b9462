"""``normdoctor scan``: one scan, a sweep over batch sizes, or a series of checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..report import ScanReport, SeriesReport, SweepReport
from .backend import run_scan
from .common import EXIT_OK, Progress, exit_code, load, output_plan, stderr, stdout, write_json
from .formats import FormatOpt, OutputFormat, presentation, print_scan
from .invocation import current_argv, fix_command
from .options import (
    ArchKwOpt,
    ArchOpt,
    BatchSizeOpt,
    Device,
    DeviceOpt,
    ExitZeroOpt,
    GroupByLabelOpt,
    JsonOpt,
    MaxBatchesOpt,
    NormalizeOpt,
    PathsOpt,
    QuietOpt,
    ScanOptions,
    SearchOpt,
    SeedOpt,
    ShuffleOpt,
    StrictOpt,
    ThresholdOpt,
    TrainBatchOpt,
    TrainGroupOpt,
    TrustOpt,
    VerboseOpt,
    parse_sizes,
)

__all__ = ["EPILOG", "scan"]

EPILOG = """Examples:

\b
  normdoctor scan sample_models/tiny-batch.pt \\
      --arch sample_models.archs:DigitsCNN \\
      --data sample_models/data/test.npz --train-batch-size 1
  normdoctor scan model.onnx --data val.npz \\
      --batch-sizes 1,2,8,32 --json scan.json
  normdoctor scan model.pt --arch pkg.mod:Net --data val.npz \\
      --format markdown >> "$GITHUB_STEP_SUMMARY"
"""


def scan(
    models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL...",
            help="Model file(s). Several checkpoints of one architecture (run_dir/*.pt) are scanned "
            "in turn: drift per layer over checkpoints.",
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
            metavar="DATA",
            help="Data: .pt/.npy/.npz file, image folder, module:function, or random[:N,C,H,W].",
        ),
    ],
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    batch_size: BatchSizeOpt = None,
    batch_sizes: Annotated[
        str | None,
        typer.Option(
            "--batch-sizes",
            metavar="N,N,...",
            help="Scan once per batch size, e.g. 1,2,8,32: how drift grows as batches shrink.",
        ),
    ] = None,
    train_batch_size: TrainBatchOpt = None,
    train_group_by_label: TrainGroupOpt = False,
    search: SearchOpt = None,
    strict: StrictOpt = False,
    normalize: NormalizeOpt = None,
    shuffle: ShuffleOpt = True,
    group_by_label: GroupByLabelOpt = False,
    seed: SeedOpt = 0,
    paths: PathsOpt = "train,eval",
    max_batches: MaxBatchesOpt = None,
    threshold: ThresholdOpt = None,
    device: DeviceOpt = Device.cpu,
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input-shape",
            metavar="N,C,H,W",
            help="Shape of random data (--data random), e.g. 64,3,32,32.",
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            "--image-size", metavar="PIXELS", help="Resize the images of an image folder."
        ),
    ] = None,
    json_out: JsonOpt = None,
    output_format: FormatOpt = OutputFormat.text,
    exit_zero: ExitZeroOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    all_layers: Annotated[
        bool,
        typer.Option("--all", help="List every layer in full, also of a model with many."),
    ] = False,
) -> int:
    """Scan a model on data: per-layer drift between train-mode and eval-mode behaviour.

    The gap only shows when batches are built the way training's were, so unless training's
    composition is given (--train-batch-size, --train-group-by-label) the scan searches it and
    judges which path is right from labels or targets; without them it may say undetermined.
    """
    from .. import distributed
    from ..io import load_data

    sharded = distributed.init_from_env()  # launched by torchrun: scan this rank's shard
    rank = distributed.dist.get_rank() if sharded else 0
    err = stderr(quiet or rank != 0)
    sizes: list[int | None] = list(parse_sizes(batch_sizes)) if batch_sizes else [batch_size]
    if search is None:  # a sweep shows each batch size as it is; one scan searches
        search = len(sizes) == 1 and train_batch_size is None and not train_group_by_label
    if len(models) > 1 and len(sizes) > 1:
        raise typer.BadParameter(
            "use --batch-sizes with one model, or several models with one batch size"
        )
    shape = tuple(int(s) for s in input_shape.split(",")) if input_shape else None
    shown = presentation(output_format, json_out)
    plan = output_plan(models, data=data, arch=arch)
    for target in shown.json_targets:
        plan.file(target, "--json", stdout=True)
    plan.check()
    dataset = load_data(
        data, input_shape=shape, image_size=image_size, seed=seed, normalize=normalize
    )
    scan_options = ScanOptions(
        shuffle=shuffle,
        seed=seed,
        group_by_label=group_by_label,
        max_batches=max_batches,
        paths=paths,
        threshold=threshold,
        device=device,
        train_batch_size=train_batch_size,
        train_group_by_label=train_group_by_label,
        search=search,
    )
    reports: list[ScanReport] = []
    for model in models:
        net = load(model, arch, arch_kwargs, trust_pickle, quiet=quiet or rank != 0)
        for size in sizes:
            options = scan_options.with_batch_size(size).kwargs()
            if sharded:
                options["distributed"] = True
            label = f"{model.name} bs={size}" if size else model.name
            with Progress(err, label, not quiet) as progress:
                reports.append(
                    run_scan(net, dataset, progress=progress, model_name=model.name, **options)
                )
    if rank != 0:  # every rank holds the merged reports; rank 0 prints, writes and judges
        return EXIT_OK
    from ..render import console as render
    from ..render import markdown

    out = stdout()
    if len(reports) == 1:
        payload = reports[0].to_dict()
    elif len(models) > 1:
        payload = SeriesReport(
            schema_version=reports[0].schema_version,
            models=tuple(str(m) for m in models),
            reports=tuple(reports),
        ).to_dict()
    else:
        payload = SweepReport(
            schema_version=reports[0].schema_version,
            batch_sizes=tuple(size for size in sizes if size is not None),  # all given
            reports=tuple(reports),
        ).to_dict()
    hint = _fix_hint(reports)
    if shown.format is OutputFormat.markdown:
        print(markdown.scans_markdown(reports, fix_command=hint), end="", flush=True)
    elif shown.format is OutputFormat.github:
        print(markdown.scans_annotations(reports), end="", flush=True)
    elif shown.text and len(reports) == 1:
        print_scan(reports[0], out, verbose=verbose, all_layers=all_layers, fix_command=hint)
    elif shown.text and len(models) > 1:
        render.print_series(reports, out)
    elif shown.text:
        render.print_sweep(reports, out)
    with plan:
        for target in shown.json_targets:
            write_json(plan, target, payload)
        plan.commit()
    return exit_code(reports, exit_zero, strict)


def _fix_hint(reports: list[ScanReport]) -> str | None:
    """The user's own command as the ``patch`` that fixes a harmful single scan."""
    argv = current_argv()
    if len(reports) != 1 or not reports[0].flagged or argv is None:
        return None
    return fix_command(argv)

"""``normdoctor report``: the self-contained HTML drift report, from a model or a saved scan."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import NormDoctorError, one_line
from ..report import ScanReport, SeriesReport, SweepReport, scan_result_from_dict
from .backend import run_scan
from .common import EXIT_OK, Progress, file_sha256, load, output_plan, stderr, stdout
from .invocation import command_line
from .options import (
    ArchKwOpt,
    ArchOpt,
    BatchSizeOpt,
    GroupByLabelOpt,
    MaxBatchesOpt,
    NormalizeOpt,
    QuietOpt,
    ScanOptions,
    SeedOpt,
    ShuffleOpt,
    ThresholdOpt,
    TrustOpt,
    parse_sizes,
)

__all__ = ["EPILOG", "report"]

EPILOG = """Examples:

\b
  normdoctor report sample_models/tiny-batch.pt \\
      --arch sample_models.archs:DigitsCNN \\
      --data sample_models/data/test.npz --batch-sizes 1,8,64 -o tiny-report
  normdoctor report scan.json -o report
"""


def _reports_from_json(
    path: Path,
) -> tuple[ScanReport, tuple[ScanReport, ...] | None, tuple[ScanReport, ...] | None]:
    """(report, sweep, series) from a file written by ``scan --json``."""
    try:
        result = scan_result_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NormDoctorError(
            f"{path}: not a normdoctor scan JSON ({one_line(exc, limit=sys.maxsize)})"
        ) from exc
    if isinstance(result, SeriesReport):
        return result.main, None, result.reports
    if isinstance(result, SweepReport):
        return result.main, result.reports, None
    return result, None, None


def report(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="SOURCE",
            help="A model file (with --data), or a JSON written by `normdoctor scan --json`.",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", metavar="DIR", help="New folder for index.html and the figures."
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", metavar="DATA", help="Data, as for scan (with a model)."),
    ] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    batch_size: BatchSizeOpt = None,
    batch_sizes: Annotated[
        str | None,
        typer.Option(
            "--batch-sizes",
            metavar="N,N,...",
            help="Also sweep these batch sizes (the first one is the main scan).",
        ),
    ] = None,
    shuffle: ShuffleOpt = True,
    group_by_label: GroupByLabelOpt = False,
    seed: SeedOpt = 0,
    max_batches: MaxBatchesOpt = None,
    threshold: ThresholdOpt = None,
    train_batch_size: Annotated[
        int | None,
        typer.Option(
            "--train-batch-size",
            min=1,
            metavar="N",
            help="The batch size training used: marked on the sweep, and (without a sweep) "
            "scanned as training's.",
        ),
    ] = None,
    normalize: NormalizeOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the report in an existing folder.")
    ] = False,
    quiet: QuietOpt = False,
) -> int:
    """Write a self-contained HTML drift report (figures embedded) and the figures as PNG/SVG.

    Exits 0 once the report is written (use `scan` for a CI gate).
    """
    err = stderr(quiet)
    is_json = source.suffix.lower() == ".json"
    plan = output_plan(
        [source],
        data=None if is_json else data,
        arch=None if is_json else arch,
        label="scan JSON" if is_json else "input model",
    )
    plan.folder(out, "--out", force=force, force_hint="--force")
    plan.check()
    sweep: tuple[ScanReport, ...] | None = None
    series: tuple[ScanReport, ...] | None = None
    if is_json:
        main_report, sweep, series = _reports_from_json(source)
    else:
        if data is None:
            raise typer.BadParameter(
                "a model needs --data (or pass a scan JSON)", param_hint="--data"
            )
        from ..io import load_data

        net = load(source, arch, arch_kwargs, trust_pickle, quiet=quiet)
        dataset = load_data(data, seed=seed, normalize=normalize)
        sizes: list[int | None] = list(parse_sizes(batch_sizes)) if batch_sizes else [batch_size]
        single = len(sizes) == 1
        scan_options = ScanOptions(
            shuffle=shuffle,
            seed=seed,
            group_by_label=group_by_label,
            max_batches=max_batches,
            threshold=threshold,
            train_batch_size=train_batch_size if single else None,
            search=single and train_batch_size is None,
        )
        reports = []
        for size in sizes:
            options = scan_options.with_batch_size(size).kwargs()
            label = f"{source.name} bs={size}" if size else source.name
            with Progress(err, label, not quiet) as progress:
                reports.append(
                    run_scan(net, dataset, progress=progress, model_name=source.name, **options)
                )
        main_report = reports[0]
        sweep = tuple(reports) if len(reports) > 1 else None
    from ..render import save_report

    extra: dict[str, Any] = {}
    if "provenance" in inspect.signature(save_report).parameters:
        digests = {
            "model_sha256": None if is_json else file_sha256(source),
            "data_sha256": None if is_json else file_sha256(data),
        }
        extra["provenance"] = {k: v for k, v in digests.items() if v is not None}
    with plan:
        index = save_report(
            main_report,
            out,
            sweep=sweep,
            series=series,
            command=command_line(),
            train_batch_size=train_batch_size,
            outputs=plan,
            **extra,
        )
        plan.commit()
    err.print(f"wrote {index}")
    stdout().print(main_report.verdict, highlight=False, markup=False)
    return EXIT_OK

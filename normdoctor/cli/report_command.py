"""``normdoctor report``: the self-contained HTML drift report, from a model or a saved scan."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import NormDoctorError, one_line
from ..report import ScanReport, SeriesReport, SweepReport, scan_result_from_dict
from .backend import run_scan
from .common import EXIT_OK, Progress, load, output_plan, stderr, stdout
from .options import (
    ArchKwOpt,
    ArchOpt,
    BatchSizeOpt,
    NormalizeOpt,
    QuietOpt,
    ScanOptions,
    TrustOpt,
    parse_sizes,
)

__all__ = ["EPILOG", "report"]

EPILOG = (
    "Examples:\n\n"
    "  normdoctor report sample_models/tiny-batch.pt --arch sample_models.archs:DigitsCNN "
    "--data sample_models/data/test.npz --batch-sizes 1,8,64 -o tiny-report\n\n"
    "  normdoctor report scan.json -o report"
)


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
            help="A model file (with --data), or a JSON written by `normdoctor scan --json`."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder for index.html and the figures.")
    ],
    data: Annotated[str | None, typer.Option("--data", "-d", help="Data, as for scan.")] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    batch_size: BatchSizeOpt = None,
    batch_sizes: Annotated[
        str | None,
        typer.Option(
            "--batch-sizes", help="Also sweep these batch sizes (the first one is the main scan)."
        ),
    ] = None,
    shuffle: Annotated[bool, typer.Option("--shuffle/--no-shuffle")] = True,
    group_by_label: Annotated[bool, typer.Option("--group-by-label")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    max_batches: Annotated[int | None, typer.Option("--max-batches", min=1)] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", min=0.0)] = None,
    train_batch_size: Annotated[
        int | None,
        typer.Option(
            "--train-batch-size",
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

    command = (
        "normdoctor " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    )
    with plan:
        index = save_report(
            main_report,
            out,
            sweep=sweep,
            series=series,
            command=command,
            train_batch_size=train_batch_size,
            outputs=plan,
        )
        plan.commit()
    err.print(f"wrote {index}")
    stdout().print(main_report.verdict, highlight=False, markup=False)
    return EXIT_OK

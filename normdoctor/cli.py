"""The ``normdoctor`` command: the only place that parses arguments, prints and exits.

Exit codes, as linters taught CI users (ruff, ESLint):

* 0: no layer flagged (``--exit-zero``: also when layers are flagged);
* 1: drift found (``scan``, ``patch``), or an error-level static finding (``layers``);
* 2: usage, input or internal error: one line on stderr, no traceback (``--debug`` shows it);
* 130: interrupted (SIGINT or SIGTERM): ``normdoctor: interrupted``, no output written, no
  temporary file left (the shell's convention for Ctrl-C).

Outputs (``--json``, ``-o``, ``--report``) are declared and checked before any work and written
together at the end (:mod:`normdoctor.outputs`): a failing command writes nothing.

Findings go to stdout (or ``--json``); progress and notes go to stderr.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console

from ._version import __version__
from .errors import NormDoctorError, one_line
from .outputs import Interrupted, Outputs, interrupt_on_signals, remove_temporaries

EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="normdoctor",
    help="Find and fix the train/inference mismatch of normalization layers.\n\n"
    "Exit codes: 0 no layer flagged, 1 drift found, 2 usage, input or internal error, "
    "130 interrupted.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state: dict[str, Any] = {"debug": False}


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


def _version(value: bool) -> None:
    if value:
        print(f"normdoctor {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    _state["debug"] = debug


# -- shared options ------------------------------------------------------------------------------

ModelArg = Annotated[
    Path,
    typer.Argument(
        help="Model file: state_dict (.pt/.pth/.bin/.ckpt), "
        ".safetensors, torch.export .pt2, TorchScript, .onnx; or a Hugging Face model folder "
        "(config.json + model.safetensors)."
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="Architecture for weights-only files: 'package.module:factory' or "
        "'path/to/file.py:ClassName'.",
    ),
]
ArchKwOpt = Annotated[
    str | None,
    typer.Option(
        "--arch-kwargs", help="Keyword arguments for --arch as JSON, e.g. '{\"width\": 32}'."
    ),
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle", help="Allow loading whole pickled modules (runs code stored in the file)."
    ),
]
JsonOpt = Annotated[
    Path | None,
    typer.Option("--json", help="Write the results as JSON to this file ('-' for stdout)."),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar and no notes on stderr.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Reasons for every layer.")]
ExitZeroOpt = Annotated[bool, typer.Option("--exit-zero", help="Exit 0 even when drift is found.")]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
        help="Batch size of the scan, one candidate of the composition search (default: the "
        "search picks the one that reproduces training best; --no-search scans exactly it).",
    ),
]
TrainBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--train-batch-size",
        min=1,
        help="The batch size training used, when known: scanned as training's (no search).",
    ),
]
TrainGroupOpt = Annotated[
    bool,
    typer.Option(
        "--train-group-by-label",
        help="Training's batches each held one label (class-sorted), when known: no search.",
    ),
]
SearchOpt = Annotated[
    bool | None,
    typer.Option(
        "--search/--no-search",
        help="Try batch sizes 1-128 and one-label batches to find the composition that "
        "reproduces training (default: on unless training's composition is given).",
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict", help="Exit 1 also when the verdict is undetermined or nothing is measurable."
    ),
]
NormalizeOpt = Annotated[
    str | None,
    typer.Option(
        "--normalize",
        help="Image folders: normalize pixels ([0, 1] by default) with 'imagenet' or "
        "'MEAN,STD' (per channel: 'M1,M2,M3,S1,S2,S3').",
    ),
]


def _arch_kwargs(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc.msg}", param_hint="--arch-kwargs") from None
    if not isinstance(value, dict):
        raise click.BadParameter("expected a JSON object", param_hint="--arch-kwargs")
    return value


def _console(**kwargs: Any) -> Console:
    # In a pipe or a CI log, a sentence hard-wrapped at Rich's default 80 columns
    # breaks grep and line-oriented tools; only a terminal gets wrapped text.
    console = Console(highlight=False, **kwargs)
    console.soft_wrap = not console.is_terminal
    return console


def _stdout() -> Console:
    return _console()


def _stderr(quiet: bool = False) -> Console:
    return _console(stderr=True, quiet=quiet)


def _plan(
    models: Sequence[Path] = (),
    *,
    data: str | None = None,
    arch: str | None = None,
    label: str = "input model",
) -> Outputs:
    """An output plan that knows every input of the command: no output may replace one."""
    plan = Outputs()
    for model in models:
        plan.add_input(model, label if len(models) == 1 else "series member")
    plan.add_input_spec(data, "data")
    plan.add_input_spec(arch, "--arch source")
    return plan


def _write_json(plan: Outputs, target: Path | None, payload: dict[str, Any]) -> None:
    """Stage ``payload`` for ``--json`` (declared in ``plan``); the plan's commit writes it."""
    if target is not None:
        plan.write_text(target, json.dumps(payload, indent=1, allow_nan=False) + "\n")


def _load(
    model: Path,
    arch: str | None,
    arch_kwargs: str | None,
    trust_pickle: bool,
    *,
    quiet: bool = False,
) -> Any:
    """The model, loaded; what loading decided (hyper-parameters taken from a Lightning
    checkpoint, a model built from a Hugging Face config) is said on stderr."""
    from .io import load_model

    net = load_model(model, arch, arch_kwargs=_arch_kwargs(arch_kwargs), trust_pickle=trust_pickle)
    err = _stderr(quiet)
    for note in getattr(net, "normdoctor_load_notes", ()):
        err.print(f"note: {note}", markup=False, highlight=False)
    return net


def _device(device: Device) -> str | None:
    if device is Device.auto:
        import torch

        return "cuda" if torch.cuda.is_available() else None
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise NormDoctorError("--device cuda: no CUDA device is available")
        return "cuda"
    return "cpu"


class _Progress:
    """A rich progress bar over batches on stderr, shown only on a terminal."""

    def __init__(self, console: Console, label: str, enabled: bool) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.enabled = enabled and console.is_terminal
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not self.enabled,
        )
        self.label = label
        self.task = None

    def __enter__(self) -> _Progress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, done: int, total: int | None) -> None:
        if self.task is None:
            self.task = self.progress.add_task(self.label, total=total)
        self.progress.update(self.task, completed=done)


def _scan_options(
    batch_size: int | None,
    shuffle: bool,
    seed: int,
    group_by_label: bool,
    max_batches: int | None,
    paths: str,
    threshold: float | None,
    device: Device,
    train_batch_size: int | None = None,
    train_group_by_label: bool = False,
    search: bool | None = None,
) -> dict[str, Any]:
    from .metrics import DEFAULT_THRESHOLD

    options: dict[str, Any] = dict(
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        group_by="label" if group_by_label else None,
        max_batches=max_batches,
        paths=_parse_paths(paths),
        threshold=DEFAULT_THRESHOLD if threshold is None else threshold,
        device=_device(device),
        search=search,
    )
    if train_batch_size is not None or train_group_by_label:
        options["train_batch_size"] = train_batch_size
        options["train_group_by"] = "label" if train_group_by_label else None
    return options


def _exit_code(reports: Sequence[Any], exit_zero: bool, strict: bool) -> int:
    """1 when eval mode is harmful (or, with --strict, when nothing decided or nothing was
    measurable), else 0; --exit-zero always 0."""
    from .report import Verdict

    unsure = (Verdict.UNDETERMINED, Verdict.CANNOT_CHECK, Verdict.NOT_MEASURABLE)
    bad = any(r.status.harmful or (strict and r.status in unsure) for r in reports)
    return EXIT_DRIFT if bad and not exit_zero else EXIT_OK


def run_scan(
    model: Any, data: Any, progress: Callable[[int, int | None], None] | None = None, **options: Any
) -> Any:
    """``normdoctor.scan`` for torch modules, the model's own ``scan`` for other backends (ONNX)."""
    import torch

    from .scan import scan

    if isinstance(model, torch.nn.Module):
        return scan(model, data, progress=progress, **options)
    return model.scan(data, progress=progress, **_onnx_options(options))


def _onnx_options(options: dict[str, Any]) -> dict[str, Any]:
    """``scan`` options as the ONNX backend takes them: it scans the composition given (no
    search yet) and runs on onnxruntime's own device."""
    options = {k: v for k, v in options.items() if k not in ("device", "search")}
    if "train_batch_size" in options:
        options["batch_size"] = options.pop("train_batch_size") or options["batch_size"]
        options["group_by"] = options.pop("train_group_by") or options["group_by"]
        options["stated"] = True
    if options.get("batch_size") is None:
        options["batch_size"] = 32
    return options


def _parse_paths(text: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    if not paths or any(p not in ("train", "eval") for p in paths):
        raise click.BadParameter(
            f"expected train, eval or train,eval; got {text!r}", param_hint="--paths"
        )
    return paths


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint="--batch-sizes"
        ) from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("batch sizes must be positive", param_hint="--batch-sizes")
    return sizes


# -- layers ---------------------------------------------------------------------------------------


@app.command(
    epilog="Example: normdoctor layers sample_models/healthy.pt --arch sample_models.archs:DigitsCNN"
)
def layers(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    json_out: JsonOpt = None,
    exit_zero: ExitZeroOpt = False,
) -> int:
    """List every normalization layer with its running statistics and the static findings.

    Needs no data. Without --arch a state_dict is checked by its buffer names alone; values
    the file does not store (momentum, eps) are reported as unknown.
    """
    import torch

    from .checks import Severity, static_checks, static_checks_for
    from .io import load_checkpoint
    from .layers import find_norm_layers

    plan = _plan([model], arch=arch)
    plan.file(json_out, "--json", stdout=True)
    plan.check()
    module = None
    if arch is not None:
        module = _load(model, arch, arch_kwargs, trust_pickle)
        findings = (
            static_checks(module) if isinstance(module, torch.nn.Module) else module.static_checks()
        )
    else:
        checkpoint = load_checkpoint(model, trust_pickle=trust_pickle)
        module = checkpoint.module
        if module is None and str(checkpoint.format) == "onnx":
            module = _load(model, None, None, False)
        findings = (
            static_checks_for(checkpoint)
            if not hasattr(module, "static_checks")
            else module.static_checks()
        )
    unknown: dict[str, tuple[str, ...]] = {}
    if module is not None:
        found = (
            find_norm_layers(module)
            if isinstance(module, torch.nn.Module)
            else module.find_norm_layers()
        )
        state = module.state_dict() if hasattr(module, "state_dict") else {}
    else:
        found, state, unknown = _layers_from_state_dict(
            checkpoint.state_dict or {}, checkpoint.layer_info
        )
    running = {}
    for layer in found:
        prefix = f"{layer.name}." if layer.name else ""
        rm, rv = state.get(prefix + "running_mean"), state.get(prefix + "running_var")
        if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor) and rm.numel():
            running[layer.name] = (
                f"{rm.min():.3g}..{rm.max():.3g}",
                f"{rv.min():.3g}..{rv.max():.3g}",
            )
    from .render.console import layers_table

    out = _stdout()
    out.print(
        f"[bold]{model}[/]: {len(found)} normalization layers, "
        f"{sum(layer.batch_dependent for layer in found)} batch-dependent"
    )
    out.print(layers_table(found, findings, running, unknown))
    if unknown:
        line = _unknown_line(model, unknown, len(found), str(checkpoint.format))
        out.print(line, markup=False, highlight=False)
    with plan:
        _write_json(
            plan,
            json_out,
            {
                "schema_version": 1,
                "model": str(model),
                "layers": [_layer_dict(layer, unknown.get(layer.name, ())) for layer in found],
                "findings": [f.to_dict() for f in findings],
            },
        )
        plan.commit()
    errors = any(f.severity == Severity.ERROR for f in findings)
    return EXIT_DRIFT if errors and not exit_zero else EXIT_OK


def _layer_dict(layer: Any, unknown: Sequence[str] = ()) -> dict[str, Any]:
    """A layer for ``--json``; values the file does not carry are null and named in
    ``unknown`` (a null momentum that is not unknown is PyTorch's cumulative average)."""
    return {
        "name": layer.name,
        "kind": layer.kind,
        "family": str(layer.family),
        "num_features": layer.num_features,
        "eps": None if "eps" in unknown else layer.eps,
        "momentum": None if "momentum" in unknown else layer.momentum,
        "affine": layer.affine,
        "track_running_stats": layer.track_running_stats,
        "batch_dependent": layer.batch_dependent,
        "unknown": list(unknown),
    }


#: Attributes a file may or may not carry beside a norm layer's tensors.
_CARRIED = ("momentum", "eps")
#: What the layer records hold for an attribute the file does not carry: placeholders, never
#: shown (``unknown`` says which they are).
_PLACEHOLDERS: dict[str, Any] = {"momentum": None, "eps": 0.0}


def _layers_from_state_dict(
    state: dict[str, Any], info: dict[str, dict[str, Any]]
) -> tuple[list, dict, dict[str, tuple[str, ...]]]:
    """NormLayer records from buffer names alone (a state_dict without its architecture), with
    the attributes the file does not carry per layer (a bare state_dict or a traced TorchScript
    archive stores no momentum or eps): (layers, state, unknown)."""
    from .layers import NormFamily, NormLayer

    found = []
    unknown: dict[str, tuple[str, ...]] = {}
    for key, value in state.items():
        if not key.endswith("running_mean"):
            continue
        name = key[: -len("running_mean")].rstrip(".")
        extra = info.get(name, {})
        kind = extra.get("kind", "BatchNorm (from state_dict)")
        family = NormFamily.INSTANCE_TRACKED if "Instance" in kind else NormFamily.BATCH
        prefix = f"{name}." if name else ""
        missing = tuple(attr for attr in _CARRIED if attr not in extra)
        if missing:
            unknown[name] = missing
        values = {attr: extra.get(attr, _PLACEHOLDERS[attr]) for attr in _CARRIED}
        found.append(
            NormLayer(
                name=name,
                kind=kind,
                family=family,
                num_features=int(value.numel()),
                eps=float(values["eps"]),
                momentum=values["momentum"],
                affine=prefix + "weight" in state,
                track_running_stats=True,
            )
        )
    return found, state, unknown


def _unknown_line(
    model: Path, unknown: dict[str, tuple[str, ...]], total: int, file_format: str
) -> str:
    """One line saying which values the file does not carry (shown as '-' in the table)."""
    parts = []
    for attr in _CARRIED:
        count = sum(attr in attrs for attrs in unknown.values())
        if count:
            parts.append(f"{attr} of {'all ' if count == total else ''}{count} layers")
    why = {
        "torchscript": "a TorchScript archive keeps them in its code, which is not run",
        "pickle": "the pickled modules do not record them",
    }.get(file_format, "a state_dict holds tensors only")
    return (
        f"unknown: {', '.join(parts)}: {model.name} does not store them ({why}); "
        "--arch reads them from the architecture"
    )


# -- scan -----------------------------------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n"
    "  normdoctor scan sample_models/tiny-batch.pt --arch sample_models.archs:DigitsCNN "
    "--data sample_models/data/test.npz --batch-size 1\n\n"
    "  normdoctor scan model.onnx --data val.npz --batch-sizes 1,2,8,32 --json scan.json"
)
def scan(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="Model file(s). Several checkpoints of one architecture (run_dir/*.pt) are scanned "
            "in turn: drift per layer over checkpoints."
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "-d",
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
            help="Scan once per batch size, e.g. 1,2,8,32: how drift grows as batches shrink.",
        ),
    ] = None,
    train_batch_size: TrainBatchOpt = None,
    train_group_by_label: TrainGroupOpt = False,
    search: SearchOpt = None,
    strict: StrictOpt = False,
    normalize: NormalizeOpt = None,
    shuffle: Annotated[
        bool,
        typer.Option(
            "--shuffle/--no-shuffle", help="Shuffle samples (with --seed) or keep the data's order."
        ),
    ] = True,
    group_by_label: Annotated[
        bool,
        typer.Option(
            "--group-by-label", help="Each batch drawn from one label (non-i.i.d. training)."
        ),
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for shuffling and random data.")] = 0,
    paths: Annotated[str, typer.Option("--paths", help="Paths to run: train,eval.")] = "train,eval",
    max_batches: Annotated[int | None, typer.Option("--max-batches", min=1)] = None,
    threshold: Annotated[
        float | None,
        typer.Option("--threshold", min=0.0, help="Per-layer drift threshold (default 0.1)."),
    ] = None,
    device: Annotated[Device, typer.Option("--device")] = Device.cpu,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="Shape for random data, e.g. 64,3,32,32.")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Resize images of a folder.")
    ] = None,
    json_out: JsonOpt = None,
    exit_zero: ExitZeroOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> int:
    """Scan a model on data: per-layer drift between train-mode and eval-mode behaviour.

    The gap only shows when batches are built the way training's were, so unless training's
    composition is given (--train-batch-size, --train-group-by-label) the scan searches it and
    judges which path is right from labels or targets; without them it may say undetermined.
    """
    from . import distributed
    from .io import load_data

    sharded = distributed.init_from_env()  # launched by torchrun: scan this rank's shard
    rank = distributed.dist.get_rank() if sharded else 0
    err = _stderr(quiet or rank != 0)
    sizes: list[int | None] = list(_parse_sizes(batch_sizes)) if batch_sizes else [batch_size]
    if search is None:  # a sweep shows each batch size as it is; one scan searches
        search = len(sizes) == 1 and train_batch_size is None and not train_group_by_label
    if len(models) > 1 and len(sizes) > 1:
        raise click.BadParameter(
            "use --batch-sizes with one model, or several models with one batch size"
        )
    shape = tuple(int(s) for s in input_shape.split(",")) if input_shape else None
    plan = _plan(models, data=data, arch=arch)
    plan.file(json_out, "--json", stdout=True)
    plan.check()
    dataset = load_data(
        data, input_shape=shape, image_size=image_size, seed=seed, normalize=normalize
    )
    reports = []
    for model in models:
        net = _load(model, arch, arch_kwargs, trust_pickle, quiet=quiet or rank != 0)
        for size in sizes:
            options = _scan_options(
                size,
                shuffle,
                seed,
                group_by_label,
                max_batches,
                paths,
                threshold,
                device,
                train_batch_size,
                train_group_by_label,
                search,
            )
            if sharded:
                options["distributed"] = True
            label = f"{model.name} bs={size}" if size else model.name
            with _Progress(err, label, not quiet) as progress:
                reports.append(
                    run_scan(net, dataset, progress=progress, model_name=model.name, **options)
                )
    if rank != 0:  # every rank holds the merged reports; rank 0 prints, writes and judges
        return EXIT_OK
    out = _stdout()
    from .render import console as render

    if len(reports) == 1:
        render.print_scan(reports[0], out, verbose=verbose)
        payload = reports[0].to_dict()
    elif len(models) > 1:
        render.print_series(reports, out)
        payload = {
            "schema_version": reports[0].schema_version,
            "kind": "series",
            "models": [str(m) for m in models],
            "reports": [r.to_dict() for r in reports],
        }
    else:
        render.print_sweep(reports, out)
        payload = {
            "schema_version": reports[0].schema_version,
            "kind": "sweep",
            "batch_sizes": sizes,
            "reports": [r.to_dict() for r in reports],
        }
    with plan:
        _write_json(plan, json_out, payload)
        plan.commit()
    return _exit_code(reports, exit_zero, strict)


# -- patch ----------------------------------------------------------------------------------------


class Fix(str, Enum):
    auto = "auto"
    recalibrate = "recalibrate"
    instance = "instance"
    batchstats = "batchstats"
    renorm = "renorm"


def _patch_torch(
    net: Any, dataset: Any, to: Fix, layers: str | None, options: dict[str, Any], prior: float
) -> tuple[Any, Any, Any]:
    from .patch import autopatch, patch
    from .scan import scan as run

    scan_options = {k: v for k, v in options.items() if k != "paths"}
    if to is Fix.auto:
        if layers is not None:
            raise click.BadParameter(
                "--layers applies to an explicit --to fix", param_hint="--layers"
            )
        return autopatch(net, dataset, prior=prior, **scan_options)
    from .patch import verify_patch

    before = run(net, dataset, **options)
    c = before.composition  # the composition the scan judged against (the search's reference)
    fixed = {**options, "search": False, "batch_size": c.batch_size or 32, "group_by": c.group_by}
    fixed.pop("train_batch_size", None)
    fixed.pop("train_group_by", None)
    extra: dict[str, Any] = {}
    if to is Fix.recalibrate:
        extra = {"data": dataset, "batch_size": fixed["batch_size"]}
    elif to is Fix.batchstats and prior:
        extra = {"prior": prior}
    patched = patch(net, to=to.value, layers=layers, **extra)
    patched.normdoctor_verification = verify_patch(
        net, patched, dataset, before, max_batches=options.get("max_batches")
    )
    return patched, before, run(patched, dataset, **fixed)


def _patch_onnx(
    net: Any, dataset: Any, to: Fix, layers: str | None, options: dict[str, Any]
) -> tuple[Any, Any, Any]:
    scan_options = _onnx_options(options)
    before = net.scan(dataset, **scan_options)
    if to is Fix.auto:  # each flagged node gets its recommendation; renorm needs training
        patched = net
        groups: dict[str, list[str]] = {}
        for layer in before.flagged_layers:
            fix = (
                "batchstats" if str(layer.recommendation) == "renorm" else str(layer.recommendation)
            )
            groups.setdefault(fix, []).append(layer.name)
        for fix, names in groups.items():
            patched = patched.patch(
                fix, data=dataset, layers=names, batch_size=scan_options["batch_size"]
            )
    else:
        if to is Fix.renorm:
            raise NormDoctorError(
                "renorm needs fine-tuning, which an ONNX graph cannot do: "
                "use batchstats or patch the PyTorch model"
            )
        patched = net.patch(
            to.value, data=dataset, layers=layers, batch_size=scan_options["batch_size"]
        )
    return patched, before, patched.scan(dataset, **scan_options)


@app.command(
    epilog="Example: normdoctor patch sample_models/tiny-batch.pt --arch "
    "sample_models.archs:DigitsCNN --data sample_models/data/test.npz -b 1 --to auto "
    "-o tiny-fixed.pt"
)
def patch(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", "-d", help="Data, as for scan.")],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Where to write the patched model "
            "(never over the input; .pt for torch, .onnx for ONNX).",
        ),
    ],
    to: Annotated[
        Fix, typer.Option("--to", help="The fix: auto applies each flagged layer's recommendation.")
    ] = Fix.auto,
    layers: Annotated[
        str | None,
        typer.Option("--layers", help="Glob of layer names to change (explicit --to only)."),
    ] = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    batch_size: BatchSizeOpt = None,
    train_batch_size: TrainBatchOpt = None,
    train_group_by_label: TrainGroupOpt = False,
    search: SearchOpt = None,
    normalize: NormalizeOpt = None,
    shuffle: Annotated[bool, typer.Option("--shuffle/--no-shuffle")] = True,
    group_by_label: Annotated[bool, typer.Option("--group-by-label")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    max_batches: Annotated[int | None, typer.Option("--max-batches", min=1)] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", min=0.0)] = None,
    prior: Annotated[
        float,
        typer.Option(
            "--prior",
            min=0.0,
            help="batchstats: blend with the running statistics as N prior samples.",
        ),
    ] = 0.0,
    report_dir: Annotated[
        Path | None, typer.Option("--report", help="Also write the HTML report with before/after.")
    ] = None,
    json_out: JsonOpt = None,
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
    import torch

    from .io import load_data

    plan = _plan([model], data=data, arch=arch)
    plan.file(out, "--out")
    plan.file(json_out, "--json", stdout=True)
    plan.folder(report_dir, "--report")
    plan.check()  # every output, before the model is even loaded
    net = _load(model, arch, arch_kwargs, trust_pickle, quiet=quiet)
    for companion in getattr(net, "_protected", ()):  # an ONNX model's external-data files
        plan.add_input(companion, "input model data")
    dataset = load_data(data, seed=seed, normalize=normalize)
    stated = train_batch_size is not None or train_group_by_label
    options = _scan_options(
        batch_size,
        shuffle,
        seed,
        group_by_label,
        max_batches,
        "train,eval",
        threshold,
        Device.cpu,
        train_batch_size,
        train_group_by_label,
        (not stated) if search is None else search,
    )
    options["model_name"] = model.name
    asked = f", batches of {batch_size}" if batch_size else ""
    _stderr(quiet).print(f"patching {model.name}: --to {to.value}{asked}")
    if isinstance(net, torch.nn.Module):
        patched, before, after = _patch_torch(net, dataset, to, layers, options, prior)
    else:
        patched, before, after = _patch_onnx(net, dataset, to, layers, options)
    from .render.console import print_patch

    print_patch(before, after, _stdout())
    refusal = _patch_refusal(to, patched, before, after)
    if refusal:
        _stderr().print(f"normdoctor: {refusal}: nothing written", markup=False, highlight=False)
        return EXIT_DRIFT
    check = getattr(patched, "normdoctor_verification", None)
    if check is not None:
        _stderr(quiet).print(f"verified: {check.text}", markup=False, highlight=False)
    _commit_patch_outputs(
        plan,
        patched,
        before,
        after,
        model=model,
        out=out,
        json_out=json_out,
        report_dir=report_dir,
        quiet=quiet,
    )
    return _exit_code([after], exit_zero, False)


def _patch_refusal(to: Fix, patched: Any, before: Any, after: Any) -> str:
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
    before: Any,
    after: Any,
    *,
    model: Path,
    out: Path,
    json_out: Path | None,
    report_dir: Path | None,
    quiet: bool,
) -> None:
    """The one place ``patch`` writes: everything is computed; stage every output, then publish.

    A rule that refuses to write (the patch made things worse) belongs before the staging: it
    then leaves every output untouched.  A failure while staging (disk full, the report folder
    appeared meanwhile) writes nothing either.
    """
    import torch

    err = _stderr(quiet)
    with plan:
        if isinstance(patched, torch.nn.Module):
            from .patch import save_patched

            plan.write_with(out, lambda path: save_patched(patched, path, source=model))
        else:
            plan.write_with(out, patched.save)
        _write_json(
            plan,
            json_out,
            {
                "schema_version": 1,
                "kind": "patch",
                "before": before.to_dict(),
                "after": after.to_dict(),
            },
        )
        if report_dir is not None:
            from .render import save_report

            save_report(before, report_dir, patched=after, outputs=plan)
        plan.commit()
    err.print(f"wrote {out}")


# -- report ---------------------------------------------------------------------------------------


def _reports_from_json(path: Path) -> tuple[Any, tuple | None, tuple | None]:
    """(report, sweep, series) from a file written by ``scan --json``."""
    from .report import ScanReport

    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("kind") in ("sweep", "series"):
            reports = tuple(ScanReport.from_dict(r) for r in payload["reports"])
            if payload["kind"] == "series":
                return reports[-1], None, reports
            return reports[0], reports, None
        return ScanReport.from_dict(payload), None, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NormDoctorError(
            f"{path}: not a normdoctor scan JSON ({one_line(exc, limit=sys.maxsize)})"
        ) from None


@app.command(
    epilog="Examples:\n\n"
    "  normdoctor report sample_models/tiny-batch.pt --arch sample_models.archs:DigitsCNN "
    "--data sample_models/data/test.npz --batch-sizes 1,8,64 -o tiny-report\n\n"
    "  normdoctor report scan.json -o report"
)
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
    err = _stderr(quiet)
    is_json = source.suffix.lower() == ".json"
    plan = _plan(
        [source],
        data=None if is_json else data,
        arch=None if is_json else arch,
        label="scan JSON" if is_json else "input model",
    )
    plan.folder(out, "--out", force=force, force_hint="--force")
    plan.check()
    sweep = series = None
    if is_json:
        main_report, sweep, series = _reports_from_json(source)
    else:
        if data is None:
            raise click.BadParameter(
                "a model needs --data (or pass a scan JSON)", param_hint="--data"
            )
        from .io import load_data

        net = _load(source, arch, arch_kwargs, trust_pickle, quiet=quiet)
        dataset = load_data(data, seed=seed, normalize=normalize)
        sizes: list[int | None] = list(_parse_sizes(batch_sizes)) if batch_sizes else [batch_size]
        single = len(sizes) == 1
        reports = []
        for size in sizes:
            options = _scan_options(
                size,
                shuffle,
                seed,
                group_by_label,
                max_batches,
                "train,eval",
                threshold,
                Device.cpu,
                train_batch_size if single else None,
                False,
                single and train_batch_size is None,
            )
            label = f"{source.name} bs={size}" if size else source.name
            with _Progress(err, label, not quiet) as progress:
                reports.append(
                    run_scan(net, dataset, progress=progress, model_name=source.name, **options)
                )
        main_report = reports[0]
        sweep = tuple(reports) if len(reports) > 1 else None
    from .render import save_report

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
    _stdout().print(main_report.verdict, highlight=False, markup=False)
    return EXIT_OK


# -- entry point ----------------------------------------------------------------------------------


def _interrupted() -> int:
    print("normdoctor: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _vendored(name: str, default: type[BaseException]) -> type[BaseException]:
    """typer >= 0.2x raises its own copy of click's exceptions (``typer._click``)."""
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        return default
    return getattr(vendored, name, default)


_CLICK_ERRORS = (click.ClickException, _vendored("ClickException", click.ClickException))
_ABORTS = (click.exceptions.Abort, getattr(typer.exceptions, "Abort", click.exceptions.Abort))


def _invoke(args: list[str]) -> int | None:
    """Run the command; every error becomes one line on stderr and an exit code."""
    command = typer.main.get_command(app)
    debug = "--debug" in args
    try:
        code = command.main(args=args, prog_name="normdoctor", standalone_mode=False)
        # typer answers a KeyboardInterrupt it caught with 130 and no word
        return _interrupted() if code == EXIT_INTERRUPTED else code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except _ABORTS as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            return _interrupted()
        print("normdoctor: aborted", file=sys.stderr)
        return EXIT_ERROR
    except _CLICK_ERRORS as exc:
        exc.show(file=sys.stderr)  # type: ignore[attr-defined]
        return EXIT_ERROR
    except (
        NormDoctorError,
        FileExistsError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
    ) as exc:
        if debug:
            raise
        print(f"normdoctor: error: {one_line(exc, limit=sys.maxsize)}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, Interrupted):
        return _interrupted()
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        if debug:
            raise
        print(
            f"normdoctor: internal error: {type(exc).__name__}: {one_line(exc, limit=sys.maxsize)} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the exit code.

    SIGINT and SIGTERM unwind the command like Ctrl-C (exit 130, ``normdoctor: interrupted``);
    the previous handlers are back on return, and no temporary file of the command survives.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    with interrupt_on_signals():
        try:
            code = _invoke(args)
        except (KeyboardInterrupt, Interrupted):  # arrived while an error was being reported
            code = _interrupted()
        finally:
            remove_temporaries()
    if code is None:
        code = EXIT_OK
    if argv is None:
        sys.exit(code)
    return int(code)

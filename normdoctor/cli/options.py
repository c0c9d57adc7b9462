"""The command line's vocabulary: the options the commands share, their parsing, and the scan
options as one value (:class:`ScanOptions`) built once per command."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import NormDoctorError
from ..metrics import Recommendation

__all__ = [
    "ArchKwOpt",
    "ArchOpt",
    "BatchSizeOpt",
    "Device",
    "DeviceOpt",
    "ExitZeroOpt",
    "Fix",
    "GroupByLabelOpt",
    "JsonOpt",
    "MaxBatchesOpt",
    "ModelArg",
    "NormalizeOpt",
    "PathsOpt",
    "QuietOpt",
    "ScanOptions",
    "SearchOpt",
    "SeedOpt",
    "ShuffleOpt",
    "StrictOpt",
    "ThresholdOpt",
    "TrainBatchOpt",
    "TrainGroupOpt",
    "TrustOpt",
    "VerboseOpt",
    "arch_kwargs",
    "parse_paths",
    "parse_sizes",
    "resolve_device",
]


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class Fix(str, Enum):
    """The names ``patch --to`` takes, in the order ``--help`` lists them: the fix vocabulary
    of :mod:`normdoctor.convert` (``auto``: each flagged layer's recommendation).  Spelled from
    :class:`~normdoctor.metrics.Recommendation` as :mod:`normdoctor.convert.targets` spells
    them (tests hold the two equal): importing ``convert`` here would import torch into every
    command, ``report scan.json`` included."""

    auto = "auto"
    recalibrate = Recommendation.RECALIBRATE.value
    instance = Recommendation.INSTANCE.value
    batchstats = Recommendation.BATCHSTATS.value
    renorm = Recommendation.RENORM.value


# -- shared options ------------------------------------------------------------------------------

ModelArg = Annotated[
    Path,
    typer.Argument(
        metavar="MODEL",
        help="Model file: state_dict (.pt/.pth/.bin/.ckpt), "
        ".safetensors, torch.export .pt2, TorchScript, .onnx; or a Hugging Face model folder "
        "(config.json + model.safetensors).",
    ),
]
ArchOpt = Annotated[
    str | None,
    typer.Option(
        "--arch",
        metavar="SPEC",
        help="Architecture for weights-only files: 'package.module:factory' or "
        "'path/to/file.py:ClassName'.",
    ),
]
ArchKwOpt = Annotated[
    str | None,
    typer.Option(
        "--arch-kwargs",
        metavar="JSON",
        help="Keyword arguments for --arch as JSON, e.g. '{\"width\": 32}'.",
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
    typer.Option(
        "--json",
        metavar="FILE",
        help="Also write the results as JSON to FILE; '-': stdout, which then holds only the JSON.",
    ),
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
        metavar="N",
        help="Batch size of the scan, one candidate of the composition search (default: the "
        "search picks the one that reproduces training best; --no-search scans exactly it).",
    ),
]
TrainBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--train-batch-size",
        min=1,
        metavar="N",
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
        metavar="NORM",
        help="Image folders: normalize pixels ([0, 1] by default) with 'imagenet' or "
        "'MEAN,STD' (per channel: 'M1,M2,M3,S1,S2,S3').",
    ),
]

ShuffleOpt = Annotated[
    bool,
    typer.Option(
        "--shuffle/--no-shuffle",
        help="Shuffle the samples before batching (with --seed), or batch them in the data's "
        "order.",
    ),
]
GroupByLabelOpt = Annotated[
    bool,
    typer.Option(
        "--group-by-label",
        help="Draw each batch from one label, as class-sorted (non-i.i.d.) training did.",
    ),
]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed of the shuffle (and of random data).", metavar="N")
]
MaxBatchesOpt = Annotated[
    int | None,
    typer.Option(
        "--max-batches",
        min=1,
        metavar="N",
        help="Scan at most N batches per path (a quick look at a big data set; default: all).",
    ),
]
ThresholdOpt = Annotated[
    float | None,
    typer.Option(
        "--threshold",
        min=0.0,
        metavar="X",
        help="Per-layer drift above which a layer counts as drifting (default 0.1).",
    ),
]
DeviceOpt = Annotated[
    Device,
    typer.Option(
        "--device",
        help="Where to run the model: cpu, cuda, or auto (cuda when available).",
    ),
]
PathsOpt = Annotated[
    str,
    typer.Option(
        "--paths",
        metavar="PATHS",
        help="Which paths to run, comma-separated: train (batch statistics, as in training), "
        "eval (running statistics, as at inference), or both.",
    ),
]


# -- parsing -------------------------------------------------------------------------------------


def arch_kwargs(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc.msg}", param_hint="--arch-kwargs") from exc
    if not isinstance(value, dict):
        raise typer.BadParameter("expected a JSON object", param_hint="--arch-kwargs")
    return value


def parse_paths(text: str) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in text.split(",") if p.strip())
    if not paths or any(p not in ("train", "eval") for p in paths):
        raise typer.BadParameter(
            f"expected train, eval or train,eval; got {text!r}", param_hint="--paths"
        )
    return paths


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise typer.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint="--batch-sizes"
        ) from exc
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter("batch sizes must be positive", param_hint="--batch-sizes")
    return sizes


def resolve_device(device: Device) -> str | None:
    if device is Device.auto:
        import torch

        return "cuda" if torch.cuda.is_available() else None
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise NormDoctorError("--device cuda: no CUDA device is available")
        return "cuda"
    return "cpu"


@dataclass(frozen=True, kw_only=True)
class ScanOptions:
    """The composition and measurement options of a scan, as the command line gave them.

    Built once per command; a sweep varies only ``batch_size`` (:func:`dataclasses.replace`).
    :meth:`kwargs` checks them (``--paths``, ``--device``) and turns them into the keywords of
    :func:`normdoctor.scan`.
    """

    batch_size: int | None = None
    shuffle: bool = True
    seed: int = 0
    group_by_label: bool = False
    max_batches: int | None = None
    paths: str = "train,eval"
    threshold: float | None = None
    device: Device = Device.cpu
    train_batch_size: int | None = None
    train_group_by_label: bool = False
    search: bool | None = None

    def with_batch_size(self, batch_size: int | None) -> ScanOptions:
        return dataclasses.replace(self, batch_size=batch_size)

    def kwargs(self) -> dict[str, Any]:
        from ..metrics import DEFAULT_THRESHOLD

        options: dict[str, Any] = dict(
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            group_by="label" if self.group_by_label else None,
            max_batches=self.max_batches,
            paths=parse_paths(self.paths),
            threshold=DEFAULT_THRESHOLD if self.threshold is None else self.threshold,
            device=resolve_device(self.device),
            search=self.search,
        )
        if self.train_batch_size is not None or self.train_group_by_label:
            options["train_batch_size"] = self.train_batch_size
            options["train_group_by"] = "label" if self.train_group_by_label else None
        return options

"""What the commands do with a loaded model, one function per operation.

Scans, fixes, listings and checks dispatch on the model (:func:`normdoctor.sources.as_source`,
:func:`normdoctor.patch.patch`, :func:`normdoctor.patch.autopatch`): a torch ``nn.Module`` and
an ONNX ``OnnxModel`` go through the same functions, so nothing here branches on the backend.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .options import Fix

if TYPE_CHECKING:
    from ..checks import Finding
    from ..layers import NormLayer
    from ..report import ScanReport

__all__ = [
    "find_layers",
    "fix",
    "input_files",
    "layer_state",
    "model_writer",
    "run_scan",
    "static_checks",
]


# -- scan -----------------------------------------------------------------------------------------


def run_scan(
    model: Any, data: Any, progress: Callable[[int, int | None], None] | None = None, **options: Any
) -> ScanReport:
    """:func:`normdoctor.scan` of any loaded model (the one driver for every backend)."""
    from ..scan import scan

    return scan(model, data, progress=progress, **options)


# -- layers listing and static checks -------------------------------------------------------------


def static_checks(model: Any, checkpoint: Any = None) -> list[Finding]:
    """The static findings of a loaded model (``checkpoint`` None: built with ``--arch``), or of
    a checkpoint file read without its architecture (``model``: the module it holds, if any)."""
    from ..checks import static_checks_for
    from ..sources import as_source

    if checkpoint is None or (model is not None and str(checkpoint.format) == "onnx"):
        return as_source(model).static_checks()  # a graph's checks also read the graph
    return static_checks_for(checkpoint)


def find_layers(model: Any) -> list[NormLayer]:
    """The normalization layers of a loaded model, in module (or graph) order."""
    from ..sources import as_source

    return list(as_source(model).layers)


def layer_state(model: Any) -> Mapping[str, Any]:
    """The model's tensors by qualified name (running statistics among them)."""
    state: Mapping[str, Any] = model.state_dict()
    return state


# -- patch ----------------------------------------------------------------------------------------


def input_files(model: Any) -> tuple[Path, ...]:
    """Files a loaded model reads beside its own (an ONNX model's external-data files): inputs
    that no output may replace."""
    from ..sources import as_source

    return as_source(model).input_files()


def fix(
    net: Any, dataset: Any, to: Fix, layers: str | None, options: dict[str, Any], prior: float
) -> tuple[Any, ScanReport, ScanReport]:
    """(patched model, scan before, scan after) of the fix ``to`` on ``layers`` (a glob); the
    patched model carries its verification (``normdoctor_verification``)."""
    from ..patch import autopatch, patch, verify_patch
    from ..scan import scan as run

    scan_options = {k: v for k, v in options.items() if k != "paths"}
    if to is Fix.auto:
        if layers is not None:
            raise typer.BadParameter(
                "--layers applies to an explicit --to fix", param_hint="--layers"
            )
        extra_auto: dict[str, Any] = {"prior": prior} if prior else {}
        return autopatch(net, dataset, **extra_auto, **scan_options)
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
    check = verify_patch(net, patched, dataset, before, max_batches=options.get("max_batches"))
    # torch's stub types Module.__setattr__'s value as Tensor | Module; any value is allowed
    patched.normdoctor_verification = check  # type: ignore[assignment]
    return patched, before, run(patched, dataset, **fixed)


def model_writer(patched: Any, source: Path) -> Callable[[Path], object]:
    """How the patched model is written to a path (``source``: the file it was loaded from)."""
    from ..patch.graph import save_fixed

    return lambda path: save_fixed(patched, path, source=source)

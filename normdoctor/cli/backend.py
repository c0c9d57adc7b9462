"""Every backend branch of the command line, one function per operation.

A torch ``nn.Module`` goes through normdoctor's own functions; a model of another backend (an
ONNX ``OnnxModel``) through its methods.  Each ``isinstance``/``hasattr`` on a loaded model lives
here and nowhere else in the CLI, so that each body can become one dispatching call once scans and
fixes take either backend (issue 17); until then every branch behaves as it always did.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..convert import BATCHSTATS, RENORM
from ..errors import NormDoctorError
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
    "onnx_options",
    "run_scan",
    "static_checks",
]


# -- scan -----------------------------------------------------------------------------------------


def run_scan(
    model: Any, data: Any, progress: Callable[[int, int | None], None] | None = None, **options: Any
) -> ScanReport:
    """``normdoctor.scan`` for torch modules, the model's own ``scan`` for other backends (ONNX)."""
    import torch

    from ..scan import scan

    if isinstance(model, torch.nn.Module):
        return scan(model, data, progress=progress, **options)
    report: ScanReport = model.scan(data, progress=progress, **onnx_options(options))
    return report


def onnx_options(options: dict[str, Any]) -> dict[str, Any]:
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


# -- layers listing and static checks -------------------------------------------------------------


def static_checks(model: Any, checkpoint: Any = None) -> list[Finding]:
    """The static findings of a loaded model (``checkpoint`` None: built with ``--arch``), or of
    a checkpoint file read without its architecture (``model``: the module it holds, if any)."""
    import torch

    from ..checks import static_checks as module_checks
    from ..checks import static_checks_for

    if checkpoint is None:
        if isinstance(model, torch.nn.Module):
            return module_checks(model)
        findings: list[Finding] = model.static_checks()
        return findings
    if not hasattr(model, "static_checks"):
        return static_checks_for(checkpoint)
    findings = model.static_checks()
    return findings


def find_layers(model: Any) -> list[NormLayer]:
    """The normalization layers of a loaded model, in module (or graph) order."""
    import torch

    from ..layers import find_norm_layers

    if isinstance(model, torch.nn.Module):
        return find_norm_layers(model)
    layers: list[NormLayer] = model.find_norm_layers()
    return layers


def layer_state(model: Any) -> Mapping[str, Any]:
    """The model's tensors by qualified name (running statistics among them), if it has any."""
    state: Mapping[str, Any] = model.state_dict() if hasattr(model, "state_dict") else {}
    return state


# -- patch ----------------------------------------------------------------------------------------


def input_files(model: Any) -> tuple[Path, ...]:
    """Files a loaded model reads beside its own (an ONNX model's external-data files): inputs
    that no output may replace."""
    # TODO(issue 17): a public attribute of OnnxModel instead of its private `_protected`.
    return tuple(getattr(model, "_protected", ()))


def fix(
    net: Any, dataset: Any, to: Fix, layers: str | None, options: dict[str, Any], prior: float
) -> tuple[Any, ScanReport, ScanReport]:
    """(patched model, scan before, scan after) of the fix ``to`` on ``layers`` (a glob)."""
    import torch

    if isinstance(net, torch.nn.Module):
        return _fix_torch(net, dataset, to, layers, options, prior)
    return _fix_onnx(net, dataset, to, layers, options)


def _fix_torch(
    net: Any, dataset: Any, to: Fix, layers: str | None, options: dict[str, Any], prior: float
) -> tuple[Any, ScanReport, ScanReport]:
    from ..patch import autopatch, patch
    from ..scan import scan as run

    scan_options = {k: v for k, v in options.items() if k != "paths"}
    if to is Fix.auto:
        if layers is not None:
            raise click.BadParameter(
                "--layers applies to an explicit --to fix", param_hint="--layers"
            )
        return autopatch(net, dataset, prior=prior, **scan_options)
    from ..patch import verify_patch

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
    # torch's stub types Module.__setattr__'s value as Tensor | Module; any value is allowed
    patched.normdoctor_verification = verify_patch(  # type: ignore[assignment]
        net, patched, dataset, before, max_batches=options.get("max_batches")
    )
    return patched, before, run(patched, dataset, **fixed)


def _fix_onnx(
    net: Any, dataset: Any, to: Fix, layers: str | None, options: dict[str, Any]
) -> tuple[Any, ScanReport, ScanReport]:
    scan_options = onnx_options(options)
    before = net.scan(dataset, **scan_options)
    if to is Fix.auto:  # each flagged node gets its recommendation; renorm needs training
        patched = net
        groups: dict[str, list[str]] = {}
        for layer in before.flagged_layers:
            conversion = (
                BATCHSTATS if str(layer.recommendation) == RENORM else str(layer.recommendation)
            )
            groups.setdefault(conversion, []).append(layer.name)
        for conversion, names in groups.items():
            patched = patched.patch(
                conversion, data=dataset, layers=names, batch_size=scan_options["batch_size"]
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


def model_writer(patched: Any, source: Path) -> Callable[[Path], object]:
    """How the patched model is written to a path (``source``: the file it was loaded from)."""
    import torch

    if isinstance(patched, torch.nn.Module):
        from ..convert import save_patched

        return lambda path: save_patched(patched, path, source=source)
    writer: Callable[[Path], object] = patched.save
    return writer

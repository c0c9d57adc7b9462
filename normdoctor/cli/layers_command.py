"""``normdoctor layers``: the normalization layers of a model file and what their stored numbers
reveal, without data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..report import LayerListing, LayersReport
from . import backend
from .common import EXIT_DRIFT, EXIT_OK, load, output_plan, stdout, write_json
from .formats import ListingFormat, ListingFormatOpt, presentation
from .options import ArchKwOpt, ArchOpt, ExitZeroOpt, JsonOpt, ModelArg, TrustOpt

if TYPE_CHECKING:
    from ..layers import NormLayer

__all__ = ["EPILOG", "layers"]

EPILOG = """Examples:

\b
  normdoctor layers sample_models/healthy.pt \\
      --arch sample_models.archs:DigitsCNN
  normdoctor layers model.safetensors --format json | jq '.findings'
"""


def layers(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwOpt = None,
    trust_pickle: TrustOpt = False,
    json_out: JsonOpt = None,
    output_format: ListingFormatOpt = ListingFormat.text,
    exit_zero: ExitZeroOpt = False,
) -> int:
    """List every normalization layer with its running statistics and the static findings.

    Needs no data. Without --arch a state_dict is checked by its buffer names alone; values
    the file does not store (momentum, eps) are reported as unknown.
    """
    import torch

    from ..checks import Severity
    from ..io import load_checkpoint

    shown = presentation(output_format, json_out)
    plan = output_plan([model], arch=arch)
    for target in shown.json_targets:
        plan.file(target, "--json", stdout=True)
    plan.check()
    file_format = ""
    if arch is not None:
        module = load(model, arch, arch_kwargs, trust_pickle)
        findings = backend.static_checks(module)
    else:
        checkpoint = load_checkpoint(model, trust_pickle=trust_pickle)
        file_format = str(checkpoint.format)
        module = checkpoint.module
        if module is None and file_format == "onnx":
            module = load(model, None, None, False)
        findings = backend.static_checks(module, checkpoint)
    unknown: dict[str, tuple[str, ...]] = {}
    if module is not None:
        found = backend.find_layers(module)
        state = backend.layer_state(module)
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
    from ..render.console import print_layers

    if shown.text:
        out = stdout()
        out.print(
            f"[bold]{model}[/]: {len(found)} normalization layers, "
            f"{sum(layer.batch_dependent for layer in found)} batch-dependent"
        )
        print_layers(out, found, findings, running, unknown)
        if unknown:
            line = _unknown_line(model, unknown, len(found), file_format)
            out.print(line, markup=False, highlight=False)
    listing = LayersReport(
        model=str(model),
        layers=tuple(
            LayerListing.from_layer(layer, unknown.get(layer.name, ())) for layer in found
        ),
        findings=tuple(findings),
    )
    with plan:
        for target in shown.json_targets:
            write_json(plan, target, listing.to_dict())
        plan.commit()
    errors = any(f.severity == Severity.ERROR for f in findings)
    return EXIT_DRIFT if errors and not exit_zero else EXIT_OK


def _layers_from_state_dict(
    state: dict[str, Any], info: dict[str, dict[str, Any]]
) -> tuple[list[NormLayer], dict[str, Any], dict[str, tuple[str, ...]]]:
    """NormLayer records from buffer names alone (a state_dict without its architecture), with
    the attributes the file does not carry per layer (a bare state_dict or a traced TorchScript
    archive stores no momentum or eps): (layers, state, unknown)."""
    from ..checks import stored_norm_layers

    # a layer is listed by its running_mean (a running_var alone is not listed, as before)
    stored = [layer for layer in stored_norm_layers(state, info) if "running_mean" in layer.tensors]
    unknown = {layer.name: layer.unknown for layer in stored if layer.unknown}
    return [layer.norm_layer() for layer in stored], state, unknown


def _unknown_line(
    model: Path, unknown: dict[str, tuple[str, ...]], total: int, file_format: str
) -> str:
    """One line saying which values the file does not carry (shown as '-' in the table)."""
    from ..checks import CARRIED

    parts = []
    for attr in CARRIED:
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

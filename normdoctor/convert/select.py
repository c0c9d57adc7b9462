"""Which layers a fix applies to, and which options each conversion takes.

Selection is validated before anything changes: every selected layer can take the fix, a
pattern that matches no norm layer is refused, nothing is skipped silently.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConversionError
from ..layers import INSTANCE_NORMS, RUNNING_STATS, NormFamily, NormLayer, find_norm_layers
from ..metrics import Recommendation
from ..renorm import RenormSchedule
from ..report import ScanReport
from .core import check_convertible
from .modules import check_prior
from .targets import (
    AUTO,
    BATCHSTATS,
    INSTANCE,
    OPTIONS,
    RECALIBRATE,
    RECALIBRATE_OPTIONS,
    RENORM,
)

__all__ = ["Layers", "resolve", "split_options"]

Layers = str | Sequence[str] | ScanReport | None


def _default_selected(module: nn.Module, layer: NormLayer, to: str) -> bool:
    if to == RECALIBRATE:  # every layer with running statistics (refused where unsupported)
        return layer.family in RUNNING_STATS
    if to == INSTANCE and layer.family is NormFamily.INSTANCE_TRACKED:
        return type(module) in INSTANCE_NORMS.values()
    return layer.family is NormFamily.BATCH and isinstance(module, _BatchNorm)


def resolve(model: nn.Module, layers: Layers, to: str) -> dict[str, str]:
    """Selected layer name -> target kind, in model order; validated, nothing changed."""
    modules = dict(model.named_modules())
    norm = find_norm_layers(model)
    names = [layer.name for layer in norm]
    listing = ", ".join(repr(n) for n in names) or "none"
    if isinstance(layers, ScanReport):
        missing = [r.name for r in layers.flagged_layers if r.name not in modules]
        if missing:
            raise ConversionError(
                f"the scan report flags layers this model does not have: {', '.join(missing)} "
                "(was it made for another model?)"
            )
        plan: dict[str, str] = {}
        for r in layers.flagged_layers:
            kind = str(r.recommendation) if to == AUTO else to
            if kind == Recommendation.OK.value:
                continue
            check_convertible(modules[r.name], r.name, kind)
            plan[r.name] = kind
        return plan
    if to == AUTO:
        raise ConversionError(
            "to='auto' needs a ScanReport as layers (each flagged layer gets its recommendation)"
        )
    if layers is None:
        plan = {
            layer.name: to for layer in norm if _default_selected(modules[layer.name], layer, to)
        }
        for n in plan:  # every one of them, or none: nothing is skipped silently
            check_convertible(modules[n], n, to)
        return plan
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise ConversionError("layers is an empty list: name at least one layer")
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConversionError(f"layer patterns must be strings, got {pattern!r}")
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ConversionError(
                f"layer pattern {pattern!r} matches no normalization layer "
                f"(the model's norm layers: {listing})"
            )
        if any(ch in pattern for ch in "*?["):
            ok = []
            for n in matched:
                try:
                    check_convertible(modules[n], n, to)
                except ConversionError:
                    continue
                ok.append(n)
            if not ok:
                kinds = ", ".join(f"{n!r} ({type(modules[n]).__name__})" for n in matched)
                raise ConversionError(
                    f"layer pattern {pattern!r} matches only layers that cannot become "
                    f"{to!r}: {kinds}"
                )
            matched = ok
        else:
            check_convertible(modules[pattern], pattern, to)
        chosen.update(matched)
    return {n: to for n in names if n in chosen}


def split_options(kinds: Iterable[str], options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``options`` of a patch dealt to the fixes ``kinds`` that take them, validated (TypeError
    for an option none of them takes, ConversionError for a bad value); nothing changed."""
    kinds = set(kinds)
    per_kind: dict[str, dict[str, Any]] = {k: {} for k in kinds}
    for key, value in options.items():
        takers = [
            k
            for k in kinds
            if key in OPTIONS.get(k, ()) or (k == RECALIBRATE and key in RECALIBRATE_OPTIONS)
        ]
        if not takers:
            known = sorted(
                {o for k in kinds for o in OPTIONS.get(k, ())}
                | (set(RECALIBRATE_OPTIONS) if RECALIBRATE in kinds else set())
            )
            raise TypeError(
                f"unknown option {key!r} for {', '.join(sorted(kinds)) or 'this patch'} "
                f"(accepted: {', '.join(known) or 'none'})"
            )
        for k in takers:
            per_kind[k][key] = value
    if BATCHSTATS in per_kind and "prior" in per_kind[BATCHSTATS]:
        per_kind[BATCHSTATS]["prior"] = check_prior(per_kind[BATCHSTATS]["prior"])
    for opts in per_kind.values():
        if "dim" in opts and (isinstance(opts["dim"], bool) or opts["dim"] not in (1, 2, 3)):
            raise ConversionError(
                f"dim must be 1, 2 or 3 (BatchNorm1d/2d/3d inputs), got {opts['dim']!r}"
            )
    if RENORM in per_kind:
        # Validate now (RenormSchedule raises ValueError on bad limits), not half-way.
        plain = {k: v for k, v in per_kind[RENORM].items() if k not in ("schedule", "dim")}
        try:
            RenormSchedule(**plain)
        except (TypeError, ValueError) as exc:
            raise ConversionError(f"renorm options: {exc}") from exc
        sched = per_kind[RENORM].get("schedule")
        if sched is not None and not callable(sched):
            raise ConversionError(
                "renorm option 'schedule' must be a callable step -> (r_max, d_max)"
            )
    return per_kind

"""What a patched model carries: the conversions applied to it, as manifest entries.

An entry is ``{"name": layer name, "to": conversion, "options": plain-valued options}``; the
list lives on the root module (:data:`RECORD_ATTR`) and is what :func:`save_patched` writes.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..renorm import BatchRenorm
from .modules import BatchStatsNorm
from .targets import BATCHSTATS, RENORM

__all__ = ["RECORD_ATTR", "manifest_options", "record", "records"]

#: Attribute of a patched root module: the conversions applied, as manifest entries.
RECORD_ATTR = "normdoctor_conversions"


def manifest_options(to: str, module: nn.Module) -> dict[str, Any]:
    """The plain-valued options that rebuild ``module`` (recorded in the manifest)."""
    if to == RENORM:
        assert isinstance(module, BatchRenorm)
        c = module.schedule_config
        out: dict[str, Any] = {
            "r_max": c.r_max,
            "d_max": c.d_max,
            "hold_steps": c.hold_steps,
            "r_max_steps": c.r_max_steps,
            "d_max_steps": c.d_max_steps,
        }
        if module.schedule is not c:
            out["schedule"] = "callable"  # marks it unsaveable; see save_patched
        return out
    if to == BATCHSTATS:
        assert isinstance(module, BatchStatsNorm)
        return {"prior": float(module.prior)}
    return {}


def record(root: nn.Module, entries: list[dict[str, Any]], previous: list[dict[str, Any]]) -> None:
    """Record ``entries`` on ``root``, replacing those of ``previous`` for the same layers."""
    names = {e["name"] for e in entries}
    merged = [e for e in previous if e["name"] not in names] + entries
    root.__dict__[RECORD_ATTR] = merged


def records(model: nn.Module) -> list[dict[str, Any]]:
    """A copy of the conversions recorded on ``model`` (none for a model never patched)."""
    return [dict(e) for e in model.__dict__.get(RECORD_ATTR, [])]

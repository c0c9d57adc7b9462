"""The one patched-model file format: a state dict plus a manifest of the conversions.

Patched models are saved as one file (:func:`save_patched`): the state dict plus a manifest of
the conversions, re-applied to a freshly built original architecture by :func:`apply_manifest`.
The file holds ``{MANIFEST_KEY: {"version": MANIFEST_VERSION, "conversions": [{"name", "to",
"options"}, ...]}, "state_dict": ...}``; model loaders check a manifest read from a file with
:func:`check_file_manifest`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConversionError, LoadError, NormDoctorError
from ..outputs import write_atomic
from .core import check_convertible, convert_layers
from .modules import CONVERTED, dim_of
from .record import RECORD_ATTR, records
from .select import split_options
from .targets import CONVERSIONS, OPTIONS

__all__ = [
    "MANIFEST_KEY",
    "MANIFEST_VERSION",
    "RECORD_ATTR",
    "apply_manifest",
    "check_file_manifest",
    "load_patched",
    "save_patched",
    "validate_entries",
]

#: The key of a patched-model file that holds the manifest.
MANIFEST_KEY = "normdoctor_patch"
MANIFEST_VERSION = 1


def check_file_manifest(manifest: object, where: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest found under :data:`MANIFEST_KEY` in a file, checked as a loader reads it.

    Raises:
        LoadError: (message starting with ``where``) an unsupported version, or no list of
            conversions.  The entries themselves are checked when applied
            (:func:`apply_manifest`).
    """
    if not isinstance(manifest, Mapping) or manifest.get("version") != MANIFEST_VERSION:
        version = manifest.get("version") if isinstance(manifest, Mapping) else None
        raise LoadError(
            f"{where}: normdoctor patch manifest version {version!r} is not supported "
            f"(this normdoctor reads version {MANIFEST_VERSION})"
        )
    if not isinstance(manifest.get("conversions"), list):
        raise LoadError(f"{where}: the normdoctor patch manifest has no list of conversions")
    return dict(manifest)


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def validate_entries(conversions: Any) -> list[dict[str, Any]]:
    """Manifest entries as plain ``{"name", "to", "options"}`` dicts; ConversionError for
    anything else (an unknown conversion or option, a value that is not plain data)."""
    if not isinstance(conversions, (list, tuple)):
        raise ConversionError(
            f"conversions must be a list of entries, got {type(conversions).__name__}"
        )
    out = []
    for i, e in enumerate(conversions):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or "to" not in e:
            raise ConversionError(
                f"conversion #{i} is not a {{'name', 'to', 'options'}} entry: {e!r}"
            )
        if e["to"] not in CONVERSIONS:
            raise ConversionError(
                f"conversion of layer {e['name']!r}: 'to' must be one of {', '.join(CONVERSIONS)}, "
                f"got {e['to']!r}"
            )
        options = e.get("options") or {}
        if not isinstance(options, dict):
            raise ConversionError(f"conversion of layer {e['name']!r}: options must be a dict")
        unknown = set(options) - set(OPTIONS[e["to"]])
        if unknown:
            raise ConversionError(
                f"conversion of layer {e['name']!r} to {e['to']!r}: unknown option(s) "
                f"{', '.join(sorted(unknown))}"
            )
        bad = [k for k, v in options.items() if not _plain(v) or (k == "schedule")]
        if bad:
            raise ConversionError(
                f"conversion of layer {e['name']!r}: option(s) {', '.join(bad)} are not plain "
                "values (a callable renorm schedule cannot be saved; use the step-based one)"
            )
        out.append({"name": e["name"], "to": e["to"], "options": dict(options)})
    return out


def save_patched(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    conversions: Sequence[dict[str, Any]] | None = None,
    source: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a patched model to ONE ``.pt`` file, atomically.

    The file holds ``{"normdoctor_patch": {"version": 1, "conversions": [{"name", "to",
    "options"}, ...]}, "state_dict": model.state_dict()}``, loadable with
    ``torch.load(path, weights_only=True)``.  Rebuild with :func:`load_patched` (or
    :func:`apply_manifest` on the original architecture, then ``load_state_dict``).

    Args:
        conversions: manifest entries; default: the record the patch functions left on the
            model (``model.normdoctor_conversions``).
        source: the file the model was loaded from (also read from ``model.normdoctor_source``):
            it is never overwritten.

    Raises:
        NormDoctorError: ``path`` is the input file.
        ConversionError: an entry is not plain data.
    """
    entries = validate_entries(records(model) if conversions is None else list(conversions))
    path = Path(path)
    for src in (source, getattr(model, "normdoctor_source", None)):
        if src is None:
            continue
        src_path = Path(src)
        same = (
            path.exists() and src_path.exists() and os.path.samefile(path, src_path)
        ) or path.resolve() == src_path.resolve()
        if same:
            raise NormDoctorError(f"refusing to overwrite the input model file {str(src_path)!r}")
    payload = {
        MANIFEST_KEY: {"version": MANIFEST_VERSION, "conversions": entries},
        "state_dict": model.state_dict(),
    }
    write_atomic(path, lambda f: torch.save(payload, f))
    return path


def apply_manifest(
    model: nn.Module, manifest: dict[str, Any], *, inplace: bool = False
) -> nn.Module:
    """Re-apply saved conversions to a freshly built original architecture.

    Args:
        model: the original (unpatched) architecture.
        manifest: ``{"version": 1, "conversions": [...]}`` or a whole saved file's dict (with a
            ``"normdoctor_patch"`` key).

    Returns:
        The converted model, ready for ``load_state_dict(saved["state_dict"])``.

    Raises:
        ConversionError: the manifest does not fit the architecture (a layer name it lacks, a
            layer that is not a BatchNorm, an unknown version or kind); the model is unchanged.
    """
    if not isinstance(manifest, dict):
        raise ConversionError(f"a manifest is a dict, got {type(manifest).__name__}")
    inner = manifest.get(MANIFEST_KEY, manifest)
    if not isinstance(inner, dict) or inner.get("version") != MANIFEST_VERSION:
        got = inner.get("version") if isinstance(inner, dict) else None
        raise ConversionError(
            f"unsupported normdoctor patch manifest version {got!r} (expected {MANIFEST_VERSION})"
        )
    entries = validate_entries(inner.get("conversions", []))
    modules = dict(model.named_modules())
    missing = [e["name"] for e in entries if e["name"] not in modules]
    if missing:
        raise ConversionError(
            f"the manifest converts layer(s) {', '.join(repr(n) for n in missing)}, which this "
            "model does not have: it was saved from another architecture"
        )
    seen: set[str] = set()
    for e in entries:
        if e["name"] in seen:
            raise ConversionError(f"the manifest converts layer {e['name']!r} twice")
        seen.add(e["name"])
        module = modules[e["name"]]
        if isinstance(module, CONVERTED):
            raise ConversionError(
                f"layer {e['name']!r} is already converted ({type(module).__name__}): apply a "
                "manifest to the original architecture"
            )
        check_convertible(module, e["name"], e["to"])
    plan = {e["name"]: e["to"] for e in entries}
    # Validated and normalized (prior as a float) as patch() does.
    per_layer = {e["name"]: split_options({e["to"]}, e["options"])[e["to"]] for e in entries}
    dims: dict[str, int] = {}
    for n, k in plan.items():
        dim = dim_of(modules[n]) or per_layer[n].get("dim")
        if dim is None:
            raise ConversionError(
                f"the manifest converts layer {n!r}, a {type(modules[n]).__name__} (any input "
                f"dimensionality), to {k!r} without saying which (option 'dim'): it was not "
                "written by this version of normdoctor"
            )
        dims[n] = dim
    return convert_layers(model, plan, per_layer, dims, inplace=inplace)


def load_patched(
    path: str | os.PathLike[str], model: nn.Module, *, inplace: bool = False
) -> nn.Module:
    """Load a file written by :func:`save_patched` into the original architecture ``model``."""
    try:
        # An open file, not the path: torch picks a reader by a path's extension (a ".safetensors"
        # name would go to safetensors whatever the file holds).
        with open(path, "rb") as fh:
            saved = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoadError(f"cannot read patched model {str(path)!r}: {exc}") from exc
    if not isinstance(saved, dict) or MANIFEST_KEY not in saved or "state_dict" not in saved:
        raise LoadError(f"{str(path)!r} is not a normdoctor patched-model file")
    patched = apply_manifest(model, saved, inplace=inplace)
    patched.load_state_dict(saved["state_dict"])
    return patched

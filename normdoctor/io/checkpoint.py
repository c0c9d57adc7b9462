"""Reading the containers a model file holds, before any architecture is involved.

What a ``torch.save`` file, a safetensors file, a TorchScript archive, a ``.pt2`` program or an
ONNX graph holds, found without running code from the file (the safety rules are in
:mod:`normdoctor.io.models`): a plain, wrapped or Lightning state_dict, a normdoctor-patched
checkpoint, or a whole pickled module (weights and layer attributes recovered inertly).  Loading
those weights into a model is :mod:`normdoctor.io.align`'s.
"""

from __future__ import annotations

import enum
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import nn

from ..convert.manifest import MANIFEST_KEY, MANIFEST_VERSION, apply_manifest, check_file_manifest
from ..errors import LoadError, UnsafeFileError, one_line
from ._messages import listing
from .arch import on_sys_path
from .archive import CheckedZip
from .pt2 import quiet_torch_export_logs, read_exported_program
from .sniff import Kind, Sniffed
from .unflatten import rebuild_norm_modules
from .unpickle import InertUnpickler, Opaque, pickle_globals, unsafe_names

__all__ = [
    "PATCH_KEY",
    "PATCH_VERSION",
    "WRAPPER_KEYS",
    "CheckpointFormat",
    "Contents",
    "apply_patch_manifest",
    "load_onnx_model",
    "read_contents",
    "read_safetensors",
    "read_torch_file",
    "refusal",
]

#: Keys under which training scripts commonly nest the model's weights, most specific first.
WRAPPER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "network",
    "module",
    "model_ema",
    "state_dict_ema",
    "ema",
    "params",
    "weights",
)
PATCH_KEY = MANIFEST_KEY  # the old names of the manifest format (normdoctor.convert.manifest)
PATCH_VERSION = MANIFEST_VERSION


class CheckpointFormat(enum.StrEnum):
    """What a model file holds."""

    STATE_DICT = "state_dict"  # weights only (plain, wrapped or Lightning): needs ``arch``
    SAFETENSORS = "safetensors"  # weights only: needs ``arch``
    EXPORT = "export"  # torch.export program (.pt2)
    TORCHSCRIPT = "torchscript"  # torch.jit archive
    PICKLE = "pickle"  # a whole pickled nn.Module (torch.save(model))
    ONNX = "onnx"
    PATCHED = "patched"  # state_dict + normdoctor conversion manifest: needs ``arch``
    HUGGINGFACE = "huggingface"  # a save_pretrained folder: built from its config.json


# ---------------------------------------------------------- from unpickled objects to weights


def _is_tensor_dict(obj: Any) -> TypeGuard[Mapping[str, Any]]:
    if not isinstance(obj, Mapping) or not obj:
        return False
    tensors = 0
    for key, value in obj.items():
        if not isinstance(key, str):
            return False
        if isinstance(value, torch.Tensor):
            tensors += 1
        elif not key.endswith("_extra_state"):
            return False
    return tensors > 0


def _tensors_only(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _short_kind(qualname: str) -> str:
    return qualname.rsplit(".", 1)[-1]


def _clean_qualname(qualname: str) -> str:
    qualname = qualname.removeprefix("__torch__.")
    return re.sub(r"\.___torch_mangle_\d+", "", qualname)


_INFO_ATTRS = ("eps", "momentum", "track_running_stats", "affine", "num_features")


def _flatten_opaque_module(
    root: Opaque,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Weights and per-module attributes of an inertly unpickled module tree.

    Handles both layouts: a pickled ``nn.Module`` (``_parameters``/``_buffers``/``_modules``
    dicts in the instance state) and a TorchScript object (attributes directly in the state).
    """
    state_dict: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()

    def visit(obj: Opaque, prefix: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        state = obj._nd_state
        if isinstance(state, tuple) and state and isinstance(state[0], Mapping):
            state = state[0]
        if not isinstance(state, Mapping):
            return
        qualname = _clean_qualname(obj._nd_qualname)
        entry: dict[str, Any] = {"kind": _short_kind(qualname), "qualname": qualname}
        for attr in _INFO_ATTRS:
            value = state.get(attr)
            if value is None and attr == "momentum" and "momentum" in state:
                entry[attr] = None
            elif isinstance(value, (bool, int, float)):
                entry[attr] = value
        info[prefix.rstrip(".")] = entry
        if "_modules" in state:  # a pickled nn.Module
            non_persistent = state.get("_non_persistent_buffers_set") or ()
            for group in ("_parameters", "_buffers"):
                tensors = state.get(group) or {}
                if isinstance(tensors, Mapping):
                    for name, value in tensors.items():
                        if isinstance(value, torch.Tensor) and not (
                            group == "_buffers" and name in non_persistent
                        ):
                            state_dict[prefix + name] = value
            children = state.get("_modules") or {}
            if isinstance(children, Mapping):
                for name, child in children.items():
                    if isinstance(child, Opaque):
                        visit(child, f"{prefix}{name}.")
            return
        for name, value in state.items():  # TorchScript: attributes are the state
            if not isinstance(name, str):
                continue
            if isinstance(value, torch.Tensor):
                state_dict[prefix + name] = value
            elif isinstance(value, Opaque) and value._nd_qualname.startswith("__torch__."):
                visit(value, f"{prefix}{name}.")

    visit(root, "")
    return state_dict, info


def _is_module_like(obj: Any) -> bool:
    if not isinstance(obj, Opaque):
        return False
    state = obj._nd_state
    if isinstance(state, tuple) and state:
        state = state[0]
    return isinstance(state, Mapping) and (
        "_modules" in state or obj._nd_qualname.startswith("__torch__.")
    )


@dataclass(slots=True)
class Contents:
    """What a torch file held, before any architecture is involved."""

    format: CheckpointFormat
    state_dict: dict[str, torch.Tensor] | None = None
    module: nn.Module | None = None
    layer_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    caveats: list[str] = field(default_factory=list)  # notes that change what a scan measures
    refused: list[str] | None = None  # pickled classes that were not unpickled (inert read)
    hyper_parameters: dict[str, Any] | None = None  # a Lightning checkpoint's, plain values only


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = [str(k) for k in obj]
        return f"a dict with keys {listing(keys)}" if keys else "an empty dict"
    if isinstance(obj, Opaque):
        return f"a pickled {obj._nd_qualname}"
    return f"a {type(obj).__name__}"


def _classify(obj: Any, path: Path, depth: int = 0) -> Contents:
    """Find the model inside whatever a torch file held."""
    if isinstance(obj, nn.Module):
        return Contents(CheckpointFormat.PICKLE, module=obj)
    if _is_module_like(obj):
        sd, info = _flatten_opaque_module(obj)
        return Contents(CheckpointFormat.PICKLE, state_dict=sd, layer_info=info)
    if isinstance(obj, Mapping):
        if PATCH_KEY in obj:
            return _patched_contents(obj, path)
        if _is_tensor_dict(obj):
            return Contents(CheckpointFormat.STATE_DICT, state_dict=_tensors_only(obj))
        if depth == 0 and _is_lightning(obj):
            return _lightning_contents(obj, path)
        if depth < 2:
            for key in WRAPPER_KEYS:
                if key in obj:
                    try:
                        inner = _classify(obj[key], path, depth + 1)
                    except LoadError:
                        continue
                    if key != "state_dict" or inner.format is not CheckpointFormat.STATE_DICT:
                        inner.notes.append(f"weights read from the checkpoint's {key!r} entry")
                    return inner
    raise LoadError(
        f"{path} holds {_describe(obj)}, not a model or a state_dict (looked under "
        f"{', '.join(repr(k) for k in WRAPPER_KEYS[:4])}, ...)"
    )


# -------------------------------------------------------------------- Lightning checkpoints

_LIGHTNING_KEYS = ("pytorch-lightning_version", "hyper_parameters", "lightning_version")
#: The containers Lightning has stored hyper-parameters in; read from the inert stand-in's
#: recorded state or items, never rebuilt.
_HPARAM_CONTAINERS = ("argparse.Namespace", "AttributeDict")


def _is_lightning(obj: Mapping[str, Any]) -> bool:
    return "state_dict" in obj and any(key in obj for key in _LIGHTNING_KEYS)


def _is_plain(value: Any, depth: int = 0) -> bool:
    """JSON-like data: what a hyper-parameter may be to be passed to the user's architecture."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if depth > 4:
        return False
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, Mapping) and not isinstance(value, Opaque):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _hparam_items(value: Any) -> dict[Any, Any] | None:
    """The entries of a stored hyper-parameter container (a dict, a Namespace, an AttributeDict)."""
    if isinstance(value, Opaque):
        if not value._nd_qualname.endswith(_HPARAM_CONTAINERS):
            return None
        items: dict[Any, Any] = {}
        state = value._nd_state
        if isinstance(state, tuple) and state and isinstance(state[0], Mapping):
            state = state[0]
        if isinstance(state, Mapping):
            items.update(state)
        for item in value._nd_items:
            if isinstance(item, tuple) and len(item) == 2:
                items[item[0]] = item[1]
        return items
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":  # trust_pickle
        return dict(vars(value))
    return None


def _lightning_contents(obj: Mapping[str, Any], path: Path) -> Contents:
    """The weights of a Lightning checkpoint, with its plain hyper-parameters."""
    try:
        contents = _classify(obj["state_dict"], path, 1)
    except LoadError as exc:
        raise LoadError(
            f"{path} is a Lightning checkpoint whose 'state_dict' entry holds "
            f"{_describe(obj['state_dict'])}, not weights"
        ) from exc
    raw = obj.get("hyper_parameters")
    items = _hparam_items(raw) if raw is not None else None
    if raw is not None and items is None:
        contents.notes.append(
            f"hyper-parameters not used: stored as {_describe(raw)}, not as a dict"
        )
    if items:
        plain = {
            k: v
            for k, v in items.items()
            if isinstance(k, str) and k.isidentifier() and not k.startswith("_") and _is_plain(v)
        }
        skipped = [str(k) for k in items if k not in plain]
        contents.hyper_parameters = plain
        if skipped:
            contents.notes.append(
                f"hyper-parameters not used (not plain values or internal): {listing(skipped)}"
            )
    return contents


def _patched_contents(obj: Mapping[str, Any], path: Path) -> Contents:
    manifest = check_file_manifest(obj[MANIFEST_KEY], path)
    sd = obj.get("state_dict")
    if not _is_tensor_dict(sd):
        raise LoadError(f"{path}: a normdoctor-patched checkpoint without a state_dict")
    return Contents(CheckpointFormat.PATCHED, state_dict=_tensors_only(sd), manifest=manifest)


# ------------------------------------------------------------------------- torch.save files


def refusal(path: Path, names: list[str]) -> LoadError:
    shown = listing(unsafe_names(names)) if names else "unknown objects"
    return UnsafeFileError(
        f"{path} holds pickled Python objects ({shown}): unpickling them runs code from the "
        "file; pass --trust-pickle (trust_pickle=True) only if you trust its source, or --arch "
        "to load just its tensors"
    )


def _torch_load(path: Path, *, weights_only: bool, map_location: Any, zipped: bool) -> Any:
    """``torch.load`` of a file whose format normdoctor recognised by content.

    torch picks a loader by the name first (a path ending in ``.safetensors`` goes to
    safetensors, whatever it holds), so torch gets an open file, and a path only to memory-map a
    zip under a name it cannot misread.
    """
    if zipped and weights_only and not os.fspath(path).endswith(".safetensors"):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    with open(path, "rb") as fh:
        return torch.load(fh, map_location=map_location, weights_only=weights_only)


def _inert_load(path: Path) -> tuple[Any, list[str]]:
    """(root object, foreign qualified names) of a torch zip archive, read inertly."""
    try:
        with CheckedZip(path) as archive:
            if archive.has("byteorder") and archive.read("byteorder").strip() not in (
                b"",
                b"little",
            ):
                raise LoadError(f"{path}: big-endian archives are not supported")
            if not archive.has("data.pkl"):
                raise LoadError(f"{path}: truncated or corrupt archive (no data.pkl)")
            unpickler = InertUnpickler(archive.read("data.pkl"), archive.read)
            root = unpickler.load()
    except LoadError:
        raise
    except RuntimeError as exc:
        raise LoadError(f"{path}: corrupt tensor data ({one_line(exc)})") from exc
    except Exception as exc:  # whatever a malformed pickle makes the inert unpickler raise
        raise LoadError(f"{path}: truncated or corrupt archive ({one_line(exc)})") from exc
    return root, unpickler.foreign


def read_torch_file(
    path: Path, sniffed: Sniffed, *, trust_pickle: bool, map_location: Any
) -> Contents:
    zipped = sniffed.kind is Kind.TORCH_ZIP
    try:
        obj = _torch_load(path, weights_only=True, map_location=map_location, zipped=zipped)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower() and "weights_only" not in str(exc):
            raise LoadError(f"{path}: truncated or corrupt checkpoint ({one_line(exc)})") from exc
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, struct.error) as exc:
        raise LoadError(f"{path}: truncated or corrupt checkpoint ({one_line(exc)})") from exc
    else:
        return _classify(obj, path)
    # weights_only refused: the file names classes or functions outside torch's allowlist.
    if trust_pickle:
        try:
            # as `python -m` would: classes of the user's own project import from the cwd
            with on_sys_path(os.getcwd()):
                obj = _torch_load(
                    path, weights_only=False, map_location=map_location, zipped=zipped
                )
        except Exception as exc:
            raise LoadError(f"{path}: unpickling failed ({one_line(exc)})") from exc
        return _classify(obj, path)
    if not zipped:
        with open(path, "rb") as fh:
            raise refusal(path, pickle_globals(fh.read()))
    root, foreign = _inert_load(path)
    try:
        contents = _classify(root, path)
    except LoadError as exc:
        raise refusal(path, foreign) from exc
    contents.refused = foreign
    if contents.format is not CheckpointFormat.PICKLE:
        contents.notes.append(
            f"skipped pickled objects without unpickling them: {listing(foreign)}"
        )
    if map_location not in (None, "cpu") and contents.state_dict is not None:
        contents.state_dict = {k: v.to(map_location) for k, v in contents.state_dict.items()}
    return contents


def read_safetensors(path: Path, map_location: Any) -> Contents:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = str(map_location) if map_location is not None else "cpu"
    try:
        sd = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoadError(f"{path}: truncated or corrupt safetensors file ({one_line(exc)})") from exc
    if not sd:
        raise LoadError(f"{path}: the safetensors file holds no tensors")
    return Contents(CheckpointFormat.SAFETENSORS, state_dict=dict(sd))


# ------------------------------------------------------------------------ TorchScript files


def _read_torchscript(path: Path, sniffed: Sniffed) -> Contents:
    root, _foreign = _inert_load(path)
    if not _is_module_like(root):
        raise LoadError(f"{path}: a TorchScript archive without a module")
    sd, info = _flatten_opaque_module(root)
    return Contents(
        CheckpointFormat.TORCHSCRIPT,
        state_dict=sd,
        layer_info=info,
        notes=["TorchScript archive read without torch.jit.load: weights only, no live module"],
    )


# ------------------------------------------------------------------------- torch.export files


def _read_export(path: Path, *, trust_pickle: bool) -> Contents:
    read_notes: list[str] = []
    if trust_pickle:  # the user vouches for the file: torch's own loader, pickles and all
        try:
            with warnings.catch_warnings(), quiet_torch_export_logs(), open(path, "rb") as fh:
                warnings.simplefilter("ignore")
                program = torch.export.load(fh)
        except Exception as exc:
            raise LoadError(f"{path}: cannot load the exported program ({one_line(exc)})") from exc
    else:
        program, read_notes = read_exported_program(path)
    state_dict = {k: v.detach() for k, v in program.state_dict.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.export.unflatten(program)
    except Exception as exc:
        raise LoadError(
            f"{path}: cannot unflatten the exported program into modules ({one_line(exc)}); "
            "its norm layers cannot be probed"
        ) from exc
    notes, caveats = rebuild_norm_modules(module)
    return Contents(
        CheckpointFormat.EXPORT,
        state_dict=state_dict,
        module=module,
        notes=read_notes + notes + caveats,
        caveats=caveats,
    )


# ---------------------------------------------------------------------------------- ONNX


def _read_onnx_static(path: Path) -> Contents:
    """Running statistics of ONNX BatchNormalization nodes, for the static checks."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise LoadError("ONNX support needs `pip install normdoctor[onnx]`") from exc
    try:
        # protobuf whatever the name says; external data only through the backend's loader,
        # which refuses locations outside the model's folder
        proto = onnx.load(str(path), format="protobuf", load_external_data=False)
    except Exception as exc:
        raise LoadError(f"{path}: not a readable ONNX model ({one_line(exc)})") from exc
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        proto = load_onnx_model(path).proto
    inits = {t.name: t for t in proto.graph.initializer}
    sd: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    for i, node in enumerate(proto.graph.node):
        if node.op_type != "BatchNormalization" or len(node.input) < 5:
            continue
        name = node.name or f"BatchNormalization_{i}"
        tensors = {}
        for key, tname in zip(
            ("weight", "bias", "running_mean", "running_var"), node.input[1:5], strict=True
        ):
            if tname in inits:
                tensors[key] = torch.from_numpy(numpy_helper.to_array(inits[tname]).copy())
        if "running_mean" not in tensors or "running_var" not in tensors:
            continue
        sd.update({f"{name}.{k}": v for k, v in tensors.items()})
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        # ONNX momentum is the decay of the running estimate (default 0.9): PyTorch's is 1 - it.
        info[name] = {"kind": "BatchNormalization", "eps": float(attrs.get("epsilon", 1e-5))}
    notes = [] if sd else ["no BatchNormalization node with stored running statistics"]
    return Contents(CheckpointFormat.ONNX, state_dict=sd or None, layer_info=info, notes=notes)


def load_onnx_model(path: Path) -> Any:
    try:
        from normdoctor.sources.onnx import OnnxModel
    except ImportError as exc:
        raise LoadError("ONNX support needs `pip install normdoctor[onnx]`") from exc
    return OnnxModel.load(path)


# ----------------------------------------------------------------------- patched checkpoints


def apply_patch_manifest(model: nn.Module, manifest: dict[str, Any], path: Path) -> nn.Module:
    try:
        rebuilt = apply_manifest(model, manifest)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(
            f"{path}: rebuilding the patched layers failed: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    return rebuilt if isinstance(rebuilt, nn.Module) else model


# ------------------------------------------------------------------------------- by format


def read_contents(
    path: Path, sniffed: Sniffed, *, trust_pickle: bool, map_location: Any
) -> Contents:
    if sniffed.kind in (Kind.TORCH_ZIP, Kind.LEGACY):
        contents = read_torch_file(
            path, sniffed, trust_pickle=trust_pickle, map_location=map_location
        )
    elif sniffed.kind is Kind.SAFETENSORS:
        contents = read_safetensors(path, map_location)
    elif sniffed.kind is Kind.TORCHSCRIPT:
        contents = _read_torchscript(path, sniffed)
    elif sniffed.kind is Kind.EXPORT:
        contents = _read_export(path, trust_pickle=trust_pickle)
    else:
        contents = _read_onnx_static(path)
    return contents

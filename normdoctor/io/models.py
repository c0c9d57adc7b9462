"""Loading the model files people actually have, without running code they did not ask to run.

Formats are recognised by content first (the extension only breaks ties):

* zip with ``data.pkl``: a ``torch.save`` archive holding a state_dict (plain, wrapped under
  ``state_dict``/``model``/``model_state_dict``/..., or a Lightning ``.ckpt``), a
  normdoctor-patched checkpoint, or a whole pickled ``nn.Module``;
* zip with ``code/`` and ``constants.pkl``: a TorchScript archive (``torch.jit.save``);
* zip with ``archive_format`` or ``models/``: a ``torch.export`` program (``.pt2``);
* a pickle protocol byte first: a legacy (non-zip) ``torch.save`` file;
* an 8-byte header length then ``{``: safetensors;
* ``.onnx`` (or an ONNX protobuf): handed to :mod:`normdoctor.sources.onnx`;
* a folder with ``config.json`` (Hugging Face ``save_pretrained``): built offline with
  ``transformers`` from the config, weights read as above (:mod:`normdoctor.io.hf`).

A Lightning ``.ckpt`` also carries the ``hyper_parameters`` its module was built with: the plain
ones that ``arch`` takes complete ``arch_kwargs`` (explicit ``arch_kwargs`` win).

Safety: nothing read from a file is unpickled with the full Python unpickler, and no loader
that runs code stored in a file is called, unless ``trust_pickle`` is set.  Zip archives are
first checked to have a single reading (:mod:`normdoctor.io.archive`: no duplicate names, no
stray bytes, one top folder), so that PyTorch's zip reader and Python's see the same entries.
``torch.load`` always runs with ``weights_only=True`` (on an open file: by name torch would send
``*.safetensors`` to safetensors whatever it holds).  When that refuses, the file's pickle is read
by the *inert* unpickler of :mod:`normdoctor.io.unpickle`, which never imports or calls anything
the file names: every class or function it references becomes a stand-in that only records its
arguments, and tensors are rebuilt by normdoctor from the raw storage bytes.  That is enough to
recover the weights of a pickled module, of a checkpoint that also holds arbitrary training
objects, and of a TorchScript archive, for the static checks or to load into ``arch``.
``torch.jit.load`` is never called: it runs TorchScript code stored in the archive
(``__setstate__``) while loading, and PyTorch does not treat TorchScript loading as a security
boundary.  ``torch.export.load`` is only called with ``trust_pickle``: without it
:mod:`normdoctor.io.pt2` reads the archive itself and hands torch's deserializer only checked
objects (see there for what ``torch.export.load`` would run).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import importlib
import importlib.util
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoadError, UnsafeFileError, one_line
from . import hf
from .archive import CheckedZip
from .pt2 import quiet_torch_export_logs, read_exported_program
from .unpickle import InertUnpickler, Opaque, pickle_globals, unsafe_names

__all__ = [
    "Checkpoint",
    "CheckpointFormat",
    "import_object",
    "load_checkpoint",
    "load_model",
    "load_state_dict_into",
    "resolve_arch",
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
#: Prefixes that wrappers add in front of every key: DataParallel/DDP and torch.compile.
_WRAPPER_SEGMENTS = ("module.", "_orig_mod.")
#: How many keys an error message lists before it says "+N more".
_KEYS_SHOWN = 5
PATCH_KEY = "normdoctor_patch"
PATCH_VERSION = 1


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


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Checkpoint:
    """A model file read for the data-free static checks; no architecture needed.

    Attributes:
        path: the file.
        format: what it holds.
        state_dict: every tensor found, keyed as in ``state_dict()`` (``None`` when the file holds
            none, e.g. an ONNX graph without normalization nodes).
        module: the live module when one could be rebuilt without running untrusted code
            (``.pt2``) or was unpickled with ``trust_pickle=True``; else ``None``.
        layer_info: per module name, attributes recovered without running code: ``kind`` (class
            name), and where stored ``eps``, ``momentum``, ``track_running_stats``, ``affine``.
            Used by :func:`normdoctor.checks.static_checks_for` when ``module`` is ``None``.
        manifest: the conversion manifest of a normdoctor-patched checkpoint.
        notes: one-line remarks about how the file was read.
    """

    path: Path
    format: CheckpointFormat
    state_dict: dict[str, torch.Tensor] | None
    module: nn.Module | None = None
    layer_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ helpers


def _listing(keys: list[str] | tuple[str, ...] | set[str]) -> str:
    keys = sorted(keys) if isinstance(keys, set) else list(keys)
    shown = ", ".join(keys[:_KEYS_SHOWN])
    more = len(keys) - _KEYS_SHOWN
    return f"{shown} (+{more} more)" if more > 0 else shown


def _check_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise LoadError(f"{p}: no such file")
    if p.is_dir():
        raise LoadError(
            f"{p} is a directory, not a model file (a Hugging Face model folder holds config.json)"
        )
    if p.stat().st_size == 0:
        raise LoadError(f"{p} is empty (0 bytes)")
    return p


# ------------------------------------------------------------------------------ sniffing


class _Kind(enum.Enum):
    TORCH_ZIP = "torch zip"
    TORCHSCRIPT = "torchscript"
    EXPORT = "export"
    LEGACY = "legacy pickle"
    SAFETENSORS = "safetensors"
    ONNX = "onnx"


@dataclass(frozen=True, slots=True)
class _Sniffed:
    kind: _Kind
    prefix: str = ""  # the record directory every zip entry sits in ("" when flat)
    names: tuple[str, ...] = ()  # zip entry names relative to the prefix


def _zip_layout(path: Path) -> tuple[str, tuple[str, ...]]:
    """(top folder, entry names below it), after refusing an ambiguous archive."""
    with CheckedZip(path, flat_ok=True) as archive:
        return archive.prefix, archive.names


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
        text = head[: exc.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * max(len(text), 1)


def _sniff(path: Path) -> _Sniffed:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        prefix, names = _zip_layout(path)
        name_set = set(names)
        if "archive_format" in name_set or any(n.startswith("models/") for n in names):
            kind = _Kind.EXPORT
        elif "serialized_exported_program.json" in name_set:  # torch.export before 2.8: flat
            return _Sniffed(_Kind.EXPORT, prefix, names)
        elif "constants.pkl" in name_set or any(n.startswith("code/") for n in names):
            kind = _Kind.TORCHSCRIPT
        elif "data.pkl" in name_set:
            kind = _Kind.TORCH_ZIP
        else:
            kind = None
        if kind is not None and prefix:
            return _Sniffed(kind, prefix, names)
        if kind is not None:  # PyTorch's reader finds entries only inside the top folder
            raise UnsafeFileError(
                f"{path}: refused, the zip archive is ambiguous (entries outside one top folder): "
                "PyTorch's reader and Python's could read different contents from it"
            )
        raise LoadError(
            f"{path} is a zip archive but not one PyTorch writes (no data.pkl, code/ or "
            "archive_format entry)"
        )
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return _Sniffed(_Kind.LEGACY)
    safetensors_header = len(head) >= 9 and head[8:9] == b"{"
    if safetensors_header:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8:
            return _Sniffed(_Kind.SAFETENSORS)
    if path.suffix.lower() == ".onnx":
        return _Sniffed(_Kind.ONNX)
    if _looks_like_text(head):
        first = head.decode("utf-8", "replace").strip().splitlines()
        start = first[0][:40] if first else ""
        raise LoadError(f"{path} is a text file, not a model checkpoint (it starts {start!r})")
    if safetensors_header:
        raise LoadError(
            f"{path} looks like safetensors but its header claims {header_len} bytes of a "
            f"{size}-byte file: truncated or corrupt"
        )
    if head[:1] == b"\x08" and b"\x12" in head[:64]:  # ONNX ModelProto: ir_version varint first
        return _Sniffed(_Kind.ONNX)
    raise LoadError(
        f"{path}: unrecognised file format (not a torch.save, torch.export, TorchScript, "
        "safetensors or ONNX file)"
    )


# ---------------------------------------------------------- from unpickled objects to weights


def _is_tensor_dict(obj: Any) -> bool:
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
class _Contents:
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
        return f"a dict with keys {_listing(keys)}" if keys else "an empty dict"
    if isinstance(obj, Opaque):
        return f"a pickled {obj._nd_qualname}"
    return f"a {type(obj).__name__}"


def _classify(obj: Any, path: Path, depth: int = 0) -> _Contents:
    """Find the model inside whatever a torch file held."""
    if isinstance(obj, nn.Module):
        return _Contents(CheckpointFormat.PICKLE, module=obj)
    if _is_module_like(obj):
        sd, info = _flatten_opaque_module(obj)
        return _Contents(CheckpointFormat.PICKLE, state_dict=sd, layer_info=info)
    if isinstance(obj, Mapping):
        if PATCH_KEY in obj:
            return _patched_contents(obj, path)
        if _is_tensor_dict(obj):
            return _Contents(CheckpointFormat.STATE_DICT, state_dict=_tensors_only(obj))
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


def _lightning_contents(obj: Mapping[str, Any], path: Path) -> _Contents:
    """The weights of a Lightning checkpoint, with its plain hyper-parameters."""
    try:
        contents = _classify(obj["state_dict"], path, 1)
    except LoadError:
        raise LoadError(
            f"{path} is a Lightning checkpoint whose 'state_dict' entry holds "
            f"{_describe(obj['state_dict'])}, not weights"
        ) from None
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
                f"hyper-parameters not used (not plain values or internal): {_listing(skipped)}"
            )
    return contents


def _kwarg_names(factory: Callable[..., Any]) -> set[str] | None:
    """The keyword arguments ``factory`` takes; ``None`` when it takes any (or cannot tell)."""
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _with_hyper_parameters(
    factory: Callable[..., Any],
    label: str,
    hyper_parameters: Mapping[str, Any],
    arch_kwargs: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], str | None]:
    """``arch_kwargs`` completed by the checkpoint's hyper-parameters that ``factory`` takes
    (explicit ``arch_kwargs`` win), and a note saying what was used."""
    explicit = dict(arch_kwargs or {})
    names = _kwarg_names(factory)
    used = {
        k: v
        for k, v in hyper_parameters.items()
        if k not in explicit and (names is None or k in names)
    }
    ignored = [k for k in hyper_parameters if k not in explicit and k not in used]
    overridden = [k for k in hyper_parameters if k in explicit]
    if not used and not overridden:
        return explicit, None

    def shown(keys: list[str]) -> str:
        return ", ".join(f"{k}={_short(hyper_parameters[k])}" for k in keys)

    parts = []
    if used:
        parts.append(f"arch {label} built with the checkpoint's hyper-parameters {shown([*used])}")
    if overridden:
        lead = "" if used else f"arch {label}: "
        parts.append(f"{lead}--arch-kwargs override the checkpoint's {shown(overridden)}")
    if ignored:
        parts.append(f"not arguments of {label}: {_listing(ignored)}")
    return {**used, **explicit}, "; ".join(parts)


def _patched_contents(obj: Mapping[str, Any], path: Path) -> _Contents:
    manifest = obj[PATCH_KEY]
    if not isinstance(manifest, Mapping) or manifest.get("version") != PATCH_VERSION:
        version = manifest.get("version") if isinstance(manifest, Mapping) else None
        raise LoadError(
            f"{path}: normdoctor patch manifest version {version!r} is not supported "
            f"(this normdoctor reads version {PATCH_VERSION})"
        )
    if not isinstance(manifest.get("conversions"), list):
        raise LoadError(f"{path}: the normdoctor patch manifest has no list of conversions")
    sd = obj.get("state_dict")
    if not _is_tensor_dict(sd):
        raise LoadError(f"{path}: a normdoctor-patched checkpoint without a state_dict")
    return _Contents(
        CheckpointFormat.PATCHED, state_dict=_tensors_only(sd), manifest=dict(manifest)
    )


# ------------------------------------------------------------------------- torch.save files


def _refusal(path: Path, names: list[str]) -> LoadError:
    shown = _listing(unsafe_names(names)) if names else "unknown objects"
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
        raise LoadError(f"{path}: corrupt tensor data ({one_line(exc)})") from None
    except Exception as exc:  # whatever a malformed pickle makes the inert unpickler raise
        raise LoadError(f"{path}: truncated or corrupt archive ({one_line(exc)})") from None
    return root, unpickler.foreign


def _read_torch_file(
    path: Path, sniffed: _Sniffed, *, trust_pickle: bool, map_location: Any
) -> _Contents:
    zipped = sniffed.kind is _Kind.TORCH_ZIP
    try:
        obj = _torch_load(path, weights_only=True, map_location=map_location, zipped=zipped)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower() and "weights_only" not in str(exc):
            raise LoadError(f"{path}: truncated or corrupt checkpoint ({one_line(exc)})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, struct.error) as exc:
        raise LoadError(f"{path}: truncated or corrupt checkpoint ({one_line(exc)})") from None
    else:
        return _classify(obj, path)
    # weights_only refused: the file names classes or functions outside torch's allowlist.
    if trust_pickle:
        try:
            # as `python -m` would: classes of the user's own project import from the cwd
            with _on_sys_path(os.getcwd()):
                obj = _torch_load(
                    path, weights_only=False, map_location=map_location, zipped=zipped
                )
        except Exception as exc:
            raise LoadError(f"{path}: unpickling failed ({one_line(exc)})") from None
        return _classify(obj, path)
    if not zipped:
        with open(path, "rb") as fh:
            raise _refusal(path, pickle_globals(fh.read()))
    root, foreign = _inert_load(path)
    try:
        contents = _classify(root, path)
    except LoadError:
        raise _refusal(path, foreign) from None
    contents.refused = foreign
    if contents.format is not CheckpointFormat.PICKLE:
        contents.notes.append(
            f"skipped pickled objects without unpickling them: {_listing(foreign)}"
        )
    if map_location not in (None, "cpu") and contents.state_dict is not None:
        contents.state_dict = {k: v.to(map_location) for k, v in contents.state_dict.items()}
    return contents


def _read_safetensors(path: Path, map_location: Any) -> _Contents:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = str(map_location) if map_location is not None else "cpu"
    try:
        sd = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoadError(
            f"{path}: truncated or corrupt safetensors file ({one_line(exc)})"
        ) from None
    if not sd:
        raise LoadError(f"{path}: the safetensors file holds no tensors")
    return _Contents(CheckpointFormat.SAFETENSORS, state_dict=dict(sd))


# ------------------------------------------------------------------------ TorchScript files


def _read_torchscript(path: Path, sniffed: _Sniffed) -> _Contents:
    root, _foreign = _inert_load(path)
    if not _is_module_like(root):
        raise LoadError(f"{path}: a TorchScript archive without a module")
    sd, info = _flatten_opaque_module(root)
    return _Contents(
        CheckpointFormat.TORCHSCRIPT,
        state_dict=sd,
        layer_info=info,
        notes=["TorchScript archive read without torch.jit.load: weights only, no live module"],
    )


# ------------------------------------------------------------------------- torch.export files


class ExportedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm rebuilt from an exported call site whose input rank was not recorded."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


_BN_CLASSES: dict[int, type[nn.Module]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}
_IN_CLASSES: dict[int, type[nn.Module]] = {
    3: nn.InstanceNorm1d,
    4: nn.InstanceNorm2d,
    5: nn.InstanceNorm3d,
}


def _aten(name: str) -> Any:
    overloads = getattr(torch.ops.aten, name, None)
    return getattr(overloads, "default", None) if overloads is not None else None


# op -> positions of (weight, bias, running_mean, running_var, training, momentum, eps) and
# whether the op returns a tuple whose item 0 is the output.
_BN_OPS: dict[Any, tuple[tuple[int | None, ...], bool]] = {}
for _name, _layout, _tuple in (
    ("batch_norm", (1, 2, 3, 4, 5, 6, 7), False),
    ("native_batch_norm", (1, 2, 3, 4, 5, 6, 7), True),
    ("_native_batch_norm_legit", (1, 2, 3, 4, 5, 6, 7), True),
    ("_native_batch_norm_legit_no_training", (1, 2, 3, 4, None, 5, 6), True),
):
    _op = _aten(_name)
    if _op is not None:
        _BN_OPS[_op] = (_layout, _tuple)
_INSTANCE_NORM = _aten("instance_norm")
_GROUP_NORM = _aten("group_norm")
_LAYER_NORM = _aten("layer_norm")


def _rebuild_call_site(module: nn.Module) -> tuple[nn.Module | None, str]:
    """A plain torch norm module equivalent to an unflattened single-op call site.

    Returns ``(None, why)`` when the site's graph is anything but one norm op on the module's
    own attributes (plus the ``num_batches_tracked`` increment of a train-mode export).
    """
    graph = getattr(module, "graph", None)
    if graph is None:
        return None, "not an unflattened graph module"
    import operator

    placeholders, attrs, norm_nodes, output = [], {}, [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            placeholders.append(node)
        elif node.op == "get_attr":
            attrs[node] = str(node.target)
        elif node.op == "call_function":
            if node.target in _BN_OPS or node.target in (_INSTANCE_NORM, _GROUP_NORM, _LAYER_NORM):
                norm_nodes.append(node)
            elif (node.target is operator.getitem and node.args[1] == 0) or (
                str(node.target) == "aten.add_.Tensor"
                and attrs.get(node.args[0]) == "num_batches_tracked"
            ):
                continue
            else:
                return None, f"graph calls {node.target}"
        elif node.op == "output":
            output = node
        else:
            return None, f"graph has a {node.op} node"
    if len(placeholders) != 1 or len(norm_nodes) != 1 or output is None:
        return None, "graph is not a single normalization call"
    (x,), (call,) = placeholders, norm_nodes
    out = output.args[0]
    if isinstance(out, (tuple, list)):
        if len(out) != 1:
            return None, "graph has several outputs"
        out = out[0]
    if not (
        out is call or (getattr(out, "target", None) is operator.getitem and out.args[0] is call)
    ):
        return None, "the call's result is not the output"
    if not call.args or call.args[0] is not x:
        return None, "the call does not normalize the module's input"

    def attr(position: int | None, wanted: str) -> torch.Tensor | bool | None:
        if position is None or position >= len(call.args):
            return None
        arg = call.args[position]
        if arg is None:
            return None
        if attrs.get(arg) != wanted:
            return False  # something other than the module's own tensor
        value = getattr(module, wanted, None)
        return value if isinstance(value, torch.Tensor) else False

    val = x.meta.get("val")
    ndim = val.dim() if isinstance(val, torch.Tensor) else None
    target = call.target
    if target in _BN_OPS or target is _INSTANCE_NORM:
        if target is _INSTANCE_NORM:
            layout: tuple[int | None, ...] = (1, 2, 3, 4, 5, 6, 7)
        else:
            layout = _BN_OPS[target][0]
        w_pos, b_pos, rm_pos, rv_pos, train_pos, mom_pos, eps_pos = layout
        weight, bias = attr(w_pos, "weight"), attr(b_pos, "bias")
        rm, rv = attr(rm_pos, "running_mean"), attr(rv_pos, "running_var")
        if any(t is False for t in (weight, bias, rm, rv)) or (weight is None) != (bias is None):
            return None, "the call reads tensors that are not the module's own"
        if (rm is None) != (rv is None):
            return None, "only one running statistic"
        training = call.args[train_pos] if train_pos is not None else False
        momentum, eps = call.args[mom_pos], call.args[eps_pos]
        if not isinstance(training, bool) or not isinstance(eps, (int, float)):
            return None, "symbolic training flag or eps"
        if not isinstance(momentum, (int, float)):
            return None, "symbolic momentum"
        ref = weight if isinstance(weight, torch.Tensor) else rm
        if not isinstance(ref, torch.Tensor):
            return None, "no tensor tells the number of features"
        features = ref.numel()
        track = isinstance(rm, torch.Tensor)
        kwargs = dict(
            eps=float(eps),
            momentum=float(momentum),
            affine=isinstance(weight, torch.Tensor),
            track_running_stats=track,
        )
        if target is _INSTANCE_NORM:
            cls = _IN_CLASSES.get(ndim or 0)
            if cls is None:
                return None, "unknown input rank for InstanceNorm"
            # use_input_stats is `training or not track_running_stats`.
            new = cls(features, **kwargs)
            new.training = bool(training) and track
        else:
            cls = _BN_CLASSES.get(ndim or 0, ExportedBatchNorm)
            new = cls(features, **kwargs)
            new.training = bool(training) and track
        tensors = {"weight": weight, "bias": bias, "running_mean": rm, "running_var": rv}
        nbt = getattr(module, "num_batches_tracked", None)
        if track and isinstance(nbt, torch.Tensor):
            tensors["num_batches_tracked"] = nbt
    elif target is _GROUP_NORM:
        groups, eps = call.args[1], call.args[4] if len(call.args) > 4 else 1e-5
        weight, bias = attr(2, "weight"), attr(3, "bias")
        if weight is False or bias is False or not isinstance(groups, int):
            return None, "unexpected group_norm arguments"
        if not isinstance(weight, torch.Tensor):
            return None, "GroupNorm without affine: channels unknown"
        new = nn.GroupNorm(groups, weight.numel(), eps=float(eps), affine=True)
        tensors = {"weight": weight, "bias": bias}
    else:  # layer_norm
        shape, eps = call.args[1], call.args[4] if len(call.args) > 4 else 1e-5
        weight, bias = attr(2, "weight"), attr(3, "bias")
        if weight is False or bias is False or not all(isinstance(s, int) for s in shape):
            return None, "unexpected layer_norm arguments"
        new = nn.LayerNorm(
            list(shape),
            eps=float(eps),
            elementwise_affine=isinstance(weight, torch.Tensor),
            bias=isinstance(bias, torch.Tensor),
        )
        tensors = {"weight": weight, "bias": bias}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if name in ("weight", "bias"):
            param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
            setattr(new, name, param)
        else:
            new._buffers[name] = tensor
    return new, ""


def _rebuild_norm_modules(root: nn.Module) -> tuple[list[str], list[str]]:
    """Replace unflattened norm call sites by plain torch modules, in place.

    Returns ``(notes, caveats)``; caveats say where a scan cannot measure the train path.
    """
    notes: list[str] = []
    caveats: list[str] = []
    replaced = 0
    for name, module in list(root.named_modules()):
        if not name or type(module).__name__ != "InterpreterModule":
            continue
        new, why = _rebuild_call_site(module)
        if new is None:
            if "running_mean" in module._buffers and "running_var" in module._buffers:
                caveats.append(
                    f"{name}: exported call site not rebuilt ({why}); it keeps the exported "
                    "graph's fixed mode, so both paths use its running statistics"
                )
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, new)
        replaced += 1
    train_dropout = []
    for name, module in root.named_modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if graph is not None else ():
            if (
                node.op == "call_function"
                and "dropout" in str(node.target)
                and any(arg is True for arg in node.args[1:])
            ):
                train_dropout.append(name or "<root>")
    if train_dropout:
        caveats.append(
            "the program was exported in train mode: dropout stays active on both paths in "
            f"{_listing(sorted(set(train_dropout)))}"
        )
    if replaced:
        notes.append(f"rebuilt {replaced} normalization call sites as torch modules")
    return notes, caveats


def _read_export(path: Path, *, trust_pickle: bool) -> _Contents:
    read_notes: list[str] = []
    if trust_pickle:  # the user vouches for the file: torch's own loader, pickles and all
        try:
            with warnings.catch_warnings(), quiet_torch_export_logs(), open(path, "rb") as fh:
                warnings.simplefilter("ignore")
                program = torch.export.load(fh)
        except Exception as exc:
            raise LoadError(f"{path}: cannot load the exported program ({one_line(exc)})") from None
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
        ) from None
    notes, caveats = _rebuild_norm_modules(module)
    return _Contents(
        CheckpointFormat.EXPORT,
        state_dict=state_dict,
        module=module,
        notes=read_notes + notes + caveats,
        caveats=caveats,
    )


# ---------------------------------------------------------------------------------- ONNX


def _read_onnx_static(path: Path) -> _Contents:
    """Running statistics of ONNX BatchNormalization nodes, for the static checks."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise LoadError("ONNX support needs `pip install normdoctor[onnx]`") from None
    try:
        # protobuf whatever the name says; external data only through the backend's loader,
        # which refuses locations outside the model's folder
        proto = onnx.load(str(path), format="protobuf", load_external_data=False)
    except Exception as exc:
        raise LoadError(f"{path}: not a readable ONNX model ({one_line(exc)})") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        proto = _load_onnx_model(path).proto
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
    return _Contents(CheckpointFormat.ONNX, state_dict=sd or None, layer_info=info, notes=notes)


def _load_onnx_model(path: Path) -> Any:
    try:
        from normdoctor.sources.onnx import OnnxModel
    except ImportError:
        raise LoadError("ONNX support needs `pip install normdoctor[onnx]`") from None
    return OnnxModel.load(path)


# ------------------------------------------------------------------ Hugging Face folders


def _read_hf_weights(folder: Path, map_location: Any) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of a folder's weight files (shards merged), and the files' description."""
    files = hf.weight_files(folder)
    sd: dict[str, torch.Tensor] = {}
    for file in files:
        if file.stat().st_size == 0:
            raise LoadError(f"{file} is empty (0 bytes)")
        sniffed = _sniff(file)
        if sniffed.kind is _Kind.SAFETENSORS:
            part = _read_safetensors(file, map_location)
        elif sniffed.kind in (_Kind.TORCH_ZIP, _Kind.LEGACY):
            part = _read_torch_file(file, sniffed, trust_pickle=False, map_location=map_location)
        else:
            raise LoadError(f"{file}: not a safetensors or torch.save weight file")
        if part.format not in (CheckpointFormat.STATE_DICT, CheckpointFormat.SAFETENSORS):
            raise LoadError(f"{file} holds {part.format} data, not weights")
        assert part.state_dict is not None
        sd.update(part.state_dict)
    what = files[0].name if len(files) == 1 else f"{len(files)} shards ({files[0].name}, ...)"
    return sd, what


def _read_hf_folder(folder: Path, *, build: bool) -> _Contents:
    """A save_pretrained folder for the static checks: its weights, and the module when
    transformers is installed (layers from buffer names alone without it)."""
    sd, what = _read_hf_weights(folder, "cpu")
    notes = [f"weights read from {what}"]
    module = None
    if build:
        try:
            module, built = hf.build_model(folder)
        except LoadError as exc:
            if "pip install" not in str(exc):
                raise
            notes.append(f"model not built ({hf.HF_EXTRA_HINT} to build it): buffer names only")
        else:
            _load_hf_weights(module, sd, folder)
            notes += built
    return _Contents(CheckpointFormat.HUGGINGFACE, state_dict=sd, module=module, notes=notes)


def _load_hf_weights(model: nn.Module, sd: dict[str, torch.Tensor], folder: Path) -> list[str]:
    sd = dict(sd)
    tied = hf.fill_tied(model, sd)
    notes = load_state_dict_into(model, sd, source=f"weights in {folder.name}")
    if tied:
        notes.append(f"{len(tied)} tied weights taken from the tensors they share")
    model.eval()  # as transformers' from_pretrained returns it
    return notes


def _load_hf_folder(
    folder: Path,
    arch: str | Callable[..., nn.Module] | None,
    arch_kwargs: Mapping[str, Any] | None,
    map_location: Any,
) -> nn.Module:
    sd, what = _read_hf_weights(folder, "cpu")
    if arch is not None:  # the user's own class for the folder's weights: no transformers
        model = resolve_arch(arch, arch_kwargs)
        notes = load_state_dict_into(model, sd, source=f"weights in {folder.name}")
        _warn(folder, [n for n in notes if n.startswith("ignored")])
        built = [f"weights read from {what} into arch {arch!r}"]
    else:
        model, built = hf.build_model(folder)
        notes = _load_hf_weights(model, sd, folder)
        _warn(folder, [n for n in notes if n.startswith("ignored")])
        built = [f"{built[0]}; weights read from {what}"]
    if map_location not in (None, "cpu"):
        model.to(map_location)
    return _mark_source(model, folder, built)


# ------------------------------------------------------------------------- architectures


@contextlib.contextmanager
def _on_sys_path(folder: str) -> Iterator[None]:
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)


def import_object(spec: str, *, what: str = "arch", error: type[Exception] = LoadError) -> Any:
    """The object named by ``package.module:attr`` or ``path/to/file.py:attr``.

    Importing runs the named module's code: that is the user's explicit request, unlike
    anything stored inside a model file.  A dotted ``attr`` walks attributes (``Outer.Inner``).
    A module not found on ``sys.path`` is looked for in the current directory too.

    Raises:
        ``error`` (LoadError by default) with a one-line reason.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise error(f"{what} {spec!r} must be 'package.module:name' or 'path/to/file.py:name'")
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise error(f"{what} {spec!r} must be 'package.module:name' or 'path/to/file.py:name'")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    try:
        if is_file:
            module = _import_file(Path(target), spec, what, error)
        else:
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as exc:
                top = target.split(".")[0]
                if exc.name not in (top, target) or os.getcwd() in sys.path:
                    raise
                with _on_sys_path(os.getcwd()):
                    module = importlib.import_module(target)
    except error:
        raise
    except Exception as exc:
        raise error(
            f"cannot import {target!r} for {what} {spec!r}: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise error(f"{target!r} has no attribute {attr!r} ({what} {spec!r})") from None
    return obj


def _import_file(file: Path, spec: str, what: str, error: type[Exception]) -> Any:
    if not file.is_file():
        raise error(f"{what} {spec!r}: no such file {str(file)!r}")
    resolved = file.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"_normdoctor_user_{re.sub(r'[^0-9A-Za-z_]', '_', file.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise error(f"{what} {spec!r}: cannot import {str(file)!r} as Python")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        with _on_sys_path(str(resolved.parent)):
            module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def resolve_arch(
    arch: str | Callable[..., nn.Module], arch_kwargs: Mapping[str, Any] | None = None
) -> nn.Module:
    """Build the architecture named by ``arch`` (a spec string or a callable) with ``arch_kwargs``."""
    return _build_arch(arch, arch_kwargs)[0]


def _build_arch(
    arch: str | Callable[..., nn.Module],
    arch_kwargs: Mapping[str, Any] | None,
    hyper_parameters: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, str | None]:
    """(model, note): ``arch`` built with ``arch_kwargs``, completed by a checkpoint's
    ``hyper_parameters`` that the factory takes; the note says which were used."""
    if arch_kwargs is not None and not isinstance(arch_kwargs, Mapping):
        raise LoadError(f"arch_kwargs must be a dict, not {type(arch_kwargs).__name__}")
    factory = import_object(arch) if isinstance(arch, str) else arch
    label = arch if isinstance(arch, str) else getattr(arch, "__name__", repr(arch))
    if not callable(factory):
        raise LoadError(f"arch {label!r} names a {type(factory).__name__}, not a class or function")
    kwargs, note = dict(arch_kwargs or {}), None
    if hyper_parameters:
        short = label.rpartition(":")[2] if isinstance(arch, str) else label
        kwargs, note = _with_hyper_parameters(factory, short, hyper_parameters, arch_kwargs)
    try:
        model = factory(**kwargs)
    except Exception as exc:
        hint = (
            " (with the checkpoint's hyper-parameters; --arch-kwargs overrides them)"
            if note and "built with" in note
            else ""
        )
        raise LoadError(
            f"building arch {label!r} failed{hint}: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise LoadError(f"arch {label!r} returned a {type(model).__name__}, not an nn.Module")
    return model, note


def _strip_wrappers(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key.replace("_orig_mod.", "")


def _align_keys(
    sd: Mapping[str, torch.Tensor], expected: set[str]
) -> tuple[dict[str, torch.Tensor], int, str]:
    """Rename checkpoint keys to the model's: (renamed, keys left out, how).

    Tries the keys as they are, without DataParallel/DDP ``module.`` and torch.compile
    ``_orig_mod.`` wrappers, then under one common prefix (Lightning's ``model.``/``net.``,
    any other first segment).  A candidate is taken only when it gives exactly the model's keys
    (``num_batches_tracked`` may be missing); otherwise the closest one is returned and the
    caller reports the mismatch.
    """
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    required = expected - optional

    def fits(keys: set[str]) -> bool:
        return required <= keys <= expected

    base: list[tuple[str, dict[str, torch.Tensor]]] = [("", dict(sd))]
    stripped = {_strip_wrappers(k): v for k, v in sd.items()}
    if len(stripped) == len(sd) and stripped.keys() != sd.keys():
        base.append(("without the 'module.'/'_orig_mod.' wrapper prefixes", stripped))
    best: tuple[int, dict[str, torch.Tensor], int, str] | None = None
    for how, cand in base:
        if fits(set(cand)):
            return cand, 0, how
        firsts = sorted({k.split(".", 1)[0] for k in cand if "." in k})
        prefixes = [p for p in ("model", "net", "network", "module", "backbone") if p in firsts]
        prefixes += [p for p in firsts if p not in prefixes]
        for p in prefixes:
            sub = {k[len(p) + 1 :]: v for k, v in cand.items() if k.startswith(p + ".")}
            if fits(set(sub)):
                note = f"under the prefix '{p}.'" + (f", {how}" if how else "")
                return sub, len(cand) - len(sub), note
            overlap = len(set(sub) & expected)
            if best is None or overlap > best[0]:
                best = (overlap, sub, len(cand) - len(sub), f"under the prefix '{p}.'")
        overlap = len(set(cand) & expected)
        if best is None or overlap >= best[0]:
            best = (overlap, cand, 0, how)
    assert best is not None
    return best[1], best[2], best[3]


def load_state_dict_into(
    model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
) -> list[str]:
    """Copy ``sd`` into ``model`` after aligning key prefixes; returns notes.

    Raises:
        LoadError: keys or shapes do not fit, listing the first few offenders and their count.
    """
    expected_sd = model.state_dict()
    expected = set(expected_sd)
    aligned, dropped, how = _align_keys(sd, expected)
    missing = sorted(k for k in expected - set(aligned) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(aligned) - expected)
    label = type(model).__name__
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
        raise LoadError(
            f"the {source} does not fit architecture {label}: {'; '.join(parts)}"
            + (f" [keys compared {how}]" if how else "")
        )
    wrong = [
        f"{k}: {tuple(aligned[k].shape)} vs {tuple(expected_sd[k].shape)}"
        for k in sorted(aligned)
        if tuple(aligned[k].shape) != tuple(expected_sd[k].shape)
    ]
    if wrong:
        raise LoadError(
            f"the {source} does not fit architecture {label}: {len(wrong)} shape mismatches "
            f"(checkpoint vs model; {_listing(wrong)})"
        )
    try:
        model.load_state_dict(aligned, strict=False)
    except RuntimeError as exc:
        raise LoadError(
            f"the {source} does not fit architecture {label}: {one_line(exc)}"
        ) from None
    notes = []
    if how:
        notes.append(f"weights matched {how}")
    if dropped:
        notes.append(f"ignored {dropped} checkpoint keys outside the model")
    return notes


def _apply_manifest(model: nn.Module, manifest: dict[str, Any], path: Path) -> nn.Module:
    try:
        from normdoctor.patch import apply_manifest
    except ImportError:
        raise LoadError(
            f"{path} was patched by normdoctor, but normdoctor.patch.apply_manifest is not "
            "available in this installation to rebuild the converted layers"
        ) from None
    try:
        rebuilt = apply_manifest(model, manifest)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(
            f"{path}: rebuilding the patched layers failed: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    return rebuilt if isinstance(rebuilt, nn.Module) else model


# ------------------------------------------------------------------------------ public API


def _read(path: Path, sniffed: _Sniffed, *, trust_pickle: bool, map_location: Any) -> _Contents:
    if sniffed.kind in (_Kind.TORCH_ZIP, _Kind.LEGACY):
        contents = _read_torch_file(
            path, sniffed, trust_pickle=trust_pickle, map_location=map_location
        )
    elif sniffed.kind is _Kind.SAFETENSORS:
        contents = _read_safetensors(path, map_location)
    elif sniffed.kind is _Kind.TORCHSCRIPT:
        contents = _read_torchscript(path, sniffed)
    elif sniffed.kind is _Kind.EXPORT:
        contents = _read_export(path, trust_pickle=trust_pickle)
    else:
        contents = _read_onnx_static(path)
    return contents


def load_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Checkpoint:
    """Read a model file for the data-free static checks; no architecture needed.

    Every format :func:`load_model` reads.  Weights of pickled modules and TorchScript archives
    are recovered without unpickling or running anything (see the module docstring); with
    ``trust_pickle=True`` a pickled module is unpickled and returned as ``module``.  A ``.pt2``
    program comes with its unflattened ``module`` (see :func:`load_model`).

    Raises:
        LoadError: with a one-line reason.
    """
    if hf.is_model_folder(Path(path)):
        c = _read_hf_folder(Path(path), build=True)
        p = Path(path)
    else:
        p = _check_path(path)
        c = _read(p, _sniff(p), trust_pickle=trust_pickle, map_location="cpu")
    state_dict = c.state_dict
    if state_dict is None and c.module is not None:
        state_dict = {k: v.detach() for k, v in c.module.state_dict().items()}
    return Checkpoint(
        path=p,
        format=c.format,
        state_dict=state_dict,
        module=c.module,
        layer_info=c.layer_info,
        manifest=c.manifest,
        notes=tuple(c.notes),
    )


def load_model(
    path: str | os.PathLike[str],
    arch: str | Callable[..., nn.Module] | None = None,
    *,
    arch_kwargs: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    map_location: str | torch.device | None = "cpu",
) -> nn.Module:
    """Load a model for scanning, exactly as stored or built (``.eval()`` is *not* called).

    Args:
        path: the model file; recognised by content (see the module docstring).
        arch: for weights-only files (state_dict, safetensors, patched checkpoints): the
            architecture as ``package.module:factory`` or ``path/to/file.py:ClassName`` (or a
            callable), called with ``arch_kwargs``.  Key prefixes added by DataParallel/DDP
            (``module.``), torch.compile (``_orig_mod.``) and Lightning (``model.``, ``net.``)
            are matched automatically.  Given for a ``.pt2``, TorchScript or untrusted pickled
            module file, the file's weights are loaded into it instead.
        arch_kwargs: keyword arguments for ``arch``.  For a Lightning checkpoint, the
            checkpoint's plain ``hyper_parameters`` that ``arch`` accepts are added (explicit
            ``arch_kwargs`` win); the model's ``normdoctor_load_notes`` says which.
        trust_pickle: unpickle whole pickled modules (``torch.save(model)``) and archives with
            pickled objects with the full unpickler, which runs code from the file.
        map_location: device for the weights.

    Returns:
        An ``nn.Module``, with the resolved input path in its ``normdoctor_source`` attribute (the
        patcher refuses to overwrite that file) and one-line remarks about how it was built in
        ``normdoctor_load_notes``; for ``.onnx`` files an ``OnnxModel`` from
        :mod:`normdoctor.sources.onnx`.  For a Hugging Face folder (``config.json`` with
        ``model.safetensors``) the ``transformers`` model its config describes, in eval mode as
        ``from_pretrained`` gives it (needs ``normdoctor[hf]``; with ``arch``, the folder's
        weights go into ``arch`` instead and ``transformers`` is not needed).

    Note:
        ``.pt2`` (torch.export): the program is unflattened with ``torch.export.unflatten`` so
        that norm layers are modules again.  An unflattened BatchNorm call site bakes in the mode
        it was exported in (``aten.batch_norm(..., training=False, ...)``): toggling
        ``training`` on it changes nothing, so the train path could not be measured.  Each call
        site whose graph is exactly one ``batch_norm`` (or instance/group/layer norm) op on the
        module's own tensors is therefore replaced by the equivalent ``nn.BatchNorm1d/2d/3d``
        (``nn.InstanceNorm*``, ``nn.GroupNorm``, ``nn.LayerNorm``) holding the very same tensors,
        with eps and momentum read from the call; the rest of the graph runs as exported.  Call
        sites that do not match stay as they are and count as frozen layers (running statistics
        on both paths), with a warning.  A program exported in eval mode has no dropout; one
        exported in train mode keeps dropout active on both paths (warned).  ``momentum=None``
        (cumulative average) is exported as momentum 0.0 and reads back as such.

        TorchScript: ``torch.jit.load`` is never called, and a scripted module cannot be probed
        (no Python forward pre-hooks on ScriptModules), so without ``arch`` this raises a
        :class:`LoadError` saying what to do; :func:`load_checkpoint` still gives the static
        checks.

    Raises:
        LoadError: a one-line reason (missing, empty, truncated or unrecognised file, an
            architecture that does not import or does not fit, a refused pickle, ...).
    """
    if hf.is_model_folder(Path(path)):
        return _load_hf_folder(Path(path), arch, arch_kwargs, map_location)
    p = _check_path(path)
    sniffed = _sniff(p)
    if sniffed.kind is _Kind.ONNX:
        return _load_onnx_model(p)
    if sniffed.kind is _Kind.TORCHSCRIPT and arch is None:
        raise LoadError(
            f"{p} is a TorchScript archive: scripted modules cannot be probed (no Python hooks); "
            "pass the Python architecture with --arch to load its weights, or save the model "
            "with torch.export.save (.pt2) or as a state_dict"
        )
    c = _read(p, sniffed, trust_pickle=trust_pickle, map_location=map_location)
    if c.module is not None and (arch is None or c.format is CheckpointFormat.PICKLE):
        if arch is not None:
            warnings.warn(
                f"{p} holds a whole module; arch {arch!r} is not used", UserWarning, stacklevel=2
            )
        _warn(p, c.caveats)
        return _mark_source(c.module, p)
    if arch is None:
        if c.format is CheckpointFormat.PICKLE:
            raise _refusal(p, c.refused or [])
        what = {
            CheckpointFormat.PATCHED: "a normdoctor-patched state_dict",
            CheckpointFormat.SAFETENSORS: "weights only (safetensors)",
        }.get(c.format, "a state_dict (weights only)")
        raise LoadError(
            f"{p} holds {what}: pass the architecture with --arch package.module:factory or "
            "path/to/file.py:ClassName (arch=...)"
        )
    model, built = _build_arch(arch, arch_kwargs, c.hyper_parameters)
    if c.format is CheckpointFormat.PATCHED:
        assert c.manifest is not None
        model = _apply_manifest(model, c.manifest, p)
    assert c.state_dict is not None
    try:
        notes = load_state_dict_into(model, c.state_dict, source=f"state_dict in {p.name}")
    except LoadError as exc:
        if not built:
            raise
        raise LoadError(f"{exc} ({built})") from None
    if map_location not in (None, "cpu"):
        model.to(map_location)
    _warn(p, [n for n in notes if n.startswith("ignored")])
    return _mark_source(model, p, [built] if built else [])


def _mark_source(model: nn.Module, path: Path, notes: list[str] | None = None) -> nn.Module:
    """Record the input file on the model, so that normdoctor.patch never overwrites it, and
    what loading decided that the user should hear (``normdoctor_load_notes``)."""
    with contextlib.suppress(Exception):  # a user class may forbid new attributes
        model.normdoctor_source = str(path.resolve())
        model.normdoctor_load_notes = tuple(notes or ())
    return model


def _warn(path: Path, caveats: list[str]) -> None:
    for caveat in caveats:
        warnings.warn(f"{path.name}: {caveat}", UserWarning, stacklevel=3)

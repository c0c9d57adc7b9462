"""Hugging Face model folders: a ``transformers`` model built offline from its ``config.json``.

A folder written by ``save_pretrained`` holds ``config.json`` and the weights
(``model.safetensors``, or shards listed in ``model.safetensors.index.json``; older folders
``pytorch_model.bin``).  The model is built with ``transformers`` from the config alone (the class
the config's ``architectures`` names, when ``transformers`` has it, else
``AutoModelForImageClassification`` or ``AutoModel``) and the weights are read by normdoctor's own
readers: safetensors, or ``torch.load(weights_only=True)`` with the inert fallback of
:mod:`normdoctor.io.checkpoint` for ``.bin`` files.  ``from_pretrained`` is never called.

Offline: ``transformers`` and ``huggingface_hub`` are told so (``HF_HUB_OFFLINE=1``,
``local_files_only=True``) while the folder is read, so nothing reaches the network, and code in
the folder (a config's ``auto_map``) is never run (``trust_remote_code=False``).  Shard names
must stay inside the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoadError, one_line

__all__ = ["HF_EXTRA_HINT", "build_model", "fill_tied", "is_model_folder", "weight_files"]

CONFIG = "config.json"
#: Weight files of a folder, in the order they are looked for (sharded index first per kind).
_WEIGHTS = (
    ("model.safetensors.index.json", True),
    ("model.safetensors", False),
    ("pytorch_model.bin.index.json", True),
    ("pytorch_model.bin", False),
)
_CONFIG_LIMIT = 16 * 1024 * 1024  # a config.json is a few kB; refuse to parse a huge one
HF_EXTRA_HINT = "pip install normdoctor[hf]"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY")


def is_model_folder(path: Path) -> bool:
    """True for a directory holding ``config.json`` (a ``save_pretrained`` folder)."""
    return path.is_dir() and (path / CONFIG).is_file()


def _inside(folder: Path, name: str, what: str) -> Path:
    """``folder / name`` after refusing a name that leads out of the folder."""
    base = folder.resolve()
    target = (base / name).resolve()
    if (
        not name
        or os.path.isabs(name)
        or Path(name).drive
        or os.path.commonpath([str(target), str(base)]) != str(base)
    ):
        raise LoadError(f"{folder}: {what} names {name!r}, outside the model folder: refused")
    if not target.is_file():
        raise LoadError(f"{folder}: {what} names {name!r}, which is missing")
    return target


def _read_json(path: Path, folder: Path) -> Any:
    if path.stat().st_size > _CONFIG_LIMIT:
        raise LoadError(f"{folder}: {path.name} is larger than {_CONFIG_LIMIT} bytes: refused")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LoadError(f"{folder}: {path.name} is not valid JSON ({one_line(exc)})") from exc


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files, shards in order; safetensors preferred over ``.bin``.

    Raises:
        LoadError: no weights, a broken index, or a shard named outside the folder.
    """
    for name, is_index in _WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if not is_index:
            return [path]
        index = _read_json(path, folder)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise LoadError(f"{folder}: {name} has no weight_map")
        shards = list(dict.fromkeys(str(v) for v in weight_map.values()))
        return [_inside(folder, shard, name) for shard in shards]
    onnx_files = sorted(f.name for f in folder.glob("*.onnx"))
    hint = f": to scan its ONNX graph, pass {folder / onnx_files[0]}" if onnx_files else ""
    raise LoadError(
        f"{folder} holds {CONFIG} but no weights (looked for model.safetensors, "
        f"model.safetensors.index.json, pytorch_model.bin){hint}"
    )


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face libraries offline for the block; the environment restored after it.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` when first imported, so a copy already imported
    is told directly as well.
    """
    saved_env = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    patched: list[tuple[Any, str, Any]] = []
    try:
        for key in _OFFLINE_ENV:
            os.environ[key] = "1"
        for module_name, attr in (
            ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
            ("transformers.utils.hub", "_is_offline_mode"),  # transformers < 4.42
        ):
            module = sys.modules.get(module_name)
            if module is not None and isinstance(getattr(module, attr, None), bool):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _model_class(transformers: Any, config: Any) -> tuple[Any, str]:
    """(class or Auto class, its name) for the model the config describes."""
    base = transformers.PreTrainedModel
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None) if _NAME.match(str(name)) else None
        if isinstance(cls, type) and issubclass(cls, base):
            return cls, name
    architectures = " ".join(str(a) for a in getattr(config, "architectures", None) or ())
    if "ForImageClassification" in architectures:
        return transformers.AutoModelForImageClassification, "AutoModelForImageClassification"
    return transformers.AutoModel, "AutoModel"


def build_model(folder: Path) -> tuple[nn.Module, list[str]]:
    """The ``transformers`` model a folder's ``config.json`` describes, randomly initialized.

    Returns:
        (model, notes); the caller loads the weights of :func:`weight_files` into it.

    Raises:
        LoadError: ``transformers`` is not installed (naming the extra), the config is not one
            ``transformers`` knows (custom code is never run), or building fails.
    """
    raw = _read_json(folder / CONFIG, folder)
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise LoadError(f"{folder}: {CONFIG} has no model_type: not a transformers model folder")
    with _offline():
        try:
            import transformers
        except ImportError as exc:
            raise LoadError(
                f"{folder} is a Hugging Face model folder: building it needs transformers "
                f"(`{HF_EXTRA_HINT}`), or pass --arch to load its weights into your own class"
            ) from exc
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = transformers.AutoConfig.from_pretrained(
                    str(folder), local_files_only=True, trust_remote_code=False
                )
        except Exception as exc:
            custom = " (its config names custom code, which normdoctor never runs)" * bool(
                raw.get("auto_map")
            )
            raise LoadError(
                f"{folder}: transformers {transformers.__version__} cannot read {CONFIG} "
                f"for model_type {raw['model_type']!r}{custom}: {one_line(exc)}"
            ) from exc
        cls, name = _model_class(transformers, config)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = cls.from_config(config) if name.startswith("Auto") else cls(config)
        except Exception as exc:
            raise LoadError(
                f"{folder}: building {name} from {CONFIG} failed: "
                f"{type(exc).__name__}: {one_line(exc)}"
            ) from exc
    if not isinstance(model, nn.Module):
        raise LoadError(f"{folder}: {name} built a {type(model).__name__}, not an nn.Module")
    built = type(model).__name__
    notes = [
        f"built {built} from {folder.name}/{CONFIG} with transformers "
        f"{transformers.__version__} (offline, no code from the folder)"
    ]
    return model, notes


def fill_tied(model: nn.Module, sd: dict[str, torch.Tensor]) -> list[str]:
    """Add to ``sd`` the keys ``save_pretrained`` leaves out because they share another key's
    tensor (tied weights); returns the keys added."""
    expected = model.state_dict(keep_vars=True)
    by_storage: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for key, tensor in expected.items():
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            ident = (
                tensor.untyped_storage().data_ptr(),
                int(tensor.storage_offset()),
                tuple(tensor.shape),
            )
            by_storage.setdefault(ident, []).append(key)
    added = []
    for keys in by_storage.values():
        present = [k for k in keys if k in sd]
        if not present or len(present) == len(keys):
            continue
        for key in keys:
            if key not in sd:
                sd[key] = sd[present[0]]
                added.append(key)
    return added

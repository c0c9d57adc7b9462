"""What a model file is, by its bytes (the extension only breaks ties).

The formats and how each is told apart are listed in :mod:`normdoctor.io.models`.  A zip archive
is first checked to have a single reading (:class:`~normdoctor.io.archive.CheckedZip`).
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import LoadError, UnsafeFileError
from .archive import CheckedZip

__all__ = ["Kind", "Sniffed", "check_path", "sniff"]


def check_path(path: str | os.PathLike[str]) -> Path:
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


class Kind(enum.Enum):
    TORCH_ZIP = "torch zip"
    TORCHSCRIPT = "torchscript"
    EXPORT = "export"
    LEGACY = "legacy pickle"
    SAFETENSORS = "safetensors"
    ONNX = "onnx"


@dataclass(frozen=True, slots=True)
class Sniffed:
    kind: Kind
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


def sniff(path: Path) -> Sniffed:
    with open(path, "rb") as fh:
        head = fh.read(4096)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        prefix, names = _zip_layout(path)
        name_set = set(names)
        if "archive_format" in name_set or any(n.startswith("models/") for n in names):
            kind = Kind.EXPORT
        elif "serialized_exported_program.json" in name_set:  # torch.export before 2.8: flat
            return Sniffed(Kind.EXPORT, prefix, names)
        elif "constants.pkl" in name_set or any(n.startswith("code/") for n in names):
            kind = Kind.TORCHSCRIPT
        elif "data.pkl" in name_set:
            kind = Kind.TORCH_ZIP
        else:
            kind = None
        if kind is not None and prefix:
            return Sniffed(kind, prefix, names)
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
        return Sniffed(Kind.LEGACY)
    safetensors_header = len(head) >= 9 and head[8:9] == b"{"
    if safetensors_header:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8:
            return Sniffed(Kind.SAFETENSORS)
    if path.suffix.lower() == ".onnx":
        return Sniffed(Kind.ONNX)
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
        return Sniffed(Kind.ONNX)
    raise LoadError(
        f"{path}: unrecognised file format (not a torch.save, torch.export, TorchScript, "
        "safetensors or ONNX file)"
    )

"""Zip archives read with one reader, after refusing any structure two readers could disagree on.

PyTorch reads its zip formats with its own C++ reader (miniz) and normdoctor with Python's
:mod:`zipfile`.  The two agree on a zip only when it has a single reading: each name once (miniz
also compares names case-insensitively), central directory and local headers saying the same,
entries tiling the file from byte 0 to the central directory, nothing before the first entry or
after the end record, every entry inside one top folder.  :class:`CheckedZip` checks exactly that
on opening and then reads every entry through the one open file handle it checked.
"""

from __future__ import annotations

import re
import struct
import zipfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from ..errors import LoadError, UnsafeFileError

__all__ = ["CheckedZip"]

_LOCAL = b"PK\x03\x04"
_DESCRIPTOR = b"PK\x07\x08"
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_EOCD_SIZE = 22
_LOCATOR_SIZE = 20
_ZIP64_EOCD_SIZE = 56
_LOCAL_SIZE = 30
_MAX_COMMENT = 0xFFFF
# Printable ASCII without the backslash: what PyTorch and Python's zipfile write.
_NAME = re.compile(r"[\x20-\x5b\x5d-\x7e]+")


def _corrupt(path: Path, why: str) -> LoadError:
    return LoadError(
        f"{path} starts like a zip archive (torch.save / torch.export / TorchScript) but cannot be "
        f"read: truncated or corrupt ({why})"
    )


def _ambiguous(path: Path, why: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path}: refused, the zip archive is ambiguous ({why}): PyTorch's reader and Python's "
        "could read different contents from it"
    )


class CheckedZip:
    """A zip archive whose structure has a single reading, open for reading its entries.

    Args:
        path: the archive.
        flat_ok: accept entries at the top level instead of inside one folder (the pre-2.8
            ``torch.export`` layout, read by Python's zipfile alone).

    Attributes:
        prefix: the top folder every entry sits in, with its slash (``""`` for a flat archive).
        names: the entry names relative to ``prefix``, in central-directory order.

    Raises:
        LoadError: a truncated or corrupt archive.
        UnsafeFileError: an ambiguous one (duplicate names, local headers that disagree with the
            central directory, bytes outside any entry, entries outside the top folder, ...).
    """

    def __init__(self, path: Path, *, flat_ok: bool = False) -> None:
        self.path = path
        self._fh: BinaryIO = open(path, "rb")  # noqa: SIM115 -- closed by close()
        try:
            self._zf = self._check(flat_ok)
        except BaseException:
            self._fh.close()
            raise

    def __enter__(self) -> CheckedZip:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._zf.close()
        self._fh.close()

    def has(self, name: str) -> bool:
        return name in self._relative

    def read(self, name: str) -> bytes:
        """The bytes of entry ``name`` (relative to :attr:`prefix`)."""
        if name not in self._relative:
            raise KeyError(name)
        try:
            return self._zf.read(self.prefix + name)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise _corrupt(self.path, f"entry {name}: {exc}") from exc

    def size(self, name: str) -> int:
        return self._zf.getinfo(self.prefix + name).file_size

    # ---------------------------------------------------------------------------- checks

    def _check(self, flat_ok: bool) -> zipfile.ZipFile:
        path, fh = self.path, self._fh
        size = fh.seek(0, 2)
        cd_offset, cd_size, count, cd_end = self._end_records(size)
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise _corrupt(path, str(exc)) from exc
        try:
            infos = zf.infolist()
            if len(infos) != count:
                raise _ambiguous(
                    path, f"the end record counts {count} entries, the directory lists {len(infos)}"
                )
            if zf.start_dir != cd_offset or cd_offset + cd_size != cd_end:
                raise _ambiguous(path, "data before the first entry or around the directory")
            self._check_names(infos, flat_ok)
            self._check_local_headers(infos, cd_offset)
        except BaseException:
            zf.close()
            raise
        return zf

    def _end_records(self, size: int) -> tuple[int, int, int, int]:
        """(central directory offset, its size, entry count, where the records after it start)."""
        path, fh = self.path, self._fh
        if size < _EOCD_SIZE:
            raise _corrupt(path, f"{size} bytes")
        start = max(0, size - _EOCD_SIZE - _MAX_COMMENT)
        fh.seek(start)
        tail = fh.read()
        pos = tail.rfind(_EOCD)
        if pos < 0 or len(tail) - pos < _EOCD_SIZE:
            raise _corrupt(path, "no end-of-archive record")
        (_, disk, cd_disk, _n_disk, count, cd_size, cd_offset, comment_len) = struct.unpack(
            "<4s4H2LH", tail[pos : pos + _EOCD_SIZE]
        )
        eocd = start + pos
        if eocd + _EOCD_SIZE + comment_len != size:
            raise _ambiguous(path, "bytes after the end-of-archive record")
        if disk or cd_disk:
            raise _corrupt(path, "multi-disk archive")
        # zip64 (PyTorch always writes it): a locator right before the end record points at the
        # zip64 record, which then holds the real counts and offsets.
        locator = b""
        if eocd >= _LOCATOR_SIZE + _ZIP64_EOCD_SIZE:
            fh.seek(eocd - _LOCATOR_SIZE)
            locator = fh.read(_LOCATOR_SIZE)
        if not locator.startswith(_ZIP64_LOCATOR):
            if 0xFFFF in (count, _n_disk) or 0xFFFFFFFF in (cd_size, cd_offset):
                raise _corrupt(path, "zip64 fields without a zip64 locator")
            return cd_offset, cd_size, count, eocd
        _, _, record, _ = struct.unpack("<4sLQL", locator)
        fh.seek(record)
        head = fh.read(_ZIP64_EOCD_SIZE)
        if len(head) != _ZIP64_EOCD_SIZE:
            raise _corrupt(path, "truncated zip64 record")
        (sig, rec_size, _, _, _, _, _, count, cd_size, cd_offset) = struct.unpack(
            "<4sQ2H2L4Q", head
        )
        if sig != _ZIP64_EOCD or record + 12 + rec_size != eocd - _LOCATOR_SIZE:
            raise _ambiguous(path, "zip64 record not right before the end record")
        return cd_offset, cd_size, count, record

    def _check_names(self, infos: list[zipfile.ZipInfo], flat_ok: bool) -> None:
        path = self.path
        names = [info.orig_filename for info in infos]
        for info, name in zip(infos, names, strict=True):
            segments = name.split("/")
            if (
                info.filename != name  # a NUL byte: Python cuts the name there, miniz does not
                or not _NAME.fullmatch(name)
                or any(s in ("", ".", "..") for s in segments)
            ):
                raise _ambiguous(path, f"entry name {name!r}")
            if info.flag_bits & 0x1:
                raise _ambiguous(path, f"encrypted entry {name}")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _ambiguous(path, f"entry {name} uses compression method {info.compress_type}")
        seen: dict[str, str] = {}
        for name in names:
            key = name.lower()  # miniz looks names up case-insensitively
            if key in seen:
                twice = name if seen[key] == name else f"{seen[key]} and {name}"
                raise _ambiguous(path, f"entry name {twice} occurs twice")
            seen[key] = name
        tops = {n.split("/", 1)[0] for n in names}
        if len(tops) == 1 and all("/" in n for n in names):
            self.prefix = tops.pop() + "/"
        elif flat_ok and not any("/" in n for n in names if not n.startswith("extra_files/")):
            self.prefix = ""
        else:
            shown = ", ".join(sorted(tops)[:3])
            raise _ambiguous(path, f"entries outside one top folder: {shown}")
        self.names = tuple(n[len(self.prefix) :] for n in names)
        self._relative = frozenset(self.names)

    def _check_local_headers(self, infos: list[zipfile.ZipInfo], cd_offset: int) -> None:
        path, fh = self.path, self._fh
        ordered = sorted(infos, key=lambda i: i.header_offset)
        expected = 0  # every byte from 0 to the directory belongs to exactly one entry
        for index, info in enumerate(ordered):
            name = info.orig_filename
            if info.header_offset != expected:
                where = "before the first entry" if index == 0 else f"before entry {name}"
                raise _ambiguous(path, f"{info.header_offset - expected} stray bytes {where}")
            fh.seek(info.header_offset)
            head = fh.read(_LOCAL_SIZE)
            if len(head) != _LOCAL_SIZE:
                raise _corrupt(path, f"entry {name} truncated")
            (sig, _, flags, method, _, _, crc, csize, usize, name_len, extra_len) = struct.unpack(
                "<4s5H3L2H", head
            )
            raw_name = fh.read(name_len)
            if sig != _LOCAL or raw_name != name.encode("ascii"):
                raise _ambiguous(path, f"local header of {name} names another entry")
            if method != info.compress_type or (flags & 0x8) != (info.flag_bits & 0x8):
                raise _ambiguous(path, f"local header of {name} disagrees with the directory")
            sizes = (crc, csize, usize)
            if (
                not flags & 0x8
                and 0xFFFFFFFF not in (csize, usize)
                and sizes != (info.CRC, info.compress_size, info.file_size)
            ):
                raise _ambiguous(path, f"local header of {name} disagrees with the directory")
            data_end = info.header_offset + _LOCAL_SIZE + name_len + extra_len + info.compress_size
            following = ordered[index + 1].header_offset if index + 1 < len(ordered) else cd_offset
            gap = following - data_end
            if flags & 0x8:  # a data descriptor: CRC and sizes after the data
                fh.seek(data_end)
                descriptor = fh.read(max(gap, 0))
                signed = descriptor.startswith(_DESCRIPTOR)
                body = descriptor[4:] if signed else descriptor
                if len(body) not in (12, 20) or struct.unpack("<L", body[:4])[0] != info.CRC:
                    raise _ambiguous(path, f"data descriptor of {name}")
                gap = 0
            if gap != 0:
                raise _ambiguous(path, f"entry {name} and the next one overlap or leave a gap")
            expected = following
        if expected != cd_offset:
            raise _ambiguous(path, "stray bytes before the directory")

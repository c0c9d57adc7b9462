"""The inert unpickler: reads a ``torch.save`` / TorchScript pickle without running anything.

Every class or function the pickle names becomes a stand-in (:class:`Opaque`) that only records
its arguments and state, except a short allowlist of pure functions that rebuild containers and
tensors; tensors are rebuilt by normdoctor from the raw storage bytes of the archive.  The
allowlisted functions are handed out wrapped in objects that refuse attributes, so a pickle's
``BUILD`` opcode cannot change normdoctor's own functions either.

Also: :func:`pickle_globals` lists the names a pickle would import, read with :mod:`pickletools`
(nothing executed), for one-line refusals.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["InertUnpickler", "Opaque", "pickle_globals", "unsafe_names"]


class Opaque:
    """Stand-in for a class or function a pickle names; never imports or runs anything."""

    _nd_qualname = "?"
    _nd_args: tuple[Any, ...]  # the arguments it was called or built with
    _nd_state: Any  # what BUILD set (None when nothing)
    _nd_items: list[Any]  # what APPEND/APPENDS/SETITEM(S) added: items, or (key, value) pairs

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        self = object.__new__(cls)
        self._nd_args = args
        self._nd_state = None
        self._nd_items = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self._nd_state = state

    def append(self, item: Any) -> None:
        self._nd_items.append(item)

    def extend(self, items: Any) -> None:
        self._nd_items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._nd_items.append((key, value))

    def __repr__(self) -> str:
        return f"<pickled {self._nd_qualname}>"


@dataclass(frozen=True, slots=True)
class _StorageType:
    dtype: torch.dtype


@dataclass(slots=True)
class _RawStorage:
    flat: torch.Tensor  # 1-D tensor of the storage's dtype over a private copy of its bytes


class _Call:
    """An allowlisted function as the unpickler hands it out: attributes cannot be set on it."""

    __slots__ = ("fn",)
    fn: Callable[..., Any]

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "fn", fn)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError("the pickle sets attributes on a function")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _storage_dtypes() -> dict[str, torch.dtype]:
    out: dict[str, torch.dtype] = {"UntypedStorage": torch.uint8, "ByteStorage": torch.uint8}
    with warnings.catch_warnings():  # the legacy storage classes warn that they are deprecated
        warnings.simplefilter("ignore")
        for name in dir(torch):
            if name.endswith("Storage") and name not in out:
                cls = getattr(torch, name, None)
                dtype = getattr(cls, "dtype", None)
                if isinstance(dtype, torch.dtype):
                    out[name] = dtype
    return out


def _rebuild_tensor(
    storage: Any,
    storage_offset: int,
    size: Any,
    stride: Any,
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> Any:
    if not isinstance(storage, _RawStorage):
        return Opaque()
    return storage.flat.as_strided(tuple(size), tuple(stride), int(storage_offset))


def _rebuild_tensor_v1(storage: Any, storage_offset: int, size: Any, stride: Any) -> Any:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    return data


def _rebuild_parameter_with_state(data: Any, *args: Any) -> Any:
    return data


_SAFE_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v1, _rebuild_parameter)


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    fn = func.fn if isinstance(func, _Call) else None
    if fn in _SAFE_REBUILDERS and isinstance(args, tuple):
        return fn(*args)
    return Opaque()


def _first_item(values: Any, *rest: Any) -> Any:
    return values


def _as_list(values: Any = (), *rest: Any) -> Any:
    return list(values)


class InertUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save`` / TorchScript ``data.pkl`` without importing or calling anything
    the file names (see the module docstring).

    Args:
        data: the pickle.
        read_record: the bytes of an archive entry (``data/<key>``) holding a storage.

    Attributes:
        foreign: the qualified names replaced by stand-ins, in the order first seen.
    """

    _DTYPES = _storage_dtypes()
    _TYPES: ClassVar[dict[tuple[str, str], type]] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("__builtin__", "set"): set,
        ("__builtin__", "frozenset"): frozenset,
        ("torch", "Size"): tuple,
    }
    _FUNCTIONS: ClassVar[dict[tuple[str, str], Callable[..., Any]]] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v1,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
        ("torch.jit._pickle", "build_intlist"): _as_list,
        ("torch.jit._pickle", "build_doublelist"): _as_list,
        ("torch.jit._pickle", "build_boollist"): _as_list,
        ("torch.jit._pickle", "build_tensorlist"): _as_list,
        ("torch.jit._pickle", "restore_type_tag"): _first_item,
    }

    def __init__(self, data: bytes, read_record: Callable[[str], bytes]) -> None:
        super().__init__(io.BytesIO(data))
        self._read_record = read_record
        self._storages: dict[str, _RawStorage] = {}
        self._stubs: dict[str, type[Opaque]] = {}
        self.foreign: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        kind = self._TYPES.get((module, name))
        if kind is not None:
            return kind
        fn = self._FUNCTIONS.get((module, name))
        if fn is not None:
            return _Call(fn)  # a fresh wrapper each time: nothing a pickle does to it persists
        if module == "torch":
            if name in self._DTYPES:
                return _StorageType(self._DTYPES[name])
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype):
                return value
        qualname = f"{module}.{name}"
        stub = self._stubs.get(qualname)
        if stub is None:
            stub = type(name, (Opaque,), {"_nd_qualname": qualname, "__slots__": ()})
            self._stubs[qualname] = stub
            self.foreign.append(qualname)
        return stub

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key = pid[1], str(pid[2])
        cached = self._storages.get(key)
        if cached is not None:
            return cached
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else torch.uint8
        if isinstance(storage_type, torch.dtype):
            dtype = storage_type
        raw = bytearray(self._read_record(f"data/{key}"))
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if len(raw) % itemsize:
            raise pickle.UnpicklingError(f"storage {key} holds {len(raw)} bytes, not {dtype}")
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        storage = _RawStorage(flat)
        self._storages[key] = storage
        return storage


def pickle_globals(data: bytes, pickles: int = 6) -> list[str]:
    """Qualified names the first ``pickles`` back-to-back pickles in ``data`` would import,
    read with pickletools (nothing executed); legacy torch files hold several in a row."""
    found: list[str] = []
    strings: list[str] = []
    stream = io.BytesIO(data)
    try:
        for _ in range(pickles):
            if stream.tell() >= len(data):
                break
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # raw storage bytes or a damaged stream: report what was readable
        pass
    return list(dict.fromkeys(found))


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.", "__builtin__.set", "builtins.set")


def unsafe_names(names: list[str]) -> list[str]:
    """The names worth showing in a refusal: those outside torch and the containers."""
    return [
        n for n in names if not n.startswith(_SAFE_GLOBAL_PREFIXES) or "__torch__" in n
    ] or names

"""Reading ``torch.export`` archives (``.pt2``) without ``torch.export.load``.

``torch.export.load`` is not safe on untrusted files, and not only because of pickle: it
unpickles weights, constants and example inputs with the full unpickler when the restricted one
refuses them, unpickles opaque constants with ``pickle.loads``, loads AOTInductor native
libraries, evaluates the program's symbolic shape expressions with ``sympy.sympify`` (which runs
``eval``), imports any module an input-structure spec names (``__enum__`` contexts), resolves
operator names by walking attributes from ``torch`` (``torch.serialization.os.system`` is such a
name), pastes attribute names into the Python source it generates for the graph, and compiles
the stored input guards as Python code.  A check in front of it cannot see what its own zip
reader will pick either.

So normdoctor reads the archive itself, once, through :class:`~normdoctor.io.archive.CheckedZip`,
and hands torch only what it checked:

* weights and constants: raw tensor bytes rebuilt here from the index; the pickled ones (and the
  example inputs) loaded here with ``torch.load(weights_only=True)``; custom and opaque objects,
  native code and anything else refused;
* the program (``models/model.json``): every string is checked before torch sees it: operators
  must resolve to aten/prims/higher-order operators (or the handful of Python builtins the export
  verifier allows), symbolic expressions must parse as plain arithmetic on symbols, names must be
  dotted identifiers, input structures must use the built-in containers; node metadata other than
  the module stack and the stored guards are dropped;
* then torch's own deserializer builds the program from those Python objects, and every graph it
  built is checked once more for operators outside the allowlist.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import math
import operator
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..errors import LoadError, UnsafeFileError
from .archive import CheckedZip

__all__ = ["quiet_torch_export_logs", "read_exported_program"]

_MODEL = "model"
_NATIVE_DIRS = ("data/aotinductor/", "data/mtia", "data/executorch/")
_ENTRY = re.compile(r"[A-Za-z0-9_]+")
# Names, FQNs, symbol names, dtypes as text: what torch writes, and nothing that could close a
# string literal, call anything or start a new line in the source FX generates from them.
_NAME = re.compile(r"[A-Za-z0-9_.@]{0,1000}")
_DUNDER = re.compile(r"__\w*__")
# String arguments of operators (einsum equations, rounding modes, padding modes): FX writes
# them with repr(), still kept to what aten takes.
_ARG_STRING = re.compile(r"[A-Za-z0-9_.,>\- ]{0,200}")
_TYPE_NAME = re.compile(r"[A-Za-z0-9_.<>]{0,300}")
_VERSION = re.compile(r"[A-Za-z0-9_.+<=]{0,64}")
_FLOAT_WORDS = frozenset({"Infinity", "-Infinity", "NaN"})
_DROPPED = {"guards_code": list, "treespec_namedtuple_fields": dict}
_REFUSED = {
    "as_custom_obj": "a custom (TorchScript) object argument",
    "custom_obj": "a custom (TorchScript) object input",
    "class_fqn": "a custom (TorchScript) object",
}
_SPEC_TYPES = frozenset(
    {
        "builtins.tuple",
        "builtins.list",
        "builtins.dict",
        "collections.OrderedDict",
        "collections.deque",
        "torch.Size",
        "torch.fx.immutable_collections.immutable_list",
        "torch.fx.immutable_collections.immutable_dict",
    }
)
# sympy constructors torch's srepr output uses, and torch's own sympy functions
# (GraphModuleDeserializer.sympy_functions): classes that build expressions, nothing else.
_SYM_CALLS = frozenset(
    """Symbol Integer Float Rational Add Mul Pow Mod Max Min Abs floor ceiling Eq Ne Lt Le Gt Ge
    Equality Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan And Or Not Xor
    Piecewise ExprCondPair ITE Infinity NegativeInfinity NaN ComplexInfinity Zero One
    NegativeOne Half BooleanTrue BooleanFalse IntInfinity NegativeIntInfinity
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift
    PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat
    TruncToInt RoundToInt RoundDecimal ToFloat Identity""".split()  # noqa: SIM905
)
_SYM_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false", "int_oo"})
_SYMBOL = re.compile(r"[a-z]{1,6}[0-9]+")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_OPERATOR = re.compile(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?")
# Operators that reach outside the process: a program has no business reading files.
_DENIED_OPERATORS = frozenset({("aten", "from_file")})
_MAX_EXPR = 4096
_MAX_DEPTH = 200


def _builtin_operators() -> dict[str, Any]:
    """Serialized name -> object of the non-operator callables the export verifier accepts."""
    found: dict[str, Any] = {}
    for fn in (
        operator.getitem, operator.add, operator.mul, operator.sub, operator.truediv,
        operator.ge, operator.le, operator.gt, operator.lt, operator.eq, operator.ne,
        operator.floordiv, operator.mod, operator.and_, operator.or_, operator.not_,
        operator.pow, operator.neg, operator.abs, operator.lshift, operator.rshift,
        math.ceil, math.floor, math.trunc,
    ):  # fmt: skip
        found[f"{fn.__module__}.{fn.__name__}"] = fn
    for name in ("sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_not", "sym_sqrt",
                 "sym_sum"):  # fmt: skip
        sym = getattr(torch, name, None)
        if sym is not None:
            found[f"torch.{name}"] = sym
    found["torch._C._set_grad_enabled"] = torch._C._set_grad_enabled
    return found


_BUILTIN_OPERATORS = _builtin_operators()


def _refuse(path: Path, where: str, why: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path}: refused, {where} {why}: torch.export would run code from the file; pass "
        "--trust-pickle (trust_pickle=True) only if you trust its source"
    )


# ----------------------------------------------------------------------- program checks


class _ProgramCheck:
    """Checks (and trims) the JSON of a serialized ExportedProgram before torch parses it."""

    def __init__(self, path: Path, entry: str) -> None:
        self.path = path
        self.entry = entry
        self.dropped_guards = 0

    def fail(self, where: tuple[Any, ...], why: str) -> UnsafeFileError:
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in where).lstrip(".")
        return _refuse(self.path, f"{self.entry}: {field or 'the program'}", why)

    def clean(self, value: Any, key: str | None = None, where: tuple[Any, ...] = ()) -> Any:
        if len(where) > _MAX_DEPTH:
            raise self.fail(where[:8], "is nested too deeply")
        if key in _DROPPED:
            if key == "guards_code" and isinstance(value, list):
                self.dropped_guards = len(value)
            return _DROPPED[key]()
        if key in _REFUSED and value is not None:
            raise self.fail(where, f"holds {_REFUSED[key]}")
        if key == "custom_obj_values" and value:
            raise self.fail(where, f"holds {_REFUSED['custom_obj']}")
        if key == "metadata" and isinstance(value, dict):
            kept = {}
            if "nn_module_stack" in value:
                self.module_stack(value["nn_module_stack"], (*where, "nn_module_stack"))
                kept["nn_module_stack"] = value["nn_module_stack"]
            return kept  # stack traces, source functions, custom and guard metadata: not needed
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                self.name(k, (*where, k))
                out[k] = self.clean(v, k, (*where, k))
            return out
        if isinstance(value, list):
            return [self.clean(v, key, (*where, i)) for i, v in enumerate(value)]
        if isinstance(value, str):
            if key == "expr_str":
                self.sym_expr(value, where)
            elif key in ("target", "as_operator"):
                self.operator(value, where)
            elif key in ("in_spec", "out_spec"):
                self.treespec(value, where)
            elif key in ("as_string", "as_strings"):
                if not _ARG_STRING.fullmatch(value):
                    raise self.fail(where, f"is an unusual string argument {value[:60]!r}")
            elif key == "torch_version":
                if not _VERSION.fullmatch(value):
                    raise self.fail(where, f"is not a version {value[:60]!r}")
            elif value not in _FLOAT_WORDS:
                self.name(value, where)
            return value
        if value is None or isinstance(value, (bool, int, float)):
            return value
        raise self.fail(where, f"holds a {type(value).__name__}")

    def name(self, value: Any, where: tuple[Any, ...]) -> None:
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise self.fail(where, f"is not a plain name: {str(value)[:60]!r}")
        if any(_DUNDER.fullmatch(part) for part in value.split(".")):
            raise self.fail(where, f"names a Python special attribute: {value[:60]!r}")

    def module_stack(self, value: Any, where: tuple[Any, ...]) -> None:
        if not isinstance(value, str) or any(c in value for c in "[]()'\"\\\n\r"):
            raise self.fail(where, "is not a plain module stack")
        for item in value.split(";"):
            parts = item.split(",")
            if len(parts) != 3 or not _TYPE_NAME.fullmatch(parts[2]):
                raise self.fail(where, f"is not a plain module stack entry: {item[:60]!r}")
            self.name(parts[0], where)
            self.name(parts[1], where)

    def operator(self, value: str, where: tuple[Any, ...]) -> None:
        if value in _BUILTIN_OPERATORS:
            return
        match = _OPERATOR.fullmatch(value)
        if match is None or any(p and p.startswith("__") for p in match.groups()):
            raise self.fail(where, f"calls {value[:80]!r}, which is not an operator")
        namespace, op, overload = match.groups()
        if (namespace, op) in _DENIED_OPERATORS:
            raise self.fail(where, f"calls {value}, which reads files")
        try:
            resolved = getattr(torch.ops, namespace)
            if not isinstance(
                resolved, (torch._ops._OpNamespace, torch._ops._HigherOrderNamespace)
            ):
                raise AttributeError(namespace)
            resolved = getattr(resolved, op)
            if overload is not None:
                resolved = getattr(resolved, overload)
        except (AttributeError, RuntimeError) as exc:
            raise LoadError(
                f"{self.path}: the program calls {value}, an operator this torch does not have "
                "(a custom operator must be registered before loading)"
            ) from exc
        wanted = torch._ops.OpOverload if overload is not None else torch._ops.HigherOrderOperator
        if not isinstance(resolved, wanted):
            raise self.fail(where, f"calls {value[:80]!r}, which is not an operator")

    def sym_expr(self, value: str, where: tuple[Any, ...]) -> None:
        if len(value) > _MAX_EXPR or not value.isascii():
            raise self.fail(where, "is not a plain symbolic expression")
        try:
            tree = ast.parse(value, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            raise self.fail(where, "is not a plain symbolic expression") from exc
        strings: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                if not isinstance(func, ast.Name) or func.id not in _SYM_CALLS:
                    raise self.fail(where, f"calls something other than sympy: {value[:80]!r}")
                for kw in node.keywords:
                    if kw.arg is None or not (
                        isinstance(kw.value, ast.Constant) and type(kw.value.value) in (bool, int)
                    ):
                        raise self.fail(where, f"has an unusual keyword: {value[:80]!r}")
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    pattern = _SYMBOL if func.id == "Symbol" else _NUMBER
                    if func.id not in ("Symbol", "Float") or not pattern.fullmatch(first.value):
                        raise self.fail(where, f"has an unusual string: {value[:80]!r}")
                    strings.add(id(first))
            elif isinstance(node, ast.Name):
                if not (
                    node.id in _SYM_CALLS or node.id in _SYM_CONSTANTS or _SYMBOL.fullmatch(node.id)
                ):
                    raise self.fail(where, f"names {node.id!r}, not a symbol: {value[:80]!r}")
            elif isinstance(node, ast.Constant):
                if isinstance(node.value, str) and id(node) in strings:
                    continue
                if type(node.value) not in (bool, int, float):
                    raise self.fail(where, f"has an unusual constant: {value[:80]!r}")
            elif not isinstance(
                node,
                (
                    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Load,
                    ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.keyword,
                ),
            ):  # fmt: skip
                raise self.fail(where, f"is not a plain symbolic expression: {value[:80]!r}")

    def treespec(self, value: str, where: tuple[Any, ...]) -> None:
        try:
            protocol, spec = _strict_json(value.encode())
        except (ValueError, TypeError, RecursionError) as exc:
            raise self.fail(where, "is not an input/output structure") from exc
        if protocol != 1:
            raise self.fail(where, f"uses structure protocol {protocol!r}")
        self.spec_node(spec, where, 0)

    def spec_node(self, spec: Any, where: tuple[Any, ...], depth: int) -> None:
        if depth > _MAX_DEPTH or not isinstance(spec, dict):
            raise self.fail(where, "is not an input/output structure")
        if set(spec) != {"type", "context", "children_spec"}:
            raise self.fail(where, "is not an input/output structure")
        kind, context, children = spec["type"], spec["context"], spec["children_spec"]
        if kind is not None and kind not in _SPEC_TYPES:
            raise self.fail(where, f"uses the Python type {str(kind)[:60]!r} in its structure")
        if context is not None:
            if not isinstance(context, str):
                raise self.fail(where, "is not an input/output structure")
            try:
                decoded = _strict_json(context.encode())
            except (ValueError, RecursionError) as exc:
                raise self.fail(where, "is not an input/output structure") from exc
            self.spec_context(decoded, where)
        if not isinstance(children, list):
            raise self.fail(where, "is not an input/output structure")
        for child in children:
            self.spec_node(child, where, depth + 1)

    def spec_context(self, value: Any, where: tuple[Any, ...]) -> None:
        # torch decodes contexts with a hook that imports the module any {"__enum__": ...}
        # object names: only scalars and lists here.
        if isinstance(value, list):
            for item in value:
                self.spec_context(item, where)
        elif isinstance(value, str):
            if not _ARG_STRING.fullmatch(value):
                raise self.fail(where, f"has an unusual key {value[:60]!r}")
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise self.fail(where, "has an object in its structure")


def _strict_json(data: bytes) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"key {key!r} occurs twice")
            out[key] = value
        return out

    return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates)


# ------------------------------------------------------------------------------ tensors


class _Reader:
    """Entries of one checked archive, read once each."""

    def __init__(self, archive: CheckedZip, path: Path) -> None:
        self.archive = archive
        self.path = path

    def bytes(self, name: str) -> bytes:
        if not self.archive.has(name):
            raise LoadError(f"{self.path}: the exported program has no {name} entry")
        return self.archive.read(name)

    def json(self, name: str) -> Any:
        try:
            return _strict_json(self.bytes(name))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise UnsafeFileError(
                f"{self.path}: refused, {name} is not plain JSON ({str(exc)[:120]})"
            ) from exc

    def weights_only(self, name: str) -> Any:
        """An entry written by torch.save, loaded with the restricted unpickler."""
        blob = self.bytes(name)
        if not blob:
            return None
        try:
            return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
        except Exception as exc:
            if "weights only" in str(exc).lower() or "weights_only" in str(exc):
                raise UnsafeFileError(
                    f"{self.path} holds pickled objects that are not plain tensors ({name}): "
                    "torch.export.load would unpickle them and run code from the file; pass "
                    "--trust-pickle (trust_pickle=True) only if you trust its source"
                ) from exc
            raise LoadError(f"{self.path}: {name} is truncated or corrupt ({exc})") from exc

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A legacy weights/constants entry: one torch.save'd dict of tensors."""
        obj = self.weights_only(name)
        obj = {} if obj is None else obj
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise UnsafeFileError(f"{self.path}: refused, {name} holds more than tensors")
        return obj

    def payload(self, config_name: str, folder: str, prefixes: tuple[str, ...]) -> dict[str, Any]:
        """Tensors listed by a weights/constants index (``*_config.json``)."""
        from torch._export.serde import schema
        from torch._export.serde.serialize import (
            _dict_to_dataclass,
            deserialize_scalar_type,
            deserialize_size,
            deserialize_storage_offset,
            deserialize_stride,
        )

        raw = self.json(config_name)
        check = _ProgramCheck(self.path, config_name)
        raw = check.clean(raw)
        try:
            config = _dict_to_dataclass(schema.PayloadConfig, raw)
        except Exception as exc:
            raise LoadError(f"{self.path}: {config_name} is not a payload index ({exc})") from exc
        flats: dict[str, torch.Tensor] = {}
        out: dict[str, Any] = {}
        for fqn, meta in config.config.items():
            file = meta.path_name
            entry = folder + file
            if not _ENTRY.fullmatch(file) or not file.startswith(prefixes):
                raise UnsafeFileError(
                    f"{self.path}: refused, {config_name} entry {fqn!r} points at {file!r}, "
                    "not a tensor file of this folder"
                )
            if meta.use_pickle:
                tensor = self.weights_only(entry)
                if not isinstance(tensor, torch.Tensor):
                    raise UnsafeFileError(f"{self.path}: refused, {entry} ({fqn}) is not a tensor")
                out[fqn] = tensor
                continue
            tm = meta.tensor_meta
            if tm is None:
                raise LoadError(f"{self.path}: {config_name} entry {fqn!r} has no tensor_meta")
            try:
                dtype = deserialize_scalar_type(tm.dtype)
                size = deserialize_size(tm.sizes)
                stride = deserialize_stride(tm.strides)
                offset = deserialize_storage_offset(tm.storage_offset)
                flat = flats.get(file)
                if flat is None:
                    blob = bytearray(self.bytes(entry))
                    flat = (
                        torch.frombuffer(blob, dtype=dtype) if blob else torch.empty(0, dtype=dtype)
                    )
                    flats[file] = flat
                if flat.dtype != dtype:
                    raise ValueError(f"{file} is read as {flat.dtype} and {dtype}")
                tensor = (
                    torch.zeros(size, dtype=dtype)
                    if flat.numel() == 0
                    else torch.as_strided(flat, size, stride, offset)
                )
            except (AssertionError, KeyError, ValueError, RuntimeError, TypeError) as exc:
                raise LoadError(
                    f"{self.path}: {config_name} entry {fqn!r} does not fit its data ({exc})"
                ) from exc
            if meta.is_param:
                out[fqn] = nn.Parameter(tensor, requires_grad=bool(tm.requires_grad))
            else:
                out[fqn] = tensor.requires_grad_(bool(tm.requires_grad))
        return out


# ------------------------------------------------------------------------------ program


@contextlib.contextmanager
def quiet_torch_export_logs() -> Iterator[None]:
    """The deserializer logs (and, in torch 2.13, fails to format) warnings about fallbacks."""
    loggers = [logging.getLogger(n) for n in ("torch._export", "torch.export")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def _check_graphs(program: Any, path: Path) -> None:
    """Every call in every graph torch built is an operator (defence in depth)."""
    allowed = set(_BUILTIN_OPERATORS.values())
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if graph is not None else ():
            if node.op in ("placeholder", "get_attr", "output"):
                continue
            target = node.target
            if node.op != "call_function" or not (
                isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator))
                or target in allowed
            ):
                raise _refuse(path, f"graph node {node.name}", f"calls {str(target)[:80]!r}")


def read_exported_program(path: Path) -> tuple[Any, list[str]]:
    """The ``torch.export.ExportedProgram`` stored in ``path``, read without running its code.

    Returns:
        ``(program, notes)``.

    Raises:
        UnsafeFileError: the archive is ambiguous, or holds something that would run code
            (pickled objects other than tensors, custom objects, native code, a program whose
            strings are not plain names, operators and expressions).
        LoadError: a truncated, corrupt or unsupported archive.
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    notes: list[str] = []
    with CheckedZip(path, flat_ok=True) as archive:
        reader = _Reader(archive, path)
        names = archive.names
        native = [n for n in names if n.startswith(_NATIVE_DIRS)]
        if native:
            raise UnsafeFileError(
                f"{path} holds compiled native code ({native[0]}): AOTInductor packages cannot "
                "be scanned; save the program with torch.export.save (pass --trust-pickle to load "
                "it anyway)"
            )
        if archive.prefix and archive.has("archive_format"):
            if reader.bytes("archive_format") != b"pt2":
                raise LoadError(f"{path}: not a PT2 archive (archive_format is not 'pt2')")
            version = reader.bytes("archive_version") if archive.has("archive_version") else b""
            if version != b"0":
                raise LoadError(f"{path}: PT2 archive version {version[:16]!r} is not supported")
            program_entry = f"models/{_MODEL}.json"
            others = [n for n in names if n.startswith("models/") and n != program_entry]
            if others:
                notes.append(f"read the program '{_MODEL}' only, not {len(others)} others")
            program_json = reader.json(program_entry)
            state_dict = (
                reader.tensors(f"data/weights/{_MODEL}.pt")
                if archive.has(f"data/weights/{_MODEL}.pt")
                else reader.payload(
                    f"data/weights/{_MODEL}_weights_config.json", "data/weights/", ("weight_",)
                )
            )
            constants = (
                reader.tensors(f"data/constants/{_MODEL}.pt")
                if archive.has(f"data/constants/{_MODEL}.pt")
                else reader.payload(
                    f"data/constants/{_MODEL}_constants_config.json",
                    "data/constants/",
                    ("tensor_",),
                )
            )
            inputs_entry = f"data/sample_inputs/{_MODEL}.pt"
        elif not archive.prefix and archive.has("serialized_exported_program.json"):
            program_entry = "serialized_exported_program.json"  # torch.export.save before 2.8
            program_json = reader.json(program_entry)
            state_dict = reader.tensors(
                "serialized_state_dict.pt"
                if archive.has("serialized_state_dict.pt")
                else "serialized_state_dict.json"
            )
            constants = reader.tensors(
                "serialized_constants.pt"
                if archive.has("serialized_constants.pt")
                else "serialized_constants.json"
            )
            inputs_entry = "serialized_example_inputs.pt"
        else:
            raise UnsafeFileError(
                f"{path}: refused, not a torch.export archive laid out as torch writes it"
            )
        example_inputs = reader.weights_only(inputs_entry) if archive.has(inputs_entry) else None
        if example_inputs is not None and not isinstance(example_inputs, (tuple, dict)):
            raise UnsafeFileError(f"{path}: refused, {inputs_entry} holds a {type(example_inputs)}")
    check = _ProgramCheck(path, program_entry)
    program_json = check.clean(program_json)
    if check.dropped_guards:
        notes.append(f"ignored {check.dropped_guards} input guards stored as Python code")
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, program_json)
        with warnings.catch_warnings(), quiet_torch_export_logs():
            warnings.simplefilter("ignore")
            program = ExportedProgramDeserializer().deserialize(
                serialized,
                state_dict,
                constants,
                # the (args, kwargs) torch.export.save wrote, read with weights_only=True and
                # checked to be a tuple or dict above: torch's deserializer takes it as stored
                cast("tuple[tuple[torch.Tensor, ...], dict[str, Any]] | None", example_inputs),
            )
    except UnsafeFileError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise LoadError(
            f"{path}: cannot load the exported program ({type(exc).__name__}: "
            f"{text[0][:200] if text else ''})"
        ) from exc
    _check_graphs(program, path)
    return program, notes

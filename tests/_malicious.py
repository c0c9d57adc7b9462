"""An adversarial corpus of model and data files, built at test time, and a guard that fails a
test reaching any unrestricted unpickler or code-loading entry point.

Every payload creates (opens for writing) a marker file: a loader that ever runs it leaves the
marker behind.  Each corpus case is a function ``build(folder, marker, assets) -> path`` and an
expectation: ``"refused"`` (every loader raises a one-line ``LoadError``) or ``"inert"``
(``load_checkpoint`` returns the weights, read without running anything).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import pickle
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# ---------------------------------------------------------------------------------- payloads


class OpensMarker:
    """Unpickling this opens (and so creates) ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class ExecsMarker:
    """Unpickling this runs Python source that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.path!r}, 'w').close()",))


def payload_pickle(marker: Path, protocol: int) -> bytes:
    return pickle.dumps({"weights": OpensMarker(marker)}, protocol=protocol)


def torch_saved(obj: Any, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


# ------------------------------------------------------------------------------- the model


class TinyNet(nn.Module):
    """conv - BatchNorm2d - ReLU - pool - linear, for (N, 1, 8, 8) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


ARCH_FILE = str(Path(__file__).resolve()) + ":TinyNet"


@dataclass(frozen=True)
class Assets:
    """Good files the corpus is derived from, built once per test module."""

    state_dict: dict[str, torch.Tensor]
    pt2: bytes  # torch.export.save of TinyNet
    torchscript: bytes  # torch.jit.save of TinyNet
    inputs: torch.Tensor


def build_assets() -> Assets:
    gen = torch.Generator().manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
    model.eval()
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(model, (torch.zeros(2, 1, 8, 8),), dynamic_shapes={"x": {0: batch}})
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    script = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), script)
    return Assets(
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        pt2=buf.getvalue(),
        torchscript=script.getvalue(),
        inputs=torch.randn(16, 1, 8, 8, generator=gen),
    )


# ------------------------------------------------------------------------------ zip editing


def zip_entries(blob: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        return [(info.filename, zf.read(info.filename)) for info in zf.infolist()]


def write_zip(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": on purpose
        for name, data in entries:
            zf.writestr(name, data)
    return path


def edit_zip(
    blob: bytes,
    path: Path,
    replace: dict[str, bytes] | None = None,
    add: list[tuple[str, bytes]] = (),  # type: ignore[assignment]
    edit_json: dict[str, Callable[[Any], None]] | None = None,
) -> Path:
    """Rewrite a zip, entries named relative to its top folder."""
    entries = []
    top = ""
    for name, data in zip_entries(blob):
        top, _, rel = name.partition("/")
        if replace and rel in replace:
            data = replace[rel]
        if edit_json and rel in edit_json:
            doc = json.loads(data)
            edit_json[rel](doc)
            data = json.dumps(doc).encode()
        entries.append((name, data))
    entries += [(f"{top}/{rel}", data) for rel, data in add]
    return write_zip(path, entries)


def _walk(doc: Any, visit: Callable[[dict, str], None]) -> None:
    if isinstance(doc, dict):
        for key in list(doc):
            visit(doc, key)
            _walk(doc.get(key), visit)
    elif isinstance(doc, list):
        for item in doc:
            _walk(item, visit)


# ------------------------------------------------------------------------------ the corpus

Builder = Callable[[Path, Path, Assets], Path]


@dataclass(frozen=True)
class Case:
    name: str
    build: Builder
    expect: str  # "refused" | "inert"
    match: str = ""  # what the refusal says (a regular expression)
    data: bool = False  # a data file (for --data / load_data) rather than a model file


def _raw_pickle(protocol: int, suffix: str) -> Builder:
    def build(d: Path, marker: Path, a: Assets) -> Path:
        (d / f"raw{protocol}{suffix}").write_bytes(payload_pickle(marker, protocol))
        return d / f"raw{protocol}{suffix}"

    return build


def _exec_pickle(d: Path, marker: Path, a: Assets) -> Path:
    (d / "exec.pkl").write_bytes(pickle.dumps(ExecsMarker(marker), protocol=4))
    return d / "exec.pkl"


def _zip_value(d: Path, marker: Path, a: Assets) -> Path:
    torch.save({"state_dict": a.state_dict, "optimizer": OpensMarker(marker)}, d / "value.pt")
    return d / "value.pt"


def _legacy_value(d: Path, marker: Path, a: Assets) -> Path:
    obj = {"state_dict": a.state_dict, "epoch": ExecsMarker(marker)}
    torch.save(obj, d / "legacy.pth", _use_new_zipfile_serialization=False)
    return d / "legacy.pth"


def _lightning(d: Path, marker: Path, a: Assets) -> Path:
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in a.state_dict.items()},
        "epoch": 3,
        "pytorch-lightning_version": "2.2.0",
        "hyper_parameters": {"optimizer_factory": OpensMarker(marker), "lr": 0.1},
    }
    torch.save(ckpt, d / "last.ckpt")
    return d / "last.ckpt"


def _pickled_module(d: Path, marker: Path, a: Assets) -> Path:
    model = TinyNet()
    model.load_state_dict(a.state_dict)
    model.payload = OpensMarker(marker)
    torch.save(model, d / "whole.pt")
    return d / "whole.pt"


def _pt2_sample_inputs(d: Path, marker: Path, a: Assets) -> Path:
    evil = torch_saved((OpensMarker(marker),))
    return edit_zip(a.pt2, d / "inputs.pt2", replace={"data/sample_inputs/model.pt": evil})


def _pickled_weight_index(d: Path, marker: Path, a: Assets) -> Path:
    def to_pickle(doc: Any) -> None:
        next(iter(doc["config"].values()))["use_pickle"] = True

    first = json.loads(dict(_rel_entries(a.pt2))["data/weights/model_weights_config.json"])
    file = next(iter(first["config"].values()))["path_name"]
    return edit_zip(
        a.pt2,
        d / "weights.pt2",
        replace={f"data/weights/{file}": torch_saved(OpensMarker(marker))},
        edit_json={"data/weights/model_weights_config.json": to_pickle},
    )


def _pickled_constant(d: Path, marker: Path, a: Assets) -> Path:
    def add_constant(doc: Any) -> None:
        doc["config"]["evil"] = {
            "path_name": "tensor_99",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }

    return edit_zip(
        a.pt2,
        d / "constants.pt2",
        add=[("data/constants/tensor_99", torch_saved(ExecsMarker(marker)))],
        edit_json={"data/constants/model_constants_config.json": add_constant},
    )


def _opaque_constant(d: Path, marker: Path, a: Assets) -> Path:
    def add_constant(doc: Any) -> None:
        doc["config"]["evil"] = {
            "path_name": "opaque_obj_0",
            "is_param": False,
            "use_pickle": True,
            "tensor_meta": None,
        }

    return edit_zip(
        a.pt2,
        d / "opaque.pt2",
        add=[("data/constants/opaque_obj_0", payload_pickle(marker, 2))],
        edit_json={"data/constants/model_constants_config.json": add_constant},
    )


def _legacy_weights_entry(d: Path, marker: Path, a: Assets) -> Path:
    # torch.export.load prefers data/weights/model.pt (pre-2.8 layout) to the index
    return edit_zip(
        a.pt2,
        d / "legacyweights.pt2",
        add=[("data/weights/model.pt", torch_saved(OpensMarker(marker)))],
    )


def _index_outside_folder(d: Path, marker: Path, a: Assets) -> Path:
    def redirect(doc: Any) -> None:
        meta = next(iter(doc["config"].values()))
        meta["use_pickle"], meta["path_name"] = True, "../sample_inputs/evil.pt"

    return edit_zip(
        a.pt2,
        d / "redirect.pt2",
        add=[("data/sample_inputs/evil.pt", torch_saved(OpensMarker(marker)))],
        edit_json={"data/weights/model_weights_config.json": redirect},
    )


def _second_program(d: Path, marker: Path, a: Assets) -> Path:
    """A second program whose index sits one folder deeper than the weights torch reads."""
    rel = dict(_rel_entries(a.pt2))
    config = json.loads(rel["data/weights/model_weights_config.json"])
    meta = next(iter(config["config"].values()))
    harmless = torch_saved(torch.ones(1))
    meta["use_pickle"], meta["path_name"] = True, "weight_evil"
    return edit_zip(
        a.pt2,
        d / "second.pt2",
        add=[
            ("models/sub/model.json", rel["models/model.json"]),
            ("data/sample_inputs/sub/model.pt", rel["data/sample_inputs/model.pt"]),
            ("data/weights/sub/model_weights_config.json", json.dumps(config).encode()),
            # a check that resolves the index against its own folder reads this one ...
            ("data/weights/sub/weight_evil", harmless),
            # ... torch.export.load joins the name to data/weights/ and unpickles this one
            ("data/weights/weight_evil", torch_saved(OpensMarker(marker))),
            ("data/constants/sub/model_constants_config.json", b'{"config": {}}'),
        ],
        edit_json={},
    )


def _rel_entries(blob: bytes) -> list[tuple[str, bytes]]:
    return [(name.partition("/")[2], data) for name, data in zip_entries(blob)]


def _duplicate(evil_first: bool) -> Builder:
    def build(d: Path, marker: Path, a: Assets) -> Path:
        entries = zip_entries(a.pt2)
        name = next(n for n, _ in entries if n.endswith("data/sample_inputs/model.pt"))
        good = dict(entries)[name]
        evil = torch_saved((OpensMarker(marker),))
        rest = [(n, b) for n, b in entries if n != name]
        pair = [(name, evil), (name, good)] if evil_first else [(name, good), (name, evil)]
        return write_zip(d / f"dup{int(evil_first)}.pt2", [*pair, *rest])

    return build


def _case_duplicate(d: Path, marker: Path, a: Assets) -> Path:
    entries = zip_entries(a.pt2)
    top = entries[0][0].partition("/")[0]
    evil = torch_saved((OpensMarker(marker),))
    return write_zip(d / "case.pt2", [*entries, (f"{top}/DATA/sample_inputs/model.pt", evil)])


def _second_top_folder(d: Path, marker: Path, a: Assets) -> Path:
    entries = zip_entries(a.pt2)
    evil = torch_saved((OpensMarker(marker),))
    copy = [
        ("evil/" + n.partition("/")[2], evil if n.endswith("sample_inputs/model.pt") else b)
        for n, b in entries
    ]
    return write_zip(d / "twotops.pt2", [*copy, *entries])


def _nul_name(d: Path, marker: Path, a: Assets) -> Path:
    path = d / "nul.pt2"
    entries = zip_entries(a.pt2)
    name = next(n for n, _ in entries if n.endswith("data/sample_inputs/model.pt"))
    write_zip(path, [*entries, (name + "X", torch_saved((OpensMarker(marker),)))])
    blob = bytearray(path.read_bytes())
    raw = (name + "X").encode()
    for _ in range(2):  # the local header and the central directory: X becomes NUL
        at = blob.find(raw)
        blob[at + len(raw) - 1] = 0
    path.write_bytes(bytes(blob))
    return path


def _prepended(d: Path, marker: Path, a: Assets) -> Path:
    inputs = torch_saved((OpensMarker(marker),))
    evil = edit_zip(a.pt2, d / "tmp.zip", replace={"data/sample_inputs/model.pt": inputs})
    blob = b"PK\x03\x04" + b"\x00" * 60 + evil.read_bytes()  # looks like a zip from byte 0
    evil.unlink()
    (d / "prepended.pt2").write_bytes(blob)
    return d / "prepended.pt2"


def _appended(d: Path, marker: Path, a: Assets) -> Path:
    path = d / "value.pt"
    _zip_value(d, marker, a)
    data = path.read_bytes()
    path.unlink()
    other = torch_saved({"w": torch.ones(1)})
    (d / "appended.pt").write_bytes(data + other)
    return d / "appended.pt"


def _local_header_mismatch(d: Path, marker: Path, a: Assets) -> Path:
    path = d / "local.pt"
    torch.save({"state_dict": a.state_dict, "x": OpensMarker(marker)}, path)
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    at = info.header_offset + 30
    blob[at] = ord("Z") if blob[at] != ord("Z") else ord("Y")  # the local name only
    path.write_bytes(bytes(blob))
    return path


def _gap(d: Path, marker: Path, a: Assets) -> Path:
    entries = zip_entries(a.pt2)
    path = write_zip(d / "gap.pt2", entries)
    blob = path.read_bytes()
    eocd = blob.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack("<LL", blob[eocd + 12 : eocd + 20])
    hidden = b"PK\x03\x04" + b"\x00" * 60  # bytes no directory entry accounts for
    cd = blob[cd_offset : cd_offset + cd_size]
    new = blob[:cd_offset] + hidden + cd + blob[cd_offset + cd_size : eocd]
    end = bytearray(blob[eocd:])
    end[16:20] = struct.pack("<L", cd_offset + len(hidden))
    path.write_bytes(new + bytes(end))
    return path


def _program(edit: Callable[[Any, Path, Path], None], name: str) -> Builder:
    def build(d: Path, marker: Path, a: Assets) -> Path:
        return edit_zip(
            a.pt2,
            d / f"{name}.pt2",
            edit_json={"models/model.json": lambda doc: edit(doc, marker, d)},
        )

    return build


def _sympy_expression(doc: Any, marker: Path, d: Path) -> None:
    done: list[int] = []

    def visit(o: dict, key: str) -> None:
        if key == "expr_str" and not done:
            o[key] = f"open({str(marker)!r}, 'w')"
            done.append(1)

    _walk(doc, visit)


def _enum_import(doc: Any, marker: Path, d: Path) -> None:
    module = f"nd_evil_{abs(hash(str(d))) % 10**8}"
    (d / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport enum\n\n\nclass E(enum.Enum):\n    A = 1\n"
    )
    sig = doc["graph_module"]["module_call_graph"][0]["signature"]
    spec = json.loads(sig["in_spec"])
    kwargs = spec[1]["children_spec"][1]
    kwargs["context"] = json.dumps([{"__enum__": True, "fqn": f"{module}:E", "name": "A"}])
    kwargs["children_spec"] = [{"type": None, "context": None, "children_spec": []}]
    sig["in_spec"] = json.dumps(spec)


def _operator_target(doc: Any, marker: Path, d: Path) -> None:
    doc["verifiers"] = []
    for node in doc["graph_module"]["graph"]["nodes"]:
        if node["target"] == "torch.ops.aten.relu.default":
            node["target"] = "torch.serialization.os.system"
            node["inputs"] = [
                {"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}
            ]


def _codegen_injection(doc: Any, marker: Path, d: Path) -> None:
    text = json.dumps(doc).replace('"x"', json.dumps(f"x=open({str(marker)!r},'w')"))
    doc.clear()
    doc.update(json.loads(text))


def _guards(doc: Any, marker: Path, d: Path) -> None:
    doc["guards_code"] = [f"open({str(marker)!r}, 'w') is not None"]


def _stack_trace(doc: Any, marker: Path, d: Path) -> None:
    for node in doc["graph_module"]["graph"]["nodes"]:
        node["metadata"]["stack_trace"] = f'File "x.py", line 1, in f\r\nopen({str(marker)!r}, "w")'


def _aoti(d: Path, marker: Path, a: Assets) -> Path:
    return edit_zip(a.pt2, d / "aoti.pt2", add=[("data/aotinductor/model/model.so", b"\x7fELF")])


def _torchscript_constants(d: Path, marker: Path, a: Assets) -> Path:
    return edit_zip(
        a.torchscript, d / "script.pt", replace={"constants.pkl": payload_pickle(marker, 2)}
    )


def _torchscript_data(d: Path, marker: Path, a: Assets) -> Path:
    return edit_zip(
        a.torchscript, d / "scriptdata.pt", replace={"data.pkl": payload_pickle(marker, 2)}
    )


def _torch_zip_as_script(d: Path, marker: Path, a: Assets) -> Path:
    # constants.pkl makes torch.load hand the archive to torch.jit.load when not weights_only
    blob = torch_saved({"state_dict": a.state_dict, "x": OpensMarker(marker)})
    return edit_zip(blob, d / "asscript.pt", add=[("constants.pkl", payload_pickle(marker, 2))])


def _renamed(builder: Builder, suffix: str) -> Builder:
    def build(d: Path, marker: Path, a: Assets) -> Path:
        path = builder(d, marker, a)
        target = path.with_name(path.stem + "-renamed" + suffix)
        path.rename(target)
        return target

    return build


def _npy_objects(d: Path, marker: Path, a: Assets) -> Path:
    np.save(d / "objects.npy", np.array([OpensMarker(marker)], dtype=object), allow_pickle=True)
    return d / "objects.npy"


def _npz_objects(d: Path, marker: Path, a: Assets) -> Path:
    np.savez(d / "objects.npz", inputs=np.array([OpensMarker(marker)], dtype=object))
    return d / "objects.npz"


def _data_pt(d: Path, marker: Path, a: Assets) -> Path:
    torch.save({"inputs": a.inputs, "transform": OpensMarker(marker)}, d / "data.pt")
    return d / "data.pt"


def _data_legacy(d: Path, marker: Path, a: Assets) -> Path:
    obj = {"inputs": a.inputs, "transform": ExecsMarker(marker)}
    torch.save(obj, d / "data.pth", _use_new_zipfile_serialization=False)
    return d / "data.pth"


def _data_raw_pickle(d: Path, marker: Path, a: Assets) -> Path:
    (d / "data.bin").write_bytes(payload_pickle(marker, 5))
    return d / "data.bin"


_PICKLED = r"pickled Python objects.*--trust-pickle"
_AMBIGUOUS = r"refused, the zip archive is ambiguous"
_PROGRAM = r"refused, models/model.json: .*--trust-pickle"

CASES: list[Case] = [
    Case("raw-pickle-protocol-0", _raw_pickle(0, ".pt"), "refused", r"text file"),
    Case("raw-pickle-protocol-2", _raw_pickle(2, ".pt"), "refused", _PICKLED),
    Case("raw-pickle-protocol-5", _raw_pickle(5, ".pth"), "refused", _PICKLED),
    Case("raw-pickle-exec", _exec_pickle, "refused", _PICKLED),
    Case("torch-zip-payload-in-value", _zip_value, "inert"),
    Case("legacy-torch-save-payload-in-value", _legacy_value, "refused", _PICKLED),
    Case("lightning-hyper-parameters", _lightning, "inert"),
    Case("pickled-module-with-payload", _pickled_module, "inert"),
    Case("pt2-payload-in-sample-inputs", _pt2_sample_inputs, "refused", r"sample_inputs"),
    Case("pt2-payload-in-pickled-weight", _pickled_weight_index, "refused", r"not plain tensors"),
    Case("pt2-payload-in-pickled-constant", _pickled_constant, "refused", r"not plain tensors"),
    Case("pt2-opaque-object-constant", _opaque_constant, "refused", r"opaque_obj_0"),
    Case("pt2-legacy-weights-entry", _legacy_weights_entry, "refused", r"data/weights/model.pt"),
    Case("pt2-index-points-outside-its-folder", _index_outside_folder, "refused", r"\.\./"),
    Case("pt2-second-program-doctored-index", _second_program, "inert"),
    Case("pt2-duplicate-entry-evil-first", _duplicate(True), "refused", _AMBIGUOUS),
    Case("pt2-duplicate-entry-evil-second", _duplicate(False), "refused", _AMBIGUOUS),
    Case("pt2-duplicate-entry-other-case", _case_duplicate, "refused", _AMBIGUOUS),
    Case("pt2-second-top-folder", _second_top_folder, "refused", _AMBIGUOUS),
    Case("pt2-nul-in-entry-name", _nul_name, "refused", _AMBIGUOUS),
    Case("pt2-data-before-first-entry", _prepended, "refused", _AMBIGUOUS),
    Case("pt2-bytes-outside-any-entry", _gap, "refused", _AMBIGUOUS),
    Case("torch-zip-data-after-end", _appended, "refused", _AMBIGUOUS),
    Case("torch-zip-local-header-disagrees", _local_header_mismatch, "refused", _AMBIGUOUS),
    Case("pt2-sympy-expression", _program(_sympy_expression, "sympy"), "refused", _PROGRAM),
    Case("pt2-enum-import-in-input-spec", _program(_enum_import, "enum"), "refused", _PROGRAM),
    Case("pt2-operator-os-system", _program(_operator_target, "target"), "refused", _PROGRAM),
    Case("pt2-codegen-injection", _program(_codegen_injection, "inject"), "refused", _PROGRAM),
    Case("pt2-guards-code", _program(_guards, "guards"), "inert"),
    Case("pt2-stack-trace-newline", _program(_stack_trace, "trace"), "inert"),
    Case("pt2-aotinductor-library", _aoti, "refused", r"native code"),
    Case("torchscript-payload-in-constants-pkl", _torchscript_constants, "inert"),
    Case("torchscript-payload-in-data-pkl", _torchscript_data, "refused", r"without a module"),
    Case("torch-zip-with-constants-pkl", _torch_zip_as_script, "refused", r"without a module"),
    Case("torch-zip-named-safetensors", _renamed(_zip_value, ".safetensors"), "inert"),
    Case("torch-zip-named-onnx", _renamed(_zip_value, ".onnx"), "inert"),
    Case(
        "legacy-pickle-named-safetensors",
        _renamed(_legacy_value, ".safetensors"),
        "refused",
        _PICKLED,
    ),
    Case("pt2-named-pt", _renamed(_pt2_sample_inputs, ".pt"), "refused", r"sample_inputs"),
    Case("npy-object-array", _npy_objects, "refused", r"(?i)object arrays", data=True),
    Case("npz-object-array", _npz_objects, "refused", r"(?i)object arrays", data=True),
    Case("data-pt-payload", _data_pt, "refused", r"pickled Python objects", data=True),
    Case("data-legacy-payload", _data_legacy, "refused", r"pickled Python objects", data=True),
    Case("data-raw-pickle", _data_raw_pickle, "refused", r"pickled|cannot read", data=True),
]

# The cases plain torch.export.load runs (checked in test_security against torch itself).
TORCH_EXPORT_RUNS = (
    "pt2-payload-in-sample-inputs",
    "pt2-payload-in-pickled-weight",
    "pt2-payload-in-pickled-constant",
    "pt2-opaque-object-constant",
    "pt2-legacy-weights-entry",
    "pt2-second-program-doctored-index",
    "pt2-sympy-expression",
    "pt2-enum-import-in-input-spec",
)


# ----------------------------------------------------------------------------- the guard


class CodeLoadingGuard:
    """Replaces every unrestricted unpickler and code loader with one that fails the test.

    ``torch.load`` is allowed with ``weights_only=True`` only; ``pickle.Unpickler`` is replaced by
    a subclass whose ``load`` fails (torch builds its full unpickler on it at call time), while
    normdoctor's inert unpickler, a subclass of the original class, keeps working.  Inside
    :meth:`allowed` (for tests that pass ``trust_pickle=True``) everything works as usual.
    """

    def __init__(self, monkeypatch: Any) -> None:
        self.calls: list[str] = []
        self._allowed = 0
        import numpy

        real_torch_load = torch.load
        real_np_load = numpy.load
        real_unpickler = pickle.Unpickler
        guard = self

        def forbidden(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                if guard._allowed:
                    return real(*args, **kwargs)
                guard.calls.append(name)
                raise AssertionError(f"{name} called on an untrusted file")

            return call

        def torch_load(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("weights_only") is not True and not guard._allowed:
                guard.calls.append("torch.load(weights_only=False)")
                raise AssertionError("torch.load without weights_only=True")
            return real_torch_load(*args, **kwargs)

        def np_load(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("allow_pickle") and not guard._allowed:
                guard.calls.append("numpy.load(allow_pickle=True)")
                raise AssertionError("numpy.load with allow_pickle=True")
            return real_np_load(*args, **kwargs)

        class GuardedUnpickler(real_unpickler):  # type: ignore[misc, valid-type]
            def load(self) -> Any:
                if not guard._allowed:
                    guard.calls.append("pickle.Unpickler.load")
                    raise AssertionError("the full pickle.Unpickler on an untrusted file")
                return super().load()

        monkeypatch.setattr(torch, "load", torch_load)
        monkeypatch.setattr(torch.serialization, "load", torch_load)
        monkeypatch.setattr(numpy, "load", np_load)
        monkeypatch.setattr(pickle, "Unpickler", GuardedUnpickler)
        import torch.export.pt2_archive._package as package

        for owner, name in (
            (torch.export, "load"),
            (package, "load_pt2"),
            (torch.jit, "load"),
            (torch._C, "import_ir_module"),
            (torch._C, "import_ir_module_from_buffer"),
            (torch._C, "_pickle_load_obj"),
            (pickle, "load"),
            (pickle, "loads"),
            (pickle, "_Unpickler"),
            (pickle, "_load"),
            (pickle, "_loads"),
        ):
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, forbidden(f"{owner.__name__}.{name}", real))

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        self._allowed += 1
        try:
            yield
        finally:
            self._allowed -= 1

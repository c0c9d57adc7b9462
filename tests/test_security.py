"""No file runs code without --trust-pickle: an adversarial corpus through every loader and every
subcommand, with every unrestricted unpickler and code loader replaced by a failing stub."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from _malicious import (
    ARCH_FILE,
    CASES,
    TORCH_EXPORT_RUNS,
    Case,
    CodeLoadingGuard,
    TinyNet,
    build_assets,
    torch_saved,
    write_zip,
)
from safetensors.torch import save_file
from torch import nn

from normdoctor import _fused
from normdoctor.cli import main
from normdoctor.errors import LoadError, NormDoctorError, UnsafeFileError
from normdoctor.io import CheckpointFormat, load_checkpoint, load_data, load_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.export's pytree deprecations
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit, writing test archives
    pytest.mark.filterwarnings("ignore::UserWarning"),  # "ignored N checkpoint keys", ...
]


@pytest.fixture(scope="module")
def assets():
    return build_assets()


@pytest.fixture(autouse=True)
def guard(monkeypatch):
    _fused.use()  # numba reads its compilation cache with pickle: done before the guard is up
    guard = CodeLoadingGuard(monkeypatch)
    yield guard
    assert guard.calls == [], f"reached {guard.calls}"


@pytest.fixture
def corpus_dir(tmp_path, monkeypatch):
    folder = tmp_path / "files"
    folder.mkdir()
    # A module a file names is importable from here: if anything imported it, it would run.
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.chdir(folder)
    return folder


def _data_file(folder: Path, inputs: torch.Tensor) -> Path:
    path = folder / "good-data.pt"
    torch.save({"inputs": inputs, "labels": torch.arange(len(inputs)) % 3}, path)
    return path


def _model_file(folder: Path, assets) -> Path:
    path = folder / "good-model.pt"
    torch.save(assets.state_dict, path)
    return path


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message and len(message) < 600, message
    return message


# ------------------------------------------------------------------- the Python loaders


def _outcomes(path: Path) -> dict[str, str]:
    loaders = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "load_model": lambda: load_model(path),
        "load_model(arch)": lambda: load_model(path, ARCH_FILE),
        "load_data": lambda: load_data(path),
    }
    out = {}
    for name, load in loaders.items():
        try:
            load()
        except NormDoctorError as exc:
            out[name] = _one_line(exc)
        else:
            out[name] = "loaded"
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_python_loaders_run_nothing(case: Case, assets, corpus_dir, tmp_path):
    marker = tmp_path / "MARKER"
    path = case.build(corpus_dir, marker, assets)
    assert not marker.exists(), "building the corpus ran the payload"
    outcomes = _outcomes(path)
    assert not marker.exists(), f"{case.name} ran its payload: {outcomes}"
    primary = outcomes["load_data" if case.data else "load_checkpoint"]
    if case.expect == "refused":
        assert primary != "loaded", outcomes
        assert re.search(case.match, primary), primary
        if not case.data:
            assert all(v != "loaded" for v in outcomes.values()), outcomes
    else:
        assert primary == "loaded", outcomes
        ckpt = load_checkpoint(path)
        running_var = {k.removeprefix("model."): v for k, v in ckpt.state_dict.items()}
        torch.testing.assert_close(
            running_var["bn.running_var"], assets.state_dict["bn.running_var"], rtol=0, atol=0
        )
    assert not marker.exists()


def test_corpus_covers_the_issue(assets):
    refused = sum(c.expect == "refused" for c in CASES)
    inert = sum(c.expect == "inert" for c in CASES)
    assert len(CASES) == refused + inert and refused >= 30 and inert >= 8


# ------------------------------------------------------------------------------ the CLI


def _cli(*args: object, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    _, err = capsys.readouterr()
    return code, err


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_subcommand_runs_nothing(case: Case, assets, corpus_dir, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    path = case.build(corpus_dir, marker, assets)
    data = _data_file(corpus_dir, assets.inputs)
    model, arch = path, ["--arch", ARCH_FILE]
    if case.data:
        model, data = _model_file(corpus_dir, assets), path
    run = ["-b", "8", "--max-batches", "1"]
    commands = {
        "layers": ["layers", model],
        "scan": ["scan", model, *arch, "--data", data, *run],
        "patch": ["patch", model, *arch, "--data", data, "-o", tmp_path / "fixed.pt", *run],
        "report": ["report", model, *arch, "--data", data, "-o", tmp_path / "report", *run],
    }
    if case.expect == "inert" and case.name not in ("torch-zip-payload-in-value",):
        del commands["report"]  # rendering is slow and says nothing about loading
    codes = {}
    for name, args in commands.items():
        code, err = _cli(*args, capsys=capsys)
        assert not marker.exists(), f"{name} ran the payload of {case.name}"
        codes[name] = code
        assert code in (0, 1, 2), (name, code, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("normdoctor: error: "), err
            assert "internal error" not in err, err
    if case.expect == "refused":
        loading = [n for n in codes if n != "layers"] if case.data else list(codes)
        assert all(codes[n] == 2 for n in loading), codes
    elif not case.data:
        assert codes["scan"] in (0, 1) and codes["patch"] in (0, 1), codes  # weights, inertly


@pytest.mark.parametrize(
    "name, command",
    [
        ("pt2-duplicate-entry-evil-first", ["layers"]),
        ("pickled-module-with-payload", ["scan", "--data", "{data}"]),
        ("pt2-sympy-expression", ["scan", "--data", "{data}"]),
    ],
)
def test_subprocess_exits_2_with_one_line(name, command, assets, corpus_dir, tmp_path):
    case = next(c for c in CASES if c.name == name)
    marker = tmp_path / "MARKER"
    path = case.build(corpus_dir, marker, assets)
    data = _data_file(corpus_dir, assets.inputs)
    args = [command[0], str(path), *(a.format(data=data) for a in command[1:])]
    proc = subprocess.run(
        [sys.executable, "-m", "normdoctor", *args],
        capture_output=True,
        text=True,
        cwd=corpus_dir,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "NORMDOCTOR_KERNEL": "torch"},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normdoctor: error: "), proc.stderr
    assert not marker.exists()


# ------------------------------------------------------- the corpus is a real attack


@pytest.mark.parametrize("name", TORCH_EXPORT_RUNS)
def test_plain_torch_export_load_runs_the_payload(name, assets, corpus_dir, tmp_path, guard):
    """Control: the same files do run code through torch.export.load (and still do with
    --trust-pickle, which hands them to it)."""
    case = next(c for c in CASES if c.name == name)
    marker = tmp_path / "MARKER"
    path = case.build(corpus_dir, marker, assets)
    with guard.allowed(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.suppress(Exception):  # the payload is no valid part: it ran by then
            torch.export.load(path)
    assert marker.exists()


def test_trust_pickle_is_the_gate(assets, corpus_dir, tmp_path, guard):
    case = next(c for c in CASES if c.name == "pickled-module-with-payload")
    marker = tmp_path / "MARKER"
    path = case.build(corpus_dir, marker, assets)
    with pytest.raises(UnsafeFileError, match="--trust-pickle"):
        load_model(path)
    assert not marker.exists()
    with guard.allowed():
        model = load_model(path, trust_pickle=True)
    assert marker.exists() and isinstance(model, TinyNet)
    model.payload.close()


# ---------------------------------------------------------------- ambiguous archives


def test_duplicate_names_are_refused_in_one_line(assets, tmp_path):
    blob = torch_saved(assets.state_dict)
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        entries = [(i.filename, zf.read(i.filename)) for i in zf.infolist()]
    name = next(n for n, _ in entries if n.endswith("data.pkl"))
    path = write_zip(tmp_path / "dup.pt", [*entries, (name, dict(entries)[name])])
    with pytest.raises(UnsafeFileError, match=r"ambiguous \(entry name .*data.pkl occurs twice\)"):
        load_model(path, ARCH_FILE)


def test_flat_torch_zip_is_refused(assets, tmp_path):
    blob = torch_saved(assets.state_dict)
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        entries = [(i.filename.partition("/")[2], zf.read(i.filename)) for i in zf.infolist()]
    path = write_zip(tmp_path / "flat.pt", entries)
    with pytest.raises(UnsafeFileError, match=r"outside one top folder"):
        load_checkpoint(path)


# ------------------------------------------------------------------ content beats names


def _torch_zip(folder: Path, sd, name: str) -> Path:
    torch.save(sd, folder / name)
    return folder / name


@pytest.mark.parametrize(
    "writer, name, fmt",
    [
        (_torch_zip, "weights.safetensors", CheckpointFormat.STATE_DICT),
        (_torch_zip, "weights.onnx", CheckpointFormat.STATE_DICT),
        (_torch_zip, "weights.pt2", CheckpointFormat.STATE_DICT),
        (
            lambda d, sd, n: (save_file(sd, str(d / n)), d / n)[1],
            "w.pt",
            CheckpointFormat.SAFETENSORS,
        ),
        (
            lambda d, sd, n: (torch.save(sd, d / n, _use_new_zipfile_serialization=False), d / n)[
                1
            ],
            "legacy.safetensors",
            CheckpointFormat.STATE_DICT,
        ),
    ],
    ids=["zip-as-safetensors", "zip-as-onnx", "zip-as-pt2", "safetensors-as-pt", "legacy-as-st"],
)
def test_content_decides_the_format_not_the_name(writer, name, fmt, assets, tmp_path, capsys):
    path = writer(tmp_path, assets.state_dict, name)
    ckpt = load_checkpoint(path)
    assert ckpt.format is fmt
    model = load_model(path, ARCH_FILE)
    torch.testing.assert_close(model.bn.running_var, assets.state_dict["bn.running_var"])
    code, err = _cli("layers", path, capsys=capsys)
    assert code in (0, 1) and "internal error" not in err, err


def test_export_named_safetensors_is_an_export(assets, tmp_path):
    (tmp_path / "m.safetensors").write_bytes(assets.pt2)
    assert load_checkpoint(tmp_path / "m.safetensors").format is CheckpointFormat.EXPORT


# ------------------------------------------------ what torch.export writes still loads


class _Features(nn.Module):
    """String arguments, dict outputs, constants, non-persistent buffers, train-mode BN."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
        self.shift = torch.tensor([0.5, 1.0, 1.5, 2.0])  # a lifted tensor constant

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.bn(self.lin(x)) * self.scale + self.shift
        outer = torch.einsum("bi,bj->bij", y, y)
        return {
            "y": nn.functional.gelu(y, approximate="tanh"),
            "outer": outer.sum(-1),
            "floor": torch.div(y, 3.0, rounding_mode="floor"),
        }


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_checked_reader_loads_what_torch_export_writes(mode, tmp_path, guard):
    model = _Features().train(mode == "train")
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, tmp_path / "f.pt2")
    loaded = load_model(tmp_path / "f.pt2")  # left in the mode it was exported in
    with guard.allowed():
        reference = torch.export.load(tmp_path / "f.pt2").module()
    with torch.no_grad():
        got, want = loaded(x), reference(x)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_pre_2_8_flat_export_layout_loads_and_is_checked(assets, tmp_path, guard):
    from torch._export.serde.serialize import serialize

    model = TinyNet().eval()
    ep = torch.export.export(model, (torch.zeros(2, 1, 8, 8),))
    art = serialize(ep)
    entries = [
        ("version", b"8.0"),
        ("serialized_exported_program.json", art.exported_program),
        ("serialized_state_dict.pt", art.state_dict),
        ("serialized_constants.pt", art.constants),
        ("serialized_example_inputs.pt", art.example_inputs),
    ]
    write_zip(tmp_path / "old.pt2", entries)
    loaded = load_model(tmp_path / "old.pt2")
    x = torch.randn(2, 1, 8, 8)  # exported with a static batch of 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    marker = tmp_path / "MARKER"
    from _malicious import OpensMarker

    evil = [(n, torch_saved((OpensMarker(marker),)) if "example" in n else b) for n, b in entries]
    write_zip(tmp_path / "evil.pt2", evil)
    with pytest.raises(UnsafeFileError, match=r"serialized_example_inputs.pt.*--trust-pickle"):
        load_model(tmp_path / "evil.pt2")
    assert not marker.exists()


def test_unknown_operator_is_a_load_error(assets, tmp_path):
    from _malicious import edit_zip

    def rename(doc) -> None:
        for node in doc["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.relu.default":
                node["target"] = "torch.ops.mylib.fancy_relu.default"

    edit_zip(assets.pt2, tmp_path / "custom.pt2", edit_json={"models/model.json": rename})
    with pytest.raises(LoadError, match=r"mylib.fancy_relu.default.*custom operator"):
        load_model(tmp_path / "custom.pt2")


def test_index_json_with_duplicate_keys_is_refused(assets, tmp_path):
    from _malicious import edit_zip, zip_entries

    rel = {n.partition("/")[2]: b for n, b in zip_entries(assets.pt2)}
    config = rel["data/weights/model_weights_config.json"].decode()
    doubled = config.replace('{"config": {', '{"config": {}, "config": {', 1)
    assert json.loads(doubled)["config"]  # Python keeps the last copy, silently
    edit_zip(
        assets.pt2,
        tmp_path / "twice.pt2",
        replace={"data/weights/model_weights_config.json": doubled.encode()},
    )
    with pytest.raises(UnsafeFileError, match=r"not plain JSON.*twice"):
        load_model(tmp_path / "twice.pt2")


def test_the_guard_stops_what_it_should(assets, tmp_path, guard):
    import pickle

    torch.save({"state_dict": assets.state_dict}, tmp_path / "ok.pt")
    assert torch.load(tmp_path / "ok.pt", weights_only=True)["state_dict"]
    for call in (
        lambda: torch.load(tmp_path / "ok.pt", weights_only=False),
        lambda: torch.load(tmp_path / "ok.pt"),
        lambda: pickle.loads(pickle.dumps(1)),
        lambda: pickle.Unpickler(io.BytesIO(pickle.dumps(1))).load(),
        lambda: torch.export.load(io.BytesIO(assets.pt2)),
        lambda: torch.jit.load(io.BytesIO(assets.torchscript)),
    ):
        with pytest.raises(AssertionError):
            call()
    assert len(guard.calls) == 6
    guard.calls.clear()
    assert load_checkpoint(tmp_path / "ok.pt").format is CheckpointFormat.STATE_DICT

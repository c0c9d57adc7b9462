"""normdoctor.io.load_model / load_checkpoint: every format, the pickle gate, clear errors."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _malicious import CodeLoadingGuard
from safetensors.torch import save_file
from torch import nn

from normdoctor import LoadError, _fused, scan
from normdoctor.checks import static_checks_for
from normdoctor.io import CheckpointFormat, load_checkpoint, load_model
from sample_models.archs import DigitsCNN, DigitsMLP

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
ARCH = "sample_models.archs:DigitsCNN"
ARCH_FILE = "sample_models/archs.py:DigitsCNN"
MLP_ARCH = "sample_models.archs:DigitsMLP"

# Formats that put the identical tensors into the identical Python module must scan to
# bit-identical statistics.
EXACT = dict(rtol=0.0, atol=0.0)
# torch.export runs the model as an aten graph: same float32 ops, but the graph may order or
# fuse them differently from eager mode, so allow float32 rounding (~1e-7 relative) with margin.
GRAPH = dict(rtol=1e-5, atol=1e-6)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.export's pytree deprecations
    pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),  # writing test archives
]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def guard(monkeypatch):
    """Every unrestricted unpickler and code loader fails the test, except inside
    ``guard.allowed()`` around the calls that pass ``trust_pickle=True``."""
    _fused.use()  # numba reads its compilation cache with pickle: done before the guard is up
    guard = CodeLoadingGuard(monkeypatch)
    yield guard
    assert guard.calls == [], f"reached {guard.calls}"


def _trusting(guard: CodeLoadingGuard, kwargs: dict) -> contextlib.AbstractContextManager:
    return guard.allowed() if kwargs.get("trust_pickle") else contextlib.nullcontext()


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and non-trivial running statistics, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                tensor.fill_(17)  # num_batches_tracked
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3 + 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    return _trained_like(DigitsCNN())


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    return _trained_like(DigitsMLP(), seed=1)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    with np.load(SAMPLES / "data" / "test.npz") as d:
        return torch.from_numpy(d["inputs"][:48].copy())


@pytest.fixture(scope="module")
def cnn_stats(cnn, digits) -> dict:
    return _stats(cnn, digits)


def _stats(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    report = scan(model, x, batch_size=16, shuffle=False)
    out = {}
    for layer in report.layers:
        if layer.train is not None:
            t = layer.train
            out[layer.name] = (torch.tensor(t.pooled_mean), torch.tensor(t.pooled_var))
    return out


def _assert_same_stats(a: dict, b: dict, tol: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(b[name][0], a[name][0], **tol, msg=f"{name} mean")
        torch.testing.assert_close(b[name][1], a[name][1], **tol, msg=f"{name} var")


def _snapshot(folder: Path) -> dict[str, tuple[int, str, int]]:
    return {
        str(p.relative_to(folder)): (
            p.stat().st_size,
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _sd(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------- writers per format

Writer = Callable[[nn.Module, Path], tuple[Path, dict]]


def _w_state_dict(m, d):
    torch.save(_sd(m), d / "m.pt")
    return d / "m.pt", {"arch": ARCH}


def _w_legacy(m, d):
    torch.save(_sd(m), d / "m.pth", _use_new_zipfile_serialization=False)
    return d / "m.pth", {"arch": ARCH}


def _w_wrapped(key):
    def write(m, d):
        torch.save({key: _sd(m), "epoch": 3, "optimizer": {"lr": 0.1}}, d / "m.bin")
        return d / "m.bin", {"arch": ARCH}

    return write


def _w_lightning(prefix, extra=False):
    def write(m, d):
        sd = {f"{prefix}.{k}": v for k, v in _sd(m).items()}
        if extra:
            sd["criterion.weight"] = torch.ones(10)  # another submodule of the LightningModule
        ckpt = {
            "state_dict": sd,
            "epoch": 7,
            "pytorch-lightning_version": "2.2.0",
            # Not loadable with weights_only=True: exercises the inert reader.
            "hyper_parameters": argparse.Namespace(lr=0.01, width=16),
        }
        torch.save(ckpt, d / "m.ckpt")
        return d / "m.ckpt", {"arch": ARCH}

    return write


def _w_prefixed(prefix):
    def write(m, d):
        torch.save({prefix + k: v for k, v in _sd(m).items()}, d / "m.pt")
        return d / "m.pt", {"arch": ARCH}

    return write


def _w_safetensors(m, d):
    save_file(_sd(m), str(d / "m.safetensors"))
    return d / "m.safetensors", {"arch": ARCH_FILE}


def _w_pickle_trusted(m, d):
    torch.save(m, d / "whole.pt")
    return d / "whole.pt", {"trust_pickle": True}


def _w_pickle_arch(m, d):
    torch.save(m, d / "whole.pt")
    return d / "whole.pt", {"arch": ARCH}


def _w_torchscript_arch(m, d):
    torch.jit.save(torch.jit.script(m), str(d / "scripted.pt"))
    return d / "scripted.pt", {"arch": ARCH}


def _w_export(mode):
    def write(m, d):
        example = (torch.zeros(2, 1, 8, 8),)
        m = m.train() if mode == "train" else m.eval()
        try:
            with torch.no_grad():
                ep = torch.export.export(
                    m, example, dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}
                )
        finally:
            m.eval()
        torch.export.save(ep, str(d / "m.pt2"))
        return d / "m.pt2", {}

    return write


def _w_export_into_arch(m, d):
    path, _ = _w_export("eval")(m, d)
    return path, {"arch": ARCH}


FORMATS: dict[str, tuple[Writer, dict]] = {
    "state_dict": (_w_state_dict, EXACT),
    "legacy-non-zip": (_w_legacy, EXACT),
    "wrapped-state_dict": (_w_wrapped("state_dict"), EXACT),
    "wrapped-model": (_w_wrapped("model"), EXACT),
    "wrapped-model_state_dict": (_w_wrapped("model_state_dict"), EXACT),
    "lightning-model-prefix": (_w_lightning("model"), EXACT),
    "lightning-net-prefix-extra-keys": (_w_lightning("net", extra=True), EXACT),
    "dataparallel-module-prefix": (_w_prefixed("module."), EXACT),
    "torch-compile-prefix": (_w_prefixed("_orig_mod."), EXACT),
    "safetensors-file-arch": (_w_safetensors, EXACT),
    "pickle-trusted": (_w_pickle_trusted, EXACT),
    "pickle-untrusted-with-arch": (_w_pickle_arch, EXACT),
    "torchscript-with-arch": (_w_torchscript_arch, EXACT),
    "export-eval": (_w_export("eval"), GRAPH),
    "export-train": (_w_export("train"), GRAPH),
    "export-weights-into-arch": (_w_export_into_arch, EXACT),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_scans_like_the_original(fmt, cnn, cnn_stats, digits, tmp_path, guard):
    writer, tol = FORMATS[fmt]
    path, kwargs = writer(cnn, tmp_path)
    before = _snapshot(tmp_path)
    with warnings.catch_warnings(), _trusting(guard, kwargs):
        warnings.simplefilter("ignore", UserWarning)  # e.g. "ignored 1 checkpoint keys"
        model = load_model(path, **kwargs)
    assert isinstance(model, nn.Module)
    _assert_same_stats(cnn_stats, _stats(model, digits), tol)
    assert _snapshot(tmp_path) == before, "loading must not touch the input file"


def test_export_batchnorm1d_is_rebuilt(mlp, digits, tmp_path):
    batch = {"x": {0: torch.export.Dim("batch", min=2)}}
    ep = torch.export.export(mlp.eval(), (torch.zeros(4, 1, 8, 8),), dynamic_shapes=batch)
    torch.export.save(ep, str(tmp_path / "mlp.pt2"))
    model = load_model(tmp_path / "mlp.pt2")
    assert isinstance(model.bn1, nn.BatchNorm1d) and isinstance(model.bn2, nn.BatchNorm1d)
    _assert_same_stats(_stats(mlp, digits), _stats(model, digits), GRAPH)


def test_export_rebuilt_layers_switch_modes_like_torch(cnn, tmp_path):
    """Without the rebuild the exported call sites ignore ``training``: prove the rebuild works."""
    batch = {"x": {0: torch.export.Dim("batch", min=1)}}
    ep = torch.export.export(cnn.eval(), (torch.zeros(2, 1, 8, 8),), dynamic_shapes=batch)
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    model = load_model(tmp_path / "m.pt2")
    for name in ("norm1", "norm2", "norm3"):
        rebuilt, original = getattr(model, name), getattr(cnn, name)
        assert type(rebuilt) is nn.BatchNorm2d
        assert rebuilt.eps == original.eps and rebuilt.momentum == original.momentum
        assert rebuilt.running_var is not None
        torch.testing.assert_close(rebuilt.running_var, original.running_var, **EXACT)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.eval()
        cnn.eval()
        torch.testing.assert_close(model(x), cnn(x), **GRAPH)
        # Train mode on BN only, running stats frozen: the batch-statistics path.
        for mod in (model, cnn):
            for name in ("norm1", "norm2", "norm3"):
                bn = getattr(mod, name)
                bn.train()
                bn.track_running_stats = False
        try:
            torch.testing.assert_close(model(x), cnn(x), **GRAPH)
        finally:
            for mod in (model, cnn):
                for name in ("norm1", "norm2", "norm3"):
                    getattr(mod, name).track_running_stats = True
                mod.eval()


def test_load_model_does_not_call_eval(cnn, tmp_path, guard):
    torch.save(_sd(cnn), tmp_path / "m.pt")
    model = load_model(tmp_path / "m.pt", ARCH)
    assert model.training, "a freshly built architecture is in train mode: left as built"
    assert model.normdoctor_source == str((tmp_path / "m.pt").resolve())  # the patcher's guard
    torch.save(cnn.eval(), tmp_path / "whole.pt")
    with guard.allowed():
        assert not load_model(tmp_path / "whole.pt", trust_pickle=True).training


def test_arch_kwargs_are_passed(tmp_path):
    narrow = _trained_like(DigitsCNN(width=8))
    torch.save(_sd(narrow), tmp_path / "narrow.pt")
    model = load_model(tmp_path / "narrow.pt", ARCH, arch_kwargs={"width": 8})
    assert model.norm1.num_features == 8


# ------------------------------------------------------------------------ sample models


def _sample_files() -> list[tuple[str, dict, dict]]:
    manifest_path = SAMPLES / "MANIFEST.json"
    if not manifest_path.exists():
        return []
    manifest = json.loads(manifest_path.read_text())
    cases = []
    for name, entry in manifest["models"].items():
        for file in entry["files"]:
            if file["format"] in ("torch-state-dict", "safetensors", "torch-export"):
                cases.append((f"{name}:{file['path']}", entry, file))
    return cases


_REFERENCE_STATS: dict[tuple[str, int], dict] = {}


@pytest.mark.skipif(not _sample_files(), reason="sample_models/MANIFEST.json not built")
@pytest.mark.parametrize("case", _sample_files(), ids=lambda c: c[0])
def test_sample_model_files_scan_like_their_architecture(case, digits):
    _, entry, file = case
    key = (entry["name"], len(digits))
    if key not in _REFERENCE_STATS:
        reference = load_model(
            SAMPLES / f"{entry['name']}.pt", entry["arch"], arch_kwargs=entry["arch_kwargs"]
        )
        _REFERENCE_STATS[key] = _stats(reference.eval(), digits)
    ref_stats = _REFERENCE_STATS[key]
    path = SAMPLES / file["path"]
    if file["format"] == "torch-export":
        model, tol = load_model(path), GRAPH
    else:
        model, tol = load_model(path, entry["arch_file"], arch_kwargs=entry["arch_kwargs"]), EXACT
    if not entry["has_batchnorm"]:
        assert ref_stats == {}, "GroupNorm/LayerNorm models have nothing to measure"
        assert _stats(model, digits) == {}
        return
    _assert_same_stats(ref_stats, _stats(model, digits), tol)


@pytest.mark.skipif(not (SAMPLES / "healthy.onnx").exists(), reason="sample ONNX not built")
def test_onnx_checkpoint_carries_the_batchnorm_statistics():
    ckpt = load_checkpoint(SAMPLES / "healthy.onnx")
    assert ckpt.format is CheckpointFormat.ONNX and ckpt.state_dict is not None
    onnx_vars = sorted(
        v.double().sum().item() for k, v in ckpt.state_dict.items() if k.endswith("running_var")
    )
    pt = torch.load(SAMPLES / "healthy.pt", weights_only=True)
    pt_vars = sorted(v.double().sum().item() for k, v in pt.items() if k.endswith("running_var"))
    # Same float32 values, summed in float64: equal up to float64 rounding.
    assert onnx_vars == pytest.approx(pt_vars, rel=1e-12)
    assert static_checks_for(ckpt) == []


@pytest.mark.skipif(not (SAMPLES / "healthy.onnx").exists(), reason="sample ONNX not built")
def test_onnx_routes_to_the_backend_or_says_what_to_install(monkeypatch):
    try:
        from normdoctor.sources.onnx import OnnxModel
    except ImportError:
        pass
    else:
        assert isinstance(load_model(SAMPLES / "healthy.onnx"), OnnxModel)
    monkeypatch.setitem(sys.modules, "normdoctor.sources.onnx", None)  # import fails
    with pytest.raises(LoadError, match=r"pip install normdoctor\[onnx\]"):
        load_model(SAMPLES / "healthy.onnx")


# ------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "fmt, expected",
    [
        ("state_dict", CheckpointFormat.STATE_DICT),
        ("lightning-model-prefix", CheckpointFormat.STATE_DICT),
        ("safetensors-file-arch", CheckpointFormat.SAFETENSORS),
        ("pickle-trusted", CheckpointFormat.PICKLE),
        ("torchscript-with-arch", CheckpointFormat.TORCHSCRIPT),
        ("export-eval", CheckpointFormat.EXPORT),
    ],
)
def test_load_checkpoint_reads_weights_without_arch(fmt, expected, cnn, tmp_path, guard):
    path, _ = FORMATS[fmt][0](cnn, tmp_path)
    ckpt = load_checkpoint(path)  # no trust_pickle: the guard fails torch.jit.load and the like
    assert ckpt.format is expected
    assert ckpt.state_dict is not None
    reference = _sd(cnn)
    keys = {k.removeprefix("model.") for k in ckpt.state_dict}
    assert keys == set(reference)
    for key, value in ckpt.state_dict.items():
        torch.testing.assert_close(value, reference[key.removeprefix("model.")], **EXACT)
    assert static_checks_for(ckpt) == [], "trained-like statistics: nothing to report"


def test_lightning_checkpoint_with_foreign_objects_is_read_without_unpickling(cnn, tmp_path):
    path, _ = _w_lightning("net", extra=True)(cnn, tmp_path)
    with pytest.raises(Exception, match="Weights only"):
        torch.load(path, weights_only=True)  # the Namespace needs the full unpickler
    ckpt = load_checkpoint(path)
    assert ckpt.format is CheckpointFormat.STATE_DICT
    assert any("argparse.Namespace" in note for note in ckpt.notes)
    with pytest.warns(UserWarning, match="ignored 1 checkpoint keys"):
        load_model(path, ARCH)


def test_torchscript_checkpoint_keeps_layer_kinds(cnn, tmp_path):
    torch.jit.save(torch.jit.script(cnn), str(tmp_path / "s.pt"))
    ckpt = load_checkpoint(tmp_path / "s.pt")
    assert ckpt.module is None
    assert ckpt.layer_info["norm1"]["kind"] == "BatchNorm2d"


def test_torchscript_without_arch_says_what_to_do(cnn, tmp_path):
    torch.jit.save(torch.jit.script(cnn), str(tmp_path / "s.pt"))
    with pytest.raises(LoadError, match=r"TorchScript.*--arch.*torch\.export"):
        load_model(tmp_path / "s.pt")


# ------------------------------------------------------------------- untrusted pickles


class _CreatesFile:
    """Unpickling this object opens (and so creates) ``path``: a stand-in for any payload."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious_module_file(folder: Path, marker: Path) -> Path:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model.payload = _CreatesFile(marker)  # a plain attribute, pickled with the module
    torch.save(model, folder / "model.pt")
    return folder / "model.pt"


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, guard):
    marker = tmp_path / "pwned"
    path = _malicious_module_file(tmp_path, marker)
    assert not marker.exists()
    with pytest.raises(LoadError, match=r"--trust-pickle") as err:
        load_model(path)
    assert "builtins.open" in str(err.value) or "io.open" in str(err.value)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    # The static-check reader gets the weights, still without running anything.
    ckpt = load_checkpoint(path)
    assert ckpt.format is CheckpointFormat.PICKLE and ckpt.module is None
    assert ckpt.state_dict is not None and "1.running_var" in ckpt.state_dict
    assert ckpt.layer_info["1"]["kind"] == "BatchNorm2d"
    assert not marker.exists()
    # The flag is what gates it: with it, the payload runs.
    with guard.allowed():
        model = load_model(path, trust_pickle=True)
    try:
        assert marker.exists()
        assert isinstance(model, nn.Sequential)
    finally:
        model.payload.close()


def test_malicious_legacy_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save(
        {"state_dict": {"w": torch.ones(1)}, "x": _CreatesFile(marker)},
        tmp_path / "m.pt",
        _use_new_zipfile_serialization=False,
    )
    with pytest.raises(LoadError, match=r"\(io\.open\).*--trust-pickle"):
        load_checkpoint(tmp_path / "m.pt")
    assert not marker.exists()


def test_malicious_export_archive_is_refused(cnn, tmp_path, guard):
    """torch.export.load falls back to the full unpickler: the gate must catch that first."""
    ep = torch.export.export(cnn.eval(), (torch.zeros(2, 1, 8, 8),))
    torch.export.save(ep, str(tmp_path / "good.pt2"))
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(_CreatesFile(marker), payload)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(tmp_path / "good.pt2") as zin, zipfile.ZipFile(evil, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data/sample_inputs/model.pt"):
                data = payload.getvalue()
            zout.writestr(info, data)
    for loader in (load_model, load_checkpoint):
        with pytest.raises(LoadError, match=r"sample_inputs.*--trust-pickle"):
            loader(evil)
        assert not marker.exists()
    with guard.allowed(), pytest.raises(LoadError):  # the payload is not valid example inputs
        load_model(evil, trust_pickle=True)
    assert marker.exists(), "with trust_pickle the archive is handed to torch.export.load"


# -------------------------------------------------------------------------- bad inputs


def _bad_cases():
    def missing(d):
        return d / "nope.pt", {}, r"no such file"

    def empty(d):
        (d / "empty.pt").write_bytes(b"")
        return d / "empty.pt", {}, r"empty"

    def truncated(d):
        torch.save(_sd(DigitsCNN()), d / "full.pt")
        blob = (d / "full.pt").read_bytes()
        (d / "full.pt").unlink()
        (d / "cut.pt").write_bytes(blob[: len(blob) // 2])
        return d / "cut.pt", {"arch": ARCH}, r"truncated or corrupt"

    def truncated_legacy(d):
        buf = io.BytesIO()
        torch.save(_sd(DigitsCNN()), buf, _use_new_zipfile_serialization=False)
        (d / "cut.pth").write_bytes(buf.getvalue()[:500])
        return d / "cut.pth", {"arch": ARCH}, r"truncated or corrupt"

    def truncated_safetensors(d):
        save_file(_sd(DigitsCNN()), str(d / "full.safetensors"))
        blob = (d / "full.safetensors").read_bytes()
        (d / "full.safetensors").unlink()
        (d / "cut.safetensors").write_bytes(blob[: len(blob) - 100])
        return d / "cut.safetensors", {"arch": ARCH}, r"truncated or corrupt"

    def text_renamed(d):
        (d / "notes.pt").write_text("epoch,loss\n1,0.5\n2,0.3\n")
        return d / "notes.pt", {"arch": ARCH}, r"text file"

    def json_renamed(d):
        (d / "cfg.pt").write_text('{"abcd":{"x": 1}}')  # "{" at byte 8, like safetensors
        return d / "cfg.pt", {}, r"text file"

    def garbage(d):
        (d / "noise.pt").write_bytes(bytes(range(7, 200)) * 3)
        return d / "noise.pt", {}, r"unrecognised file format"

    def arch_not_importing(d):
        torch.save(_sd(DigitsCNN()), d / "m.pt")
        return d / "m.pt", {"arch": "no_such_package.models:Net"}, r"cannot import"

    def arch_no_attribute(d):
        torch.save(_sd(DigitsCNN()), d / "m.pt")
        return d / "m.pt", {"arch": "sample_models.archs:ResNet9000"}, r"no attribute"

    def arch_missing_file(d):
        torch.save(_sd(DigitsCNN()), d / "m.pt")
        return d / "m.pt", {"arch": "nowhere/net.py:Net"}, r"no such file"

    def arch_malformed(d):
        torch.save(_sd(DigitsCNN()), d / "m.pt")
        return d / "m.pt", {"arch": "sample_models.archs.DigitsCNN"}, r"must be"

    def arch_bad_kwargs(d):
        torch.save(_sd(DigitsCNN()), d / "m.pt")
        return d / "m.pt", {"arch": ARCH, "arch_kwargs": {"depth": 3}}, r"building arch"

    def other_architecture(d):
        torch.save(_sd(DigitsMLP()), d / "mlp.pt")
        return d / "mlp.pt", {"arch": ARCH}, r"does not fit.*missing keys.*unexpected keys"

    def other_width(d):
        torch.save(_sd(DigitsCNN(width=8)), d / "narrow.pt")
        return d / "narrow.pt", {"arch": ARCH}, r"shape mismatch"

    def no_arch(d):
        torch.save(_sd(DigitsCNN()), d / "m.pt")
        return d / "m.pt", {}, r"--arch"

    def not_a_model(d):
        torch.save({"epoch": 3, "loss": 0.2}, d / "m.pt")
        return d / "m.pt", {"arch": ARCH}, r"not a model or a state_dict"

    def foreign_zip(d):
        with zipfile.ZipFile(d / "m.pt", "w") as z:
            z.writestr("readme.txt", "hello")
        return d / "m.pt", {"arch": ARCH}, r"not one PyTorch writes"

    return [
        missing,
        empty,
        truncated,
        truncated_legacy,
        truncated_safetensors,
        text_renamed,
        json_renamed,
        garbage,
        arch_not_importing,
        arch_no_attribute,
        arch_missing_file,
        arch_malformed,
        arch_bad_kwargs,
        other_architecture,
        other_width,
        no_arch,
        not_a_model,
        foreign_zip,
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda f: f.__name__)
def test_bad_input_is_one_clear_load_error(case, tmp_path):
    path, kwargs, pattern = case(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(LoadError, match=pattern) as err:
        load_model(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message and len(message) < 600, message
    assert _snapshot(tmp_path) == before, "nothing written, nothing changed"


def test_key_mismatch_lists_first_keys_and_counts(tmp_path):
    torch.save(_sd(DigitsMLP()), tmp_path / "mlp.pt")
    with pytest.raises(LoadError) as err:
        load_model(tmp_path / "mlp.pt", ARCH)
    message = str(err.value)
    # DigitsCNN has 20 state_dict keys; DigitsMLP 16 (3 Linear + 2 BN with 5 each, minus ...)
    assert "missing keys (" in message and "unexpected keys (" in message
    assert "more)" in message  # more keys than shown


# ---------------------------------------------------------------------- patched models


def _manifest() -> dict:
    return {
        "version": 1,
        "conversions": [{"name": "norm1", "to": "instance", "options": {}}],
    }


def test_patched_checkpoint_loads_without_the_fixes(tmp_path, monkeypatch):
    """The loader rebuilds patched layers with normdoctor.convert (layer 2), never with the
    fixes in normdoctor.patch (layer 6, which runs models)."""
    from normdoctor.convert import save_patched
    from normdoctor.patch import patch

    patched = patch(DigitsCNN(), to="instance", layers="norm1")
    save_patched(patched, tmp_path / "patched.pt")
    monkeypatch.setitem(sys.modules, "normdoctor.patch", None)  # importing it would fail
    rebuilt = load_model(tmp_path / "patched.pt", ARCH)
    assert type(rebuilt.norm1) is type(patched.norm1)
    assert rebuilt.normdoctor_conversions == patched.normdoctor_conversions
    torch.save({"normdoctor_patch": _manifest(), "state_dict": _sd(DigitsCNN())}, tmp_path / "p.pt")
    ckpt = load_checkpoint(tmp_path / "p.pt")
    assert ckpt.format is CheckpointFormat.PATCHED and ckpt.manifest == _manifest()
    with pytest.raises(LoadError, match=r"--arch"):
        load_model(tmp_path / "p.pt")


def test_patched_checkpoint_with_unknown_manifest_version(tmp_path):
    manifest = {**_manifest(), "version": 99}
    torch.save({"normdoctor_patch": manifest, "state_dict": _sd(DigitsCNN())}, tmp_path / "p.pt")
    with pytest.raises(LoadError, match=r"version 99"):
        load_model(tmp_path / "p.pt", ARCH)


def test_patched_checkpoint_round_trip(tmp_path):
    patch = pytest.importorskip("normdoctor.patch")
    if not hasattr(patch, "apply_manifest"):
        pytest.skip("normdoctor.patch.apply_manifest does not exist yet")
    reference = patch.apply_manifest(_trained_like(DigitsCNN()), _manifest())
    sd = _sd(reference)
    torch.save({"normdoctor_patch": _manifest(), "state_dict": sd}, tmp_path / "p.pt")
    model = load_model(tmp_path / "p.pt", ARCH)
    assert type(model.norm1) is type(reference.norm1)
    assert model.state_dict().keys() == sd.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, sd[key], **EXACT)


# ------------------------------------------------------------- what a file does not carry


def _layers_json(path: Path, capsys) -> tuple[str, list[dict]]:
    from normdoctor.cli import main

    out_json = path.parent / f"{path.stem}-layers.json"
    code = main(["layers", str(path), "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    return out, json.loads(out_json.read_text())["layers"]


def _momentum_column(out: str) -> list[str]:
    rows = [line.split() for line in out.splitlines() if line.startswith("norm")]
    return [row[-2] for row in rows]  # ... momentum, can drift


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_momentum_is_unknown_not_a_default(how, tmp_path, capsys, monkeypatch):
    """A TorchScript archive stores no momentum or eps beside its tensors: torchcrepe's
    momentum 0 must not read as PyTorch's default 0.1."""
    monkeypatch.setenv("COLUMNS", "200")
    model = _trained_like(DigitsCNN())
    model.norm1.momentum = 0.0
    example = torch.zeros(2, 1, 8, 8)
    ts = torch.jit.trace(model, example) if how == "trace" else torch.jit.script(model)
    torch.jit.save(ts, str(tmp_path / "crepe.pt"))
    out, layers = _layers_json(tmp_path / "crepe.pt", capsys)
    assert _momentum_column(out) == ["unknown", "unknown", "unknown"]
    assert "unknown: momentum of all 3 layers, eps of all 3 layers: crepe.pt does not store" in out
    for layer in layers:
        assert (layer["momentum"], layer["eps"], layer["unknown"]) == (
            None,
            None,
            ["momentum", "eps"],
        )


def test_stored_momentum_is_shown_and_none_stays_distinguishable(tmp_path, capsys, monkeypatch):
    """A pickled module (read inertly) carries momentum: 0 and None (cumulative average) are
    values, not unknowns."""
    monkeypatch.setenv("COLUMNS", "200")
    model = _trained_like(DigitsCNN())
    model.norm1.momentum = 0.0
    model.norm2.momentum = None
    torch.save(model, tmp_path / "whole.pt")
    out, layers = _layers_json(tmp_path / "whole.pt", capsys)
    assert _momentum_column(out) == ["0", "cumulative", "0.1"]
    assert "unknown:" not in out
    assert [(layer["momentum"], layer["unknown"]) for layer in layers] == [
        (0.0, []),
        (None, []),  # cumulative average, as stored
        (0.1, []),
    ]
    assert [layer["eps"] for layer in layers] == [1e-5] * 3


def test_bare_state_dict_momentum_is_unknown(cnn, tmp_path, capsys):
    torch.save(_sd(cnn), tmp_path / "weights.pt")
    out, layers = _layers_json(tmp_path / "weights.pt", capsys)
    assert "(a state_dict holds tensors only); --arch reads them from the architecture" in out
    assert all(layer["unknown"] == ["momentum", "eps"] for layer in layers)

"""Hugging Face model folders: built offline from config.json, weights read safely, scanned
end to end (issue 14, item 8).

Every folder is written here with ``save_pretrained`` from a tiny config; nothing is downloaded.
References: the in-memory model the folder was saved from (same class, same tensors: its
outputs and its scan must be identical).
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _malicious import CodeLoadingGuard

from normdoctor import LoadError, _fused, find_norm_layers, scan
from normdoctor.cli import main
from normdoctor.io import CheckpointFormat, load_checkpoint, load_model

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_models" / "data"

#: The same tensors in the same transformers class: bit-identical outputs and statistics.
EXACT = dict(rtol=0.0, atol=0.0)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(autouse=True)
def guard(monkeypatch):
    """No unrestricted unpickler or code loader runs while a folder is read, and nothing
    connects anywhere."""
    _fused.use()

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    guard = CodeLoadingGuard(monkeypatch)
    yield guard
    assert guard.calls == [], f"reached {guard.calls}"


@pytest.fixture(autouse=True)
def _cli_env(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.delenv(key, raising=False)


def _npz(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = np.load(DATA / f"{name}.npz")
    return torch.from_numpy(d["inputs"]), torch.from_numpy(d["labels"]).long()


def _resnet_config() -> object:
    return transformers.ResNetConfig(
        num_channels=1,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=10,
    )


@pytest.fixture(scope="module")
def trained_resnet() -> object:
    """A tiny ResNet trained a little on the digits (about 80% test accuracy), in eval mode."""
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(_resnet_config())
    x, y = _npz("calib")
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(15):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            idx = perm[i : i + 32]
            loss = torch.nn.functional.cross_entropy(model(x[idx]).logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture
def resnet_dir(trained_resnet, tmp_path) -> Path:
    folder = tmp_path / "resnet-digits"
    trained_resnet.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    return folder


def _assert_same_model(model, reference) -> None:
    assert type(model) is type(reference)
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, **EXACT)
    x, _ = _npz("test")
    with torch.no_grad():
        torch.testing.assert_close(model(x[:16]).logits, reference(x[:16]).logits, **EXACT)


# ----------------------------------------------------------------------------- loading


def test_folder_builds_the_config_class_with_its_weights(resnet_dir, trained_resnet):
    model = load_model(resnet_dir)
    _assert_same_model(model, trained_resnet)
    assert not model.training  # as from_pretrained gives it
    (note,) = model.normdoctor_load_notes
    assert note.startswith("built ResNetForImageClassification from resnet-digits/config.json")
    assert note.endswith("weights read from model.safetensors")
    assert model.normdoctor_source == str(resnet_dir.resolve())
    assert "HF_HUB_OFFLINE" not in os.environ  # set while loading only


@pytest.mark.parametrize(
    "name, config",
    [
        (
            "MobileNetV2ForImageClassification",
            lambda: transformers.MobileNetV2Config(
                num_channels=3, image_size=32, depth_multiplier=0.35, num_labels=5
            ),
        ),
        (
            "RegNetForImageClassification",
            lambda: transformers.RegNetConfig(
                num_channels=1,
                embedding_size=8,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                groups_width=8,
            ),
        ),
        ("ResNetModel", _resnet_config),  # a backbone without a head: AutoModel's class
    ],
)
def test_vision_models_build_without_torchvision(name, config, tmp_path):
    torch.manual_seed(0)
    reference = getattr(transformers, name)(config()).eval()
    reference.save_pretrained(tmp_path / name)
    model = load_model(tmp_path / name)
    assert type(model).__name__ == name
    assert model.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, **EXACT)
    assert any(layer.kind == "BatchNorm2d" for layer in find_norm_layers(model))


def test_architectures_transformers_does_not_have_fall_back_to_the_auto_classes(
    resnet_dir, trained_resnet
):
    config = json.loads((resnet_dir / "config.json").read_text())
    config["architectures"] = ["MyResNetForImageClassification"]  # a user's subclass name
    (resnet_dir / "config.json").write_text(json.dumps(config))
    _assert_same_model(load_model(resnet_dir), trained_resnet)


def test_sharded_safetensors(trained_resnet, tmp_path):
    folder = tmp_path / "sharded"
    trained_resnet.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    model = load_model(folder)
    _assert_same_model(model, trained_resnet)
    assert "shards" in model.normdoctor_load_notes[0]


def test_pytorch_model_bin_is_read_with_weights_only(trained_resnet, resnet_dir):
    (resnet_dir / "model.safetensors").unlink()
    torch.save(trained_resnet.state_dict(), resnet_dir / "pytorch_model.bin")
    # the guard fails the test if anything but torch.load(weights_only=True) reads it
    _assert_same_model(load_model(resnet_dir), trained_resnet)


def test_shard_outside_the_folder_is_refused(resnet_dir, tmp_path):
    index = {"weight_map": {"classifier.1.weight": "../elsewhere.safetensors"}}
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    (resnet_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match=r"outside the model folder: refused"):
        load_model(resnet_dir)


def test_code_in_the_folder_is_never_run(resnet_dir, tmp_path):
    marker = tmp_path / "MARKER"
    (resnet_dir / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((resnet_dir / "config.json").read_text())
    config["model_type"] = "evil"
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig"}
    (resnet_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"custom code, which normdoctor never runs"):
        load_model(resnet_dir)
    assert not marker.exists()


def test_missing_transformers_names_the_extra(resnet_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails
    with pytest.raises(LoadError, match=r"pip install normdoctor\[hf\]"):
        load_model(resnet_dir)
    code = main(["scan", str(resnet_dir), "--data", str(DATA / "test.npz")])
    _out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and "pip install normdoctor[hf]" in err
    # the static checks need no transformers: the weights by their buffer names
    ckpt = load_checkpoint(resnet_dir)
    assert ckpt.module is None and ckpt.format is CheckpointFormat.HUGGINGFACE
    assert any("pip install normdoctor[hf]" in n for n in ckpt.notes)


def test_folders_that_are_not_model_folders(tmp_path, resnet_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match=r"is a directory.*config\.json"):
        load_model(tmp_path / "empty")
    (resnet_dir / "model.safetensors").unlink()
    (resnet_dir / "model.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(LoadError, match=r"no weights.*pass .*model\.onnx"):
        load_model(resnet_dir)


def test_own_arch_takes_the_folder_weights_without_transformers_building(
    resnet_dir, trained_resnet
):
    def arch():
        return transformers.ResNetForImageClassification(_resnet_config())

    model = load_model(resnet_dir, arch)
    model.eval()
    _assert_same_model(model, trained_resnet)
    assert "into arch" in model.normdoctor_load_notes[0]


# ------------------------------------------------------------------------------- scanning


def test_folder_scans_end_to_end_with_its_verdict(resnet_dir, trained_resnet, tmp_path, capsys):
    code = main(
        [
            *("scan", str(resnet_dir), "--data", str(DATA / "test.npz"), "-b", "32"),
            *("--no-search", "--json", str(tmp_path / "scan.json")),
        ]
    )
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    assert "note: built ResNetForImageClassification" in err
    got = json.loads((tmp_path / "scan.json").read_text())
    reference = scan(
        trained_resnet, _npz("test"), batch_size=32, search=False, model_name=resnet_dir.name
    )
    want = reference.to_dict()
    assert got["layers"] == want["layers"]  # the same statistics, bit for bit
    assert got["status"] == want["status"] and got["end_to_end"] == want["end_to_end"]
    e2e = reference.end_to_end
    assert e2e.metric == "accuracy" and e2e.acc_eval > 0.6  # labels used: ModelOutput.logits
    assert str(reference.status) in out
    assert len(reference.layers) == len(find_norm_layers(trained_resnet)) > 0


def test_layers_command_lists_the_folder(resnet_dir, capsys):
    code = main(["layers", str(resnet_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r"^resnet\.embedder\.embedder\.normalization +BatchNorm2d +8 ", out, re.M)
    assert "unknown:" not in out  # the built module carries momentum and eps

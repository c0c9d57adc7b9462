"""Lightning checkpoints: the weights under the LightningModule's names, and the module built
with the checkpoint's ``hyper_parameters`` (issue 14, item 6).

Most tests write a checkpoint dict of the shape ``Trainer.save_checkpoint`` writes, so they need
no Lightning; one trains with a real ``Trainer`` where ``pytorch-lightning`` is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _malicious import CodeLoadingGuard
from torch import nn

from normdoctor import LoadError, _fused
from normdoctor.cli import main
from normdoctor.io import load_checkpoint, load_model
from sample_models.archs import DigitsCNN

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_models" / "data" / "test.npz"
ARCH = "sample_models.archs:DigitsCNN"

#: The same tensors in the same module class: bit-identical.
EXACT = dict(rtol=0.0, atol=0.0)

# A LightningModule as users write one: its hyper-parameters saved, the network one attribute.
LIT_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from sample_models.archs import DigitsCNN

    try:
        import pytorch_lightning as pl
        Base = pl.LightningModule
    except ImportError:  # the dict-shaped checkpoints need no Lightning
        Base = nn.Module

    class LitDigits(Base):
        def __init__(self, width: int = 16, lr: float = 0.05):
            super().__init__()
            if hasattr(self, "save_hyperparameters"):
                self.save_hyperparameters()
            self.net = DigitsCNN(width=width)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)
    """
)


@pytest.fixture(autouse=True)
def _cwd(monkeypatch):
    monkeypatch.chdir(ROOT)  # the archs import from the repository
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")


@pytest.fixture
def guard(monkeypatch):
    """Loading runs no unrestricted unpickler (set up after any training in the test)."""
    _fused.use()
    # Lightning's own import reads code objects the guard refuses: imported before it is up.
    with contextlib.suppress(ImportError):
        import pytorch_lightning  # noqa: F401
    guards = []
    yield lambda: guards.append(CodeLoadingGuard(monkeypatch))
    for made in guards:
        assert made.calls == [], f"reached {made.calls}"


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                tensor.fill_(17)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
    return model.eval()


def _lightning_dict(
    net: nn.Module, hyper_parameters: object, prefix: str = "net."
) -> dict[str, object]:
    """A checkpoint of the shape Trainer.save_checkpoint writes (pytorch-lightning 2.x)."""
    state = {f"{prefix}{k}": v for k, v in net.state_dict().items()}
    return {
        "epoch": 4,
        "global_step": 60,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 5}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.05, "params": [0, 1]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hyper_parameters,
    }


@pytest.fixture
def wide(tmp_path) -> tuple[Path, DigitsCNN]:
    """A width-24 model saved as a Lightning checkpoint; the architecture's default is 16."""
    net = _trained_like(DigitsCNN(width=24))
    path = tmp_path / "last.ckpt"
    torch.save(_lightning_dict(net, {"width": 24, "lr": 0.05}), path)
    return path, net


@pytest.fixture
def lit_file(tmp_path) -> Path:
    path = tmp_path / "lit.py"
    path.write_text(LIT_SOURCE)
    return path


def _assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, **EXACT)


# ----------------------------------------------------------------- checkpoint dicts


def test_hyper_parameters_build_the_arch_they_were_saved_with(wide, guard):
    path, net = wide
    guard()
    model = load_model(path, ARCH)
    assert model.conv1.out_channels == 24  # not the default 16
    _assert_same_weights(model, net)
    (note,) = model.normdoctor_load_notes
    assert note == (
        "arch DigitsCNN built with the checkpoint's hyper-parameters width=24; "
        "not arguments of DigitsCNN: lr"
    )


def test_the_lightning_module_itself_as_arch(wide, lit_file, guard):
    path, net = wide
    guard()
    model = load_model(path, f"{lit_file}:LitDigits")
    assert model.net.conv1.out_channels == 24
    _assert_same_weights(model.net, net)
    assert model.normdoctor_load_notes == (
        "arch LitDigits built with the checkpoint's hyper-parameters width=24, lr=0.05",
    )


def test_explicit_arch_kwargs_win_over_the_checkpoint(wide, guard):
    path, _ = wide
    guard()
    with pytest.raises(
        LoadError, match=r"\d+ shape mismatches.*--arch-kwargs override the checkpoint's width=24"
    ):
        load_model(path, ARCH, arch_kwargs={"width": 16})
    model = load_model(path, ARCH, arch_kwargs={"num_classes": 10})
    assert model.conv1.out_channels == 24
    assert "width=24" in model.normdoctor_load_notes[0]


def test_an_arch_with_kwargs_takes_every_hyper_parameter(wide):
    path, _ = wide
    seen = {}

    def factory(**kwargs):
        seen.update(kwargs)
        return DigitsCNN(width=kwargs["width"])

    load_model(path, factory)
    assert seen == {"width": 24, "lr": 0.05}


def test_namespace_hyper_parameters_are_read_inertly(tmp_path, guard):
    net = _trained_like(DigitsCNN(width=8))
    path = tmp_path / "old.ckpt"
    torch.save(_lightning_dict(net, argparse.Namespace(width=8, lr=0.1), "model."), path)
    guard()  # the Namespace needs the full unpickler: the inert reader gets its values
    model = load_model(path, ARCH)
    assert model.conv1.out_channels == 8
    _assert_same_weights(model, net)


def test_hyper_parameters_that_are_not_plain_values_are_never_passed(tmp_path, guard):
    net = _trained_like(DigitsCNN(width=8))
    path = tmp_path / "mixed.ckpt"
    hparams = {"width": 8, "loss": nn.CrossEntropyLoss(), "_instantiator": "x.y", "lr": 0.1}
    torch.save(_lightning_dict(net, hparams), path)
    guard()
    seen = {}

    def factory(**kwargs):
        seen.update(kwargs)
        return DigitsCNN(width=kwargs.get("width", 16))

    load_model(path, factory)
    assert seen == {"width": 8, "lr": 0.1}  # the pickled loss module never reaches the arch
    notes = load_checkpoint(path).notes
    assert any("hyper-parameters not used" in n and "loss" in n for n in notes), notes


def test_hyper_parameters_the_arch_cannot_take_say_so(tmp_path):
    net = _trained_like(DigitsCNN())
    path = tmp_path / "bad.ckpt"
    torch.save(_lightning_dict(net, {"norm": "nonsense"}), path)
    with pytest.raises(LoadError, match=r"with the checkpoint's hyper-parameters.*--arch-kwargs"):
        load_model(path, ARCH)


def test_cli_says_which_hyper_parameters_it_used(wide, lit_file, capsys):
    path, _ = wide
    code = main(["layers", str(path), "--arch", f"{lit_file}:LitDigits"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "note: arch LitDigits built with the checkpoint's hyper-parameters width=24" in err
    assert "net.norm1  BatchNorm2d  24" in out
    code = main(["scan", str(path), "--arch", ARCH, "--data", str(DATA), "-b", "32", "-q"])
    out, err = capsys.readouterr()
    assert code in (0, 1) and err == "", err  # --quiet: no note


# --------------------------------------------------------------- a real Trainer


@pytest.mark.filterwarnings("ignore:.*LeafSpec")  # pytorch-lightning 2.6 on torch 2.13
def test_checkpoint_of_a_real_trainer(tmp_path, lit_file, monkeypatch, capsys, guard):
    pl = pytest.importorskip("pytorch_lightning")
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("lit_under_test", lit_file)
    lit = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "lit_under_test", lit)
    spec.loader.exec_module(lit)
    d = np.load(DATA)
    data = torch.utils.data.TensorDataset(
        torch.from_numpy(d["inputs"][:128]), torch.from_numpy(d["labels"][:128]).long()
    )
    torch.manual_seed(0)
    module = lit.LitDigits(width=24)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(str(path))
    capsys.readouterr()
    guard()
    model = load_model(path, f"{lit_file}:LitDigits")
    _assert_same_weights(model, module)
    assert model.net.norm1.num_batches_tracked.item() == 8  # trained: 128 samples in 16s
    assert "width=24, lr=0.05" in model.normdoctor_load_notes[0]
    code = main(
        [
            *("scan", str(path), "--arch", f"{lit_file}:LitDigits", "--data", str(DATA)),
            *("-b", "16", "--json", str(tmp_path / "scan.json")),
        ]
    )
    _out, err = capsys.readouterr()
    assert code in (0, 1), err
    assert "built with the checkpoint's hyper-parameters width=24" in err
    report = json.loads((tmp_path / "scan.json").read_text())
    assert [layer["num_features"] for layer in report["layers"]][:1] == [24]

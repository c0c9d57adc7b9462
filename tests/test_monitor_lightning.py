"""NormDoctorCallback with a real pytorch_lightning Trainer on CPU (issue 18).

The sample model trained at batch size 1 (``tiny-batch.pt``) is fine-tuned a few dozen steps at
batch size 1: the callback logs each window's per-layer numbers through the trainer's logger,
warns that eval mode diverges (InstanceNorm recommended), and writes the report at the end of
``fit``, never over an existing file.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normdoctor import ScanReport, load_model
from normdoctor.monitor import MonitorWarning

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.loggers import CSVLogger  # noqa: E402

from normdoctor.lightning import NormDoctorCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model at batch size 1: one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DATA = ROOT / "sample_models" / "data" / "calib.npz"


class LitDigits(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def _loader(batch_size: int) -> DataLoader:
    with np.load(DATA) as z:
        x, y = torch.from_numpy(z["inputs"]), torch.from_numpy(z["labels"])
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=gen)


def _fit(tmp_path: Path, callback: NormDoctorCallback, steps: int = 60, **trainer_kwargs):
    torch.manual_seed(0)
    net = load_model(ROOT / "sample_models" / "tiny-batch.pt", "sample_models.archs:DigitsCNN")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
        **trainer_kwargs,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LitDigits(net), _loader(1))
    return trainer, [w for w in caught if w.category is MonitorWarning]


@pytest.mark.slow
def test_callback_logs_warns_and_writes_the_report(tmp_path):
    out = tmp_path / "normdoctor.json"
    html = tmp_path / "report"
    callback = NormDoctorCallback(every=1, window=30, warmup=0, json_path=out, html_dir=html)
    logger = CSVLogger(tmp_path, name="logs")
    trainer, caught = _fit(tmp_path, callback, logger=logger)
    assert trainer.global_step == 60
    mon = callback.monitor
    assert mon is not None and mon.step == 60 and mon.checks == 60
    # Warned once: batch size 1, InstanceNorm.
    assert [f.cause for f in mon.flags] == ["instance"]
    assert len(caught) == 1 and "to='instance'" in str(caught[0].message)
    # The report, written at the end of fit, is the one the callback holds.
    report = callback.report
    assert report is not None and report.status.harmful
    assert ScanReport.from_json(out.read_text()) == report
    assert {str(r.recommendation) for r in report.flagged_layers} == {"instance"}
    assert json.loads(out.read_text())["composition"]["batch_size"] == 1
    assert (html / "index.html").is_file() and callback.written == [out, html / "index.html"]
    # Per-layer numbers through the trainer's logger, one row per closed window.
    logger.finalize("success")
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("normdoctor/net.norm1/drift")]
    assert len(logged) == 1  # the window closed at step 30 (the second one is still open at 60)
    assert float(logged[0]["normdoctor/net.norm3/drift"]) > 0.1
    assert float(logged[0]["normdoctor/harmful"]) == 1.0
    # The window of steps 1-30 closes when step 31 starts: logged at that global step.
    assert logged[0]["step"] == "31"


def test_callback_never_replaces_an_existing_report(tmp_path):
    out = tmp_path / "normdoctor.json"
    out.write_text("mine\n")
    callback = NormDoctorCallback(every=2, window=10, json_path=out)
    with pytest.raises(FileExistsError, match="never written over an existing file"):
        _fit(tmp_path, callback, steps=12, logger=False)
    assert out.read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tmp") == []
    assert callback.monitor is not None and callback.monitor.step == 12
    # The hooks are gone after fit, failed or not.
    net = callback.monitor.model
    assert not net._forward_hooks and not net._forward_pre_hooks
    assert not any(m._forward_pre_hooks for m in net.modules())


def test_module_names_the_network(tmp_path):
    callback = NormDoctorCallback(every=3, window=6, module="net")
    _fit(tmp_path, callback, steps=12, logger=False)
    assert callback.monitor is not None and type(callback.monitor.model).__name__ == "DigitsCNN"
    assert callback.monitor.checks == 4 and len(callback.monitor.history) == 1

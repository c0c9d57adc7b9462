"""The JSON the commands write around their scans (sweep, series, patch) and the ``layers``
listing: report types in :mod:`normdoctor.report` with exact round trips, and the CLI writes
exactly their ``to_dict()`` (the JSON schema of the README, unchanged)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from normdoctor.cli import Fix, main
from normdoctor.cli.options import Device, ScanOptions
from normdoctor.report import (
    SCHEMA_VERSION,
    LayerListing,
    LayersReport,
    PatchReport,
    ScanReport,
    SeriesReport,
    SweepReport,
    scan_result_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
SM = ROOT / "sample_models"
ARCH = "sample_models.archs:DigitsCNN"
DATA = str(SM / "data" / "test.npz")
FAST = ["--max-batches", "2", "-q"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # --arch sample_models.archs:... imports from the working directory
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _as_written(payload: dict) -> str:
    """The text a command writes for ``--json``."""
    return json.dumps(payload, indent=1, allow_nan=False) + "\n"


def _bn(name: str, features: int) -> dict:
    return {
        "name": name,
        "kind": "BatchNorm2d",
        "family": "batch",
        "num_features": features,
        "eps": 1e-05,
        "momentum": 0.1,
        "affine": True,
        "track_running_stats": True,
        "batch_dependent": True,
        "unknown": [],
    }


def test_layers_json_is_unchanged_and_round_trips(capsys, tmp_path):
    out = tmp_path / "layers.json"
    code, _, err = run(capsys, "layers", "sample_models/healthy.pt", "--arch", ARCH, "--json", out)
    assert code == 0, err
    text = out.read_text()
    # the JSON `layers --json` wrote before its envelope became a report type
    assert json.loads(text) == {
        "schema_version": 1,
        "model": "sample_models/healthy.pt",
        "layers": [_bn("norm1", 16), _bn("norm2", 32), _bn("norm3", 32)],
        "findings": [],
    }
    listing = LayersReport.from_dict(json.loads(text))
    assert _as_written(listing.to_dict()) == text  # same keys, same order
    assert LayersReport.from_dict(listing.to_dict()) == listing
    assert [layer.name for layer in listing.layers] == ["norm1", "norm2", "norm3"]


def test_layers_json_without_arch_names_what_the_file_does_not_store(capsys, tmp_path):
    state = torch.load(SM / "healthy.pt", weights_only=True)
    state["norm2.running_var"][3] = -1.0
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    out = tmp_path / "l.json"
    code, _, _ = run(capsys, "layers", bad, "--json", out)
    assert code == 1
    text = out.read_text()
    payload = json.loads(text)
    assert payload["layers"][0] == {
        "name": "norm1",
        "kind": "BatchNorm (from state_dict)",
        "family": "batch",
        "num_features": 16,
        "eps": None,
        "momentum": None,
        "affine": True,
        "track_running_stats": True,
        "batch_dependent": True,
        "unknown": ["momentum", "eps"],
    }
    listing = LayersReport.from_dict(payload)
    assert _as_written(listing.to_dict()) == text
    assert LayersReport.from_dict(listing.to_dict()) == listing
    (finding,) = [f for f in listing.findings if f.code == "running-var-nonpositive"]
    assert finding.layer == "norm2" and finding.channels == (3,)


def test_layer_listing_nulls_only_what_is_unknown():
    from normdoctor.layers import NormFamily, NormLayer

    layer = NormLayer(
        name="bn",
        kind="BatchNorm2d",
        family=NormFamily.BATCH,
        num_features=4,
        eps=1e-3,
        momentum=None,  # PyTorch's cumulative average, not unknown
        affine=False,
        track_running_stats=True,
    )
    known = LayerListing.from_layer(layer)
    assert known.eps == 1e-3 and known.momentum is None and known.unknown == ()
    unknown = LayerListing.from_layer(layer, ("eps",))
    assert unknown.eps is None and unknown.unknown == ("eps",)
    assert LayerListing.from_dict(unknown.to_dict()) == unknown


def test_sweep_json_is_the_sweep_report(capsys, tmp_path):
    out = tmp_path / "sweep.json"
    args = ["scan", SM / "tiny-batch.pt", "--arch", ARCH, "--data", DATA]
    code, _, err = run(capsys, *args, "--batch-sizes", "1,64", "--json", out, *FAST)
    assert code in (0, 1), err  # two batches may not decide the verdict
    text = out.read_text()
    payload = json.loads(text)
    assert list(payload) == ["schema_version", "kind", "batch_sizes", "reports"]
    assert payload["schema_version"] == SCHEMA_VERSION and payload["kind"] == "sweep"
    sweep = SweepReport.from_dict(payload)
    assert sweep.batch_sizes == (1, 64) and sweep.main is sweep.reports[0]
    assert [r.composition.batch_size for r in sweep.reports] == [1, 64]
    assert _as_written(sweep.to_dict()) == text
    assert SweepReport.from_dict(sweep.to_dict()) == sweep
    assert scan_result_from_dict(payload) == sweep
    # a patch envelope around two of these scans
    patch = PatchReport(before=sweep.reports[0], after=sweep.reports[1])
    d = patch.to_dict()
    assert list(d) == ["schema_version", "kind", "before", "after"] and d["kind"] == "patch"
    assert PatchReport.from_dict(json.loads(json.dumps(d))) == patch


def test_series_json_is_the_series_report(capsys, tmp_path):
    out = tmp_path / "series.json"
    models = ["sample_models/healthy.pt", "sample_models/stale.pt"]
    code, _, err = run(
        capsys, "scan", *models, "--arch", ARCH, "--data", DATA, "-b", "64", "--json", out, *FAST
    )
    assert code in (0, 1), err
    text = out.read_text()
    payload = json.loads(text)
    assert list(payload) == ["schema_version", "kind", "models", "reports"]
    series = SeriesReport.from_dict(payload)
    assert series.models == tuple(models)
    assert [r.model for r in series.reports] == ["healthy.pt", "stale.pt"]
    assert series.main is series.reports[-1]
    assert _as_written(series.to_dict()) == text
    assert SeriesReport.from_dict(series.to_dict()) == series
    assert scan_result_from_dict(payload) == series


def test_one_scan_is_read_as_a_scan_report(capsys, tmp_path):
    out = tmp_path / "scan.json"
    args = ["scan", SM / "healthy.pt", "--arch", ARCH, "--data", DATA, "-b", "64"]
    assert run(capsys, *args, "--json", out, *FAST)[0] == 0
    report = scan_result_from_dict(json.loads(out.read_text()))
    assert isinstance(report, ScanReport) and report.model == "healthy.pt"


@pytest.mark.slow
def test_patch_json_is_the_patch_report(capsys, tmp_path):
    out = tmp_path / "p.json"
    args = ["patch", SM / "stale.pt", "--arch", ARCH, "--data", DATA, "-b", "64"]
    code, _, err = run(capsys, *args, "-o", tmp_path / "fixed.pt", "--json", out, *FAST)
    assert code == 0, err
    text = out.read_text()
    payload = json.loads(text)
    assert list(payload) == ["schema_version", "kind", "before", "after"]
    patch = PatchReport.from_dict(payload)
    assert patch.before.flagged and not patch.after.flagged
    assert _as_written(patch.to_dict()) == text
    assert PatchReport.from_dict(patch.to_dict()) == patch


def test_envelopes_refuse_another_kind_or_schema_version(capsys, tmp_path):
    series = {"schema_version": SCHEMA_VERSION, "kind": "series", "models": [], "reports": []}
    assert SeriesReport.from_dict(series) == SeriesReport(models=(), reports=())
    with pytest.raises(ValueError, match="'sweep'"):
        SweepReport.from_dict(series)
    with pytest.raises(ValueError, match="schema_version 2"):
        SeriesReport.from_dict({**series, "schema_version": 2})
    with pytest.raises(ValueError, match="schema_version"):
        LayersReport.from_dict({"model": "m", "layers": [], "findings": []})
    # `report` says what it got instead of a scan
    bad = tmp_path / "future.json"
    bad.write_text(json.dumps({**series, "schema_version": 2}))
    code, _, err = run(capsys, "report", bad, "-o", tmp_path / "rep")
    assert code == 2 and "not a normdoctor scan JSON" in err and "schema_version 2" in err
    assert not (tmp_path / "rep").exists()


def test_scan_options_are_scans_keywords():
    options = ScanOptions(batch_size=8, seed=3, group_by_label=True, threshold=0.2)
    assert options.kwargs() == {
        "batch_size": 8,
        "shuffle": True,
        "seed": 3,
        "group_by": "label",
        "max_batches": None,
        "paths": ("train", "eval"),
        "threshold": 0.2,
        "device": "cpu",
        "search": None,
    }
    stated = ScanOptions(train_batch_size=32, paths="train", device=Device.cpu, search=False)
    kwargs = stated.kwargs()
    assert kwargs["paths"] == ("train",) and kwargs["threshold"] == pytest.approx(0.1)
    assert kwargs["train_batch_size"] == 32 and kwargs["train_group_by"] is None
    assert options.with_batch_size(1) == dataclasses.replace(options, batch_size=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 1  # type: ignore[misc]


def test_fix_names_are_the_fix_vocabulary():
    from normdoctor.convert import AUTO, TARGETS

    assert next(iter(Fix)).value == AUTO
    assert {f.value for f in Fix} == {AUTO, *TARGETS}

"""The ``normdoctor`` command, run through its real entry point on the sample models."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import normdoctor as nd
from normdoctor.cli import main

ROOT = Path(__file__).resolve().parents[1]
SM = ROOT / "sample_models"
ARCH = "sample_models.archs:DigitsCNN"
DATA = str(SM / "data" / "test.npz")


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # --arch sample_models.archs:... imports from the working directory
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_layers_lists_norm_layers_and_findings(capsys):
    code, out, _ = run(capsys, "layers", SM / "healthy.pt", "--arch", ARCH)
    assert code == 0
    for name in ("norm1", "norm2", "norm3"):
        assert name in out
    assert "3 normalization layers, 3 batch-dependent" in out


def test_piped_output_does_not_hard_wrap_long_lines(capsys, tmp_path):
    # CI clones into deep paths; a headline wrapped at 80 columns breaks grep.
    deep = tmp_path / ("a-rather-long-folder-name-" * 4)
    deep.mkdir()
    model = deep / "healthy.pt"
    model.write_bytes((SM / "healthy.pt").read_bytes())
    code, out, _ = run(capsys, "layers", model, "--arch", ARCH)
    assert code == 0
    headline = out.splitlines()[0]
    assert len(headline) > 80
    assert headline == f"{model}: 3 normalization layers, 3 batch-dependent"


def test_layers_without_arch_checks_the_state_dict(capsys, tmp_path):
    state = torch.load(SM / "healthy.pt", weights_only=True)
    state["norm2.running_var"][3] = -1.0
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    code, out, _ = run(capsys, "layers", bad, "--json", tmp_path / "l.json")
    assert code == 1  # an error-level finding
    assert "norm2" in out and "ERROR" in out
    payload = json.loads((tmp_path / "l.json").read_text())
    assert any(f["layer"] == "norm2" and f["severity"] == "error" for f in payload["findings"])
    assert run(capsys, "layers", bad, "--exit-zero")[0] == 0


def _api_report(name: str, **kwargs) -> nd.ScanReport:
    from sample_models.archs import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(torch.load(SM / f"{name}.pt", weights_only=True))
    data = np.load(DATA)
    return nd.scan(
        model.eval(),
        (torch.from_numpy(data["inputs"]), torch.from_numpy(data["labels"])),
        model_name=f"{name}.pt",
        **kwargs,
    )


def test_scan_json_equals_the_api_report(capsys, tmp_path):
    out_json = tmp_path / "scan.json"
    code, out, _ = run(
        capsys,
        "scan",
        SM / "tiny-batch.pt",
        "--arch",
        ARCH,
        "--data",
        DATA,
        "--batch-size",
        "1",
        "--json",
        out_json,
    )
    assert code == 1
    report = nd.ScanReport.from_json(out_json.read_text())
    assert report == _api_report("tiny-batch", batch_size=1, search=True)
    assert "batches of 1" in out  # the composition is stated
    assert "instance" in out


def test_exit_codes_healthy_pathological_and_exit_zero(capsys):
    assert (
        run(capsys, "scan", SM / "healthy.pt", "--arch", ARCH, "--data", DATA, "-b", "64")[0] == 0
    )
    args = ["scan", SM / "stale.pt", "--arch", ARCH, "--data", DATA, "-b", "64"]
    assert run(capsys, *args)[0] == 1
    assert run(capsys, *args, "--exit-zero")[0] == 0


def test_batch_sizes_sweep(capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "scan",
        SM / "tiny-batch.pt",
        "--arch",
        ARCH,
        "--data",
        DATA,
        "--batch-sizes",
        "1,8,64",
        "--json",
        tmp_path / "s.json",
        "-q",
    )
    assert code == 1
    assert "bs 1" in out and "bs 64" in out
    payload = json.loads((tmp_path / "s.json").read_text())
    assert payload["kind"] == "sweep" and payload["batch_sizes"] == [1, 8, 64]
    reports = [nd.ScanReport.from_dict(r) for r in payload["reports"]]
    drift = [r.layer("norm3").drift for r in reports]
    assert drift[0] > drift[1] > drift[2]  # drift grows as batches shrink


def test_group_by_label_and_no_shuffle_are_stated(capsys, tmp_path):
    from sample_models.archs import DigitsCNN  # noqa: F401  (importable from the repo root)

    code, out, _ = run(
        capsys,
        "scan",
        SM / "non-iid.pt",
        "--arch",
        ARCH,
        "--data",
        DATA,
        "-b",
        "64",
        "--no-shuffle",
        "--group-by-label",
        "--no-search",
        "--json",
        tmp_path / "n.json",
    )
    assert code == 1
    # the composition says it: one label per batch (issue 15 words it by the batches' real
    # sizes, "31-45 samples per batch, one label each"), in data order
    assert re.search(r"each from one label|one label each", out) and "in data order" in out
    report = nd.ScanReport.from_json((tmp_path / "n.json").read_text())
    assert report.composition.group_by == "label" and report.composition.order == "keep"


def test_table_fits_80_columns_and_reads_without_colour(capsys):
    _, out, _ = run(capsys, "scan", SM / "tiny-batch.pt", "--arch", ARCH, "--data", DATA, "-b", "1")
    table = [line for line in out.splitlines() if re.match(r"\s*\d+\s+norm\d", line)]
    header = [line for line in out.splitlines() if re.match(r"\s*#\s+layer", line)]
    assert len(table) == 3 and len(header) == 1
    assert all(len(line.rstrip()) <= 80 for line in table + header)
    assert all("flagged" in line for line in table)  # the word, not only a colour
    assert "\x1b[" not in out


def _bad_inputs(tmp_path: Path) -> dict[str, list[str]]:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((SM / "healthy.pt").read_bytes()[:5000])
    text = tmp_path / "notes.pt"
    text.write_text("this is not a checkpoint\n")
    other = tmp_path / "mlp.pt"
    other.write_bytes((SM / "mlp-healthy.pt").read_bytes())
    empty_dir = tmp_path / "images"
    empty_dir.mkdir()
    wrong_shape = tmp_path / "wrong.npz"
    np.savez(wrong_shape, inputs=np.zeros((4, 3, 8, 8), np.float32))
    scan = ["scan", "--data", DATA]
    return {
        "missing file": [*scan, str(tmp_path / "nope.pt"), "--arch", ARCH],
        "empty file": [*scan, str(empty), "--arch", ARCH],
        "truncated checkpoint": [*scan, str(truncated), "--arch", ARCH],
        "text file renamed .pt": [*scan, str(text), "--arch", ARCH],
        "arch does not import": [*scan, str(SM / "healthy.pt"), "--arch", "no_such_pkg.mod:Net"],
        "state_dict of another architecture": [*scan, str(other), "--arch", ARCH],
        "data shape does not fit": [
            "scan",
            str(SM / "healthy.pt"),
            "--arch",
            ARCH,
            "--data",
            str(wrong_shape),
        ],
        "empty data folder": [
            "scan",
            str(SM / "healthy.pt"),
            "--arch",
            ARCH,
            "--data",
            str(empty_dir),
        ],
        "missing data": [
            "scan",
            str(SM / "healthy.pt"),
            "--arch",
            ARCH,
            "--data",
            str(tmp_path / "x.npz"),
        ],
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "empty file",
        "truncated checkpoint",
        "text file renamed .pt",
        "arch does not import",
        "state_dict of another architecture",
        "data shape does not fit",
        "empty data folder",
        "missing data",
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, case):
    args = _bad_inputs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _out, err = run(capsys, *args)
    assert code == 2, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normdoctor: error: "), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "scan", SM / "healthy.pt", "--batch-size", "0", "--data", DATA)[0] == 2
    assert run(capsys, "scan", SM / "healthy.pt", "--arch", ARCH)[0] == 2  # --data missing
    assert run(capsys, "frobnicate")[0] == 2


def test_json_never_overwrites_the_input(capsys, tmp_path):
    model = tmp_path / "m.pt"
    model.write_bytes((SM / "healthy.pt").read_bytes())
    code, _, err = run(capsys, "scan", model, "--arch", ARCH, "--data", DATA, "--json", model)
    assert code == 2 and "overwrite" in err
    assert model.read_bytes() == (SM / "healthy.pt").read_bytes()


@pytest.mark.slow
def test_readme_main_job_is_what_this_test_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    main_job = next(b for b in blocks if "normdoctor scan" in b)
    install, _, command = main_job.partition("&&")
    assert install.strip() == "pip install -e ."
    argv = shlex.split(command)
    assert argv[0] == "normdoctor"
    # the installed console script when present, else the same entry point through -m
    exe = [str(Path(sys.executable).with_name("normdoctor"))]
    if not Path(exe[0]).exists():
        exe = [sys.executable, "-m", "normdoctor"]
    proc = subprocess.run(
        exe + argv[1:],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "100"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # the console wraps long lines
    assert "recommended fix: instance" in text
    assert "97.8% with batch statistics, 36.9% in eval mode" in text  # MANIFEST's truths


@pytest.mark.slow
def test_python_dash_m_is_the_same_command():
    proc = subprocess.run(
        [sys.executable, "-m", "normdoctor", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert "Exit codes" in proc.stdout and "scan" in proc.stdout
    for sub in ("layers", "scan", "patch", "report"):
        sub_help = subprocess.run(
            [sys.executable, "-m", "normdoctor", sub, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "Example" in sub_help.stdout, sub


@pytest.mark.slow
def test_checkpoint_series_shows_when_drift_appeared(capsys, tmp_path):
    """Checkpoints of a short training run; the last phase fine-tunes with frozen running stats."""
    from _models import digits

    from sample_models.archs import DigitsCNN

    torch.manual_seed(0)
    x, y, _, _ = digits()
    data = tmp_path / "val.npz"
    np.savez(data, inputs=digits()[2].numpy(), labels=digits()[3].numpy())
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    paths = []
    for epoch in range(7):
        if epoch == 6:  # fine-tuning with BN momentum 0: weights move, running stats go stale
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = 0.0
            opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        paths.append(tmp_path / f"epoch{epoch}.pt")
        torch.save(model.state_dict(), paths[-1])
    code, out, _ = run(
        capsys,
        "scan",
        *paths[4:],
        "--arch",
        ARCH,
        "--data",
        data,
        "-b",
        "64",
        "--json",
        tmp_path / "series.json",
        "--exit-zero",
    )
    assert code == 0
    payload = json.loads((tmp_path / "series.json").read_text())
    assert payload["kind"] == "series" and len(payload["reports"]) == 3
    reports = [nd.ScanReport.from_dict(r) for r in payload["reports"]]
    assert [r.model for r in reports] == ["epoch4.pt", "epoch5.pt", "epoch6.pt"]
    assert not reports[0].flagged and not reports[1].flagged
    assert reports[2].flagged
    assert "eval mode first harmful at epoch6.pt" in " ".join(out.split())
    # ...and the report of the series shows the figure over checkpoints
    code, _, err = run(capsys, "report", tmp_path / "series.json", "-o", tmp_path / "rep", "-q")
    assert code == 0, err
    assert (tmp_path / "rep" / "series.png").exists()
    assert "epoch6.pt" in (tmp_path / "rep" / "index.html").read_text()


@pytest.mark.slow
def test_report_from_a_model_and_from_saved_json(capsys, tmp_path):
    scan_json = tmp_path / "scan.json"
    run(
        capsys,
        "scan",
        SM / "stale.pt",
        "--arch",
        ARCH,
        "--data",
        DATA,
        "-b",
        "64",
        "--json",
        scan_json,
        "-q",
    )
    code, out, err = run(capsys, "report", scan_json, "-o", tmp_path / "from-json")
    assert code == 0, err
    assert out.startswith("harmful")  # the verdict, on stdout
    page = (tmp_path / "from-json" / "index.html").read_text()
    assert "recalibrate" in page and "norm3" in page
    code, _, err = run(
        capsys,
        "report",
        SM / "tiny-batch.pt",
        "--arch",
        ARCH,
        "--data",
        DATA,
        "--batch-sizes",
        "1,64",
        "-o",
        tmp_path / "sweep",
        "-q",
    )
    assert code == 0, err
    assert (tmp_path / "sweep" / "sweep.png").exists()
    # an existing report is not overwritten without --force
    code, _, err = run(capsys, "report", scan_json, "-o", tmp_path / "from-json")
    assert code == 2 and "--force" in err
    assert run(capsys, "report", scan_json, "-o", tmp_path / "from-json", "--force")[0] == 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    code, _, err = run(capsys, "report", bad, "-o", tmp_path / "x")
    assert code == 2 and "not a normdoctor scan JSON" in err


@pytest.mark.slow
def test_patch_writes_a_verified_model_that_loads_back(capsys, tmp_path):
    out = tmp_path / "fixed.pt"
    code, stdout, err = run(
        capsys,
        "patch",
        SM / "stale.pt",
        "--arch",
        ARCH,
        "--data",
        DATA,
        "-b",
        "64",
        "-o",
        out,
        "--json",
        tmp_path / "p.json",
    )
    assert code == 0, err
    text = " ".join(stdout.split())
    assert "eval-mode accuracy: 57.5% before, 97.5% after" in text  # MANIFEST: 57.5 -> 97.5
    payload = json.loads((tmp_path / "p.json").read_text())
    before = nd.ScanReport.from_dict(payload["before"])
    after = nd.ScanReport.from_dict(payload["after"])
    assert before.flagged and not after.flagged
    # the written file loads back through the loader and scans like `after`
    code, _, _ = run(
        capsys,
        "scan",
        out,
        "--arch",
        ARCH,
        "--data",
        DATA,
        "-b",
        "64",
        "--json",
        tmp_path / "again.json",
    )
    assert code == 0
    again = nd.ScanReport.from_json((tmp_path / "again.json").read_text())
    assert [l.drift for l in again.layers] == pytest.approx(
        [l.drift for l in after.layers], rel=1e-9
    )


@pytest.mark.slow
def test_patch_instance_for_torch_and_onnx_and_never_over_the_input(capsys, tmp_path):
    code, stdout, err = run(
        capsys,
        "patch",
        SM / "tiny-batch.pt",
        "--arch",
        ARCH,
        "--data",
        DATA,
        "-b",
        "1",
        "--to",
        "instance",
        "-o",
        tmp_path / "t.pt",
    )
    assert code == 0, err
    assert "36.9% before, 97.8% after" in " ".join(stdout.split())
    code, _, err = run(
        capsys,
        "patch",
        SM / "tiny-batch.onnx",
        "--data",
        DATA,
        "-b",
        "1",
        "--to",
        "instance",
        "-o",
        tmp_path / "t.onnx",
    )
    assert code == 0, err
    from normdoctor.sources.onnx import OnnxModel

    kinds = {layer.kind for layer in OnnxModel.load(tmp_path / "t.onnx").find_norm_layers()}
    assert kinds == {"InstanceNormalization"}
    copy = tmp_path / "m.pt"
    copy.write_bytes((SM / "stale.pt").read_bytes())
    code, _, err = run(capsys, "patch", copy, "--arch", ARCH, "--data", DATA, "-o", copy)
    assert code == 2 and "overwrite" in err
    assert copy.read_bytes() == (SM / "stale.pt").read_bytes()

"""Machine output through the real entry point: ``--json -`` and every ``--format``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from normdoctor.cli import main

ROOT = Path(__file__).resolve().parents[1]
SM = ROOT / "sample_models"
ARCH = "sample_models.archs:DigitsCNN"
DATA = str(SM / "data" / "test.npz")
# a quick healthy scan, and the tiny-batch model at training's batch size (harmful)
HEALTHY = ["scan", str(SM / "healthy.pt"), "--arch", ARCH, "--data", DATA, "-b", "32"]
HEALTHY += ["--no-search", "--max-batches", "4"]
TINY = ["scan", str(SM / "tiny-batch.pt"), "--arch", ARCH, "--data", DATA]
TINY += ["--train-batch-size", "1", "--max-batches", "100"]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_scan_json_dash_stdout_is_only_the_json(capsys, tmp_path):
    code, out, _ = run(capsys, *HEALTHY, "--json", "-")
    assert code == 0
    payload = json.loads(out)  # the whole of stdout
    assert payload["status"] == "ok" and payload["schema_version"] == 1
    # the same JSON as --json FILE
    code, _, _ = run(capsys, *HEALTHY, "--json", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == payload


def test_format_json_equals_json_dash_and_writes_a_file_beside(capsys, tmp_path):
    code, out, _ = run(capsys, *HEALTHY, "--format", "json", "--json", tmp_path / "s.json")
    assert code == 0
    assert json.loads(out) == json.loads((tmp_path / "s.json").read_text())
    code, both, _ = run(capsys, *HEALTHY, "--format", "json", "--json", "-")
    assert json.loads(both) == json.loads(out)  # once, not twice


def test_layers_json_dash_and_format_json(capsys):
    for extra in (["--json", "-"], ["--format", "json"]):
        code, out, _ = run(capsys, "layers", SM / "healthy.pt", "--arch", ARCH, *extra)
        assert code == 0
        payload = json.loads(out)
        assert [layer["name"] for layer in payload["layers"]] == ["norm1", "norm2", "norm3"]


def test_sweep_json_dash_is_only_json(capsys):
    sweep = ["scan", SM / "healthy.pt", "--arch", ARCH, "--data", DATA, "--batch-sizes", "8,32"]
    code, out, _ = run(capsys, *sweep, "--max-batches", "2", "--json", "-")
    assert code == 0
    assert json.loads(out)["kind"] == "sweep"


def test_format_markdown_has_verdict_evidence_and_a_table(capsys):
    code, out, _ = run(capsys, *TINY, "--format", "markdown")
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == "### normdoctor: `tiny-batch.pt`"
    assert any(line.startswith("**✗ harmful**: eval mode is worse") for line in lines)
    assert any(line.startswith("- end to end (train vs eval path): ") for line in lines)
    header = "| # | layer | kind | ch | drift | shift | noise | non-i.i.d. | status | fix |"
    at = lines.index(header)
    assert lines[at + 1].startswith("|--:|")
    rows = lines[at + 2 : at + 5]
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 2", "| 3"]  # 1-based
    assert all("`norm" in row and "✗ flagged" in row and "instance" in row for row in rows)
    fence = lines.index("```sh")
    assert lines[fence + 1].startswith("normdoctor patch ") and lines[fence + 2] == "```"
    assert not any(line != line.rstrip() for line in lines)


def test_format_github_one_annotation_per_flagged_layer_and_the_verdict(capsys):
    code, out, _ = run(capsys, *TINY, "--format", "github")
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 4 and all(line.startswith("::error title=normdoctor::") for line in lines)
    for i, name in enumerate(("norm1", "norm2", "norm3"), start=1):
        assert f"layer {i} {name} (BatchNorm2d) drifts " in lines[i - 1]
    assert "harmful: eval mode is worse" in lines[3]
    assert "%25" in lines[3] and "%" not in lines[3].replace("%25", "")  # escaped


def test_format_github_of_a_healthy_model_is_one_notice(capsys):
    code, out, _ = run(capsys, *HEALTHY, "--format", "github")
    assert code == 0
    assert out.splitlines() == [out.strip()] and out.startswith("::notice title=normdoctor::")


def test_formats_that_both_want_stdout_are_a_usage_error(capsys):
    code, out, err = run(capsys, *HEALTHY, "--format", "markdown", "--json", "-")
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith("normdoctor: error: ")
    assert "both write stdout" in err and "internal" not in err
    code, _, err = run(capsys, "layers", SM / "healthy.pt", "--format", "github")
    assert code == 2 and "normdoctor: error: " in err


@pytest.mark.slow
def test_patch_format_json_and_markdown(capsys, tmp_path):
    patch = ["patch", SM / "tiny-batch.pt", "--arch", ARCH, "--data", DATA]
    patch += ["--train-batch-size", "1", "--max-batches", "100", "-q"]
    code, out, err = run(capsys, *patch, "-o", tmp_path / "a.pt", "--format", "json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["kind"] == "patch"
    assert payload["before"]["status"] == "harmful" and payload["after"]["status"] == "ok"
    code, out, _ = run(capsys, *patch, "-o", tmp_path / "b.pt", "--format", "markdown")
    assert code == 0
    assert out.startswith("### normdoctor patch: `tiny-batch.pt`")
    assert "| 1 | `norm1` | instance |" in out and "eval-mode accuracy: " in out
    # the patch JSON alone is a before/after pair for diff
    (tmp_path / "p.json").write_text(json.dumps(payload))
    code, out, _ = run(capsys, "diff", tmp_path / "p.json", "--format", "json")
    assert code == 0
    d = json.loads(out)
    assert d["before"]["status"] == "harmful" and d["after"]["status"] == "ok" and not d["worse"]

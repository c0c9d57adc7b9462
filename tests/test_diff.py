"""``normdoctor diff`` on a real before/after pair, and the fix hint that produced the after.

The pair: the tiny-batch model scanned at training's batch size (harmful), the printed fix hint
run as printed (``patch --to auto``), and the patched model scanned the same way.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import json
import shlex
from pathlib import Path

import pytest

from normdoctor.cli import main

ROOT = Path(__file__).resolve().parents[1]
SM = ROOT / "sample_models"
ARCH = "sample_models.archs:DigitsCNN"
DATA = "sample_models/data/test.npz"


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(folder, the hint, the patch's stdout and stderr): a.json before, b.json after."""
    folder = tmp_path_factory.mktemp("pair")
    mp = pytest.MonkeyPatch()
    mp.chdir(folder)  # the hint writes its model into the working directory
    mp.setenv("COLUMNS", "80")
    mp.setenv("NO_COLOR", "1")
    mp.syspath_prepend(str(ROOT))  # --arch sample_models.archs:... imports from the repo
    (folder / "sample_models").symlink_to(SM)

    def run(*args):  # capsys is function-scoped: this fixture captures for itself
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
        return code, out.getvalue(), err.getvalue()

    scan = ["scan", "sample_models/tiny-batch.pt", "--arch", ARCH, "--data", DATA]
    scan += ["--train-batch-size", "1"]
    code, out, err = run(*scan, "--json", "a.json")
    assert code == 1, err
    hints = [line for line in out.splitlines() if line.lstrip().startswith("fix: ")]
    assert len(hints) == 1, out
    hint = hints[0].split("fix: ", 1)[1].split("  (then scan", 1)[0]
    argv = shlex.split(hint)
    assert argv[:2] == ["normdoctor", "patch"]
    pcode, pout, perr = run(*argv[1:])  # as printed
    assert pcode == 0, perr
    patched = argv[argv.index("-o") + 1]
    code, _, err = run(
        "scan",
        patched,
        "--arch",
        ARCH,
        "--data",
        DATA,
        "--train-batch-size",
        "1",
        "--json",
        "b.json",
    )
    assert code == 0, err
    yield folder, hint, pout, perr
    mp.undo()


@pytest.mark.slow
def test_the_fix_hint_is_the_users_command_and_runs_as_printed(pair):
    folder, hint, out, err = pair
    assert hint == (
        "normdoctor patch sample_models/tiny-batch.pt --arch sample_models.archs:DigitsCNN "
        "--data sample_models/data/test.npz --train-batch-size 1 -o tiny-batch-patched.pt"
    )
    assert (folder / "tiny-batch-patched.pt").is_file()
    # the verification of the written model: eval-mode accuracy before -> after, improved
    verified = [line for line in err.splitlines() if line.startswith("verified: ")]
    assert len(verified) == 1, err
    before, after = (
        float(x.rstrip("%"))
        for x in verified[0].split("accuracy ")[1].split(" on ")[0].split(" -> ")
    )
    assert after > before + 50  # 36.9% -> 97.8% on the sample data
    assert "eval-mode accuracy: " in out


@pytest.mark.slow
def test_diff_before_after_is_not_worse_and_after_before_is(pair, capsys, monkeypatch):
    folder, *_ = pair
    monkeypatch.chdir(folder)
    code, out, _ = _run(capsys, "diff", "a.json", "b.json")
    assert code == 0
    assert "eval-mode accuracy: 36.9% -> 97.8% (+60.8 points)" in out
    assert "not worse" in out
    code, out, _ = _run(capsys, "diff", "b.json", "a.json")
    assert code == 1
    assert "worse: verdict ok -> harmful" in out
    assert "worse: newly flagged: norm1, norm2, norm3" in out
    assert not [line for line in out.splitlines() if line != line.rstrip()]


@pytest.mark.slow
def test_diff_json_and_markdown(pair, capsys, monkeypatch):
    folder, *_ = pair
    monkeypatch.chdir(folder)
    code, out, _ = _run(capsys, "diff", "a.json", "b.json", "--format", "json")
    assert code == 0
    d = json.loads(out)
    assert d["kind"] == "diff" and d["worse"] is False and d["verdict_changed"] is True
    assert (d["before"]["status"], d["after"]["status"]) == ("harmful", "ok")
    layers = {layer["name"]: layer for layer in d["layers"]}
    assert layers["norm3"]["status_before"] == "flagged"
    assert layers["norm3"]["kind_after"] == "InstanceNormFromBN2d"
    acc = next(m for m in d["end_to_end"] if m["key"] == "acc_eval")
    assert acc["after"] > acc["before"]
    code, out, _ = _run(capsys, "diff", "a.json", "b.json", "--format", "markdown")
    assert code == 0
    assert "**harmful → ok** (not worse)" in out
    assert "| 1 | `norm1` | 0.141 | - | flagged | not-measured |" in out


@pytest.mark.slow
def test_diff_tolerance_gates_an_accuracy_drop(pair, capsys, monkeypatch):
    folder, *_ = pair
    monkeypatch.chdir(folder)
    b = json.loads((folder / "b.json").read_text())
    for drop, tolerance, expected in ((0.005, None, 0), (0.02, None, 1), (0.02, "0.05", 0)):
        c = copy.deepcopy(b)
        c["end_to_end"]["acc_eval"] -= drop
        (folder / "c.json").write_text(json.dumps(c))
        extra = [] if tolerance is None else ["--tolerance", tolerance]
        code, out, _ = _run(capsys, "diff", "b.json", "c.json", *extra)
        assert code == expected, (drop, tolerance, out)
        if expected:
            assert "worse: eval-mode accuracy 97.8% -> 95.8%" in out


@pytest.mark.slow
def test_diff_of_unreadable_or_mismatched_files_is_one_line_and_exit_2(pair, capsys, monkeypatch):
    folder, *_ = pair
    monkeypatch.chdir(folder)
    other = json.loads((folder / "a.json").read_text())
    for layer in other["layers"]:
        layer["name"] = "other." + layer["name"]
    (folder / "other.json").write_text(json.dumps(other))
    (folder / "text.json").write_text("not json\n")
    cases = {
        "mismatched": ["a.json", "other.json"],
        "missing": ["a.json", "nope.json"],
        "not json": ["a.json", "text.json"],
        "one scan alone": ["a.json"],
    }
    for case, args in cases.items():
        code, out, err = _run(capsys, "diff", *args)
        assert code == 2, (case, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("normdoctor: error: "), (case, err)
        assert "internal" not in err and out == ""
    code, _, err = _run(capsys, "diff", "a.json", "b.json", "--tolerance", "-1")
    assert code == 2 and "Usage: normdoctor diff" in err


def test_diff_module_is_data_only():
    """Layer 1: normdoctor.diff imports only report, metrics and errors."""
    tree = ast.parse((ROOT / "normdoctor" / "diff.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.ImportFrom) and node.level) or (
            isinstance(node, ast.ImportFrom) and (node.module or "").startswith("normdoctor")
        ):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("normdoctor") for a in node.names)
    assert imported <= {"report", "metrics", "errors"}

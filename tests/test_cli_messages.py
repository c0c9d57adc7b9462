"""What the command line says: usage errors, the one error prefix, warnings, help texts, and
the fix hint's command (``fix_command``)."""

from __future__ import annotations

import hashlib
import html
import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from normdoctor.cli import app, main
from normdoctor.cli.invocation import fix_command, patched_path

ROOT = Path(__file__).resolve().parents[1]
SM = ROOT / "sample_models"
ARCH = "sample_models.archs:DigitsCNN"
DATA = str(SM / "data" / "test.npz")

USAGE_ERRORS = {
    "missing --data": (["scan", str(SM / "healthy.pt"), "--arch", ARCH], "Missing option '--data'"),
    "unknown option": (["scan", str(SM / "healthy.pt"), "--data", DATA, "--frob"], "--frob"),
    "bad value": (["scan", str(SM / "healthy.pt"), "--data", DATA, "-b", "0"], "--batch-size"),
    "bad choice": (["scan", str(SM / "healthy.pt"), "--data", DATA, "--format", "xml"], "xml"),
    "bad JSON value": (
        ["scan", str(SM / "healthy.pt"), "--arch", ARCH, "--data", DATA, "--arch-kwargs", "[1"],
        "--arch-kwargs",
    ),
    "unknown command": (["frobnicate"], "frobnicate"),
}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("NO_COLOR", "1")


def _check_usage_error(code: int, out: str, err: str, needle: str) -> None:
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith("Usage: normdoctor")  # click's usage line
    assert lines[-1].startswith("normdoctor: error: ") and needle in lines[-1], err
    assert "internal" not in err and "Traceback" not in err and "\nError:" not in err


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_exit_2_with_the_usage_line_and_one_prefix(capsys, case):
    args, needle = USAGE_ERRORS[case]
    code = main(args)
    out, err = capsys.readouterr()
    _check_usage_error(code, out, err, needle)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_through_a_subprocess(case):
    args, needle = USAGE_ERRORS[case]
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "normdoctor", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    _check_usage_error(proc.returncode, proc.stdout, proc.stderr, needle)


def test_random_data_warning_is_one_line_without_a_source_path(capsys):
    code = main(["scan", str(SM / "healthy.pt"), "--arch", ARCH, "--data", "random:16,1,8,8"])
    _, err = capsys.readouterr()
    assert code in (0, 1)
    warned = [line for line in err.splitlines() if "random inputs" in line]
    assert len(warned) == 1
    assert warned[0].startswith("normdoctor: warning: random inputs of shape (16, 1, 8, 8)")
    assert ".py" not in err and "UserWarning" not in err and "RandomDataWarning" not in err


@pytest.mark.slow
def test_random_data_warning_through_a_subprocess():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "normdoctor",
            "scan",
            str(SM / "healthy.pt"),
            "--arch",
            ARCH,
            "--data",
            "random:16,1,8,8",
            "-q",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normdoctor: warning: random inputs")


def test_every_option_of_every_command_has_help_text():
    group = typer.main.get_command(app)
    for name in group.list_commands(None):
        command = group.get_command(None, name)
        for param in command.params:
            assert getattr(param, "help", None), (name, param.name)


@pytest.mark.parametrize("command", ["scan", "patch", "report", "layers", "diff"])
def test_help_lists_a_help_text_for_every_option(capsys, command):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    options = out.split("\nOptions:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    entries = [line for line in options if line.startswith("  -")]
    group = typer.main.get_command(app).get_command(None, command)
    declared = [p for p in group.params if p.param_type_name == "option"]
    assert len(entries) == len(declared) + 1  # and -h/--help
    for entry in entries:  # a help text on the option's line (or, for a long one, the next)
        text = entry.split("  ", 2)[-1].strip() if re.search(r"\S  +\S", entry) else ""
        following = (
            options[options.index(entry) + 1] if options.index(entry) + 1 < len(options) else ""
        )
        assert text or following.startswith(" " * 20), entry
    usage = out.splitlines()[0]
    assert "{" not in usage and "<list" not in out  # MODEL..., not {models}... or list[Path]


@pytest.mark.parametrize("command", ["scan", "patch", "report", "layers", "diff"])
def test_help_examples_do_not_break_inside_a_flag(capsys, command):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    examples = out.split("Example", 1)[1].splitlines()[1:]
    for line in examples:
        if line.strip():
            assert len(line) <= 80, line
            assert not re.search(r"--?[a-z]+-$", line.rstrip(" \\")), line  # not "--batch-"
            assert line.startswith("    normdoctor ") or line.startswith("        "), line


def _root():
    return typer.main.get_command(app)


def test_fix_command_keeps_the_model_and_its_batches_and_drops_output_options():
    argv = ["--debug", "scan", "runs/my model.pt", "--arch", "pkg.mod:Net", "--arch-kwargs"]
    argv += ['{"width": 32}', "-d", "val.npz", "-b1", "--train-batch-size=1"]
    argv += ["--group-by-label", "--train-group-by-label", "--threshold", "0.2", "--trust-pickle"]
    argv += ["--json", "s.json", "--format", "markdown", "--device", "cpu", "-q", "--exit-zero"]
    argv += ["--paths", "eval", "--no-shuffle", "--seed", "3", "--normalize", "imagenet"]
    command = fix_command(argv, _root())
    assert shlex.split(command) == [
        "normdoctor",
        "--debug",
        "patch",
        "runs/my model.pt",
        "--arch",
        "pkg.mod:Net",
        "--arch-kwargs",
        '{"width": 32}',
        "-d",
        "val.npz",
        "-b1",
        "--train-batch-size=1",
        "--group-by-label",
        "--train-group-by-label",
        "--threshold",
        "0.2",
        "--trust-pickle",
        "-q",
        "--no-shuffle",
        "--seed",
        "3",
        "--normalize",
        "imagenet",
        "-o",
        "my model-patched.pt",
    ]
    assert "'runs/my model.pt'" in command  # quoted for the shell


def test_fix_command_of_an_onnx_model_writes_onnx():
    command = fix_command(["scan", "m.onnx", "--data", "x.npz"], _root())
    assert command == "normdoctor patch m.onnx --data x.npz -o m-patched.onnx"
    assert patched_path("hf-model/") == "hf-model-patched.pt"


@pytest.mark.slow
def test_patch_report_records_the_command_and_the_files_sha256(capsys, tmp_path):
    args = ["patch", str(SM / "tiny-batch.pt"), "--arch", ARCH, "--data", DATA]
    args += ["--train-batch-size", "1", "--max-batches", "60", "-q"]
    args += ["-o", str(tmp_path / "fixed.pt"), "--report", str(tmp_path / "rep")]
    assert main(args) == 0, capsys.readouterr().err
    page = (tmp_path / "rep" / "index.html").read_text()
    assert html.escape(shlex.join(["normdoctor", *args]), quote=False) in page
    for path in (SM / "tiny-batch.pt", Path(DATA)):
        assert hashlib.sha256(path.read_bytes()).hexdigest() in page


@pytest.mark.slow
def test_patch_shows_progress_on_a_terminal_and_not_in_a_pipe(tmp_path):
    args = [sys.executable, "-m", "normdoctor", "patch", str(SM / "tiny-batch.pt"), "--arch"]
    args += [ARCH, "--data", DATA, "--train-batch-size", "1", "--max-batches", "40"]
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*args, "-o", str(tmp_path / "a.pt")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**os.environ, "COLUMNS": "100"},
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=300) == 0
    os.close(master)
    text = seen.decode("utf-8", "replace")
    assert re.search(r"tiny-batch\.pt .*\d+/40", text), text[-2000:]  # a bar over 40 batches
    piped = subprocess.run(
        [*args, "-o", str(tmp_path / "b.pt")], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert piped.returncode == 0 and "/40" not in piped.stderr  # no bar in a pipe

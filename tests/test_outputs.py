"""Nothing the user has is lost or replaced: one test per output-safety rule, through the CLI.

The rules live in :mod:`normdoctor.outputs`; every command declares its outputs, checks them
before any work and writes them together at the end.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from normdoctor import outputs
from normdoctor.cli import main
from normdoctor.outputs import OutputError, Outputs, spec_files, write_atomic

ROOT = Path(__file__).resolve().parents[1]
SM = ROOT / "sample_models"
MODEL = SM / "healthy.pt"
STALE = SM / "stale.pt"  # drifts: patch fixes and writes it (healthy.pt: "nothing to fix")
ARCH = "sample_models.archs:DigitsCNN"
DATA = SM / "data" / "test.npz"
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


def layers_json(target: object) -> list[object]:
    return ["layers", MODEL, "--arch", ARCH, "--json", target]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.fixture(scope="module")
def scan_json(tmp_path_factory) -> Path:
    """A scan JSON for ``report`` (rendering is the slow part, not scanning)."""
    path = tmp_path_factory.mktemp("scan") / "scan.json"
    arch = f"{SM / 'archs.py'}:DigitsCNN"  # module scope: not yet in the repository root
    code = main(
        ["scan", str(MODEL), "--arch", arch, "--data", str(DATA), "--json", str(path), *FAST]
    )
    assert code == 0
    return path


# -- an output is never an input -------------------------------------------------------------


def _input_cases(tmp: Path) -> dict[str, tuple[list[object], Path]]:
    """(command, the input file it must leave alone) for every kind of input."""
    model = copy(MODEL, tmp / "m.pt")
    data = copy(DATA, tmp / "d.npz")
    second = copy(MODEL, tmp / "epoch2.pt")
    arch_file = tmp / "arch.py"
    arch_file.write_text((SM / "archs.py").read_text())
    hard = tmp / "hardlink.json"
    os.link(model, hard)
    soft = tmp / "softlink.pt"
    soft.symlink_to(data)
    images = tmp / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"not looked at: refused before loading")
    module = tmp / "mydata.py"
    module.write_text("def make():\n    raise AssertionError('never imported')\n")
    scan = ["scan", model, "--arch", ARCH, *FAST]
    return {
        "model as --json": ([*scan, "--data", data, "--json", model], model),
        "data as --json": ([*scan, "--data", data, "--json", data], data),
        "data as patch -o": (["patch", model, "--arch", ARCH, "--data", data, "-o", data], data),
        "arch module file as layers --json": (
            ["layers", model, "--arch", ARCH, "--json", SM / "archs.py"],
            SM / "archs.py",
        ),
        "arch .py file as layers --json": (
            ["layers", model, "--arch", f"{arch_file}:DigitsCNN", "--json", arch_file],
            arch_file,
        ),
        "series member as --json": (
            ["scan", model, second, "--arch", ARCH, "--data", data, "--json", second],
            second,
        ),
        "hard link to the model": ([*scan, "--data", data, "--json", hard], model),
        "symlink to the data as -o": (
            ["patch", model, "--arch", ARCH, "--data", data, "-o", soft],
            data,
        ),
        "into the image folder": (
            [*scan, "--data", images, "--json", images / "scan.json"],
            images / "a.png",
        ),
        "data module:function file": (
            [*scan, "--data", "mydata:make", "--json", module],
            module,
        ),
        "data file.py:function": ([*scan, "--data", f"{module}:make", "--json", module], module),
        "report folder holding its scan JSON": (
            ["report", tmp / "in" / "scan.json", "-o", tmp / "in", "--force"],
            tmp / "in" / "scan.json",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "model as --json",
        "data as --json",
        "data as patch -o",
        "arch module file as layers --json",
        "arch .py file as layers --json",
        "series member as --json",
        "hard link to the model",
        "symlink to the data as -o",
        "into the image folder",
        "data module:function file",
        "data file.py:function",
        "report folder holding its scan JSON",
    ],
)
def test_an_input_is_never_an_output(capsys, tmp_path, monkeypatch, case):
    monkeypatch.syspath_prepend(str(tmp_path))  # `mydata:make` is found on sys.path
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "scan.json").write_text("{}")
    args, protected = _input_cases(tmp_path)[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    before[protected] = protected.read_bytes()
    code, _, err = run(capsys, *args)
    assert code == 2, err
    assert "refusing" in err and len(err.strip().splitlines()) == 1, err
    after = {p: p.read_bytes() for p in before}
    assert after == before, "nothing touched"
    assert leftovers(tmp_path) == []


def test_spec_files_finds_module_sources_without_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "ndspecpkg"  # a name no other test module or package uses
    (pkg / "nets").mkdir(parents=True)
    for init in (pkg / "__init__.py", pkg / "nets" / "__init__.py"):
        init.write_text("raise AssertionError('imported')\n")
    (pkg / "nets" / "cnn.py").write_text("raise AssertionError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = {p.resolve() for p in spec_files("ndspecpkg.nets.cnn:Net")}
    assert found == {
        (pkg / "__init__.py").resolve(),
        (pkg / "nets" / "__init__.py").resolve(),
        (pkg / "nets" / "cnn.py").resolve(),
    }
    assert "ndspecpkg" not in sys.modules
    assert spec_files("random:4,1,8,8") == [] and spec_files(None) == []
    assert spec_files("path/to/file.py:Net") == [Path("path/to/file.py")]


def test_two_outputs_may_not_be_one(capsys, tmp_path):
    args = ["patch", STALE, "--arch", ARCH, "--data", DATA, *FAST]
    code, _, err = run(capsys, *args, "-o", tmp_path / "x", "--json", tmp_path / "x")
    assert code == 2 and "same output" in err
    rep = tmp_path / "rep"
    code, _, err = run(capsys, *args, "-o", rep / "p.pt", "--report", rep)
    assert code == 2 and "inside the output folder" in err
    assert sorted(os.listdir(tmp_path)) == []


def test_bad_targets_are_refused_before_any_work(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = {
        tmp_path / "afile" / "l.json": "is not a folder",
        tmp_path: "is a folder",
    }
    for target, message in cases.items():
        code, _, err = run(capsys, *layers_json(target))
        assert code == 2 and message in err, err
    code, _, err = run(capsys, "patch", MODEL, "--arch", ARCH, "--data", DATA, "-o", "-", *FAST)
    assert code == 2 and "cannot go to stdout" in err
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_missing_parent_folders_are_made(capsys, tmp_path):
    target = tmp_path / "new" / "deeper" / "l.json"
    assert run(capsys, *layers_json(target))[0] == 0
    assert json.loads(target.read_text())["layers"]


# -- links, devices, FIFOs, stdout -------------------------------------------------------------


def test_a_symlink_is_written_through(capsys, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    target = real / "l.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    code, _, err = run(capsys, *layers_json(link))
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["layers"]
    assert leftovers(tmp_path) == []
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(real / "new.json")
    assert run(capsys, *layers_json(dangling))[0] == 0
    assert dangling.is_symlink() and json.loads((real / "new.json").read_text())["layers"]


def test_a_character_device_is_written_not_replaced(capsys):
    code, _, err = run(capsys, *layers_json("/dev/null"))
    assert code == 0, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_fifo_is_written_directly(capsys, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code, _, err = run(capsys, *layers_json(fifo))
    reader.join(timeout=30)
    assert code == 0, err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert json.loads(received[0])["layers"]


def test_dash_is_stdout(capsys):
    code, out, _ = run(capsys, *layers_json("-"))
    assert code == 0
    assert '"schema_version": 1' in out and out.rstrip().endswith("}")


def test_descriptor_links_are_streams(tmp_path):
    """``/dev/stdout`` redirected to a file: appended to, not replaced (the shell's file stays)."""
    redirected = tmp_path / "out.txt"
    with redirected.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "normdoctor", *map(str, layers_json("/dev/stdout"))],
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    text = redirected.read_text()
    assert text.startswith(f"{MODEL}: 3 normalization layers")  # the table is kept
    assert '"schema_version": 1' in text


# -- a command that fails writes nothing -------------------------------------------------------


def test_a_failing_command_writes_nothing(capsys, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    patched, js = tmp_path / "p.pt", tmp_path / "p.json"
    args = ["patch", STALE, "--arch", ARCH, "--data", DATA, *FAST]
    code, _, err = run(capsys, *args, "-o", patched, "--json", js, "--report", busy)
    assert code == 2 and "not empty" in err
    assert not patched.exists() and not js.exists()
    assert sorted(os.listdir(busy)) == ["notes.txt"]


def test_a_failure_after_the_work_writes_nothing(capsys, tmp_path, monkeypatch):
    from normdoctor.render import html

    def boom(*args, **kwargs):
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(html, "_page", boom)
    patched, js, rep = tmp_path / "sub" / "p.pt", tmp_path / "p.json", tmp_path / "rep"
    args = ["patch", STALE, "--arch", ARCH, "--data", DATA, *FAST]
    code, _, err = run(capsys, *args, "-o", patched, "--json", js, "--report", rep)
    assert code == 2 and "rendering failed" in err
    assert sorted(os.listdir(tmp_path)) == [], "no output, no temporary, no made folder"


def test_patch_writes_every_output_when_all_succeed(capsys, tmp_path):
    patched, js, rep = tmp_path / "p.pt", tmp_path / "p.json", tmp_path / "rep"
    args = ["patch", STALE, "--arch", ARCH, "--data", DATA, *FAST]
    code, _, err = run(capsys, *args, "-o", patched, "--json", js, "--report", rep)
    assert code == 0, err
    assert torch.load(patched, weights_only=True)["state_dict"]
    assert json.loads(js.read_text())["kind"] == "patch"
    assert (rep / "index.html").is_file()
    assert leftovers(tmp_path) == []


# -- report folders: exclusive creation --------------------------------------------------------


def test_two_concurrent_reports_into_one_new_folder(capsys, tmp_path, monkeypatch, scan_json):
    out = tmp_path / "rep"
    both_staged = threading.Barrier(2, timeout=60)
    real = outputs._rename_noreplace

    def rename_after_both_staged(src, dst):
        both_staged.wait()  # both runs checked, rendered and staged: now they race
        real(src, dst)

    monkeypatch.setattr(outputs, "_rename_noreplace", rename_after_both_staged)
    codes: list[int] = []

    def one() -> None:
        codes.append(main(["report", str(scan_json), "-o", str(out), "-q"]))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    _, err = capsys.readouterr()
    assert sorted(codes) == [0, 2], err
    assert "appeared while this command worked" in err
    assert (out / "index.html").is_file()
    assert leftovers(tmp_path) == []


def test_an_existing_empty_folder_needs_force(capsys, tmp_path, scan_json):
    out = tmp_path / "empty"
    out.mkdir()
    code, _, err = run(capsys, "report", scan_json, "-o", out)
    assert code == 2 and "exists (empty)" in err and "--force" in err
    assert os.listdir(out) == []
    assert run(capsys, "report", scan_json, "-o", out, "--force")[0] == 0
    assert (out / "index.html").is_file()


# -- interrupted runs leave no temporary files -------------------------------------------------

_SLOW = textwrap.dedent(
    """
    import os, sys, time
    from normdoctor import outputs
    from normdoctor.render import html

    def announce_and_wait(*args, **kwargs):
        print("STAGING", file=sys.stderr, flush=True)  # a temporary exists now
        time.sleep(60)

    if sys.argv[1] == "report":
        html._render = announce_and_wait
    else:
        outputs.os.fsync = announce_and_wait
    from normdoctor.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("command", ["layers", "report"])
def test_an_interrupted_run_leaves_no_temporary(tmp_path, sig, command, scan_json):
    script = tmp_path / "slow.py"
    script.write_text(_SLOW)
    work = tmp_path / "work"
    work.mkdir()
    if command == "report":
        args = ["report", scan_json, "-o", work / "rep", "-q"]
    else:
        args = layers_json(work / "l.json")
    proc = subprocess.Popen(
        [sys.executable, str(script), *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        seen = ""
        while "STAGING" not in seen:
            line = proc.stderr.readline()
            assert line, seen  # the run ended before staging
            seen += line
        assert leftovers(work), "the temporary exists while the run waits"
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, rest
    assert "normdoctor: interrupted" in rest
    assert os.listdir(work) == [], "no temporary, no output"


def test_signal_handlers_are_restored(capsys):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run(capsys, *layers_json("/dev/null"))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# -- modes follow the umask --------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_follow_the_umask(capsys, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        target = tmp_path / "l.json"
        assert run(capsys, *layers_json(target))[0] == 0
        patched = tmp_path / "p.pt"
        args = ["patch", STALE, "--arch", ARCH, "--data", DATA, "-o", patched, *FAST]
        assert run(capsys, *args)[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert stat.S_IMODE(patched.stat().st_mode) == mode


def test_a_replaced_file_keeps_its_mode(capsys, tmp_path):
    target = tmp_path / "l.json"
    target.write_text("old")
    target.chmod(0o640)
    assert run(capsys, *layers_json(target))[0] == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert json.loads(target.read_text())["layers"]


def test_report_folder_follows_the_umask(capsys, tmp_path, scan_json):
    old = os.umask(0o027)
    try:
        assert run(capsys, "report", scan_json, "-o", tmp_path / "rep")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "rep").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "rep" / "index.html").stat().st_mode) == 0o640


# -- honest errors: a full disk is a sentence --------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EFBIG, "file too large"),
        (errno.EDQUOT, "disk quota exceeded"),
    ],
)
@pytest.mark.parametrize("which", ["--json", "patch -o"])
def test_a_full_disk_is_an_ordinary_error(capsys, tmp_path, monkeypatch, code, reason, which):
    real = os.write
    staged = (".tmp/l.json", ".tmp/p.pt")  # the temporary files of the outputs, nothing else

    def full(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(staged):
            raise OSError(code, os.strerror(code))
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    if which == "--json":
        target = tmp_path / "l.json"
        args = layers_json(target)
    else:
        target = tmp_path / "p.pt"
        args = ["patch", STALE, "--arch", ARCH, "--data", DATA, "-o", target, *FAST]
    rc, _, err = run(capsys, *args)
    assert rc == 2
    assert err.strip() == f"normdoctor: error: cannot write {target}: {reason}"
    assert os.listdir(tmp_path) == []


# -- the module on its own ---------------------------------------------------------------------


def test_write_atomic_refuses_inputs_and_keeps_nothing_on_failure(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("mine")
    with pytest.raises(OutputError, match="refusing to overwrite"):
        write_atomic(source, "x", inputs=[("input", source)])

    def fails(f):
        f.write(b"half")
        raise ValueError("writer failed")

    with pytest.raises(ValueError, match="writer failed"):
        write_atomic(tmp_path / "out.bin", fails)
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]
    assert write_atomic(tmp_path / "out.txt", "text").read_text() == "text"


def test_a_plan_left_without_commit_removes_its_temporaries(tmp_path):
    with Outputs() as plan:
        plan.file(tmp_path / "new" / "a.json")
        plan.folder(tmp_path / "rep")
        plan.check()
        plan.write_text(tmp_path / "new" / "a.json", "{}")
        plan.write_folder(tmp_path / "rep", lambda folder: (folder / "index.html").write_text("x"))
        assert leftovers(tmp_path)
    assert os.listdir(tmp_path) == []


def test_companion_files_are_published_beside_the_target(tmp_path):
    with Outputs() as plan:
        plan.file(tmp_path / "m.onnx")
        plan.check()

        def save(path: Path) -> None:
            path.write_text("graph")
            (path.parent / f"{path.name}.data").write_text("weights")

        plan.write_with(tmp_path / "m.onnx", save)
        plan.commit()
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    protected = tmp_path / "m.onnx.data"
    with Outputs([("input model data", protected)]) as plan, pytest.raises(OutputError):
        plan.file(tmp_path / "m.onnx")
        plan.check()
        plan.write_with(tmp_path / "m.onnx", save)
    assert protected.read_text() == "weights"

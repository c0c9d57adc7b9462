"""Reading saved results never imports torch (issue 16): ``normdoctor report scan.json`` paid
about 2 s of its 5.5 s for an import it does not use.  The names that need torch are loaded on
first use, and stay what they were (``normdoctor.scan`` is the function, not the submodule)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import normdoctor

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numba", "onnx", "onnxruntime")

#: Run in a fresh interpreter: refuses (and records) every import of the heavy packages.
BLOCKER = textwrap.dedent(
    f"""
    import sys
    wanted = []

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {HEAVY!r}:
                wanted.append(name)
                raise ImportError(f"blocked by the test: {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_report_from_scan_json_imports_no_torch(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_render import large_report
    finally:
        sys.path.remove(str(Path(__file__).parent))
    report = large_report(n=30)
    scan_json = tmp_path / "scan.json"
    scan_json.write_text(report.to_json(), encoding="utf-8")
    out = tmp_path / "report"
    proc = _python(
        f"""
        from normdoctor.cli import main
        code = main(["report", {str(scan_json)!r}, "-o", {str(out)!r}, "-q"])
        print(code, wanted)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "0 []", proc.stdout + proc.stderr
    assert {"index.html", "drift.png", "drift.svg"} <= {p.name for p in out.iterdir()}
    # ... and the page is the one this process renders from the same report.
    assert report.verdict in proc.stdout


def test_reading_reports_imports_no_torch() -> None:
    proc = _python(
        """
        import normdoctor
        from normdoctor.report import ScanReport, scan_result_from_dict
        from normdoctor.render import markdown, plots
        import normdoctor.cli
        print(wanted)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_lazy_names_are_the_functions_even_after_their_submodules() -> None:
    # A fresh interpreter: the submodules are imported before the package's names are read.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import normdoctor.scan, normdoctor.patch.auto, normdoctor.monitor, normdoctor; "
            "import inspect; "
            "print([inspect.isfunction(getattr(normdoctor, n)) for n in "
            "('scan', 'patch', 'monitor', 'sweep_batch_sizes')]); "
            "from normdoctor import scan; print(scan.__module__)",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[True,", "True,", "True,", "True]", "normdoctor.scan"]


def test_lazy_names_resolve_and_unknown_names_fail() -> None:
    from normdoctor.scan import scan

    assert normdoctor.scan is scan
    assert set(normdoctor.__all__) <= set(dir(normdoctor))
    with pytest.raises(AttributeError, match="no_such_name"):
        normdoctor.no_such_name  # type: ignore[attr-defined]  # noqa: B018

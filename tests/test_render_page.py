"""The HTML report as a reader meets it (issue 15): phone width, print, SVG text, the footer's
provenance, before/after a patch, and many layers grouped by finding.

Pages come from the real command line (``normdoctor report``, ``normdoctor patch --report``) on
the sample models, except the many-layer page, which is assembled from the report dataclasses
(no 150-layer sample model exists).
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
from importlib.metadata import version
from pathlib import Path

import pytest

from normdoctor.cli import main
from normdoctor.render import save_report
from normdoctor.render.html import READABLE_PX_PER_INCH
from normdoctor.render.style import num
from normdoctor.report import ScanReport

ROOT = Path(__file__).resolve().parents[1]
SM = ROOT / "sample_models"
ARCH = "sample_models.archs:DigitsCNN"
DATA = str(SM / "data" / "test.npz")
HAS_SAMPLES = (SM / "MANIFEST.json").exists() and (SM / "data" / "test.npz").exists()
needs_samples = pytest.mark.skipif(not HAS_SAMPLES, reason="sample_models/ not built")


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # --arch sample_models.archs:... imports from the working directory
    monkeypatch.setenv("NO_COLOR", "1")


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.imgs: list[dict[str, str | None]] = []
        self.ids: list[str] = []
        self.rows = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if tag == "tr":
            self.rows += 1
        if a.get("id"):
            self.ids.append(str(a["id"]))

    def handle_data(self, data: str) -> None:
        self.parts.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.parts).split())


def _parse(index: Path) -> _Text:
    page = _Text()
    page.feed(index.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def tiny_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``normdoctor scan --json`` of tiny-batch, then ``normdoctor report`` of that JSON."""
    import os

    tmp = tmp_path_factory.mktemp("tiny")
    scan = ["scan", SM / "tiny-batch.pt", "--arch", ARCH, "--data", DATA, "-b", "4"]
    scan += ["--no-search", "--max-batches", "30", "--json", tmp / "scan.json", "-q"]
    cwd = os.getcwd()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    try:
        assert main([str(a) for a in scan]) in (0, 1)
        assert main(["report", str(tmp / "scan.json"), "-o", str(tmp / "report"), "-q"]) == 0
    finally:
        sys.path.remove(str(ROOT))
        os.chdir(cwd)
    return tmp / "report"


@needs_samples
def test_svg_text_stays_text_and_png_is_embedded(tiny_page: Path) -> None:
    svg = (tiny_page / "drift.svg").read_text()
    texts = re.findall(r"<text [^>]*>([^<]*)", svg)
    assert any("norm3" in t for t in texts), "layer names are searchable text"
    assert "font-family: 'DejaVu Sans'" in svg and "sans-serif" in svg
    page = _parse(tiny_page / "index.html")
    assert page.imgs and all(str(i["src"]).startswith("data:image/png;base64,") for i in page.imgs)


@needs_samples
def test_phone_width_figures_keep_a_readable_size(tiny_page: Path) -> None:
    """Figures never shrink below READABLE_PX_PER_INCH: they scroll in their own box."""
    raw = (tiny_page / "index.html").read_text()
    page = _parse(tiny_page / "index.html")
    for img in page.imgs:
        m = re.search(r"min-width:(\d+)px", str(img.get("style")))
        assert m, img.get("alt")
        assert int(m.group(1)) >= 8 * READABLE_PX_PER_INCH * 0.99  # 8-inch figures
    # 7.5 pt legend text at 96 px per figure inch: 10 CSS px
    assert 7.5 / 72 * READABLE_PX_PER_INCH >= 10
    assert ".scroll, .fig { overflow-x: auto;" in raw
    phone = raw[raw.index("@media (max-width: 600px)") : raw.index("@media print")]
    assert "overflow: visible" not in phone, "a wide table scrolls in its box, not the page"


@needs_samples
def test_print_keeps_figures_with_captions_and_no_forced_breaks(tiny_page: Path) -> None:
    raw = (tiny_page / "index.html").read_text()
    printed = raw[raw.index("@media print") :]
    assert re.search(r"figure[^{]*\{[^}]*break-inside: avoid", printed)
    assert "min-width: 0 !important" in printed  # the phone's minimum does not apply on paper
    assert "@page { margin:" in raw
    assert "break-before: page" not in raw and "page-break-before: always" not in raw


@needs_samples
def test_footer_gives_versions_date_and_command(tiny_page: Path) -> None:
    import normdoctor

    text = _parse(tiny_page / "index.html").text
    footer = text[text.rindex("normdoctor " + normdoctor.__version__) :]
    assert f"torch {version('torch')}" in footer
    assert re.search(r"written \d{4}-\d{2}-\d{2}", footer)
    assert "normdoctor report" in text and "tiny-batch.pt" in text  # the recorded command


@needs_samples
def test_noniid_shown_is_the_eval_paths(tiny_page: Path) -> None:
    """The documented non-i.i.d. ratio (the eval path's, as in the terminal) is the page's."""
    report = ScanReport.from_json((tiny_page.parent / "scan.json").read_text())
    raw = (tiny_page / "index.html").read_text()
    shown = re.findall(r'<td data-label="non-iid" class="num">([^<]*)</td>', raw)
    expected = [num(layer.eval.noniid) if layer.eval else "–" for layer in report.layers]
    assert shown == expected
    trains = [num(layer.train.noniid) if layer.train else "–" for layer in report.layers]
    assert trains != expected, "the two paths differ here, so the test tells them apart"


def test_provenance_in_footer(tmp_path: Path) -> None:
    from test_render import large_report

    report = large_report(n=3)
    prov = {"model_sha256": "ab" * 32, "data_sha256": "cd" * 32}
    index = save_report(report, tmp_path / "r", formats=("png",), provenance=prov)
    text = _parse(index).text
    footer = text[text.rindex("report schema") :]
    assert f"model sha256: {'ab' * 32}" in footer and f"data sha256: {'cd' * 32}" in footer


def test_many_layers_grouped_each_once(tmp_path: Path) -> None:
    from test_render import large_report

    report = large_report(n=150)
    index = save_report(report, tmp_path / "big", formats=("png",))
    raw = index.read_text()
    page = _parse(index)
    for layer in report.layers:
        assert raw.count(f'class="name">{layer.name}</td>') == 1, f"{layer.name} listed once"
    header_rows = raw.count("<thead>")
    assert page.rows == 150 + header_rows
    assert "<details>" in raw and "all-layers" in page.ids
    text = page.text
    n_ok = sum(1 for layer in report.layers if str(layer.status) == "ok")
    assert f"<li><strong>{n_ok} layers</strong>: ok</li>" in raw
    assert "The 20 highest drift scores, worst first" in text
    flagged = sum(layer.flagged for layer in report.layers)
    finding = "▲ FLAGGED, stale running statistics (shift) → recalibrate"
    assert f"<li><strong>{flagged} layers</strong>: {finding}</li>" in raw


@needs_samples
def test_patch_report_shows_before_and_after(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rep = tmp_path / "rep"
    args = ["patch", SM / "stale.pt", "--arch", ARCH, "--data", DATA, "--train-batch-size", "32"]
    args += ["--to", "recalibrate", "-o", tmp_path / "fixed.pt", "--report", rep, "-q"]
    sys.path.insert(0, str(ROOT))
    try:
        assert main([str(a) for a in args]) == 0
    finally:
        sys.path.remove(str(ROOT))
    capsys.readouterr()
    assert (rep / "drift.png").is_file() and (rep / "drift_after.png").is_file()
    page = _parse(rep / "index.html")
    text = page.text
    assert "Before the patch Harmful" in text and "After the patch Ok" in text
    assert "Layers before and after the patch" in text
    assert {"fig-drift", "fig-drift_after"} <= set(page.ids)
    head = text[: text.index("What the scan could see")]
    assert head.index("Before the patch") < head.index("After the patch")

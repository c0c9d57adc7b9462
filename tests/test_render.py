"""Figures and the self-contained HTML report (issue 8).

Reports come from real scans: the shipped sample models (scanned the way each was trained), small
synthetic models (a drifting one with running statistics at their initial values, a healthy one
recalibrated exactly, one without batch-dependent layers), and, for the large-model layout, a
200-layer report assembled from the report dataclasses.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import normdoctor
from normdoctor.metrics import Recommendation
from normdoctor.render import draw as render_draw
from normdoctor.render import end_to_end, plots, save_report, specs, trends
from normdoctor.render import html as render_html
from normdoctor.render import style as S
from normdoctor.render.html import figures
from normdoctor.report import (
    Composition,
    EndToEnd,
    LayerReport,
    LayerStatus,
    PathReport,
    ScanReport,
)

REPO = Path(__file__).resolve().parents[1]
SM = REPO / "sample_models"
HAS_SAMPLES = (SM / "MANIFEST.json").exists() and (SM / "data" / "test.npz").exists()
MANIFEST = json.loads((SM / "MANIFEST.json").read_text())["models"] if HAS_SAMPLES else {}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Bars are drawn from the report's floats; matplotlib keeps them as float64.
BAR_ATOL = 1e-12
#: A short page: no figures, a few layers (the layer table and CSS are most of it).
SHORT_PAGE_BYTES = 20_000
#: Batches scanned for tiny-batch (batch size 1): enough to see its drift, quick on 2 cores.
TINY_BATCH_MAX_BATCHES = 24


# -- reports -----------------------------------------------------------------------------------


def _conv_bn(depth: int = 3, width: int = 8, head: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 3
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    if head:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def _data() -> torch.Tensor:
    return torch.randn(128, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _recalibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Exact running statistics: one train-mode pass over all of x with a cumulative average."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.fixture(scope="module")
def drifting() -> ScanReport:
    """Fresh model, running statistics at init: its feature-map outputs diverge in eval mode."""
    torch.manual_seed(0)
    return normdoctor.scan(_conv_bn().eval(), _data(), train_batch_size=16, model_name="fresh-cnn")


@pytest.fixture(scope="module")
def healthy() -> ScanReport:
    torch.manual_seed(0)
    model = _recalibrate(_conv_bn(), _data())
    return normdoctor.scan(model, _data(), batch_size=64, model_name="recalibrated-cnn")


@pytest.fixture(scope="module")
def patched() -> ScanReport:
    """The drifting model after an exact recalibration: the 'after' of a before/after page."""
    torch.manual_seed(0)
    model = _recalibrate(_conv_bn(), _data())
    return normdoctor.scan(model, _data(), batch_size=16, model_name="fresh-cnn (recalibrated)")


@pytest.fixture(scope="module")
def no_bn() -> ScanReport:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.LayerNorm([8, 6, 6])
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no normalization layers" does not apply; be safe
        return normdoctor.scan(model, _data(), batch_size=16, model_name="groupnorm-cnn")


@pytest.fixture(scope="module")
def sweep() -> dict[int, ScanReport]:
    torch.manual_seed(0)
    model = _conv_bn().eval()
    return {
        b: normdoctor.scan(
            model, _data(), train_batch_size=b, max_batches=6, model_name="fresh-cnn"
        )
        for b in (2, 8, 32)
    }


#: How far each checkpoint's running statistics have moved from the exact ones towards their
#: initial values (mean 0, variance 1): the first is healthy, the second partly flagged, the
#: third fully.
STALENESS = (0.0, 0.05, 1.0)


@pytest.fixture(scope="module")
def checkpoints() -> list[ScanReport]:
    """A checkpoint series of one small model whose running statistics go stale."""
    torch.manual_seed(0)
    exact = _recalibrate(_conv_bn(), _data())
    reports = []
    for j, t in enumerate(STALENESS, 1):
        model = copy.deepcopy(exact)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.mul_(1 - t)
                m.running_var.mul_(1 - t).add_(t)
        reports.append(
            normdoctor.scan(model, _data(), train_batch_size=32, model_name=f"epoch{j}.pt")
        )
    return reports


def _sample_model(name: str) -> nn.Module:
    sys.path.insert(0, str(REPO))
    try:
        from sample_models import archs
    finally:
        sys.path.remove(str(REPO))
    entry = MANIFEST[name]
    model = getattr(archs, entry["arch"].split(":")[1])(**entry["arch_kwargs"])
    model.load_state_dict(torch.load(SM / f"{name}.pt", weights_only=True))
    return model.eval()


_SAMPLE_CACHE: dict[str, ScanReport] = {}


def sample_report(name: str) -> ScanReport:
    """The sample model scanned the way it was trained (batch size, one-class batches)."""
    if name not in _SAMPLE_CACHE:
        entry = MANIFEST[name]
        data = np.load(SM / "data" / "test.npz")
        x, y = torch.from_numpy(data["inputs"]), torch.from_numpy(data["labels"])
        kwargs = {"batch_size": entry["train_batch_size"]}
        if entry["train_order"] == "class-sorted":
            kwargs["group_by"] = "label"
        if entry["train_batch_size"] == 1:
            kwargs["max_batches"] = TINY_BATCH_MAX_BATCHES
        _SAMPLE_CACHE[name] = normdoctor.scan(
            _sample_model(name), (x, y), model_name=name, **kwargs
        )
    return _SAMPLE_CACHE[name]


def _path(
    drift: float, shift: float, noise: float, channels: int, batches: int, rng: np.random.Generator
) -> PathReport:
    batch_drift = tuple(abs(rng.normal(drift, noise)) for _ in range(batches))
    mean = tuple(float(v) for v in rng.normal(0, 1, channels))
    var = tuple(float(v) for v in rng.uniform(0.5, 2, channels))
    return PathReport(
        batches=batches,
        samples=batches * 8,
        drift=drift,
        drift_worst=max(batch_drift),
        worst_batch=int(np.argmax(batch_drift)),
        shift=shift,
        noise=noise,
        noniid=1.0,
        pooled_mean=mean,
        pooled_var=var,
        channel_drift=(drift,) * channels,
        mean_shift=(0.0,) * channels,
        var_log_ratio=(0.0,) * channels,
        batch_drift=batch_drift,
    )


def large_report(n: int = 200, channels: int = 16, batches: int = 40) -> ScanReport:
    """A ResNet-sized report assembled directly: every 10th layer flagged, every 25th a GroupNorm."""
    rng = np.random.default_rng(0)
    layers = []
    for i in range(n):
        name = f"stage{i // 50}.block{i % 50}.bn"
        common = dict(
            name=name,
            kind="BatchNorm2d",
            family="batch",
            num_features=channels,
            eps=1e-5,
            momentum=0.1,
            affine=True,
            track_running_stats=True,
            batch_dependent=True,
            executed=True,
            order=i,
        )
        if i % 25 == 24:
            common.update(kind="GroupNorm", family="group", batch_dependent=False, momentum=None)
            layers.append(
                LayerReport(
                    **common,
                    status=LayerStatus.NOT_MEASURED,
                    flagged=False,
                    recommendation=Recommendation.OK,
                    reason="batch-independent",
                )
            )
            continue
        flagged = i % 10 == 3
        shift, noise = (0.5, 0.1) if flagged else (0.02, float(rng.uniform(0.01, 0.08)))
        drift = math.sqrt(shift**2 + noise**2)
        layers.append(
            LayerReport(
                **common,
                running_mean=tuple(float(v) for v in rng.normal(0, 1, channels)),
                running_var=tuple(float(v) for v in rng.uniform(0.5, 2, channels)),
                status=LayerStatus.FLAGGED if flagged else LayerStatus.OK,
                flagged=flagged,
                recommendation=Recommendation.RECALIBRATE if flagged else Recommendation.OK,
                reason="synthetic",
                train=_path(drift, shift, noise, channels, batches, rng),
            )
        )
    return ScanReport(
        normdoctor_version=normdoctor.__version__,
        model="synthetic-200",
        composition=Composition(
            source="tensor",
            batch_size=8,
            order="shuffle",
            seed=0,
            group_by=None,
            num_batches=batches,
            num_samples=8 * batches,
            min_batch=8,
            max_batch=8,
        ),
        paths=("train", "eval"),
        threshold=0.25,
        agreement_threshold=0.95,
        divergence_threshold=0.2,
        layers=tuple(layers),
        end_to_end=EndToEnd(
            batches=batches,
            samples=8 * batches,
            rel_divergence=0.5,
            agreement=0.7,
            acc_train=0.9,
            acc_eval=0.6,
        ),
        harmful=True,
    )


# -- checking a page ---------------------------------------------------------------------------


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.ids: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if a.get("id"):
            self.ids.add(str(a["id"]))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def of(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]


def check_page(index: Path) -> _Page:
    """Parse the page; no external reference; every image embedded, a PNG that decodes."""
    import matplotlib.image

    raw = index.read_text(encoding="utf-8")
    assert raw.startswith("<!DOCTYPE html>")
    lowered = raw.lower()
    assert "http://" not in lowered and "https://" not in lowered
    page = _Page()
    page.feed(raw)
    page.close()
    assert any(
        a.get("name") == "viewport" and "width=device-width" in (a.get("content") or "")
        for a in page.of("meta")
    )
    assert "@media print" in raw and "@media (max-width" in raw
    assert not page.of("script") and not page.of("link"), "no scripts, no stylesheet links"
    for tag, attrs in page.tags:
        for key in ("src", "href", "srcset", "action", "data", "poster"):
            value = attrs.get(key)
            if value is None:
                continue
            assert not value.startswith("//"), f"<{tag} {key}={value[:40]!r}>"
            if key == "src":
                assert value.startswith("data:image/png;base64,"), f"<{tag}> not embedded"
            elif value.startswith("#"):
                assert value[1:] in page.ids, f"dangling anchor {value}"
            else:
                assert ":" not in value, f"<{tag} {key}={value!r}> leaves the folder"
                assert (index.parent / value).is_file(), f"{value} named but not written"
    images = page.of("img")
    for img in images:
        data = base64.b64decode(str(img["src"]).split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        pixels = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert img.get("alt"), "every figure has alt text (its conclusion)"
    return page


def _text(page: _Page) -> str:
    return " ".join(" ".join(page.text).split())


# -- the page for real models ------------------------------------------------------------------


@pytest.mark.skipif(not HAS_SAMPLES, reason="sample_models/ not built")
@pytest.mark.parametrize("name", list(MANIFEST))
def test_page_for_every_sample_model(name: str, tmp_path: Path) -> None:
    report = sample_report(name)
    cmd = f"normdoctor report sample_models/{name}.pt --data sample_models/data/test.npz"
    index = save_report(report, tmp_path / name, command=cmd, formats=("png",))
    page = check_page(index)
    text = _text(page)
    assert report.verdict[1:] in text
    assert report.composition.description in text
    assert cmd in text
    for layer in report.layers:
        assert layer.name in text
    shown = {str(f["id"]).removeprefix("fig-") for f in page.of("figure")}
    files = {p.name for p in (tmp_path / name).iterdir()}
    assert files == {"index.html"} | {f"{k}.png" for k in shown}
    if MANIFEST[name]["has_batchnorm"]:
        assert {"drift", "end_to_end", "channels", "batches"} <= shown
    else:
        assert not shown and not page.of("img")
        assert "no batch-dependent normalization layer" in text
        assert index.stat().st_size < SHORT_PAGE_BYTES
    if report.flagged:
        for layer in report.flagged_layers:
            assert str(layer.recommendation) in text


@pytest.mark.skipif(not HAS_SAMPLES, reason="sample_models/ not built")
def test_flagged_sample_model_titles_name_the_worst_layer() -> None:
    report = sample_report("stale")
    assert report.flagged
    worst = max(plots.measured_layers(report), key=lambda r: r[1].drift or 0.0)[1]
    fig = plots.drift_figure(report)
    n_dep = sum(layer.batch_dependent for layer in report.layers)
    assert plots.headline(fig) == (
        f"{len(report.flagged_layers)} of {n_dep} layers drift; worst: {worst.name} ({worst.drift:.3g})"
    )
    assert fig.get_suptitle().replace("\n", " ") == plots.headline(fig)


def test_page_from_saved_json(drifting: ScanReport, tmp_path: Path) -> None:
    loaded = ScanReport.from_json(drifting.to_json())
    index = save_report(loaded, tmp_path / "r", formats=("svg",))
    page = check_page(index)
    text = _text(page)
    assert drifting.verdict[1:] in text
    assert "Recommended fix" in text and "Not yet verified" in text
    keys = {str(f["id"]).removeprefix("fig-") for f in page.of("figure")}
    assert keys == {"end_to_end", "drift", "batches", "channels"}
    for key in keys:
        svg = (tmp_path / "r" / f"{key}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    # The same bars as from the report in memory.
    a, b = (_bars(plots.drift_figure(r).axes[0], "shift share") for r in (drifting, loaded))
    assert [p.get_width() for p in a] == [p.get_width() for p in b]


def test_healthy_page_says_so_and_what_it_could_not_see(
    drifting: ScanReport, healthy: ScanReport, tmp_path: Path
) -> None:
    assert drifting.flagged and not healthy.drifting_layers
    good_page = check_page(save_report(healthy, tmp_path / "good", formats=()))
    good = _text(good_page)
    assert healthy.verdict[1:] in good
    assert "Recommended fix" not in good
    # Healthy, but honest about what the scan could not see.
    assert "Batch composition decides what a scan can see" in good
    assert any("verdict good" in (a.get("class") or "") for a in good_page.of("section"))


# -- figure 1: its data, not just its existence ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Bar:
    """One drawn rectangle of the drift overview, read back from its collection."""

    x: float
    y: float
    width: float
    height: float
    hatch: str | None

    def get_x(self) -> float:
        return self.x

    def get_width(self) -> float:
        return self.width

    def get_height(self) -> float:
        return self.height

    def get_hatch(self) -> str | None:
        return self.hatch


def _bars(ax, label: str) -> list[_Bar]:
    """The rectangles drawn for one part of the drift bars ("shift share", ...), one per layer
    in forward order (the part's collections, one per hatch, are merged)."""
    bars = []
    for coll in ax.collections:
        if coll.get_label() != label:
            continue
        for path in coll.get_paths():
            (x0, y0), (x1, y1) = path.vertices.min(axis=0), path.vertices.max(axis=0)
            bars.append(_Bar(x0, y0, x1 - x0, y1 - y0, coll.get_hatch()))
    assert bars, f"no bars labelled {label!r}"
    along = "y" if ax.yaxis_inverted() else "x"  # named bars run top to bottom
    return sorted(bars, key=lambda b: b.y + b.height / 2 if along == "y" else b.x + b.width / 2)


def test_drift_bars_are_the_drift_scores(drifting: ScanReport) -> None:
    rows = plots.measured_layers(drifting)
    fig = plots.drift_figure(drifting)
    ax = fig.axes[0]
    shift, noise, rest = (_bars(ax, k) for k in ("shift share", "noise share", "no split"))
    assert len(shift) == len(rows) == 3
    for (_, layer), s, n, r in zip(rows, shift, noise, rest, strict=True):
        total = s.get_width() + n.get_width() + r.get_width()
        assert total == pytest.approx(layer.drift, abs=BAR_ATOL)
        # The split is in proportion to shift² : noise².
        share = layer.shift**2 / (layer.shift**2 + layer.noise**2)
        assert s.get_width() == pytest.approx(layer.drift * share, abs=BAR_ATOL)
        assert n.get_x() == pytest.approx(s.get_width(), abs=BAR_ATOL)  # stacked
        assert bool(s.get_hatch()) == layer.flagged
    assert [t.get_text() for t in ax.get_yticklabels()] == [layer.name for _, layer in rows]
    thresholds = [
        line for line in ax.get_lines() if list(line.get_xdata()) == [drifting.threshold] * 2
    ]
    assert thresholds, "threshold drawn"
    assert plots.headline(fig).startswith(
        f"{len(drifting.flagged_layers)} of 3 layers drift; worst: "
    )
    gap = plots.decomposition_gap(drifting)
    assert gap is not None and f"within {max(1, math.ceil(100 * gap))}%" in plots.caption(fig)


def test_large_model_numbered_bars_and_worst_list(tmp_path: Path) -> None:
    report = large_report()
    rows = plots.measured_layers(report)
    fig = plots.drift_figure(report)
    ax = fig.axes[0]
    shift, noise = _bars(ax, "shift share"), _bars(ax, "noise share")
    assert len(shift) == len(rows) == 192
    for (i, layer), s, n in zip(rows, shift, noise, strict=True):
        assert s.get_x() + s.get_width() / 2 == pytest.approx(i)  # x is the table's '#'
        assert s.get_height() + n.get_height() == pytest.approx(layer.drift, abs=BAR_ATOL)
    side = "".join(t.get_text() for t in fig.axes[1].texts)
    worst = max(rows, key=lambda r: r[1].drift or 0.0)
    assert f"#{worst[0]}" in side and worst[1].name in side

    # (its time is measured in benchmarks/bench_report.py, not asserted here: shared machines)
    index = save_report(report, tmp_path / "big", formats=("png",))
    page = check_page(index)
    assert "all-layers" in page.ids
    rows_html = [a for a in page.of("tr") if a is not None]
    # Every layer once (issue 15): the worst 20 in full, the rest grouped by finding, plus one
    # header row per table.
    raw = index.read_text()
    assert len(rows_html) == 200 + raw.count("<thead>")
    for layer in report.layers:
        assert raw.count(f'class="name">{layer.name}</td>') == 1


# -- honest short pages ------------------------------------------------------------------------


def test_no_batch_dependent_layers_gives_a_short_honest_page(
    no_bn: ScanReport, tmp_path: Path
) -> None:
    assert figures(no_bn) == {}
    for draw in (
        plots.drift_figure,
        plots.channels_figure,
        plots.batch_distribution_figure,
        plots.end_to_end_figure,
    ):
        with pytest.raises(plots.NothingToPlot, match="batch-dependent"):
            draw(no_bn)
    index = save_report(no_bn, tmp_path / "gn")
    page = check_page(index)
    text = _text(page)
    assert not page.of("img") and not page.of("figure")
    assert "no batch-dependent normalization layer" in text and "GroupNorm" in text
    assert "none were run" in text or "composition does not matter here" in text
    assert index.stat().st_size < SHORT_PAGE_BYTES
    assert sorted(p.name for p in (tmp_path / "gn").iterdir()) == ["index.html"]


def test_every_layer_healthy_gives_no_empty_figure(healthy: ScanReport) -> None:
    figs = figures(healthy)
    assert set(figs) == {"end_to_end", "drift", "batches", "channels"}
    bars = _bars(figs["drift"].axes[0], "shift share")
    assert len(bars) == 3 and all(not b.get_hatch() for b in bars)
    assert plots.headline(figs["drift"]).startswith(f"No layer drifts above {healthy.threshold:g}")
    for fig in figs.values():
        assert any(ax.has_data() for ax in fig.axes), plots.headline(fig)


def test_single_batch_has_no_distribution(healthy: ScanReport) -> None:
    torch.manual_seed(0)
    model = _recalibrate(_conv_bn(), _data())
    one = normdoctor.scan(model, _data(), batch_size=128, model_name="one batch")
    with pytest.raises(plots.NothingToPlot, match="single batch"):
        plots.batch_distribution_figure(one)
    # ... and the points of a real distribution are the per-batch scores.
    fig = plots.batch_distribution_figure(healthy)
    worst = max(plots.measured_layers(healthy), key=lambda r: r[1].drift or 0.0)[1]
    offsets = fig.axes[0].collections[0].get_offsets()
    assert sorted(offsets[:, 0]) == pytest.approx(sorted(worst.train.batch_drift))


# -- the output folder -------------------------------------------------------------------------


def test_existing_folder_is_not_overwritten_without_force(
    no_bn: ScanReport, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_report(no_bn, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not list(tmp_path.glob(".*")), "nothing rendered before refusing"
    (out / "drift.png").write_bytes(b"a figure of an earlier report")
    index = save_report(no_bn, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "drift.png").exists(), "a figure the new page does not describe"
    assert index == out.absolute() / "index.html" and index.is_file()
    with pytest.raises(FileExistsError, match="not empty"):
        save_report(no_bn, out)  # now it holds a report: still not overwritten silently
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileExistsError, match="exists \\(empty\\)"):
        save_report(no_bn, empty)  # even an empty folder may be someone's: force says so
    assert save_report(no_bn, empty, force=True) == empty.absolute() / "index.html"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        save_report(no_bn, tmp_path / "afile", force=True)
    with pytest.raises(ValueError, match="formats"):
        save_report(no_bn, tmp_path / "pdf", formats=("pdf",))
    assert not (tmp_path / "pdf").exists()


def _boom(*args, **kwargs):
    raise RuntimeError("rendering failed")


def _quick_figure():
    from normdoctor.render.style import new_figure

    fig = new_figure(2, 2)
    fig.add_subplot().plot([0, 1])
    return fig


@pytest.mark.parametrize("where", ["drawing", "rendering", "page"])
def test_page_is_written_atomically(
    drifting: ScanReport,
    no_bn: ScanReport,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    old = tmp_path / "old"
    save_report(no_bn, old)
    (old / "drift.png").write_bytes(b"a figure of the earlier report")
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    if where == "drawing":  # a figure function raises
        monkeypatch.setattr(plots, "drift_figure", _boom)
    elif where == "rendering":  # the second image file fails, after the first was written
        calls = []
        real = render_html._render

        def flaky(fig, fmt):
            calls.append(fmt)
            if len(calls) == 2:
                raise RuntimeError("rendering failed")
            return real(fig, fmt)

        monkeypatch.setattr(render_html, "_render", flaky)
    else:  # every image written to the temporary folder, then composing the page fails
        figs = {"drift": _quick_figure(), "channels": _quick_figure()}
        monkeypatch.setattr(render_html, "_build", lambda *a: (figs, {}))
        monkeypatch.setattr(render_html, "_page", _boom)
    with pytest.raises(RuntimeError, match="rendering failed"):
        save_report(drifting, old, force=True, formats=("png", "svg"))
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    if where == "rendering":
        calls.clear()
    with pytest.raises(RuntimeError, match="rendering failed"):
        save_report(drifting, tmp_path / "new", formats=("png", "svg"))
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"], "temporary folders left behind"


def test_folder_mode_follows_umask(no_bn: ScanReport, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    save_report(no_bn, out)
    reference = tmp_path / "reference"
    reference.mkdir()
    assert out.stat().st_mode == reference.stat().st_mode


# -- the other figures -------------------------------------------------------------------------


def test_figures_render_headless_without_warnings(
    drifting: ScanReport,
    patched: ScanReport,
    sweep: dict[int, ScanReport],
    checkpoints: list[ScanReport],
    tmp_path: Path,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figs = figures(drifting, sweep, patched, train_batch_size=8, series=checkpoints)
        assert list(figs) == list(render_html.FIGURE_NAMES)  # all six, in page order
        for key, fig in figs.items():
            assert type(fig.canvas).__name__ == "FigureCanvasAgg"
            for fmt in ("png", "svg"):
                fig.savefig(tmp_path / f"{key}.{fmt}", format=fmt)
            assert plots.caption(fig).endswith(".") and plots.headline(fig)
        large = plots.drift_figure(large_report(n=60, batches=10))  # the numbered layout
        large.savefig(io.BytesIO(), format="png")


def test_sweep_figure_lines_are_the_drifts(sweep: dict[int, ScanReport]) -> None:
    fig = plots.sweep_figure(sweep, train_batch_size=8)
    ax = fig.axes[0]
    sizes = sorted(sweep)
    names = [layer.name for _, layer in plots.measured_layers(sweep[sizes[0]])]
    lines = {line.get_label(): line for line in ax.get_lines()}
    for name in names:
        label = f"layer {name}" if name.isdigit() else name  # nn.Sequential's bare indices
        assert list(lines[label].get_xdata()) == sizes
        assert list(lines[label].get_ydata()) == pytest.approx(
            [sweep[b].layer(name).drift for b in sizes], abs=BAR_ATOL
        )
    assert any(list(line.get_xdata()) == [8, 8] for line in ax.get_lines()), "training batch size"
    assert "training batch size 8" in plots.headline(fig)
    same = plots.sweep_figure(list(sweep.values())[::-1], train_batch_size=8)
    assert plots.headline(same) == plots.headline(fig)
    with pytest.raises(plots.NothingToPlot, match="two batch sizes"):
        plots.sweep_figure({8: sweep[8]})
    with pytest.raises(ValueError, match="repeated"):
        plots.sweep_figure([sweep[8], sweep[8]])


def _flag_points(ax, status: LayerStatus) -> list[tuple[float, float]]:
    (marks,) = [c for c in ax.collections if c.get_label() == f"_{status.value}"]
    return sorted(map(tuple, np.asarray(marks.get_offsets()).tolist()))


def _same_points(got: list[tuple[float, float]], expected: list[tuple[float, float]]) -> bool:
    """Equal point lists within BAR_ATOL (pytest.approx does not take nested sequences)."""
    return len(got) == len(expected) and all(
        g == pytest.approx(e, abs=BAR_ATOL) for g, e in zip(got, expected, strict=True)
    )


def test_series_figure_lines_are_the_drifts(checkpoints: list[ScanReport]) -> None:
    models = [r.model for r in checkpoints]
    # The series runs from healthy to partly flagged to fully flagged.
    assert not checkpoints[0].flagged
    assert 0 < len(checkpoints[1].flagged_layers) < 3 == len(checkpoints[2].flagged_layers)
    fig = plots.series_figure(checkpoints)
    ax, lower = fig.axes
    names = [layer.name for _, layer in plots.measured_layers(checkpoints[0])]
    lines = {line.get_label(): line for line in ax.get_lines()}
    for name in names:
        line = lines[f"layer {name}"]  # nn.Sequential's bare indices
        assert list(line.get_xdata()) == [0, 1, 2]
        assert list(line.get_ydata()) == pytest.approx(
            [r.layer(name).drift for r in checkpoints], abs=BAR_ATOL
        )
    # A marker exactly at every flagged point, and nowhere else.
    flagged = sorted(
        (float(j), r.layer(name).drift)
        for j, r in enumerate(checkpoints)
        for name in names
        if r.layer(name).flagged
    )
    assert _same_points(_flag_points(ax, LayerStatus.FLAGGED), flagged)
    assert not [c for c in ax.collections if c.get_label() == "_drifts-harmless"]
    assert any(
        list(line.get_ydata()) == [checkpoints[0].threshold] * 2 for line in ax.get_lines()
    ), "threshold drawn"
    # The checkpoints name the axis; the flagged ones in bold.
    ticks = lower.get_xticklabels()
    assert [t.get_text() for t in ticks] == models
    assert [t.get_fontweight() == "bold" for t in ticks] == [r.flagged for r in checkpoints]
    # No labels: the lower panel is the output divergence per checkpoint.
    (div,) = lower.get_lines()[:1]
    assert list(div.get_ydata()) == pytest.approx(
        [r.end_to_end.rel_divergence for r in checkpoints]
    )
    n_flag = len(checkpoints[1].flagged_layers)
    assert plots.headline(fig) == (
        f"Drift appeared at epoch2.pt: {n_flag} of 3 layers flagged (output divergence "
        f"{checkpoints[1].end_to_end.rel_divergence:.3g})"
    )
    assert fig.get_suptitle().replace("\n", " ") == plots.headline(fig)
    assert "3 checkpoints" in plots.caption(fig) and plots.caption(fig).endswith(".")

    # The title follows the order given.
    back = plots.headline(plots.series_figure(checkpoints[::-1]))
    assert back.startswith("Drift already at the first checkpoint, epoch3.pt: 3 of 3 layers")
    assert back.endswith("the last checkpoint, epoch1.pt, is not flagged")
    clean = dataclasses.replace(checkpoints[0], model="epoch0.pt")
    worst = max(plots.measured_layers(clean), key=lambda r: r[1].drift or 0.0)[1]
    assert plots.headline(plots.series_figure([clean, checkpoints[0]])) == (
        f"No checkpoint flagged; worst drift {worst.drift:.3g} (layer {worst.name}, epoch0.pt)"
    )


def test_series_figure_needs_two_measured_checkpoints(
    checkpoints: list[ScanReport], no_bn: ScanReport
) -> None:
    with pytest.raises(plots.NothingToPlot, match="at least two checkpoints"):
        plots.series_figure(checkpoints[:1])
    with pytest.raises(plots.NothingToPlot, match="at least two checkpoints"):
        plots.series_figure([])
    with pytest.raises(plots.NothingToPlot, match="batch-dependent"):
        plots.series_figure([no_bn, no_bn])


def test_series_figure_many_layers_and_checkpoints() -> None:
    base = large_report(n=60, batches=4)
    reports = []
    for j in range(40):
        layers = tuple(
            dataclasses.replace(
                layer, train=dataclasses.replace(layer.train, drift=layer.drift * (1 + j / 10))
            )
            if layer.train is not None
            else layer
            for layer in base.layers
        )
        reports.append(
            dataclasses.replace(base, layers=layers, model=f"resnet50_run3_epoch{j:03d}.ckpt")
        )
    fig = plots.series_figure(reports, k=4)
    ax, lower = fig.axes
    measured = plots.measured_layers(base)
    coloured = [line for line in ax.get_lines() if line.get_marker() not in ("None", None, "")]
    grey = [line for line in ax.get_lines() if line.get_linewidth() == pytest.approx(0.7)]
    assert len(coloured) == 4 and len(grey) == len(measured) - 4
    worst = sorted(measured, key=lambda r: -(r[1].drift or 0.0))[:4]
    assert {line.get_label() for line in coloured} == {
        S.esc(S.shorten(layer.name, 30)) for _, layer in worst
    }
    # Every point of every flagged layer is marked, grey ones too.
    assert len(_flag_points(ax, LayerStatus.FLAGGED)) == 40 * len(base.flagged_layers)
    # 40 names do not fit: every other one, shortened to what differs, slanted; the last kept.
    labels = [t.get_text() for t in lower.get_xticklabels()]
    assert len(labels) <= plots.MAX_SERIES_TICKS + 1
    assert labels[0] == "epoch000" and labels[-1] == "epoch039"
    assert "resnet50_run3_*.ckpt" in lower.get_xlabel()
    assert lower.get_xticklabels()[0].get_rotation() > 0
    fig.savefig(io.BytesIO(), format="png")


@pytest.mark.skipif(not HAS_SAMPLES, reason="sample_models/ not built")
def test_series_of_sample_models_shows_agreement_and_accuracy() -> None:
    data = np.load(SM / "data" / "test.npz")
    xy = (torch.from_numpy(data["inputs"]), torch.from_numpy(data["labels"]))
    reports = [
        normdoctor.scan(_sample_model(name), xy, batch_size=64, model_name=f"epoch{j}.pt")
        for j, name in enumerate(("healthy", "healthy", "stale"), 1)
    ]
    assert [r.flagged for r in reports] == [False, False, True]
    fig = plots.series_figure(reports)
    lower = fig.axes[1]
    lines = {line.get_label(): list(line.get_ydata()) for line in lower.get_lines()}
    for label, attr in (
        ("predictions equal in both paths", "agreement"),
        ("accuracy with batch statistics (train path)", "acc_train"),
        ("accuracy in eval mode (running statistics)", "acc_eval"),
    ):
        assert lines[label] == pytest.approx([100 * getattr(r.end_to_end, attr) for r in reports])
    stale = reports[-1]
    assert plots.headline(fig) == (
        f"Drift appeared at epoch3.pt: {len(stale.flagged_layers)} of 3 layers flagged "
        f"(agreement {100 * stale.end_to_end.agreement:.1f}%)"
    )


def test_series_page(checkpoints: list[ScanReport], tmp_path: Path) -> None:
    out = tmp_path / "series"
    index = save_report(checkpoints[-1], out, series=checkpoints, formats=("png",))
    page = check_page(index)
    order = [str(a["id"]).removeprefix("fig-") for t, a in page.tags if t == "figure"]
    assert order[:3] == ["end_to_end", "series", "drift"]
    assert (out / "series.png").is_file()
    # The page embeds the very image written beside it.
    tags = page.tags
    at = tags.index(("figure", {"id": "fig-series"}))
    img = next(a for t, a in tags[at:] if t == "img")
    embedded = base64.b64decode(str(img["src"]).split(",", 1)[1])
    assert embedded == (out / "series.png").read_bytes()
    assert img["alt"].startswith("Drift appeared at epoch2.pt")
    text = _text(page)
    start = text.index("normdoctor report")  # the header: after the <title>, before the verdict
    header = text[start : text.index(checkpoints[-1].verdict[1:], start)]
    assert "This page details epoch3.pt, the last of the 3 checkpoints scanned" in header
    assert "Eval mode first became harmful at epoch2.pt" in header
    assert "Drift over the checkpoint series" in text
    # Without a series, no series figure and no series line; its old file is removed.
    save_report(checkpoints[-1], out, force=True, formats=("png",))
    assert not (out / "series.png").exists()
    assert "checkpoints scanned" not in _text(check_page(index))


def test_end_to_end_before_and_after(drifting: ScanReport, patched: ScanReport) -> None:
    fig = plots.end_to_end_figure(drifting, patched)
    (div_ax,) = [ax for ax in fig.axes if ax.get_title() == "output divergence"]
    heights = [p.get_height() for p in div_ax.patches]
    assert heights == pytest.approx(
        [drifting.end_to_end.rel_divergence, patched.end_to_end.rel_divergence]
    )
    assert [t.get_text() for t in div_ax.get_xticklabels()] == ["before patch", "after patch"]
    assert plots.headline(fig).startswith("After the patch, output divergence is")


@pytest.mark.skipif(not HAS_SAMPLES, reason="sample_models/ not built")
def test_end_to_end_accuracy_bars() -> None:
    report = sample_report("tiny-batch")
    e = report.end_to_end
    fig = plots.end_to_end_figure(report)
    (acc_ax,) = [ax for ax in fig.axes if ax.get_title() == "accuracy per path"]
    assert [p.get_height() for p in acc_ax.patches] == pytest.approx(
        [100 * e.acc_train, 100 * e.acc_eval]
    )
    assert plots.headline(fig).startswith(
        f"Eval mode changes {100 * (1 - e.agreement):.1f}% of predictions"
    )


def test_channels_figure_plots_running_against_observed(drifting: ScanReport) -> None:
    fig = plots.channels_figure(drifting, k=2)
    worst = max(plots.measured_layers(drifting), key=lambda r: r[1].drift or 0.0)[1]
    ax_mean, ax_var = fig.axes[0], fig.axes[1]
    xy = ax_mean.collections[0].get_offsets()
    assert list(xy[:, 0]) == pytest.approx(list(worst.running_mean))
    assert list(xy[:, 1]) == pytest.approx(list(worst.train.pooled_mean))
    assert ax_var.get_xscale() == ax_var.get_yscale() == "log"
    assert len(fig.axes) == 4  # k=2 layers, two panels each


def test_render_imports_nothing_heavy_and_leaves_pyplot_alone(
    drifting: ScanReport, tmp_path: Path
) -> None:
    src = tmp_path / "r.json"
    src.write_text(drifting.to_json())
    code = (
        "import sys\n"
        "import normdoctor.render as r\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n"
        "from normdoctor.report import ScanReport\n"
        f"rep = ScanReport.from_json(open({str(src)!r}).read())\n"
        "import io; r.drift_figure(rep).savefig(io.BytesIO(), format='png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    env = {**os.environ, "MPLBACKEND": "module://nonexistent_backend"}  # must not be consulted
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


def test_page_png_is_matplotlibs_png_in_rgb_when_opaque(drifting: ScanReport) -> None:
    from PIL import Image

    for transparent in (False, True):
        fig = plots.drift_figure(drifting)
        if transparent:
            fig.patch.set_alpha(0.0)
        ours = render_html._render(fig, "png")
        theirs = io.BytesIO()
        fig.savefig(theirs, format="png", dpi=render_html.PNG_DPI)
        assert Image.open(io.BytesIO(ours)).mode == ("RGBA" if transparent else "RGB")
        assert Image.open(io.BytesIO(ours)).info["dpi"] == pytest.approx((144, 144), abs=0.01)
        assert np.array_equal(_pixels(ours), _pixels(theirs.getvalue()))
        assert b"Software" not in ours and b"tEXt" not in ours  # identical reports, identical files


def test_layout_is_solved_once_for_the_png_and_the_svg(drifting: ScanReport) -> None:
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    fig = plots.drift_figure(drifting)
    render_html._lay_out(fig)
    assert not isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    laid_out = [ax.get_position().bounds for ax in fig.axes]
    png = render_html._render(fig, "png")
    render_html._render(fig, "svg")
    # Exactly: another layout pass (the SVG's is at 72 dpi) moves the axes by a fraction of a
    # point.
    assert [ax.get_position().bounds for ax in fig.axes] == laid_out
    # ... and the PNG is the one matplotlib draws for a fresh figure, layout and all.
    fresh = io.BytesIO()
    plots.drift_figure(drifting).savefig(fresh, format="png", dpi=render_html.PNG_DPI)
    assert np.array_equal(_pixels(png), _pixels(fresh.getvalue()))


def test_dense_channel_scatters_are_one_image_in_the_svg_only() -> None:
    wide = large_report(n=4, channels=render_draw.RASTER_POINTS + 1, batches=5)
    fig = plots.channels_figure(wide, k=1)
    svg = render_html._render(fig, "svg").decode()
    assert svg.count("<image") == 2  # the mean and the variance panel's points
    assert "running mean (used in eval mode)" in svg  # labels stay text
    png = render_html._render(fig, "png")
    for ax in fig.axes:
        for coll in ax.collections:
            coll.set_rasterized(False)
    assert np.array_equal(_pixels(png), _pixels(render_html._render(fig, "png")))
    narrow = plots.channels_figure(large_report(n=4, channels=16, batches=5), k=1)
    assert "<image" not in render_html._render(narrow, "svg").decode()


# -- rendering is called on reports, not by them -------------------------------------------------


def test_report_module_never_imports_render() -> None:
    """report.py is data: render imports it, never the other way round (not even lazily)."""
    import ast

    tree = ast.parse((REPO / "normdoctor" / "report.py").read_text(encoding="utf-8"))
    imported = [
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert not [m for m in imported if "render" in m.split(".")], imported


def test_render_plot_draws_each_kind(drifting: ScanReport) -> None:
    for kind, make in (
        ("drift", plots.drift_figure),
        ("channels", plots.channels_figure),
        ("batches", plots.batch_distribution_figure),
        ("end_to_end", plots.end_to_end_figure),
    ):
        assert plots.headline(normdoctor.render.plot(drifting, kind)) == plots.headline(
            make(drifting)
        )
    with pytest.raises(ValueError, match="kind must be one of"):
        normdoctor.render.plot(drifting, "pie")


def test_report_plot_and_save_report_still_work_deprecated(
    drifting: ScanReport, tmp_path: Path
) -> None:
    with pytest.warns(DeprecationWarning, match=r"normdoctor\.render\.plot\(report, kind\)"):
        fig = drifting.plot("channels", k=2)
    assert len(fig.axes) == 4 and plots.headline(fig) == plots.headline(
        plots.channels_figure(drifting, k=2)
    )
    with pytest.warns(DeprecationWarning, match=r"normdoctor\.render\.save_report\(report"):
        index = drifting.save_report(tmp_path / "r", formats=("png",))
    assert index == (tmp_path / "r" / "index.html").absolute() and index.is_file()
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="kind must be one of"):
        drifting.plot("pie")


def test_report_plot_works_after_import_normdoctor_alone(
    drifting: ScanReport, tmp_path: Path
) -> None:
    """A notebook: ``import normdoctor``, a report, ``report.plot()``; render never named."""
    src = tmp_path / "r.json"
    src.write_text(drifting.to_json())
    code = (
        "import warnings\n"
        "import normdoctor\n"
        f"rep = normdoctor.ScanReport.from_json(open({str(src)!r}).read())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    fig = rep.plot('drift')\n"
        "assert type(fig).__name__ == 'Figure', fig\n"
        "assert w and w[0].category is DeprecationWarning, w\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# -- figures as data: the specs the drawing functions draw ---------------------------------------


def test_drift_spec_layers_and_values_are_the_reports(drifting: ScanReport) -> None:
    spec = specs.drift_spec(drifting)
    rows = plots.measured_layers(drifting)
    assert [(b.index, b.name) for b in spec.bars] == [(i, layer.name) for i, layer in rows]
    for b, (_, layer) in zip(spec.bars, rows, strict=True):
        assert b.drift == layer.drift and b.status is layer.status
        assert b.shift_part + b.noise_part + b.rest_part == pytest.approx(layer.drift)
        share = layer.shift**2 / (layer.shift**2 + layer.noise**2)
        assert b.shift_part == pytest.approx(layer.drift * share) and b.rest_part == 0.0
    assert spec.threshold == drifting.threshold and spec.named
    assert spec.top == max(max(layer.drift for _, layer in rows), drifting.threshold)
    assert spec.value_label == S.DRIFT_LABEL and spec.layer_label == "layer (forward order)"
    # The drawing draws exactly the spec: same title, caption, bars in the same order.
    fig = render_draw.drift(spec)
    assert plots.headline(fig) == spec.title and plots.caption(fig) == spec.caption
    shift = _bars(fig.axes[0], "shift share")
    assert [p.get_width() for p in shift] == [b.shift_part for b in spec.bars]


def test_drift_spec_title_states_the_conclusion(healthy: ScanReport) -> None:
    harmful = large_report()
    n_dep = sum(1 for layer in harmful.layers if layer.batch_dependent)
    spec = specs.drift_spec(harmful)
    assert harmful.harmful and harmful.flagged
    assert spec.title.startswith(f"{len(harmful.flagged_layers)} of {n_dep} layers drift; worst: ")
    # Numbered view: every layer's # on the axis, the worst ten listed, worst first.
    assert not spec.named and spec.n_layers == len(harmful.layers) == 200
    worst = sorted(plots.measured_layers(harmful), key=lambda r: -(r[1].drift or 0.0))[:10]
    assert [b.index for b in spec.worst] == [i for i, _ in worst]
    assert spec.worst_lines[0] == f"worst 10 of {len(spec.bars)} layers"
    assert "hatched" in spec.caption

    ok = specs.drift_spec(healthy)
    assert not healthy.harmful and not healthy.drifting_layers
    assert ok.title.startswith(f"No layer drifts above {healthy.threshold:g}; worst: ")
    assert "hatched" not in ok.caption
    compounding = specs.drift_spec(dataclasses.replace(healthy, harmful=True))
    assert "yet outputs diverge: the drift compounds" in compounding.title
    harmless = dataclasses.replace(
        healthy,
        layers=tuple(
            dataclasses.replace(layer, status=LayerStatus.HARMLESS) if layer.drift else layer
            for layer in healthy.layers
        ),
    )
    assert ", harmless on this data; " in specs.drift_spec(harmless).title


def test_channels_and_batches_specs_are_the_reports(drifting: ScanReport) -> None:
    spec = specs.channels_spec(drifting, k=2)
    worst = sorted(plots.measured_layers(drifting), key=lambda r: -(r[1].drift or 0.0))[:2]
    assert [row.index for row in spec.rows] == [i for i, _ in worst]
    row, layer = spec.rows[0], worst[0][1]
    assert list(row.mean.live[0]) == pytest.approx(list(layer.running_mean))
    assert list(row.mean.live[1]) == pytest.approx(list(layer.train.pooled_mean))
    assert row.var.log and not row.mean.log and row.mean.limits is not None
    assert spec.title.startswith("Running statistics")

    b = specs.batches_spec(drifting, k=2)
    assert [r.index for r in b.rows] == [i for i, _ in worst]
    batch_drift = sorted(worst[0][1].train.batch_drift)
    assert sorted(b.rows[0].points) == pytest.approx(batch_drift)  # fewer than MAX_POINTS
    assert b.rows[0].quantiles[0] >= batch_drift[0] and b.rows[0].quantiles[-1] <= batch_drift[-1]
    assert b.rows[0].drift == worst[0][1].drift and b.threshold == drifting.threshold
    assert specs.batches_spec(drifting, k=2) == b  # the same points and jitter every time


def test_end_to_end_spec_values_are_the_reports(drifting: ScanReport, patched: ScanReport) -> None:
    spec = end_to_end.end_to_end_spec(drifting, patched)
    assert spec.labels == ("before patch", "after patch")
    (div,) = [p for p in spec.panels if p.kind == "div"]
    assert div.values == (
        (drifting.end_to_end.rel_divergence,),
        (patched.end_to_end.rel_divergence,),
    )
    assert div.threshold == drifting.divergence_threshold
    assert spec.title.startswith("After the patch, output divergence is")
    with pytest.raises(plots.NothingToPlot):
        end_to_end.end_to_end_spec(dataclasses.replace(drifting, end_to_end=None))


def test_sweep_and_series_specs_are_the_reports(
    sweep: dict[int, ScanReport], checkpoints: list[ScanReport]
) -> None:
    spec = trends.sweep_spec(list(sweep.values())[::-1], 8)
    assert spec.sizes == tuple(sorted(sweep)) and spec.ticks == tuple(sorted(sweep))
    for curve in spec.curves.curves:
        assert curve.values == tuple(sweep[b].layer(curve.name).drift for b in spec.sizes)
    assert "training batch size 8" in spec.title
    assert spec.lower is not None and spec.lower.kind == "div"  # no labels: output divergence

    s = trends.series_spec(checkpoints)
    assert s.n == 3 and s.first == 1 and s.tick_labels == tuple(r.model for r in checkpoints)
    flagged = {
        (float(j), r.layer(name).drift)
        for j, r in enumerate(checkpoints)
        for name in (layer.name for layer in r.layers)
        if r.layer(name).flagged
    }
    assert set(s.marks[LayerStatus.FLAGGED]) == flagged
    assert s.bold == tuple(r.flagged for r in checkpoints)
    assert s.title.startswith("Drift appeared at epoch2.pt")


def test_specs_need_no_matplotlib(drifting: ScanReport, tmp_path: Path) -> None:
    src = tmp_path / "r.json"
    src.write_text(drifting.to_json())
    code = (
        "import sys\n"
        "from normdoctor.render import end_to_end, specs, trends\n"
        "from normdoctor.report import ScanReport\n"
        f"rep = ScanReport.from_json(open({str(src)!r}).read())\n"
        "specs.drift_spec(rep); specs.channels_spec(rep); specs.batches_spec(rep)\n"
        "end_to_end.end_to_end_spec(rep); trends.series_spec([rep, rep])\n"
        "assert 'matplotlib' not in sys.modules, 'a spec imported matplotlib'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

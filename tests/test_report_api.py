"""The Python API in a notebook (issue 15): ``progress=True/False``, short reprs, the HTML and
rich views of a report, and one non-i.i.d. value on every surface."""

from __future__ import annotations

import html
import io
import json
import re

import numpy as np
import pytest
import torch
from rich.console import Console

import normdoctor
from normdoctor import report as report_module
from normdoctor.cli import main
from normdoctor.progress import as_callback
from normdoctor.render import save_report
from normdoctor.render.style import num
from normdoctor.report import ScanReport, significant
from normdoctor.testing import assert_no_drift, stale_stack


@pytest.fixture(scope="module")
def small():
    return stale_stack(6, samples=96)


@pytest.fixture(scope="module")
def big():
    model, x, y = stale_stack(150)
    return normdoctor.scan(model, (x, y), batch_size=32)


def test_progress_true_false_and_callable_give_the_same_report(small, capsys):
    model, x, y = small
    plain = normdoctor.scan(model, (x, y), batch_size=32)
    assert capsys.readouterr().err == ""
    off = normdoctor.scan(model, (x, y), batch_size=32, progress=False)
    assert capsys.readouterr().err == ""
    on = normdoctor.scan(model, (x, y), batch_size=32, progress=True)
    err = capsys.readouterr().err
    assert "scanning" in err and "3/3" in err  # 3 batches, both paths each
    calls = []
    called = normdoctor.scan(
        model, (x, y), batch_size=32, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (3, 3)
    assert plain.to_dict() == off.to_dict() == on.to_dict() == called.to_dict()


def test_progress_true_through_autopatch(small, capsys):
    model, x, y = small
    _, before, after = normdoctor.autopatch(model, (x, y), batch_size=32, progress=True)
    assert before.flagged and not after.flagged
    assert "scanning" in capsys.readouterr().err


def test_progress_rejects_other_values(small):
    model, x, y = small
    with pytest.raises(TypeError, match="progress must be True"):
        normdoctor.scan(model, (x, y), batch_size=32, progress="yes")
    assert as_callback(None) is None and as_callback(False) is None


def test_repr_is_short_for_150_layers(big):
    text = repr(big)
    assert len(text) < 2000, len(text)
    assert big.model in text and "harmful" in text and "148 flagged, 2 ok" in text
    assert text.count("#") == 3  # the worst 3 layers
    layer = repr(big.layers[0])
    assert len(layer) < 200 and "running" not in layer and "(" in layer
    assert layer.startswith("<LayerReport 'blocks.1' BatchNorm2d(4): ok")


def test_repr_html_has_the_verdict_the_groups_and_the_figure(big):
    page = big._repr_html_()
    assert html.escape(big.verdict) in page
    assert '<img alt="drift per layer"' in page and "data:image/png;base64," in page
    assert "148 layers (#3–150) flagged → recalibrate" in page
    assert page.count("<tr") == 11  # header and the worst 10


def test_repr_html_without_render_is_plain(big, monkeypatch):
    monkeypatch.setattr(report_module, "_PRESENTERS", {})
    page = big._repr_html_()
    assert page.startswith("<pre>") and "harmful" in page


def test_rich_prints_the_terminal_view(big):
    console = Console(file=io.StringIO(), width=100)
    console.print(big)
    out = console.file.getvalue()
    assert out.splitlines()[1].startswith("✗ harmful")
    assert "148 layers (#3–150) flagged" in out


def test_noniid_is_the_eval_paths_on_every_surface(tmp_path, capsys):
    model, x, y = stale_stack(4, samples=96, fresh=0)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    np.savez(tmp_path / "d.npz", inputs=x.numpy(), labels=y.numpy())
    main(
        [
            "scan",
            str(tmp_path / "m.pt"),
            "--arch",
            "normdoctor.testing:StaleStack",
            "--arch-kwargs",
            '{"depth": 4}',
            "--data",
            str(tmp_path / "d.npz"),
            "--train-batch-size",
            "32",
            "--json",
            str(tmp_path / "scan.json"),
        ]
    )
    terminal = capsys.readouterr().out
    header = next(line for line in terminal.splitlines() if line.startswith("#  layer")).split()
    data = json.loads((tmp_path / "scan.json").read_text())
    report = ScanReport.from_dict(data)
    page = save_report(report, tmp_path / "html", formats=("png",)).read_text()
    differ = 0  # the first layer's input does not depend on the batch: both paths agree there
    for i, (layer, entry) in enumerate(zip(report.layers, data["layers"], strict=True), 1):
        assert layer.eval is not None and layer.train is not None
        assert layer.noniid == layer.eval.noniid
        differ += layer.eval.noniid != layer.train.noniid
        assert entry["noniid"] == layer.noniid  # the JSON's top level
        row = next(r for r in terminal.splitlines() if re.match(rf"^\s*{i}\s+{layer.name}\s", r))
        column = header.index("noniid")
        assert row.split()[column] == significant(layer.noniid)  # the terminal's noniid column
        cell = re.search(
            rf"<td[^>]*>{re.escape(layer.name)}</td>.*?"
            r'<td data-label="non-iid"[^>]*>([^<]*)</td>',
            page,
            re.S,
        )
        assert cell is not None and cell.group(1) == num(layer.noniid)  # the HTML page
    assert differ >= 2


def test_assert_no_drift_fails_with_the_terminal_view(small):
    model, x, y = small
    with pytest.raises(AssertionError) as failure:
        assert_no_drift(model, (x, y), batch_size=32, width=100)
    message = str(failure.value)
    lines = message.splitlines()
    assert lines[0].startswith("normalization drift: harmful")
    assert lines[2].startswith("✗ harmful")  # the view's verdict, under its model line
    assert "recalibrate" in message and "\x1b[" not in message
    assert all(len(line) <= 100 for line in lines[1:])

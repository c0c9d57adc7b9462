"""The terminal output of ``scan`` (issue 15): big models verdict first and grouped, piped output
never wrapped, terminal output wrapped without breaking names, one precision per column,
1-based layer numbers, compositions described by their real sizes."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from rich.console import Console

import normdoctor
from normdoctor.cli import main
from normdoctor.render.console import print_scan, print_sweep
from normdoctor.report import Composition
from normdoctor.testing import stale_stack

ARCH = "normdoctor.testing:StaleStack"
LONG_STEM = "p2o.BatchNormalization_of_an_exported_onnx_graph_node_named"  # names: 61-62


def _files(tmp_path, depth, stem="blocks", **kwargs):
    model, x, y = stale_stack(depth, stem=stem, **kwargs)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.savez(tmp_path / "data.npz", inputs=x.numpy(), labels=y.numpy())
    args = [str(tmp_path / "model.pt"), "--arch", ARCH, "--data", str(tmp_path / "data.npz")]
    if depth != 150 or stem != "blocks":
        args += ["--arch-kwargs", f'{{"depth": {depth}, "stem": "{stem}"}}']
    return model, (x, y), args


def _no_trailing_whitespace(text):
    bad = [line for line in text.splitlines() if line != line.rstrip()]
    assert bad == []


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("big")
    model, data, args = _files(tmp, 150)
    return model, data, args


@pytest.fixture(scope="module")
def big_report(big):
    model, data, _ = big
    return normdoctor.scan(model, data, batch_size=32)


def test_150_layers_verdict_first_findings_grouped(big, capsys):
    _, _, args = big
    code = main(["scan", *args, "--train-batch-size", "32"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert code == 1  # harmful
    verdict = [i for i, line in enumerate(lines) if line.startswith("✗ harmful")]
    assert verdict and verdict[0] < 10, out
    assert "148 layers (#3–150) flagged → recalibrate: running statistics are stale" in out
    assert "2 layers (#1–2) ok" in out
    assert "150 layers: 148 flagged, 2 ok" in out
    assert "140 more layers not shown" in out
    assert len(lines) < 40, out  # was 305 lines
    # the worst 10 in full, worst first, numbered from 1 in forward order
    rows = [line for line in lines if re.match(r"^\s*\d+\s+blocks\.\d+\s", line)]
    assert len(rows) == 10
    numbers = [int(r.split()[0]) for r in rows]
    names = [r.split()[1] for r in rows]
    assert all(name == f"blocks.{3 * (n - 1) + 1}" for n, name in zip(numbers, names, strict=True))
    header = next(line for line in lines if line.startswith("  #  layer")).split()
    drifts = [float(r.split()[header.index("drift")]) for r in rows]
    assert drifts == sorted(drifts, reverse=True)
    _no_trailing_whitespace(out)


def test_all_layers_lists_every_layer_in_forward_order(big_report):
    report = big_report
    console = Console(width=120, force_terminal=True, color_system=None)
    with console.capture() as capture:
        print_scan(report, console, all_layers=True)
    out = capture.get()
    rows = [line for line in out.splitlines() if re.match(r"^\s*\d+\s+blocks\.\d+\s", line)]
    assert [int(r.split()[0]) for r in rows] == list(range(1, 151))
    assert "more layers not shown" not in out
    assert out.splitlines()[1].startswith("✗ harmful")


def test_piped_output_keeps_long_names_whole(tmp_path, capsys):
    model, _, args = _files(tmp_path, 4, stem=LONG_STEM, fresh=0)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert min(len(n) for n in names) >= 60
    main(["scan", *args, "--train-batch-size", "32"])
    out = capsys.readouterr().out
    for name in names:
        assert re.search(rf"(^|\s){re.escape(name)}(\s|:|$)", out, re.M), (name, out)
    assert max(len(line) for line in out.splitlines()) > 100  # not folded at 80 columns
    _no_trailing_whitespace(out)


def test_terminal_wraps_text_with_indent_and_never_breaks_names(tmp_path, big_report):
    model, data, _ = _files(tmp_path, 4, stem=LONG_STEM, fresh=0)
    report = normdoctor.scan(model, data, batch_size=32)
    names = [layer.name for layer in report.layers]
    console = Console(width=80, force_terminal=True, color_system=None)
    with console.capture() as capture:
        print_scan(report, console, verbose=True)
    out = capture.get()
    lines = out.splitlines()
    rows = [line for line in lines if re.match(r"^\d+\s+p2o\.", line)]
    assert [r.split()[1] for r in rows] == names  # one line per layer, every name whole
    # paragraphs wrap at 80 columns and their continuation lines keep an indent
    reasons = [i for i, line in enumerate(lines) if re.match(r"^  #\d+ p2o\.", line)]
    assert len(reasons) == 4
    for i in reasons:
        assert len(lines[i]) <= 80 and lines[i + 1].startswith("      "), out
    table = [*rows, next(line for line in lines if line.startswith("#  layer"))]
    assert all(len(line) <= 80 for line in lines if line not in table)
    _no_trailing_whitespace(out)

    with console.capture() as capture:
        print_scan(big_report, console, fix_command="normdoctor patch model.pt " + "--x y " * 20)
    lines = capture.get().splitlines()
    fix = next(i for i, line in enumerate(lines) if line.startswith("  fix: normdoctor patch"))
    assert lines[fix + 1].startswith("      --x y")
    assert all(len(line) <= 80 for line in lines)
    _no_trailing_whitespace(capture.get())


def test_numbers_three_significant_digits_and_1_based(big_report):
    report = big_report
    console = Console(file=None, width=200, force_terminal=True, color_system=None)
    with console.capture() as capture:
        print_scan(report, console)
    rows = [
        line.split() for line in capture.get().splitlines() if re.match(r"^\s*\d+\s+blocks", line)
    ]
    assert rows
    for row in rows:
        for cell in row[4:9]:  # drift, worst, shift, noise, noniid
            digits = cell.replace(".", "").lstrip("0")
            assert len(digits) == 3, (cell, row)
    numbers = {int(r[0]) for r in rows}
    assert min(numbers) >= 1 and max(numbers) <= 150


def test_sweep_table_keeps_right_alignment_with_marks(tmp_path):
    model, data, _ = _files(tmp_path, 4)
    reports = [normdoctor.scan(model, data, batch_size=b) for b in (16, 64)]
    console = Console(width=60, force_terminal=False)  # piped
    with console.capture() as capture:
        print_sweep(reports, console)
    out = capture.get()
    rows = [line for line in out.splitlines() if line.startswith(("blocks.", "agreement"))]
    assert len(rows) == 5

    def ends(line):  # where each value's mark ("*" or a space) ends
        return tuple(m.end() + (not m.group().endswith("*")) for m in re.finditer(r"\S+", line))[1:]

    assert len({ends(line) for line in rows}) == 1, out
    _no_trailing_whitespace(out)


def test_composition_descriptions():
    per_sample = Composition(
        source="tensor",
        batch_size=1,
        order="shuffle",
        seed=0,
        group_by=None,
        num_batches=360,
        num_samples=360,
        min_batch=1,
        max_batch=1,
    )
    assert per_sample.description == (
        "batches of 1, shuffled (seed 0): 360 batches of 1 sample, 360 samples"
    )


def test_grouped_batches_are_described_by_their_real_sizes(tmp_path):
    model, (x, _), _ = _files(tmp_path, 2, samples=112)
    labels = torch.tensor([0] * 31 + [1] * 36 + [2] * 45)
    report = normdoctor.scan(model, (x, labels), batch_size=64, group_by="label", shuffle=False)
    assert report.composition.description == (
        "31-45 samples per batch, one label each, in data order: 3 batches, 112 samples"
    )
    assert "batches of 64" not in report.composition.description

"""The package's layout holds (README, "How the code is laid out").

* no import circles between normdoctor's modules, counting every import: module level,
  inside functions and under ``TYPE_CHECKING`` (a lazy import is still a dependency);
* no module over 900 lines;
* no private name (``_x``) imported from another module (``_module.py`` files are
  package-internal and may be imported; the names taken from them are public ones);
* the low layers never import the high ones (report data never imports rendering; the maths
  never imports a source, the loaders never import the fixes);
* one driver: a torch scan and an ONNX scan of the same sample go through the same batch loop.
"""

from __future__ import annotations

import ast
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "normdoctor"
MAX_LINES = 900


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(module: str, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(
    sources: dict[str, str] | None = None,
) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> normdoctor modules it imports, [(module, from, private name)]) over the
    package's files, or over ``sources`` (module name -> code, for testing the checker)."""
    if sources is None:
        sources = {module: path.read_text() for module, path in MODULES.items()}
    edges: dict[str, set[str]] = defaultdict(set)
    private = []
    for module, code in sources.items():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom):
                base = _target(module, node)
                if not base or base.split(".")[0] != "normdoctor":
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in MODULES else base
                    if target in MODULES and target != module:
                        edges[module].add(target)
                    name = alias.name
                    if name.startswith("_") and not name.startswith("__") and full not in MODULES:
                        private.append((module, base, name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.name != module:
                        edges[module].add(alias.name)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_lazy_circles_and_private_imports():
    code = {
        "normdoctor.scan": "from .report import ScanReport\n",
        "normdoctor.report": "def plot():\n    from .scan import _helper\n",
    }
    edges, private = _imports(code)
    assert edges == {
        "normdoctor.scan": {"normdoctor.report"},
        "normdoctor.report": {"normdoctor.scan"},
    }
    assert _cycles(edges) == [["normdoctor.report", "normdoctor.scan"]]
    assert private == [("normdoctor.report", "normdoctor.scan", "_helper")]


def test_no_import_circles():
    edges, _ = _imports()
    assert _cycles(edges) == []


def test_no_private_names_cross_modules():
    _, private = _imports()
    assert private == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_900_lines(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_LINES, f"{module}: {lines} lines"


# What may not import what: (importer prefix, forbidden prefixes).
FORBIDDEN = [
    ("normdoctor.report", ("normdoctor.render", "normdoctor.scan", "normdoctor.sources")),
    ("normdoctor.stats", ("normdoctor.",)),
    ("normdoctor.values", ("normdoctor.",)),
    ("normdoctor.metrics", ("normdoctor.",)),
    ("normdoctor.verdict", ("normdoctor.scan", "normdoctor.sources", "normdoctor.render")),
    ("normdoctor.recording", ("normdoctor.sources", "normdoctor.scan", "normdoctor.io")),
    ("normdoctor.deferred", ("normdoctor.sources", "normdoctor.scan", "normdoctor.io")),
    ("normdoctor.checks", ("normdoctor.io", "normdoctor.scan", "normdoctor.sources")),
    ("normdoctor.io", ("normdoctor.patch", "normdoctor.scan", "normdoctor.render")),
    ("normdoctor.sources", ("normdoctor.io", "normdoctor.render", "normdoctor.cli")),
    ("normdoctor.scan", ("normdoctor.patch", "normdoctor.render", "normdoctor.cli")),
    ("normdoctor.render", ("normdoctor.cli", "normdoctor.scan", "normdoctor.patch")),
]


def test_low_layers_do_not_import_high_ones():
    edges, _ = _imports()
    bad = []
    for module, targets in edges.items():
        for importer, forbidden in FORBIDDEN:
            if module == importer or module.startswith(importer + "."):
                bad += [
                    (module, t)
                    for t in targets
                    if any(
                        t == f.rstrip(".") or t.startswith(f.rstrip(".") + ".") for f in forbidden
                    )
                    and t != module
                ]
    assert sorted(set(bad)) == []


def test_a_torch_scan_and_an_onnx_scan_go_through_the_same_loop(monkeypatch):
    pytest.importorskip("onnxruntime")
    import numpy as np
    import torch

    import normdoctor
    from normdoctor.io import load_model

    driver = importlib.import_module(
        "normdoctor.scan"
    )  # the module (the package binds the function)
    samples = Path(__file__).resolve().parents[1] / "sample_models"
    if not (samples / "healthy.onnx").exists():
        pytest.skip("sample ONNX not built")
    seen = []
    original = driver._Run.both_paths

    def spy(self, plan, paths, sharded):
        seen.append(type(self.source).__name__)
        return original(self, plan, paths, sharded)

    monkeypatch.setattr(driver._Run, "both_paths", spy)
    data = np.load(samples / "data" / "test.npz")
    x, y = torch.from_numpy(data["inputs"])[:96], torch.from_numpy(data["labels"])[:96]
    torch_model = load_model(samples / "healthy.pt", arch="sample_models.archs:DigitsCNN")
    onnx_model = load_model(samples / "healthy.onnx")
    a = normdoctor.scan(torch_model, (x, y), batch_size=32)
    b = normdoctor.scan(onnx_model, (x, y), batch_size=32)
    c = onnx_model.scan((x, y), batch_size=32)
    assert seen == ["TorchSource", "OnnxSource", "OnnxSource"]
    assert a.status == b.status == c.status
    assert [r.order for r in a.layers] == [r.order for r in b.layers]
    assert b.end_to_end == c.end_to_end
    assert a.end_to_end.agreement == b.end_to_end.agreement

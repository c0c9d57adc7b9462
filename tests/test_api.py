"""The public API: everything in __all__ exists, and importing it stays light."""

from __future__ import annotations

import subprocess
import sys

import normdoctor


def test_everything_in_all_is_importable():
    for name in normdoctor.__all__:
        assert hasattr(normdoctor, name), name
    namespace: dict = {}
    exec("from normdoctor import *", namespace)
    assert set(normdoctor.__all__) <= set(namespace)


def test_import_does_not_load_matplotlib_onnx_or_rich():
    code = (
        "import sys, normdoctor; "
        "print(sorted(m for m in ('matplotlib', 'onnx', 'onnxruntime', 'rich', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

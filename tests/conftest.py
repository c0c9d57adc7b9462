"""Shared fixtures."""

from __future__ import annotations

import pytest

from normdoctor import _fused


@pytest.fixture(params=["numba", "torch"])
def hot_path(request):
    """Run the test once with the fused kernel (numba) and once with stock torch ops."""
    if request.param == "numba":
        pytest.importorskip("numba")
    _fused.use(request.param)
    yield request.param
    _fused.use()

"""The process is left as found: thread counts, default dtype, grad mode, random generators."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import normdoctor as nd
from normdoctor import _fused
from normdoctor._globals import preserved_globals, rng_state, set_rng_state
from normdoctor.io import load_data, load_model

ROOT = Path(__file__).resolve().parents[1]
SM = ROOT / "sample_models"


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    model = load_model(SM / "stale.pt", f"{SM / 'archs.py'}:DigitsCNN")
    return model, load_data(SM / "data" / "test.npz")


def test_the_first_kernel_use_leaves_torch_threads_alone():
    """In a fresh process: starting numba's pool used to reset torch to all cores."""
    script = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads(1)
        import normdoctor as nd
        from normdoctor import _fused
        from normdoctor.io import load_data, load_model
        model = load_model({str(SM / "healthy.pt")!r}, {str(SM / "archs.py") + ":DigitsCNN"!r})
        data = load_data({str(SM / "data" / "test.npz")!r})
        nd.scan(model, data, max_batches=2)
        print(torch.get_num_threads(), _fused.kernel() is not None)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    threads, _ = proc.stdout.split()
    assert threads == "1"


@pytest.mark.parametrize("entry", ["scan", "recalibrate", "patch"])
def test_torch_threads_unchanged(one_thread, digits, hot_path, entry):
    model, data = digits
    if entry == "scan":
        nd.scan(model, data, max_batches=2)
    elif entry == "recalibrate":
        nd.recalibrate(model, data, max_batches=2)
    else:
        nd.patch(model, "batchstats")
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("entry", ["recalibrate", "patch"])
def test_numba_threads_unchanged(digits, entry):
    numba = pytest.importorskip("numba")
    if _fused.kernel() is None:
        pytest.skip("the fused kernel is not available")
    model, data = digits
    threads = torch.get_num_threads()
    numba.set_num_threads(1)  # the kernel would match torch's count
    try:
        if entry == "recalibrate":
            nd.recalibrate(model, data, max_batches=2)
        else:
            nd.patch(model, "recalibrate", data=data, max_batches=2)
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        torch.set_num_threads(threads)


def test_preserved_globals_restores_everything():
    threads = torch.get_num_threads()
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    with torch.no_grad():
        with preserved_globals():
            torch.set_num_threads(max(1, threads - 1) if threads > 1 else 2)
            torch.set_default_dtype(torch.float64)
            torch.set_grad_enabled(True)
            torch.manual_seed(99)
            torch.rand(10)
            np.random.seed(99)
            random.seed(99)
        assert not torch.is_grad_enabled()
    assert torch.get_num_threads() == threads
    assert torch.get_default_dtype() == torch.float32
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_preserved_globals_restores_on_error_and_as_a_decorator():
    @preserved_globals()
    def fails() -> None:
        torch.set_default_dtype(torch.float64)
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        fails()
    assert torch.get_default_dtype() == torch.float32


def test_forwards_stay_bit_identical_around_a_scan(digits):
    model, data = digits
    x = torch.as_tensor(np.load(SM / "data" / "test.npz")["inputs"][:64]).float()
    model.eval()
    with torch.no_grad():
        before = model(x)
    nd.scan(model, data, max_batches=2)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(before, after)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_cycle_collector_is_as_it_was_after_a_scan(digits, enabled):
    # Setting up and closing a scan hold the collector off (_globals.paused_gc); the batch loop
    # runs with it as the user had it, and afterwards it is as it was, even after an error.
    import gc

    from normdoctor._globals import paused_gc

    model, data = digits
    seen = []
    tap = model.register_forward_pre_hook(lambda m, a: seen.append(gc.isenabled()))
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        nd.scan(model, data, batch_size=32, max_batches=2, paths=("eval",))
        assert gc.isenabled() is enabled
        assert seen and all(s is enabled for s in seen)  # the forwards ran with it as set
        with pytest.raises(ZeroDivisionError), paused_gc():
            assert not gc.isenabled()
            1 / 0  # noqa: B018
        assert gc.isenabled() is enabled
    finally:
        tap.remove()
        (gc.enable if was else gc.disable)()


def _numpy_state() -> tuple:
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return name, key.tobytes(), pos, has_gauss, gauss


@pytest.mark.parametrize(
    "draw",
    [
        lambda: np.random.standard_normal(),  # consumes a cached normal: only has_gauss moves
        lambda: np.random.standard_normal(7),
        lambda: np.random.rand(700),  # past one 624-word block: the key regenerated
        lambda: np.random.seed(99),
        lambda: None,
    ],
    ids=["one-normal", "normals", "uniforms", "seed", "nothing"],
)
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
def test_numpy_snapshot_is_byte_exact(draw, cached):
    """The snapshot restores all of get_state: key, position and the cached second normal."""
    np.random.seed(5)
    if cached:
        np.random.standard_normal()  # one of a pair: the other one cached
    assert np.random.get_state()[3] == int(cached)
    saved = rng_state()
    assert isinstance(saved[2], tuple), "the fast snapshot is in use on this NumPy"
    want = _numpy_state()
    ahead = np.random.standard_normal(5)
    set_rng_state(saved)
    draw()
    set_rng_state(saved)
    assert _numpy_state() == want
    assert np.array_equal(np.random.standard_normal(5), ahead)


def test_numpy_snapshot_survives_a_swapped_bit_generator():
    np.random.seed(6)
    saved, want = rng_state(), _numpy_state()
    np.random.set_bit_generator(np.random.PCG64(1))
    np.random.rand(3)
    set_rng_state(saved)
    assert type(np.random.mtrand._rand._bit_generator) is np.random.MT19937
    assert _numpy_state() == want


def test_numpy_snapshot_outlives_a_nested_save_of_another_generator():
    """A save in between that finds another generator does not change where the outer one
    writes back."""
    np.random.seed(7)
    outer, want = rng_state(), _numpy_state()
    np.random.set_bit_generator(np.random.PCG64(3))
    inner = rng_state()
    np.random.rand(2)
    set_rng_state(inner)
    set_rng_state(outer)
    assert _numpy_state() == want


def test_numpy_snapshot_falls_back_to_get_state_for_other_generators():
    """Another bit generator as NumPy's global one: get_state and set_state, still exact."""
    before = np.random.mtrand._rand._bit_generator
    np.random.set_bit_generator(np.random.PCG64(2))
    try:
        saved = rng_state()
        assert isinstance(saved[2], dict)
        ahead = np.random.rand(4)
        set_rng_state(saved)
        assert np.array_equal(np.random.rand(4), ahead)
    finally:
        np.random.set_bit_generator(before)

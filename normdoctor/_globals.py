"""Process-wide state that normdoctor may touch, saved on entry and put back on exit.

A scan must leave the process as it found it: a later forward pass of the user's code has to be
bit-identical to an earlier one.  Starting numba's thread pool resets torch's thread count, the
fused kernel sets numba's, and library code may seed or draw from the global generators.
"""

from __future__ import annotations

import contextlib
import gc
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["paused_gc", "preserved_globals"]


def _numba_threads() -> int | None:
    """numba's thread count for this thread, without starting its pool (which resets torch's)."""
    if "numba" not in sys.modules:
        return None
    try:
        from numba.np.ufunc import parallel
    except ImportError:
        return None
    if not getattr(parallel, "_is_initialized", False):
        return None
    return int(parallel.get_num_threads())


@dataclass(frozen=True)
class _Saved:
    torch_threads: int
    numba_threads: int | None
    default_dtype: torch.dtype
    grad: bool
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    numpy_rng: Any
    python_rng: Any


def _save() -> _Saved:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return _Saved(
        torch_threads=torch.get_num_threads(),
        numba_threads=_numba_threads(),
        default_dtype=torch.get_default_dtype(),
        grad=torch.is_grad_enabled(),
        torch_rng=torch.random.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if cuda else None,
        numpy_rng=np.random.get_state(),
        python_rng=random.getstate(),
    )


def _restore(saved: _Saved) -> None:
    now = _numba_threads()
    if now is not None:  # started or changed inside: numba's default is NUMBA_NUM_THREADS
        import numba

        most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set when numba loads
        want = saved.numba_threads or most
        if now != want:
            numba.set_num_threads(want)
    if torch.get_num_threads() != saved.torch_threads:  # after numba: its pool start resets it
        torch.set_num_threads(saved.torch_threads)
    if torch.get_default_dtype() != saved.default_dtype:
        torch.set_default_dtype(saved.default_dtype)
    torch.set_grad_enabled(saved.grad)
    torch.random.set_rng_state(saved.torch_rng)
    if saved.cuda_rng is not None:
        torch.cuda.set_rng_state_all(saved.cuda_rng)
    np.random.set_state(saved.numpy_rng)
    random.setstate(saved.python_rng)


@contextlib.contextmanager
def preserved_globals() -> Iterator[None]:
    """Save and restore torch's and numba's thread counts, torch's default dtype and grad mode,
    and the global random generators (torch CPU and CUDA, numpy, Python).

    Usable as ``with preserved_globals():`` or as a decorator ``@preserved_globals()``.  Nested
    uses are fine.  The thread counts are those of the calling thread.
    """
    saved = _save()
    try:
        yield
    finally:
        _restore(saved)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Hold off Python's cycle collector for a bounded stretch of work (setting up or closing a
    scan), as :mod:`timeit` does while it times.

    Setting up and closing a scan allocate a few dozen containers per layer; in a process that
    holds a large model each allocation burst triggers collections that walk every tracked
    object, which measured a tenth to a fifth of a 500-layer scan's fixed cost.  Reference
    counting frees everything as usual; only cycles wait, until the collector is back on (on
    exit, as it was).  Never around the batch loop, whose garbage grows with the data.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()

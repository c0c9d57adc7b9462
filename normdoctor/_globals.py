"""Process-wide state that normdoctor may touch, saved on entry and put back on exit.

A scan must leave the process as it found it: a later forward pass of the user's code has to be
bit-identical to an earlier one.  Starting numba's thread pool resets torch's thread count, the
fused kernel sets numba's, and library code may seed or draw from the global generators.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["paused_gc", "preserved_globals", "rng_state", "set_rng_state"]


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


def rng_state() -> tuple[Any, ...]:
    """The global random generators' states (torch CPU and CUDA, NumPy's, Python's), for
    :func:`set_rng_state`."""
    cuda = torch.cuda.is_initialized() and torch.cuda.is_available()  # the cheap test first
    return (
        torch.random.get_rng_state(),
        torch.cuda.get_rng_state_all() if cuda else None,
        _numpy_rng.save(),
        random.getstate(),
    )


def set_rng_state(state: tuple[Any, ...]) -> None:
    """Put back what :func:`rng_state` returned, bit for bit."""
    cpu, cuda, numpy_rng, python_rng = state
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    _numpy_rng.restore(numpy_rng)
    random.setstate(python_rng)


@dataclass(frozen=True)
class _Saved:
    torch_threads: int
    numba_threads: int | None
    default_dtype: torch.dtype
    grad: bool
    rng: tuple[Any, ...]


def _save() -> _Saved:
    return _Saved(
        torch_threads=torch.get_num_threads(),
        numba_threads=_numba_threads(),
        default_dtype=torch.get_default_dtype(),
        grad=torch.is_grad_enabled(),
        rng=rng_state(),
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
    set_rng_state(saved.rng)


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


# -- NumPy's global generator -------------------------------------------------------------------
_MT_BYTES = 624 * 4 + 4  # MT19937's state: uint32 key[624], int pos
_AUG_BYTES = 16  # the legacy normal cache after its pointer: int has_gauss, padding, double gauss


class _NumpyRng:
    """Snapshots of NumPy's global generator (what ``np.random.rand``, ``np.random.seed``...
    use), byte for byte, without ``get_state``/``set_state``: those copy the 624-word key one
    element at a time, 55-60 us each on this project's machines (measured): 1.2M of the 2.7M
    instructions of the monitor's check at batch size 1, its eval-mode forward included.  Here
    a save costs about 2 us and a restore about 2 us.

    What is copied is the MT19937 state (at the address the bit generator's ``ctypes``
    interface gives) and the RandomState's cache of the second normal of a pair
    (``has_gauss``, ``gauss``: part of ``get_state()``, reachable through no interface).  The
    cache's place in the object is found once per process by the two pointers that lead to
    it, and used only once reads agree with ``get_state`` (before and after draws) and a write
    round-trips; anywhere that fails (another NumPy's layout, another bit generator), the
    states are ``get_state``'s, restored with ``set_state``.
    """

    def __init__(self) -> None:
        self._rs: Any = None
        self._bg: Any = None
        self._state = 0  # address of the MT19937 state
        self._aug = 0  # address of has_gauss, gauss (0: use get_state)

    def save(self) -> Any:
        rs = np.random.mtrand._rand
        bg = rs._bit_generator
        if rs is not self._rs or bg is not self._bg:
            self._locate(rs, bg)
        if not self._aug:
            return rs.get_state(legacy=False)  # a dict (any bit generator)
        state = ctypes.string_at(self._state, _MT_BYTES)
        return bg, state, self._aug, ctypes.string_at(self._aug, _AUG_BYTES)

    def restore(self, saved: Any) -> None:
        if isinstance(saved, dict):  # get_state's
            np.random.set_state(saved)
            return
        # The addresses the snapshot was taken at (a save in between may have located
        # another generator); the RandomState is NumPy's module global, alive for good.
        bg, state, at, aug = saved
        if np.random.mtrand._rand._bit_generator is not bg:  # swapped since: put it back
            np.random.set_bit_generator(bg)  # type: ignore[attr-defined]  # NumPy 1.25+
        ctypes.memmove(bg.ctypes.state_address, state, _MT_BYTES)
        ctypes.memmove(at, aug, _AUG_BYTES)

    def _locate(self, rs: Any, bg: Any) -> None:
        self._rs, self._bg, self._state, self._aug = rs, bg, 0, 0
        if type(bg) is not np.random.MT19937 or not hasattr(np.random, "set_bit_generator"):
            return
        state = int(bg.ctypes.state_address)
        base, size = id(rs), type(rs).__basicsize__
        words = (ctypes.c_uint64 * (size // 8)).from_address(base)  # the object's own bytes
        # RandomState holds bitgen_t _bitgen (its first field: the state's address) and then
        # aug_bitgen_t _aug_state {bitgen_t *bit_generator (= &_bitgen); int has_gauss; double
        # gauss}.
        bitgen = [i for i in range(len(words)) if words[i] == state]
        if len(bitgen) != 1:
            return
        aug = [i for i in range(len(words)) if words[i] == base + 8 * bitgen[0]]
        if len(aug) != 1:
            return
        self._state, self._aug = state, base + 8 * aug[0] + 8
        before = rs.get_state()
        try:
            ok = self._agrees(rs)
            rs.standard_normal()  # a pair drawn: the second one cached
            ok = ok and self._agrees(rs)
            snap = (
                ctypes.string_at(self._state, _MT_BYTES),
                ctypes.string_at(self._aug, _AUG_BYTES),
            )
            want = rs.get_state()
            rs.standard_normal(3)
            ctypes.memmove(self._state, snap[0], _MT_BYTES)
            ctypes.memmove(self._aug, snap[1], _AUG_BYTES)
            ok = ok and _same_state(rs.get_state(), want)
        finally:
            rs.set_state(before)
        if not ok:
            self._state = self._aug = 0

    def _agrees(self, rs: Any) -> bool:
        """Whether the bytes read give what ``get_state`` says."""
        _, key, pos, has_gauss, gauss = rs.get_state()
        state = ctypes.string_at(self._state, _MT_BYTES)
        flag = ctypes.c_int.from_address(self._aug).value
        cached = ctypes.c_double.from_address(self._aug + 8).value
        return (
            state == np.asarray(key, dtype=np.uint32).tobytes() + np.int32(pos).tobytes()
            and flag == has_gauss
            and cached == gauss
        )


def _same_state(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])


_numpy_rng = _NumpyRng()

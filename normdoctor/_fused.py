"""A fused CPU kernel (numba) for the probe's hot path, with the stock torch ops as fallback.

With stock PyTorch ops the hook needs three passes over a layer's input and one write: the
shifted copy x - K, its per-sample sums, and its per-sample sums of squares (a float64 reduction
would avoid the shift but runs 5-15 times slower on CPU, and float32 sums of unshifted squares
lose every digit on channels whose mean is large against their spread).  This kernel reads the
input once: in parallel over channels, per sample, it accumulates x - K and (x - K)^2 in float64
(for float32 inputs the difference and its square are then exact, so it is more exact than the
torch path, not less), and writes the three per-batch sums the recorder keeps: sum of x - K, sum
of (x - K)^2, and sum over samples of the squared per-sample sum.  Measured on the shapes of a
ResNet-18, it costs one to two plain ``Tensor.sum`` calls, where the torch path costs four to
seven (``benchmarks/bench_scan.py`` prints both).

numba is a dependency but imported on first use only, so commands that never scan do not pay
for it; where it cannot be imported the torch path runs.  Set
``NORMDOCTOR_KERNEL=torch`` to force the stock-op path (``numba`` to require the kernel).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .errors import NormDoctorError

_kernel: Callable[..., None] | None = None
_built: Callable[..., None] | None = None
_tried = False


def _build() -> Callable[..., None]:
    """Compile (or load from numba's cache) once per process."""
    global _built
    if _built is None:
        # The first parallel run starts numba's thread pool, which resets torch's (OpenMP)
        # thread count to all cores: put back what the user set.
        threads = torch.get_num_threads()
        try:
            _built = _compile()
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    return _built


def _compile() -> Callable[..., None]:
    """Compile for float32 and float64 now, so that a failure shows here, not mid-scan."""
    try:
        fn = _define(cache=True)
        _warm(fn)
    except RuntimeError:  # numba found no writable cache location: compile in memory
        fn = _define(cache=False)
        _warm(fn)
    return fn


def _warm(fn: Callable[..., None]) -> None:
    out = np.zeros((3, 2))
    for dtype in (np.float32, np.float64):
        fn(np.ones((2, 2, 3), dtype=dtype), np.zeros(2, dtype=dtype), out)
    if not np.allclose(out, [[6.0, 6.0], [6.0, 6.0], [18.0, 18.0]]):
        raise RuntimeError(f"fused kernel self-check failed: {out.tolist()}")


def _define(cache: bool) -> Callable[..., None]:
    import numba

    # reassoc lets LLVM vectorise the float64 sums; no nnan/ninf: NaN and Inf must propagate.
    fast = {"reassoc", "contract"}

    @numba.njit(parallel=True, fastmath=fast, cache=cache, nogil=True, boundscheck=False)
    def batch_sums(x, k, out):  # pragma: no cover - compiled, tested through its results
        n_samples, channels, length = x.shape
        for c in numba.prange(channels):
            kc = np.float64(k[c])
            t1 = 0.0
            t2 = 0.0
            q = 0.0
            for n in range(n_samples):
                s1 = 0.0
                s2 = 0.0
                for j in range(length):
                    d = np.float64(x[n, c, j]) - kc  # exact for float32 inputs
                    s1 += d
                    s2 += d * d
                t1 += s1
                t2 += s2
                q += s1 * s1
            out[0, c] = t1
            out[1, c] = t2
            out[2, c] = q

    return batch_sums


CHOICES = ("auto", "numba", "torch")


def use(choice: str | None = None) -> bool:
    """Pick the hot path: ``auto`` (the kernel where numba is installed), ``numba`` or ``torch``.

    ``None`` reads ``NORMDOCTOR_KERNEL`` (default ``auto``).  Returns whether the kernel is on.
    """
    global _kernel, _tried
    if choice is None:
        choice = os.environ.get("NORMDOCTOR_KERNEL", "auto")
    choice = choice.strip().lower()
    if choice not in CHOICES:
        raise NormDoctorError(f"kernel {choice!r}: expected one of {', '.join(CHOICES)}")
    _tried, _kernel = True, None
    if choice != "torch":
        try:
            _kernel = _build()
        except ImportError as exc:
            if choice == "numba":
                raise NormDoctorError(
                    "the fused kernel needs numba, which does not import here: pip install numba"
                ) from exc
        except Exception as exc:  # a numba/LLVM failure must not stop a scan
            if choice == "numba":
                raise NormDoctorError(f"the fused kernel failed to compile: {exc}") from exc
            warnings.warn(
                f"normdoctor: fused kernel unavailable ({type(exc).__name__}: {exc}); "
                "using stock torch ops (slower, same results)",
                RuntimeWarning,
                stacklevel=2,
            )
    return _kernel is not None


def kernel() -> Callable[..., None] | None:
    """The compiled kernel, or ``None`` when numba is missing or switched off."""
    if not _tried:
        use()
    return _kernel


def match_threads() -> int:
    """Run the kernel on as many threads as torch uses (call on the scanning thread).

    Returns numba's thread count before, for :func:`restore_threads`.
    """
    import numba  # already imported by kernel()

    before = numba.get_num_threads()
    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set when numba loads
    numba.set_num_threads(max(1, min(torch.get_num_threads(), most)))
    return before


def restore_threads(before: int) -> None:
    """Undo :func:`match_threads` (numba's count is per thread: call on the same thread)."""
    import numba

    if numba.get_num_threads() != before:
        numba.set_num_threads(before)


__all__ = ["CHOICES", "kernel", "match_threads", "restore_threads", "use"]

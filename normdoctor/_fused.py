"""A fused CPU kernel (numba) for the probe's hot path, with the stock torch ops as fallback.

With stock PyTorch ops the hook needs three passes over a layer's input and one write: the
shifted copy x - K, its per-sample sums, and its per-sample sums of squares (a float64 reduction
would avoid the shift but runs 5-15 times slower on CPU, and float32 sums of unshifted squares
lose every digit on channels whose mean is large against their spread).  This kernel reads the
input once, in memory order (every job it is handed, in parallel above 2^17 elements): per
channel and sample it accumulates x - K and (x - K)^2 in float64
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

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import NormDoctorError

_kernel: Callable[..., None] | None = None
_fold: Callable[..., None] | None = None
_close: Callable[..., None] | None = None
#: (batch_sums, fold, close)
Kernels = tuple[Callable[..., None], Callable[..., None], Callable[..., None]]
_built: Kernels | None = None
_address: Any = None  # see _define
_blocks = 1  # see blocks()
_channels: Any = None
_job_block: Any = None
_fold_rows: Any = None
_tried = False
#: A call of ``batch_sums`` whose jobs hold more elements than this runs in parallel; up to
#: this many, on the calling thread (see ``batch_sums``).
PARALLEL_ABOVE = 1 << 17
#: A job of more elements than this is split into its ``blocks`` of channels (see JOB).
SPLIT_ABOVE = 1 << 16

#: Columns of a job of ``batch_sums``: the input's address, the address of the output (3 x C
#: float64, contiguous), N, C, L (the input's shape as (N, C, L), C-contiguous), the address of
#: the shift (C floats of the input's dtype), 1 for a float64 input (0: float32), and 1 where
#: the kernel first sets the shift: each channel's mean over the first sample, rounded to the
#: input's dtype (0 where that is not finite); then the blocks of channels the job may be
#: split into when it runs in parallel (:func:`blocks`: the threads, which numba's compiled code
#: cannot read and still be cached).  The split changes the speed only: each channel's sums are
#: taken in the same order whatever it is.
JOB = ("x", "out", "n", "c", "l", "shift", "float64", "first", "blocks")
JOB_COLUMNS = len(JOB)
#: Columns of a job of ``fold``: addresses of a recorder's buffered rows (R, 3, C), their
#: elements and samples (R,), its shift, safe running mean and variance and weights (C,), its
#: totals (4,) and sums (11, C), all float64 and C-contiguous; then R, C, and the offset of its
#: R scores in the call's ``scores``.
FOLD_JOB = ("rows", "n", "ns", "shift", "mean", "var", "weights", "totals", "sums", "r", "c",
            "scores")  # fmt: skip
FOLD_COLUMNS = len(FOLD_JOB)


def _build() -> Kernels:
    """Compile (or load from numba's cache) once per process."""
    global _built, _blocks
    if _built is None:
        # The first parallel run starts numba's thread pool, which resets torch's (OpenMP)
        # thread count to all cores: put back what the user set.
        threads = torch.get_num_threads()
        try:
            _built = _compile()
            import numba

            _blocks = numba.get_num_threads()
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    return _built


def _compile() -> Kernels:
    """Compile (or load) for float32 now, so that a failure shows here, not mid-scan."""
    try:
        fns = _define(cache=True)
        _warm(*fns)
    except RuntimeError:  # numba found no writable cache location: compile in memory
        fns = _define(cache=False)
        _warm(*fns)
    return fns


def _warm(sums: Callable[..., None], fold: Callable[..., None], close: Callable[..., None]) -> None:
    # One signature per kernel, whatever the input's dtype: loading each from numba's cache
    # costs a few tenths of a second per process.
    x32 = np.ones((2, 2, 3), dtype=np.float32)
    x64 = np.ones((2, 2, 3))
    k32, k64 = np.zeros(2, dtype=np.float32), np.zeros(2)
    out = np.zeros((2, 3, 2))
    sums(np.array([job(x32, k32, out[0]), job(x64, k64, out[1])]))
    want = [[6.0, 6.0], [6.0, 6.0], [18.0, 18.0]]
    if not np.allclose(out, [want, want]):
        raise RuntimeError(f"fused kernel self-check failed: {out.tolist()}")
    # Two rows of one channel: x = (1, 3) about shift 0 (one batch of 2), and a NaN row.
    rows = np.array([[[4.0], [10.0], [16.0]], [[math.nan], [0.0], [0.0]]])
    totals, acc, scores = np.zeros(4), np.zeros((11, 1)), np.zeros(2)
    one, zero, counts = np.ones(1), np.zeros(1), np.array([2.0, 0.0])
    arrays = (rows, counts, counts, zero, zero, one, one, totals, acc)
    fold(np.array([fold_job(*arrays, 0)]), np.zeros(1), scores)
    # batch mean 2, variance 1, against running (0, 1): m^2 = 0 + 4
    if not (totals.tolist() == [2.0, 2.0, 1.0, 1.0] and acc[2, 0] == 4.0 and scores[0] == 2.0):
        raise RuntimeError(f"fused fold self-check failed: {totals.tolist()}, {acc.tolist()}")
    if not math.isnan(scores[1]):
        raise RuntimeError("fused fold self-check failed: a NaN row must score NaN")
    # Closing that one batch: mean 2 and biased variance 1.
    out = np.zeros((10, 1))
    vectors = np.zeros((6, 1))
    close(totals.reshape(1, 4), acc, vectors, np.zeros(1), np.ones(1, dtype=np.int64), out)
    if not (out[3, 0] == 2.0 and out[4, 0] == 1.0 and out[5, 0] == 4.0):
        raise RuntimeError(f"fused close self-check failed: {out[:, 0].tolist()}")


def job(x: np.ndarray, shift: np.ndarray, out: np.ndarray) -> list[int]:
    """The job row (see :data:`JOB`) of C-contiguous NumPy arrays ``x`` (N, C, L) (or (N, C)),
    ``shift`` (C,) of x's dtype and ``out`` (3, C) float64.  They must outlive the call."""
    assert x.flags.c_contiguous and shift.flags.c_contiguous and out.flags.c_contiguous
    assert x.dtype in (np.float32, np.float64) and shift.dtype == x.dtype
    assert out.dtype == np.float64 and out.shape == (3, x.shape[1])
    n, c = x.shape[:2]
    length = x.size // (n * c) if n * c else 0
    return [x.ctypes.data, out.ctypes.data, n, c, length, shift.ctypes.data,
            int(x.dtype == np.float64), 0, blocks()]  # fmt: skip  # the shift as given


def blocks() -> int:
    """The ``blocks`` column of new jobs (see :data:`JOB`): numba's threads on the thread
    that last ran :func:`match_threads` (or loaded the kernel)."""
    return _blocks


def fold_job(
    rows: np.ndarray,
    n: np.ndarray,
    ns: np.ndarray,
    shift: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    weights: np.ndarray,
    totals: np.ndarray,
    sums: np.ndarray,
    at: int,
) -> list[int]:
    """The job row of ``fold`` (see :data:`FOLD_JOB`) of C-contiguous float64 arrays; they
    must outlive the call."""
    arrays = (rows, n, ns, shift, mean, var, weights, totals, sums)
    assert all(a.dtype == np.float64 and a.flags.c_contiguous for a in arrays)
    r, _, c = rows.shape
    assert n.size >= r and ns.size >= r and totals.size == 4 and sums.shape == (11, c)
    return [*(a.ctypes.data for a in arrays), r, c, at]


def _define(cache: bool) -> Kernels:
    import numba
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    # reassoc lets LLVM vectorise the float64 sums; no nnan/ninf: NaN and Inf must propagate.
    fast = {"reassoc", "contract"}

    global _address
    if _address is None:

        @intrinsic
        def address(typingctx, addr):  # pragma: no cover - compiled
            """An int64 address as a pointer (what ``numba.carray`` views)."""

            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0], cgutils.voidptr_t)

            return types.voidptr(types.int64), codegen

        # Module globals, not closure variables: numba keys the cache of a closure on the
        # pickle of its variables, and a kernel pickles with a uuid fresh in every process
        # (so the kernel was compiled again in each, measured: a cache miss every time).
        _address = address

    global _channels

    @numba.njit(cache=cache, nogil=True, boundscheck=False, fastmath=fast)
    def channels(x, k, out, c0, c1, first):  # pragma: no cover - compiled, tested via results
        """The three sums of channels c0..c1 of x (N, C, L) about k[c] into out[:, c]
        (``first``: k[c] set first, see JOB).

        Sample by sample, so that the input is read in memory order: channel by channel, each
        sample's L elements lie C * L apart, and measured at (32, 16, 16) and (32, 64, 1024)
        that ran at a third of the speed (the prefetchers stop at each jump).  Each channel's
        sums are taken in the same order either way: the results do not depend on the split."""
        n_samples, _, length = x.shape
        for c in range(c0, c1):
            if first and length:
                m = 0.0
                for j in range(length):
                    m += np.float64(x[0, c, j])
                k[c] = m / length  # rounded to k's dtype
                if not np.isfinite(k[c]):
                    k[c] = 0.0
            elif first:
                k[c] = 0.0  # no elements: any shift
            out[0, c] = 0.0
            out[1, c] = 0.0
            out[2, c] = 0.0
        for n in range(n_samples):
            for c in range(c0, c1):
                kc = np.float64(k[c])
                s1 = 0.0
                s2 = 0.0
                for j in range(length):
                    d = np.float64(x[n, c, j]) - kc  # exact for float32 inputs
                    s1 += d
                    s2 += d * d
                out[0, c] += s1
                out[1, c] += s2
                out[2, c] += s1 * s1

    _channels = channels  # a global too: a kernel in a closure pickles with a fresh uuid

    global _job_block

    @numba.njit(cache=cache, nogil=True, boundscheck=False, fastmath=fast)
    def job_block(jobs, i, c0, c1):  # pragma: no cover - compiled, tested through its results
        """Channels c0..c1 of job i."""
        n, c, length = jobs[i, 2], jobs[i, 3], jobs[i, 4]
        out = numba.carray(_address(jobs[i, 1]), (3, c), np.float64)
        if jobs[i, 6]:
            x64 = numba.carray(_address(jobs[i, 0]), (n, c, length), np.float64)
            k64 = numba.carray(_address(jobs[i, 5]), c, np.float64)
            _channels(x64, k64, out, c0, c1, jobs[i, 7])
        else:
            x32 = numba.carray(_address(jobs[i, 0]), (n, c, length), np.float32)
            k32 = numba.carray(_address(jobs[i, 5]), c, np.float32)
            _channels(x32, k32, out, c0, c1, jobs[i, 7])

    _job_block = job_block

    @numba.njit(parallel=True, fastmath=fast, cache=cache, nogil=True, boundscheck=False)
    def batch_sums(jobs):  # pragma: no cover - compiled, tested through its results
        """Per job (a row of ``jobs``, see JOB): sum of x - K, of (x - K)^2 and of squared
        per-sample sums, per channel, into the job's output: one layer's input, a stage of
        calls, or a forward's worth of layers.

        In parallel where there are more than 2^17 elements: job by job, and a job of more
        than 2^16 elements in its ``blocks`` of channels.  Below, on the calling thread.
        Waking numba's threads for less costs more than it saves, and they then spin beside
        torch's own (two OpenMP pools on the same cores): measured on 2 cores, torch ops
        between parallel calls ran at half speed."""
        count = jobs.shape[0]
        work = 0
        for i in range(count):
            work += jobs[i, 2] * jobs[i, 3] * jobs[i, 4]
        if work <= PARALLEL_ABOVE:
            for i in range(count):
                _job_block(jobs, i, 0, jobs[i, 3])
            return
        blocks = np.empty(count, dtype=np.int64)
        ends = np.empty(count, dtype=np.int64)  # blocks of jobs 0..i
        total = 0
        for i in range(count):
            c = jobs[i, 3]
            b = min(c, jobs[i, 8]) if jobs[i, 2] * c * jobs[i, 4] > SPLIT_ABOVE else 1
            blocks[i] = max(b, 1)
            total += blocks[i]
            ends[i] = total
        for t in numba.prange(total):
            i = np.searchsorted(ends, t, side="right")
            b, c = blocks[i], jobs[i, 3]
            part = t - (ends[i] - b)
            _job_block(jobs, i, part * c // b, (part + 1) * c // b)

    global _fold_rows

    # IEEE arithmetic throughout (error_model="numpy": x / 0 is inf, not an exception; no
    # fastmath), so that NaN, inf and the operations are those of Recorder.flush's array code,
    # which this replaces on CPU (within a few ulps: products with reciprocals, not quotients).
    @numba.njit(cache=cache, nogil=True, boundscheck=False, error_model="numpy")
    def fold_rows(rows, n, ns, shift, mean_r, var_r, weights, eps, totals, sums, scores):
        """Fold buffered rows (R, 3, C) into totals (4,) and sums (11, C); scores (R,)."""
        n_rows, _, channels = rows.shape
        wtotal = 0.0
        inv_r = np.empty(channels)  # per channel, the same for every row
        for c in range(channels):
            wtotal += weights[c]
            inv_r[c] = 1.0 / np.sqrt(var_r[c] + eps)
        # Channel-major accumulators: the rows of ``sums`` lie C floats apart, and at 512
        # channels (4 KiB) all eleven fall into one cache set (5x slower, measured).
        acc = np.zeros((channels, 11))
        for r in range(n_rows):  # pragma: no cover - compiled, tested through its results
            finite = True
            for k in range(3):
                for c in range(channels):
                    if not np.isfinite(rows[r, k, c]):
                        finite = False
            if not finite:  # a skipped row adds nothing
                totals[3] += 1.0
                scores[r] = np.nan
                continue
            nr = n[r]
            nsr = ns[r]
            per = nr / nsr
            totals[0] += nr
            totals[1] += nsr
            totals[2] += 1.0
            inv_n = 1.0 / nr
            inv_per = 1.0 / per
            q_scale = inv_per * inv_per
            z_scale = 1.0 / nsr
            score = 0.0
            for c in range(channels):
                t1 = rows[r, 0, c]
                t2 = rows[r, 1, c]
                q = rows[r, 2, c]
                e = t1 * inv_n
                var = t2 * inv_n - e * e
                var = var if var > 0 else 0.0
                inv2 = 1.0 / (var + eps)
                inv_b = np.sqrt(inv2)  # one division and one root per channel and row
                ir = inv_r[c]
                dm = shift[c] + e - mean_r[c]
                m2 = var * (inv_b - ir) ** 2 + dm**2 * ir**2
                w = weights[c]
                score += m2 * w if w > 0 else 0.0
                d1 = t1 * inv_per
                a = acc[c]
                a[0] += t1
                a[1] += t2
                a[2] += m2
                a[3] += var * inv2
                a[4] += var * inv_b
                a[5] += var
                a[6] += e
                a[7] += e * e
                a[8] += d1
                a[9] += q * q_scale
                a[10] += d1 * d1 * z_scale
            if wtotal == 0.0:
                scores[r] = np.nan
            else:
                score = score / wtotal
                scores[r] = np.sqrt(score) if score > 0 else (score if score != score else 0.0)
        # Row by row: sums[k, c] for k = 0..10 at one c lie C floats apart, and at 256 or 512
        # channels all eleven fall into one cache set (a fold of one row of 512 channels took
        # 25 us this way round, 9 us channel by channel within each row; measured).
        for k in range(11):
            for c in range(channels):
                sums[k, c] += acc[c, k]

    _fold_rows = fold_rows

    @numba.njit(cache=cache, nogil=True, boundscheck=False, error_model="numpy")
    def fold(jobs, eps, scores):  # pragma: no cover - compiled, tested through its results
        """Per job (a row of ``jobs``, see FOLD_JOB; ``eps[j]`` its layer's epsilon): fold one
        recorder's buffered rows into its accumulators, its scores into ``scores``.  One call
        for every recorder of a scan, instead of one dispatch of eleven arrays each."""
        for j in range(jobs.shape[0]):
            r, c, at = jobs[j, 9], jobs[j, 10], jobs[j, 11]
            _fold_rows(
                numba.carray(_address(jobs[j, 0]), (r, 3, c), np.float64),
                numba.carray(_address(jobs[j, 1]), r, np.float64),
                numba.carray(_address(jobs[j, 2]), r, np.float64),
                numba.carray(_address(jobs[j, 3]), c, np.float64),
                numba.carray(_address(jobs[j, 4]), c, np.float64),
                numba.carray(_address(jobs[j, 5]), c, np.float64),
                numba.carray(_address(jobs[j, 6]), c, np.float64),
                eps[j],
                numba.carray(_address(jobs[j, 7]), 4, np.float64),
                numba.carray(_address(jobs[j, 8]), (11, c), np.float64),
                scores[at : at + r],
            )

    @numba.njit(cache=cache, nogil=True, boundscheck=False, error_model="numpy")
    def close(totals, sums, vectors, eps, sizes, out):  # pragma: no cover - compiled
        """``recording.finish_all``'s closing arithmetic, channel by channel: the NumPy
        expressions there, operation for operation in the same order (no fastmath), so the
        results are the same bits (tests/test_stats.py compares them).  ``totals`` (L, 4),
        ``sums`` (11, C) and ``vectors`` (6, C: shift, safe mean, safe var, weights, running
        mean, running var) over the C channels of L layers (``sizes``, ``eps`` per layer) into
        ``out`` (10, C), the rows of ``finish_all``'s block."""
        nan = math.nan
        a = 0
        for layer in range(sizes.shape[0]):
            count, samples, units = totals[layer, 0], totals[layer, 1], totals[layer, 2]
            e = eps[layer]
            units1 = units if units > 1.0 else 1.0
            per_unit = count / units if units > 0 else nan
            unbiased = per_unit / (per_unit - 1) if per_unit > 1 else nan
            for c in range(a, a + sizes[layer]):
                p1, p2, sum_m2 = sums[0, c], sums[1, c], sums[2, c]
                r1, r2, rv, u1, u2 = sums[3, c], sums[4, c], sums[5, c], sums[6, c], sums[7, c]
                z1, z2, between = sums[8, c], sums[9, c], sums[10, c]
                k, safe_mean, safe_var = vectors[0, c], vectors[1, c], vectors[2, c]
                seen = count > 0
                dev = p1 / count if seen else nan
                m2 = nan
                if seen:
                    m2 = p2 - p1 * p1 / count
                    m2 = 0.0 if m2 < 0.0 else m2
                pooled_var = m2 / count
                mean_dev_sq = u2 - 2 * dev * u1 + units * (dev * dev)
                mean_dev_sq = 0.0 if mean_dev_sq < 0.0 else mean_dev_sq
                inv_p = 1.0 / np.sqrt(pooled_var + e)
                noise = r1 - 2.0 * inv_p * r2 + (inv_p * inv_p) * (rv + mean_dev_sq)
                noise = noise / units1
                noise = 0.0 if noise < 0.0 else noise
                batch_mean = k + u1 / units1
                batch_var = rv / units1 * unbiased
                inv_b = 1.0 / np.sqrt(batch_var + e)
                inv_r = 1.0 / np.sqrt(safe_var + e)
                d = batch_mean - safe_mean
                fit = batch_var * ((inv_b - inv_r) * (inv_b - inv_r)) + (d * d) * (inv_r * inv_r)
                total = z2 - z1 * z1 / samples
                spread = between - z1 * z1 / samples
                ratio = (spread / (units - 1)) / (total / (samples - 1)) if total > 0 else nan
                out[0, c] = vectors[3, c]
                out[1, c] = vectors[4, c]
                out[2, c] = vectors[5, c]
                out[3, c] = k + dev
                out[4, c] = pooled_var
                out[5, c] = sum_m2 / units1
                out[6, c] = noise
                out[7, c] = fit
                out[8, c] = m2
                out[9, c] = ratio
            a += sizes[layer]

    return batch_sums, fold, close


CHOICES = ("auto", "numba", "torch")


def use(choice: str | None = None) -> bool:
    """Pick the hot path: ``auto`` (the kernel where numba is installed), ``numba`` or ``torch``.

    ``None`` reads ``NORMDOCTOR_KERNEL`` (default ``auto``).  Returns whether the kernel is on.
    """
    global _kernel, _fold, _close, _tried
    if choice is None:
        choice = os.environ.get("NORMDOCTOR_KERNEL", "auto")
    choice = choice.strip().lower()
    if choice not in CHOICES:
        raise NormDoctorError(f"kernel {choice!r}: expected one of {', '.join(CHOICES)}")
    _tried, _kernel, _fold, _close = True, None, None, None
    if choice != "torch":
        try:
            _kernel, _fold, _close = _build()
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
    """The compiled ``batch_sums(jobs)`` (int64 rows, see :data:`JOB`), or ``None`` when numba
    is missing or switched off."""
    if not _tried:
        use()
    return _kernel


def fold() -> Callable[..., None] | None:
    """The compiled ``fold(jobs, eps, scores)`` of recorders' buffered rows (int64 rows, see
    :data:`FOLD_JOB`; ``Recorder.flush``), or ``None``."""
    if not _tried:
        use()
    return _fold


def close() -> Callable[..., None] | None:
    """The compiled ``close(totals, sums, vectors, eps, sizes, out)`` of
    ``recording.finish_all``, or ``None``."""
    if not _tried:
        use()
    return _close


def match_threads() -> int:
    """Run the kernel on as many threads as torch uses (call on the scanning thread).

    Returns numba's thread count before, for :func:`restore_threads`.
    """
    import numba  # already imported by kernel()

    global _blocks
    before = numba.get_num_threads()
    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set when numba loads
    _blocks = max(1, min(torch.get_num_threads(), most))
    numba.set_num_threads(_blocks)
    return before


def restore_threads(before: int) -> None:
    """Undo :func:`match_threads` (numba's count is per thread: call on the same thread)."""
    import numba

    if numba.get_num_threads() != before:
        numba.set_num_threads(before)


__all__ = [
    "CHOICES",
    "FOLD_COLUMNS",
    "FOLD_JOB",
    "JOB",
    "JOB_COLUMNS",
    "close",
    "fold",
    "fold_job",
    "job",
    "kernel",
    "match_threads",
    "restore_threads",
    "use",
]

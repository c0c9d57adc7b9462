"""Per-layer accumulators of live batch statistics, whatever delivers them.

A :class:`Recorder` is fed one layer input (or per-channel reductions) per batch and keeps
fixed-size float64 accumulators: it shifts the input by a per-layer constant (the first sample's
channel means, so that ill-conditioned channels keep their digits), reduces it to per-sample
channel sums and sums of squares in the input's dtype, and writes one float64 row into a
fixed-size buffer.  It never synchronises with the host.  When the buffer is full (64 rows,
carved from one block per path by :meth:`Recorder.preallocate` where the fold is compiled; up
to 512 rows for narrow layers folded by array code, whose cost is per operation) it is folded
into the accumulators, so memory does not grow with the number of batches (apart from one
float per batch: the per-batch score).  On CPU the reduction is one call of a fused kernel
(:mod:`normdoctor._fused`); the torch-ops fallback puts the shifted copy of the input into one
scratch buffer that all layers reuse.

Both sources (:mod:`normdoctor.sources.torch`, :mod:`normdoctor.sources.onnx`) and the exact
cross-process merge (:mod:`normdoctor.distributed`) use it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from . import _fused
from .layers import NormFamily, NormLayer, NormState, module_state  # the last two: re-exported
from .metrics import channel_weights, close_rows, layer_score, mismatch_sq
from .stats import BLOCK, LayerMeasurement, Moments  # the first two: re-exported

__all__ = [
    "BLOCK",
    "PATHS",
    "LayerMeasurement",
    "NormState",
    "PathName",
    "Recorder",
    "Scratch",
    "finish_all",
    "module_state",
]

#: A path through the model: "train" (norm layers use batch statistics) or "eval".
PathName = str
PATHS: tuple[PathName, ...] = ("train", "eval")
_FLUSH_ROWS = 64  # at least this many rows per fold
# Rows are folded in one vectorised pass whose cost is mostly per operation, not per row, so
# narrow layers (whose rows are small) buffer more of them: about this many floats a buffer.
_BUFFER_FLOATS = 3 * 8192
_MAX_ROWS = 512
# Inputs up to this size are staged (see Recorder._stage_for), in stages of this many floats.
# Measured per call on this machine: staging saves 2-3 us below 4096 elements and costs 3-7 us
# above (an extra copy into memory that is not in cache).
_STAGE_FLOATS = 4096
_STAGE_SIZE = 65536


def _capacity(channels: int) -> int:
    """Rows a recorder buffers before folding (64 for 128+ channels, up to 512 below)."""
    return max(_FLUSH_ROWS, min(_MAX_ROWS, _BUFFER_FLOATS // (3 * max(channels, 1))))


class Scratch:
    """One reusable buffer for the shifted copy of a layer's input (layers run one at a time)."""

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor | None:
        if not x.is_contiguous():
            return None
        key = (x.dtype, x.device)
        flat = self._flat.get(key)
        if flat is None or flat.numel() < x.numel():
            flat = self._flat[key] = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
        return flat[: x.numel()].view(x.shape)


class Recorder:
    """Streaming accumulators of one layer on one path."""

    def __init__(
        self,
        layer: NormLayer,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: torch.Tensor | None,
    ) -> None:
        self.layer = layer
        self.per_unit_sample = layer.family is NormFamily.INSTANCE_TRACKED
        device = running_mean.device
        self.device = device
        self.running_mean = running_mean.detach().to(torch.float64, copy=True)
        self.running_var = running_var.detach().to(torch.float64, copy=True)
        self.eps = eps = float(layer.eps)
        # On CPU in NumPy (views of the same memory): a few microseconds instead of a few
        # dozen, once per layer and path of every scan (issue 16).
        cpu = device.type == "cpu"
        xp: Any = np if cpu else torch
        mean: Any = self.running_mean
        var: Any = self.running_var
        gamma: Any = weight
        if cpu:
            mean, var = mean.numpy(), var.numpy()
            if weight is not None:
                gamma = weight.detach().to("cpu", torch.float64).numpy()
        valid = xp.isfinite(var + eps) & (var + eps > 0) & xp.isfinite(mean)
        w = channel_weights(gamma, valid)  # gamma^2 (ones without affine or all-zero gamma)
        total = float(w.sum())
        weights = w / total if total > 0 else w
        # Invalid running stats would turn every score into NaN: score those channels as if
        # they were perfect, and report them as degenerate instead.
        safe_mean, safe_var = xp.where(valid, mean, 0.0), xp.where(valid, var, 1.0)
        as_tensor = torch.from_numpy if cpu else (lambda t: t)
        self.weights: torch.Tensor = as_tensor(weights)
        self.safe_mean: torch.Tensor = as_tensor(safe_mean)
        self.safe_var: torch.Tensor = as_tensor(safe_var)
        self.capacity = _capacity(self.running_mean.numel())
        self._empty()

    @classmethod
    def many(
        cls,
        specs: Sequence[tuple[NormLayer, torch.Tensor, torch.Tensor, torch.Tensor | None]],
    ) -> list[Recorder]:
        """``[Recorder(*spec) for spec in specs]``, on CPU in one NumPy pass over the channels of
        every layer: the same values, without a few dozen small-array operations per layer (at
        500 layers that was a tenth of a second per scan, issue 16)."""
        if len(specs) < 2 or any(
            not t.is_cpu or t.dim() != 1 for spec in specs for t in spec[1:] if t is not None
        ):
            return [cls(*spec) for spec in specs]
        sizes = [spec[1].numel() for spec in specs]
        if any(spec[2].numel() != c or (spec[3] is not None and spec[3].numel() != c)
               for spec, c in zip(specs, sizes, strict=True)):  # fmt: skip
            return [cls(*spec) for spec in specs]
        ends = np.cumsum(sizes).tolist()
        starts = [0, *ends[:-1]]
        with torch.no_grad():  # one cat each, no detach per tensor (gamma is a parameter)
            mean, var, gamma = (
                torch.cat(ts).to(torch.float64).numpy()
                for ts in (
                    [spec[1] for spec in specs],
                    [spec[2] for spec in specs],
                    [
                        s[3] if s[3] is not None else s[1].new_ones(c)
                        for s, c in zip(specs, sizes, strict=True)
                    ],
                )
            )
        affine = np.repeat([spec[3] is not None for spec in specs], sizes)
        eps = np.repeat([float(spec[0].eps) for spec in specs], sizes)
        valid = np.isfinite(var + eps) & (var + eps > 0) & np.isfinite(mean)
        ones = valid.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            w = np.where(affine, np.square(gamma), 1.0) * ones  # metrics.channel_weights
        w = np.where(np.isfinite(w), w, 0.0)
        safe_mean, safe_var = np.where(valid, mean, 0.0), np.where(valid, var, 1.0)
        scalars, vectors, cpu = len(cls.SCALARS), len(cls.VECTORS), torch.device("cpu")
        totals, sums = np.zeros((len(specs), scalars)), np.zeros(vectors * ends[-1])
        out = []
        for i, (spec, a, b) in enumerate(zip(specs, starts, ends, strict=True)):
            layer = spec[0]
            w_l = w[a:b]
            total = float(w_l.sum())
            if spec[3] is not None and total == 0.0:
                w_l = ones[a:b]  # every gamma 0: weigh channels alike
                total = float(w_l.sum())
            rec = cls.__new__(cls)
            rec.layer = layer
            rec.per_unit_sample = layer.family is NormFamily.INSTANCE_TRACKED
            rec.device = cpu
            rec.running_mean = torch.from_numpy(mean[a:b])
            rec.running_var = torch.from_numpy(var[a:b])
            rec.eps = float(layer.eps)
            rec.weights = torch.from_numpy(w_l / total if total > 0 else w_l)
            rec.safe_mean = torch.from_numpy(safe_mean[a:b])
            rec.safe_var = torch.from_numpy(safe_var[a:b])
            rec.capacity = _capacity(b - a)
            sums_l = sums[vectors * a : vectors * b].reshape(vectors, b - a)  # C-contiguous
            rec._empty((torch.from_numpy(totals[i]), torch.from_numpy(sums_l)))
            out.append(rec)
        return out

    @classmethod
    def for_layers(
        cls, layers: Sequence[NormLayer], modules: dict[str, nn.Module]
    ) -> list[Recorder]:
        """:meth:`for_module` of every layer (``modules``: by name), set up together."""
        states = [module_state(modules[layer.name]) for layer in layers]
        for state in states:
            assert state.running_mean is not None and state.running_var is not None
        return cls.many(
            [
                (layer, state.running_mean, state.running_var, state.weight)  # type: ignore[misc]
                for layer, state in zip(layers, states, strict=True)
            ]
        )

    @staticmethod
    def preallocate(recorders: Sequence[Recorder], *, full: bool = False) -> None:
        """Give the CPU recorders among ``recorders`` their row buffers now, carved from one
        block, 64 rows each (the compiled fold's cost per fold is a few microseconds), or with
        ``full`` as many as an own buffer holds (up to 512 for narrow layers: the monitor, whose
        folds over a training run are many and, after the model's own work, cost about 75 us
        each at batch size 1).

        Allocated one by one on each layer's first call, in between the model's own activations,
        the buffers (up to 196 KiB each) fragment the heap, and every later large allocation of
        the forward pays for it: measured in a 500-layer stack, glibc's ``_int_malloc`` was the
        largest cost the recording added (``perf``), and with one block that cost is gone.
        """
        todo = [r for r in recorders if r.buf is None and r.device.type == "cpu"]
        if not todo or _fused.fold() is None:
            return
        channels = [r.running_mean.numel() for r in todo]
        rows = [_capacity(c) if full else _FLUSH_ROWS for c in channels]
        sizes = [3 * r * c for r, c in zip(rows, channels, strict=True)]
        # One block of rows and one of zeroed accumulators, cut with NumPy (a NumPy view and
        # torch.from_numpy cost a third of a torch slice and view: 1000 each at 500 layers).
        block = torch.empty(sum(sizes), dtype=torch.float64).numpy()
        # elems then samples of each recorder, one after the other (see _buffer)
        counts = np.empty(2 * sum(rows)) if full else np.empty((len(todo), 2, _FLUSH_ROWS))
        counts_at = counts.ctypes.data
        scalars, vectors = len(Recorder.SCALARS), len(Recorder.VECTORS)
        totals = np.zeros((len(todo), scalars))
        sums = np.zeros(vectors * sum(channels))
        start = at = held = 0
        for i, (rec, c, size, r) in enumerate(zip(todo, channels, sizes, rows, strict=True)):
            assert rec.nrows == 0 and not rec.unit_scores  # nothing recorded yet
            rec.capacity = r
            rec._buf_np = block[start : start + size].reshape(r, 3, c)
            rec.buf = torch.from_numpy(rec._buf_np)
            rec._buf_addr = rec.buf.data_ptr()
            rec.elems, rec.samples = (
                counts[held : held + 2 * r].reshape(2, r) if full else counts[i]
            )
            rec._counts_at = counts_at + held * 8  # (ndarray.ctypes costs 2 us)
            if not rec._carved:  # (Recorder.many cuts them from a block too)
                rec.totals = torch.from_numpy(totals[i])
                rec.sums = torch.from_numpy(sums[at : at + vectors * c].reshape(vectors, c))
            rec._views = None
            start += size
            at += vectors * c
            held += 2 * r

    def like(self) -> Recorder:
        """An empty recorder of the same layer and stored statistics (those shared, read-only):
        the other path's, without working them out again."""
        twin = copy.copy(self)
        twin._empty()
        return twin

    def _empty(self, accumulators: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Nothing recorded yet (``accumulators``: zeroed totals and sums to use)."""
        c, device = self.running_mean.numel(), self.device
        self.shift: torch.Tensor | None = None
        self._fused: tuple[Any, ...] | None = None  # set on the first call
        # (shape, dtype, job, elements per channel, samples, kernel, the job's columns after the
        # two addresses, as ints) of the last fused call
        self._fast_call: tuple[Any, ...] | None = None
        # see _stage_for; False: the next call of this small shape builds the stage
        self._stage_call: tuple[Any, ...] | Literal[False] | None = None
        self._staged = 0  # calls waiting in the stage
        self.shift64: torch.Tensor | None = None
        self._shift_view: dict[int, torch.Tensor] = {}
        self.buf: torch.Tensor | None = None
        self._buf_np: np.ndarray | None = None  # the buffer's NumPy view (CPU)
        self._buf_addr = 0  # its address, and a row's size in bytes (kernel jobs)
        self._row_bytes = 3 * 8 * c
        # Calls may be held until the forward returns (normdoctor.deferred): None before the
        # first call, "copy" while it is held, then whether the input outlived the layer.
        self.defer: bool | str | None = None
        self.nrows = 0
        self.last: tuple[int, int] | None = None  # (buffer row, elements per channel)
        # per buffered row: elements per channel and samples (host arrays, set with the buffer)
        self.elems = np.empty(0)
        self.samples = np.empty(0)
        self._counts_at = 0  # the address of elems, followed by samples (see _buffer)
        self._views: tuple[np.ndarray, ...] | None = None  # see _arrays
        self._fold_row: tuple[tuple[Any, ...], list[int]] | None = None  # see _fold_job
        # Sums over units (rows), names in SCALARS and VECTORS (DESIGN.md): one tensor each, so
        # that setting up, merging and reading them back costs one op, not fifteen.
        self._carved = accumulators is not None  # zeroed views of a block (Recorder.many)
        if accumulators is None:
            accumulators = (
                torch.zeros(len(self.SCALARS), dtype=torch.float64, device=device),
                torch.zeros(len(self.VECTORS), c, dtype=torch.float64, device=device),
            )
        self.totals, self.sums = accumulators
        self.unit_scores: list[torch.Tensor] = []
        self.rows_per_call: list[int] = []  # units each observe() added, to reorder across shards
        self.spatial = False

    @staticmethod
    def for_module(module: nn.Module, layer: NormLayer) -> Recorder:
        state = module_state(module)
        assert state.running_mean is not None and state.running_var is not None
        return Recorder(layer, state.running_mean, state.running_var, state.weight)

    # -- hot path --------------------------------------------------------------------------
    def observe(self, x: torch.Tensor, scratch: Scratch | None = None) -> None:
        """Record one call's input (N, C, *): the hot path, no host synchronisation."""
        stage = self._stage_call
        if stage and x.shape == stage[0] and x.dtype is stage[1] and x.is_cpu:
            # A small input of the shape before: one copy into the stage, whose calls are
            # reduced together, one kernel call per block (see _stage_for).
            j = self._staged
            stage[2][j][...] = (x.detach() if x.requires_grad else x).numpy()
            self._staged = j + 1
            self.rows_per_call.append(1)
            if j + 1 == stage[3]:
                self._run_stage()
            return
        if self._staged:
            self._run_stage()  # rows stay in call order
        fast = self._fast_call
        if (
            fast is not None
            and x.shape == fast[0]
            and x.dtype is fast[1]
            and x.is_cpu
            and x.is_contiguous()
        ):
            # A large input of the same shape as the last fused call: the checks and the job
            # below are done; only the input's address and the row's change.
            _shape, _dtype, job, elems, samples, kernel, _head = fast
            row = self.nrows
            if self._stage_call is False and x.numel() <= _STAGE_FLOATS:
                # the second call of a small shape: from now on staged (see _stage_for)
                self._stage_call = self._stage_for(x, job, elems, samples)
                if self._stage_call is not None:
                    self._fast_call = None
                    self.observe(x)
                    return
            job[0, 0] = x.data_ptr()
            job[0, 1] = self._buf_addr + row * self._row_bytes
            kernel(job)
            self.last = (row, elems)
            self.rows_per_call.append(1)
            self.elems[row] = elems
            self.samples[row] = samples
            self.nrows = row + 1
            if row + 1 >= self.capacity:
                self.flush()
            return
        self.last = None
        x = x.detach()
        if x.dim() < 2 or x.shape[1] != self.running_mean.numel():
            return  # not what the layer takes: the layer itself raises the error
        if x.numel() == 0:
            return  # an empty batch holds no statistics (and would divide 0 by 0)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        n = x.shape[0]
        fused = self._fused
        if fused is None:
            fused = self._fused = self._fused_target(x)
        shift = self.shift
        if fused and x.is_contiguous() and (shift is None or x.dtype is shift.dtype):
            kernel = fused[0]
            c = x.shape[1]
            length = x.numel() // (n * c)
            first = shift is None
            if shift is None:  # the kernel sets it (see below, and _fused.JOB)
                shift = self.shift = torch.empty(c, dtype=x.dtype)
            f64 = int(x.dtype is torch.float64)
            head = (n, c, length, shift.data_ptr(), f64, 0, _fused.blocks())
            row = self._buf_addr + self.nrows * self._row_bytes
            job = np.array([(x.data_ptr(), row, *head)], dtype=np.int64)
            if first:
                job[0, 7] = 1
                kernel(job)
                job[0, 7] = 0
                self._shifted()
            else:
                kernel(job)
            self._count_row(n, x)
            if x.is_cpu:  # calls of this shape take the short way above
                self._fast_call = (x.shape, x.dtype, job, n * length, n, kernel, head)
                # A small input is staged from its second call on: a scan of one batch
                # (or a layer that runs once) does not pay for a stage it would not use.
                self._stage_call = False if x.numel() <= _STAGE_FLOATS else None
            return
        if self.shift is None:
            # Any value within a few standard deviations of the channel mean keeps the sums
            # well conditioned: the first sample's channel means cost 1/N of a pass (the
            # kernel above works them out in its pass).
            first_means = x[0].reshape(x.shape[1], -1).mean(dim=1)
            self.shift = torch.nan_to_num(first_means, nan=0.0, posinf=0.0, neginf=0.0)
            self._shifted()
        view = self._shift_view.get(x.dim())
        if view is None:
            view = self._shift_view[x.dim()] = self.shift.view(1, -1, *([1] * (x.dim() - 2)))
        # x - K into a reused buffer: a fresh activation-sized temporary per call costs more
        # than the arithmetic (page faults on large tensors).
        out = scratch.like(x) if scratch is not None else None
        xs = torch.sub(x, view, out=out) if out is not None else x - view
        if x.dim() == 2:
            s1 = xs
            s2 = xs * xs
            per_row = 1
        else:
            self.spatial = True
            xs = xs.flatten(2)
            s1 = xs.sum(-1)
            s2 = torch.linalg.vector_norm(xs, dim=-1).square_()  # one pass, no temporary
            per_row = xs.shape[-1]
        rows = torch.stack((s1, s2, s1 * s1), 1)
        if self.per_unit_sample:
            self.rows_per_call.append(n)
            for chunk in rows.split(self.capacity):
                k = chunk.shape[0]
                if self.nrows + k > self.capacity:
                    self.flush()
                row = self.nrows
                self._buffer()[row : row + k].copy_(chunk)
                self.elems[row : row + k] = per_row
                self.samples[row : row + k] = 1
                self.nrows = row + k
        else:
            buf = self.buf if self.buf is not None else self._buffer()
            torch.sum(rows, 0, dtype=torch.float64, out=buf[self.nrows])
            self._count_row(n, x)

    def _shifted(self) -> None:
        """The shift was just set: its float64 copy, and the views made of the old one gone."""
        assert self.shift is not None
        shift = self.shift  # on CPU through NumPy: a third of Tensor.to's time, the same values
        as64 = torch.from_numpy(shift.numpy().astype(np.float64)) if shift.is_cpu else None
        self.shift64 = as64 if as64 is not None else shift.to(torch.float64)
        self._views = None
        self._shift_view = {}

    @property
    def fast(self) -> bool:
        """Whether calls of the last input's shape have their compiled short way (see
        :meth:`book`)."""
        return self._fast_call is not None

    def book(self, x: torch.Tensor, stage: bool = True) -> tuple[int, int, tuple[int, ...]] | None:
        """Book the next buffer row for a call whose reduction the caller runs: its kernel job
        as (input address, row address, the job's other columns), see ``_fused.JOB``.  The
        caller keeps ``x`` alive until it has run the job, and folds (:meth:`flush`) once
        :attr:`nrows` reaches :attr:`capacity`.

        ``None`` where the call should go through :meth:`observe` instead: not the shape,
        dtype or layout of the last fused call, or (with ``stage``) small enough to be staged.
        """
        fast = self._fast_call
        if (
            fast is None
            or x.shape != fast[0]
            or x.dtype is not fast[1]
            or not x.is_contiguous()
            or (stage and x.numel() <= _STAGE_FLOATS)
        ):
            return None
        if self._staged:
            self._run_stage()  # rows stay in call order
        row = self.nrows
        elems = fast[3]
        self.last = (row, elems)
        self.rows_per_call.append(1)
        self.elems[row] = elems
        self.samples[row] = fast[4]
        self.nrows = row + 1
        return (x.data_ptr(), self._buf_addr + row * self._row_bytes, fast[6])

    def book_calls(self, xs: Sequence[torch.Tensor], start: int) -> np.ndarray | None:
        """:meth:`book` (without staging) of ``xs[start:]`` while they have the last fused
        call's shape, dtype and layout and rows are free: their jobs, one row each, booked with
        one slice per array instead of a call each (a held step's worth at batch size 1)."""
        fast = self._fast_call
        if fast is None:
            return None
        shape, dtype, addresses = fast[0], fast[1], []
        for i in range(start, len(xs)):
            x = xs[i]
            if x.shape != shape or x.dtype is not dtype or not x.is_contiguous():
                break
            addresses.append(x.data_ptr())
        if not addresses:
            return None
        if self._staged:
            self._run_stage()  # rows stay in call order
        row = self.nrows
        k = min(len(addresses), self.capacity - row)
        self.elems[row : row + k] = fast[3]
        self.samples[row : row + k] = fast[4]
        self.rows_per_call += [1] * k
        self.nrows = row + k
        self.last = (row + k - 1, fast[3])
        jobs = np.empty((k, _fused.JOB_COLUMNS), dtype=np.int64)
        jobs[:, 0] = addresses[:k]
        jobs[:, 1] = np.arange(row, row + k) * self._row_bytes + self._buf_addr
        jobs[:, 2:] = fast[6]
        return jobs

    def _stage_for(
        self, x: torch.Tensor, job: np.ndarray, elems: int, samples: int
    ) -> tuple[Any, ...] | None:
        """(shape, dtype, slot views, slots, (elements, samples) per row, jobs, row offsets,
        kernel).

        At batch size 1 a layer's input is a few thousand floats: reducing it costs about a
        microsecond, and the Python around a kernel call several times that, once per layer
        and batch (issue 16).  Inputs of up to 4096 elements are therefore copied into a stage
        of up to 256 KiB and reduced one block at a time: one copy per call, one kernel call
        per block (one job per slot), the same rows in the same order.
        """
        kernel = _fused.kernel()
        if kernel is None:
            return None
        slots = max(2, min(_FLUSH_ROWS, _STAGE_SIZE // x.numel()))
        stage = torch.empty((slots, *x.shape), dtype=x.dtype).numpy()
        jobs = np.repeat(job, slots, axis=0)
        jobs[:, 0] = stage.ctypes.data + np.arange(slots) * (stage.nbytes // slots)
        offsets = np.arange(slots) * self._row_bytes
        # NumPy views of the slots: 64 of them cost about 12 us, 64 tensor views (unbind) up to
        # a millisecond inside a scan (4.7 ms of the tiny-batch scan's 150); a copy into one
        # costs 2.1 us against a tensor view's 1.7 us.  They keep the stage alive.
        return (x.shape, x.dtype, list(stage), slots, (elems, samples), jobs, offsets, kernel)

    def _run_stage(self) -> None:
        """Reduce the staged calls into buffer rows (in call order)."""
        j = self._staged
        if not j:
            return
        self._staged = 0
        stage = self._stage_call
        assert stage
        (elems, samples), jobs, offsets, kernel = stage[4:]
        if self.nrows + j > self.capacity:
            self._fold_rows()
        row = self.nrows
        jobs[:j, 1] = offsets[:j] + (self._buf_addr + row * self._row_bytes)
        kernel(jobs[:j])
        self.elems[row : row + j] = elems
        self.samples[row : row + j] = samples
        self.nrows = row + j
        self.last = (row + j - 1, elems)
        if self.nrows >= self.capacity:
            self._fold_rows()

    def _fused_target(self, x: torch.Tensor) -> tuple[Any, ...] | tuple[()]:
        """(kernel,) where the fused kernel applies (the buffer allocated), else ()."""
        kernel = _fused.kernel()
        if kernel is None or self.per_unit_sample or not x.is_cpu:
            return ()
        self._buffer()
        return (kernel,)

    def _count_row(self, n: int, x: torch.Tensor) -> None:
        """Book one batch row just written to the buffer."""
        per_row = x.numel() // (n * x.shape[1]) if n else 1
        if x.dim() > 2:
            self.spatial = True
        row = self.nrows
        self.last = (row, n * per_row)  # the row stays in the buffer until the next call
        self.rows_per_call.append(1)
        self.elems[row] = n * per_row
        self.samples[row] = n
        self.nrows = row + 1
        if self.nrows >= self.capacity:
            self.flush()

    def last_batch_stats(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(mean, biased variance, elements per channel) of the batch just observed, float64.

        ``None`` when the last call recorded no batch row (an input the layer does not take,
        or per-sample rows).
        """
        if self._staged:
            self._run_stage()
        if self.last is None or self.buf is None:
            return None
        row, count = self.last
        t1, t2 = self.buf[row, 0], self.buf[row, 1]
        e = t1 / count
        assert self.shift64 is not None
        return self.shift64 + e, (t2 / count - e * e).clamp_min(0), count

    def rows(self) -> torch.Tensor:
        """The rows written and not yet folded, (rows, 3, C) float64: sum of x - K, of
        (x - K)^2 and of squared per-sample sums, one row per batch (staged calls reduced)."""
        self._run_stage()
        return self._buffer()[: self.nrows]

    def _buffer(self) -> torch.Tensor:
        """Fixed-size float64 rows waiting to be folded: memory does not grow with batches."""
        if self.buf is None:
            c = self.running_mean.numel()
            self.buf = torch.empty(self.capacity, 3, c, dtype=torch.float64, device=self.device)
            self._buf_np = self.buf.numpy() if self.device.type == "cpu" else None
            self._buf_addr = self.buf.data_ptr()
            self.elems, self.samples = np.empty((2, self.capacity))
            self._counts_at = self.elems.ctypes.data  # samples follow elems
        return self.buf

    # -- folding rows into the accumulators ------------------------------------------------
    # Row order of ``totals`` and ``sums``.  p: sum (x-K) and (x-K)^2; sum_m2: sum_b m^2(b, c)
    # against running stats; r1, r2, rv: the noise term; u: sum_b (mu_b - K) and its square;
    # z, between: per-sample means (the non-i.i.d. detector).
    SCALARS = ("count", "samples", "units", "nonfinite")
    VECTORS = ("p1", "p2", "sum_m2", "r1", "r2", "rv", "u1", "u2", "z1", "z2", "between")

    def _arrays(self) -> tuple[Any, ...]:
        """(namespace, buffered rows, totals, sums, shift, safe mean, safe var, weights).

        On CPU these are NumPy views of the same storage: the fold is some forty operations on
        vectors of C floats, and measured here NumPy runs them in about half of torch's time.
        On an accelerator they stay tensors on the device (no host synchronisation).
        """
        assert self.shift64 is not None  # set by the first row
        buf = self._buffer()
        if self.device.type == "cpu":
            # The views, once per recorder: the array fold runs once per 64 to 512 calls of
            # each layer, and seven .numpy() calls each time cost more than a fold.
            views = self._views
            if views is None:
                views = self._views = tuple(
                    t.numpy()
                    for t in (self.totals, self.sums, self.shift64, self.safe_mean,
                              self.safe_var, self.weights)
                )  # fmt: skip
            assert self._buf_np is not None
            return (np, self._buf_np[: self.nrows], *views)
        t = (self.totals, self.sums, self.shift64, self.safe_mean, self.safe_var, self.weights)
        return (torch, buf[: self.nrows], *t)

    def flush(self) -> None:
        """Fold every call so far (staged and buffered) into the accumulators."""
        self._run_stage()
        self._fold_rows()

    def _fold_rows(self) -> None:
        """Fold the buffered rows into the accumulators, vectorised over rows."""
        if not self.nrows:
            return
        if self.device.type == "cpu" and _fused.fold() is not None:
            # the same arithmetic, compiled: one call instead of ~45 array ops
            fold_all([self])
            return
        xp, rows, totals, sums, shift, safe_mean, safe_var, weights = self._arrays()
        r = self.nrows
        n_elems, n_samples = self.elems[:r], self.samples[:r]
        self.nrows = 0
        with np.errstate(divide="ignore", invalid="ignore"):  # eps = 0: NaN is the answer
            self._fold_arrays(
                xp, rows, n_elems, n_samples, totals, sums, shift, safe_mean, safe_var, weights
            )

    def _fold_job(self) -> list[int]:
        """This CPU recorder's row of the compiled fold (``_fused.FOLD_JOB``), kept while its
        tensors stay the same; R and the scores' offset are the caller's (0 here)."""
        buf = self._buffer()
        key = (buf, self.shift64, self.totals, self.sums)
        cached = self._fold_row
        if cached is None or any(a is not b for a, b in zip(cached[0], key, strict=True)):
            assert self.shift64 is not None  # set by the first row
            tensors = (self.shift64, self.safe_mean, self.safe_var, self.weights, self.totals,
                       self.sums)  # fmt: skip
            assert all(t.dtype is torch.float64 and t.is_contiguous() for t in tensors)
            shift, mean, var, weights, totals, sums = (t.data_ptr() for t in tensors)
            counts, gap = self._counts_at, self.elems.nbytes
            row = (buf.data_ptr(), counts, counts + gap, shift,
                   mean, var, weights, totals, sums, 0, self._row_bytes // 24, 0)  # fmt: skip
            cached = self._fold_row = (key, list(row))
        return cached[1]

    def _fold_arrays(
        self,
        xp: Any,
        rows: Any,
        elems: np.ndarray,
        samples: np.ndarray,
        totals: Any,
        sums: Any,
        shift: Any,
        safe_mean: Any,
        safe_var: Any,
        weights: Any,
    ) -> None:
        """:meth:`flush` in array code (NumPy, or torch on an accelerator)."""
        # columns: elements per row, samples per row, elements per sample in the row
        host = np.stack([elems, samples, elems / samples])[:, :, None]
        n, ns, per_sample_elems = host if xp is np else torch.from_numpy(host).to(self.device)
        finite = xp.isfinite(rows).reshape(rows.shape[0], -1).all(1)
        keep = finite * 1.0
        rows = xp.where(finite[:, None, None], rows, 0.0)  # a skipped row adds nothing
        t1, t2, q = rows[:, 0], rows[:, 1], rows[:, 2]
        e = t1 / n  # mu_b - K
        var_b = t2 / n - e**2
        var_b = var_b * (var_b > 0)  # clamp at 0 (rounding), the same for both namespaces
        # where, not a product: with eps = 0 a zeroed row's terms are 0 * inf (NaN)
        kept = finite[:, None]
        m2 = xp.where(kept, mismatch_sq(shift + e, var_b, safe_mean, safe_var, self.eps), 0.0)
        scores = xp.where(finite, layer_score(m2, weights), math.nan)
        self.unit_scores.append(torch.from_numpy(scores) if xp is np else scores)
        inv2 = xp.where(kept, 1.0 / (var_b + self.eps), 0.0)
        d1 = t1 / per_sample_elems  # sum over the row's samples of (sample mean - K)
        totals[0] += (n[:, 0] * keep).sum()
        totals[1] += (ns[:, 0] * keep).sum()
        totals[2] += keep.sum()
        totals[3] += (1.0 - keep).sum()
        # Zeroed rows have var_b = 0, e = 0 and inv2 = 0: they add nothing below.
        sums += xp.stack(
            [
                t1,
                t2,
                m2,
                var_b * inv2,
                var_b * xp.sqrt(inv2),
                var_b,
                e,
                e**2,
                d1,
                q / per_sample_elems**2,
                d1**2 / ns,
            ]
        ).sum(1)

    def named(self) -> dict[str, torch.Tensor]:
        """The accumulators by name (views: writing to one writes to the recorder)."""
        return {
            **dict(zip(self.SCALARS, self.totals.unbind(), strict=True)),
            **dict(zip(self.VECTORS, self.sums.unbind(), strict=True)),
        }

    # -- merging shards -------------------------------------------------------------------
    def rebase(self, shift: torch.Tensor) -> None:
        """Express every shifted sum relative to ``shift`` instead of this recorder's own.

        Shards start from different first batches, hence different shifts; sums of (x - K)
        and (x - K)^2 convert exactly: with d = K_old - K_new, sum (x - K_new) = p1 + n d and
        sum (x - K_new)^2 = p2 + 2 d p1 + n d^2 (likewise per batch and per sample).
        """
        self.flush()
        shift = shift.to(device=self.device, dtype=torch.float64)
        if self.shift64 is not None:
            d = self.shift64 - shift
            a = self.named()
            for first, second, n in (("p1", "p2", "count"), ("u1", "u2", "units")):
                a[second] += 2 * d * a[first] + a[n] * d.square()
                a[first] += a[n] * d
            a["between"] += 2 * d * a["z1"] + a["samples"] * d.square()
            a["z2"] += 2 * d * a["z1"] + a["samples"] * d.square()
            a["z1"] += a["samples"] * d
        self.shift64 = shift
        self.shift = shift.to(torch.float32 if self.shift is None else self.shift.dtype)
        self._shift_view = {}
        self._views = None
        self._fused = None
        self._fast_call = None
        self._stage_call = None

    def packed(self) -> torch.Tensor:
        """Every additive accumulator in one flat float64 tensor (for one all_reduce)."""
        self.flush()
        spatial = torch.tensor([float(self.spatial)], dtype=torch.float64, device=self.device)
        return torch.cat([self.totals, spatial, self.sums.flatten()])

    def unpack(self, flat: torch.Tensor) -> None:
        """Load accumulators from :meth:`packed` (after a sum over shards)."""
        head = len(self.SCALARS)
        self.totals = flat[:head].clone()
        self.spatial = bool(flat[head] > 0)
        self.sums = flat[head + 1 :].reshape(self.sums.shape).clone()
        self._views = None

    def finish(self) -> LayerMeasurement | None:
        """Reduce to CPU tensors; ``None`` if the layer never ran on this path."""
        return finish_all([self])[0]


def _host(join: Callable[..., torch.Tensor], tensors: Sequence[Any], *dim: int) -> np.ndarray:
    """``join(tensors, *dim)`` (``torch.cat`` or ``torch.stack``) as a float64 NumPy array:
    one op on one device, else the parts moved to the CPU first."""
    if not all(t.is_cpu for t in tensors) and len({t.device for t in tensors}) > 1:
        tensors = [t.cpu() for t in tensors]  # (Tensor.device builds an object: is_cpu first)
    return join(tensors, *dim).detach().to("cpu", torch.float64).numpy()


def fold_all(recorders: Sequence[Recorder]) -> None:
    """Fold the buffered rows of CPU recorders in one call of the compiled fold (it must be
    on): the scores of all in one array, each recorder's a view of its part."""
    jobs = np.array([rec._fold_job() for rec in recorders], dtype=np.int64)
    counts = [rec.nrows for rec in recorders]
    ends = np.cumsum(counts)
    jobs[:, 9] = counts
    jobs[:, 11] = ends - counts
    scores = np.empty(int(ends[-1]))
    fold = _fused.fold()
    assert fold is not None
    fold(jobs, np.array([rec.eps for rec in recorders]), scores)
    for rec, end, n in zip(recorders, ends.tolist(), counts, strict=True):
        rec.unit_scores.append(torch.from_numpy(scores[end - n : end]))
        rec.nrows = 0


def finish_all(recorders: Sequence[Recorder]) -> list[LayerMeasurement | None]:
    """:meth:`Recorder.finish` of many recorders in one vectorised pass over all their channels.

    The closing arithmetic is a few dozen operations on vectors of C floats per layer; done
    layer by layer it costs a scan of a 20-layer model several milliseconds (issue 16), done
    once over the concatenated channels of every layer it costs what one layer did.
    """
    out: list[LayerMeasurement | None] = [None] * len(recorders)
    live = []
    compiled = []  # folded together below
    fold = _fused.fold()
    for i, rec in enumerate(recorders):
        rec._run_stage()
        if fold is not None and rec.nrows and rec.device.type == "cpu":
            compiled.append(rec)
        else:
            rec.flush()
        if rec.shift64 is not None:
            live.append(i)
    if compiled:
        fold_all(compiled)
    if not live:
        return out
    recs = [recorders[i] for i in live]
    sizes = [rec.sums.shape[1] for rec in recs]
    ends = np.cumsum(sizes).tolist()
    starts = [0, *ends[:-1]]

    # One op per quantity over every recorder (one transfer from an accelerator), then the
    # closing arithmetic over every channel of every layer at once.
    assert all(rec.shift64 is not None for rec in recs)
    totals = _host(torch.stack, [rec.totals for rec in recs])  # (layers, 4)
    sums = _host(torch.cat, [rec.sums for rec in recs], 1)  # (11, channels)
    vectors = ((r.shift64, r.safe_mean, r.safe_var, r.weights, r.running_mean, r.running_var)
               for r in recs)  # fmt: skip
    k, safe_mean, safe_var, weights, running_mean, running_var = (
        _host(torch.cat, ts) for ts in zip(*vectors, strict=True)
    )
    eps = np.array([rec.eps for rec in recs])
    closer = _fused.close()
    if closer is not None:  # the same expressions compiled, one pass: the same bits
        per_layer = np.empty((10, ends[-1]))
        vectors64 = np.stack((k, safe_mean, safe_var, weights, running_mean, running_var))
        closer(totals, sums, vectors64, eps, np.array(sizes, dtype=np.int64), per_layer)
    else:
        per_layer = close_rows(totals, sums, (k, safe_mean, safe_var, weights, running_mean,
                                              running_var), eps, sizes)  # fmt: skip
    cpu = torch.device("cpu")
    host = torch.from_numpy
    empty = torch.empty(0, dtype=torch.float64)
    for i, rec, a, b, sums_l in zip(live, recs, starts, ends, totals.tolist(), strict=True):
        n_count, n_samples, n_units, n_nonfinite = sums_l
        measurable = not rec.per_unit_sample and n_units >= 2 and n_samples > n_units
        on_cpu = rec.device.type == "cpu"
        scores = rec.unit_scores
        unit_scores = (scores[0] if len(scores) == 1 else torch.cat(scores)) if scores else empty
        if not on_cpu:
            unit_scores = unit_scores.to(cpu)
        out[i] = LayerMeasurement(
            units=int(n_units),
            samples=int(n_samples),
            pooled=Moments(n_count, host(per_layer[3, a:b]), host(per_layer[8, a:b])),
            running_mean=rec.running_mean if on_cpu else rec.running_mean.to(cpu),
            running_var=rec.running_var if on_cpu else rec.running_var.to(cpu),
            weights=rec.weights if on_cpu else rec.weights.to(cpu),
            channel_m2=host(per_layer[5, a:b]),
            unit_scores=unit_scores,
            noise_m2=host(per_layer[6, a:b]),
            fit_m2=host(per_layer[7, a:b]),
            noniid=host(per_layer[9, a:b]) if measurable else None,
            nonfinite_units=int(n_nonfinite),
            per_sample=n_samples == n_units if not rec.per_unit_sample else True,
            spatial=rec.spatial,
            block=(per_layer, a, b),
        )
    return out

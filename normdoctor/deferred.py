"""Layer inputs held until the forward returns, then reduced in one kernel call.

Inside a forward, each distinct piece of code the recording runs per layer call costs several
times what it costs in a loop of its own: measured in a 500-layer stack (16 channels, 4x4, batch
32), a NumPy view of the input took 7-9 us against 0.7 us alone, and the kernel call 20-30 us
against a few (the model's own work in between evicts the interpreter's and the libraries'
code and data).  A :class:`Deferred` therefore only appends each small call, and reduces them
all when the forward has returned: one job per call, one kernel call, rows in call order.
"""

from __future__ import annotations

import numpy as np
import torch

from . import _fused
from .recording import Recorder, Scratch

__all__ = ["SERIAL_BUDGET", "Deferred"]

# Inputs up to this many elements are held; at most this many elements at a time (64 MiB of
# float32), past which the held calls are reduced mid-forward.
_DEFER_FLOATS = 65536
_DEFER_BUDGET = 1 << 24
#: A budget whose flushes always run on the calling thread: it holds at most this plus one
#: input of up to 65536 elements, which ``_fused.batch_sums`` reduces without waking numba's
#: threads (a training loop's torch threads would then share the cores with them).
SERIAL_BUDGET = _fused.PARALLEL_ABOVE - _DEFER_FLOATS
#: What the monitor holds across training steps (4 MiB of float32), reduced on the calling
#: thread in kernel calls of at most 2^17 elements (``Deferred(serial=True)``).  A flush's
#: cost is mostly per recorder, not per input (booking a run of calls, a fold, after the
#: model's work has evicted their code): at batch size 1 a flush of 2^16 elements took 360 us
#: inside the training loop, every 18 steps (20 us a step); with 2^20, 2.2-4.0 ms every 290
#: (11-12 us a step, measured in place with and without timers around its parts).
MONITOR_BUDGET = 1 << 20


#: ``Recorder.defer`` of a layer whose first call is held as a copy until the forward returns.
COPY = "copy"
#: Forwards through which each layer's first input is watched before calls are held across
#: forwards (Deferred.end_forward): a scan's train and eval forwards of one batch.
_TRIAL = 2


class Deferred:
    """Calls of recorders held until :meth:`flush` (call it when the forward returns).

    A call is held when its input is small (up to 65536 elements) and on CPU, and the fused
    kernel is on.  Holding an input is safe only while nothing writes to it, which the
    tensor's version counter tells:

    * A layer's first call is held as a copy, and its input is watched: if the input was
      unchanged when the forward returned (and the layer's calls have a compiled fast path),
      the layer's later calls are held as they are, else recorded at once.
    * Each held call is checked against its version: a call whose input was written since (a
      model that changes an input in place after the layer read it, on some calls only) is
      not recorded, counted in :attr:`lost`, and the layer records at once from then on.
    * Inference tensors have no version counter: their calls are recorded at once.

    A layer whose first input is not held records at once from then on.  At most ``budget``
    elements are held (by default ``1 << 24``, 64 MiB of float32); past that the held calls
    are reduced.  With ``across`` (a scan), small forwards' calls may stay held past their
    forward (:meth:`end_forward`); the monitor holds training steps' calls, detached.
    """

    __slots__ = ("across", "budget", "calls", "detach", "detached", "enabled", "held", "lost",
                 "serial", "stage", "steady", "trial", "trial_left", "watch")  # fmt: skip

    def __init__(
        self,
        *,
        budget: int = _DEFER_BUDGET,
        stage: bool = True,
        across: bool = False,
        serial: bool = False,
        detach: bool = False,
    ) -> None:
        """``budget``: elements held at most before the held calls are reduced.  ``stage``:
        inputs of up to 4096 elements go into their recorder's stage at :meth:`flush`, which
        pays where a flush holds few calls (one forward at batch size 1); without it every
        held call is a job of the one kernel call (the monitor, which holds many steps).
        ``across``: :meth:`end_forward` may keep small forwards' calls held (see there).
        ``serial``: flushes reduce on the calling thread, however many elements they hold.
        ``detach``: each input is held detached (the same storage and version counter, without
        the autograd graph), to be held past its forward: the monitor's, whose steps' graphs
        and saved tensors must not stay alive through it."""
        self.budget = budget
        self.serial = serial
        self.detach = detach
        self.stage = stage
        self.across = across
        # Each layer's first input, watched through the next _TRIAL forwards (see end_forward)
        self.trial: list[tuple[torch.Tensor, int]] = []
        self.trial_left = 0
        self.steady = False  # every first input so far outlived its trial unchanged
        self.detached = 0  # calls[:detached] hold no autograd graph (see end_forward)
        self.calls: list[tuple[Recorder, torch.Tensor, int]] = []
        self.held = 0  # elements held
        self.watch: list[tuple[Recorder, torch.Tensor, int]] = []  # first calls, see above
        self.lost: dict[str, int] = {}  # per layer: held calls whose input was written since
        self.enabled = _fused.kernel() is not None  # else nothing is held

    def observe(self, rec: Recorder, x: torch.Tensor, scratch: Scratch | None = None) -> None:
        """``rec.observe(x, scratch)``, or the call held until :meth:`flush`."""
        defer = rec.defer
        if defer is not False and self.enabled:
            n = x.numel()
            try:
                version = x._version
            except RuntimeError:  # an inference tensor: no version counter
                n = _DEFER_FLOATS + 1
            if n <= _DEFER_FLOATS and x.is_cpu:
                if defer is True:
                    self.calls.append((rec, x.detach() if self.detach else x, version))
                else:  # the first forward: a copy, and the input watched (see above)
                    copy = (x.detach() if x.requires_grad else x).clone()
                    self.calls.append((rec, copy, copy._version))
                    if defer is None:
                        rec.defer = COPY
                        self.watch.append((rec, x, version))
                self.held += n
                if self.held > self.budget:
                    self.flush()
                return
            if defer is None:
                # A first input too large to hold (or on an accelerator, or an inference
                # tensor): the layer records at once, without these checks on every call.
                rec.defer = False
            if self.calls:
                self.flush()  # the held calls first: rows stay in call order
        rec.observe(x, scratch)

    def note(self) -> str | None:
        """What :attr:`lost` means for a report (``None``: nothing lost)."""
        if not self.lost:
            return None
        calls = ", ".join(f"{name} ({n})" for name, n in self.lost.items())
        return (
            f"calls not recorded: {calls}: the model wrote to the layer's input in place after "
            "the layer had read it"
        )

    def flush(self) -> None:
        """Reduce every held call into its recorder's rows (call it when the forward returns)."""
        calls = self.calls
        if calls:
            across = self.detach or self.detached > 0  # held past their forward
            self.calls = []
            self.held = 0
            self.detached = 0
            _reduce_held(calls, self.lost, self.stage, across, self.serial)
        if self.watch:
            for rec, x, version in self.watch:
                # Holding a view keeps its whole storage alive: a layer whose input is part of
                # a larger tensor (a slice of channels, say) records at once, so that what is
                # held stays within the budget in bytes, not only in elements.
                owns = x.untyped_storage().nbytes() <= x.numel() * x.element_size()
                rec.defer = x._version == version and rec.fast and owns
                if self.across and rec.defer:
                    self.trial.append((x, version))
            if self.across:  # a layer's first call: it is watched through the next forwards
                self.steady = False
                self.trial_left = _TRIAL
            self.watch.clear()

    def end_forward(self) -> None:
        """The forward has returned: :meth:`flush`, or (``across``) keep holding its calls.

        At batch size 1 a forward holds a few small calls, and a flush per forward cost a third
        of what a scan adds to it (issue 16).  Calls may stay held past their forward once each
        layer's first input has outlived the next two forwards unchanged (a train and an eval
        forward): a model that writes, in every forward, into a tensor it feeds to a norm layer
        (a persistent buffer, a data loader that fills one tensor in place) fails that trial,
        and its calls are reduced forward by forward as before, where the version check finds
        none written.  Held calls are reduced once 2^16 elements are held (on the calling
        thread, see :data:`SERIAL_BUDGET`) and whenever results are read.
        """
        if self.trial:
            if any(x._version != version for x, version in self.trial):
                self.across = False  # an input written by a later forward: flush per forward
                self.trial.clear()
            else:
                self.trial_left -= 1
                if self.trial_left <= 0:
                    self.trial.clear()
                    self.steady = True
        if self.across and self.steady and not self.watch and self.held <= SERIAL_BUDGET:
            calls, start = self.calls, self.detached
            for i in range(start, len(calls)):
                rec, x, version = calls[i]
                if x._version != version:
                    break  # written after its layer read it: lost, and found now, as by a flush
                if x.requires_grad:  # (a no_grad forward holds no autograd graph)
                    calls[i] = (rec, x.detach(), version)
            else:
                self.detached = len(calls)  # held past their forward
                return
        self.flush()


#: Held calls of one recorder from which they are booked together (Recorder.book_calls).
_BULK = 4


def _reduce_held(
    calls: list[tuple[Recorder, torch.Tensor, int]],
    lost: dict[str, int],
    stage: bool,
    runs: bool,
    serial: bool = False,
) -> None:
    """:meth:`Deferred.flush`: one job per held call, one kernel call (or a few, where a
    recorder's buffer fills or a call needs the general path).  With ``runs`` (calls held over
    several forwards, as the monitor holds steps) they are taken recorder by recorder, each
    one's in call order, and a recorder's run of calls of one shape is booked in one go: at
    batch size 1 booking each call was a fifth of the monitor's cost per step.  With ``serial``
    the kernel runs on the calling thread (:func:`_serially`)."""
    if not runs:
        _reduce_in_order(calls, lost, stage)
        return
    compiled = _fused.kernel()
    assert compiled is not None  # calls are held only where it is on
    kernel = _serially if serial else compiled
    parts: list[np.ndarray] = []  # booked jobs not run yet
    singles: list[list[int]] = []

    def run() -> None:
        if singles:
            parts.append(np.array(singles, dtype=np.int64))
            singles.clear()
        if parts:
            kernel(parts[0] if len(parts) == 1 else np.concatenate(parts))
            parts.clear()

    def one(rec: Recorder, x: torch.Tensor) -> None:
        job = rec.book(x, stage=stage)
        if job is None:
            # The general path, which sets up another shape or layout.  Or an input so small
            # that the recorder's stage (reduced once per 64 calls) beats a job per forward;
            # the copy into it, done here, costs a fraction of the same copy inside the forward.
            run()  # first: the recorder may fold its rows on the way, and rows keep order
            rec.observe(x)
            return
        singles.append([job[0], job[1], *job[2]])
        if rec.nrows >= rec.capacity:
            run()
            rec.flush()

    groups: dict[Recorder, list[torch.Tensor]] = {}
    for rec, x, version in calls:
        if x._version != version:  # written since the layer read it: that input is gone
            name = rec.layer.name
            lost[name] = lost.get(name, 0) + 1
            rec.defer = False
        elif (xs := groups.get(rec)) is None:
            groups[rec] = [x]
        else:
            xs.append(x)
    for rec, xs in groups.items():
        i, n = 0, len(xs)
        while i < n:
            jobs = rec.book_calls(xs, i) if n - i >= _BULK else None
            if jobs is None:
                one(rec, xs[i])
                i += 1
                continue
            i += len(jobs)
            parts.append(jobs)
            if rec.nrows >= rec.capacity:
                run()
                rec.flush()
    run()


def _serially(jobs: np.ndarray) -> None:
    """``batch_sums(jobs)`` on the calling thread: in consecutive calls of at most 2^17
    elements (``_fused.PARALLEL_ABOVE``), each of which the kernel runs without its threads."""
    kernel = _fused.kernel()
    assert kernel is not None
    sizes = jobs[:, 2] * jobs[:, 3] * jobs[:, 4]
    work = np.cumsum(sizes)
    total = int(work[-1]) if len(work) else 0
    if total <= _fused.PARALLEL_ABOVE:
        kernel(jobs)
        return
    # Jobs ending in the same stretch of ``unit`` elements go together: such a run starts at
    # most one job (at most ``most`` elements) before its stretch, so it holds at most
    # unit + most = PARALLEL_ABOVE elements.  A job above that runs alone (in parallel).
    unit = max(_fused.PARALLEL_ABOVE - int(sizes.max()), 1)
    cuts = np.searchsorted(work, np.arange(unit, total, unit), side="right")
    start = 0
    for end in [*np.unique(cuts).tolist(), len(jobs)]:
        if end > start:
            kernel(jobs[start:end])
            start = end


def _reduce_in_order(
    calls: list[tuple[Recorder, torch.Tensor, int]], lost: dict[str, int], stage: bool
) -> None:
    """:func:`_reduce_held` of one forward's calls, in call order (a recorder has one or
    two of them: nothing to book together)."""
    addresses: list[int] = []  # per job: the input's, the output row's, the rest of the job
    rows: list[int] = []
    heads: list[tuple[int, ...]] = []

    def run() -> None:
        jobs = np.empty((len(heads), _fused.JOB_COLUMNS), dtype=np.int64)
        jobs[:, 0] = addresses
        jobs[:, 1] = rows
        jobs[:, 2:] = heads
        kernel = _fused.kernel()
        assert kernel is not None  # a row was booked for it
        kernel(jobs)
        addresses.clear()
        rows.clear()
        heads.clear()

    for rec, x, version in calls:
        if x._version != version:  # written since the layer read it: that input is gone
            name = rec.layer.name
            lost[name] = lost.get(name, 0) + 1
            rec.defer = False
            continue
        job = rec.book(x, stage=stage)
        if job is None:
            # The general path, which sets up another shape or layout.  Or an input so small
            # that the recorder's stage (reduced once per 64 calls) beats a job per forward;
            # the copy into it, done here, costs a fraction of the same copy inside the forward.
            if heads:
                run()  # first: a recorder may fold its rows on the way, and rows keep order
            rec.observe(x)
            continue
        addresses.append(job[0])
        rows.append(job[1])
        heads.append(job[2])
        if rec.nrows >= rec.capacity:
            run()
            rec.flush()
    if heads:
        run()

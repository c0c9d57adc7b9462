"""normdoctor.monitor: the mismatch watched while a model trains (issue 18).

The sample architecture trained as ``sample_models/build.py`` trains it (load_digits 8x8,
normalized; Adam; cross-entropy): at batch size 1 the monitor flags and recommends
InstanceNorm, on shuffled batches of 64 it stays quiet, on class-sorted batches it names the
non-i.i.d. cause.  And the monitor leaves training itself unchanged, bit for bit.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from sklearn.datasets import load_digits
from torch import nn

import normdoctor
from normdoctor import ScanReport, Verdict, _fused
from normdoctor.monitor import Flag, MonitorWarning
from sample_models.archs import DigitsCNN

ROOT = Path(__file__).resolve().parents[1]
ARCH = "sample_models.archs:DigitsCNN"


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    images = d.images.astype(np.float32)[:, None] / np.float32(16.0)
    x = (images - images.mean()) / images.std()
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(d.target.astype(np.int64))


X, Y = _digits()


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: one intra-op thread (what their training needs; on a loaded
    machine more threads only wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batches(bs: int, order: str, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Index batches: "shuffle" (i.i.d.) or "class-sorted" (one class per batch, batch order
    shuffled), epoch after epoch, as build.py forms them."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        if order == "shuffle":
            perm = torch.randperm(len(Y), generator=gen)
            out += [perm[i : i + bs] for i in range(0, len(Y) - bs + 1, bs)]
        else:
            chunks = []
            for c in range(10):
                idx = torch.nonzero(c == Y).flatten()
                idx = idx[torch.randperm(len(idx), generator=gen)]
                chunks += [idx[i : i + bs] for i in range(0, len(idx) - bs + 1, bs)]
            out += [chunks[i] for i in torch.randperm(len(chunks), generator=gen).tolist()]
    return out[:steps]


def _train(
    model: nn.Module, batches: list[torch.Tensor], lr: float, mon: object | None = None
) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for b in batches:
        out = model(X[b])
        if mon is not None:
            mon.observe(out, Y[b])  # type: ignore[attr-defined]
        loss = nn.functional.cross_entropy(out, Y[b])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _watch(bs: int, order: str, steps: int, lr: float, **kwargs: object):
    torch.manual_seed(0)
    model = DigitsCNN()
    flags: list[Flag] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with normdoctor.monitor(model, on_flag=flags.append, **kwargs) as mon:  # type: ignore[arg-type]
            _train(model, _batches(bs, order, steps), lr, mon)
    return mon, mon.report(), flags, [w for w in caught if w.category is MonitorWarning]


@pytest.mark.slow
def test_batch_size_1_is_flagged_with_instance_recommended():
    mon, report, flags, caught = _watch(1, "shuffle", 2000, 1e-3, every=2, window=500)
    assert report.status.harmful and report.flagged, report.verdict
    assert {str(r.recommendation) for r in report.flagged_layers} == {"instance"}
    assert report.composition.batch_size == 1 and report.composition.max_batch == 1
    assert report.end_to_end is not None and report.end_to_end.acc_eval is not None
    assert report.end_to_end.acc_eval < report.end_to_end.acc_train - 0.1
    # Warned once per cause, with its numbers, through warnings and on_flag alike.  The first
    # is batch size 1; while the weights still move fast, a layer's window can also read stale
    # (its activations move within the window: see the README), a cause of its own.
    assert flags[0].cause == "instance"
    assert len({f.cause for f in flags}) == len(flags) <= 2
    assert [str(w.message) for w in caught] == [f.message for f in flags]
    message = flags[0].message
    assert "eval mode diverges from training (agreement " in message
    assert "batch size 1 makes" in message and "to='instance'" in message
    assert "drift " in message and "batch noise " in message
    assert flags[0].step > 500  # not in the warm-up window
    assert mon.step == 2000 and mon.checks == 1000
    assert len(mon.history) == 3  # windows closed at steps 500, 1000, 1500


@pytest.mark.slow
def test_shuffled_batches_of_64_stay_quiet():
    _mon, report, flags, caught = _watch(64, "shuffle", 300, 1e-2, every=5, window=100)
    assert flags == [] and caught == []
    assert not report.flagged and not report.status.harmful, report.verdict
    e = report.end_to_end
    assert e is not None and e.agreement is not None and e.agreement >= 0.95
    assert report.composition.batch_size == 64


@pytest.mark.slow
def test_class_sorted_batches_name_the_non_iid_cause():
    _mon, report, flags, caught = _watch(64, "class-sorted", 300, 1e-2, every=5, window=100)
    assert report.status.harmful, report.verdict
    assert "non-iid" in [f.cause for f in flags]
    flag = next(f for f in flags if f.cause == "non-iid")
    assert "not i.i.d." in flag.message and "x what i.i.d. batches give" in flag.message
    assert any(r.noniid is not None and r.noniid > 4 for r in report.flagged_layers)
    assert len({str(w.message) for w in caught}) == len(caught) == len(flags)  # once per cause


class Dropped(nn.Module):
    """BatchNorm and dropout: training consumes random numbers on every step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.bn1d = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.drop(self.bn1d(h.mean((2, 3)))))


def _run_seeded(watch: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor, float, float]:
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    model = Dropped()
    batches = _batches(8, "shuffle", 40, seed=3)
    if watch:
        with normdoctor.monitor(model, every=3, window=12, warn=False) as mon:
            _train(model, batches, 1e-2, mon)
        assert mon.checks == 13 and len(mon.history) == 3
    else:
        _train(model, batches, 1e-2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, torch.get_rng_state(), random.random(), float(np.random.random())


def test_training_is_unchanged_bit_for_bit():
    plain, rng_plain, py_plain, np_plain = _run_seeded(False)
    watched, rng_watched, py_watched, np_watched = _run_seeded(True)
    assert plain.keys() == watched.keys()
    for key in plain:  # weights, running statistics, num_batches_tracked
        assert torch.equal(plain[key], watched[key]), key
    assert torch.equal(rng_plain, rng_watched)
    assert (py_plain, np_plain) == (py_watched, np_watched)


def test_flags_hooks_and_eval_forwards_are_left_alone():
    torch.manual_seed(0)
    model = Dropped()
    before = len(model.bn._forward_pre_hooks), len(model._forward_hooks)
    with normdoctor.monitor(model, every=2, window=4, warn=False) as mon:
        model.train()
        model.drop.eval()  # a user's own choice of modes survives the checks
        for b in _batches(8, "shuffle", 6):
            model(X[b])
        model.eval()  # validation: not a training step, nothing recorded
        with torch.no_grad():
            model(X[:16])
        assert model.drop.training is False and model.bn.training is False
    assert mon.step == 6 and mon.checks == 3
    assert (len(model.bn._forward_pre_hooks), len(model._forward_hooks)) == before
    assert not any("forward" in m.__dict__ for m in model.modules())  # no tap left


def test_report_renders_and_round_trips_like_a_scan(tmp_path):
    torch.manual_seed(0)
    model = DigitsCNN()
    with normdoctor.monitor(model, every=2, window=20, warn=False) as mon:
        _train(model, _batches(16, "shuffle", 50), 1e-2, mon)
    report = mon.report()
    assert isinstance(report, ScanReport)
    assert report.paths == ("train",) and report.status in set(Verdict)
    assert [r.name for r in report.layers] == ["norm1", "norm2", "norm3"]
    assert all(r.train is not None and r.train.batches == 10 for r in report.layers)
    assert report.composition.num_batches == 10 and report.composition.num_samples == 160
    assert any("training batches, observed by normdoctor.monitor" in n for n in report.notes)
    assert report.evidence is not None and report.evidence.stated
    assert ScanReport.from_json(report.to_json()) == report
    assert json.loads(report.to_json())["composition"]["batch_size"] == 16
    for width in (80, 120):
        console = Console(file=io.StringIO(), width=width, color_system=None)
        console.print(report)
        text = console.file.getvalue()  # type: ignore[attr-defined]
        assert "norm1" in text and "norm3" in text
    # The history: one point per closed window, with its per-layer numbers.
    assert [p.step for p in mon.history] == [20, 40]
    assert all(len(p.layers) == 3 and p.checks == 10 for p in mon.history)
    fig = mon.figure()
    top, bottom = fig.axes
    assert len(top.lines) == 3 and len(bottom.lines) == 1
    fig.savefig(tmp_path / "drift.png")
    assert (tmp_path / "drift.png").stat().st_size > 0


def test_warns_once_through_warnings_logging_and_on_flag(caplog):
    """The sample model trained at batch size 1, run in train mode on single samples."""
    model = normdoctor.load_model(ROOT / "sample_models" / "tiny-batch.pt", ARCH)
    flags: list[Flag] = []
    model.train()
    with (
        caplog.at_level(logging.WARNING, logger="normdoctor.monitor"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        with normdoctor.monitor(model, every=1, window=30, warmup=0, on_flag=flags.append) as mon:
            for i in range(90):
                mon.observe(model(X[i : i + 1]), Y[i : i + 1])
    assert len(mon.history) == 2 and all(p.status.harmful for p in mon.history)
    assert [f.cause for f in flags] == ["instance"]  # two harmful windows, one cause: once
    assert flags[0].step == 30 and flags[0].layers and flags[0].report.status.harmful
    assert [str(w.message) for w in caught if w.category is MonitorWarning] == [flags[0].message]
    assert [r.getMessage() for r in caplog.records] == [flags[0].message]
    assert "accuracy " in flags[0].message and "% in eval mode vs " in flags[0].message


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="every"):
        normdoctor.monitor(DigitsCNN(), every=0)
    with pytest.raises(ValueError, match="window"):
        normdoctor.monitor(DigitsCNN(), every=10, window=5)


def test_inputs_held_across_steps_measure_what_recording_each_step_does():
    # The monitor holds small layer inputs across training steps (up to 2^20 elements) and
    # reduces them together: over 300 steps at batch size 1 and 100 at batch size 8 (five
    # windows closing in between; buffers folding within a flush are checked in test_stats's
    # test_calls_held_over_many_forwards_are_booked_in_call_order), every layer figure of the last
    # window and of the history equals that of a monitor recording each call at once, to
    # float64 rounding of sums taken in another order (1e-12).
    reports = []
    for held in (True, False):
        torch.manual_seed(0)
        model = DigitsCNN()
        with normdoctor.monitor(model, every=25, window=75, warn=False) as mon:
            mon._deferred.enabled = held
            _train(model, _batches(1, "shuffle", 300) + _batches(8, "shuffle", 100), 1e-3, mon)
            assert [r.defer is True for r in mon._recorders.values()] == [held] * 3
            # held past their step without the autograd graph (and its saved tensors)
            assert bool(mon._deferred.calls) == held
            assert not any(x.requires_grad for _r, x, _v in mon._deferred.calls)
        reports.append((mon.report(), list(mon.history)))
    (a, hist_a), (b, hist_b) = reports
    assert len(hist_a) == len(hist_b) >= 4
    for ra, rb in zip(a.layers, b.layers, strict=True):
        for key in ("drift", "shift", "noise", "noniid"):
            x, y = getattr(ra, key), getattr(rb, key)
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-12))
    for pa, pb in zip(hist_a, hist_b, strict=True):
        for la, lb in zip(pa.layers, pb.layers, strict=True):
            assert la.name == lb.name and la.drift == pytest.approx(lb.drift, rel=1e-12)
            assert la.noise == pytest.approx(lb.noise, rel=1e-12)


def test_held_inputs_are_reduced_on_the_training_thread(monkeypatch):
    # A kernel call of more than _fused.PARALLEL_ABOVE elements wakes numba's threads, which
    # then spin beside torch's in the next steps: the monitor holds up to MONITOR_BUDGET
    # elements (hundreds of steps of DigitsCNN at batch size 1: 3584 elements a step) and
    # reduces them in kernel calls under it.
    deferred = importlib.import_module("normdoctor.deferred")
    if _fused.kernel() is None:
        pytest.skip("numba not importable: nothing is held")
    flushes, calls = [], []
    original, compiled = deferred._reduce_held, _fused.kernel()

    def spy(held, *rest):
        flushes.append(sum(x.numel() for _rec, x, _v in held))
        return original(held, *rest)

    def kernel(jobs):
        calls.append(int((jobs[:, 2] * jobs[:, 3] * jobs[:, 4]).sum()))
        return compiled(jobs)

    monkeypatch.setattr(deferred, "_reduce_held", spy)
    monkeypatch.setattr(_fused, "_kernel", kernel)
    torch.manual_seed(0)
    model = DigitsCNN()
    with normdoctor.monitor(model, every=25, window=10**4, warn=False) as mon:
        _train(model, _batches(1, "shuffle", 200) + _batches(8, "shuffle", 60), 1e-3, mon)
    assert len(flushes) >= 2
    assert max(flushes) > 4 * _fused.PARALLEL_ABOVE  # many steps per flush
    assert sum(flushes) == sum(calls)  # every held element reduced once, in no call above it
    assert max(calls) <= _fused.PARALLEL_ABOVE


def test_a_layer_fed_part_of_a_larger_tensor_is_not_held():
    # Holding a view keeps its whole storage alive: the monitor holds up to 2^20 elements,
    # and a norm layer fed a slice of a wider activation would keep every step's full
    # activation.  Such a layer records at once; the others hold their inputs, each of which
    # owns its storage, and the figures are those of recording every call at once.
    if _fused.kernel() is None:
        pytest.skip("numba not importable: nothing is held")

    class Sliced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 32, 3, padding=1)
            self.part = nn.BatchNorm2d(16)  # the first half of conv's channels: a view
            self.whole = nn.BatchNorm2d(32)
            self.fc = nn.Linear(48, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            a = self.part(y[:, :16]).mean((2, 3))
            return self.fc(torch.cat([a, self.whole(y).mean((2, 3))], 1))

    figures = []
    for held in (True, False):
        torch.manual_seed(0)
        model = Sliced()
        with normdoctor.monitor(model, every=10, window=40, warn=False) as mon:
            mon._deferred.enabled = held
            _train(model, _batches(2, "shuffle", 80), 1e-3, mon)
            defer = {name: rec.defer for name, rec in mon._recorders.items()}
            owned = [
                x.untyped_storage().nbytes() == x.numel() * x.element_size()
                for _rec, x, _v in mon._deferred.calls
            ]
        if held:
            assert defer == {"part": False, "whole": True}
            assert owned and all(owned)
        figures.append([(r.drift, r.noise) for r in mon.report().layers])
    # "whole" agrees to 1e-12 (float64 sums in another order).  For "part", each window's first
    # call is held as a contiguous copy in one run (the kernel's shift: the first sample's
    # means in float64, rounded) and is a view in the other (torch's float32 mean): the shifts
    # differ in their last bits, so the float32 differences x - shift round differently (1e-7).
    (part_a, whole_a), (part_b, whole_b) = figures
    assert whole_a == pytest.approx(whole_b, rel=1e-12)
    assert part_a == pytest.approx(part_b, rel=1e-6)


def test_serial_kernel_calls_cover_every_job_once_with_the_same_bits(monkeypatch):
    # deferred._serially runs one kernel call's jobs in consecutive calls of at most 2^17
    # elements: the same jobs, in order, each once, so the outputs are those of one call.
    deferred = importlib.import_module("normdoctor.deferred")
    if _fused.kernel() is None:
        pytest.skip("numba not importable")
    gen = np.random.default_rng(3)
    xs = [gen.normal(2.0, 3.0, size=(1, c, l)).astype(np.float32)
          for c, l in gen.integers((1, 1), (48, 1400), size=(400, 2))]  # fmt: skip
    assert max(x.size for x in xs) <= 65536 < _fused.PARALLEL_ABOVE < sum(x.size for x in xs)
    outs, seen, compiled = {}, [], _fused.kernel()

    def spy(j):
        seen.append(j.copy())
        compiled(j)

    for how in ("once", "serially"):
        shifts = [np.zeros(x.shape[1], dtype=np.float32) for x in xs]
        out = [np.full((3, x.shape[1]), np.nan) for x in xs]
        jobs = np.array([_fused.job(x, s, o) for x, s, o in zip(xs, shifts, out, strict=True)])
        jobs[:, _fused.JOB.index("first")] = 1
        if how == "once":
            compiled(jobs)
        else:
            monkeypatch.setattr(_fused, "_kernel", spy)
            deferred._serially(jobs)
            monkeypatch.undo()
            assert len(seen) > 1 and np.array_equal(np.concatenate(seen), jobs)
            assert max(int((j[:, 2] * j[:, 3] * j[:, 4]).sum()) for j in seen) <= (
                _fused.PARALLEL_ABOVE
            )
        outs[how] = (shifts, out)
    for a, b in zip(outs["once"][1], outs["serially"][1], strict=True):
        assert np.array_equal(a, b) and not np.isnan(a).any()
    for a, b in zip(outs["once"][0], outs["serially"][0], strict=True):
        assert np.array_equal(a, b)


def test_a_loop_that_reuses_its_tensors_is_compared_as_it_ran():
    # The monitor compares checked steps 64 at a time, so it copies the loop's own output and
    # labels: a loop that writes each step's labels into one buffer, and changes its output
    # in place after handing it over, gets the figures of a loop that does neither.
    results = []
    for reuse in (False, True):
        torch.manual_seed(0)
        model = DigitsCNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        buffer = torch.empty(8, dtype=torch.long)
        with normdoctor.monitor(model, every=3, warn=False) as mon:
            for b in _batches(8, "shuffle", 60):
                out = model(X[b])
                labels = buffer.copy_(Y[b]) if reuse else Y[b]
                mon.observe(out, labels)
                loss = nn.functional.cross_entropy(out, labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if reuse:
                    with torch.no_grad():
                        out.zero_()
        e = mon.report().end_to_end
        assert e is not None and e.acc_train is not None
        results.append((e.agreement, e.rel_divergence, e.acc_train, e.acc_eval))
    assert results[0] == results[1]

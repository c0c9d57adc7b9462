"""Pooled statistics against float64 NumPy over the concatenated layer inputs."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

import normdoctor as nd
from normdoctor.stats import Moments, channel_moments

# A float32 model: on the torch path inputs are reduced in float32 per sample and accumulated in
# float64; cascade summation keeps the relative error near a few float32 ulps (6e-8), so 1e-6
# leaves an order of magnitude of room.  The fused kernel accumulates in float64 throughout and
# sits far below that; both paths must meet the same bound (the hot_path fixture runs each).  A float64 model must match to 1e-10: only the merge
# order differs from NumPy, so anything worse would mean the merge itself loses digits.
TOL = {torch.float32: 1e-6, torch.float64: 1e-10}


class Capture(nn.Module):
    """Identity that keeps what it sees: the reference inputs of the next layer."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[np.ndarray] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().double().numpy().copy())
        return x


def _reference(chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate(chunks, axis=0)
    axes = tuple(d for d in range(x.ndim) if d != 1)
    return x.mean(axis=axes), x.var(axis=axes)  # biased, as BatchNorm normalizes


def _rel_err(got: tuple, ref: np.ndarray, scale: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(got) - ref) / scale))


CASES = [
    pytest.param(nn.BatchNorm1d, (5,), id="bn1d-2d-input"),
    pytest.param(nn.BatchNorm1d, (5, 7), id="bn1d-3d-input"),
    pytest.param(nn.BatchNorm2d, (4, 6, 5), id="bn2d"),
    pytest.param(nn.BatchNorm3d, (3, 4, 3, 5), id="bn3d"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("bn_cls", "shape"), CASES)
def test_pooled_stats_match_numpy_with_uneven_last_batch(bn_cls, shape, dtype, hot_path):
    gen = torch.Generator().manual_seed(0)
    c = shape[0]
    capture = Capture()
    model = nn.Sequential(capture, bn_cls(c)).to(dtype)
    # channel means and scales far from 0/1 so that the shift matters
    x = torch.randn(103, *shape, generator=gen, dtype=dtype)
    scale = torch.linspace(0.1, 20, c, dtype=dtype).view(1, c, *[1] * (len(shape) - 1))
    offset = torch.linspace(-30, 50, c, dtype=dtype).view(1, c, *[1] * (len(shape) - 1))
    x = x * scale + offset
    report = nd.scan(model, x, batch_size=16, shuffle=False, paths=("train",))
    layer = report.layer("1")
    assert layer.batches == 7 and layer.train.samples == 103  # 6 x 16 + 7
    mean, var = _reference(capture.seen)
    std = np.sqrt(var)
    # mean error relative to the channel's spread (a mean near 0 has no relative scale)
    assert _rel_err(layer.pooled_mean, mean, np.maximum(np.abs(mean), std)) < TOL[dtype]
    assert _rel_err(layer.pooled_var, var, var) < TOL[dtype]


def test_ill_conditioned_channel_keeps_its_variance(hot_path):
    # mean = 10,000 x std: E[x^2] - E[x]^2 in float32 loses every digit here.
    gen = torch.Generator().manual_seed(1)
    capture = Capture()
    model = nn.Sequential(capture, nn.BatchNorm2d(2))
    x = torch.randn(96, 2, 5, 5, generator=gen)
    x[:, 0] = 1e4 + x[:, 0]  # std 1, mean 1e4
    x[:, 1] = 3e5 + 30 * x[:, 1]
    report = nd.scan(model, x, batch_size=10, shuffle=False, paths=("train",))
    mean, var = _reference(capture.seen)
    layer = report.layer("1")
    assert _rel_err(layer.pooled_var, var, var) < 1e-5
    assert _rel_err(layer.pooled_mean, mean, np.abs(mean)) < 1e-6


def test_rebatching_gives_the_same_statistics(hot_path):
    # fvcore's precise-BN test idea: the same data in other batch splits gives the same moments.
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).double()
    x = torch.randn(50, 3, 8, 8, generator=gen, dtype=torch.float64)
    ref = None
    for batch_size in (1, 7, 50):
        layer = nd.scan(model, x, batch_size=batch_size, shuffle=False, paths=("train",)).layer("1")
        got = np.array(layer.pooled_mean + layer.pooled_var)
        if ref is None:
            ref = got
        np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_chan_merge_is_exact():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, 4, generator=gen, dtype=torch.float64) * 5 + 100
    parts = [channel_moments(p) for p in x.split([1, 13, 26])]
    whole = channel_moments(x)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    at_once = Moments.merge_all(parts)
    for m in (merged, at_once):
        assert m.count == whole.count
        torch.testing.assert_close(m.mean, whole.mean, rtol=1e-14, atol=0)
        torch.testing.assert_close(m.m2, whole.m2, rtol=1e-12, atol=0)
    assert Moments.empty(3).merge(whole) is whole


@pytest.mark.parametrize(
    "shape", [(7, 3), (5, 4, 9), (6, 3, 5, 7), (4, 2, 3, 3, 3), (1, 5, 11, 11)], ids=str
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fused_kernel_writes_the_sums_the_torch_path_writes(shape, dtype):
    pytest.importorskip("numba")
    from normdoctor import _fused
    from normdoctor.layers import find_norm_layers
    from normdoctor.probe import Recorder

    gen = torch.Generator().manual_seed(3)
    c = shape[1]
    x = torch.randn(*shape, generator=gen, dtype=dtype) * 3 + 100
    bn = nn.BatchNorm1d(c) if len(shape) <= 3 else nn.BatchNorm2d(c)
    layer = find_norm_layers(nn.Sequential(bn))[0]
    rows, shifts = {}, {}
    for choice in ("numba", "torch"):
        _fused.use(choice)
        try:
            rec = Recorder.for_module(bn, layer)
            rec.observe(x)
            rec.observe(x.flip(0))
            rows[choice] = rec.rows().clone()
            shifts[choice] = rec.shift64
        finally:
            _fused.use()
    # Both shift by the first sample's channel means (the kernel sums them in float64, torch
    # in float32: they agree to float32 rounding).  Rows about the kernel's shift, converted
    # exactly to torch's (d = K_numba - K_torch; L elements per sample and channel, N samples):
    # sum (x - K') = s1 + N L d, sum (x - K')^2 = s2 + 2 d s1 + N L d^2, and the squared
    # per-sample sums, q + 2 L d s1 + N L^2 d^2.
    first = x[0].double().reshape(c, -1).mean(1)
    for k in shifts.values():
        assert torch.allclose(k, first, rtol=1e-6, atol=0)
    d = shifts["numba"] - shifts["torch"]
    n, length = shape[0], x[0, 0].numel()
    s1, s2, q = rows["numba"].unbind(1)
    rows["numba"] = torch.stack(
        [
            s1 + n * length * d,
            s2 + 2 * d * s1 + n * length * d**2,
            q + 2 * length * d * s1 + n * length**2 * d**2,
        ],
        1,
    )
    # float64 sums of the same shifted values: the torch path's float32 per-sample reduction
    # is the only difference (a few ulps of float32 on each per-sample sum).
    tol = 1e-5 if dtype is torch.float32 else 1e-12
    assert rows["numba"].shape == rows["torch"].shape == (2, 3, c)
    scale = rows["torch"].abs().amax(dim=0, keepdim=True).clamp_min(1e-12)
    assert float(((rows["numba"] - rows["torch"]).abs() / scale).max()) < tol


def test_staged_small_inputs_give_what_each_call_alone_gives():
    # Small inputs are copied into a stage and reduced a block at a time; calls of other
    # shapes in between, a full stage, a full buffer and finish() must leave the same rows in
    # the same order as the torch path, which reduces each call on its own.
    pytest.importorskip("numba")
    from normdoctor import _fused
    from normdoctor.layers import find_norm_layers
    from normdoctor.recording import Recorder

    gen = torch.Generator().manual_seed(7)
    bn = nn.BatchNorm2d(4).eval()
    layer = find_norm_layers(nn.Sequential(bn))[0]
    shapes = [(1, 4, 3, 3)] * 150 + [(2, 4, 3, 3)] * 3 + [(1, 4, 3, 3)] * 80 + [(1, 4, 70, 70)]
    shapes += [(1, 4, 3, 3)] * 700  # over the buffer's capacity: folds mid-stage
    shapes += [(1, 4, 3, 3), (2, 4, 3, 3)] * 5 + [(3, 4, 3, 3)]  # alternating; one call alone
    inputs = [torch.randn(*shape, generator=gen) * 2 + 5 for shape in shapes]
    got = {}
    for choice in ("numba", "torch"):
        _fused.use(choice)
        try:
            rec = Recorder.for_module(bn, layer)
            for x in inputs:
                rec.observe(x)
            mean, var, count = rec.last_batch_stats()  # the last call, staged or not
            got[choice] = (rec.finish(), mean, var, count)
        finally:
            _fused.use()
    (a, mean_a, var_a, n_a), (b, mean_b, var_b, n_b) = got["numba"], got["torch"]
    assert a.units == b.units == len(shapes) and a.samples == b.samples and n_a == n_b == 27
    torch.testing.assert_close(a.unit_scores, b.unit_scores, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.pooled.mean, b.pooled.mean, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a.pooled.m2, b.pooled.m2, rtol=1e-6, atol=0)
    torch.testing.assert_close(mean_a, mean_b, rtol=1e-6, atol=0)
    torch.testing.assert_close(var_a, var_b, rtol=1e-5, atol=0)
    ref = inputs[-1].double()
    torch.testing.assert_close(mean_a, ref.mean((0, 2, 3)), rtol=1e-12, atol=0)


def test_fused_kernel_propagates_nan_and_inf():
    pytest.importorskip("numba")
    from normdoctor import _fused

    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 3, 3] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    out = torch.zeros(3, 3, dtype=torch.float64)
    _fused.use("numba")
    try:
        arr, shift = x.view(4, 3, -1).numpy(), torch.zeros(3).numpy()
        _fused.kernel()(np.array([_fused.job(arr, shift, out.numpy())]))
    finally:
        _fused.use()
    assert torch.isinf(out[0, 0]) and torch.isnan(out[:, 2]).all()
    assert torch.isfinite(out[:, 1]).all()


def test_one_kernel_call_reduces_many_jobs_as_each_alone():
    # The kernel takes jobs (one layer input each, float32 or float64, any (N, C, L)) and runs
    # over every channel of every job, on the calling thread for small work and in parallel
    # above 2^17 elements: each output must be the float64 reference of its own input,
    # whatever the other jobs, to the rounding of float64 sums in another order (1e-12 of
    # their scale).
    pytest.importorskip("numba")
    from normdoctor import _fused

    _fused.use("numba")
    try:
        kernel = _fused.kernel()
        gen = torch.Generator().manual_seed(3)
        shapes = [(4, 3, 25), (1, 7, 1), (2, 130, 4), (3, 1, 9), (5, 2, 0), (4, 64, 600)]
        dtypes = [torch.float32, torch.float64, torch.float32, torch.float64, torch.float32]
        dtypes += [torch.float32]
        xs = [
            5 + torch.randn(s, generator=gen, dtype=d) for s, d in zip(shapes, dtypes, strict=True)
        ]
        shifts = [x[0].mean(-1) if x.numel() else torch.zeros(x.shape[1], dtype=x.dtype)
                  for x in xs]  # fmt: skip
        outs = [torch.full((3, x.shape[1]), math.nan, dtype=torch.float64) for x in xs]
        jobs = [
            _fused.job(x.numpy(), k.numpy(), o.numpy())
            for x, k, o in zip(xs, shifts, outs, strict=True)
        ]
        kernel(np.array(jobs[:5][::-1]))  # any order of jobs; small: on this thread
        kernel(np.array(jobs[4:]))  # 153600 elements: in parallel
    finally:
        _fused.use()
    for x, k, out in zip(xs, shifts, outs, strict=True):
        d = x.double() - k.double()[None, :, None]
        s1 = d.sum(-1)
        want = torch.stack([s1.sum(0), (d * d).sum((0, 2)), (s1 * s1).sum(0)])
        scale = want.abs().amax(1, keepdim=True).clamp_min(1.0)
        assert ((out - want).abs() <= 1e-12 * scale).all(), (x.shape, out, want)


def test_kernel_split_into_channel_blocks_changes_no_bit():
    # A large job runs in parallel in its `blocks` of channels (the threads); each channel's
    # sums are taken sample by sample in the same order whatever the split, so every split
    # gives the same bits, and every channel is written (the outputs start as NaN).
    pytest.importorskip("numba")
    from normdoctor import _fused

    _fused.use("numba")
    try:
        kernel = _fused.kernel()
        gen = torch.Generator().manual_seed(5)
        x = (3 + 2 * torch.randn(6, 13, 3000, generator=gen)).numpy()  # 234000 elements
        assert x.size > _fused.SPLIT_ABOVE and x.size > _fused.PARALLEL_ABOVE
        got = []
        for blocks in (1, 2, 5, 13, 40):
            shift, out = np.zeros(13, dtype=np.float32), np.full((3, 13), np.nan)
            job = np.array([_fused.job(x, shift, out)])
            job[0, _fused.JOB.index("first")] = 1
            job[0, _fused.JOB.index("blocks")] = blocks
            kernel(job)
            got.append((shift, out))
    finally:
        _fused.use()
    for shift, out in got[1:]:
        assert np.array_equal(shift, got[0][0]) and np.array_equal(out, got[0][1])
    shift, out = got[0]
    assert np.array_equal(shift, x[0].astype(np.float64).mean(-1).astype(np.float32))
    d = x.astype(np.float64) - shift.astype(np.float64)[None, :, None]
    s1 = d.sum(-1)
    want = np.stack([s1.sum(0), (d * d).sum((0, 2)), (s1 * s1).sum(0)])
    assert (np.abs(out - want) <= 1e-12 * np.abs(want).max(1, keepdims=True)).all()


@pytest.mark.parametrize("eps", [1e-5, 0.0])
def test_fused_fold_equals_the_array_fold(monkeypatch, eps):
    # Recorder.flush folds buffered rows with a compiled loop on CPU and with array code
    # elsewhere: the same arithmetic, so the accumulators agree to float64 rounding of sums
    # taken in another order (1e-12 of their scale), NaN rows and zero weights included.
    pytest.importorskip("numba")
    from normdoctor import _fused
    from normdoctor.layers import find_norm_layers
    from normdoctor.recording import Recorder

    if _fused.fold() is None:
        pytest.skip("the fused kernel is switched off")
    gen = torch.Generator().manual_seed(11)
    c, rows = 7, 50
    bn = nn.BatchNorm2d(c, eps=eps).eval()
    with torch.no_grad():
        bn.running_mean.normal_(generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
        bn.weight.normal_(generator=gen)
        bn.weight[3] = 0.0  # a channel without weight
    layer = find_norm_layers(nn.Sequential(bn))[0]
    first = torch.randn(3, c, 4, 4, generator=gen)
    got = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(_fused, "fold", lambda: None)
        rec = Recorder.for_module(bn, layer)
        rec.observe(first)  # sets the shift, one row
        rec.flush()
        g = torch.Generator().manual_seed(5)  # the same rows for both folds
        n_per = torch.randint(2, 40, (rows,), generator=g).double()
        samples = torch.randint(1, 4, (rows,), generator=g).double()
        x = torch.randn(rows, c, generator=g, dtype=torch.float64)
        t1 = x * n_per[:, None]
        t2 = (x.square() + torch.rand(rows, c, generator=g)) * n_per[:, None]
        t2[7, 2] = t1[7, 2] ** 2 / n_per[7]  # a zero batch variance
        q = t1.square() / samples[:, None]
        buf = torch.stack((t1, t2, q), 1)
        buf[13, 1, 4] = float("nan")  # a non-finite row is skipped
        buf[21, 0, 0] = float("inf")
        assert rows <= rec.capacity
        rec._buffer()[:rows].copy_(buf)
        rec.elems[:rows] = n_per.numpy()
        rec.samples[:rows] = samples.numpy()
        rec.nrows = rows
        rec.flush()
        got[fused] = (rec.totals.clone(), rec.sums.clone(), torch.cat(rec.unit_scores))
    (ta, sa, ua), (tb, sb, ub) = got[True], got[False]
    assert torch.equal(ta, tb) and ta[3] == 2  # counts are exact; two rows skipped
    finite = torch.isfinite(sb)
    assert torch.equal(torch.isfinite(sa), finite)
    scale = torch.where(finite, sb.abs(), 0.0).amax(dim=1, keepdim=True).clamp_min(1e-300)
    assert float(((sa - sb).abs() / scale)[finite].max()) < 1e-12
    # eps = 0 with a zero batch variance: 0 * inf is NaN in both, as it always was
    assert torch.equal(torch.isnan(ua), torch.isnan(ub))
    assert int(torch.isnan(ua).sum()) == 2 + (eps == 0)
    ok = ~torch.isnan(ub)
    torch.testing.assert_close(ua[ok], ub[ok], rtol=1e-12, atol=0)


def test_one_fold_call_over_many_recorders_equals_each_alone():
    # Recorders fold their rows in one call of the compiled fold (one job each) at the end of a
    # scan, and alone when a buffer fills: the same arithmetic per job, so the accumulators and
    # scores are bit-identical, and equal the array fold to float64 rounding (1e-12).
    pytest.importorskip("numba")
    from normdoctor import _fused
    from normdoctor.layers import find_norm_layers
    from normdoctor.recording import Recorder, fold_all

    if _fused.fold() is None:
        pytest.skip("the fused kernel is switched off")
    gen = torch.Generator().manual_seed(2)
    bns = [
        nn.BatchNorm2d(c, eps=e).eval() for c, e in ((3, 1e-5), (16, 1e-3), (1, 0.1), (70, 1e-5))
    ]
    for bn in bns:
        with torch.no_grad():
            bn.running_mean.normal_(generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
    layers = find_norm_layers(nn.Sequential(*bns))
    batches = [[torch.randn(n, bn.num_features, 3, 3, generator=gen) * 2 + 1 for n in (4, 2, 7)]
               for bn in bns]  # fmt: skip
    got = {}
    for how in ("together", "alone", "arrays"):
        recs = [Recorder.for_module(bn, layer) for bn, layer in zip(bns, layers, strict=True)]
        for rec, xs in zip(recs, batches, strict=True):
            for x in xs:
                rec.observe(x)
        if how == "arrays":
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(_fused, "fold", lambda: None)
                for rec in recs:
                    rec.flush()
        elif how == "together":
            fold_all(recs)
        else:
            for rec in recs:
                rec.flush()
        assert all(rec.nrows == 0 for rec in recs)
        got[how] = [(r.totals.clone(), r.sums.clone(), torch.cat(r.unit_scores)) for r in recs]
    for a, b, c in zip(got["together"], got["alone"], got["arrays"], strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            assert torch.equal(x, y)
            torch.testing.assert_close(x, z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_kernel_shifts_by_the_first_samples_channel_means(dtype):
    # The kernel works out the shift in its pass over a layer's first input: per channel the
    # mean of the first sample, rounded to the input's dtype, 0 where it is not finite (as
    # torch.nan_to_num made it before).  Later calls keep it.
    pytest.importorskip("numba")
    from normdoctor import _fused
    from normdoctor.layers import find_norm_layers
    from normdoctor.recording import Recorder

    bn = nn.BatchNorm2d(3).eval()
    layer = find_norm_layers(nn.Sequential(bn))[0]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 4, 4, generator=gen, dtype=dtype) * 3 + 1000
    x[0, 1, 2, 2] = float("inf")
    _fused.use("numba")
    try:
        rec = Recorder.for_module(bn, layer)
        rec.observe(x)
        shift = rec.shift.clone()
        rec.observe(x.flip(0))
    finally:
        _fused.use()
    want = x[0].double().reshape(3, -1).mean(1).to(dtype)
    assert shift.dtype is dtype and rec.shift.dtype is dtype
    assert torch.equal(rec.shift, shift)  # kept
    assert shift[1] == 0 and torch.equal(shift[[0, 2]], want[[0, 2]])
    assert torch.equal(rec.shift64, shift.double())
    rows = rec.rows()
    assert torch.isfinite(rows[:, :, [0, 2]]).all() and torch.isinf(rows[:, 1, 1]).all()


def test_kernel_choice_is_checked():
    from normdoctor import _fused
    from normdoctor.errors import NormDoctorError

    with pytest.raises(NormDoctorError, match="expected one of"):
        _fused.use("cuda-graphs")
    assert _fused.use("torch") is False and _fused.kernel() is None
    _fused.use()


def test_channels_last_inputs_give_the_same_statistics(hot_path):
    # channels_last activations are not contiguous in NCHW order: the fused kernel steps aside
    # and the torch path measures them; either way the statistics must not depend on layout.
    gen = torch.Generator().manual_seed(5)
    capture = Capture()
    model = nn.Sequential(nn.Conv2d(3, 6, 3), capture, nn.BatchNorm2d(6))
    x = torch.randn(40, 3, 9, 9, generator=gen) * 2 + 1
    plain = nd.scan(model, x, batch_size=8, shuffle=False, paths=("train",)).layer("2")
    model_cl = model.to(memory_format=torch.channels_last)
    capture.seen.clear()
    cl = nd.scan(
        model_cl,
        x.to(memory_format=torch.channels_last),
        batch_size=8,
        shuffle=False,
        paths=("train",),
    ).layer("2")
    mean, var = _reference(capture.seen)
    for layer in (plain, cl):
        assert _rel_err(layer.pooled_var, var, var) < TOL[torch.float32]
        assert _rel_err(layer.pooled_mean, mean, np.sqrt(var)) < TOL[torch.float32]


def test_a_failing_kernel_build_falls_back_to_torch_ops(monkeypatch):
    pytest.importorskip("numba")
    from normdoctor import _fused
    from normdoctor.errors import NormDoctorError

    def broken() -> None:
        raise RuntimeError("LLVM said no")

    monkeypatch.setattr(_fused, "_built", None)
    monkeypatch.setattr(_fused, "_compile", broken)
    try:
        with pytest.warns(RuntimeWarning, match="LLVM said no"):
            assert _fused.use("auto") is False
        gen = torch.Generator().manual_seed(6)
        x = torch.randn(30, 3, 4, 4, generator=gen) + 5
        layer = nd.scan(nn.Sequential(nn.BatchNorm2d(3)), x, paths=("train",)).layer("0")
        ref = x.double().var(dim=(0, 2, 3), unbiased=False).numpy()
        np.testing.assert_allclose(layer.pooled_var, ref, rtol=1e-6)
        with pytest.raises(NormDoctorError, match="failed to compile"):
            _fused.use("numba")
    finally:
        monkeypatch.undo()
        _fused.use()


def test_recorders_made_together_equal_recorders_made_alone():
    # Recorder.many sets up every layer of a probe in one NumPy pass: it must give each layer
    # exactly what Recorder(...) gives it alone, including the corner cases of the weights
    # (no affine, every gamma 0, a non-finite gamma) and of degenerate running statistics.
    from normdoctor.layers import find_norm_layers, module_state
    from normdoctor.recording import Recorder

    torch.manual_seed(3)
    model = nn.Sequential(
        nn.BatchNorm2d(5),
        nn.BatchNorm2d(3, affine=False),
        nn.BatchNorm1d(4),
        nn.BatchNorm2d(6),
        nn.InstanceNorm2d(2, track_running_stats=True, affine=True),
        nn.BatchNorm2d(1, eps=0.0),
    )
    with torch.no_grad():
        for m in model:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                m.weight.normal_()
        model[2].weight.zero_()  # every gamma 0: channels weigh alike
        model[3].weight[1] = float("inf")
        model[3].running_var[2] = float("nan")
        model[3].running_mean[4] = float("inf")
        model[0].running_var[0] = -1e-5  # var + eps = 0: not a valid channel
        model[5].running_var[0] = 0.0
    layers = find_norm_layers(model)
    specs = []
    for layer in layers:
        state = module_state(dict(model.named_modules())[layer.name])
        specs.append((layer, state.running_mean, state.running_var, state.weight))
    together = Recorder.many(specs)
    alone = [Recorder(*spec) for spec in specs]
    assert len(together) == len(alone) == 6
    for a, b in zip(together, alone, strict=True):
        assert a.layer is b.layer and a.eps == b.eps and a.capacity == b.capacity
        assert a.per_unit_sample == b.per_unit_sample
        for name in ("running_mean", "running_var", "weights", "safe_mean", "safe_var"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype == torch.float64
            assert torch.equal(x.isnan(), y.isnan()), name
            assert torch.equal(x.nan_to_num(), y.nan_to_num()), name
    assert float(together[2].weights.sum()) == pytest.approx(1.0)  # the zero-gamma layer
    assert float(together[3].weights[1]) == 0.0  # the infinite gamma weighs nothing


def _assert_same_sums(a, b) -> None:
    """Two measurements of the same calls: equal up to float64 sums in another order (1e-12)."""
    torch.testing.assert_close(a.unit_scores, b.unit_scores, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.pooled.mean, b.pooled.mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(a.pooled.m2, b.pooled.m2, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.noise_m2, b.noise_m2, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("full", [False, True])
def test_preallocated_row_buffers_record_what_lazy_ones_do(full):
    # Recorder.preallocate carves every recorder's rows from one block (64 rows each, or with
    # `full` as many as a lazy buffer: the monitor's): over several folds and layers of
    # different widths, the measurements equal those of recorders that allocate their own
    # buffers on first use (whose narrow layers hold up to 512 rows).
    pytest.importorskip("numba")
    from normdoctor import _fused
    from normdoctor.layers import find_norm_layers
    from normdoctor.recording import Recorder, finish_all

    if _fused.fold() is None:
        pytest.skip("the fused kernel is switched off")
    model = nn.Sequential(
        nn.BatchNorm2d(3), nn.BatchNorm1d(7), nn.BatchNorm2d(130), nn.BatchNorm2d(2)
    ).eval()
    layers = find_norm_layers(model)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(9)
    shapes = [(2, 3, 5, 5), (4, 7), (3, 130, 2, 2), (2, 2, 40, 40)]  # staged, and not
    calls = [[torch.randn(*s, generator=gen) * 3 + 1 for _ in range(600)] for s in shapes]
    got = []
    for pre in (True, False):
        recs = Recorder.for_layers(layers, modules)
        if pre:
            Recorder.preallocate(recs, full=full)
            rows = [512, 512, 64, 512] if full else [64] * 4
            assert [r.capacity for r in recs] == rows and all(r.buf is not None for r in recs)
            assert all(r.elems.base is not None and r.samples.base is r.elems.base for r in recs)
        for rec, xs in zip(recs, calls, strict=True):
            for x in xs:
                rec.observe(x)
        got.append(finish_all(recs))
    for a, b in zip(*got, strict=True):
        assert a.units == b.units == 600  # more than 512 rows: folds
        _assert_same_sums(a, b)
        torch.testing.assert_close(a.channel_m2, b.channel_m2, rtol=1e-12, atol=0)


def test_held_calls_record_what_recording_each_call_at_once_does():
    # Deferred holds small inputs until the forward returns and reduces them in one kernel
    # call: over forwards with a layer called twice, a shape change, a float64 layer, an input
    # too large to hold, inference tensors and full buffers (150 calls), every measurement
    # equals that of the same calls recorded one by one (1e-12: float64 sums in another
    # order), and every layer defers from its second forward on.
    pytest.importorskip("numba")
    from normdoctor import _fused
    from normdoctor.deferred import Deferred
    from normdoctor.layers import find_norm_layers
    from normdoctor.recording import Recorder, finish_all

    if _fused.kernel() is None:
        pytest.skip("the fused kernel is switched off")
    model = nn.Sequential(
        nn.BatchNorm2d(3), nn.BatchNorm1d(7), nn.BatchNorm2d(130), nn.BatchNorm2d(2),
        nn.BatchNorm2d(4),
    ).eval()  # fmt: skip
    layers = find_norm_layers(model)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(11)

    def forward_inputs(step: int) -> list[tuple[int, torch.Tensor]]:
        big = (2, 2, 200, 200) if step % 3 else (2, 2, 10, 10)  # held, or too large to hold
        calls = [
            (0, torch.randn(2, 3, 5, 5, generator=gen) * 3 + 1),
            (1, torch.randn(4, 7, generator=gen, dtype=torch.float64) - 2),
            (2, torch.randn(3, 130, 2, 2, generator=gen) * 0.1),
            (0, torch.randn(1, 3, 5, 5, generator=gen) + 4),  # the same layer again
            (3, torch.randn(*big, generator=gen)),
        ]
        if step % 4 == 1:
            with torch.inference_mode():
                calls.append((4, torch.randn(3, 4, 3, 3, generator=gen)))
        else:
            calls.append((4, torch.randn(3, 4, 3, 3, generator=gen)))
        if step > 90:
            calls[2] = (2, torch.randn(2, 130, 3, 1, generator=gen))  # another shape
        return calls

    forwards = [forward_inputs(step) for step in range(150)]
    got = []
    for held in (True, False):
        recs = Recorder.for_layers(layers, modules)
        Recorder.preallocate(recs)
        deferred = Deferred()
        for calls in forwards:
            for i, x in calls:
                if held:
                    deferred.observe(recs[i], x)
                else:
                    recs[i].observe(x)
            deferred.flush()
        if held:
            assert [r.defer for r in recs] == [True] * 5
            assert not deferred.lost
        got.append(finish_all(recs))
    for a, b in zip(*got, strict=True):
        assert a.units == b.units and a.units in (150, 300)
        _assert_same_sums(a, b)
        torch.testing.assert_close(a.fit_m2, b.fit_m2, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("stage", [False, True], ids=["monitor", "staged"])
def test_calls_held_over_many_forwards_are_booked_in_call_order(stage):
    # The monitor holds steps, detached, until 2^20 elements are held: a layer's run of calls
    # of one shape is then booked in one go (Recorder.book_calls), across full buffers (64
    # rows), a shape change and back, and a non-contiguous input.  Every measurement equals that of the same
    # calls recorded one by one (1e-12: float64 sums in another order), scores in call order.
    pytest.importorskip("numba")
    from normdoctor import _fused, recording
    from normdoctor.deferred import Deferred
    from normdoctor.layers import find_norm_layers
    from normdoctor.recording import Recorder, finish_all

    if _fused.kernel() is None:
        pytest.skip("the fused kernel is switched off")
    model = nn.Sequential(nn.BatchNorm2d(5), nn.BatchNorm2d(3)).eval()
    layers = find_norm_layers(model)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(12)
    forwards = []
    for step in range(200):
        shape = (1, 5, 4, 4) if step < 90 or step >= 120 else (2, 5, 3, 3)
        a = torch.randn(*shape, generator=gen) * (1 + step % 5) + step % 3
        b = torch.randn(1, 3, 6, 2, generator=gen) - 1
        forwards.append([(0, a), (1, b.transpose(2, 3) if step == 150 else b)])
    booked = []
    book_calls = Recorder.book_calls

    def counted(self, xs, start):
        jobs = book_calls(self, xs, start)
        booked.append(0 if jobs is None else len(jobs))
        return jobs

    got = []
    for held in (True, False):
        recs = Recorder.for_layers(layers, modules)
        Recorder.preallocate(recs)
        deferred = Deferred(stage=stage, detach=True)  # held past forwards, as the monitor
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(recording.Recorder, "book_calls", counted)
            for step, calls in enumerate(forwards):
                for i, x in calls:
                    if held:
                        deferred.observe(recs[i], x)
                    else:
                        recs[i].observe(x)
                if step in (0, 199) or step % 37 == 36:
                    deferred.flush()
        got.append(finish_all(recs))
    assert max(booked) >= 30  # the path under test ran, in runs of many calls
    for a, b in zip(*got, strict=True):
        assert a.units == b.units == 200
        _assert_same_sums(a, b)


def test_an_input_written_after_its_layer_read_it_is_never_mistaken():
    # Holding an input is only right while nothing writes to it.  A model that adds into a
    # norm layer's input in place after the layer ran (on every call) is recorded as it runs,
    # and matches the statistics of what the layer saw; one that does so only from its third
    # forward on loses that forward's call (held by then), says so, records every later call
    # as it runs, and every other call correctly.
    from normdoctor.batching import Batch
    from normdoctor.layers import find_norm_layers
    from normdoctor.sources.torch import Probe, TorchSource

    class Writes(nn.Module):
        def __init__(self, after: int) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3).eval()
            self.after, self.calls = after, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x * 2  # the layer's input, a fresh tensor
            y = self.bn(h)
            self.calls += 1
            if self.calls > self.after:
                h.add_(100.0)  # written after the layer read it
            return y + h

    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 3, 6, 6, generator=gen) for _ in range(6)]
    want = torch.cat([x * 2 for x in xs]).double()
    for after, lost in ((0, 0), (2, 1)):
        model = Writes(after)
        layers = find_norm_layers(model)
        with torch.no_grad(), Probe(model, layers, ("eval",)) as probe:
            for x in xs:
                with probe.path("eval"):
                    model(x)
            m = probe.results("eval")["bn"]
            assert probe.lost == ({"bn": lost} if lost else {})
        session = TorchSource(Writes(after)).session(("eval",))
        with session:
            for i, x in enumerate(xs):
                session.run("eval", Batch(x, None, 4, None), i)
        assert any("bn (1)" in note for note in session.notes) == bool(lost)
        seen = want if not lost else torch.cat([want[:8], want[12:]])  # not the third
        assert m is not None and m.units == len(xs) - lost
        mean = seen.mean((0, 2, 3))
        torch.testing.assert_close(m.pooled.mean, mean, rtol=1e-10, atol=1e-12)


def test_compiled_close_gives_the_bits_of_the_numpy_one():
    # finish_all's closing arithmetic runs compiled where numba is on and in NumPy where it is
    # off: the same expressions in the same order, so the same bits, on ordinary sums and on
    # the edge cases (a layer that saw nothing, one unit, rounding that drives m2 below 0,
    # NaN and Inf sums, zero variance).
    pytest.importorskip("numba")
    from normdoctor import _fused
    from normdoctor.metrics import close_rows

    _fused.use("numba")
    close = _fused.close()
    assert close is not None
    rng = np.random.default_rng(0)
    sizes = [5, 1, 7, 3, 4, 2]
    c = sum(sizes)
    totals = np.array([
        [640.0, 10.0, 10.0, 0.0],  # ordinary
        [0.0, 0.0, 0.0, 0.0],  # saw nothing
        [64.0, 1.0, 1.0, 0.0],  # one unit
        [20.0, 20.0, 20.0, 1.0],  # one sample per unit
        [1e6, 100.0, 50.0, 0.0],
        [9.0, 3.0, 3.0, 0.0],
    ])  # fmt: skip
    sums = rng.normal(size=(11, c)) * rng.choice([1e-3, 1.0, 1e3], size=(11, c))
    sums[1] = np.abs(sums[1]) + sums[0] ** 2 / 640.0 * 0.999999  # m2 about 0, either sign
    sums[1, c - 1] = math.nan
    sums[5, c - 2] = math.inf
    vectors = rng.normal(size=(6, c))
    vectors[2] = np.abs(vectors[2])
    vectors[2, 0] = 0.0
    eps = np.array([1e-5, 1e-3, 0.0, 1e-5, 1e-1, 1e-5])
    want = close_rows(totals, sums, tuple(vectors), eps, sizes)
    got = np.empty((10, c))
    close(totals, sums, vectors, eps, np.array(sizes, dtype=np.int64), got)
    np.testing.assert_array_equal(got.view(np.int64), want.view(np.int64))
    assert np.isnan(want).any() and np.isfinite(want).any()


def _per_forward(monkeypatch):
    """Reduce held calls when each forward returns, as before calls were held across them."""
    from normdoctor.deferred import Deferred

    monkeypatch.setattr(Deferred, "end_forward", Deferred.flush)


def test_chunks_and_calls_held_across_forwards_give_the_same_report(monkeypatch):
    # At batch size 1 a scan runs chunks of batches path after path (scan._chunk_batches) and
    # holds small calls past their forward (Deferred.end_forward): the same rows in the same
    # order per layer and path, folded in other groups of rows (a float64 merge of moments),
    # so the report of batch-by-batch scanning with a flush per forward, to rounding (1e-15
    # relative measured, 1e-12 here); the outputs, and so the end-to-end figures, are the same.
    from pathlib import Path

    from normdoctor.deferred import Deferred
    from normdoctor.io import load_model
    from normdoctor.sources.torch import Probe

    root = Path(__file__).resolve().parents[1] / "sample_models"
    model = load_model(root / "tiny-batch.pt", arch="sample_models.archs:DigitsCNN")
    data = np.load(root / "data" / "test.npz")
    x = torch.from_numpy(data["inputs"]).float()[:200]
    y = torch.from_numpy(data["labels"]).long()[:200]
    flushes, paths = [], []
    flush, enter = Deferred.flush, Probe.enter_path
    with monkeypatch.context() as m:
        m.setattr(Deferred, "flush", lambda self: (flushes.append(len(self.calls)), flush(self)))
        m.setattr(Probe, "enter_path", lambda self, p: (paths.append(p), enter(self, p)))
        held = nd.scan(model, (x, y), batch_size=1, shuffle=False, search=False)
    assert 0 < len([n for n in flushes if n]) < 400 / 10  # 400 forwards: held across them
    switches = sum(a != b for a, b in itertools.pairwise(paths))
    assert len(paths) == 400 and switches < 400 / 10  # path after path, a chunk at a time
    with monkeypatch.context() as m:
        _per_forward(m)
        m.setattr(sys.modules["normdoctor.scan"], "_chunk_batches", lambda *a: 1)
        flushed = nd.scan(model, (x, y), batch_size=1, shuffle=False, search=False)
    assert held.end_to_end == flushed.end_to_end and held.notes == flushed.notes
    for a, b in zip(held.layers, flushed.layers, strict=True):
        assert (a.status, a.recommendation, a.reason.split(":")[0]) == (
            b.status,
            b.recommendation,
            b.reason.split(":")[0],
        )
        for pa, pb in ((a.train, b.train), (a.eval, b.eval)):
            assert pa is not None and pb is not None and pa.batches == pb.batches == 200
            for field in ("drift", "shift", "noise", "fit", "drift_worst"):
                assert getattr(pa, field) == pytest.approx(getattr(pb, field), rel=1e-12)
            for field in ("pooled_mean", "pooled_var", "channel_drift", "batch_drift"):
                assert list(getattr(pa, field)) == pytest.approx(
                    list(getattr(pb, field)), rel=1e-12
                )
            assert pa.worst_batch == pb.worst_batch


def test_a_tensor_written_by_every_forward_is_not_held_across_them():
    # A model that copies each input into a persistent buffer and normalizes that, and a data
    # source that fills one tensor in place for every batch: a later forward writes the
    # tensor a held call would read, so their calls are reduced forward by forward.  Nothing
    # is lost and the statistics are those of every batch (float64 reference over all of
    # them; float32 inputs: 1e-6).
    class Buffered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("state", torch.zeros(1, 3, 4, 4))
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.state.copy_(x * 2)
            return self.bn(self.state)

    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(1, 3, 4, 4, generator=gen) for _ in range(40)]

    def refilled():
        one = torch.empty(1, 3, 4, 4)
        for x in xs:
            one.copy_(x)  # the same tensor, written before every batch
            yield one

    want = torch.cat(xs).double()
    for model, data, scale in ((Buffered().eval(), xs, 2.0), (nn.BatchNorm2d(3).eval(), None, 1.0)):
        report = nd.scan(model, data if data is not None else refilled(), search=False)
        layer = report.layers[0]
        assert not any("not recorded" in n for n in report.notes), report.notes
        for path in (layer.train, layer.eval):
            assert path is not None and path.batches == 40
            ref = (scale * want).mean((0, 2, 3)).tolist()
            assert path.pooled_mean == pytest.approx(ref, rel=1e-6, abs=1e-6)

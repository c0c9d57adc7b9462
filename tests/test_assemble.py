"""The end-to-end meter and the path reports against plain per-batch and per-layer references."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from normdoctor.assemble import EndToEndMeter, assemble_report
from normdoctor.metrics import layer_score, mismatch_sq
from normdoctor.recording import LayerMeasurement
from normdoctor.report import Composition
from normdoctor.stats import Moments


def _batches(kind: str, n: int = 150) -> list[tuple[torch.Tensor, torch.Tensor, object, int]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        size = 1 if i % 7 else 3
        t = torch.randn(size, 5, generator=gen)
        e = t + 0.5 * torch.randn(size, 5, generator=gen)
        if kind == "labels":
            labels = torch.randint(0, 5, (size,), generator=gen)
        elif kind == "targets":
            labels = torch.randn(size, 5, generator=gen)
        else:
            labels = None
        if i == 40:
            e[0, 1] = math.nan  # a non-finite output is left out of the comparison
        if i == 90 and labels is not None:
            labels = None  # a batch without labels: the comparison keeps what every batch gave
        out.append((t, e, labels, size))
    return out


@pytest.mark.parametrize("kind", ["labels", "targets", "none"])
def test_a_deferred_comparison_equals_the_batch_by_batch_one(kind):
    batches = _batches(kind)
    results = []
    for defer in (False, True):
        meter = EndToEndMeter(defer=defer)
        for t, e, labels, size in batches:
            meter.update(t, e, labels, size)
        results.append((meter.result(), {k: float(v) for k, v in meter.sums.items()}))
    (a, sa), (b, sb) = results
    assert sa.keys() == sb.keys()
    for k in sa:  # sums over samples: the same up to float64 rounding of the order
        assert sa[k] == pytest.approx(sb[k], rel=1e-12, abs=1e-12), k
    assert a is not None and b is not None
    assert (a.batches, a.samples, a.nonfinite_outputs) == (b.batches, b.samples, 1)
    assert a.agreement == b.agreement and a.acc_train == b.acc_train
    if kind == "none":
        assert "agree" in sa and "correct_t" not in sa
    # the batch without labels dropped the label keys in both
    assert "correct_t" not in sa and "loss_t" not in sa


def _kept(batch_size: int, batches: int) -> Composition:
    """A tensor's samples in order, in equal batches."""
    return Composition(
        source="tensor",
        batch_size=batch_size,
        order="keep",
        seed=None,
        group_by=None,
        num_batches=batches,
        num_samples=batch_size * batches,
        min_batch=batch_size,
        max_batch=batch_size,
    )


def _measurement(gen: torch.Generator, c: int, units: int) -> LayerMeasurement:
    def vec(lo: float = 0.1) -> torch.Tensor:
        return torch.rand(c, generator=gen, dtype=torch.float64) + lo

    w = vec()
    return LayerMeasurement(
        units=units,
        samples=units * 4,
        pooled=Moments(400.0, torch.randn(c, generator=gen, dtype=torch.float64), vec() * 400),
        running_mean=torch.randn(c, generator=gen, dtype=torch.float64),
        running_var=vec(0.5),
        weights=w / w.sum(),
        channel_m2=vec(0.0),
        unit_scores=torch.rand(units, generator=gen, dtype=torch.float64),
        noise_m2=vec(0.0),
        fit_m2=vec(0.0),
        noniid=vec(),
        nonfinite_units=0,
        per_sample=False,
        spatial=True,
    )


def test_path_reports_equal_the_per_layer_formulas():
    # assemble_report scores every layer in one pass over the concatenated channels; each
    # layer's figures must be what metrics.layer_score gives on that layer alone.
    from normdoctor.layers import find_norm_layers, module_state

    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.BatchNorm2d(c) for c in (3, 8, 1, 5)))
    layers = find_norm_layers(model)
    ms = {
        layer.name: _measurement(gen, layer.num_features, 10 + i) for i, layer in enumerate(layers)
    }
    ms["2"] = dataclasses.replace(ms["2"], weights=torch.zeros(1, dtype=torch.float64))
    report = assemble_report(
        model_name="m",
        layers=layers,
        states={layer.name: module_state(model[int(layer.name)]) for layer in layers},
        results={"train": ms},
        order=[layer.name for layer in layers],
        end_to_end=None,
        composition=_kept(batch_size=4, batches=10),
        paths=("train",),
    )
    for layer in layers:
        m, eps = ms[layer.name], layer.eps
        got = report.layer(layer.name).train
        assert got is not None
        w = m.weights.numpy()

        def score(m2: np.ndarray, w: np.ndarray = w) -> float | None:
            v = float(layer_score(m2, w))
            return v if math.isfinite(v) else None

        pm, pv = m.pooled.mean.numpy(), m.pooled.var.numpy()
        rm, rv = m.running_mean.numpy(), m.running_var.numpy()
        for name, want in (
            ("drift", score(m.channel_m2.numpy())),
            ("shift", score(mismatch_sq(pm, pv, rm, rv, eps))),
            ("noise", score(m.noise_m2.numpy())),
            ("fit", score(m.fit_m2.numpy())),
        ):
            value = getattr(got, name)
            if want is None:
                assert value is None, (layer.name, name)  # no channel has weight
            else:
                assert value == pytest.approx(want, rel=1e-13), (layer.name, name)
        np.testing.assert_allclose(got.mean_shift, (pm - rm) / np.sqrt(rv + eps), rtol=1e-14)
        np.testing.assert_allclose(got.channel_drift, np.sqrt(m.channel_m2.numpy()), rtol=1e-14)
        assert got.worst_batch == int(m.unit_scores.argmax())


def _statics_reference(state):
    """One layer at a time, in plain Python: what a report says of its stored tensors."""
    from normdoctor.checks import DEAD_GAMMA_RTOL

    def listed(t):
        return [float(v) for v in t.detach().double().reshape(-1).tolist()]

    dead: tuple[int, ...] = ()
    if isinstance(state.weight, torch.Tensor) and state.weight.numel():
        g = [abs(v) for v in listed(state.weight)]
        top = max([v for v in g if not math.isnan(v)], default=0.0)
        dead = tuple(
            i for i, v in enumerate(g) if (v <= DEAD_GAMMA_RTOL * top if top > 0 else v >= 0)
        )
    mean = var = None
    degenerate: tuple[int, ...] = ()
    if isinstance(state.running_mean, torch.Tensor) and isinstance(state.running_var, torch.Tensor):
        m, v = listed(state.running_mean), listed(state.running_var)
        mean = tuple(x if math.isfinite(x) else None for x in m)
        var = tuple(x if math.isfinite(x) else None for x in v)
        degenerate = tuple(
            i
            for i, (a, b) in enumerate(zip(m, v, strict=True))
            if not (math.isfinite(a) and math.isfinite(b)) or b <= 0
        )
    return mean, var, dead, degenerate


def test_statics_of_every_layer_at_once_equal_one_layer_at_a_time():
    # _statics reads running statistics, dead and degenerate channels of all layers in one
    # NumPy pass; the reference reads one layer at a time in plain Python.
    from normdoctor.assemble import _statics
    from normdoctor.layers import NormState

    gen = torch.Generator().manual_seed(4)

    def t(*values):
        return torch.tensor(values, dtype=torch.float32)

    states = [
        NormState(
            torch.randn(6, generator=gen),
            torch.rand(6, generator=gen) + 0.1,
            torch.randn(6, generator=gen),
        ),
        NormState(t(0.0, math.nan, 1.0), t(1.0, 1.0, -2.0), t(1.0, 1e-9, 0.0)),  # dead, degenerate
        NormState(None, None, t(math.nan, 2.0, 0.0)),  # no running stats; a NaN gamma
        NormState(t(1.0, 2.0), t(0.0, math.inf), None),  # no gamma
        NormState(t(3.0), t(1.0), t(0.0)),  # every gamma 0: every channel dead
        NormState(t(1.0, 1.0), t(1.0, 1.0), t(math.inf, 1.0)),  # an infinite gamma
        NormState(torch.empty(0), torch.empty(0), torch.empty(0)),  # no channels
        NormState(
            torch.randn(4, generator=gen).double(),
            torch.rand(4, generator=gen).double(),
            t(1, 1, 1, 1),
        ),
    ]
    got = _statics(states)
    assert got == [_statics_reference(s) for s in states]
    assert got[1][2:] == ((1, 2), (1, 2)) and got[4][2] == (0,)


def test_reports_from_the_shared_block_equal_those_from_each_measurements_tensors():
    # finish_all hands every measurement a view of one shared array (LayerMeasurement.block),
    # which assemble_report gathers in one index per array; without it, it joins each
    # measurement's tensors.  Both must give the same report to the bit, on both paths, with
    # layers of several widths, an InstanceNorm with running statistics and a layer that ran
    # twice per forward.
    from normdoctor.layers import find_norm_layers, module_state
    from normdoctor.recording import BLOCK
    from normdoctor.sources.torch import Probe

    torch.manual_seed(0)
    shared = torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), shared, torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1), shared,
        torch.nn.Conv2d(4, 7, 1), torch.nn.InstanceNorm2d(7, track_running_stats=True),
        torch.nn.Flatten(), torch.nn.Linear(7 * 36, 9), torch.nn.BatchNorm1d(9),
    )  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    layers = find_norm_layers(model)
    gen = torch.Generator().manual_seed(1)
    with Probe(model, layers) as probe:
        for _ in range(5):
            x = torch.randn(6, 3, 8, 8, generator=gen) * 2 + 1
            for path in ("train", "eval"):
                with probe.path(path):
                    model(x)
        results = {p: probe.results(p) for p in ("train", "eval")}
    for measured in results.values():
        for m in measured.values():
            assert m is not None and m.block is not None
            block, a, b = m.block
            pooled = {"pooled_mean": m.pooled.mean, "pooled_var": m.pooled.var}
            for row, name in enumerate(BLOCK):
                value = pooled[name] if name in pooled else getattr(m, name)
                np.testing.assert_array_equal(block[row, a:b], value.double().numpy(), name)
    loose = {
        p: {n: dataclasses.replace(m, block=None) for n, m in ms.items()}
        for p, ms in results.items()
    }
    # Without the middle layer, each path's columns in the block are no longer one run (the
    # gather by index, not the slice).
    gaps = [{p: {**ms, "6": None} for p, ms in r.items()} for r in (results, loose)]
    reports = [
        assemble_report(
            model_name="m",
            layers=layers,
            states={layer.name: module_state(model.get_submodule(layer.name)) for layer in layers},
            results=r,
            order=[layer.name for layer in layers],
            end_to_end=None,
            composition=_kept(batch_size=6, batches=5),
            paths=("train", "eval"),
        )
        for r in (results, loose, *gaps)
    ]
    assert reports[0].layer("1").train is not None  # measured
    assert reports[0] == reports[1]
    assert reports[2] == reports[3]
    assert reports[2].layer("6").train is None
    assert reports[2].layer("9") == reports[0].layer("9")


def test_unit_figures_of_every_layer_at_once_equal_one_layer_at_a_time():
    # The worst unit of each layer (first of the largest finite score) and its scores as
    # floats, by segment reductions over all layers: against argmax and a plain loop per layer,
    # with ties, NaN and infinite scores, a layer with no finite score and one without units.
    from normdoctor.assemble import _unit_figures

    inf, nan = math.inf, math.nan
    units = [
        np.array([0.5, 2.0, 1.0]),
        np.array([3.0, 3.0]),  # a tie: the first
        np.array([nan, inf, 0.25, -inf]),
        np.array([nan, inf]),  # nothing finite
        np.array([]),  # no units
        np.array([7.0]),
        *(np.random.default_rng(0).random(n) for n in (1, 5, 64)),
    ]
    index, worst, listed = _unit_figures(units)
    for u, i, w, values in zip(units, index, worst, listed, strict=True):
        ok = np.isfinite(u)
        if ok.any():
            want = int(np.where(ok, u, -inf).argmax())
            assert (i, w) == (want, float(u[want]))
        else:
            assert (i, w) == (None, None)
        assert values == tuple(float(v) if math.isfinite(v) else None for v in u)
    assert index[:3] == [1, 0, 2]

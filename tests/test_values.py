"""``normdoctor.values.Floats``: the per-channel figures of a report, made into floats when
read, must behave as the tuple they stand for (issue 16 made them lazy)."""

from __future__ import annotations

import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import normdoctor as nd
from normdoctor.report import ScanReport
from normdoctor.values import Floats, floats


def lazy(values):
    a = np.asarray(values, dtype=np.float64)
    a.flags.writeable = False
    return Floats(a)


@pytest.mark.parametrize(
    "values", [[], [1.5], [0.1, -2.0, 3e300], [1.0, math.nan, -math.inf, math.inf, 2.0]]
)
def test_floats_behave_as_the_tuple(values):
    f, t = lazy(values), floats(values)
    assert len(f) == len(t)
    assert bool(f) == bool(t)
    assert f == t and t == f
    assert not f.__ne__(t)
    assert f == lazy(values)
    assert hash(f) == hash(t)
    assert tuple(f) == t and list(f) == list(t)
    assert f[:2] == t[:2] and f[::-1] == t[::-1]
    if t:
        assert f[0] == t[0] and f[-1] == t[-1]
        assert t[0] in f
    tail = (7.0,)
    assert f + tail == (*t, 7.0) and tail + f == (7.0, *t) and f + f == (*t, *t)
    assert f * 2 == t * 2
    assert repr(f) == repr(t)
    assert f != list(t) or not t  # a tuple is not equal to a list either
    assert pickle.loads(pickle.dumps(f)) == t
    assert type(pickle.loads(pickle.dumps(f))) is tuple
    assert copy.copy(f) is f and copy.deepcopy(f) is f


def test_non_finite_values_read_as_none():
    f = lazy([1.0, math.nan, math.inf])
    assert f == (1.0, None, None)
    assert f[1] is None


def test_length_does_not_make_the_floats():
    f = lazy(np.arange(5.0))
    assert len(f) == 5
    assert f._tuple is None  # what the laziness saves
    assert f[4] == 4.0
    assert f._tuple == (0.0, 1.0, 2.0, 3.0, 4.0)


def _model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dtype)
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.0)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_report_does_not_change_with_the_model_after_the_scan(dtype):
    # The figures are read after the scan: they must not be views of the model's buffers
    # (a float64 model's running statistics need no conversion, so a view would be cheap).
    model = _model(dtype)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    report = nd.scan(model, x, batch_size=16, shuffle=False)
    layer = report.layer("1")
    assert isinstance(layer.running_mean, Floats) and isinstance(layer.pooled_mean, Floats)
    with torch.no_grad():
        model[1].running_mean.fill_(-9.0)
        model[1].running_var.fill_(9.0)
        model[1].weight.fill_(0.0)
    assert layer.running_mean == (0.5,) * 4
    assert layer.running_var == (2.0,) * 4
    # the input's pooled mean, float64 over all 64 samples; float32 inputs: rounding of 1e-6
    with torch.no_grad():
        ref = model[0](x).double().mean(0).tolist()
    assert layer.pooled_mean == pytest.approx(ref, rel=1e-6, abs=1e-7)


def test_json_round_trip_and_equality_hold_with_floats():
    model = _model(torch.float32)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))
    report = nd.scan(model, x, batch_size=16, shuffle=False)
    text = report.to_json()
    back = ScanReport.from_json(text)
    assert back == report and report == back
    assert hash(back.layer("1").train) == hash(report.layer("1").train)
    (layer,) = [d for d in json.loads(text)["layers"] if d["name"] == "1"]
    assert layer["running_mean"] == [0.5] * 4
    assert layer["paths"]["train"]["pooled_mean"] == list(report.layer("1").pooled_mean)

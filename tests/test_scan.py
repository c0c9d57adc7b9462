"""scan(): the metrics against direct computation, the flags on models of known truth, and the
promise that the model comes back exactly as it was."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from _models import digits
from torch import nn

import normdoctor as nd
from normdoctor.metrics import DEFAULT_NONIID_THRESHOLD, Recommendation
from normdoctor.report import LayerStatus
from sample_models.archs import DigitsCNN


def _snapshot(model: nn.Module) -> tuple[dict, dict, list]:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {name: m.training for name, m in model.named_modules()}
    hooks = [  # and no forward wrapper left in an instance (normdoctor.taps)
        (name, len(m._forward_pre_hooks), len(m._forward_hooks), m.__dict__.get("forward"))
        for name, m in model.named_modules()
    ]
    return state, flags, hooks


def _assert_unchanged(model: nn.Module, before: tuple[dict, dict, list]) -> None:
    state, flags, hooks = _snapshot(model)
    assert state.keys() == before[0].keys()
    for k in state:
        assert torch.equal(state[k], before[0][k]), k  # bit for bit
    assert flags == before[1]
    assert hooks == before[2]


# -- the metric against torch.nn.functional.batch_norm ----------------------------------------


@pytest.mark.parametrize(
    "shape", [(7, 5), (7, 5, 9), (7, 5, 4, 6), (7, 5, 2, 3, 4)], ids=["2d", "3d", "4d", "5d"]
)
def test_layer_mismatch_equals_direct_rms_difference(shape, hot_path):
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](c)
    bn = bn.double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) * 3 + 0.1)
        bn.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
        bn.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    y_train = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    y_eval = F.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
    )
    direct = ((y_train - y_eval).square().mean() / bn.weight.square().mean()).sqrt().item()
    layer = nd.scan(nn.Sequential(bn), x, batch_size=shape[0]).layer("0")
    # Same float64 arithmetic in another order; the closed form is exact, so 1e-10 relative.
    assert layer.train.batch_drift[0] == pytest.approx(direct, rel=1e-10)
    assert layer.drift == pytest.approx(direct, rel=1e-10)
    # and the end-to-end comparison of the two paths saw the same outputs
    assert layer.batches == 1


def test_instance_norm_with_running_stats_is_measured_per_sample():
    gen = torch.Generator().manual_seed(1)
    inorm = nn.InstanceNorm2d(3, affine=True, track_running_stats=True).double().eval()
    with torch.no_grad():
        inorm.running_mean.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
        inorm.running_var.copy_(torch.rand(3, generator=gen, dtype=torch.float64) + 0.5)
        inorm.weight.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
    x = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) + 1
    y_train = F.instance_norm(x, None, None, inorm.weight, inorm.bias, True, 0.0, inorm.eps)
    y_eval = F.batch_norm(
        x, inorm.running_mean, inorm.running_var, inorm.weight, inorm.bias, False, 0.0, inorm.eps
    )
    direct = ((y_train - y_eval).square().mean() / inorm.weight.square().mean()).sqrt().item()
    before = _snapshot(inorm)
    layer = nd.scan(nn.Sequential(inorm), x, batch_size=4).layer("0")
    assert layer.batches == 4  # the unit is the sample
    assert layer.drift == pytest.approx(direct, rel=1e-10)
    _assert_unchanged(inorm, before)


# -- flags on models trained here, whose truth is known --------------------------------------


def _train(batch_size: int, epochs: int, lr: float, samples: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    x, y, _, _ = digits()
    x, y = x[:samples], y[:samples]
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def healthy() -> nn.Module:
    return _train(batch_size=64, epochs=10, lr=1e-2)


@pytest.fixture(scope="module")
def tiny_batch() -> nn.Module:
    return _train(batch_size=1, epochs=1, lr=1e-3, samples=800)


@pytest.fixture(scope="module")
def test_data() -> tuple[torch.Tensor, torch.Tensor]:
    _, _, x, y = digits()
    return x, y


@pytest.mark.slow
def test_batch_size_one_model_is_flagged_instance(tiny_batch, test_data):
    report = nd.scan(tiny_batch, test_data, batch_size=1)
    assert report.flagged and report.harmful
    assert report.end_to_end.acc_train > report.end_to_end.acc_eval + 0.1
    assert {layer.recommendation for layer in report.flagged_layers} == {Recommendation.INSTANCE}
    assert report.composition.batch_size == 1 and report.composition.max_batch == 1


@pytest.mark.slow
def test_healthy_model_is_not_flagged(healthy, test_data):
    report = nd.scan(healthy, test_data, batch_size=64)
    assert not report.flagged
    assert report.end_to_end.agreement > 0.95
    assert all(layer.status is LayerStatus.OK for layer in report.layers)
    assert report.status is nd.Verdict.OK and report.verdict.startswith("ok")


@pytest.mark.slow
def test_stale_running_stats_are_flagged_recalibrate(healthy, test_data):
    stale = copy.deepcopy(healthy)
    with torch.no_grad():
        for m in stale.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.mul_(0.5).add_(0.3)
                m.running_var.mul_(2.5)
    report = nd.scan(stale, test_data, batch_size=64)
    assert report.flagged
    assert {layer.recommendation for layer in report.flagged_layers} == {Recommendation.RECALIBRATE}
    for layer in report.flagged_layers:
        assert layer.shift > layer.noise


def test_class_sorted_batches_show_as_non_iid(healthy, test_data):
    grouped = nd.scan(
        healthy, test_data, batch_size=16, shuffle=False, group_by="label", paths=("eval",)
    )
    shuffled = nd.scan(healthy, test_data, batch_size=16, paths=("eval",))
    assert grouped.composition.group_by == "label"
    for g, s in zip(grouped.layers, shuffled.layers, strict=True):
        assert g.noniid > 2 * s.noniid, g.name
        assert s.noniid < 2, s.name  # i.i.d. batches: about 1
    assert max(g.noniid for g in grouped.layers) > DEFAULT_NONIID_THRESHOLD


# -- the model comes back exactly as it was ---------------------------------------------------


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.inorm = nn.InstanceNorm2d(4, track_running_stats=True)
        self.bn1d = nn.BatchNorm1d(4, momentum=None)
        self.fail_at: int | None = None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("boom")
        h = self.inorm(self.drop(self.bn(self.conv(x))))
        return self.bn1d(h.mean(dim=(2, 3)))


def test_model_is_bit_identical_after_scan():
    model = Mixed()
    model.train()
    model.bn.eval()  # mixed modes must survive: model.train(saved) would flatten them
    model.drop.train()
    before = _snapshot(model)
    nd.scan(model, torch.randn(40, 3, 6, 6), batch_size=8)
    _assert_unchanged(model, before)


def test_model_is_restored_after_a_failing_forward():
    model = Mixed()
    model.bn.train()
    before = _snapshot(model)
    # The 4th forward: batch 0 runs both paths, then a chunk of batches (1-4) runs the train
    # path before the eval path (scan._chunk_batches): batch 2, train path.
    model.fail_at = 4
    with pytest.raises(nd.ScanError, match=r"batch 2 \(train path\).*boom"):
        nd.scan(model, torch.randn(40, 3, 6, 6), batch_size=8)
    _assert_unchanged(model, before)


class _Scribbler(nn.Module):
    """Writes its BatchNorm's buffers behind autograd's back (through ``.data``: no version
    counter moves) on every forward, and holds a -0.0, a NaN and a 2-D buffer."""

    def __init__(self, only_the_sign: bool = False) -> None:
        super().__init__()
        self.only_the_sign = only_the_sign
        self.bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            # (a NaN differs from itself under ==: not with the sign alone)
            third = 0.25 if only_the_sign else float("nan")
            self.bn.running_mean.copy_(torch.tensor([-0.0, 0.5, third]))
            self.bn.running_var.copy_(torch.tensor([1.0, 2.0, 3.0]))
        self.bn.register_buffer("extra", torch.arange(4.0).reshape(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.only_the_sign:  # -0.0 == 0.0, but not bit for bit
            self.bn.running_mean.data[0] = 0.0
            return self.bn(x)
        self.bn.running_mean.data.add_(1.0)
        self.bn.running_var.data[2] = 0.0
        self.bn.num_batches_tracked.data.fill_(99)
        self.bn.extra.data.mul_(2)
        return self.bn(x)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype is torch.float32 else t


@pytest.mark.parametrize("only_the_sign", [False, True])
def test_buffers_written_behind_autograds_back_come_back_bit_for_bit(only_the_sign):
    # The probe restores norm buffers from one joined copy, and copies back only where the
    # bits differ: writes that no version counter sees, -0.0 against 0.0 and NaN included.
    model = _Scribbler(only_the_sign)
    before = {k: v.clone() for k, v in model.bn._buffers.items()}
    objects = dict(model.bn._buffers)
    nd.scan(model, torch.randn(8, 3, 4, 4), batch_size=4)
    for key, value in model.bn._buffers.items():
        assert value is objects[key], key  # the same tensors
        assert torch.equal(_bits(value), _bits(before[key])), key
    assert str(model.bn.running_mean[0].item()) == "-0.0"


def test_a_models_own_train_method_is_called_for_eval_mode():
    # Where a module overrides train() (to keep part of it frozen, say), the scan puts the
    # model in eval mode through it, not by setting the flags itself.
    calls: list[bool] = []

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def train(self, mode: bool = True) -> Frozen:
            calls.append(mode)
            return super().train(mode)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x)

    model = Frozen().train()
    calls.clear()
    nd.scan(model, torch.randn(16, 4), batch_size=8)
    assert False in calls
    assert model.training and model.bn.training  # and back as it was


def test_scan_does_not_update_running_stats_even_with_cumulative_momentum():
    model = Mixed()
    before = _snapshot(model)
    report = nd.scan(model, torch.randn(16, 3, 6, 6) * 4 + 3, batch_size=4, paths=("train",))
    _assert_unchanged(model, before)
    assert report.layer("bn1d").momentum is None


def test_model_without_norm_layers_gets_a_clear_message():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.warns(UserWarning, match="no normalization layers"):
        report = nd.scan(model, torch.randn(8, 4))
    assert report.layers == ()
    assert "no normalization layers" in report.verdict
    assert not report.flagged


def test_batch_independent_layers_are_listed_never_flagged():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(4 * 36)
    )
    report = nd.scan(model, torch.randn(10, 1, 8, 8), batch_size=1)
    assert [layer.status for layer in report.layers] == [LayerStatus.NOT_MEASURED] * 2
    assert [layer.order for layer in report.layers] == [0, 1]
    assert not report.flagged


def test_nonfinite_inputs_and_running_stats_are_reported_not_propagated():
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_var[1] = -1.0
        bn.running_mean[2] = float("nan")
    x = torch.randn(24, 3, 4, 4)
    x[5, 0, 1, 1] = float("inf")  # batch 1 of 3
    report = nd.scan(nn.Sequential(bn), x, batch_size=8, shuffle=False)
    layer = report.layer("0")
    assert layer.train.nonfinite_batches == 1 and layer.batches == 2
    assert layer.degenerate_channels == (1, 2)
    assert layer.flagged and layer.recommendation is Recommendation.RECALIBRATE
    assert math.isfinite(layer.drift)
    assert all(v is not None for v in layer.pooled_var)
    assert any("NaN/Inf" in n for n in report.notes)
    json.loads(report.to_json())  # strict JSON: no NaN tokens


def test_not_executed_layer_is_reported():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.BatchNorm1d(3)
            self.unused = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.used(x)

    report = nd.scan(Branchy(), torch.randn(8, 3), batch_size=4)
    assert report.layer("unused").status is LayerStatus.NOT_EXECUTED
    assert report.layer("unused").executed is False
    assert report.layers[-1].name == "unused"


def test_bn_subclass_keeps_its_activation_and_frozen_bn_is_measured():
    class BatchNormAct2d(nn.BatchNorm2d):  # the timm pattern
        def forward(self, x):
            return torch.relu(super().forward(x))

    class FrozenBatchNorm2d(nn.Module):  # the torchvision pattern: buffers only
        def __init__(self, n):
            super().__init__()
            for name, value in (
                ("weight", torch.ones(n)),
                ("bias", torch.zeros(n)),
                ("running_mean", torch.zeros(n)),
                ("running_var", torch.ones(n)),
            ):
                self.register_buffer(name, value)

        def forward(self, x):
            scale = self.weight * (self.running_var + 1e-5).rsqrt()
            return (
                x * scale[None, :, None, None]
                + (self.bias - self.running_mean * scale)[None, :, None, None]
            )

    model = nn.Sequential(BatchNormAct2d(3), FrozenBatchNorm2d(3))
    x = torch.randn(16, 3, 4, 4) * 2 + 1
    layers = {layer.name: layer for layer in nd.find_norm_layers(model)}
    assert layers["0"].kind == "BatchNormAct2d" and layers["1"].family == "frozen"
    report = nd.scan(model, x, batch_size=8)
    assert report.layer("1").drift > 0.1  # its input is not standardized by frozen stats 0/1...
    # ...and it receives the activation's output on the train path (non-negative inputs)
    assert min(v for v in report.layer("1").train.pooled_mean) > 0


def test_iterables_dataloaders_and_dict_batches():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    x, y = torch.randn(30, 4), torch.randint(0, 2, (30,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    a = nd.scan(model, loader)
    b = nd.scan(
        model, [{"inputs": x[i : i + 10], "labels": y[i : i + 10]} for i in range(0, 30, 10)]
    )
    c = nd.scan(model, (x, y), batch_size=10, shuffle=False)
    assert a.composition.source == "batches" and a.composition.order == "as-given"
    assert a.layer("1").pooled_var == b.layer("1").pooled_var
    torch.testing.assert_close(
        torch.tensor(a.layer("1").pooled_var), torch.tensor(c.layer("1").pooled_var)
    )
    assert a.end_to_end.acc_eval == c.end_to_end.acc_eval
    d = nd.scan(model, torch.utils.data.TensorDataset(x, y), batch_size=7, max_batches=2)
    assert d.composition.num_batches == 2 and d.composition.source == "dataset"


def test_forward_callable_for_several_inputs():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, a, b):
            return self.bn(a + b)

    batches = [(torch.randn(5, 3), torch.randn(5, 3)) for _ in range(3)]
    report = nd.scan(
        TwoInputs(), [(batch,) for batch in batches], forward=lambda m, inputs: m(*inputs)
    )
    assert report.layer("bn").batches == 3


def test_bad_arguments_fail_before_any_forward():
    model = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="paths"):
        nd.scan(model, torch.randn(4, 3), paths=("training",))
    with pytest.raises(nd.DataError, match="batch_size"):
        nd.scan(model, torch.randn(4, 3), batch_size=0)
    with pytest.raises(nd.DataError, match="no samples"):
        nd.scan(model, torch.randn(0, 3))
    with pytest.raises(nd.DataError, match="group_by='label' needs labels"):
        nd.scan(model, torch.randn(4, 3), group_by="label")
    with pytest.raises(nd.ScanError, match="batch 0"):
        nd.scan(model, torch.randn(4, 5))  # wrong width


def test_an_empty_batch_adds_nothing():
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)).eval()
    x = torch.randn(24, 2, 6, 6, generator=gen)
    batches = [x[:12], x[:0], x[12:]]
    with_empty = nd.scan(model, batches, paths=("eval",)).layer("1")
    without = nd.scan(model, [x[:12], x[12:]], paths=("eval",)).layer("1")
    assert with_empty.eval.samples == 24
    assert with_empty.eval.pooled_var == pytest.approx(without.eval.pooled_var, rel=1e-12)

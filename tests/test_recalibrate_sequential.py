"""recalibrate(mode="sequential"): exact eval-path statistics, in about one pass.

Every batch's forward advances in lockstep from one norm layer to the next (normdoctor.patch.
recalibrate._Lockstep); batches past ``max_resident_bytes`` are run again for each layer, and a
model the lockstep cannot follow falls back to measuring one layer per pass.  Each path is
checked against an independent float64 reference: the model converted to float64 and
recalibrated one layer at a time over the concatenated data with NumPy statistics.
"""

from __future__ import annotations

import copy
import importlib
import threading

import numpy as np
import pytest
import torch
from torch import nn

from normdoctor.errors import DataError, ScanError
from normdoctor.patch import recalibrate

#: Statistics of a float32 model against the float64 reference: float32 rounding through a
#: few layers (~1e-7 per operation), amplified by upstream normalization.  The issue's 1e-5.
F32_VS_F64 = 1e-5

#: A model's running_var against the statistics its own eval-mode forward feeds each layer
#: (float32 forward, float64 NumPy): what the benchmark's "eval-path error" measures; only the
#: float32 storage of the buffers (6e-8) separates them.  The issue's bound is 1e-6.
EVAL_PATH_TOL = 1e-6

STATS = ("running_mean", "running_var", "num_batches_tracked")


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


class Net(nn.Module):
    """Residual blocks, dropout, a BatchNorm1d head: 7 BatchNorm layers in a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.blocks = nn.Sequential(Block(6), Block(6))
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 4 * 4, 10)
        self.head = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.head(self.fc(self.drop(x)))


def stale_net(seed: int = 0) -> Net:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.3, 3, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    return model.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen) * 3 + 2


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def layer_input(model: nn.Module, name: str, batches: list[torch.Tensor]) -> np.ndarray:
    """The eval-mode input of layer ``name`` over every batch, float64 NumPy."""
    seen: list[np.ndarray] = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().double().numpy())
    )
    try:
        with torch.no_grad():
            for x in batches:
                model.eval()(x)
    finally:
        handle.remove()
    return np.concatenate(seen)


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    axes = (0, *range(2, x.ndim))
    return x.mean(axis=axes), x.var(axis=axes, ddof=1)  # unbiased, as BatchNorm stores


def float64_reference(
    model: nn.Module, batches: list[torch.Tensor], order: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Exact eval-path statistics: a float64 copy recalibrated one layer at a time in ``order``,
    each layer's mean and unbiased variance from NumPy over all its inputs."""
    ref = copy.deepcopy(model).double().eval()
    modules = dict(ref.named_modules())
    out = {}
    for name in order:
        mean, var = moments(layer_input(ref, name, [x.double() for x in batches]))
        with torch.no_grad():
            modules[name].running_mean.copy_(torch.from_numpy(mean))
            modules[name].running_var.copy_(torch.from_numpy(var))
        out[name] = (mean, var)
    return out


def assert_matches(model: nn.Module, reference: dict, rtol: float) -> None:
    modules = dict(model.named_modules())
    for name, (mean, var) in reference.items():
        layer = modules[name]
        got_var = layer.running_var.double().numpy()
        np.testing.assert_allclose(got_var, var, rtol=rtol, err_msg=name)
        scale = np.maximum(np.abs(mean), np.sqrt(var))  # a mean near 0: relative to the std
        err = np.abs(layer.running_mean.double().numpy() - mean) / scale
        assert err.max() < rtol, name


def eval_path_error(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Max relative error of running_var against what the model's own eval forward feeds."""
    worst = 0.0
    modules = dict(model.named_modules())
    for name in bn_names(model):
        _mean, var = moments(layer_input(model, name, batches))
        got = modules[name].running_var.double().numpy()
        # A channel that is constant (a dead ReLU) has variance 0: there the error is absolute.
        err = np.abs(got - var) / np.where(var > 0, var, 1.0)
        assert not np.isnan(err).any(), name
        worst = max(worst, float(err.max()))
    return worst


def test_sequential_equals_the_float64_layer_by_layer_reference():
    model = stale_net()
    x = images(90)
    batches = list(x.split(16))  # uneven: 5 batches of 16 and one of 10
    before = copy.deepcopy(model)
    recal = recalibrate(model, x, batch_size=16)
    reference = float64_reference(model, batches, bn_names(model))
    assert_matches(recal, reference, F32_VS_F64)
    # Exact for inference: each layer's statistics are those the final model feeds it.
    assert eval_path_error(recal, batches) <= EVAL_PATH_TOL
    for name in bn_names(model):
        assert int(dict(recal.named_modules())[name].num_batches_tracked) == len(batches)
    # The test has teeth: the train path (single-pass) is measurably off the eval path here.
    train = recalibrate(model, x, batch_size=16, mode="single-pass")
    assert eval_path_error(train, batches) > 100 * EVAL_PATH_TOL
    # Batch size does not change the statistics, and the input model is untouched.
    other = recalibrate(model, x, batch_size=64)
    assert_matches(other, reference, F32_VS_F64)
    for key, value in before.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("held", [0, 2, None])
def test_batches_run_again_when_over_the_memory_budget(held):
    """max_resident_bytes=0 runs every batch again for each layer (the layer-by-layer cost);
    a budget for 2 batches holds the first 2 and runs the rest again: the same statistics."""
    model = stale_net(1)
    x = images(64, seed=2)
    batches = list(x.split(8))
    # The largest layer input of one batch: 8 x 6 x 8 x 8 float32.
    budget = None if held is None else held * 8 * 6 * 8 * 8 * 4
    kw = {} if budget is None else {"max_resident_bytes": budget}
    recal = recalibrate(model, x, batch_size=8, **kw)
    reference = float64_reference(model, batches, bn_names(model))
    assert_matches(recal, reference, F32_VS_F64)
    assert eval_path_error(recal, batches) <= EVAL_PATH_TOL
    full = recalibrate(model, x, batch_size=8)
    for key, value in full.state_dict().items():
        torch.testing.assert_close(recal.state_dict()[key], value, rtol=1e-6, atol=0)


def test_paused_forwards_are_capped_in_number(monkeypatch):
    """Small batches of small inputs fit the memory budget by the thousand: the number of
    paused forwards (a thread each) is capped too, and the batches past it are run again."""
    module = importlib.import_module("normdoctor.patch.recalibrate")
    monkeypatch.setattr(module, "MAX_HELD_FORWARDS", 3)
    most = [0]
    spawn = module._Lockstep._spawn

    def counted(self, index, batch):
        most[0] = max(most[0], len(self.workers) + 1)
        return spawn(self, index, batch)

    monkeypatch.setattr(module._Lockstep, "_spawn", counted)
    model = stale_net(1)
    x = images(24, seed=4)
    recal = recalibrate(model, x, batch_size=1)
    assert most[0] <= 4  # three held, one running
    reference = float64_reference(model, list(x.split(1)), bn_names(model))
    assert_matches(recal, reference, F32_VS_F64)


class Routed(nn.Module):
    """A data-dependent branch: batches with a positive mean also go through ``extra``, so the
    batches reach different layers at the same point and the lockstep cannot follow them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn0 = nn.BatchNorm2d(4)
        self.extra = nn.BatchNorm2d(4)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.conv(x)))
        if x.mean() > 0:
            h = torch.relu(self.extra(h * 2 + 1))
        return self.bn1(h)


def test_a_model_the_lockstep_cannot_follow_still_ends_exact():
    torch.manual_seed(3)
    model = Routed().eval()
    gen = torch.Generator().manual_seed(3)
    batches = [
        torch.randn(12, 3, 6, 6, generator=gen) + (4 if i % 2 == 0 else -4) for i in range(6)
    ]
    recal = recalibrate(model, batches)
    # Reference: float64, batch by batch (the branch is per batch), layer after layer.
    ref = copy.deepcopy(model).double().eval()
    modules = dict(ref.named_modules())
    for name in ["bn0", "extra", "bn1"]:
        mean, var = moments(layer_input(ref, name, [b.double() for b in batches]))
        with torch.no_grad():
            modules[name].running_mean.copy_(torch.from_numpy(mean))
            modules[name].running_var.copy_(torch.from_numpy(var))
        layer = dict(recal.named_modules())[name]
        np.testing.assert_allclose(layer.running_var.double().numpy(), var, rtol=F32_VS_F64)
        scale = np.maximum(np.abs(mean), np.sqrt(var))
        assert (np.abs(layer.running_mean.double().numpy() - mean) / scale).max() < F32_VS_F64
    assert eval_path_error(recal, batches) <= EVAL_PATH_TOL
    assert int(recal.extra.num_batches_tracked) == 3  # the batches that took the branch
    assert int(recal.bn1.num_batches_tracked) == 6


def test_the_model_is_restored_apart_from_the_statistics_it_sets():
    model = stale_net(2)
    model.blocks[0].bn1.train()  # mixed training flags survive
    model.drop.train()
    hook_calls = []
    model.stem[1].register_forward_pre_hook(lambda _m, _a: hook_calls.append(1))
    snap = copy.deepcopy(model.state_dict())
    flags = [(n, m.training) for n, m in model.named_modules()]
    chosen = ["stem.1", "blocks.0.bn1", "blocks.1.bn2", "head"]
    threads = threading.active_count()
    recal = recalibrate(model, images(40), layers=chosen, batch_size=8, inplace=True)
    assert recal is model
    assert threading.active_count() == threads  # no forward left running
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    changed = {f"{n}.{k}" for n in chosen for k in STATS}
    now = model.state_dict()
    assert list(now) == list(snap)
    for key, value in snap.items():
        assert torch.equal(now[key], value) is (key not in changed), key
    # Nothing of normdoctor's left on the modules: the user's hook alone, no forward wrapper.
    assert all(len(m._forward_pre_hooks) == (m is model.stem[1]) for m in model.modules())
    assert all(not m._forward_hooks and "forward" not in m.__dict__ for m in model.modules())
    assert len(hook_calls) == 5  # the user's hook saw each batch once (one eval pass)


class Failing(nn.Module):
    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.bn1 = nn.BatchNorm2d(3)
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn0(x)
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom")
        return self.bn1(h)


def test_a_failing_forward_names_the_batch_and_restores_the_model():
    model = Failing(fail_at=3).eval()
    snap = copy.deepcopy(model.state_dict())
    threads = threading.active_count()
    with pytest.raises(ScanError, match="boom"):
        recalibrate(model, torch.randn(40, 3, 4, 4) * 2 + 1, batch_size=8, inplace=True)
    assert threading.active_count() == threads
    for key, value in snap.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_max_resident_bytes_is_checked():
    model = stale_net()
    with pytest.raises(ValueError, match="max_resident_bytes"):
        recalibrate(model, images(8), max_resident_bytes=-1)
    with pytest.raises(TypeError, match="max_resident_bytes"):
        recalibrate(model, images(8), max_resident_bytes=1.5)  # type: ignore[arg-type]


def test_no_batches_is_a_data_error():
    with pytest.raises(DataError):
        recalibrate(stale_net(), [])


class Swallowing(nn.Module):
    """A forward that catches everything around its first layer (BaseException included)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn1 = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            h = self.bn0(x)
        except BaseException:  # the point of the test
            h = x
        return self.bn1(self.conv(h))


@pytest.mark.parametrize("budget", [0, None])
def test_a_forward_that_swallows_the_stop_does_not_hang(budget):
    torch.manual_seed(5)
    model = Swallowing().eval()
    x = torch.randn(48, 3, 4, 4) * 2 + 1
    kw = {} if budget is None else {"max_resident_bytes": budget}
    threads = threading.active_count()
    recal = recalibrate(model, x, batch_size=8, **kw)
    assert threading.active_count() == threads
    reference = float64_reference(model, list(x.split(8)), ["bn0", "bn1"])
    assert_matches(recal, reference, F32_VS_F64)

"""BatchRenorm against an independent NumPy implementation of Ioffe (2017), Algorithm 1."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from normdoctor.errors import ConversionError
from normdoctor.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, RenormSchedule

# float64 on both sides; the only differences are summation orders (~1e-15 relative per sum),
# so 1e-9 leaves a wide margin while catching any formula error (those are O(1e-2) or more).
F64_RTOL = 1e-9
F64_ATOL = 1e-10

EPS = 1e-5
MOMENTUM = 0.1

SHAPES = {
    "2d-(N,C)": ((16, 4), BatchRenorm1d, nn.BatchNorm1d),
    "3d-(N,C,L)": ((8, 4, 5), BatchRenorm1d, nn.BatchNorm1d),
    "4d-(N,C,H,W)": ((6, 4, 3, 4), BatchRenorm2d, nn.BatchNorm2d),
    "5d-(N,C,D,H,W)": ((4, 4, 2, 3, 3), BatchRenorm3d, nn.BatchNorm3d),
}


# ------------------------------------------------------------------- the NumPy reference


def ramp(step: int, start: float, end: float, hold: int, reach: int) -> float:
    """The warm-up as the paper describes it: constant for ``hold`` steps, then linear, then
    constant."""
    if step < hold:
        return start
    if step >= reach:
        return end
    return start + (end - start) * (step - hold) / (reach - hold)


def np_renorm_forward(x, gamma, beta, mu, var_running, r_max, d_max):
    """Algorithm 1, training step; returns y and what the backward pass needs."""
    axes = (0, *range(2, x.ndim))
    shape = [1, -1] + [1] * (x.ndim - 2)
    m = x.size // x.shape[1]
    mu_b = x.mean(axis=axes)
    sigma_b = np.sqrt(((x - mu_b.reshape(shape)) ** 2).mean(axis=axes) + EPS)
    sigma = np.sqrt(var_running + EPS)
    r = np.clip(sigma_b / sigma, 1.0 / r_max, r_max)
    d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
    x_hat = (x - mu_b.reshape(shape)) / sigma_b.reshape(shape) * r.reshape(shape) + d.reshape(shape)
    y = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    return y, dict(m=m, mu_b=mu_b, sigma_b=sigma_b, r=r, x_hat=x_hat, axes=axes, shape=shape)


def np_renorm_backward(g, x, gamma, cache):
    """The paper's gradients with r and d treated as constants."""
    axes, shape, m = cache["axes"], cache["shape"], cache["m"]
    mu_b, sigma_b, r = (cache[k].reshape(shape) for k in ("mu_b", "sigma_b", "r"))
    g_xhat = g * gamma.reshape(shape)
    g_sigma_b = (g_xhat * (x - mu_b) * (-r / sigma_b**2)).sum(axis=axes).reshape(shape)
    g_mu_b = (g_xhat * (-r / sigma_b)).sum(axis=axes).reshape(shape)
    g_x = g_xhat * r / sigma_b + g_sigma_b * (x - mu_b) / (m * sigma_b) + g_mu_b / m
    g_gamma = (g * cache["x_hat"]).sum(axis=axes)
    g_beta = g.sum(axis=axes)
    return g_x, g_gamma, g_beta


def np_running_update(mu, var_running, x, momentum):
    """PyTorch's BatchNorm convention (alpha = momentum; unbiased batch variance stored)."""
    axes = (0, *range(2, x.ndim))
    m = x.size // x.shape[1]
    mu_b = x.mean(axis=axes)
    var_b = ((x - mu_b.reshape([1, -1] + [1] * (x.ndim - 2))) ** 2).mean(axis=axes)
    return mu + momentum * (mu_b - mu), var_running + momentum * (var_b * m / (m - 1) - var_running)


# ------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_input(shape, seed):
    gen = np.random.default_rng(seed)
    c = shape[1]
    loc = gen.normal(0, 2, c)
    scale = gen.uniform(0.3, 3.0, c)
    bshape = [1, -1] + [1] * (len(shape) - 2)
    return gen.normal(size=shape) * scale.reshape(bshape) + loc.reshape(bshape)


def make_layer(cls, c, **options):
    layer = cls(c, eps=EPS, momentum=MOMENTUM, **options).double()
    gen = np.random.default_rng(7)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gen.uniform(0.5, 2.0, c)))
        layer.bias.copy_(torch.from_numpy(gen.normal(0, 1, c)))
        # Running statistics far enough from the batches' that r and d clip in some channels
        # and not in others.
        layer.running_mean.copy_(torch.from_numpy(gen.normal(0, 2, c)))
        layer.running_var.copy_(torch.from_numpy(gen.uniform(0.2, 6.0, c)))
    return layer


def close(actual, expected):
    np.testing.assert_allclose(
        actual.detach().numpy() if isinstance(actual, torch.Tensor) else actual,
        expected,
        rtol=F64_RTOL,
        atol=F64_ATOL,
    )


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", list(SHAPES), ids=list(SHAPES))
def test_forward_and_gradients_match_algorithm_1(case):
    shape, cls, _ = SHAPES[case]
    r_max, d_max = 1.2, 0.5
    layer = make_layer(
        cls, shape[1], r_max=r_max, d_max=d_max, hold_steps=0, r_max_steps=0, d_max_steps=0
    )
    x_np = make_input(shape, seed=1)
    # Running statistics placed relative to the batch's, so that r and d clip in some channels
    # and not in others: sigma_B/sigma = 1/sqrt(ratio), (mu_B - mu)/sigma = offset.
    axes = (0, *range(2, len(shape)))
    ratio, offset = np.array([0.3, 1.0, 3.0, 1.1]), np.array([0.1, 1.0, -2.0, 0.2])
    with torch.no_grad():
        layer.running_var.copy_(torch.from_numpy(x_np.var(axis=axes) * ratio))
        layer.running_mean.copy_(
            torch.from_numpy(x_np.mean(axis=axes) - offset * np.sqrt(layer.running_var.numpy()))
        )
    gamma, beta = layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()
    mu, var = layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()
    y_ref, cache = np_renorm_forward(x_np, gamma, beta, mu, var, r_max, d_max)
    # The case is informative only if some channels clip and some do not.
    r, d = cache["r"], np.clip((cache["mu_b"] - mu) / np.sqrt(var + EPS), -d_max, d_max)
    assert ((r == r_max) | (r == 1 / r_max)).any() and ((r < r_max) & (r > 1 / r_max)).any()
    assert (np.abs(d) == d_max).any() and (np.abs(d) < d_max).any()

    x = torch.from_numpy(x_np).requires_grad_(True)
    layer.train()
    y = layer(x)
    close(y, y_ref)
    g_np = np.random.default_rng(2).normal(size=shape)
    y.backward(torch.from_numpy(g_np))
    g_x, g_gamma, g_beta = np_renorm_backward(g_np, x_np, gamma, cache)
    close(x.grad, g_x)
    close(layer.weight.grad, g_gamma)
    close(layer.bias.grad, g_beta)


@pytest.mark.parametrize("case", list(SHAPES), ids=list(SHAPES))
def test_running_statistics_and_schedule_over_several_steps(case):
    shape, cls, _ = SHAPES[case]
    hold, r_reach, d_reach = 1, 4, 3
    layer = make_layer(
        cls,
        shape[1],
        r_max=3.0,
        d_max=5.0,
        hold_steps=hold,
        r_max_steps=r_reach,
        d_max_steps=d_reach,
    )
    gamma, beta = layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()
    mu, var = layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()
    layer.train()
    for step in range(6):
        x_np = make_input(shape, seed=10 + step)
        r_max, d_max = ramp(step, 1.0, 3.0, hold, r_reach), ramp(step, 0.0, 5.0, hold, d_reach)
        assert layer.limits() == (r_max, d_max)  # the same float expression: exact
        y_ref, _ = np_renorm_forward(x_np, gamma, beta, mu, var, r_max, d_max)
        with torch.no_grad():
            close(layer(torch.from_numpy(x_np)), y_ref)
        mu, var = np_running_update(mu, var, x_np, MOMENTUM)
        close(layer.running_mean, mu)
        close(layer.running_var, var)
    assert int(layer.renorm_step) == 6
    assert int(layer.num_batches_tracked) == 6


@pytest.mark.parametrize("case", list(SHAPES), ids=list(SHAPES))
def test_without_corrections_it_is_batchnorm_in_training(case):
    """r_max = 1, d_max = 0 (the warm-up's start): exactly BatchNorm, bit for bit."""
    shape, cls, bn_cls = SHAPES[case]
    renorm = make_layer(cls, shape[1], r_max=1.0, d_max=0.0)
    bn = bn_cls(shape[1], eps=EPS, momentum=MOMENTUM).double()
    bn.load_state_dict(renorm.state_dict(), strict=False)
    renorm.train()
    bn.train()
    for step in range(3):
        x1 = torch.from_numpy(make_input(shape, seed=20 + step)).requires_grad_(True)
        x2 = x1.detach().clone().requires_grad_(True)
        y1, y2 = renorm(x1), bn(x2)
        assert torch.equal(y1, y2)
        g = torch.from_numpy(np.random.default_rng(step).normal(size=shape))
        y1.backward(g)
        y2.backward(g)
        assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(renorm.weight.grad, bn.weight.grad)
    assert torch.equal(renorm.bias.grad, bn.bias.grad)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(renorm, key), getattr(bn, key)), key


@pytest.mark.parametrize("case", list(SHAPES), ids=list(SHAPES))
def test_eval_mode_is_batchnorm_bit_for_bit(case):
    shape, cls, bn_cls = SHAPES[case]
    renorm = make_layer(cls, shape[1], hold_steps=0, r_max_steps=0, d_max_steps=0)
    renorm.train()
    for step in range(3):  # move the running statistics with real BatchRenorm steps first
        renorm(torch.from_numpy(make_input(shape, seed=30 + step)))
    bn = bn_cls(shape[1], eps=EPS, momentum=MOMENTUM).double()
    bn.load_state_dict({k: v for k, v in renorm.state_dict().items() if k != "renorm_step"})
    renorm.eval()
    bn.eval()
    x = torch.from_numpy(make_input(shape, seed=40))
    assert torch.equal(renorm(x), bn(x))
    # float32 too: the same kernel either way.
    assert torch.equal(renorm.float()(x.float()), bn.float()(x.float()))


def test_without_affine_matches_reference():
    shape = (6, 3, 4, 4)
    layer = BatchRenorm2d(
        3, eps=EPS, affine=False, r_max=1.5, d_max=0.5, hold_steps=0, r_max_steps=0, d_max_steps=0
    ).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([2.0, -1.0, 0.0]))
        layer.running_var.copy_(torch.tensor([0.3, 4.0, 1.0]))
    x_np = make_input(shape, seed=3)
    ones, zeros = np.ones(3), np.zeros(3)
    y_ref, _ = np_renorm_forward(
        x_np,
        ones,
        zeros,
        layer.running_mean.numpy().copy(),
        layer.running_var.numpy().copy(),
        1.5,
        0.5,
    )
    close(layer.train()(torch.from_numpy(x_np)), y_ref)


def test_momentum_none_is_a_cumulative_average_like_batchnorm():
    renorm = BatchRenorm2d(3, momentum=None, r_max=1.0, d_max=0.0).double()
    bn = nn.BatchNorm2d(3, momentum=None).double()
    for step in range(4):
        x = torch.from_numpy(make_input((5, 3, 2, 2), seed=50 + step))
        renorm.train()(x)
        bn.train()(x)
    assert torch.equal(renorm.running_mean, bn.running_mean)
    assert torch.equal(renorm.running_var, bn.running_var)


def test_paper_schedule_defaults():
    s = RenormSchedule()
    assert s(0) == (1.0, 0.0)
    assert s(5000) == (1.0, 0.0)
    assert s(25000) == (1.0 + 2.0 * 20000 / 35000, 5.0)
    assert s(40000) == (3.0, 5.0)
    assert s(10**6) == (3.0, 5.0)
    layer = BatchRenorm2d(2)
    assert layer.limits() == (1.0, 0.0)  # a fresh layer starts as BatchNorm


def test_callable_schedule_and_invalid_limits():
    layer = BatchRenorm2d(2, schedule=lambda step: (1.0 + step, 2.0 * step))
    layer.renorm_step.fill_(3)
    assert layer.limits() == (4.0, 6.0)
    bad = BatchRenorm2d(2, schedule=lambda step: (0.5, 0.0))
    with pytest.raises(ValueError, match="r_max"):
        bad.limits()
    with pytest.raises(ValueError, match="r_max"):
        RenormSchedule(r_max=0.9)
    with pytest.raises(ValueError, match="d_max"):
        RenormSchedule(d_max=-1)


def test_step_count_survives_state_dict_and_plain_checkpoints_load():
    layer = BatchRenorm2d(3)
    layer.train()
    for _ in range(4):
        layer(torch.randn(4, 3, 2, 2))
    state = layer.state_dict()
    assert list(state) == [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
        "renorm_step",
    ]
    again = BatchRenorm2d(3)
    again.load_state_dict(state)
    assert int(again.renorm_step) == 4
    # An ordinary BatchNorm2d checkpoint loads strictly; it has taken no BatchRenorm step.
    bn = nn.BatchNorm2d(3)
    bn.train()(torch.randn(4, 3, 2, 2) * 3 + 1)
    result = again.load_state_dict(bn.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert int(again.renorm_step) == 0
    assert torch.equal(again.running_mean, bn.running_mean)


def test_from_batchnorm_carries_every_tensor_flag_and_dtype():
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=0.05).double()
    bn.train()(torch.randn(8, 4, 3, 3, dtype=torch.float64) * 2 + 1)
    bn.eval()
    renorm = BatchRenorm2d.from_batchnorm(bn, hold_steps=10)
    assert isinstance(renorm, nn.BatchNorm2d)
    assert renorm.training is False
    assert (renorm.eps, renorm.momentum, renorm.affine) == (1e-3, 0.05, True)
    for key, tensor in bn.state_dict().items():
        assert renorm.state_dict()[key] is not None
        assert torch.equal(renorm.state_dict()[key], tensor), key
    assert renorm.weight is bn.weight  # the same Parameter: an optimizer keeps working
    assert renorm.weight.dtype == torch.float64 and renorm.renorm_step.item() == 0
    assert renorm.schedule_config.hold_steps == 10
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    assert torch.equal(renorm(x), bn(x))  # inference unchanged until fine-tuned
    with pytest.raises(ConversionError, match="BatchNorm1d"):
        BatchRenorm2d.from_batchnorm(nn.BatchNorm1d(4))


def test_from_batchnorm_refuses_subclasses_that_change_behaviour():
    class BatchNormAct2d(nn.BatchNorm2d):  # timm look-alike; timm is not a dependency
        def __init__(self, c):
            super().__init__(c)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(super().forward(x))

    with pytest.raises(ConversionError, match="BatchNormAct2d"):
        BatchRenorm2d.from_batchnorm(BatchNormAct2d(3))


def test_train_path_without_tracking_leaves_buffers_and_step_alone():
    """What a scan's train path does: training=True with track_running_stats=False."""
    layer = BatchRenorm2d(3, hold_steps=0, r_max_steps=0, d_max_steps=0)
    layer.train()
    layer(torch.randn(4, 3, 2, 2))
    before = copy.deepcopy(layer.state_dict())
    layer.track_running_stats = False
    layer(torch.randn(4, 3, 2, 2) * 5)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key

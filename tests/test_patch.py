"""Conversions, exact recalibration, autopatch and patched-model files (normdoctor.patch)."""

from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normdoctor import scan
from normdoctor.errors import ConversionError, DataError
from normdoctor.patch import (
    BatchStatsNorm1d,
    BatchStatsNorm2d,
    InstanceNormFromBN2d,
    apply_manifest,
    autopatch,
    impact,
    load_patched,
    patch,
    recalibrate,
    revert,
    save_patched,
)
from normdoctor.renorm import BatchRenorm2d
from normdoctor.report import LayerStatus

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
if not (SAMPLES / "MANIFEST.json").exists():  # pragma: no cover - built by sample_models/build.py
    pytest.skip("sample models not built", allow_module_level=True)

from sample_models.truth import build_arch, load_split  # noqa: E402

MANIFEST = json.loads((SAMPLES / "MANIFEST.json").read_text())

#: Accuracy of our float32 runs against MANIFEST's float64 truth: one test sample either way,
#: since a float32 logit can flip an argmax whose top-2 margin is tiny (tiny-batch's smallest
#: margin is 9e-5, MANIFEST "eval_float32_min_top2_margin").
ONE_SAMPLE = 1 / 360

#: Recalibrated running statistics against float64 NumPy over the same float32 layer inputs.
#: The core accumulates per-sample sums in float32 after shifting by a per-channel constant
#: (relative error ~1e-7) and stores float32 buffers (rounding 6e-8): 1e-5 is the issue's bound.
RECAL_RTOL = 1e-5

#: float32 outputs of two kernels computing the same normalization (instance_norm against
#: batch_norm at batch size 1, or an exported graph against eager): a few ulps of logits ~10.
F32_ATOL = 1e-4

#: A float32 forward pass against a float64 evaluation of the same formula on O(1) values:
#: float32 rounding (~1e-7) through a handful of operations.
F32_FORMULA_TOL = 1e-5


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models and batch size 1: intra-op threads only add overhead (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def test_split():
    x, y = load_split("test")
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.fixture(scope="module")
def calib_split():
    x, y = load_split("calib")
    return torch.from_numpy(x), torch.from_numpy(y)


def load_sample(name: str) -> nn.Module:
    spec = MANIFEST["models"][name]
    model = build_arch(spec["arch"], spec["arch_kwargs"])
    model.load_state_dict(torch.load(SAMPLES / f"{name}.pt", weights_only=True))
    return model.eval()


def composition(name: str) -> dict:
    """The training-like scan composition that MANIFEST records for a sample model."""
    spec = MANIFEST["models"][name]
    kw: dict = {"batch_size": spec["train_batch_size"]}
    if spec["train_order"] == "class-sorted":
        kw.update(shuffle=False, group_by="label")
    return kw


def truth(name: str, key: str) -> float:
    return MANIFEST["models"][name]["truth"][key]["acc"]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def snapshot(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, type(m), m.training) for n, m in model.named_modules()],
    )


def assert_untouched(model: nn.Module, snap) -> None:
    state, modules = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert [(n, type(m), m.training) for n, m in model.named_modules()] == modules


class BatchNormAct2d(nn.BatchNorm2d):
    """Look-alike of timm's BatchNormAct2d (timm is not a dependency): BatchNorm computed with
    F.batch_norm in forward, then dropout, then the activation."""

    def __init__(self, num_features: int, drop: float = 0.0, act: bool = True) -> None:
        super().__init__(num_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else factor
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )
        return self.act(self.drop(x))


class ScaledBN(nn.BatchNorm2d):
    """A subclass whose forward is not 'BatchNorm, then children': must be refused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


class ActNet(nn.Module):
    def __init__(self, drop: float = 0.2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = BatchNormAct2d(4, drop=drop)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def trained(model: nn.Module, x: torch.Tensor, steps: int = 5, batch: int = 16) -> nn.Module:
    """Move the running statistics away from their initial values with train-mode passes."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(x[i * batch : (i + 1) * batch])
    return model.eval()


# ------------------------------------------------------------------- instance conversion


def test_instance_reproduces_tiny_batch_training(test_split):
    x, y = test_split
    model = load_sample("tiny-batch")
    snap = snapshot(model)
    patched = patch(model, "instance", data=x)
    assert_untouched(model, snap)
    assert all(
        isinstance(m, InstanceNormFromBN2d) for n, m in patched.named_modules() if "norm" in n
    )
    # Training behaviour: BatchNorm in train mode, one sample per batch (on a copy).
    expected = _per_sample_batch_stat_outputs(model, x)
    with torch.no_grad():
        got = patched.eval()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=F32_ATOL)
    acc = accuracy(patched, x, y)
    assert acc >= truth("tiny-batch", "acc_batchstats_trainlike") - ONE_SAMPLE
    assert acc > truth("tiny-batch", "acc_eval") + 0.5


def test_instance_for_batchnorm1d_on_nc_inputs_is_refused(test_split):
    x, _ = test_split
    model = load_sample("mlp-healthy")
    snap = snapshot(model)
    # With data, refused at conversion time, before anything changes (also inplace).
    with pytest.raises(ConversionError, match=r"'bn1'.*\(N, C\)"):
        patch(model, "instance", data=x, inplace=True)
    assert_untouched(model, snap)
    # Without data it cannot be known in advance: the first forward says so, naming the layer.
    converted = patch(model, "instance", layers="bn2")
    assert_untouched(model, snap)
    with pytest.raises(ConversionError, match=r"'bn2'.*\(N, C\)"):
        converted(x[:4])


# -------------------------------------------------------------------- batchstats conversion


def test_batchstats_uses_batch_statistics_and_never_touches_running_ones():
    torch.manual_seed(0)
    x = torch.randn(96, 1, 6, 6) * 2 + 0.5
    model = trained(
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 4)), x
    )
    patched = patch(model, "batchstats")
    layer = patched[1]
    assert isinstance(layer, BatchStatsNorm2d)
    kept = {k: v.clone() for k, v in layer.state_dict().items()}
    batch = x[:10]
    reference = copy.deepcopy(model)
    reference[1].train()
    reference[1].track_running_stats = False
    with torch.no_grad():
        expected = reference(batch)
        for mode in (True, False):  # identical in train and eval mode
            assert torch.equal(patched.train(mode)(batch), expected)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, kept[k]), k
    # The scan sees a layer that uses batch statistics in both modes: nothing to drift.
    report = scan(patched, x, batch_size=8)
    assert report.layer("1").status is LayerStatus.NOT_MEASURED


def test_batchstats_prior_blends_like_covariate_shift_adaptation():
    torch.manual_seed(1)
    bn = trained(nn.Sequential(nn.BatchNorm1d(5)), torch.randn(80, 5) * 3 + 1, batch=16)[0]
    n_prior = 16.0
    layer = patch(bn, "batchstats", prior=n_prior)
    assert isinstance(layer, BatchStatsNorm1d)
    for n in (1, 4):  # batch size 1 stays usable at inference
        batch = torch.randn(n, 5, dtype=torch.float64).float() * 2 - 1
        mu_b = batch.double().mean(0)
        var_b = batch.double().var(0, unbiased=False)
        mu = (n_prior * bn.running_mean.double() + n * mu_b) / (n_prior + n)
        var = (n_prior * bn.running_var.double() + n * var_b) / (n_prior + n)
        expected = (batch.double() - mu) / torch.sqrt(
            var + bn.eps
        ) * bn.weight.double() + bn.bias.double()
        with torch.no_grad():
            got = layer.eval()(batch)
        torch.testing.assert_close(
            got.double(), expected, rtol=F32_FORMULA_TOL, atol=F32_FORMULA_TOL
        )
    with pytest.raises(ConversionError, match="prior"):
        patch(bn, "batchstats", prior=-1)


# ---------------------------------------------------------------------------- recalibrate


def layer_inputs(model: nn.Module, x: torch.Tensor, names) -> dict[str, np.ndarray]:
    """Eval-mode inputs of the named layers, as float64 NumPy arrays."""
    modules = dict(model.named_modules())
    seen: dict[str, list] = {n: [] for n in names}
    handles = [
        modules[n].register_forward_pre_hook(
            lambda _m, args, n=n: seen[n].append(args[0].detach().double().numpy())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return {n: np.concatenate(v) for n, v in seen.items()}


def assert_exact_statistics(layer: nn.Module, inputs: np.ndarray) -> None:
    axes = (0, *range(2, inputs.ndim))
    mean = inputs.mean(axis=axes)
    var = inputs.var(axis=axes, ddof=1)  # unbiased, like BatchNorm's running_var
    np.testing.assert_allclose(layer.running_var.double().numpy(), var, rtol=RECAL_RTOL)
    # The mean relative to max(|mean|, std): a mean near 0 has no useful relative error, and a
    # float32 buffer holding a mean of 1e4 cannot be closer than its ulp (~1e-3, 1e-7 relative).
    scale = np.maximum(np.abs(mean), np.sqrt(var))
    err = np.abs(layer.running_mean.double().numpy() - mean) / scale
    assert err.max() < RECAL_RTOL


def test_recalibrate_equals_float64_statistics_of_layer_inputs(calib_split):
    x, _ = calib_split
    model = load_sample("stale")
    snap = snapshot(model)
    recal = recalibrate(
        model, x, batch_size=7
    )  # uneven batches: the result does not depend on them
    assert_untouched(model, snap)
    names = ["norm1", "norm2", "norm3"]
    # Each layer's statistics are those of its eval-mode input with the upstream layers already
    # recalibrated, i.e. of the inputs the final model feeds it.
    inputs = layer_inputs(recal, x, names)
    for n in names:
        layer = dict(recal.named_modules())[n]
        assert_exact_statistics(layer, inputs[n])
        assert int(layer.num_batches_tracked) == -(-len(x) // 7)  # batches seen
    other = recalibrate(model, x, batch_size=64)
    for k, v in recal.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(other.state_dict()[k], v, rtol=RECAL_RTOL, atol=0)


def test_recalibrate_is_exact_on_ill_conditioned_channels():
    """Channels whose mean is 10,000x their standard deviation (float32 inputs)."""
    gen = torch.Generator().manual_seed(0)
    c = 4
    mean = torch.tensor([1e4, -3e4, 5e3, 0.0])
    std = torch.tensor([1.0, 3.0, 0.5, 1.0])
    x = (
        torch.randn(300, c, 5, 5, generator=gen, dtype=torch.float64)
        * std.view(1, c, 1, 1).double()
        + mean.view(1, c, 1, 1).double()
    ).float()
    model = nn.Sequential(nn.BatchNorm2d(c)).eval()
    recal = recalibrate(model, x, batch_size=32)
    assert_exact_statistics(recal[0], x.double().numpy())
    # The test has teeth: float32 E[x^2] - E[x]^2 (fvcore's precise BN) is far off here.
    x32 = x.transpose(0, 1).reshape(c, -1)
    naive = (x32.square().mean(1) - x32.mean(1).square()).double()
    exact = torch.from_numpy(x.double().numpy().var(axis=(0, 2, 3), ddof=1))
    assert ((naive - exact).abs() / exact).max() > 1e-2


def test_single_pass_equals_float64_statistics_of_train_path_inputs(hot_path):
    # ScaledBN (a subclass with its own forward) must keep it.
    # Reference: what each layer sees when every upstream BatchNorm runs in train mode (batch
    # statistics), captured from real train-mode layers, then float64 NumPy over all batches.
    # single-pass normalizes plain BatchNorm layers with its own exact batch statistics through
    # the inference kernel instead; upstream outputs then differ from train mode by float32
    # rounding (~1e-7 relative), well inside RECAL_RTOL after three layers.
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3), ScaledBN(5), nn.ReLU(),
        nn.Conv2d(5, 4, 3), nn.BatchNorm2d(4),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=gen)
                m.running_var.uniform_(0.5, 2, generator=gen)
    x = torch.randn(70, 3, 12, 12, generator=gen) * 4 + 3
    names = ["1", "4", "7"]
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False
    modules = dict(ref_model.named_modules())
    chunks: dict[str, list] = {n: [] for n in names}
    for n in names:
        modules[n].register_forward_pre_hook(
            lambda _m, args, n=n: chunks[n].append(args[0].double().numpy())
        )
    with torch.no_grad():
        for batch in x.split(16):
            ref_model(batch)
    seen = {n: np.concatenate(v) for n, v in chunks.items()}
    snap = snapshot(model)
    recal = recalibrate(model, x, batch_size=16, shuffle=False, mode="single-pass")
    assert_untouched(model, snap)
    for n in names:
        assert_exact_statistics(dict(recal.named_modules())[n], seen[n])
    # Layer 7 sees ScaledBN's doubled output: had its forward been replaced, its statistics
    # would be off by a factor of 4 in variance.  No replacement is left behind.
    assert all("forward" not in m.__dict__ for m in recal.modules())


def test_recalibrate_recovers_the_stale_model(test_split, calib_split):
    model = load_sample("stale")
    acc_before = accuracy(model, *test_split)
    recal = recalibrate(model, calib_split[0])
    assert acc_before == pytest.approx(truth("stale", "acc_eval"), abs=ONE_SAMPLE)
    assert accuracy(recal, *test_split) == pytest.approx(
        truth("stale", "acc_recalibrated"), abs=ONE_SAMPLE
    )
    # single-pass (train path, like update_bn but exact): upstream normalized by batch statistics
    fast = recalibrate(model, calib_split[0], mode="single-pass", batch_size=64)
    assert accuracy(fast, *test_split) >= truth("stale", "acc_recalibrated") - 3 * ONE_SAMPLE


class Branchy(nn.Module):
    """A branch the data never takes (``aux`` runs only for 3-channel inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(1)
        self.aux = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.aux(x) if x.shape[1] == 3 else self.bn(x)


def test_recalibrate_errors_name_the_layer_and_leave_the_model_untouched(test_split):
    x, _ = test_split
    model = Branchy().eval()
    model.bn.train()  # mixed training flags must survive too
    snap = snapshot(model)
    with pytest.raises(DataError, match=r"needs data.*'bn'.*'aux'"):
        recalibrate(model, None)
    with pytest.raises(DataError, match="needs data"):
        patch(model, "recalibrate")
    for inplace in (False, True):
        with pytest.raises(DataError, match="'aux'"):
            recalibrate(model, x, inplace=inplace)
        assert_untouched(model, snap)
    with pytest.raises(ConversionError, match=r"'layer9\.\*'"):
        recalibrate(model, x, layers="layer9.*")
    assert_untouched(model, snap)
    # Excluding the branch works.
    done = recalibrate(model, x, layers="bn")
    assert not torch.equal(done.bn.running_var, model.bn.running_var)


# ------------------------------------------------------------------ subclasses, round trips


@pytest.mark.parametrize("to", ["renorm", "instance", "batchstats"])
def test_batchnorm_act_subclass_keeps_its_activation(to):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 5, 5) * 2 + 1
    model = trained(ActNet(drop=0.2), x)
    patched = patch(model, to)
    layer = patched.bn
    assert layer._post == ("drop", "act")  # timm's order: dropout, then activation
    with torch.no_grad():
        out = layer.eval()(model.conv(x[:8]))
    assert (out >= 0).all() and (out == 0).any()  # the ReLU is still there
    if to == "renorm":  # inference unchanged until fine-tuned
        with torch.no_grad():
            assert torch.equal(patched.eval()(x[:8]), model.eval()(x[:8]))
    back = revert(patched)
    assert type(back.bn) is BatchNormAct2d
    assert_untouched(back, snapshot(model))


def test_subclass_with_foreign_forward_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), ScaledBN(2))
    snap = snapshot(model)
    for to in ("renorm", "instance", "batchstats"):
        with pytest.raises(ConversionError, match=r"'1'.*ScaledBN"):
            patch(model, to, inplace=True)
        assert_untouched(model, snap)


@pytest.mark.parametrize("to", ["renorm", "instance", "batchstats"])
def test_round_trip_restores_state_dict_classes_and_flags(to, test_split):
    model = load_sample("healthy")
    model.norm2.train()  # a mixed-mode model: flags are carried per module
    snap = snapshot(model)
    patched = patch(model, to, prior=4.0) if to == "batchstats" else patch(model, to)
    assert patched.norm2.training and not patched.norm1.training
    assert [e["name"] for e in patched.normdoctor_conversions] == ["norm1", "norm2", "norm3"]
    back = revert(patched)
    assert_untouched(back, snap)
    assert back.normdoctor_conversions == []
    assert_untouched(model, snap)


def test_conversion_keeps_dtype_device_and_shared_modules():
    shared = nn.BatchNorm2d(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), shared, nn.Conv2d(2, 2, 1), shared).double()
    trained(model, torch.randn(32, 1, 3, 3, dtype=torch.float64), steps=2)
    patched = patch(model, "renorm")
    assert patched[1] is patched[3]  # converted once, still shared
    assert isinstance(patched[1], BatchRenorm2d)
    assert patched[1].weight.dtype == torch.float64
    assert patched[1].weight.device == model[1].weight.device
    assert model[1] is shared and type(shared) is nn.BatchNorm2d


def test_layer_selection_errors():
    model = load_sample("healthy")
    snap = snapshot(model)
    with pytest.raises(ConversionError, match="'nothing\\*' matches no normalization layer"):
        patch(model, "renorm", layers="nothing*")
    with pytest.raises(ConversionError, match="'conv1' matches no normalization layer"):
        patch(model, "instance", layers=["norm1", "conv1"])
    with pytest.raises(ConversionError, match="ScanReport"):
        patch(model, "auto")
    with pytest.raises(TypeError, match="unknown option 'prior'"):
        patch(model, "instance", prior=3)
    assert_untouched(model, snap)


def test_auto_applies_each_flagged_layer_recommendation(test_split, calib_split):
    stale = load_sample("stale")
    report = scan(stale, test_split, batch_size=64)
    assert {str(r.recommendation) for r in report.flagged_layers} == {"recalibrate"}
    with pytest.raises(DataError, match="needs data"):
        patch(stale, "auto", report)
    fixed = patch(stale, "auto", report, data=calib_split[0])
    assert fixed.normdoctor_conversions == []  # recalibration only writes running statistics
    assert accuracy(fixed, *test_split) > accuracy(stale, *test_split) + 0.3
    non_iid = load_sample("non-iid")
    report = scan(non_iid, test_split, **composition("non-iid"))
    assert [(r.name, str(r.recommendation)) for r in report.flagged_layers] == [("norm3", "renorm")]
    renormed = patch(non_iid, "auto", report)
    assert isinstance(renormed.norm3, BatchRenorm2d)
    with torch.no_grad():  # unchanged until fine-tuned
        assert torch.equal(renormed.eval()(test_split[0]), non_iid.eval()(test_split[0]))


# ------------------------------------------------------------------- impact and autopatch


def test_impact_ranks_the_layer_that_breaks_tiny_batch_first(test_split):
    x, y = test_split
    ranking = impact(load_sample("tiny-batch"), (x[:90], y[:90]), batch_size=1)
    assert ranking[0][0] == "norm3"
    assert all(change > 0 for _, change in ranking)


@pytest.mark.parametrize("name", ["tiny-batch", "non-iid", "stale", "mlp-non-iid"])
def test_autopatch_fixes_each_pathological_sample_model(name, test_split, calib_split):
    model = load_sample(name)
    snap = snapshot(model)
    _, before, after = autopatch(model, test_split, calib_data=calib_split[0], **composition(name))
    assert_untouched(model, snap)
    assert before.flagged
    for layer in before.flagged_layers:
        now = after.layer(layer.name)
        if now.status is LayerStatus.NOT_MEASURED:
            # Converted to a layer with the same statistics in train and eval mode
            # (InstanceNorm, batch statistics): its drift is zero by construction.
            assert not now.batch_dependent
        else:
            assert now.drift < layer.drift, layer.name
    assert after.end_to_end.acc_eval > before.end_to_end.acc_eval + 0.3
    assert not after.flagged


def test_autopatch_changes_nothing_on_the_healthy_model(test_split):
    model = load_sample("healthy")
    patched, before, after = autopatch(model, test_split, **composition("healthy"))
    assert not before.flagged and after is before
    assert patched is not model
    assert_untouched(patched, snapshot(model))


def test_autopatch_minimal_reproduces_training_as_well_as_the_full_fix(test_split):
    model = load_sample("tiny-batch")
    x, y = test_split[0][:120], test_split[1][:120]
    full, _, _ = autopatch(model, (x, y), batch_size=1)
    small, _, after = autopatch(model, (x, y), batch_size=1, minimal=True)
    assert len(small.normdoctor_conversions) < len(full.normdoctor_conversions)
    assert any(n.startswith("minimal fix") for n in after.notes)
    # The contract: eval-mode predictions match training-mode ones (batch statistics, one
    # sample per batch) at least as often as with every flagged layer fixed.
    reference = _per_sample_batch_stat_outputs(model, x).argmax(1)
    with torch.no_grad():
        agree_full = (full.eval()(x).argmax(1) == reference).double().mean()
        agree_small = (small.eval()(x).argmax(1) == reference).double().mean()
    assert agree_small >= agree_full


def test_autopatch_leaves_a_model_alone_when_eval_mode_is_right(test_split):
    """A wrong fix does harm: scanned at batch size 1 (trained with batches of 64), the healthy
    model's batch statistics give 10.8% and eval mode 98.1%.  Eval mode is the right path, so
    nothing is patched (InstanceNorm would give 10.8%, MANIFEST: healthy acc_instancenorm)."""
    x, y = test_split
    model = load_sample("healthy")
    patched, before, after = autopatch(model, (x, y), batch_size=1, max_batches=120)
    assert not before.status.harmful and after is before
    assert before.end_to_end.acc_train < before.end_to_end.acc_eval - 0.5
    assert accuracy(patched, x, y) == pytest.approx(accuracy(model, x, y), abs=0.0)


def test_verify_patch_measures_a_wrong_fix_as_worse(test_split):
    """An explicit InstanceNorm patch of the healthy model measures worse, on the same samples,
    than the original: accuracies measured independently here."""
    from normdoctor.patch import verify_patch

    x, y = test_split
    model = load_sample("healthy")
    report = scan(model, (x, y), batch_size=64, search=False)
    wrong = patch(model, "instance")
    check = verify_patch(model, wrong, (x, y), report)
    assert not check.ok and check.metric == "accuracy"
    assert check.before == pytest.approx(accuracy(model, x, y), abs=ONE_SAMPLE)
    assert check.after == pytest.approx(accuracy(wrong, x, y), abs=ONE_SAMPLE)
    right = patch(load_sample("tiny-batch"), "instance")
    tiny = scan(load_sample("tiny-batch"), (x, y))
    assert verify_patch(load_sample("tiny-batch"), right, (x, y), tiny).ok


def rerun_counter(monkeypatch) -> list[str]:
    """The paths autopatch's verification runs again itself (``path_outcomes`` calls)."""
    auto = importlib.import_module("normdoctor.patch.auto")  # the module (patch binds a function)
    calls: list[str] = []
    original = auto.path_outcomes

    def counted(model, data, path, **kw):
        calls.append(path)
        return original(model, data, path, **kw)

    monkeypatch.setattr(auto, "path_outcomes", counted)
    return calls


def test_autopatch_verifies_with_the_passes_its_scans_ran(test_split, monkeypatch):
    """The default autopatch (composition search) takes the original's eval pass from its scan
    and the patched model's from the second scan: no pass run again, and the verification
    equals verify_patch's, which runs both; the accuracies are checked independently."""
    from normdoctor.patch import verify_patch

    x, y = test_split[0][:120], test_split[1][:120]
    model = load_sample("tiny-batch")
    snap = snapshot(model)
    reruns = rerun_counter(monkeypatch)
    patched, before, after = autopatch(model, (x, y))
    assert reruns == []
    assert_untouched(model, snap)
    check = patched.normdoctor_verification
    assert check == verify_patch(model, patched, (x, y), before)
    assert reruns == ["eval", "eval"]  # verify_patch itself ran both passes
    assert check.metric == "accuracy" and check.samples == 120
    assert check.before == pytest.approx(accuracy(model, x, y), abs=1 / 120)
    assert check.after == pytest.approx(accuracy(patched, x, y), abs=1 / 120)
    assert f"verified: {check.text}" in after.notes


def test_autopatch_without_labels_reuses_the_original_train_path(test_split, monkeypatch):
    """Without labels the verification also needs the original's train path: the stated
    composition's scan ran it; agreements equal verify_patch's and an independent count."""
    from normdoctor.patch import verify_patch

    x = test_split[0][:120]
    model = load_sample("tiny-batch")
    reruns = rerun_counter(monkeypatch)
    patched, before, _ = autopatch(model, x, train_batch_size=1)
    assert reruns == []
    check = patched.normdoctor_verification
    assert check.metric == "agreement"
    assert check == verify_patch(model, patched, x, before)
    reference = _per_sample_batch_stat_outputs(model, x).argmax(1)
    with torch.no_grad():
        agree_before = float((model.eval()(x).argmax(1) == reference).double().mean())
        agree_after = float((patched.eval()(x).argmax(1) == reference).double().mean())
    assert check.before == pytest.approx(agree_before, abs=1 / 120)
    assert check.after == pytest.approx(agree_after, abs=1 / 120)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("stale", {"max_batches": 3}),  # the search over the samples of 3 batches of 32
        ("non-iid", {"batch_size": 32, "group_by": "label", "search": False}),
    ],
)
def test_autopatch_reuse_holds_for_subsets_and_one_label_batches(
    name, options, test_split, calib_split, monkeypatch
):
    from normdoctor.patch import verify_patch

    x, y = test_split
    model = load_sample(name)
    reruns = rerun_counter(monkeypatch)
    patched, before, _ = autopatch(model, (x, y), calib_data=calib_split[0], **options)
    assert reruns == []
    check = patched.normdoctor_verification
    assert check.samples == (96 if "max_batches" in options else 360)
    assert check == verify_patch(
        model, patched, (x, y), before, max_batches=options.get("max_batches")
    )


# ------------------------------------------------------------------------- save and load


def test_save_and_reload_patched_model(tmp_path, test_split):
    x, _ = test_split
    model = load_sample("tiny-batch")
    patched = patch(
        patch(model, "instance", layers=["norm1", "norm2"]), "batchstats", layers="norm3", prior=8.0
    )
    path = save_patched(patched, tmp_path / "fixed.pt")
    assert sorted(os.listdir(tmp_path)) == ["fixed.pt"]  # no temp file left behind
    saved = torch.load(path, weights_only=True)
    assert saved["normdoctor_patch"] == {
        "version": 1,
        "conversions": [
            {"name": "norm1", "to": "instance", "options": {}},
            {"name": "norm2", "to": "instance", "options": {}},
            {"name": "norm3", "to": "batchstats", "options": {"prior": 8.0}},
        ],
    }
    fresh = build_arch(MANIFEST["models"]["tiny-batch"]["arch"])
    rebuilt = apply_manifest(fresh, saved["normdoctor_patch"])
    rebuilt.load_state_dict(saved["state_dict"])
    loaded = load_patched(path, build_arch(MANIFEST["models"]["tiny-batch"]["arch"]))
    with torch.no_grad():
        expected = patched.eval()(x)
        assert torch.equal(rebuilt.eval()(x), expected)
        assert torch.equal(loaded.eval()(x), expected)
    assert_untouched(revert(loaded), snapshot(model))
    # The original BatchNorm checkpoint also loads into the patched architecture.
    from_original = apply_manifest(build_arch(MANIFEST["models"]["tiny-batch"]["arch"]), saved)
    from_original.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(from_original.eval()(x), expected)


def test_save_refuses_to_overwrite_the_input(tmp_path):
    source = tmp_path / "model.pt"
    model = load_sample("healthy")
    torch.save(model.state_dict(), source)
    before = source.read_bytes()
    with pytest.raises(Exception, match="refusing to overwrite"):
        save_patched(patch(model, "renorm"), source, source=source)
    assert source.read_bytes() == before


def test_manifest_that_does_not_fit_is_refused():
    model = load_sample("healthy")
    snap = snapshot(model)
    cases = {
        "missing": ([{"name": "layer4.bn", "to": "instance", "options": {}}], "'layer4.bn'"),
        "wrong kind": ([{"name": "conv1", "to": "instance", "options": {}}], "'conv1'.*Conv2d"),
        "unknown conversion": ([{"name": "norm1", "to": "groupnorm"}], "'norm1'.*groupnorm"),
        "bad option": ([{"name": "norm1", "to": "batchstats", "options": {"alpha": 1}}], "alpha"),
    }
    for conversions, pattern in cases.values():
        with pytest.raises(ConversionError, match=pattern):
            apply_manifest(model, {"version": 1, "conversions": conversions}, inplace=True)
        assert_untouched(model, snap)
    with pytest.raises(ConversionError, match="version"):
        apply_manifest(model, {"version": 99, "conversions": []})


# ---------------------------------------------------------------------------------- export


@pytest.mark.parametrize("to", ["instance", "batchstats"])
def test_torch_export_of_patched_model(to, test_split):
    x, _ = test_split
    patched = patch(load_sample("tiny-batch"), to).eval()
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(patched, (x[:8],), dynamic_shapes=({0: batch},))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x[:20]), patched(x[:20]), rtol=0, atol=F32_ATOL)


@pytest.mark.onnx
@pytest.mark.parametrize("to", ["instance", "batchstats"])
def test_onnx_export_of_patched_model(to, test_split, recwarn):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    x, _ = test_split
    patched = patch(load_sample("tiny-batch"), to).eval()
    batch = torch.export.Dim("batch", min=2)
    program = torch.onnx.export(patched, (x[:8],), dynamo=True, dynamic_shapes=({0: batch},))
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    out = session.run(None, {session.get_inputs()[0].name: x[:20].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, patched(x[:20]).numpy(), rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", [True, False])
def test_instance_fast_path_at_batch_size_one_equals_instance_norm(dim, dtype, affine):
    """At N = 1 the converted layer runs BatchNorm's train-mode kernel (faster on CPU); it must
    equal F.instance_norm, outputs and gradients, to the dtype's rounding (float32: a few ulp
    of values of order 1 -> 1e-5; float64: 1e-12)."""
    from normdoctor.patch import InstanceNormFromBN1d, InstanceNormFromBN2d, InstanceNormFromBN3d

    cls = {1: InstanceNormFromBN1d, 2: InstanceNormFromBN2d, 3: InstanceNormFromBN3d}[dim]
    gen = torch.Generator().manual_seed(dim)
    layer = cls(6, eps=1e-3, affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            layer.weight.copy_(torch.rand(6, generator=gen, dtype=dtype) + 0.5)
            layer.bias.copy_(torch.randn(6, generator=gen, dtype=dtype))
    for n in (1, 3):  # the fast path and the InstanceNorm path
        x = (torch.randn(n, 6, *[5] * dim, generator=gen, dtype=dtype) * 3 + 2).requires_grad_()
        y = layer(x)
        x_ref = x.detach().clone().requires_grad_()
        ref = torch.nn.functional.instance_norm(
            x_ref, None, None, layer.weight, layer.bias, True, 0.0, layer.eps
        )
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
        g = torch.randn(y.shape, generator=gen, dtype=dtype)
        (grad,) = torch.autograd.grad(y, x, g)
        (grad_ref,) = torch.autograd.grad(ref, x_ref, g)
        torch.testing.assert_close(grad, grad_ref, rtol=10 * tol, atol=10 * tol)


def _per_sample_batch_stat_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What training did at batch size 1: outputs with batch statistics, one sample per batch
    (on a copy of the model; running statistics untouched)."""
    train_like = copy.deepcopy(model)
    for m in train_like.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False
    with torch.no_grad():
        return torch.cat([train_like(x[i : i + 1]) for i in range(len(x))])

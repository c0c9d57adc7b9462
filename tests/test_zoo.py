"""Every zoo model (tests/zoo) through one generic suite: discovery, scans, patches, reverts.

Each case states by hand which norm layers its model holds and how each normalizes; the suite
checks discovery against that count, scans at batch sizes 1 and 2 (state bit-identical after,
pooled statistics against a float64 reference computed from the raw layer inputs), every
patch (converted, or refused with a NormDoctorError and the model untouched) and its revert.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import pytest
import torch
from torch import nn
from zoo import CASES, ZooCase, eager

from normdoctor import find_norm_layers, scan
from normdoctor.errors import ConversionError, NormDoctorError
from normdoctor.layers import NormFamily
from normdoctor.metrics import Recommendation
from normdoctor.patch import TARGETS, autopatch, patch, recalibrate, revert
from normdoctor.report import LayerStatus

#: Families a scan measures (the zoo states families by their values, independently).
MEASURED = {"batch", "frozen", "instance_tracked"}
#: Families with running statistics that a scan does not measure (yet).
RUNNING_ONLY = {"batch_var", "batch_other"}
#: Families the train path switches to batch statistics (frozen layers have no such mode).
SWITCHED = {"batch", "instance_tracked"}

#: Pooled statistics of the scan against float64 moments of the same layer inputs: the core
#: sums float32 copies shifted by a per-channel constant (relative error ~1e-7 on 64 to 1024
#: values per channel); half-precision inputs convert to float32 exactly.
POOLED_RTOL = 1e-5
POOLED_ATOL = 1e-6

BY_ID = {case.id: case for case in CASES}


def cases(*, where=lambda case: True):
    return [pytest.param(case, id=case.id) for case in CASES if where(case)]


@functools.cache
def _built(case_id: str) -> nn.Module:
    return BY_ID[case_id].model()


def model_of(case: ZooCase) -> nn.Module:
    """A fresh copy of the case's model (compiled models are built once: ~1 s each)."""
    return copy.deepcopy(_built(case.id))


# ---------------------------------------------------------------------------- state snapshots


def _plain(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, tuple))


def snapshot(model: nn.Module) -> list:
    """Everything a scan or a refused patch must leave exactly as it was."""
    out = []
    for name, m in model.named_modules(remove_duplicate=False):
        tensors = [
            (kind, k, id(t), None if t is None else (t.dtype, t.detach().clone(), t.requires_grad))
            for kind, d in (("p", m._parameters), ("b", m._buffers))
            for k, t in d.items()
        ]
        attrs = {k: v for k, v in vars(m).items() if not k.startswith("_") and _plain(v)}
        hooks = (len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks))
        out.append((name, type(m), m.training, sorted(vars(m)), attrs, hooks, tensors))
    return out


def assert_same_state(before: list, after: list) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert a[:6] == b[:6], a[0]
        for ta, tb in zip(a[6], b[6], strict=True):
            assert ta[:3] == tb[:3], (a[0], ta[1])
            if ta[3] is not None:
                assert ta[3][0] == tb[3][0] and ta[3][2] == tb[3][2], (a[0], ta[1])
                assert torch.equal(ta[3][1], tb[3][1]), (a[0], ta[1])


def state_of(model: nn.Module) -> tuple:
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
    )


def assert_same_model(a: tuple, b: tuple) -> None:
    assert a[1] == b[1]
    assert list(a[0]) == list(b[0])
    for k, v in a[0].items():
        assert v.dtype == b[0][k].dtype and torch.equal(v, b[0][k]), k


# --------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("case", cases())
def test_discovery_matches_the_hand_count(case):
    model = model_of(case)
    found = {layer.name: str(layer.family) for layer in find_norm_layers(model)}
    assert found == case.layers
    for layer in find_norm_layers(model):
        assert layer.num_features > 0 or layer.family is NormFamily.LOCAL_RESPONSE, layer.name
        assert layer.batch_dependent == (str(layer.family) in MEASURED), layer.name


# ------------------------------------------------------------------------------------- scans


def _one_value_per_channel(x: torch.Tensor) -> bool:
    return x.numel() // x.shape[1] == 1


def reference_inputs(case: ZooCase, model: nn.Module, batch_size: int, path: str) -> dict:
    """Each measured layer's inputs on ``path``, from a plain copy of the model run by hand:
    eval mode, and on the train path the batch-dependent layers (from the case's own count)
    normalizing with batch statistics, except calls with one value per channel."""
    m = copy.deepcopy(eager(model)).eval()
    prefix = "_orig_mod." if m is not model else ""
    modules = dict(m.named_modules())
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []

    def capture(name: str, switch: bool):
        def pre(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, []).append(args[0].detach().to(torch.float64))
            if switch:
                module.training = not _one_value_per_channel(args[0])

        return pre

    for name, family in case.layers.items():
        if family not in MEASURED:
            continue
        module = modules[name.removeprefix(prefix)]
        switch = path == "train" and family in SWITCHED
        if switch:
            module.track_running_stats = False
        hooks.append(module.register_forward_pre_hook(capture(name, switch)))
    x = case.inputs()
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            m(x[i : i + batch_size])
    for h in hooks:
        h.remove()
    return seen


def pooled64(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in inputs], dim=1)
    return flat.mean(1), flat.var(1, correction=0)


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("case", cases())
def test_scan_restores_state_and_pools_exactly(case, batch_size):
    model = model_of(case)
    x = case.inputs()
    before = snapshot(model)
    rng = torch.get_rng_state()
    report = scan(model, x, batch_size=batch_size, shuffle=False)
    assert_same_state(before, snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())

    layers = {layer.name: layer for layer in report.layers}
    assert set(layers) == set(case.layers)
    for name, family in case.layers.items():
        r = layers[name]
        assert r.family == family
        if family not in MEASURED:
            assert r.status is LayerStatus.NOT_MEASURED, name
        elif name in case.unused:
            assert r.status is LayerStatus.NOT_EXECUTED, name
        elif batch_size == 1 and name in case.pooled:
            assert r.status is LayerStatus.NOT_MEASURABLE, name
            assert r.train is None and r.eval is not None, name
        else:
            assert r.train is not None and r.eval is not None, name
            assert r.drift is not None and math.isfinite(r.drift), name

    for path in ("train", "eval"):
        reference = reference_inputs(case, model, batch_size, path)
        for name, inputs in reference.items():
            measured = getattr(layers[name], path)
            if path == "train" and batch_size == 1 and name in case.pooled:
                assert measured is None, name
                continue
            mean, var = pooled64(inputs)
            torch.testing.assert_close(
                torch.tensor(measured.pooled_mean, dtype=torch.float64),
                mean,
                rtol=POOLED_RTOL,
                atol=POOLED_ATOL,
                msg=lambda m, name=name, path=path: f"{name} {path} mean: {m}",
            )
            torch.testing.assert_close(
                torch.tensor(measured.pooled_var, dtype=torch.float64),
                var,
                rtol=POOLED_RTOL,
                atol=POOLED_ATOL,
                msg=lambda m, name=name, path=path: f"{name} {path} var: {m}",
            )
            assert measured.samples == sum(t.shape[0] for t in inputs), name

    # Whatever the scan recommends, patch applies (or the report flags nothing to apply).
    if report.flagged_layers:
        patched = patch(model, to="auto", layers=report, data=x)
        assert_same_state(before, snapshot(model))
        with torch.no_grad():
            assert torch.isfinite(patched.eval()(x).float()).all()


# ----------------------------------------------------------------------------------- patches


def convertible(case: ZooCase, name: str, to: str) -> bool:
    """What patch(to=..., layers=[name]) should do, from the case's own description."""
    family = case.layers[name]
    if to == "recalibrate":
        return family in MEASURED and name not in case.unused
    if family == "instance_tracked":
        return to == "instance"
    if family not in ("batch", "batch_stats_only"):
        return False
    return not (to == "instance" and name in case.pooled)


def default_layers(case: ZooCase, to: str) -> list[str]:
    """What patch(to=...) with layers=None selects (every one, or the call refuses)."""
    if to == "recalibrate":  # every layer with running statistics
        return [n for n, f in case.layers.items() if f in MEASURED | RUNNING_ONLY]
    return [
        n
        for n, f in case.layers.items()
        if f == "batch" or (to == "instance" and f == "instance_tracked")
    ]


def _check_patch(case: ZooCase, model: nn.Module, to: str, layers, expect_ok: bool) -> None:
    x = case.inputs()
    before = snapshot(model)
    original = state_of(model)
    try:
        patched = patch(model, to=to, layers=layers, data=x)
    except NormDoctorError as exc:
        assert_same_state(before, snapshot(model))
        assert not expect_ok, f"{to} {layers}: refused: {exc}"
        return
    assert_same_state(before, snapshot(model))
    assert expect_ok, f"{to} {layers}: converted, expected a refusal"
    with torch.no_grad():
        out = patched.eval()(x)
    assert out.shape[0] == x.shape[0] and torch.isfinite(out.float()).all()
    back = revert(patched)
    if to == "recalibrate":  # nothing structural to undo; only running statistics changed
        assert state_of(back)[1] == original[1]
        return
    assert_same_model(state_of(back), original)


@pytest.mark.parametrize("to", TARGETS)
@pytest.mark.parametrize("case", cases())
def test_patch_each_layer_converts_or_refuses_and_reverts(case, to):
    model = model_of(case)
    for name in case.layers:
        _check_patch(case, model, to, [name], convertible(case, name, to))


@pytest.mark.parametrize("to", TARGETS)
@pytest.mark.parametrize("case", cases())
def test_patch_default_selection_converts_every_layer_or_refuses(case, to):
    model = model_of(case)
    chosen = default_layers(case, to)
    ok = all(convertible(case, n, to) for n in chosen)
    _check_patch(case, model, to, None, ok)


#: What the scan can recommend for a measured layer (metrics.recommend): recalibrate always;
#: instance for per-sample batches with spatial dims; renorm for per-sample batches without them
#: or correlated batches; batchstats otherwise.  A frozen layer never used batch statistics, so
#: the only fix that applies to it is recalibration (what the scan must restrict itself to).
def recommendable(case: ZooCase, name: str) -> list[str]:
    family = case.layers[name]
    if family == "frozen":
        return ["recalibrate"]
    if family == "instance_tracked":
        return ["recalibrate", "instance"]  # its units are samples, always with spatial dims
    spatial = name not in case.pooled
    return ["recalibrate", "batchstats", "renorm"] + (["instance"] if spatial else [])


@pytest.mark.parametrize(
    "case", cases(where=lambda c: any(f in MEASURED for f in c.layers.values()))
)
def test_every_recommendation_the_scan_can_make_applies(case):
    """Each (layer, recommendation) the scan can produce is among the patches that the test
    above proves to convert; the scan test applies the recommendations it actually made."""
    for name, family in case.layers.items():
        if family in MEASURED and name not in case.unused:
            for to in recommendable(case, name):
                assert convertible(case, name, to), (name, to)


# ------------------------------------------------------------------------ items of issue 14


def test_frozen_bn_act_is_measured_and_recalibrated():
    case = BY_ID["frozen-bn-act-dropout"]
    model, x = model_of(case), case.inputs()
    report = scan(model, x, batch_size=2, shuffle=False)
    assert [r.family for r in report.layers] == ["frozen", "frozen"]
    assert all(r.eval is not None and r.train is not None for r in report.layers)
    fixed = recalibrate(model, x, batch_size=2)
    assert [type(m) for m in fixed.modules()] == [type(m) for m in model.modules()]
    first = eager(fixed).features[1]
    mean, var = pooled64(reference_inputs(case, model, 4, "eval")["features.1"])
    torch.testing.assert_close(first.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    n = 4 * 8 * 8
    torch.testing.assert_close(first.running_var.double(), var * n / (n - 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConversionError, match="frozen"):
        patch(model, to="batchstats", layers=["features.1"])


def test_evonorm_and_frn_are_listed_with_what_they_depend_on():
    b0 = {layer.name: layer for layer in find_norm_layers(model_of(BY_ID["evonorm-b0"]))}
    assert {layer.family for layer in b0.values()} == {NormFamily.BATCH_VAR}
    assert all(layer.track_running_stats and layer.momentum == 0.1 for layer in b0.values())
    for case_id in ("evonorm-s0", "filter-response-norm"):
        layers = find_norm_layers(model_of(BY_ID[case_id]))
        assert layers and all(layer.family is NormFamily.PER_SAMPLE for layer in layers)
        assert not any(layer.batch_dependent for layer in layers)


def test_classification_runs_nothing_it_does_not_restore():
    model = model_of(BY_ID["evonorm-b0"])
    model.features[1].train()  # mixed modes: kept as they are
    before = snapshot(model)
    rng = torch.get_rng_state()
    find_norm_layers(copy.deepcopy(model))  # a fresh object: the check runs again
    find_norm_layers(model)
    assert_same_state(before, snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("to", ["renorm", "instance", "batchstats"])
def test_sync_batchnorm_converts_with_its_rank_from_data_or_dim(to):
    case = BY_ID["sync-bn"]
    model, x = model_of(case), case.inputs()
    before = snapshot(model)
    with pytest.raises(ConversionError, match="dim=1, 2 or 3"):
        patch(model, to=to)  # rank unknown: refused before any change
    assert_same_state(before, snapshot(model))
    patched = patch(model, to=to, layers=["stem.1"], data=x)
    assert type(patched.stem[1]).__name__.endswith("2d")
    entry = patched.normdoctor_conversions[0]
    assert entry["options"]["dim"] == 2
    by_dim = patch(model, to=to, layers=["stem.1"], dim=2)
    with torch.no_grad():
        torch.testing.assert_close(by_dim.eval()(x), patched.eval()(x))
    back = revert(patched)
    assert type(back.stem[1]) is nn.SyncBatchNorm
    assert_same_model(state_of(back), state_of(model))
    if to != "instance":  # the (N, C) head: 1d from its first input
        head = patch(model, to=to, layers=["bn_head"], data=x)
        assert type(head.bn_head).__name__.endswith("1d")
    with pytest.raises(ConversionError, match="dim must be 1, 2 or 3"):
        patch(model, to=to, layers=["stem.1"], dim=4)


def test_sync_batchnorm_manifest_rebuilds_the_conversion(tmp_path):
    from normdoctor.patch import load_patched, save_patched

    case = BY_ID["sync-bn"]
    model, x = model_of(case), case.inputs()
    patched = patch(model, to="batchstats", data=x)
    path = save_patched(patched, tmp_path / "p.pt")
    loaded = load_patched(path, model_of(case))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in patched.modules()]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), patched(x))


def test_instance_tracked_recalibrate_recommendation_is_applied():
    """Item 4: a tracked InstanceNorm with stale statistics is flagged 'recalibrate'; patch
    (auto, and recalibrate by default) and autopatch apply it: pooled statistics written."""
    case = BY_ID["instance-tracked"]
    model = model_of(case)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 8, 8, generator=gen) * 1.5 + 0.3
    per_sample = copy.deepcopy(model)  # what training computed: each sample on its own
    per_sample.features[1].track_running_stats = False
    per_sample.features[1].running_mean = per_sample.features[1].running_var = None
    with torch.no_grad():
        y = per_sample(x).argmax(1)
    report = scan(model, (x, y), batch_size=2, shuffle=False)
    (layer,) = report.layers
    assert layer.flagged and layer.recommendation is Recommendation.RECALIBRATE, layer.reason
    seen = {
        "features.1": [model.features[0](x[i : i + 2]).detach().double() for i in range(0, 32, 2)]
    }
    mean, var = pooled64(seen["features.1"])
    n = x.shape[0] * 8 * 8
    for fixed in (
        patch(model, to="auto", layers=report, data=x),
        patch(model, to="recalibrate", data=x),
        autopatch(model, (x, y), batch_size=2, shuffle=False)[0],
    ):
        norm = fixed.features[1]
        assert type(norm) is nn.InstanceNorm2d and norm.track_running_stats
        torch.testing.assert_close(norm.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            norm.running_var.double(), var * n / (n - 1), rtol=1e-5, atol=1e-6
        )
        assert int(norm.num_batches_tracked) == 1  # one call: recalibrate's one batch of 32
    after = scan(fixed, (x, y), batch_size=2, shuffle=False).layers[0]
    assert after.shift < 1e-3 < layer.shift


def test_scan_recommends_only_recalibration_for_frozen_layers():
    case = BY_ID["half-frozen"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 8, 8, generator=gen) * 1.5 + 0.3
    # Frozen statistics that fit the data: what is left at batch size 1 is per-sample noise,
    # which the frozen layer never saw in training (it normalizes with these statistics).
    model = recalibrate(model_of(case), x, layers=["features.1"])
    train_path = copy.deepcopy(model)
    train_path.features[2][1].train().track_running_stats = False
    with torch.no_grad():
        y = torch.cat([train_path(x[i : i + 1]).argmax(1) for i in range(len(x))])
    report = scan(model, (x, y), batch_size=1, shuffle=False)
    frozen = next(r for r in report.layers if r.family == "frozen")
    assert frozen.recommendation in (Recommendation.OK, Recommendation.RECALIBRATE), frozen.reason
    patch(model, to="auto", layers=report, data=x)


def test_static_checks_read_layers_with_running_var_only():
    model = model_of(BY_ID["evonorm-b0"])
    with torch.no_grad():
        model.features[1].running_var[1] = -0.5
    from normdoctor.checks import static_checks

    for source in (model, model.state_dict()):
        codes = {(f.layer, f.code) for f in static_checks(source)}
        assert ("features.1", "running-var-nonpositive") in codes
        assert not any(layer == "features.3" for layer, _ in codes)


def _unmaterialized() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.LazyBatchNorm2d(), nn.ReLU()).eval()


@pytest.mark.parametrize("to", TARGETS)
def test_unmaterialized_lazy_bn_is_refused_before_any_change(to):
    model = _unmaterialized()
    with pytest.raises(ConversionError, match="lazy LazyBatchNorm2d that never ran"):
        patch(model, to=to, data=torch.randn(4, 3, 8, 8))
    assert type(model[1]) is nn.LazyBatchNorm2d and model[1].has_uninitialized_params()


def test_scan_of_unmaterialized_lazy_bn_refuses_or_leaves_it_lazy():
    model = _unmaterialized()
    with contextlib.suppress(NormDoctorError):
        scan(model, torch.randn(4, 3, 8, 8), batch_size=2, shuffle=False)
    assert type(model[1]) is nn.LazyBatchNorm2d and model[1].has_uninitialized_params()

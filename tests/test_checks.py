"""normdoctor.checks: data-free findings from stored numbers, on modules and state_dicts."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from normdoctor.checks import (
    DEAD_GAMMA_RTOL,
    EXPLOSIVE_GAIN,
    Finding,
    Severity,
    static_checks,
    static_checks_for,
    stored_norm_layers,
)
from normdoctor.io import load_checkpoint
from normdoctor.layers import NormFamily, find_norm_layers

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def _trained_bn(cls=nn.BatchNorm2d, c: int = 4, **kwargs) -> nn.Module:
    """A norm layer whose statistics look trained (not at their initial values)."""
    bn = cls(c, **kwargs)
    with torch.no_grad():
        if getattr(bn, "running_mean", None) is not None:
            bn.running_mean.copy_(torch.linspace(-0.5, 0.5, c))
            bn.running_var.copy_(torch.linspace(0.5, 2.0, c))
            bn.num_batches_tracked.fill_(100)
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(torch.linspace(0.5, 1.5, c))
            bn.bias.copy_(torch.linspace(-0.1, 0.1, c))
    return bn


def _net(layer: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, layer_channels(layer), 3), layer)


def layer_channels(layer: nn.Module) -> int:
    return int(getattr(layer, "num_features", 4))


def _codes(findings: list[Finding]) -> dict[str, Finding]:
    return {f.code: f for f in findings}


def _both(model: nn.Module) -> list[list[Finding]]:
    """The findings on the module and on its state_dict (for the checks both support)."""
    return [static_checks(model), static_checks(model.state_dict())]


# ------------------------------------------------------------------------------- healthy


def test_trained_layers_give_no_findings():
    model = _net(_trained_bn())
    for findings in _both(model):
        assert findings == []


def test_healthy_sample_model_is_clean():
    if not (SAMPLES / "healthy.pt").exists():
        pytest.skip("sample models not built")
    ckpt = load_checkpoint(SAMPLES / "healthy.pt")
    findings = static_checks_for(ckpt)
    assert [f for f in findings if f.severity is not Severity.INFO] == []


def test_layers_without_running_stats_are_not_checked():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.LayerNorm([4, 6, 6]))
    assert static_checks(model) == []
    assert static_checks(model.state_dict()) == []


# --------------------------------------------------------------------------- corrupt stats


@pytest.mark.parametrize(
    "value, code",
    [
        (-0.5, "running-var-nonpositive"),
        (0.0, "running-var-nonpositive"),
        (math.nan, "running-stats-nonfinite"),
        (math.inf, "running-stats-nonfinite"),
    ],
    ids=["negative", "zero", "nan", "inf"],
)
def test_degenerate_running_var_is_an_error(value, code):
    bn = _trained_bn()
    with torch.no_grad():
        bn.running_var[2] = value
    for findings in _both(_net(bn)):
        found = _codes(findings)[code]
        assert found.severity is Severity.ERROR
        assert found.channels == (2,)
        assert found.layer == "1"


def test_nan_running_mean_and_gamma_are_errors():
    bn = _trained_bn()
    with torch.no_grad():
        bn.running_mean[0] = math.nan
        bn.weight[3] = math.inf
    for findings in _both(_net(bn)):
        codes = _codes(findings)
        assert codes["running-stats-nonfinite"].channels == (0,)
        assert codes["affine-nonfinite"].channels == (3,)
        assert codes["affine-nonfinite"].severity is Severity.ERROR


def test_explosive_gain_needs_tiny_var_and_large_gamma():
    bn = _trained_bn()
    with torch.no_grad():
        bn.running_var[1] = 1e-9  # tiny variance ...
        bn.weight[1] = 50.0  # ... and a large gamma: 50 / sqrt(1e-9 + 1e-5) ~ 1.6e4
        bn.running_var[2] = 1e-9  # tiny variance, ordinary gamma: 1 / sqrt(1e-5) ~ 316
    for findings in _both(_net(bn)):
        found = _codes(findings)["explosive-gain"]
        assert found.severity is Severity.WARNING
        assert found.channels == (1,)
    assert 1.0 / math.sqrt(1e-5) < EXPLOSIVE_GAIN < 50.0 / math.sqrt(1e-5 + 1e-9)


def test_explosive_gain_without_affine_needs_a_tiny_eps():
    bn = _trained_bn(affine=False, eps=1e-9)
    with torch.no_grad():
        bn.running_var[0] = 1e-10  # 1 / sqrt(1e-10 + 1e-9) ~ 3e4
    assert _codes(static_checks(_net(bn)))["explosive-gain"].channels == (0,)


def test_explosive_gain_uses_the_module_eps():
    bn = _trained_bn(eps=1e-1)  # a large eps keeps the gain small
    with torch.no_grad():
        bn.running_var[1] = 1e-9
        bn.weight[1] = 50.0  # 50 / sqrt(0.1) ~ 158
    assert "explosive-gain" not in _codes(static_checks(_net(bn)))


# ------------------------------------------------------------------- never updated or not


def test_fresh_layer_was_never_updated():
    model = _net(nn.BatchNorm2d(4))
    for findings in _both(model):
        found = _codes(findings)["running-stats-never-updated"]
        assert found.severity is Severity.WARNING
        assert "num_batches_tracked 0" in found.message


def test_initial_stats_after_tracked_batches_still_warn():
    bn = nn.BatchNorm2d(4)
    bn.num_batches_tracked.fill_(30)  # trained with momentum 0: counted, never moved
    found = _codes(static_checks(_net(bn)))["running-stats-never-updated"]
    assert "30 tracked batches" in found.message


def test_converted_checkpoint_with_zero_counter_is_only_info():
    """Converted checkpoints carry num_batches_tracked == 0 with perfectly good statistics."""
    bn = _trained_bn()
    bn.num_batches_tracked.zero_()
    for findings in _both(_net(bn)):
        assert [(f.code, f.severity) for f in findings] == [
            ("num-batches-tracked-zero", Severity.INFO)
        ]


def test_state_dict_without_counter_and_trained_stats_is_clean():
    sd = {k: v for k, v in _net(_trained_bn()).state_dict().items() if "num_batches" not in k}
    assert static_checks(sd) == []


# ------------------------------------------------------------------ module-only findings


def test_instance_norm_tracking_running_stats_warns():
    model = _net(_trained_bn(nn.InstanceNorm2d, affine=True, track_running_stats=True))
    found = _codes(static_checks(model))["instance-norm-running-stats"]
    assert found.severity is Severity.WARNING
    # Without the module the class is unknown, unless the checkpoint recorded it.
    assert "instance-norm-running-stats" not in _codes(static_checks(model.state_dict()))
    with_info = static_checks(model.state_dict(), layer_info={"1": {"kind": "InstanceNorm2d"}})
    assert "instance-norm-running-stats" in _codes(with_info)


def test_sync_batchnorm_in_an_inference_model_is_info():
    model = _net(_trained_bn(nn.SyncBatchNorm))
    found = _codes(static_checks(model))["sync-batchnorm"]
    assert found.severity is Severity.INFO


@pytest.mark.parametrize(
    "momentum, code, severity",
    [
        (None, "momentum-cumulative", Severity.INFO),
        (0.9, "momentum-convention", Severity.WARNING),
        (0.99, "momentum-convention", Severity.WARNING),
        (0.997, "momentum-convention", Severity.WARNING),
        (0.0, "momentum-zero", Severity.INFO),
    ],
)
def test_momentum_findings(momentum, code, severity):
    found = _codes(static_checks(_net(_trained_bn(momentum=momentum))))
    assert found[code].severity is severity
    if code == "momentum-convention":
        assert f"{1 - momentum:.3g}" in found[code].message


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.3])
def test_ordinary_momentum_is_fine(momentum):
    assert static_checks(_net(_trained_bn(momentum=momentum))) == []


def test_batchnorm_without_running_stats_is_noted():
    found = _codes(static_checks(_net(_trained_bn(track_running_stats=False))))
    assert found["no-running-stats"].severity is Severity.INFO


def test_frozen_batchnorm_duck_type_is_checked():
    class FrozenBatchNorm2d(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.register_buffer("weight", torch.ones(c))
            self.register_buffer("bias", torch.zeros(c))
            self.register_buffer("running_mean", torch.zeros(c))
            self.register_buffer("running_var", torch.ones(c))

    frozen = FrozenBatchNorm2d(4)
    frozen.running_var[0] = -1.0
    found = _codes(static_checks(nn.Sequential(nn.Conv2d(1, 4, 3), frozen)))
    assert found["running-var-nonpositive"].channels == (0,)


# ------------------------------------------------------------------------- dead channels


def test_dead_channels_are_info():
    bn = _trained_bn()
    with torch.no_grad():
        bn.weight[0] = 0.0
        bn.weight[3] = 1e-9  # below DEAD_GAMMA_RTOL of the largest |gamma| (1.5)
        bn.weight[2] = 1e-3  # small but alive
    assert 1e-9 < DEAD_GAMMA_RTOL * 1.5 < 1e-3
    for findings in _both(_net(bn)):
        found = _codes(findings)["dead-channels"]
        assert found.severity is Severity.INFO and found.channels == (0, 3)


# ------------------------------------------------------------------------------ records


def test_findings_are_sorted_and_round_trip():
    bn = nn.BatchNorm2d(4, momentum=0.9)  # never updated (warning) + convention (warning)
    with torch.no_grad():
        bn.running_var[1] = -2.0  # error
        bn.weight[2] = 0.0  # info
    findings = static_checks(_net(bn))
    ranks = [("error", "warning", "info").index(f.severity) for f in findings]
    assert ranks == sorted(ranks)
    for f in findings:
        d = f.to_dict()
        assert set(d) == {"layer", "code", "severity", "message", "channels"}
        assert isinstance(d["channels"], list) and isinstance(d["severity"], str)
        assert Finding.from_dict(d) == f
        assert "\n" not in f.message
        assert f.code == f.code.lower() and " " not in f.code


def test_static_checks_rejects_other_objects():
    with pytest.raises(TypeError, match=r"nn\.Module or a state_dict"):
        static_checks([1, 2, 3])  # type: ignore[arg-type]


# ----------------------------------------------------------------- state_dict -> layers


def test_stored_norm_layers_finds_the_layers_with_running_statistics_in_model_order():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        _trained_bn(c=4),
        nn.GroupNorm(2, 4),
        nn.Sequential(_trained_bn(nn.BatchNorm2d, 4, affine=False)),
    )
    stored = stored_norm_layers(model.state_dict())
    assert [s.name for s in stored] == ["1", "3.0"]
    assert sorted(stored[0].tensors) == [
        "bias",
        "num_batches_tracked",
        "running_mean",
        "running_var",
        "weight",
    ]
    assert "weight" not in stored[1].tensors
    assert all(s.unknown == ("momentum", "eps") for s in stored)
    layers = [s.norm_layer() for s in stored]
    assert [(x.family, x.num_features, x.affine) for x in layers] == [
        (NormFamily.BATCH, 4, True),
        (NormFamily.BATCH, 4, False),
    ]
    # the names and channel counts agree with the module's own layer records
    live = [x for x in find_norm_layers(model) if x.track_running_stats]
    assert [(x.name, x.num_features) for x in live] == [(x.name, x.num_features) for x in layers]


def test_stored_norm_layers_takes_what_the_file_records():
    sd = {"running_mean": torch.zeros(2), "running_var": torch.ones(2), "x_running_mean": 1}
    info = {"": {"kind": "InstanceNorm2d", "eps": 1e-3}}
    (stored,) = stored_norm_layers(sd, info)
    assert stored.name == "" and stored.unknown == ("momentum",)
    layer = stored.norm_layer()
    assert layer.kind == "InstanceNorm2d" and layer.eps == 1e-3
    assert layer.family is NormFamily.INSTANCE_TRACKED
    assert layer.momentum is None  # a placeholder: `unknown` says so


def test_a_running_var_alone_is_a_batch_var_layer():
    sd = {"n.running_var": torch.ones(3), "n.weight": torch.ones(3)}
    (stored,) = stored_norm_layers(sd)
    layer = stored.norm_layer()
    assert layer.family is NormFamily.BATCH_VAR and layer.num_features == 3


def test_static_checks_for_reads_anything_shaped_like_a_checkpoint():
    """The checks take the checkpoint's three attributes; they do not import the loaders."""

    read = SimpleNamespace(
        module=None,
        state_dict={"bn.running_mean": torch.zeros(2), "bn.running_var": -torch.ones(2)},
        layer_info={"bn": {"kind": "BatchNorm1d", "momentum": 0.9}},
    )
    codes = _codes(static_checks_for(read))
    assert {"running-var-nonpositive", "momentum-convention"} <= set(codes)
    assert static_checks_for(SimpleNamespace(module=None, state_dict=None, layer_info={})) == []
    read.module = _net(_trained_bn())
    assert static_checks_for(read) == []  # the live module wins


def test_checks_do_not_import_the_loaders():
    import ast

    import normdoctor.checks as checks

    tree = ast.parse(Path(checks.__file__).read_text())
    imported = [
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    ] + [a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    assert not [m for m in imported if m == "io" or m.startswith(("io.", "normdoctor.io"))]

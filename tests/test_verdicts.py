"""Verdicts that hold whatever the scan's batch size: evidence decides which path is right.

The sample models' truths were measured with plain torch (sample_models/MANIFEST.json): the
healthy ones are as accurate in eval mode as with training's batch statistics, the broken ones
lose 40 points or more.  A verdict is right when it never calls a healthy model harmful, calls
every broken one harmful when labels say so, and never calls a broken one ok or harmless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import normdoctor as nd
from normdoctor import Verdict

SM = Path(__file__).resolve().parent.parent / "sample_models"
HEALTHY = {"healthy": "DigitsCNN", "mlp-healthy": "DigitsMLP", "groupnorm": "DigitsCNN"}
BROKEN = {
    "tiny-batch": "DigitsCNN",
    "non-iid": "DigitsCNN",
    "stale": "DigitsCNN",
    "mlp-non-iid": "DigitsMLP",
}
KWARGS = {"groupnorm": {"norm": "group"}}


def _load(name: str, arch: str) -> nn.Module:
    from sample_models import archs

    model = getattr(archs, arch)(**KWARGS.get(name, {}))
    model.load_state_dict(torch.load(SM / f"{name}.pt", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def digits():
    data = np.load(SM / "data" / "test.npz")
    return torch.from_numpy(data["inputs"]), torch.from_numpy(data["labels"])


GRID = [
    pytest.param(name, arch, b, labels, id=f"{name}-b{b}-{'labels' if labels else 'nolabels'}")
    for name, arch in {**HEALTHY, **BROKEN}.items()
    for b in (1, 8, 64)
    for labels in (True, False)
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "arch", "batch_size", "labels"), GRID)
def test_verdict_is_right_at_every_scan_batch_size(digits, name, arch, batch_size, labels):
    x, y = digits
    model = _load(name, arch)
    report = nd.scan(model, (x, y) if labels else x, batch_size=batch_size, search=True)
    if name in HEALTHY:
        assert not report.status.harmful, report.verdict
        if labels:
            assert report.status in (Verdict.OK, Verdict.HARMLESS), report.verdict
    else:
        assert report.status not in (Verdict.OK, Verdict.HARMLESS), report.verdict
        if labels:
            assert report.status.harmful, report.verdict
            # Independent check: eval-mode accuracy measured directly is far below the
            # reference's train-path accuracy the verdict quotes.
            with torch.no_grad():
                acc_eval = (model(x).argmax(1) == y).double().mean().item()
            assert report.evidence.eval_quality == pytest.approx(acc_eval, abs=1e-12)
            assert report.evidence.reference_candidate.quality > acc_eval + 0.3


def test_default_scan_of_tiny_batch_names_batch_size_1(digits):
    """No options: the search finds batch size 1 as training's composition, flags the model and
    recommends InstanceNorm, which reproduces training (MANIFEST: 97.8%)."""
    report = nd.scan(_load("tiny-batch", "DigitsCNN"), digits)
    assert report.status is Verdict.HARMFUL
    assert report.composition.batch_size == 1 and report.composition.group_by is None
    assert {str(layer.recommendation) for layer in report.flagged_layers} == {"instance"}
    assert "batch size 1" in report.verdict


def test_stated_training_composition_skips_the_search(digits):
    x, _ = digits
    report = nd.scan(_load("tiny-batch", "DigitsCNN"), x, train_batch_size=1)
    assert report.evidence.stated and not report.evidence.searched
    assert len(report.evidence.candidates) == 1
    # Without labels the paths disagree (37% agreement); the user said this is training's
    # composition, so eval mode is harmful.
    assert report.status is Verdict.HARMFUL


def test_without_labels_disagreement_is_undetermined_not_healthy(digits):
    x, _ = digits
    report = nd.scan(_load("tiny-batch", "DigitsCNN"), x)
    assert report.status is Verdict.UNDETERMINED
    assert report.harmful is None and not report.flagged
    # The running statistics' fit points at batch size 1, and the verdict says so.
    assert report.evidence.reference_candidate.batch_size == 1
    assert "batch size 1" in report.reason


def test_eval_mode_better_than_batch_statistics_is_not_harm(digits):
    """At batch size 1 without search the healthy model's batch statistics give 10.8% and eval
    mode 98.1%: the paths diverge far, eval mode is the right one."""
    report = nd.scan(_load("healthy", "DigitsCNN"), digits, batch_size=1)
    assert report.end_to_end.agreement < 0.2
    assert report.status in (Verdict.OK, Verdict.HARMLESS)
    assert not report.flagged
    assert report.end_to_end.p_value < 1e-12  # eval mode is significantly *better*


def test_search_costs_candidates_plus_one_passes(digits):
    """One train pass per candidate and one eval pass, counted by forward calls."""
    model = _load("healthy", "DigitsCNN")
    calls = []

    def forward(m, inputs):
        calls.append(inputs.shape[0])
        return m(inputs)

    report = nd.scan(model, digits, forward=forward)
    samples = digits[0].shape[0]
    passes = sum(calls) / samples
    assert passes == len(report.evidence.candidates) + 1


def test_a_last_batch_of_one_sample_joins_the_one_before():
    """171 samples in batches of 2: a BatchNorm1d MLP cannot normalize one sample in train mode;
    the last one joins the batch before it (84 batches of 2, one of 3)."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).eval()
    x = torch.randn(171, 5, generator=gen)
    report = nd.scan(model, x, batch_size=2)
    c = report.composition
    assert (c.num_batches, c.num_samples, c.min_batch, c.max_batch) == (85, 171, 2, 3)
    assert report.layer("1").train.samples == 171


def test_targets_shaped_like_the_output_are_used():
    """Image targets (N, C, H, W): per-path MSE, paired, computed against a direct reference."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    model.eval()
    x = torch.randn(64, 1, 6, 6, generator=gen)
    y = torch.randn(64, 1, 6, 6, generator=gen)
    report = nd.scan(model, (x, y), batch_size=8, search=False)
    e = report.end_to_end
    assert e.metric == "mse"
    with torch.no_grad():
        direct_eval = (model(x) - y).square().mean().item()
    assert e.loss_eval == pytest.approx(direct_eval, rel=1e-6)  # float32 forward, float64 sums
    assert report.evidence.kind == "targets"


def test_mcnemar_matches_the_binomial_reference():
    from math import comb

    from normdoctor.verdict import mcnemar_p

    b, c = 3, 15
    n = b + c
    ref = min(1.0, 2 * sum(comb(n, i) for i in range(b + 1)) / 2**n)
    assert mcnemar_p(b, c) == pytest.approx(ref, rel=1e-12)
    assert mcnemar_p(0, 0) == 1.0
    # beyond 2,000 discordant pairs the normal approximation stays within 1e-3 of exact
    b, c = 1000, 1101
    n = b + c
    exact = 2 * sum(comb(n, i) for i in range(b + 1)) / 2**n  # big-int arithmetic, exact
    assert mcnemar_p(b, c) == pytest.approx(exact, rel=1e-3)


def _unet(name: str) -> nn.Module:
    from sample_models.archs import DigitsUNet

    model = DigitsUNet()
    model.load_state_dict(torch.load(SM / f"{name}.pt", weights_only=True))
    return model.eval()


@pytest.fixture(scope="module")
def pix2pix():
    data = np.load(SM / "data" / "pix2pix-test.npz")
    return torch.from_numpy(data["x"]), torch.from_numpy(data["y"])


def _mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).double() - y.double()).square().mean().item()


@pytest.mark.slow
def test_pix2pix_trained_at_batch_size_1_is_flagged_and_fixed(pix2pix):
    """Image targets decide: eval-mode MSE 0.842 against 0.279 on the train path at batch
    size 1 (MANIFEST); autopatch brings eval mode within 20% of the latter."""
    x, y = pix2pix
    model = _unet("pix2pix-b1")
    report = nd.scan(model, (x, y))
    assert report.status is Verdict.HARMFUL and report.evidence.kind == "targets"
    assert report.composition.batch_size == 1
    assert report.end_to_end.loss_eval == pytest.approx(_mse(model, x, y), rel=1e-6)
    patched, _before, _after = nd.autopatch(model, (x, y))
    train_path_mse = report.end_to_end.loss_train
    assert _mse(patched, x, y) <= 1.2 * train_path_mse
    assert patched.normdoctor_verification.ok


@pytest.mark.slow
def test_pix2pix_trained_at_batch_size_32_is_not_flagged(pix2pix):
    x, y = pix2pix
    for b in (None, 1, 64):
        report = nd.scan(_unet("pix2pix-b32"), (x, y), batch_size=b, search=True)
        assert report.status in (Verdict.OK, Verdict.HARMLESS), report.verdict


def test_shifted_data_with_correct_statistics():
    """A pretrained model with correct running statistics, scanned on shifted data (x*1.3+0.4):
    eval mode drops to 92.5% against 97.5% for batch statistics (MANIFEST shifted_data): the
    shift is real harm on that data; the first layer, where the shift enters, is stale."""
    data = np.load(SM / "data" / "shifted.npz")
    xy = torch.from_numpy(data["inputs"]), torch.from_numpy(data["labels"])
    report = nd.scan(_load("healthy", "DigitsCNN"), xy)
    assert report.status.harmful, report.verdict
    first = report.layers[0]
    assert first.flagged and str(first.recommendation) == "recalibrate"
    assert first.shift > 10 * first.noise


def test_patch_cli_writes_only_a_model_that_measures_better(tmp_path, capsys, digits):
    """healthy at -b 1 --to auto: eval mode is right, nothing to fix, exit 1, nothing written;
    tiny-batch: the written model's eval-mode accuracy, measured here, beats the original's."""
    from normdoctor.cli import main
    from normdoctor.patch import load_patched

    common = ["--arch", "sample_models.archs:DigitsCNN", "--data", str(SM / "data" / "test.npz")]
    out = tmp_path / "healthy-fixed.pt"
    code = main(
        ["patch", str(SM / "healthy.pt"), *common, "-b", "1", "--to", "auto", "-o", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 1 and not out.exists() and "nothing written" in err
    out = tmp_path / "tiny-fixed.pt"
    code = main(
        ["patch", str(SM / "tiny-batch.pt"), *common, "-b", "1", "--to", "auto", "-o", str(out)]
    )
    assert code == 0 and out.exists(), capsys.readouterr().err
    x, y = digits
    from sample_models.archs import DigitsCNN

    fixed = load_patched(out, DigitsCNN()).eval()
    original = _load("tiny-batch", "DigitsCNN")
    with torch.no_grad():
        acc = [(m(x).argmax(1) == y).double().mean().item() for m in (original, fixed)]
    assert acc[1] > acc[0] + 0.5  # 36.9% -> 97.8% (MANIFEST)


def test_a_forward_calling_sys_exit_is_an_error_of_that_code(tmp_path, capsys):
    """A model whose forward calls sys.exit(7) does not end the process: scan raises ScanError,
    recalibrate too, and the CLI exits 2 with one line."""

    class Quits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            self.bn(x)
            raise SystemExit(7)

    x = torch.randn(8, 3)
    with pytest.raises(nd.ScanError, match=r"sys\.exit\(7\)"):
        nd.scan(Quits().eval(), x, batch_size=4)
    with pytest.raises(nd.ScanError, match=r"sys\.exit\(7\)"):
        nd.recalibrate(Quits().eval(), x, batch_size=4)
    arch = tmp_path / "quits.py"
    arch.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Quits(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.bn = nn.BatchNorm1d(3)\n\n"
        "    def forward(self, x):\n        raise SystemExit(7)\n"
    )
    weights = tmp_path / "quits.pt"
    torch.save({"bn." + k: v for k, v in nn.BatchNorm1d(3).state_dict().items()}, weights)
    from normdoctor.cli import main

    code = main(["scan", str(weights), "--arch", f"{arch}:Quits", "--data", "random:8,3"])
    err = capsys.readouterr().err
    assert code == 2 and "sys.exit(7)" in err and len(err.strip().splitlines()) <= 2


class _SqueezeExcite(nn.Module):
    """A conv net with a BatchNorm over pooled (N, C, 1, 1) features (SE with BN, as in some
    real zoos): at batch size 1 that layer gets one value per channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.se_fc = nn.Conv2d(8, 8, 1)
        self.se_bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.se_bn(self.se_fc(self.pool(x))))
        return self.head((x * s).mean((2, 3)))


def test_batch_size_1_with_bn_over_pooled_features_measures_the_rest():
    """torch raises "Expected more than 1 value per channel when training" for se_bn at batch
    size 1; the scan goes on, reports se_bn as not measurable, measures bn exactly, and leaves
    the model as it was."""
    from normdoctor.report import LayerStatus

    gen = torch.Generator().manual_seed(0)
    model = _SqueezeExcite().eval()
    x = torch.randn(12, 3, 6, 6, generator=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    report = nd.scan(model, x, batch_size=1)
    assert report.layer("se_bn").status is LayerStatus.NOT_MEASURABLE
    assert "one value per channel" in report.layer("se_bn").reason
    bn = report.layer("bn")
    assert bn.status is not LayerStatus.NOT_MEASURABLE and bn.train.batches == 12
    # bn's input does not depend on se_bn: its pooled statistics against float64 NumPy, over
    # the inputs the scan saw (conv at batch size 1: a float32 conv of all 12 at once rounds
    # differently on some CPUs, 1e-6 relative on a channel mean near 0)
    with torch.no_grad():
        ref = torch.cat([model.conv(x[i : i + 1]) for i in range(12)]).double().numpy()
    assert np.allclose(bn.train.pooled_mean, ref.mean((0, 2, 3)), rtol=1e-6, atol=1e-9)
    assert np.allclose(bn.train.pooled_var, ref.var((0, 2, 3)), rtol=1e-6, atol=1e-9)
    assert any("one value per channel" in n for n in report.notes)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.training for m in model.modules()] == flags
    # the search lists batch size 1 as not measurable and judges elsewhere
    searched = nd.scan(model, x)
    one = next(c for c in searched.evidence.candidates if c.batch_size == 1)
    assert not one.measurable and "not trained this way" in one.reason
    assert searched.composition.batch_size != 1


def test_html_report_shows_the_compositions_tried(digits, tmp_path):
    from normdoctor.render import save_report

    report = nd.scan(_load("tiny-batch", "DigitsCNN"), digits)
    index = save_report(report, tmp_path / "r", formats=("png",))
    page = index.read_text(encoding="utf-8")
    assert "Compositions tried as training" in page
    for c in report.evidence.candidates:
        assert c.description in page
    assert "batch size 1 <strong>(reference)</strong>" in page
    assert 'class="verdict bad"' in page


def test_a_model_without_batch_dependent_layers_says_so_plainly():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4, affine=True)).eval()
    report = nd.scan(model, torch.randn(8, 1, 6, 6))
    assert report.status is Verdict.OK
    assert report.reason == "no batch-dependent normalization layers: nothing can drift"


@pytest.mark.parametrize(
    ("shift", "noise", "per_sample", "spatial", "expected"),
    [
        # per-sample batches, noise over the threshold: recalibrating would leave it flagged
        (0.1538, 0.1536, True, True, "instance"),
        (0.30, 0.15, True, True, "instance"),
        # the noise alone within the threshold: recalibration suffices and changes no layer
        (0.20, 0.05, True, True, "recalibrate"),
        # nothing to normalize per sample: InstanceNorm is not training's computation
        (0.30, 0.15, True, False, "recalibrate"),
        # batches of many samples: stale statistics dominate, as before
        (0.30, 0.15, False, True, "recalibrate"),
        (0.05, 0.20, True, True, "instance"),
    ],
)
def test_per_sample_batches_recommend_the_fix_that_leaves_no_drift(
    shift, noise, per_sample, spatial, expected
):
    from normdoctor.metrics import recommend

    drift = float(np.hypot(shift, noise))  # drift^2 is about shift^2 + noise^2
    fix, reason = recommend(
        drift=drift, shift=shift, noise=noise, noniid=None, per_sample=per_sample, spatial=spatial
    )
    assert str(fix) == expected, reason


def test_a_tracked_instance_norm_with_stale_statistics_keeps_recalibration():
    """Which patch applies to it (test_zoo), even with its noise over the threshold."""
    from normdoctor.metrics import recommend

    fix, reason = recommend(
        drift=float(np.hypot(0.3, 0.15)),
        shift=0.3,
        noise=0.15,
        noniid=None,
        per_sample=True,
        spatial=True,
        tracked_instance=True,
    )
    assert str(fix) == "recalibrate", reason

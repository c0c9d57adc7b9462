"""The ONNX backend: discovery, scans through onnxruntime, graph rewrites (issue 7).

References are independent of the backend: the PyTorch originals of the sample models scanned by
:func:`normdoctor.scan`, plain-torch InstanceNorm conversion and float64 recalibration, numpy
statistics of the raw inputs, and the expected outputs that the onnx package's own backend test
cases carry.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import normdoctor  # noqa: E402
from normdoctor.errors import ConversionError, DataError, LoadError  # noqa: E402
from normdoctor.layers import NormFamily  # noqa: E402
from normdoctor.report import LayerStatus, ScanReport  # noqa: E402
from normdoctor.sources.onnx import OnnxModel, OnnxUnavailableError, require  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sample_models.archs import DigitsCNN  # noqa: E402

pytestmark = pytest.mark.onnx

SM = REPO / "sample_models"
BN_NAMES = ("norm1", "norm2", "norm3")

# -- tolerances, and why ---------------------------------------------------------------------------
#: Per-channel pooled statistics, ONNX against PyTorch: both float32 forward passes (onnxruntime's
#: and torch's Conv kernels round differently, ~1e-7 relative per layer), statistics accumulated
#: in float64.  Measured differences are ~1e-7; 1e-5 leaves room for other CPUs' kernels.
POOLED_RTOL = 1e-5
POOLED_ATOL = 1e-6
#: Layer scores (drift, shift, noise) are smooth functions of those statistics.
SCORE_RTOL = 1e-4
SCORE_ATOL = 1e-6
#: Logits of a rewritten ONNX graph against the equivalent torch model, both float32.
LOGIT_ATOL = 1e-4
#: Recalibrated running statistics (stored float32, measured on float32 activations) against a
#: float64 plain-torch recalibration: float32 storage alone is 6e-8 relative.
RECAL_RTOL = 1e-5
RECAL_ATOL = 1e-6
#: The same graph run with its batch dimension made dynamic: same kernels, same data.
SAME_GRAPH_RTOL = 1e-6
#: What the onnx backend test runner itself applies to its node cases (onnx.backend.test.runner).
BACKEND_RTOL = 1e-3
BACKEND_ATOL = 1e-7
#: float64 numpy statistics of a float32 input, against the streamed ones: the Recorder sums each
#: sample's positions in the input's dtype (float32) before accumulating in float64, an absolute
#: error of ~1e-7 of the input's scale (O(1) here), which near-zero means see as relative error.
NUMPY_RTOL = 1e-6
NUMPY_ATOL = 1e-6


# -- fixtures and helpers ----------------------------------------------------------------------------
def _npz(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = np.load(SM / "data" / f"{name}.npz")
    return torch.from_numpy(d["inputs"]), torch.from_numpy(d["labels"])


@pytest.fixture(scope="module")
def test_data() -> tuple[torch.Tensor, torch.Tensor]:
    return _npz("test")


@pytest.fixture(scope="module")
def calib_data() -> tuple[torch.Tensor, torch.Tensor]:
    return _npz("calib")


def _torch_model(name: str) -> DigitsCNN:
    model = DigitsCNN()
    model.load_state_dict(torch.load(SM / f"{name}.pt", weights_only=True))
    return model.eval()


def _session_outputs(path_or_proto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _bn_graph(
    x_shape: list, channels: int, *, opset: int = 17, name: str = "bn", seed: int = 0
) -> onnx.ModelProto:
    """x -> Relu -> BatchNormalization -> y, with constant parameters."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(0, 1, c).astype(np.float32), "rm"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "rv"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node(
            "BatchNormalization", ["r", "gamma", "beta", "rm", "rv"], ["y"], name=name, epsilon=1e-3
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


# -- discovery ---------------------------------------------------------------------------------------
def test_sample_model_nodes_match_the_torch_modules():
    onnx_layers = OnnxModel.load(SM / "healthy.onnx").find_norm_layers()
    torch_layers = normdoctor.find_norm_layers(_torch_model("healthy"))
    assert [layer.kind for layer in onnx_layers] == ["BatchNormalization"] * 3
    assert len(onnx_layers) == len(torch_layers) == 3
    for o, t in zip(onnx_layers, torch_layers, strict=True):
        assert o.family is NormFamily.BATCH and o.batch_dependent
        assert (o.num_features, o.eps, o.momentum, o.affine) == (
            t.num_features,
            t.eps,
            t.momentum,  # ONNX momentum 0.9 (decay of the old estimate) is PyTorch's 0.1
            t.affine,
        )
    # name = node name; the state_dict maps it to PyTorch's keys with the same tensors
    sd = OnnxModel.load(SM / "healthy.onnx").state_dict()
    ref = torch.load(SM / "healthy.pt", weights_only=True)
    for o, bn in zip(onnx_layers, BN_NAMES, strict=True):
        for key in ("weight", "bias", "running_mean", "running_var"):
            torch.testing.assert_close(sd[f"{o.name}.{key}"], ref[f"{bn}.{key}"], rtol=0, atol=0)


def test_folded_batchnorm_is_said_plainly(test_data):
    model = OnnxModel.load(SM / "healthy-folded.onnx")
    assert model.find_norm_layers() == []
    (note,) = model.notes()
    assert note.startswith("no BatchNormalization left: folded at export, nothing to measure")
    (finding,) = model.static_checks()
    assert finding.code == "batchnorm-folded" and finding.message == note
    with pytest.warns(UserWarning, match="no normalization layers"):
        report = model.scan(test_data, batch_size=64)
    assert report.layers == () and note in report.notes
    with pytest.raises(ConversionError, match="no BatchNormalization left"):
        model.patch("instance")


def test_static_checks_use_the_generic_checks_with_onnx_momentum_converted():
    model = OnnxModel.load(SM / "healthy.onnx")
    assert model.static_checks() == []  # trained statistics, momentum 0.1 in PyTorch terms
    proto = onnx.load(str(SM / "healthy.onnx"))
    for t in proto.graph.initializer:
        if t.name == "norm2.running_var":
            t.CopyFrom(numpy_helper.from_array(np.zeros(32, np.float32), t.name))
    findings = OnnxModel(proto, name="broken").static_checks()
    name = model.find_norm_layers()[1].name
    assert [(f.layer, f.code) for f in findings] == [(name, "running-var-nonpositive")]


def test_families_of_every_norm_op_and_training_mode():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])
    c = 4
    inits = [
        numpy_helper.from_array(np.ones(c, np.float32), "s"),
        numpy_helper.from_array(np.zeros(c, np.float32), "b"),
        numpy_helper.from_array(np.zeros(c, np.float32), "m"),
        numpy_helper.from_array(np.ones(c, np.float32), "v"),
        numpy_helper.from_array(np.ones((c, 6, 6), np.float32), "ls"),
    ]
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["a"], name="bn"),
        helper.make_node(
            "BatchNormalization",
            ["a", "s", "b", "m", "v"],
            ["t", "t_mean", "t_var"],
            name="bn_train",
            training_mode=1,
            momentum=0.8,
        ),
        helper.make_node("InstanceNormalization", ["t", "s", "b"], ["i"], name="in"),
        helper.make_node("LayerNormalization", ["i", "ls"], ["l"], name="ln", axis=1),
        helper.make_node("GroupNormalization", ["l", "s", "b"], ["gn"], name="gn", num_groups=2),
        helper.make_node("LpNormalization", ["gn"], ["lp"], axis=1, p=2),  # unnamed
        helper.make_node("LRN", ["lp"], ["y"], name="lrn", size=3),
    ]
    graph = helper.make_graph(
        nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    model = OnnxModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    got = {layer.name: layer for layer in model.find_norm_layers()}
    assert {n: (layer.kind, layer.family) for n, layer in got.items()} == {
        "bn": ("BatchNormalization", NormFamily.BATCH),
        "bn_train": ("BatchNormalization", NormFamily.BATCH_STATS_ONLY),
        "in": ("InstanceNormalization", NormFamily.INSTANCE),
        "ln": ("LayerNormalization", NormFamily.LAYER),
        "gn": ("GroupNormalization", NormFamily.GROUP),
        "lp": ("LpNormalization", NormFamily.RMS),  # output name for an unnamed node
        "lrn": ("LRN", NormFamily.LOCAL_RESPONSE),
    }
    assert got["bn_train"].momentum == pytest.approx(0.2)
    assert [n for n, layer in got.items() if layer.batch_dependent] == ["bn"]
    assert got["gn"].num_features == 4 and got["ln"].num_features == 6
    codes = {(f.layer, f.code) for f in model.static_checks()}
    assert ("bn_train", "no-running-stats") in codes
    report = model.scan(torch.randn(8, 4, 6, 6), batch_size=4)
    assert report.layer("bn").executed and report.layer("bn").train.batches == 2
    for name in ("bn_train", "in", "ln", "gn", "lp", "lrn"):
        assert report.layer(name).status is LayerStatus.NOT_MEASURED


@pytest.mark.parametrize(
    ("opset", "attrs", "outputs", "family", "measurable"),
    [
        (6, {"is_test": 1}, 1, NormFamily.BATCH, True),
        (6, {}, 1, NormFamily.BATCH_STATS_ONLY, False),  # is_test defaults to 0: training
        (7, {"spatial": 0}, 1, NormFamily.BATCH, False),  # per-activation statistics
        (9, {}, 1, NormFamily.BATCH, True),
        (9, {}, 5, NormFamily.BATCH_STATS_ONLY, False),  # extra outputs: training mode
        (14, {}, 1, NormFamily.BATCH, True),
        (15, {"training_mode": 1}, 3, NormFamily.BATCH_STATS_ONLY, False),
    ],
    ids=["6-is_test", "6-default", "7-spatial0", "9-one-output", "9-five-outputs", "14", "15-tm"],
)
def test_batchnorm_mode_across_opsets(opset, attrs, outputs, family, measurable):
    proto = _bn_graph(["N", 3, 4, 4], 3, opset=opset)
    node = proto.graph.node[1]
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    node.output.extend(f"extra{i}" for i in range(outputs - 1))
    (rec,) = OnnxModel(proto).norm_nodes()
    assert (rec.layer.family, rec.measurable) == (family, measurable)
    assert rec.layer.momentum == pytest.approx(0.1)  # ONNX default 0.9 in PyTorch's convention


def test_graphs_with_several_inputs_take_dicts_or_tuples():
    base = _bn_graph(["N", 3, 4, 4], 3)
    g = base.graph
    g.input.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3, 4, 4]))
    g.input[0].name = "a"  # not "x": a dict with an "x" key reads as (inputs, labels)
    g.node.insert(0, helper.make_node("Add", ["a", "b"], ["ab"]))
    g.node[1].input[0] = "ab"
    model = OnnxModel(base, name="two")
    a, b = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    by_name = model.scan([{"a": a, "b": b}], paths=("train",))
    by_order = model.scan([((a, b), torch.zeros(8, dtype=torch.long))], paths=("train",))
    expected = (a + b).relu().double().mean(dim=(0, 2, 3))
    for report in (by_name, by_order):
        np.testing.assert_allclose(
            report.layers[0].train.pooled_mean, expected, rtol=NUMPY_RTOL, atol=NUMPY_ATOL
        )
    with pytest.raises(DataError, match=r"takes inputs \['a', 'b'\]"):
        model.scan([{"a": a, "c": b}])
    with pytest.raises(DataError, match="takes 2 inputs"):
        model.scan(a, batch_size=4)


def test_nodes_in_subgraphs_are_listed_not_scanned():
    inner = _bn_graph(["N", 3, 4, 4], 3, name="inner_bn").graph
    then_body = helper.make_graph(
        list(inner.node),
        "then",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(inner.initializer),
    )
    else_body = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z"])],
        "else",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    cond = numpy_helper.from_array(np.array(True), "cond")
    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["cond"], ["out"], name="branch", then_branch=then_body, else_branch=else_body
            )
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [cond],
    )
    model = OnnxModel(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (layer,) = model.find_norm_layers()
    assert layer.name == "branch/then_branch/inner_bn" and layer.family is NormFamily.BATCH
    assert any("inside If/Loop/Scan bodies" in n for n in model.notes())
    report = model.scan(torch.randn(4, 3, 4, 4), batch_size=4)
    (r,) = report.layers
    assert r.status is LayerStatus.NOT_EXECUTED and "listed, not scanned" in r.reason
    assert {f.code for f in model.static_checks()} == {"norm-in-subgraph"}
    with pytest.raises(ConversionError, match="then_branch body"):
        model.patch("batchstats")


def test_parameters_computed_from_constants_are_resolved():
    """ConstantOfShape (as in the onnx 'light' zoo models) is a constant: evaluated once."""
    base = _bn_graph(["N", 3, 5, 5], 3)
    g = base.graph
    shape = numpy_helper.from_array(np.array([3], np.int64), "v_shape")
    g.initializer.append(shape)
    kept = [t for t in g.initializer if t.name != "rv"]
    del g.initializer[:]
    g.initializer.extend(kept)
    g.node.insert(
        0,
        helper.make_node(
            "ConstantOfShape",
            ["v_shape"],
            ["rv"],
            value=numpy_helper.from_array(np.array([2.5], np.float32)),
        ),
    )
    model = OnnxModel(base)
    (rec,) = model.norm_nodes()
    assert rec.measurable
    np.testing.assert_array_equal(model.state_dict()["bn.running_var"].numpy(), [2.5] * 3)


# -- scans against PyTorch ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "batch_size"), [("healthy", 64), ("tiny-batch", 1)], ids=["healthy-bs64", "tiny-bs1"]
)
def test_scan_matches_the_torch_original_layer_by_layer(name, batch_size, test_data):
    options = dict(batch_size=batch_size, max_batches=120)  # 120 samples at batch size 1
    torch_report = normdoctor.scan(_torch_model(name), test_data, **options)
    onnx_report = OnnxModel.load(SM / f"{name}.onnx").scan(test_data, **options)
    assert onnx_report.composition == torch_report.composition
    assert len(onnx_report.layers) == len(torch_report.layers) == 3
    for o, t in zip(onnx_report.layers, torch_report.layers, strict=True):  # matched by order
        assert (o.status, o.flagged, o.recommendation, o.order) == (
            t.status,
            t.flagged,
            t.recommendation,
            t.order,
        )
        for path in ("train", "eval"):
            po, pt = getattr(o, path), getattr(t, path)
            assert (po.batches, po.samples) == (pt.batches, pt.samples)
            for field in ("pooled_mean", "pooled_var"):
                np.testing.assert_allclose(
                    getattr(po, field), getattr(pt, field), rtol=POOLED_RTOL, atol=POOLED_ATOL
                )
            for field in ("drift", "shift", "noise", "drift_worst"):
                assert getattr(po, field) == pytest.approx(
                    getattr(pt, field), rel=SCORE_RTOL, abs=SCORE_ATOL
                )
            np.testing.assert_allclose(
                po.batch_drift, pt.batch_drift, rtol=SCORE_RTOL, atol=SCORE_ATOL
            )
    eo, et = onnx_report.end_to_end, torch_report.end_to_end
    assert (eo.agreement, eo.acc_train, eo.acc_eval) == (et.agreement, et.acc_train, et.acc_eval)
    assert eo.rel_divergence == pytest.approx(et.rel_divergence, rel=SCORE_RTOL)
    assert onnx_report.verdict == torch_report.verdict
    assert ScanReport.from_json(onnx_report.to_json()) == onnx_report


def test_scan_options_pass_through(test_data):
    calls = []
    report = OnnxModel.load(SM / "healthy.onnx").scan(
        test_data,
        batch_size=50,
        shuffle=False,
        group_by="label",
        max_batches=4,
        paths=("train",),
        progress=lambda done, total: calls.append((done, total)),
        model_name="digits",
    )
    assert report.model == "digits" and report.paths == ("train",)
    assert report.composition.group_by == "label" and report.composition.num_batches == 4
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert report.end_to_end is None and all(layer.eval is None for layer in report.layers)


# -- rewrites ----------------------------------------------------------------------------------------
def test_instance_rewrite_reproduces_torch_instancenorm(tmp_path, test_data):
    x, labels = test_data
    patched = OnnxModel.load(SM / "tiny-batch.onnx").patch("instance", output=tmp_path / "i.onnx")
    saved = onnx.load(str(tmp_path / "i.onnx"))
    onnx.checker.check_model(saved, full_check=True)
    assert saved.opset_import[0].version == 18
    assert [n.op_type for n in saved.graph.node].count("BatchNormalization") == 0
    assert [layer.kind for layer in patched.find_norm_layers()] == ["InstanceNormalization"] * 3

    reference = _torch_model("tiny-batch")
    for bn_name in BN_NAMES:
        bn = getattr(reference, bn_name)
        inorm = torch.nn.InstanceNorm2d(bn.num_features, eps=bn.eps, affine=True)
        with torch.no_grad():
            inorm.weight.copy_(bn.weight)
            inorm.bias.copy_(bn.bias)
        setattr(reference, bn_name, inorm)
    with torch.no_grad():
        expected = reference(x).numpy()
    (got,) = _session_outputs(str(tmp_path / "i.onnx"), {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGIT_ATOL)
    # MANIFEST truth: InstanceNorm rescues tiny-batch (352 of 360)
    assert int((got.argmax(1) == labels.numpy()).sum()) == 352


def test_instance_rewrite_refuses_inputs_without_spatial_dims():
    model = OnnxModel(_bn_graph(["N", 8], 8, name="bn1d"))
    with pytest.raises(ConversionError, match=r"bn1d: its input has shape \(N, 8\) \(N, C\)"):
        model.patch("instance")


def test_batchstats_rewrite_matches_torch_train_mode_batchnorm(test_data):
    x, _ = test_data
    patched = OnnxModel.load(SM / "healthy.onnx").patch("batchstats")
    reference = _torch_model("healthy")
    for bn_name in BN_NAMES:
        getattr(reference, bn_name).train()
        getattr(reference, bn_name).track_running_stats = False  # running stats untouched
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    with torch.no_grad():
        expected = reference(x[:64]).numpy()
    (got,) = patched.run(x[:64])
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGIT_ATOL)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert patched.opset == 18
    onnx.checker.check_model(patched.proto, full_check=True)


def _torch_recalibrated(name: str, data: torch.Tensor) -> DigitsCNN:
    """Exact sequential recalibration in float64, plain torch: one layer at a time, in order."""
    model = _torch_model(name).double()
    for bn_name in BN_NAMES:
        bn = getattr(model, bn_name)
        seen: list[torch.Tensor] = []
        handle = bn.register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            for chunk in data.double().split(37):  # batching cannot matter in eval mode
                model(chunk)
        handle.remove()
        z = torch.cat(seen)
        bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(z.var(dim=(0, 2, 3), unbiased=True))
    return model


@pytest.mark.parametrize("name", ["tiny-batch", "healthy"])
def test_recalibration_matches_plain_torch_sequential(name, tmp_path, calib_data, test_data):
    xc, _ = calib_data
    original = OnnxModel.load(SM / f"{name}.onnx")
    before = original.state_dict()
    patched = original.patch("recalibrate", data=xc, batch_size=64)
    assert original.state_dict().keys() == before.keys()  # the input model is untouched
    for k, v in original.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    reference = _torch_recalibrated(name, xc)
    sd = patched.state_dict()
    for layer, bn_name in zip(patched.find_norm_layers(), BN_NAMES, strict=True):
        bn = getattr(reference, bn_name)
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(
                sd[f"{layer.name}.{key}"].double(),
                getattr(bn, key),
                rtol=RECAL_RTOL,
                atol=RECAL_ATOL,
            )
        torch.testing.assert_close(sd[f"{layer.name}.weight"], before[f"{layer.name}.weight"])
    out = patched.save(tmp_path / "recal.onnx")
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    assert saved.opset_import[0].version == original.opset
    assert sorted(t.name for t in saved.graph.initializer) == sorted(
        t.name for t in original.proto.graph.initializer
    )  # written into the existing initializers
    x, _ = test_data
    with torch.no_grad():
        expected = reference.float()(x).numpy()
    (got,) = _session_outputs(str(out), {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=0, atol=LOGIT_ATOL)


def test_recalibration_is_sequential_not_single_pass(calib_data):
    """Recalibrating layer 1 changes what layer 2 sees: a single pass would miss it."""
    xc, _ = calib_data
    model = OnnxModel.load(SM / "tiny-batch.onnx")
    names = [layer.name for layer in model.find_norm_layers()]
    together = model.patch("recalibrate", data=xc).state_dict()
    only_second = model.patch("recalibrate", data=xc, layers=[names[1]]).state_dict()
    first_then_second = (
        model.patch("recalibrate", data=xc, layers=[names[0]])
        .patch("recalibrate", data=xc, layers=[names[1]])
        .state_dict()
    )
    key = f"{names[1]}.running_mean"
    torch.testing.assert_close(together[key], first_then_second[key], rtol=0, atol=RECAL_ATOL)
    assert not torch.allclose(together[key], only_second[key], rtol=0, atol=1e-3)


def test_patch_selection_and_errors(tmp_path):
    model = OnnxModel.load(SM / "healthy.onnx")
    first = model.find_norm_layers()[0].name
    patched = model.patch("instance", layers=first)
    kinds = [layer.kind for layer in patched.find_norm_layers()]
    assert kinds == ["InstanceNormalization", "BatchNormalization", "BatchNormalization"]
    names = [layer.name for layer in model.find_norm_layers()]
    stats = model.patch("batchstats", layers="*_2__0")  # glob: the third node only
    assert [layer.name for layer in stats.find_norm_layers()] == names[:2]
    assert stats.history == ("1 BatchNormalization node(s) normalize with batch statistics",)
    with pytest.raises(ConversionError, match="no BatchNormalization node matches"):
        model.patch("instance", layers="nope*")
    with pytest.raises(ConversionError, match="unknown patch 'renorm'"):
        model.patch("renorm")
    with pytest.raises(DataError, match="recalibrate needs data"):
        model.patch("recalibrate")


# -- saving ------------------------------------------------------------------------------------------
def test_save_is_checked_atomic_and_never_over_the_input(tmp_path):
    src = _save(onnx.load(str(SM / "healthy.onnx")), tmp_path / "model.onnx")
    model = OnnxModel.load(src)
    with pytest.raises(ConversionError, match="refusing to write over the input"):
        model.save(src)
    with pytest.raises(ConversionError, match="refusing to write over the input"):
        model.patch("batchstats", output=tmp_path / "." / "model.onnx")
    out = model.patch("batchstats").save(tmp_path / "out" / "patched.onnx")
    assert sorted(os.listdir(tmp_path / "out")) == ["patched.onnx"]  # no temp file left
    onnx.checker.check_model(str(out), full_check=True)
    assert src.read_bytes() == (SM / "healthy.onnx").read_bytes()
    broken = onnx.load(str(src))
    broken.graph.node[3].input[0] = "does_not_exist"
    with pytest.raises(ConversionError, match=r"fails onnx\.checker"):
        OnnxModel(broken).save(tmp_path / "broken.onnx")
    assert not (tmp_path / "broken.onnx").exists()


# -- fixed batch sizes -------------------------------------------------------------------------------
def _fix_batch(proto: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    for vi in [*proto.graph.input, *proto.graph.output]:
        d0 = vi.type.tensor_type.shape.dim[0]
        d0.Clear()
        d0.dim_value = batch
    return proto


def _hard_code_flatten(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Reshape to a constant [1, 32], as exporters write for a static batch of 1."""
    proto.graph.initializer.append(numpy_helper.from_array(np.array([1, 32], np.int64), "fixed"))
    for node in proto.graph.node:
        if node.op_type == "Reshape" and node.output[0] == "view":
            node.input[1] = "fixed"
    return proto


def test_fixed_batch_one_is_made_dynamic_when_the_graph_allows(test_data):
    fixed = OnnxModel(_fix_batch(onnx.load(str(SM / "healthy.onnx")), 1), name="fixed")
    dynamic = OnnxModel.load(SM / "healthy.onnx")
    r_fixed = fixed.scan(test_data, batch_size=64)
    r_dyn = dynamic.scan(test_data, batch_size=64)
    assert any("made dynamic for batches of 64" in n for n in r_fixed.notes)
    for a, b in zip(r_fixed.layers, r_dyn.layers, strict=True):
        assert a.drift == pytest.approx(b.drift, rel=SAME_GRAPH_RTOL)
        np.testing.assert_allclose(a.eval.pooled_var, b.eval.pooled_var, rtol=SAME_GRAPH_RTOL)
    assert r_fixed.end_to_end.agreement == r_dyn.end_to_end.agreement
    r_one = fixed.scan(test_data, batch_size=1, max_batches=40)
    assert r_one.composition.max_batch == 1 and r_one.layers[0].train.batches == 40


def test_fixed_batch_one_hard_coded_restricts_the_train_path(test_data):
    hard = OnnxModel(
        _hard_code_flatten(_fix_batch(onnx.load(str(SM / "tiny-batch.onnx")), 1)), name="hard"
    )
    with pytest.raises(DataError, match=r"fixed batch size of 1 .* scan with batch_size=1"):
        hard.scan(test_data, batch_size=32)
    # eval path: per-sample, so single-sample runs stack to the same numbers
    eval_only = hard.scan(test_data, batch_size=32, paths=("eval",))
    dynamic = OnnxModel.load(SM / "tiny-batch.onnx").scan(test_data, batch_size=32, paths=("eval",))
    assert any("ran 1 sample(s) at a time" in n for n in eval_only.notes)
    for a, b in zip(eval_only.layers, dynamic.layers, strict=True):
        np.testing.assert_allclose(
            a.eval.pooled_mean, b.eval.pooled_mean, rtol=SAME_GRAPH_RTOL, atol=POOLED_ATOL
        )
    full = hard.scan(test_data, batch_size=1, max_batches=30)
    reference = OnnxModel.load(SM / "tiny-batch.onnx").scan(test_data, batch_size=1, max_batches=30)
    for a, b in zip(full.layers, reference.layers, strict=True):
        assert a.drift == pytest.approx(b.drift, rel=SAME_GRAPH_RTOL)
    # recalibration runs the eval path only: it works on the hard-coded graph too
    patched = hard.patch("recalibrate", data=test_data[0][:64], batch_size=32)
    assert patched.history[-1].startswith("recalibrated 3")


# -- external data -----------------------------------------------------------------------------------
def test_external_data_loads_and_saves_beside_the_new_file(tmp_path, test_data):
    proto = onnx.load(str(SM / "healthy.onnx"))
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(
        proto,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    data_before = (folder / "weights.bin").read_bytes()
    model = OnnxModel.load(folder / "model.onnx")
    ref = OnnxModel.load(SM / "healthy.onnx")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert (
        model.scan(test_data, batch_size=64).verdict == ref.scan(test_data, batch_size=64).verdict
    )
    out = model.patch("recalibrate", data=test_data[0]).save(folder / "recal.onnx")
    assert (folder / "recal.onnx.data").is_file()
    assert (folder / "weights.bin").read_bytes() == data_before
    reloaded = OnnxModel.load(out)
    assert reloaded.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, where):
    proto = onnx.load(str(SM / "healthy.onnx"))
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(
        proto,
        str(tmp_path / "decoy.onnx"),
        save_as_external_data=True,
        location="secret.bin",
        size_threshold=0,
    )
    outside = tmp_path / "secret.bin"
    external = onnx.load(str(tmp_path / "decoy.onnx"), load_external_data=False)
    location = {
        "parent": "../secret.bin",
        "absolute": str(outside),
        "symlink": "link.bin",
    }[where]
    if where == "symlink":
        (folder / "link.bin").symlink_to(outside)
    for t in external.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    path = folder / "model.onnx"
    path.write_bytes(external.SerializeToString())
    with pytest.raises(LoadError, match=r"points outside the model's folder .*: refused"):
        OnnxModel.load(path)


def test_load_errors(tmp_path):
    with pytest.raises(LoadError, match="no such ONNX file"):
        OnnxModel.load(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00not a model")
    with pytest.raises(LoadError, match=r"junk\.onnx"):
        OnnxModel.load(junk)


def test_missing_onnx_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(OnnxUnavailableError, match=r"pip install normdoctor\[onnx\]") as info:
        require()
    assert isinstance(info.value, ImportError) and isinstance(info.value, LoadError)


# -- the onnx package's own backend test cases -------------------------------------------------------
#: Node cases (onnx/backend/test/data/node) with a normalization op, by module of
#: onnx.backend.test.case.node that generates them when the wheel does not ship the data folder.
NODE_CASE_MODULES = (
    "batch_normalization",
    "instance_normalization",
    "layernormalization",
    "groupnormalization",
    "lpnormalization",
)
BN_CASES = [
    "test_batchnorm_example",
    "test_batchnorm_epsilon",
    "test_batchnorm_example_training_mode",
    "test_batchnorm_epsilon_training_mode",
]
OTHER_CASES = {
    "test_instancenorm_example": NormFamily.INSTANCE,
    "test_layer_normalization_4d_axis1": NormFamily.LAYER,
    "test_group_normalization_example": NormFamily.GROUP,
    "test_lpnormalization_default": NormFamily.RMS,
}
PYTORCH_CONVERTED = [
    "test_BatchNorm1d_3d_input_eval",
    "test_BatchNorm2d_eval",
    "test_BatchNorm2d_momentum_eval",
    "test_BatchNorm3d_eval",
    "test_BatchNorm3d_momentum_eval",
]
ONNX_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def _wanted(name: str) -> bool:
    return name in BN_CASES or name in OTHER_CASES


def _write_case(root: Path, case) -> None:
    folder = root / case.name
    (folder / "test_data_set_0").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(case.model.SerializeToString())
    inputs, outputs = case.data_sets[0]
    for kind, values, infos in (
        ("input", inputs, case.model.graph.input),
        ("output", outputs, case.model.graph.output),
    ):
        for j, (value, info) in enumerate(zip(values, infos, strict=True)):
            tensor = numpy_helper.from_array(np.asarray(value), info.name)
            (folder / "test_data_set_0" / f"{kind}_{j}.pb").write_bytes(tensor.SerializeToString())


@pytest.fixture(scope="module")
def node_cases(tmp_path_factory) -> dict[str, Path]:
    """The shipped node test folders, or the same folders written by onnx's own generator."""
    shipped = ONNX_DATA / "node"
    if shipped.is_dir():
        return {p.name: p for p in shipped.iterdir() if _wanted(p.name)}
    import onnx.backend.test.case.node as node_cases_pkg

    # Fast path: importing a generator module of onnx.backend.test.case.node runs its export
    # functions, which register their cases; the slow public path collects every op's cases.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # onnx's generators divide by zero
        for module_name in NODE_CASE_MODULES:
            importlib.import_module(f"{node_cases_pkg.__name__}.{module_name}")
        cases = list(getattr(node_cases_pkg, "_NodeTestCases", []))
        if not any(c.name in BN_CASES for c in cases):
            cases = node_cases_pkg.collect_testcases()
    root = tmp_path_factory.mktemp("onnx-node-cases")
    found = {}
    for case in cases:
        if _wanted(case.name) and case.name not in found:
            _write_case(root, case)
            found[case.name] = root / case.name
    return found


def _case_data(folder: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[np.ndarray]]:
    model = onnx.load(str(folder / "model.onnx"))
    data = folder / "test_data_set_0"
    inputs = {}
    for i, info in enumerate(model.graph.input):
        f = data / f"input_{i}.pb"
        if f.exists():
            inputs[info.name] = numpy_helper.to_array(onnx.load_tensor(str(f)))
    outputs = [
        numpy_helper.to_array(onnx.load_tensor(str(data / f"output_{j}.pb")))
        for j in range(len(model.graph.output))
    ]
    return model, inputs, outputs


def test_node_cases_are_discovered(node_cases):
    assert set(BN_CASES) <= set(node_cases)
    assert sum("training_mode" in n for n in node_cases) == 2


@pytest.mark.parametrize("case", BN_CASES)
def test_backend_batchnorm_cases_scan_and_survive_a_noop_rewrite(case, node_cases, tmp_path):
    proto, inputs, expected = _case_data(node_cases[case])
    model = OnnxModel(proto, name=case)
    (layer,) = model.find_norm_layers()
    attrs = {a.name: helper.get_attribute_value(a) for a in proto.graph.node[0].attribute}
    assert layer.kind == "BatchNormalization"
    assert layer.eps == pytest.approx(attrs.get("epsilon", 1e-5), rel=1e-6)
    x = inputs["x"].copy()
    params = {k: v for k, v in inputs.items() if k != "x"}
    training = bool(attrs.get("training_mode", 0))

    # round trip through the writer, every input still fed: the expected outputs
    out = model.save(tmp_path / "roundtrip.onnx")
    got = _session_outputs(str(out), inputs)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=BACKEND_RTOL, atol=BACKEND_ATOL)

    if training:
        assert layer.family is NormFamily.BATCH_STATS_ONLY and not layer.batch_dependent
        report = model.bind_inputs(params).scan(x, batch_size=len(x), shuffle=False)
        assert report.layers[0].status is LayerStatus.NOT_MEASURED
        return
    # parameters fed at run time: listed, and the scan says why it cannot measure them
    assert layer.family is NormFamily.BATCH
    report = model.scan(x, batch_size=len(x), shuffle=False)
    assert report.layers[0].status is LayerStatus.NOT_EXECUTED
    assert "bind_inputs" in report.layers[0].reason
    bound = model.bind_inputs(params)
    report = bound.scan(x, batch_size=len(x), shuffle=False)
    train = report.layers[0].train
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(
        train.pooled_mean, x64.mean(axis=(0, 2, 3)), rtol=NUMPY_RTOL, atol=NUMPY_ATOL
    )
    np.testing.assert_allclose(
        train.pooled_var, x64.var(axis=(0, 2, 3)), rtol=NUMPY_RTOL, atol=NUMPY_ATOL
    )
    np.testing.assert_array_equal(report.layers[0].running_var, params["var"].astype(np.float64))

    # no-op rewrite: the running statistics written back through the recalibration writer
    sd = bound.state_dict()
    same = bound.with_running_stats(
        {layer.name: (sd[f"{layer.name}.running_mean"], sd[f"{layer.name}.running_var"])}
    )
    out = same.save(tmp_path / "noop.onnx")
    saved = onnx.load(str(out))
    assert saved.opset_import[0].version == proto.opset_import[0].version
    (got,) = _session_outputs(str(out), {"x": x})
    np.testing.assert_allclose(got, expected[0], rtol=BACKEND_RTOL, atol=BACKEND_ATOL)
    # and the batch-statistics rewrite reproduces what training mode computes
    (bs,) = bound.patch("batchstats").run(x)
    mu = x64.mean(axis=(0, 2, 3), keepdims=True)
    var = x64.var(axis=(0, 2, 3), keepdims=True)
    s, b = (params[k].astype(np.float64).reshape(1, -1, 1, 1) for k in ("s", "bias"))
    train_mode = (x64 - mu) / np.sqrt(var + layer.eps) * s + b
    np.testing.assert_allclose(bs, train_mode, rtol=BACKEND_RTOL, atol=1e-5)


@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_backend_batch_independent_cases_are_listed_and_round_trip(case, node_cases, tmp_path):
    if case not in node_cases:
        pytest.skip(f"{case} is not among this onnx version's node cases")
    proto, inputs, expected = _case_data(node_cases[case])
    model = OnnxModel(proto, name=case)
    (layer,) = model.find_norm_layers()
    assert layer.family is OTHER_CASES[case] and not layer.batch_dependent
    x = inputs[proto.graph.input[0].name].copy()
    report = model.scan(x, batch_size=len(x))
    assert report.layers[0].status is LayerStatus.NOT_MEASURED
    assert report.status is normdoctor.Verdict.OK and "nothing can drift" in report.verdict
    out = model.save(tmp_path / "roundtrip.onnx")
    got = _session_outputs(str(out), inputs)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=BACKEND_RTOL, atol=BACKEND_ATOL)


@pytest.mark.parametrize("case", PYTORCH_CONVERTED)
def test_backend_opset6_batchnorm_cases(case, tmp_path):
    """Opset 6, IR 3 (initializers listed as inputs): onnxruntime runs them after an in-memory
    upgrade to opset 7; rewrites keep opset 6."""
    folder = ONNX_DATA / "pytorch-converted" / case
    proto = onnx.load(str(folder / "model.onnx"))
    x = numpy_helper.to_array(
        onnx.load_tensor(str(folder / "test_data_set_0" / "input_0.pb"))
    ).copy()
    expected = numpy_helper.to_array(
        onnx.load_tensor(str(folder / "test_data_set_0" / "output_0.pb"))
    )
    model = OnnxModel.load(folder / "model.onnx")
    (layer,) = model.find_norm_layers()
    attrs = {a.name: helper.get_attribute_value(a) for a in proto.graph.node[0].attribute}
    assert layer.family is NormFamily.BATCH
    assert layer.momentum == pytest.approx(1 - attrs["momentum"], rel=1e-6)
    report = model.scan(x, batch_size=len(x), shuffle=False)
    assert any("upgrade to opset 7" in n for n in report.notes)
    dims = tuple(d for d in range(x.ndim) if d != 1)
    np.testing.assert_allclose(
        report.layers[0].train.pooled_mean,
        x.astype(np.float64).mean(axis=dims),
        rtol=NUMPY_RTOL,
        atol=NUMPY_ATOL,
    )
    (got,) = model.run(x)
    np.testing.assert_allclose(got, expected, rtol=BACKEND_RTOL, atol=BACKEND_ATOL)
    sd = model.state_dict()
    same = model.with_running_stats(
        {layer.name: (sd[f"{layer.name}.running_mean"], sd[f"{layer.name}.running_var"])}
    )
    out = same.save(tmp_path / "noop.onnx")
    saved = onnx.load(str(out))
    assert saved.opset_import[0].version == 6 and saved.ir_version == proto.ir_version
    upgraded = onnx.version_converter.convert_version(saved, 7)
    (got,) = _session_outputs(upgraded, {proto.graph.input[0].name: x})
    np.testing.assert_allclose(got, expected, rtol=BACKEND_RTOL, atol=BACKEND_ATOL)
    # InstanceNorm at opset 6 needs no upgrade of the graph (1d input: spatial length 3)
    inst = model.patch("instance").save(tmp_path / "inst.onnx")
    assert onnx.load(str(inst)).opset_import[0].version == 6
    with pytest.raises(ConversionError, match="needs opset >= 7"):
        model.patch("batchstats")


def test_instance_conversion_equals_batchstats_at_batch_size_one(test_data):
    """BatchNorm at batch size 1 over spatial dims is InstanceNorm with the same affine."""
    x, _ = test_data
    model = OnnxModel.load(SM / "tiny-batch.onnx")
    inst, stats = model.patch("instance"), model.patch("batchstats")
    for i in range(5):
        (a,) = inst.run(x[i : i + 1])
        (b,) = stats.run(x[i : i + 1])
        np.testing.assert_allclose(a, b, rtol=0, atol=LOGIT_ATOL)
    assert math.isfinite(float(np.abs(a).sum()))


# -- issue 14: batch dimensions written as -1, folded convolutions ----------------------------------
@pytest.mark.parametrize("batch", [-1, 0], ids=["dim_value-1", "dim_value0"])
def test_batch_dimension_written_as_non_positive_is_dynamic(batch, test_data):
    """paddle2onnx marks a dynamic batch as ``dim_value: -1``: the same scan as a named dim."""
    marked = OnnxModel(_fix_batch(onnx.load(str(SM / "tiny-batch.onnx")), batch), name="paddle")
    assert marked.proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch
    named = OnnxModel.load(SM / "tiny-batch.onnx")
    for size in (1, 8, 64):  # 1: the size a fixed -1 was taken for, chunked into nothing
        got = marked.scan(test_data, batch_size=size, max_batches=6)
        want = named.scan(test_data, batch_size=size, max_batches=6)
        assert got.to_dict()["layers"] == want.to_dict()["layers"]  # same graph, same numbers
        assert got.end_to_end == want.end_to_end and got.status == want.status
        assert not any("fixed batch size" in note for note in got.notes)
    assert got.end_to_end.acc_eval is not None  # a verdict with labels


def test_own_graph_with_batch_minus_one_scans_like_numpy():
    x = np.random.default_rng(3).normal(1.0, 2.0, (40, 3, 4, 4)).astype(np.float32)
    model = OnnxModel(_bn_graph([-1, 3, 4, 4], 3), name="minus-one")
    report = model.scan(torch.from_numpy(x), batch_size=8, shuffle=False)
    (layer,) = report.layers
    relu = np.maximum(x, 0).astype(np.float64)  # the node normalizes Relu(x)
    np.testing.assert_allclose(
        layer.train.pooled_mean, relu.mean(axis=(0, 2, 3)), rtol=NUMPY_RTOL, atol=NUMPY_ATOL
    )
    assert layer.train.batches == 5


def _conv(i: int, src: str, bias: bool, rng: np.random.Generator) -> tuple[list, list]:
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), f"w{i}")]
    inputs = [src, f"w{i}"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), f"b{i}"))
        inputs.append(f"b{i}")
    return [helper.make_node("Conv", inputs, [f"c{i}"], name=f"conv{i}", pads=[1] * 4)], inits


def _detector(folded: int, kept: int) -> onnx.ModelProto:
    """``folded`` Conv(bias)->Relu blocks, one Conv(bias)->SiLU, ``kept`` Conv->BN->Relu, and
    a Conv(bias) head without activation (a box regressor never had a BatchNorm)."""
    rng = np.random.default_rng(0)
    nodes, inits, src, i = [], [], "x", 0
    for _ in range(folded):
        n, t = _conv(i, src, True, rng)
        nodes += [*n, helper.make_node("Relu", [f"c{i}"], [f"a{i}"], name=f"relu{i}")]
        inits += t
        src, i = f"a{i}", i + 1
    n, t = _conv(i, src, True, rng)  # SiLU as exporters write it: x * Sigmoid(x)
    nodes += [
        *n,
        helper.make_node("Sigmoid", [f"c{i}"], [f"s{i}"], name=f"sigmoid{i}"),
        helper.make_node("Mul", [f"c{i}", f"s{i}"], [f"a{i}"], name=f"silu{i}"),
    ]
    inits += t
    src, i = f"a{i}", i + 1
    for _ in range(kept):
        n, t = _conv(i, src, False, rng)
        stats = [
            numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), f"g{i}"),
            numpy_helper.from_array(rng.normal(0, 1, 4).astype(np.float32), f"be{i}"),
            numpy_helper.from_array(rng.normal(0, 1, 4).astype(np.float32), f"m{i}"),
            numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), f"v{i}"),
        ]
        bn_in = [f"c{i}", f"g{i}", f"be{i}", f"m{i}", f"v{i}"]
        nodes += [
            *n,
            helper.make_node("BatchNormalization", bn_in, [f"n{i}"], name=f"bn{i}"),
            helper.make_node("Relu", [f"n{i}"], [f"a{i}"], name=f"relu{i}"),
        ]
        inits += t + stats
        src, i = f"a{i}", i + 1
    n, t = _conv(i, src, True, rng)
    nodes += n
    inits += t
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [helper.make_tensor_value_info(f"c{i}", TensorProto.FLOAT, ["N", 4, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


FOLDED_NOTE = (
    "{} of {} convolutions look folded (no BatchNormalization after them): nothing to measure there"
)


def test_convolutions_folded_beside_the_batchnorm_left_are_counted(tmp_path, capsys):
    from normdoctor.cli import main
    from normdoctor.sources.onnx.graph import folded_convs

    proto = _detector(folded=8, kept=3)
    assert folded_convs(proto) == (9, 13)  # 8 Relu + 1 SiLU; not the 3 kept, not the head
    model = OnnxModel(proto, name="detector")
    note = FOLDED_NOTE.format(9, 13)
    assert model.notes() == [note]
    assert [(f.code, f.message) for f in model.static_checks()] == [("batchnorm-folded", note)]
    x = torch.from_numpy(np.random.default_rng(1).normal(0, 1, (32, 4, 6, 6)).astype(np.float32))
    report = model.scan(x, batch_size=16)
    assert [layer.name for layer in report.layers] == ["bn9", "bn10", "bn11"]
    assert note in report.notes
    path = _save(proto, tmp_path / "detector.onnx")
    code = main(["layers", str(path)])
    out, _ = capsys.readouterr()
    assert code == 0 and note in out


def test_folded_count_stays_quiet_when_most_batchnorm_is_kept():
    # one stem convolution without BatchNorm beside many with: a count would mislead
    proto = _detector(folded=0, kept=6)
    assert OnnxModel(proto, name="mostly-kept").notes() == []
    # every BatchNorm folded: the existing sentence, now with the count
    (note,) = OnnxModel.load(SM / "healthy-folded.onnx").notes()
    assert note.startswith("no BatchNormalization left: folded at export, nothing to measure")
    assert "3 of 3 convolutions look folded" in note
    assert OnnxModel.load(SM / "healthy.onnx").notes() == []


# -- fixes dispatch on the model --------------------------------------------------------------------
def test_patch_and_autopatch_take_a_graph_and_verify_it(test_data):
    """normdoctor.patch / autopatch rewrite an OnnxModel through the graph's own rewrites and
    verify the result like a PyTorch model's (same scan, same paired measurement)."""
    tiny = OnnxModel.load(SM / "tiny-batch.onnx")
    fixed = normdoctor.patch(tiny, to="instance")
    assert isinstance(fixed, OnnxModel) and fixed is not tiny
    assert {r.op_type for r in fixed.norm_nodes()} == {"InstanceNormalization"}
    assert {r.op_type for r in tiny.norm_nodes()} == {"BatchNormalization"}  # untouched
    with pytest.raises(ConversionError, match="fine-tuning"):
        normdoctor.patch(tiny, to="renorm")
    patched, before, after = normdoctor.autopatch(tiny, test_data, train_batch_size=1)
    assert before.status.harmful and not after.status.harmful
    check = patched.normdoctor_verification
    assert isinstance(patched, OnnxModel) and check.ok and check.metric == "accuracy"
    assert check.after > check.before + 0.3  # 37% -> about 98% in eval mode, same samples
    healthy = OnnxModel.load(SM / "healthy.onnx")
    same, b, a = normdoctor.autopatch(healthy, test_data, batch_size=32)
    assert a is b and not b.status.harmful and isinstance(same, OnnxModel)


def test_graph_recalibration_takes_progress_true_false_or_a_callback(calib_data):
    graph = OnnxModel.load(SM / "healthy.onnx")
    calls = []
    a = graph.patch("recalibrate", data=calib_data, progress=lambda d, t: calls.append((d, t)))
    b = graph.patch("recalibrate", data=calib_data, progress=True)
    c = graph.patch("recalibrate", data=calib_data, progress=False)
    assert calls and calls[-1][0] == calls[-1][1]  # one call per depth, the last one done
    assert a.state_dict().keys() == b.state_dict().keys() == c.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]) and torch.equal(value, c.state_dict()[key])

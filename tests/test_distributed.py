"""Sharded scans over 2 gloo processes on CPU equal the one-process scan."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _dist_worker import data, model, run

import normdoctor as nd

pytestmark = pytest.mark.slow


def _spawn(tmp_path, mode: str) -> None:
    mp.spawn(run, args=(2, str(tmp_path / "init"), str(tmp_path), mode), nprocs=2, join=True)


def _close(a, b, rel: float) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
    return a == b


def test_two_process_scan_equals_one_process_scan_with_uneven_shards(tmp_path):
    _spawn(tmp_path, "equal")
    assert not list(tmp_path.glob("*.error")), [p.read_text() for p in tmp_path.glob("*.error")]
    single = nd.scan(model(), data(), batch_size=8)
    r0 = nd.ScanReport.from_json((tmp_path / "rank0.json").read_text())
    r1 = nd.ScanReport.from_json((tmp_path / "rank1.json").read_text())
    assert r0 == r1  # every rank returns the merged report
    assert r0.composition == single.composition  # 13 batches, 100 samples, 4-8 per batch
    assert r0.end_to_end.samples == 100 and r0.end_to_end.batches == 13
    assert [l.flagged for l in r0.layers] == [l.flagged for l in single.layers]
    assert [l.recommendation for l in r0.layers] == [l.recommendation for l in single.layers]
    # Same float64 sums in another order (and re-based shifts): 1e-9 relative.
    for a, b in zip(r0.layers, single.layers, strict=True):
        for path in ("train", "eval"):
            pa, pb = getattr(a, path), getattr(b, path)
            for field in (
                "pooled_mean",
                "pooled_var",
                "drift",
                "drift_worst",
                "worst_batch",
                "shift",
                "noise",
                "noniid",
                "batch_drift",
                "batches",
                "samples",
            ):
                assert _close(getattr(pa, field), getattr(pb, field), 1e-9), (a.name, path, field)
    e0, e1 = r0.end_to_end, single.end_to_end
    assert e0.agreement == e1.agreement and e0.acc_eval == e1.acc_eval
    assert math.isclose(e0.rel_divergence, e1.rel_divergence, rel_tol=1e-9)


@pytest.mark.onnx
def test_an_onnx_scan_shards_like_a_torch_one(tmp_path):
    """The one driver shards any source: two ranks over healthy.onnx equal one process."""
    pytest.importorskip("onnxruntime")
    from _dist_worker import digits, onnx_model

    _spawn(tmp_path, "onnx")
    assert not list(tmp_path.glob("*.error")), [p.read_text() for p in tmp_path.glob("*.error")]
    single = nd.scan(onnx_model(), digits(), batch_size=32)
    r0 = nd.ScanReport.from_json((tmp_path / "rank0.json").read_text())
    r1 = nd.ScanReport.from_json((tmp_path / "rank1.json").read_text())
    assert r0 == r1 and r0.composition == single.composition  # 12 batches of 32 and 8
    assert r0.end_to_end.samples == 360 and r0.status == single.status
    e0, e1 = r0.end_to_end, single.end_to_end
    assert (e0.agreement, e0.acc_train, e0.acc_eval) == (e1.agreement, e1.acc_train, e1.acc_eval)
    # float32 taps, float64 sums re-based onto one shift: the same to float32 rounding (1e-5).
    for a, b in zip(r0.layers, single.layers, strict=True):
        assert (a.flagged, a.recommendation) == (b.flagged, b.recommendation)
        for path in ("train", "eval"):
            pa, pb = getattr(a, path), getattr(b, path)
            assert (pa.batches, pa.samples) == (pb.batches, pb.samples)
            for field in ("pooled_mean", "pooled_var", "drift", "shift", "noise"):
                np.testing.assert_allclose(
                    np.asarray(getattr(pa, field), float),
                    np.asarray(getattr(pb, field), float),
                    rtol=1e-5,
                    atol=1e-6,
                    err_msg=f"{a.name} {path} {field}",
                )


def test_a_failing_rank_fails_every_rank_without_hanging(tmp_path):
    _spawn(tmp_path, "bad-shard")
    errors = {p.name: p.read_text() for p in tmp_path.glob("*.error")}
    assert set(errors) == {"rank0.error", "rank1.error"}
    assert "rank 1 of 2 failed" in errors["rank0.error"]
    assert "forward failed on batch 1" in errors["rank1.error"]


@pytest.mark.parametrize("mode", ["sequential", "single-pass"])
def test_sharded_recalibrate_equals_one_process(tmp_path, mode):
    _spawn(tmp_path, f"recalibrate:{mode}")
    assert not list(tmp_path.glob("*.error")), [p.read_text() for p in tmp_path.glob("*.error")]
    single = nd.recalibrate(model(), data(), batch_size=8, mode=mode, layers=["1", "8"])
    expected = {k: v for k, v in single.state_dict().items() if "running" in k}
    assert not torch.equal(expected["8.running_var"], model().state_dict()["8.running_var"])
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.keys() == {k for k in expected}
        for key in ("1.running_mean", "1.running_var", "8.running_mean", "8.running_var"):
            # float64 model: only the summation order differs
            torch.testing.assert_close(
                torch.tensor(got[key], dtype=torch.float64), expected[key], rtol=1e-9, atol=1e-12
            )

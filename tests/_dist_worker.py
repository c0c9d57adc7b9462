"""Worker processes for tests/test_distributed.py (spawned; must be importable)."""

from __future__ import annotations

import datetime
import json
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import normdoctor as nd


def model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3),
        nn.InstanceNorm2d(4, track_running_stats=True, affine=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.BatchNorm1d(5),
    )
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d, nn.InstanceNorm2d)):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    # float64, so that the comparison tests the merge and not the float32 rounding of sums
    # shifted by each shard's own first batch (which agree to ~1e-7 only)
    return m.double().eval()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 + 1
    return x, torch.randint(0, 5, (100,), generator=gen)


SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def onnx_model():
    from normdoctor.sources.onnx import OnnxModel

    return OnnxModel.load(SAMPLES / "healthy.onnx")


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    d = np.load(SAMPLES / "data" / "test.npz")
    return torch.from_numpy(d["inputs"]), torch.from_numpy(d["labels"])


def run(rank: int, world: int, init_file: str, out_dir: str, mode: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    out = Path(out_dir)
    try:
        m = model()
        if mode == "bad-shard":
            x, y = data()
            shard = [(x[i : i + 8], y[i : i + 8]) for i in range(rank * 8, 48, 16)]
            if rank == 1:
                shard[1] = (
                    torch.randn(8, 5, 8, 8, dtype=torch.float64),
                    shard[1][1],
                )  # wrong channels: forward raises
            nd.scan(m, shard, distributed=True)
        elif mode.startswith("recalibrate"):
            fixed = nd.recalibrate(
                m,
                data(),
                batch_size=8,
                distributed=True,
                mode=mode.split(":")[1],
                layers=["1", "8"],
            )
            state = {k: v.tolist() for k, v in fixed.state_dict().items() if "running" in k}
            (out / f"rank{rank}.json").write_text(json.dumps(state))
        elif mode == "onnx":  # the same driver shards an ONNX graph's scan
            report = nd.scan(onnx_model(), digits(), batch_size=32, distributed=True)
            (out / f"rank{rank}.json").write_text(report.to_json())
        else:
            report = nd.scan(m, data(), batch_size=8, distributed=True)  # 13 batches: 7 + 6
            (out / f"rank{rank}.json").write_text(report.to_json())
    except nd.NormDoctorError as exc:
        (out / f"rank{rank}.error").write_text(str(exc))
    except Exception:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
    finally:
        dist.destroy_process_group()


def as_dict(report: nd.ScanReport) -> dict:
    return json.loads(report.to_json())

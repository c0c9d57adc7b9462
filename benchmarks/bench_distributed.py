"""One process against two (gloo, CPU) for the same scan: identical results, and the speedup.

    python benchmarks/bench_distributed.py [--batches 16] [--batch-size 32] [--size 64]

Every process runs one CPU thread (so both runs compute the same float32 convolutions and the
comparison of statistics is exact to float rounding): the ratio is the scaling from one worker to
two, as when each rank brings its own cores or GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKER = r"""
import json, os, sys, time, torch
sys.path.insert(0, {here!r})
from _resnet import resnet18
import normdoctor as nd
from normdoctor import distributed
torch.set_num_threads({threads})
sharded = distributed.init_from_env()
model = resnet18()
gen = torch.Generator().manual_seed(0)
x = torch.randn({n}, 3, {size}, {size}, generator=gen)
start = time.perf_counter()
report = nd.scan(model, x, batch_size={bs}, shuffle=False, distributed=sharded)
elapsed = time.perf_counter() - start
if not sharded or torch.distributed.get_rank() == 0:
    with open({out!r}, "w") as fh:
        json.dump({{"seconds": elapsed, "report": report.to_dict()}}, fh)
"""


def run(procs: int, args: argparse.Namespace, out: Path) -> dict:
    code = WORKER.format(
        here=str(HERE),
        threads=1,
        n=args.batches * args.batch_size,
        size=args.size,
        bs=args.batch_size,
        out=str(out),
    )
    script = out.with_suffix(".py")
    script.write_text(code)
    cmd = (
        [sys.executable, str(script)]
        if procs == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(procs),
            "--master-port",
            "29517",
            str(script),
        ]
    )
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


def max_rel_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        for m1, m2, v in zip(la["pooled_mean"], lb["pooled_mean"], lb["pooled_var"], strict=True):
            worst = max(worst, abs(m1 - m2) / max(v, 1e-30) ** 0.5)  # mean: relative to the std
        for v1, v2 in zip(la["pooled_var"], lb["pooled_var"], strict=True):
            worst = max(worst, abs(v1 - v2) / max(v2, 1e-30))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args, Path(tmp) / "one.json")
        two = run(2, args, Path(tmp) / "two.json")
    same_flags = [l["flagged"] for l in one["report"]["layers"]] == [
        l["flagged"] for l in two["report"]["layers"]
    ]
    print(
        f"ResNet-18-shaped CNN, {args.batches} batches of {args.batch_size}x3x{args.size}x{args.size}"
    )
    print(
        f"1 process: {one['seconds']:.2f} s   2 processes (gloo): "
        f"{two['seconds']:.2f} s   speedup {one['seconds'] / two['seconds']:.2f}x"
    )
    print(
        f"pooled statistics: max relative difference (means relative to the std) {max_rel_diff(one['report'], two['report']):.1e}; "
        f"same flags: {same_flags}"
    )


if __name__ == "__main__":
    main()

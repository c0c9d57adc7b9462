"""Scan overhead against a plain forward, and memory against the amount of data.

    python benchmarks/bench_scan.py [--batch-sizes 32] [--sizes 64] [--batches 8] [--rounds 5]
    python benchmarks/bench_scan.py --batch-sizes 8,32,128 --sizes 32,64 --no-memory   # the grid

Time: per round, interleaved, a plain ``torch.no_grad()`` forward over the same batches in the
same mode (train-mode BatchNorm for the train path, eval for the eval path) and ``scan`` on that
path alone, once with the fused kernel (numba) and once with stock torch
ops.  Each scan sits between two plain runs and its ratio is to their mean; the table shows the
median ratio over rounds (and median times).  "fixed ms" is what one scan costs beyond its forwards whatever the
number of batches (hooks, accumulators, report), measured as scan minus plain on one batch.  Memory: peak RSS of a fresh process scanning 1x and 8x as many
batches (generated on the fly, so the data itself takes no memory).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _resnet import resnet18

import normdoctor as nd
from normdoctor import _fused


def plain(model: torch.nn.Module, batches: list[torch.Tensor], path: str) -> float:
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.eval()
    saved = [(m.training, m.track_running_stats) for m in bns]
    if path == "train":  # what the train path runs: batch statistics, nothing updated
        for m in bns:
            m.training, m.track_running_stats = True, False
    start = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    elapsed = time.perf_counter() - start
    for m, (training, track) in zip(bns, saved, strict=True):
        m.training, m.track_running_stats = training, track
    return elapsed


def scanned(model: torch.nn.Module, batches: list[torch.Tensor], path: str, kernel: str) -> float:
    _fused.use(kernel)
    start = time.perf_counter()
    nd.scan(model, batches, paths=(path,))
    return time.perf_counter() - start


def peak_rss_mib(batches: int, batch_size: int, size: int) -> float:
    code = f"""
import resource, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from _resnet import resnet18
import normdoctor as nd
torch.set_num_threads(2)
model = resnet18()
gen = torch.Generator().manual_seed(0)
data = (torch.randn({batch_size}, 3, {size}, {size}, generator=gen) for _ in range({batches}))
nd.scan(model, data)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="32", help="comma-separated")
    ap.add_argument("--sizes", default="64", help="input heights/widths, comma-separated")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = resnet18()
    print(
        f"ResNet-18-shaped CNN, 20 BatchNorm2d, CPU, {torch.get_num_threads()} threads, "
        f"{args.batches} batches per run, {args.rounds} interleaved rounds, medians"
    )
    kernels = ["numba", "torch"] if _fused.use("auto") else ["torch"]
    if kernels == ["torch"]:
        print("numba does not import here: stock torch ops only")
    head = "".join(f" {k + ' ms':>9} {'ratio':>7} {'fixed ms':>8}" for k in kernels)
    print(f"{'batch':>5} {'input':>7}  {'path':5} {'plain ms':>9}{head}")
    for size in (int(v) for v in args.sizes.split(",")):
        for bs in (int(v) for v in args.batch_sizes.split(",")):
            gen = torch.Generator().manual_seed(0)
            batches = [torch.randn(bs, 3, size, size, generator=gen) for _ in range(args.batches)]
            for path in ("train", "eval"):
                for k in kernels:  # warm-up (and the kernel's one-time compile or cache load)
                    plain(model, batches[:2], path), scanned(model, batches[:2], path, k)
                # Each scan is paired with the plain forwards just before and after it, and the
                # ratio is taken per round: the machine's speed drifts between rounds (shared
                # cores), which a ratio of medians over the whole run would fold in.
                t_plain: list[float] = []
                ratio: dict[str, list[float]] = {k: [] for k in kernels}
                t_scan: dict[str, list[float]] = {k: [] for k in kernels}
                fixed: dict[str, list[float]] = {k: [] for k in kernels}
                for _ in range(args.rounds):
                    for k in kernels:
                        before = plain(model, batches, path)
                        t = scanned(model, batches, path, k)
                        after = plain(model, batches, path)
                        t_plain += [before, after]
                        t_scan[k].append(t)
                        ratio[k].append(2 * t / (before + after))
                        one = plain(model, batches[:1], path)
                        fixed[k].append(scanned(model, batches[:1], path, k) - one)
                p = statistics.median(t_plain)
                cells = ""
                for k in kernels:
                    s_k, r_k = statistics.median(t_scan[k]), statistics.median(ratio[k])
                    f_k = statistics.median(fixed[k])
                    cells += f" {s_k * 1e3:9.1f} {r_k:6.3f}x {f_k * 1e3:8.1f}"
                print(f"{bs:5d} {size:3d}x{size:<3d}  {path:5} {p * 1e3:9.1f}{cells}", flush=True)
    _fused.use()
    if not args.no_memory:
        bs, size = int(args.batch_sizes.split(",")[0]), int(args.sizes.split(",")[0])
        m1 = peak_rss_mib(args.batches, bs, size)
        m8 = peak_rss_mib(8 * args.batches, bs, size)
        print(
            f"peak RSS: {args.batches} batches {m1:.0f} MiB, {8 * args.batches} batches {m8:.0f} MiB, "
            f"growth {100 * (m8 - m1) / m1:+.1f}%"
        )


if __name__ == "__main__":
    main()

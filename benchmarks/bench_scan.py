"""Scan overhead against plain forwards, and memory against the amount of data (issue 16's cells).

    python benchmarks/bench_scan.py                  # every cell below, with their targets
    python benchmarks/bench_scan.py --only resnet --batch-sizes 8,32,128 --sizes 32,64  # a grid

Cells (each prints its target beside the measured ratio):

* ``tiny``: the tool's own case.  The tiny-batch sample model (trained at batch size 1) over the
  360 samples of ``sample_models/data/test.npz`` in batches of 1, both paths, against one plain
  eval pass plus one plain train-mode pass over the same batches.  Target 1.30x.
* ``resnet``: the ResNet-18-shaped CNN (20 BatchNorm2d), ``--batches`` batches (16) of 32 at
  64x64, each path alone, with the fused kernel (numba) and with stock torch ops; "1 batch ms"
  is scan minus plain forwards on one of those batches (the fixed cost plus one batch's
  recording).  Target 1.10x.
* ``fixed``: what one scan costs beyond its forwards whatever the number of batches (setting up
  taps and accumulators, closing them, the report) on the same 20-layer model: scan minus plain
  forwards on one batch of 2 at 32x32, whose recording costs about a microsecond per layer, so
  that the difference is the fixed cost alone.  Target 5 ms.
* ``short``: the ResNet cell with 4 batches, where the fixed cost shows.  Target 1.03x.
* ``deep``: a stack of 500 conv-BN-ReLU blocks (``_resnet.DeepBN``), 16 batches of 32 at 8x8,
  each path.  Target 1.10x.
* memory: peak RSS of a fresh process scanning 1x and 8x as many ResNet batches (generated on the
  fly, so the data itself takes no memory): it must not grow.

Timing: per round, interleaved, plain ``torch.no_grad()`` forwards over the same batches in the
same mode (train-mode BatchNorm without running-statistics updates for the train path, eval for
the eval path) and ``scan`` of that path (``search=False``: the composition is the one given).
Each scan sits between two plain runs and its ratio is to their mean; the table shows the median
ratio over rounds and median times.  The machine's speed drifts between rounds (shared cores),
which a ratio of medians over the whole run would fold in.  Beside each verdict: the lowest and
highest ratio of a round, and the fastest scan over the fastest plain run (as ``timeit`` reads
a benchmark: interference only ever adds time).  The verdict is on a 90% confidence interval of
the median ratio (``_verdict.py``): "met" or "MISSED" where the interval lies on one side of the
target, "not resolved" where it holds the target (more rounds, or a quieter machine, decide).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from _resnet import deep_bn, resnet18  # noqa: E402
from _verdict import judge, verdict, worst  # noqa: E402

import normdoctor as nd  # noqa: E402
from normdoctor import _fused  # noqa: E402

CELLS = ("tiny", "fixed", "resnet", "short", "deep")
TARGETS = {"tiny": 1.30, "resnet": 1.10, "short": 1.03, "deep": 1.10, "fixed": 5.0}


def _norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def plain(model: torch.nn.Module, batches: Sequence[torch.Tensor], path: str) -> float:
    """One plain pass in the path's mode; the model is left as it was."""
    bns = _norms(model)
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


def scanned(model: torch.nn.Module, data: object, paths: Sequence[str], **kwargs: object) -> float:
    start = time.perf_counter()
    nd.scan(model, data, paths=tuple(paths), search=False, **kwargs)  # type: ignore[arg-type]
    return time.perf_counter() - start


class Timed(NamedTuple):
    """Medians of an interleaved run, and how far its rounds spread."""

    base: float  # median s of the plain runs
    run: float  # median s of the runs measured
    ratio: float  # median per-round ratio of run to the bases around it (the verdict's)
    low: float  # lowest and highest per-round ratio
    high: float
    floor: float  # fastest run over fastest base: timeit's reading, noise only adds time
    ratios: tuple[float, ...]  # every round's (the verdict's interval, _verdict.py)

    def spread(self) -> str:
        return f"rounds {self.low:.3f}-{self.high:.3f}x, fastest/fastest {self.floor:.3f}x"


def interleaved(rounds: int, base: Callable[[], float], run: Callable[[], float]) -> Timed:
    """Each run between two bases, ``rounds`` times (after a warm-up of each)."""
    base(), run()  # warm-up (and the kernel's one-time compile or cache load)
    bases, runs, ratios = [], [], []
    for _ in range(rounds):
        before = base()
        t = run()
        after = base()
        bases += [before, after]
        runs.append(t)
        ratios.append(2 * t / (before + after))
    median = statistics.median
    return Timed(
        median(bases), median(runs), median(ratios), min(ratios), max(ratios),
        min(runs) / min(bases), tuple(ratios),
    )  # fmt: skip


def tiny_case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The tiny-batch sample model, its test inputs and labels, and the inputs one by one."""
    from normdoctor.io import load_model

    model = load_model(ROOT / "sample_models/tiny-batch.pt", arch="sample_models.archs:DigitsCNN")
    data = np.load(ROOT / "sample_models/data/test.npz")
    x = torch.from_numpy(data["inputs"]).float()
    y = torch.from_numpy(data["labels"]).long()
    return model, x, y, list(x.split(1))


def tiny_cell(rounds: int) -> None:
    model, x, y, singles = tiny_case()
    m = interleaved(
        rounds,
        lambda: plain(model, singles, "eval") + plain(model, singles, "train"),
        lambda: scanned(model, (x, y), ("train", "eval"), batch_size=1, shuffle=False),
    )
    print(
        f"tiny-batch sample model, {len(singles)} batches of 1, both paths: plain eval + train "
        f"{m.base * 1e3:.0f} ms, scan {m.run * 1e3:.0f} ms: {m.ratio:.2f}x "
        f"({verdict(m.ratios, TARGETS['tiny'])}; {m.spread()})",
        flush=True,
    )


def resnet_table(
    title: str, target: float, batches: int, batch_sizes: list[int], sizes: list[int], rounds: int
) -> None:
    model = resnet18()
    kernels = ["numba", "torch"] if _fused.use("auto") else ["torch"]
    if kernels == ["torch"]:
        print("numba does not import here: stock torch ops only")
    print(f"{title}: {batches} batches per run, {rounds} interleaved rounds, medians")
    head = "".join(f" {k + ' ms':>9} {'ratio':>7} {'1 batch ms':>10}" for k in kernels)
    print(f"{'batch':>5} {'input':>7}  {'path':5} {'plain ms':>9}{head}")
    highest = 0.0
    spreads, words = [], []
    for size in sizes:
        for bs in batch_sizes:
            gen = torch.Generator().manual_seed(0)
            data = [torch.randn(bs, 3, size, size, generator=gen) for _ in range(batches)]
            for path in ("train", "eval"):
                cells = ""
                p = 0.0
                for k in kernels:
                    _fused.use(k)
                    m = interleaved(
                        rounds,
                        lambda d=data, q=path: plain(model, d, q),
                        lambda d=data, q=path: scanned(model, d, (q,)),
                    )
                    p, t, r = m.base, m.run, m.ratio
                    one = [
                        scanned(model, data[:1], (path,)) - plain(model, data[:1], path)
                        for _ in range(rounds)
                    ]
                    f = statistics.median(one)
                    if k == kernels[0]:
                        highest = max(highest, r)
                        words.append(judge(m.ratios, target))
                        spreads.append(
                            f"{bs} {size}x{size} {path}: {verdict(m.ratios, target)}; {m.spread()}"
                        )
                    cells += f" {t * 1e3:9.1f} {r:6.3f}x {f * 1e3:10.1f}"
                print(f"{bs:5d} {size:3d}x{size:<3d}  {path:5} {p * 1e3:9.1f}{cells}", flush=True)
    _fused.use()
    for line in spreads:
        print(f"  {kernels[0]}, {line}")
    print(f"  worst ratio {highest:.3f}x (target {target:.2f}x, every cell: {worst(words)})")


def fixed_cell(rounds: int) -> None:
    model = resnet18()
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    for path in ("train", "eval"):
        scanned(model, data, (path,)), plain(model, data, path)  # warm-up
        diffs = []
        for _ in range(4 * rounds):  # about 20 ms a round: many rounds, a steady median
            before = plain(model, data, path)
            t = scanned(model, data, (path,))
            after = plain(model, data, path)
            diffs.append(t - (before + after) / 2)
        fixed = statistics.median(diffs) * 1e3
        target = TARGETS["fixed"]
        print(
            f"fixed cost of one scan, 20 layers, {path} path: {fixed:.1f} ms "
            f"({verdict([d * 1e3 for d in diffs], target, ' ms')})",
            flush=True,
        )


def deep_cell(rounds: int, batches: int, size: int) -> None:
    model = deep_bn(500)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 3, size, size, generator=gen) for _ in range(batches)]
    for path in ("train", "eval"):
        m = interleaved(
            rounds, lambda q=path: plain(model, data, q), lambda q=path: scanned(model, data, (q,))
        )
        print(
            f"500 BatchNorm2d, {batches} batches of 32 at {size}x{size}, {path} path: plain "
            f"{m.base:.2f} s, scan {m.run:.2f} s: {m.ratio:.3f}x "
            f"({verdict(m.ratios, TARGETS['deep'])}; {m.spread()})",
            flush=True,
        )


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
    ap.add_argument("--only", default=",".join(CELLS), help=f"cells, of {','.join(CELLS)}")
    ap.add_argument("--batch-sizes", default="32", help="ResNet batch sizes, comma-separated")
    ap.add_argument("--sizes", default="64", help="ResNet input heights/widths, comma-separated")
    ap.add_argument("--batches", type=int, default=16, help="batches of the resnet cell")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--deep-rounds", type=int, default=5)
    ap.add_argument("--deep-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(only) - set(CELLS))
    if unknown:
        ap.error(f"unknown cell(s) {', '.join(unknown)}: expected {', '.join(CELLS)}")
    print(f"CPU, {torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}")
    batch_sizes = [int(v) for v in args.batch_sizes.split(",")]
    sizes = [int(v) for v in args.sizes.split(",")]
    if "tiny" in only:
        tiny_cell(args.rounds)
    if "fixed" in only:
        fixed_cell(args.rounds)
    if "resnet" in only:
        resnet_table(
            "ResNet-18-shaped CNN", TARGETS["resnet"], args.batches, batch_sizes, sizes, args.rounds
        )
    if "short" in only:
        resnet_table("short scans", TARGETS["short"], 4, [32], [64], args.rounds)
    if "deep" in only:
        deep_cell(args.deep_rounds, 16, args.deep_size)
    if not args.no_memory:
        bs, size = batch_sizes[0], sizes[0]
        m1 = peak_rss_mib(args.batches, bs, size)
        m8 = peak_rss_mib(8 * args.batches, bs, size)
        print(
            f"peak RSS: {args.batches} batches {m1:.0f} MiB, {8 * args.batches} batches "
            f"{m8:.0f} MiB, growth {100 * (m8 - m1) / m1:+.1f}%"
        )


if __name__ == "__main__":
    main()

"""``autopatch`` against one ``scan`` of the same model and data, side by side.

    python benchmarks/bench_autopatch.py [--rounds 7] [--threads 1] [--profile]

The case of issue 16: the tiny-batch sample model (trained at batch size 1) on the sample test
set (360 samples with labels), both with the defaults (the composition search).  autopatch
scans, builds the patched model, scans it again at the reference composition and verifies it
against the original; per round one ``scan`` and one ``autopatch`` run interleaved, and the
table shows the median times and the median ratio.  Issue 16's target: autopatch at most 2x
one scan.  One intra-op thread by default (tiny model, batch size 1: more threads only add
overhead, and on a shared machine noise); ``--profile`` adds a breakdown of one autopatch run
by stage (cProfile, so slower than the timed runs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import normdoctor as nd  # noqa: E402
from normdoctor.io import load_model  # noqa: E402

TARGET = 2.0


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(*args, **kwargs)
    return time.perf_counter() - start


def profile(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Cumulative time of autopatch's stages (cProfile, one run)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    timed(nd.autopatch, model, data)
    prof.disable()
    stats = pstats.Stats(prof)
    wanted = ("scan", "impact", "apply_plan", "verify_patch", "path_outcomes", "one_path")
    width = max(len(w) for w in wanted)
    total = max(v[3] for v in stats.stats.values())  # type: ignore[attr-defined]
    print(f"one autopatch run, {total:.2f} s; cumulative per stage (calls):")
    for (path, _line, name), (_cc, calls, _tt, cum, _callers) in sorted(
        stats.stats.items(),  # type: ignore[attr-defined]
        key=lambda kv: -kv[1][3],
    ):
        if name in wanted and "normdoctor" in path:
            print(f"  {name:<{width}}  {cum:6.2f} s  ({calls})  {Path(path).name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    npz = np.load(ROOT / "sample_models" / "data" / "test.npz")
    data = (torch.from_numpy(npz["inputs"]), torch.from_numpy(npz["labels"]))
    model = load_model(
        ROOT / "sample_models" / "tiny-batch.pt", arch="sample_models.archs:DigitsCNN"
    )
    print(
        f"tiny-batch sample model, {len(data[0])} samples, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); defaults (composition search)"
    )
    timed(nd.scan, model, data), timed(nd.autopatch, model, data)  # warm up
    t_s, t_a, ratios = [], [], []
    for _ in range(args.rounds):
        a = timed(nd.scan, model, data)
        b = timed(nd.autopatch, model, data)
        t_s.append(a), t_a.append(b), ratios.append(b / a)
    med = statistics.median
    print(f"{'scan s':>7}  {'autopatch s':>11}  {'ratio':>6}  {'target':>6}")
    print(f"{med(t_s):>7.2f}  {med(t_a):>11.2f}  {med(ratios):>5.2f}x  {TARGET:>5.2f}x")
    if args.profile:
        profile(model, data)


if __name__ == "__main__":
    main()

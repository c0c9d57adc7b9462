"""Training step time with and without ``normdoctor.monitor``, side by side in one run.

    python benchmarks/bench_monitor.py [--rounds 5] [--steps 100] [--every 50] [--size 64]

Two identical copies of each model train on the same batches (SGD, cross-entropy): one plain,
one inside ``normdoctor.monitor(model, every=...)`` (entered once, as a training loop would).
Per round the plain copy runs ``--steps`` steps, then the watched copy, then the plain one
again; a round's ratio is the watched time over the mean of the two plain runs around it, and
the table shows the medians.  With ``--block N`` the two copies alternate every N steps
within a round instead (order alternating), which cancels the machine's drift over seconds; a
round's ratio is then the watched time over the plain time of the same steps.  Cases: the
ResNet-18-shaped CNN of ``_resnet.py`` at batch size 32 (``--size`` square inputs, ImageNet
stem) and the sample architecture ``DigitsCNN`` at batch size 1 (8x8 digits).  Issue 18's
target: at most 1.05x, judged on a 90% confidence interval of the median ratio (``_verdict.py``:
"not resolved" where the interval holds the target).

The verdict of a window (once per ``window`` steps, default 20 x every) is timed on its own and
shown amortised per step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _resnet import ResNet18  # noqa: E402  (benchmarks/ is on the path when run)
from _verdict import verdict  # noqa: E402

import normdoctor as nd  # noqa: E402
from sample_models.archs import DigitsCNN  # noqa: E402

TARGET = 1.05


def steps(model: nn.Module, opt: torch.optim.Optimizer, batches: list, mon=None) -> float:
    t = time.perf_counter()
    for x, y in batches:
        out = model(x)
        if mon is not None:
            mon.observe(out, y)
        loss = nn.functional.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def case(name: str, model: nn.Module, batches: list, args: argparse.Namespace) -> None:
    plain = model.train()
    watched = copy.deepcopy(model)
    opt_p = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    opt_w = torch.optim.SGD(watched.parameters(), lr=1e-3, momentum=0.9)
    with nd.monitor(watched, every=args.every, warn=False) as mon:
        steps(plain, opt_p, batches[:3]), steps(watched, opt_w, batches[:3], mon)  # warm up
        t_p, t_w, ratios = [], [], []
        for _ in range(args.rounds):
            if args.block:
                # Plain and watched alternate every --block steps, in alternating order: the
                # machine's speed drifts over seconds, and both runs see the same drift.
                a = b = 0.0
                for k, i in enumerate(range(0, len(batches), args.block)):
                    chunk = batches[i : i + args.block]
                    if k % 2:
                        b += steps(watched, opt_w, chunk, mon)
                        a += steps(plain, opt_p, chunk)
                    else:
                        a += steps(plain, opt_p, chunk)
                        b += steps(watched, opt_w, chunk, mon)
                t_p.append(a), t_w.append(b), ratios.append(b / a)
                continue
            a = steps(plain, opt_p, batches)
            b = steps(watched, opt_w, batches, mon)
            c = steps(plain, opt_p, batches)
            t_p.append((a + c) / 2), t_w.append(b), ratios.append(2 * b / (a + c))
        t = time.perf_counter()
        mon.current()  # what closing a window costs: reduce the recorders, judge
        closing = time.perf_counter() - t
    n = len(batches)
    med = statistics.median
    per_step = med(t_p) / n
    amortised = closing / mon.window / per_step
    print(
        f"{name:<28} {med(t_p) / n * 1e3:>9.2f} {med(t_w) / n * 1e3:>10.2f} {med(ratios):>6.3f}x"
        f" {min(ratios):>6.3f}x {max(ratios):>6.3f}x {closing * 1e3:>9.1f} {amortised:>8.2%}"
    )
    print(f"{'':<28} {verdict(ratios, TARGET)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="steps per timed run")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="ResNet input size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("resnet", "digits"), default=None)
    parser.add_argument(
        "--block",
        type=int,
        default=0,
        help="alternate plain and watched every BLOCK steps within a round (0: whole runs)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, "
        f"{args.steps} steps per run, {args.rounds} interleaved rounds, every={args.every}"
        + (f", alternating every {args.block} steps" if args.block else "")
    )
    print(
        f"{'case':<28} {'plain ms':>9} {'watched ms':>10} {'ratio':>7} {'min':>7} {'max':>7}"
        f" {'window ms':>9} {'per step':>8}"
    )
    gen = torch.Generator().manual_seed(0)
    if args.only in (None, "resnet"):
        torch.manual_seed(0)
        resnet = ResNet18(num_classes=10)
        batches = [
            (
                torch.randn(32, 3, args.size, args.size, generator=gen),
                torch.randint(0, 10, (32,), generator=gen),
            )
            for _ in range(args.steps)
        ]
        case(f"ResNet-18 bs 32, {args.size}x{args.size}", resnet, batches, args)
    if args.only in (None, "digits"):
        torch.manual_seed(0)
        digits = DigitsCNN()
        batches = [
            (torch.randn(1, 1, 8, 8, generator=gen), torch.randint(0, 10, (1,), generator=gen))
            for _ in range(args.steps)
        ]
        case("DigitsCNN bs 1, 8x8", digits, batches, args)


if __name__ == "__main__":
    main()

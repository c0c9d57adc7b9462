"""The composition search's cost against a plain scan, side by side in one run.

A plain scan runs both paths over one composition (2 passes).  The search runs the train path
once per candidate composition and the eval path once (candidates + 1 passes).  This script
counts the passes (forward calls over the data) and times, per round and side by side: a plain
scan at the reference composition; the budget, i.e. one-path scans of every candidate's train
path plus one eval pass (what candidates + 1 passes cost done separately); and the searching
scan; on the sample models (360 samples each).  Issue 16's target compares the search with
plain forward passes: every candidate's batches through the train path (batch statistics, no
running-statistics update) plus the reference's through the eval path, ``no_grad``, batches
formed beforehand: at most 1x that (candidates + 1 passes).

    python benchmarks/bench_search.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import normdoctor as nd  # noqa: E402
from sample_models.archs import DigitsCNN, DigitsUNet  # noqa: E402

SM = ROOT / "sample_models"


def _model(cls, name):
    model = cls()
    model.load_state_dict(torch.load(SM / f"{name}.pt", weights_only=True))
    return model.eval()


def plain_passes(model, data, specs, reference) -> float:
    """Seconds of plain forwards: each (batch size, group_by) of ``specs`` on the train path,
    then ``reference`` on the eval path (batches formed before the clock starts)."""
    from normdoctor.batching import plan_batches

    runs = [(spec, "train") for spec in specs] + [(reference, "eval")]
    formed = [
        [
            b.inputs
            for b in plan_batches(
                data, batch_size=bs, shuffle=True, seed=0, group_by=group, max_batches=None
            ).batches
        ]
        for (bs, group), _ in runs
    ]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    total = 0.0
    with torch.no_grad():
        for batches, (_, path) in zip(formed, runs, strict=True):
            for m in bns:
                m.training, m.track_running_stats = path == "train", path != "train"
            t = time.perf_counter()
            for x in batches:
                model(x)
            total += time.perf_counter() - t
    for m in bns:
        m.training, m.track_running_stats = False, True
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    digits = np.load(SM / "data" / "test.npz")
    pix = np.load(SM / "data" / "pix2pix-test.npz")
    cases = [
        ("tiny-batch", _model(DigitsCNN, "tiny-batch"), digits["inputs"], digits["labels"]),
        ("healthy", _model(DigitsCNN, "healthy"), digits["inputs"], digits["labels"]),
        ("pix2pix-b1", _model(DigitsUNet, "pix2pix-b1"), pix["x"], pix["y"]),
    ]
    print(
        "| model | candidates | passes (search) | plain scan at the reference (2 paths) | "
        "budget: one-path scans of every candidate + one eval pass | search | "
        "search / budget | search / plain | plain passes (candidates + 1) | "
        "search / plain passes (target 1) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, model, x, y in cases:
        data = (torch.from_numpy(x), torch.from_numpy(y))
        calls: list[int] = []

        def forward(m, inputs, calls=calls):
            calls.append(int(inputs.shape[0]))
            return m(inputs)

        nd.scan(model, data)  # warm-up (numba compile, caches)
        searched = nd.scan(model, data, forward=forward)
        passes = sum(calls) / x.shape[0]
        cands = [c for c in searched.evidence.candidates if c.measurable]
        ref = searched.composition
        plain_t, budget_t, search_t, passes_t = [], [], [], []
        specs = [(c.batch_size, c.group_by) for c in cands]
        for _ in range(args.rounds):
            passes_t.append(plain_passes(model, data, specs, (ref.batch_size, ref.group_by)))
            t0 = time.perf_counter()
            nd.scan(model, data, batch_size=ref.batch_size, group_by=ref.group_by, search=False)
            t1 = time.perf_counter()
            for c in cands:  # what the search must do at least: each candidate's train pass
                nd.scan(
                    model,
                    data,
                    batch_size=c.batch_size,
                    group_by=c.group_by,
                    paths=("train",),
                    search=False,
                )
            nd.scan(
                model,
                data,
                batch_size=ref.batch_size,
                group_by=ref.group_by,
                paths=("eval",),
                search=False,
            )
            t2 = time.perf_counter()
            nd.scan(model, data)
            t3 = time.perf_counter()
            plain_t.append(t1 - t0)
            budget_t.append(t2 - t1)
            search_t.append(t3 - t2)
        med = statistics.median
        print(
            f"| {name} | {len(searched.evidence.candidates)} | {passes:g} | "
            f"{med(plain_t):.2f} s | {med(budget_t):.2f} s | {med(search_t):.2f} s | "
            f"{med([s / b for s, b in zip(search_t, budget_t, strict=True)]):.2f}x | "
            f"{med([s / p for s, p in zip(search_t, plain_t, strict=True)]):.2f}x | "
            f"{med(passes_t):.2f} s | "
            f"{med([s / p for s, p in zip(search_t, passes_t, strict=True)]):.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

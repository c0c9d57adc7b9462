"""The composition search's cost against a plain scan, side by side in one run.

A plain scan runs both paths over one composition (2 passes).  The search runs the train path
once per candidate composition and the eval path once (candidates + 1 passes).  This script
counts the passes (forward calls over the data) and times, per round, a plain scan at the
reference composition and the searching scan, on the sample models (digits, 360 samples).

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
        "| model | candidates | passes (search) | plain scan | search | search / plain | "
        "search / (candidates + 1) passes of the plain scan's per-pass time |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, model, x, y in cases:
        data = (torch.from_numpy(x), torch.from_numpy(y))
        calls: list[int] = []

        def forward(m, inputs, calls=calls):
            calls.append(int(inputs.shape[0]))
            return m(inputs)

        nd.scan(model, data)  # warm-up (numba compile, caches)
        searched = nd.scan(model, data, forward=forward)
        passes = sum(calls) / x.shape[0]
        k = len(searched.evidence.candidates)
        ref = searched.composition.batch_size
        plain_t, search_t = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            nd.scan(model, data, batch_size=ref, search=False)
            t1 = time.perf_counter()
            nd.scan(model, data)
            t2 = time.perf_counter()
            plain_t.append(t1 - t0)
            search_t.append(t2 - t1)
        plain, search = statistics.median(plain_t), statistics.median(search_t)
        ratios = [s / p for s, p in zip(search_t, plain_t, strict=True)]
        per_pass = plain / 2  # a plain scan is two passes
        print(
            f"| {name} | {k} | {passes:g} | {plain:.2f} s | {search:.2f} s | "
            f"{statistics.median(ratios):.2f}x | {search / ((k + 1) * per_pass):.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

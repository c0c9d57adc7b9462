"""Inference of an InstanceNorm-patched model against its original, side by side.

    python benchmarks/bench_patch.py [--rounds 7] [--samples 360]

The tool's own case: the tiny-batch sample model (trained at batch size 1), patched with
``to="instance"``, run one sample at a time over the sample test set, against the original's
eval-mode forward over the same samples.  Per round the three runs are interleaved (original,
patched, the patched model with ``torch.instance_norm`` forced, i.e. the formulation before the
fast path) and the table shows the median time and the median ratio to the original.  Issue 16's
target for the patched model: at most 1.10x the original's eval forward.  Also at batch size 32
(InstanceNorm's own kernel, unchanged), for the record.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import normdoctor as nd  # noqa: E402
from normdoctor.convert.modules import InstanceNormFromBN  # noqa: E402
from normdoctor.io import load_model  # noqa: E402


def run(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for x in batches:
            model(x)
    return time.perf_counter() - start


class SlowInstance:
    """Every InstanceNormFromBN of a model through torch.instance_norm (the old formulation)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, InstanceNormFromBN)]

    def __enter__(self) -> None:
        for m in self.layers:
            m.forward = self._slow(m)  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        for m in self.layers:
            del m.forward

    @staticmethod
    def _slow(m: InstanceNormFromBN):
        base = torch.nn.modules.instancenorm._InstanceNorm.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            return m._apply_post(base(m, x))

        return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--samples", type=int, default=360)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one sample at a time: what a per-sample service runs
    data = np.load(ROOT / "sample_models" / "data" / "test.npz")
    x = torch.from_numpy(data["inputs"])[: args.samples]
    original = load_model(
        ROOT / "sample_models" / "tiny-batch.pt", arch="sample_models.archs:DigitsCNN"
    ).eval()
    patched = nd.patch(original, to="instance").eval()
    print(f"tiny-batch sample model, {len(x)} samples, torch {torch.__version__}, 1 thread")
    print(
        f"{'batch':>5}  {'original ms':>11}  {'patched ms':>10}  {'ratio':>6}  "
        f"{'instance_norm ms':>16}  {'ratio':>6}"
    )
    for bs in (1, 32):
        batches = list(x.split(bs))
        for _ in range(2):  # warm up
            run(original, batches), run(patched, batches)
        t_o, t_p, t_s, r_p, r_s = [], [], [], [], []
        for _ in range(args.rounds):
            a = run(original, batches)
            b = run(patched, batches)
            with SlowInstance(patched):
                c = run(patched, batches)
            t_o.append(a), t_p.append(b), t_s.append(c), r_p.append(b / a), r_s.append(c / a)
        med = statistics.median
        print(
            f"{bs:>5}  {med(t_o) * 1e3:>11.1f}  {med(t_p) * 1e3:>10.1f}  {med(r_p):>5.2f}x  "
            f"{med(t_s) * 1e3:>16.1f}  {med(r_s):>5.2f}x"
        )


if __name__ == "__main__":
    main()

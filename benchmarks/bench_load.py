"""Peak memory of loading a large state_dict with and without ``mmap=True``.

Run from the repository root::

    python benchmarks/bench_load.py              # ~500 MB checkpoint
    python benchmarks/bench_load.py --size-mb 200

Each measurement runs in a fresh subprocess and reports, above the process's own baseline
(torch and normdoctor imported):

* ``peak RSS``: the kernel's high-water mark (``VmHWM`` in /proc/self/status; ``ru_maxrss``
  where /proc is missing).  It counts every resident page, including pages of the mmapped
  file, which are clean page cache the kernel can drop at any time.
* ``peak anon``: the largest anonymous resident memory (``RssAnon``) sampled every 2 ms:
  the memory that really has to be there.

Scenarios: reading the checkpoint for the static checks (:func:`normdoctor.io.load_checkpoint`
plus :func:`normdoctor.checks.static_checks_for`, which touch only the norm buffers), and
building a model and loading the weights into it (:func:`normdoctor.io.load_model`), each with
``torch.load(..., mmap=True)`` (what normdoctor does) and without (a plain ``torch.load``).
The ratios printed at the end are measured in this run.  A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 2048  # one block: Linear(WIDTH, WIDTH) + BatchNorm1d(WIDTH), ~16.8 MB in float32


class BigNet(nn.Module):
    """A stack of Linear + BatchNorm1d blocks: weights dominate, a few norm layers to check."""

    def __init__(self, blocks: int = 30, width: int = WIDTH) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width)) for _ in range(blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_rss_kb() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB elsewhere


class _AnonSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _status_kb("RssAnon") or 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _status_kb("RssAnon") or 0)
            time.sleep(0.002)


def _child(scenario: str, path: str, blocks: int) -> None:
    """Run one scenario in this (fresh) process and print a JSON line."""
    sys.path.insert(0, str(ROOT))
    from normdoctor.checks import static_checks, static_checks_for
    from normdoctor.io import load_checkpoint, load_model

    base_rss, base_anon = _peak_rss_kb(), _status_kb("RssAnon") or 0
    sampler = _AnonSampler()
    sampler.start()
    t0 = time.perf_counter()
    if scenario == "checks-mmap":
        findings = static_checks_for(load_checkpoint(path))
    elif scenario == "checks-read":
        findings = static_checks(torch.load(path, weights_only=True, mmap=False))
    elif scenario == "model-mmap":
        model = load_model(path, f"{__file__}:BigNet", arch_kwargs={"blocks": blocks})
        findings = static_checks(model)
    elif scenario == "model-read":
        model = BigNet(blocks)
        model.load_state_dict(torch.load(path, weights_only=True, mmap=False))
        findings = static_checks(model)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    print(
        json.dumps(
            {
                "scenario": scenario,
                "seconds": seconds,
                "peak_rss_mb": (_peak_rss_kb() - base_rss) / 1024,
                "peak_anon_mb": (sampler.peak - base_anon) / 1024,
                "findings": len(findings),
            }
        )
    )


def _measure(scenario: str, path: Path, blocks: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", scenario, str(path), "--blocks", str(blocks)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=500.0, help="checkpoint size")
    parser.add_argument("--child", nargs=2, metavar=("SCENARIO", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--blocks", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.blocks)
        return
    block_mb = (WIDTH * WIDTH + 5 * WIDTH) * 4 / 2**20
    blocks = max(1, round(args.size_mb / block_mb))
    with tempfile.TemporaryDirectory(prefix="normdoctor-bench-") as tmp:
        path = Path(tmp) / "big.pt"
        torch.manual_seed(0)
        model = BigNet(blocks)
        torch.save(model.state_dict(), path)
        del model
        size_mb = path.stat().st_size / 2**20
        print(
            f"checkpoint: {size_mb:.0f} MB ({blocks} Linear+BatchNorm1d blocks), torch {torch.__version__}"
        )
        results = {
            s: _measure(s, path, blocks)
            for s in ("checks-read", "checks-mmap", "model-read", "model-mmap")
        }
    print(f"{'scenario':<14}{'seconds':>9}{'peak RSS MB':>13}{'peak anon MB':>14}")
    for name, r in results.items():
        print(f"{name:<14}{r['seconds']:>9.2f}{r['peak_rss_mb']:>13.0f}{r['peak_anon_mb']:>14.0f}")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.1f}x" if b > 1 else f"{a:.0f} MB vs <1 MB"

    for kind in ("checks", "model"):
        read, mapped = results[f"{kind}-read"], results[f"{kind}-mmap"]
        print(
            f"{kind}: without mmap / with mmap = "
            f"{ratio(read['peak_rss_mb'], mapped['peak_rss_mb'])} peak RSS, "
            f"{ratio(read['peak_anon_mb'], mapped['peak_anon_mb'])} peak anonymous memory"
        )


if __name__ == "__main__":
    main()

"""Overhead in instructions, not seconds: the scan and the monitor under callgrind.

    python benchmarks/bench_instructions.py                  # every cell
    python benchmarks/bench_instructions.py --only monitor   # one

On a shared 2-core machine a round of the time cells moves by 10-15% from one round to the
next, more than the overheads they measure (a few percent).  Instructions retired do not
depend on what else the machine runs: callgrind counts every instruction of the process, and
with the hash seed fixed the same command gives the same count to a few instructions in a
million.  They are a proxy, not the target (a
cache miss costs many instructions' time, a vectorised kernel few), so the issue's targets stay
in the time cells (``bench_scan.py``, ``bench_monitor.py``); this bench decides which of two
versions of a hot path does less work, and how the overhead splits.

Each cell runs in a child process under ``valgrind --tool=callgrind --instr-atstart=no``:
importing torch runs uninstrumented, and the child switches counting on (a callgrind client
request through a ten-line C helper, compiled here with gcc against valgrind's header) only
around the measured phases, dumping the count after each.  Phases, each after a warm-up:

* ``monitor``: 200 training steps (SGD, cross-entropy) of ``DigitsCNN`` at batch size 1, plain
  then inside ``normdoctor.monitor(every=50)`` then plain again.  Issue 18's target in time:
  at most 1.05x.
* ``tiny``: the tiny-batch sample model over its 360 test samples in batches of 1, both paths
  (``scan(..., search=False)``), against one plain eval pass plus one plain train-mode pass.
  Issue 16's target in time: at most 1.30x.
* ``fixed``: five scans of one batch of 2 at 32x32 of the 20-layer ResNet against five plain
  forwards, eval path: the scan's fixed cost in instructions (issue 16's target in time: 5 ms).
* ``deep``: a scan of the 500-layer stack (``_resnet.DeepBN``) over 4 batches of 32 at 8x8,
  eval path, against plain forwards over them (issue 16's target in time: 1.10x, 16 batches).

``--cache-sim`` also simulates the caches (callgrind's ``--cache-sim=yes``, about twice as
slow) and prints first-level and last-level misses and an estimate of cycles, kcachegrind's
``Ir + 10 x L1 misses + 100 x LL misses``: holding inputs until later, or reading them cold,
costs misses that instructions alone do not show.  Still a simulation of this machine's cache
sizes, not its time.

Needs valgrind, gcc and ``valgrind/callgrind.h`` (Debian: ``valgrind``); says so and exits 0
where one is missing.  A cell takes one to five minutes (valgrind runs code 20-50 times slower).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELLS = ("monitor", "tiny", "fixed", "deep")
TARGETS = {"monitor": "1.05x in time", "tiny": "1.30x in time", "fixed": "5 ms in time",
           "deep": "1.10x in time"}  # fmt: skip
DEEP_BATCHES = 4
STEPS = 200  # training steps of the monitor cell's phases
SCANS = 5  # scans of the fixed cell's phase: one alone moved by +-1M instructions between runs


def _units(cell: str) -> tuple[int, str]:
    """What the cell's extra instructions are divided by."""
    if cell == "monitor":
        return STEPS, "step"
    if cell == "tiny":  # every test sample through both paths, in batches of 1
        import numpy as np

        return 2 * len(np.load(ROOT / "sample_models/data/test.npz")["labels"]), "forward"
    if cell == "deep":
        return DEEP_BATCHES * 500, "layer call"
    return SCANS, "scan"


_HELPER = """
#include <valgrind/callgrind.h>
void nd_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void nd_zero(void) { CALLGRIND_ZERO_STATS; }
void nd_dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""


def _missing() -> str | None:
    for tool in ("valgrind", "gcc"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    if not Path("/usr/include/valgrind/callgrind.h").exists():
        return "valgrind/callgrind.h not found (Debian: apt-get install valgrind)"
    return None


def _build_helper(where: Path) -> Path:
    src, lib = where / "nd_callgrind.c", where / "libnd_callgrind.so"
    src.write_text(_HELPER)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib


# -- the child: phases under callgrind ---------------------------------------------------------
class Counter:
    """Count only inside :meth:`phase` blocks (the child runs under callgrind)."""

    def __init__(self, lib: str) -> None:
        self._lib = ctypes.CDLL(lib)
        self._started = False

    def phase(self, label: str, fn: Callable[[], object]) -> None:
        if not self._started:
            self._lib.nd_start()
            self._started = True
        self._lib.nd_zero()
        fn()
        self._lib.nd_dump(label.encode())


def _monitor_cell(count: Counter) -> None:
    import copy

    import torch
    from torch import nn

    import normdoctor as nd
    from sample_models.archs import DigitsCNN

    def steps(model: nn.Module, opt: torch.optim.Optimizer, mon: object = None) -> None:
        for x, y in batches:
            out = model(x)
            if mon is not None:
                mon.observe(out, y)  # type: ignore[attr-defined]
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    torch.manual_seed(0)
    plain = DigitsCNN().train()
    watched = copy.deepcopy(plain)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(1, 1, 8, 8, generator=gen), torch.randint(0, 10, (1,), generator=gen))
        for _ in range(STEPS)
    ]
    opt_p = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    opt_w = torch.optim.SGD(watched.parameters(), lr=1e-3, momentum=0.9)
    with nd.monitor(watched, every=50, warn=False) as mon:
        steps(plain, opt_p), steps(watched, opt_w, mon)  # warm-up: a full kernel flush or more
        count.phase("plain", lambda: steps(plain, opt_p))
        count.phase("tool", lambda: steps(watched, opt_w, mon))
        count.phase("plain", lambda: steps(plain, opt_p))


def _tiny_cell(count: Counter) -> None:
    from bench_scan import plain, tiny_case

    import normdoctor as nd

    model, x, y, singles = tiny_case()

    def base() -> None:
        plain(model, singles, "eval")
        plain(model, singles, "train")

    def run() -> None:
        nd.scan(model, (x, y), paths=("train", "eval"), search=False, batch_size=1, shuffle=False)

    run(), base()
    count.phase("plain", base)
    count.phase("tool", run)
    count.phase("plain", base)


def _fixed_cell(count: Counter) -> None:
    import torch
    from _resnet import resnet18
    from bench_scan import plain

    import normdoctor as nd

    model = resnet18()
    data = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))]

    def run() -> None:
        for _ in range(SCANS):
            nd.scan(model, data, paths=("eval",), search=False)

    def base() -> None:
        for _ in range(SCANS):
            plain(model, data, "eval")

    run(), base()
    count.phase("plain", base)
    count.phase("tool", run)
    count.phase("plain", base)


def _deep_cell(count: Counter) -> None:
    import torch
    from _resnet import deep_bn
    from bench_scan import plain

    import normdoctor as nd

    model = deep_bn(500)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(32, 3, 8, 8, generator=gen) for _ in range(DEEP_BATCHES)]

    def run() -> None:
        nd.scan(model, data, paths=("eval",), search=False)

    def base() -> None:
        plain(model, data, "eval")

    run(), base()
    count.phase("plain", base)
    count.phase("tool", run)
    count.phase("plain", base)


def _child(cell: str, lib: str) -> None:
    import torch

    torch.set_num_threads(1)  # one thread: the count does not depend on the split
    sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
    cells = {"monitor": _monitor_cell, "tiny": _tiny_cell, "fixed": _fixed_cell,
             "deep": _deep_cell}  # fmt: skip
    cells[cell](Counter(lib))


# -- the parent ---------------------------------------------------------------------------------
def _counts(where: Path) -> list[tuple[str, dict[str, int]]]:
    """(label, {event: count}) of each dump, in order (Ir: instructions)."""
    out = []
    for path in sorted(where.glob("cg.out.*.*"), key=lambda p: int(p.suffix[1:])):
        text = path.read_text(errors="replace")
        label = re.search(r"^desc: Trigger: Client Request: (.*)$", text, re.M)
        events = re.search(r"^events: (.*)$", text, re.M)
        total = re.search(r"^summary: ([\d ]+)$", text, re.M)
        if label and events and total:
            names, values = events.group(1).split(), [int(v) for v in total.group(1).split()]
            out.append((label.group(1), dict(zip(names, values, strict=False))))
    return out


def estimate(events: dict[str, int]) -> float:
    """kcachegrind's cycle estimate from callgrind's cache events (0 where none simulated)."""
    l1 = sum(events.get(k, 0) for k in ("I1mr", "D1mr", "D1mw"))
    ll = sum(events.get(k, 0) for k in ("ILmr", "DLmr", "DLmw"))
    return events["Ir"] + 10 * l1 + 100 * ll


def run_cell(
    cell: str, lib: Path, where: Path, cache: bool = False
) -> tuple[dict[str, float], dict[str, float]]:
    """(plain events, the tool's) of ``cell``; plain is the mean of the two runs around."""
    out = where / cell
    out.mkdir()
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no",
        f"--cache-sim={'yes' if cache else 'no'}",
        f"--callgrind-out-file={out}/cg.out.%p",
        sys.executable, __file__, "--child", cell, "--lib", str(lib),
    ]  # fmt: skip
    # A fixed hash seed: set and dict layouts, and so the interpreter's work, the same each run
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{cell}: the child failed:\n{done.stderr[-2000:]}")
    counts = _counts(out)
    labels = [label for label, _ in counts]
    if labels != ["plain", "tool", "plain"]:
        raise SystemExit(f"{cell}: unexpected dumps {labels}")
    (_, before), (_, tool), (_, after) = counts
    plain = {k: (before[k] + after[k]) / 2 for k in before}
    return plain, {k: float(v) for k, v in tool.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(CELLS), help=f"cells, of {','.join(CELLS)}")
    ap.add_argument("--child", choices=CELLS, help=argparse.SUPPRESS)
    ap.add_argument("--lib", help=argparse.SUPPRESS)
    ap.add_argument("--cache-sim", action="store_true", help="simulate the caches too")
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.lib)
        return
    why = _missing()
    if why:
        print(f"bench_instructions: {why}; nothing measured")
        return
    cells = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        raise SystemExit(f"unknown cell(s): {', '.join(unknown)} (cells: {', '.join(CELLS)})")
    print("instructions counted by callgrind, one torch thread; plain: mean of the runs before")
    print(
        f"{'cell':<8} {'plain':>14} {'with the tool':>14} {'ratio':>8} {'extra':>18}"
        "  (the target, in time)"
    )
    with tempfile.TemporaryDirectory(prefix="nd-instructions-") as tmp:
        lib = _build_helper(Path(tmp))
        for cell in cells:
            plain, tool = run_cell(cell, lib, Path(tmp), cache=args.cache_sim)
            n, unit = _units(cell)
            extra = f"{(tool['Ir'] - plain['Ir']) / n:,.0f} per {unit}"
            print(
                f"{cell:<8} {plain['Ir']:>14,.0f} {tool['Ir']:>14,.0f} "
                f"{tool['Ir'] / plain['Ir']:>7.4f}x {extra:>18}  ({TARGETS[cell]})",
                flush=True,
            )
            if args.cache_sim:
                for what, keys in (("L1 misses", ("I1mr", "D1mr", "D1mw")),
                                   ("LL misses", ("ILmr", "DLmr", "DLmw"))):  # fmt: skip
                    a, b = (sum(d.get(k, 0) for k in keys) for d in (plain, tool))
                    print(f"  {what:<14} {a:>14,.0f} {b:>14,.0f} {b / max(a, 1):>7.4f}x")
                a, b = estimate(plain), estimate(tool)
                print(f"  {'cycles (est.)':<14} {a:>14,.0f} {b:>14,.0f} {b / a:>7.4f}x")


if __name__ == "__main__":
    main()

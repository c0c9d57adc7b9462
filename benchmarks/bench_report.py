"""How long the HTML report takes for a large model (issue 8: 200 norm layers in under a minute;
issue 16: ``normdoctor report scan.json`` of 150 layers in at most 3 s, 500 layers under 1 GB).

Builds a synthetic ScanReport directly from the report dataclasses (a ResNet-like mix of channel
counts, some layers stale, some noisy, a few flagged, plus batch-independent layers and a
batch-size sweep), then times :func:`normdoctor.render.save_report` and each figure:

    python benchmarks/bench_report.py [--layers 200] [--batches 100] [--out DIR]

``--cli`` writes the report as the scan JSON ``scan --json`` writes and times the whole command
as a user runs it, ``python -m normdoctor report scan.json -o DIR`` in a fresh process (start-up
and imports included), reporting wall time and peak RSS (the child's ``ru_maxrss``) beside the
targets: a 150-layer report (``--layers``) for time, a 500-layer one (``--memory-layers``) for
memory.  ``--baseline TREE`` runs another checkout's ``normdoctor`` (e.g. ``git archive HEAD``
unpacked in a folder) in interleaved rounds beside this one, medians over ``--rounds``:

    python benchmarks/bench_report.py --cli [--layers 150] [--memory-layers 500] [--rounds 5]
        [--baseline /tmp/base] [--keep DIR] [--write-json FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from normdoctor.metrics import Recommendation  # noqa: E402
from normdoctor.render import plots, save_report  # noqa: E402
from normdoctor.render.html import figures  # noqa: E402
from normdoctor.report import (  # noqa: E402
    Composition,
    EndToEnd,
    LayerReport,
    LayerStatus,
    PathReport,
    ScanReport,
)

THRESHOLD = 0.25
#: Issue 16: the whole ``normdoctor report scan.json`` process, and its peak memory.
TIME_TARGET_S = 3.0
TIME_TARGET_LAYERS = 150
RSS_TARGET_MB = 1000.0
RSS_TARGET_LAYERS = 500


def synthetic_layer(
    i: int, rng: random.Random, batches: int, batch_size: int, stale: bool
) -> LayerReport:
    stage = min(i * 4 // 200, 3)
    channels = (64, 128, 256, 512)[stage] * (4 if i % 3 == 2 else 1)
    name = f"layer{stage + 1}.{i // 3}.bn{i % 3 + 1}"
    if i % 17 == 16:  # some batch-independent layers in between
        return LayerReport(
            name=name.replace("bn", "gn"),
            kind="GroupNorm",
            family="group",
            num_features=channels,
            eps=1e-5,
            momentum=None,
            affine=True,
            track_running_stats=False,
            batch_dependent=False,
            executed=True,
            order=i,
            status=LayerStatus.NOT_MEASURED,
            flagged=False,
            recommendation=Recommendation.OK,
            reason="batch-independent: same statistics in train and eval mode",
        )
    shift = (0.6 if stale else 0.03) * rng.uniform(0.3, 1.5)
    noise = 0.25 / math.sqrt(batch_size) * rng.uniform(0.5, 3.0)
    drift = math.sqrt(shift**2 + noise**2) * rng.uniform(0.97, 1.05)
    rm = [rng.gauss(0, 1) for _ in range(channels)]
    rv = [rng.uniform(0.2, 3.0) for _ in range(channels)]
    pm = [m + rng.gauss(0, shift) for m in rm]
    pv = [v * math.exp(rng.gauss(0, shift)) for v in rv]
    batch_drift = tuple(max(0.0, rng.gauss(drift, noise)) for _ in range(batches))
    path = PathReport(
        batches=batches,
        samples=batches * batch_size,
        drift=drift,
        drift_worst=max(batch_drift),
        worst_batch=batch_drift.index(max(batch_drift)),
        shift=shift,
        noise=noise,
        noniid=rng.uniform(0.5, 2.0),
        pooled_mean=tuple(pm),
        pooled_var=tuple(pv),
        channel_drift=tuple(abs(rng.gauss(drift, 0.1)) for _ in range(channels)),
        mean_shift=tuple((p - m) / math.sqrt(v) for p, m, v in zip(pm, rm, rv, strict=True)),
        var_log_ratio=tuple(0.5 * math.log(p / v) for p, v in zip(pv, rv, strict=True)),
        batch_drift=batch_drift,
    )
    flagged = drift > THRESHOLD
    rec = (
        Recommendation.RECALIBRATE
        if flagged and shift >= noise
        else Recommendation.BATCHSTATS
        if flagged
        else Recommendation.OK
    )
    return LayerReport(
        name=name,
        kind="BatchNorm2d",
        family="batch",
        num_features=channels,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        batch_dependent=True,
        executed=True,
        order=i,
        running_mean=tuple(rm),
        running_var=tuple(rv),
        status=LayerStatus.FLAGGED if flagged else LayerStatus.OK,
        flagged=flagged,
        recommendation=rec,
        reason=f"synthetic drift {drift:.3g}",
        train=path,
    )


def synthetic_report(
    layers: int = 200, batches: int = 100, batch_size: int = 32, seed: int = 0
) -> ScanReport:
    rng = random.Random(seed)
    stale = set(rng.sample(range(layers), max(1, layers // 25)))
    return ScanReport(
        normdoctor_version="bench",
        model=f"synthetic-{layers}-layers",
        composition=Composition(
            source="tensor",
            batch_size=batch_size,
            order="shuffle",
            seed=0,
            group_by=None,
            num_batches=batches,
            num_samples=batches * batch_size,
            min_batch=batch_size,
            max_batch=batch_size,
        ),
        paths=("train", "eval"),
        threshold=THRESHOLD,
        agreement_threshold=0.95,
        divergence_threshold=0.2,
        layers=tuple(
            synthetic_layer(i, rng, batches, batch_size, i in stale) for i in range(layers)
        ),
        end_to_end=EndToEnd(
            batches=batches,
            samples=batches * batch_size,
            rel_divergence=0.4,
            agreement=0.81,
            acc_train=0.76,
            acc_eval=0.64,
        ),
        harmful=True,
    )


def write_scan_json(path: Path, layers: int, batches: int = 100) -> Path:
    """The synthetic report as ``normdoctor scan --json`` writes it."""
    path.write_text(synthetic_report(layers, batches).to_json(), encoding="utf-8")
    return path


def run_cli(tree: Path, scan_json: Path, out: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MB) of ``python -m normdoctor report scan_json
    -o out``, run from the source tree ``tree`` in a fresh process.  CPU time (user + system)
    is what wall time would be on an idle core: on a shared machine it varies less."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "normdoctor", "report", str(scan_json), "-o", str(out), "-q"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    # wait4: this child's own rusage (getrusage(RUSAGE_CHILDREN) would be the maximum over
    # every child waited for so far, the other tree's runs included).
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0 or not (out / "index.html").is_file():
        raise SystemExit(f"{' '.join(cmd)} (in {tree}) failed ({proc.returncode}): {err.strip()}")
    cpu = usage.ru_utime + usage.ru_stime
    return elapsed, cpu, usage.ru_maxrss * 1024 / 1e6  # Linux: KiB


def cli_main(args: argparse.Namespace) -> None:
    trees = {"this": REPO}
    if args.baseline is not None:
        trees = {"baseline": args.baseline.resolve(), **trees}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cells = [("time", args.layers, args.rounds)]
        if args.memory_layers:
            cells.append(("memory", args.memory_layers, args.memory_rounds))
        for what, layers, rounds in cells:
            t0 = time.perf_counter()
            scan_json = work / f"scan-{layers}.json"
            # In a child process: a child's peak RSS starts at its parent's (Linux keeps the
            # high-water mark across fork and exec), so this process must stay small.
            write = ["--write-json", str(scan_json), "--layers", str(layers)]
            write += ["--batches", str(args.batches)]
            subprocess.run([sys.executable, __file__, *write], check=True)
            print(
                f"{layers} layers: {scan_json.stat().st_size / 1e6:.1f} MB of scan JSON "
                f"(written in {time.perf_counter() - t0:.1f} s); {rounds} interleaved rounds"
            )
            runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
            for r in range(rounds):
                order = list(trees.items())
                if r % 2:
                    order.reverse()
                for name, tree in order:
                    out = work / f"report-{name}"
                    runs[name].append(run_cli(tree, scan_json, out))
                    if args.keep is not None and r == 0:
                        dest = args.keep / f"{name}-{layers}"
                        shutil.rmtree(dest, ignore_errors=True)
                        shutil.copytree(out, dest)
            for name, values in runs.items():
                wall = statistics.median(v[0] for v in values)
                cpu = statistics.median(v[1] for v in values)
                rss = max(v[2] for v in values)
                walls = ", ".join(f"{v[0]:.2f}" for v in values)
                target = (
                    f"target <= {TIME_TARGET_S:g} s at {TIME_TARGET_LAYERS} layers"
                    if what == "time"
                    else f"target < {RSS_TARGET_MB:g} MB at {RSS_TARGET_LAYERS} layers"
                )
                print(
                    f"  {name:>8}: `normdoctor report` {wall:.2f} s median ({walls}), "
                    f"CPU {cpu:.2f} s, peak RSS {rss:.0f} MB   [{target}]"
                )
            if len(runs) == 2:
                pairs = list(zip(runs["baseline"], runs["this"], strict=True))
                wall_x = statistics.median(b[0] / t[0] for b, t in pairs)
                cpu_x = statistics.median(b[1] / t[1] for b, t in pairs)
                print(
                    f"  speed-up: {wall_x:.2f}x wall, {cpu_x:.2f}x CPU "
                    "(medians of the per-round ratios)"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="default: 200, with --cli 150")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cli", action="store_true", help="time the whole CLI process")
    parser.add_argument("--memory-layers", type=int, default=RSS_TARGET_LAYERS, help="0: skip")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-rounds", type=int, default=1)
    parser.add_argument("--baseline", type=Path, default=None, help="another source tree")
    parser.add_argument("--keep", type=Path, default=None, help="copy the first reports here")
    parser.add_argument("--write-json", type=Path, default=None, help="write the scan JSON, exit")
    args = parser.parse_args()
    if args.write_json is not None:
        write_scan_json(args.write_json, args.layers or TIME_TARGET_LAYERS, args.batches)
        return
    if args.cli:
        args.layers = args.layers or TIME_TARGET_LAYERS
        cli_main(args)
        return
    args.layers = args.layers or 200

    t0 = time.perf_counter()
    report = synthetic_report(args.layers, args.batches)
    sweep = {b: synthetic_report(args.layers, 20, b, seed=b) for b in (1, 4, 16, 64)}
    t_build = time.perf_counter() - t0
    print(
        f"synthetic report: {len(report.layers)} layers "
        f"({len(plots.measured_layers(report))} measured, {len(report.flagged_layers)} flagged), "
        f"built in {t_build:.2f} s"
    )

    t0 = time.perf_counter()
    figs = figures(report, sweep)
    t_figs = time.perf_counter() - t0
    print(f"figures() -> {sorted(figs)}: {t_figs:.2f} s")
    for key, fig in figs.items():
        for fmt in ("png", "svg"):
            t = time.perf_counter()
            fig.savefig(Path(tempfile.gettempdir()) / f"bench-{key}.{fmt}", format=fmt, dpi=144)
            print(f"  {key}.{fmt}: {time.perf_counter() - t:.2f} s")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "report"
        for formats in (("png",), ("png", "svg")):
            t0 = time.perf_counter()
            index = save_report(
                report,
                out,
                sweep=sweep,
                command="python benchmarks/bench_report.py",
                force=True,
                formats=formats,
            )
            elapsed = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in out.iterdir())
            print(
                f"save_report(formats={formats}): {elapsed:.2f} s, index.html "
                f"{index.stat().st_size / 1e6:.2f} MB, folder {size / 1e6:.2f} MB "
                f"({elapsed / 60:.2f} of the 1-minute budget)"
            )


if __name__ == "__main__":
    main()

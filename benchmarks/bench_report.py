"""How long the HTML report takes for a large model (issue 8: 200 norm layers in under a minute).

Builds a synthetic ScanReport directly from the report dataclasses (a ResNet-like mix of channel
counts, some layers stale, some noisy, a few flagged, plus batch-independent layers and a
batch-size sweep), then times :func:`normdoctor.render.save_report` and each figure.

    python benchmarks/bench_report.py [--layers 200] [--batches 100] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

from normdoctor.metrics import Recommendation
from normdoctor.render import plots, save_report
from normdoctor.render.html import figures
from normdoctor.report import (
    Composition,
    EndToEnd,
    LayerReport,
    LayerStatus,
    PathReport,
    ScanReport,
)

THRESHOLD = 0.25


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

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

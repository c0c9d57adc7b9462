"""The verdict on every sample model of known truth, at several scan compositions (README).

For each model (MANIFEST.json: the digits classifiers, the pix2pix pair, the healthy CNN on
shifted data) and each way a user may scan it (no options: the composition search; ``-b 1``,
``-b 8``, ``-b 64`` with the search; ``-b 1`` and ``-b 64`` without it), with and without labels
or targets: the verdict, the reference composition, and the numbers behind it.  Run from the
repository root:

    python benchmarks/calibrate_thresholds.py [--markdown]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import normdoctor as nd  # noqa: E402

SM = ROOT / "sample_models"
SCANS = [
    ("search", dict()),
    ("-b 1", dict(batch_size=1, search=True)),
    ("-b 8", dict(batch_size=8, search=True)),
    ("-b 64", dict(batch_size=64, search=True)),
    ("-b 1 --no-search", dict(batch_size=1, search=False)),
    ("-b 64 --no-search", dict(batch_size=64, search=False)),
]


def load(entry: dict) -> torch.nn.Module:
    module, _, attr = entry["arch"].partition(":")
    model = getattr(importlib.import_module(module), attr)(**entry.get("arch_kwargs", {}))
    path = entry["files"][0]["path"] if "files" in entry else entry["path"]
    model.load_state_dict(torch.load(SM / path, weights_only=True))
    return model.eval()


def cases() -> list[tuple[str, str, torch.nn.Module, tuple]]:
    manifest = json.loads((SM / "MANIFEST.json").read_text())
    test = np.load(SM / "data" / "test.npz")
    digits = (torch.from_numpy(test["inputs"]), torch.from_numpy(test["labels"]))
    out = []
    for name, entry in manifest["models"].items():
        t = entry["training"]
        how = f"{t.get('batch_composition', '')} {t.get('batch_size', '')}".strip()
        out.append((name, how, load(entry), digits))
    pix = np.load(SM / "data" / "pix2pix-test.npz")
    pairs = (torch.from_numpy(pix["x"]), torch.from_numpy(pix["y"]))
    for name in ("pix2pix-b1", "pix2pix-b32"):
        from sample_models.archs import DigitsUNet

        model = DigitsUNet()
        model.load_state_dict(torch.load(SM / f"{name}.pt", weights_only=True))
        out.append((name, "batch size " + name.split("-b")[1], model.eval(), pairs))
    shifted = np.load(SM / "data" / "shifted.npz")
    out.append(
        (
            "healthy, shifted data",
            "shuffled 64; data x*1.3+0.4",
            load(manifest["models"]["healthy"]),
            (torch.from_numpy(shifted["inputs"]), torch.from_numpy(shifted["labels"])),
        )
    )
    return out


def describe(r: nd.ScanReport) -> str:
    ev = r.evidence
    ref = ev.reference_candidate if ev is not None else None
    if ref is None:
        return f"{r.status}"
    if ev.kind != "none" and ref.quality is not None and ev.eval_quality is not None:
        fmt = (lambda q: f"{100 * q:.1f}%") if ev.kind == "labels" else (lambda q: f"{q:.3f}")
        p = "" if ev.p_value is None else f", p {ev.p_value:.0e}"
        return (
            f"{r.status} ({fmt(ev.eval_quality)} eval vs {fmt(ref.quality)} at "
            f"{ref.description}{p})"
        )
    agree = (
        f"agree {100 * ref.agreement:.1f}%"
        if ref.agreement is not None
        else f"div {ref.rel_divergence:.2f}"
    )
    fit = "" if ref.fit is None else f", fit {ref.fit:.3f}"
    return f"{r.status} ({agree} at {ref.description}{fit})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = ["model", "trained with", "evidence", *[s for s, _ in SCANS]]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
    for name, training, model, (x, y) in cases():
        for labelled in (True, False):
            data = (x, y) if labelled else x
            cells = []
            for _, opts in SCANS:
                try:
                    cells.append(describe(nd.scan(model, data, **opts)))
                except nd.NormDoctorError as exc:
                    cells.append(f"error: {str(exc)[:60]}")
            evidence = ("labels" if y.dim() == 1 else "targets") if labelled else "none"
            row = [name, training, evidence, *cells]
            print("| " + " | ".join(row) + " |" if args.markdown else "\t".join(row), flush=True)


if __name__ == "__main__":
    main()

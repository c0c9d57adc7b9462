"""Print what normdoctor measures on the sample models, whose truth is known (MANIFEST.json).

The default thresholds in normdoctor.metrics / normdoctor.scan were chosen from this table
(README, "How the thresholds were chosen").  Run from the repository root:

    python benchmarks/calibrate_thresholds.py
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import normdoctor as nd  # noqa: E402


def load(entry: dict) -> torch.nn.Module:
    module, _, attr = entry["arch"].partition(":")
    model = getattr(importlib.import_module(module), attr)(**entry["arch_kwargs"])
    model.load_state_dict(torch.load(ROOT / "sample_models" / entry["files"][0]["path"], weights_only=True))
    return model.eval()


def main() -> None:
    manifest = json.loads((ROOT / "sample_models" / "MANIFEST.json").read_text())
    test = np.load(ROOT / "sample_models" / "data" / "test.npz")
    data = (torch.from_numpy(test["inputs"]), torch.from_numpy(test["labels"]))
    print(f"{'model':12} {'batches':28} {'agree':>6} {'acc_t':>6} {'acc_e':>6} {'div':>6}  "
          "per layer: drift/shift/noise/noniid")
    for name, entry in manifest["models"].items():
        model = load(entry)
        bs = entry.get("train_batch_size") or 64
        order = entry.get("train_order", "shuffle")
        compositions = {"random 64": dict(batch_size=64)}
        if order == "class-sorted":
            compositions[f"class-sorted {bs}"] = dict(batch_size=bs, shuffle=False, group_by="label")
        elif bs != 64:
            compositions[f"train-like {bs}"] = dict(batch_size=bs)
        for label, kwargs in compositions.items():
            r = nd.scan(model, data, **kwargs)
            e = r.end_to_end
            cells = " ".join(
                f"{l.drift:.2f}/{l.shift:.2f}/{l.noise:.2f}/{'-' if (q := (l.eval or l.train).noniid) is None else f'{q:.1f}'}"
                for l in r.layers if l.drift is not None
            )
            if e is None:
                print(f"{name:12} {label:28} (no batch-dependent layers)")
                continue
            print(f"{name:12} {label:28} {e.agreement:6.3f} {e.acc_train:6.3f} {e.acc_eval:6.3f} "
                  f"{e.rel_divergence:6.3f}  {cells}  -> {'FLAG ' + ','.join(str(l.recommendation) for l in r.flagged_layers) if r.flagged else 'ok'}")


if __name__ == "__main__":
    main()

"""Rebuild every sample model, the held-out data, MANIFEST.json and README.md.

Run from the repository root::

    python sample_models/build.py        # or: python -m sample_models.build

Deterministic on CPU (fixed seeds, one thread, ``torch.use_deterministic_algorithms``)
and takes well under three minutes on two cores. The script checks the truths the
issue requires (pathological gaps, stale recovery) and exits non-zero if one fails.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

from sample_models import truth  # noqa: E402
from sample_models.archs import DigitsCNN, DigitsMLP  # noqa: E402

DATA_DIR = HERE / "data"
SPLIT_SEED = 2024
N_TEST = 360
N_CALIB = 200
ONNX_OPSET = 18
# Required by issue 3: eval mode loses at least this many points against train-like
# batch statistics on the pathological models.
MIN_GAP_POINTS = 10.0

ARCHS = {"DigitsCNN": DigitsCNN, "DigitsMLP": DigitsMLP}

# One entry per model. ``init_from`` fine-tunes a copy of an earlier model instead of
# training from a fresh initialization. ``bn_momentum`` is the BatchNorm momentum used
# while training (the saved model keeps the default 0.1; momentum is not in state_dict).
RECIPES: list[dict] = [
    {
        "name": "healthy",
        "arch": "DigitsCNN",
        "arch_kwargs": {},
        "batch_size": 64,
        "order": "shuffle",
        "epochs": 30,
        "optimizer": "Adam",
        "lr": 1e-2,
        "seed": 0,
        "bn_momentum": 0.1,
        "expected": {"eval_broken": False, "cause": None},
        "description": "CNN trained on shuffled batches of 64. Eval mode works.",
    },
    {
        "name": "tiny-batch",
        "arch": "DigitsCNN",
        "arch_kwargs": {},
        "batch_size": 1,
        "order": "shuffle",
        "epochs": 10,
        "optimizer": "Adam",
        "lr": 1e-3,
        "seed": 0,
        "bn_momentum": 0.1,
        "expected": {"eval_broken": True, "cause": "batch-size-1"},
        "description": "CNN trained with batch size 1 (pix2pix case): BatchNorm acted as "
        "InstanceNorm during training; eval mode with running stats breaks it.",
    },
    {
        "name": "non-iid",
        "arch": "DigitsCNN",
        "arch_kwargs": {},
        "batch_size": 64,
        "order": "class-sorted",
        "epochs": 30,
        "optimizer": "Adam",
        "lr": 1e-2,
        "seed": 0,
        "bn_momentum": 0.1,
        "expected": {"eval_broken": True, "cause": "class-sorted"},
        "description": "CNN trained on class-sorted batches (every batch holds one class); "
        "it relies on per-batch statistics, eval mode breaks it.",
    },
    {
        "name": "mlp-non-iid",
        "arch": "DigitsMLP",
        "arch_kwargs": {},
        "batch_size": 64,
        "order": "class-sorted",
        "epochs": 60,
        "optimizer": "SGD",
        "lr": 5e-2,
        "sgd_momentum": 0.9,
        "seed": 0,
        "bn_momentum": 0.1,
        "expected": {"eval_broken": True, "cause": "class-sorted"},
        "description": "MLP (BatchNorm1d) trained on class-sorted batches; BatchNorm1d "
        "removes each batch's class mean, so even train-like accuracy is modest.",
    },
    {
        "name": "stale",
        "arch": "DigitsCNN",
        "arch_kwargs": {},
        "init_from": "healthy",
        "batch_size": 64,
        "order": "shuffle",
        "epochs": 10,
        "optimizer": "Adam",
        "lr": 1e-2,
        "seed": 1,
        "bn_momentum": 0.0,
        "expected": {"eval_broken": True, "cause": "stale-running-stats"},
        "description": "'healthy' fine-tuned in train mode with BatchNorm momentum=0: the "
        "weights moved, the running stats are still exactly those of 'healthy'. "
        "Exact recalibration recovers it.",
    },
    {
        "name": "mlp-healthy",
        "arch": "DigitsMLP",
        "arch_kwargs": {},
        "batch_size": 64,
        "order": "shuffle",
        "epochs": 30,
        "optimizer": "Adam",
        "lr": 1e-2,
        "seed": 0,
        "bn_momentum": 0.1,
        "expected": {"eval_broken": False, "cause": None},
        "description": "MLP (BatchNorm1d) trained on shuffled batches of 64. Eval mode works.",
    },
    {
        "name": "groupnorm",
        "arch": "DigitsCNN",
        "arch_kwargs": {"norm": "group"},
        "batch_size": 64,
        "order": "shuffle",
        "epochs": 30,
        "optimizer": "Adam",
        "lr": 1e-2,
        "seed": 0,
        "bn_momentum": None,
        "expected": {"eval_broken": False, "cause": None},
        "description": "CNN with GroupNorm(4, C) only: no running statistics, never to be flagged.",
    },
    {
        "name": "layernorm",
        "arch": "DigitsCNN",
        "arch_kwargs": {"norm": "layer"},
        "batch_size": 64,
        "order": "shuffle",
        "epochs": 30,
        "optimizer": "Adam",
        "lr": 1e-2,
        "seed": 0,
        "bn_momentum": None,
        "expected": {"eval_broken": False, "cause": None},
        "description": "CNN with nn.LayerNorm([C, H, W]) only: never to be flagged.",
    },
]

EXTRA_FORMATS = {
    "healthy": ["safetensors", "onnx", "onnx-folded"],
    "tiny-batch": ["safetensors", "onnx", "torch-export"],
}


# ------------------------------------------------------------------------------ data


def make_data() -> dict:
    """Split load_digits into test / calib / train, normalize with train statistics."""
    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None] / np.float32(16.0)  # (N,1,8,8) in [0,1]
    labels = digits.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    test_idx, calib_idx = perm[:N_TEST], perm[N_TEST : N_TEST + N_CALIB]
    train_idx = perm[N_TEST + N_CALIB :]
    mean = float(images[train_idx].mean(dtype=np.float64))
    std = float(images[train_idx].std(dtype=np.float64))
    x = ((images - np.float32(mean)) / np.float32(std)).astype(np.float32)
    return {
        "train": (x[train_idx], labels[train_idx]),
        "calib": (x[calib_idx], labels[calib_idx]),
        "test": (x[test_idx], labels[test_idx]),
        "mean": mean,
        "std": std,
    }


def train_batches(
    labels: torch.Tensor, batch_size: int, order: str, gen: torch.Generator
) -> list[torch.Tensor]:
    """One epoch of batches. "class-sorted": every batch holds a single class, batch order
    shuffled; a trailing single-sample chunk is merged into its predecessor so that
    BatchNorm1d never sees a batch of one."""
    n = len(labels)
    if order == "shuffle":
        perm = torch.randperm(n, generator=gen)
        return [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if order != "class-sorted":
        raise ValueError(order)
    out: list[torch.Tensor] = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        chunks = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            chunks[-2:] = [torch.cat(chunks[-2:])]
        out += chunks
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


def train(model: nn.Module, recipe: dict, data: dict) -> nn.Module:
    x, y = (torch.from_numpy(a) for a in data["train"])
    gen = torch.Generator().manual_seed(recipe["seed"])
    bns = [m for _, m in truth.bn_layers(model)]
    if recipe["bn_momentum"] is not None:
        for bn in bns:
            bn.momentum = recipe["bn_momentum"]
    if recipe["optimizer"] == "Adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["sgd_momentum"])
    model.train()
    for _ in range(recipe["epochs"]):
        for b in train_batches(y, recipe["batch_size"], recipe["order"], gen):
            loss = nn.functional.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


# --------------------------------------------------------------------------- writing


def file_entry(path: Path, fmt: str, **extra) -> dict:
    blob = path.read_bytes()
    return {
        "path": path.relative_to(HERE).as_posix(),
        "format": fmt,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        **extra,
    }


def export_onnx(model: nn.Module, path: Path, keep_bn: bool) -> None:
    """Self-contained ONNX, dynamic batch dim 'batch'.

    keep_bn=True: exporter's optimizer off (it would fold BatchNorm into Conv), then only
    constant folding + dead-node removal from onnxscript, which leave BatchNormalization
    (with its running_mean / running_var initializers) in place.
    keep_bn=False: the exporter's default optimization, which folds BatchNorm into Conv.
    """
    import onnxscript.optimizer as oso

    example = torch.zeros(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            (example,),
            None,
            input_names=["input"],
            output_names=["logits"],
            opset_version=ONNX_OPSET,
            dynamo=True,
            optimize=not keep_bn,
            external_data=False,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
            verbose=False,
        )
    assert program is not None
    if keep_bn:
        oso.fold_constants(program.model)
        oso.remove_unused_nodes(program.model)
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    n_bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    assert (n_bn > 0) == keep_bn, f"{path.name}: {n_bn} BatchNormalization nodes"


def export_program(model: nn.Module, path: Path) -> None:
    example = torch.zeros(2, 1, 8, 8)
    ep = torch.export.export(
        model.eval(), (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}
    )
    torch.export.save(ep, str(path))


def write_model_files(name: str, model: nn.Module) -> list[dict]:
    files = []
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, HERE / f"{name}.pt")
    files.append(file_entry(HERE / f"{name}.pt", "torch-state-dict"))
    for fmt in EXTRA_FORMATS.get(name, []):
        if fmt == "safetensors":
            save_file(sd, str(HERE / f"{name}.safetensors"))
            (HERE / f"{name}.safetensors").chmod(0o644)  # safetensors writes 0600
            files.append(file_entry(HERE / f"{name}.safetensors", "safetensors"))
        elif fmt == "onnx":
            export_onnx(model, HERE / f"{name}.onnx", keep_bn=True)
            files.append(
                file_entry(HERE / f"{name}.onnx", "onnx", opset=ONNX_OPSET, batchnorm="kept")
            )
        elif fmt == "onnx-folded":
            export_onnx(model, HERE / f"{name}-folded.onnx", keep_bn=False)
            files.append(
                file_entry(
                    HERE / f"{name}-folded.onnx", "onnx", opset=ONNX_OPSET, batchnorm="folded"
                )
            )
        elif fmt == "torch-export":
            export_program(model, HERE / f"{name}.pt2")
            files.append(
                file_entry(
                    HERE / f"{name}.pt2", "torch-export", mode="eval", dynamic_dims=["batch"]
                )
            )
    return files


def write_data(data: dict) -> dict:
    DATA_DIR.mkdir(exist_ok=True)
    out = {}
    for split in ("test", "calib"):
        x, y = data[split]
        path = DATA_DIR / f"{split}.npz"
        np.savez_compressed(path, inputs=x, labels=y)
        out[split] = file_entry(
            path,
            "npz",
            n=len(y),
            shape=list(x.shape),
            class_counts=np.bincount(y, minlength=10).tolist(),
        )
    return out


# ----------------------------------------------------------------------------- checks


def pts(t: dict, key: str) -> float:
    return 100.0 * t[key]["correct"] / t[key]["total"]


def check_truths(models: dict) -> list[str]:
    """The bars of issue 3; returns the failures."""
    fail = []
    for name, entry in models.items():
        t = entry["truth"]
        if entry["expected"]["eval_broken"] and entry["expected"]["cause"] != "stale-running-stats":
            gap = pts(t, "acc_batchstats_trainlike") - pts(t, "acc_eval")
            if gap < MIN_GAP_POINTS:
                fail.append(f"{name}: eval gap {gap:.1f} < {MIN_GAP_POINTS} points")
        if not entry["expected"]["eval_broken"]:
            if pts(t, "acc_eval") < 95.0:
                fail.append(f"{name}: eval accuracy {pts(t, 'acc_eval'):.1f} below 95")
            if "acc_batchstats_trainlike" in t and (
                abs(pts(t, "acc_batchstats_trainlike") - pts(t, "acc_eval")) > 2.0
            ):
                fail.append(f"{name}: healthy but eval differs from batch stats by > 2 points")
    st, he = models["stale"]["truth"], models["healthy"]["truth"]
    if pts(st, "acc_recalibrated") < pts(he, "acc_eval") - 3.0:
        fail.append("stale: recalibration does not get within 3 points of healthy")
    if pts(st, "acc_recalibrated") - pts(st, "acc_eval") < 20.0:
        fail.append("stale: recalibration gains < 20 points over eval")
    return fail


# ----------------------------------------------------------------------------- README

TRUTH_COLUMNS = [
    ("acc_eval", "eval"),
    ("acc_batchstats_trainlike", "batch stats, train-like"),
    ("acc_batchstats_random64", "batch stats, random 64"),
    ("acc_recalibrated", "recalibrated"),
    ("acc_instancenorm", "InstanceNorm"),
]


def readme(manifest: dict) -> str:
    rows = []
    for name, e in manifest["models"].items():
        t = e["truth"]
        tr = e["training"]
        train = (
            f"bs {tr['batch_size']}, {tr['batch_composition']}, "
            f"{tr['epochs']} ep, {tr['optimizer']} lr {tr['lr']:g}"
        )
        if tr.get("init_from"):
            train += f", from {tr['init_from']}, BN momentum {tr['bn_momentum']:g}"
        cells = [
            f"{100 * t[k]['acc']:.1f} ({t[k]['correct']})" if k in t else "-"
            for k, _ in TRUTH_COLUMNS
        ]
        files = ", ".join(f"`{f['path']}`" for f in e["files"])
        arch = e["arch"].split(":")[1] + (
            f"({', '.join(f'{k}={v!r}' for k, v in e['arch_kwargs'].items())})"
        )
        rows.append(f"| `{name}` | {arch} | {train} | " + " | ".join(cells) + f" | {files} |")
    header = (
        "| model | arch | training | "
        + " | ".join(h for _, h in TRUTH_COLUMNS)
        + " | files |\n|"
        + "---|" * (len(TRUTH_COLUMNS) + 4)
    )
    n_test = manifest["data"]["test"]["n"]
    ms = manifest["models"]

    def pair(name: str, key: str) -> str:
        t = ms[name]["truth"]
        return f"`{name}` {100 * t['acc_eval']['acc']:.1f} vs {100 * t[key]['acc']:.1f}"

    patho = [n for n in ("tiny-batch", "non-iid", "mlp-non-iid") if n in ms]
    gaps = ", ".join(pair(n, "acc_batchstats_trainlike") for n in patho)
    rand = ", ".join(pair(n, "acc_batchstats_random64") for n in patho)
    return f"""# Sample models whose truth is known

Small models trained on `sklearn.datasets.load_digits` (8x8 digits), for which we know,
independently of normdoctor, whether eval mode (BatchNorm running statistics) breaks them.
Architectures: `sample_models/archs.py` (plain `torch.nn`). Truth measurements:
`sample_models/truth.py` (plain PyTorch + numpy). Everything, including the numbers below,
is recorded in `MANIFEST.json`.

## Rebuild

From the repository root (deterministic, CPU only, {manifest["build"]["time_budget"]}):

    python sample_models/build.py      # or: python -m sample_models.build

Check the shipped files and re-measure every truth: `python -m pytest tests/test_sample_models.py`.

## Data

`data/test.npz` ({n_test} samples, random order) and `data/calib.npz`
({manifest["data"]["calib"]["n"]} samples from the training distribution) hold `inputs`
(float32, N x 1 x 8 x 8, normalized exactly as the models expect: `(pixels/16 - {manifest["data"]["normalization"]["mean"]:.6f}) / {manifest["data"]["normalization"]["std"]:.6f}`)
and `labels` (int64). `DigitsMLP` flattens internally, so the same files serve all models.

## Models and their truth

Accuracy in % on the test split (correct of {n_test} in parentheses), measured in float64:

* **eval**: `model.eval()`.
* **batch stats, train-like**: BatchNorm layers normalize with batch statistics (train mode,
  running stats untouched), batches built as in training: batch size 1 for `tiny-batch`,
  class-sorted batches of 64 (one class per batch) for `non-iid` / `mlp-non-iid`,
  shuffled batches of 64 otherwise.
* **batch stats, random 64**: the same with shuffled batches of 64 (seed {truth.RANDOM_BATCH_SEED}).
* **recalibrated**: eval mode after exact recalibration on `calib` (each BN's running mean and
  unbiased variance set to the exact statistics of its input over `calib`, layer by layer in
  forward order, float64).
* **InstanceNorm**: eval mode after replacing each BatchNorm2d by InstanceNorm2d with the same
  affine parameters.

{header}
{chr(10).join(rows)}

What they show:

* `tiny-batch`, `non-iid` and `mlp-non-iid` lose at least {MIN_GAP_POINTS:.0f} points in eval
  mode against train-like batch statistics ({gaps}). Scanned with random batches of 64
  the two paths nearly agree ({rand}): the composition of the scan's batches decides
  what you see.
* InstanceNorm rescues `tiny-batch` and destroys `healthy`; exact recalibration rescues
  `stale` and does not help (or hurts) `non-iid`: a fix must be verified on data.
* `stale` has exactly the running statistics of `healthy` (BN momentum 0 while fine-tuning).

## Files

* `NAME.pt`: `torch.save` of the state_dict, loads with `torch.load(..., weights_only=True)`
  into `arch(**arch_kwargs)` from `MANIFEST.json`.
* `healthy.safetensors`, `tiny-batch.safetensors`: the same state_dicts as safetensors.
* `tiny-batch.pt2`: `torch.export` program of the eval-mode model, dynamic batch dimension
  (`torch.export.load`).
* `healthy.onnx`, `tiny-batch.onnx`: opset {ONNX_OPSET}, dynamic batch, `BatchNormalization` nodes
  kept with their running mean / variance initializers (exported with the exporter's
  optimizer off). `healthy-folded.onnx`: the exporter's default optimization, BatchNorm
  folded into Conv (no `BatchNormalization` node). All self-contained.
* `MANIFEST.json`: per model its files (sha256, bytes), architecture, training recipe,
  train-like batch composition (`train_batch_size`, `train_order`) and truth.
"""


# ------------------------------------------------------------------------------- main


def main() -> int:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)

    data = make_data()
    data_entries = write_data(data)
    test = truth.load_split("test")
    calib = truth.load_split("calib")

    trained: dict[str, nn.Module] = {}
    models: dict[str, dict] = {}
    for r in RECIPES:
        t_model = time.perf_counter()
        if r.get("init_from"):
            model = copy.deepcopy(trained[r["init_from"]])
        else:
            torch.manual_seed(r["seed"])
            model = ARCHS[r["arch"]](**r["arch_kwargs"])
        model = train(model, r, data)
        trained[r["name"]] = model
        files = write_model_files(r["name"], model)
        train_order = r["order"]
        t = truth.measure_truth(model, test, calib, r["batch_size"], train_order)
        # float32 eval predictions must match the float64 ones used for the counts
        with torch.no_grad(), truth.one_thread():
            logits32 = model.eval()(torch.from_numpy(test[0]))
        top2 = logits32.topk(2, dim=1).values
        min_margin = float((top2[:, 0] - top2[:, 1]).min())
        same32 = bool((logits32.argmax(1) == truth.predict_eval(model, test[0])).all())
        training = {
            "batch_size": r["batch_size"],
            "batch_composition": "batch-size-1"
            if r["batch_size"] == 1
            else ("class-sorted" if r["order"] == "class-sorted" else "shuffled"),
            "order": r["order"],
            "epochs": r["epochs"],
            "optimizer": r["optimizer"],
            "lr": r["lr"],
            "seed": r["seed"],
            "bn_momentum": r["bn_momentum"],
        }
        if "sgd_momentum" in r:
            training["sgd_momentum"] = r["sgd_momentum"]
        if r.get("init_from"):
            training["init_from"] = r["init_from"]
        models[r["name"]] = {
            "name": r["name"],
            "description": r["description"],
            "arch": f"sample_models.archs:{r['arch']}",
            "arch_file": f"sample_models/archs.py:{r['arch']}",
            "arch_kwargs": r["arch_kwargs"],
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "has_batchnorm": bool(truth.bn_layers(model)),
            "files": files,
            "training": training,
            "train_batch_size": r["batch_size"],
            "train_order": r["order"],
            "expected": r["expected"],
            "truth": t,
            "eval_float32_matches_float64": same32,
            "eval_float32_min_top2_margin": round(min_margin, 6),
        }
        accs = "  ".join(f"{k[4:]}={100 * v['acc']:.1f}" for k, v in t.items())
        print(f"{r['name']:12s} {time.perf_counter() - t_model:5.1f}s  {accs}", flush=True)
        if not same32:
            print(f"  note: float32 eval predictions differ from float64 for {r['name']}")

    failures = check_truths(models)
    seconds = time.perf_counter() - t0
    manifest = {
        "format_version": 1,
        "description": "Sample models whose train/eval truth is known (normdoctor issue 3).",
        "data": {
            "source": "sklearn.datasets.load_digits",
            "split_seed": SPLIT_SEED,
            "split": "np.random.default_rng(split_seed).permutation(1797): first 360 test, "
            "next 200 calib, rest (1237) train",
            "n_train": len(data["train"][1]),
            "normalization": {
                "formula": "(images / 16 - mean) / std",
                "mean": data["mean"],
                "std": data["std"],
            },
            "input_shape": [1, 8, 8],
            "num_classes": 10,
            **data_entries,
        },
        "truth_conventions": {
            "dtype": "float64 copy of the model, one CPU thread (sample_models/truth.py)",
            "split": "data/test.npz; recalibration uses data/calib.npz",
            "acc_eval": "model.eval(), whole split at once",
            "acc_batchstats": "BatchNorm layers in train mode on a deep copy (running stats "
            "of the shipped model untouched), everything else eval",
            "acc_batchstats_trainlike": "batches as in training: train_order 'class-sorted' "
            "-> for each class (ascending) its test indices in file order, chunked by "
            "train_batch_size (one class per batch); otherwise shuffled batches of "
            "train_batch_size (np.random.default_rng(0).permutation, consecutive chunks)",
            "acc_batchstats_random64": "np.random.default_rng(0).permutation(N), consecutive "
            "chunks of 64",
            "acc_recalibrated": "eval mode after exact recalibration on calib: per BN layer, "
            "in forward order with upstream layers already recalibrated, running_mean = mean "
            "and running_var = unbiased variance of the layer input over all calib samples "
            "(and spatial positions), float64",
            "acc_instancenorm": "eval mode after replacing every BatchNorm2d by "
            "InstanceNorm2d(affine=True, track_running_stats=False, same eps, same weight/bias)",
        },
        "build": {
            "command": "python sample_models/build.py",
            "time_budget": "under 3 minutes on 2 CPU cores",
            "torch": torch.__version__,
            "numpy": np.__version__,
            "onnx": onnx.__version__,
            "threads": 1,
            "deterministic_algorithms": True,
        },
        "models": models,
    }
    (HERE / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (HERE / "README.md").write_text(readme(manifest))
    total = sum(
        p.stat().st_size for p in HERE.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    print(f"build time {seconds:.1f} s, sample_models/ {total / 1e6:.2f} MB")
    for f in failures:
        print("TRUTH CHECK FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

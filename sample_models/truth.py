"""Measure the truth of a model with plain PyTorch (no normdoctor).

Shared by ``build.py`` (which writes the numbers into ``MANIFEST.json``) and
``tests/test_sample_models.py`` (which re-measures them and compares exactly).

All measurements run on a deep copy of the model converted to float64, on one CPU
thread, so the correct/total counts do not depend on thread count or kernel choice.
The model passed in is never modified.

Definitions (``x``, ``y`` are a held-out split):

* ``acc_eval``: ``model.eval()``, whole split in one forward pass.
* ``acc_batchstats``: every BatchNorm layer in train mode (normalizes with the
  statistics of its batch), everything else in eval mode, running statistics left
  untouched (measured on a deep copy); the split is cut into batches by
  :func:`make_batches`.
* ``acc_recalibrated``: eval mode after :func:`recalibrate_exact` on the calib split.
* ``acc_instancenorm``: eval mode after :func:`to_instancenorm` (CNNs only).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"

# Seed of the random batches ("shuffle" order) used by the batch-statistics measurements.
RANDOM_BATCH_SEED = 0


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, restoring the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_split(name: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Load ``data/<name>.npz`` -> (inputs float32 (N,1,8,8), labels int64 (N,))."""
    with np.load(data_dir / f"{name}.npz") as z:
        return z["inputs"], z["labels"]


def build_arch(arch: str, kwargs: dict | None = None) -> nn.Module:
    """Build ``"package.module:Class"`` or ``"path/to/file.py:Class"`` with kwargs."""
    target, _, attr = arch.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute():
            path = HERE.parent / path
        spec = importlib.util.spec_from_file_location(f"_arch_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    else:
        if str(HERE.parent) not in sys.path:
            sys.path.insert(0, str(HERE.parent))
        module = importlib.import_module(target)
    return getattr(module, attr)(**(kwargs or {}))


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def make_batches(
    labels: np.ndarray, batch_size: int, order: str, seed: int = RANDOM_BATCH_SEED
) -> list[np.ndarray]:
    """Cut indices 0..N-1 into batches.

    * ``"shuffle"``: ``np.random.default_rng(seed).permutation(N)``, consecutive chunks
      of ``batch_size`` (the last one may be smaller).
    * ``"keep"``: the split's own order, consecutive chunks.
    * ``"class-sorted"``: for each class in ascending order, that class's indices in
      the split's order, chunked by ``batch_size``; every batch holds one class only.
    """
    n = len(labels)
    if order == "shuffle":
        idx = np.random.default_rng(seed).permutation(n)
        return [idx[i : i + batch_size] for i in range(0, n, batch_size)]
    if order == "keep":
        idx = np.arange(n)
        return [idx[i : i + batch_size] for i in range(0, n, batch_size)]
    if order == "class-sorted":
        out = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            out += [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
        return out
    raise ValueError(f"unknown batch order {order!r}")


def _f64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double().eval()


def _count(pred: torch.Tensor, y: np.ndarray) -> dict:
    correct = int((pred.numpy() == y).sum())
    total = len(y)
    return {"correct": correct, "total": total, "acc": round(correct / total, 6)}


# ----------------------------------------------------------------------- measurements


@torch.no_grad()
def predict_eval(model: nn.Module, x: np.ndarray) -> torch.Tensor:
    """Predicted classes in eval mode (float64 copy, one thread)."""
    with one_thread():
        m = _f64(model)
        return m(torch.from_numpy(x).double()).argmax(1)


def acc_eval(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict:
    return _count(predict_eval(model, x), y)


@torch.no_grad()
def acc_batchstats(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batches: Sequence[np.ndarray]
) -> dict:
    """Accuracy with batch statistics: BN layers in train mode on a deep copy."""
    with one_thread():
        m = _f64(model)
        for _, bn in bn_layers(m):
            bn.train()
        pred = torch.empty(len(y), dtype=torch.long)
        xt = torch.from_numpy(x).double()
        for b in batches:
            bt = torch.from_numpy(np.asarray(b, dtype=np.int64))
            pred[bt] = m(xt[bt]).argmax(1)
        return _count(pred, y)


@torch.no_grad()
def recalibrate_exact(model: nn.Module, calib_x: np.ndarray) -> nn.Module:
    """Float64 copy whose BN running stats are the exact statistics of the calib data.

    Layers are processed in the order the forward pass reaches them; each layer's
    input is measured with all upstream layers already recalibrated (eval mode).
    running_mean = mean over all dims but the channel dim, running_var = unbiased
    variance over the same dims, both computed in float64.
    """
    with one_thread():
        m = _f64(model)
        xt = torch.from_numpy(calib_x).double()
        order: list[_BatchNorm] = []
        hooks = [
            bn.register_forward_pre_hook(lambda mod, inp: order.append(mod))
            for _, bn in bn_layers(m)
        ]
        m(xt)
        for h in hooks:
            h.remove()
        seen: set[int] = set()
        for bn in order:
            if id(bn) in seen:
                continue
            seen.add(id(bn))
            captured: list[torch.Tensor] = []
            h = bn.register_forward_pre_hook(lambda mod, inp, c=captured: c.append(inp[0]))
            m(xt)
            h.remove()
            a = captured[0]
            dims = [d for d in range(a.dim()) if d != 1]
            bn.running_mean.copy_(a.mean(dim=dims))
            bn.running_var.copy_(a.var(dim=dims, unbiased=True))
        return m


def to_instancenorm(model: nn.Module) -> nn.Module:
    """Copy with every BatchNorm2d replaced by InstanceNorm2d(affine, no running stats)."""
    m = copy.deepcopy(model)
    for name, bn in list(m.named_modules()):
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        inorm = nn.InstanceNorm2d(
            bn.num_features, eps=bn.eps, affine=True, track_running_stats=False
        )
        with torch.no_grad():
            inorm.weight.copy_(bn.weight)
            inorm.bias.copy_(bn.bias)
        parent_name, _, child = name.rpartition(".")
        parent = m.get_submodule(parent_name) if parent_name else m
        setattr(parent, child, inorm)
    return m


def measure_truth(
    model: nn.Module,
    test: tuple[np.ndarray, np.ndarray],
    calib: tuple[np.ndarray, np.ndarray],
    train_batch_size: int,
    train_order: str,
) -> dict:
    """All truths of one model on the test split (see module docstring).

    The train-like batches are class-sorted batches of ``train_batch_size`` when
    ``train_order == "class-sorted"``, else shuffled batches of ``train_batch_size``.
    """
    x, y = test
    out: dict = {"acc_eval": acc_eval(model, x, y)}
    if not bn_layers(model):
        return out
    trainlike_order = "class-sorted" if train_order == "class-sorted" else "shuffle"
    out["acc_batchstats_trainlike"] = acc_batchstats(
        model, x, y, make_batches(y, train_batch_size, trainlike_order)
    )
    out["acc_batchstats_random64"] = acc_batchstats(model, x, y, make_batches(y, 64, "shuffle"))
    out["acc_recalibrated"] = acc_eval(recalibrate_exact(model, calib[0]), x, y)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        out["acc_instancenorm"] = acc_eval(to_instancenorm(model), x, y)
    return out


# ------------------------------------------------------------ image-to-image (issue 12)
#
# The pix2pix-style pair (``pix2pix-b1``, ``pix2pix-b32``) predicts images, so its truth is a
# mean squared error instead of an accuracy: the mean over all N x C x H x W output values of
# (output - target)^2, computed on a float64 copy of the model on one thread, like above.
#
# * ``mse_eval``: ``model.eval()``, whole split in one forward pass.
# * ``mse_batchstats_bs1``: BatchNorm layers in train mode, one sample per forward pass: every
#   norm layer uses the statistics of a one-sample batch (for BatchNorm2d that is exactly
#   InstanceNorm with the same affine).
# * ``mse_batchstats_bs32``: the same with shuffled batches of 32
#   (``np.random.default_rng(RANDOM_BATCH_SEED).permutation(N)``, consecutive chunks).
# * ``mse_recalibrated``: eval mode after :func:`recalibrate_exact` on the calib inputs.
# * ``mse_instancenorm``: eval mode after :func:`to_instancenorm`.


def load_pairs(name: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Load ``data/<name>.npz`` of an image-to-image split -> (x, y), float32 (N,1,8,8)."""
    with np.load(data_dir / f"{name}.npz") as z:
        return z["x"], z["y"]


def _mse(out: torch.Tensor, y: np.ndarray) -> float:
    return float(((out - torch.from_numpy(y).double()) ** 2).mean())


@torch.no_grad()
def mse_eval(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Eval-mode MSE (float64 copy, one thread, whole split at once)."""
    with one_thread():
        return _mse(_f64(model)(torch.from_numpy(x).double()), y)


@torch.no_grad()
def mse_batchstats(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batches: Sequence[np.ndarray]
) -> float:
    """MSE with batch statistics: BN layers in train mode on a float64 deep copy."""
    with one_thread():
        m = _f64(model)
        for _, bn in bn_layers(m):
            bn.train()
        xt = torch.from_numpy(x).double()
        out = torch.empty(xt.shape[:1] + tuple(y.shape[1:]), dtype=torch.float64)
        for b in batches:
            bt = torch.from_numpy(np.asarray(b, dtype=np.int64))
            out[bt] = m(xt[bt])
        return _mse(out, y)


def measure_image_truth(
    model: nn.Module, test: tuple[np.ndarray, np.ndarray], calib_x: np.ndarray
) -> dict:
    """All MSE truths of an image-to-image model on ``test`` (see the comment above)."""
    x, y = test
    n = len(x)
    return {
        "mse_eval": mse_eval(model, x, y),
        "mse_batchstats_bs1": mse_batchstats(model, x, y, make_batches(np.zeros(n), 1, "keep")),
        "mse_batchstats_bs32": mse_batchstats(
            model, x, y, make_batches(np.zeros(n), 32, "shuffle")
        ),
        "mse_recalibrated": mse_eval(recalibrate_exact(model, calib_x), x, y),
        "mse_instancenorm": mse_eval(to_instancenorm(model), x, y),
    }


# -------------------------------------------------------------- shifted data (issue 12)


def measure_shifted_truth(model: nn.Module, shifted: tuple[np.ndarray, np.ndarray]) -> dict:
    """A classifier on shifted inputs (``data/shifted.npz``).

    * ``acc_eval``: eval mode (the shipped running statistics).
    * ``acc_recalibrated``: eval mode after :func:`recalibrate_exact` on the shifted inputs
      themselves (all of them).
    * ``acc_batchstats_random64``: BN layers in train mode, shuffled batches of 64
      (``np.random.default_rng(RANDOM_BATCH_SEED)``), as :func:`measure_truth`.
    """
    x, y = shifted
    return {
        "acc_eval": acc_eval(model, x, y),
        "acc_recalibrated": acc_eval(recalibrate_exact(model, x), x, y),
        "acc_batchstats_random64": acc_batchstats(model, x, y, make_batches(y, 64, "shuffle")),
    }

"""Turning the user's data into batches whose composition is known and reported.

Two kinds of source:

* sample-level (a tensor or array, a ``(inputs, labels)`` tuple of tensors, a dict with
  ``inputs``/``labels``, a map-style ``Dataset``): normdoctor forms the batches, so batch size,
  order and grouping are scan options;
* batch-level (a ``DataLoader``, a list or any other iterable of batches): the batches are used as
  they come, and the report says so.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from .errors import DataError
from .report import Composition

__all__ = ["Batch", "BatchPlan", "Gather", "plan_batches"]

INPUT_KEYS = ("inputs", "input", "x", "images", "image")
LABEL_KEYS = ("labels", "label", "y", "targets", "target")

GroupBy = str | Sequence[Hashable] | torch.Tensor | np.ndarray | Callable[[int], Hashable] | None


@dataclass(frozen=True, slots=True)
class Batch:
    inputs: Any
    labels: torch.Tensor | None
    size: int
    index: torch.Tensor | None = None  # sample indices, when normdoctor formed the batch


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """Batches to run, and how they were formed."""

    source: str  # "tensor", "dataset" or "batches"
    batch_size: int | None
    order: str  # "shuffle", "keep", "as-given"
    seed: int | None
    group_by: str | None
    total: int | None  # number of batches when known in advance
    batches: Iterable[Batch]

    def composition(self, sizes: Sequence[int]) -> Composition:
        """The report's record of these batches, given the sizes of those that ran."""
        return Composition(
            source=self.source,
            batch_size=self.batch_size,
            order=self.order,
            seed=self.seed,
            group_by=self.group_by,
            num_batches=len(sizes),
            num_samples=sum(sizes),
            min_batch=min(sizes, default=0),
            max_batch=max(sizes, default=0),
        )


class Gather:
    """Per-batch tensors held and handed to ``sink`` concatenated along the batch dimension.

    At batch size 1 the work done per batch on a model's outputs (predictions, comparisons,
    per-sample bookkeeping: a dozen small operations) costs more than the batch's forward; done
    on 64 batches at once it costs what one did (issue 16).  Only for per-sample work: ``sink``
    must give for the concatenation what it gives batch by batch.  Batches are held while their
    tensors line up (same trailing shapes, dtypes, devices, the same ones missing), at most 64
    batches or 2^20 elements of the first tensor; the tensors must not change in place
    afterwards (fresh outputs do not).  Put the largest tensor first.  :meth:`flush` hands on
    what is held.
    """

    def __init__(
        self, sink: Callable[..., None], batches: int = 64, elements: int = 1 << 20
    ) -> None:
        self.sink = sink
        self.batches, self.elements = batches, elements
        self._held: list[tuple[torch.Tensor | None, ...]] = []
        self._key: tuple[Any, ...] | None = None
        self._count = 0

    def add(self, *tensors: torch.Tensor | None) -> None:
        # (Tensor.device builds an object: is_cpu first)
        key = tuple(
            None if t is None else (t.shape[1:], t.dtype, None if t.is_cpu else t.device)
            for t in tensors
        )
        first = tensors[0]
        size = first.numel() if first is not None else 0
        if key != self._key or self._count + size > self.elements:
            self.flush()
            self._key = key
        self._held.append(tensors)
        self._count += size
        if len(self._held) >= self.batches:
            self.flush()

    def flush(self) -> None:
        held = self._held
        if not held:
            return
        self._held, self._key, self._count = [], None, 0
        if len(held) == 1:
            self.sink(*held[0])
            return
        self.sink(
            *(
                None if column[0] is None else torch.cat(column)  # type: ignore[arg-type]
                for column in zip(*held, strict=True)
            )
        )


def first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


def _as_tensor(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    return x


def _pick(d: dict, keys: Sequence[str]) -> tuple[str | None, Any]:
    for k in keys:
        if k in d:
            return k, d[k]
    return None, None


def split_batch(item: Any) -> tuple[Any, torch.Tensor | None]:
    """(inputs, labels) from one batch as an iterable yields it."""
    item = _as_tensor(item)
    if isinstance(item, torch.Tensor):
        return item, None
    if isinstance(item, dict):
        label_key, labels = _pick(item, LABEL_KEYS)
        _, inputs = _pick(item, INPUT_KEYS)
        if inputs is None:  # several named inputs: passed to the model as keyword arguments
            inputs = {k: _as_tensor(v) for k, v in item.items() if k != label_key}
        return _as_tensor(inputs), _as_tensor(labels)
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return _as_tensor(item[0]), _as_tensor(item[1])
        if len(item) == 1:
            return _as_tensor(item[0]), None
        return tuple(_as_tensor(v) for v in item[:-1]), _as_tensor(item[-1])
    raise DataError(
        f"cannot read a batch of type {type(item).__name__}: expected a tensor, "
        "an (inputs, labels) tuple or a dict"
    )


def _batch(inputs: Any, labels: Any) -> Batch:
    first = first_tensor(inputs)
    if first is None:
        raise DataError("a batch holds no tensor")
    if first.dim() == 0:
        raise DataError("a batch is a scalar: expected a batch dimension first")
    if labels is not None and not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    return Batch(inputs, labels, int(first.shape[0]))


def sample_level(data: Any) -> tuple[str, Any, torch.Tensor | None] | None:
    """(source, inputs, labels) when normdoctor may form the batches itself, else None."""
    data = _as_tensor(data)
    if isinstance(data, torch.Tensor):
        return "tensor", data, None
    if isinstance(data, tuple) and len(data) == 2:
        x, y = (_as_tensor(v) for v in data)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and y.dim() >= 1:
            # labels (N,) or targets shaped like the output (N, ...): per-sample, either way
            if x.dim() == 0 or x.shape[0] != y.shape[0]:
                raise DataError(
                    f"inputs hold {x.shape[0] if x.dim() else 0} samples "
                    f"but labels hold {y.shape[0]}"
                )
            return "tensor", x, y
    if isinstance(data, dict):
        _, x = _pick(data, INPUT_KEYS)
        _, y = _pick(data, LABEL_KEYS)
        x, y = _as_tensor(x), _as_tensor(y)
        if isinstance(x, torch.Tensor):
            if y is not None and (not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]):
                raise DataError("labels do not match the inputs' first dimension")
            return "tensor", x, y
    if isinstance(data, Dataset) and not isinstance(data, DataLoader) and hasattr(data, "__len__"):
        return "dataset", data, None
    return None


def _label(item: Any) -> Any:
    """The label of one dataset item (a ``DataError`` when it has none)."""
    label = split_batch(default_collate([item]))[1]
    if label is None:
        raise DataError("group_by='label' needs labels in the data")
    return label.item()


def _group_keys(group_by: GroupBy, n: int, labels: torch.Tensor | None) -> list[Hashable]:
    if isinstance(group_by, str):
        if group_by != "label":
            raise DataError(
                f"group_by must be 'label', a sequence of keys or a function, not {group_by!r}"
            )
        if labels is None:
            raise DataError("group_by='label' needs labels in the data")
        return labels.tolist()
    if callable(group_by):
        return [group_by(i) for i in range(n)]
    keys = (
        group_by.tolist()
        if isinstance(group_by, (torch.Tensor, np.ndarray))
        else list(cast(Sequence[Hashable], group_by))
    )
    if len(keys) != n:
        raise DataError(f"group_by holds {len(keys)} keys for {n} samples")
    return keys


def _split(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Chunks of ``batch_size``; a last chunk of one sample joins the one before it.

    In train mode BatchNorm over (N, C) features cannot normalize one sample (torch raises
    "Expected more than 1 value per channel"), and a one-sample batch among larger ones is not
    what training saw either: 171 samples in batches of 2 give 84 batches of 2 and one of 3.
    """
    chunks = list(order.split(batch_size))
    if batch_size > 1 and len(chunks) > 1 and chunks[-1].numel() == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def _index_batches(
    n: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    keys: list[Hashable] | None,
    subset: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    if subset is not None:  # the samples to use, in the order just drawn
        keep = torch.zeros(n, dtype=torch.bool)
        keep[subset] = True
        order = order[keep[order]]
    if keys is None:
        return _split(order, batch_size)
    groups: dict[Hashable, list[int]] = {}
    for i in order.tolist():
        groups.setdefault(keys[i], []).append(i)
    if not shuffle:
        groups = dict(sorted(groups.items(), key=lambda kv: min(kv[1])))
    batches = [chunk for idx in groups.values() for chunk in _split(torch.tensor(idx), batch_size)]
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    return batches


def plan_batches(
    data: Any,
    *,
    batch_size: int | None,
    shuffle: bool,
    seed: int,
    group_by: GroupBy,
    max_batches: int | None,
    subset: torch.Tensor | None = None,
) -> BatchPlan:
    """Batches from any supported source; raises :class:`DataError` with a one-line reason.

    ``subset``: sample-level data only, the indices of the samples to batch (the others are
    left out); every batch normdoctor forms carries its samples' indices.
    """
    if batch_size is not None and batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise DataError(f"max_batches must be at least 1, got {max_batches}")
    level = sample_level(data)
    if level is None:
        if data is None or isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise DataError(
                f"cannot scan data of type {type(data).__name__}: expected a tensor, "
                "an (inputs, labels) tuple, a dict, a Dataset or an iterable of batches"
            )
        if group_by is not None:
            raise DataError(
                "group_by needs sample-level data (a tensor or a Dataset), "
                "not batches that are already formed"
            )
        total = None
        if isinstance(data, Sized):
            total = len(data) if max_batches is None else min(len(data), max_batches)

        def given() -> Iterator[Batch]:
            for i, item in enumerate(data):
                if max_batches is not None and i >= max_batches:
                    return
                yield _batch(*split_batch(item))

        return BatchPlan("batches", None, "as-given", None, None, total, given())

    source, inputs, labels = level
    n = len(inputs)
    if n == 0:
        raise DataError("the data holds no samples")
    size = batch_size or 32
    keys = None
    if group_by is not None:
        if source == "dataset" and isinstance(group_by, str):
            labels = torch.as_tensor([_label(inputs[i]) for i in range(n)])
        keys = _group_keys(group_by, n, labels)
    index_batches = _index_batches(n, size, shuffle, seed, keys, subset)
    if max_batches is not None:
        index_batches = index_batches[:max_batches]
    group_name = None if group_by is None else ("label" if isinstance(group_by, str) else "key")

    def formed() -> Iterator[Batch]:
        if source == "tensor" and isinstance(inputs, torch.Tensor) and inputs.dim() > 0:
            # index_select, not inputs[idx]: a third of the cost at batch size 1
            for idx in index_batches:
                x = inputs.index_select(0, idx)
                y = None if labels is None else labels.index_select(0, idx)
                yield Batch(x, y, int(idx.shape[0]), idx)
            return
        for idx in index_batches:
            if source == "tensor":
                batch = _batch(inputs[idx], None if labels is None else labels[idx])
            else:
                batch = _batch(*split_batch(default_collate([inputs[i] for i in idx.tolist()])))
            yield Batch(batch.inputs, batch.labels, batch.size, idx)

    return BatchPlan(
        source,
        size,
        "shuffle" if shuffle else "keep",
        seed if shuffle else None,
        group_name,
        len(index_batches),
        formed(),
    )

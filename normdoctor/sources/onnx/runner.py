"""Running prepared graphs through onnxruntime, batch by batch, fixed batch sizes included.

An :class:`Engine` holds one model and named *variants* of it ("eval", "train", ...), each a
function that rewrites a copy of the model.  Every variant exposes the same taps (the inputs of
the measured nodes) as extra graph outputs.  Sessions are built on first use.

Fixed batch dimension B0 (an input declared ``[1, C, H, W]``): a batch of size B0 runs as is.
Another size runs on a copy whose batch dimension is made symbolic, but only after that copy
was verified once: its eval-path outputs and taps on the batch must equal those of running the
original graph on chunks of B0 samples.  Graphs that hard-code the batch size (a ``Reshape`` to
``[1, -1]``) fail the check; then per-sample variants (the eval path) run chunk by chunk, and a
variant that needs the whole batch at once (the train path, which normalizes with the batch's
statistics) is refused with a message.  Only a positive ``dim_value`` is a fixed size: a
named, absent, zero or negative first dimension (paddle2onnx writes ``dim_value: -1``) is
dynamic, and batches of any size run as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import ModelProto, helper

from ...errors import CompositionError, DataError
from .graph import Shapes, data_inputs, static_dim
from .rewrite import add_outputs, copy_model, relax_batch

__all__ = ["VERIFY_ATOL", "VERIFY_RTOL", "Engine", "make_session"]

#: Relaxed-batch graph against chunked runs of the original.  Batched and single-sample kernels
#: (Conv, Gemm) block their sums differently, a few float32 ulps per layer; a graph that
#: hard-codes the batch size changes shapes or mixes samples, an O(1) difference.
VERIFY_RTOL = 1e-4
VERIFY_ATOL = 1e-5  # times the largest magnitude of the compared tensor

Prepare = Callable[[ModelProto], None]


def make_session(model: ModelProto, providers: Sequence[str] | None = None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # no warnings about unused initializers and the like
    return ort.InferenceSession(
        model.SerializeToString(), so, providers=list(providers or ["CPUExecutionProvider"])
    )


def _np_dtype(elem: int) -> np.dtype | None:
    if not elem:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, TypeError, ValueError):
        return None


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class Engine:
    """Sessions over variants of one model; see the module docstring for fixed batch sizes."""

    def __init__(
        self,
        model: ModelProto,
        variants: Mapping[str, Prepare | None],
        taps: Mapping[str, str],
        shapes: Shapes,
        *,
        per_sample: Sequence[str] = ("eval",),
        providers: Sequence[str] | None = None,
        label: str = "model",
        extra_inputs: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.variants = dict(variants)
        self.variants.setdefault("eval", None)
        self.taps = dict(taps)  # key -> value name
        self.shapes = shapes
        self.per_sample = set(per_sample) | {"eval"}
        self.providers = providers
        self.label = label
        # extra_inputs: graph inputs the caller feeds per run (not data, never split)
        self.inputs = [i for i in data_inputs(model.graph) if i.name not in set(extra_inputs)]
        self.outputs = [o.name for o in model.graph.output]
        self.input_dtypes = {i.name: _np_dtype(i.type.tensor_type.elem_type) for i in self.inputs}
        fixed = set()
        for i in self.inputs:
            dims = i.type.tensor_type.shape.dim
            size = static_dim(dims[0]) if len(dims) else None
            if size is not None:  # -1, 0, a name or nothing: a dynamic batch
                fixed.add(size)
        # One fixed size shared by the data inputs; inputs that disagree have no batch to relax.
        self.fixed: int | None = fixed.pop() if len(fixed) == 1 else None
        self.mode: str | None = None  # "relaxed" or "split", once a batch needed it
        self.reason: str | None = None
        self.notes: list[str] = []
        self._sessions: dict[tuple[str, bool], Any] = {}

    # -- feeds -----------------------------------------------------------------------------
    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        """Graph feeds from one batch's inputs (a tensor, a tuple in input order, or a dict)."""
        names = [i.name for i in self.inputs]
        if isinstance(inputs, Mapping):
            unknown = sorted(set(inputs) - set(names))
            missing = [n for n in names if n not in inputs]
            if unknown or missing:
                raise DataError(
                    f"{self.label} takes inputs {names}; the batch holds {sorted(inputs)}"
                )
            values = {n: inputs[n] for n in names}
        elif isinstance(inputs, (tuple, list)):
            if len(inputs) != len(names):
                raise DataError(
                    f"{self.label} takes {len(names)} input(s) {names}; the batch holds "
                    f"{len(inputs)}"
                )
            values = dict(zip(names, inputs, strict=True))
        else:
            if len(names) != 1:
                raise DataError(
                    f"{self.label} takes {len(names)} inputs {names}: give batches as tuples "
                    "in this order or as dicts keyed by input name"
                )
            values = {names[0]: inputs}
        out = {}
        for name, value in values.items():
            arr = _as_numpy(value)
            dtype = self.input_dtypes.get(name)
            out[name] = np.ascontiguousarray(arr.astype(dtype, copy=False) if dtype else arr)
        return out

    # -- sessions --------------------------------------------------------------------------
    def _session(self, variant: str, relaxed: bool) -> Any:
        key = (variant, relaxed)
        if key not in self._sessions:
            base = relax_batch(self.model, self.fixed or 0) if relaxed else copy_model(self.model)
            prepare = self.variants[variant]
            if prepare is not None:
                prepare(base)
            add_outputs(base, self.taps.values(), self.shapes)
            self._sessions[key] = make_session(base, self.providers)
        return self._sessions[key]

    def _raw(
        self, variant: str, relaxed: bool, feeds: Mapping[str, np.ndarray]
    ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        sess = self._session(variant, relaxed)
        tap_values = list(dict.fromkeys(v for v in self.taps.values() if v not in feeds))
        wanted = list(dict.fromkeys([*self.outputs, *tap_values]))
        got = dict(zip(wanted, sess.run(wanted, dict(feeds)), strict=True))
        got.update({k: v for k, v in feeds.items()})
        outs = [got[o] for o in self.outputs]
        taps = {key: got[value] for key, value in self.taps.items()}
        return outs, taps

    # -- running ---------------------------------------------------------------------------
    def run(
        self,
        variant: str,
        feeds: Mapping[str, np.ndarray],
        size: int,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """(graph outputs, taps) of ``variant`` on one batch of ``size`` samples."""
        extra = dict(extra or {})
        if self.fixed is None or size == self.fixed:
            return self._raw(variant, False, {**feeds, **extra})
        if self.mode is None:
            self._decide(feeds, extra, size)
        if self.mode == "relaxed":
            return self._raw(variant, True, {**feeds, **extra})
        if variant in self.per_sample and size % self.fixed == 0:
            return self._chunked(variant, feeds, extra, size)
        raise CompositionError(self._refusal(variant, size))

    def _chunked(
        self,
        variant: str,
        feeds: Mapping[str, np.ndarray],
        extra: Mapping[str, np.ndarray],
        size: int,
    ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        assert self.fixed is not None
        parts = []
        for start in range(0, size, self.fixed):
            chunk = {k: v[start : start + self.fixed] for k, v in feeds.items()}
            parts.append(self._raw(variant, False, {**chunk, **extra}))
        try:
            outs = [np.concatenate([p[0][i] for p in parts]) for i in range(len(self.outputs))]
            taps = {k: np.concatenate([p[1][k] for p in parts]) for k in self.taps}
        except ValueError as exc:
            raise DataError(
                f"{self.label}: outputs of single-sample runs cannot be stacked along the batch "
                f"dimension ({exc})"
            ) from exc
        return outs, taps

    def _decide(
        self, feeds: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray], size: int
    ) -> None:
        assert self.fixed is not None
        if size % self.fixed:
            self.mode = "split"
            self.reason = f"a batch of {size} is not a multiple of {self.fixed}"
            return
        reference = self._chunked("eval", feeds, extra, size)
        try:
            candidate = self._raw("eval", True, {**feeds, **extra})
        except Exception as exc:  # the relaxed graph does not even run
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.mode, self.reason = "split", f"it fails with a batch of {size}: {first[:200]}"
        else:
            bad = _first_mismatch(reference, candidate)
            if bad is None:
                self.mode = "relaxed"
                self.notes.append(
                    f"the graph declares a fixed batch size of {self.fixed}: its batch dimension "
                    f"was made dynamic for batches of {size} (verified against runs of "
                    f"{self.fixed} sample(s) at a time)"
                )
                return
            self.mode, self.reason = "split", bad
        self.notes.append(
            f"the graph declares a fixed batch size of {self.fixed} and cannot run larger "
            f"batches ({self.reason}): the eval path ran {self.fixed} sample(s) at a time"
        )

    def _refusal(self, variant: str, size: int) -> str:
        what = "the train path normalizes with the statistics of the whole batch"
        if variant != "train":
            what = f"the {variant} pass needs the whole batch at once"
        return (
            f"{self.label} has a fixed batch size of {self.fixed} and its graph cannot be made "
            f"to run batches of {size} ({self.reason}); {what}: scan with "
            f"batch_size={self.fixed}, or measure only paths=('eval',)"
        )


def _first_mismatch(
    a: tuple[list[np.ndarray], dict[str, np.ndarray]],
    b: tuple[list[np.ndarray], dict[str, np.ndarray]],
) -> str | None:
    pairs = [(f"output {i}", x, y) for i, (x, y) in enumerate(zip(a[0], b[0], strict=True))]
    pairs += [(f"input of {k}", a[1][k], b[1][k]) for k in a[1]]
    for what, x, y in pairs:
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape:
            return f"{what} has shape {y.shape} instead of {x.shape}"
        if x.dtype.kind not in "fc":
            if not np.array_equal(x, y):
                return f"{what} differs"
            continue
        scale = float(np.nanmax(np.abs(x))) if x.size else 0.0
        if not np.allclose(
            y, x, rtol=VERIFY_RTOL, atol=VERIFY_ATOL * max(scale, 1e-30), equal_nan=True
        ):
            return f"{what} differs from single-sample runs"
    return None


def check_model(model: ModelProto) -> None:
    onnx.checker.check_model(model)

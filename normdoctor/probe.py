"""Recording live batch statistics of norm layers through forward pre-hooks.

:class:`Probe` owns everything that touches the model: it attaches one pre-hook per measured
layer, switches the model between the two paths (DESIGN.md), and on exit, normal or not,
removes every hook and restores every module's ``training`` flag, every attribute it changed and
every norm buffer bit for bit.

The hook is the hot path: it runs once per layer per batch.  It shifts the input by a per-layer
constant (the first sample's channel means, so that ill-conditioned channels keep their digits),
reduces it to per-sample channel sums and sums of squares in the input's dtype, and writes one
float64 row into a fixed-size buffer.  It never synchronises with the host.  Every 64 rows the
buffer is folded, vectorised, into fixed-size float64 accumulators, so memory does not grow with
the number of batches (apart from one float per batch: the per-batch score).  The shifted copy
of the input goes into one scratch buffer that all layers reuse.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .layers import BATCH_DEPENDENT, NormFamily, NormLayer, _family
from .metrics import channel_weights, layer_score, mismatch_sq, noise_sq_from_sums
from .stats import Moments

__all__ = ["LayerMeasurement", "NormState", "Path", "Probe", "Recorder", "module_state"]

Path = str  # "train" or "eval"
PATHS: tuple[Path, ...] = ("train", "eval")
_FLUSH_ROWS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerMeasurement:
    """What one path recorded for one layer, reduced to CPU float64 tensors.

    ``units`` are batches, except for InstanceNorm with running statistics, whose train mode
    normalizes each sample on its own: there the unit is the sample.
    """

    units: int
    samples: int
    pooled: Moments
    running_mean: torch.Tensor
    running_var: torch.Tensor
    weights: torch.Tensor  # normalized gamma^2 over valid channels (sum 1), zeros if none
    channel_m2: torch.Tensor  # per-channel m^2 averaged over units, against running stats
    unit_scores: torch.Tensor  # per-unit layer mismatch D_b (NaN for non-finite units)
    noise_m2: torch.Tensor  # per-channel m^2 of units against pooled stats, averaged
    noniid: torch.Tensor | None  # per channel: between-unit spread over i.i.d. prediction
    nonfinite_units: int
    per_sample: bool  # every unit held exactly one sample
    spatial: bool  # the input had dims beyond (N, C)


class Scratch:
    """One reusable buffer for the shifted copy of a layer's input (layers run one at a time)."""

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor | None:
        if not x.is_contiguous():
            return None
        key = (x.dtype, x.device)
        flat = self._flat.get(key)
        if flat is None or flat.numel() < x.numel():
            flat = self._flat[key] = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
        return flat[: x.numel()].view(x.shape)


@dataclass(frozen=True, slots=True)
class NormState:
    """The tensors of a norm layer that the metrics need (any may be missing)."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None


def module_state(module: nn.Module) -> NormState:
    weight = module._parameters.get("weight")
    if weight is None:
        weight = module._buffers.get("weight")
    return NormState(
        module._buffers.get("running_mean"), module._buffers.get("running_var"), weight
    )


class Recorder:
    """Streaming accumulators of one layer on one path."""

    def __init__(
        self,
        layer: NormLayer,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
        weight: torch.Tensor | None,
    ) -> None:
        self.layer = layer
        self.per_unit_sample = layer.family is NormFamily.INSTANCE_TRACKED
        device = running_mean.device
        self.device = device
        self.running_mean = running_mean.detach().to(torch.float64).clone()
        self.running_var = running_var.detach().to(torch.float64).clone()
        self.eps = float(layer.eps)
        valid = torch.isfinite(self.running_var + self.eps) & (self.running_var + self.eps > 0)
        valid &= torch.isfinite(self.running_mean)
        w = channel_weights(weight, valid)  # gamma^2 (ones without affine or all-zero gamma)
        total = float(w.sum())
        self.weights = w / total if total > 0 else w
        # Invalid running stats would turn every score into NaN: score those channels as if
        # they were perfect, and report them as degenerate instead.
        self.safe_mean = torch.where(valid, self.running_mean, torch.zeros_like(self.running_mean))
        self.safe_var = torch.where(valid, self.running_var, torch.ones_like(self.running_var))
        self.shift: torch.Tensor | None = None
        self.shift64: torch.Tensor | None = None
        self._shift_view: dict[int, torch.Tensor] = {}
        self.buf: torch.Tensor | None = None
        self.nrows = 0
        self.meta: list[tuple[int, int, int]] = []  # (rows, elements per row, samples per row)
        c = self.running_mean.numel()
        z = torch.zeros(c, dtype=torch.float64, device=device)
        # Sums over units (rows); names follow DESIGN.md.
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.samples = torch.zeros((), dtype=torch.float64, device=device)
        self.units = torch.zeros((), dtype=torch.float64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)
        self.p1, self.p2 = z.clone(), z.clone()  # sum (x-K), sum (x-K)^2
        self.sum_m2 = z.clone()  # sum_b m^2(b, c) against running stats
        self.r1, self.r2, self.rv = z.clone(), z.clone(), z.clone()  # for the noise term
        self.u1, self.u2 = z.clone(), z.clone()  # sum_b (mu_b - K), sum_b (mu_b - K)^2
        self.z1, self.z2, self.between = z.clone(), z.clone(), z.clone()  # per-sample means
        self.unit_scores: list[torch.Tensor] = []
        self.rows_per_call: list[int] = []  # units each observe() added, to reorder across shards
        self.spatial = False

    @staticmethod
    def for_module(module: nn.Module, layer: NormLayer) -> Recorder:
        state = module_state(module)
        assert state.running_mean is not None and state.running_var is not None
        return Recorder(layer, state.running_mean, state.running_var, state.weight)

    # -- hot path --------------------------------------------------------------------------
    def observe(self, x: torch.Tensor, scratch: Scratch | None = None) -> None:
        """Record one call's input (N, C, *): the hot path, no host synchronisation."""
        x = x.detach()
        if x.dim() < 2 or x.shape[1] != self.running_mean.numel():
            return  # not what the layer takes: the layer itself raises the error
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        if self.shift is None:
            # Any value within a few standard deviations of the channel mean keeps the sums
            # well conditioned: the first sample's channel means cost 1/N of a pass.
            first = x[0].reshape(x.shape[1], -1).mean(dim=1)
            self.shift = torch.nan_to_num(first, nan=0.0, posinf=0.0, neginf=0.0)
            self.shift64 = self.shift.to(torch.float64)
            self._shift_view = {}
        n = x.shape[0]
        shift = self._shift_view.get(x.dim())
        if shift is None:
            shift = self._shift_view[x.dim()] = self.shift.view(1, -1, *([1] * (x.dim() - 2)))
        # x - K into a reused buffer: a fresh activation-sized temporary per call costs more
        # than the arithmetic (page faults on large tensors).
        out = scratch.like(x) if scratch is not None else None
        xs = torch.sub(x, shift, out=out) if out is not None else x - shift
        if x.dim() == 2:
            s1 = xs
            s2 = xs * xs
            per_row = 1
        else:
            self.spatial = True
            xs = xs.flatten(2)
            s1 = xs.sum(-1)
            s2 = torch.linalg.vector_norm(xs, dim=-1).square_()  # one pass, no temporary
            per_row = xs.shape[-1]
        rows = torch.stack((s1, s2, s1 * s1), 1)
        if self.per_unit_sample:
            self.rows_per_call.append(n)
            for chunk in rows.split(_FLUSH_ROWS):
                k = chunk.shape[0]
                if self.nrows + k > _FLUSH_ROWS:
                    self.flush()
                self._buffer()[self.nrows : self.nrows + k].copy_(chunk)
                self.nrows += k
                self.meta.append((k, per_row, 1))
        else:
            self.rows_per_call.append(1)
            buf = self.buf if self.buf is not None else self._buffer()
            torch.sum(rows, 0, dtype=torch.float64, out=buf[self.nrows])
            self.nrows += 1
            self.meta.append((1, n * per_row, n))
        if self.nrows >= _FLUSH_ROWS:
            self.flush()

    def _buffer(self) -> torch.Tensor:
        """Fixed-size float64 rows waiting to be folded: memory does not grow with batches."""
        if self.buf is None:
            c = self.running_mean.numel()
            self.buf = torch.empty(_FLUSH_ROWS, 3, c, dtype=torch.float64, device=self.device)
        return self.buf

    # -- folding rows into the accumulators ------------------------------------------------
    def flush(self) -> None:
        if not self.nrows:
            return
        rows = self._buffer()[: self.nrows]
        elems, samples = [], []
        for k, per_row, s in self.meta:
            elems += [per_row] * k
            samples += [s] * k
        self.nrows, self.meta = 0, []
        n = torch.tensor(elems, dtype=torch.float64, device=rows.device)[:, None]
        ns = torch.tensor(samples, dtype=torch.float64, device=rows.device)[:, None]
        per_sample_elems = n / ns
        t1, t2, q = rows.unbind(1)
        finite = torch.isfinite(rows).all(dim=(1, 2))
        self.nonfinite += (~finite).sum()
        keep = finite.to(torch.float64)[:, None]
        t1 = torch.where(finite[:, None], t1, 0.0)
        t2 = torch.where(finite[:, None], t2, 0.0)
        q = torch.where(finite[:, None], q, 0.0)
        e = t1 / n  # mu_b - K
        var_b = (t2 / n - e.square()).clamp_min(0)
        m2 = mismatch_sq(self.shift64 + e, var_b, self.safe_mean, self.safe_var, self.eps) * keep
        scores = layer_score(m2, self.weights)
        self.unit_scores.append(torch.where(finite, scores, float("nan")))
        self.sum_m2 += m2.sum(0)
        self.count += (n * keep).sum()
        self.samples += (ns * keep).sum()
        self.units += keep.sum()
        self.p1 += t1.sum(0)
        self.p2 += t2.sum(0)
        inv = torch.rsqrt(var_b + self.eps)
        self.r1 += (var_b * inv.square() * keep).sum(0)
        self.r2 += (var_b * inv * keep).sum(0)
        self.rv += (var_b * keep).sum(0)
        self.u1 += e.sum(0)
        self.u2 += e.square().sum(0)
        d1 = t1 / per_sample_elems  # sum over the row's samples of (sample mean - K)
        self.z1 += d1.sum(0)
        self.z2 += (q / per_sample_elems.square()).sum(0)
        self.between += (d1.square() / ns).sum(0)

    # -- merging shards -------------------------------------------------------------------
    SCALARS = ("count", "samples", "units", "nonfinite")
    VECTORS = ("p1", "p2", "sum_m2", "r1", "r2", "rv", "u1", "u2", "z1", "z2", "between")

    def rebase(self, shift: torch.Tensor) -> None:
        """Express every shifted sum relative to ``shift`` instead of this recorder's own.

        Shards start from different first batches, hence different shifts; sums of (x - K)
        and (x - K)^2 convert exactly: with d = K_old - K_new, sum (x - K_new) = p1 + n d and
        sum (x - K_new)^2 = p2 + 2 d p1 + n d^2 (likewise per batch and per sample).
        """
        self.flush()
        shift = shift.to(device=self.device, dtype=torch.float64)
        if self.shift64 is not None:
            d = self.shift64 - shift
            self.p2 += 2 * d * self.p1 + self.count * d.square()
            self.p1 += self.count * d
            self.u2 += 2 * d * self.u1 + self.units * d.square()
            self.u1 += self.units * d
            self.between += 2 * d * self.z1 + self.samples * d.square()
            self.z2 += 2 * d * self.z1 + self.samples * d.square()
            self.z1 += self.samples * d
        self.shift64 = shift
        self.shift = shift.to(torch.float32 if self.shift is None else self.shift.dtype)
        self._shift_view = {}

    def packed(self) -> torch.Tensor:
        """Every additive accumulator in one flat float64 tensor (for one all_reduce)."""
        self.flush()
        parts = [getattr(self, k).reshape(1) for k in self.SCALARS]
        parts.append(torch.tensor([float(self.spatial)], dtype=torch.float64, device=self.device))
        parts += [getattr(self, k) for k in self.VECTORS]
        return torch.cat(parts)

    def unpack(self, flat: torch.Tensor) -> None:
        """Load accumulators from :meth:`packed` (after a sum over shards)."""
        c = self.running_mean.numel()
        head = len(self.SCALARS) + 1
        for i, k in enumerate(self.SCALARS):
            setattr(self, k, flat[i].clone())
        self.spatial = bool(flat[len(self.SCALARS)] > 0)
        for i, k in enumerate(self.VECTORS):
            setattr(self, k, flat[head + i * c : head + (i + 1) * c].clone())

    def finish(self) -> LayerMeasurement | None:
        """Reduce to CPU tensors; ``None`` if the layer never ran on this path."""
        self.flush()
        if self.shift64 is None:
            return None
        cpu = torch.device("cpu")
        count = float(self.count)
        units = float(self.units)
        k = self.shift64.to(cpu)
        p1, p2 = self.p1.to(cpu), self.p2.to(cpu)
        if count > 0:
            dev = p1 / count
            pooled = Moments(count, k + dev, (p2 - p1.square() / count).clamp_min(0))
        else:
            nan = torch.full_like(k, math.nan)
            pooled, dev = Moments(0.0, nan, nan), nan
        mean_dev_sq = (
            self.u2.to(cpu) - 2 * dev * self.u1.to(cpu) + units * dev.square()
        ).clamp_min(0)
        noise = noise_sq_from_sums(
            batches=max(units, 1.0),
            sum_r1=self.r1.to(cpu),
            sum_r2=self.r2.to(cpu),
            sum_var=self.rv.to(cpu),
            mean_dev_sq=mean_dev_sq,
            pooled_var=pooled.var,
            eps=self.eps,
        )
        samples = float(self.samples)
        noniid = None
        if not self.per_unit_sample and units >= 2 and samples > units:
            z1 = self.z1.to(cpu)
            total = self.z2.to(cpu) - z1.square() / samples
            between = self.between.to(cpu) - z1.square() / samples
            with torch.no_grad():
                ratio = (between / (units - 1)) / (total / (samples - 1))
            noniid = torch.where(total > 0, ratio, math.nan)
        scores = (
            torch.cat(self.unit_scores).to(cpu)
            if self.unit_scores
            else torch.empty(0, dtype=torch.float64)
        )
        per_sample = samples == units if not self.per_unit_sample else True
        return LayerMeasurement(
            units=int(units),
            samples=int(samples),
            pooled=pooled,
            running_mean=self.running_mean.to(cpu),
            running_var=self.running_var.to(cpu),
            weights=self.weights.to(cpu),
            channel_m2=self.sum_m2.to(cpu) / max(units, 1.0),
            unit_scores=scores,
            noise_m2=noise,
            noniid=noniid,
            nonfinite_units=int(self.nonfinite),
            per_sample=per_sample,
            spatial=self.spatial,
        )


class Probe:
    """Context manager that records the inputs of batch-dependent norm layers.

    Example::

        with Probe(model, layers) as probe:
            for x in batches:
                with probe.path("train"):
                    model(x)
        measurements = probe.results("train")

    On exit every hook is removed and the model is restored exactly: ``training`` flags of every
    module, ``track_running_stats`` and the norm buffers (values and objects).
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[NormLayer], paths: Sequence[Path] = PATHS
    ):
        self.model = model
        self.layers = [layer for layer in layers if layer.batch_dependent and layer.materialized]
        self._order_only = [layer for layer in layers if not layer.batch_dependent]
        self.paths = tuple(paths)
        self._modules = dict(model.named_modules())
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._recorders: dict[Path, dict[str, Recorder]] = {}
        self._active: dict[str, Recorder] | None = None
        self._scratch = Scratch()
        self.order: list[str] = []
        self._seen: set[str] = set()
        self.last_layer: str | None = None

    # -- state saving ----------------------------------------------------------------------
    def _save(self) -> None:
        self._flags = [(m, m.training) for m in self.model.modules()]
        self._norm_state = []
        measured = {layer.name for layer in self.layers}
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) or name in measured:
                buffers = dict(module._buffers)
                values = {k: v.detach().clone() for k, v in buffers.items() if v is not None}
                self._norm_state.append(
                    (module, getattr(module, "track_running_stats", None), buffers, values)
                )
        # Layers the train path switches to batch statistics (frozen ones have no such mode).
        self._switch = []
        for module, track, buffers, _values in self._norm_state:
            family = _family(module)
            if family in BATCH_DEPENDENT and family is not NormFamily.FROZEN:
                self._switch.append((module, family, track, buffers))

    def _restore(self) -> None:
        """Every flag, attribute and norm buffer back as saved (objects and values)."""
        for module, flag in self._flags:
            module.training = flag
        for module, track, buffers, values in self._norm_state:
            if track is not None:
                module.track_running_stats = track
            for key, tensor in buffers.items():
                module._buffers[key] = tensor
                if tensor is not None and key in values:
                    with torch.no_grad():
                        tensor.copy_(values[key])

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> Probe:
        self._save()
        try:
            self.model.eval()
            for path in self.paths:
                self._recorders[path] = {
                    layer.name: Recorder.for_module(self._modules[layer.name], layer)
                    for layer in self.layers
                }
            for layer in self.layers:
                module = self._modules[layer.name]
                self._handles.append(module.register_forward_pre_hook(self._hook_for(layer.name)))
            for layer in self._order_only:  # batch-independent: only where it runs in the order
                module = self._modules[layer.name]
                self._handles.append(module.register_forward_pre_hook(self._order_hook(layer.name)))
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = None
        self._scratch = Scratch()  # let the buffer go
        self._restore()

    def _hook_for(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            active = self._active
            if active is None or not args or not isinstance(args[0], torch.Tensor):
                return
            self.last_layer = name
            if name not in self._seen:
                self._seen.add(name)
                self.order.append(name)
            active[name].observe(args[0], self._scratch)

        return hook

    def _order_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if self._active is not None and name not in self._seen:
                self._seen.add(name)
                self.order.append(name)

        return hook

    # -- the two paths ---------------------------------------------------------------------
    @contextmanager
    def path(self, path: Path) -> Iterator[None]:
        """Run the body on ``path``: "train" (norm layers use batch statistics, nothing else
        changes mode, running statistics untouched) or "eval" (``model.eval()``).

        The whole model was put in eval mode on entering the probe; a path only switches the
        batch-dependent norm layers, so the cost per batch does not grow with the model's size.
        """
        if path not in self._recorders:
            raise ValueError(f"path {path!r} not recorded by this probe (paths: {self.paths})")
        train = path == "train"
        if train:
            for module, family, _track, _buffers in self._switch:
                module.training = True
                module.track_running_stats = False
                if family is NormFamily.INSTANCE_TRACKED:
                    # InstanceNorm updates running stats whenever it is handed them.
                    module._buffers["running_mean"] = None
                    module._buffers["running_var"] = None
        self._active = self._recorders[path]
        try:
            yield
        finally:
            self._active = None
            if train:
                for module, family, track, buffers in self._switch:
                    module.training = False
                    module.track_running_stats = track
                    if family is NormFamily.INSTANCE_TRACKED:
                        module._buffers["running_mean"] = buffers["running_mean"]
                        module._buffers["running_var"] = buffers["running_var"]

    def results(self, path: Path) -> dict[str, LayerMeasurement | None]:
        """Per layer name, what ``path`` recorded (``None``: the layer never ran)."""
        return {name: rec.finish() for name, rec in self._recorders[path].items()}

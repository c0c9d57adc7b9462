"""Per-layer accumulators of live batch statistics, whatever delivers them.

A :class:`Recorder` is fed one layer input (or per-channel reductions) per batch and keeps
fixed-size float64 accumulators: it shifts the input by a per-layer constant (the first sample's
channel means, so that ill-conditioned channels keep their digits), reduces it to per-sample
channel sums and sums of squares in the input's dtype, and writes one float64 row into a
fixed-size buffer.  It never synchronises with the host.  Every 64 rows the buffer is folded,
vectorised, into the accumulators, so memory does not grow with the number of batches (apart
from one float per batch: the per-batch score).  The shifted copy of the input goes into one
scratch buffer that all layers reuse.

Both sources (:mod:`normdoctor.sources.torch`, :mod:`normdoctor.sources.onnx`) and the exact
cross-process merge (:mod:`normdoctor.distributed`) use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _fused
from .layers import NormFamily, NormLayer
from .metrics import channel_weights, layer_score, mismatch_sq, noise_sq_from_sums
from .stats import Moments

__all__ = [
    "PATHS",
    "LayerMeasurement",
    "NormState",
    "PathName",
    "Recorder",
    "Scratch",
    "module_state",
]

#: A path through the model: "train" (norm layers use batch statistics) or "eval".
PathName = str
PATHS: tuple[PathName, ...] = ("train", "eval")
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
    # per-channel m^2 of the average unit statistics (mean of unit means, mean of unbiased unit
    # variances: what BatchNorm's running estimates average in training) against running stats
    fit_m2: torch.Tensor
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
    weight: torch.Tensor | None = module._parameters.get("weight")
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
        self._fused: tuple[Any, ...] | None = None  # set on the first call
        self.shift64: torch.Tensor | None = None
        self._shift_view: dict[int, torch.Tensor] = {}
        self.buf: torch.Tensor | None = None
        self.nrows = 0
        self.last: tuple[int, int] | None = None  # (buffer row, elements per channel)
        self.meta: list[tuple[int, int, int]] = []  # (rows, elements per row, samples per row)
        c = self.running_mean.numel()
        # Sums over units (rows), names in SCALARS and VECTORS (DESIGN.md): one tensor each, so
        # that setting up, merging and reading them back costs one op, not fifteen.
        self.totals = torch.zeros(len(self.SCALARS), dtype=torch.float64, device=device)
        self.sums = torch.zeros(len(self.VECTORS), c, dtype=torch.float64, device=device)
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
        self.last = None
        x = x.detach()
        if x.dim() < 2 or x.shape[1] != self.running_mean.numel():
            return  # not what the layer takes: the layer itself raises the error
        if x.numel() == 0:
            return  # an empty batch holds no statistics (and would divide 0 by 0)
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
        fused = self._fused
        if fused is None:
            fused = self._fused = self._fused_target(x)
        if fused and x.dtype is self.shift.dtype and x.is_contiguous():
            kernel, shift_np, buf_np = fused
            kernel(x.view(n, x.shape[1], -1).numpy(), shift_np, buf_np[self.nrows])
            self._count_row(n, x)
            return
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
            buf = self.buf if self.buf is not None else self._buffer()
            torch.sum(rows, 0, dtype=torch.float64, out=buf[self.nrows])
            self._count_row(n, x)

    def _fused_target(self, x: torch.Tensor) -> tuple[Any, ...] | tuple[()]:
        """(kernel, shift, buffer) as NumPy views where the fused kernel applies, else ()."""
        kernel = _fused.kernel()
        if kernel is None or self.per_unit_sample or x.device.type != "cpu":
            return ()
        assert self.shift is not None
        return (kernel, self.shift.numpy(), self._buffer().numpy())

    def _count_row(self, n: int, x: torch.Tensor) -> None:
        """Book one batch row just written to the buffer."""
        per_row = x.numel() // (n * x.shape[1]) if n else 1
        if x.dim() > 2:
            self.spatial = True
        self.last = (self.nrows, n * per_row)  # the row stays in the buffer until the next call
        self.rows_per_call.append(1)
        self.nrows += 1
        self.meta.append((1, n * per_row, n))
        if self.nrows >= _FLUSH_ROWS:
            self.flush()

    def last_batch_stats(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(mean, biased variance, elements per channel) of the batch just observed, float64.

        ``None`` when the last call recorded no batch row (an input the layer does not take,
        or per-sample rows).
        """
        if self.last is None or self.buf is None:
            return None
        row, count = self.last
        t1, t2 = self.buf[row, 0], self.buf[row, 1]
        e = t1 / count
        assert self.shift64 is not None
        return self.shift64 + e, (t2 / count - e * e).clamp_min(0), count

    def _buffer(self) -> torch.Tensor:
        """Fixed-size float64 rows waiting to be folded: memory does not grow with batches."""
        if self.buf is None:
            c = self.running_mean.numel()
            self.buf = torch.empty(_FLUSH_ROWS, 3, c, dtype=torch.float64, device=self.device)
        return self.buf

    # -- folding rows into the accumulators ------------------------------------------------
    # Row order of ``totals`` and ``sums``.  p: sum (x-K) and (x-K)^2; sum_m2: sum_b m^2(b, c)
    # against running stats; r1, r2, rv: the noise term; u: sum_b (mu_b - K) and its square;
    # z, between: per-sample means (the non-i.i.d. detector).
    SCALARS = ("count", "samples", "units", "nonfinite")
    VECTORS = ("p1", "p2", "sum_m2", "r1", "r2", "rv", "u1", "u2", "z1", "z2", "between")

    def _arrays(self) -> tuple[Any, ...]:
        """(namespace, buffered rows, totals, sums, shift, safe mean, safe var, weights).

        On CPU these are NumPy views of the same storage: the fold is some forty operations on
        vectors of C floats, and measured here NumPy runs them in about half of torch's time.
        On an accelerator they stay tensors on the device (no host synchronisation).
        """
        assert self.shift64 is not None  # set by the first row
        t = (
            self._buffer()[: self.nrows],
            self.totals,
            self.sums,
            self.shift64,
            self.safe_mean,
            self.safe_var,
            self.weights,
        )
        if self.device.type == "cpu":
            return (np, *(x.numpy() for x in t))
        return (torch, *t)

    def flush(self) -> None:
        """Fold the buffered rows into the accumulators, vectorised over rows."""
        if not self.nrows:
            return
        xp, rows, totals, sums, shift, safe_mean, safe_var, weights = self._arrays()
        meta = np.array(self.meta, dtype=np.float64)
        if (meta[:, 0] != 1).any():
            meta = np.repeat(meta, meta[:, 0].astype(np.int64), axis=0)
        self.nrows, self.meta = 0, []
        # columns: elements per row, samples per row, elements per sample in the row
        host = np.stack([meta[:, 1], meta[:, 2], meta[:, 1] / meta[:, 2]])[:, :, None]
        n, ns, per_sample_elems = host if xp is np else torch.from_numpy(host).to(self.device)
        finite = xp.isfinite(rows).reshape(rows.shape[0], -1).all(1)
        keep = finite * 1.0
        rows = xp.where(finite[:, None, None], rows, 0.0)  # a skipped row adds nothing
        t1, t2, q = rows[:, 0], rows[:, 1], rows[:, 2]
        e = t1 / n  # mu_b - K
        var_b = t2 / n - e**2
        var_b = var_b * (var_b > 0)  # clamp at 0 (rounding), the same for both namespaces
        m2 = mismatch_sq(shift + e, var_b, safe_mean, safe_var, self.eps) * keep[:, None]
        scores = xp.where(finite, layer_score(m2, weights), math.nan)
        self.unit_scores.append(torch.from_numpy(scores) if xp is np else scores)
        inv2 = 1.0 / (var_b + self.eps)
        d1 = t1 / per_sample_elems  # sum over the row's samples of (sample mean - K)
        totals[0] += (n[:, 0] * keep).sum()
        totals[1] += (ns[:, 0] * keep).sum()
        totals[2] += keep.sum()
        totals[3] += (1.0 - keep).sum()
        # Zeroed rows have var_b = 0 and e = 0, so only m2 needs the mask above.
        sums += xp.stack(
            [
                t1,
                t2,
                m2,
                var_b * inv2,
                var_b * xp.sqrt(inv2),
                var_b,
                e,
                e**2,
                d1,
                q / per_sample_elems**2,
                d1**2 / ns,
            ]
        ).sum(1)

    def named(self) -> dict[str, torch.Tensor]:
        """The accumulators by name (views: writing to one writes to the recorder)."""
        return {
            **dict(zip(self.SCALARS, self.totals.unbind(), strict=True)),
            **dict(zip(self.VECTORS, self.sums.unbind(), strict=True)),
        }

    # -- merging shards -------------------------------------------------------------------
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
            a = self.named()
            for first, second, n in (("p1", "p2", "count"), ("u1", "u2", "units")):
                a[second] += 2 * d * a[first] + a[n] * d.square()
                a[first] += a[n] * d
            a["between"] += 2 * d * a["z1"] + a["samples"] * d.square()
            a["z2"] += 2 * d * a["z1"] + a["samples"] * d.square()
            a["z1"] += a["samples"] * d
        self.shift64 = shift
        self.shift = shift.to(torch.float32 if self.shift is None else self.shift.dtype)
        self._shift_view = {}
        self._fused = None

    def packed(self) -> torch.Tensor:
        """Every additive accumulator in one flat float64 tensor (for one all_reduce)."""
        self.flush()
        spatial = torch.tensor([float(self.spatial)], dtype=torch.float64, device=self.device)
        return torch.cat([self.totals, spatial, self.sums.flatten()])

    def unpack(self, flat: torch.Tensor) -> None:
        """Load accumulators from :meth:`packed` (after a sum over shards)."""
        head = len(self.SCALARS)
        self.totals = flat[:head].clone()
        self.spatial = bool(flat[head] > 0)
        self.sums = flat[head + 1 :].reshape(self.sums.shape).clone()

    def finish(self) -> LayerMeasurement | None:
        """Reduce to CPU tensors; ``None`` if the layer never ran on this path."""
        self.flush()
        if self.shift64 is None:
            return None
        # One transfer, then NumPy: a few dozen operations on vectors of C floats.
        totals = self.totals.cpu().numpy()
        sums = self.sums.cpu().numpy()
        count, samples, units, nonfinite = (float(v) for v in totals)
        p1, p2, sum_m2, r1, r2, rv, u1, u2, z1, z2, between = sums
        k = self.shift64.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            if count > 0:
                dev = p1 / count
                mean, m2 = k + dev, np.clip(p2 - p1**2 / count, 0, None)
            else:
                dev = mean = m2 = np.full_like(k, math.nan)
            mean_dev_sq = np.clip(u2 - 2 * dev * u1 + units * dev**2, 0, None)
            pooled_var = m2 / count if count > 0 else m2
            noise = noise_sq_from_sums(
                batches=max(units, 1.0),
                sum_r1=r1,
                sum_r2=r2,
                sum_var=rv,
                mean_dev_sq=mean_dev_sq,
                pooled_var=pooled_var,
                eps=self.eps,
            )
            per_unit = count / units if units > 0 else math.nan
            unbiased = per_unit / (per_unit - 1) if per_unit > 1 else math.nan
            fit = mismatch_sq(
                k + u1 / max(units, 1.0),
                rv / max(units, 1.0) * unbiased,
                self.safe_mean.cpu().numpy(),
                self.safe_var.cpu().numpy(),
                self.eps,
            )
            noniid = None
            if not self.per_unit_sample and units >= 2 and samples > units:
                total = z2 - z1**2 / samples
                spread = between - z1**2 / samples
                ratio = (spread / (units - 1)) / (total / (samples - 1))
                noniid = torch.from_numpy(np.where(total > 0, ratio, math.nan))
        scores = (
            torch.cat(self.unit_scores).to("cpu")
            if self.unit_scores
            else torch.empty(0, dtype=torch.float64)
        )
        per_sample = samples == units if not self.per_unit_sample else True
        cpu = torch.device("cpu")
        return LayerMeasurement(
            units=int(units),
            samples=int(samples),
            pooled=Moments(count, torch.from_numpy(mean), torch.from_numpy(m2)),
            running_mean=self.running_mean.to(cpu),
            running_var=self.running_var.to(cpu),
            weights=self.weights.to(cpu),
            channel_m2=torch.from_numpy(sum_m2 / max(units, 1.0)),
            unit_scores=scores,
            noise_m2=torch.from_numpy(np.asarray(noise)),
            fit_m2=torch.from_numpy(np.asarray(fit, dtype=np.float64)),
            noniid=noniid,
            nonfinite_units=int(nonfinite),
            per_sample=per_sample,
            spatial=self.spatial,
        )

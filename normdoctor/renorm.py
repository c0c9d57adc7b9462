"""Batch Renormalization (Ioffe, 2017): BatchNorm that trains the way it infers.

In training, BatchNorm normalizes with the statistics of the current batch and, at inference,
with running averages: when batches are small or correlated (class-sorted, one domain per batch)
the two disagree and eval mode breaks the model.  Batch Renormalization keeps the batch
statistics in the forward pass but corrects them towards the running ones by two per-channel
factors that are treated as constants by the gradient (Algorithm 1 of the paper)::

    r = clip(s_B / s_R, 1/r_max, r_max)          s = sqrt(var + eps), biased batch variance
    d = clip((mu_B - mu_R) / s_R, -d_max, d_max)
    x_hat = (x - mu_B) / s_B * r + d              r and d detached
    y = gamma * x_hat + beta

With r and d unclipped, ``x_hat == (x - mu_R) / s_R``: training then computes exactly what
inference computes.  ``r_max``/``d_max`` start at 1 and 0 (plain BatchNorm) and are relaxed by a
warm-up schedule, so the running statistics have settled before they are trusted.

Note:
    Running statistics follow PyTorch's BatchNorm convention exactly (same buffers, same update):
    ``running = (1 - momentum) * running + momentum * batch`` with the *unbiased* batch variance
    stored in ``running_var``; ``momentum=None`` is a cumulative average.  The paper writes the
    update as ``mu := mu + alpha * (mu_B - mu)``, which is the same with ``alpha = momentum``.
    The paper keeps a moving average of the batch standard deviation sigma_B; here
    ``s_R = sqrt(running_var + eps)``, as in BatchNorm's own eval mode, so that a BatchRenorm
    layer and a BatchNorm layer with the same buffers are the same function at inference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .errors import ConversionError
from .layers import BATCH_NORMS

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "RenormSchedule",
]

Schedule = Callable[[int], tuple[float, float]]

#: The parameters and buffers a plain BatchNorm owns (any subset, depending on affine/tracking).
BN_TENSORS = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
#: BatchNorm's affine parameters and its running-statistics buffers.
BN_PARAMETERS = ("weight", "bias")
BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def carry_tensors(
    src: nn.Module, dst: nn.Module, *, src_prefix: str = "", dst_prefix: str = ""
) -> None:
    """Give ``dst`` the very tensor objects of ``src``'s BatchNorm parameters and buffers.

    ``weight`` and ``bias`` go to the parameter slots ``dst`` has (``None`` where ``src`` has
    none); ``{src_prefix}running_mean``, ``running_var`` and ``num_batches_tracked`` go to the
    buffer slots ``{dst_prefix}...`` that ``dst`` has.  The same objects, not copies, so that an
    optimizer holding them keeps working.  This is how every conversion and its inverse take
    over a layer's tensors (a kept BatchNorm's buffers live under the ``bn_`` prefix).
    """
    for key in BN_PARAMETERS:
        if key in dst._parameters:
            dst._parameters[key] = src._parameters.get(key)
    for key in BN_BUFFERS:
        if dst_prefix + key in dst._buffers:
            dst._buffers[dst_prefix + key] = src._buffers.get(src_prefix + key)


def bn_device_dtype(module: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and floating dtype of a (possibly converted) BatchNorm's tensors, or ``None``."""
    for key in ("weight", "running_mean", "bn_running_mean", "bias", "running_var"):
        t = getattr(module, key, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.device, t.dtype
    return None, None


def _ramp(step: int, start: float, end: float, hold: int, reach: int) -> float:
    """``start`` for the first ``hold`` steps, then linear to ``end`` at step ``reach``."""
    if step < hold:
        return start
    if step >= reach:
        return end
    return start + (end - start) * (step - hold) / (reach - hold)


@dataclass(frozen=True, slots=True)
class RenormSchedule:
    """The paper's warm-up of ``(r_max, d_max)`` as a function of the training step.

    Defaults are the paper's (section 4.1): ``r_max = 1`` and ``d_max = 0`` (plain BatchNorm) for
    the first 5,000 steps, then relaxed linearly to ``r_max = 3`` at 40,000 steps and
    ``d_max = 5`` at 25,000 steps.  For fine-tuning a converted model, shorter schedules are
    usual; ``RenormSchedule(hold_steps=0, r_max_steps=0, d_max_steps=0)`` applies the final
    limits from the first step.
    """

    r_max: float = 3.0
    d_max: float = 5.0
    hold_steps: int = 5000
    r_max_steps: int = 40000
    d_max_steps: int = 25000

    def __post_init__(self) -> None:
        if not self.r_max >= 1.0:
            raise ValueError(f"r_max must be at least 1, got {self.r_max}")
        if not self.d_max >= 0.0:
            raise ValueError(f"d_max must be non-negative, got {self.d_max}")
        if min(self.hold_steps, self.r_max_steps, self.d_max_steps) < 0:
            raise ValueError("schedule steps must be non-negative")

    def __call__(self, step: int) -> tuple[float, float]:
        return (
            _ramp(step, 1.0, self.r_max, self.hold_steps, self.r_max_steps),
            _ramp(step, 0.0, self.d_max, self.hold_steps, self.d_max_steps),
        )


class BatchRenorm(_BatchNorm):
    """Shared implementation; use :class:`BatchRenorm1d`, :class:`BatchRenorm2d` or
    :class:`BatchRenorm3d`."""

    _bn_class: type[_BatchNorm] = _BatchNorm
    renorm_step: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        hold_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.schedule_config = RenormSchedule(r_max, d_max, hold_steps, r_max_steps, d_max_steps)
        self.schedule: Schedule = schedule if schedule is not None else self.schedule_config
        # Training steps taken as BatchRenorm (not BatchNorm's num_batches_tracked: a converted
        # layer starts its warm-up at 0 whatever its history).  Persistent, so it survives a
        # state_dict round trip; optional on load, so plain BatchNorm checkpoints load.
        self.register_buffer(
            "renorm_step", torch.zeros((), dtype=torch.long, device=device), persistent=True
        )
        # Child modules applied after normalization, in order (a converted BatchNormAct2d keeps
        # its activation this way); empty for a plain BatchRenorm.
        self._post: tuple[str, ...] = ()

    # -- schedule --------------------------------------------------------------------------
    def limits(self) -> tuple[float, float]:
        """The current ``(r_max, d_max)``, from the schedule at ``renorm_step``."""
        r_max, d_max = self.schedule(int(self.renorm_step))
        r_max, d_max = float(r_max), float(d_max)
        if not (r_max >= 1.0 and d_max >= 0.0):
            raise ValueError(
                f"schedule gave r_max={r_max}, d_max={d_max}: need r_max ≥ 1, d_max ≥ 0"
            )
        return r_max, d_max

    # -- forward ---------------------------------------------------------------------------
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        running = self.running_mean is not None and self.running_var is not None
        # Eval mode (or no running statistics at all): exactly BatchNorm.
        out = self._renorm(input) if self.training and running else super().forward(input)
        for name in self._post:
            child = self._modules[name]
            assert child is not None
            out = child(out)
        return out

    def _renorm(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        assert self.running_mean is not None and self.running_var is not None
        update = self.track_running_stats
        factor = 0.0
        if update:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        r_max, d_max = self.limits()
        dims = [0, *range(2, input.dim())]
        with torch.no_grad():
            batch_var, batch_mean = torch.var_mean(input.detach(), dim=dims, correction=0)
            s_r = torch.sqrt(self.running_var + self.eps)
            r = (torch.sqrt(batch_var + self.eps) / s_r).clamp(1.0 / r_max, r_max)
            d = ((batch_mean - self.running_mean) / s_r).clamp(-d_max, d_max)
        # gamma * ((x - mu_B)/s_B * r + d) + beta == BatchNorm with weight gamma*r and bias
        # beta + gamma*d: the fused kernel computes it, and with r, d constants its backward is
        # exactly the paper's.  It also updates the running statistics as BatchNorm does.
        if self.weight is not None and self.bias is not None:
            weight, bias = self.weight * r, self.bias + self.weight * d
        else:
            weight, bias = r.to(input.dtype), d.to(input.dtype)
        out = F.batch_norm(
            input,
            self.running_mean if update else None,
            self.running_var if update else None,
            weight,
            bias,
            True,
            factor,
            self.eps,
        )
        if update:
            self.renorm_step.add_(1)
        return out

    # -- state dict ------------------------------------------------------------------------
    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "renorm_step"
        absent = key not in state_dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if absent:
            # A plain BatchNorm checkpoint: it has never taken a BatchRenorm step.
            if key in missing_keys:
                missing_keys.remove(key)
            with torch.no_grad():
                self.renorm_step.zero_()

    def extra_repr(self) -> str:
        s = super().extra_repr()
        c = self.schedule_config
        if self.schedule is c:
            s += (
                f", r_max={c.r_max}, d_max={c.d_max}, hold_steps={c.hold_steps}, "
                f"r_max_steps={c.r_max_steps}, d_max_steps={c.d_max_steps}"
            )
        else:
            s += f", schedule={self.schedule!r}"
        return s

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, **options: object) -> BatchRenorm:
        """A BatchRenorm layer with every parameter and buffer of ``bn``.

        Carries ``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``
        (the same tensor objects, so an optimizer holding them keeps working), ``eps``,
        ``momentum``, ``affine``, ``track_running_stats``, ``training``, device and dtype.
        ``renorm_step`` starts at 0: the warm-up schedule begins at the conversion.

        Note:
            In eval mode the result computes exactly what ``bn`` computes: inference output does
            not change until the model is fine-tuned with the BatchRenorm layers in train mode.

        Args:
            bn: a BatchNorm layer of the matching dimensionality (or a ``SyncBatchNorm``).
            options: ``r_max``, ``d_max``, ``hold_steps``, ``r_max_steps``, ``d_max_steps``,
                ``schedule`` (see :class:`RenormSchedule`).

        Raises:
            ConversionError: ``bn`` is a subclass that overrides ``forward`` or holds child
                modules or extra tensors (timm's ``BatchNormAct2d`` applies an activation after
                normalizing): converting it here would silently drop that behaviour; use
                :func:`normdoctor.patch.patch`, which keeps it or refuses.
        """
        if not isinstance(bn, _BatchNorm):
            raise ConversionError(f"expected a BatchNorm layer, got {type(bn).__name__}")
        if isinstance(bn, tuple(BATCH_NORMS.values())) and not isinstance(bn, cls._bn_class):
            raise ConversionError(
                f"{cls.__name__}.from_batchnorm needs a {cls._bn_class.__name__}, "
                f"got {type(bn).__name__}"
            )
        plain = type(bn) in (*BATCH_NORMS.values(), nn.SyncBatchNorm) or isinstance(bn, BatchRenorm)
        extra = set(bn._parameters) | set(bn._buffers)
        if not plain and (
            type(bn).forward is not _BatchNorm.forward or list(bn.children()) or extra - BN_TENSORS
        ):
            raise ConversionError(
                f"{type(bn).__name__} changes BatchNorm's behaviour (own forward, child modules "
                "or extra tensors); use normdoctor.patch.patch(model, to='renorm'), which keeps "
                "that behaviour or refuses"
            )
        return cls.carry(bn, **options)

    @classmethod
    def carry(cls, bn: _NormBase, **options: Any) -> BatchRenorm:
        """Build from ``bn``'s hyper-parameters and take over its tensors (no checks: the
        conversions of :mod:`normdoctor.convert` check subclasses themselves)."""
        device, dtype = bn_device_dtype(bn)
        if isinstance(bn, BatchRenorm) and not options:
            c = bn.schedule_config
            options = dict(
                r_max=c.r_max,
                d_max=c.d_max,
                hold_steps=c.hold_steps,
                r_max_steps=c.r_max_steps,
                d_max_steps=c.d_max_steps,
            )
            if bn.schedule is not c:
                options["schedule"] = bn.schedule
        new = cls(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            device=device,
            dtype=dtype,
            **options,
        )
        carry_tensors(bn, new)
        new.training = bn.training
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        return new


class BatchRenorm1d(BatchRenorm, nn.BatchNorm1d):
    """Batch Renormalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    Same constructor as :class:`torch.nn.BatchNorm1d`, plus the warm-up of ``r_max``/``d_max``:
    keyword arguments ``r_max``, ``d_max``, ``hold_steps``, ``r_max_steps``, ``d_max_steps``
    (see :class:`RenormSchedule`; the paper's values by default) or ``schedule``, any callable
    ``schedule(step) -> (r_max, d_max)``.  The step count lives in the ``renorm_step`` buffer,
    saved with the state dict.  State-dict keys are BatchNorm1d's plus ``renorm_step``: ordinary
    BatchNorm1d checkpoints load (``renorm_step`` then starts at 0).

    In eval mode (and in training without running statistics) it is BatchNorm1d, bit for bit.
    Converted from a trained BatchNorm1d (:meth:`from_batchnorm`), its inference output does
    not change until the model is fine-tuned.
    """

    _bn_class = nn.BatchNorm1d


class BatchRenorm2d(BatchRenorm, nn.BatchNorm2d):
    """Batch Renormalization over a 4D ``(N, C, H, W)`` input.

    Same constructor as :class:`torch.nn.BatchNorm2d`, plus the warm-up of ``r_max``/``d_max``:
    keyword arguments ``r_max``, ``d_max``, ``hold_steps``, ``r_max_steps``, ``d_max_steps``
    (see :class:`RenormSchedule`; the paper's values by default) or ``schedule``, any callable
    ``schedule(step) -> (r_max, d_max)``.  The step count lives in the ``renorm_step`` buffer,
    saved with the state dict.  State-dict keys are BatchNorm2d's plus ``renorm_step``: ordinary
    BatchNorm2d checkpoints load (``renorm_step`` then starts at 0).

    In eval mode (and in training without running statistics) it is BatchNorm2d, bit for bit.
    Converted from a trained BatchNorm2d (:meth:`from_batchnorm`), its inference output does
    not change until the model is fine-tuned.
    """

    _bn_class = nn.BatchNorm2d


class BatchRenorm3d(BatchRenorm, nn.BatchNorm3d):
    """Batch Renormalization over a 5D ``(N, C, D, H, W)`` input.

    Same constructor as :class:`torch.nn.BatchNorm3d`, plus the warm-up of ``r_max``/``d_max``:
    keyword arguments ``r_max``, ``d_max``, ``hold_steps``, ``r_max_steps``, ``d_max_steps``
    (see :class:`RenormSchedule`; the paper's values by default) or ``schedule``, any callable
    ``schedule(step) -> (r_max, d_max)``.  The step count lives in the ``renorm_step`` buffer,
    saved with the state dict.  State-dict keys are BatchNorm3d's plus ``renorm_step``: ordinary
    BatchNorm3d checkpoints load (``renorm_step`` then starts at 0).

    In eval mode (and in training without running statistics) it is BatchNorm3d, bit for bit.
    Converted from a trained BatchNorm3d (:meth:`from_batchnorm`), its inference output does
    not change until the model is fine-tuned.
    """

    _bn_class = nn.BatchNorm3d

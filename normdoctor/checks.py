"""Data-free checks of normalization layers: what the stored numbers alone reveal.

:func:`static_checks` reads a module or a bare state_dict (norm layers found by their
``running_mean``/``running_var``/``num_batches_tracked`` buffers, with ``weight``/``bias`` beside
them) and returns :class:`Finding` records; nothing runs, no data is needed.

Thresholds, and why:

* ``explosive-gain``: in eval mode a channel multiplies its input's deviation from the running
  mean by ``|gamma| / sqrt(running_var + eps)``.  Trained layers sit around 1 to 10; above
  :data:`EXPLOSIVE_GAIN` (1e3) a deviation of one thousandth of a unit moves the output by a whole
  unit, so any input the running variance did not foresee explodes.  With the default
  ``eps=1e-5`` the gain can only pass 1e3 when ``|gamma| > 3.2``: the check fires on a tiny
  variance *and* a large gamma, never on a tiny variance alone.
* ``dead-channels``: ``|gamma| <= DEAD_GAMMA_RTOL * max|gamma|`` (1e-6, the same rule the scan
  report uses), or every gamma exactly zero.
* ``momentum-convention``: PyTorch's momentum weighs the *new* batch (default 0.1); Keras, TF and
  ONNX use the decay of the old estimate (0.9, 0.99, 0.997).  A PyTorch momentum of at least
  :data:`SUSPICIOUS_MOMENTUM` (0.5) lets the running statistics follow the last few batches only.
* "never updated" is claimed only when the statistics sit exactly at their initial values
  (mean 0, variance 1): converted checkpoints carry ``num_batches_tracked == 0`` with good
  statistics, which is only worth an ``info``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .layers import RUNNING_STATS, NormFamily, NormLayer, find_norm_layers

__all__ = [
    "CARRIED",
    "DEAD_GAMMA_RTOL",
    "EXPLOSIVE_GAIN",
    "NORM_KEYS",
    "SUSPICIOUS_MOMENTUM",
    "Finding",
    "Severity",
    "StaticSource",
    "StoredNormLayer",
    "static_checks",
    "static_checks_for",
    "stored_norm_layers",
]

#: Eval-mode gain |gamma| / sqrt(running_var + eps) above which a channel is called explosive.
EXPLOSIVE_GAIN = 1e3
#: |gamma| at or below this fraction of the layer's largest |gamma| marks a dead channel.
DEAD_GAMMA_RTOL = 1e-6
#: A PyTorch momentum at or above this looks like another framework's decay convention.
SUSPICIOUS_MOMENTUM = 0.5
#: eps assumed when a state_dict alone does not say (PyTorch's default).
DEFAULT_EPS = 1e-5
_CHANNELS_SHOWN = 8


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


_RANK = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """One thing the stored numbers reveal about one layer.

    Attributes:
        layer: qualified module name (``""`` for the root).
        code: short kebab-case id, e.g. ``running-var-nonpositive``.
        severity: ``info``, ``warning`` or ``error``.
        message: one line, for people.
        channels: the channels concerned (empty when the finding is about the whole layer).
    """

    layer: str
    code: str
    severity: Severity
    message: str
    channels: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "code": self.code,
            "severity": str(self.severity),
            "message": self.message,
            "channels": list(self.channels),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Finding:
        return cls(
            layer=str(d["layer"]),
            code=str(d["code"]),
            severity=Severity(d["severity"]),
            message=str(d["message"]),
            channels=tuple(int(c) for c in d.get("channels", ())),
        )


@dataclass(frozen=True, slots=True)
class _View:
    """One layer's stored numbers, from a module or a state_dict."""

    name: str
    kind: str | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    num_batches_tracked: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float | None
    momentum: float | None
    momentum_known: bool
    instance_tracked: bool
    sync: bool
    batch_stats_only: bool


def _tensor(value: Any) -> torch.Tensor | None:
    return value.detach() if isinstance(value, torch.Tensor) else None


def _views_from_module(model: nn.Module) -> list[_View]:
    modules = dict(model.named_modules())
    views = []
    for layer in find_norm_layers(model):
        if layer.family not in RUNNING_STATS and layer.family is not NormFamily.BATCH_STATS_ONLY:
            continue
        module = modules[layer.name]
        weight = module._parameters.get("weight")
        if weight is None:
            weight = module._buffers.get("weight")
        bias = module._parameters.get("bias")
        if bias is None:
            bias = module._buffers.get("bias")
        frozen = layer.family is NormFamily.FROZEN
        views.append(
            _View(
                name=layer.name,
                kind=layer.kind,
                running_mean=_tensor(module._buffers.get("running_mean")),
                running_var=_tensor(module._buffers.get("running_var")),
                num_batches_tracked=_tensor(module._buffers.get("num_batches_tracked")),
                weight=_tensor(weight),
                bias=_tensor(bias),
                eps=layer.eps if not frozen or hasattr(module, "eps") else None,
                momentum=layer.momentum,
                momentum_known=not frozen and hasattr(module, "momentum"),
                instance_tracked=layer.family is NormFamily.INSTANCE_TRACKED,
                sync=isinstance(module, nn.SyncBatchNorm),
                batch_stats_only=layer.family is NormFamily.BATCH_STATS_ONLY,
            )
        )
    return views


#: The tensors a norm layer keeps in a state_dict, by the last segment of their key.
NORM_KEYS = ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")
#: Attributes a file may or may not carry beside a norm layer's tensors.
CARRIED = ("momentum", "eps")
#: What a :class:`NormLayer` record holds for an attribute the file does not carry:
#: placeholders, never shown (:attr:`StoredNormLayer.unknown` says which they are).
_PLACEHOLDERS: dict[str, Any] = {"momentum": None, "eps": 0.0}


@dataclass(frozen=True, slots=True)
class StoredNormLayer:
    """A norm layer with running statistics as a state_dict stores it (no module to ask).

    Attributes:
        name: the module name, the common prefix of its keys (``""`` for the root).
        tensors: its tensors by the last segment of their key (among :data:`NORM_KEYS`), detached.
        info: what the file records about the layer besides its tensors (``kind``, ``eps``,
            ``momentum``, ...; see :attr:`normdoctor.io.Checkpoint.layer_info`), often nothing.
    """

    name: str
    tensors: Mapping[str, torch.Tensor]
    info: Mapping[str, Any]

    @property
    def unknown(self) -> tuple[str, ...]:
        """The attributes of :data:`CARRIED` the file does not carry for this layer (a bare
        state_dict or a traced TorchScript archive stores no momentum or eps)."""
        return tuple(attr for attr in CARRIED if attr not in self.info)

    def norm_layer(self) -> NormLayer:
        """The layer as a :class:`~normdoctor.layers.NormLayer` record, from buffer names alone:
        the attributes in :attr:`unknown` hold placeholders (eps 0.0, momentum None)."""
        kind = str(self.info.get("kind", "BatchNorm (from state_dict)"))
        if "Instance" in kind:
            family = NormFamily.INSTANCE_TRACKED
        elif "running_mean" in self.tensors:
            family = NormFamily.BATCH
        else:  # running_var alone: EvoNorm-B0-like
            family = NormFamily.BATCH_VAR
        stats = self.tensors.get("running_mean", self.tensors.get("running_var"))
        values = {attr: self.info.get(attr, _PLACEHOLDERS[attr]) for attr in CARRIED}
        return NormLayer(
            name=self.name,
            kind=kind,
            family=family,
            num_features=int(stats.numel()) if stats is not None else 0,
            eps=float(values["eps"]),
            momentum=values["momentum"],
            affine="weight" in self.tensors,
            track_running_stats=True,
        )


def stored_norm_layers(
    state_dict: Mapping[str, Any], layer_info: Mapping[str, Mapping[str, Any]] | None = None
) -> list[StoredNormLayer]:
    """The norm layers of a state_dict without its architecture: every key prefix with a
    ``running_mean`` or ``running_var`` tensor, in the state_dict's order (the model's).

    Args:
        state_dict: keys as in ``state_dict()``; values that are not tensors are skipped.
        layer_info: per layer name what the file records besides the tensors, as
            :attr:`normdoctor.io.Checkpoint.layer_info` carries it.
    """
    info = layer_info or {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = str(key).rpartition(".")
        if leaf in NORM_KEYS and isinstance(value, torch.Tensor):
            groups.setdefault(prefix, {})[leaf] = value.detach()
    return [
        StoredNormLayer(name=name, tensors=tensors, info=info.get(name, {}))
        for name, tensors in groups.items()  # insertion order: the state_dict's, i.e. the model's
        if "running_mean" in tensors or "running_var" in tensors
    ]


def _views_from_state_dict(
    sd: Mapping[str, Any], layer_info: Mapping[str, Mapping[str, Any]]
) -> list[_View]:
    views = []
    for layer in stored_norm_layers(sd, layer_info):
        tensors, info = layer.tensors, layer.info
        kind = info.get("kind")
        eps = info.get("eps")
        instance = bool(kind and "InstanceNorm" in str(kind))
        views.append(
            _View(
                name=layer.name,
                kind=str(kind) if kind else None,
                running_mean=tensors.get("running_mean"),
                running_var=tensors.get("running_var"),
                num_batches_tracked=tensors.get("num_batches_tracked"),
                weight=tensors.get("weight"),
                bias=tensors.get("bias"),
                eps=float(eps) if isinstance(eps, (int, float)) else None,
                momentum=info.get("momentum"),
                momentum_known="momentum" in info,
                instance_tracked=instance,
                sync=kind == "SyncBatchNorm",
                batch_stats_only=False,
            )
        )
    return views


def _channels(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.nonzero(mask.flatten()).flatten().tolist())


def _shown(channels: tuple[int, ...]) -> str:
    head = ", ".join(str(c) for c in channels[:_CHANNELS_SHOWN])
    more = len(channels) - _CHANNELS_SHOWN
    return f"{head}, +{more} more" if more > 0 else head


def _count(channels: tuple[int, ...], total: int) -> str:
    return f"{len(channels)} of {total} channels ({_shown(channels)})"


def _same_shape(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape


def _check(view: _View) -> list[Finding]:
    out: list[Finding] = []

    def add(code: str, severity: Severity, message: str, channels: tuple[int, ...] = ()) -> None:
        out.append(
            Finding(
                layer=view.name, code=code, severity=severity, message=message, channels=channels
            )
        )

    label = view.kind or "norm layer"
    rm = view.running_mean.double().flatten() if view.running_mean is not None else None
    rv = view.running_var.double().flatten() if view.running_var is not None else None
    eps = view.eps if view.eps is not None else DEFAULT_EPS
    gamma = view.weight.double().flatten() if view.weight is not None else None

    if view.batch_stats_only:
        add(
            "no-running-stats",
            Severity.INFO,
            f"{label} without running statistics normalizes with the current batch even in "
            "eval mode: predictions depend on the batch they come in",
        )
    if view.instance_tracked:
        add(
            "instance-norm-running-stats",
            Severity.WARNING,
            f"{label} with track_running_stats=True normalizes with running statistics in eval "
            "mode but with per-sample statistics in training",
        )
    if view.sync:
        add(
            "sync-batchnorm",
            Severity.INFO,
            "SyncBatchNorm left in the model: it behaves as BatchNorm in eval mode but needs a "
            "process group in train mode; convert it back to BatchNorm for inference",
        )
    if view.momentum_known:
        m = view.momentum
        if m is None:
            add(
                "momentum-cumulative",
                Severity.INFO,
                "momentum None: running statistics are a cumulative average over all training "
                "batches, early batches weigh as much as late ones",
            )
        elif isinstance(m, (int, float)) and m >= SUSPICIOUS_MOMENTUM:
            add(
                "momentum-convention",
                Severity.WARNING,
                f"momentum {m:g}: PyTorch weighs the newest batch by momentum (default 0.1), so "
                f"the running statistics follow the last few batches only; {m:g} looks like "
                f"another framework's decay, whose PyTorch equivalent is {1 - m:.3g}",
            )
        elif isinstance(m, (int, float)) and m == 0:
            add(
                "momentum-zero",
                Severity.INFO,
                "momentum 0: running statistics never change in training (frozen or converted)",
            )

    if rv is not None and (rm is None or rm.shape == rv.shape):
        # Without running_mean (EvoNorm B0-like layers) the variance checks still hold.
        n = rv.numel()
        bad = ~torch.isfinite(rv) if rm is None else ~torch.isfinite(rm) | ~torch.isfinite(rv)
        nonfinite = _channels(bad)
        if nonfinite:
            add(
                "running-stats-nonfinite",
                Severity.ERROR,
                f"running statistics are NaN or Inf in {_count(nonfinite, n)}: eval outputs of "
                "these channels are NaN or Inf",
                nonfinite,
            )
        finite_var = torch.isfinite(rv)
        nonpositive = _channels(finite_var & (rv <= 0))
        if nonpositive:
            negative = bool((rv[finite_var] < 0).any())
            add(
                "running-var-nonpositive",
                Severity.ERROR,
                f"running_var is {'negative' if negative else 'zero'} in {_count(nonpositive, n)}:"
                " corrupt or degenerate statistics (only eps keeps the eval output finite)",
                nonpositive,
            )
        scale = gamma if gamma is not None else torch.ones_like(rv)  # no affine: gamma = 1
        # Without a running mean the layer is no BatchNorm (EvoNorm B0 divides by the larger
        # of two terms): |gamma| / sqrt(var + eps) bounds its gain, it does not measure it.
        if scale.shape == rv.shape and rm is not None:
            ok = finite_var & (rv > 0) & torch.isfinite(scale)
            gain = scale.abs() / torch.sqrt(rv.clamp_min(0) + eps)
            explosive = _channels(ok & (gain > EXPLOSIVE_GAIN))
            if explosive:
                worst = float(gain[ok].max())
                add(
                    "explosive-gain",
                    Severity.WARNING,
                    f"tiny running_var with large gamma in {_count(explosive, n)}: eval mode "
                    f"multiplies input deviations by up to {worst:.3g} "
                    f"(|gamma|/sqrt(var+eps) > {EXPLOSIVE_GAIN:g})",
                    explosive,
                )
        nbt = view.num_batches_tracked
        tracked = int(nbt.flatten()[0]) if nbt is not None and nbt.numel() == 1 else None
        initial = bool((rm is None or (rm == 0).all()) and (rv == 1).all())
        if initial:
            if tracked:
                add(
                    "running-stats-never-updated",
                    Severity.WARNING,
                    f"running statistics still at their initial values (mean 0, var 1) after "
                    f"{tracked} tracked batches (momentum 0?): eval mode normalizes with "
                    "statistics that were never measured",
                )
            else:
                add(
                    "running-stats-never-updated",
                    Severity.WARNING,
                    "running statistics at their initial values (mean 0, var 1)"
                    + (" and num_batches_tracked 0" if tracked == 0 else "")
                    + ": never updated in train mode; eval mode normalizes with statistics that "
                    "were never measured",
                )
        elif tracked == 0:
            add(
                "num-batches-tracked-zero",
                Severity.INFO,
                "num_batches_tracked is 0 but the running statistics are not at their initial "
                "values: typical of converted checkpoints; the statistics look trained",
            )

    if gamma is not None and gamma.numel():
        finite_g = torch.isfinite(gamma)
        bad_affine = _channels(~finite_g)
        bias = view.bias.double().flatten() if view.bias is not None else None
        if bias is not None and bias.shape == gamma.shape:
            bad_affine = _channels(~finite_g | ~torch.isfinite(bias))
        if bad_affine:
            add(
                "affine-nonfinite",
                Severity.ERROR,
                f"weight or bias is NaN or Inf in {_count(bad_affine, gamma.numel())}",
                bad_affine,
            )
        g = torch.where(finite_g, gamma.abs(), torch.zeros_like(gamma))
        gmax = float(g.max())
        dead = (
            _channels(finite_g & (g <= DEAD_GAMMA_RTOL * gmax)) if gmax > 0 else _channels(finite_g)
        )
        if dead:
            add(
                "dead-channels",
                Severity.INFO,
                f"gamma is 0 in {_count(dead, gamma.numel())}: these channels output their bias "
                "only, whatever the statistics",
                dead,
            )
    return out


def static_checks(
    obj: nn.Module | Mapping[str, Any],
    *,
    layer_info: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Finding]:
    """Check the stored numbers of every layer with running statistics; no data needed.

    Args:
        obj: a module (every check) or a state_dict mapping (the checks that the tensors alone
            support: non-finite or non-positive statistics, explosive gains, never-updated
            statistics, dead channels).
        layer_info: for a state_dict, per layer name what is known without the module
            (``kind``, ``eps``, ``momentum``), as :class:`normdoctor.io.Checkpoint` carries it.

    Returns:
        Findings in layer order, errors first within a layer.

    Note:
        "Never updated" is claimed only when the running statistics sit exactly at their initial
        values; ``num_batches_tracked == 0`` with trained-looking statistics (converted
        checkpoints) is an ``info``.  See the module docstring for the thresholds.
    """
    if isinstance(obj, nn.Module):
        views = _views_from_module(obj)
    elif isinstance(obj, Mapping):
        views = _views_from_state_dict(obj, layer_info or {})
    else:
        raise TypeError(
            f"static_checks needs an nn.Module or a state_dict, not {type(obj).__name__}"
        )
    findings: list[Finding] = []
    for view in views:
        findings += sorted(_check(view), key=lambda f: _RANK[f.severity])
    return findings


class StaticSource(Protocol):
    """What the static checks read from a model file: a :class:`normdoctor.io.Checkpoint`, or
    anything with the same three attributes (this module does not import the loaders)."""

    @property
    def module(self) -> nn.Module | None: ...

    @property
    def state_dict(self) -> Mapping[str, torch.Tensor] | None: ...

    @property
    def layer_info(self) -> Mapping[str, Mapping[str, Any]]: ...


def static_checks_for(checkpoint: StaticSource) -> list[Finding]:
    """:func:`static_checks` on what :func:`normdoctor.io.load_checkpoint` read: its live module
    when it has one, else its state_dict with the layer attributes the file records."""
    if checkpoint.module is not None:
        return static_checks(checkpoint.module)
    if checkpoint.state_dict is not None:
        return static_checks(checkpoint.state_dict, layer_info=checkpoint.layer_info)
    return []

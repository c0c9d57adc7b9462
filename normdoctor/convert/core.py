"""Converting norm layers and undoing it: single modules, the tree walk, the exact inverse.

Conversions follow PyTorch's ``SyncBatchNorm.convert_sync_batchnorm`` as refined by timm
(STYLE.md): recurse over ``named_children``, build the replacement from the original's
hyper-parameters, take over its tensors, ``training`` flag and ``qconfig``, re-add a child only
when it changed, return the (possibly new) root; ``inplace=False`` deep-copies first so the
user's model is never modified; every conversion has its inverse (:func:`revert`).

Subclasses of BatchNorm keep their behaviour or are refused: a subclass that applies child
modules after normalizing (timm's ``BatchNormAct2d``: dropout, then activation) is checked
numerically, in eval and in train mode, against "BatchNorm, then its children in some order";
the order that reproduces it is kept in the converted layer.  Anything else that overrides
``forward`` raises :class:`~normdoctor.errors.ConversionError`.  (PyTorch's own
``convert_sync_batchnorm`` silently drops such an activation.)
"""

from __future__ import annotations

import copy
import fnmatch
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase, _NormBase
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import ConversionError
from ..layers import BATCH_NORMS, INSTANCE_NORMS, NormFamily, norm_family
from ..renorm import BN_TENSORS, bn_device_dtype, carry_tensors
from .modules import CONVERTED, TARGET_CLASSES, Converted, dim_of, kind_of
from .record import RECORD_ATTR, manifest_options, record, records
from .targets import INSTANCE, RECALIBRATE, RENORM

__all__ = [
    "TEMPLATE_ATTR",
    "check_convertible",
    "check_instance_inputs",
    "conversion_dims",
    "convert_layers",
    "convert_one",
    "convert_tree",
    "has_running_stats",
    "original",
    "post_chain",
    "revert",
    "revert_one",
]

#: Attribute of a converted module: a tensor-free (meta) copy of the module it replaced.
TEMPLATE_ATTR = "_normdoctor_template"

#: Relative and absolute tolerance of the behaviour check of BatchNorm subclasses: the same
#: float operations in a possibly different order (a subclass may call F.batch_norm itself), so
#: a few float32 ulps; a real difference in behaviour (an activation, a scale) is far larger.
_BEHAVIOUR_RTOL = 1e-5
_BEHAVIOUR_ATOL = 1e-6


# ============================================================ conversion of single modules


def _tensor_names(module: nn.Module) -> set[str]:
    return {
        k
        for k, v in itertools.chain(module._parameters.items(), module._buffers.items())
        if v is not None
    }


def check_convertible(module: nn.Module, name: str, to: str) -> None:
    """Raise ConversionError unless ``module`` can become ``to`` (before any change).

    The dimensionality of layers whose class does not fix it (SyncBatchNorm) is checked where
    data or ``dim=`` can settle it (:func:`conversion_dims`).
    """
    kind = type(module).__name__
    family = norm_family(module)
    lazy = isinstance(module, _LazyNormBase) and module.has_uninitialized_params()
    if lazy:
        raise ConversionError(
            f"layer {name!r} is a lazy {kind} that never ran: run one forward pass first"
        )
    if to == RECALIBRATE:
        if family is NormFamily.BATCH_VAR:
            raise ConversionError(
                f"layer {name!r} ({kind}) divides by the batch variance in training and by "
                "running_var at inference, without a mean (EvoNorm B0-like): normdoctor does "
                "not recalibrate such layers yet"
            )
        if family is NormFamily.BATCH_OTHER:
            raise ConversionError(
                f"layer {name!r} ({kind}) behaves like BatchNorm but is no torch BatchNorm "
                "class: normdoctor cannot keep it from updating its running statistics while "
                "measuring, so it does not recalibrate it; convert it to nn.BatchNorm first"
            )
        if not has_running_stats(module):
            raise ConversionError(
                f"layer {name!r} ({kind}) holds no running statistics to recalibrate"
            )
        return
    if isinstance(module, CONVERTED):
        return
    if (
        isinstance(module, _InstanceNorm)
        and to == INSTANCE
        and type(module) in INSTANCE_NORMS.values()
    ):
        if not has_running_stats(module):
            raise ConversionError(
                f"layer {name!r} is an InstanceNorm without running statistics: it already "
                "normalizes each sample on its own"
            )
        return
    if family is NormFamily.FROZEN:
        raise ConversionError(
            f"layer {name!r} ({kind}) is frozen: it normalizes with its running statistics in "
            "training too, so batch statistics never entered what it learned and a conversion "
            f"to {to!r} has nothing to reproduce; only to='recalibrate' applies to it"
        )
    if not isinstance(module, _BatchNorm):
        raise ConversionError(
            f"layer {name!r} is a {kind}, not a BatchNorm layer: it cannot be converted to {to!r}"
        )


def has_running_stats(module: nn.Module) -> bool:
    return isinstance(module._buffers.get("running_mean"), torch.Tensor) and isinstance(
        module._buffers.get("running_var"), torch.Tensor
    )


def _probe_inputs(module: _BatchNorm, dim: int | None = None) -> list[torch.Tensor]:
    """Random inputs of the shapes a BatchNorm of this dimensionality takes."""
    c = module.num_features
    device, dtype = bn_device_dtype(module)
    dtype = dtype or torch.float32
    gen = torch.Generator(device="cpu").manual_seed(1234)
    by_dim: dict[int, list[tuple[int, ...]]] = {
        1: [(6, c, 5), (6, c)],
        2: [(6, c, 5, 5)],
        3: [(4, c, 3, 3, 3)],
    }
    shapes = by_dim[dim or dim_of(module) or 2]
    return [
        (torch.randn(s, generator=gen, dtype=torch.float64) * 2 + 0.5).to(
            device=device, dtype=dtype
        )
        for s in shapes
    ]


def _run_seeded(fn: Callable[[], torch.Tensor], device: torch.device | None) -> torch.Tensor:
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(4321)
        return fn()


def _same(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    return bool(torch.allclose(a, b, rtol=_BEHAVIOUR_RTOL, atol=_BEHAVIOUR_ATOL, equal_nan=True))


def _reproduces(module: _BatchNorm, chain: tuple[str, ...], x: torch.Tensor) -> bool:
    """Does "BatchNorm's own forward, then children ``chain``" compute what ``module`` does, in
    eval and train mode (outputs and running-statistics updates)?"""
    device, _ = bn_device_dtype(module)
    for training in (False, True):
        a, b = copy.deepcopy(module), copy.deepcopy(module)
        a.train(training)
        b.train(training)

        def reference(b: _BatchNorm = b) -> torch.Tensor:
            out = _BatchNorm.forward(b, x)
            for n in chain:
                child = b._modules[n]
                assert child is not None
                out = child(out)
            return out

        def subclass(a: _BatchNorm = a) -> torch.Tensor:
            return a(x)

        with torch.no_grad():
            out_a = _run_seeded(subclass, device)
            out_b = _run_seeded(reference, device)
        if not _same(out_a, out_b):
            return False
        for ta, tb in zip(a.buffers(), b.buffers(), strict=True):
            if not (_same(ta, tb) if ta.is_floating_point() else torch.equal(ta, tb)):
                return False
    return True


def post_chain(module: nn.Module, name: str, to: str, dim: int | None = None) -> tuple[str, ...]:
    """The children that a BatchNorm subclass applies after normalizing, in order.

    Plain BatchNorm classes (SyncBatchNorm included) and subclasses that do not override
    ``forward`` give ``()``; ``dim`` chooses the test inputs where the class does not.
    Raises ConversionError when no order of (a subset of) the children reproduces the
    subclass: its behaviour cannot be kept by a conversion.
    """
    if isinstance(module, CONVERTED):
        return tuple(getattr(module, "_post", ()))
    cls = type(module)
    if cls in BATCH_NORMS.values() or cls in INSTANCE_NORMS.values() or cls is nn.SyncBatchNorm:
        return ()
    refuse = f"layer {name!r} is a {cls.__name__}, a BatchNorm subclass that changes its behaviour"
    extra = _tensor_names(module) - BN_TENSORS
    if extra:
        raise ConversionError(
            f"{refuse} with its own tensors ({', '.join(sorted(extra))}); converting it to "
            f"{to!r} would drop them: exclude it (layers=...) or convert it by hand"
        )
    if cls.forward is _BatchNorm.forward:
        return ()
    assert isinstance(module, _BatchNorm)  # what check_convertible lets through
    children = [n for n, _ in module.named_children()]
    if len(children) > 3:
        raise ConversionError(
            f"{refuse} in forward() with {len(children)} child modules; normdoctor does not "
            f"know how to keep that behaviour in {to!r}: exclude it (layers=...)"
        )
    candidates = [
        perm
        for k in range(len(children), -1, -1)
        for subset in itertools.combinations(children, k)
        for perm in itertools.permutations(subset)
    ]
    error: Exception | None = None
    for x in _probe_inputs(module, dim):
        try:
            with torch.no_grad():
                copy.deepcopy(module).eval()(x)
        except Exception as exc:  # this input shape is not what the subclass takes
            error = exc
            continue
        for chain in candidates:
            if _reproduces(module, chain, x):
                return chain
        error = None
        break
    why = f" (it rejects BatchNorm-shaped inputs: {error})" if error is not None else ""
    raise ConversionError(
        f"{refuse} in forward(){why}: it is not 'BatchNorm, then its child modules', so a "
        f"conversion to {to!r} would silently change it; exclude it (layers=...) or convert it "
        "by hand"
    )


def _template(module: nn.Module) -> nn.Module:
    """A tensor-free (meta) copy of the original module, from which :func:`revert` rebuilds it."""
    existing = module.__dict__.get(TEMPLATE_ATTR)
    if existing is not None:
        return existing
    return copy.deepcopy(module).to("meta")


def convert_one(
    module: nn.Module,
    name: str,
    to: str,
    options: dict[str, Any],
    chain: tuple[str, ...],
    dim: int | None = None,
) -> nn.Module:
    """``module`` converted to ``to`` (tensors, children, training flag taken over); ``dim``
    for a class that does not fix its dimensionality (see :func:`conversion_dims`)."""
    options = {k: v for k, v in options.items() if k != "dim"}
    dim = dim_of(module) or dim
    if isinstance(module, CONVERTED):
        if kind_of(module) == to and not options:
            return module
        module = revert_one(module)
    if dim is None:  # conversion_dims refuses this before any change
        raise ConversionError(f"layer {name!r}: dimensionality unknown, pass dim=1, 2 or 3")
    assert isinstance(module, _NormBase)  # check_convertible let only norm layers through
    cls = TARGET_CLASSES[to][dim]
    template = _template(module)
    new: Converted = cls.carry(module, **options)
    for child_name, child in module.named_children():
        new.add_module(child_name, child)
    new._post = chain
    new.normdoctor_name = name
    new.__dict__[TEMPLATE_ATTR] = template
    new.training = module.training
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def original(module: nn.Module) -> nn.Module:
    """The module a conversion started from (its meta template), or ``module`` itself."""
    if isinstance(module, CONVERTED):
        template = module.__dict__.get(TEMPLATE_ATTR)
        if template is not None:
            return template
    return module


def revert_one(module: nn.Module) -> nn.Module:
    """The original BatchNorm (class, children, hyper-parameters) with ``module``'s tensors."""
    kind = kind_of(module)
    assert kind is not None and isinstance(module, _NormBase)
    template = module.__dict__.get(TEMPLATE_ATTR)
    prefix = "" if kind == RENORM else "bn_"
    running = module._buffers.get(prefix + "running_mean") is not None
    restored: _NormBase
    if template is None:
        dim = dim_of(module)
        assert dim is not None
        restored = BATCH_NORMS[dim](
            module.num_features, module.eps, module.momentum, module.affine, running, device="meta"
        )
    else:
        restored = copy.deepcopy(template)
    carry_tensors(module, restored, src_prefix=prefix)
    for child_name in list(restored._modules):
        restored._modules[child_name] = module._modules.get(child_name)
    restored.eps = module.eps
    restored.momentum = module.momentum
    restored.training = module.training
    if hasattr(module, "qconfig"):
        restored.qconfig = module.qconfig
    leftover = [
        n
        for n, t in itertools.chain(restored.named_parameters(), restored.named_buffers())
        if t.is_meta
    ]
    if leftover:
        raise ConversionError(
            f"cannot revert layer {getattr(module, 'normdoctor_name', '') or kind!r}: "
            f"no values for {', '.join(leftover)}"
        )
    return restored


def convert_tree(
    module: nn.Module,
    convert: Callable[[str, nn.Module], nn.Module],
    prefix: str = "",
    memo: dict[int, nn.Module] | None = None,
) -> nn.Module:
    """convert_sync_batchnorm's recursion; shared modules are converted once."""
    memo = {} if memo is None else memo
    key = id(module)
    if key in memo:
        return memo[key]
    out = convert(prefix, module)
    if out is module:
        # _modules, not named_children(): that one skips a child module's second occurrence.
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = convert_tree(
                child, convert, f"{prefix}.{child_name}" if prefix else child_name, memo
            )
            if new_child is not child:
                module.add_module(child_name, new_child)
    memo[key] = out
    return out


# ============================================================ dimensionality


def check_instance_inputs(shapes: Mapping[str, tuple[int, ...]], names: Iterable[str]) -> None:
    """Refuse, before any change, InstanceNorm for a layer whose first input (``shapes``, from
    data) leaves nothing to normalize per sample."""
    for n in names:
        shape = shapes.get(n)
        if shape is None:
            continue
        if len(shape) < 3 or math.prod(shape[2:]) < 2:
            what = "(N, C)" if len(shape) == 2 else f"of shape {shape}"
            raise ConversionError(
                f"layer {n!r}: InstanceNorm cannot replace this BatchNorm: it is fed inputs "
                f"{what}, which leave nothing to normalize per sample; use to='batchstats' or "
                "'renorm' for this layer"
            )


def _rank_dim(name: str, module: nn.Module, shape: tuple[int, ...] | None) -> int:
    """The BatchNorm1d/2d/3d dimensionality of inputs of ``shape`` (the first one seen)."""
    kind = type(module).__name__
    if shape is None:
        raise ConversionError(
            f"layer {name!r} is a {kind}, which takes inputs of any dimensionality, and no batch "
            "of the data reached it: pass dim=1, 2 or 3 (BatchNorm1d/2d/3d inputs)"
        )
    dim = {2: 1, 3: 1, 4: 2, 5: 3}.get(len(shape))
    if dim is None:
        raise ConversionError(
            f"layer {name!r} ({kind}) is fed inputs of shape {shape}: no BatchNorm1d/2d/3d "
            "takes that, so it cannot be converted"
        )
    return dim


def conversion_dims(
    modules: Mapping[str, nn.Module],
    structural: Mapping[str, str],
    per_kind: Mapping[str, Mapping[str, Any]],
    shapes: Mapping[str, tuple[int, ...]] | None,
) -> dict[str, int]:
    """Per converted layer, the dimensionality of its replacement (1, 2 or 3).

    The class fixes it for BatchNorm1d/2d/3d; for a class that takes any input (SyncBatchNorm)
    it is the ``dim`` option or the rank of the first input the layer saw (``shapes``, from
    data).  Raises ConversionError, before any change, where neither says.
    """
    dims: dict[str, int] = {}
    for n, kind in structural.items():
        module = modules[n]
        dim = dim_of(module) or per_kind.get(kind, {}).get("dim")
        if dim is None:
            if shapes is None:
                raise ConversionError(
                    f"layer {n!r} is a {type(module).__name__}, which takes inputs of any "
                    f"dimensionality: to convert it to {kind!r}, pass data=... (its first input "
                    "tells) or dim=1, 2 or 3 (BatchNorm1d/2d/3d inputs)"
                )
            dim = _rank_dim(n, module, shapes.get(n))
        dims[n] = dim
    return dims


# ============================================================ convert / revert


def convert_layers(
    model: nn.Module,
    plan: Mapping[str, str],
    options: Mapping[str, Mapping[str, Any]],
    dims: Mapping[str, int],
    *,
    inplace: bool,
) -> nn.Module:
    """Convert each layer of ``plan`` (layer name -> structural conversion, already checked by
    :func:`check_convertible`) with its ``options`` (per layer) to the replacement of
    dimensionality ``dims[name]``.

    Subclass behaviour is checked (:func:`post_chain`) for every layer before anything
    changes; with ``inplace=False`` the model is deep-copied first.  The root carries the
    record of its conversions (manifest entries, in model order, replacing earlier ones for
    the same layers).  Returns the (possibly new) root.
    """
    modules = dict(model.named_modules())
    chains = {n: post_chain(modules[n], n, k, dims[n]) for n, k in plan.items()}
    previous = records(model)
    target = model if inplace else copy.deepcopy(model)
    entries: list[dict[str, Any]] = []

    def convert(name: str, module: nn.Module) -> nn.Module:
        kind = plan.get(name)
        if kind is None:
            return module
        new = convert_one(module, name, kind, dict(options.get(name, {})), chains[name], dims[name])
        saved = manifest_options(kind, new)
        if dim_of(original(module)) is None:  # the class does not say: the manifest must
            saved["dim"] = dims[name]
        entries.append({"name": name, "to": kind, "options": saved})
        return new

    root = convert_tree(target, convert) if plan else target
    order = [n for n in modules if n in plan]
    entries.sort(key=lambda e: order.index(e["name"]))
    record(root, entries, previous)
    return root


def revert(
    model: nn.Module, layers: str | Sequence[str] | None = None, *, inplace: bool = False
) -> nn.Module:
    """Undo conversions: every converted layer (or those matching ``layers``) becomes the
    original BatchNorm again, same class (subclasses included), parameters and buffers.

    Recalibration is not undone (it only wrote running statistics).  Returns the (possibly new)
    root; with ``inplace=False`` the model is deep-copied first.
    """
    patterns = None if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    converted = [n for n, m in model.named_modules() if kind_of(m) is not None]
    if patterns is not None:
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in converted):
                raise ConversionError(
                    f"layer pattern {p!r} matches no converted layer "
                    f"(converted: {', '.join(repr(n) for n in converted) or 'none'})"
                )
    chosen = {
        n for n in converted if patterns is None or any(fnmatch.fnmatchcase(n, p) for p in patterns)
    }
    previous = records(model)
    target = model if inplace else copy.deepcopy(model)

    def convert(name: str, module: nn.Module) -> nn.Module:
        return revert_one(module) if name in chosen and kind_of(module) else module

    root = convert_tree(target, convert)
    root.__dict__[RECORD_ATTR] = [e for e in previous if e["name"] not in chosen]
    return root

"""From an unflattened ``torch.export`` program to norm layers a scan can probe.

An unflattened BatchNorm call site bakes in the mode it was exported in: each call site whose
graph is exactly one norm op on the module's own tensors is replaced by the equivalent torch
module holding the very same tensors (see :func:`normdoctor.io.load_model`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._messages import listing

__all__ = ["ExportedBatchNorm", "rebuild_norm_modules"]


class ExportedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm rebuilt from an exported call site whose input rank was not recorded."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


_BN_CLASSES: dict[int, type[nn.Module]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}
_IN_CLASSES: dict[int, type[nn.Module]] = {
    3: nn.InstanceNorm1d,
    4: nn.InstanceNorm2d,
    5: nn.InstanceNorm3d,
}


def _aten(name: str) -> Any:
    overloads = getattr(torch.ops.aten, name, None)
    return getattr(overloads, "default", None) if overloads is not None else None


# op -> positions of (weight, bias, running_mean, running_var, training, momentum, eps) and
# whether the op returns a tuple whose item 0 is the output.
_BN_OPS: dict[Any, tuple[tuple[int | None, ...], bool]] = {}
for _name, _layout, _tuple in (
    ("batch_norm", (1, 2, 3, 4, 5, 6, 7), False),
    ("native_batch_norm", (1, 2, 3, 4, 5, 6, 7), True),
    ("_native_batch_norm_legit", (1, 2, 3, 4, 5, 6, 7), True),
    ("_native_batch_norm_legit_no_training", (1, 2, 3, 4, None, 5, 6), True),
):
    _op = _aten(_name)
    if _op is not None:
        _BN_OPS[_op] = (_layout, _tuple)
_INSTANCE_NORM = _aten("instance_norm")
_GROUP_NORM = _aten("group_norm")
_LAYER_NORM = _aten("layer_norm")


def _rebuild_call_site(module: nn.Module) -> tuple[nn.Module | None, str]:
    """A plain torch norm module equivalent to an unflattened single-op call site.

    Returns ``(None, why)`` when the site's graph is anything but one norm op on the module's
    own attributes (plus the ``num_batches_tracked`` increment of a train-mode export).
    """
    graph = getattr(module, "graph", None)
    if graph is None:
        return None, "not an unflattened graph module"
    import operator

    placeholders, attrs, norm_nodes, output = [], {}, [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            placeholders.append(node)
        elif node.op == "get_attr":
            attrs[node] = str(node.target)
        elif node.op == "call_function":
            if node.target in _BN_OPS or node.target in (_INSTANCE_NORM, _GROUP_NORM, _LAYER_NORM):
                norm_nodes.append(node)
            elif (node.target is operator.getitem and node.args[1] == 0) or (
                str(node.target) == "aten.add_.Tensor"
                and attrs.get(node.args[0]) == "num_batches_tracked"
            ):
                continue
            else:
                return None, f"graph calls {node.target}"
        elif node.op == "output":
            output = node
        else:
            return None, f"graph has a {node.op} node"
    if len(placeholders) != 1 or len(norm_nodes) != 1 or output is None:
        return None, "graph is not a single normalization call"
    (x,), (call,) = placeholders, norm_nodes
    out = output.args[0]
    if isinstance(out, (tuple, list)):
        if len(out) != 1:
            return None, "graph has several outputs"
        out = out[0]
    if not (
        out is call or (getattr(out, "target", None) is operator.getitem and out.args[0] is call)
    ):
        return None, "the call's result is not the output"
    if not call.args or call.args[0] is not x:
        return None, "the call does not normalize the module's input"

    def attr(position: int | None, wanted: str) -> torch.Tensor | bool | None:
        if position is None or position >= len(call.args):
            return None
        arg = call.args[position]
        if arg is None:
            return None
        if attrs.get(arg) != wanted:
            return False  # something other than the module's own tensor
        value = getattr(module, wanted, None)
        return value if isinstance(value, torch.Tensor) else False

    val = x.meta.get("val")
    ndim = val.dim() if isinstance(val, torch.Tensor) else None
    target = call.target
    if target in _BN_OPS or target is _INSTANCE_NORM:
        if target is _INSTANCE_NORM:
            layout: tuple[int | None, ...] = (1, 2, 3, 4, 5, 6, 7)
        else:
            layout = _BN_OPS[target][0]
        w_pos, b_pos, rm_pos, rv_pos, train_pos, mom_pos, eps_pos = layout
        weight, bias = attr(w_pos, "weight"), attr(b_pos, "bias")
        rm, rv = attr(rm_pos, "running_mean"), attr(rv_pos, "running_var")
        if any(t is False for t in (weight, bias, rm, rv)) or (weight is None) != (bias is None):
            return None, "the call reads tensors that are not the module's own"
        if (rm is None) != (rv is None):
            return None, "only one running statistic"
        training = call.args[train_pos] if train_pos is not None else False
        momentum, eps = call.args[mom_pos], call.args[eps_pos]
        if not isinstance(training, bool) or not isinstance(eps, (int, float)):
            return None, "symbolic training flag or eps"
        if not isinstance(momentum, (int, float)):
            return None, "symbolic momentum"
        ref = weight if isinstance(weight, torch.Tensor) else rm
        if not isinstance(ref, torch.Tensor):
            return None, "no tensor tells the number of features"
        features = ref.numel()
        track = isinstance(rm, torch.Tensor)
        kwargs = dict(
            eps=float(eps),
            momentum=float(momentum),
            affine=isinstance(weight, torch.Tensor),
            track_running_stats=track,
        )
        if target is _INSTANCE_NORM:
            cls = _IN_CLASSES.get(ndim or 0)
            if cls is None:
                return None, "unknown input rank for InstanceNorm"
            # use_input_stats is `training or not track_running_stats`.
            new = cls(features, **kwargs)
            new.training = bool(training) and track
        else:
            cls = _BN_CLASSES.get(ndim or 0, ExportedBatchNorm)
            new = cls(features, **kwargs)
            new.training = bool(training) and track
        tensors = {"weight": weight, "bias": bias, "running_mean": rm, "running_var": rv}
        nbt = getattr(module, "num_batches_tracked", None)
        if track and isinstance(nbt, torch.Tensor):
            tensors["num_batches_tracked"] = nbt
    elif target is _GROUP_NORM:
        groups, eps = call.args[1], call.args[4] if len(call.args) > 4 else 1e-5
        weight, bias = attr(2, "weight"), attr(3, "bias")
        if weight is False or bias is False or not isinstance(groups, int):
            return None, "unexpected group_norm arguments"
        if not isinstance(weight, torch.Tensor):
            return None, "GroupNorm without affine: channels unknown"
        new = nn.GroupNorm(groups, weight.numel(), eps=float(eps), affine=True)
        tensors = {"weight": weight, "bias": bias}
    else:  # layer_norm
        shape, eps = call.args[1], call.args[4] if len(call.args) > 4 else 1e-5
        weight, bias = attr(2, "weight"), attr(3, "bias")
        if weight is False or bias is False or not all(isinstance(s, int) for s in shape):
            return None, "unexpected layer_norm arguments"
        new = nn.LayerNorm(
            list(shape),
            eps=float(eps),
            elementwise_affine=isinstance(weight, torch.Tensor),
            bias=isinstance(bias, torch.Tensor),
        )
        tensors = {"weight": weight, "bias": bias}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        if name in ("weight", "bias"):
            param = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, False)
            setattr(new, name, param)
        else:
            new._buffers[name] = tensor
    return new, ""


def rebuild_norm_modules(root: nn.Module) -> tuple[list[str], list[str]]:
    """Replace unflattened norm call sites by plain torch modules, in place.

    Returns ``(notes, caveats)``; caveats say where a scan cannot measure the train path.
    """
    notes: list[str] = []
    caveats: list[str] = []
    replaced = 0
    for name, module in list(root.named_modules()):
        if not name or type(module).__name__ != "InterpreterModule":
            continue
        new, why = _rebuild_call_site(module)
        if new is None:
            if "running_mean" in module._buffers and "running_var" in module._buffers:
                caveats.append(
                    f"{name}: exported call site not rebuilt ({why}); it keeps the exported "
                    "graph's fixed mode, so both paths use its running statistics"
                )
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, new)
        replaced += 1
    train_dropout = []
    for name, module in root.named_modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if graph is not None else ():
            if (
                node.op == "call_function"
                and "dropout" in str(node.target)
                and any(arg is True for arg in node.args[1:])
            ):
                train_dropout.append(name or "<root>")
    if train_dropout:
        caveats.append(
            "the program was exported in train mode: dropout stays active on both paths in "
            f"{listing(sorted(set(train_dropout)))}"
        )
    if replaced:
        notes.append(f"rebuilt {replaced} normalization call sites as torch modules")
    return notes, caveats

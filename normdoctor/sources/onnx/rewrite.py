"""Graph rewrites: taps, batch statistics, InstanceNorm, running statistics, dynamic batch.

Every function takes a model and returns a modified copy; the input is never changed.  Nodes are
replaced in place in the node list, so the graph stays topologically sorted: a replacement only
reads the replaced node's inputs (defined earlier) and produces its outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from ...errors import ConversionError
from .graph import NormNode, Shapes, data_inputs, default_opset, iter_nodes, subgraphs

__all__ = [
    "BATCH_DIM",
    "Names",
    "add_outputs",
    "batchstats_nodes",
    "copy_model",
    "dynamic_dims",
    "feed_running_stats",
    "node_index",
    "relax_batch",
    "replace_nodes",
    "set_running_stats",
    "to_instance_nodes",
    "train_variant",
]

BATCH_DIM = "normdoctor_batch"


def copy_model(model: ModelProto) -> ModelProto:
    out = ModelProto()
    out.CopyFrom(model)
    return out


class Names:
    """Fresh value and node names that collide with nothing in the model."""

    def __init__(self, model: ModelProto) -> None:
        g = model.graph
        taken = {t.name for t in g.initializer}
        taken |= {v.name for v in [*g.input, *g.output, *g.value_info]}
        for node in iter_nodes(g):
            taken.update(node.input)
            taken.update(node.output)
            taken.add(node.name)
        self.taken = taken

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name


def _find(model: ModelProto, output: str) -> int:
    for i, node in enumerate(model.graph.node):
        if node.output and node.output[0] == output:
            return i
    raise ConversionError(f"no node of the main graph produces {output!r}")


def replace_nodes(model: ModelProto, replacements: Mapping[str, Sequence[NodeProto]]) -> None:
    """In place: each node whose first output is a key is replaced by the given nodes."""
    nodes = list(model.graph.node)
    out: list[NodeProto] = []
    for node in nodes:
        key = node.output[0] if node.output else None
        if key is not None and key in replacements:
            out.extend(replacements[key])
        else:
            out.append(node)
    del model.graph.node[:]
    model.graph.node.extend(out)


def _uses(model: ModelProto, value: str) -> int:
    """How many node inputs (subgraphs included) and graph outputs read ``value``."""
    n = sum(1 for node in iter_nodes(model.graph) for i in node.input if i == value)
    return n + sum(1 for o in model.graph.output if o.name == value)


def _check_single_output(model: ModelProto, node: NodeProto, what: str) -> None:
    extra = [o for o in node.output[1:] if o]
    used = [o for o in extra if _uses(model, o)]
    if used:
        raise ConversionError(
            f"{what}: node {node.name or node.output[0]!r} has extra outputs in use "
            f"({', '.join(used)}); only single-output BatchNormalization nodes can be rewritten"
        )


def _const(name: str, array: np.ndarray, node_name: str) -> NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=node_name, value=numpy_helper.from_array(array, name)
    )


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def _cast_if_needed(
    value: str, have: int | None, want: int | None, names: Names, base: str
) -> tuple[str, list[NodeProto]]:
    if have is None or want is None or have == want:
        return value, []
    out = names.fresh(f"{base}_cast")
    return out, [helper.make_node("Cast", [value], [out], name=out, to=want)]


def batchstats_nodes(
    model: ModelProto,
    node: NodeProto,
    shapes: Shapes,
    names: Names,
    eps: float,
    opset: int,
) -> list[NodeProto]:
    """Nodes computing a BatchNormalization's output from the current batch's statistics.

    For input x of shape (N, C, *): x3 = reshape(x, (N, C, L)); mu = mean of x3 over N and L;
    var = mean of (x3 - mu)^2 (biased, as BatchNorm normalizes); y = (x3 - mu) / sqrt(var + eps)
    * gamma + beta, reshaped back to x's shape.  Flattening the spatial dimensions keeps the
    reduction axes static ([0, 2]) whatever the rank, so the rewrite needs no shape information.
    """
    if opset < 7:
        raise ConversionError(
            f"batch-statistics rewrite needs opset >= 7 (numpy broadcasting); this graph is "
            f"opset {opset}: upgrade it first with onnx.version_converter"
        )
    _check_single_output(model, node, "batch statistics")
    x, scale, bias = node.input[0], node.input[1], node.input[2]
    y = node.output[0]
    base = (node.name or y).replace("/", "_") + "_batchstats"
    elem = shapes.types.get(x) or shapes.types.get(scale) or TensorProto.FLOAT
    dtype = _np_dtype(elem)
    n = lambda s: names.fresh(f"{base}_{s}")  # noqa: E731
    nodes: list[NodeProto] = []
    flat, bshape, eps_c = n("flat_shape"), n("param_shape"), n("eps")
    nodes.append(_const(flat, np.array([0, 0, -1], dtype=np.int64), flat))
    nodes.append(_const(bshape, np.array([1, -1, 1], dtype=np.int64), bshape))
    nodes.append(_const(eps_c, np.array(eps, dtype=dtype), eps_c))
    x3, mean, d, d2, var, ve, std, inv = (
        n(s) for s in ("x3", "mean", "centred", "sq", "var", "var_eps", "std", "inv_std")
    )
    nodes.append(helper.make_node("Reshape", [x, flat], [x3], name=x3))

    def reduce_mean(src: str, dst: str) -> None:
        if opset >= 18:
            axes = n("axes")
            nodes.append(_const(axes, np.array([0, 2], dtype=np.int64), axes))
            nodes.append(helper.make_node("ReduceMean", [src, axes], [dst], name=dst, keepdims=1))
        else:
            nodes.append(
                helper.make_node("ReduceMean", [src], [dst], name=dst, axes=[0, 2], keepdims=1)
            )

    reduce_mean(x3, mean)
    nodes.append(helper.make_node("Sub", [x3, mean], [d], name=d))
    nodes.append(helper.make_node("Mul", [d, d], [d2], name=d2))
    reduce_mean(d2, var)
    nodes.append(helper.make_node("Add", [var, eps_c], [ve], name=ve))
    nodes.append(helper.make_node("Sqrt", [ve], [std], name=std))
    nodes.append(helper.make_node("Reciprocal", [std], [inv], name=inv))
    sc, cast_nodes = _cast_if_needed(scale, shapes.types.get(scale), elem, names, base + "_scale")
    nodes += cast_nodes
    bi, cast_nodes = _cast_if_needed(bias, shapes.types.get(bias), elem, names, base + "_bias")
    nodes += cast_nodes
    sc3, bi3, gain, ynorm, y3, xshape = (
        n(s) for s in ("scale3", "bias3", "gain", "yn", "y3", "shape")
    )
    nodes.append(helper.make_node("Reshape", [sc, bshape], [sc3], name=sc3))
    nodes.append(helper.make_node("Reshape", [bi, bshape], [bi3], name=bi3))
    nodes.append(helper.make_node("Mul", [inv, sc3], [gain], name=gain))
    nodes.append(helper.make_node("Mul", [d, gain], [ynorm], name=ynorm))
    nodes.append(helper.make_node("Add", [ynorm, bi3], [y3], name=y3))
    nodes.append(helper.make_node("Shape", [x], [xshape], name=xshape))
    nodes.append(helper.make_node("Reshape", [y3, xshape], [y], name=node.name or n("y")))
    return nodes


def to_instance_nodes(
    model: ModelProto, node: NodeProto, shapes: Shapes, names: Names, eps: float
) -> list[NodeProto]:
    """InstanceNormalization with the BatchNormalization's scale, bias and epsilon.

    InstanceNormalization normalizes each sample over its spatial dimensions, so it needs an
    input of rank >= 3; a (N, C) input has nothing to normalize over per sample.
    """
    _check_single_output(model, node, "instance")
    x, scale, bias = node.input[0], node.input[1], node.input[2]
    label = node.name or node.output[0]
    rank = shapes.rank(x)
    if rank is None:
        raise ConversionError(
            f"{label}: the rank of its input {x!r} is unknown (no shape information in the "
            "graph); InstanceNorm needs spatial dimensions, so the rewrite cannot be checked"
        )
    if rank < 3:
        raise ConversionError(
            f"{label}: its input has shape {_shape_text(shapes.dims[x])} (N, C) with no spatial "
            "dimensions; InstanceNorm normalizes each sample over spatial positions, so there is "
            "nothing to normalize over: use 'recalibrate' or 'batchstats' for this layer"
        )
    elem = shapes.types.get(x)
    base = label.replace("/", "_") + "_instance"
    sc, nodes = _cast_if_needed(scale, shapes.types.get(scale), elem, names, base + "_scale")
    bi, more = _cast_if_needed(bias, shapes.types.get(bias), elem, names, base + "_bias")
    nodes += more
    nodes.append(
        helper.make_node(
            "InstanceNormalization",
            [x, sc, bi],
            [node.output[0]],
            name=node.name or names.fresh(base),
            epsilon=eps,
        )
    )
    return nodes


def _shape_text(dims: Iterable[object]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def set_running_stats(
    model: ModelProto,
    stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
    names: Names,
) -> None:
    """In place: BatchNormalization nodes (keyed by first output) get new running statistics.

    An initializer read by this node alone is overwritten (same name, same dtype); otherwise a
    new initializer is added and the node rewired to it, so no other reader changes.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    input_names = {i.name for i in g.input}
    for output, (mean, var) in stats.items():
        node = g.node[_find(model, output)]
        for slot, value in ((3, mean), (4, var)):
            current = node.input[slot]
            old = inits.get(current)
            dtype = _np_dtype(old.data_type) if old is not None else np.dtype(np.float32)
            array = np.asarray(value, dtype=np.float64).astype(dtype)
            if (
                old is not None
                and _uses(model, current) == 1
                and not _is_data_input(model, current)
            ):
                old.CopyFrom(numpy_helper.from_array(array, current))
                continue
            role = "running_mean" if slot == 3 else "running_var"
            fresh = names.fresh(f"{node.name or output}.{role}")
            g.initializer.append(numpy_helper.from_array(array, fresh))
            if model.ir_version < 4:  # IR 3: every initializer must also be a graph input
                g.input.append(
                    helper.make_tensor_value_info(
                        fresh, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape
                    )
                )
            input_names.add(fresh)
            node.input[slot] = fresh


def _is_data_input(model: ModelProto, name: str) -> bool:
    return any(i.name == name for i in data_inputs(model.graph))


def feed_running_stats(
    model: ModelProto, outputs: Sequence[str], names: Names
) -> dict[str, tuple[str, str]]:
    """In place: each listed BatchNormalization reads its running statistics from new graph
    inputs.  Returns, per node output, the (mean, var) input names to feed."""
    g = model.graph
    fed: dict[str, tuple[str, str]] = {}
    for output in outputs:
        node = g.node[_find(model, output)]
        pair = []
        for slot, role in ((3, "mean"), (4, "var")):
            fresh = names.fresh(f"normdoctor_{role}_{len(fed)}")
            elem = _value_elem(model, node.input[slot])
            g.input.append(helper.make_tensor_value_info(fresh, elem, None))
            node.input[slot] = fresh
            pair.append(fresh)
        fed[output] = (pair[0], pair[1])
    return fed


def _value_elem(model: ModelProto, name: str) -> int:
    for t in model.graph.initializer:
        if t.name == name:
            return t.data_type
    return TensorProto.FLOAT


def add_outputs(model: ModelProto, values: Iterable[str], shapes: Shapes) -> None:
    """In place: expose ``values`` as extra graph outputs (typed, shape left open)."""
    g = model.graph
    present = {o.name for o in g.output} | {i.name for i in g.input}
    for v in values:
        if v in present:
            continue
        present.add(v)
        elem = shapes.types.get(v)
        if elem:
            g.output.append(helper.make_tensor_value_info(v, elem, None))
        else:
            g.output.append(onnx.ValueInfoProto(name=v))


def relax_batch(model: ModelProto, batch: int) -> ModelProto:
    """A copy whose data inputs (and outputs) have a symbolic first dimension.

    Intermediate shape annotations are dropped: they may carry the fixed batch size.  Whether
    the graph really computes per sample with the new batch size (no Reshape to a hard-coded
    batch) is for the caller to verify.
    """
    out = copy_model(model)
    g = out.graph
    fed = data_inputs(g)
    for vi, always in [*((v, True) for v in fed), *((v, False) for v in g.output)]:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape") and len(tt.shape.dim) > 0:
            d0 = tt.shape.dim[0]
            if d0.HasField("dim_value") and (always or d0.dim_value == batch):
                d0.Clear()
                d0.dim_param = BATCH_DIM
    del g.value_info[:]
    return out


def dynamic_dims(model: ModelProto) -> ModelProto:
    """``model``, or a copy in which every ``dim_value`` of 0 or less is a named dimension.

    Some exporters (paddle2onnx) mark a dynamic dimension as ``dim_value: -1`` or 0.
    onnxruntime takes 0 as a size (no element fits a Reshape to it) and normdoctor would take
    either as a fixed batch size; named, they mean what the exporter meant.  The first
    dimension is named as :func:`relax_batch` names it, the others each get a name of their own.
    """
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    if not any(
        d.HasField("dim_value") and d.dim_value <= 0
        for vi in values
        for d in vi.type.tensor_type.shape.dim
    ):
        return model
    out = copy_model(model)
    g = out.graph
    names = Names(out)
    for vi in [*g.input, *g.output, *g.value_info]:
        if not vi.type.HasField("tensor_type"):
            continue
        for position, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value <= 0:
                d.Clear()
                d.dim_param = BATCH_DIM if position == 0 else names.fresh("normdoctor_dim")
    return out


def subgraph_reads(node: NodeProto) -> set[str]:
    """Names read anywhere inside the bodies of ``node`` (outer-scope values included)."""
    found: set[str] = set()
    for _attr, body in subgraphs(node):
        for inner in iter_nodes(body):
            found.update(i for i in inner.input if i)
    return found


def node_index(model: ModelProto, output: str) -> int:
    for i, node in enumerate(model.graph.node):
        if node.output and node.output[0] == output:
            return i
    raise ConversionError(f"no node of the main graph produces {output!r}")


def train_variant(measured: Sequence[NormNode], shapes: Shapes) -> Callable[[ModelProto], None]:
    """The rewrite that turns a graph into its train path: each measured BatchNormalization
    normalizes with the current batch's mean and biased variance (running statistics unused)."""

    def prepare(model: ModelProto) -> None:
        names = Names(model)
        opset = default_opset(model)
        replacements = {}
        for rec in measured:
            node = model.graph.node[node_index(model, rec.output)]
            replacements[rec.output] = batchstats_nodes(
                model, node, shapes, names, rec.layer.eps, opset
            )
        replace_nodes(model, replacements)

    return prepare

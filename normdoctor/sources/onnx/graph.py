"""Reading ONNX graphs: which nodes normalize, what their parameters hold, what shapes flow.

Nothing here changes a model.  :func:`discover` lists every normalization node (the main graph's
and, listed only, those inside ``If``/``Loop``/``Scan`` bodies); :class:`Constants` resolves a
value name to a numpy array when the graph holds it as a constant (initializer, ``Constant``
node, or a data-independent computation such as ``ConstantOfShape``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, numpy_helper

from ...layers import NormFamily, NormLayer

__all__ = [
    "Constants",
    "NormNode",
    "Shapes",
    "data_inputs",
    "default_opset",
    "discover",
    "folded_convs",
    "folded_note",
    "is_folded_note",
    "iter_nodes",
    "static_dim",
    "subgraphs",
]

DEFAULT_DOMAINS = ("", "ai.onnx")
#: ORT contrib ops that normalize per sample (batch-independent).
_MS_OPS = {
    "LayerNormalization": NormFamily.LAYER,
    "SkipLayerNormalization": NormFamily.LAYER,
    "SimplifiedLayerNormalization": NormFamily.RMS,
    "SkipSimplifiedLayerNormalization": NormFamily.RMS,
}
#: Ops whose output is random: a parameter computed from them is not a constant.
_RANDOM_OPS = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "Dropout",
}


def default_opset(model: ModelProto) -> int:
    """The model's opset for the default (ai.onnx) domain; 0 when it imports none."""
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    return 0


def subgraphs(node: NodeProto) -> list[tuple[str, GraphProto]]:
    """(attribute name, body) for every graph-valued attribute of ``node`` (If, Loop, Scan)."""
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append((attr.name, attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend((f"{attr.name}[{i}]", g) for i, g in enumerate(attr.graphs))
    return found


def iter_nodes(graph: GraphProto) -> Iterator[NodeProto]:
    """Every node of ``graph`` and of its subgraphs, depth first."""
    for node in graph.node:
        yield node
        for _attr, body in subgraphs(node):
            yield from iter_nodes(body)


def data_inputs(graph: GraphProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that the caller must feed (not backed by an initializer)."""
    inits = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def _attr(node: NodeProto, name: str, default: Any) -> Any:
    """The value of attribute ``name`` (its Python type depends on the attribute)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _f32(value: float) -> float:
    """A float32 attribute as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


# -- shapes -------------------------------------------------------------------------------------
def static_dim(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """A dimension's fixed size, or ``None`` when it is dynamic.

    Named (``dim_param``), absent and non-positive sizes are all dynamic: paddle2onnx and some
    older exporters mark a dynamic batch as ``dim_value: -1`` (or 0), which no tensor can have.
    """
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return int(dim.dim_value)
    return None


class Shapes:
    """Element type and static shape of every value onnx shape inference can tell."""

    def __init__(self, model: ModelProto) -> None:
        self.types: dict[str, int] = {}
        self.dims: dict[str, tuple[int | str | None, ...]] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # custom ops, broken annotations: fall back to what the file says
            inferred = model
        g = inferred.graph
        for vi in [*g.input, *g.value_info, *g.output]:
            self._add(vi)
        for t in g.initializer:
            self.types[t.name] = t.data_type
            self.dims[t.name] = tuple(int(d) for d in t.dims)

    def _add(self, vi: onnx.ValueInfoProto) -> None:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            return
        if tt.elem_type:
            self.types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            self.dims[vi.name] = tuple(
                static_dim(d) if d.HasField("dim_value") else (d.dim_param or None)
                for d in tt.shape.dim
            )

    def rank(self, name: str) -> int | None:
        dims = self.dims.get(name)
        return None if dims is None else len(dims)


# -- constants ----------------------------------------------------------------------------------
class Constants:
    """Resolves value names of the main graph to numpy arrays when they are constant.

    Initializers and ``Constant`` nodes are read directly.  A value computed from constants
    only (``ConstantOfShape``, a ``Cast`` of an initializer, ...) is evaluated once with
    onnxruntime on the sub-graph that produces it.  A value that depends on a graph input that
    the caller feeds is not constant: ``get`` returns ``None``.
    """

    def __init__(self, model: ModelProto, run_model: ModelProto | None = None) -> None:
        self.model = model
        self.run_model = run_model if run_model is not None else model
        g = model.graph
        self._inits = {t.name: t for t in g.initializer}
        self._fed = {i.name for i in data_inputs(g)}
        self._producer: dict[str, NodeProto] = {}
        for node in g.node:
            for out in node.output:
                if out:
                    self._producer[out] = node
        self._cache: dict[str, np.ndarray | None] = {}

    def get(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name not in self._cache:
            self._cache[name] = self._resolve(name)
        return self._cache[name]

    def _resolve(self, name: str) -> np.ndarray | None:
        if name in self._inits:
            return numpy_helper.to_array(self._inits[name])
        node = self._producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            return _constant_value(node)
        if not self._is_constant(name, set()):
            return None
        return self._evaluate(name)

    def _is_constant(self, name: str, seen: set[str]) -> bool:
        if name in seen or name in self._inits:
            return True
        if name in self._fed:
            return False
        node = self._producer.get(name)
        if node is None or node.op_type in _RANDOM_OPS or subgraphs(node):
            return False
        seen.add(name)
        return all(self._is_constant(i, seen) for i in node.input if i)

    def _evaluate(self, name: str) -> np.ndarray | None:
        """Run the nodes that produce ``name`` (all constant) through onnxruntime."""
        import onnxruntime as ort

        g = self.run_model.graph
        producer = {out: n for n in g.node for out in n.output if out}
        needed: set[int] = set()
        stack, inits = [name], set()
        index = {id(n): i for i, n in enumerate(g.node)}
        while stack:
            v = stack.pop()
            node = producer.get(v)
            if node is None:
                inits.add(v)
                continue
            if index[id(node)] in needed:
                continue
            needed.add(index[id(node)])
            stack.extend(i for i in node.input if i)
        nodes = [g.node[i] for i in sorted(needed)]
        graph = onnx.helper.make_graph(
            nodes,
            "normdoctor_constant",
            [],
            [onnx.ValueInfoProto(name=name)],
            [t for t in g.initializer if t.name in inits],
        )
        sub = onnx.helper.make_model(
            graph,
            opset_imports=list(self.run_model.opset_import),
            ir_version=max(self.run_model.ir_version, 4),
        )
        try:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            sess = ort.InferenceSession(
                sub.SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
            return np.asarray(sess.run(None, {})[0])
        except Exception:
            return None


def _constant_value(node: NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.asarray(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.asarray(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.asarray(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.asarray(list(a.ints), dtype=np.int64)
    return None


# -- discovery ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class NormNode:
    """One normalization node, located in its graph.

    ``inputs`` maps roles to value names: ``x`` always; ``scale``, ``bias``, ``mean`` and
    ``var`` where the op has them.  ``where`` is ``None`` for the main graph, else a phrase
    naming the body that holds the node.  ``measurable`` says whether a scan can record it;
    ``why`` gives the reason when it cannot.
    """

    layer: NormLayer
    op_type: str
    domain: str
    output: str  # the node's first output: stable across opset upgrades and rewrites
    inputs: dict[str, str]
    where: str | None = None
    measurable: bool = False
    why: str | None = None
    state: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def is_batchnorm(self) -> bool:
        return self.op_type == "BatchNormalization" and self.domain in DEFAULT_DOMAINS


def _batchnorm_family(node: NodeProto, opset: int) -> tuple[NormFamily, str | None]:
    """BATCH when inference uses the running statistics, else BATCH_STATS_ONLY (training mode)."""
    outputs = [o for o in node.output if o]
    if opset >= 14:
        training = bool(_attr(node, "training_mode", 0))
        how = "training_mode=1"
    elif opset >= 7:
        training = len(outputs) > 1
        how = f"{len(outputs)} outputs (training mode before opset 14)"
    else:
        training = not bool(_attr(node, "is_test", 0))
        how = "is_test=0"
    if training:
        return NormFamily.BATCH_STATS_ONLY, f"{how}: normalizes with batch statistics at inference"
    if opset < 9 and int(_attr(node, "spatial", 1)) == 0:
        return NormFamily.BATCH, "spatial=0 (per-activation statistics): not supported"
    return NormFamily.BATCH, None


def _describe(
    node: NodeProto, name: str, opset: int, shapes: Shapes, consts: Constants | None
) -> NormNode | None:
    op, domain = node.op_type, node.domain
    ins = list(node.input) + [""] * 5
    x = ins[0]
    in_dims = shapes.dims.get(x)
    channels = in_dims[1] if in_dims is not None and len(in_dims) > 1 else None

    def size(value: str) -> int:
        if consts is not None and (arr := consts.get(value)) is not None:
            return int(arr.size)
        dims = shapes.dims.get(value)
        ints = [d for d in dims if isinstance(d, int)] if dims is not None else []
        if dims is not None and len(ints) == len(dims):
            return int(np.prod(ints)) if ints else 1
        return 0

    eps = _f32(float(_attr(node, "epsilon", 1e-5)))
    momentum: float | None = None
    why: str | None = None
    inputs = {"x": x}
    if domain in DEFAULT_DOMAINS:
        if op == "BatchNormalization":
            family, why = _batchnorm_family(node, opset)
            momentum = round(1.0 - _f32(float(_attr(node, "momentum", 0.9))), 9)
            inputs.update(scale=ins[1], bias=ins[2], mean=ins[3], var=ins[4])
            num, affine, track = size(ins[3]) or size(ins[1]), True, True
        elif op == "InstanceNormalization":
            family, affine, track = NormFamily.INSTANCE, True, False
            inputs.update(scale=ins[1], bias=ins[2])
            num = size(ins[1])
        elif op == "LayerNormalization":
            family, affine, track = NormFamily.LAYER, True, False
            inputs.update(scale=ins[1], bias=ins[2])
            dims = shapes.dims.get(ins[1])
            num = int(dims[-1]) if dims and isinstance(dims[-1], int) else size(ins[1])
        elif op == "GroupNormalization":
            family, affine, track = NormFamily.GROUP, True, False
            inputs.update(scale=ins[1], bias=ins[2])
            num = channels if isinstance(channels, int) else (size(ins[1]) if opset >= 21 else 0)
        elif op == "RMSNormalization":
            family, affine, track = NormFamily.RMS, True, False
            inputs.update(scale=ins[1])
            dims = shapes.dims.get(ins[1])
            num = int(dims[-1]) if dims and isinstance(dims[-1], int) else size(ins[1])
        elif op == "LpNormalization":
            # x / ||x||_p along one axis of each sample: a norm rescaling without centring, the
            # same kind as RMSNorm (for p = 2 it is RMSNorm up to a constant), batch-independent.
            family, affine, track, eps = NormFamily.RMS, False, False, 0.0
            axis = int(_attr(node, "axis", -1))
            d = in_dims[axis] if in_dims is not None and -len(in_dims) <= axis < len(in_dims) else 0
            num = d if isinstance(d, int) else 0
        elif op == "LRN":
            family, affine, track, eps = NormFamily.LOCAL_RESPONSE, False, False, 0.0
            num = channels if isinstance(channels, int) else 0
        elif op == "MeanVarianceNormalization":
            axes = list(_attr(node, "axes", [0, 2, 3]))
            # Default axes include the batch: it normalizes with batch statistics, always.
            family = NormFamily.BATCH_STATS_ONLY if 0 in axes else NormFamily.INSTANCE
            affine, track, eps = False, False, 1e-9
            num = channels if isinstance(channels, int) else 0
        else:
            return None
    elif domain == "com.microsoft" and op in _MS_OPS:
        family, affine, track = _MS_OPS[op], True, False
        scale_in = ins[2] if op.startswith("Skip") else ins[1]
        inputs.update(scale=scale_in)
        num = size(scale_in)
    else:
        return None
    layer = NormLayer(
        name=name,
        kind=op,
        family=family,
        num_features=int(num or 0),
        eps=eps,
        momentum=momentum,
        affine=affine,
        track_running_stats=track,
    )
    return NormNode(
        layer=layer, op_type=op, domain=domain, output=node.output[0], inputs=inputs, why=why
    )


def discover(
    model: ModelProto, shapes: Shapes, consts: Constants
) -> tuple[list[NormNode], list[str]]:
    """Every normalization node (main graph in node order, then subgraph bodies) and notes."""
    opset = default_opset(model)
    found: list[NormNode] = []
    used: set[str] = set()

    def unique(name: str) -> str:
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}#{k}"
        used.add(name)
        return name

    nested: list[tuple[NodeProto, str, str]] = []  # (node, qualified name, where)

    def walk_body(graph: GraphProto, prefix: str, where: str) -> None:
        for node in graph.node:
            local = node.name or (node.output[0] if node.output else node.op_type)
            nested.append((node, f"{prefix}/{local}", where))
            for attr, body in subgraphs(node):
                walk_body(body, f"{prefix}/{local}/{attr}", where)

    for node in model.graph.node:
        rec = _describe(node, unique(node.name or node.output[0]), opset, shapes, consts)
        if rec is not None:
            found.append(_with_state(rec, consts))
        local = node.name or (node.output[0] if node.output else node.op_type)
        for attr, body in subgraphs(node):
            walk_body(
                body,
                f"{local}/{attr}",
                f"inside the {attr} body of {node.op_type} node {local!r}",
            )
    for node, qual, where in nested:
        rec = _describe(node, unique(qual), opset, shapes, None)
        if rec is not None:
            found.append(
                NormNode(
                    layer=rec.layer,
                    op_type=rec.op_type,
                    domain=rec.domain,
                    output=rec.output,
                    inputs=rec.inputs,
                    where=where,
                    measurable=False,
                    why=f"{where}: listed, not scanned",
                )
            )
    notes = []
    if nested_norms := [r for r in found if r.where is not None]:
        notes.append(
            f"{len(nested_norms)} normalization node(s) inside If/Loop/Scan bodies: "
            "listed, not scanned"
        )
    batchnorms = sum(r.is_batchnorm and r.where is None for r in found)
    if not batchnorms:
        note = folded_note(model)
        if note:
            notes.append(note)
    else:
        folded, total = folded_convs(model)
        if folded and folded >= batchnorms:  # few BatchNormalization left beside them
            notes.append(
                f"{folded} of {total} convolutions look folded (no BatchNormalization after "
                "them): nothing to measure there"
            )
    return found, notes


def _with_state(rec: NormNode, consts: Constants) -> NormNode:
    """Attach the constant parameters; decide whether a scan can measure the node."""
    state = {}
    for role in ("scale", "bias", "mean", "var"):
        value = rec.inputs.get(role)
        if value:
            arr = consts.get(value)
            if arr is not None:
                state[role] = arr
    measurable = False
    why = rec.why
    if rec.is_batchnorm and rec.layer.family is NormFamily.BATCH and why is None:
        missing = [rec.inputs[r] for r in ("scale", "mean", "var") if r not in state]
        if missing:
            why = (
                f"running statistics or scale are not constants of the graph "
                f"({', '.join(repr(m) for m in missing)} are fed at run time): bind them with "
                "OnnxModel.bind_inputs() to scan this node"
            )
        else:
            measurable = True
    return NormNode(
        layer=rec.layer,
        op_type=rec.op_type,
        domain=rec.domain,
        output=rec.output,
        inputs=rec.inputs,
        where=None,
        measurable=measurable,
        why=why,
        state=state,
    )


_HINT = re.compile(r"(^|[^a-z])(bn|batch_?norm|norm)", re.IGNORECASE)
_CONVS = ("Conv", "ConvTranspose")
#: Ops a Conv+BatchNorm pair is followed by: a convolution with a bias straight into one of these
#: had its BatchNorm folded in (exporters fold at constant folding; fused training code too).
_ACTIVATIONS = {
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Clip",  # ReLU6
    "Sigmoid",  # and SiLU as x * Sigmoid(x)
    "HardSigmoid",
    "HardSwish",
    "Elu",
    "Selu",
    "Celu",
    "Gelu",
    "Mish",
    "Softplus",
    "Tanh",
    "ThresholdedRelu",
}


def folded_convs(model: ModelProto) -> tuple[int, int]:
    """(convolutions that look folded, all convolutions) of the main graph.

    One looks folded when it adds a constant bias and its output goes straight into an
    activation and into no BatchNormalization: where a Conv + BatchNorm pair used to be.  A
    convolution that never had a BatchNorm after it looks the same (a stem convolution of an
    older design): a count, not a proof.
    """
    g = model.graph
    constant = {t.name for t in g.initializer}
    constant |= {o for n in g.node if n.op_type == "Constant" for o in n.output if o}
    readers: dict[str, set[str]] = {}
    for node in g.node:
        for value in node.input:
            if value:
                readers.setdefault(value, set()).add(node.op_type)
    convs = [n for n in g.node if n.op_type in _CONVS and n.domain in DEFAULT_DOMAINS]
    folded = 0
    for node in convs:
        if len(node.input) < 3 or node.input[2] not in constant or not node.output:
            continue
        ops = readers.get(node.output[0], set())
        if "BatchNormalization" not in ops and ops & _ACTIVATIONS:
            folded += 1
    return folded, len(convs)


def is_folded_note(note: str) -> bool:
    """True for the notes of :func:`discover` that say BatchNorm was folded away."""
    return note.startswith("no BatchNormalization left") or "convolutions look folded" in note


def folded_note(model: ModelProto) -> str | None:
    """Say plainly that a graph without BatchNormalization has nothing to measure."""
    convs = [n for n in iter_nodes(model.graph) if n.op_type in ("Conv", "ConvTranspose")]
    if not convs:
        return None
    if any(p.key == "normdoctor.patches" for p in model.metadata_props):
        return "no BatchNormalization left: normdoctor rewrote them (see the model's metadata)"
    inits = {t.name for t in model.graph.initializer}
    evidence = [
        n.input[2]
        for n in convs
        if len(n.input) > 2
        and n.input[2] in inits
        and (n.input[2] == f"{n.input[1]}_bias" or _HINT.search(n.input[2]))
    ]
    evidence += [t for t in sorted(inits) if _HINT.search(t)][:3]
    folded, total = folded_convs(model)
    count = f"{folded} of {total} convolutions look folded; " if folded else ""
    if evidence:
        return (
            "no BatchNormalization left: folded at export, nothing to measure "
            f"({count}Conv bias {evidence[0]!r} carries the folded statistics; export with "
            "BatchNorm kept, e.g. without constant folding, to scan it)"
        )
    if folded:
        return (
            "no BatchNormalization left: folded at export, nothing to measure "
            f"({count}export with BatchNorm kept, e.g. without constant folding, to scan it)"
        )
    return "no BatchNormalization left: folded at export or never present, nothing to measure"

"""``export_onnx``: a converted (Q/DQ) module as an ONNX file with QuantizeLinear/DequantizeLinear.

::

    res = archnet_fx.transform(model, "npu_a", ex, batches)
    archnet_fx.export_onnx(res, "model.onnx")          # converts, exports, checks, verifies

Steps:

1. **convert** — a module that still holds fake quantizers (a :class:`TransformResult`'s module)
   goes through the ``convert`` pipeline (:func:`archnet_fx.pipelines.convert_passes`) for the target;
2. **prepare** a private copy for the legacy TorchScript exporter (``torch.onnx.export(...,
   dynamo=False)``; the dynamo exporter needs onnxscript): guard and assert nodes of
   ``torch.export`` graphs are removed (they check shapes in Python), ``aten.sym_size`` becomes
   ``Tensor.size`` and the ATen ops fed by it become their Tensor-method spellings, so the batch
   dimension is traced symbolically (otherwise the tracer bakes it in as a constant);
3. **export** — :class:`~archnet_fx.quant.qdq.Quantize`/``Dequantize`` map to ONNX
   ``QuantizeLinear``/``DequantizeLinear`` through ``torch.autograd.Function`` symbolics: uint8/
   int8 (uint16/int16 for 16-bit activations) by the zero point's type, per-channel with
   ``axis``. int4 weights are emitted as a private ``archnet.DequantizeLinear4`` op and rewritten
   afterwards into an ``INT4`` initializer + ``DequantizeLinear`` (opset ≥ 21). Inputs keep their
   names (``input_ids``, ``attention_mask`` for HF models), batched ones get a dynamic ``batch``
   dimension;
4. **check** — ``onnx.checker``; then legality: every node outside Q/DQ and the *host prologue*
   (nodes whose activation inputs are all integer/bool, e.g. one-hot of token ids and the
   attention-mask arithmetic; shape arithmetic) must have an op type whose archnet kind
   (:data:`archnet_fx.ir.opkinds.ONNX_KINDS`) the target supports, else :class:`~archnet_fx.errors.ExportError` names
   the node;
5. **verify** — integer-exact (:mod:`archnet_fx.export.verify`): onnxruntime (basic graph
   optimizations, so Q/DQ stay float emulations) runs the file with every QuantizeLinear's
   integers exposed; the torch module computes each Q node from onnxruntime's upstream integers
   and must agree except for one-step flips on a small share (float summation order at a
   rounding boundary); outputs computed from the same integers agree within ``atol``; then the
   file runs at batch 1, the example's and 8 (``ExportReport.batch_sizes``);
6. **runtime rewrites** (exact; the ops they make are the ones they replace, or a ``Mul``
   where the target has ``mul``): ``Transpose(DequantizeLinear(W))`` becomes
   ``DequantizeLinear(Wᵀ)`` (:func:`fold_weight_transposes`, so onnxruntime sees the
   ``DQ → MatMul`` pattern it fuses into integer kernels), 1 × 1 constant MatMuls become
   multiplies (:func:`narrow_matmuls_to_mul`) and one-element constants against (…, 1)
   tensors take shape (1, 1) (:func:`rank2_scalars`), both to avoid slow CPU paths; with
   ``onehot_gather=True`` one-hot × table products become row gathers after the legality check
   (:func:`onehot_to_gather`, a CPU-runtime form);
7. **write atomically** — everything happens on a temporary file next to ``path``, moved into
   place with ``os.replace`` only when every check passed; a failed export leaves no file.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch.utils import _pytree as pytree

from archnet_fx.ir.meta import CAPTURE_META_KEY, EXAMPLE_META_KEY
from archnet_fx.capture import normalize_inputs, with_seq_length
from archnet_fx.errors import ExportError, InputError, OptionError, PipelineError
from archnet_fx.ir.opkinds import node_kind, onnx_kind
from archnet_fx.infra.graphpass import copy_graph_module
from archnet_fx.infra.instruments import blocked_directory, process_umask
from archnet_fx.infra.progress import PROGRESS
from archnet_fx.targets import Target, load_target
from archnet_fx.quant.qdq import EXPORTING
from archnet_fx.export.verify import (MAX_FLIP_FRACTION, compare_exported, dump_golden,
                                      layer_sqnr, ort_session)

log = logging.getLogger(__name__)

__all__ = ["export_onnx", "ExportReport", "onnx_legality", "DEFAULT_OPSET", "check_output_path"]

DEFAULT_OPSET = 17          # int8/uint8 per-channel Q/DQ
INT4_OPSET = 21             # INT4 / INT16 Q/DQ

# --------------------------------------------------------------------------- preparation


_SHAPE_OPS = {torch.ops.aten.sym_size.int}


def _prepare(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy traceable by the legacy exporter with a symbolic batch dimension."""
    gm = copy_graph_module(gm)
    g = gm.graph
    for n in list(g.nodes):
        if n.users:
            continue
        kind = node_kind(n, gm)
        if kind == "assert" or (n.op == "call_function"
                                and getattr(n.target, "__name__", "") == "_guard_inputs"):
            g.erase_node(n)
    sizes: set[torch.fx.Node] = set()
    for n in list(g.nodes):
        if n.op == "call_function" and n.target in _SHAPE_OPS:
            with g.inserting_before(n):
                new = g.call_method("size", n.args)
            n.replace_all_uses_with(new)
            g.erase_node(n)
            sizes.add(new)
    # ATen overloads reject traced sizes (tensors under tracing): use their Python spellings.
    changed = True
    while changed:
        changed = False
        for n in list(g.nodes):
            if n.op != "call_function" or n in sizes:
                continue
            leaves = pytree.tree_leaves((n.args, n.kwargs))
            if not any(isinstance(a, torch.fx.Node) and a in sizes for a in leaves):
                continue
            if not isinstance(n.target, torch._ops.OpOverload):
                # size arithmetic (operator.mul of a batch size and a head count, ...): its
                # result is a traced size too, which the ATen ops fed by it must accept
                if not _is_tensor(n):
                    sizes.add(n)
                    changed = True
                continue
            name = n.target.overloadpacket.__name__
            if name == "slice":   # aten.slice(x, dim, start, end, step): no Tensor.slice
                n.target = _slice
            elif isinstance(n.args[0], torch.fx.Node) and n.args[0] not in sizes and \
                    hasattr(torch.Tensor, name):
                n.op, n.target = "call_method", name
            elif hasattr(torch, name):
                n.target = getattr(torch, name)
            else:
                continue
            if not _is_tensor(n):
                sizes.add(n)
            changed = True
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _slice(x: torch.Tensor, dim: int = 0, start: Any = None, end: Any = None,
           step: int = 1) -> torch.Tensor:
    """``aten.slice`` as Python indexing, which the tracer exports with traced bounds."""
    return x[(slice(None),) * (dim % x.dim()) + (slice(start, end, step),)]


def _is_tensor(n: torch.fx.Node) -> bool:
    v = n.meta.get("val", n.meta.get("tensor_meta"))
    return v is None or isinstance(v, torch.Tensor) or hasattr(v, "dtype")


class _Flat(torch.nn.Module):
    """Positional tensors in, a flat tuple of tensors out (what the exporter wants)."""

    def __init__(self, gm: torch.nn.Module, names: list[str], kwargs_call: bool) -> None:
        super().__init__()
        self.gm, self.names, self.kwargs_call = gm, names, kwargs_call

    def forward(self, *xs):
        out = self.gm(**dict(zip(self.names, xs))) if self.kwargs_call else self.gm(*xs)
        return tuple(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


# --------------------------------------------------------------------------- report


@dataclass
class ExportReport:
    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    op_counts: Counter = field(default_factory=Counter)
    prologue_nodes: list[str] = field(default_factory=list)
    rewrites: Counter = field(default_factory=Counter)   # runtime rewrites applied to the file
    convert_record: Any = None   # the PassRecord of the convert pass, when export converted
    max_abs_diff: float | None = None    # outputs, onnxruntime vs torch, each on its own
    checked: bool = False
    #: batch sizes the file was run at in onnxruntime (batch 1, the example's, 8); empty when
    #: the inputs have no batch dimension or the export has a fixed batch
    batch_sizes: list[int] = field(default_factory=list)
    #: True when the file has a symbolic batch and ran at those sizes (a graph that pins the
    #: batch raises instead); None when not checked or exported with a fixed batch
    dynamic_batch: bool | None = None
    exactness: Any = None    # ExactnessReport: every Q node's integers, ORT vs torch vs intref
    #: activation quantizer → SQNR (dB) of its quantized value against the float model (the
    #: same graph with quantization off), when the export converted a fake-quantized module
    layer_sqnr: dict[str, float] = field(default_factory=dict)
    #: sequence lengths the file ran at (a graph captured with max_seq_len): 2, half the
    #: maximum and the maximum, each integer-checked like the example (``seq_exactness``)
    seq_lengths: list[int] = field(default_factory=list)
    seq_exactness: dict[int, Any] = field(default_factory=dict)

    def sqnr_table(self) -> str:
        """Every activation quantizer's SQNR against the float model, lowest first."""
        from tabulate import tabulate
        rows = sorted(self.layer_sqnr.items(), key=lambda kv: kv[1])
        return tabulate([(k, f"{v:.1f}") for k, v in rows],
                        headers=["activation quantizer", "SQNR vs float (dB)"],
                        tablefmt="github")

    def __str__(self) -> str:
        qdq = self.op_counts.get("QuantizeLinear", 0), self.op_counts.get("DequantizeLinear", 0)
        n = sum(self.op_counts.values())
        s = (f"{self.path}: opset {self.opset}, inputs {self.input_names}, {n} nodes "
             f"({qdq[0]} QuantizeLinear, {qdq[1]} DequantizeLinear), "
             f"{len(self.prologue_nodes)} in the host prologue")
        if self.exactness is not None:
            s += f"; integers: {self.exactness.summary()}"
        if self.batch_sizes:
            s += f"; runs at batch {', '.join(map(str, self.batch_sizes))}"
        if self.seq_lengths:
            s += f" and sequence length {', '.join(map(str, self.seq_lengths))}"
        return s


# --------------------------------------------------------------------------- legality


def onnx_legality(model: Any, target: Target) -> tuple[list[tuple[str, str, str]], list[str]]:
    """``(illegal, prologue)``: ONNX nodes (name, op type, kind) the target cannot run, and the
    names of host-prologue nodes (activation inputs all integer/bool, or no activation input)."""
    import onnx

    g = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - types then come from what we can see
        inferred = g
    elem: dict[str, int] = {}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        elem[vi.name] = vi.type.tensor_type.elem_type
    const = {i.name for i in g.initializer}
    act = {i.name for i in g.input if i.name not in const}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16}
    illegal, prologue = [], []
    for node in g.node:
        ins = [i for i in node.input if i]
        dyn = [i for i in ins if i in act]
        if not dyn or node.op_type in ("Shape", "Size"):
            # constant subgraph (folded at load time), or shape arithmetic: what follows from a
            # shape (ConstantOfShape, Range) does not depend on input values
            const.update(node.output)
            continue
        act.update(node.output)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.domain == "archnet":
            continue
        if all(elem.get(i) not in floats and elem.get(i) is not None for i in dyn):
            prologue.append(node.name)   # integer/bool activations: host preprocessing
            continue
        kind = onnx_kind(node, const)
        if kind in ("identity",) or kind is None:
            continue
        if not target.supports(kind):
            illegal.append((node.name, node.op_type, kind))
    return illegal, prologue


# --------------------------------------------------------------------------- int4 rewrite


def _typed_rewrite(model: Any) -> int:
    """``archnet.QuantizeLinear``/``DequantizeLinear`` (int32 zero point, ``zp_type``) → the
    standard ops with zero points — and a dequantized weight initializer — of type ``zp_type``
    (INT4/UINT4/UINT16, opset 21)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consts = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    n_done = 0
    retyped: set[str] = set()
    for node in model.graph.node:
        if node.domain != "archnet":
            continue
        attrs = {a.name: a for a in node.attribute}
        to = attrs["zp_type"].i
        idxs = (0, 2) if node.op_type == "DequantizeLinear" and node.input[0] in inits else (2,)
        for idx in idxs:
            name = node.input[idx]
            if name in inits:
                arr = numpy_helper.to_array(inits[name])
                inits[name].CopyFrom(helper.make_tensor(name, to, arr.shape,
                                                        arr.astype("int64").flatten().tolist()))
            elif name in consts:
                t = consts[name].attribute[0].t
                arr = numpy_helper.to_array(t)
                t.CopyFrom(helper.make_tensor(t.name or "value", to, arr.shape,
                                              arr.astype("int64").flatten().tolist()))
            else:
                raise ExportError(f"{node.name}: input {name} is not a constant")
        keep = [a for a in node.attribute if a.name != "zp_type"]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.domain = ""
        if node.op_type == "QuantizeLinear":
            retyped.update(node.output)
        n_done += 1
    # The exporter typed these outputs float (the torch-side value); drop that annotation.
    vis = [v for v in model.graph.value_info if v.name not in retyped]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vis)
    keep_ops = [o for o in model.opset_import if o.domain != "archnet"]
    del model.opset_import[:]
    model.opset_import.extend(keep_ops)
    return n_done


# --------------------------------------------------------------------------- runtime rewrites


def _consumers(model: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _const_array(model: Any, name: str) -> Any:
    from onnx import numpy_helper

    for i in model.graph.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def _static_shape(name: str, prod: dict[str, Any], inits: dict[str, Any]) -> list[int] | None:
    """Shape of a constant operand: an initializer, seen through DequantizeLinear, Identity,
    Cast and Transpose (what runtimes fold); None for anything computed from inputs."""
    if name in inits:
        return list(inits[name].dims)
    node = prod.get(name)
    if node is None:
        return None
    if node.op_type in ("DequantizeLinear", "Identity", "Cast"):
        return _static_shape(node.input[0], prod, inits)
    if node.op_type == "Transpose":
        shape = _static_shape(node.input[0], prod, inits)
        if shape is None:
            return None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"),
                    list(reversed(range(len(shape)))))
        return [shape[p] for p in perm]
    return None


def narrow_matmuls_to_mul(model: Any) -> int:
    """``MatMul(A, B)`` with a constant ``B`` of shape ``(1, 1)`` → ``Mul(A, B)`` (exact: each
    output is the one product ``A[..., 0]·B[0, 0]``, the broadcast multiply is the same tensor).

    These are the ``Linear(1, 1)`` layers of one-knot hinge forms (a structural GELU is
    ``Linear(1, 1) → ReLU → Linear(1, 1)`` on an unsqueezed (…, 1) activation). A 1-wide linear
    and a scalar multiply are the same work on a chip; a CPU runtime runs the MatMul as a GEMM
    with K = N = 1 per element, tens of times slower than the multiply. (``Linear(1, K)`` with
    K > 1 is left alone.) Returns the number of MatMuls rewritten."""
    prod = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    n_done = 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and \
                _static_shape(node.input[1], prod, inits) == [1, 1] and \
                _static_shape(node.input[0], prod, inits) is None:
            node.op_type = "Mul"
            n_done += 1
    return n_done


def rank2_scalars(model: Any) -> int:
    """A one-element constant of rank 0 or 1 in ``Add``/``Sub``/``Mul``/``Div`` against a tensor
    of rank ≥ 2 whose last dimension is 1 → the same value shaped ``(1, 1)`` (the broadcast
    result is identical, bit for bit).

    onnxruntime's CPU broadcast has a slow path for ``X (…, 1) ⊕ b`` with ``b`` of shape ``(1,)``
    or ``()`` (≈30× the time of ``b`` shaped ``(1, 1)`` on a 6 M-element MiniLM activation),
    and the (…, 1) hinge outputs of the surrogates meet exactly that. Returns the number of
    operands reshaped."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inferred = onnx.shape_inference.infer_shapes(model).graph
    # rank, and whether the last dimension is statically 1
    shape = {vi.name: (len(vi.type.tensor_type.shape.dim),
                       vi.type.tensor_type.shape.dim[-1].dim_value == 1
                       if vi.type.tensor_type.shape.dim else False)
             for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
             if vi.type.tensor_type.HasField("shape")}
    made: dict[str, str] = {}
    n_done = 0
    for node in model.graph.node:
        if node.op_type not in ("Add", "Sub", "Mul", "Div") or len(node.input) != 2:
            continue
        for j, name in enumerate(node.input):
            rank, last1 = shape.get(node.input[1 - j], (0, False))
            if rank < 2 or not last1:
                continue
            value = _const_array(model, name)
            if value is None or value.size != 1 or value.ndim >= 2:
                continue
            if name not in made:
                made[name] = f"{name}__rank2"
                model.graph.initializer.append(numpy_helper.from_array(
                    np.asarray(value).reshape(1, 1), made[name]))
            node.input[j] = made[name]
            n_done += 1
    return n_done


def fold_weight_transposes(model: Any) -> int:
    """``Transpose(DequantizeLinear(W))`` of a 2-D integer initializer → ``DequantizeLinear(Wᵀ)``
    with the per-channel axis flipped (exact), so runtimes see ``DQ → MatMul`` — the pattern
    onnxruntime fuses into integer MatMul kernels."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    users = _consumers(model)
    dead, n_done = [], 0
    for t in model.graph.node:
        if t.op_type != "Transpose":
            continue
        perm = [a.ints for a in t.attribute if a.name == "perm"]
        d = prod.get(t.input[0])
        if not perm or list(perm[0]) != [1, 0] or d is None or d.op_type != "DequantizeLinear" \
                or d.input[0] not in inits or len(users.get(d.output[0], [])) != 1 \
                or len(users.get(d.input[0], [])) != 1:
            continue
        init = inits[d.input[0]]
        if len(init.dims) != 2:
            continue
        src = numpy_helper.to_array(init)
        arr = src.T.copy()
        if init.data_type in (TensorProto.INT4, TensorProto.UINT4):
            init.CopyFrom(helper.make_tensor(init.name, init.data_type, arr.shape,
                                             arr.astype("int64").flatten().tolist()))
        else:  # raw bytes (a list would be varint-encoded: ~5× larger for negative int8)
            init.CopyFrom(numpy_helper.from_array(arr.astype(src.dtype), init.name))
        for a in d.attribute:
            if a.name == "axis":
                a.i = 1 - (a.i % 2)
        for u in users.get(t.output[0], []):
            for k, i in enumerate(u.input):
                if i == t.output[0]:
                    u.input[k] = d.output[0]
        for o in model.graph.output:
            if o.name == t.output[0]:
                o.name = d.output[0]
        dead.append(t)
        n_done += 1
    for t in dead:
        model.graph.node.remove(t)
    return n_done


def constant_gathers(model: Any) -> int:
    """``Gather(x, i)`` with a constant single index → a slice of length 1 (then ``Squeeze`` for a
    scalar index): ``Shape(x, start=i, end=i+1)`` where ``x`` is a ``Shape`` (opset ≥ 15),
    otherwise ``Slice`` on the gathered axis. Reading one dimension or one position (a pooler's
    ``h[:, 0]``) is a slice on chip; exact."""
    import numpy as np
    from onnx import helper, numpy_helper

    def const(name: str, values: list[int]) -> Any:
        return helper.make_node("Constant", [], [name], name=name,
                                value=numpy_helper.from_array(np.array(values, np.int64)))

    prod = {o: n for n in model.graph.node for o in n.output}
    out, n_done = [], 0
    for node in list(model.graph.node):
        idx = _const_array(model, node.input[1]) if node.op_type == "Gather" else None
        if idx is None or idx.ndim > 1 or idx.size != 1:
            out.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        i = int(idx.reshape(-1)[0])
        end = i + 1 if i != -1 else 2 ** 62        # −1 slices to the end
        src = prod.get(node.input[0])
        sliced = node.output[0] + "_slice" if idx.ndim == 0 else node.output[0]
        if src is not None and src.op_type == "Shape" and axis == 0 and not src.attribute:
            out.append(helper.make_node("Shape", [src.input[0]], [sliced],
                                        name=node.output[0] + "_shape", start=i,
                                        **({} if i == -1 else {"end": end})))
        else:
            names = [f"{node.output[0]}_{k}" for k in ("starts", "ends", "axes")]
            out += [const(names[0], [i]), const(names[1], [end]), const(names[2], [axis])]
            out.append(helper.make_node("Slice", [node.input[0], *names], [sliced],
                                        name=node.output[0] + "_slice"))
        if idx.ndim == 0:
            axes = node.output[0] + "_squeeze_axes"
            out += [const(axes, [axis]),
                    helper.make_node("Squeeze", [sliced, axes], [node.output[0]],
                                     name=node.output[0] + "_squeeze")]
        n_done += 1
    if n_done:
        del model.graph.node[:]
        model.graph.node.extend(out)
        _prune(model)
    return n_done


def onehot_to_gather(model: Any) -> int:
    """``MatMul(DQ(Q(Cast(Equal(Unsqueeze(ids, −1), arange(V))[..., a:b]))), T)`` → rows of ``T``
    gathered by ``ids − a`` (zero outside ``[a, b)``): the one-hot product on the host as the
    table lookup it is. Exact (a one-hot row times a table is that row), but the result holds a
    ``Gather`` on a float table — a CPU-runtime form, not the chip's (whose graph keeps the
    integer matmul). Returns the number of products rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    import onnx

    prod = {o: n for n in model.graph.node for o in n.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inferred.value_info
                 if v.type.tensor_type.HasField("shape")}
    except Exception:  # noqa: BLE001 - then only axis −1 slices are recognised
        ranks = {}
    new_nodes: dict[int, list[Any]] = {}
    dead: list[Any] = []
    n_done = 0
    for mm in model.graph.node:
        if mm.op_type != "MatMul":
            continue
        chain = []
        cur = prod.get(mm.input[0])
        for op in ("DequantizeLinear", "QuantizeLinear"):
            if cur is None or cur.op_type != op:
                break
            s = _const_array(model, cur.input[1])
            z = _const_array(model, cur.input[2]) if len(cur.input) > 2 else 0
            if s is None or np.any(s != 1) or np.any(np.asarray(z) != 0):
                break
            chain.append(cur)
            cur = prod.get(cur.input[0])
        if len(chain) != 2 or cur is None:
            continue
        lo = 0
        if cur.op_type == "Slice":
            st, en = _const_array(model, cur.input[1]), _const_array(model, cur.input[2])
            ax = _const_array(model, cur.input[3]) if len(cur.input) > 3 else None
            rank = ranks.get(cur.input[0])
            ax = None if ax is None else int(np.asarray(ax).reshape(-1)[0])
            if st is None or en is None or st.size != 1 or ax is None or \
                    (ax != -1 and (rank is None or ax != rank - 1)):
                continue
            lo, hi = int(st.reshape(-1)[0]), int(en.reshape(-1)[0])
            cur = prod.get(cur.input[0])
        else:
            hi = None
        if cur is None or cur.op_type != "Cast":
            continue
        eq = prod.get(cur.input[0])
        if eq is None or eq.op_type != "Equal":
            continue
        vocab = _const_array(model, eq.input[1])
        uns = prod.get(eq.input[0])
        if vocab is None or uns is None or uns.op_type != "Unsqueeze" or \
                not np.array_equal(vocab.reshape(-1), np.arange(vocab.size)):
            continue
        hi = vocab.size if hi is None else min(hi, vocab.size)
        ids, name = uns.input[0], mm.output[0]
        p = f"{name}_gather"
        c_lo = numpy_helper.from_array(np.array(lo, dtype=np.int64), f"{p}_lo")
        c_hi = numpy_helper.from_array(np.array(hi - 1, dtype=np.int64), f"{p}_hi")
        model.graph.initializer.extend([c_lo, c_hi])
        nodes = [helper.make_node("Cast", [ids], [f"{p}_ids"], to=7, name=f"{p}/cast"),
                 helper.make_node("Sub", [f"{p}_ids", c_lo.name], [f"{p}_rel"], name=f"{p}/sub"),
                 helper.make_node("Clip", [f"{p}_rel", "", ""], [f"{p}_idx"], name=f"{p}/clip")]
        # clip to [0, hi - lo - 1]
        c0 = numpy_helper.from_array(np.array(0, dtype=np.int64), f"{p}_zero")
        cm = numpy_helper.from_array(np.array(hi - lo - 1, dtype=np.int64), f"{p}_max")
        model.graph.initializer.extend([c0, cm])
        nodes[-1].input[1], nodes[-1].input[2] = c0.name, cm.name
        full = lo == 0 and hi == vocab.size
        out = name if full else f"{p}_rows"
        nodes += _gather_rows(model, prod, mm.input[1], f"{p}_idx", out, p)
        if not full:
            nodes += [
                helper.make_node("GreaterOrEqual", [f"{p}_ids", c_lo.name], [f"{p}_ge"],
                                 name=f"{p}/ge"),
                helper.make_node("LessOrEqual", [f"{p}_ids", c_hi.name], [f"{p}_le"],
                                 name=f"{p}/le"),
                helper.make_node("And", [f"{p}_ge", f"{p}_le"], [f"{p}_in"], name=f"{p}/and"),
                helper.make_node("Cast", [f"{p}_in"], [f"{p}_inf"], to=1, name=f"{p}/castm"),
                helper.make_node("Unsqueeze", [f"{p}_inf", f"{p}_axes"], [f"{p}_m"],
                                 name=f"{p}/unsq"),
                helper.make_node("Mul", [f"{p}_rows", f"{p}_m"], [name], name=f"{p}/mask")]
            model.graph.initializer.append(
                numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{p}_axes"))
        new_nodes[id(mm)] = nodes
        dead.append(mm)
        n_done += 1
    if not n_done:
        return 0
    out_nodes = []
    for n in model.graph.node:
        out_nodes.extend(new_nodes.get(id(n), [n]))
    del model.graph.node[:]
    model.graph.node.extend(out_nodes)
    _prune(model)
    return n_done


def _gather_rows(model: Any, prod: dict[str, Any], table: str, idx: str, out: str,
                 p: str) -> list[Any]:
    """Nodes gathering rows ``idx`` of ``table`` into ``out``. A table that is
    ``DequantizeLinear(integer constant)`` per tensor or per column is gathered as integers and
    dequantized after (exact: row selection commutes with a per-column scale), so the runtime
    reads the selected rows instead of dequantizing the whole table on every run. Per column,
    the dequantization is written ``(float(q) − z)·s`` (Cast, Sub, Mul with the column
    vectors; the same values): onnxruntime's per-axis DequantizeLinear over a last axis is ~7×
    slower than the two broadcast passes (MiniLM's word rows, 32 × 128 × 384: 10.5 ms)."""
    import numpy as np
    from onnx import helper, numpy_helper

    dq = prod.get(table)
    inits = {i.name: i for i in model.graph.initializer}
    if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits \
            and len(inits[dq.input[0]].dims) == 2:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        scale = _const_array(model, dq.input[1])
        zp = _const_array(model, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        gather = helper.make_node("Gather", [dq.input[0], idx], [f"{p}_qrows"], axis=0,
                                  name=f"{p}/gather")
        if scale is not None and scale.size == 1:
            return [gather, helper.make_node("DequantizeLinear", [f"{p}_qrows", *dq.input[1:]],
                                             [out], name=f"{p}/dequantize")]
        if scale is not None and axis in (1, -1) and scale.ndim == 1:
            s = numpy_helper.from_array(scale.astype(np.float32), f"{p}_scale")
            model.graph.initializer.append(s)
            nodes = [gather, helper.make_node("Cast", [f"{p}_qrows"], [f"{p}_frows"], to=1,
                                              name=f"{p}/cast_rows")]
            rows = f"{p}_frows"
            if zp is not None and np.any(zp != 0):
                z = numpy_helper.from_array(zp.astype(np.float32), f"{p}_zero_point")
                model.graph.initializer.append(z)
                nodes.append(helper.make_node("Sub", [rows, z.name], [f"{p}_crows"],
                                              name=f"{p}/sub_zero_point"))
                rows = f"{p}_crows"
            nodes.append(helper.make_node("Mul", [rows, s.name], [out], name=f"{p}/dequantize"))
            return nodes
    return [helper.make_node("Gather", [table, idx], [out], axis=0, name=f"{p}/gather")]


def _prune(model: Any) -> None:
    """Drop nodes and initializers nothing reads any more."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for n in reversed(list(model.graph.node)):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del model.graph.node[:]
    model.graph.node.extend(keep)
    inits = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)


# --------------------------------------------------------------------------- export


def _resolve(result_or_module: Any, target: Any) -> tuple[torch.nn.Module, Target | None]:
    from archnet_fx.transform import TransformResult

    if isinstance(result_or_module, TransformResult):
        module = result_or_module.module
        target = target if target is not None else result_or_module.report.target
    else:
        module = result_or_module
    tgt = load_target(target) if target is not None else None
    return module, tgt


def export_onnx(result_or_module: Any, path: str | os.PathLike, *, example_inputs: Any = None,
                target: str | Target | None = None, opset: int | None = None, check: bool = True,
                atol: float = 1e-4, onehot_gather: bool = False, dynamic_batch: bool = True,
                max_flip_fraction: float = MAX_FLIP_FRACTION,
                golden: str | os.PathLike | None = None, dynamic_seq: bool = True
                ) -> ExportReport:
    """Export a transform result (or a converted / fake-quantized / float GraphModule) to ONNX.

    See the module docstring. The check is integer-exact
    (:func:`archnet_fx.export.verify.compare_exported`): every Quantize node's integers in
    onnxruntime equal torch's, fed the same upstream integers, except at most
    ``max_flip_fraction`` of all elements, each within one step (float summation order at a
    rounding boundary); and each output, computed from onnxruntime's integers, is within
    ``atol·max|y|`` of onnxruntime's. ``report.exactness`` holds the figures per Q node, the
    integer reference's agreement and the propagated (end-to-end) differences.
    ``dynamic_batch=True`` (default) exports a symbolic batch dimension and runs the file at
    batch 1, the example's and 8; a graph that pins the batch raises ``ExportError`` naming the
    node (then export with ``dynamic_batch=False`` for the example's batch).
    A module captured with a dynamic sequence (``max_seq_len``) gets a ``seq`` axis and is
    checked at lengths 2, max/2 and max; ``dynamic_seq=False`` exports the example's length.
    ``check=False`` skips the checker, legality and onnxruntime verification (the file is still
    written atomically). ``golden=`` writes every Q/DQ tensor of the example run to that
    ``.npz`` (:func:`~archnet_fx.export.verify.dump_golden`).
    ``onehot_gather=True`` rewrites exact one-hot × table products into row gathers *after* the
    legality check (:func:`onehot_to_gather`): a CPU-runtime form whose embedding costs a lookup
    instead of a (tokens × vocabulary × width) matmul; the chip's file keeps the matmul.
    Raises :class:`~archnet_fx.errors.ExportError`; then no file exists at ``path``.
    """
    import onnx

    from archnet_fx.quant.qdq import Dequantize
    from archnet_fx import pipelines
    from archnet_fx.infra.manager import PassManager
    from archnet_fx.quant.fakequant import quantizers

    t_export = time.perf_counter()
    _check_options(opset=opset, check=check, atol=atol, onehot_gather=onehot_gather,
                   dynamic_batch=dynamic_batch, max_flip_fraction=max_flip_fraction,
                   dynamic_seq=dynamic_seq)
    path = check_output_path(path)
    if golden is not None:
        golden = check_output_path(golden)

    def fixed_length_export() -> ExportReport:
        """The same export at the example's sequence length (the fallback of max_seq_len=
        "auto" when the dynamic one fails)."""
        return export_onnx(result_or_module, path, example_inputs=example_inputs,
                           target=target, opset=opset, check=check, atol=atol,
                           onehot_gather=onehot_gather, dynamic_batch=dynamic_batch,
                           max_flip_fraction=max_flip_fraction, golden=golden,
                           dynamic_seq=False)
    module, tgt = _resolve(result_or_module, target)
    convert_record = None
    fq_module = None
    if not isinstance(module, torch.fx.GraphModule):
        raise ExportError(f"export_onnx takes a TransformResult or a torch.fx.GraphModule, got "
                          f"{type(module).__name__}")
    if any(q.enabled and bool(q.initialized) for q in quantizers(module)):
        if tgt is None:
            raise ExportError("the module holds fake quantizers: pass target= so they can be "
                              "converted to integer Q/DQ")
        try:
            conv_res = PassManager("convert", pipelines.convert_passes(tgt)).run(module)
        except PipelineError as e:
            raise ExportError(f"converting fake quantizers to integer Q/DQ failed: "
                              f"{e.__cause__ or e}") from e
        fq_module = module
        module, convert_record = conv_res.module, conv_res.records[0]
    if example_inputs is None:
        stored = module.meta.get(EXAMPLE_META_KEY)  # (args, kwargs) from capture
        if stored is None:
            raise InputError("export_onnx needs example_inputs (the module carries none)")
        args, kwargs = tuple(stored[0]), dict(stored[1])
    else:
        args, kwargs = normalize_inputs(example_inputs)
    info = module.meta.get(CAPTURE_META_KEY)
    phs = [n.target for n in module.graph.nodes if n.op == "placeholder"]
    seq_inputs: set[str] = set()
    if info is not None:
        names = list(info.input_names)
        kwargs_call = bool(info.kwargs_call)
        batched = {s.name for s in info.specs if s.batched}
        if getattr(info, "max_seq_len", None) and dynamic_seq and \
                (check or not getattr(info, "seq_auto", False)):
            # (an automatic seq axis is only written when it is checked)
            seq_inputs = {s.name for s in info.specs if s.seq}
    else:
        names, kwargs_call = [str(p) for p in phs], bool(kwargs) and not args
        batched = set(names)
    values = list(args) + [kwargs[k] for k in names[len(args):] if k in kwargs]
    if kwargs_call:
        values = [kwargs[k] if k in kwargs else args[i] for i, k in enumerate(names)]
    if len(values) != len(names):
        raise InputError(f"export_onnx: example inputs give {len(values)} tensors for inputs "
                         f"{names}")
    if info is not None:
        for spec in info.specs:
            v = dict(zip(names, values)).get(spec.name)
            if isinstance(v, torch.Tensor) and v.dtype != spec.dtype:
                raise InputError(f"export_onnx: input '{spec.name}' has dtype {v.dtype} but the "
                                 f"model was captured with {spec.dtype}; convert it with "
                                 f".to({spec.dtype})")
            fixed_from = (2 if spec.seq and info.max_seq_len else 1) if spec.batched else 0
            if isinstance(v, torch.Tensor) and (
                    v.dim() != len(spec.shape)
                    or tuple(v.shape[fixed_from:]) != tuple(spec.shape[fixed_from:])):
                raise InputError(f"export_onnx: input '{spec.name}' has shape "
                                 f"{tuple(v.shape)} but the model was captured with "
                                 f"{tuple(spec.shape)} (only the batch"
                                 + (" and sequence dimensions vary)" if fixed_from == 2
                                    else " dimension varies)"))
    needs21 = any(isinstance(m, Dequantize) and m.bits <= 4 or
                  (getattr(m, "archnet_qdq", "") and m.bits > 8) for m in module.modules())
    opset = opset or (INT4_OPSET if needs21 else DEFAULT_OPSET)
    if needs21 and opset < INT4_OPSET:
        raise ExportError(f"int4 weights / 16-bit activations need opset ≥ {INT4_OPSET}, "
                          f"got {opset}")
    prepared = _prepare(module)
    flat = _Flat(prepared, names, kwargs_call).eval()
    with torch.no_grad():
        ref = flat(*values)
    out_names = [f"output_{i}" for i in range(len(ref))] if len(ref) > 1 else ["output"]
    dyn = {n: {0: "batch"} for n in names if n in batched} if dynamic_batch else {}
    ex_batch = next((int(v.shape[0]) for n, v in zip(names, values) if n in batched), None)
    # outputs whose first dimension is the example's batch follow it; others (reductions over
    # the batch, constants, (seq, batch, …) layouts) keep their shape
    batched_out = [o for o, r in zip(out_names, ref) if r.dim() and r.shape[0] == ex_batch]
    if dyn:
        dyn.update({o: {0: "batch"} for o in batched_out})
    ex_seq = next((int(v.shape[1]) for n, v in zip(names, values) if n in seq_inputs), None)
    seq_out: list[str] = []
    probe = (2 if ex_seq != 2 else 3) if ex_seq else None
    if probe is not None and probe <= info.max_seq_len:
        # the outputs whose dimension 1 follows the sequence: run at another length
        short = [with_seq_length(v, probe) if n in seq_inputs else v
                 for n, v in zip(names, values)]
        try:
            with torch.no_grad():
                ref2 = flat(*short)
        except Exception as e:  # noqa: BLE001 - re-raised typed, or the fixed export
            if getattr(info, "seq_auto", False):
                log.warning("the module does not run at sequence length %d (%s); exporting "
                            "the example's length", probe, _first_paragraph(str(e), 200))
                return fixed_length_export()
            raise ExportError(f"the module does not run at sequence length {probe} (captured "
                              f"with max_seq_len={info.max_seq_len}): {type(e).__name__}: "
                              f"{_first_paragraph(str(e), 300)}; capture without max_seq_len "
                              f"for a fixed-length export") from e
        seq_out = [o for o, r, r2 in zip(out_names, ref, ref2) if r.dim() >= 2
                   and r.shape[1] == ex_seq and r2.shape[1] == probe]
    for n in seq_inputs:
        dyn.setdefault(n, {})[1] = "seq"
    for o in seq_out:
        dyn.setdefault(o, {})[1] = "seq"

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    report = ExportReport(path, opset, names, out_names, convert_record=convert_record)
    retry_fixed = ""
    try:
        try:
            with torch.no_grad():
                # The TorchScript exporter knows opsets ≤ 20; int4/int16 Q/DQ (opset 21) are
                # emitted through archnet.* ops and the opset raised afterwards.
                torch.onnx.export(flat, tuple(values), tmp, input_names=names,
                                  output_names=out_names, dynamic_axes=dyn,
                                  opset_version=min(opset, 20),
                                  dynamo=False, do_constant_folding=True,
                                  custom_opsets={"archnet": 1} if needs21 else None)
        except Exception as e:  # noqa: BLE001 - re-raised typed
            log.debug("torch.onnx.export failed", exc_info=True)
            raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: "
                              f"{_first_paragraph(str(e))} (the exporter's full message and "
                              f"graph are logged at DEBUG level: archnet-fx -v, or "
                              f"logging.getLogger('archnet_fx.export').setLevel('DEBUG'))") from e
        model = onnx.load(tmp)
        retyped = _typed_rewrite(model)
        if opset > 20:
            for o in model.opset_import:
                if o.domain in ("", "ai.onnx"):
                    o.version = opset
        report.rewrites["fold_weight_transposes"] = fold_weight_transposes(model)
        report.rewrites["constant_gathers"] = constant_gathers(model) if opset >= 15 else 0
        report.rewrites["narrow_matmuls_to_mul"] = narrow_matmuls_to_mul(model) \
            if tgt is None or tgt.supports("mul") else 0
        report.rewrites["rank2_scalars"] = rank2_scalars(model)
        if retyped or opset > 20 or any(report.rewrites.values()):
            onnx.save(model, tmp)
        if onehot_gather and not check:
            report.rewrites["onehot_to_gather"] = onehot_to_gather(model)
            onnx.save(model, tmp)
        report.op_counts = Counter(n.op_type for n in model.graph.node)
        if check:
            try:
                onnx.checker.check_model(model)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"onnx.checker rejected the model: {e}") from e
            if tgt is not None:
                illegal, report.prologue_nodes = onnx_legality(model, tgt)
                if illegal:
                    desc = ", ".join(f"{n} ({op} → kind '{k}')" for n, op, k in illegal[:8])
                    raise ExportError(f"{len(illegal)} ONNX node(s) use ops {tgt.name} cannot "
                                      f"run: {desc}; legalize the model for {tgt.name} first")
            if onehot_gather:
                report.rewrites["onehot_to_gather"] = onehot_to_gather(model)
                report.op_counts = Counter(n.op_type for n in model.graph.node)
                onnx.save(model, tmp)
            _tidy(model)
            onnx.save(model, tmp)
            report.exactness = _verify(tmp, prepared, names, values, atol, max_flip_fraction,
                                       tgt.quant.accumulator_bits if tgt is not None else 32)
            report.max_abs_diff = report.exactness.output_max_abs_diff
            report.checked = True
            if dynamic_batch and batched:
                report.batch_sizes = _check_batches(
                    tmp, names, values, batched, out_names, set(batched_out), prepared,
                    max_flip_fraction, tgt.quant.accumulator_bits if tgt is not None else 32,
                    atol)
                report.dynamic_batch = True
            if seq_inputs:
                try:
                    report.seq_lengths, report.seq_exactness = _check_lengths(
                        tmp, prepared, names, values, seq_inputs, info.max_seq_len,
                        max_flip_fraction,
                        tgt.quant.accumulator_bits if tgt is not None else 32, atol,
                        report.exactness)
                except ExportError as e:
                    if not getattr(info, "seq_auto", False):
                        raise
                    retry_fixed = str(e)
        else:
            _tidy(model)
            onnx.save(model, tmp)
        if retry_fixed:
            raise _RetryFixed(retry_fixed)
        if check and fq_module is not None:   # a diagnostic: never fails the export
            try:
                report.layer_sqnr = layer_sqnr(fq_module, *_module_inputs(
                    fq_module, names, values, kwargs_call))
            except Exception as e:  # noqa: BLE001
                log.warning("per-layer SQNR not computed: %s: %s", type(e).__name__,
                            _first_paragraph(str(e), 200))
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600; a normal file's mode
        os.replace(tmp, path)
        EXPORTING.clear()
        if golden is not None:
            dump_golden(prepared, dict(zip(names, values)) if kwargs_call else tuple(values),
                        golden)
    except BaseException as e:
        EXPORTING.clear()
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, _RetryFixed) or (isinstance(e, ExportError) and seq_inputs
                                           and getattr(info, "seq_auto", False)):
            # capture chose the dynamic sequence ("auto"); the file does not take other
            # lengths, so export the example's
            log.warning("exporting the example's sequence length: %s", e)
            return fixed_length_export()
        raise
    log.info("exported %s", report)
    PROGRESS.info("export: %s, %s (%.1f s)", report.path.name, "checked in onnxruntime"
                  + (f" at batch {', '.join(map(str, report.batch_sizes))}"
                     if report.batch_sizes else "") if report.checked else "not checked",
                  time.perf_counter() - t_export)
    return report


class _RetryFixed(Exception):
    """Internal: redo the export with the example's sequence length."""


def _module_inputs(module: Any, names: list[str], values: list[Any], kwargs_call: bool
                   ) -> tuple[tuple, dict]:
    """(args, kwargs) to call ``module`` the way it was captured."""
    return ((), dict(zip(names, values))) if kwargs_call else (tuple(values), {})


def _check_options(*, opset: Any, atol: Any, max_flip_fraction: Any, **flags: Any) -> None:
    """export_onnx's options, before any work (:class:`OptionError` naming the option)."""
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or not 13 <= opset <= INT4_OPSET):
        raise OptionError(f"opset must be an integer from 13 to {INT4_OPSET} or None, got "
                          f"{opset!r}")
    for name, v, hi in (("atol", atol, None), ("max_flip_fraction", max_flip_fraction, 1.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or \
                (hi is not None and v > hi) or v != v or v == float("inf"):
            raise OptionError(f"{name} must be a finite number >= 0"
                              + (f" and <= {hi}" if hi is not None else "") + f", got {v!r}")
    for name, v in flags.items():
        if not isinstance(v, bool):
            raise OptionError(f"{name} must be True or False, got {v!r}")


def check_output_path(path: Any) -> Path:
    """The output path, checked before any work: a file name in a directory we can write."""
    if not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"path must be a file name such as 'model.onnx', got "
                          f"{type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{str(path)!r} is a directory; pass a file name such as "
                          f"{str(path / 'model.onnx')!r}")
    blocked = blocked_directory(path.parent)
    if blocked and blocked[1] == "file":
        raise ExportError(f"cannot write {str(path)!r}: {str(blocked[0])!r} is a file, not a "
                          f"directory")
    if blocked:
        raise ExportError(f"cannot write {str(path)!r}: directory {str(blocked[0])!r} is not "
                          f"writable; pass a path in a directory you can write to")
    return path


def _first_paragraph(text: str, limit: int = 600) -> str:
    """The cause of an exporter error without the graph dump that follows it."""
    para = text.strip().split("\n\n", 1)[0]
    lines = [ln for ln in para.splitlines() if not ln.lstrip().startswith(("%", "graph("))]
    para = " ".join(ln.strip() for ln in lines[:6])
    return para if len(para) <= limit else para[:limit] + " …"


def _tidy(model: Any) -> None:
    """Drop initializers nothing reads (the runtime would warn about each on load) and the
    exporter's intermediate shape annotations, which the rewrites can leave stale (the runtime
    infers them again)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    del model.graph.value_info[:]


_ORT_NODE = __import__("re").compile(r"running (\w+) node\. Name:'([^']*)'")


def _check_batches(path: str, names: list[str], values: list[torch.Tensor], batched: set[str],
                   out_names: list[str], batched_out: set[str],
                   gm: torch.fx.GraphModule | None = None, max_flip_fraction: float = 0.01,
                   accumulator_bits: int = 32, atol: float = 1e-4) -> list[int]:
    """Run the file at batch 1, the example's and 8 (rows of the example, repeated); raise
    :class:`ExportError` naming the node that pins the batch. At batch 1 (cheap) the integers
    are checked against the torch module ``gm`` too, like the example's."""
    import numpy as np

    ref_batch = next(int(v.shape[0]) for n, v in zip(names, values) if n in batched)
    sess = ort_session(path, level="basic")
    sizes = sorted({1, ref_batch, 8})
    for b in sizes:
        rows = torch.arange(b) % ref_batch
        feed = {n: (v[rows] if n in batched else v).detach().cpu().numpy()
                for n, v in zip(names, values)}
        try:
            outs = sess.run(None, feed)
        except Exception as e:  # noqa: BLE001 - re-raised typed
            where, cause = _ort_failure(e, "a node")
            raise ExportError(
                f"the exported graph pins the batch size: onnxruntime fails at batch {b} in "
                f"{where} ({cause}); the "
                f"example's batch is {ref_batch}. A reshape or expand of the captured graph "
                f"holds the batch as a constant; export with dynamic_batch=False for a fixed "
                f"batch of {ref_batch}") from e
        for o, name in zip(outs, out_names):
            if name in batched_out and np.shape(o)[0] != b:
                raise ExportError(f"the exported graph pins the batch size: output {name} has "
                                  f"batch {np.shape(o)[0]} for input batch {b}; export with "
                                  f"dynamic_batch=False for a fixed batch of {ref_batch}")
            if np.issubdtype(np.asarray(o).dtype, np.floating) and not np.isfinite(o).all():
                raise ExportError(f"output {name} is not finite at batch {b}")
        if b == 1 and b != ref_batch and gm is not None:
            one = [v[rows] if n in batched else v for n, v in zip(names, values)]
            _verify(path, gm, names, one, atol, max_flip_fraction, accumulator_bits,
                    at=" at batch 1")
    return sizes


def _check_lengths(path: str, gm: torch.fx.GraphModule, names: list[str],
                   values: list[torch.Tensor], seq_inputs: set[str], max_seq_len: int,
                   max_flip_fraction: float,
                   accumulator_bits: int, atol: float, example_report: Any = None
                   ) -> tuple[list[int], dict[int, Any]]:
    """Run the file at sequence lengths 2, max/2 and max (the example's rows cut or tiled along
    the sequence) and check each integer by integer against the torch module at that length;
    :class:`ExportError` naming the node where the graph fixes the length."""
    lengths = sorted({2, max(2, max_seq_len // 2), max_seq_len})
    ex_len = next(int(v.shape[1]) for k, v in zip(names, values) if k in seq_inputs)
    reports = {}
    for n_len in lengths:
        if n_len == ex_len and example_report is not None:
            reports[n_len] = example_report      # checked already: the example itself
            continue
        vals = [with_seq_length(v, n_len) if k in seq_inputs else v
                for k, v in zip(names, values)]

        def fixed_length(e: Exception, n_len: int = n_len) -> ExportError:
            where, cause = _ort_failure(e, type(e).__name__)
            return ExportError(
                f"the exported graph does not run at sequence length {n_len} (captured with "
                f"max_seq_len={max_seq_len}): {where}: {cause}. A node of the legalized graph "
                f"fixes the length; capture without max_seq_len for a fixed-length export")
        reports[n_len] = _verify(path, gm, names, vals, atol, max_flip_fraction,
                                 accumulator_bits, at=f" at sequence length {n_len}",
                                 run_error=fixed_length)
    return lengths, reports


def _ort_failure(e: Exception, default: str) -> tuple[str, str]:
    """(the onnxruntime node an error names, or ``default``; its cause in one paragraph)."""
    msg = str(e)
    m = _ORT_NODE.search(msg)
    where = f"{m.group(1)} node '{m.group(2)}'" if m else default
    return where, _first_paragraph(msg.split("Status Message:")[-1], 300)


def _verify(path: str, gm: torch.fx.GraphModule, names: list[str], values: list[torch.Tensor],
            atol: float, max_flip_fraction: float, accumulator_bits: int, *, at: str = "",
            run_error: Any = None) -> Any:
    """Integer-exact check of the file against the module it was exported from (see
    :mod:`archnet_fx.export.verify`) on ``values`` (the example; ``at`` says which other batch
    or length they are); :class:`ExportError` when it fails — ``run_error(e)`` when the
    comparison itself raises ``e``."""
    if not at:
        try:
            ort_session(path, level="basic")
        except Exception as e:  # noqa: BLE001 - re-raised typed
            raise ExportError(f"onnxruntime could not load the exported model: "
                              f"{_first_paragraph(str(e), 400)}") from e
    try:
        rep = compare_exported(path, gm, names, values, accumulator_bits=accumulator_bits,
                               max_flip_fraction=max_flip_fraction)
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised typed
        if run_error is not None:
            raise run_error(e) from e
        raise ExportError(f"the integer comparison{at} of the exported model with the torch "
                          f"module failed: {type(e).__name__}: "
                          f"{_first_paragraph(str(e), 400)}") from e
    if rep.unmapped and not rep.q_nodes:
        raise ExportError(f"none of the module's {len(rep.unmapped)} Quantize nodes could be "
                          f"found in the exported file, so its integers cannot be checked; "
                          f"export with check=False to skip the check")
    if rep.unmapped:
        log.info("%d Quantize node(s) have no counterpart in the file (shared quantizers): %s",
                 len(rep.unmapped), ", ".join(rep.unmapped[:5]))
    if not rep.ok:
        worst = sorted(rep.per_node, key=lambda r: (-r[3], -r[2]))[:3]
        raise ExportError(
            f"onnxruntime's integers{at} differ from torch's beyond float-order rounding: "
            f"{rep.torch_local.differ} of {rep.torch_local.elements} "
            f"({rep.torch_local.fraction:.2e} > {max_flip_fraction:g} allowed) by up to "
            f"{rep.torch_local.max_steps} step(s), worst at "
            + ", ".join(f"{n} ({d} differ, max {m})" for n, _, d, m in worst)
            + "; a wrong scale, zero point or layout in the export (allowed: one-step flips on "
            f"at most {max_flip_fraction:g} of all integers and 5 % of any node's)")
    if rep.output_rel_diff > atol:
        raise ExportError(f"onnxruntime's outputs{at} differ from torch's, given the same "
                          f"integers, by {rep.output_rel_diff:.3g}·max|y| > atol {atol:g}")
    log.info("export check%s: %s", at, rep.summary())
    return rep

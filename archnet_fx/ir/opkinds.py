"""Canonical op kinds: one vocabulary for every way a graph can spell an operation.

A torch.fx graph can say "layer norm" as a call to an ``nn.LayerNorm`` submodule, as
``F.layer_norm``/``torch.layer_norm``, as a Tensor method, or (after ``torch.export``) as
``aten.layer_norm.default``. Passes, legality and the cost model never look at those spellings:
they ask :func:`node_kind` and get ``"layer_norm"``.

Rules:

* Module calls map by ``isinstance`` against :data:`MODULE_KINDS` (first match wins, so
  subclasses of e.g. ``nn.Linear`` are linear).
* Functions, Tensor methods and ATen overloads map by their base name through
  :data:`NAME_KINDS` (``aten.add.Tensor`` → ``add`` → ``add``; ``_softmax`` → ``softmax``).
* Arithmetic on Python numbers / SymInts (shape computations) is the meta kind ``shape``.
* Anything else is ``unknown:<name>``; no target ever supports an unknown kind.

Meta kinds (:data:`META_KINDS`) are bookkeeping (placeholders, outputs, attribute reads, tuple
indexing, shape queries, guards): legality and cost ignore them.

>>> import torch
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()))
>>> [node_kind(n, gm) for n in gm.graph.nodes]
['placeholder', 'linear', 'gelu', 'output']
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.fx
from torch import nn
from archnet_fx.ir.meta import KIND_META_KEY

META_KINDS = frozenset({"placeholder", "output", "get_attr", "getitem", "shape", "assert"})

from archnet_fx.ir.kinds import KNOWN_KINDS  # noqa: E402  (torch-free: targets load it)

# Module type -> kind. Order matters only for subclass relations (checked in order).
MODULE_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Linear, "linear"),
    (nn.Bilinear, "unknown:bilinear"),
    (nn.modules.conv._ConvTransposeNd, "conv_transpose"),
    (nn.modules.conv._ConvNd, "conv"),
    (nn.modules.batchnorm._BatchNorm, "batch_norm"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GroupNorm, "group_norm"),
    (nn.modules.instancenorm._InstanceNorm, "instance_norm"),
    (nn.RMSNorm, "rms_norm"),
    (nn.Embedding, "embedding"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu6"),
    (nn.Hardtanh, "clamp"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.PReLU, "prelu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Tanh, "tanh"),
    (nn.Hardswish, "hardswish"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.ELU, "elu"),
    (nn.Softplus, "softplus"),
    (nn.Softmax, "softmax"),
    (nn.LogSoftmax, "log_softmax"),
    (nn.modules.dropout._DropoutNd, "dropout"),
    (nn.Identity, "identity"),
    (nn.modules.pooling._MaxPoolNd, "max_pool"),
    (nn.modules.pooling._AvgPoolNd, "avg_pool"),
    (nn.modules.pooling._AdaptiveAvgPoolNd, "adaptive_avg_pool"),
    (nn.modules.pooling._AdaptiveMaxPoolNd, "adaptive_max_pool"),
    (nn.Flatten, "reshape"),
    (nn.Unflatten, "reshape"),
    (nn.Upsample, "upsample"),
    (nn.modules.padding._ConstantPadNd, "pad"),
    (nn.modules.padding._ReflectionPadNd, "pad"),
    (nn.modules.padding._ReplicationPadNd, "pad"),
    (nn.ZeroPad2d, "pad"),
    (nn.MultiheadAttention, "multihead_attention"),
)

# Base name of a function / method / ATen packet -> kind.
NAME_KINDS: dict[str, str] = {}


def _names(kind: str, *names: str) -> None:
    for n in names:
        NAME_KINDS[n] = kind


_names("linear", "linear", "addmm")
_names("conv", "conv1d", "conv2d", "conv3d", "convolution", "_convolution")
_names("conv_transpose", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
_names("matmul", "matmul", "bmm", "mm", "baddbmm", "__matmul__")
_names("einsum", "einsum")
_names("batch_norm", "batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
       "_native_batch_norm_legit", "cudnn_batch_norm")
_names("layer_norm", "layer_norm", "native_layer_norm")
_names("group_norm", "group_norm", "native_group_norm")
_names("instance_norm", "instance_norm")
_names("rms_norm", "rms_norm", "_fused_rms_norm")
_names("embedding", "embedding")
_names("gather", "gather", "index_select", "index", "take_along_dim", "take")
_names("one_hot", "one_hot")
_names("relu", "relu", "relu_")
_names("relu6", "relu6")
_names("clamp", "clamp", "clamp_", "clip", "hardtanh", "hardtanh_", "clamp_min", "clamp_max")
_names("leaky_relu", "leaky_relu", "leaky_relu_")
_names("prelu", "prelu", "_prelu_kernel")
_names("gelu", "gelu")
_names("silu", "silu", "silu_")
_names("mish", "mish")
_names("sigmoid", "sigmoid", "sigmoid_")
_names("tanh", "tanh", "tanh_")
_names("hardswish", "hardswish", "hardswish_")
_names("hardsigmoid", "hardsigmoid", "hardsigmoid_")
_names("elu", "elu", "elu_", "selu", "celu")
_names("softplus", "softplus")
_names("erf", "erf", "erf_")
_names("softmax", "softmax", "_softmax", "_safe_softmax")
_names("log_softmax", "log_softmax", "_log_softmax")
_names("sdpa", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
       "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
_names("multihead_attention", "multi_head_attention_forward")
_names("add", "add", "add_", "iadd", "__add__", "__radd__", "__iadd__")
_names("sub", "sub", "sub_", "rsub", "isub", "__sub__", "__rsub__", "subtract")
_names("mul", "mul", "mul_", "imul", "__mul__", "__rmul__", "multiply")
_names("div", "div", "div_", "truediv", "itruediv", "__truediv__", "__rtruediv__", "true_divide",
       "divide")
_names("neg", "neg", "neg_", "__neg__", "negative")
_names("pow", "pow", "pow_", "__pow__", "__rpow__", "square", "float_power")
_names("exp", "exp", "exp_", "exp2")
_names("log", "log", "log_", "log2", "log10", "log1p")
_names("sqrt", "sqrt", "sqrt_")
_names("rsqrt", "rsqrt", "rsqrt_")
_names("reciprocal", "reciprocal", "reciprocal_")
_names("abs", "abs", "abs_", "__abs__")
_names("maximum", "maximum", "fmax")
_names("minimum", "minimum", "fmin")
_names("where", "where")
_names("masked_fill", "masked_fill", "masked_fill_")
_names("mean", "mean")
_names("sum", "sum")
_names("var", "var", "var_mean")
_names("std", "std", "std_mean")
_names("reduce_max", "amax", "max")
_names("reduce_min", "amin", "min")
_names("cumsum", "cumsum")
_names("max_pool", "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
       "max_pool1d_with_indices", "max_pool3d_with_indices")
_names("avg_pool", "avg_pool1d", "avg_pool2d", "avg_pool3d")
_names("adaptive_avg_pool", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
       "_adaptive_avg_pool2d", "_adaptive_avg_pool3d")
_names("adaptive_max_pool", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")
_names("upsample", "interpolate", "upsample_nearest2d", "upsample_bilinear2d", "upsample_nearest1d",
       "upsample_linear1d", "upsample_bicubic2d", "_upsample_nearest_exact2d")
_names("concat", "cat", "concat", "concatenate", "stack", "hstack", "vstack")
_names("reshape", "view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "squeeze_",
       "unsqueeze", "unsqueeze_", "view_as", "reshape_as", "ravel")
_names("permute", "permute", "transpose", "transpose_", "t", "swapaxes", "swapdims", "movedim",
       "pixel_shuffle", "pixel_unshuffle")
_names("expand", "expand", "expand_as", "broadcast_to", "repeat", "tile", "repeat_interleave")
_names("slice", "slice", "select", "narrow", "split", "split_with_sizes", "chunk", "unbind",
       "tensor_split", "slice_scatter", "roll", "flip")
_names("pad", "pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d")
_names("cast", "to", "type", "float", "half", "double", "int", "long", "bool", "type_as",
       "_to_copy", "to_dtype", "bfloat16", "_assert_tensor_metadata_cast")
_names("compare", "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__",
       "__gt__", "__ge__", "isnan", "isinf", "isfinite")
_names("logical", "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and",
       "bitwise_or", "bitwise_not", "bitwise_xor", "__and__", "__or__", "__xor__", "__invert__",
       "and_", "or_", "xor", "invert", "not_", "any", "all")
_names("creation", "arange", "zeros", "ones", "full", "empty", "zeros_like", "ones_like",
       "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor",
       "scalar_tensor", "tensor", "eye", "tril", "triu", "linspace", "lift_fresh_copy",
       "_tensor_constant", "rand", "randn", "rand_like", "randn_like")
_names("dropout", "dropout", "dropout_", "feature_dropout", "alpha_dropout", "native_dropout",
       "dropout1d", "dropout2d", "dropout3d", "feature_alpha_dropout")
_names("identity", "clone", "detach", "detach_", "alias", "contiguous", "lift_fresh",
       "requires_grad_", "_unsafe_view_identity")
_names("shape", "size", "sym_size", "dim", "numel", "sym_numel", "sym_stride", "stride",
       "sym_storage_offset", "__getattr__")
_names("assert", "_assert", "_assert_async", "_assert_scalar", "_assert_tensor_metadata",
       "sym_constrain_range", "sym_constrain_range_for_size", "_functional_assert_async",
       "_guard_inputs")

_OPERATOR_NAMES = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div",
    operator.itruediv: "div", operator.floordiv: "floordiv", operator.matmul: "matmul",
    operator.neg: "neg", operator.pow: "pow", operator.getitem: "getitem",
    operator.and_: "and_", operator.or_: "or_", operator.invert: "invert",
    operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.le: "le",
    operator.gt: "gt", operator.ge: "ge", operator.not_: "not_", operator.abs: "abs",
    operator.mod: "mod", getattr: "__getattr__",
}

# Producers of tuples/lists: ``getitem`` on their output is bookkeeping, not a slice.
_TUPLE_PRODUCERS = frozenset({
    "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "max_pool2d_with_indices",
    "max_pool1d_with_indices", "max_pool3d_with_indices", "native_layer_norm", "native_batch_norm",
    "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_dropout",
    "var_mean", "std_mean", "topk", "sort", "max", "min", "native_group_norm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "multi_head_attention_forward",
})


#: ONNX op type → op kind (the same vocabulary as the fx/ATen table above: a test checks every
#: value is in :data:`KNOWN_KINDS`). ``None``: bookkeeping that never runs on the chip's
#: compute units (shape arithmetic, constants, Q/DQ pairs folded into their producers).
ONNX_KINDS: dict[str, str | None] = {
    "MatMul": "matmul", "Gemm": "linear", "Conv": "conv", "ConvTranspose": "conv_transpose",
    "Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Neg": "neg", "Pow": "pow",
    "Reciprocal": "reciprocal", "Sqrt": "sqrt", "Exp": "exp", "Log": "log", "Erf": "erf",
    "Relu": "relu", "Clip": "clamp", "LeakyRelu": "leaky_relu", "PRelu": "prelu",
    "Sigmoid": "sigmoid", "Tanh": "tanh", "Gelu": "gelu", "HardSigmoid": "hardsigmoid",
    "HardSwish": "hardswish", "Softmax": "softmax", "LogSoftmax": "log_softmax",
    "LayerNormalization": "layer_norm", "BatchNormalization": "batch_norm",
    "InstanceNormalization": "instance_norm", "GroupNormalization": "group_norm",
    "MaxPool": "max_pool", "AveragePool": "avg_pool", "GlobalAveragePool": "adaptive_avg_pool",
    "GlobalMaxPool": "max_pool", "ReduceMean": "mean", "ReduceSum": "sum", "ReduceMax": "reduce_max",
    "ReduceMin": "reduce_min", "Max": "maximum", "Min": "minimum",
    "Concat": "concat", "Reshape": "reshape", "Flatten": "reshape", "Squeeze": "reshape",
    "Unsqueeze": "reshape", "Transpose": "permute", "Slice": "slice", "Split": "slice",
    "Expand": "expand", "Tile": "expand", "Pad": "pad", "Identity": "identity",
    "Resize": "upsample", "Gather": "gather", "GatherElements": "gather", "Where": "where",
    "Equal": "compare", "Cast": "identity", "Dropout": "identity",
    "Shape": None, "Constant": None, "ConstantOfShape": None, "Size": None, "Range": None,
    "QuantizeLinear": None, "DequantizeLinear": None,
}


def onnx_kind(node: Any, const: set[str] = frozenset()) -> str:
    """The op kind of an ONNX ``NodeProto`` (``op_type``, ``input``); ``Gather``/``MatMul``
    depend on which inputs are constants (initializer names in ``const``)."""
    op = node.op_type
    if op == "Gather" and len(node.input) > 1 and node.input[1] in const:
        return "slice"  # x[:, 0]: a select by a constant index
    if op == "MatMul" and len(node.input) > 1 and node.input[1] in const:
        return "linear"
    kind = ONNX_KINDS.get(op, f"unknown:{op}")
    return kind if kind is not None else "identity"



def target_name(node: torch.fx.Node) -> str:
    """The base name of what a call node calls (``aten.add.Tensor`` → ``add``)."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if node.op == "call_module":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t.__name__
    if t in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[t]
    name = getattr(t, "__name__", None) or str(t)
    return name


def _is_tensor_value(node: torch.fx.Node) -> bool | None:
    """Whether a node produces a tensor, from shape metadata; None when unknown."""
    val = node.meta.get("val")
    if val is not None:
        return isinstance(val, torch.Tensor)
    if "tensor_meta" in node.meta:
        return node.meta["tensor_meta"] is not None and hasattr(node.meta["tensor_meta"], "shape")
    typ = node.meta.get("type")
    if typ is not None:
        return isinstance(typ, type) and issubclass(typ, torch.Tensor)
    return None


def produces_sequence(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return True
    typ = node.meta.get("type")
    if isinstance(typ, type) and issubclass(typ, (tuple, list)):
        return True
    if node.op == "call_module":
        return False
    return target_name(node) in _TUPLE_PRODUCERS


def _module_kind(mod: nn.Module) -> str:
    if type(mod).__name__ == "GuardsFn":  # torch.export's input-guard submodule
        return "assert"
    for cls, kind in MODULE_KINDS:
        if isinstance(mod, cls):
            return kind
    surrogate_kind = getattr(mod, "archnet_kind", None)
    if isinstance(surrogate_kind, str):
        return surrogate_kind
    return f"unknown:{type(mod).__name__}"


def node_kind(node: torch.fx.Node, gm: torch.nn.Module | None = None) -> str:
    """Canonical op kind of ``node``; ``gm`` is needed to resolve ``call_module`` targets."""
    if node.op in ("placeholder", "output", "get_attr"):
        return node.op
    if node.op == "call_module":
        root = gm if gm is not None else node.graph.owning_module
        if root is None:
            return f"unknown:{node.target}"
        try:
            mod = root.get_submodule(node.target)
        except AttributeError:
            return f"unknown:{node.target}"
        return _module_kind(mod)
    name = target_name(node)
    if name == "getitem":
        return _getitem_kind(node)
    kind = NAME_KINDS.get(name)
    if kind == "assert":
        return kind
    if _is_tensor_value(node) is False and not produces_sequence(node) and (
            not isinstance(node.target, torch._ops.OpOverload) or node.meta.get("val") is not None):
        # Arithmetic on Python numbers / SymInts (aten.sym_size, x.size(0) * 4) is shape
        # bookkeeping, not tensor compute.
        return "shape"
    return kind if kind is not None else f"unknown:{name}"


def _getitem_kind(node: torch.fx.Node) -> str:
    """``x[...]``: tuple indexing is bookkeeping; a tensor index is a gather; else a slice."""
    src = node.args[0]
    if not isinstance(src, torch.fx.Node) or produces_sequence(src):
        return "getitem"
    idx = node.args[1]
    parts = idx if isinstance(idx, (tuple, list)) else (idx,)
    if any(isinstance(p, torch.fx.Node) and _is_tensor_value(p) is not False for p in parts):
        return "gather"
    return "slice"


def annotate_kinds(gm: torch.fx.GraphModule) -> None:
    """Store each node's kind in ``node.meta["archnet.kind"]``."""
    for n in gm.graph.nodes:
        n.meta[KIND_META_KEY] = node_kind(n, gm)


def kind_histogram(gm: torch.fx.GraphModule, *, include_meta: bool = False) -> Counter:
    """Count of op kinds over the graph's nodes (meta kinds excluded unless asked)."""
    hist: Counter = Counter()
    for n in gm.graph.nodes:
        k = node_kind(n, gm)
        if include_meta or k not in META_KINDS:
            hist[k] += 1
    return hist


def source_location(node: torch.fx.Node) -> str:
    """Best-effort ``module.path (file:line)`` of where a node came from in the user's code."""
    path = module_path(node)
    trace = node.meta.get("stack_trace") or ""
    loc = ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    user = [ln for ln in lines if "/torch/" not in ln and "transformers/utils" not in ln]
    if user or lines:
        last = (user or lines)[-1]
        # 'File "x.py", line 12, in forward'
        try:
            fname = last.split('"')[1]
            lineno = last.split("line ")[1].split(",")[0]
            loc = f"{fname.rsplit('/', 1)[-1]}:{lineno}"
        except IndexError:
            loc = last
    if path and loc:
        return f"{path} ({loc})"
    return path or loc or node.name


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the innermost user module that produced ``node`` ('' at top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last: Any = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        # torch.export spells paths like "L['self'].encoder.layer[0]" in some versions.
        return str(path)
    return node.meta.get("archnet.module_path", "")

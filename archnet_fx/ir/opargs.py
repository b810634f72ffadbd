"""Read an op's arguments the same way whatever form the graph spells it in.

``F.layer_norm(x, shape, w, b, eps)``, ``aten.layer_norm.default(...)``, ``x.softmax(-1)`` and a
call to an ``nn.LayerNorm`` submodule all carry the same information in different places. Passes
call :func:`call_kwargs` (torch's own argument normalisation, extended to Tensor methods and
``operator`` functions) or :func:`weighted_op` (conv/linear weights wherever they live) and never
index ``node.args`` by position.
"""
from __future__ import annotations

import operator
import typing
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx.operator_schemas import normalize_function

_BINARY_OPERATORS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
                     operator.imul, operator.truediv, operator.itruediv, operator.matmul,
                     operator.pow, operator.floordiv}


def attr_value(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _arg_type(v: Any, gm: torch.nn.Module | None) -> Any:
    """The Python type torch's overload matching expects for argument value ``v``."""
    if isinstance(v, torch.fx.Node):
        if v.op == "get_attr" and gm is not None:
            try:
                return type(attr_value(gm, str(v.target)))
            except AttributeError:
                return torch.Tensor
        val = v.meta.get("val")
        if isinstance(val, torch.SymInt):
            return int
        if isinstance(val, torch.SymFloat):
            return float
        if isinstance(val, torch.SymBool):
            return bool
        typ = v.meta.get("type")  # symbolic_trace records Python results (x.shape[0]: int)
        if typ in (int, float, bool):
            return typ
        return torch.Tensor
    if isinstance(v, (tuple, list)) and v and all(isinstance(e, int) and not isinstance(e, bool)
                                                  for e in v):
        return typing.Tuple[int, ...]
    return type(v)


def _normalize(fn: Any, args: tuple, kwargs: dict, gm: torch.nn.Module | None
               ) -> dict[str, Any] | None:
    """torch's normalisation; overloaded builtins (``torch.div``, ``F.conv2d``) need the
    argument types to pick a schema, so retry with them when the untyped attempt fails."""
    for typed in (False, True):
        types = {}
        if typed:
            types = dict(arg_types=tuple(_arg_type(a, gm) for a in args),
                         kwarg_types={k: _arg_type(v, gm) for k, v in kwargs.items()})
        try:
            pair = normalize_function(fn, args, kwargs, normalize_to_only_use_kwargs=True,
                                      **types)
        except Exception:  # noqa: BLE001 - torch raises various errors for ambiguous overloads
            pair = None
        if pair is not None:
            return dict(pair.kwargs)
    return None


def call_kwargs(node: torch.fx.Node, gm: torch.nn.Module | None = None) -> dict[str, Any] | None:
    """All arguments of a call_function / call_method node by parameter name, or None.

    The tensor operand is always under ``"input"`` (``"other"`` for the second of a binary op).
    """
    gm = gm if gm is not None else node.graph.owning_module
    if node.op == "call_function":
        if node.target in _BINARY_OPERATORS:
            return {"input": node.args[0], "other": node.args[1]}
        if node.target is operator.neg:
            return {"input": node.args[0]}
        return _normalize(node.target, tuple(node.args), dict(node.kwargs), gm)
    if node.op == "call_method":
        fn = getattr(torch, str(node.target), None)
        if fn is None:
            fn = getattr(torch.nn.functional, str(node.target), None)
        if fn is None:
            return None
        return _normalize(fn, tuple(node.args), dict(node.kwargs), gm)
    return None


@dataclass
class WeightedOp:
    """A conv or linear node's weights, wherever they are stored."""
    kind: str                        # "conv" | "linear" | "conv_transpose"
    input: torch.fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    module: torch.nn.Module | None   # the submodule for call_module nodes
    weight_node: torch.fx.Node | None
    bias_node: torch.fx.Node | None


def weighted_op(node: torch.fx.Node, gm: torch.nn.Module, kind: str) -> WeightedOp | None:
    """Weights of a conv/linear node in module, functional or ATen form (None if not constant)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            return None
        return WeightedOp(kind, node.args[0], w, getattr(mod, "bias", None), mod, None, None)
    kw = call_kwargs(node, gm)
    if kw is None:
        return None
    x, wn, bn = kw.get("input"), kw.get("weight"), kw.get("bias")
    if not isinstance(wn, torch.fx.Node) or wn.op != "get_attr":
        return None
    w = attr_value(gm, wn.target)
    b = None
    if isinstance(bn, torch.fx.Node):
        if bn.op != "get_attr":
            return None
        b = attr_value(gm, bn.target)
    if kw.get("transposed"):
        kind = "conv_transpose"
    return WeightedOp(kind, x, w, b, None, wn, bn if isinstance(bn, torch.fx.Node) else None)


def out_channels(op: WeightedOp) -> int:
    return int(op.weight.shape[1] if op.kind == "conv_transpose" else op.weight.shape[0])


def in_channels(op: WeightedOp) -> int:
    if op.kind == "conv_transpose":
        return int(op.weight.shape[0])
    groups = getattr(op.module, "groups", 1) if op.module is not None else 1
    return int(op.weight.shape[1]) * int(groups)

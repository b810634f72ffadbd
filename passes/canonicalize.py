"""Canonicalization: semantics-preserving rewrites that make later passes see fewer spellings.

Each rule below is exact (up to float rounding): the pipeline verifies numerics after each pass.

=====================  =====================================================================
pass                   what it does
=====================  =====================================================================
drop_identity          dropout (eval), nn.Identity, clone/detach, same-dtype casts → x
index_to_view          x[arange(n0)[:, None, …], …, arange(nk)[…, None, :]] indexing every
                       element of x along its own axis → x with size-1 axes (no gather; the
                       padding mask of transformers' attention)
fold_constants         nodes that depend on no graph input (position-id slices, aranges on
                       buffers) are computed once and stored as buffers
fold_batchnorm         conv/linear → eval BatchNorm becomes one conv/linear with scaled weights
div_to_mul             x / c with a constant c → x * (1/c)
decompose_sdpa         scaled_dot_product_attention → matmul, scale, additive mask, softmax,
                       matmul (so softmax is visible to legality and surrogates)
dce                    dead code elimination (and unused weights dropped)
=====================  =====================================================================
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from archnet_fx.ir.dataflow import input_dependent
from archnet_fx.ir.opargs import call_kwargs, weighted_op
from archnet_fx.ir.opkinds import produces_sequence
from archnet_fx.infra.graphpass import GraphPass, is_impure, is_inplace
from archnet_fx.infra.records import PassRecord
from archnet_fx.infra.rules import Refuse, RewriteContext, RewritePass, Rule

# --------------------------------------------------------------------------- drop_identity


_VIEW_KINDS = frozenset({"reshape", "permute", "slice", "expand", "identity", "getitem"})


def _written_in_place(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value, or a view of it, is an in-place op's target."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if is_inplace(u) and u.args and u.args[0] is n:
                return True
            if u.meta.get("archnet.kind") in _VIEW_KINDS:
                todo.append(u)
    return False


def _match_identity(node: torch.fx.Node, ctx: RewriteContext) -> Any:
    # dropout at inference, Identity, clone/detach/contiguous: y = x.
    src = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(src, torch.fx.Node):
        return None
    if "contiguous" in str(node.target):
        raise Refuse("contiguous() changes memory layout that a later view() may rely on")
    if _written_in_place(node) or _written_in_place(src):
        raise Refuse("the value or its copy is written in place, so the copy is not an alias")
    if ctx.shape(src) is not None and ctx.shape(node) is not None and \
            ctx.shape(src) != ctx.shape(node):
        raise Refuse("output shape differs from input shape")
    return src


def _match_noop_cast(node: torch.fx.Node, ctx: RewriteContext) -> Any:
    # x.to(dtype) where x already has that dtype: y = x.
    src = node.args[0] if node.args else None
    if not isinstance(src, torch.fx.Node):
        return None
    a, b = ctx.dtype(src), ctx.dtype(node)
    if a is None or b is None:
        return None
    if a != b:
        return None
    if ctx.shape(src) != ctx.shape(node):
        return None
    if _written_in_place(node) or _written_in_place(src):
        raise Refuse("the value or its copy is written in place, so the copy is not an alias")
    return src


def _same(m: torch.fx.Node, ctx: RewriteContext) -> torch.fx.Node:
    return m


DROP_IDENTITY_RULES = (
    Rule("dropout_eval", frozenset({"dropout"}), _match_identity, _same,
         doc="dropout at inference is the identity: y = x"),
    Rule("identity", frozenset({"identity"}), _match_identity, _same,
         doc="Identity / clone / detach: y = x (values unchanged)"),
    Rule("noop_cast", frozenset({"cast"}), _match_noop_cast, _same,
         doc="a cast to the dtype the tensor already has: y = x"),
)

# --------------------------------------------------------------------------- fold_batchnorm


@dataclass
class _BNFold:
    bn: torch.fx.Node
    producer: torch.fx.Node
    op: Any
    scale: torch.Tensor
    shift: torch.Tensor


def _bn_stats(node: torch.fx.Node, ctx: RewriteContext):
    """(input, mean, var, gamma, beta, eps) of an eval-mode batch norm in any form."""
    if node.op == "call_module":
        m = ctx.module(node)
        if m.training or m.running_mean is None:
            return None
        return node.args[0], m.running_mean, m.running_var, m.weight, m.bias, m.eps
    kw = call_kwargs(node, ctx.gm)
    if kw is None:
        return None
    if kw.get("training"):
        return None
    vals = [ctx.const(kw.get(k)) for k in ("running_mean", "running_var", "weight", "bias")]
    if vals[0] is None or vals[1] is None:
        return None
    return kw.get("input"), vals[0], vals[1], vals[2], vals[3], float(kw.get("eps", 1e-5))


def _match_bn(node: torch.fx.Node, ctx: RewriteContext) -> Any:
    if produces_sequence(node):
        return None  # ATen's (out, mean, invstd) form: folded at getitem(bn, 0) by fold_bn_tuple
    return _fold_bn(node, ctx)


def _fold_bn(node: torch.fx.Node, ctx: RewriteContext) -> Any:
    stats = _bn_stats(node, ctx)
    if stats is None:
        return None
    x, mean, var, gamma, beta, eps = stats
    if not isinstance(x, torch.fx.Node):
        return None
    pkind = ctx.kind(x)
    if pkind not in ("conv", "linear"):
        return None
    if len(x.users) != 1:
        raise Refuse(f"{x.name} has other users besides the batch norm")
    op = weighted_op(x, ctx.gm, pkind)
    if op is None:
        raise Refuse(f"{x.name}'s weights are not constants")
    if op.kind == "conv_transpose":
        raise Refuse("transposed convolution is not folded")
    if op.weight.shape[0] != mean.shape[0]:
        raise Refuse("channel count of producer and batch norm differ")
    if pkind == "linear" and (ctx.shape(x) is None or len(ctx.shape(x)) != 2):
        # BN normalizes dim 1; a linear's features are the last dim, the same only for (B, C).
        raise Refuse("batch norm over dim 1 of a linear output of rank != 2 is not per-feature")
    # y = (Wx + b - mu) * g / sqrt(var + eps) + beta = (s*W) x + (b - mu) * s + beta
    s = (gamma if gamma is not None else torch.ones_like(var)) / torch.sqrt(var + eps)
    b = op.bias if op.bias is not None else torch.zeros_like(mean)
    shift = (b - mean) * s + (beta if beta is not None else torch.zeros_like(mean))
    return _BNFold(node, x, op, s.detach(), shift.detach())


def _build_bn(m: _BNFold, ctx: RewriteContext) -> torch.fx.Node:
    w = m.op.weight.detach() * m.scale.reshape(-1, *([1] * (m.op.weight.dim() - 1)))
    if m.op.module is not None:
        mod = copy.deepcopy(m.op.module)
        mod.weight = torch.nn.Parameter(w)
        mod.bias = torch.nn.Parameter(m.shift.clone())
        return ctx.call_module(f"{m.producer.target}_bnfold", mod, m.producer.args,
                               dict(m.producer.kwargs))
    wn = ctx.add_tensor(f"{m.producer.name}_weight_bnfold", w)
    bn = ctx.add_tensor(f"{m.producer.name}_bias_bnfold", m.shift)
    args = list(m.producer.args)
    kwargs = dict(m.producer.kwargs)
    args[1] = wn
    if len(args) > 2:
        args[2] = bn
    else:
        kwargs["bias"] = bn
    return ctx.call_function(m.producer.target, tuple(args), kwargs)


def _match_bn_getitem(node: torch.fx.Node, ctx: RewriteContext) -> Any:
    # ATen's tuple-returning batch norm: fold at `getitem(bn, 0)`.
    src = node.args[0]
    if not isinstance(src, torch.fx.Node) or node.args[1] != 0 or ctx.kind(src) != "batch_norm":
        return None
    return _fold_bn(src, ctx)


FOLD_BN_RULES = (
    Rule("fold_bn", frozenset({"batch_norm"}), _match_bn, _build_bn,
         doc="BN(Wx+b) = (s*W)x + (b-mu)*s + beta with s = gamma/sqrt(var+eps)"),
    Rule("fold_bn_tuple", frozenset({"getitem"}), _match_bn_getitem, _build_bn,
         doc="same, for ATen batch norms that return (out, mean, invstd)"),
)

# --------------------------------------------------------------------------- div_to_mul


def _match_div_const(node: torch.fx.Node, ctx: RewriteContext) -> Any:
    kw = call_kwargs(node, ctx.gm)
    if kw is None:
        return None
    x, c = kw.get("input"), kw.get("other")
    if kw.get("rounding_mode") is not None:
        raise Refuse("division with a rounding mode is not a multiplication")
    if not isinstance(x, torch.fx.Node):
        return None
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        if c == 0:
            raise Refuse("division by zero constant")
        return x, 1.0 / c
    if isinstance(c, torch.fx.Node) and c.op == "get_attr":
        t = ctx.const(c)
        if isinstance(t, torch.nn.Parameter) and t.requires_grad:
            raise Refuse("divisor is a trainable parameter")
        if isinstance(t, torch.Tensor) and t.is_floating_point() and bool((t != 0).all()):
            return x, t
    return None


def _build_div_const(m: Any, ctx: RewriteContext) -> torch.fx.Node:
    x, c = m
    if isinstance(c, torch.Tensor):
        c = ctx.add_tensor("reciprocal_const", 1.0 / c, trainable=False)
    return ctx.call_function(torch.mul, (x, c))


DIV_RULES = (
    Rule("div_const", frozenset({"div"}), _match_div_const, _build_div_const,
         doc="x / c = x * (1/c) for a constant c != 0"),
)

# --------------------------------------------------------------------------- index_to_view


def _aten_name(node: torch.fx.Node) -> str | None:
    t = node.target
    return t.overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else None


def _const_arange_axis(t: Any, rank: int) -> tuple[int, int] | None:
    """``(n, axis)`` when constant ``t`` holds ``0, 1, …, n−1`` along one axis (n > 1) of a
    shape broadcasting to rank ``rank``; else None."""
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool \
            or t.dim() > rank:
        return None
    long = [d for d, size in enumerate(t.shape) if size != 1]
    if len(long) != 1:
        return None
    n = int(t.shape[long[0]])
    if not torch.equal(t.reshape(-1).long(), torch.arange(n)):
        return None
    return n, long[0] + rank - t.dim()


def _arange_axis(i: Any, rank: int, ctx: RewriteContext) -> tuple[Any, int] | None:
    """``(end, axis)`` when index tensor ``i`` is ``arange(end)`` laid along one ``axis`` of a
    rank-``rank`` tensor (unsqueezes, ``+ 0`` and integer casts on the way, or a folded
    constant with those values); else None."""
    if isinstance(i, torch.fx.Node) and i.op == "get_attr":
        return _const_arange_axis(ctx.const(i), rank)
    axis, r = 0, None
    ups: list[int] = []
    n = i
    while isinstance(n, torch.fx.Node) and n.op == "call_function":
        name = _aten_name(n)
        if name == "unsqueeze" and len(n.args) >= 2 and isinstance(n.args[1], int):
            ups.append(n.args[1])
            n = n.args[0]
        elif name in ("add", "sub") and len(n.args) == 2 and n.args[1] == 0 and \
                not n.kwargs.get("alpha", 1) != 1:
            n = n.args[0]
        elif name in ("to", "_to_copy") and n.args and \
                isinstance(n.meta.get("val"), torch.Tensor) and \
                not n.meta["val"].dtype.is_floating_point and n.meta["val"].dtype != torch.bool:
            n = n.args[0]
        elif name == "arange":
            a = list(n.args)
            if len(a) == 1:
                start, end, step = 0, a[0], 1
            elif len(a) in (2, 3):
                start, end, step = a[0], a[1], a[2] if len(a) == 3 else 1
            else:
                return None
            if start != 0 or step != 1 or n.kwargs.get("start", 0) != 0:
                return None
            # unsqueezes were collected outermost first: replay them from the arange out
            r = 1
            for d in reversed(ups):
                d = d + r + 1 if d < 0 else d
                if d <= axis:
                    axis += 1
                r += 1
            return (end, axis) if r == rank else None
        else:
            return None
    return None


def _match_index_arange(node: torch.fx.Node, ctx: RewriteContext) -> Any:
    """``x[arange(n0)[:, None, ...], ..., arange(nk)[..., None, :]]`` with every ``n_d =
    x.size(d)``: each index walks one dimension of ``x`` whole, along its own axis — the
    result is ``x`` itself, with size-1 axes inserted (a view, no gather)."""
    if _aten_name(node) != "index" or len(node.args) != 2:
        return None
    x, indices = node.args
    if not isinstance(x, torch.fx.Node) or not isinstance(indices, (list, tuple)) or \
            not indices or any(not isinstance(i, torch.fx.Node) for i in indices):
        return None
    out_val, x_val = node.meta.get("val"), x.meta.get("val")
    if not isinstance(out_val, torch.Tensor) or not isinstance(x_val, torch.Tensor):
        raise Refuse("needs symbolic shapes (a torch.export capture) to prove the index is whole")
    rank = out_val.dim()
    k = len(indices)
    lead = rank - (x_val.dim() - k)  # broadcast rank of the index tensors
    axes = []
    for d, i in enumerate(indices):
        found = _arange_axis(i, lead, ctx)
        if found is None:
            return None
        end, axis = found
        size = x_val.shape[d]
        end_v = end.meta.get("val") if isinstance(end, torch.fx.Node) else end
        if end_v is None or str(end_v) != str(size):
            raise Refuse(f"index {d} is arange({end_v}), not the whole dimension {d} ({size})")
        axes.append(axis)
    if len(set(axes)) != k:
        raise Refuse("two indices share an axis (a diagonal, not a view)")
    # x's indexed dims land on `axes`, its other dims follow the broadcast dims.
    shape = [1] * lead
    for d, a in enumerate(axes):
        shape[a] = x_val.shape[d]
    shape += list(x_val.shape[k:])
    if [str(v) for v in shape] != [str(v) for v in out_val.shape]:
        raise Refuse("the view's shape differs from the index result's")
    if _written_in_place(node) or _written_in_place(x):
        raise Refuse("the value or its source is written in place, so a view is not a copy")
    return x, axes, lead, x_val.dim()


def _build_index_view(m: Any, ctx: RewriteContext) -> torch.fx.Node:
    x, axes, lead, xrank = m
    k = len(axes)
    order = sorted(range(k), key=lambda d: axes[d])
    y = x
    if order != list(range(k)):
        y = ctx.call_function(torch.ops.aten.permute.default,
                              (y, order + list(range(k, xrank))))
    for q in range(lead):
        if q not in axes:
            y = ctx.call_function(torch.ops.aten.unsqueeze.default, (y, q))
    return y


INDEX_RULES = (
    Rule("index_arange_to_view", frozenset({"gather"}), _match_index_arange, _build_index_view,
         doc="x[arange(n0)[:, None], arange(n1)[None, :]] = x with size-1 axes (no gather)"),
)

# --------------------------------------------------------------------------- decompose_sdpa


@dataclass
class _SDPA:
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    mask: Any
    causal: bool
    scale: float
    lq: int
    lk: int
    dtype: torch.dtype


def _match_sdpa(node: torch.fx.Node, ctx: RewriteContext) -> Any:
    kw = call_kwargs(node, ctx.gm)
    if kw is None:
        raise Refuse("could not read the attention arguments")
    q, k, v = kw.get("query"), kw.get("key"), kw.get("value")
    qs, ks = ctx.shape(q), ctx.shape(k)
    if qs is None or ks is None:
        raise Refuse("shapes of query/key unknown (run shape propagation)")
    if kw.get("enable_gqa") and qs[-3] != ks[-3]:
        raise Refuse("grouped-query attention with differing head counts is not decomposed")
    if kw.get("dropout_p", 0.0):
        raise Refuse("attention dropout is active")
    scale = kw.get("scale")
    scale = 1.0 / math.sqrt(qs[-1]) if scale is None else float(scale)
    return _SDPA(q, k, v, kw.get("attn_mask"), bool(kw.get("is_causal", False)), scale,
                 qs[-2], ks[-2], ctx.dtype(q) or torch.float32)


def _build_sdpa(m: _SDPA, ctx: RewriteContext) -> torch.fx.Node:
    # softmax(q k^T * scale + mask) v, with a bool mask b turned into where(b, 0, min_float) and
    # is_causal into a constant upper-triangular additive mask.
    kt = ctx.call_function(torch.transpose, (m.k, -2, -1))
    scores = ctx.call_function(torch.matmul, (m.q, kt))
    scores = ctx.call_function(torch.mul, (scores, m.scale))
    neg = torch.finfo(m.dtype).min
    mask = m.mask
    if isinstance(mask, torch.fx.Node):
        if ctx.dtype(mask) == torch.bool:
            mask = ctx.call_function(torch.where, (mask, 0.0, neg))
        scores = ctx.call_function(torch.add, (scores, mask))
    if m.causal:
        causal = torch.full((m.lq, m.lk), neg, dtype=m.dtype).triu(1)
        cn = ctx.add_tensor("causal_mask", causal, trainable=False)
        scores = ctx.call_function(torch.add, (scores, cn))
    probs = ctx.call_function(torch.softmax, (scores, -1))
    return ctx.call_function(torch.matmul, (probs, m.v))


SDPA_RULES = (
    Rule("decompose_sdpa", frozenset({"sdpa"}), _match_sdpa, _build_sdpa,
         doc="sdpa(q,k,v,mask) = softmax(q k^T * scale + mask) v"),
)

# --------------------------------------------------------------------------- fold_constants


class FoldConstants(GraphPass):
    """Evaluate every node that depends on no graph input and store the results as buffers.

    Trainable parameters are never folded (they stay trainable); tensors larger than
    ``max_elements`` are left alone so folding never multiplies memory.
    """
    name = "fold_constants"
    max_elements = 1 << 22

    def apply(self, gm: torch.fx.GraphModule, record: PassRecord) -> None:
        dep = input_dependent(gm)
        ctx = RewriteContext(gm, self.name)
        ctx.rule = "fold_constant"
        values: dict[torch.fx.Node, Any] = {}
        for n in gm.graph.nodes:
            if n in dep or n.op in ("placeholder", "output"):
                continue
            if n.op == "get_attr":
                v = ctx.attr(n.target)
                if isinstance(v, torch.nn.Parameter) and v.requires_grad:
                    continue
                values[n] = v
                continue
            if n.op == "call_module" or is_impure(n):
                continue
            ins = n.all_input_nodes
            if any(a not in values for a in ins):
                continue
            args = torch.fx.node.map_arg(n.args, lambda a: values[a])
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: values[a])
            try:
                with torch.no_grad():
                    if n.op == "call_method":
                        v = getattr(args[0], n.target)(*args[1:], **kwargs)
                    else:
                        v = n.target(*args, **kwargs)
            except Exception:  # noqa: BLE001 - leave anything that does not evaluate
                continue
            if isinstance(v, torch.Tensor) and v.numel() > self.max_elements:
                continue
            values[n] = v
        for n, v in values.items():
            if n.op == "get_attr" or not isinstance(v, torch.Tensor):
                continue
            if not any(u not in values for u in n.users):
                continue
            ctx.anchor = n
            with gm.graph.inserting_before(n):
                c = ctx.add_tensor(f"const_{n.name}", v, trainable=False)
            n.replace_all_uses_with(c)
            record.replaced[n.name] = c.name
            record.rule_hits["fold_constant"] += 1


class DeadCodeElimination(GraphPass):
    """Remove nodes whose values are never used and the weights only they read."""
    name = "dce"

    def apply(self, gm: torch.fx.GraphModule, record: PassRecord) -> None:
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
        removed = before - len(gm.graph.nodes)
        if removed:
            record.rule_hits["dead_node"] += removed


def drop_identity() -> RewritePass:
    return RewritePass(DROP_IDENTITY_RULES, name="drop_identity")


def fold_batchnorm() -> RewritePass:
    return RewritePass(FOLD_BN_RULES, name="fold_batchnorm")


def div_to_mul() -> RewritePass:
    return RewritePass(DIV_RULES, name="div_to_mul")


def index_to_view() -> RewritePass:
    return RewritePass(INDEX_RULES, name="index_to_view")


def decompose_sdpa() -> RewritePass:
    return RewritePass(SDPA_RULES, name="decompose_sdpa")


def canonicalize_passes() -> list[GraphPass]:
    """The canonicalization pipeline, in order."""
    return [drop_identity(), index_to_view(), FoldConstants(), fold_batchnorm(), div_to_mul(),
            decompose_sdpa(), DeadCodeElimination()]

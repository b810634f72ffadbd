"""Structural tiling: exact rewrites of conv/linear nodes that break a target's *limits*.

Run by legalization after every surrogate family (:func:`archnet_fx.pipelines.legalize_passes`), so they also
see convs and linears the surrogates created. Two passes, each a table of rules:

``tile_kernels`` — a conv whose kernel size is not in the target's ``kernel_sizes``:

* ``patchify`` — kernel == stride, no padding, no dilation, one group (ViT patch embedding,
  ConvNeXt stems and downsamplers): space-to-depth then a 1×1 conv::

      conv(x, W, stride=k) = conv1x1(pixel_unshuffle(x, k), W.reshape(O, C·k·k, 1, 1))

  ``pixel_unshuffle`` orders channels ``c·k² + i·k + j``, the same as ``W[o, c, i, j]`` flattened.
* ``pad_kernel`` — one allowed size ``K ≥ k`` per dim: the kernel zero-padded on the right to
  ``K``, and the slack absorbed by the conv's own (symmetric) padding plus an output slice.
* ``tile_kernel`` — kernels larger than every allowed size (7×7 depthwise on ``npu_b``): the
  kernel is cut into tiles of allowed sizes (the last one zero-padded if needed) and::

      conv(x, W)[o] = Σ_tiles slice(conv(x, W_tile, padding=P_t), offset_t)[o]

  A tile at kernel offset ``a`` reads ``x̃[o·s + a + u]`` (``x̃`` = x padded by the original
  ``p_left``); a conv padded by ``P`` reads ``x̂[o'·s + u]`` with ``x̂[j] = x̃[j + p_left − P]``,
  so ``o' = o + (a − p_left + P)/s``: ``P`` is the smallest padding ≥ ``p_left − a`` making that
  an integer and the output long enough. Zero padding is the conv's own — no ``pad`` op, which
  ``npu_b`` lacks.

``tile_channels`` — a linear/conv with more input or output channels than ``max_channels``:

* ``split_channels`` — input channels in chunks (``narrow`` the input, slice the weight's
  columns, sum the partial results; bias once) and output channels in chunks (``concat``)::

      x W^T + b = concat_j( Σ_i x[:, I_i] W[O_j, I_i]^T + b[O_j] )

  Grouped/depthwise convs split whole groups (``narrow`` + ``concat``, no sum).

All rules are exact up to float re-association (max abs error ~1e-6 on unit-scale data; the tests
state 1e-5). New weights are trainable parameters (``archnet.from_pass`` provenance on each node);
every form of the op is read through :func:`~archnet_fx.ir.opargs.weighted_op` and
:func:`~archnet_fx.ir.opargs.call_kwargs`, so module calls, ``F.conv2d`` and ATen ops all work.
Dilated, strided, grouped and depthwise convs tile the same way (a tile at kernel offset ``a``
starts ``a·dilation`` input positions in); ``reflect``/``replicate``/``circular`` padding is
written out first with slices and a concat (exact), then the tiles pad with zeros. Transposed
convs are refused with the reason.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn.functional as F

from archnet_fx.ir.opargs import WeightedOp, call_kwargs, in_channels, out_channels, weighted_op
from archnet_fx.infra.graphpass import GraphPass
from archnet_fx.infra.rules import Refuse, RewriteContext, RewritePass, Rule
from archnet_fx.targets import Target

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# --------------------------------------------------------------------------- reading convs


@dataclass
class ConvSpec:
    """Everything about a conv/linear node a tiling rule needs, in one form."""
    node: torch.fx.Node
    op: WeightedOp
    kind: str                             # "conv" | "linear"
    nd: int = 0                           # spatial dims (conv)
    stride: tuple[int, ...] = ()
    pad: tuple[tuple[int, int], ...] = ()  # (left, right) per spatial dim
    dilation: tuple[int, ...] = ()
    groups: int = 1
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    padding_mode: str = "zeros"           # zeros | reflect | replicate | circular


def _tuple(v: Any, nd: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * nd
    v = tuple(int(e) for e in v)
    return v * nd if len(v) == 1 else v


def _shape(n: Any) -> tuple[int, ...] | None:
    tm = n.meta.get("tensor_meta") if isinstance(n, torch.fx.Node) else None
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape)
    return None


def read_op(node: torch.fx.Node, ctx: RewriteContext, kind: str) -> ConvSpec:
    """A :class:`ConvSpec` for a conv/linear node (raises Refuse with the reason it cannot be tiled)."""
    op = weighted_op(node, ctx.gm, kind)
    if op is None:
        raise Refuse("weights are not constant tensors of the graph")
    if op.kind == "conv_transpose":
        raise Refuse("transposed convs are not tiled")
    spec = ConvSpec(node, op, kind, in_shape=_shape(op.input), out_shape=_shape(node))
    if kind == "linear":
        return spec
    nd = op.weight.dim() - 2
    if nd not in _CONV_FN:
        raise Refuse(f"{nd}-D conv")
    if op.module is not None:
        m = op.module
        spec.padding_mode = getattr(m, "padding_mode", "zeros")
        stride, padding, dilation, groups = m.stride, m.padding, m.dilation, m.groups
    else:
        kw = call_kwargs(node, ctx.gm) or {}
        stride, padding = kw.get("stride", 1), kw.get("padding", 0)
        dilation, groups = kw.get("dilation", 1), kw.get("groups", 1)
    ks = tuple(int(k) for k in op.weight.shape[2:])
    spec.nd, spec.stride, spec.dilation = nd, _tuple(stride, nd), _tuple(dilation, nd)
    spec.groups = int(groups)
    if isinstance(padding, str):
        if padding == "valid":
            spec.pad = ((0, 0),) * nd
        else:  # "same" (stride 1): total d·(k−1), the extra one on the right
            tot = [d * (k - 1) for d, k in zip(spec.dilation, ks)]
            spec.pad = tuple((t // 2, t - t // 2) for t in tot)
    else:
        spec.pad = tuple((p, p) for p in _tuple(padding, nd))
    return spec


def _conv_node(ctx: RewriteContext, x: torch.fx.Node, w: torch.Tensor,
               b: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
               groups: int, hint: str, dilation: Sequence[int] | None = None) -> torch.fx.Node:
    wn = ctx.add_tensor(f"{hint}_weight", w)
    bn = ctx.add_tensor(f"{hint}_bias", b) if b is not None else None
    dil = tuple(dilation) if dilation is not None else (1,) * len(stride)
    return ctx.call_function(_CONV_FN[len(stride)], (x, wn, bn, tuple(stride), tuple(padding),
                                                     dil, groups))


def _narrow(ctx: RewriteContext, x: torch.fx.Node, dim: int, start: int, length: int
            ) -> torch.fx.Node:
    return ctx.call_function(torch.narrow, (x, dim, start, length))


def _sum(ctx: RewriteContext, parts: list[torch.fx.Node]) -> torch.fx.Node:
    acc = parts[0]
    for p in parts[1:]:
        acc = ctx.call_function(torch.add, (acc, p))
    return acc


def _hint(node: torch.fx.Node) -> str:
    return f"{node.name}_tile"


# --------------------------------------------------------------------------- kernel rules


def _kernel_violation(node: torch.fx.Node, ctx: RewriteContext
                      ) -> tuple[ConvSpec, tuple] | None | str:
    target: Target = ctx.options
    lim = target.limits("conv")
    if lim is None or not lim.kernel_sizes:
        return None
    spec = read_op(node, ctx, "conv")
    ks = tuple(int(k) for k in spec.op.weight.shape[2:])
    if all(k in lim.kernel_sizes for k in ks):
        return None  # legal: nothing to do
    return spec, tuple(sorted(lim.kernel_sizes))


def _match_patchify(node: torch.fx.Node, ctx: RewriteContext) -> Any:
    v = _kernel_violation(node, ctx)
    if v is None:
        return None
    spec, allowed = v
    ks = tuple(int(k) for k in spec.op.weight.shape[2:])
    if spec.nd != 2 or 1 not in allowed:
        return None
    if not (ks == spec.stride and ks[0] == ks[1] and all(p == (0, 0) for p in spec.pad)
            and all(d == 1 for d in spec.dilation) and spec.groups == 1):
        return None  # not a patch embedding: the general tiling rules take it
    if spec.in_shape is None:
        raise Refuse("input shape unknown (run shape propagation)")
    return spec


def _build_patchify(spec: ConvSpec, ctx: RewriteContext) -> torch.fx.Node:
    # conv(x, W, stride=k) = conv1x1(pixel_unshuffle(x, k), W.reshape(O, C·k·k, 1, 1)), exact.
    k = spec.stride[0]
    x = spec.op.input
    h, w = spec.in_shape[2], spec.in_shape[3]
    if h % k:
        x = _narrow(ctx, x, 2, 0, h - h % k)  # the strided conv never reads the remainder
    if w % k:
        x = _narrow(ctx, x, 3, 0, w - w % k)
    u = ctx.call_function(F.pixel_unshuffle, (x, k))
    weight = spec.op.weight.detach()
    w1 = weight.reshape(weight.shape[0], -1, 1, 1)
    b = None if spec.op.bias is None else spec.op.bias.detach()
    return _conv_node(ctx, u, w1, b, (1, 1), (0, 0), 1, _hint(spec.node))


def _pieces(k: int, allowed: Sequence[int]) -> list[tuple[int, int, int]]:
    """Cut a kernel extent ``k`` into (offset, used, conv size) pieces of allowed sizes."""
    if k in allowed:
        return [(0, k, k)]
    bigger = [a for a in allowed if a > k]
    if bigger:
        return [(0, k, min(bigger))]
    out, off = [], 0
    while off < k:
        rem = k - off
        fit = [a for a in allowed if a <= rem]
        if fit:
            a = max(fit)
            out.append((off, a, a))
            off += a
        else:
            out.append((off, rem, min(a for a in allowed if a >= rem)))
            off = k
    return out


@dataclass
class KernelTiling:
    spec: ConvSpec
    tiles: list[tuple[tuple[int, int, int], ...]]  # per tile: (offset, used, conv size) per dim


def _match_tiles(single: bool):
    def match(node: torch.fx.Node, ctx: RewriteContext) -> Any:
        v = _kernel_violation(node, ctx)
        if v is None:
            return None
        spec, allowed = v
        if spec.padding_mode != "zeros" and any(any(p) for p in spec.pad):
            tgt: Target = ctx.options
            lacking = [k for k in ("slice", "concat") if not tgt.supports(k)]
            if lacking:
                raise Refuse(f"padding_mode={spec.padding_mode!r} is written out with slices and "
                             f"a concat, and the target has no {' or '.join(lacking)}")
        if spec.in_shape is None or spec.out_shape is None:
            raise Refuse("shapes unknown (run shape propagation)")
        ks = tuple(int(k) for k in spec.op.weight.shape[2:])
        per_dim = [_pieces(k, allowed) for k in ks]
        n = math.prod(len(p) for p in per_dim)
        if (n == 1) != single:
            return None
        return KernelTiling(spec, list(itertools.product(*per_dim)))
    return match


def _tile_padding(a: int, size: int, pl: int, s: int, length: int, n_out: int, d: int = 1
                  ) -> tuple[int, int]:
    """Smallest symmetric padding P (and output offset) so a conv of ``size`` taps at kernel
    offset ``a`` (dilation ``d``: the tile starts ``a·d`` input positions in) lines up with the
    original output: (a·d − pl + P) divisible by s, long enough."""
    p = max(0, pl - a * d)
    while True:
        if (a * d - pl + p) % s == 0:
            off = (a * d - pl + p) // s
            if _conv_len(length, p, size, s, d) >= off + n_out:
                return p, off
        p += 1


def _conv_len(length: int, pad: int, size: int, stride: int, dilation: int) -> int:
    return (length + 2 * pad - dilation * (size - 1) - 1) // stride + 1


def _build_tiles(m: KernelTiling, ctx: RewriteContext) -> torch.fx.Node:
    # conv(x, W)[o] = Σ_t slice(conv(x, W_t, padding=P_t), off_t)[o]; W_t zero-padded to an
    # allowed size; exact (re-associated sum).
    spec = m.spec
    weight = spec.op.weight.detach()
    bias = None if spec.op.bias is None else spec.op.bias.detach()
    x, pad_left, lengths = spec.op.input, [p[0] for p in spec.pad], list(spec.in_shape[2:])
    if spec.padding_mode != "zeros":
        x = _explicit_padding(ctx, x, spec)
        lengths = [n + l + r for n, (l, r) in zip(lengths, spec.pad)]
        pad_left = [0] * spec.nd
    parts = []
    for t, tile in enumerate(m.tiles):
        idx = (slice(None), slice(None)) + tuple(slice(a, a + u) for a, u, _ in tile)
        w = weight[idx]
        pad_w = []
        for a, u, size in reversed(tile):
            pad_w += [0, size - u]
        if any(pad_w):
            w = F.pad(w, pad_w)
        paddings, offsets = [], []
        for i, (a, u, size) in enumerate(tile):
            p, off = _tile_padding(a, size, pad_left[i], spec.stride[i], lengths[i],
                                   spec.out_shape[2 + i], spec.dilation[i])
            paddings.append(p)
            offsets.append(off)
        y = _conv_node(ctx, x, w.contiguous(), bias if t == 0 else None,
                       spec.stride, paddings, spec.groups, _hint(spec.node), spec.dilation)
        full = (_conv_len(lengths[i], paddings[i], tile[i][2], spec.stride[i],
                          spec.dilation[i]) for i in range(spec.nd))
        for i, (off, length) in enumerate(zip(offsets, full)):
            if off or length != spec.out_shape[2 + i]:
                y = _narrow(ctx, y, 2 + i, off, spec.out_shape[2 + i])
        parts.append(y)
    return _sum(ctx, parts)


def _explicit_padding(ctx: RewriteContext, x: torch.fx.Node, spec: ConvSpec) -> torch.fx.Node:
    """``reflect`` / ``replicate`` / ``circular`` padding written out with slices and a concat
    per spatial dim (exact; the tiles then pad with zeros only, which the conv does itself)::

        reflect:   x[p], …, x[1] | x | x[n−2], …, x[n−1−p]
        replicate: x[0] × p      | x | x[n−1] × p
        circular:  x[n−p:]       | x | x[:p]
    """
    for i, (left, right) in enumerate(spec.pad):
        dim, n = 2 + i, spec.in_shape[2 + i]
        if not left and not right:
            continue
        mode = spec.padding_mode
        if mode == "reflect":
            lo = [_narrow(ctx, x, dim, j, 1) for j in range(left, 0, -1)]
            hi = [_narrow(ctx, x, dim, n - 1 - j, 1) for j in range(1, right + 1)]
        elif mode == "replicate":
            lo = [_narrow(ctx, x, dim, 0, 1)] * left
            hi = [_narrow(ctx, x, dim, n - 1, 1)] * right
        elif mode == "circular":
            lo = [_narrow(ctx, x, dim, n - left, left)] if left else []
            hi = [_narrow(ctx, x, dim, 0, right)] if right else []
        else:
            raise Refuse(f"padding_mode={mode!r}")
        x = ctx.call_function(torch.cat, (lo + [x] + hi, dim))
    return x


KERNEL_RULES = (
    Rule("patchify", frozenset({"conv"}), _match_patchify, _build_patchify,
         "conv with kernel == stride = pixel_unshuffle + 1×1 conv (exact)"),
    Rule("pad_kernel", frozenset({"conv"}), _match_tiles(True), _build_tiles,
         "kernel zero-padded to the next allowed size; conv padding + slice realign (exact)"),
    Rule("tile_kernel", frozenset({"conv"}), _match_tiles(False), _build_tiles,
         "sum of allowed-size convs over kernel tiles, each realigned by padding + slice"),
)


# --------------------------------------------------------------------------- channel rules


def _chunks(n: int, limit: int) -> list[tuple[int, int]]:
    k = -(-n // limit)
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append((start, size))
        start += size
    return out


def _match_channels(node: torch.fx.Node, ctx: RewriteContext) -> Any:
    target: Target = ctx.options
    kind = ctx.kind(node)
    lim = target.limits(kind)
    if lim is None or lim.max_channels is None:
        return None
    op = weighted_op(node, ctx.gm, kind)
    if op is None:
        raise Refuse("weights are not constant tensors of the graph")
    if max(in_channels(op), out_channels(op)) <= lim.max_channels:
        return None
    spec = read_op(node, ctx, kind)
    if spec.padding_mode != "zeros" and any(any(p) for p in spec.pad):
        raise Refuse(f"padding_mode={spec.padding_mode!r}: channel chunks would pad with zeros")
    if kind == "conv" and spec.groups > 1:
        g = spec.groups
        per = max(in_channels(op) // g, out_channels(op) // g)
        if per > lim.max_channels:
            raise Refuse(f"one group alone has {per} channels (> {lim.max_channels})")
    if kind == "conv" and any(a != c for a, c in spec.pad):
        raise Refuse("asymmetric ('same') padding: not split (write the padding out explicitly)")
    return spec, lim.max_channels


def _build_channels(m: tuple[ConvSpec, int], ctx: RewriteContext) -> torch.fx.Node:
    # x W^T + b = concat_j(Σ_i x[:, I_i] W[O_j, I_i]^T + b[O_j]); grouped convs: whole groups.
    spec, limit = m
    w = spec.op.weight.detach()
    b = None if spec.op.bias is None else spec.op.bias.detach()
    x = spec.op.input
    hint = f"{spec.node.name}_ch"

    def in_chunks(dim: int) -> tuple[list, list]:  # each input slice made once, shared
        ins = _chunks(w.shape[1], limit)
        return ins, [_narrow(ctx, x, dim, i0, il) if il != w.shape[1] else x for i0, il in ins]

    if spec.kind == "linear":
        ins, xs = in_chunks(-1)
        outs = []
        for o0, ol in _chunks(w.shape[0], limit):
            parts = []
            for j, ((i0, il), xi) in enumerate(zip(ins, xs)):
                wn = ctx.add_tensor(f"{hint}_weight", w[o0:o0 + ol, i0:i0 + il].contiguous())
                bn = (ctx.add_tensor(f"{hint}_bias", b[o0:o0 + ol].contiguous())
                      if b is not None and j == 0 else None)
                parts.append(ctx.call_function(F.linear, (xi, wn, bn)))
            outs.append(_sum(ctx, parts))
        return outs[0] if len(outs) == 1 else ctx.call_function(torch.cat, (outs, -1))
    pads = [p for p, _ in spec.pad]
    if spec.groups > 1:
        g = spec.groups
        cin_g, cout_g = w.shape[1], w.shape[0] // g
        per = max(cin_g, cout_g)
        outs = []
        for g0, gl in _chunks(g, max(1, limit // per)):
            xi = _narrow(ctx, x, 1, g0 * cin_g, gl * cin_g)
            wi = w[g0 * cout_g:(g0 + gl) * cout_g].contiguous()
            bi = None if b is None else b[g0 * cout_g:(g0 + gl) * cout_g].contiguous()
            outs.append(_conv_node(ctx, xi, wi, bi, spec.stride, pads, gl, hint,
                                   spec.dilation))
        return ctx.call_function(torch.cat, (outs, 1))
    ins, xs = in_chunks(1)
    outs = []
    for o0, ol in _chunks(w.shape[0], limit):
        parts = []
        for j, ((i0, il), xi) in enumerate(zip(ins, xs)):
            bi = b[o0:o0 + ol].contiguous() if b is not None and j == 0 else None
            parts.append(_conv_node(ctx, xi, w[o0:o0 + ol, i0:i0 + il].contiguous(), bi,
                                    spec.stride, pads, 1, hint, spec.dilation))
        outs.append(_sum(ctx, parts))
    return outs[0] if len(outs) == 1 else ctx.call_function(torch.cat, (outs, 1))


CHANNEL_RULES = (
    Rule("split_channels", frozenset({"linear", "conv"}), _match_channels, _build_channels,
         "channels over the limit: input chunks summed, output chunks concatenated (exact)"),
)


# --------------------------------------------------------------------------- passes


def tile_kernels(target: Target) -> RewritePass:
    return RewritePass(KERNEL_RULES, name="tile_kernels", options=target, exact=True)


def tile_channels(target: Target) -> RewritePass:
    return RewritePass(CHANNEL_RULES, name="tile_channels", options=target, exact=True)


def tiling_passes(target: Target) -> list[GraphPass]:
    """Kernel tiling first (its 1×1 / tile convs may then need a channel split)."""
    return [tile_kernels(target), tile_channels(target)]

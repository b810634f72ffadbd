"""Surrogates for normalizations over the last axis: LayerNorm, RMSNorm and the same written out
by hand (``pow``/``mean``/``rsqrt`` or ``mean``/``var``/``sqrt``/``div`` chains).

What is replaced
================

* ``layer_norm`` — ``nn.LayerNorm``, ``F.layer_norm``, ``aten.layer_norm``; ``rms_norm`` —
  ``nn.RMSNorm``, ``F.rms_norm``, ``aten.rms_norm``. Arguments are read with
  :func:`~archnet_fx.ir.opargs.call_kwargs` (or the module's attributes). Only normalization over
  the last axis (``len(normalized_shape) == 1``) is supported; others are refused with a reason.
* Hand-written chains, anchored on whichever chain node the target cannot run first (the
  candidates have that node's kind: ``pow``, ``mul``, ``mean``, ``var``, ``sub``, ``sqrt``,
  ``rsqrt``, ``div``)::

      RMS: x * rsqrt(mean(x², -1, keepdim) [+ eps]) [* w]          x² = x**2 | x*x | square(x)
      LN : d * rsqrt(v [+ eps]) | d / sqrt(v [+ eps]) [* w [+ b]]   d = x - mean(x, -1, keepdim)
           v = mean(d², -1, keepdim) | var(x or d, -1, keepdim, unbiased=False)

  The matcher walks the graph both ways from the anchor to the ``rsqrt``/``sqrt`` at the chain's
  core, checks the pieces connect (same ``x``, last axis, ``keepdim=True``, exponent 2, the
  numerator really is ``x`` or ``x − mean(x)``) and returns ``(module, (x,), chain_output)``;
  otherwise it refuses and the ``elementwise`` family handles the node op by op.

Candidates (two per kind)
=========================

* ``ln_emulate`` / ``rms_emulate`` / ``norm_chain_emulate`` (emulation, near exact)::

      μ  = mean(x)              # ``mean`` where the target has it, else linear(x, 1/C)
      d  = x − μ                # (RMS: d = x)
      v  = Σ d² / C             # d·d then mean/linear; or one matmul d[...,None,:] @ d[...,:,None]
      r  = pwl(v) ≈ 1/√(v+ε)    # PWL with geometric breakpoints over the calibrated v range
      y  = (d · r) · γ + β      # row scale as mul, or a matmul with inner dimension 1

  The PWL uses right-hinges ``Σ c_i relu(b_i − v)`` (all terms positive for a convex decreasing
  function: no cancellation in float32), is constant right of the range (never changes sign)
  and continues with its end slope left of it. The range is the calibrated one widened 2× each
  way; knots: ``max(2·knots, ln(R)/ln 1.1)`` for a range ratio R, fitted by least squares of the
  *relative* error on a geometric grid: ≤ 5.5e-4 max relative error of 1/√ on the range (less
  where 2·knots exceeds that count). Measured on all-MiniLM-L6-v2 (13 LayerNorms, calibrated on
  32 sentences, evaluated on 32 others): per-LN max error 3e-5–4.4e-4 of the output's max,
  sentence-embedding cosine 0.9999999 with all 13 replaced.
* ``ln_affine`` / ``rms_affine`` / ``norm_chain_affine`` (structural, Arch-Net): ``y = x·a + b``
  per channel (a multiply and an add by constant parameters, foldable into the next linear),
  initialised by per-channel least squares against the true norm on the calibration rows
  (``a_j = cov(x_j, y_j)/var(x_j)``), so it matches on average; distillation refines it.

All bodies use ``linear``, ``relu``, ``reshape``, ``add``, ``sub``, ``mul`` by constants and
either ``mul`` or ``matmul`` of two activations — legal on ``npu_a``, ``npu_b`` and ``dsp_c``.
"""
from __future__ import annotations

import dataclasses

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from archnet_fx.infra.rules import Refuse, Replacement
from archnet_fx.ir.opargs import call_kwargs
from archnet_fx.ir.opkinds import produces_sequence, target_name
from archnet_fx.surrogate.pwl import PWL, solve_hinges
from archnet_fx.surrogate.base import Candidate, Surrogate
from archnet_fx.surrogate.products import make_mul
from archnet_fx.targets import Target

log = logging.getLogger(__name__)

NORM_KINDS = ("layer_norm", "rms_norm")
CHAIN_KINDS = ("pow", "mul", "mean", "var", "sub", "sqrt", "rsqrt", "div")

#: Largest ratio between consecutive PWL breakpoints: the least-squares fit of 1/√v then has a
#: max relative error of ≈ 0.055·(r−1)² ≈ 5.5e-4 (measured; 9e-4 at r = 1.13).
KNOT_RATIO = 1.1
#: Fallback variance range when no calibration samples exist.
DEFAULT_RANGE = (1e-3, 1e3)


# --------------------------------------------------------------------------- modules


def fit_rsqrt(lo: float, hi: float, eps: float, knots: int) -> PWL:
    """PWL ≈ ``1/sqrt(v + eps)`` on ``[lo, hi]`` (lo > 0) with geometric right-hinges.

    ``f(v) = a + Σ c_i relu(b_i − v)``, ``b_i = lo·R^{i/K}`` (i = 1..K, ``b_K = hi``): constant
    ``a`` right of ``hi``, the first segment's slope left of ``lo``. Least squares on the
    relative error over a geometric grid.
    """
    lo, hi = float(lo), float(hi)
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"rsqrt PWL needs 0 < lo < hi, got [{lo}, {hi}]")
    k = max(2, int(knots), math.ceil(math.log(hi / lo) / math.log(KNOT_RATIO)))
    b = torch.logspace(math.log10(lo), math.log10(hi), k + 1, dtype=torch.float64)[1:]
    v = torch.logspace(math.log10(lo), math.log10(hi), max(2048, 16 * k), dtype=torch.float64)
    y = (v + eps).rsqrt()
    # Mirrored (t = −v) these are left-pinned hinges relu(t − (−b_i)), flat left of −hi.
    a, _, c = solve_hinges(-v, y, 1.0 / y, (-b).flip(0), -hi, -lo, pinned=True)
    pwl = PWL(b.float(), c.flip(0).float(), a, 0.0)
    with torch.no_grad():  # right-hinges: relu(b − v) = relu(−1·v + b)
        pwl.inner.weight.fill_(-1.0)
        pwl.inner.bias.copy_(b.float())
    return pwl


class NormEmulation(Surrogate):
    """``y = (d · pwl(Σd²/C)) · γ + β`` with ``d = x − mean(x)`` (LayerNorm) or ``d = x`` (RMS).

    ``reduce`` is ``"mean"`` (the target's mean) or ``"linear"`` (a linear with constant 1/C
    weights); ``scale`` is the row scale ``d · r`` from :func:`~archnet_fx.surrogate.products.make_mul`:
    a ``mul`` of two activations, or a ``matmul`` ``r[..., None] @ d[..., None, :]`` — then Σd²
    is the row dot product ``d[..., None, :] @ d[..., :, None]`` too (both exact).
    """

    style = "emulation"

    def __init__(self, replaces: str, channels: int, center: bool, reduce: str, scale: nn.Module,
                 rstd: PWL, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.replaces = replaces
        self.center, self.reduce, self.scale = center, reduce, scale
        self.inv_c = 1.0 / channels
        self.register_buffer("avg", torch.full((1, channels), 1.0 / channels))
        self.rstd = rstd
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().float())

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.reduce == "mean":
            return t.mean(-1, keepdim=True)
        return F.linear(t, self.avg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self._mean(x) if self.center else x
        if self.scale.mode == "matmul":
            ms = torch.matmul(d.unsqueeze(-2), d.unsqueeze(-1)).squeeze(-1) * self.inv_c
        else:
            ms = self._mean(d * d)
        y = self.scale(d, self.rstd(ms))
        y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


class NormAffine(Surrogate):
    """``y = x · a + b`` per channel (Arch-Net's LayerNorm → BatchNorm-like affine)."""

    style = "structural"

    def __init__(self, replaces: str, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.replaces = replaces
        self.weight = nn.Parameter(scale.detach().clone().float())
        self.bias = nn.Parameter(shift.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


# --------------------------------------------------------------------------- matches


@dataclass
class NormMatch:
    """One normalization found in the graph, in any spelling."""
    replaces: str                     # "layer_norm" | "rms_norm"
    x: torch.fx.Node
    channels: int
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    out: torch.fx.Node                # node whose uses the surrogate takes over
    nodes: set = field(default_factory=set)  # every node of the match (chains)
    anchor: torch.fx.Node | None = None  # the node the rule was tried on

    @property
    def center(self) -> bool:
        return self.replaces == "layer_norm"

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The exact function (float64) on rows ``x`` [N, C]."""
        x = x.double()
        d = x - x.mean(-1, keepdim=True) if self.center else x
        y = d * (d.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt()
        if self.weight is not None:
            y = y * self.weight.double()
        if self.bias is not None:
            y = y + self.bias.double()
        return y


def _last_dim(dim: Any, rank: int | None) -> bool:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    if not isinstance(dim, int) or isinstance(dim, bool):
        return False
    return dim == -1 or (rank is not None and dim == rank - 1)


def _rank(n: Any, ctx: Any) -> int | None:
    s = ctx.shape(n)
    return None if s is None else len(s)


def _kw(n: Any, ctx: Any) -> dict:
    if not isinstance(n, torch.fx.Node) or n.op not in ("call_function", "call_method"):
        return {}
    return call_kwargs(n, ctx.gm) or {}


def _is(n: Any, kind: str, ctx: Any) -> bool:
    return isinstance(n, torch.fx.Node) and n.op in ("call_function", "call_method") \
        and ctx.kind(n) == kind


def _operands(n: Any, kind: str, ctx: Any) -> tuple[Any, Any] | None:
    """(a, b) of a binary ``kind`` node with ``alpha`` (if any) equal to 1."""
    if not _is(n, kind, ctx):
        return None
    kw = _kw(n, ctx)
    if kw.get("alpha", 1) != 1 or "input" not in kw or "other" not in kw:
        return None
    return kw["input"], kw["other"]


def _square_of(n: Any, ctx: Any) -> torch.fx.Node | None:
    """``t`` if ``n`` computes ``t²`` (``t**2``, ``t.pow(2)``, ``t*t``, ``square(t)``)."""
    if _is(n, "pow", ctx):
        kw = _kw(n, ctx)
        t = kw.get("input", kw.get("self"))
        e = 2 if target_name(n) == "square" else kw.get("exponent", kw.get("other"))
        if isinstance(t, torch.fx.Node) and isinstance(e, (int, float)) and \
                not isinstance(e, bool) and float(e) == 2.0:
            return t
        return None
    ab = _operands(n, "mul", ctx)
    if ab is not None and ab[0] is ab[1] and isinstance(ab[0], torch.fx.Node):
        return ab[0]
    return None


def _mean_last(n: Any, ctx: Any) -> torch.fx.Node | None:
    """``t`` if ``n`` is ``t.mean(-1, keepdim=True)``."""
    if not _is(n, "mean", ctx):
        return None
    kw = _kw(n, ctx)
    t = kw.get("input")
    if not isinstance(t, torch.fx.Node) or kw.get("dtype") is not None:
        return None
    if not kw.get("keepdim", False) or not _last_dim(kw.get("dim"), _rank(t, ctx)):
        return None
    return t


def _var_last(n: Any, ctx: Any) -> torch.fx.Node | None:
    """``t`` if ``n`` is the biased ``t.var(-1, keepdim=True)``."""
    if not _is(n, "var", ctx) or produces_sequence(n):
        return None
    kw = _kw(n, ctx)
    t = kw.get("input")
    if not isinstance(t, torch.fx.Node) or not kw.get("keepdim", False):
        return None
    if kw.get("correction") is not None:
        biased = kw["correction"] in (0, 0.0)
    else:
        biased = kw.get("unbiased", True) is False
    if not biased or not _last_dim(kw.get("dim"), _rank(t, ctx)):
        return None
    return t


def _center_of(n: Any, ctx: Any) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """``(x, μ)`` if ``n`` is ``x − μ`` with ``μ = x.mean(-1, keepdim=True)``."""
    ab = _operands(n, "sub", ctx)
    if ab is None:
        return None
    x, mu = ab
    if isinstance(x, torch.fx.Node) and _mean_last(mu, ctx) is x:
        return x, mu
    return None


def _param(v: Any, channels: int, ctx: Any) -> torch.Tensor | None:
    """A constant per-channel (or scalar) tensor operand, broadcast to ``[C]``."""
    if not isinstance(v, torch.fx.Node) or v.op != "get_attr":
        return None
    t = ctx.const(v)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return None
    if t.numel() == 1:
        return t.detach().reshape(1).expand(channels).clone()
    if t.shape[-1] == channels and t.numel() == channels:
        return t.detach().reshape(channels).clone()
    return None


def _neighbourhood(anchor: torch.fx.Node, depth: int = 6) -> list[torch.fx.Node]:
    seen, frontier = {anchor}, [anchor]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for m in list(n.all_input_nodes) + list(n.users):
                if m not in seen and m.op != "output":
                    seen.add(m)
                    nxt.append(m)
        frontier = nxt
    return [n for n in anchor.graph.nodes if n in seen]


def _match_core(core: torch.fx.Node, ctx: Any) -> NormMatch | str:
    """Match the whole chain around ``core`` (an ``rsqrt`` or a ``sqrt``)."""
    is_rsqrt = _is(core, "rsqrt", ctx)
    den = _kw(core, ctx).get("input")
    nodes = {core}
    stat, eps = den, 0.0
    ab = _operands(den, "add", ctx)
    if ab is not None:
        a, b = ab
        if isinstance(b, (int, float)) and isinstance(a, torch.fx.Node):
            stat, eps = a, float(b)
        elif isinstance(a, (int, float)) and isinstance(b, torch.fx.Node):
            stat, eps = b, float(a)
        nodes.add(den)
    if eps < 0:
        return "negative epsilon"
    nodes.add(stat)
    center = False
    if (sq := _mean_last(stat, ctx)) is not None:
        base = _square_of(sq, ctx)
        if base is None:
            return f"{stat.name} is a mean over the last axis but not of a square"
        nodes.add(sq)
        c = _center_of(base, ctx)
        if c is not None:
            center, (x, mu) = True, c
            nodes |= {base, mu}
        else:
            x = base
    elif (t := _var_last(stat, ctx)) is not None:
        center = True
        c = _center_of(t, ctx)
        x = c[0] if c is not None else t
        if c is not None:
            nodes |= {t, c[1]}
    else:
        return (f"{getattr(stat, 'name', stat)} is neither mean(x², -1, keepdim=True) nor "
                "var(x, -1, keepdim=True, unbiased=False)")
    # numerator · rsqrt(...) or numerator / sqrt(...)
    outs = []
    for u in core.users:
        ops = _operands(u, "mul" if is_rsqrt else "div", ctx)
        if ops is None:
            continue
        if is_rsqrt and ops[1] is core:
            num = ops[0]
        elif is_rsqrt and ops[0] is core:
            num = ops[1]
        elif not is_rsqrt and ops[1] is core:
            num = ops[0]
        else:
            continue
        if center:
            c = _center_of(num, ctx)
            if c is None or c[0] is not x:
                continue
            outs.append((u, {num, c[1]}))
        elif num is x:
            outs.append((u, set()))
    if len(outs) != 1:
        use = "x * rsqrt(...)" if is_rsqrt else "x / sqrt(...)"
        return (f"{core.name}: expected one use as {use} with the same "
                f"x{' − mean(x)' if center else ''}, found {len(outs)}")
    y, extra = outs[0]
    nodes |= extra | {y}
    shape = ctx.shape(x)
    if shape is None or not shape:
        return f"unknown shape of {x.name}"
    ch = int(shape[-1])
    if ctx.shape(y) is not None and ctx.shape(y) != shape:
        return "output shape differs from the input's (broadcasting chain)"
    # optional affine: · w then + b, each a constant per-channel tensor
    affine: dict[str, torch.Tensor] = {}
    for op in ("mul", "add"):
        if len(y.users) != 1:
            continue
        u = next(iter(y.users))
        ops = _operands(u, op, ctx)
        p = None if ops is None else _param(ops[1] if ops[0] is y else ops[0], ch, ctx)
        if p is not None:
            affine[op], y = p, u
            nodes.add(u)
    nodes.discard(x)
    return NormMatch("layer_norm" if center else "rms_norm", x, ch, eps, affine.get("mul"),
                     affine.get("add"), y, nodes)


def match_chain(anchor: torch.fx.Node, ctx: Any) -> NormMatch:
    """The hand-written norm that ``anchor`` belongs to (raises :class:`Refuse` saying why
    there is none)."""
    why = []
    for n in _neighbourhood(anchor):
        if _is(n, "rsqrt", ctx) or _is(n, "sqrt", ctx):
            m = _match_core(n, ctx)
            if isinstance(m, str):
                why.append(m)
            elif anchor in m.nodes:
                return m
            else:
                why.append(f"{n.name}'s norm chain does not contain {anchor.name}")
    if not why:
        raise Refuse(f"{anchor.name} is not part of a recognised norm chain (no rsqrt/sqrt nearby)")
    raise Refuse(f"{anchor.name} is not part of a recognised norm chain: " + "; ".join(why[:2]))


def match_op(node: torch.fx.Node, ctx: Any) -> NormMatch:
    """A ``layer_norm`` / ``rms_norm`` node in module, functional or ATen form (raises
    :class:`Refuse` with the reason it is not one we replace)."""
    kind = ctx.kind(node)
    if node.op == "call_module":
        m = ctx.module(node)
        x = node.args[0] if node.args else node.kwargs.get("input")
        shape, eps = tuple(m.normalized_shape), m.eps
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    else:
        if produces_sequence(node):
            raise Refuse(f"{target_name(node)} returns (out, mean, rstd); only the plain op is handled")
        kw = call_kwargs(node, ctx.gm)
        if kw is None:
            raise Refuse(f"cannot read the arguments of {node.name}")
        x, shape, eps = kw.get("input"), kw.get("normalized_shape"), kw.get("eps")
        w, b = kw.get("weight"), kw.get("bias")
        for name, v in (("weight", w), ("bias", b)):
            if isinstance(v, torch.fx.Node) and ctx.const(v) is None:
                raise Refuse(f"{name} is computed at run time, not a constant")
        w, b = ctx.const(w), ctx.const(b)
    if not isinstance(x, torch.fx.Node):
        raise Refuse("input is not a graph value")
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        raise Refuse(f"normalized_shape "
                     f"{tuple(shape) if isinstance(shape, (list, tuple)) else shape} spans more "
                     "than the last axis; only last-axis normalization is supported")
    # one trailing dim: it is x's last (a traced ``x.shape[-1]`` entry is a Node, not an int)
    xs = ctx.shape(x)
    ch = int(shape[0]) if isinstance(shape[0], int) else (int(xs[-1]) if xs else None)
    if ch is None:
        raise Refuse("unknown channel count")
    if xs and int(xs[-1]) != ch:
        raise Refuse(f"normalized_shape ({ch},) does not match the input's last axis {xs[-1]}")
    if eps is None:  # rms_norm default
        eps = torch.finfo(ctx.dtype(x) or torch.float32).eps
    return NormMatch(kind, x, ch, float(eps), None if w is None else w.detach().reshape(ch),
                     None if b is None else b.detach().reshape(ch), node, {node})


# --------------------------------------------------------------------------- calibration


def _rows(m: NormMatch, anchor: torch.fx.Node, ctx: Any) -> tuple[torch.Tensor | None,
                                                                     torch.Tensor | None]:
    """(x rows [N, C] or None, per-row mean squares Σd²/C [N] or None) from calibration."""
    xrows = drows = den = None
    for n in [anchor] + sorted(m.nodes - {anchor}, key=lambda k: k.name):
        s = ctx.samples(n)
        if s is None or not s.inputs:
            continue
        args = [a for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if n.op == "call_module":
            args = args[:1]
        for a, rows in zip(args, s.inputs):
            if a is m.x and rows.shape[-1] == m.channels and xrows is None:
                xrows = rows
            elif m.center and _center_of(a, ctx) is not None and rows.shape[-1] == m.channels:
                drows = rows if drows is None else drows
            elif rows.shape[-1] == 1 and n in m.nodes and (_is(n, "rsqrt", ctx) or
                                                           _is(n, "sqrt", ctx)):
                den = rows if den is None else den
    if xrows is not None:
        d = xrows.double()
        d = d - d.mean(-1, keepdim=True) if m.center else d
        return xrows, d.pow(2).mean(-1)
    if drows is not None:
        return None, drows.double().pow(2).mean(-1)
    if den is not None:
        return None, (den.double().flatten() - m.eps).clamp_min(0)
    return None, None


def _rsqrt_range(ms: torch.Tensor | None, eps: float) -> tuple[float, float]:
    if ms is None or not ms.numel():
        log.warning("no calibration samples for a norm: assuming variances in %s", DEFAULT_RANGE)
        return DEFAULT_RANGE
    ms = ms[torch.isfinite(ms)]
    lo, hi = float(ms.min()), float(ms.max())
    hi = max(hi, 1e-8) * 2.0
    floor = max(eps / 2, hi * 1e-9, 1e-12)
    lo = max(lo / 2.0, floor)
    if hi <= lo * 1.01:
        hi = lo * 4
    return lo, hi


# --------------------------------------------------------------------------- builders


def match_norm(node: torch.fx.Node, ctx: Any) -> NormMatch:
    """The rule protocol's matcher: the norm ``node`` is (an op) or belongs to (a hand-written
    chain, whose last node the surrogate replaces); refuses with the reason there is none."""
    m = match_op(node, ctx) if ctx.kind(node) in NORM_KINDS else match_chain(node, ctx)
    return dataclasses.replace(m, anchor=node)


def _reducer(target: Target) -> str:
    return "mean" if target.supports("mean") else "linear"


def build_emulate(m: NormMatch, ctx: Any) -> Replacement:
    node = m.anchor
    scale = make_mul(ctx.target, "row_y", exact=True)
    if isinstance(scale, str):
        raise Refuse(scale)
    if m.center and not ctx.target.supports("sub"):
        raise Refuse(f"{ctx.target.name} lacks sub (needed for x − mean)")
    _, ms = _rows(m, node, ctx)
    lo, hi = _rsqrt_range(ms, m.eps)
    pwl = fit_rsqrt(lo, hi, m.eps, 2 * ctx.options.knots)
    weight = m.weight if m.weight is not None else torch.ones(m.channels)
    bias = m.bias if m.bias is not None else (torch.zeros(m.channels) if m.center else None)
    mod = NormEmulation(m.replaces, m.channels, m.center, _reducer(ctx.target), scale, pwl,
                        weight, bias)
    return Replacement(mod, (m.x,), None if m.out is node else m.out)


def affine_init(m: NormMatch, xrows: torch.Tensor | None, ms: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (a, b) with x·a + b ≈ norm(x) on the calibration rows (least squares)."""
    gamma = m.weight.double() if m.weight is not None else torch.ones(m.channels,
                                                                     dtype=torch.float64)
    beta = m.bias.double() if m.bias is not None else torch.zeros(m.channels, dtype=torch.float64)
    mean_rstd = float((ms + m.eps).rsqrt().mean()) if ms is not None and ms.numel() else 1.0
    a_avg, b_avg = gamma * mean_rstd, beta.clone()
    if xrows is None or xrows.shape[0] < 2:
        return a_avg.float(), b_avg.float()
    x = xrows.double()
    y = m.reference(x)
    xm, ym = x.mean(0), y.mean(0)
    vx = (x - xm).pow(2).mean(0)
    cov = ((x - xm) * (y - ym)).mean(0)
    ok = vx > 1e-12 * vx.max().clamp_min(1e-30)
    a = torch.where(ok, cov / vx.clamp_min(1e-30), a_avg)
    b = torch.where(ok, ym - a * xm, b_avg - a_avg * xm)
    return a.float(), b.float()


def build_affine(m: NormMatch, ctx: Any) -> Replacement:
    node = m.anchor
    xrows, ms = _rows(m, node, ctx)
    a, b = affine_init(m, xrows, ms)
    mod = NormAffine(m.replaces, a, b)
    return Replacement(mod, (m.x,), None if m.out is node else m.out)


_EMU_NEEDS = frozenset({"linear", "relu", "reshape", "add", "mul"})
_AFFINE_NEEDS = frozenset({"mul", "add"})

CANDIDATES: tuple[Candidate, ...] = tuple(
    Candidate(name, kind, style, needs, build, doc, needs_mul, match=match_norm)
    for kind, prefix in (("layer_norm", "ln"), ("rms_norm", "rms"))
    for name, style, needs, build, doc, needs_mul in (
        (f"{prefix}_emulate", "emulation", _EMU_NEEDS | ({"sub"} if kind == "layer_norm"
                                                         else set()), build_emulate,
         "(x−μ)·pwl(Σ(x−μ)²/C)·γ+β, PWL ≈ 1/√(v+ε) on the calibrated variance range", True),
        (f"{prefix}_affine", "structural", _AFFINE_NEEDS, build_affine,
         "per-channel x·a+b, least squares against the norm on calibration rows", False),
    )
) + tuple(
    Candidate(name, kind, style, needs, build, doc, needs_mul, match=match_norm)
    for kind in CHAIN_KINDS
    for name, style, needs, build, doc, needs_mul in (
        ("norm_chain_emulate", "emulation", _EMU_NEEDS, build_emulate,
         "a hand-written LayerNorm/RMSNorm chain as one emulated norm", True),
        ("norm_chain_affine", "structural", _AFFINE_NEEDS, build_affine,
         "a hand-written LayerNorm/RMSNorm chain as a per-channel affine", False),
    )
)

__all__ = ["CANDIDATES", "NormAffine", "NormEmulation", "NormMatch", "fit_rsqrt", "match_chain",
           "match_norm", "match_op"]

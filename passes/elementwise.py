"""Surrogates for the remaining elementwise ops, reductions and layout ops a target lacks.

Runs last among the surrogate families (after embedding, layernorm, softmax and activations), so
it sees what those left: hand-written maths (``x.pow(2).mean(-1)``, ``torch.rsqrt``, ``x / y``),
masks (``masked_fill``, ``where``), broadcasts and paddings a small NPU has no unit for.

=============  ===========================  =======================================================
kind           candidates (style)           maths
=============  ===========================  =======================================================
exp            pwl (emu), structural        a + Σ c_i relu(x − b_i), uniform knots, relative LSQ,
                                            flat left of the range (exp → 0)
log, sqrt,     pwl (emu), structural        same with geometric knots on the positive range
rsqrt,                                      (widened ×2 each way); 1/x on a negative range is
reciprocal                                  −g(−x)
pow            pwl (emu), exact,            x**n for n ∈ {1,2,3,4} as products (make-mul form),
               structural                   other exponents by PWL; c**x by PWL
div            pwl (emu), structural        x / y = x · PWL(1/y) (product of two activations in
                                            the target's legal form); c / y = PWL(c/y)
mul            product (exact),             two-activation product where the target forbids it:
               quarter_square (structural)  matmul with inner dimension 1 (exact), or
                                            ((x+y)² − (x−y)²)/4 with a PWL square
abs            relu_pair, relu_pwl (exact)  relu(x) + relu(−x);  2·relu(x) − x
neg            mul_const (exact)            x · (−1)
maximum,       relu_sub, abs_form (exact)   max = y + relu(x − y);  (x + y + |x − y|)/2
minimum                                     min = y − relu(y − x);  (x + y − |x − y|)/2
mean, sum      rowsum, avg_pool (exact)     permute the reduced dims last, reshape, linear with a
                                            constant 1/n (or 1) row; or adaptive average pooling
masked_fill,   prologue (host), blend       mask.float() is host prologue; x·(1−m) + v·m with the
where          (exact)                      product in the target's legal form
expand         prologue, add_zeros,         x + zeros(shape) (broadcast);  concat of copies
               concat (exact)
pad            prologue, concat, conv_pad   concat with blocks sliced from x (·0 + v, or edge /
               (exact)                      mirrored / wrapped slices); or a 1×1 identity
                                            depthwise conv whose own zero padding pads, then slice
creation       prologue, from_shape         zeros_like(x) = x·0 (+ v)
compare, cast  prologue                     only when every input is host-side (a mask from
                                            integer inputs); refused otherwise with the reason
=============  ===========================  =======================================================

``prologue`` marks a node host-side input preprocessing (``archnet.prologue``) when every input it
reads is a constant, a shape, an integer/bool input or already prologue — e.g. the
``zeros_like(mask).masked_fill_(mask, -inf)`` additive mask ``nn.MultiheadAttention`` builds.

Where an exact identity exists, ``pwl`` refuses (the exact candidate follows) unless the user
chose it by name or style. Exact candidates are exact up to float rounding (products by 0/1,
re-associated sums); the emulation errors on the calibrated range are stated in
``tests/passes/test_elementwise.py``.

Every surrogate here traces to ``linear``, ``relu``, ``add``/``sub``, ``mul`` by a constant,
``matmul``/``mul`` of two activations (per target), ``reshape``, ``permute``, ``slice``,
``concat``, ``conv`` 1×1 or pooling — and is checked against the target before it is used.
Shapes other than the batch dimension are fixed at capture, so the bodies bake them (with
``-1`` for the batch) and work for any batch size.
"""
from __future__ import annotations

from dataclasses import dataclass

import math
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from archnet_fx.capture import dynamic_seq
from archnet_fx.infra.rules import Refuse, Replacement
from archnet_fx.ir.meta import EXAMPLE_META_KEY
from archnet_fx.ir.shapes import propagate_shapes
from archnet_fx.ir.meta import PROLOGUE_KEY
from archnet_fx.ir.dataflow import activations, is_float, prologue_nodes, tensor_dtype
from archnet_fx.ir.opargs import call_kwargs
from archnet_fx.ir.opkinds import target_name
from archnet_fx.surrogate.pwl import PWL
from archnet_fx.surrogate.base import Candidate, Surrogate
from archnet_fx.surrogate.products import Mul, QuarterSquareMul, RowSum, make_mul

KINDS = ("exp", "log", "sqrt", "rsqrt", "reciprocal", "pow", "div", "mul", "abs", "neg",
         "maximum", "minimum", "mean", "sum", "masked_fill", "where", "expand", "pad",
         "creation", "compare", "cast")

_PWL_NEEDS = frozenset({"linear", "relu", "reshape", "add", "mul"})
_COARSE_KNOTS = 4
#: Largest ratio between consecutive geometric knots of an emulation PWL (more knots are used
#: on wide ranges): ≈ 1e-3 max relative error for 1/x, less for 1/√x and √x.
KNOT_RATIO = 1.08


# =========================================================================== helpers


def _kw(node: torch.fx.Node, ctx: Any) -> dict[str, Any]:
    return call_kwargs(node, ctx.gm) or {}


def _is_node(v: Any) -> bool:
    return isinstance(v, torch.fx.Node)


def _value_is_float(n: torch.fx.Node, ctx: Any) -> bool:
    if n.op == "get_attr":
        v = ctx.attr(n.target)
        return isinstance(v, torch.Tensor) and v.is_floating_point()
    if tensor_dtype(n) is None:  # created by this pass (a surrogate's float output)
        return n.op == "call_module"
    return is_float(n)


def _sample_range(node: torch.fx.Node, ctx: Any, arg: torch.fx.Node
                  ) -> tuple[float, float, torch.Tensor | None] | None:
    """(lo, hi, samples) of tensor argument ``arg`` of ``node`` seen in calibration, or None.

    The observer keeps the floating-point tensor arguments in call order (args, then kwargs).
    """
    s = ctx.samples(node)
    if s is None or not s.inputs:
        return None
    i = 0
    for a in list(node.args) + list(node.kwargs.values()):
        if _is_node(a) and _value_is_float(a, ctx):
            if a is arg:
                if i >= len(s.inputs):
                    return None
                lo, hi = s.range(i)
                return lo, hi, s.values(i)
            i += 1
    return None


def _explicit(ctx: Any, node: torch.fx.Node, kind: str, name: str, style: str) -> bool:
    """Did the user pick this candidate (by name or style) for this node or kind?"""
    choice = ctx.options.choices.get(node.name) or ctx.options.choices.get(kind)
    return choice in (name, style)


def _host_side(n: Any, acts: set, pro: set) -> bool:
    """A value the host has before the chip runs: constant, shape-derived, int/bool input,
    or prologue."""
    if not _is_node(n):
        return True
    if n not in acts or n in pro or n.meta.get(PROLOGUE_KEY):
        return True
    return n.op == "placeholder" and not is_float(n)


def _shape(n: Any, ctx: Any) -> tuple[int, ...] | None:
    """Static shape of a node (``ctx.shape``); a node this pass created (a surrogate replacing
    an earlier node) has none yet, so shapes are propagated again on the example inputs."""
    if _is_node(n) and n.meta.get("tensor_meta") is None and EXAMPLE_META_KEY in ctx.gm.meta:
        try:
            propagate_shapes(ctx.gm, *ctx.gm.meta[EXAMPLE_META_KEY])
        except Exception:  # noqa: BLE001 - shapes stay unknown; the builder refuses
            return None
    return ctx.shape(n)


def _is_activation(n: Any, ctx: Any) -> bool:
    return _is_node(n) and n in activations(ctx.gm)


# =========================================================================== surrogates


class PWLFunction(Surrogate):
    """``y = scale · pwl(sign · x)``: a pointwise function (``sign = −1`` mirrors 1/x to x < 0)."""

    def __init__(self, kind: str, pwl: PWL, style: str, sign: float = 1.0, scale: float = 1.0
                 ) -> None:
        super().__init__()
        self.replaces, self.style = kind, style
        self.pwl, self.sign, self.scale = pwl, float(sign), float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sign != 1.0:
            x = x * self.sign
        y = self.pwl(x)
        if self.scale != 1.0:
            y = y * self.scale
        return y


class IntPower(Surrogate):
    """``x ** n`` for n in 1..4 as exact products."""

    def __init__(self, n: int, mul: nn.Module) -> None:
        super().__init__()
        self.replaces, self.style, self.n, self.mul = "pow", "exact", int(n), mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.n == 1:
            return x * 1.0
        x2 = self.mul(x, x)
        if self.n == 2:
            return x2
        if self.n == 3:
            return self.mul(x2, x)
        return self.mul(x2, x2)


class Divide(Surrogate):
    """``x / y = x · r(y)`` with ``r ≈ 1/y`` (a PWL) and a legal product."""

    def __init__(self, recip: PWLFunction, mul: nn.Module, style: str) -> None:
        super().__init__()
        self.replaces, self.style = "div", style
        self.recip, self.mul = recip, mul

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.mul(x, self.recip(y))


class Product(Surrogate):
    """``x * y`` of two activations in a form the target runs."""

    def __init__(self, mul: nn.Module, style: str) -> None:
        super().__init__()
        self.replaces, self.style, self.mul = "mul", style, mul

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.mul(x, y)


class AbsReLU(Surrogate):
    """``|x| = relu(x) + relu(−x)`` (``form="pair"``) or ``2·relu(x) − x`` (``form="pwl"``)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.replaces, self.style, self.form = "abs", "exact", form
        if form == "pwl":  # trainable: same PWL module as the emulation candidates
            self.pwl = PWL(torch.tensor([0.0]), torch.tensor([2.0]), 0.0, -1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "pwl":
            return self.pwl(x)
        return torch.relu(x) + torch.relu(x * -1.0)


class Negate(Surrogate):
    """``−x = x · (−1)``."""

    replaces, style = "neg", "exact"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * -1.0


class MaxMin(Surrogate):
    """``max(x, y) = y + relu(x − y)``, ``min(x, y) = y − relu(y − x)`` (``relu_sub``), or
    ``(x + y ± |x − y|) / 2`` with ``|d| = relu(d) + relu(−d)`` (``abs_form``)."""

    def __init__(self, kind: str, form: str) -> None:
        super().__init__()
        self.replaces, self.style, self.form = kind, "exact", form

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.form == "relu_sub":
            if self.replaces == "maximum":
                return y + torch.relu(x - y)
            return y - torch.relu(y - x)
        d = x - y
        a = torch.relu(d) + torch.relu(d * -1.0)
        if self.replaces == "maximum":
            return (x + y + a) * 0.5
        return (x + y - a) * 0.5


class Reduce(Surrogate):
    """Mean/sum over ``dims`` as permute → reshape → linear(1/n or 1) → reshape (``rowsum``), or
    adaptive average pooling (``avg_pool``; ×n for a sum)."""

    def __init__(self, kind: str, form: str, perm: tuple[int, ...] | None,
                 flat: tuple[int, ...], n: int, out: tuple[int, ...], pool: tuple | None = None,
                 reduce: str | None = None, dim: int | None = None, keepdim: bool = False
                 ) -> None:
        super().__init__()
        self.replaces, self.style, self.form = kind, "exact", form
        self.perm, self.flat, self.out, self.pool = perm, flat, out, pool
        self.n = int(n)
        self.dim, self.keepdim = dim, bool(keepdim)
        if form == "rowsum":
            self.row = RowSum(n, 1.0 / n if kind == "mean" else 1.0)
        elif form == "rowsum_dynamic":   # one dim (of length n, or up to n when it varies)
            self.row = RowSum(n, 1.0 / n if kind == "mean" else 1.0, reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "rowsum_dynamic":
            if self.perm is not None:
                x = x.permute(*self.perm)
            y = self.row(x).squeeze(-1)
            return y.unsqueeze(self.dim) if self.keepdim else y
        if self.form == "rowsum":
            if self.perm is not None:
                x = x.permute(*self.perm)
            y = self.row(x.reshape(*self.flat))
        else:
            y = (F.adaptive_avg_pool1d(x, self.pool[0]) if len(self.pool) == 1
                 else F.adaptive_avg_pool2d(x, self.pool))
            if self.replaces == "sum":
                y = y * float(self.n)
        return y.reshape(*self.out)


class Blend(Surrogate):
    """``where(m, a, b) = a·m + b·(1 − m)`` with ``m = mask.float()`` computed on the host.

    ``a``/``b`` are tensors (arguments) or Python numbers; products of two activations use the
    target's legal form (``mul_a``/``mul_b``), products by a number are a plain ``mul``.
    """

    def __init__(self, kind: str, a: Any, b: Any, mul_a: nn.Module | None,
                 mul_b: nn.Module | None) -> None:
        super().__init__()
        self.replaces, self.style = kind, "exact"
        self.a_const = None if a is None else float(a)
        self.b_const = None if b is None else float(b)
        self.mul_a, self.mul_b = mul_a, mul_b

    def forward(self, m: torch.Tensor, t1: Any = None, t2: Any = None) -> torch.Tensor:
        # tensor operands arrive in order (a before b); numbers are stored on the module
        a, b = (t1, t2) if self.a_const is None else (None, t1)
        keep = m * -1.0 + 1.0
        ta = m * self.a_const if self.a_const is not None else self.mul_a(a, m)
        tb = keep * self.b_const if self.b_const is not None else self.mul_b(b, keep)
        return ta + tb


class ExpandAdd(Surrogate):
    """``x.expand(shape) = x + zeros(shape)`` (broadcasting add of a constant)."""

    def __init__(self, zeros: torch.Tensor) -> None:
        super().__init__()
        self.replaces, self.style = "expand", "exact"
        self.register_buffer("zeros", zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.zeros


class ExpandConcat(Surrogate):
    """Broadcast / tile by concatenating copies: ``cat([x] * r, dim)`` per repeated dim."""

    def __init__(self, view: tuple[int, ...] | None, reps: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        self.replaces, self.style = "expand", "exact"
        self.view, self.reps = view, reps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.view is not None:
            x = x.reshape(*self.view)
        for dim, r in self.reps:
            x = torch.cat([x] * r, dim)
        return x


class PadConcat(Surrogate):
    """Padding as concatenation: per padded dim, blocks sliced from ``x`` — ``x·0 + v``
    (constant), the edge slice (replicate), mirrored slices (reflect), the far end (circular) —
    concatenated around it; negative padding is a slice."""

    def __init__(self, plan: tuple[tuple[int, int, int, int], ...], mode: str, value: float
                 ) -> None:
        super().__init__()
        self.replaces, self.style = "pad", "exact"
        self.plan, self.mode, self.value = plan, mode, float(value)

    def _block(self, x: torch.Tensor, d: int, n: int, count: int, left: bool) -> torch.Tensor:
        if self.mode == "constant":
            b = x.narrow(d, 0, 1) * 0.0
            if self.value != 0.0:
                b = b + self.value
            return torch.cat([b] * count, d) if count > 1 else b
        if self.mode == "replicate":
            e = x.narrow(d, 0 if left else n - 1, 1)
            return torch.cat([e] * count, d) if count > 1 else e
        if self.mode == "reflect":
            idx = range(count, 0, -1) if left else range(n - 2, n - 2 - count, -1)
            parts = [x.narrow(d, i, 1) for i in idx]
            return torch.cat(parts, d) if len(parts) > 1 else parts[0]
        # circular
        return x.narrow(d, n - count, count) if left else x.narrow(d, 0, count)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for d, n, lo, hi in self.plan:
            if lo < 0:
                x = x.narrow(d, -lo, n + lo)
                n = n + lo
                lo = 0
            if hi < 0:
                x = x.narrow(d, 0, n + hi)
                n = n + hi
                hi = 0
            parts = []
            if lo > 0:
                parts.append(self._block(x, d, n, lo, True))
            parts.append(x)
            if hi > 0:
                parts.append(self._block(x, d, n, hi, False))
            if len(parts) > 1:
                x = torch.cat(parts, d)
        return x


class PadConv(Surrogate):
    """Zero padding of the last 1 or 2 dims by an identity depthwise 1×1 conv whose own
    (symmetric) zero padding pads, then slicing away the excess on the smaller side."""

    def __init__(self, channels: int, spatial: int, pads: tuple[tuple[int, int], ...],
                 sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.replaces, self.style = "pad", "exact"
        self.register_buffer("w", torch.ones((channels, 1) + (1,) * spatial))
        self.groups = channels
        self.sym = tuple(max(a, b) for a, b in pads)
        self.crop = tuple((p - a, n + a + b) for p, (a, b), n in zip(self.sym, pads, sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.sym) == 1:
            y = F.conv1d(x, self.w, None, 1, self.sym, 1, self.groups)
        else:
            y = F.conv2d(x, self.w, None, 1, self.sym, 1, self.groups)
        nd = len(self.sym)
        for i, (start, length) in enumerate(self.crop):
            y = y.narrow(i - nd, start, length)
        return y


class FromShape(Surrogate):
    """``zeros_like(x) = x·0``, ``ones_like``/``full_like(x, v) = x·0 + v``."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.replaces, self.style, self.value = "creation", "exact", float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 0.0
        if self.value != 0.0:
            y = y + self.value
        return y


# =========================================================================== references


def _pointwise_ref(kind: str, node: torch.fx.Node, ctx: Any
                   ) -> tuple[Callable, torch.fx.Node, str, float | None]:
    """(fn, tensor input, spacing, left slope) of a unary pointwise node (raises Refuse saying why not)."""
    kw = _kw(node, ctx)
    name = target_name(node)
    x = kw.get("input", node.args[0] if node.args else None)
    if kind == "exp":
        if name == "exp2":
            return (lambda t: torch.exp2(t)), x, "uniform", 0.0
        return torch.exp, x, "uniform", 0.0
    if kind == "log":
        fns = {"log2": torch.log2, "log10": torch.log10, "log1p": torch.log1p}
        fn = fns.get(name, torch.log)
        return fn, x, ("uniform" if name == "log1p" else "geometric"), None
    if kind == "sqrt":
        return torch.sqrt, x, "geometric", None
    if kind == "rsqrt":
        return torch.rsqrt, x, "geometric", None
    if kind == "reciprocal":
        return torch.reciprocal, x, "geometric", None
    if kind == "pow":
        base, exp = kw.get("input", x), kw.get("exponent", kw.get("other"))
        if name == "square":
            base, exp = x, 2
        if _is_node(base) and not _is_node(exp):
            c = float(exp)
            return (lambda t: torch.pow(t, c)), base, (
                "uniform" if c == int(c) and c > 0 else "geometric"), None
        if _is_node(exp) and not _is_node(base):
            c = float(base)
            if c <= 0:
                raise Refuse(f"{c} ** x is not real-valued for all x")
            return (lambda t: torch.pow(torch.tensor(c, dtype=t.dtype), t)), exp, "uniform", (
                0.0 if c > 1 else None)
        raise Refuse("pow of two tensors (x ** y) has no pointwise surrogate")
    raise Refuse(f"no reference for {kind}")


def _exponent(node: torch.fx.Node, ctx: Any) -> float | None:
    kw = _kw(node, ctx)
    if target_name(node) == "square":
        return 2.0
    e = kw.get("exponent", kw.get("other"))
    if _is_node(kw.get("input")) and isinstance(e, (int, float)) and not isinstance(e, bool):
        return float(e)
    return None


def _positive_fit(fn: Callable, lo: float, hi: float, knots: int, samples: Any, name: str,
                  dense: bool = False) -> tuple[PWL, float]:
    """Geometric fit on a one-signed range; returns (pwl, sign) with sign −1 for x < 0."""
    if lo > 0:
        sign = 1.0
    elif hi < 0 and name in ("reciprocal", "odd"):
        sign, lo, hi = -1.0, -hi, -lo
        samples = None if samples is None else -samples
    elif lo <= 0 < hi and name in ("sqrt", "log", "pow"):
        lo = hi * 1e-4  # the function's domain starts at 0: fit from a small positive value
    else:
        raise Refuse(f"range [{lo:.3g}, {hi:.3g}] crosses 0, where {name} has a pole")
    lo, hi = lo / 2.0, hi * 2.0
    if dense:  # consecutive knots at most KNOT_RATIO apart, however wide the range
        knots = max(knots, math.ceil(math.log(hi / lo) / math.log(KNOT_RATIO)))
    if sign < 0:
        pwl = PWL.fit(lambda t: -fn(-t), samples, lo, hi, knots, "geometric", relative=True)
    else:
        pwl = PWL.fit(fn, samples, lo, hi, knots, "geometric", relative=(name != "log"))
    return pwl, sign


# =========================================================================== builders: pointwise


def _int_power(node: torch.fx.Node, ctx: Any) -> int | None:
    c = _exponent(node, ctx)
    if c is not None and c == int(c) and 1 <= c <= 4:
        return int(c)
    return None


def _exact_power_first(style: str) -> Callable:
    """Filter of the PWL forms of ``pow``: an integer exponent 1..4 has an exact product form
    (candidate ``exact``), used unless this style was chosen explicitly."""
    name = "pwl" if style == "emulation" else "structural"

    def refuse_integer_power(node: torch.fx.Node, ctx: Any) -> str | None:
        kind = ctx.kind(node)
        if kind == "pow" and _int_power(node, ctx) is not None and \
                not _explicit(ctx, node, kind, name, style):
            return ("integer exponent: the exact product form (candidate 'exact') is used; "
                    f"choose '{name}' explicitly to approximate it")
        return None
    return refuse_integer_power


def _pointwise(style: str, knots_of: Callable[[Any], int]) -> Callable:
    def build(node: torch.fx.Node, ctx: Any) -> Any:
        kind = ctx.kind(node)
        ref = _pointwise_ref(kind, node, ctx)
        fn, x, spacing, left = ref
        if not _is_node(x):
            raise Refuse("input is not a tensor")
        knots = knots_of(ctx)
        rng = _sample_range(node, ctx, x)
        if spacing == "uniform":
            lo, hi, samples = rng if rng is not None else (-4.0, 4.0, None)
            if kind == "exp":
                lo = max(lo, hi - 30.0)  # exp(x) < 1e-13·exp(hi) below: flat left segment
            span = max(hi - lo, 1e-3)
            lo, hi = lo - 0.05 * span, hi + 0.05 * span
            pwl = PWL.fit(fn, samples, lo, hi, knots, "uniform", left_slope=left,
                          relative=(kind == "exp" or left == 0.0))
            return Replacement(PWLFunction(kind, pwl, style), (x,))
        lo, hi, samples = rng if rng is not None else (1e-2, 1e2, None)
        pname = {"reciprocal": "reciprocal", "rsqrt": "rsqrt"}.get(kind, kind)
        if kind == "pow":
            c = _exponent(node, ctx)
            pname = "odd" if (c is not None and c == int(c) and int(c) % 2) else "pow"
        fitted = _positive_fit(fn, lo, hi, knots, samples, pname, dense=style == "emulation")
        pwl, sign = fitted
        return Replacement(PWLFunction(kind, pwl, style, sign=sign, scale=sign), (x,))
    return build


def _integer_power(node: torch.fx.Node, ctx: Any) -> str | None:
    return None if _int_power(node, ctx) is not None else \
        "exponent is not an integer in 1..4 (use pwl)"


def _build_pow_exact(node: torch.fx.Node, ctx: Any) -> Any:
    n = _int_power(node, ctx)
    x = _kw(node, ctx).get("input", node.args[0])
    s = _shape(x, ctx)
    mul = make_mul(ctx.target, shapes=(s, s), exact=True)
    if isinstance(mul, str):
        raise Refuse(mul)
    return Replacement(IntPower(n, mul), (x,))


def _div_operands(node: torch.fx.Node, ctx: Any) -> tuple[Any, Any]:
    kw = _kw(node, ctx)
    if kw.get("rounding_mode") is not None:
        raise Refuse(f"division with rounding_mode={kw['rounding_mode']!r} is not elementwise-smooth")
    return kw.get("input"), kw.get("other")


def _build_div(style: str, knots_of: Callable[[Any], int]) -> Callable:
    def build(node: torch.fx.Node, ctx: Any) -> Any:
        ops = _div_operands(node, ctx)
        x, y = ops
        if not _is_node(y):
            raise Refuse("divisor is a number (div_to_mul canonicalization handles x / c)")
        rng = _sample_range(node, ctx, y)
        lo, hi, samples = rng if rng is not None else (1e-2, 1e2, None)
        try:
            fitted = _positive_fit(torch.reciprocal, lo, hi, knots_of(ctx), samples,
                                   "reciprocal", dense=style == "emulation")
        except Refuse as r:
            raise Refuse("divisor " + r.reason) from None
        pwl, sign = fitted
        if not _is_node(x):  # c / y = c · (1/y): one PWL, scaled
            return Replacement(PWLFunction("div", pwl, style, sign=sign, scale=sign * float(x)), (y,))
        recip = PWLFunction("reciprocal", pwl, style, sign=sign, scale=sign)
        if _is_activation(x, ctx) and _is_activation(y, ctx):
            mul = make_mul(ctx.target, shapes=(_shape(x, ctx), _shape(y, ctx)))
            if isinstance(mul, str):
                raise Refuse(mul)
        else:
            mul = Mul()  # one side is a constant: a plain scale
        return Replacement(Divide(recip, mul, style), (x, y))
    return build


# =========================================================================== builders: exact


@dataclass(frozen=True)
class Operands:
    """A binary node's two tensor operands (the elementwise family's match)."""
    anchor: torch.fx.Node
    x: torch.fx.Node
    y: torch.fx.Node


def _match_operands(why: str) -> Callable[[torch.fx.Node, Any], Operands]:
    def match(node: torch.fx.Node, ctx: Any) -> Operands:
        kw = _kw(node, ctx)
        x, y = kw.get("input"), kw.get("other")
        if not (_is_node(x) and _is_node(y)):
            raise Refuse(why)
        return Operands(node, x, y)
    return match


_match_product = _match_operands("not a product of two tensors")


# product (exact): x·y in the target's legal two-activation form (make_mul).
def _build_product(m: Operands, ctx: Any) -> Replacement:
    x, y = m.x, m.y
    mul = make_mul(ctx.target, shapes=(_shape(x, ctx), _shape(y, ctx)), exact=True)
    if isinstance(mul, str):
        raise Refuse(mul)
    return Replacement(Product(mul, "exact"), (x, y))


# quarter_square (structural): x·y = ((x+y)² − (x−y)²)/4 with a PWL square.
def _build_quarter_square(m: Operands, ctx: Any) -> Replacement:
    x, y = m.x, m.y
    bound = 0.0
    for a in (x, y):
        r = _sample_range(m.anchor, ctx, a)
        bound += max(abs(r[0]), abs(r[1])) if r is not None else 4.0
    return Replacement(Product(QuarterSquareMul(1.05 * bound, knots=max(ctx.options.knots, 16)),
                   "structural"), (x, y))


def _unary_input(node: torch.fx.Node, ctx: Any) -> Any:
    kw = _kw(node, ctx)
    return kw.get("input", node.args[0] if node.args else None)


def _build_abs(form: str) -> Callable:
    def build(node: torch.fx.Node, ctx: Any) -> Any:
        return Replacement(AbsReLU(form), (_unary_input(node, ctx),))
    return build


def _build_neg(node: torch.fx.Node, ctx: Any) -> Any:
    return Replacement(Negate(), (_unary_input(node, ctx),))


def _build_maxmin(form: str) -> Callable:
    def build(m: Operands, ctx: Any) -> Replacement:
        return Replacement(MaxMin(ctx.kind(m.anchor), form), (m.x, m.y))
    return build


@dataclass(frozen=True)
class ReducePlan:
    """A mean/sum reduction: input, reduced dims (sorted, non-negative), keepdim, shapes."""
    anchor: torch.fx.Node
    x: torch.fx.Node
    dims: tuple[int, ...]
    keepdim: bool
    sx: tuple[int, ...]
    so: tuple[int, ...]


def _reduce_plan(node: torch.fx.Node, ctx: Any) -> ReducePlan:
    """The reduction ``node`` performs (the matcher of the reduction candidates); raises
    :class:`Refuse` saying why it is not one they rewrite."""
    kw = _kw(node, ctx)
    x = kw.get("input", node.args[0] if node.args else None)
    sx, so = _shape(x, ctx), _shape(node, ctx)
    if sx is None or so is None:
        raise Refuse("shapes unknown (run shape propagation)")
    if kw.get("dtype") is not None:
        raise Refuse("reduction with a dtype cast")
    dims = kw.get("dim")
    rank = len(sx)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    if any(_is_node(d) for d in dims):
        raise Refuse("reduced dims are computed at run time")
    dims = sorted({int(d) % rank for d in dims})
    if 0 in dims:
        raise Refuse("reduces over dim 0 (the batch dimension)")
    return ReducePlan(node, x, tuple(dims), bool(kw.get("keepdim", False)), sx, so)


def _out_view(so: tuple[int, ...]) -> tuple[int, ...]:
    return (-1,) + tuple(so[1:]) if so else (1,)


# rowsum (exact): reduced dims last, reshape, linear with a constant 1/n (sum: 1) row.
def _build_rowsum(plan: ReducePlan, ctx: Any) -> Replacement:
    node, x, dims, sx, so = plan.anchor, plan.x, plan.dims, plan.sx, plan.so
    kept = [d for d in range(len(sx)) if d not in dims]
    perm = tuple(kept + list(dims))
    dyn = dynamic_seq(ctx.gm)
    if dyn is not None and dyn[0] in sx[1:]:
        # a graph whose sequence length varies: no reshape to fixed sizes; one reduced dim,
        # summed by the target's sum or a ones-matmul when it is the sequence (a mean over a
        # varying length would need a division by it: the avg_pool candidate takes those)
        if len(dims) != 1:
            raise Refuse("several reduced dims in a graph with a dynamic sequence length")
        d = dims[0]
        varies = sx[d] == dyn[0]
        if varies and ctx.kind(node) == "mean":
            raise Refuse("a mean over the dynamic sequence needs a division by its length")
        reduce = ("sum" if ctx.target.supports("sum") else "ones_matmul") if varies else None
        return Replacement(Reduce(ctx.kind(node), "rowsum_dynamic",
                                  None if perm == tuple(range(len(sx))) else perm, (),
                                  max(dyn[1], sx[d]) if varies else sx[d], (), reduce=reduce,
                                  dim=d, keepdim=plan.keepdim), (x,))
    n = int(math.prod(sx[d] for d in dims))
    flat = (-1,) + tuple(sx[d] for d in kept[1:]) + (n,)
    return Replacement(Reduce(ctx.kind(node), "rowsum", None if perm == tuple(range(len(sx))) else perm,
                  flat, n, _out_view(so)), (x,))


def _pool_shape(plan: ReducePlan) -> tuple[int, ...] | None:
    """The adaptive-pool output size that reduces exactly ``plan.dims`` (None: none does)."""
    rank, dims = len(plan.sx), plan.dims
    if rank == 3 and dims == (2,):
        return (1,)
    if rank == 4 and dims == (2, 3):
        return (1, 1)
    if rank == 4 and dims == (3,):
        return (plan.sx[2], 1)
    return None


def _poolable(plan: ReducePlan, ctx: Any) -> str | None:
    if _pool_shape(plan) is None:
        return (f"pooling reduces the trailing dims of a 3-D/4-D tensor, not dims {plan.dims} "
                f"of {len(plan.sx)}-D")
    return None


# avg_pool (exact): adaptive average pooling to 1 over the reduced trailing dims (sum: × n).
def _build_avg_pool(plan: ReducePlan, ctx: Any) -> Replacement:
    n = int(math.prod(plan.sx[d] for d in plan.dims))
    return Replacement(Reduce(ctx.kind(plan.anchor), "avg_pool", None, (), n, _out_view(plan.so),
                              _pool_shape(plan)), (plan.x,))


# --------------------------------------------------------------------------- masks


def _mask_operands(node: torch.fx.Node, ctx: Any) -> tuple[Any, Any, Any]:
    """(mask, value where mask is true, value where false) of masked_fill / where."""
    kw = _kw(node, ctx)
    if ctx.kind(node) == "masked_fill":
        return kw.get("mask"), kw.get("value"), kw.get("input")
    if "condition" not in kw or "input" not in kw:
        raise Refuse("where(cond) with one argument returns indices")
    return kw["condition"], kw["input"], kw["other"]


def _scalar(v: Any, ctx: Any) -> float | None:
    """A Python number (or a constant 0-d tensor) as float; None for a tensor operand."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if _is_node(v) and v.op == "get_attr":
        t = ctx.attr(v.target)
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t)
    if _is_node(v):
        return None
    raise Refuse(f"unsupported operand {v!r}")


def _build_blend(node: torch.fx.Node, ctx: Any) -> Any:
    ops = _mask_operands(node, ctx)
    mask, a, b = ops
    if not _is_node(mask):
        raise Refuse("mask is not a tensor")
    acts = activations(ctx.gm)
    pro = prologue_nodes(ctx.gm, acts)
    if not _host_side(mask, acts, pro) or is_float(mask):
        raise Refuse("the mask is computed on the chip from float activations (a compare the "
                "target lacks); only masks from integer/bool inputs or constants can be blended")
    ca, cb = _scalar(a, ctx), _scalar(b, ctx)
    for c in (ca, cb):
        if c is not None and not math.isfinite(c):
            raise Refuse(f"fill value {c} is not finite: x·(1−m) + v·m would give NaN (0·inf); "
                    "candidate 'prologue' or the host can do it")
    args: list[Any] = []
    muls: list[nn.Module | None] = []
    for v, c in ((a, ca), (b, cb)):
        if c is not None:
            muls.append(None)
            continue
        args.append(v)
        mul = (make_mul(ctx.target, shapes=(_shape(v, ctx), _shape(mask, ctx)), exact=True)
               if v in acts else Mul())
        if isinstance(mul, str):
            raise Refuse(mul)
        muls.append(mul)
    with ctx.graph.inserting_before(node):
        if mask.op == "get_attr":  # a constant mask: store it as 0/1 floats
            m = ctx.add_tensor(f"{node.name}_mask", ctx.attr(mask.target).float(),
                               trainable=False)
        else:  # bool → 0/1 on the host (prologue, or computed from input shapes)
            m = ctx.stamp(ctx.graph.call_method("float", (mask,)))
    return Replacement(Blend(ctx.kind(node), ca, cb, muls[0], muls[1]), (m, *args))


# --------------------------------------------------------------------------- host prologue


def _build_prologue(node: torch.fx.Node, ctx: Any) -> Any:
    acts = activations(ctx.gm)
    pro = prologue_nodes(ctx.gm, acts)
    on_chip = [a.name for a in node.all_input_nodes if not _host_side(a, acts, pro)]
    if on_chip:
        kind = ctx.kind(node)
        extra = {"compare": " (thresholding a float activation has no exact ReLU form)",
                 "cast": " (no target here converts dtypes on the chip)",
                 "creation": " (use 'from_shape' for *_like of an activation)"}.get(kind, "")
        raise Refuse(f"reads on-chip activation(s) {', '.join(on_chip)}; {kind} runs on the chip "
                f"only if the target has it{extra}")
    with ctx.graph.inserting_before(node):
        new = ctx.graph.create_node(node.op, node.target, node.args, node.kwargs)
    for k, v in node.meta.items():
        new.meta.setdefault(k, v)
    new.meta[PROLOGUE_KEY] = True
    return Replacement(ctx.stamp(new), ())


# --------------------------------------------------------------------------- expand


def _expand_plan(node: torch.fx.Node, ctx: Any) -> tuple:
    """(input, in shape, out shape, in shape with leading 1s to the out rank, their count)."""
    name = target_name(node)
    x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    sx, so = _shape(x, ctx), _shape(node, ctx)
    if sx is None or so is None:
        raise Refuse("shapes unknown (run shape propagation)")
    if name == "repeat_interleave":
        raise Refuse("repeat_interleave (use a concat of slices by hand)")
    if name == "expand_as":
        sizes: list[Any] = []
    else:
        rest = list(node.args[1:]) + [v for k, v in node.kwargs.items()
                                      if k in ("size", "sizes", "repeats", "dims", "shape")]
        sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
    if any(_is_node(s) for s in sizes):
        raise Refuse("expands to a size computed at run time (a batch-dependent shape)")
    if name == "expand_as" and len(so) and (len(so) > len(sx) or so[0] != sx[0]):
        raise Refuse("expand_as over dim 0 (the batch size is only known at run time)")
    extra = len(so) - len(sx)
    return x, sx, so, (1,) * extra + tuple(sx), extra


def _build_expand_add(node: torch.fx.Node, ctx: Any) -> Any:
    plan = _expand_plan(node, ctx)
    x, sx, so, aligned, extra = plan
    zs = []
    for d, (i, o) in enumerate(zip(aligned, so)):
        if i == o and d >= extra:
            zs.append(1)
        elif i == 1 or d < extra:
            zs.append(o)
        else:
            raise Refuse(f"repeat tiles dim {d} of size {i} (only size-1 dims broadcast); use concat")
    return Replacement(ExpandAdd(torch.zeros(zs)), (x,))


def _build_expand_concat(node: torch.fx.Node, ctx: Any) -> Any:
    plan = _expand_plan(node, ctx)
    x, sx, so, aligned, extra = plan
    view = None
    if extra:
        view = (1,) * extra + ((-1,) + tuple(sx[1:]) if sx else ())
    reps = []
    for d, (i, o) in enumerate(zip(aligned, so)):
        if i == o:
            continue
        if o % i:
            raise Refuse(f"dim {d}: {i} does not tile to {o}")
        reps.append((d, o // i))
    return Replacement(ExpandConcat(view, tuple(reps)), (x,))


# --------------------------------------------------------------------------- pad


def _pad_args(node: torch.fx.Node, ctx: Any) -> tuple:
    """(input, its shape, pad list (last dim first), mode, value) (raises Refuse saying why not)."""
    if node.op == "call_module":
        m = ctx.module(node)
        x, pad = node.args[0], m.padding
        pad = (pad,) * 2 if isinstance(pad, int) else tuple(pad)
        mode = {"ReflectionPad": "reflect", "ReplicationPad": "replicate",
                "CircularPad": "circular"}
        mode = next((v for k, v in mode.items() if type(m).__name__.startswith(k)), "constant")
        value = float(getattr(m, "value", 0.0) or 0.0)
    else:
        kw = _kw(node, ctx)
        name = target_name(node)
        x, pad = kw.get("input"), kw.get("pad", kw.get("padding"))
        if pad is None or any(_is_node(p) for p in pad):
            raise Refuse("padding amounts unknown at compile time")
        pad = tuple(int(p) for p in pad)
        mode = "reflect" if "reflection" in name else "replicate" if "replication" in name else \
            kw.get("mode", "constant") or "constant"
        value = kw.get("value")
        if _is_node(value):
            raise Refuse("padding value is a tensor")
        value = float(value or 0.0)
    sx = _shape(x, ctx)
    if sx is None:
        raise Refuse("shapes unknown (run shape propagation)")
    return x, sx, pad, mode, value


def _build_pad_concat(node: torch.fx.Node, ctx: Any) -> Any:
    args = _pad_args(node, ctx)
    x, sx, pad, mode, value = args
    if mode not in ("constant", "replicate", "reflect", "circular"):
        raise Refuse(f"padding mode {mode!r}")
    plan = []
    rank = len(sx)
    for j in range(len(pad) // 2):
        d = rank - 1 - j
        lo, hi = pad[2 * j], pad[2 * j + 1]
        if d <= 0:
            raise Refuse("pads dim 0 (the batch dimension)")
        if lo or hi:
            plan.append((d, sx[d], lo, hi))
    return Replacement(PadConcat(tuple(plan), mode, value), (x,))


def _build_pad_conv(node: torch.fx.Node, ctx: Any) -> Any:
    args = _pad_args(node, ctx)
    x, sx, pad, mode, value = args
    if mode != "constant" or value != 0.0:
        raise Refuse("the conv's own padding pads with zeros only")
    if any(p < 0 for p in pad):
        raise Refuse("negative padding (cropping)")
    nd = len(pad) // 2
    if len(sx) not in (3, 4) or nd > len(sx) - 2 or nd == 0:
        raise Refuse(f"pads {nd} dims of a {len(sx)}-D tensor (needs N, C, spatial…)")
    spatial = len(sx) - 2
    pairs = [(0, 0)] * spatial
    for j in range(nd):
        pairs[spatial - 1 - j] = (pad[2 * j], pad[2 * j + 1])
    return Replacement(PadConv(sx[1], spatial, tuple(pairs), tuple(sx[2:])), (x,))


# --------------------------------------------------------------------------- creation


def _build_from_shape(node: torch.fx.Node, ctx: Any) -> Any:
    name = target_name(node)
    values = {"zeros_like": 0.0, "ones_like": 1.0, "empty_like": 0.0}
    kw = _kw(node, ctx)
    if name == "full_like":
        v = kw.get("fill_value")
        if not isinstance(v, (int, float)):
            raise Refuse("fill value is not a number")
        value = float(v)
    elif name in values:
        value = values[name]
    else:
        raise Refuse(f"{name} does not take its shape from an activation")
    x = kw.get("input", node.args[0] if node.args else None)
    if kw.get("dtype") not in (None, torch.float32) or not (_is_node(x) and is_float(x)):
        raise Refuse("creates a non-float tensor")
    return Replacement(FromShape(value), (x,))


# =========================================================================== candidates


def _knots(ctx: Any) -> int:
    return ctx.options.knots


def _coarse(ctx: Any) -> int:
    return _COARSE_KNOTS


_POINTWISE = ("exp", "log", "sqrt", "rsqrt", "reciprocal", "pow")
_HOST = ("masked_fill", "where", "expand", "pad", "creation", "compare", "cast")

CANDIDATES: tuple[Candidate, ...] = (
    # host prologue first where it applies: free on the chip and exact
    *(Candidate("prologue", k, "host", frozenset(), _build_prologue,
                "every input is host-side (constant, shape, int/bool input, prologue): the node "
                "is input preprocessing on the host")
      for k in _HOST),
    # pointwise functions
    *(Candidate("pwl", k, "emulation", _PWL_NEEDS, _pointwise("emulation", _knots),
                "f(x) ≈ a + s x + Σ c_i relu(x − b_i), knots geometric on positive ranges "
                "(uniform for exp), relative least squares on the calibrated range",
                filter=_exact_power_first("emulation"))
      for k in _POINTWISE),
    Candidate("exact", "pow", "exact", frozenset({"mul", "reshape"}), _build_pow_exact,
              "x**n, n ∈ 1..4, as products in the target's legal two-activation form",
              needs_mul=True, filter=_integer_power),
    *(Candidate("structural", k, "structural", _PWL_NEEDS, _pointwise("structural", _coarse),
                f"the same PWL with {_COARSE_KNOTS} knots: a coarse trainable start",
                filter=_exact_power_first("structural"))
      for k in _POINTWISE),
    Candidate("pwl", "div", "emulation", _PWL_NEEDS, _build_div("emulation", _knots),
              "x / y = x · PWL(1/y) (geometric knots on y's range), legal product",
              needs_mul=True),
    Candidate("structural", "div", "structural", _PWL_NEEDS, _build_div("structural", _coarse),
              f"x · PWL(1/y) with {_COARSE_KNOTS} knots", needs_mul=True),
    # exact identities
    Candidate("product", "mul", "exact", frozenset({"reshape"}), _build_product,
              "x·y as matmul(x[..., None], y[..., None, :]) with inner dimension 1",
              needs_mul=True, match=_match_product),
    Candidate("quarter_square", "mul", "structural", _PWL_NEEDS | {"sub"}, _build_quarter_square,
              "x·y = ((x+y)² − (x−y)²)/4 with a PWL square on the observed range",
              match=_match_product),
    Candidate("relu_pair", "abs", "exact", frozenset({"relu", "add", "mul"}), _build_abs("pair"),
              "|x| = relu(x) + relu(−x)"),
    Candidate("relu_pwl", "abs", "exact", _PWL_NEEDS, _build_abs("pwl"),
              "|x| = 2·relu(x) − x as a one-knot trainable PWL"),
    Candidate("mul_const", "neg", "exact", frozenset({"mul"}), _build_neg, "−x = x·(−1)"),
    *(Candidate(name, k, "exact", needs, _build_maxmin(name), doc,
                match=_match_operands("operands are not two tensors"))
      for k in ("maximum", "minimum")
      for name, needs, doc in (
          ("relu_sub", frozenset({"relu", "add", "sub"}),
           "max(x, y) = y + relu(x − y); min(x, y) = y − relu(y − x)"),
          ("abs_form", frozenset({"relu", "add", "sub", "mul"}),
           "max/min(x, y) = (x + y ± (relu(x − y) + relu(y − x))) / 2"))),
    *(Candidate("rowsum", k, "exact", frozenset({"linear", "reshape"}), _build_rowsum,
                "permute reduced dims last, reshape, linear with a constant 1/n (sum: 1) row",
                match=_reduce_plan)
      for k in ("mean", "sum")),
    *(Candidate("avg_pool", k, "exact", frozenset({"adaptive_avg_pool", "reshape"}),
                _build_avg_pool, "adaptive average pooling to 1 over the reduced trailing dims "
                "(sum: × n)", match=_reduce_plan, filter=_poolable)
      for k in ("mean", "sum")),
    *(Candidate("blend", k, "exact", frozenset({"mul", "add"}), _build_blend,
                "m = mask.float() on the host; a·m + b·(1 − m) with legal products")
      for k in ("masked_fill", "where")),
    Candidate("add_zeros", "expand", "exact", frozenset({"add"}), _build_expand_add,
              "x.expand(shape) = x + zeros(shape)"),
    Candidate("concat", "expand", "exact", frozenset({"concat"}), _build_expand_concat,
              "broadcast / tile by concatenating copies along each repeated dim"),
    Candidate("concat", "pad", "exact", frozenset({"concat", "slice", "mul"}), _build_pad_concat,
              "concat with blocks sliced from x (·0 + v, edge, mirrored or wrapped slices)"),
    Candidate("conv_pad", "pad", "exact", frozenset({"conv", "slice"}), _build_pad_conv,
              "identity depthwise 1×1 conv whose zero padding pads; slice off the excess"),
    Candidate("from_shape", "creation", "exact", frozenset({"mul"}), _build_from_shape,
              "zeros_like(x) = x·0; ones_like / full_like(x, v) = x·0 + v"),
)


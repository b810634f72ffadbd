"""Surrogates for pointwise activations: GELU (erf and tanh forms), SiLU, sigmoid, tanh,
hardswish, hardsigmoid, ELU/SELU/CELU, softplus, Mish, erf, leaky ReLU, ReLU6 and clamp.

Two candidates per kind, both built from ``linear``, ``relu``, ``reshape``, ``add`` and a
multiply by a (trainable) constant, so they are legal on every built-in target:

* ``pwl`` (emulation): ``f(x) ≈ a + s·x + Σ c_i relu(x − b_i)`` with breakpoints at quantiles
  of the inputs observed in calibration (plus a uniform share), coefficients by least squares,
  the slope left of the range pinned to the function's asymptote, the range always covering
  the function's saturation. Max error ≤ 1e-2 × max|f| over [−12, 12] with 32 knots (tanh
  5e-3, erf 7e-3; GELU/SiLU ~1e-3).
* ``relu_exact`` (exact) where the function *is* piecewise linear: ReLU6, hard sigmoid, leaky
  ReLU, PReLU with one slope, two-sided clamp.
* ``relu_form`` (structural, Arch-Net): the hard counterpart of the function written as a
  few-knot sum of ReLUs — GELU/SiLU/Mish/softplus/ELU → ReLU, sigmoid → hard sigmoid,
  tanh/erf → hard tanh — trainable like the PWL, a coarse start that distillation refines.
* ``hard_gate`` (structural, GELU and SiLU, chosen with ``choices``): ``x · clamp(a·x + b, 0,
  1)`` — the self-gated form ``x·σ(kx)`` with its gate made hard, as hardswish is for SiLU;
  ``a, b`` trainable, fitted by least squares on the calibrated inputs. Max error on [−6, 6]
  without calibration data 0.08 for GELU against ReLU's 0.17 (SiLU: 0.19 against 0.28), in
  four elementwise ops (a multiply, an add, a clamp, a product of two activations) where
  ``relu_form``'s trainable hinge takes seven.
* ``poly_gate`` (emulation, GELU and SiLU): ``x · clamp(½ + t·P(t²), 0, 1)``, ``t = clamp(x/L,
  −1, 1)``, ``P`` cubic (an odd degree-7 gate), fitted by least squares with the gate pinned to
  1 at ``t = 1``. Near-exact (GELU: max error 5e-3 on [−6, 6]) in a dozen elementwise ops and
  no hidden tensor, so on a target that fuses elementwise epilogues it costs what ``hard_gate``
  costs; the measured selection weighs it against ``pwl``.

Everything the family knows per kind — the reference function, the slope the PWL is pinned to
on the left, the saturation range the fit always covers, the hard (ReLU) form and the exact
knots — is one row of :data:`POINTWISE`; the candidates are generated from those rows.

The pass fires only where the target lacks the kind (on ``dsp_c`` GELU, SiLU, sigmoid and tanh
are native lookup tables and stay).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from archnet_fx.infra.rules import Refuse, Replacement
from archnet_fx.ir.opargs import call_kwargs
from archnet_fx.surrogate.pwl import PWL, subsample
from archnet_fx.surrogate.base import Candidate, Surrogate
from archnet_fx.surrogate.products import make_mul

_PWL_NEEDS = frozenset({"linear", "relu", "reshape", "add", "mul"})


class PointwiseSurrogate(Surrogate):
    """``y = pwl(x)`` elementwise."""

    def __init__(self, kind: str, pwl: PWL, style: str) -> None:
        super().__init__()
        self.replaces, self.style = kind, style
        self.pwl = pwl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pwl(x)


def _params(node: torch.fx.Node, gm: torch.nn.Module) -> dict[str, Any]:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return {k: getattr(m, k) for k in ("approximate", "negative_slope", "alpha", "beta",
                                           "threshold", "min_val", "max_val", "scale", "weight")
                if hasattr(m, k)}
    return call_kwargs(node, gm) or {}


Reference = Callable[[torch.Tensor], torch.Tensor]
Knots = tuple  # (breakpoints, coefficients, bias, slope): f = bias + slope·x + Σ c relu(x − b)


def _elu(p: dict, node: torch.fx.Node) -> Reference:
    alpha, scale = float(p.get("alpha", 1.0)), float(p.get("scale", 1.0))
    if node.op != "call_module" and "selu" in str(node.target):
        return F.selu
    if node.op != "call_module" and "celu" in str(node.target):
        return lambda x: F.celu(x, alpha)
    return lambda x: scale * F.elu(x, alpha)


def _clamp(p: dict, node: torch.fx.Node) -> Reference:
    lo, hi = p.get("min_val", p.get("min")), p.get("max_val", p.get("max"))
    if isinstance(lo, torch.fx.Node) or isinstance(hi, torch.fx.Node):
        raise Refuse("clamp bounds are tensors")
    return lambda x: x.clamp(None if lo is None else float(lo), None if hi is None
                             else float(hi))


def _prelu(p: dict, node: torch.fx.Node) -> Reference:
    w = p.get("weight")
    if isinstance(w, torch.Tensor) and w.numel() == 1:
        a = float(w.detach())
        return lambda x: F.leaky_relu(x, a)
    raise Refuse("per-channel PReLU is not pointwise-identical across channels")


def _one_slope_knots(fn: Reference) -> Knots:
    """leaky ReLU / one-slope PReLU: a·x + (1 − a)·relu(x)."""
    a = float(fn(torch.tensor(-1.0)) * -1.0)
    return [0.0], [1.0 - a], 0.0, a


def _clamp_knots(fn: Reference) -> Knots:
    """Two-sided clamp: lo + relu(x − lo) − relu(x − hi)."""
    lo_v, hi_v = fn(torch.tensor(-1e30)).item(), fn(torch.tensor(1e30)).item()
    if not (math.isfinite(lo_v) and math.isfinite(hi_v)):
        raise Refuse("one-sided clamp: use the pwl candidate")
    return [lo_v, hi_v], [1.0, -1.0], lo_v, 0.0


_RELU: Knots = ([0.0], [1.0], 0.0, 0.0)                              # relu(x)
_HARD_SIGMOID: Knots = ([-3.0, 3.0], [1 / 6, -1 / 6], 0.0, 0.0)      # relu6(x + 3) / 6
_HARD_TANH: Knots = ([-1.0, 1.0], [1.0, -1.0], -1.0, 0.0)            # clamp(x, −1, 1)


@dataclass(frozen=True)
class Pointwise:
    """What the family knows about one pointwise kind.

    ``reference(params, node)``: the exact function (float64 in, float64 out); raises
    :class:`Refuse` where the node has no pointwise meaning. ``left_slope``: the asymptotic
    slope left of the data, to which the PWL's leftmost segment is pinned (``None``: fitted).
    ``saturation``: ``|x|`` beyond which the function is flat or linear to within ~1e-4 — the
    fit always covers it, so the end segments extrapolate with the right slopes even when
    calibration saw only a narrow range (few samples, e.g. a pooler's tanh). ``hard``: the
    function's hard (ReLU/clamp) counterpart as knots — Arch-Net's structural form. ``exact``:
    knots equal to the function (a constant, or computed from the reference).
    """
    reference: Callable[[dict, torch.fx.Node], Reference]
    left_slope: float | None = None
    saturation: float = 0.0
    hard: Knots | None = None
    exact: Knots | Callable[[Reference], Knots] | None = None
    gate: bool = False  # a self-gated x·σ(kx) form: hard_gate applies


def _fixed(fn: Reference) -> Callable[[dict, torch.fx.Node], Reference]:
    return lambda p, node: fn


#: The one table of per-kind facts, in the order candidates are listed.
POINTWISE: dict[str, Pointwise] = {
    "gelu": Pointwise(lambda p, n: (lambda x, a=p.get("approximate", "none") or "none":
                                    F.gelu(x, approximate=a)),
                      left_slope=0.0, saturation=5.0, hard=_RELU, gate=True),
    "silu": Pointwise(_fixed(F.silu), left_slope=0.0, saturation=10.0, hard=_RELU, gate=True),
    "sigmoid": Pointwise(_fixed(torch.sigmoid), left_slope=0.0, saturation=10.0,
                         hard=_HARD_SIGMOID),
    "tanh": Pointwise(_fixed(torch.tanh), left_slope=0.0, saturation=5.0, hard=_HARD_TANH),
    "hardswish": Pointwise(_fixed(F.hardswish), left_slope=0.0, saturation=3.5,
                           hard=([-3.0, 0.0, 3.0], [0.0, 2 / 3, 1 / 3], 0.0, 0.0)),
    "hardsigmoid": Pointwise(_fixed(F.hardsigmoid), left_slope=0.0, saturation=3.5,
                             hard=_HARD_SIGMOID, exact=_HARD_SIGMOID),
    "elu": Pointwise(_elu, left_slope=0.0, saturation=10.0,
                     hard=([-1.0, 0.0], [1.0, 0.0], -1.0, 0.0)),       # max(x, −1)
    "softplus": Pointwise(lambda p, n: (lambda x, b=float(p.get("beta", 1.0)),
                                        t=float(p.get("threshold", 20.0)): F.softplus(x, b, t)),
                          left_slope=0.0, saturation=10.0, hard=_RELU),
    "mish": Pointwise(_fixed(F.mish), left_slope=0.0, saturation=10.0, hard=_RELU),
    "erf": Pointwise(_fixed(torch.erf), left_slope=0.0, saturation=4.0, hard=_HARD_TANH),
    "leaky_relu": Pointwise(lambda p, n: (lambda x, a=float(p.get("negative_slope", 0.01)):
                                          F.leaky_relu(x, a)), exact=_one_slope_knots),
    "relu6": Pointwise(_fixed(lambda x: x.clamp(0.0, 6.0)), left_slope=0.0,
                       exact=([0.0, 6.0], [1.0, -1.0], 0.0, 0.0)),
    "clamp": Pointwise(_clamp, exact=_clamp_knots),
    "prelu": Pointwise(_prelu, exact=_one_slope_knots),
}


def reference(kind: str, node: torch.fx.Node, gm: torch.nn.Module) -> Reference:
    """The exact function a node computes, as a callable on float64 tensors (raises
    :class:`Refuse` where there is none)."""
    facts = POINTWISE.get(kind)
    if facts is None:
        raise Refuse(f"no reference for {kind}")
    return facts.reference(_params(node, gm), node)


def _range(node: torch.fx.Node, ctx: Any) -> tuple[float, float, torch.Tensor | None]:
    sat = POINTWISE[ctx.kind(node)].saturation
    s = ctx.samples(node)
    if s is None or not s.inputs:
        return min(-8.0, -sat), max(8.0, sat), None
    lo, hi = s.range(0)
    span = max(hi - lo, 1e-3)
    return min(lo - 0.05 * span, -sat), max(hi + 0.05 * span, sat), s.values(0)


def _knots_surrogate(kind: str, knots: Knots, style: str, node: torch.fx.Node) -> Replacement:
    b, c, bias, slope = knots
    pwl = PWL(torch.tensor(b), torch.tensor(c), bias, slope)
    return Replacement(PointwiseSurrogate(kind, pwl, style), (node.args[0],))


# pwl (emulation): f ≈ a + s·x + Σ c_i relu(x − b_i), least squares on the calibrated range.
def _build_pwl(node: torch.fx.Node, ctx: Any) -> Replacement:
    kind = ctx.kind(node)
    fn = reference(kind, node, ctx.gm)
    lo, hi, samples = _range(node, ctx)
    pwl = PWL.fit(fn, samples, lo, hi, knots=ctx.options.knots,
                  left_slope=POINTWISE[kind].left_slope)
    return Replacement(PointwiseSurrogate(kind, pwl, "emulation"), (node.args[0],))


# relu_form (structural): the function's hard counterpart (relu, hard sigmoid, hard tanh, ...).
def _build_relu_form(node: torch.fx.Node, ctx: Any) -> Replacement:
    kind = ctx.kind(node)
    return _knots_surrogate(kind, POINTWISE[kind].hard, "structural", node)


# relu_exact (exact): a piecewise-linear function written as its own sum of ReLUs.
def _build_exact(node: torch.fx.Node, ctx: Any) -> Replacement:
    kind = ctx.kind(node)
    fn = reference(kind, node, ctx.gm)
    knots = POINTWISE[kind].exact
    return _knots_surrogate(kind, knots(fn) if callable(knots) else knots, "exact", node)


class HardGate(Surrogate):
    """``y = x · clamp(a·x + b, 0, 1)`` elementwise (``a``, ``b`` trainable scalars)."""

    def __init__(self, kind: str, a: float, b: float, mul: nn.Module) -> None:
        super().__init__()
        self.replaces, self.style = kind, "structural"
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))
        self.mul = mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mul(x, torch.clamp(x * self.a + self.b, 0.0, 1.0))


#: The gates' scale grid (a), tried with every offset on _GATE_B; the best pair is kept.
_GATE_A = tuple(0.05 * k for k in range(1, 41))
_GATE_B = (0.4, 0.45, 0.5, 0.55, 0.6)


def hard_gate_init(fn: Callable[[torch.Tensor], torch.Tensor], samples: torch.Tensor | None,
                   lo: float, hi: float) -> tuple[float, float]:
    """``(a, b)`` minimising the squared error of ``x·clamp(a·x + b, 0, 1)`` against ``fn`` on
    the calibrated inputs plus a uniform grid over ``[lo, hi]`` (equal weight)."""
    a = torch.tensor(_GATE_A, dtype=torch.float64)[:, None, None]
    b = torch.tensor(_GATE_B, dtype=torch.float64)[None, :, None]

    def err(x: torch.Tensor) -> torch.Tensor:  # [len(A), len(B)] mean squared errors
        return ((x * torch.clamp(a * x + b, 0.0, 1.0) - fn(x)) ** 2).mean(-1)

    total = err(torch.linspace(lo, hi, 2048, dtype=torch.float64))
    if samples is not None and samples.numel():
        v = samples.double().flatten()
        v = v[torch.isfinite(v)]
        if v.numel():
            total = total + err(subsample(v, 4096, seed=0))
    i, j = divmod(int(torch.argmin(total)), len(_GATE_B))
    return _GATE_A[i], _GATE_B[j]


def _gate_setup(node: torch.fx.Node, ctx: Any) -> tuple[str, Reference, nn.Module,
                                                         tuple[float, float, Any]]:
    """What a gated form ``x · gate(x)`` needs: the kind, its reference function, the
    target's product of two activations (refused where it has none) and the fitting range."""
    kind = ctx.kind(node)
    fn = reference(kind, node, ctx.gm)
    shape = ctx.shape(node.args[0])
    mul = make_mul(ctx.target, shapes=(shape, shape), exact=True)
    if isinstance(mul, str):
        raise Refuse(f"the gate multiplies two activations: {mul}")
    return kind, fn, mul, _range(node, ctx)


# hard_gate (structural): x·σ(kx) with its gate made hard, x · clamp(a·x + b, 0, 1).
def _build_hard_gate(node: torch.fx.Node, ctx: Any) -> Replacement:
    kind, fn, mul, (lo, hi, samples) = _gate_setup(node, ctx)
    a, b = hard_gate_init(fn, samples, lo, hi)
    return Replacement(HardGate(kind, a, b, mul), (node.args[0],))


class PolyGate(Surrogate):
    """``y = x · clamp(½ + t·(d₁ + d₃t² + d₅t⁴ + d₇t⁶), 0, 1)`` with ``t = clamp(x / L, −1, 1)``.

    The gate of ``x·Φ(x)`` (GELU) or ``x·σ(x)`` (SiLU) — ``gate − ½`` is odd — as an odd
    polynomial in Horner form on the clamped, normalised input: multiplies, adds and clamps
    only, so on a chip that fuses elementwise epilogues the whole surrogate rides on the kernel
    that produced ``x`` (npu_a: GELU's 32-knot PWL costs two kernels and a 32-wide hidden
    tensor). ``d₃, d₅, d₇`` are trainable (the normalised ``t`` keeps them O(1) for Adam) and
    ``d₁ = ½ − d₃ − d₅ − d₇``, so however they train the gate is exactly 1 at ``x ≥ L`` and 0 at
    ``x ≤ −L`` (up to float rounding): the tails are ``x`` and 0. ``L`` is fixed. GELU, L = 3:
    max error 5e-3, RMS 1e-3 on [−6, 6] (the 4-parameter hard gate: 0.08).
    """

    def __init__(self, kind: str, scale: float, coef: torch.Tensor, mul: nn.Module) -> None:
        super().__init__()
        self.replaces, self.style = kind, "emulation"
        self.inv_scale = 1.0 / float(scale)
        coef = coef.detach().reshape(-1)
        if coef.numel() < 3:
            raise ValueError(f"PolyGate needs d₁ and at least two more coefficients, got "
                             f"{coef.numel()}")
        self.coef = nn.Parameter(coef[1:].clone().float())   # d₃, d₅, ...; d₁ is derived
        self.terms = int(self.coef.numel())
        self.mul = mul

    def _d1(self) -> torch.Tensor:
        """``d₁ = ½ − d₃ − d₅ − …`` as scalar subtractions (a sum reduction of the constant
        coefficients would be an op the chip's legality check refuses)."""
        d1 = 0.5 - self.coef[0]
        for k in range(1, self.terms):
            d1 = d1 - self.coef[k]
        return d1

    def coefficients(self) -> torch.Tensor:
        """``[d₁, d₃, d₅, ...]``."""
        return torch.cat([self._d1().reshape(1), self.coef])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(x * self.inv_scale, -1.0, 1.0)
        u = self.mul(t, t)
        c = [self._d1()] + [self.coef[k] for k in range(self.terms)]   # d₁, d₃, d₅, ...
        p = u * c[-1] + c[-2]                                         # Horner in u = t²
        for k in range(len(c) - 3, -1, -1):
            p = self.mul(p, u) + c[k]
        g = torch.clamp(self.mul(p, t) + 0.5, 0.0, 1.0)
        return self.mul(x, g)


#: Scales L tried by :func:`poly_gate_init` (the gate is exactly 0/1 beyond ±L).
_POLY_SCALES = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
#: Odd coefficients d₁, d₃, d₅, d₇ of the gate polynomial.
POLY_DEGREE = 7


def poly_gate_init(fn: Callable[[torch.Tensor], torch.Tensor], samples: torch.Tensor | None,
                   lo: float, hi: float) -> tuple[float, torch.Tensor]:
    """``(L, d)`` of :class:`PolyGate`: per scale on :data:`_POLY_SCALES` the least-squares
    ``d`` with ``Σd = ½`` (the gate is 1 at ``t = 1``) on the calibrated inputs plus a uniform
    grid over ``[lo, hi]`` (equal weight), keeping the scale with the smallest error."""
    xs = [torch.linspace(lo, hi, 2048, dtype=torch.float64)]
    if samples is not None and samples.numel():
        v = samples.double().flatten()
        v = v[torch.isfinite(v)]
        if v.numel():
            xs.append(subsample(v, 4096, seed=0))
    weights = [torch.full_like(x, 1.0 / x.numel()) for x in xs]
    x, w = torch.cat(xs), torch.cat(weights).sqrt()
    f = fn(x).double()
    powers = range(3, POLY_DEGREE + 1, 2)
    best: tuple[float, float, torch.Tensor] | None = None
    for scale in _POLY_SCALES:
        t = (x / scale).clamp(-1.0, 1.0)
        # y = x(½ + d₁t + Σ_k d_k t^k) with d₁ = ½ − Σ_k d_k: linear in the free d_k
        cols = torch.stack([x * (t ** k - t) for k in powers], 1)
        rhs = f - 0.5 * x - 0.5 * x * t
        d = torch.linalg.lstsq(cols * w[:, None], rhs * w).solution
        err = float(((cols @ d - rhs) * w).pow(2).sum())
        if best is None or err < best[0]:
            best = (err, scale, torch.cat([(0.5 - d.sum()).reshape(1), d]))
    assert best is not None
    return best[1], best[2]


# poly_gate (emulation): x · clamp(½ + odd polynomial of clamp(x/L, −1, 1), 0, 1).
def _build_poly_gate(node: torch.fx.Node, ctx: Any) -> Replacement:
    kind, fn, mul, (lo, hi, samples) = _gate_setup(node, ctx)
    scale, coef = poly_gate_init(fn, samples, lo, hi)
    return Replacement(PolyGate(kind, scale, coef, mul), (node.args[0],))


def _candidates(kind: str, facts: Pointwise) -> list[Candidate]:
    out = [Candidate("pwl", kind, "emulation", _PWL_NEEDS, _build_pwl,
                     "f(x) ≈ a + s x + Σ c_i relu(x − b_i), fitted on the calibrated range")]
    if facts.hard is not None:
        out.append(Candidate("relu_form", kind, "structural", _PWL_NEEDS, _build_relu_form,
                             "the function's hard (ReLU/clamp) counterpart as a few-knot ReLU "
                             "sum, trainable"))
    if facts.exact is not None:
        out.append(Candidate("relu_exact", kind, "exact", _PWL_NEEDS, _build_exact,
                             "exact piecewise-linear function as a sum of ReLUs"))
    if facts.gate:
        out.append(Candidate("hard_gate", kind, "structural", frozenset({"mul", "add", "clamp"}),
                             _build_hard_gate, "x · clamp(a·x + b, 0, 1) (the gate of x·σ(kx) "
                             "made hard), a, b trainable", needs_mul=True))
        out.append(Candidate("poly_gate", kind, "emulation", frozenset({"mul", "add", "clamp"}),
                             _build_poly_gate, "x · clamp(½ + odd degree-7 polynomial of "
                             "clamp(x/L, −1, 1), 0, 1): the gate as multiplies and adds, fused "
                             "into the producing kernel where the target fuses epilogues",
                             needs_mul=True))
    return out


#: Every candidate of the family, per kind of :data:`POINTWISE`, in the order they are listed.
CANDIDATES = tuple(c for kind, facts in POINTWISE.items() for c in _candidates(kind, facts))

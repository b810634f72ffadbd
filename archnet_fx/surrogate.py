"""Surrogates: trainable modules built only from ops a target runs, replacing one it does not.

Building blocks every surrogate family (``passes/``) uses:

* :class:`Surrogate` — base class. The legality check traces a surrogate and judges each op
  inside it, so a surrogate is legal exactly when its body is.
* :class:`PWL` — a piecewise-linear function as a sum of ReLUs,
  ``f(x) = a + s·x + Σ_i c_i · relu(x − b_i)``, built from two ``nn.Linear`` layers (1 → K → 1),
  fitted by least squares to a reference function on the range seen in calibration. Trainable.
* :func:`make_mul` — an elementwise product of two activations that the target can run: a plain
  ``mul`` where allowed, else a batched ``matmul`` with inner dimension 1 (exact; per-element or
  row-scale layout, see :class:`MatmulMul`), else the quarter-square identity
  ``xy = ((x+y)² − (x−y)²)/4`` with a PWL square. Every family's products go through it.
* :class:`Candidate` — one replacement recipe for an op kind: name, style (structural or
  emulation), the kinds it needs, and a ``build(match, ctx)`` that returns the surrogate module.
* :class:`Ranges` / :func:`observe` — samples of each watched node's inputs on calibration data.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
from torch import nn

from archnet_fx.hinge import hinge_sum, tracing
from archnet_fx.targets import Target

log = logging.getLogger(__name__)


class Surrogate(nn.Module):
    """Base class of every replacement module; ``replaces`` and ``candidate`` name it."""

    archnet_surrogate = True
    replaces: str = ""
    candidate: str = ""
    style: str = ""  # "structural" | "emulation" | "exact"

    @property
    def archnet_kind(self) -> str:
        return f"surrogate:{self.replaces}"

    def extra_repr(self) -> str:
        return f"replaces={self.replaces}, candidate={self.candidate}"


# --------------------------------------------------------------------------- PWL


class PWL(nn.Module):
    """``f(x) = a + s·x + Σ c_i relu(x − b_i)`` elementwise, as Linear(1,K) → ReLU → Linear(K,1).

    Breakpoints ``b`` and coefficients are trainable. The skip term ``s·x`` is a multiply by a
    constant. Outside the fitted range it continues with the end segments' slopes.
    """

    def __init__(self, breakpoints: torch.Tensor, coef: torch.Tensor, bias: float, slope: float):
        super().__init__()
        k = breakpoints.numel()
        self.inner = nn.Linear(1, k)
        self.outer = nn.Linear(k, 1)
        with torch.no_grad():
            self.inner.weight.fill_(1.0)
            self.inner.bias.copy_(-breakpoints.float())
            self.outer.weight.copy_(coef.float().reshape(1, k))
            self.outer.bias.fill_(float(bias))
        self.slope = nn.Parameter(torch.tensor(float(slope)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.inner) is nn.Linear and type(self.outer) is nn.Linear and not tracing(x):
            # same function without the N×K hidden tensor (archnet_fx.hinge); layers that
            # fake quantization wrapped take the hinge form below
            return hinge_sum(x, self.inner.weight, self.inner.bias, self.outer.weight,
                             self.outer.bias, self.slope, fast=True)
        h = torch.relu(self.inner(x.unsqueeze(-1)))
        return self.outer(h).squeeze(-1) + x * self.slope

    @staticmethod
    def fit(fn: Callable[[torch.Tensor], torch.Tensor], samples: torch.Tensor | None,
            lo: float, hi: float, knots: int = 24, spacing: str = "quantile",
            left_slope: float | None = None, relative: bool = False) -> "PWL":
        """Least-squares fit of ``fn`` on ``[lo, hi]`` (float64).

        Breakpoints: ``"quantile"`` places them at quantiles of ``samples`` (dense where data
        is, half of them uniform so no region is empty); ``"geometric"`` spaces them — and the
        fit grid — by a constant ratio (for 1/x, 1/sqrt(x) on positive ranges); ``"uniform"``.
        The fit weighs the observed samples and the grid equally. ``left_slope`` fixes the slope
        left of the range (e.g. 0 for exp, sigmoid) instead of fitting it; the first hinge is
        then at ``lo``, otherwise all hinges lie strictly inside (a hinge at ``lo`` would
        duplicate the free linear term: a rank-deficient system). ``relative`` weighs each point
        by ``1/|fn(x)|``, minimising the relative error (for 1/x, 1/sqrt(x), exp).
        """
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"PWL range must be finite, got [{lo}, {hi}]")
        width = max(1.0, abs(lo))
        if hi - lo < 1e-6 * width:
            hi = lo + 1e-3 * width
        k = max(2, int(knots))
        pinned = left_slope is not None

        def hinges(points: torch.Tensor) -> torch.Tensor:
            """``len(points) − 1`` (pinned) or ``− 2`` breakpoints from ``points`` spanning
            [lo, hi]: drop ``hi``, and ``lo`` unless the left slope is pinned."""
            return points[:-1] if pinned else points[1:-1]

        key = None
        if samples is None:
            # Without samples the fit is a pure function of its arguments: identical fits (the
            # 1/s of every softmax with the same row length) are solved once.
            key = (fn, lo, hi, k, spacing, left_slope, relative)
            hit = _FIT_CACHE.get(key)
            if hit is not None:
                return PWL(*hit)
        n = k + 1 if pinned else k + 2
        # The observed samples inside [lo, hi], filtered once for the breakpoints and the fit.
        inside = None
        if samples is not None and samples.numel():
            inside = samples.double().flatten()
            s_lo, s_hi = torch.aminmax(inside)
            if not (float(s_lo) >= lo and float(s_hi) <= hi):  # (NaN compares False: filter)
                inside = inside[(inside >= lo) & (inside <= hi)]
        if spacing == "geometric":
            if lo <= 0:
                raise ValueError("geometric breakpoints need a positive range")
            b = hinges(torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64))
            grid = torch.logspace(math.log10(lo), math.log10(hi), 4096, dtype=torch.float64)
        else:
            grid = torch.linspace(lo, hi, 4096, dtype=torch.float64)
            if spacing == "quantile" and samples is not None and samples.numel() > 4 * k:
                s = inside
                s = subsample(s, 16_384, seed=0)  # knot positions, not tail estimates
                nq = k // 2
                q = quantiles(s, torch.linspace(0, 1, nq + 2, dtype=torch.float64)[1:-1])
                u = hinges(torch.linspace(lo, hi, n - nq, dtype=torch.float64))
                b = torch.unique(torch.cat([u, q]))
            else:
                b = hinges(torch.linspace(lo, hi, n, dtype=torch.float64))
        xs = [grid]
        if inside is not None:
            s = inside
            xs.append(subsample(s, 4096, seed=1))
        x = torch.cat(xs)
        y = fn(x).double()
        target = y - (left_slope * x if pinned else 0.0)
        w = 1.0 / y.abs().clamp_min(1e-12) if relative else None
        bias, slope, coef = solve_hinges(x, target, w, b, lo, hi, pinned)
        if pinned:
            slope = float(left_slope)
        args = (b.float(), coef.float(), bias, slope)
        if key is not None:
            if len(_FIT_CACHE) >= _FIT_CACHE_SIZE:
                _FIT_CACHE.pop(next(iter(_FIT_CACHE)))
            _FIT_CACHE[key] = args
        return PWL(*args)


#: Sample-free PWL fits by their arguments → (breakpoints, coefficients, bias, slope). PWL
#: copies these into fresh parameters, so modules built from one entry never share storage.
_FIT_CACHE: dict[tuple, tuple] = {}
_FIT_CACHE_SIZE = 256


def subsample(v: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """At most ``k`` of the values of 1-D ``v``, drawn uniformly (with replacement: O(k), where
    a permutation of a million calibration values costs more than the fit it feeds), seeded."""
    if v.numel() <= k:
        return v
    idx = torch.randint(v.numel(), (k,), generator=torch.Generator().manual_seed(seed))
    return v[idx]


def quantiles(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(v, q)`` (linear interpolation) for a 1-d float64 ``v`` without NaNs.

    The order statistics come from a partition (``numpy.partition``, O(n)) where torch sorts all
    of ``v``; the ranks and the interpolation are torch's own (``q·(n−1)``, ``lerp``), so the
    values are bit-identical.
    """
    import numpy as np

    ranks = q * (v.numel() - 1)
    below = ranks.to(torch.long)
    above = ranks.ceil().to(torch.long)
    kth = np.unique(np.concatenate([below.numpy(), above.numpy()]))
    part = torch.from_numpy(np.partition(v.numpy(), kth))
    return part[below].lerp(part[above], ranks - below)


def solve_hinges(x: torch.Tensor, target: torch.Tensor, w: torch.Tensor | None,
                 b: torch.Tensor, lo: float, hi: float, pinned: bool, first: float | None = None
                 ) -> tuple[float, float, torch.Tensor]:
    """Weighted least squares of ``target`` over PWL functions with breakpoints ``b`` on
    ``[lo, hi]``, as ``(bias, slope, coef)`` of ``bias + slope·x + Σ coef_i relu(x − b_i)``
    (``pinned``: the residual has slope 0 left of ``lo`` and the caller sets the slope).

    Solved in the *hat* basis — the function's values at the knots ``lo ∪ b ∪ hi`` — rather than
    on the hinge columns: both span the same functions on ``[lo, hi]``, but each point touches two
    hat functions, so the normal equations are tridiagonal, O(n) to assemble (no n × K matrix)
    and, after diagonal scaling, well conditioned where hinge columns over six decades are not.
    A tiny penalty on slope changes settles knot values no data constrains (linear interpolation
    of their neighbours). The values convert exactly to slope changes at the breakpoints; a
    breakpoint that coincides with ``lo`` (free slope) or ``hi`` gets coefficient 0.
    ``first`` (pinned only) fixes the value at the first breakpoint instead of fitting it (0 for
    an exp that must vanish below its range). All float64.
    """
    tol = 1e-9 * (hi - lo)
    ends = [e for e, keep in ((lo, not pinned and float(b.min()) > lo + tol),
                              (hi, float(b.max()) < hi - tol)) if keep]
    # Pinned, the first breakpoint is the first knot: left of it the residual is flat, as the
    # clamped hat basis has it.
    knots = torch.unique(torch.cat([b, torch.tensor(ends, dtype=torch.float64)]))
    m = knots.numel()
    h = knots[1:] - knots[:-1]
    j = (torch.bucketize(x, knots, right=True) - 1).clamp_(0, m - 2)
    u = ((x - knots[j]) / h[j]).clamp_(0.0, 1.0)
    a0, a1 = 1.0 - u, u
    if w is not None:
        a0, a1, target = a0 * w, a1 * w, target * w
    zeros = torch.zeros(m, dtype=torch.float64)
    diag = zeros.index_add(0, j, a0 * a0).index_add_(0, j + 1, a1 * a1)
    off = torch.zeros(m - 1, dtype=torch.float64).index_add_(0, j, a0 * a1)
    rhs = zeros.index_add(0, j, a0 * target).index_add_(0, j + 1, a1 * target)
    gram = torch.diag(diag) + torch.diag(off, 1) + torch.diag(off, -1)
    # Slope-change penalty (row i: s_{i+1} − s_i in terms of the knot values), each row scaled
    # to 1e-5 of the data weight around its knots, so it is negligible wherever data determine
    # the fit (relative weights vary by many decades along the range).
    if m > 2:
        inv = 1.0 / h
        d = torch.zeros(m - 2, m, dtype=torch.float64)
        r = torch.arange(m - 2)
        d[r, r] = inv[:-1]
        d[r, r + 1] = -inv[:-1] - inv[1:]
        d[r, r + 2] = inv[1:]
        local = torch.stack([diag[:-2], diag[1:-1], diag[2:]]).amax(0)
        d = d * (1e-5 * local.sqrt() / d.norm(dim=1).clamp_min(1e-300))[:, None]
        gram = gram + d.T @ d
    free = 0 if first is None else 1
    if free:
        rhs = rhs - gram[:, 0] * float(first)
    g, r = gram[free:, free:], rhs[free:]
    scale = g.diagonal().clamp_min(1e-300).rsqrt()
    v = torch.linalg.solve(g * scale[:, None] * scale[None, :], (r * scale)[:, None])
    v = v.squeeze(1) * scale
    if free:
        v = torch.cat([torch.tensor([float(first)], dtype=torch.float64), v])
    s = (v[1:] - v[:-1]) / h                     # segment slopes
    change = torch.zeros(m, dtype=torch.float64)  # slope change at each knot; 0 at the last
    change[1:-1] = s[1:] - s[:-1]
    if pinned:
        change[0] = s[0]
        bias, slope = float(v[0]), 0.0
    else:
        bias, slope = float(v[0] - s[0] * knots[0]), float(s[0])
    idx = torch.searchsorted(knots, b).clamp_(0, m - 1)  # every breakpoint is a knot
    return bias, slope, change[idx]


def pwl_error(mod: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float,
              n: int = 10_000) -> float:
    """Max absolute error of ``mod`` against ``fn`` on a uniform grid of ``[lo, hi]``."""
    x = torch.linspace(lo, hi, n)
    with torch.no_grad():
        return float((mod(x) - fn(x.double()).float()).abs().max())


# --------------------------------------------------------------------------- products


class Mul(nn.Module):
    """``x * y`` where the target multiplies two activations elementwise."""

    mode = "mul"  # the product form, as every product module names it

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y


class MatmulMul(nn.Module):
    """Exact ``x * y`` as a batched matmul with inner dimension 1.

    For targets that allow ``matmul`` of two activations but not elementwise ``mul``. The
    ``layout`` is fixed at construction (from static shapes) so the module traces symbolically:

    * ``"row_y"``: ``y`` is a per-row scalar ``[..., 1]``: ``(y[..., :, None] @ x[..., None, :])``
      with the unit axis dropped;
    * ``"row_x"``: the mirror, ``x`` is ``[..., 1]``: ``x[..., :, None] @ y[..., None, :]``;
    * ``"elem"``: same shapes, each element its own 1×1 product
      ``x[..., None, None] @ y[..., None, None]``.
    """

    mode = "matmul"
    LAYOUTS = ("row_y", "row_x", "elem")

    def __init__(self, layout: str = "elem"):
        super().__init__()
        if layout not in self.LAYOUTS:
            raise ValueError(f"layout must be one of {self.LAYOUTS}, got {layout!r}")
        self.layout = layout

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.layout == "row_y":
            return torch.matmul(y.unsqueeze(-1), x.unsqueeze(-2)).squeeze(-2)
        if self.layout == "row_x":
            return torch.matmul(x.unsqueeze(-1), y.unsqueeze(-2)).squeeze(-2)
        return torch.matmul(x.unsqueeze(-1).unsqueeze(-1), y.unsqueeze(-1).unsqueeze(-1)
                            ).squeeze(-1).squeeze(-1)

    def extra_repr(self) -> str:
        return f"layout={self.layout}"


class QuarterSquareMul(nn.Module):
    """``x * y = ((x + y)² − (x − y)²) / 4`` with squares from a PWL fitted on the observed range."""

    mode = "quarter_square"

    def __init__(self, bound: float, knots: int = 48):
        super().__init__()
        b = max(float(bound), 1e-3)
        self.square = PWL.fit(lambda t: t * t, None, -b, b, knots=knots, spacing="uniform")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.square(x + y) - self.square(x - y)) * 0.25


def can_mul(target: Target) -> bool:
    lim = target.limits("mul")
    return lim is not None and lim.two_activations


def can_matmul(target: Target) -> bool:
    lim = target.limits("matmul")
    return lim is not None and lim.two_activations


def mul_layout(x_shape: Sequence[int] | None, y_shape: Sequence[int] | None) -> str | None:
    """The :class:`MatmulMul` layout for operands of these static shapes (None: unknown)."""
    if x_shape is None or y_shape is None:
        return None
    lx, ly = (x_shape[-1] if x_shape else 1), (y_shape[-1] if y_shape else 1)
    if ly == 1 and lx != 1:
        return "row_y"
    if lx == 1 and ly != 1:
        return "row_x"
    return "elem"


_QUARTER_SQUARE_NEEDS = ("add", "sub", "linear", "relu", "reshape", "mul")


def make_mul(target: Target, layout: str = "elem", *,
             shapes: tuple[Sequence[int] | None, Sequence[int] | None] | None = None,
             exact: bool = False, bound: float = 1.0) -> nn.Module | str:
    """A module computing ``x * y`` of two activations legally on ``target``, or why none is.

    The first form the target runs: :class:`Mul`; :class:`MatmulMul` (exact) in ``layout``, or
    in the layout :func:`mul_layout` picks from the operands' static ``shapes`` (x's, y's) when
    given; unless ``exact``, :class:`QuarterSquareMul` (approximate), whose PWL square covers
    |x ± y| ≤ ``bound``.
    """
    if can_mul(target):
        return Mul()
    if can_matmul(target) and target.supports("reshape"):
        if shapes is not None:
            layout = mul_layout(*shapes)
        if layout is not None:
            return MatmulMul(layout)
        why = "operand shapes unknown (run shape propagation)"
    else:
        why = f"{target.name} multiplies two activations neither by mul nor by matmul"
    if not exact and all(target.supports(k) for k in _QUARTER_SQUARE_NEEDS):
        return QuarterSquareMul(bound)
    return why


class RowSum(nn.Module):
    """Sum over the last axis (kept, size 1), times ``scale``.

    ``reduce=None``: a matmul with a constant vector (a ``linear``, legal wherever linears
    are); ``"sum"``: the target's sum reduction; ``"mean"``: its mean reduction times ``n``
    (exact up to float rounding). A reduction reads the row once, where a CPU runtime runs the
    ones-linear as a one-column matrix product (MiniLM's attention rows: ~2 ms against ~0.3 ms
    per 6.3 M-element tensor in onnxruntime)."""

    REDUCTIONS = (None, "sum", "mean")

    def __init__(self, n: int, scale: float = 1.0, reduce: str | None = None):
        super().__init__()
        if reduce not in self.REDUCTIONS:
            raise ValueError(f"reduce must be one of {self.REDUCTIONS}, got {reduce!r}")
        self.reduce, self.n, self.scale = reduce, int(n), float(scale)
        if reduce is None:
            self.register_buffer("w", torch.full((1, n), float(scale)))

    @staticmethod
    def best_for(target: Any) -> str | None:
        """The cheapest row-sum form ``target`` runs: ``"sum"``, ``"mean"`` or the linear."""
        return next((k for k in ("sum", "mean") if target is not None and target.supports(k)),
                    None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce is None:
            return torch.nn.functional.linear(x, self.w)
        if self.reduce == "sum":
            s = x.sum(-1, keepdim=True)
            return s if self.scale == 1.0 else s * self.scale
        return x.mean(-1, keepdim=True) * (self.n * self.scale)


# --------------------------------------------------------------------------- observation


@dataclass
class NodeSamples:
    """Samples of one node's tensor inputs (rows of the last axis) and their extremes."""
    inputs: list[torch.Tensor] = field(default_factory=list)  # per tensor input: [rows, last]
    lo: list[float] = field(default_factory=list)
    hi: list[float] = field(default_factory=list)

    def values(self, i: int = 0) -> torch.Tensor:
        return self.inputs[i].flatten()

    def range(self, i: int = 0, q: float = 0.0) -> tuple[float, float]:
        """(low, high) of input ``i``; with ``q`` > 0 the q / 1-q quantiles of finite values."""
        if q <= 0:
            return self.lo[i], self.hi[i]
        v = self.values(i)
        v = v[torch.isfinite(v)]
        v = subsample(v, 200_000, seed=0).double()
        lo, hi = quantiles(v, torch.tensor([q, 1 - q], dtype=torch.float64)).tolist()
        return lo, hi


Ranges = dict  # node name -> NodeSamples


class _Observer(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, watch: set[str], rows: int, store: Ranges,
                 gen: torch.Generator):
        super().__init__(gm)
        self.watch, self.rows, self.store, self.gen = watch, rows, store, gen

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.watch:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            tensors = [a for a in list(args) + list(kwargs.values())
                       if isinstance(a, torch.Tensor) and a.is_floating_point()]
            rec = self.store.setdefault(n.name, NodeSamples())
            for i, t in enumerate(tensors):
                t = t.detach().float()
                rows = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
                if rows.shape[0] > self.rows:
                    idx = torch.randperm(rows.shape[0], generator=self.gen)[:self.rows]
                    rows = rows[idx]
                lo = hi = 0.0
                if t.numel():
                    t_lo, t_hi = torch.aminmax(t)
                    lo, hi = float(t_lo), float(t_hi)
                if not (math.isfinite(lo) and math.isfinite(hi)):  # some inf/NaN: skip those
                    fin = t[torch.isfinite(t)]
                    lo = float(fin.min()) if fin.numel() else 0.0
                    hi = float(fin.max()) if fin.numel() else 0.0
                if i < len(rec.inputs):
                    if rec.inputs[i].shape[-1] == rows.shape[-1]:
                        merged = torch.cat([rec.inputs[i], rows])
                        if merged.shape[0] > 4 * self.rows:
                            keep = torch.randperm(merged.shape[0], generator=self.gen)
                            merged = merged[keep[:4 * self.rows]]
                        rec.inputs[i] = merged
                    rec.lo[i], rec.hi[i] = min(rec.lo[i], lo), max(rec.hi[i], hi)
                else:
                    rec.inputs.append(rows)
                    rec.lo.append(lo)
                    rec.hi.append(hi)
        return super().run_node(n)


def observe(gm: torch.fx.GraphModule, batches: Iterable[tuple[tuple, dict]], watch: set[str],
            rows: int = 2048, max_batches: int = 16) -> Ranges:
    """Run ``gm`` on (args, kwargs) batches and keep samples of the watched nodes' inputs."""
    store: Ranges = {}
    gen = torch.Generator().manual_seed(0)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(batches):
            if i >= max_batches:
                break
            bound = list(args)
            for n in phs[len(args):]:
                bound.append(kwargs.get(n.target, kwargs.get(n.name, n.args[0] if n.args
                                                             else None)))
            _Observer(gm, watch, rows, store, gen).run(*bound)
    return store


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """One way to replace an op kind: ``build(node, ctx)`` returns (module, input nodes)."""
    name: str
    kind: str
    style: str                       # "structural" | "emulation" | "exact" | "host"
    needs: frozenset[str]            # op kinds the surrogate body uses
    build: Callable[..., Any]
    doc: str = ""
    needs_mul: bool = False          # multiplies two activations (see make_mul)

    def offered(self, target: Target) -> str | None:
        """None if this candidate can be offered on ``target``, else the reason it cannot."""
        missing = sorted(k for k in self.needs if not target.supports(k))
        if missing:
            return f"{target.name} lacks {', '.join(missing)}"
        if self.needs_mul and isinstance(make_mul(target), str):
            return f"{target.name} cannot multiply two activations in any form"
        return None


def offered(cands: Sequence[Candidate], target: Target) -> list[Candidate]:
    return [c for c in cands if c.offered(target) is None]

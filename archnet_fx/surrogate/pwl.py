"""Piecewise-linear functions as sums of ReLUs, fitted by least squares.

:class:`PWL` is ``f(x) = a + s·x + Σ_i c_i · relu(x − b_i)`` built from two ``nn.Linear``
layers (1 → K → 1), trainable; :meth:`PWL.fit` places breakpoints (quantiles of calibrated
samples, geometric, or uniform) and solves the coefficients (:func:`solve_hinges`) on the
range seen in calibration. Sample-free fits are memoized (:func:`clear_fit_cache`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx
from torch import nn

from archnet_fx.surrogate.hinge import hinge_sum, tracing


# --------------------------------------------------------------------------- PWL


class PWL(nn.Module):
    """``f(x) = a + s·x + Σ c_i relu(x − b_i)`` elementwise, as Linear(1,K) → ReLU → Linear(K,1).

    Breakpoints ``b`` and coefficients are trainable. The skip term ``s·x`` is a multiply by a
    constant. A PWL built with ``s = 0`` (pinned fits of exp, GELU, sigmoid; the LayerNorm's
    1/√x; :meth:`convex_decreasing`) has no skip term at all: ``has_skip`` is False, ``slope`` a
    zero buffer, and the traced (chip) form has no multiply-by-zero kernel — a structural
    choice made at construction, so every trace of the module is the same graph. Outside the
    fitted range it continues with the end segments' slopes (flat right of ``hi`` for
    :meth:`convex_decreasing`, whose hinges are ``relu(t_k − x)``).

    Distillation leaves ``s`` as fitted (``distill_frozen``): it is the left tail's slope, which
    the hinges cancel to the right, so a small relative move of it shifts the whole function by
    ``Δs·x`` — for the softmax's reciprocal on ``[1, N]`` a relative error of ``Δs·x²``: one
    Adam step (1e-3 of ``s``) tripled a ViT block's loss. The coefficients and breakpoints
    still reshape the function anywhere in its range.
    """

    distill_frozen = ("slope",)

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
        #: Whether ``s·x`` is part of the function (and of its traced form); fixed at build.
        self.has_skip = float(slope) != 0.0
        if self.has_skip:
            self.slope = nn.Parameter(torch.tensor(float(slope)))
        else:
            self.register_buffer("slope", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.inner) is nn.Linear and type(self.outer) is nn.Linear and not tracing(x):
            # same function without the N×K hidden tensor (archnet_fx.surrogate.hinge); layers that
            # fake quantization wrapped take the hinge form below
            return hinge_sum(x, self.inner.weight, self.inner.bias, self.outer.weight,
                             self.outer.bias, self.slope if self.has_skip else None, fast=True)
        h = torch.relu(self.inner(x.unsqueeze(-1)))
        y = self.outer(h).squeeze(-1)
        return y + x * self.slope if self.has_skip else y

    @staticmethod
    def convex_decreasing(fn: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float,
                          knots: int) -> "PWL":
        """``fn`` (convex and decreasing on ``[lo, hi]``, ``lo > 0``: 1/x, 1/√x) as
        ``a + Σ c_k relu(t_k − x)`` with ``c_k ≥ 0``: interpolation at ``knots + 1`` geometric
        points, shifted down by half its largest relative error (equal ripple), flat right of
        ``hi``; left of ``lo`` it continues with the first segment's slope.

        Every term is non-negative, so the hinge form — the one the chip and an exported
        runtime evaluate, in float32 — sums without cancellation: the relative error is the
        interpolation's (1/x on [0.9, 135], 256 knots: 4.8e-5), where :meth:`fit`'s
        increasing hinges cancel to ~5e-3 in float32 and need a Newton step after them.
        """
        lo, hi, k = float(lo), float(hi), max(1, int(knots))
        if not 0 < lo < hi:
            raise ValueError(f"convex_decreasing needs 0 < lo < hi, got [{lo}, {hi}]")
        t = torch.logspace(math.log10(lo), math.log10(hi), k + 1, dtype=torch.float64)
        f = fn(t).double()
        m = (f[1:] - f[:-1]) / (t[1:] - t[:-1])            # segment slopes, increasing
        c = torch.empty(k, dtype=torch.float64)
        c[-1] = -m[-1]
        c[:-1] = m[1:] - m[:-1]
        grid = torch.logspace(math.log10(lo), math.log10(hi), 64 * k + 1, dtype=torch.float64)
        approx = f[-1] + (c * torch.relu(t[1:] - grid[:, None])).sum(-1)
        shift = 1.0 - 0.5 * float((approx / fn(grid).double() - 1.0).max())
        pwl = PWL(t[1:].float(), (c * shift).float(), float(f[-1]) * shift, 0.0)
        with torch.no_grad():
            pwl.inner.weight.fill_(-1.0)
            pwl.inner.bias.copy_(t[1:].float())
        return pwl

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


def clear_fit_cache() -> None:
    """Forget the memoized sample-free fits (cold-start timings, tests)."""
    _FIT_CACHE.clear()


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

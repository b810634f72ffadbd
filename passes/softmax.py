"""Surrogates for softmax and log-softmax, standalone or inside (decomposed) attention.

None of the built-in NPUs has ``exp`` or a division, yet all have ``max_pool``, ``linear``,
``relu``, ``clamp`` and some way to multiply two activations (``mul`` on npu_a and dsp_c, a
matmul with inner dimension 1 on npu_b). Four candidates for ``softmax``, one for ``log_softmax``:

* ``softmax_pwl`` (emulation, nearly exact before any training)::

      m = rowmax(x)                    # max_pool with kernel (1, N): exact
      z = clamp(x − m, min=lo)         # softmax is shift-invariant per row: z ∈ [lo, 0]
      e = Σ_k c_k relu(z − b_k)        # PWL exp, no constant term, b_0 = lo  ⇒  e(lo) = 0
      s = e · 1                        # row sum as a linear with a constant ones weight
      r = pwl_recip(s)                 # PWL 1/s: 256 decreasing hinges on [0.9, 1.05·N]
      p = e · r                        # row scale (mul, or matmul [..,1,1] @ [..,1,N])

  Subtracting the exact row max makes the exp's domain ``[lo, 0]`` for every row, whatever the
  logits' scale, and ``s ∈ [1, N]``. The exp breakpoints are spaced uniformly in ``e^{z/4}``:
  between equal absolute error per segment (``e^{z/2}``) and equal relative error (uniform in
  ``z``), since a row sum accumulates up to N small tail errors. ``lo`` comes from the
  calibrated logits with mask values ignored (only finite values > −1e4 count), clipped to
  ``[−16, −8]``; anything below it — padding masks of ``finfo.min``, −1e9, −inf, causal
  masks — is clamped to ``lo`` and gets probability exactly 0.
  The exp breakpoints are buffers (coefficients train), so ``e(lo) = 0`` survives training.
  Trainable: the exp coefficients (the normalizer is frozen, see ``distill_frozen``).

  For ``log_softmax`` the same ``z`` and ``s`` give ``z_raw − pwl_log(s)`` (no product of two
  activations needed; masked entries stay hugely negative).

* ``relu_attention`` (structural, Arch-Net): ``p = relu(x + b) · g`` with trainable scalars
  ``b`` and ``g``. Initialised from calibration: ``b`` is the best of a few negated quantiles of
  the logits and ``g`` the least-squares scale against the true softmax on the calibrated rows
  (``1/N`` without samples). Masked logits give ``relu(−huge) = 0``. Coarse: distillation
  refines it.

* ``softmax_pow`` (approximate emulation, chosen with ``choices``): as ``softmax_pwl`` with
  the exp replaced by the power kernel ``relu(1 + a·z)^4`` (``a`` trainable, fitted on the
  calibrated rows), and the row sum as the target's ``sum`` (or ``mean`` × N) reduction where
  it has one: a few elementwise passes instead of a K-wide hinge expansion — the form to
  pick when the model must also run fast on a CPU runtime. Row cosine to softmax on MiniLM's
  attention logits before training: 0.9975 (ReLU attention: 0.83).

* ``softmax_poly`` (emulation, nearly exact, chosen with ``choices`` or by the selection): as
  ``softmax_pow`` with the exp replaced by ``relu(P(z)^16 − P(lo)^16)``, ``P`` a trainable
  cubic fitted to ``e^{z/16}`` on ``[lo, 0]`` (:class:`PolyExp`): within 2e-5 of
  ``e^z − e^lo`` (0 at ``lo``, as the PWL exp), max |Δp| 6e-5 on the test logits where the
  32-knot PWL gives 4e-4. Sixteen elementwise passes and no K-wide hidden tensor: on a CPU
  runtime a small fraction of the PWL exp's time; on npu_a, where elementwise kernels that do
  not follow a MAC pay a launch each, ~15 µs more per MiniLM softmax than ``softmax_pwl``.

Any ``dim`` (negative dims normalised). A softmax over another axis is computed on
``x.transpose(dim, −1)`` and transposed back (``permute``; refused where the target lacks it);
calibration samples are rows of the last axis, so such a surrogate starts from the default
range (``lo = −16``; ``b = 0, g = 1/N``) instead. ``nn.Softmax(dim=None)`` (implicit dim) is
refused. The row length ``N`` is fixed at build time (static shapes).

The pass fires only where the target lacks the kind: a target with ``softmax`` keeps it.
Measured (32 knots, with the earlier 1/s PWL + Newton step): max |Δp| ≤ 7.3e-4 and row-sum
error ≤ 1.6e-6 on MiniLM's real attention logits (128 keys, padding masks), sentence-embedding
cosine > 0.99999 with only the 6 softmaxes replaced; the 256-hinge 1/s without the Newton step
adds at most 4.8e-5 to the row sum (three kernels fewer: 6 µs per softmax on npu_a).

>>> m = SoftmaxPWL("softmax", 2, 8, lo=-16.0, knots=32, mode="matmul")
>>> x = torch.randn(4, 8) * 3
>>> x[0, 5:] = torch.finfo(torch.float32).min
>>> p = m(x)
>>> bool((p - torch.softmax(x, -1)).abs().max() < 2e-3), float(p[0, 5:].abs().max().detach())
(True, 0.0)
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from archnet_fx.capture import dynamic_seq
from archnet_fx.infra.rules import Refuse, Replacement
from archnet_fx.surrogate.hinge import hinge_sum, tracing
from archnet_fx.ir.opargs import call_kwargs
from archnet_fx.surrogate.pwl import PWL, solve_hinges, subsample
from archnet_fx.surrogate.base import Candidate, Surrogate
from archnet_fx.surrogate.products import MatmulMul, Mul, RowSum, make_mul

#: Logits at or below this (or non-finite) are treated as mask values when calibrating.
MASK_THRESHOLD = -1e4
#: The exp's domain ``[lo, 0]`` has ``lo`` in this interval (e^-16 ≈ 1e-7).
LO_MIN, LO_MAX = -16.0, -8.0
#: Exp breakpoints are uniform in ``e^{KNOT_ALPHA·z}``. α = 1/2 equalises the *absolute* error
#: per segment, but a row sum adds up to N tail errors; on MiniLM's attention logits α = 1/4
#: gave 15× lower max prob error than 1/2 at 32 knots (α ∈ [0.22, 0.3] is flat; 0.1: 3× worse).
KNOT_ALPHA = 0.25
#: Decreasing hinges of the softmax's 1/s on [0.9, 1.05·N] (max relative error 4.8e-5 at N =
#: 128, without a Newton step; the 32-knot exp's own error is ~7e-4 of a probability).
RECIP_KNOTS = 256


# --------------------------------------------------------------------------- building blocks


class _FloorState(nn.Module):
    """Keeps the exp's floor ``lo`` (a Python float the traced graph bakes in as a constant) in
    the state dict too, as the buffer ``lo_``: the coefficients a state holds mean nothing
    without the ``lo`` they were fitted at (PolyExp's ``t = z/|lo|``; the PWL exp's first
    breakpoint), so loading a fitted state — the selection's warm start, a checkpoint — into a
    module built from other calibration batches takes its ``lo`` along. The buffer is not used
    by ``forward`` (nothing in the chip's graph reads it)."""

    def _set_lo(self, lo: float) -> None:
        self.lo = float(lo)
        self.register_buffer("lo_", torch.tensor(self.lo, dtype=torch.float64))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self.lo = float(self.lo_)


class RowMax(nn.Module):
    """Max over the last axis, keeping it (size 1), as a ``max_pool`` whose kernel spans the row.

    ``ceil=True`` (a row whose length varies up to ``n``, the dynamic sequence): the pool runs
    in ceil mode, so one window covers a row of any length ≤ ``n`` (the part of the window past
    the row's end is ignored) — exact for every length."""

    def __init__(self, rank: int, n: int, ceil: bool = False) -> None:
        super().__init__()
        if not 1 <= rank <= 5:
            raise ValueError(f"row max supports ranks 1..5, got {rank}")
        self.rank, self.n, self.ceil = int(rank), int(n), bool(ceil)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.ceil
        if self.rank == 1:
            return F.max_pool1d(x.unsqueeze(0), self.n, ceil_mode=c).squeeze(0)
        if self.rank == 2:  # (C, L) unbatched
            return F.max_pool1d(x, self.n, ceil_mode=c)
        if self.rank in (3, 4):  # (C, H, W) unbatched or (B, C, H, W)
            return F.max_pool2d(x, (1, self.n), ceil_mode=c)
        return F.max_pool3d(x, (1, 1, self.n), ceil_mode=c)


class ExpPWL(nn.Module):
    """``e(z) = Σ_k c_k relu(z − b_k)``: exp on ``[lo, 0]`` with ``e(z) = 0`` for ``z ≤ lo``.

    Breakpoints are fixed buffers (``b_0 = lo``), spaced uniformly in ``e^{z/4}`` (denser near 0,
    see :data:`KNOT_ALPHA`); the coefficients ``c`` are trainable, fitted by least squares on a
    grid plus the calibrated ``z``. No constant term and no slope
    below ``b_0`` — so clamped (masked) inputs give exactly 0, before and after training.
    """

    def __init__(self, lo: float, knots: int, samples: torch.Tensor | None = None) -> None:
        super().__init__()
        lo, k = float(lo), max(2, int(knots))
        a = KNOT_ALPHA
        u = torch.linspace(math.exp(a * lo), 1.0, k + 1, dtype=torch.float64)[:-1]
        b = torch.log(u) / a
        b[0] = lo
        grid = [torch.linspace(lo, 0.0, 2048, dtype=torch.float64),
                torch.log(torch.linspace(math.exp(a * lo), 1.0, 2048, dtype=torch.float64)) / a]
        if samples is not None and samples.numel():
            s = samples.double().flatten()
            s = s[(s >= lo) & (s <= 0)]
            s = subsample(s, 4096, seed=0)
            grid.append(s)
        z = torch.cat(grid)
        _, _, c = solve_hinges(z, torch.exp(z), None, b, lo, 0.0, pinned=True, first=0.0)
        self.register_buffer("w", torch.ones(k, 1))
        self.register_buffer("nb", (-b).float())
        self.coef = nn.Parameter(c.float().reshape(1, k))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if tracing(z):  # the chip's form
            h = torch.relu(F.linear(z.unsqueeze(-1), self.w, self.nb))
            return F.linear(h, self.coef).squeeze(-1)
        # the same function by intervals, without the N×K hidden tensor (archnet_fx.surrogate.hinge)
        return hinge_sum(z, self.w, self.nb, self.coef, fast=True)


# --------------------------------------------------------------------------- surrogates


class _RowSoftmax(Surrogate):
    """Shared skeleton: ``z = x − rowmax(x)``, ``e = kernel(z)``, ``s = Σ e``, then ``e / s``
    (PWL 1/s, row scale) or, with no ``scale``, ``z − log(s)``; over the last
    axis, or ``dim`` through a transpose. Subclasses set the modules and :meth:`kernel`."""

    dim: int | None        # set by subclasses (no class defaults: a class attribute would
    scale: nn.Module | None  # shadow nn.Module's submodule lookup)
    # The normalizer is a fixed function of s ∈ [1, N] (1/s or log s): nothing for
    # distillation to learn, and (for log s, and 1/s in its earlier increasing-hinge form)
    # its PWL's terms cancel, so per-element moves of 1e-3 of its parameters together tripled
    # a ViT block's loss in one step. The kernel's coefficients train.
    distill_frozen = ("recip", "log")

    def kernel(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _normalizer(self, kind: str, n: int, knots: int, mode: str | None,
                    reduce: str | None = None) -> None:
        """The row sum (:class:`RowSum` form ``reduce``) and what follows it: PWL ``log(s)``
        (log_softmax, ``2·knots`` geometric breakpoints), or PWL ``1/s`` (:data:`RECIP_KNOTS`
        decreasing hinges, :meth:`PWL.convex_decreasing`) and the row scale in ``mode``
        (``"mul"``/``None`` or ``"matmul"``)."""
        self.rowsum = RowSum(n, reduce=reduce)
        # s = Σ e over a row whose max gives e(0) ≈ 1: s ∈ [≈1, N] whatever the data.
        s_lo, s_hi = 0.9, max(float(n), 1.0) * 1.05 + 0.1
        if kind == "log_softmax":
            # left slope pinned to 0 (s never falls below s_lo): no skip multiply on the chip
            self.log = PWL.fit(torch.log, None, s_lo, s_hi, knots=2 * knots, spacing="geometric",
                               left_slope=0.0)
            self.scale = None
        else:
            # without cancellation in float32, so no Newton step (three small kernels) after
            self.recip = PWL.convex_decreasing(torch.reciprocal, s_lo, s_hi, RECIP_KNOTS)
            if mode not in (None, "mul", "matmul"):
                raise ValueError(f"mode must be 'mul' or 'matmul', got {mode!r}")
            # x · r with r a per-row scalar [..., 1]: mul, or r[..., :, None] @ x[..., None, :]
            self.scale = MatmulMul("row_y") if mode == "matmul" else Mul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim is not None:
            x = x.transpose(self.dim, -1)
        zr = x - self.rowmax(x)
        e = self.kernel(zr)
        s = self.rowsum(e)
        if self.scale is None:
            out = zr - self.log(s)
        else:
            out = self.scale(e, self.recip(s))
        if self.dim is not None:
            out = out.transpose(self.dim, -1)
        return out


class SoftmaxPWL(_FloorState, _RowSoftmax):
    """Near-exact softmax / log_softmax over the last axis (see the module docstring)."""

    def __init__(self, kind: str, rank: int, n: int, lo: float, knots: int, mode: str | None,
                 samples: torch.Tensor | None = None, dim: int | None = None,
                 reduce: str | None = None, dynamic: bool = False) -> None:
        super().__init__()
        self.replaces, self.style = kind, "emulation"
        self.dim = dim  # None: the last axis; else the axis swapped with the last one
        self._set_lo(lo)
        self.rowmax = RowMax(rank, n, ceil=dynamic)
        z = None
        if samples is not None and samples.numel():   # rows of the example's length
            z = (samples - _valid_max(samples)).clamp(min=self.lo)
            z = torch.where(torch.isfinite(z), z, torch.full_like(z, self.lo))
        self.exp = ExpPWL(self.lo, knots, z)
        self._normalizer(kind, n, knots, mode, reduce)

    def kernel(self, z: torch.Tensor) -> torch.Tensor:
        return self.exp(torch.clamp(z, min=self.lo))


class ReluAttention(Surrogate):
    """``p = relu(x + b) · g`` (Arch-Net's ReLU attention); ``b`` and ``g`` trainable scalars."""

    def __init__(self, bias: float, gain: float) -> None:
        super().__init__()
        self.replaces, self.style = "softmax", "structural"
        self.bias = nn.Parameter(torch.tensor(float(bias)))
        self.gain = nn.Parameter(torch.tensor(float(gain)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bias) * self.gain


class PowKernel(nn.Module):
    """``h(z) = relu(1 + a·z)^(2^k)`` for ``z ≤ 0`` (``k`` squarings): a compact stand-in for
    ``exp`` — 1 at 0, smooth and convex, exactly 0 below ``−1/a`` (so masked logits vanish) —
    built from a multiply, an add, a ReLU and ``k`` products. ``a`` is a trainable scalar, used
    clamped to ``≥ A_MIN`` (a constant expression on the chip) so that however training moves
    it, masked logits (−1e9, ``finfo.min``, −inf) still give exactly 0."""

    A_MIN = 1e-3

    def __init__(self, a: float, squarings: int, square: nn.Module) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.squarings = int(squarings)
        self.square = square

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(z * torch.clamp(self.a, min=self.A_MIN) + 1.0)
        for _ in range(self.squarings):
            h = self.square(h, h)
        return h


class PolyExp(_FloorState):
    """``e(z) = relu(P(z)^(2^k) − P(lo)^(2^k))`` on ``z`` clamped to ``[lo, 0]``: exp as a cubic
    raised to the ``2^k``-th power by ``k`` squarings, so ``P`` only has to follow ``e^{z/2^k}``
    (a gentle curve on ``[lo/2^k, 0]``, where a cubic is accurate to ~1e-6 relative); the
    result is within 2e-5 of ``e^z − e^lo`` (the shift that puts its zero at ``lo``).

    Multiplies, adds, a clamp and a ReLU: no hidden tensor ``K`` times the scores' size (the
    PWL exp's hinge expansion), so it is cheap on a CPU runtime as well as on a chip that fuses
    elementwise chains. Subtracting the constant ``P(lo)^(2^k)`` makes ``e(lo) = 0`` exactly, so
    masked (clamped) logits get probability 0 before and after training; it is computed from the
    current coefficients by scalar operations (a compile-time constant on the chip).

    The trainable ``theta`` are the coefficients in ``t = z/|lo| ∈ [−1, 0]`` (O(1) for Adam);
    those in ``z`` are ``theta_i / |lo|^i``, again scalar constants.
    """

    def __init__(self, lo: float, theta: torch.Tensor, squarings: int, mul: nn.Module) -> None:
        super().__init__()
        if not (math.isfinite(float(lo)) and float(lo) < 0):
            raise ValueError(f"PolyExp needs a finite lo < 0, got {lo}")
        self._set_lo(lo)
        self.theta = nn.Parameter(theta.detach().reshape(-1).clone().float())
        self.terms = int(self.theta.numel())
        if self.terms < 2:
            raise ValueError("PolyExp needs at least a linear polynomial")
        self.squarings = int(squarings)
        self.mul = mul

    def coefficients(self) -> list[torch.Tensor]:
        """``c_0 … c_d`` of ``P`` in ``z`` (scalar tensors)."""
        inv = 1.0 / abs(self.lo)
        return [self.theta[i] * inv ** i for i in range(self.terms)]

    def _power(self, z: Any, c: list[torch.Tensor], mul: Any) -> Any:
        p = z * c[-1] + c[-2]
        for ci in reversed(c[:-2]):
            p = mul(p, z) + ci
        for _ in range(self.squarings):
            p = mul(p, p)
        return p

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.coefficients()
        floor = self._power(self.lo, c, operator.mul)   # P(lo)^(2^k): a scalar constant
        return torch.relu(self._power(torch.clamp(z, min=self.lo), c, self.mul) - floor)


#: Degree of :class:`PolyExp`'s polynomial and its squarings: exp by a cubic to the 16th power
#: (max error 1.7e-5 against e^z − e^lo on [lo, 0]; the 32-knot PWL exp's: 1.2e-3 on [−16, 0]).
POLY_EXP_DEGREE, POLY_EXP_SQUARINGS = 3, 4


def poly_exp_init(lo: float, samples: torch.Tensor | None, degree: int = POLY_EXP_DEGREE,
                  squarings: int = POLY_EXP_SQUARINGS) -> torch.Tensor:
    """``theta`` of :class:`PolyExp`: least squares of ``P(z) ≈ e^{z/m}`` (``m = 2^k``) over a
    uniform grid on ``[lo, 0]`` plus the calibrated ``z``, each point weighted by
    ``m·e^{z(m−1)/m}`` — the derivative of ``P^m`` there, so the fit minimises the error of
    the exp itself, not of its root."""
    if not (math.isfinite(lo) and lo < 0):
        raise ValueError(f"poly_exp_init needs a finite lo < 0, got {lo}")
    zs = [torch.linspace(lo, 0.0, 4097, dtype=torch.float64)]
    if samples is not None and samples.numel():
        s = samples.double().flatten()
        s = s[(s >= lo) & (s <= 0)]
        if s.numel():
            zs.append(subsample(s, 4096, seed=0))
    z = torch.cat(zs)
    m = 2.0 ** squarings
    w = m * torch.exp(z * (m - 1) / m)
    t = z / abs(lo)
    v = torch.stack([t ** i for i in range(degree + 1)], 1)
    theta = torch.linalg.lstsq(v * w[:, None], torch.exp(z / m) * w, rcond=None).solution
    return theta.float()


class SoftmaxPow(_RowSoftmax):
    """``p = h(x − rowmax) / Σ h`` with an elementwise stand-in ``h`` for exp — the power kernel
    (:class:`PowKernel`, ``softmax_pow``) or the cubic to the 16th (:class:`PolyExp`,
    ``softmax_poly``) — and the row sum as the target's own reduction where it has one.

    Rows sum to 1 (up to the PWL reciprocal, 5e-5, as in :class:`SoftmaxPWL`) and
    the largest logit always gets the largest weight, unlike ReLU attention's fixed gain. A
    handful of elementwise passes over the scores (power kernel: ``k + 7``; cubic: ~16) against
    ``softmax_pwl``'s K-wide hinge expansion — cheap on a CPU runtime too. Before any training,
    on MiniLM's attention logits the power kernel's row cosine to softmax is 0.9975 (``k = 2``;
    ReLU attention: 0.83); the cubic's exp is within 1.7e-5 of ``e^z − e^lo``.
    """

    def __init__(self, rank: int, n: int, exp: nn.Module, knots: int, mode: str | None,
                 dim: int | None = None, reduce: str | None = None,
                 dynamic: bool = False) -> None:
        super().__init__()
        self.replaces, self.style = "softmax", "emulation"
        self.dim = dim
        self.rowmax = RowMax(rank, n, ceil=dynamic)
        self.exp = exp
        self._normalizer("softmax", n, knots, mode, reduce)

    def kernel(self, z: torch.Tensor) -> torch.Tensor:
        return self.exp(z)


# --------------------------------------------------------------------------- matching


@dataclass
class SoftmaxMatch:
    input: torch.fx.Node
    rank: int
    n: int                 # length of the softmax axis
    dim: int | None        # None: the last axis; else the (non-negative) softmax axis
    anchor: torch.fx.Node | None = None  # the softmax node


def _valid_max(rows: torch.Tensor) -> torch.Tensor:
    """Row max over finite non-mask entries (−inf for a fully masked row), keepdim."""
    valid = torch.isfinite(rows) & (rows > MASK_THRESHOLD)
    return torch.where(valid, rows, torch.full_like(rows, -math.inf)).amax(-1, keepdim=True)


def match(node: torch.fx.Node, ctx: Any) -> SoftmaxMatch:
    """Input, rank and row length of a softmax node in any form (the rule protocol's matcher);
    raises :class:`Refuse` with the reason it is not replaced."""
    if node.op == "call_module":
        mod = ctx.gm.get_submodule(node.target)
        x, dim = node.args[0] if node.args else node.kwargs.get("input"), getattr(mod, "dim", None)
        if dim is None:
            raise Refuse("implicit softmax dim (nn.Softmax(dim=None)) is not replaced: pass dim")
        dtype = None
    else:
        kw = call_kwargs(node, ctx.gm)
        if kw is None:
            raise Refuse("could not read the softmax arguments")
        x = kw.get("input", kw.get("self"))
        dim, dtype = kw.get("dim"), kw.get("dtype")
        if kw.get("half_to_float"):
            raise Refuse("half_to_float softmax is not replaced")
    if not isinstance(x, torch.fx.Node):
        raise Refuse("softmax input is not a graph value")
    if not isinstance(dim, int):
        raise Refuse(f"softmax dim {dim!r} is not an integer")
    shape = ctx.shape(x)
    if shape is None:
        raise Refuse("input shape unknown (run shape propagation)")
    rank = len(shape)
    if rank == 0:
        raise Refuse("softmax of a scalar")
    d = dim + rank if dim < 0 else dim
    if not 0 <= d < rank:
        raise Refuse(f"softmax dim {dim} out of range for a rank-{rank} tensor")
    if rank > 5:
        raise Refuse(f"rank {rank} > 5: the row max (max_pool) supports ranks up to 5")
    if dtype is not None and ctx.dtype(x) is not None and dtype != ctx.dtype(x):
        raise Refuse(f"softmax with a dtype cast to {dtype} is not replaced")
    return SoftmaxMatch(x, rank, int(shape[d]), None if d == rank - 1 else d, node)


def _rows(node: torch.fx.Node, ctx: Any, m: SoftmaxMatch) -> torch.Tensor | None:
    """Calibrated rows of the softmax axis (None when the axis is not the last one)."""
    s = ctx.samples(node)
    if m.dim is not None or s is None or not s.inputs or s.inputs[0].shape[-1] != m.n:
        return None
    return s.inputs[0].double()


def exp_floor(rows: torch.Tensor | None) -> float:
    """``lo`` of the exp's domain: 1.25 × the lowest calibrated ``x − rowmax`` (mask values
    ignored), clipped to ``[LO_MIN, LO_MAX]``."""
    if rows is None:
        return LO_MIN
    valid = torch.isfinite(rows) & (rows > MASK_THRESHOLD)
    z = (rows - _valid_max(rows))[valid]
    if not z.numel():
        return LO_MIN
    return float(min(max(1.25 * float(z.min()), LO_MIN), LO_MAX))


# --------------------------------------------------------------------------- builders


def needs_transpose(m: SoftmaxMatch, ctx: Any) -> str | None:
    """Filter of the row-normalized candidates: a softmax over a non-last axis is transposed
    to the last one first, which needs the target's permute."""
    if m.dim is not None and not ctx.target.supports("permute"):
        return f"softmax over dim {m.dim} needs a transpose; {ctx.target.name} lacks permute"
    return None


def _row_scale_mode(ctx: Any) -> str:
    """The product form of the final row scale (``p = e · 1/s``) on this target."""
    mul = make_mul(ctx.target, "row_y", exact=True)
    if isinstance(mul, str):
        raise Refuse(mul)
    return mul.mode


def row_length(m: SoftmaxMatch, ctx: Any, reduce: str | None) -> tuple[int, str | None, bool]:
    """``(n, reduce, dynamic)`` for the row max / row sum of ``m``. In a graph captured with a
    dynamic sequence (:func:`archnet_fx.capture.dynamic_seq`), a row as long as the example's
    sequence is taken to vary up to ``max_seq_len``: the row max pools with a window of that
    length in ceil mode, and the row sum is the target's sum or a ones-matmul (a ones-linear or
    a mean would bake the length in); exact for every length, also when the row is in fact
    fixed."""
    dyn = dynamic_seq(ctx.gm)
    if dyn is None or m.n != dyn[0]:
        return m.n, reduce, False
    return max(dyn[1], m.n), ("sum" if ctx.target.supports("sum") else "ones_matmul"), True


def _build_pwl(m: SoftmaxMatch, ctx: Any) -> Replacement:
    node = m.anchor
    kind = ctx.kind(node)
    mode = _row_scale_mode(ctx) if kind == "softmax" else None
    rows = _rows(node, ctx, m)
    n, reduce, dynamic = row_length(m, ctx, None)
    mod = SoftmaxPWL(kind, m.rank, n, exp_floor(rows), ctx.options.knots, mode,
                     rows.float() if rows is not None else None, m.dim, reduce, dynamic)
    return Replacement(mod, (m.input,))


def relu_attention_init(rows: torch.Tensor | None, n: int) -> tuple[float, float]:
    """(b, g) minimising ‖relu(x + b)·g − softmax(x)‖² on the calibrated rows; ``b`` from a
    few negated quantiles of the non-mask logits; ``(0, 1/N)`` without samples."""
    if rows is None or not rows.numel():
        return 0.0, 1.0 / max(n, 1)
    rows = rows.double()
    if rows.shape[0] > 1024:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))
                    [:1024]]
    valid = torch.isfinite(rows) & (rows > MASK_THRESHOLD)
    v = rows[valid]
    if not v.numel():
        return 0.0, 1.0 / max(n, 1)
    p = torch.softmax(torch.where(valid, rows, torch.full_like(rows, -math.inf)), -1)
    p = torch.nan_to_num(p, nan=0.0)
    xs = torch.where(valid, rows, torch.full_like(rows, -1e30))
    best = (math.inf, 0.0, 1.0 / n)
    for q in (0.5, 0.75, 0.9, 0.95, 0.99):
        b = -float(torch.quantile(v[:200_000], q))
        r = torch.relu(xs + b)
        den = float((r * r).sum())
        if den <= 0:
            continue
        g = float((r * p).sum()) / den
        err = float(((r * g - p) ** 2).sum())
        if err < best[0]:
            best = (err, b, g)
    return best[1], best[2]


def _build_relu_attention(m: SoftmaxMatch, ctx: Any) -> Replacement:
    b, g = relu_attention_init(_rows(m.anchor, ctx, m), m.n)  # elementwise: any dim as is
    return Replacement(ReluAttention(b, g), (m.input,))


#: Squarings of the power kernel: relu(1 + a·z)^4.
POW_SQUARINGS = 2
_POW_TAUS = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0)


def pow_kernel_init(rows: torch.Tensor | None, squarings: int) -> float:
    """``a`` (= 1/τ) of :class:`PowKernel` minimising the squared error of the normalized rows
    against the true softmax on the calibrated rows (masked entries ignored), over a grid of
    τ; without samples ``τ = 2^k`` (then ``h(z) → e^z`` as ``k`` grows)."""
    p_exp = 2 ** squarings
    if rows is None or not rows.numel():
        return 1.0 / p_exp
    rows = rows.double()
    if rows.shape[0] > 1024:
        rows = rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))
                    [:1024]]
    valid = torch.isfinite(rows) & (rows > MASK_THRESHOLD)
    keep = valid.any(-1)
    rows, valid = rows[keep], valid[keep]
    if not rows.numel():
        return 1.0 / p_exp
    masked = torch.where(valid, rows, torch.full_like(rows, -math.inf))
    p = torch.softmax(masked, -1)
    z = torch.where(valid, rows - masked.amax(-1, keepdim=True), torch.full_like(rows, -1e30))
    best = (math.inf, 1.0 / p_exp)
    for tau in _POW_TAUS:
        h = torch.relu(1.0 + z / tau) ** p_exp
        q = h / h.sum(-1, keepdim=True)
        err = float(((q - p) ** 2).sum())
        if err < best[0]:
            best = (err, 1.0 / tau)
    return best[1]


def _square(m: SoftmaxMatch, ctx: Any) -> nn.Module:
    shape = ctx.shape(m.input)
    square = make_mul(ctx.target, shapes=(shape, shape), exact=True)
    if isinstance(square, str):
        raise Refuse(f"the exp stand-in multiplies activations: {square}")
    return square


def _kernel_softmax(m: SoftmaxMatch, ctx: Any, exp: nn.Module) -> Replacement:
    n, reduce, dynamic = row_length(m, ctx, RowSum.best_for(ctx.target))
    return Replacement(SoftmaxPow(m.rank, n, exp, ctx.options.knots, _row_scale_mode(ctx),
                                  m.dim, reduce, dynamic), (m.input,))


def _build_pow(m: SoftmaxMatch, ctx: Any) -> Replacement:
    a = pow_kernel_init(_rows(m.anchor, ctx, m), POW_SQUARINGS)
    return _kernel_softmax(m, ctx, PowKernel(a, POW_SQUARINGS, _square(m, ctx)))


def _build_poly(m: SoftmaxMatch, ctx: Any) -> Replacement:
    rows = _rows(m.anchor, ctx, m)
    lo = exp_floor(rows)
    z = None
    if rows is not None:
        z = (rows - _valid_max(rows)).clamp(min=lo)
        z = z[torch.isfinite(z)]
    return _kernel_softmax(m, ctx, PolyExp(lo, poly_exp_init(lo, z), POLY_EXP_SQUARINGS,
                                           _square(m, ctx)))


_BASE = frozenset({"linear", "relu", "reshape", "add", "sub", "mul", "clamp", "max_pool"})

CANDIDATES: tuple[Candidate, ...] = (
    Candidate("softmax_pwl", "softmax", "emulation", _BASE, _build_pwl,
              "exact row max (max_pool), PWL exp on [lo, 0], ones-linear row sum, PWL 1/s, row "
              "scale; masked logits → 0", needs_mul=True, match=match,
              filter=needs_transpose),
    Candidate("relu_attention", "softmax", "structural", frozenset({"add", "relu", "mul"}),
              _build_relu_attention, "relu(x + b)·g with trainable b, g (Arch-Net)", match=match),
    Candidate("softmax_pow", "softmax", "emulation",
              frozenset({"linear", "relu", "reshape", "add", "sub", "mul", "max_pool", "clamp"}),
              _build_pow, "row max, relu(1 + a·z)^4 for exp (trainable a), row sum (the "
              "target's sum or mean reduction, else a ones-linear), PWL 1/s, "
              "row scale; cheap on CPU runtimes", needs_mul=True, match=match,
              filter=needs_transpose),
    Candidate("softmax_poly", "softmax", "emulation",
              frozenset({"linear", "relu", "reshape", "add", "sub", "mul", "max_pool", "clamp"}),
              _build_poly, "row max, exp as relu(P(z)^16 − P(lo)^16) with a trainable cubic P "
              "(within 2e-5 of e^z − e^lo), row sum (the target's reduction), PWL 1/s, row scale; "
              "masked logits → 0; nearly exact and cheap on CPU runtimes", needs_mul=True,
              match=match, filter=needs_transpose),
    Candidate("softmax_pwl", "log_softmax", "emulation", _BASE, _build_pwl,
              "(x − rowmax) − PWL log(Σ PWL exp(x − rowmax))", match=match,
              filter=needs_transpose),
)

"""Sums of hinges, ``f(x) = a + s·x + Σ_i c_i · relu(w_i·x + β_i)``, evaluated two ways.

Every piecewise-linear surrogate (:class:`archnet_fx.surrogate.pwl.PWL`, the softmax's exp) is, on
the chip, ``Linear(1, K) → ReLU → Linear(K, 1)``: that is what tracing, legality checks and
export see. Evaluated that way on a tensor of ``N`` elements it materialises an ``N × K``
hidden tensor (and keeps it for backward): for the attention scores of one BERT layer at
batch 16 × 128 tokens with 32 knots, 400 MB and most of a distillation step's time.

The same function is linear between its breakpoints ``t_i = −β_i / w_i``. Sorting them and
taking prefix sums gives, per interval ``j``, an intercept ``A_j`` and slope ``S_j``; then
``f(x) = A[j(x)] + S[j(x)]·x`` with ``j(x)`` found by ``torch.bucketize`` — ``O(N log K)`` time,
``O(N)`` memory, and gradients for ``x``, ``w``, ``β``, ``c``, ``a``, ``s`` through the gathers.
A hinge with ``w_i < 0`` is rewritten ``|w_i|·relu(x − t_i) + w_i·x + β_i`` (its linear part
joins ``a`` and ``s``); one with ``w_i = 0`` is the constant ``relu(β_i)``. The two forms agree
to float rounding (tested); :func:`hinge_sum` takes the fast one except while a graph is being
traced (fx, TorchScript/ONNX export, torch.export/dynamo), where the hinge form must appear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hinge_sum", "tracing"]

_BIG = 1e30  # a breakpoint "at infinity" (w_i = 0) that still multiplies cleanly by 0


def tracing(x: object = None) -> bool:
    """Whether a graph is being captured (then the chip-legal hinge form must be used)."""
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    try:
        if torch.compiler.is_compiling():
            return True
    except AttributeError:  # pragma: no cover - older torch
        pass
    from torch.fx import _symbolic_trace as st
    check = getattr(st, "is_fx_symbolic_tracing", None) or st.is_fx_tracing
    return bool(check())


def _hinges(x: torch.Tensor, w: torch.Tensor, beta: torch.Tensor, c: torch.Tensor,
            a: torch.Tensor | None, s: torch.Tensor | None) -> torch.Tensor:
    h = torch.relu(F.linear(x.unsqueeze(-1), w, beta))
    y = F.linear(h, c, a).squeeze(-1)
    return y if s is None else y + x * s


def _intervals(x: torch.Tensor, w: torch.Tensor, beta: torch.Tensor, c: torch.Tensor,
               a: torch.Tensor | None, s: torch.Tensor | None) -> torch.Tensor:
    # The tables are prefix sums of terms that cancel (a decreasing hinge's linear part is
    # undone right of its breakpoint): build them in float64, evaluate in x's dtype.
    w, beta, c = w.reshape(-1).double(), beta.reshape(-1).double(), c.reshape(-1).double()
    neg, zero = w < 0, w == 0
    t = torch.where(zero, torch.full_like(w, _BIG),
                    -beta / torch.where(zero, torch.ones_like(w), w)).clamp(-_BIG, _BIG)
    m = c * w.abs()                                   # slope added right of t_i
    slope0 = (c * w * neg).sum()                      # linear parts of decreasing hinges
    icpt0 = (c * beta * neg).sum() + (c * torch.relu(beta) * zero).sum()
    if s is not None:
        slope0 = slope0 + s.reshape(()).double()
    if a is not None:
        icpt0 = icpt0 + a.reshape(()).double()
    ts, order = torch.sort(t.detach())
    ts = t[order]
    ms = m[order]
    zero1 = ms.new_zeros(1)
    slopes = torch.cat([zero1, torch.cumsum(ms, 0)]) + slope0
    icpts = torch.cat([zero1, torch.cumsum(-ms * ts, 0)]) + icpt0
    idx = torch.bucketize(x.detach().contiguous(), ts.detach().to(x.dtype))  # breakpoints below x
    return _Lookup.apply(x, icpts.to(x.dtype), slopes.to(x.dtype), idx)


class _Lookup(torch.autograd.Function):
    """``icpts[idx] + slopes[idx]·x`` with a backward that sums the table gradients by
    ``bincount`` (autograd's gather backward scatters with atomics: 5× slower on CPU, and most
    of a distillation step's PWL time)."""

    @staticmethod
    def forward(ctx, x, icpts, slopes, idx):  # type: ignore[override]
        ctx.save_for_backward(x, slopes, idx)
        return icpts[idx] + slopes[idx] * x

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, slopes, idx = ctx.saved_tensors
        n = slopes.numel()
        flat = idx.reshape(-1)
        gx = g * slopes[idx] if ctx.needs_input_grad[0] else None
        gi = torch.bincount(flat, weights=g.reshape(-1), minlength=n).to(slopes.dtype) \
            if ctx.needs_input_grad[1] else None
        gs = torch.bincount(flat, weights=(g * x).reshape(-1), minlength=n).to(slopes.dtype) \
            if ctx.needs_input_grad[2] else None
        return gx, gi, gs, None


def hinge_sum(x: torch.Tensor, w: torch.Tensor, beta: torch.Tensor, c: torch.Tensor,
              a: torch.Tensor | None = None, s: torch.Tensor | None = None, *,
              fast: bool | None = None) -> torch.Tensor:
    """``a + s·x + Σ_i c_i relu(w_i x + β_i)`` elementwise, from the two layers' parameters:
    ``w`` (K, 1), ``β`` (K,), ``c`` (1, K), ``a`` (1,) or None, ``s`` a scalar or None.
    ``fast=None`` picks the interval form unless tracing."""
    if fast is None:
        fast = not tracing(x)
    if fast and x.dtype in (torch.float32, torch.float64) and w.dtype == x.dtype:
        return _intervals(x, w, beta, c, a, s)
    return _hinges(x, w, beta, c, a, s)

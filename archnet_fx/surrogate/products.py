"""Products of two activations in whatever form a target can run.

:func:`make_mul` picks, for a target: a plain elementwise ``mul`` where allowed, else a batched
``matmul`` with inner dimension 1 (exact; per-element or row-scale layout,
:class:`MatmulMul`), else the quarter-square identity ``xy = ((x+y)² − (x−y)²)/4`` with a PWL
square (:class:`QuarterSquareMul`). :class:`RowSum` sums the last axis with the target's
reduction or a ones-matmul. Every surrogate family's products go through here.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx
from torch import nn

from archnet_fx.targets import Target
from archnet_fx.surrogate.pwl import PWL


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
    (exact up to float rounding); ``"ones_matmul"``: a matmul with a constant column of ``n``
    ones sliced to the row's length — exact for rows of any length up to ``n``, for a row axis
    whose length varies (the dynamic sequence), on targets without a sum reduction. A reduction
    reads the row once, where a CPU runtime runs the
    ones-linear as a one-column matrix product (MiniLM's attention rows: ~2 ms against ~0.3 ms
    per 6.3 M-element tensor in onnxruntime)."""

    REDUCTIONS = (None, "sum", "mean", "ones_matmul")

    def __init__(self, n: int, scale: float = 1.0, reduce: str | None = None):
        super().__init__()
        if reduce not in self.REDUCTIONS:
            raise ValueError(f"reduce must be one of {self.REDUCTIONS}, got {reduce!r}")
        self.reduce, self.n, self.scale = reduce, int(n), float(scale)
        if reduce is None:
            self.register_buffer("w", torch.full((1, n), float(scale)))
        elif reduce == "ones_matmul":   # n: the longest row
            self.register_buffer("ones", torch.ones(n, 1))

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
        if self.reduce == "ones_matmul":
            s = torch.matmul(x, torch.narrow(self.ones, 0, 0, x.shape[-1]))
            return s if self.scale == 1.0 else s * self.scale
        return x.mean(-1, keepdim=True) * (self.n * self.scale)

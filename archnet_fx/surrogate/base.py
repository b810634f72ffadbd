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
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from archnet_fx.targets import Target
from archnet_fx.surrogate.products import make_mul

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

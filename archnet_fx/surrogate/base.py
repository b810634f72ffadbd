"""The surrogate base class and the candidate protocol.

* :class:`Surrogate` — base class of every replacement module. The legality check traces a
  surrogate and judges each op inside it, so a surrogate is legal exactly when its body is.
* :class:`Candidate` — one way to replace an op kind: a rewrite rule (matcher, filter, builder;
  :mod:`archnet_fx.infra.rules`) plus its style, the op kinds its body needs and whether it
  multiplies two activations.
* :data:`STYLES`, :data:`LOSSLESS`, :data:`DEFAULT_STYLE` and :func:`default_order` — the one
  place that says which candidate a node gets when the user names none.

The building blocks candidates are made of are :mod:`~archnet_fx.surrogate.pwl` (PWL fits),
:mod:`~archnet_fx.surrogate.products` (products of activations) and
:mod:`~archnet_fx.surrogate.observe` (calibrated input samples).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from archnet_fx.targets import Target
from archnet_fx.infra.rules import match_anchor
from archnet_fx.surrogate.products import make_mul



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


def frozen_parameters(module: nn.Module) -> set[int]:
    """Ids of the parameters no training may move: those a submodule of ``module`` names in its
    ``distill_frozen`` (a parameter, or a submodule whose parameters all stay) — a PWL's skip
    slope, the softmax surrogates' normalizer. Distillation and the selection's candidate fits
    both honour it."""
    out: set[int] = set()
    for m in module.modules():
        for n in getattr(m, "distill_frozen", ()) or ():
            v = getattr(m, n, None)
            if isinstance(v, nn.Module):
                out.update(id(p) for p in v.parameters())
            elif isinstance(v, nn.Parameter):
                out.add(id(v))
    return out


# --------------------------------------------------------------------------- candidates


#: Candidate styles: ``exact`` (an identity: nothing to lose), ``emulation`` (nearly exact before
#: training: piecewise-linear fits on calibrated ranges), ``structural`` (Arch-Net's coarse forms
#: that distillation refines), ``host`` (runs on the host CPU, not the chip).
STYLES = ("emulation", "structural", "exact", "host")
#: Styles whose surrogates compute the original values: choosing among them costs no fidelity.
LOSSLESS = ("exact", "host")
#: The style tried first after the exact candidates when the user names none (the one place
#: this default lives: ``legalize``/``transform``/the CLI take it from here).
DEFAULT_STYLE = "emulation"


@dataclass(frozen=True)
class Candidate:
    """One way to replace an op kind: a rewrite rule (:mod:`archnet_fx.infra.rules`) plus its
    style and the op kinds its body needs from a target.

    ``match(node, ctx)`` finds the anchor (default: the node itself) or the chain it replaces
    (a family's match record); ``filter(match, ctx)`` returns why it refuses
    or ``None``; ``build(match, ctx)`` returns a
    :class:`~archnet_fx.infra.rules.Replacement` (the surrogate module and its argument nodes)
    or raises :class:`~archnet_fx.infra.rules.Refuse`. Before the rule is tried at all the
    surrogate pass checks :meth:`offered`: the target has every kind in ``needs`` (and a product
    of two activations where ``needs_mul``).
    """
    name: str
    kind: str
    style: str                       # one of STYLES
    needs: frozenset[str]            # op kinds the surrogate body uses
    build: Callable[..., Any]
    doc: str = ""
    needs_mul: bool = False          # multiplies two activations (see make_mul)
    match: Callable[..., Any] = match_anchor
    filter: Callable[..., str | None] | None = None

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"candidate {self.name!r}: style {self.style!r} not in {STYLES}")

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset({self.kind})

    def offered(self, target: Target) -> str | None:
        """None if this candidate can be offered on ``target``, else the reason it cannot."""
        missing = sorted(k for k in self.needs if not target.supports(k))
        if missing:
            return f"{target.name} lacks {', '.join(missing)}"
        if self.needs_mul and isinstance(make_mul(target), str):
            return f"{target.name} cannot multiply two activations in any form"
        return None

    def refusal(self, match: Any, ctx: Any) -> str | None:
        """The rule protocol's filter (the target's offer is checked by the surrogate pass
        before the rule is tried, as it costs no matching)."""
        return None if self.filter is None else self.filter(match, ctx)


def default_order(cands: Sequence[Candidate], prefer: str = DEFAULT_STYLE) -> list[Candidate]:
    """Exact candidates first (nothing to lose), then the preferred style, then the rest."""
    exact = [c for c in cands if c.style == "exact"]
    pref = [c for c in cands if c.style == prefer and c not in exact]
    return exact + pref + [c for c in cands if c not in exact and c not in pref]

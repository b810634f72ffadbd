"""The surrogate pass: every node a target cannot run, of one family's kinds, replaced by the
first candidate that the target offers, that matches, passes its filter, builds, and whose
built body is legal.

Candidates are rules (:class:`~archnet_fx.surrogate.base.Candidate`), applied by the one rule
driver (:func:`archnet_fx.infra.rules.apply_rule`); this module only decides *which* candidates
a node tries and in what order, and vets what they build:

* order — a user's choice for the node's name, else for its kind (a candidate name or a style),
  else :func:`~archnet_fx.surrogate.base.default_order` with ``prefer``;
* vetting — a built surrogate is traced and judged on the target
  (:func:`archnet_fx.legality.surrogate_verdicts`) before anything is inserted; an illegal body
  is a refusal with its reasons, and the next candidate is tried.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.fx

from archnet_fx.errors import ChoiceError
from archnet_fx.infra.graphpass import GraphPass
from archnet_fx.infra.records import PassRecord, Refusal
from archnet_fx.infra.rules import Replacement, RewriteContext, apply_rule
from archnet_fx.ir.opkinds import node_kind
from archnet_fx.ir.meta import HOST_FALLBACK_KEY
from archnet_fx.legality import check, surrogate_verdicts, unsupported_nodes
from archnet_fx.surrogate.base import DEFAULT_STYLE, STYLES, Candidate, Surrogate, default_order
from archnet_fx.surrogate.observe import NodeSamples, Ranges
from archnet_fx.targets import Target


@dataclass
class LegalizeOptions:
    """How surrogates are chosen and fitted (validated on construction)."""
    choices: Mapping[str, str] = field(default_factory=dict)
    prefer: str = DEFAULT_STYLE
    allow_host_fallback: bool = False
    knots: int = 32

    def __post_init__(self) -> None:
        if self.prefer not in STYLES:
            raise ChoiceError(f"prefer must be one of {STYLES}, got {self.prefer!r}")
        if not isinstance(self.knots, int) or isinstance(self.knots, bool) or self.knots < 2:
            raise ChoiceError(f"knots must be an integer >= 2, got {self.knots!r}")


class SurrogateContext(RewriteContext):
    """RewriteContext plus what surrogate builders need: target, input samples, choices."""

    def __init__(self, gm: torch.fx.GraphModule, pass_name: str, target: Target,
                 ranges: Ranges, options: LegalizeOptions) -> None:
        super().__init__(gm, pass_name, options)
        self.target = target
        self.ranges = ranges
        self.candidate: Candidate | None = None

    def samples(self, node: torch.fx.Node) -> NodeSamples | None:
        return self.ranges.get(node.name)

    def vet(self, replacement: Replacement) -> str | None:
        """Name the surrogate after its candidate, and refuse it if its body is illegal."""
        mod, cand = replacement.module, self.candidate
        if not isinstance(mod, Surrogate) or cand is None:
            return None
        mod.candidate = cand.name
        mod.style = mod.style or cand.style
        # Every tensor argument counts as an activation unless it is a stored constant:
        # conservative for the two-activation limits.
        act = {a for a in replacement.args if isinstance(a, torch.fx.Node) and a.op != "get_attr"}
        bad = [v for v in surrogate_verdicts(mod, self.target, "", "",
                                             _Outer(replacement.args), act)
               if v.status in ("unsupported", "limit")]
        if not bad:
            return None
        return "body not legal: " + "; ".join(f"{v.kind} ({v.reason})" for v in bad[:3])


class _Outer:
    """Stand-in for the outer node when judging a not-yet-inserted surrogate's body."""

    def __init__(self, args: Sequence[Any]) -> None:
        self.args = tuple(args)


class SurrogatePass(GraphPass):
    """Replace every node the target cannot run, of the given kinds, by a chosen surrogate."""

    exact = False

    def __init__(self, name: str, candidates: Sequence[Candidate], target: Target,
                 ranges: Ranges, options: LegalizeOptions) -> None:
        self.name = name
        self.candidates = tuple(candidates)
        self.kinds = frozenset(c.kind for c in candidates)
        self.target, self.ranges, self.options = target, ranges, options
        self.chosen: dict[str, str] = {}

    def order(self, node: torch.fx.Node, kind: str) -> list[Candidate]:
        """Candidates for ``node`` in the order they are tried (choice first)."""
        cands = [c for c in self.candidates if c.kind == kind]
        choice = self.options.choices.get(node.name) or self.options.choices.get(kind)
        if choice is not None:
            # A choice this family does not know is left to a later family (several families
            # look at generic kinds like mul or pow); legalize() validated it exists somewhere.
            return [c for c in cands if c.name == choice or c.style == choice]
        return default_order(cands, self.options.prefer)

    def apply(self, gm: torch.fx.GraphModule, record: PassRecord) -> None:
        illegal = unsupported_nodes(gm, self.target, self.kinds)
        ctx = SurrogateContext(gm, self.name, self.target, self.ranges, self.options)
        for node in list(gm.graph.nodes):
            if node.name not in illegal or getattr(node, "_erased", False):
                continue  # legal, or erased with a chain replaced earlier
            kind = node_kind(node, gm)
            if kind not in self.kinds:
                continue
            for cand in self.order(node, kind):
                why = cand.offered(self.target)
                if why is not None:
                    record.refusals.append(Refusal(node.name, cand.name, why))
                    continue
                ctx.candidate = cand
                if apply_rule(cand, node, ctx, record) is not None:
                    self.chosen[node.name] = cand.name
                    break
        ctx.anchor = ctx.candidate = None
        if self.chosen:
            record.notes.append("chosen: " + ", ".join(f"{n}→{c}" for n, c in
                                                       self.chosen.items()))


class MarkHostFallback(GraphPass):
    """Mark the nodes no candidate could legalize as host fallback (explicit, recorded)."""
    name = "host_fallback"

    def __init__(self, target: Target) -> None:
        self.target = target

    def apply(self, gm: torch.fx.GraphModule, record: PassRecord) -> None:
        by_name = {n.name: n for n in gm.graph.nodes}
        for v in check(gm, self.target).unsupported:
            n = by_name.get(v.node)
            if n is not None:
                n.meta[HOST_FALLBACK_KEY] = True
                record.rule_hits[f"host:{v.kind}"] += 1
                record.notes.append(f"{n.name} ({v.kind}) runs on the host: {v.reason}")

"""What a pass did, as data: :class:`PassRecord`, :class:`Refusal`, :class:`PassResult`.

A record lists the nodes created / erased / replaced / changed, the op-kind histogram before and
after, per-rule hits and refusals (each with its reason), wall time and notes. Printing,
diffing and drawing records are instruments (:mod:`archnet_fx.infra.instruments`), not code in
passes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx



@dataclass
class Refusal:
    """A rule looked at a node it could rewrite and declined; ``reason`` says why."""
    node: str
    rule: str
    reason: str


@dataclass
class PassRecord:
    """What one pass did to the graph."""
    name: str
    modified: bool = False
    created: list[str] = field(default_factory=list)
    erased: list[str] = field(default_factory=list)
    replaced: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    kinds_before: Counter = field(default_factory=Counter)
    kinds_after: Counter = field(default_factory=Counter)
    rule_hits: Counter = field(default_factory=Counter)
    refusals: list[Refusal] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    max_abs_error: float | None = None   # filled by verification
    exact: bool = True                   # semantics-preserving pass?

    def kind_delta(self) -> dict[str, int]:
        keys = set(self.kinds_before) | set(self.kinds_after)
        return {k: self.kinds_after[k] - self.kinds_before[k] for k in sorted(keys)
                if self.kinds_after[k] != self.kinds_before[k]}


@dataclass
class GraphState:
    """What a pass computed about the graph it left (the next pass's "before")."""
    gm: torch.fx.GraphModule
    signatures: dict[str, tuple]
    attr_ids: dict[str, int]
    kinds: Counter
    sig_cache: dict[str, tuple] = field(default_factory=dict)


@dataclass
class PassResult:
    module: torch.fx.GraphModule
    modified: bool
    record: PassRecord
    state: GraphState | None = field(default=None, repr=False, compare=False)

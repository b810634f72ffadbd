"""Rewrite rules as rows (:class:`Rule`) and the driver that applies them (:class:`RewritePass`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx

from archnet_fx.ir.meta import KIND_META_KEY
from archnet_fx.ir.opkinds import node_kind
from archnet_fx.infra.graphpass import GraphPass, fresh_attr_name, stamp_node
from archnet_fx.infra.records import PassRecord, Refusal


# --------------------------------------------------------------------------- rewrite rules

@dataclass(frozen=True)
class Rule:
    """One rewrite row.

    ``kinds``: the op kinds this rule looks at. ``match(node, ctx)`` returns a match object to
    rewrite, a string saying why it refuses, or ``None`` when the rule does not apply.
    ``build(match, ctx)`` inserts the replacement (before the anchor node) and returns its value
    node. ``doc`` states the maths.
    """
    name: str
    kinds: frozenset[str]
    match: Callable[[torch.fx.Node, "RewriteContext"], Any]
    build: Callable[[Any, "RewriteContext"], torch.fx.Node]
    doc: str = ""


class RewriteContext:
    """What a rule may use: the module being rewritten and helpers to add nodes/weights."""

    def __init__(self, gm: torch.fx.GraphModule, pass_name: str, options: Any = None) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.pass_name = pass_name
        self.options = options
        self.rule = ""
        self.anchor: torch.fx.Node | None = None

    # values -----------------------------------------------------------------
    def attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def module(self, node: torch.fx.Node) -> torch.nn.Module:
        return self.gm.get_submodule(node.target)

    def const(self, v: Any) -> Any:
        """Value of a get_attr node (tensor), of a Python literal, or None when not constant."""
        if isinstance(v, torch.fx.Node):
            if v.op == "get_attr":
                return self.attr(v.target)
            return None
        return v

    def kind(self, node: torch.fx.Node) -> str:
        return node_kind(node, self.gm)

    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        if not isinstance(node, torch.fx.Node):
            return None
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tuple(int(s) for s in tm.shape)
        return None

    @staticmethod
    def dtype(node: Any) -> torch.dtype | None:
        if not isinstance(node, torch.fx.Node):
            return None
        tm = node.meta.get("tensor_meta")
        return getattr(tm, "dtype", None)

    # building ---------------------------------------------------------------
    def _fresh(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint).strip("_") or "w"
        return fresh_attr_name(self.gm, base)

    def add_tensor(self, hint: str, t: torch.Tensor, trainable: bool = True) -> torch.fx.Node:
        """Register ``t`` as a new top-level parameter (or buffer) and return a get_attr node."""
        name = self._fresh(hint)
        if trainable and t.is_floating_point():
            self.gm.register_parameter(name, torch.nn.Parameter(t.detach().clone()))
        else:
            self.gm.register_buffer(name, t.detach().clone())
        return self._stamp(self.graph.get_attr(name))

    def add_module(self, hint: str, mod: torch.nn.Module) -> str:
        name = self._fresh(hint)
        self.gm.add_submodule(name, mod)
        return name

    def call_module(self, hint: str, mod: torch.nn.Module, args: tuple, kwargs: dict | None = None
                    ) -> torch.fx.Node:
        name = self.add_module(hint, mod)
        return self._stamp(self.graph.call_module(name, args, kwargs or {}))

    def call_function(self, fn: Callable, args: tuple, kwargs: dict | None = None
                      ) -> torch.fx.Node:
        return self._stamp(self.graph.call_function(fn, args, kwargs or {}))

    def _stamp(self, n: torch.fx.Node) -> torch.fx.Node:
        return stamp_node(n, self.pass_name, self.rule, self.anchor, overwrite=False)


class RewritePass(GraphPass):
    """A pass made of :class:`Rule` rows, applied to each node in topological order, once."""

    rules: Sequence[Rule] = ()

    def __init__(self, rules: Sequence[Rule] | None = None, name: str | None = None,
                 options: Any = None, exact: bool | None = None) -> None:
        if rules is not None:
            self.rules = tuple(rules)
        if name is not None:
            self.name = name
        if exact is not None:
            self.exact = exact
        self.options = options

    def context(self, gm: torch.fx.GraphModule) -> RewriteContext:
        return RewriteContext(gm, self.name, self.options)

    def apply(self, gm: torch.fx.GraphModule, record: PassRecord) -> None:
        ctx = self.context(gm)
        by_kind: dict[str, list[Rule]] = {}
        for r in self.rules:
            for k in r.kinds:
                by_kind.setdefault(k, []).append(r)
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op in ("placeholder", "output", "get_attr"):
                continue
            if not node.users and node.op != "output":
                # erased-later or dead; DCE handles it
                pass
            kind = node_kind(node, gm)
            for rule in by_kind.get(kind, ()):
                ctx.rule, ctx.anchor = rule.name, node
                m = rule.match(node, ctx)
                if m is None:
                    continue
                if isinstance(m, str):
                    record.refusals.append(Refusal(node.name, rule.name, m))
                    continue
                with gm.graph.inserting_before(node):
                    new = rule.build(m, ctx)
                if new is not node:
                    new.meta.setdefault(KIND_META_KEY, node_kind(new, gm))
                    node.replace_all_uses_with(new)
                    record.replaced[node.name] = new.name
                    if not node.users:
                        gm.graph.erase_node(node)
                record.rule_hits[rule.name] += 1
                break
        ctx.anchor = None

"""The one rewrite protocol: rules as rows, applied by one driver.

A :class:`Rule` is a row of a rewrite table:

* ``kinds`` — the op kinds of the anchor node it looks at;
* ``match(node, ctx)`` — finds what the rule rewrites at this anchor: a match object (the
  node itself by default, :func:`match_anchor`; a family's own record of the operands or of
  the chain, such as a norm written out by hand), or ``None`` when the rule does not apply;
  it raises :class:`Refuse` where the anchor is of its kind but cannot be rewritten;
* ``filter(match, ctx)`` — the reason it refuses this match (a string), or ``None`` to go on;
* ``build(match, ctx)`` — the replacement: a value node inserted through ``ctx`` (before the
  anchor), or a :class:`Replacement` — a module to call on argument nodes, and the last node of
  the chain it replaces when that is not the anchor — for the driver to insert. A builder that
  finds out late that it cannot build raises :class:`Refuse` with the reason;
* ``doc`` — the maths, one line.

:class:`RewritePass` applies its rules to every node in topological order, once: the first rule
whose match passes its filter and builds wins; every refusal is recorded with its reason; the
replaced node's (or chain's) uses move to the new value and what died is erased. Surrogate
candidates (:class:`archnet_fx.surrogate.base.Candidate`) are rules with a style and the op kinds
they need, applied by the same driver (:class:`archnet_fx.surrogate.driver.SurrogatePass`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence

import torch
import torch.fx

from archnet_fx.ir.meta import KIND_META_KEY
from archnet_fx.ir.opkinds import node_kind
from archnet_fx.infra.graphpass import GraphPass, fresh_attr_name, stamp_node
from archnet_fx.infra.records import PassRecord, Refusal


# --------------------------------------------------------------------------- the protocol

class Refuse(Exception):
    """Raised by a matcher or builder that finds out it cannot rewrite this node; ``reason``
    is recorded as the rule's refusal (a rule never says "no" by returning a string)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def refuse(reason: str) -> NoReturn:
    """``raise Refuse(reason)`` as an expression (``x = f() or refuse("why")``)."""
    raise Refuse(reason)


@dataclass(frozen=True)
class Replacement:
    """What a builder returns for the driver to insert: ``module`` called on ``args`` (or a
    ready node, e.g. a constant's ``get_attr``), replacing ``out`` (default: the anchor)."""
    module: Any
    args: tuple = ()
    out: torch.fx.Node | None = None


def match_anchor(node: torch.fx.Node, ctx: Any) -> torch.fx.Node:
    """The default matcher: the anchor node alone."""
    return node


@dataclass(frozen=True)
class Rule:
    """One rewrite row (see the module docstring): ``match`` → ``filter`` → ``build``."""
    name: str
    kinds: frozenset[str]
    match: Callable[[torch.fx.Node, "RewriteContext"], Any]
    build: Callable[[Any, "RewriteContext"], Any]
    doc: str = ""
    filter: Callable[[Any, "RewriteContext"], str | None] | None = None

    def refusal(self, match: Any, ctx: "RewriteContext") -> str | None:
        return None if self.filter is None else self.filter(match, ctx)


def apply_rule(rule: Any, node: torch.fx.Node, ctx: "RewriteContext", record: PassRecord
               ) -> torch.fx.Node | None:
    """Try ``rule`` on ``node``: the new value node when it rewrote, else ``None`` (not
    applicable, or refused — then the refusal and its reason are in ``record``).

    The one driver of every rewrite: canonicalization and tiling rules and surrogate
    candidates alike. ``rule`` has ``name``, ``match``, ``refusal(match, ctx)`` and ``build``;
    ``ctx.vet(replacement)`` may refuse a built replacement (a surrogate whose body the target
    cannot run) before anything is inserted.
    """
    ctx.rule, ctx.anchor = rule.name, node
    graph = ctx.gm.graph
    try:
        m = rule.match(node, ctx)
        if m is None:
            return None
        if isinstance(m, str):
            raise TypeError(f"rule {rule.name}: match returned a string ({m!r}); raise Refuse")
        why = rule.refusal(m, ctx)
        if why is None:
            with graph.inserting_before(node):
                built = rule.build(m, ctx)
            if isinstance(built, Replacement):
                why = ctx.vet(built)
    except Refuse as r:
        why = r.reason
    if why is not None:
        record.refusals.append(Refusal(node.name, rule.name, why))
        return None
    if isinstance(built, Replacement):
        out = node if built.out is None else built.out
        if isinstance(built.module, torch.fx.Node):
            new = built.module
        else:
            with graph.inserting_before(out):
                new = ctx.call_module(f"{node.name}_{rule.name}", built.module,
                                      tuple(built.args))
    elif isinstance(built, torch.fx.Node):
        out, new = node, built
    else:
        raise TypeError(f"rule {rule.name}: build returned {type(built).__name__}; expected a "
                        "Node or a Replacement")
    if new is not out:
        new.meta.setdefault(KIND_META_KEY, node_kind(new, ctx.gm))
        # the replacement computes the replaced value (same shape and dtype): later rules of
        # the same pass read its shape before the pass's shape refresh
        for key in ("tensor_meta", "val"):
            if key in out.meta and key not in new.meta:
                new.meta[key] = out.meta[key]
        out.replace_all_uses_with(new)
        record.replaced[out.name] = new.name
        if not out.users:
            graph.erase_node(out)
        if out is not node:
            graph.eliminate_dead_code()
    record.rule_hits[rule.name] += 1
    return new


class RewriteContext:
    """What a rule may use: the module being rewritten and helpers to add nodes/weights."""

    def __init__(self, gm: torch.fx.GraphModule, pass_name: str, options: Any = None) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.pass_name = pass_name
        self.options = options
        self.rule = ""
        self.anchor: torch.fx.Node | None = None

    def vet(self, replacement: Replacement) -> str | None:
        """Why ``replacement`` may not be inserted (``None``: it may). Plain rewrites build
        from legal parts; a surrogate context checks the replacement's body on the target."""
        return None

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
    def fresh_name(self, hint: str) -> str:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint).strip("_") or "w"
        return fresh_attr_name(self.gm, base)

    def add_tensor(self, hint: str, t: torch.Tensor, trainable: bool = True) -> torch.fx.Node:
        """Register ``t`` as a new top-level parameter (or buffer) and return a get_attr node."""
        name = self.fresh_name(hint)
        if trainable and t.is_floating_point():
            self.gm.register_parameter(name, torch.nn.Parameter(t.detach().clone()))
        else:
            self.gm.register_buffer(name, t.detach().clone())
        return self.stamp(self.graph.get_attr(name))

    def add_module(self, hint: str, mod: torch.nn.Module) -> str:
        name = self.fresh_name(hint)
        self.gm.add_submodule(name, mod)
        return name

    def call_module(self, hint: str, mod: torch.nn.Module, args: tuple, kwargs: dict | None = None
                    ) -> torch.fx.Node:
        name = self.add_module(hint, mod)
        return self.stamp(self.graph.call_module(name, args, kwargs or {}))

    def call_function(self, fn: Callable, args: tuple, kwargs: dict | None = None
                      ) -> torch.fx.Node:
        return self.stamp(self.graph.call_function(fn, args, kwargs or {}))

    def stamp(self, n: torch.fx.Node) -> torch.fx.Node:
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
            if node.graph is not gm.graph or getattr(node, "_erased", False) or \
                    node.op in ("placeholder", "output", "get_attr"):
                continue  # erased with a chain replaced earlier, or not an op
            for rule in by_kind.get(node_kind(node, gm), ()):
                if apply_rule(rule, node, ctx, record) is not None:
                    break
        ctx.anchor = None

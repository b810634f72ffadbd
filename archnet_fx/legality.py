"""Legality: which nodes of a graph a target can run, and why not where it cannot.

Every non-meta node gets one verdict:

=============  ==========================================================================
status         meaning
=============  ==========================================================================
ok             the target runs this kind within its limits
unsupported    the target has no such kind (``unknown:*`` kinds always land here)
limit          the kind exists but a limit is exceeded (channels, kernel size, an elementwise
               op of two activations where only activation × constant is allowed, rank)
host           explicitly marked as host fallback by legalization (``allow_host_fallback``)
prologue       host-side input preprocessing: integer/bool inputs (id → one-hot, masks) or
               values computed from input *shapes* only (index ranges over the batch)
=============  ==========================================================================

A node that depends on no input at all (a position-embedding lookup of constant ids) is judged
like any other (the graph as given asks the chip to run it) and its reason says that the
``fold_constants`` canonicalization removes it.

Surrogate submodules (``archnet_surrogate = True``) are traced and checked op by op, so a
surrogate is legal only if everything inside it is.

>>> import torch, archnet_fx as ax
>>> gm = ax.capture(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()), (torch.randn(2, 4),))
>>> rep = ax.check(gm, "npu_a")
>>> rep.ok, dict(rep.unsupported_counts)
(False, {'gelu': 1})
"""
from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
from tabulate import tabulate

from archnet_fx.ir.copying import deepcopy
from archnet_fx.ir.dataflow import activations, input_dependent, node_kinds, prologue_nodes
from archnet_fx.ir.opargs import in_channels, out_channels, weighted_op
from archnet_fx.ir.opkinds import META_KINDS, node_kind, source_location
from archnet_fx.targets import Target, load_target
from archnet_fx.ir.meta import HOST_FALLBACK_KEY
_BINARY = frozenset({"matmul", "mul", "add", "sub", "maximum", "minimum", "div"})
_CHANNEL_KINDS = frozenset({"conv", "linear", "conv_transpose"})


@dataclass(frozen=True)
class NodeVerdict:
    node: str
    kind: str
    status: str
    reason: str
    location: str


@dataclass
class LegalityReport:
    target: str
    verdicts: list[NodeVerdict] = field(default_factory=list)

    def _count(self, *statuses: str) -> Counter:
        return Counter(v.kind for v in self.verdicts if v.status in statuses)

    @property
    def unsupported(self) -> list[NodeVerdict]:
        """Nodes the chip cannot run (no such kind, or over a limit)."""
        return [v for v in self.verdicts if v.status in ("unsupported", "limit")]

    @property
    def unsupported_counts(self) -> Counter:
        return self._count("unsupported", "limit")

    @property
    def host_fallback_counts(self) -> Counter:
        return self._count("host")

    @property
    def prologue_counts(self) -> Counter:
        return self._count("prologue")

    @property
    def on_chip_counts(self) -> Counter:
        return self._count("ok")

    @property
    def ok(self) -> bool:
        """True when every on-chip node is legal (host-fallback nodes are allowed)."""
        return not self.unsupported

    @property
    def fully_on_chip(self) -> bool:
        return self.ok and not self.host_fallback_counts

    def table(self, max_nodes: int = 200) -> str:
        rows = [(k, n, "unsupported" if any(v.kind == k and v.status == "unsupported"
                                             for v in self.verdicts) else "limit")
                for k, n in sorted(self.unsupported_counts.items(), key=lambda kv: -kv[1])]
        head = (f"target {self.target}: {sum(self.on_chip_counts.values())} on-chip nodes legal, "
                f"{len(self.unsupported)} not, {sum(self.host_fallback_counts.values())} host "
                f"fallback, {sum(self.prologue_counts.values())} host prologue")
        parts = [head]
        if rows:
            parts.append(tabulate(rows, headers=["kind", "count", "why"], tablefmt="github"))
            detail = [(v.node, v.kind, v.reason, v.location) for v in self.unsupported[:max_nodes]]
            parts.append(tabulate(detail, headers=["node", "kind", "reason", "source"],
                                  tablefmt="github"))
            if len(self.unsupported) > max_nodes:
                parts.append(f"... and {len(self.unsupported) - max_nodes} more")
        for title, counts in (("host fallback", self.host_fallback_counts),
                              ("host prologue", self.prologue_counts)):
            if counts:
                parts.append(f"{title}: " + ", ".join(f"{k}×{n}" for k, n in sorted(counts.items())))
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self.table()


def _limit_violation(node: torch.fx.Node, kind: str, gm: torch.nn.Module, target: Target,
                     act: set[torch.fx.Node]) -> str | None:
    lim = target.limits(kind)
    if lim is None:
        return None
    if kind in _CHANNEL_KINDS and (lim.max_channels is not None or lim.kernel_sizes):
        op = weighted_op(node, gm, kind)
        if op is not None:
            if lim.max_channels is not None:
                cin, cout = in_channels(op), out_channels(op)
                if max(cin, cout) > lim.max_channels:
                    return (f"{cin}→{cout} channels exceed the limit of {lim.max_channels}")
            if lim.kernel_sizes and op.weight.dim() > 2:
                ks = tuple(int(s) for s in op.weight.shape[2:])
                if any(k not in lim.kernel_sizes for k in ks):
                    return f"kernel {ks} not in allowed sizes {tuple(lim.kernel_sizes)}"
    if kind in _BINARY and not lim.two_activations:
        n_act = sum(1 for a in node.all_input_nodes if a in act)
        if n_act >= 2:
            return f"{kind} of two activations is not supported (only activation × constant)"
    if lim.max_rank is not None:
        tm = node.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape") and len(tm.shape) > lim.max_rank:
            return f"rank {len(tm.shape)} exceeds the limit of {lim.max_rank}"
    return None


def _verdicts(gm: torch.fx.GraphModule, target: Target, prefix: str = "",
              act: set[torch.fx.Node] | None = None, kinds: frozenset[str] | None = None
              ) -> list[NodeVerdict]:
    """Verdicts of every node (of the given ``kinds`` only, when given: the dataflow facts are
    still global, but nodes of other kinds are not judged)."""
    kind_of = node_kinds(gm)
    act = activations(gm, kind_of) if act is None else act
    pro = prologue_nodes(gm, act, kind_of)
    dep = input_dependent(gm)
    out: list[NodeVerdict] = []
    for n in gm.graph.nodes:
        kind = kind_of[n]
        if kind in META_KINDS or (kinds is not None and kind not in kinds):
            continue
        name = prefix + n.name
        loc = source_location(n)
        if n.op == "call_module" and getattr(gm.get_submodule(n.target), "archnet_surrogate",
                                             False):
            out.extend(surrogate_verdicts(gm.get_submodule(n.target), target, name + "/", loc,
                                           n, act))
            continue
        if n.meta.get(HOST_FALLBACK_KEY):
            out.append(NodeVerdict(name, kind, "host", "marked host fallback", loc))
        elif n in pro:
            out.append(NodeVerdict(name, kind, "prologue", "integer/bool input preprocessing",
                                   loc))
        elif n in dep and n not in act and n.op != "get_attr":
            out.append(NodeVerdict(name, kind, "prologue", "computed from input shapes only",
                                   loc))
        elif not target.supports(kind):
            why = f"{target.name} has no '{kind}'"
            if n not in dep:
                why += " (compile-time constant: fold_constants removes it)"
            out.append(NodeVerdict(name, kind, "unsupported", why, loc))
        else:
            why = _limit_violation(n, kind, gm, target, act)
            out.append(NodeVerdict(name, kind, "limit" if why else "ok", why or "", loc))
    return out


try:  # generates forward() on first call only: legality and cost models just read the graph
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover - older torch
    _GraphModule = torch.fx.GraphModule

_BODIES: "weakref.WeakKeyDictionary[torch.nn.Module, torch.fx.GraphModule]" = \
    weakref.WeakKeyDictionary()


_PLAIN = (bool, int, float, str, type(None), torch.dtype)


def structure_key(mod: torch.nn.Module) -> tuple | None:
    """What a module's traced graph can depend on, or None when that cannot be told.

    Per submodule: its path, class and plain attributes (numbers, strings, flags — they steer
    ``forward`` and appear as constants in the graph); per parameter and buffer: its path,
    shape and dtype. Two modules with the same key trace to the same graph (tensor *values*
    cannot steer a symbolic trace). A module with hooks, or an attribute of any other type, gets
    None and is traced on its own.
    """
    parts: list = []
    for path, m in mod.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return None
        attrs = []
        for k, v in vars(m).items():
            if k.startswith("_") or k == "training":
                continue
            if isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v):
                attrs.append((k, tuple((type(x), x) for x in v)))
            elif isinstance(v, _PLAIN):
                attrs.append((k, type(v), v))
            else:
                return None
        tensors = tuple((k, None if t is None else (tuple(t.shape), t.dtype))
                        for k, t in list(m._parameters.items()) + list(m._buffers.items()))
        parts.append((path, type(m), tuple(sorted(attrs, key=repr)), tensors))
    return tuple(parts)


# Traced graphs by structure key (see structure_key): the 97 LayerNorm surrogates of a
# 48-layer BERT share one trace; each body still gets its own copy rooted at its own module.
_GRAPHS: dict[tuple, torch.fx.Graph] = {}
_GRAPHS_SIZE = 512


def _trace(mod: torch.nn.Module) -> torch.fx.Graph:
    from archnet_fx.capture import LeafTracer

    tracer = LeafTracer()
    tracer.record_stack_traces = False  # verdicts inside a body carry the outer location
    return tracer.trace(mod)


def traced_body(mod: torch.nn.Module) -> torch.fx.GraphModule:
    """The fx graph of a surrogate's body (cached: a surrogate's structure never changes)."""
    body = _BODIES.get(mod)
    if body is None:
        key = structure_key(mod)
        try:
            graph = _GRAPHS.get(key) if key is not None else None
        except TypeError:  # an unhashable attribute inside a tuple
            key, graph = None, None
        if graph is None:
            graph = _trace(mod)
            if key is not None:
                if len(_GRAPHS) >= _GRAPHS_SIZE:
                    _GRAPHS.pop(next(iter(_GRAPHS)))
                _GRAPHS[key] = graph
        body = _GraphModule(mod, deepcopy(graph))
        _BODIES[mod] = body
    return body


# Verdicts of a surrogate's body, per module: {(id(target), activation pattern of the outer
# arguments): (target, [(inner name, kind, status, reason)])}. A body never changes, so each
# surrogate is judged once per target however many times the graph around it is checked.
_BODY_VERDICTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_STRUCT_VERDICTS: dict[tuple, tuple] = {}  # (structure_key, (id(target), pattern)) -> as above


def clear_body_cache() -> None:
    """Forget traced surrogate bodies and their verdicts by structure (cold starts, tests)."""
    _GRAPHS.clear()
    _STRUCT_VERDICTS.clear()


def surrogate_verdicts(mod: torch.nn.Module, target: Target, prefix: str, loc: str,
                        outer: torch.fx.Node, outer_act: set[torch.fx.Node]) -> list[NodeVerdict]:
    pattern = tuple(isinstance(a, torch.fx.Node) and a in outer_act for a in outer.args)
    per_mod = _BODY_VERDICTS.setdefault(mod, {})
    key = (id(target), pattern)
    hit = per_mod.get(key)
    if hit is None or hit[0] is not target:
        # Same structure, same verdicts (a body's verdicts depend on its op kinds, weight
        # shapes and activation pattern only; bodies carry no shape metadata).
        skey = structure_key(mod)
        try:
            shared = _STRUCT_VERDICTS.get((skey, key)) if skey is not None else None
        except TypeError:
            skey, shared = None, None
        if shared is not None and shared[0] is target:
            per_mod[key] = shared
            hit = shared
    if hit is None or hit[0] is not target:
        inner = traced_body(mod)
        act = activations(inner)
        # Inner placeholders are activations only where the outer argument is one.
        phs = [p for p in inner.graph.nodes if p.op == "placeholder"]
        for p, is_act in zip(phs, pattern):
            if not is_act:
                act.discard(p)
        act = _closure(inner, act)
        hit = (target, [(v.node, v.kind, v.status, v.reason)
                        for v in _verdicts(inner, target, "", act)])
        per_mod[key] = hit
        if skey is not None:
            if len(_STRUCT_VERDICTS) >= _GRAPHS_SIZE:
                _STRUCT_VERDICTS.pop(next(iter(_STRUCT_VERDICTS)))
            _STRUCT_VERDICTS[(skey, key)] = hit
    return [NodeVerdict(prefix + name, kind, status, reason, loc)
            for name, kind, status, reason in hit[1]]


def _closure(gm: torch.fx.GraphModule, seeds: set[torch.fx.Node]) -> set[torch.fx.Node]:
    roots = {n for n in seeds if n.op == "placeholder"}
    act: set[torch.fx.Node] = set(roots)
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        if node_kind(n, gm) in ("shape", "assert"):
            continue
        if any(a in act for a in n.all_input_nodes):
            act.add(n)
    return act


def unsupported_nodes(gm: torch.fx.GraphModule, target: Target, kinds: frozenset[str]
                      ) -> set[str]:
    """Names of the nodes of ``kinds`` that ``check(gm, target)`` reports as not runnable
    (without judging, or locating, every other node)."""
    return {v.node for v in _verdicts(gm, target, kinds=kinds)
            if v.status in ("unsupported", "limit")}


def check(gm: torch.fx.GraphModule, target: str | Target) -> LegalityReport:
    """Legality of every node of ``gm`` on ``target`` (a name, a .toml path or a Target)."""
    tgt = load_target(target)
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"check() needs a torch.fx.GraphModule (from archnet_fx.capture), got "
                        f"{type(gm).__name__}")
    return LegalityReport(tgt.name, _verdicts(gm, tgt))

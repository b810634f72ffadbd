"""Passes, their records, and the manager that runs a named pipeline of them.

A *pass* maps a GraphModule to a :class:`PassResult` ``(module, modified, record)``. It never edits
its input: :meth:`GraphPass.__call__` copies the graph (parameters and submodules are shared, never
written in place; a pass that changes a weight registers a new tensor), lets the subclass edit the
copy, then lints, recompiles, re-derives shapes and records what changed:

* nodes created / erased / replaced (old name → new name), by node name;
* the op-kind histogram before and after;
* per-rule hits and refusals (with the reason each refusal gave);
* wall time; and provenance ``node.meta["archnet.from_pass"]`` / ``["archnet.rule"]`` on every
  node the pass created.

A *rewrite pass* is a table of :class:`Rule` rows: the kinds it looks at, a ``match`` that returns
a match object (or a refusal string, or ``None`` when it does not apply) and a ``build`` that
receives the match and returns the replacement value. The driver swaps uses and removes what died.

The :class:`PassManager` runs a named, straight-line list of passes, optionally verifying each
(``graph.lint`` plus a numerical comparison with the previous stage on the example inputs), and on
failure raises :class:`PipelineError` naming the passes that ran and the one that failed.

Cost (what keeps a pipeline linear in the graph size, issue 6): the manager copies the graph once
and runs the passes on that private copy (:meth:`GraphPass.run_inplace`), recompiling the
generated code once at the end (or before each verification) — so a pass must not call the module
between passes; analyses interpret the graph. Shapes after a pass are re-derived only for the
nodes it touched (:func:`_dirty_nodes`): a call node created as the replacement of another takes
that node's shape and dtype (a replacement computes the same value), other new or changed nodes
are evaluated on meta tensors from their inputs' shapes, and their users only if a shape changed.
The whole graph is run on the example only where that is not possible, and once when its shapes
came from another example (a fresh capture's full batch; shapes are kept on the batch-1 shape
example as before). Each pass's "after" (node signatures, weight identities, kind histogram) is
the next pass's "before".
"""
from __future__ import annotations

import copy
import logging
import operator
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from archnet_fx.capture import (propagate_shapes, propagate_shapes_incremental, shape_example,
                                shapes_from)
from archnet_fx.errors import PipelineError, VerificationError
from archnet_fx.opkinds import (KIND_META_KEY, META_KINDS, annotate_kinds, kind_histogram,
                                node_kind)

log = logging.getLogger(__name__)

FROM_PASS_KEY = "archnet.from_pass"
RULE_KEY = "archnet.rule"


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
class _GraphState:
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
    state: _GraphState | None = field(default=None, repr=False, compare=False)


def copy_graph_module(gm: torch.fx.GraphModule, *, lazy: bool = False) -> torch.fx.GraphModule:
    """A new GraphModule with a copied graph that shares ``gm``'s parameters and submodules.

    ``lazy=True`` returns a module whose Python code is generated on first use (a pipeline that
    is about to rewrite the copy would throw the first generation away): its owner calls
    :func:`recompile_now` when done.
    """
    graph = copy.deepcopy(gm.graph)
    cls = _LazyGraphModule if lazy else torch.fx.GraphModule
    new = cls(gm, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    # Extra attributes that torch.export's unlifted module keeps outside the graph.
    for name in ("_in_spec", "_out_spec"):
        if hasattr(gm, name) and not hasattr(new, name):
            setattr(new, name, getattr(gm, name))
    return new


def recompile_now(gm: torch.fx.GraphModule) -> None:
    """Regenerate ``gm``'s code now (a lazy module's ``recompile()`` only marks it stale)."""
    gm.recompile()
    if isinstance(gm, _LazyGraphModule):
        gm.real_recompile()


def _leaves(a: Any, out: list) -> list:
    """Leaves of an fx argument structure (tuples, lists, dict values), appended to ``out``."""
    if isinstance(a, (tuple, list)):
        for x in a:
            _leaves(x, out)
    elif isinstance(a, dict):
        for x in a.values():
            _leaves(x, out)
    else:
        out.append(a)
    return out


_EXACT = (int, str, bool, type(None))  # compared by value (with their type); others by repr


def _key(a: Any) -> Any:
    if isinstance(a, torch.fx.Node):
        return (_NODE_TAG, a.name)
    if type(a) in _EXACT:
        return (type(a), a)
    return repr(a)


def _target_key(t: Any) -> Any:
    return t if isinstance(t, str) else ("%target", id(t))


def _signature(n: torch.fx.Node) -> tuple:
    return (n.op, _target_key(n.target), tuple(_key(a) for a in _leaves(n.args, [])),
            tuple(sorted((k, _key(v)) for k, v in n.kwargs.items())))


def _signatures(graph: torch.fx.Graph, cache: dict[str, tuple] | None
                ) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Every node's signature, and the cache for the next call.

    fx never edits a node's ``args``/``kwargs`` containers in place (every rewiring installs
    new, immutable ones), so a node whose op, target and containers are the very objects seen
    last time has last time's signature: only the nodes a pass touched are walked again.
    """
    cache = cache or {}
    sigs, fresh = {}, {}
    for n in graph.nodes:
        a, k, t = n.args, n.kwargs, n.target
        c = cache.get(n.name)
        if c is not None and c[0] is n and c[1] is a and c[2] is k and c[3] is t \
                and c[4] == n.op:
            sig = c[5]
        else:
            sig = _signature(n)
        sigs[n.name] = sig
        fresh[n.name] = (n, a, k, t, n.op, sig)
    return sigs, fresh


_NODE_TAG = "%node"  # marks a node reference inside a signature (vs. a constant's repr)


def _rewire(sig: tuple, replaced: dict[str, str]) -> tuple:
    """``sig`` with every node reference renamed through ``replaced`` (old → new name)."""
    def ren(k: Any) -> Any:
        if isinstance(k, tuple) and len(k) == 2 and k[0] == _NODE_TAG:
            name, seen = k[1], set()
            while name in replaced and name not in seen:
                seen.add(name)
                name = replaced[name]
            return (_NODE_TAG, name)
        return k
    op, target, args, kwargs = sig
    return (op, target, tuple(ren(a) for a in args), tuple((k, ren(v)) for k, v in kwargs))


def _dirty_nodes(gm: torch.fx.GraphModule, record: PassRecord, before: dict[str, tuple],
                 after: dict[str, tuple], old_meta: dict[str, tuple], old_ids: dict[str, int],
                 new_ids: dict[str, int]) -> list[torch.fx.Node]:
    """The nodes whose shapes must be re-derived after a pass.

    A call node created as the *replacement* of another (``record.replaced``) computes the same
    value, so it takes the replaced node's shape and dtype (this is the rewrite contract;
    verification compares values and shapes) — a surrogate module is never run for its shape.
    A new ``get_attr`` reads its tensor's own. A node whose only change is that its inputs were
    rewired to such replacements keeps its shape. Everything else the pass created or changed, and every
    node reading a swapped weight or submodule, is dirty.
    """
    created = set(record.created)
    inherited: dict[str, str] = {}  # new name -> the name of the node it replaced
    calls = {n.name for n in gm.graph.nodes if n.name in created and n.op != "get_attr"}
    for old, new in record.replaced.items():
        if new in calls and old_meta.get(old, (None,))[0] is not None:
            inherited[new] = old
    dirty_names = (created - inherited.keys()) | {
        k for k in record.changed if _rewire(before[k], record.replaced) != after[k]}
    swapped = {t for t, i in new_ids.items() if old_ids.get(t) != i}
    dirty = []
    for n in gm.graph.nodes:
        if n.name in inherited:
            n.meta["tensor_meta"], typ = old_meta[inherited[n.name]]
            if typ is not None:
                n.meta["type"] = typ
        elif n.name in dirty_names or (n.op in ("get_attr", "call_module")
                                       and str(n.target) in swapped):
            dirty.append(n)
    return dirty


def _attr_ids(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Identity of every module/tensor the graph reads (a swapped weight counts as a change)."""
    out = {}
    parents: dict[str, Any] = {}  # owner paths resolved so far (targets share long prefixes)
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module"):
            t = str(n.target)
            if t not in out:
                out[t] = id(_resolve(gm, t, parents))
    return out


def _resolve(root: Any, target: str, parents: dict[str, Any] | None = None) -> Any:
    """``getattr`` along a dotted path (None where it breaks), reading a module's parameter,
    buffer and submodule tables directly (``nn.Module.__getattr__`` is the slow path).
    ``parents`` memoizes the owner of each path resolved (for many targets in one graph)."""
    head, _, last = target.rpartition(".")
    if head and parents is not None:
        if head not in parents:
            parents[head] = _resolve(root, head, parents)
        obj, parts = parents[head], [last]
    else:
        obj, parts = root, target.split(".")
    for part in parts:
        if isinstance(obj, torch.nn.Module):
            d = obj.__dict__
            for table in ("_parameters", "_buffers", "_modules"):
                tab = d.get(table)
                if tab is not None and part in tab:
                    obj = tab[part]
                    break
            else:
                obj = getattr(obj, part, None)
        else:
            obj = getattr(obj, part, None)
    return obj


def refresh(gm: torch.fx.GraphModule, dirty: Iterable[torch.fx.Node] | None = None, *,
            recompile: bool = True, lint: bool = True) -> None:
    """Lint, recompile, re-propagate shapes on the stored example, re-annotate kinds.

    With ``dirty`` (the nodes a pass created or rewired), shapes are re-derived for those nodes
    only, on meta tensors (:func:`~archnet_fx.capture.propagate_shapes_incremental`), and the
    whole graph is run on the example only when that is not possible, or when the graph's
    shapes come from another example (capture records one sample's shapes, so only a graph
    whose one-sample propagation failed, or whose shapes were set by hand).
    """
    if lint:
        gm.graph.lint()
    if recompile:
        gm.recompile()
    example = shape_example(gm)
    if example is not None:
        # Incremental only on top of shapes from this same (batch-1) example, so passes see
        # the shapes a full run on it gives.
        if dirty is None or not shapes_from(gm, *example) or \
                propagate_shapes_incremental(gm, dirty) is None:
            propagate_shapes(gm, *example)
    annotate_kinds(gm)


class GraphPass:
    """Base class: subclasses set ``name`` and implement :meth:`apply` on a private copy."""

    name: str = "pass"
    exact: bool = True  # semantics-preserving; verification compares numerics tightly

    def apply(self, gm: torch.fx.GraphModule, record: PassRecord) -> None:
        """Edit ``gm`` (a private copy) in place, noting rule hits in ``record``."""
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        """Run on a private copy of ``gm`` (``gm`` itself is never edited)."""
        t0 = time.perf_counter()
        return self.run_inplace(copy_graph_module(gm), _t0=t0)

    def run_inplace(self, gm: torch.fx.GraphModule, *, recompile: bool = True,
                    prior: "_GraphState | None" = None, lint: bool = True,
                    _t0: float | None = None) -> PassResult:
        """Run on ``gm`` itself: for a pass manager that owns ``gm`` (a copy it made).

        Does everything :meth:`__call__` does except the copy; with ``recompile=False`` the
        generated ``forward`` is left stale for the owner to recompile once (nothing between
        passes calls the module: analyses interpret the graph). ``prior`` is the previous
        pass's ``result.state`` when nothing touched ``gm`` since: its node signatures, weight
        identities and kind histogram are this pass's "before" (not recomputed). ``lint=False``
        skips the graph's structural lint, for an owner that lints once after its last pass.
        """
        t0 = time.perf_counter() if _t0 is None else _t0
        record = PassRecord(name=self.name, exact=self.exact)
        if prior is not None and prior.gm is gm:
            before, old_ids, cache = prior.signatures, prior.attr_ids, prior.sig_cache
            record.kinds_before = Counter(prior.kinds)
        else:
            before, cache = _signatures(gm.graph, None)
            old_ids = _attr_ids(gm)
            record.kinds_before = kind_histogram(gm)
        old_meta = {n.name: (n.meta.get("tensor_meta"), n.meta.get("type"))
                    for n in gm.graph.nodes}
        already_dead = _dead_names(gm.graph)
        attrs = _attr_counts(gm)
        self.apply(gm, record)
        # Remove what this pass made dead, not dead code it was given (that is the dce pass's
        # job, and its record should say so).
        _eliminate_new_dead_code(gm.graph, keep=already_dead)
        after, cache = _signatures(gm.graph, cache)
        if after != before or _attr_counts(gm) != attrs:  # else nothing can have become unused
            _drop_unused_attributes(gm)
        record.created = [k for k in after if k not in before]
        record.erased = [k for k in before if k not in after]
        record.changed = [k for k in after if k in before and after[k] != before[k]]
        new_ids = _attr_ids(gm)
        if after != before or new_ids != old_ids:
            refresh(gm, _dirty_nodes(gm, record, before, after, old_meta, old_ids, new_ids),
                    recompile=recompile, lint=lint)
        else:
            if lint:
                gm.graph.lint()
            annotate_kinds(gm)
        record.modified = bool(record.created or record.erased or record.changed)
        created = set(record.created)
        for n in gm.graph.nodes:
            if n.name in created:
                n.meta.setdefault(FROM_PASS_KEY, self.name)
        # Kinds were just annotated (refresh or annotate_kinds above): count those.
        record.kinds_after = Counter(k for k in (n.meta[KIND_META_KEY] for n in gm.graph.nodes)
                                     if k not in META_KINDS)
        record.seconds = time.perf_counter() - t0
        return PassResult(gm, record.modified, record,
                          _GraphState(gm, after, new_ids, record.kinds_after, cache))

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


_INPLACE_OPERATORS = frozenset({operator.setitem, operator.iadd, operator.isub, operator.imul,
                                operator.itruediv, operator.ifloordiv, operator.ipow,
                                operator.iand, operator.ior, operator.ixor})


def is_inplace(node: torch.fx.Node) -> bool:
    """Whether ``node`` writes into one of its inputs (``x.add_(1)``, ``x[i] = v``, ``aten.*_``)."""
    if node.op not in ("call_function", "call_method"):
        return False
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.is_mutable
    if t in _INPLACE_OPERATORS:
        return True
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    return name.endswith("_") and not name.endswith("__") and not name.startswith("_")


# call_function targets' purity: for anything but a higher-order operator it depends on the
# callable alone (schema mutability, side-effect and RNG registries), and torch's check walks
# several registries per call — a large graph asks about the same few hundred targets often.
_IMPURE_TARGETS: dict[Any, bool] = {}


def is_impure(node: torch.fx.Node) -> bool:
    """torch's notion of impure, plus in-place Tensor methods (fx calls every method pure)."""
    if node.op != "call_function" or isinstance(node.target, torch._ops.HigherOrderOperator):
        return node.is_impure() or is_inplace(node)
    try:
        hit = _IMPURE_TARGETS.get(node.target)
    except TypeError:  # an unhashable callable
        return node.is_impure() or is_inplace(node)
    if hit is None:
        if len(_IMPURE_TARGETS) >= 4096:  # bounded: targets can be per-trace callables
            _IMPURE_TARGETS.clear()
        hit = _IMPURE_TARGETS[node.target] = node.is_impure() or is_inplace(node)
    return hit


def _dead_names(graph: torch.fx.Graph) -> set[str]:
    """Names of the nodes dead code elimination would remove."""
    # Dead code starts at a pure node without users; a clean graph has none (then skip the
    # O(graph) walk with its is_impure() per node).
    if not any(not n.users and n.op != "output" and not is_impure(n) for n in graph.nodes):
        return set()
    dead: set[torch.fx.Node] = set()
    for n in reversed(graph.nodes):
        if not is_impure(n) and all(u in dead for u in n.users):
            dead.add(n)
    return {n.name for n in dead}


def _eliminate_new_dead_code(graph: torch.fx.Graph, keep: set[str]) -> None:
    """Dead code elimination that leaves the nodes named in ``keep`` alone."""
    for n in reversed(graph.nodes):
        if n.name not in keep and not n.users and not is_impure(n):
            graph.erase_node(n)


def _delete_unused_submodules(gm: torch.fx.GraphModule) -> None:
    """``GraphModule.delete_all_unused_submodules`` with a set instead of a list lookup (that
    one is O(modules × used paths): quadratic in the model size)."""
    used: set[str] = set()
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr") and isinstance(n.target, str):
            parts = n.target.split(".")
            used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            if n.op == "call_module":
                try:
                    sub = gm.get_submodule(n.target)
                except AttributeError:
                    continue
                used.update(f"{n.target}.{name}" for name, _ in sub.named_modules() if name)
    for name in [name for name, _ in gm.named_modules() if name not in used]:
        gm.delete_submodule(name)


def _attr_counts(gm: torch.fx.GraphModule) -> tuple[int, int, int]:
    return len(gm._modules), len(gm._parameters), len(gm._buffers)


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    _delete_unused_submodules(gm)
    # Top-level parameters/buffers the graph no longer reads (e.g. folded weights).
    for name in list(gm._parameters):
        if name not in used:
            del gm._parameters[name]
    for name in list(gm._buffers):
        if name not in used:
            del gm._buffers[name]


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


def fresh_attr_name(gm: torch.nn.Module, hint: str, taken: set[str] | None = None) -> str:
    """A top-level attribute name for ``gm`` made from ``hint`` (non-identifier characters
    become ``_``), suffixed ``_1``, ``_2``, … until it is neither an attribute of ``gm`` nor in
    ``taken`` (names already handed out but not yet registered; the new one is added)."""
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint)
    name, i = base, 0
    while hasattr(gm, name) or (taken is not None and name in taken):
        i += 1
        name = f"{base}_{i}"
    if taken is not None:
        taken.add(name)
    return name


#: node.meta entries that say where in the user's source a node comes from.
SOURCE_META_KEYS = ("nn_module_stack", "stack_trace", "archnet.module_path")


def stamp_node(n: torch.fx.Node, pass_name: str, rule: str | None,
               like: torch.fx.Node | None = None, *, overwrite: bool = True) -> torch.fx.Node:
    """Provenance of a node a pass created: the pass and rule, and ``like``'s source location
    (replacing what ``n`` has unless ``overwrite=False``)."""
    n.meta[FROM_PASS_KEY] = pass_name
    n.meta[RULE_KEY] = rule
    if like is not None:
        for k in SOURCE_META_KEYS:
            if k in like.meta and (overwrite or k not in n.meta):
                n.meta[k] = like.meta[k]
    return n


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


# --------------------------------------------------------------------------- manager

@dataclass
class PipelineResult:
    """Output of :meth:`PassManager.run`: the final module, one record per pass, the stages."""
    module: torch.fx.GraphModule
    records: list[PassRecord]
    pipeline: str
    stages: list[torch.fx.GraphModule] = field(default_factory=list, repr=False)

    def record(self, name: str) -> PassRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(f"no pass named {name!r} ran; passes: {[r.name for r in self.records]}")

    def diff(self, name: str | None = None) -> str:
        from archnet_fx.inspect import pass_diff, records_table
        return records_table(self.records) if name is None else pass_diff(self.record(name))


def flat_outputs(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def compare_outputs(ref: Any, got: Any) -> float:
    """Largest absolute difference between two (nested) outputs; inf on structure mismatch."""
    a, b = flat_outputs(ref), flat_outputs(got)
    if len(a) != len(b):
        return float("inf")
    err = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            err = max(err, float((x.double() - y.double()).abs().max()))
    return err


def _scale(out: Any) -> float:
    ts = flat_outputs(out)
    return max([float(t.double().abs().max()) for t in ts if t.numel()] + [1.0])


class PassManager:
    """Runs a named straight-line pipeline of passes.

    ``verify=True`` lints each result and compares it numerically with the previous stage on the
    example inputs: an ``exact`` pass must agree within ``rtol * max|output| + atol`` (defaults
    1e-4, 1e-5); an approximate pass (a surrogate) records its error without failing.
    """

    def __init__(self, name: str, passes: Iterable[GraphPass], *, verify: bool = False,
                 rtol: float = 1e-4, atol: float = 1e-5, keep_stages: bool = False) -> None:
        self.name = name
        self.passes = list(passes)
        self.verify = verify
        self.rtol, self.atol = rtol, atol
        self.keep_stages = keep_stages

    def run(self, gm: torch.fx.GraphModule, *, copy: bool = True, recompile: bool = True
            ) -> PipelineResult:
        """Run the pipeline on a copy of ``gm``; ``copy=False`` edits ``gm`` itself (for a caller
        that owns it, e.g. the output of an earlier pipeline). ``recompile=False`` leaves the
        result's generated ``forward`` stale, for a caller that edits it further and then calls
        ``module.recompile()`` once."""
        records: list[PassRecord] = []
        stages = [gm] if self.keep_stages else []
        # Verify on (at most) the first two samples: batch-dependent bugs still show, and a
        # large calibration-sized example does not make every pass cost a full forward.
        example = shape_example(gm, batch=2)
        prev_out = None
        if self.verify and example is not None:
            if not copy:
                gm.recompile()  # ours, possibly left stale by an earlier pipeline
            with torch.no_grad():
                prev_out = gm(*example[0], **example[1])
        # Passes edit one private copy in place (one graph copy and one recompile per pipeline,
        # not per pass); kept stages need a module per pass, and a pass that wraps __call__
        # gets called as such.
        cur = gm if self.keep_stages or not copy else copy_graph_module(gm, lazy=True)
        stale = False
        state = None
        for p in self.passes:
            ran = [r.name for r in records]
            try:
                if self.keep_stages or type(p).__call__ is not GraphPass.__call__:
                    if stale:
                        cur.recompile()
                        stale = False
                    res = p(cur)
                    state = None
                else:
                    # Linted per pass only when verifying (it names the pass that broke the
                    # graph); otherwise once, after the last pass.
                    res = p.run_inplace(cur, recompile=False, prior=state, lint=self.verify)
                    state = res.state
                    stale = stale or res.modified
                    if self.verify and stale:
                        cur.recompile()
                        stale = False
            except Exception as e:  # noqa: BLE001
                raise PipelineError(
                    f"pipeline '{self.name}': pass '{p.name}' failed: {type(e).__name__}: {e}\n"
                    f"  passes that ran: {ran or 'none'}") from e
            rec = res.record
            if self.verify and example is not None:
                with torch.no_grad():
                    out = res.module(*example[0], **example[1])
                err = compare_outputs(prev_out, out)
                rec.max_abs_error = err
                tol = self.rtol * _scale(prev_out) + self.atol
                if p.exact and not err <= tol:
                    raise VerificationError(
                        f"pipeline '{self.name}': pass '{p.name}' changed the numerics: max |diff| "
                        f"{err:.3g} > tolerance {tol:.3g}\n  passes that ran: {ran or 'none'}")
                prev_out = out
            log.debug("pass %s: %s", p.name, rec.kind_delta())
            records.append(rec)
            cur = res.module
            if self.keep_stages:
                stages.append(cur)
        if not self.verify and self.passes:
            try:
                cur.graph.lint()
            except Exception as e:  # noqa: BLE001
                raise PipelineError(
                    f"pipeline '{self.name}': the graph after passes "
                    f"{[r.name for r in records]} is malformed: {e} (run with verify=True to "
                    f"find the pass)") from e
        if recompile and (stale or (cur is not gm and isinstance(cur, _LazyGraphModule))):
            recompile_now(cur)
        return PipelineResult(cur, records, self.name, stages)

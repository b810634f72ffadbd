"""The pass base class: copy, edit, record, re-derive shapes.

A *pass* maps a GraphModule to a :class:`PassResult` ``(module, modified, record)``. It never edits
its input: :meth:`GraphPass.__call__` copies the graph (parameters and submodules are shared, never
written in place; a pass that changes a weight registers a new tensor), lets the subclass edit the
copy, then lints, recompiles, re-derives shapes and records what changed:

* nodes created / erased / replaced (old name → new name), by node name;
* the op-kind histogram before and after;
* per-rule hits and refusals (with the reason each refusal gave);
* wall time; and provenance ``node.meta["archnet.from_pass"]`` / ``["archnet.rule"]`` on every
  node the pass created.

Rewrite rules and their driver are in :mod:`archnet_fx.infra.rules`; the manager that runs a
named list of passes is :mod:`archnet_fx.infra.manager`.

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

import logging
import operator
import time
from collections import Counter
from typing import Any, Iterable

import torch
import torch.fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from archnet_fx.ir.shapes import (propagate_shapes, propagate_shapes_incremental, shape_example,
                                  shapes_from)
from archnet_fx.ir.copying import deepcopy
from archnet_fx.ir.meta import KIND_META_KEY
from archnet_fx.ir.opkinds import META_KINDS, annotate_kinds, kind_histogram
from archnet_fx.ir.meta import FROM_PASS_KEY, RULE_KEY, SOURCE_META_KEYS
from archnet_fx.infra.records import PassRecord, PassResult, GraphState

log = logging.getLogger(__name__)


def copy_graph_module(gm: torch.fx.GraphModule, *, lazy: bool = False) -> torch.fx.GraphModule:
    """A new GraphModule with a copied graph that shares ``gm``'s parameters and submodules.

    ``lazy=True`` returns a module whose Python code is generated on first use (a pipeline that
    is about to rewrite the copy would throw the first generation away): its owner calls
    :func:`recompile_now` when done.
    """
    graph = deepcopy(gm.graph)
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
    only, on meta tensors (:func:`~archnet_fx.ir.shapes.propagate_shapes_incremental`), and the
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
                    prior: "GraphState | None" = None, lint: bool = True,
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
                          GraphState(gm, after, new_ids, record.kinds_after, cache))

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

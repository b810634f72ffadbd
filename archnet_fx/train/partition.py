"""Partition a GraphModule into blocks for blockwise distillation (design.md §8).

A *block* is a contiguous stretch of the graph's topological order, turned into its own
GraphModule ``forward(*inputs) -> tuple(outputs)`` that shares the parent's parameters and
submodules (training a block trains the parent). Its **inputs** are every value produced before
it (or a graph input) that it uses — side inputs such as an attention mask cross every block —
and its **outputs** every value it produces that a later block or the graph output uses.

Where to cut. The graph becomes a networkx DiGraph; the nodes that depend on graph inputs
(*activations*) are ordered topologically (the fx order, which is one) and for each position the
*live set* — values produced at or before it and used after it — is computed from each value's
last use. A cut is cheap where few tensors are live (a tensor counts 1, a Python value such as a
shape 1/4); a cut through a tuple (before its ``getitem``) or one a caller's ``boundary_ok``
rejects is not allowed. Nodes that depend on no graph input (``get_attr``, constant arithmetic)
belong to no block: each block gets its own copy of the ones it uses, so no weight crosses a
boundary.

* Default (``granularity=None``): about one layer per block. Nodes are grouped by their
  module path (``nn_module_stack``): the prefix up to the first numeric component
  (``encoder.layer.3``, ``blocks.0``) or the top-level child (``patch_embed``, ``fc``); nodes
  without a path join the group before them. Groups without a conv/linear/matmul/lookup join
  the group before (a ReLU or its surrogate stays with its conv, a final norm with its layer), groups much cheaper than the median (< 30 %) join their cheaper
  neighbour; then each group boundary moves, within a quarter of the adjacent groups, to the
  position with the fewest live tensors (nearest wins ties).
* ``granularity=N``: N blocks of about equal cost (multiply-accumulates estimated from the
  shapes), each cut at the fewest-live position within ±1/(4N) of the order around its target.
* ``cut_nodes=[...]``: cut right after each named node.

:func:`run_blocks` runs the blocks one after another and returns what the GraphModule returns;
it equals ``gm(...)`` (the tests check it).

>>> import torch, archnet_fx as ax
>>> gm = ax.capture(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
...                                     torch.nn.Linear(8, 2)), (torch.randn(3, 4),))
>>> blocks = partition(gm, cut_nodes=["_1"])
>>> [b.outputs for b in blocks]
[['_1'], ['_2']]
>>> x = torch.randn(5, 4)
>>> torch.equal(run_blocks(blocks, gm, x), gm(x))
True
"""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import networkx as nx
import torch
import torch.fx

from archnet_fx.errors import InputError, OptionError
from archnet_fx.ir.dataflow import input_dependent
from archnet_fx.ir.opkinds import META_KINDS, node_kind

__all__ = ["Block", "partition", "run_blocks", "bind_inputs", "live_profile", "layer_key",
           "block_table", "output_structure"]

_NOT_ALLOWED = float("inf")


@dataclass
class Block:
    """One block: a GraphModule over a stretch of the parent graph."""
    index: int
    name: str                         # e.g. "encoder.layer.3" (the layer group it covers)
    nodes: list[str]                  # the activation nodes it computes, in order
    inputs: list[str]                 # values it reads (graph inputs / earlier blocks' values)
    outputs: list[str]                # values it produces that later blocks or the output use
    side_inputs: list[str]            # inputs not produced by the block right before it
    module: torch.fx.GraphModule = field(repr=False)
    live_after: float = 0.0           # weighted count of live values at its end

    def __call__(self, *inputs: Any) -> tuple:
        return self.module(*inputs)

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.module.parameters())


# --------------------------------------------------------------------------- analysis


def _val_meta(n: torch.fx.Node) -> Any:
    tm = n.meta.get("tensor_meta")
    if tm is not None:
        return tm
    return n.meta.get("val")


def _is_tensor(n: torch.fx.Node) -> bool:
    tm = n.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return True
    return isinstance(n.meta.get("val"), torch.Tensor)


def _is_sequence(n: torch.fx.Node) -> bool:
    tm = _val_meta(n)
    if isinstance(tm, (tuple, list)) and not hasattr(tm, "shape"):  # TensorMetadata is a tuple
        return True
    return any(u.op == "call_function" and node_kind(u) == "getitem" for u in n.users)


def _weight(n: torch.fx.Node) -> float:
    if _is_sequence(n):
        return _NOT_ALLOWED
    return 1.0 if _is_tensor(n) else 0.25


def to_networkx(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The data-flow graph of ``gm`` (every node, including meta ones), fx order kept."""
    g = nx.DiGraph()
    for i, n in enumerate(gm.graph.nodes):
        g.add_node(n.name, order=i, op=n.op)
    for n in gm.graph.nodes:
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    return g


def _order(gm: torch.fx.GraphModule, g: nx.DiGraph) -> list[torch.fx.Node]:
    by_name = {n.name: n for n in gm.graph.nodes}
    names = nx.lexicographical_topological_sort(g, key=lambda v: g.nodes[v]["order"])
    return [by_name[v] for v in names]


def _activation_nodes(gm: torch.fx.GraphModule, order: list[torch.fx.Node]) -> list[torch.fx.Node]:
    dep = input_dependent(gm)
    # Impure nodes (guards, asserts) that read inputs are input-dependent already.
    return [n for n in order if n in dep and n.op not in ("placeholder", "output")]


def live_profile(gm: torch.fx.GraphModule) -> list[tuple[str, float, list[str]]]:
    """For each activation node (in order): (name, weighted live count after it, live names)."""
    g = to_networkx(gm)
    order = _order(gm, g)
    acts = _activation_nodes(gm, order)
    pos = {n: i for i, n in enumerate(acts)}
    out = []
    live: dict[torch.fx.Node, int] = {}
    last = _last_uses(acts, pos)
    for i, n in enumerate(acts):
        live[n] = last[n]
        for v in [v for v, lu in live.items() if lu <= i]:
            del live[v]
        out.append((n.name, sum(_weight(v) for v in live), [v.name for v in live]))
    return out


def _last_uses(acts: list[torch.fx.Node], pos: dict[torch.fx.Node, int]) -> dict[torch.fx.Node, int]:
    end = len(acts)
    last = {}
    for n in acts:
        lu = -1
        for u in n.users:
            lu = max(lu, end if u.op == "output" else pos.get(u, end))
        last[n] = lu
    # Graph placeholders are handled separately (always available).
    return last


# --------------------------------------------------------------------------- layer groups


_INDEX = re.compile(r"\[['\"]?(\w+)['\"]?\]")


def _module_path(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        path = _INDEX.sub(r".\1", str(path))
        path = path.replace("L.self.", "").replace("L['self'].", "")
        if path.startswith("self."):
            path = path[5:]
        return path.strip(".")
    if n.op == "call_module":
        return str(n.target)
    return ""


def layer_key(n: torch.fx.Node) -> str | None:
    """``encoder.layer.3`` for a node inside ``encoder.layer.3.attention...``; top-level child
    name for paths without an index; None for nodes without a module path."""
    path = _module_path(n)
    if not path:
        return None
    parts = path.split(".")
    for j, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:j + 1])
    return parts[0]


_WEIGHTED = frozenset({"linear", "conv", "conv_transpose", "matmul", "einsum",
                       "surrogate:embedding", "embedding", "sdpa", "multihead_attention"})


def _is_weighted(n: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Whether ``n`` is a layer's main op (a conv/linear/matmul/lookup), not a pointwise one."""
    return node_kind(n, gm) in _WEIGHTED


def _numel(n: Any) -> int:
    if not isinstance(n, torch.fx.Node):
        return 1
    tm = n.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        k = 1
        for s in tm.shape:
            k *= int(s)
        return k
    return 1


def _cost(n: torch.fx.Node, gm: torch.fx.GraphModule) -> float:
    """Rough multiply-accumulate count of a node (for balancing blocks)."""
    kind = node_kind(n, gm)
    if kind in META_KINDS:
        return 0.0
    out = _numel(n)
    tm = n.meta.get("tensor_meta")
    last = int(tm.shape[-1]) if tm is not None and hasattr(tm, "shape") and len(tm.shape) else 1
    if n.op == "call_module":
        p = sum(q.numel() for q in gm.get_submodule(n.target).parameters())
        return float(out + p * out / max(1, last))
    if kind == "matmul" and n.args and isinstance(n.args[0], torch.fx.Node):
        itm = n.args[0].meta.get("tensor_meta")
        k = int(itm.shape[-1]) if itm is not None and hasattr(itm, "shape") else 1
        return float(out * k)
    p = 0
    for a in n.all_input_nodes:
        if a.op == "get_attr" and _is_tensor(a):
            p += _numel(a)
    return float(out + p * out / max(1, last))


# --------------------------------------------------------------------------- partition


def partition(gm: torch.fx.GraphModule, granularity: int | None = None,
              cut_nodes: Sequence[str] | None = None, *,
              boundary_ok: Callable[[list[str]], str | None] | None = None) -> list[Block]:
    """Split ``gm`` into blocks (see the module docstring).

    ``boundary_ok(live_value_names)`` may reject a cut by returning a reason (a string); the
    automatic modes avoid such cuts, ``cut_nodes`` raises ``ValueError`` with the reason.
    """
    if granularity is not None and cut_nodes is not None:
        raise OptionError("give granularity or cut_nodes, not both")
    if granularity is not None and (not isinstance(granularity, int) or isinstance(granularity,
                                                                                   bool)
                                    or granularity < 1):
        raise OptionError(f"granularity must be a positive integer (number of blocks) or None, "
                         f"got {granularity!r}")
    g = to_networkx(gm)
    order = _order(gm, g)
    acts = _activation_nodes(gm, order)
    if not acts:
        raise InputError("the graph computes nothing from its inputs: nothing to partition")
    pos = {n: i for i, n in enumerate(acts)}
    last = _last_uses(acts, pos)
    n_acts = len(acts)

    # live count after each position, and whether a cut there is allowed
    live_w = [0.0] * n_acts
    live_sets: list[list[torch.fx.Node]] = [[] for _ in range(n_acts)]
    live: dict[torch.fx.Node, int] = {}
    for i, n in enumerate(acts):
        live[n] = last[n]
        for v in [v for v, lu in live.items() if lu <= i]:
            del live[v]
        live_sets[i] = list(live)
        live_w[i] = sum(_weight(v) for v in live)

    reasons: dict[int, str] = {}

    def allowed(i: int) -> bool:
        if i >= n_acts - 1 or i < 0:
            return False
        if live_w[i] == _NOT_ALLOWED:
            reasons[i] = "a tuple value crosses it (cut after its getitem instead)"
            return False
        if not any(_is_tensor(v) for v in live_sets[i]):
            reasons[i] = "no tensor crosses it"
            return False
        if boundary_ok is not None:
            why = boundary_ok([v.name for v in live_sets[i]])
            if why:
                reasons[i] = why
                return False
        return True

    if cut_nodes is not None:
        names = {n.name: n for n in acts}
        cuts = []
        for c in cut_nodes:
            if c not in names:
                known = any(n.name == c for n in gm.graph.nodes)
                raise OptionError(f"cut node {c!r} " + ("computes no activation (a constant or "
                                                         "graph input): cut after a node that "
                                                         "depends on the inputs"
                                                         if known else "is not in the graph"))
            i = pos[names[c]]
            if i == n_acts - 1:
                raise OptionError(f"cut node {c!r} is the last node: nothing left after it")
            if not allowed(i):
                raise OptionError(f"cannot cut after {c!r}: {reasons.get(i, 'not allowed')}")
            cuts.append(i)
        cuts = sorted(set(cuts))
        names_for = None
    else:
        costs = [_cost(n, gm) for n in acts]
        if granularity is not None:
            cuts = _balanced_cuts(costs, granularity, live_w, allowed)
            names_for = None
        else:
            cuts, names_for = _layer_cuts(acts, gm, costs, live_w, allowed)
    return _build_blocks(gm, acts, cuts, live_w, names_for)


def _nearest_min(lo: int, hi: int, target: int, live_w: list[float],
                 allowed: Callable[[int], bool]) -> int | None:
    best, best_key = None, None
    for i in range(max(lo, 0), min(hi, len(live_w) - 2) + 1):
        if not allowed(i):
            continue
        key = (live_w[i], abs(i - target))
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def _balanced_cuts(costs: list[float], n_blocks: int, live_w: list[float],
                   allowed: Callable[[int], bool]) -> list[int]:
    total = sum(costs) or float(len(costs))
    if sum(costs) == 0:
        costs = [1.0] * len(costs)
    cum, acc = [], 0.0
    for c in costs:
        acc += c
        cum.append(acc)
    n = len(costs)
    width = max(1, n // (4 * n_blocks))
    cuts: list[int] = []
    for k in range(1, n_blocks):
        goal = total * k / n_blocks
        target = next((i for i, c in enumerate(cum) if c >= goal), n - 1)
        lo = (cuts[-1] + 1) if cuts else 0
        c = _nearest_min(max(lo, target - width), target + width, target, live_w, allowed)
        if c is None:
            c = _nearest_min(lo, n - 2, target, live_w, allowed)
        if c is not None and (not cuts or c > cuts[-1]):
            cuts.append(c)
    return cuts


def _layer_cuts(acts: list[torch.fx.Node], gm: torch.fx.GraphModule, costs: list[float],
                live_w: list[float], allowed: Callable[[int], bool]
                ) -> tuple[list[int], list[str]]:
    keys: list[str | None] = [layer_key(n) for n in acts]
    first = next((k for k in keys if k is not None), "graph")
    cur = first
    for i, k in enumerate(keys):
        if k is None:
            keys[i] = cur
        else:
            cur = k
    # groups: [start, end) runs of equal keys
    groups: list[list[Any]] = []  # [start, end, key, cost, has a weighted op]
    for i, k in enumerate(keys):
        if groups and groups[-1][2] == k:
            groups[-1][1] = i + 1
            groups[-1][3] += costs[i]
            groups[-1][4] = groups[-1][4] or _is_weighted(acts[i], gm)
        else:
            groups.append([i, i + 1, k, costs[i], _is_weighted(acts[i], gm)])

    def merge(a: int, b: int) -> None:  # merge groups[b] into groups[a] (adjacent)
        ga, gb = groups[a], groups[b]
        lo, hi = min(ga[0], gb[0]), max(ga[1], gb[1])
        key = ga[2] if ga[3] >= gb[3] else gb[2]
        groups[min(a, b)] = [lo, hi, key, ga[3] + gb[3], ga[4] or gb[4]]
        del groups[max(a, b)]

    i = 0
    while i < len(groups) and len(groups) > 1:  # groups without a weighted op join the one before
        if not groups[i][4]:
            if i > 0:
                merge(i - 1, i)
                i -= 1
            else:
                merge(1, 0)
            continue
        i += 1
    while len(groups) > 1:  # tiny groups join their cheaper neighbour
        med = statistics.median(g[3] for g in groups)
        small = [j for j, g in enumerate(groups) if g[3] < 0.3 * med]
        if not small:
            break
        j = min(small, key=lambda j: groups[j][3])
        if j == 0:
            merge(0, 1)
        elif j == len(groups) - 1:
            merge(j - 1, j)
        else:
            merge(j - 1 if groups[j - 1][3] <= groups[j + 1][3] else j + 1, j)
    cuts: list[int] = []
    names: list[str] = [groups[0][2]]
    for a, b in zip(groups, groups[1:]):
        boundary = a[1] - 1  # cut after the last node of group a
        width = max(1, min(a[1] - a[0], b[1] - b[0]) // 4)
        lo = max(boundary - width, (cuts[-1] + 1) if cuts else 0)
        c = _nearest_min(lo, boundary + width, boundary, live_w, allowed)
        if c is None or (cuts and c <= cuts[-1]):
            names[-1] = f"{names[-1]}+{b[2]}"
            continue
        cuts.append(c)
        names.append(b[2])
    return cuts, names


def _build_blocks(gm: torch.fx.GraphModule, acts: list[torch.fx.Node], cuts: list[int],
                  live_w: list[float], names: list[str] | None) -> list[Block]:
    bounds = [0] + [c + 1 for c in cuts] + [len(acts)]
    block_of: dict[torch.fx.Node, int] = {}
    spans = []
    for k in range(len(bounds) - 1):
        span = acts[bounds[k]:bounds[k + 1]]
        spans.append(span)
        for n in span:
            block_of[n] = k
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    blocks = []
    for k, span in enumerate(spans):
        members = set(span)
        inputs: list[torch.fx.Node] = []
        consts: set[torch.fx.Node] = set()

        def need(a: torch.fx.Node) -> None:
            if a in members or a in consts or a in inputs:
                return
            if a.op == "placeholder" or a in block_of:
                inputs.append(a)
                return
            consts.add(a)  # constant: copy it (and its constant inputs) into the block
            for b in a.all_input_nodes:
                need(b)

        for n in span:
            for a in n.all_input_nodes:
                need(a)
        outputs = [n for n in span if any(
            u is out_node or (u in block_of and block_of[u] > k) for u in n.users)]
        prev = set(spans[k - 1]) if k > 0 else set()
        side = [a.name for a in inputs if a not in prev] if k > 0 else []
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for a in inputs:
            p = graph.placeholder(a.name)
            p.meta = dict(a.meta)
            env[a] = p
        for n in gm.graph.nodes:  # constants first, in graph order
            if n in consts:
                env[n] = graph.node_copy(n, lambda x: env[x])
        for n in span:
            env[n] = graph.node_copy(n, lambda x: env[x])
        graph.output(tuple(env[o] for o in outputs))
        mod = torch.fx.GraphModule(gm, graph, class_name=f"Block{k}")
        name = names[k] if names is not None and k < len(names) else f"block{k}"
        blocks.append(Block(k, name, [n.name for n in span], [a.name for a in inputs],
                            [o.name for o in outputs], side, mod,
                            live_w[bounds[k + 1] - 1] if k < len(spans) - 1 else 0.0))
    return blocks


# --------------------------------------------------------------------------- running


def bind_inputs(gm: torch.fx.GraphModule, args: Sequence[Any] = (),
                kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Values of ``gm``'s placeholders for a call ``gm(*args, **kwargs)``, by placeholder name."""
    kwargs = dict(kwargs or {})
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(args) > len(phs):
        raise InputError(f"{len(args)} positional inputs for a graph with {len(phs)} inputs")
    env: dict[str, Any] = {}
    for n, v in zip(phs, args):
        env[n.name] = v
    for n in phs[len(args):]:
        if n.target in kwargs:
            env[n.name] = kwargs[n.target]
        elif n.name in kwargs:
            env[n.name] = kwargs[n.name]
        elif n.args:
            env[n.name] = n.args[0]
        else:
            env[n.name] = None
    return env


def output_structure(gm: torch.fx.GraphModule, env: Mapping[str, Any]) -> Any:
    """The graph's return value built from ``env`` (value name → value)."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    flat = torch.fx.node.map_arg(out_node.args[0], lambda n: env[n.name])
    return gm.graph._codegen.process_outputs(flat)


def run_blocks(blocks: Sequence[Block], gm: torch.fx.GraphModule, *args: Any,
               **kwargs: Any) -> Any:
    """Run ``gm``'s blocks in order on ``gm(*args, **kwargs)``'s inputs; returns what gm does."""
    env = bind_inputs(gm, args, kwargs)
    for b in blocks:
        outs = b.module(*[env[i] for i in b.inputs])
        env.update(zip(b.outputs, outs))
    return output_structure(gm, env)


def block_table(blocks: Iterable[Block]) -> str:
    """A table of blocks: nodes, inputs (side inputs), outputs, live values at the cut."""
    from tabulate import tabulate

    rows = [(b.index, b.name, len(b.nodes), len(b.inputs), ", ".join(b.side_inputs[:4])
             + (" …" if len(b.side_inputs) > 4 else ""), ", ".join(b.outputs[:4])
             + (" …" if len(b.outputs) > 4 else ""), f"{b.live_after:g}") for b in blocks]
    return tabulate(rows, headers=["block", "layer", "nodes", "inputs", "side inputs",
                                   "outputs", "live at cut"], tablefmt="github") + (
        "\nside inputs: values from earlier blocks besides the previous block's outputs; live at "
        "cut: values alive across the block's end (a tensor counts 1, a Python scalar such as a "
        "shape 1/4): what must be stored between blocks")

"""Surrogates for table lookups: ``embedding`` and ``gather`` of rows of a constant table.

A lookup ``y = T[ids]`` (``T``: a ``V × D`` weight) appears as an ``nn.Embedding`` call,
``F.embedding(ids, T)``, ``aten.embedding.default(T, ids)``, ``aten.index.Tensor(T, [ids])`` or
``index_select(T, 0, ids)``. Targets without ``embedding``/``gather`` (npu_a, npu_b) get one of:

* ``const_rows`` (exact): the ids depend on no graph input (position tables indexed by a
  constant ``arange`` slice) — the rows ``T[ids]`` are computed once and stored as a *new*
  trainable parameter of the same shape as the lookup's output (``(1, L, D)`` for ids of shape
  ``(1, L)``, broadcast over the batch by the add that follows, exactly as before).
* ``onehot_linear`` (exact, Arch-Net): ``T[ids] = onehot(ids) @ T``. The one-hot
  ``(ids[..., None] == arange(V)).to(float)`` is computed from integer ids only, so it runs in
  the host prologue at the graph input (reports list it under "host prologue", not on chip);
  the chip runs a bias-free linear with weight ``Tᵀ`` (trainable), split into chunks of at most
  the target's ``linear.max_channels`` input channels — ``Σ_k onehot[..., a_k:b_k] @ T[a_k:b_k]``
  — so a 30522-row vocabulary is legal on npu_a (8192) and npu_b (2048). Exactly one chunk
  holds the 1 of each token and the others add exact zeros, so the result equals the lookup
  bit for bit in float32. ``padding_idx`` is just a row (its zero-gradient rule is a training
  detail the surrogate drops); ``max_norm`` (renormalises looked-up rows in place) is refused.
  Ids outside ``[0, V)`` give a zero row where the lookup would raise.
* ``host_lookup`` (host): keep the lookup and run it in the host prologue
  (``node.meta["archnet.prologue"]``). Nothing runs on chip, so it is always legal; the cost is a
  ``B × L × D`` float transfer per call instead of ``B × L × V`` one-hot values. Use it where the
  one-hot matmul is too expensive (large vocabularies); it is tried only when chosen
  (``choices={"embedding": "host_lookup"}`` or ``prefer="host"``).

Default order: ``const_rows`` where the ids are constant, else ``onehot_linear``. On dsp_c,
which has ``embedding`` and ``gather``, nothing fires.

Cost of ``onehot_linear`` on all-MiniLM-L6-v2's word table (V = 30522, D = 384), batch
32 × 128 tokens, float32, 2 CPU threads: the lookup takes 12 ms; the one-hot path 3.3 s on npu_a
(4 chunks; prologue 1.0 s + linears 2.5 s) and 4.5 s on npu_b (15 chunks), i.e. 96 GFLOP of
matmul, and ~620 MB more peak memory (the 500 MB float one-hot plus its 125 MB bool
intermediate) — against 4.8 s for the whole original MiniLM forward. Max abs difference to the
lookup: 0.0. Where that is too much, choose ``host_lookup``.

>>> import torch, archnet_fx as ax
>>> from archnet_fx.legalize import legalize
>>> m = torch.nn.Sequential(torch.nn.Embedding(5000, 8))
>>> x = torch.randint(0, 5000, (2, 6))
>>> res = legalize(m, "npu_b", (x,))
>>> list(res.choices.values())
['onehot_linear']
>>> rep = ax.check(res.module, "npu_b")
>>> dict(rep.prologue_counts), dict(rep.on_chip_counts)
({'reshape': 1, 'compare': 1, 'cast': 1}, {'slice': 3, 'linear': 3, 'add': 2})
>>> bool((res.module(x) == m(x)).all())
True
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from archnet_fx.infra.rules import Refuse, Replacement
from archnet_fx.ir.meta import PROLOGUE_KEY
from archnet_fx.ir.dataflow import input_dependent
from archnet_fx.ir.opargs import call_kwargs
from archnet_fx.ir.meta import FROM_PASS_KEY, RULE_KEY
from archnet_fx.surrogate.base import Candidate, Surrogate

KINDS = ("embedding", "gather")


# --------------------------------------------------------------------------- reading a lookup


@dataclass
class Lookup:
    """One table lookup ``out = table[ids]``, whatever form the graph spells it in."""
    kind: str
    op: str                      # "embedding" | "index" | "index_select"
    table: torch.Tensor          # (V, D)
    ids: torch.fx.Node | torch.Tensor
    padding_idx: int | None = None
    max_norm: float | None = None
    norm_type: float = 2.0
    anchor: torch.fx.Node | None = None  # the lookup node (set by the matcher)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The lookup evaluated on concrete ``ids`` (on a copy: max_norm renormalises in place)."""
        t = self.table.detach().clone()
        if self.op == "embedding":
            return F.embedding(ids, t, self.padding_idx, self.max_norm, self.norm_type)
        if self.op == "index_select":
            return torch.index_select(t, 0, ids)
        return t[ids]


def _tensor_attr(gm: torch.nn.Module, v: Any) -> torch.Tensor | None:
    if isinstance(v, torch.fx.Node) and v.op == "get_attr":
        obj: Any = gm
        for part in str(v.target).split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def read_lookup(node: torch.fx.Node, gm: torch.nn.Module, kind: str) -> Lookup:
    """The lookup ``node`` performs (raises Refuse where it is not a row lookup of a constant 2-D table)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, nn.Embedding):
            raise Refuse(f"{type(mod).__name__} is not nn.Embedding")
        ids = node.args[0] if node.args else node.kwargs.get("input")
        return Lookup(kind, "embedding", mod.weight, ids, mod.padding_idx, mod.max_norm,
                      mod.norm_type)
    kw = call_kwargs(node, gm)
    if kw is None:
        raise Refuse("cannot read the lookup's arguments")
    if kind == "embedding":
        table = _tensor_attr(gm, kw.get("weight"))
        ids = kw.get("indices", kw.get("input"))
        pad = kw.get("padding_idx")
        pad = None if pad is None or pad < 0 else int(pad)
        look = Lookup(kind, "embedding", table, ids, pad, kw.get("max_norm"),
                      float(kw.get("norm_type", 2.0) or 2.0))
    elif "indices" in kw:  # aten.index.Tensor(table, [ids])
        idx = kw["indices"]
        if not isinstance(idx, (list, tuple)) or len(idx) != 1 or idx[0] is None:
            raise Refuse("index with several (or None) index tensors is not a row lookup")
        look = Lookup(kind, "index", _tensor_attr(gm, kw.get("input")), idx[0])
    elif "index" in kw and "dim" in kw and "sparse_grad" not in kw:  # index_select
        if kw["dim"] not in (0, -2) or not isinstance(kw["index"], torch.fx.Node):
            raise Refuse("index_select along a non-row dimension")
        look = Lookup(kind, "index_select", _tensor_attr(gm, kw.get("input")), kw["index"])
    else:
        raise Refuse(f"{node.target} is not a row lookup (gather along an axis)")
    if look.table is None:
        raise Refuse("the table is computed at run time, not a stored weight")
    if look.table.dim() != 2:
        raise Refuse(f"table has rank {look.table.dim()}, expected (V, D)")
    if not look.table.is_floating_point():
        raise Refuse("integer table")
    return look


def match_lookup(node: torch.fx.Node, ctx: Any) -> Lookup:
    """The rule protocol's matcher: the lookup ``node`` performs, with integer graph ids."""
    look = read_lookup(node, ctx.gm, ctx.kind(node))
    if not isinstance(look.ids, torch.fx.Node):
        raise Refuse("ids are not a graph value")
    dt = ctx.dtype(look.ids)
    if dt is not None and (dt.is_floating_point or dt.is_complex):
        raise Refuse(f"ids have dtype {dt}")
    return dataclasses.replace(look, anchor=node)


def _const_value(node: torch.fx.Node, gm: torch.fx.GraphModule,
                 memo: dict[torch.fx.Node, Any]) -> Any:
    """Evaluate a node that depends on no graph input (a constant subgraph)."""
    if node in memo:
        return memo[node]

    def arg(a: Any) -> Any:
        return _const_value(a, gm, memo)

    args = torch.fx.node.map_arg(node.args, arg)
    kwargs = torch.fx.node.map_arg(node.kwargs, arg)
    if node.op == "get_attr":
        val = _tensor_attr(gm, node)
    elif node.op == "call_function":
        val = node.target(*args, **kwargs)
    elif node.op == "call_method":
        val = getattr(args[0], node.target)(*args[1:], **kwargs)
    elif node.op == "call_module":
        val = gm.get_submodule(node.target)(*args, **kwargs)
    else:
        raise ValueError(f"{node.name} ({node.op}) is not a constant")
    memo[node] = val
    return val


# --------------------------------------------------------------------------- const_rows


def _constant_ids(look: Lookup, ctx: Any) -> str | None:
    return "ids depend on a graph input" if look.ids in input_dependent(ctx.gm) else None


def _build_const_rows(look: Lookup, ctx: Any) -> Replacement:
    # T[c] for constant ids c is itself a constant: store it (trainable) and read it.
    node = look.anchor
    with torch.no_grad():
        ids = _const_value(look.ids, ctx.gm, {})
        if not isinstance(ids, torch.Tensor):
            raise Refuse("ids did not evaluate to a tensor")
        rows = look.rows(ids)
    with ctx.graph.inserting_before(node):
        new = ctx.add_tensor(f"{node.name}_rows", rows, trainable=True)
    return Replacement(new, ())


# --------------------------------------------------------------------------- onehot_linear


def _bounds(n: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, n)) for a in range(0, n, step)]


class OneHotLinear(Surrogate):
    """``onehot @ T`` as bias-free linears over chunks of at most ``max_channels`` channels.

    ``parts[j * len(ins) + i]`` maps one-hot columns ``ins[i]`` to output columns ``outs[j]``;
    partial products over input chunks are added, output chunks concatenated.
    """

    def __init__(self, table: torch.Tensor, max_channels: int | None, kind: str = "embedding"
                 ) -> None:
        super().__init__()
        self.replaces, self.style = kind, "exact"
        v, d = table.shape
        step = int(max_channels) if max_channels else max(v, d)
        self.ins, self.outs = _bounds(v, step), _bounds(d, step)
        self.num_embeddings, self.embedding_dim = v, d
        parts = []
        for o0, o1 in self.outs:
            for a, b in self.ins:
                lin = nn.Linear(b - a, o1 - o0, bias=False, dtype=table.dtype,
                                device=table.device)
                with torch.no_grad():
                    lin.weight.copy_(table[a:b, o0:o1].t())
                parts.append(lin)
        self.parts = nn.ModuleList(parts)

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        cols = []
        for j in range(len(self.outs)):
            acc = None
            for i, (a, b) in enumerate(self.ins):
                x = onehot if len(self.ins) == 1 else onehot[..., a:b]
                y = self.parts[j * len(self.ins) + i](x)
                acc = y if acc is None else acc + y
            cols.append(acc)
        return cols[0] if len(cols) == 1 else torch.cat(cols, -1)

    def table(self) -> torch.Tensor:
        """The current (V, D) table the surrogate looks rows up in."""
        rows = []
        for i in range(len(self.ins)):
            rows.append(torch.cat([self.parts[j * len(self.ins) + i].weight.t()
                                   for j in range(len(self.outs))], 1))
        return torch.cat(rows, 0)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, {self.num_embeddings}×{self.embedding_dim} in "
                f"{len(self.ins)}×{len(self.outs)} chunks")


def _no_max_norm(look: Lookup, ctx: Any) -> str | None:
    if look.max_norm is not None:
        return ("max_norm renormalises looked-up rows of the table in place at every call; a "
                "one-hot matmul cannot reproduce that (choose host_lookup)")
    return None


def _build_onehot_linear(look: Lookup, ctx: Any) -> Replacement:
    # T[ids] = onehot(ids) @ T; onehot on the host (integer input), @ T on chip in chunks.
    node = look.anchor
    if look.ids not in input_dependent(ctx.gm):
        raise Refuse("ids are constant: const_rows stores the rows instead")
    lim = ctx.target.limits("linear")
    mod = OneHotLinear(look.table.detach(), getattr(lim, "max_channels", None), look.kind)
    v = look.table.shape[0]
    with ctx.graph.inserting_before(node):
        vocab = ctx.add_tensor(f"{node.name}_vocab", torch.arange(v, device=look.table.device),
                               trainable=False)
        col = ctx.call_function(torch.unsqueeze, (look.ids, -1))
        hit = ctx.call_function(torch.eq, (col, vocab))
        onehot = ctx.call_function(torch.Tensor.to, (hit, look.table.dtype))
    for n in (col, hit, onehot):
        n.meta[PROLOGUE_KEY] = True  # integer/bool → one-hot: host-side input preprocessing
    return Replacement(mod, (onehot,))


# --------------------------------------------------------------------------- host_lookup


def _chosen(node: torch.fx.Node, ctx: Any) -> bool:
    opts = ctx.options
    choice = opts.choices.get(node.name) or opts.choices.get(ctx.kind(node))
    return choice in ("host_lookup", "host") or (choice is None and opts.prefer == "host")


def _chosen_with_input_ids(look: Lookup, ctx: Any) -> str | None:
    if not _chosen(look.anchor, ctx):
        return ("runs only when chosen (choices={'embedding': 'host_lookup'} or "
                "prefer='host')")
    if look.ids not in input_dependent(ctx.gm):
        return "ids are constant: const_rows stores the rows instead"
    return None


def _build_host_lookup(look: Lookup, ctx: Any) -> Replacement:
    # y = T[ids] unchanged, computed on the host before the chip runs.
    node = look.anchor
    with ctx.graph.inserting_before(node):
        new = ctx.graph.node_copy(node)
    new.meta[FROM_PASS_KEY] = ctx.pass_name
    new.meta[RULE_KEY] = ctx.rule
    new.meta[PROLOGUE_KEY] = True
    return Replacement(new, ())


CANDIDATES: tuple[Candidate, ...] = tuple(
    Candidate(name, kind, style, needs, build, doc, match=match_lookup, filter=filter_)
    for kind in KINDS
    for name, style, needs, build, filter_, doc in (
        ("const_rows", "exact", frozenset(), _build_const_rows, _constant_ids,
         "T[c] for constant ids c stored as a trainable constant"),
        ("onehot_linear", "exact", frozenset({"linear", "slice", "add"}), _build_onehot_linear,
         _no_max_norm,
         "onehot(ids) on the host, @ T on chip as chunked linears (≤ max_channels inputs)"),
        ("host_lookup", "host", frozenset(), _build_host_lookup, _chosen_with_input_ids,
         "the lookup itself, run in the host prologue"),
    )
)

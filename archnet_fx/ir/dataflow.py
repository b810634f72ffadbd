"""Small data-flow facts about a graph, shared by legality, constant folding and the cost model.

* *activation*: a node whose value depends on the runtime values of a graph input.
* *input-dependent*: a node that depends on a graph input at all (values or only shapes).
* *constant*: neither — it can be computed once at compile time.
* *prologue*: an activation computed only from integer/bool activations (ids, masks) that is not a
  float table lookup — input preprocessing that runs on the host before the chip (Arch-Net keeps
  the one-hot conversion of token ids there).
"""
from __future__ import annotations

import torch
import torch.fx

from archnet_fx.ir.opkinds import node_kind
from archnet_fx.ir.meta import PROLOGUE_KEY

_LOOKUP_KINDS = frozenset({"embedding", "gather"})


def _inputs(n: torch.fx.Node) -> list[torch.fx.Node]:
    return list(n.all_input_nodes)


def input_dependent(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    dep: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or any(a in dep for a in _inputs(n)):
            dep.add(n)
    return dep


def node_kinds(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """Every node's kind, computed once for analyses that each need them all."""
    return {n: node_kind(n, gm) for n in gm.graph.nodes}


def activations(gm: torch.fx.GraphModule, kinds: dict[torch.fx.Node, str] | None = None
                ) -> set[torch.fx.Node]:
    """Nodes whose values depend on input values (shape queries cut the dependence).
    ``kinds`` (from :func:`node_kinds`) saves recomputing every node's kind."""
    act: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            act.add(n)
            continue
        if n.op == "output":
            continue
        kind = kinds[n] if kinds is not None else node_kind(n, gm)
        if kind in ("shape", "assert"):
            continue
        if any(a in act for a in _inputs(n)):
            act.add(n)
    return act


def tensor_dtype(n: torch.fx.Node) -> torch.dtype | None:
    tm = n.meta.get("tensor_meta")
    dt = getattr(tm, "dtype", None)
    if dt is None:
        val = n.meta.get("val")
        dt = getattr(val, "dtype", None)
    return dt


def is_float(n: torch.fx.Node) -> bool:
    dt = tensor_dtype(n)
    return dt is not None and dt.is_floating_point


def prologue_nodes(gm: torch.fx.GraphModule, act: set[torch.fx.Node] | None = None,
                   kinds: dict[torch.fx.Node, str] | None = None) -> set[torch.fx.Node]:
    """Activations whose activation inputs are all non-float and that are not weight lookups."""
    act = activations(gm, kinds) if act is None else act
    pro: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:
        if n not in act or n.op in ("placeholder", "output"):
            continue
        if n.meta.get(PROLOGUE_KEY):  # a pass put it on the host explicitly
            pro.add(n)
            continue
        kind = kinds[n] if kinds is not None else node_kind(n, gm)
        if kind in _LOOKUP_KINDS and is_float(n):
            continue  # a float table lookup (embedding) is real on-chip work
        ins = [a for a in _inputs(n) if a in act]
        if ins and all(tensor_dtype(a) is not None and not is_float(a) for a in ins):
            pro.add(n)
    return pro

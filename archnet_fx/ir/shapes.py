"""Shapes and dtypes of every node, recorded in ``node.meta["tensor_meta"]``.

:func:`propagate_shapes` runs the graph once on example inputs (``torch.fx`` ShapeProp);
:func:`propagate_shapes_incremental` re-derives only the nodes a pass touched, on meta tensors,
and reports when it cannot (then the caller propagates the whole graph). :func:`shape_example`
cuts the captured example to one sample, which is all shapes need.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata
from torch.utils import _pytree as pytree

from archnet_fx.ir.meta import CAPTURE_META_KEY, EXAMPLE_META_KEY

log = logging.getLogger(__name__)


def shape_example(gm: torch.fx.GraphModule, batch: int = 1) -> tuple[tuple, dict] | None:
    """The stored example inputs cut to ``batch`` samples (1 is enough for shapes)."""
    example = gm.meta.get(EXAMPLE_META_KEY)
    info = gm.meta.get(CAPTURE_META_KEY)
    if example is None or info is None:
        return example
    batched = {s.name for s in info.specs if s.batched}
    names = list(info.input_names)

    def cut(name: str, v: Any) -> Any:
        return v[:batch] if isinstance(v, torch.Tensor) and name in batched else v
    args = tuple(cut(names[i] if i < len(names) else "", v) for i, v in enumerate(example[0]))
    return args, {k: cut(k, v) for k, v in example[1].items()}


# --------------------------------------------------------------------------- shapes

def bind_placeholders(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> tuple[list, list]:
    """(placeholders, values): ``args`` then ``kwargs`` by name (defaults fill the rest)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    bound = list(args)
    for n in phs[len(args):]:
        if n.target in kwargs:
            bound.append(kwargs[n.target])
        elif n.name in kwargs:
            bound.append(kwargs[n.name])
        elif n.args:
            bound.append(n.args[0])
        else:
            bound.append(None)
    return phs, bound


def propagate_shapes(gm: torch.fx.GraphModule, args: tuple = (), kwargs: dict | None = None
                     ) -> None:
    """Record each node's output shape/dtype in ``node.meta['tensor_meta']`` by running it once.

    Graph placeholders are bound from ``args`` then ``kwargs`` by name (defaults fill the rest).
    """
    _, bound = bind_placeholders(gm, args, kwargs or {})
    with torch.no_grad():
        ShapeProp(gm).propagate(*bound)


def shapes_from(gm: torch.fx.GraphModule, args: tuple = (), kwargs: dict | None = None) -> bool:
    """Whether the recorded input shapes are those of these inputs (so the graph's shapes were
    propagated from them, and an incremental update on top of them is consistent)."""
    phs, bound = bind_placeholders(gm, args, kwargs or {})
    for n, v in zip(phs, bound):
        if isinstance(v, torch.Tensor):
            tm = n.meta.get("tensor_meta")
            if not isinstance(tm, TensorMetadata) or tuple(tm.shape) != tuple(v.shape) or \
                    tm.dtype != v.dtype:
                return False
    return True


class _NoMeta(Exception):
    """An input of a node to re-propagate has no recorded shape: propagate the whole graph."""


def _meta_value(tm: Any) -> Any:
    """A meta-device tensor (or a structure of them) shaped like recorded ``tensor_meta``."""
    if isinstance(tm, TensorMetadata):
        return torch.empty_strided(tm.shape, tm.stride, dtype=tm.dtype, device="meta")
    if isinstance(tm, (tuple, list)):
        return type(tm)(_meta_value(t) for t in tm)
    if isinstance(tm, dict):
        return {k: _meta_value(v) for k, v in tm.items()}
    return tm


_META = torch.device("meta")


def _to_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(_META) if v.device.type != "meta" else v
    if isinstance(v, torch.device):  # x.to(device), factories: stay on meta
        return _META
    return v


def _node_meta_input(gm: torch.fx.GraphModule, a: torch.fx.Node, env: dict) -> Any:
    if a in env:
        return env[a]
    if a.op == "get_attr":
        obj: Any = gm
        for part in str(a.target).split("."):
            obj = getattr(obj, part)
        return obj
    tm = a.meta.get("tensor_meta")
    if tm is None:
        raise _NoMeta(a.name)
    return _meta_value(tm)


def _run_on_meta(gm: torch.fx.GraphModule, n: torch.fx.Node, env: dict) -> Any:
    """Evaluate one node on meta-device tensors (shapes only, no compute).

    Function and method calls run on meta tensors directly; a submodule call (whose parameters
    are real tensors) runs under a ``FakeTensorMode`` that converts them on the fly.
    """
    args = torch.fx.node.map_arg(n.args, lambda a: _node_meta_input(gm, a, env))
    kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: _node_meta_input(gm, a, env))
    if n.op == "get_attr":
        return _node_meta_input(gm, n, {})
    if n.op == "output":
        return args[0]
    if n.op == "call_module":
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        # Fake tensors on the CPU stand in for the meta inputs (same shapes and strides).
        def fake(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype)
            return v
        with mode:
            args, kwargs = pytree.tree_map(fake, (args, kwargs))
            out = gm.get_submodule(n.target)(*args, **kwargs)
        return pytree.tree_map(lambda v: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype,
                                                             device="meta")
                               if isinstance(v, torch.Tensor) else v, out)
    args, kwargs = pytree.tree_map(_to_meta, (args, kwargs))
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    raise _NoMeta(n.name)


def _same_meta(a: Any, b: Any) -> bool:
    if isinstance(a, TensorMetadata) and isinstance(b, TensorMetadata):
        return a.shape == b.shape and a.dtype == b.dtype
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_meta(x, y) for x, y in zip(a, b))
    return a is None and b is None


def propagate_shapes_incremental(gm: torch.fx.GraphModule, dirty: Any) -> list[str] | None:
    """Re-derive ``tensor_meta`` for the ``dirty`` nodes only, on meta tensors (no compute).

    For a pass that created or rewired a few nodes in a graph whose other nodes already carry
    shapes: each dirty node is evaluated from its inputs' recorded shapes (O(dirty), not
    O(graph) with real arithmetic as :func:`propagate_shapes` is); when a node's shape or dtype
    comes out different from what it had, its users are re-derived too. Returns the names of
    the nodes evaluated, or ``None`` when this is not possible (an input without a recorded
    shape, e.g. a Python number; a node that cannot run on meta tensors; a placeholder) — the
    caller then runs :func:`propagate_shapes`. Nothing is changed in that case.
    """
    todo = set(dirty)
    if not todo:
        return []
    env: dict[torch.fx.Node, Any] = {}
    new_meta: dict[torch.fx.Node, tuple[Any, type]] = {}
    done: list[str] = []
    for n in gm.graph.nodes:
        if n not in todo:
            continue
        if n.op == "placeholder":
            return None
        try:
            with torch.no_grad():  # as ShapeProp runs (requires_grad of outputs: False)
                result = _run_on_meta(gm, n, env)
        except Exception as e:  # noqa: BLE001 - no meta kernel, data-dependent, missing input
            log.debug("incremental shape propagation gave up at %s: %s", n.name, e)
            return None
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj
        tm = torch.fx.node.map_aggregate(result, extract) if n.op != "get_attr" or \
            isinstance(result, torch.Tensor) else None
        tm = tm if found else None
        env[n] = result
        typ = type(result)
        new_meta[n] = (tm, torch.Tensor if isinstance(result, torch.Tensor) and
                       not isinstance(result, torch.nn.Parameter) else typ)
        done.append(n.name)
        # A Python value (shape arithmetic) has no record to compare with: its users follow.
        plain = tm is None and result is not None and not isinstance(result, torch.nn.Module)
        if plain or not _same_meta(tm, n.meta.get("tensor_meta")):
            todo.update(n.users)
    for n, (tm, typ) in new_meta.items():
        if tm is None:
            n.meta.pop("tensor_meta", None)
        else:
            n.meta["tensor_meta"] = tm
        n.meta["type"] = typ
    return done

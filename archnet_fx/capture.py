"""Capture: turn an ``nn.Module`` into a ``torch.fx.GraphModule`` without touching the caller's model.

Strategy (design.md §5):

1. Deep-copy the model and put the copy in eval mode (dropout and batch-norm statistics behave
   as at inference; the caller's training flag, parameters, buffers and hooks are untouched).
2. ``torch.fx`` symbolic tracing with :class:`LeafTracer`, which treats only *primitive*
   ``torch.nn`` layers (Linear, Conv, norms, activations, Embedding, pooling, ...) as leaves and
   traces through containers such as ``nn.TransformerEncoderLayer``. Readable, module-level.
3. If that fails (data-dependent control flow; Hugging Face transformers 5.x models),
   ``torch.export.export(..., strict=False).module()``, an ATen-level GraphModule, with the batch
   dimension exported as dynamic.
4. If both fail: one :class:`CaptureError` naming both causes and the user's source line.

The captured module accepts any batch size; other dimensions are fixed at the example's. A guard
node (kind ``assert``) at the top of the graph raises :class:`InputError` on a mismatch, before
any computation, so the message is ours and not a deep shape error.

>>> import torch
>>> gm = capture(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU()), (torch.randn(2, 8),))
>>> gm.meta["archnet.capture"].method
'fx'
>>> gm(torch.randn(5, 8)).shape
torch.Size([5, 4])
"""
from __future__ import annotations

import copy
import inspect
import logging
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata
from torch.utils import _pytree as pytree

from archnet_fx.errors import CaptureError, InputError
from archnet_fx.opkinds import MODULE_KINDS, annotate_kinds

log = logging.getLogger(__name__)

CAPTURE_META_KEY = "archnet.capture"
EXAMPLE_META_KEY = "archnet.example"  # (args, kwargs) the graph was captured with

# Modules the tracer keeps as single nodes: the primitives the op-kind table knows, except
# composite ones (MultiheadAttention) which are traced through so attention is visible.
_LEAF_TYPES = tuple(cls for cls, kind in MODULE_KINDS if kind != "multihead_attention")


@dataclass(frozen=True)
class InputSpec:
    """One tensor input of the captured graph: its name and its example's shape and dtype."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    batched: bool  # whether dim 0 is the dynamic batch dimension


@dataclass
class CaptureInfo:
    """What capture did; stored in ``gm.meta["archnet.capture"]``."""
    method: str                       # "fx" or "export"
    input_names: tuple[str, ...]      # in call order (for kwargs: the dict's order)
    kwargs_call: bool                 # whether the graph is called with keyword tensors
    specs: tuple[InputSpec, ...]
    model_class: str
    fx_error: str | None = None       # why symbolic tracing failed, when it did
    notes: list[str] = field(default_factory=list)


class LeafTracer(torch.fx.Tracer):
    """Symbolic tracer whose leaves are the primitive layers of :data:`MODULE_KINDS`."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _LEAF_TYPES):
            return True
        return bool(getattr(m, "archnet_leaf", False))


# --------------------------------------------------------------------------- inputs

def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Split example inputs into (args, kwargs); raise :class:`InputError` on bad kinds."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        kwargs = dict(example_inputs)
        if not kwargs:
            raise InputError("example_inputs is an empty dict: pass keyword tensors, e.g. "
                             "{'input_ids': ids, 'attention_mask': mask}")
        for k, v in kwargs.items():
            if not isinstance(k, str):
                raise InputError(f"example_inputs dict key {k!r} is not a string: keys must be "
                                 "the model's keyword argument names")
        _check_tensors(kwargs.items())
        return (), kwargs
    if isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
        if not args:
            raise InputError("example_inputs is empty: pass a tuple of tensors (or a dict of "
                             "keyword tensors) shaped like one real batch")
        _check_tensors((f"[{i}]", a) for i, a in enumerate(args))
        return args, {}
    if example_inputs is None:
        raise InputError("no example inputs: pass example_inputs=(tensor, ...) or a dict of "
                         "keyword tensors, or calib_data whose first batch can serve")
    raise InputError(f"example_inputs of type {type(example_inputs).__name__} is not supported: "
                     "pass a tensor, a tuple of tensors or a dict of keyword tensors")


def _check_tensors(items) -> None:
    for name, v in items:
        if v is None:
            continue
        if not isinstance(v, torch.Tensor):
            raise InputError(f"example input {name} is of type {type(v).__name__}, not a tensor: "
                             "pass tensors (wrap numbers with torch.tensor)")
        if v.numel() == 0:
            raise InputError(f"example input {name} is empty (shape {tuple(v.shape)}): pass a "
                             "tensor shaped like one real batch")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise InputError(f"example input {name} contains NaN or Inf: pass finite values")


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return int(v.shape[0])
    return None


def _specs(args: tuple, kwargs: dict, names: Sequence[str]) -> tuple[InputSpec, ...]:
    batch = _batch_size(args, kwargs)
    vals = list(args) + list(kwargs.values())
    specs = []
    for name, v in zip(names, vals):
        if isinstance(v, torch.Tensor):
            batched = v.dim() >= 1 and int(v.shape[0]) == batch
            specs.append(InputSpec(name, tuple(int(s) for s in v.shape), v.dtype, batched))
    return tuple(specs)


@torch.fx.wrap
def _guard_inputs(specs: tuple, *values) -> None:
    """Raise :class:`InputError` when runtime inputs do not match the captured shapes."""
    for spec, v in zip(specs, values):
        if v is None or not isinstance(v, torch.Tensor):
            continue
        name, shape, batched = spec
        if v.dim() != len(shape):
            raise InputError(
                f"input '{name}' has {v.dim()} dimensions (shape {tuple(v.shape)}) but the "
                f"captured graph expects {len(shape)} (example shape {shape}): pass inputs shaped "
                "like the example inputs given to capture()")
        start = 1 if batched else 0
        if tuple(v.shape[start:]) != tuple(shape[start:]):
            want = ("(batch, " + ", ".join(map(str, shape[1:])) + ")") if batched else str(shape)
            raise InputError(
                f"input '{name}' has shape {tuple(v.shape)} but the captured graph expects "
                f"{want}: only the batch dimension is dynamic; pad/trim to that shape or capture "
                "again with example inputs of the shape you will use")


torch.fx.node.has_side_effect(_guard_inputs)


def _insert_guard(gm: torch.fx.GraphModule, specs: tuple[InputSpec, ...]) -> None:
    phs = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    ph_list = [n for n in gm.graph.nodes if n.op == "placeholder"]
    nodes, spec_t = [], []
    for i, s in enumerate(specs):
        node = phs.get(s.name)
        if node is None and i < len(ph_list):
            node = ph_list[i]
        if node is None:
            continue
        nodes.append(node)
        spec_t.append((s.name, s.shape, s.batched))
    if not nodes:
        return
    with gm.graph.inserting_after(ph_list[-1]):
        gm.graph.call_function(_guard_inputs, (tuple(spec_t), *nodes))
    gm.recompile()


# --------------------------------------------------------------------------- tracing

def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch / archnet_fx: where the user's code broke."""
    frames = traceback.extract_tb(exc.__traceback__)
    skip = (os.sep + "torch" + os.sep, os.sep + "archnet_fx" + os.sep, "<eval_with_key",
            os.sep + "_pytree", os.sep + "contextlib.py")
    user = [f for f in frames if not any(s in f.filename for s in skip)]
    if not user:
        return ""
    f = user[-1]
    line = (f.line or "").strip()
    return f"{f.filename}:{f.lineno} in {f.name}: {line}"


def _export_user_line(exc: BaseException) -> str:
    """torch.export errors quote the user's code; pull out the first quoted frame."""
    text = str(exc)
    for ln in text.splitlines():
        s = ln.strip()
        if s.startswith("File \"") and "torch/" not in s and "archnet_fx" not in s:
            return s
    return _user_frame(exc)


def _trace_fx(model: nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    tracer = LeafTracer()
    concrete = None
    if kwargs:
        # Parameters not given by the caller keep their defaults as constants.
        sig = inspect.signature(model.forward)
        concrete = {p: d.default for p, d in sig.parameters.items()
                    if p not in kwargs and d.default is not inspect.Parameter.empty}
    graph = tracer.trace(model, concrete_args=concrete or None)
    gm = torch.fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    # Check the trace really computes what the model does on the example.
    with torch.no_grad():
        ref = model(*args, **kwargs)
        got = gm(*args, **kwargs)
    _assert_same(ref, got)
    return gm


def _assert_same(ref: Any, got: Any) -> None:
    ref_leaves, ref_spec = pytree.tree_flatten(ref)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if len(ref_leaves) != len(got_leaves):
        raise RuntimeError(f"traced graph returns {len(got_leaves)} values, model returns "
                           f"{len(ref_leaves)}")
    for a, b in zip(ref_leaves, got_leaves):
        if isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor) or a.shape != b.shape or \
                    not torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5, equal_nan=True):
                raise RuntimeError("traced graph's output differs from the model's on the example "
                                   "inputs (data-dependent behaviour the trace froze)")


def _export(model: nn.Module, args: tuple, kwargs: dict, specs: tuple[InputSpec, ...],
            batch: int | None) -> torch.fx.GraphModule:
    ex_args, ex_kwargs = args, kwargs
    if batch == 1:
        # torch.export specialises size-1 dimensions; trace on a batch of 2, keep it dynamic.
        def dup(v):
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == 1:
                return torch.cat([v, v], 0)
            return v
        ex_args = tuple(dup(a) for a in args)
        ex_kwargs = {k: dup(v) for k, v in kwargs.items()}
    bdim = torch.export.Dim("batch", min=1, max=1 << 20)
    spec_by_name = {s.name: s for s in specs}

    def dyn(name, v):
        if not isinstance(v, torch.Tensor):
            return None
        s = spec_by_name.get(name)
        return {0: bdim} if s is not None and s.batched else None

    names = _input_names(model, args, kwargs)
    dyn_args = tuple(dyn(n, a) for n, a in zip(names, args))
    dyn_kwargs = {k: dyn(k, v) for k, v in kwargs.items()}
    if kwargs and not args:
        dynamic_shapes: Any = dyn_kwargs
    elif args and not kwargs:
        dynamic_shapes = dyn_args
    else:
        dynamic_shapes = {**dict(zip(names, dyn_args)), **dyn_kwargs}
    star = _var_positional(model)
    if star is not None and len(args) > star[1]:
        # forward(x, *rest): torch.export wants the extra positionals grouped under `rest`.
        pos = dict(zip(names[:star[1]], dyn_args[:star[1]]))
        dynamic_shapes = {**pos, star[0]: dyn_args[star[1]:], **dyn_kwargs}
    ep = torch.export.export(model, ex_args, ex_kwargs, dynamic_shapes=dynamic_shapes,
                             strict=False)
    gm = ep.module()
    # ep.module() already checks input shapes with its own guards; ours come first and speak
    # our error type.
    return gm


def _var_positional(model: nn.Module) -> tuple[str, int] | None:
    """(name, index) of ``forward``'s ``*args`` parameter, if it has one."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for i, p in enumerate(params):
        if p.kind == p.VAR_POSITIONAL:
            return p.name, i
    return None


def _input_names(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params[:len(args)]]
    except (TypeError, ValueError):
        names = []
    names += [f"arg{i}" for i in range(len(names), len(args))]
    return names + list(kwargs)


def capture(model: nn.Module, example_inputs: Any, *, method: str = "auto") -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule, shape-annotated, with op kinds in ``node.meta``.

    ``example_inputs`` is a tensor, a tuple of tensors or a dict of keyword tensors shaped like a
    real batch. ``method`` is ``"auto"`` (fx, then export), ``"fx"`` or ``"export"``.
    The caller's model is never modified. ``node.meta["tensor_meta"]`` holds the shapes of one
    sample (batch 1 along the dynamic batch dimension; the whole example if the model cannot
    run on one sample); the example itself is kept whole in ``gm.meta``.
    """
    if isinstance(model, torch.fx.GraphModule) and CAPTURE_META_KEY in model.meta:
        return model
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture() needs a torch.nn.Module, got {type(model).__name__}")
    if method not in ("auto", "fx", "export"):
        raise ValueError(f"method must be 'auto', 'fx' or 'export', got {method!r}")
    args, kwargs = normalize_inputs(example_inputs)
    names = _input_names(model, args, kwargs)
    specs = _specs(args, kwargs, names)
    batch = _batch_size(args, kwargs)

    work = copy.deepcopy(model)
    work.eval()
    for m in work.modules():  # hooks on the copy would run inside tracing; the caller's stay
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()

    fx_err: BaseException | None = None
    gm: torch.fx.GraphModule | None = None
    used = None
    if method in ("auto", "fx"):
        try:
            gm = _trace_fx(work, args, kwargs)
            used = "fx"
        except Exception as e:  # noqa: BLE001 - any tracing failure means "try export"
            fx_err = e
            log.info("symbolic_trace failed (%s: %s); falling back to torch.export",
                     type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    if gm is None and method in ("auto", "export"):
        try:
            gm = _export(work, args, kwargs, specs, batch)
            used = "export"
        except Exception as e:  # noqa: BLE001
            parts = [f"could not capture {type(model).__name__}."]
            if fx_err is not None:
                where = _user_frame(fx_err)
                parts.append(f"torch.fx.symbolic_trace: {type(fx_err).__name__}: "
                             f"{_first_line(fx_err)}" + (f"\n  at {where}" if where else ""))
            where = _export_user_line(e)
            parts.append(f"torch.export: {type(e).__name__}: {_first_line(e)}"
                         + (f"\n  at {where}" if where else ""))
            if "batch" in str(e) and ("Constraints violated" in str(e) or "specializ" in str(e)):
                parts.append("Fix: the model fixes the batch size somewhere (e.g. "
                             "x.reshape(2, ...)); write x.reshape(x.shape[0], ...) so the batch "
                             "dimension can stay dynamic.")
            else:
                parts.append("Fix: make the forward traceable (avoid Python control flow on "
                             "tensor values; use torch.where / torch.cond), or mark the offending "
                             "submodule as a leaf by setting `archnet_leaf = True` on it.")
            raise CaptureError("\n".join(parts)) from e
    if gm is None:
        assert fx_err is not None
        where = _user_frame(fx_err)
        raise CaptureError(f"torch.fx.symbolic_trace failed on {type(model).__name__}: "
                           f"{type(fx_err).__name__}: {_first_line(fx_err)}"
                           + (f"\n  at {where}" if where else "")
                           + "\nFix: use method='auto' to fall back to torch.export.") from fx_err

    info = CaptureInfo(method=used, input_names=tuple(names), kwargs_call=bool(kwargs),
                       specs=specs, model_class=type(model).__qualname__,
                       fx_error=None if fx_err is None else f"{type(fx_err).__name__}: "
                       f"{_first_line(fx_err)}")
    _insert_guard(gm, specs)
    gm.meta[CAPTURE_META_KEY] = info
    gm.meta[EXAMPLE_META_KEY] = (args, kwargs)
    # Shapes are recorded for one sample (batch 1 where the batch is dynamic): what passes
    # decide from is then independent of the example's batch size, and every later refresh
    # re-derives only what a pass changed (no full re-run at batch 1 first).
    try:
        propagate_shapes(gm, *shape_example(gm))
    except Exception as e:  # noqa: BLE001 - e.g. a model that indexes past row 0 of the batch
        log.info("shape propagation on one sample failed (%s: %s); using the whole example",
                 type(e).__name__, _first_line(e))
        propagate_shapes(gm, args, kwargs)
    annotate_kinds(gm)
    return gm


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


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else "(no message)"


# --------------------------------------------------------------------------- shapes

def _bind(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> tuple[list, list]:
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
    _, bound = _bind(gm, args, kwargs or {})
    with torch.no_grad():
        ShapeProp(gm).propagate(*bound)


def shapes_from(gm: torch.fx.GraphModule, args: tuple = (), kwargs: dict | None = None) -> bool:
    """Whether the recorded input shapes are those of these inputs (so the graph's shapes were
    propagated from them, and an incremental update on top of them is consistent)."""
    phs, bound = _bind(gm, args, kwargs or {})
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


def example_call(gm: torch.fx.GraphModule, example_inputs: Any):
    """Call ``gm`` the way its capture was called (positional or keyword)."""
    args, kwargs = normalize_inputs(example_inputs)
    return gm(*args, **kwargs)

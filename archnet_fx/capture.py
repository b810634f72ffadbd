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

import dataclasses
import inspect
import logging
import os
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from archnet_fx.ir.copying import deepcopy
from archnet_fx.errors import (CalibrationError, CaptureError, InputError, OptionError,
                               first_line)
from archnet_fx.ir.opkinds import MODULE_KINDS, annotate_kinds
from archnet_fx.ir.meta import CAPTURE_META_KEY, EXAMPLE_META_KEY
from archnet_fx.ir.shapes import propagate_shapes, shape_example

log = logging.getLogger(__name__)

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
    seq: bool = False   # whether dim 1 is the dynamic sequence dimension (up to max_seq_len)


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
    max_seq_len: int | None = None    # dim 1 of the ``seq`` inputs is dynamic up to this
    seq_auto: bool = False            # chosen by max_seq_len="auto" (fixed again if it fails)


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

def as_call(batch: tuple[tuple, dict]) -> Any:
    """An ``(args, kwargs)`` batch back in the form a caller passes it: the kwargs dict for a
    keyword-only batch, else the args tuple."""
    args, kwargs = batch
    return kwargs if kwargs and not args else args


def first_sample(inputs: Any) -> Any:
    """The first sample of a tensor, a tuple or a dict of inputs (batch dimension kept)."""
    def first(t: Any) -> Any:
        return t[:1] if isinstance(t, torch.Tensor) and t.dim() else t
    if isinstance(inputs, Mapping):
        return {k: first(v) for k, v in inputs.items()}
    if isinstance(inputs, torch.Tensor):
        return first(inputs)
    return tuple(first(v) for v in inputs)


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


def calibration_batches(calib_data: Any, example_inputs: Any = None, *, limit: int | None = None,
                        warn_example: str | None = None) -> list[tuple[tuple, dict]]:
    """Calibration data as a list of ``(args, kwargs)`` batches, in order (the one normaliser:
    legalization, transform and the tests all use it).

    ``calib_data`` is an iterable of batches (a tensor, a tuple of tensors or a dict of keyword
    tensors each), or a single tensor or dict. ``None`` falls back to the example inputs — with
    a loud warning naming ``warn_example`` (the caller) when given, since distilling on one
    example generalises poorly. ``limit`` keeps the first batches only. Anything else raises
    :class:`CalibrationError` naming the batch.
    """
    if calib_data is None:
        if example_inputs is None:
            raise CalibrationError("no calibration data and no example inputs: pass calib_data "
                                   "(an iterable of batches shaped like the model's inputs)")
        if warn_example:
            msg = (f"{warn_example}: no calib_data given — distilling on the example inputs "
                   "alone. The result will fit those few samples and generalise poorly; pass "
                   "calib_data=[batch, ...] with a few hundred to a few thousand real samples.")
            warnings.warn(msg, UserWarning, stacklevel=3)
            log.warning(msg)
        return [normalize_inputs(example_inputs)]
    if isinstance(calib_data, (torch.Tensor, Mapping)):
        calib_data = [calib_data]
    if isinstance(calib_data, (str, bytes)):
        raise CalibrationError("calib_data is a string: pass an iterable of batches")
    try:
        it = iter(calib_data)
    except TypeError:
        raise CalibrationError(f"calib_data of type {type(calib_data).__name__} is not an "
                               "iterable of batches (tuples or dicts of tensors)") from None
    out = []
    for i, b in enumerate(it):
        if limit is not None and i >= limit:
            break
        if isinstance(b, torch.Tensor):
            b = (b,)
        try:
            out.append(normalize_inputs(b))
        except Exception as e:  # noqa: BLE001 - any malformed batch is the caller's data
            raise CalibrationError(f"calibration batch {i}: {e}") from e
    if not out:
        raise CalibrationError("calibration data is empty: pass at least one batch shaped like "
                               "the example inputs")
    return out


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
    lengths = {spec[0]: int(v.shape[1]) for spec, v in zip(specs, values)
               if len(spec) > 5 and spec[5] is not None and isinstance(v, torch.Tensor)
               and v.dim() >= 2}
    if len(set(lengths.values())) > 1:
        raise InputError(f"the sequence inputs disagree on the length: {lengths}; pass them "
                         f"with one sequence length")
    for spec, v in zip(specs, values):
        if v is None or not isinstance(v, torch.Tensor):
            continue
        name, shape, batched = spec[:3]
        dtype = spec[3] if len(spec) > 3 else None
        strict = bool(spec[4]) if len(spec) > 4 else True
        if dtype is not None and not _dtype_ok(v.dtype, dtype, strict):
            raise InputError(
                f"input '{name}' has dtype {v.dtype} but the captured graph takes {dtype} (the "
                f"example's): convert it with .to({dtype})"
                + (" — token ids and masks are integer tensors" if v.is_floating_point()
                   and not dtype.is_floating_point else ""))
        if v.dim() != len(shape):
            raise InputError(
                f"input '{name}' has {v.dim()} dimensions (shape {tuple(v.shape)}) but the "
                f"captured graph expects {len(shape)} (example shape {shape}): pass inputs shaped "
                "like the example inputs given to capture()")
        max_seq = spec[5] if len(spec) > 5 else None
        start = 1 if batched else 0
        if max_seq is not None and v.dim() >= 2:
            if not 2 <= v.shape[1] <= max_seq:
                raise InputError(
                    f"input '{name}' has sequence length {v.shape[1]} but the captured graph "
                    f"takes 2 to {max_seq} (max_seq_len): trim or pad it, or capture again with "
                    f"a larger max_seq_len")
            start = 2
        if tuple(v.shape[start:]) != tuple(shape[start:]):
            want = ("(batch, " + ("seq, " if start == 2 else "")
                    + ", ".join(map(str, shape[start:])) + ")") if batched else str(shape)
            raise InputError(
                f"input '{name}' has shape {tuple(v.shape)} but the captured graph expects "
                f"{want}: only the batch" + (" and sequence dimensions are" if start == 2 else
                                             " dimension is")
                + " dynamic; pad/trim to that shape or capture again with example inputs of "
                "the shape you will use" + ("" if start == 2 else
                                            " (or with max_seq_len= for any sequence length)"))


torch.fx.node.has_side_effect(_guard_inputs)


def _dtype_ok(got: torch.dtype, want: torch.dtype, strict: bool) -> bool:
    """Floats must match exactly (a float64 input to float32 weights fails inside torch), and a
    torch.export graph checks every dtype exactly (``strict``); an fx graph takes integer inputs
    (ids, masks) of any integer type, and bool for bool."""
    if strict or want.is_floating_point or got.is_floating_point:
        return got == want
    return (got == torch.bool, got.is_complex) == (want == torch.bool, want.is_complex)


def _insert_guard(gm: torch.fx.GraphModule, specs: tuple[InputSpec, ...], strict: bool = True,
                  max_seq_len: int | None = None) -> None:
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
        spec_t.append((s.name, s.shape, s.batched, s.dtype, strict,
                       max_seq_len if s.seq else None))
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
            batch: int | None, max_seq_len: int | None = None) -> torch.fx.GraphModule:
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
    sdim = torch.export.Dim("seq", min=2, max=max_seq_len) if max_seq_len else None
    spec_by_name = {s.name: s for s in specs}

    def dyn(name, v):
        if not isinstance(v, torch.Tensor):
            return None
        s = spec_by_name.get(name)
        if s is None or not s.batched:
            return None
        return {0: bdim, 1: sdim} if s.seq and sdim is not None else {0: bdim}

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


def capture(model: nn.Module, example_inputs: Any, *, method: str = "auto",
            max_seq_len: int | str | None = None) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule, shape-annotated, with op kinds in ``node.meta``.

    ``example_inputs`` is a tensor, a tuple of tensors or a dict of keyword tensors shaped like a
    real batch. ``method`` is ``"auto"`` (fx, then export), ``"fx"`` or ``"export"``.
    ``max_seq_len``: make dimension 1 of the sequence inputs dynamic too, from 2 up to this
    length — the sequence inputs are the batched inputs of rank ≥ 2 whose dimension 1 equals the
    first such input's (token ids, their masks; ``(batch, seq, features)`` tensors). The graph
    must compute with the length it is given, not a constant: an fx trace is checked at a second
    length against the model (and replaced by a ``torch.export`` capture with a symbolic
    sequence dimension when it does not match); a model that fixes the length raises
    :class:`CaptureError` naming where. Shapes in ``node.meta`` are the example's length.
    ``"auto"``: sequence models — those with integer token-id inputs of shape ``(batch, seq)`` —
    get a dynamic sequence up to the example's length, falling back to the fixed length (with a
    note in ``CaptureInfo.notes``) when the model fixes it; other models a fixed shape.
    ``None`` (default): fixed.
    The caller's model is never modified. ``node.meta["tensor_meta"]`` holds the shapes of one
    sample (batch 1 along the dynamic batch dimension; the whole example if the model cannot
    run on one sample); the example itself is kept whole in ``gm.meta``.
    """
    if isinstance(model, torch.fx.GraphModule) and CAPTURE_META_KEY in model.meta:
        return model
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture() needs a torch.nn.Module, got {type(model).__name__}")
    if method not in ("auto", "fx", "export"):
        raise OptionError(f"method must be 'auto', 'fx' or 'export', got {method!r}")
    args, kwargs = normalize_inputs(example_inputs)
    names = _input_names(model, args, kwargs)
    specs = _specs(args, kwargs, names)
    batch = _batch_size(args, kwargs)
    if isinstance(max_seq_len, str) and max_seq_len == "auto":
        seq = _auto_seq_len(specs)
        if seq is None:
            return capture(model, example_inputs, method=method, max_seq_len=None)
        try:
            gm = capture(model, example_inputs, method=method, max_seq_len=seq)
            gm.meta[CAPTURE_META_KEY].seq_auto = True
            return gm
        except CaptureError as e:
            gm = capture(model, example_inputs, method=method, max_seq_len=None)
            note = (f"sequence length fixed at {seq}: the model does not capture with a "
                    f"dynamic one ({str(e).splitlines()[0][:200]})")
            gm.meta[CAPTURE_META_KEY].notes.append(note)
            log.info(note)
            return gm
    if max_seq_len is not None:
        specs = _seq_specs(specs, max_seq_len)

    work = deepcopy(model)
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
            if max_seq_len is not None:
                _check_seq_generic(gm, work, args, kwargs, names, specs, max_seq_len)
            used = "fx"
        except CaptureError:
            raise
        except Exception as e:  # noqa: BLE001 - any tracing failure means "try export"
            fx_err = e
            gm = None
            log.info("symbolic_trace failed (%s: %s); falling back to torch.export",
                     type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    if gm is None and method in ("auto", "export"):
        try:
            gm = _export(work, args, kwargs, specs, batch, max_seq_len)
            used = "export"
        except Exception as e:  # noqa: BLE001
            _eager_check(work, args, kwargs, names, model)
            if max_seq_len is not None and "Constraints violated (seq)" in str(e):
                import re
                m = re.search(r"Dim\('seq', (?:min=\d+, )?max=(\d+)\)", str(e))
                raise CaptureError(
                    f"{type(model).__name__} does not take every sequence length up to "
                    f"max_seq_len={max_seq_len}: " + (
                        f"it supports at most {m.group(1)} (e.g. its position table); pass "
                        f"max_seq_len={m.group(1)} or less" if m else
                        f"torch.export: {_first_line(e)}; capture without max_seq_len for the "
                        f"example's fixed length")) from None
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
                       max_seq_len=max_seq_len,
                       fx_error=None if fx_err is None else f"{type(fx_err).__name__}: "
                       f"{_first_line(fx_err)}")
    _insert_guard(gm, specs, strict=used == "export", max_seq_len=max_seq_len)
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


def dynamic_seq(gm: Any) -> tuple[int, int] | None:
    """``(example length, max_seq_len)`` when ``gm`` was captured with a dynamic sequence
    dimension (:func:`capture` ``max_seq_len=``), else None. A pass that would bake a length
    into a constant checks a length equal to the example's against this and uses a
    length-generic form (exact for any length up to the maximum) or refuses."""
    info = getattr(gm, "meta", {}).get(CAPTURE_META_KEY)
    if info is None or not getattr(info, "max_seq_len", None):
        return None
    seq = next((s.shape[1] for s in info.specs if s.seq), None)
    return None if seq is None else (int(seq), int(info.max_seq_len))


def _auto_seq_len(specs: tuple[InputSpec, ...]) -> int | None:
    """The example's sequence length for a model with integer ``(batch, seq)`` inputs (token
    ids), seq ≥ 2; None for other models."""
    for s in specs:
        if s.batched and len(s.shape) == 2 and not s.dtype.is_floating_point \
                and s.dtype != torch.bool and s.shape[1] >= 2:
            return int(s.shape[1])
    return None


def _seq_specs(specs: tuple[InputSpec, ...], max_seq_len: Any) -> tuple[InputSpec, ...]:
    """Mark the sequence inputs (see :func:`capture`); :class:`OptionError` for a bad max."""
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise OptionError(f"max_seq_len must be an integer >= 2 or None, got {max_seq_len!r}")
    seq = _auto_seq_len(specs) or next((s.shape[1] for s in specs
                                         if s.batched and len(s.shape) >= 2), None)
    if seq is None:
        raise InputError("max_seq_len was given but no input has a sequence dimension (a "
                         "batched input of rank >= 2, such as (batch, seq) token ids)")
    if seq > max_seq_len:
        raise InputError(f"the example inputs have sequence length {seq} > max_seq_len="
                         f"{max_seq_len}: pass a max_seq_len of at least {seq}")
    if seq < 2:
        raise InputError("example inputs of sequence length 1 cannot mark a dynamic sequence "
                         "dimension (capture specialises size-1 dimensions): use length >= 2")
    return tuple(dataclasses.replace(s, seq=s.batched and len(s.shape) >= 2
                                     and s.shape[1] == seq) for s in specs)


def with_seq_length(v: torch.Tensor, length: int) -> torch.Tensor:
    """``v`` cut or tiled along dimension 1 (the sequence) to ``length``: the example's
    positions repeated, e.g. to try a graph at other lengths.

    >>> with_seq_length(torch.tensor([[7, 8, 9]]), 5)
    tensor([[7, 8, 9, 7, 8]])
    """
    return v.index_select(1, torch.arange(length) % v.shape[1])


def _seq_variant(v: Any, spec: InputSpec | None, length: int) -> Any:
    """``v`` at sequence ``length`` (a sequence input), else ``v``."""
    if spec is None or not spec.seq or not isinstance(v, torch.Tensor):
        return v
    return with_seq_length(v, length)


def _check_seq_generic(gm: torch.fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict,
                       names: list[str], specs: tuple[InputSpec, ...],
                       max_seq_len: int | None = None) -> None:
    """An fx trace must compute with the sequence length it is given: run it at another length
    and compare with the model (RuntimeError otherwise: capture falls back to torch.export).
    The model itself must run at ``max_seq_len`` (:class:`CaptureError` naming the length
    otherwise: a position table shorter than the maximum)."""
    by_name = {s.name: s for s in specs}
    seq = next(s.shape[1] for s in specs if s.seq)

    def at(length: int) -> tuple[tuple, dict]:
        return (tuple(_seq_variant(a, by_name.get(n), length) for n, a in zip(names, args)),
                {k: _seq_variant(v, by_name.get(k), length) for k, v in kwargs.items()})
    if max_seq_len is not None and max_seq_len > seq:
        a2, k2 = at(max_seq_len)
        try:
            with torch.no_grad():
                model(*a2, **k2)
        except Exception as e:  # noqa: BLE001 - re-raised typed
            raise CaptureError(f"{type(model).__name__} does not run at sequence length "
                               f"max_seq_len={max_seq_len}: {type(e).__name__}: "
                               f"{_first_line(e)}; pass a smaller max_seq_len") from None
    a2, k2 = at(seq - 1 if seq > 2 else seq + 1)
    with torch.no_grad():
        ref = model(*a2, **k2)
        got = gm(*a2, **k2)
    _assert_same(ref, got)


def _eager_check(work: nn.Module, args: tuple, kwargs: dict, names: list[str],
                 model: nn.Module) -> None:
    """After tracing failed: when the model fails on the example inputs eagerly too, the inputs
    (wrong dtype, shape, missing key) are the problem, not capturability: :class:`InputError`."""
    try:
        with torch.no_grad():
            work(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised typed
        vals = list(args) + list(kwargs.values())
        desc = ", ".join(f"{n}: {tuple(v.shape)} {v.dtype}" for n, v in zip(names, vals)
                         if isinstance(v, torch.Tensor))
        where = _user_frame(e)
        raise InputError(f"{type(model).__name__} fails on the example inputs themselves, "
                         f"before any capture: {type(e).__name__}: {_first_line(e)}"
                         + (f"\n  at {where}" if where else "")
                         + f"\nThe inputs were {desc}. Fix the example inputs (token ids are "
                         f"integer tensors; float inputs have the model's dtype)") from None


def _first_line(e: BaseException) -> str:
    return first_line(e, empty="(no message)")

"""Latency estimate: a roofline cost model of a graph on a target chip, with host fallback.

``estimate_latency(model_or_gm, target, example_inputs=None, *, weight_bits=None,
act_bits=None, blocks=None) -> LatencyReport`` runs the graph once on the example inputs
(:class:`CostInterpreter`, a ``torch.fx.Interpreter``: real shapes, batch as given), classifies
each node with :func:`~archnet_fx.ir.opkinds.node_kind` and :func:`~archnet_fx.legality.check`,
and charges it by the rules below. Surrogate modules (``archnet_surrogate``) are entered and
their bodies charged op by op, under the names legality uses (``outer/inner``).

Units
-----
*ops* count a multiply-accumulate as **2 ops** (the convention of TOPS figures): a linear of
``M×K`` by ``K×N`` is ``2·M·K·N`` ops. Elementwise and other ops are charged a few ops per
output element (:data:`OPS_PER_ELEMENT`: 1 for add/relu/compare, 2 for batch_norm, 4 for
div/sqrt/pow, 8 for exp/tanh/GELU/SiLU-like functions, 8 per element for layer/group norm, 6
for RMSNorm, 10 for softmax); reductions 1 per *input* element (var/std 3); pooling
``output × kernel``; conv ``2 · output elements · Cin/groups · kernel`` (read off the weight,
so groups are exact); matmul/bmm ``2 · output elements · K``; einsum ``2 · Π(distinct index
sizes)``; attention (sdpa) its two matmuls plus a softmax. Unknown kinds: 1 op per element.

*bytes* are the DRAM traffic of a kernel: constant operands (weights, biases, stored tables:
anything that depends on no graph input) at ``weight_bits``, float activations at
``act_bits``, integer/bool activations at their dtype size; every activation input is read
and the output written. An embedding/gather reads only the rows it looks up, not the table.

*SRAM residency*: an activation produced by a chip kernel and read only by chip kernels (not
by the host, not returned) is neither written to nor read from DRAM when it fits in half the
target's ``sram_bytes`` (the other half for weights and double buffering; judged per tensor,
not per live set), or when it is *streamable*: its one consumer and its producer are both
row-local kinds (:data:`ROW_LOCAL_KINDS`: linear, elementwise, normalisations and reductions
over the last dim), so the pair runs tile by tile over rows with the tile in SRAM. This is
what makes a piecewise-linear surrogate ``Linear(1, K) → ReLU → Linear(K, 1)`` cost its
``4·N·K`` ops instead of a ``N × K`` DRAM round trip (without this rule the legalized
all-MiniLM-L6-v2 was estimated 2.7× *slower* than the original on npu_a). Weights always come
from DRAM (a model's weights do not stay in SRAM between calls).

Where a node runs (``where``)
-----------------------------
========  ===================================================================================
chip      legal on the target: ``time = max(ops / peak[bits], bytes / bandwidth) +
          per_op_overhead`` per *kernel*. ``bits`` is ``max(weight_bits, act_bits)`` for
          conv/linear/matmul/einsum/attention with a constant operand (a W4A8 MAC runs at the
          int8 rate; 4-bit weights save bytes, not MACs) and ``act_bits`` otherwise; the peak
          is the target's for the narrowest listed precision ≥ bits (wider than any: the
          widest, scaled down by the ratio).
fused     an elementwise kind in the target's ``cost.fusable`` list whose activation input
          comes from a conv/linear/matmul (or a node already fused into one) with no other
          user, same number of elements (an epilogue), possibly through free layout nodes:
          it joins that kernel. The kernel pays one overhead; the intermediate is neither
          written nor read back (its other operand, e.g. a residual, is read). The kernel's
          time is split over its members in proportion to ``ops/peak + bytes/bandwidth``;
          rows show ``fused_into``. Elementwise work that forks after the kernel and joins
          again (``c·relu(w·x − b) + s·x``: ``x`` has two readers) fuses too when every
          operand comes from the kernel's group and the group still writes one tensor
          (:func:`_fuse_epilogue_dags`). A ``linear`` with a 1 × 1 weight (``w·x + b`` per
          element, a one-hinge ReLU form's layer) is costed as kind ``mul``: a multiply-add
          epilogue, not a GEMM.
free      layout and no-op kinds (:data:`FREE_KINDS`: reshape, permute, expand, slice,
          concat, pad, cast, identity, dropout, creation) and meta kinds (placeholder, output,
          get_attr, getitem, shape queries, ``_guard_inputs`` guards) cost nothing: the
          chip's DMA descriptors / the consumer's strided addressing absorb them, a concat's
          producers write into the destination buffer, dropout and identity vanish at
          inference. A layout kind the target does *not* list is a host-fallback node with 0
          ops (it still splits the graph). A free node runs where its inputs are: on the
          host if any input comes from a host-fallback node, in the prologue if all come
          from graph inputs / the prologue, else on the chip.
const     a node that depends on no graph input is folded at compile time (the
          ``fold_constants`` canonicalization does it): no cost; its value is a constant
          operand (weight bytes) of its consumers. This keeps the original graph's position
          ids / constant lookups from counting as runtime host work.
host      host fallback (legality ``unsupported``/``limit``/``host``): ``ops /
          host.ops_per_s``, no chip overhead. The host-fallback nodes (and host-resident free
          nodes between them) form *regions*: weakly connected components (networkx) of
          that subgraph. Each region pays one ``host.round_trip_s`` plus the link transfer
          (``host.link_bytes_per_s``) of every distinct chip tensor it reads and every
          tensor it produces that the chip reads. Values from graph inputs and the prologue
          are already on the host; a region output that only feeds the graph output is
          already where it has to go.
prologue  legality ``prologue`` (input preprocessing from integer/bool inputs: one-hot of
          token ids, masks; or shape-only values): runs once on the host before the chip,
          ``ops / host.ops_per_s``, no round trip (it is not a hand-off in the middle).
io        two synthetic rows: ``<upload>`` — every graph input / prologue value a chip
          node reads crosses the link once (a one-hot of a 30522-word vocabulary is
          ``B·L·V`` values; a host lookup sends ``B·L·D``); ``<download>`` — chip values the
          graph returns. Both at ``host.link_bytes_per_s``, no round trip.
========  ===================================================================================

The total is the sum of all rows (chip kernels run one after another; host and link work is
not overlapped with chip work — a lower-bound-free, serial estimate). ``fallback_share`` is
the regions' time over the total.

Roofline bound
--------------
``roofline_s = max(Σ ops_i / peak(bits_i), min_bytes / bandwidth)`` over the chip and
host-fallback nodes (every op the model needs, run at the chip's peak), where ``min_bytes``
is every distinct constant a chip node reads once (rows only, for on-chip lookups) plus the
graph's tensor inputs and outputs: what any schedule must move. No overhead, no host.

Blocks
------
``blocks`` is a mapping node name → block name, or a list of
:class:`~archnet_fx.train.partition.Block` (their ``nodes``); by default nodes group by module path
up to the first numeric component (``encoder.layer.3``, :func:`~archnet_fx.train.partition.layer_key`);
nodes without one join the block before them, surrogate bodies their outer node's block.

Calibration
-----------
:func:`fit_cost_params` fits ``peak_ops_per_s`` per precision, ``memory_bytes_per_s`` and
``per_op_overhead_s`` to measured kernel times (see its docstring for the CSV columns).

>>> import torch, archnet_fx as ax
>>> m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU())
>>> rep = estimate_latency(m, "npu_a", (torch.randn(8, 64),))
>>> [(r.name, r.where, r.fused_into) for r in rep.rows if r.where != "free"]
[('_0', 'chip', ''), ('_1', 'chip', '_0'), ('<upload>', 'io', ''), ('<download>', 'io', '')]
>>> rep.rows[1].ops  # 2 * 8 * 64 * 64
65536.0
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import networkx as nx
import torch
import torch.fx
from torch.utils import _pytree as pytree

from archnet_fx.ir.meta import EXAMPLE_META_KEY
from archnet_fx.ir.shapes import bind_placeholders
from archnet_fx.capture import capture, normalize_inputs
from archnet_fx.errors import InputError
from archnet_fx.quant.fakequant import checked_layer_bits, widths_label
from archnet_fx.legality import check, traced_body
from archnet_fx.ir.opkinds import META_KINDS, node_kind, target_name
from archnet_fx.targets import Target, load_target

log = logging.getLogger(__name__)

__all__ = ["estimate_latency", "LatencyReport", "NodeCost", "FallbackRegion", "CostInterpreter",
           "fit_cost_params", "CostFit", "Measurement", "OPS_PER_ELEMENT", "FREE_KINDS",
           "kernel_ops_bytes"]

# --------------------------------------------------------------------------- op counting

#: Anchors of fusion: kinds whose epilogue can absorb fusable elementwise ops.
ANCHOR_KINDS = frozenset({"linear", "conv", "conv_transpose", "matmul", "einsum"})
#: Multiply-accumulate kinds (precision max(weight, act) bits when an operand is constant).
MAC_KINDS = ANCHOR_KINDS | {"sdpa", "multihead_attention"}
#: Kinds computed row by row over the last dimension (streamable through SRAM in row tiles).
ROW_LOCAL_KINDS = frozenset(
    "linear add sub mul neg relu relu6 clamp leaky_relu abs maximum minimum where masked_fill "
    "compare logical prelu hardsigmoid hardswish div sqrt rsqrt reciprocal pow exp log gelu "
    "silu sigmoid tanh elu softplus mish erf batch_norm mean sum var std reduce_max reduce_min "
    "layer_norm rms_norm softmax log_softmax".split())
#: Zero-compute kinds (see the module docstring, "free").
FREE_KINDS = frozenset({"reshape", "permute", "expand", "slice", "concat", "pad", "cast",
                        "identity", "dropout", "creation"})
#: Free on any target, listed or not: no-ops at inference.
NOOP_KINDS = frozenset({"identity", "dropout"})
#: Kinds that read a tensor's metadata, never its data: guards and shape queries (bookkeeping
#: with no tensor of their own, and not readers of their input for SRAM residency).
METADATA_KINDS = frozenset({"assert", "shape"})

#: Ops per output element of elementwise / normalisation kinds (rough, stated in the docstring).
OPS_PER_ELEMENT: dict[str, float] = {
    **dict.fromkeys("add sub mul neg relu relu6 clamp leaky_relu abs maximum minimum where "
                    "masked_fill compare logical one_hot".split(), 1.0),
    **dict.fromkeys("prelu hardsigmoid batch_norm".split(), 2.0),
    "hardswish": 3.0,
    **dict.fromkeys("div sqrt rsqrt reciprocal pow".split(), 4.0),
    **dict.fromkeys("exp log gelu silu sigmoid tanh elu softplus mish erf".split(), 8.0),
    **dict.fromkeys("layer_norm group_norm instance_norm".split(), 8.0),
    "rms_norm": 6.0,
    **dict.fromkeys("softmax log_softmax".split(), 10.0),
    "upsample": 1.0,
}
_REDUCE_OPS = {"mean": 1.0, "sum": 1.0, "reduce_max": 1.0, "reduce_min": 1.0, "cumsum": 1.0,
               "var": 3.0, "std": 3.0}
_BINARY_KINDS = frozenset("add sub mul div pow maximum minimum where masked_fill compare "
                          "logical".split())


def _tensors(v: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]


def _first_tensor(v: Any) -> torch.Tensor | None:
    ts = _tensors(v)
    return ts[0] if ts else None


def _prod(xs: Iterable[int]) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


def _kernel_elems(k: Any, dims: int) -> int:
    if isinstance(k, int):
        return k ** dims
    if isinstance(k, (tuple, list)):
        return _prod(k) if len(k) > 1 else int(k[0]) ** dims
    return 1


def _node_ops(kind: str, node: torch.fx.Node, mod: torch.nn.Module | None, args: tuple,
              kwargs: dict, out: Any) -> float:
    """Operation count (MAC = 2 ops) of one node evaluated on concrete values."""
    o = _first_tensor(out)
    n_out = o.numel() if o is not None else 0
    name = target_name(node) if node.op != "call_module" else ""
    ins = _tensors((args, kwargs))
    if kind == "linear":
        if mod is not None:
            k = int(mod.weight.shape[1])
        elif name == "addmm":
            k = int(args[1].shape[-1])
        else:
            k = int(ins[0].shape[-1]) if ins else 1
        return 2.0 * n_out * k
    if kind == "matmul":
        a = args[1] if name == "baddbmm" else (ins[0] if ins else None)
        if a is None:
            return 0.0
        k = int(a.shape[-1]) if a.dim() >= 1 else 1
        return 2.0 * n_out * k
    if kind == "einsum":
        eq = args[0] if isinstance(args[0], str) else kwargs.get("equation", "")
        ops = eq.split("->")[0].replace(" ", "").split(",")
        sizes: dict[str, int] = {}
        for sub, t in zip(ops, ins):
            letters = [c for c in sub if c.isalpha()]
            for c, s in zip(letters, t.shape[-len(letters):] if letters else ()):
                sizes[c] = int(s)
        return 2.0 * _prod(sizes.values())
    if kind in ("conv", "conv_transpose"):
        w = mod.weight if mod is not None else (args[1] if len(args) > 1 else kwargs.get("weight"))
        transposed = isinstance(mod, torch.nn.modules.conv._ConvTransposeNd) or kind == \
            "conv_transpose" or (name in ("convolution", "_convolution") and len(args) > 6
                                 and bool(args[6]))
        if not isinstance(w, torch.Tensor):
            return 2.0 * n_out
        per = _prod(w.shape[1:])
        if transposed:
            x = ins[0] if ins else o
            return 2.0 * x.numel() * per
        return 2.0 * n_out * per
    if kind in ("sdpa", "multihead_attention"):
        if len(ins) < 3:
            return 2.0 * n_out
        q, k, v = ins[:3]
        L, E, S, Ev = int(q.shape[-2]), int(q.shape[-1]), int(k.shape[-2]), int(v.shape[-1])
        heads = q.numel() // max(1, L * E)
        ops = heads * (2.0 * L * S * E + 2.0 * L * S * Ev + OPS_PER_ELEMENT["softmax"] * L * S)
        if kind == "multihead_attention":
            ops += 2.0 * q.numel() * E * 4  # the four projections
        return ops
    if kind in ("max_pool", "avg_pool"):
        dims = max(1, (o.dim() - 2) if o is not None else 1)
        k = getattr(mod, "kernel_size", None) if mod is not None else (
            args[1] if len(args) > 1 else kwargs.get("kernel_size", 1))
        return float(n_out * _kernel_elems(k, dims))
    if kind in ("adaptive_avg_pool", "adaptive_max_pool"):
        return float(ins[0].numel()) if ins else float(n_out)
    if kind in _REDUCE_OPS:
        return _REDUCE_OPS[kind] * (ins[0].numel() if ins else n_out)
    if kind in OPS_PER_ELEMENT:
        return OPS_PER_ELEMENT[kind] * n_out
    if kind in FREE_KINDS or kind in META_KINDS or kind in ("embedding", "gather"):
        return 0.0
    if kind.startswith("surrogate:"):
        return 0.0  # charged through its body
    return float(n_out)  # unknown kinds: one op per output element


def _scalar_affine(node: torch.fx.Node, mod: torch.nn.Module | None, args: tuple,
                   kwargs: dict) -> bool:
    """A linear whose weight is 1 × 1 (``y = w·x + b`` elementwise, e.g. a one-hinge ReLU
    form's layers): one product per output element, no accumulation."""
    if mod is not None:
        w = getattr(mod, "weight", None)
    elif target_name(node) == "addmm":
        w = args[2] if len(args) > 2 else None
    else:
        w = args[1] if len(args) > 1 else kwargs.get("weight")
    return isinstance(w, torch.Tensor) and tuple(w.shape) == (1, 1)


def _tensor_bytes(t: torch.Tensor, act_bits: int) -> float:
    if t.is_floating_point():
        return t.numel() * act_bits / 8.0
    return float(t.numel() * t.element_size())


# --------------------------------------------------------------------------- records


@dataclass
class _Rec:
    """What the interpreter saw at one node (internal; the report has :class:`NodeCost`)."""
    name: str
    kind: str
    inputs: list[str]                      # producer records of tensor operands (deduplicated)
    dependent: bool                        # depends on a graph input
    alias: bool = False                    # placeholder/output of a surrogate body, its call
    ops: float = 0.0
    out_bytes: float = 0.0
    in_bytes: dict[str, float] = field(default_factory=dict)   # producer -> bytes read
    const_bytes: float = 0.0
    consts: dict[str, float] = field(default_factory=dict)     # constant key -> bytes read
    status: str | None = None              # legality verdict status, None for meta kinds
    block_hint: str | None = None
    is_output: bool = False


@dataclass
class NodeCost:
    """One row of the report."""
    name: str
    kind: str
    ops: float
    bytes: float
    compute_s: float
    memory_s: float
    time_s: float
    where: str            # chip | host | prologue | free | const | io
    fused_into: str = ""  # the kernel's leading node, for fused members
    block: str = ""
    region: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FallbackRegion:
    """A contiguous stretch of host-fallback nodes: one chip → host → chip hand-off."""
    index: int
    nodes: list[str]
    kinds: dict[str, int]
    host_compute_s: float
    link_in_bytes: float
    link_out_bytes: float
    link_s: float
    round_trip_s: float

    @property
    def total_s(self) -> float:
        return self.host_compute_s + self.link_s + self.round_trip_s

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_s"] = self.total_s
        return d


class CostInterpreter(torch.fx.Interpreter):
    """Runs a GraphModule on concrete inputs and records each node's ops and operand bytes.

    Surrogate submodules are entered (their traced bodies run under a nested interpreter that
    shares the record list), so everything the chip would execute is visible.
    """

    def __init__(self, gm: torch.fx.GraphModule, act_bits: int, weight_bits: int,
                 records: list[_Rec] | None = None, prefix: str = "",
                 outer_inputs: Sequence[str | None] = (),
                 outer_dependent: Sequence[bool] = (), verdicts: Mapping[str, Any] | None = None,
                 layer_bits: Mapping[str, int] | None = None) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.act_bits, self.weight_bits = act_bits, weight_bits
        self.layer_bits = dict(layer_bits or {})   # top-level node name -> its weight bits
        self.records: list[_Rec] = [] if records is None else records
        self.by_name: dict[str, _Rec] = {}
        self.prefix = prefix
        self._outer_inputs = list(outer_inputs)
        self._outer_dep = list(outer_dependent)
        self._ph_index = 0
        self.verdicts = dict(verdicts or {})
        self._shared: dict[str, _Rec] = {}

    # -- helpers
    def _rec(self, n: torch.fx.Node) -> _Rec | None:
        return self.by_name.get(self.prefix + n.name)

    def _const_key(self, n: torch.fx.Node) -> str:
        if n.op == "get_attr":
            return f"{id(self.module)}:{n.target}"
        return self.prefix + n.name

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op == "call_module" and getattr(self.module.get_submodule(n.target),
                                             "archnet_surrogate", False):
            return self._run_surrogate(n)
        out = super().run_node(n)
        self._record(n, out)
        return out

    def _record(self, n: torch.fx.Node, out: Any) -> None:
        kind = node_kind(n, self.module)
        name = self.prefix + n.name
        ins = [a for a in n.all_input_nodes]
        in_recs = [self._rec(a) for a in ins]
        if n.op == "placeholder":
            i = self._ph_index
            self._ph_index += 1
            outer = self._outer_inputs[i] if i < len(self._outer_inputs) else None
            dep = self._outer_dep[i] if i < len(self._outer_dep) else (not self.prefix)
            rec = _Rec(name, kind, [outer] if outer else [], dep, alias=bool(self.prefix))
        else:
            dep = any(r is not None and r.dependent for r in in_recs)
            rec = _Rec(name, kind, [], dep, alias=(n.op == "output" and bool(self.prefix)))
        o = _first_tensor(out)
        if n.op != "placeholder":
            if kind == "get_attr":
                rec.dependent = False
            seen = set()
            for a, r in zip(ins, in_recs):
                if r is None or r.name in seen:
                    continue
                seen.add(r.name)
                rec.inputs.append(r.name)
            if n.op == "output" and not self.prefix:
                rec.is_output = True
        if o is not None and kind not in ("output",):
            rec.out_bytes = _tensor_bytes(o, self.act_bits)
        if n.op not in ("placeholder", "output", "get_attr") and rec.dependent:
            mod = self.module.get_submodule(n.target) if n.op == "call_module" else None
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            try:
                rec.ops = _node_ops(kind, n, mod, args, kwargs, out)
            except Exception as e:  # noqa: BLE001 - a counting gap must not kill the estimate
                log.warning("cannot count ops of %s (%s): %s; charging 1 op per element",
                            name, kind, e)
                rec.ops = float(o.numel()) if o is not None else 0.0
            self._operand_bytes(rec, n, ins, in_recs, mod, kind, out)
            if kind == "linear" and _scalar_affine(n, mod, args, kwargs):
                rec.kind = "mul"  # w·x + b per element: an epilogue multiply-add, not a GEMM
        v = self.verdicts.get(name)
        rec.status = None if v is None else v.status
        self.records.append(rec)
        self.by_name[name] = rec

    def _operand_bytes(self, rec: _Rec, n: torch.fx.Node, ins: list[torch.fx.Node],
                       in_recs: list[_Rec | None], mod: torch.nn.Module | None, kind: str,
                       out: Any) -> None:
        wb = self.layer_bits.get(rec.name, self.weight_bits) / 8.0
        lookup = kind in ("embedding", "gather")
        o = _first_tensor(out)
        for a, r in zip(ins, in_recs):
            if r is None:
                continue
            val = self.env.get(a)
            t = _first_tensor(val)
            if t is None:
                continue
            if r.dependent:
                rec.in_bytes[r.name] = rec.in_bytes.get(r.name, 0.0) + _tensor_bytes(
                    t, self.act_bits)
            else:
                nbytes = (o.numel() if lookup and o is not None else t.numel()) * wb
                rec.consts[self._const_key(a)] = nbytes
        if mod is not None:
            for pname, p in list(mod.named_parameters()) + list(mod.named_buffers()):
                if p is None or not p.is_floating_point():
                    continue
                nbytes = (o.numel() if lookup and o is not None else p.numel()) * wb
                rec.consts[f"{id(mod)}:{pname}"] = nbytes
        rec.const_bytes = sum(rec.consts.values())

    def _run_surrogate(self, n: torch.fx.Node) -> Any:
        mod = self.module.get_submodule(n.target)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        name = self.prefix + n.name
        outer_in, outer_dep = [], []
        for a in n.args:
            r = self._rec(a) if isinstance(a, torch.fx.Node) else None
            outer_in.append(r.name if r is not None else None)
            outer_dep.append(bool(r is not None and r.dependent))
        body = traced_body(mod)
        sub = CostInterpreter(body, self.act_bits, self.weight_bits, self.records,
                              prefix=name + "/", outer_inputs=outer_in,
                              outer_dependent=outer_dep, verdicts=self.verdicts)
        sub.by_name = self.by_name
        flat = [a for a in args] + list(kwargs.values())
        out = sub.run(*flat)
        inner_out = self.by_name[name + "/" + next(m for m in body.graph.nodes
                                                   if m.op == "output").name]
        rec = _Rec(name, node_kind(n, self.module), [inner_out.name], inner_out.dependent,
                   alias=True)
        o = _first_tensor(out)
        if o is not None:
            rec.out_bytes = _tensor_bytes(o, self.act_bits)
        self.records.append(rec)
        self.by_name[name] = rec
        return out


# --------------------------------------------------------------------------- the report


@dataclass
class LatencyReport:
    """Estimated latency of one graph on one target (see the module docstring for the rules)."""
    target: str
    weight_bits: int
    act_bits: int
    rows: list[NodeCost]
    regions: list[FallbackRegion]
    total_ops: float
    min_bytes: float
    roofline_compute_s: float
    roofline_memory_s: float
    notes: list[str] = field(default_factory=list)
    mac_kernels: int = 0          # conv/linear/matmul nodes (wherever they run)
    mac_compute_s: float = 0.0    # their ops at the chip's peak
    per_op_overhead_s: float = 0.0
    layer_bits: dict[str, int] = field(default_factory=dict)   # per-layer weight widths

    @property
    def bits_label(self) -> str:
        """``"W8A8"``, or with per-layer widths ``"W8A8 (3 layer(s) W4)"``."""
        return widths_label(self.weight_bits, self.act_bits, self.layer_bits)

    @property
    def rewrite_bound_s(self) -> float:
        """A floor for any rewrite of this graph that keeps its MAC work as chip kernels: that
        work at peak plus one kernel overhead per MAC op, everything else free (perfectly
        fused, no fallback). ``total_s / rewrite_bound_s`` is the largest speed-up such a
        rewrite can show under this target's cost parameters."""
        return self.mac_compute_s + self.mac_kernels * self.per_op_overhead_s

    # -- totals
    def _sum(self, *wheres: str) -> float:
        return sum(r.time_s for r in self.rows if r.where in wheres)

    @property
    def total_s(self) -> float:
        return sum(r.time_s for r in self.rows) + sum(g.round_trip_s + g.link_s
                                                      for g in self.regions)

    @property
    def chip_s(self) -> float:
        return self._sum("chip")

    @property
    def host_compute_s(self) -> float:
        return self._sum("host")

    @property
    def fallback_s(self) -> float:
        """Host-fallback regions: host compute + link transfers + round trips."""
        return sum(g.total_s for g in self.regions)

    @property
    def prologue_s(self) -> float:
        return self._sum("prologue")

    @property
    def io_s(self) -> float:
        return self._sum("io")

    @property
    def fallback_share(self) -> float:
        return self.fallback_s / self.total_s if self.total_s > 0 else 0.0

    @property
    def n_regions(self) -> int:
        return len(self.regions)

    @property
    def roofline_s(self) -> float:
        return max(self.roofline_compute_s, self.roofline_memory_s)

    @property
    def n_kernels(self) -> int:
        return sum(1 for r in self.rows if r.where == "chip" and not r.fused_into)

    # -- breakdowns
    def by_kind(self) -> dict[str, dict[str, float]]:
        """kind → {time_s, ops, bytes, count}, most expensive first (region hand-offs under
        ``<link+round trip>``)."""
        out: dict[str, dict[str, float]] = defaultdict(lambda: dict(time_s=0.0, ops=0.0,
                                                                    bytes=0.0, count=0))
        for r in self.rows:
            if r.where in ("free", "const") and r.time_s == 0:
                continue
            d = out[r.kind]
            d["time_s"] += r.time_s
            d["ops"] += r.ops
            d["bytes"] += r.bytes
            d["count"] += 1
        if self.regions:
            d = out["<link+round trip>"]
            d["time_s"] += sum(g.link_s + g.round_trip_s for g in self.regions)
            d["bytes"] += sum(g.link_in_bytes + g.link_out_bytes for g in self.regions)
            d["count"] += len(self.regions)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["time_s"]))

    def by_block(self) -> dict[str, dict[str, float]]:
        """block → {time_s, chip_s, host_s, ops}, in graph order (region hand-offs go to the
        block of the region's first node)."""
        out: dict[str, dict[str, float]] = {}
        for r in self.rows:
            if r.where in ("free", "const") and r.time_s == 0:
                continue
            d = out.setdefault(r.block or "(none)", dict(time_s=0.0, chip_s=0.0, host_s=0.0,
                                                         ops=0.0))
            d["time_s"] += r.time_s
            d["ops"] += r.ops
            if r.where == "chip":
                d["chip_s"] += r.time_s
            elif r.where in ("host", "prologue", "io"):
                d["host_s"] += r.time_s
        first = {r.name: (r.block or "(none)") for r in self.rows}
        for g in self.regions:
            d = out[first.get(g.nodes[0], "(none)")]
            d["time_s"] += g.link_s + g.round_trip_s
            d["host_s"] += g.link_s + g.round_trip_s
        return out

    # -- output
    def summary(self) -> dict[str, Any]:
        return dict(target=self.target, weight_bits=self.weight_bits, act_bits=self.act_bits,
                    layer_bits=dict(self.layer_bits), total_us=self.total_s * 1e6,
                    chip_us=self.chip_s * 1e6,
                    fallback_us=self.fallback_s * 1e6, prologue_us=self.prologue_s * 1e6,
                    io_us=self.io_s * 1e6, fallback_regions=self.n_regions,
                    fallback_share=self.fallback_share, kernels=self.n_kernels,
                    total_ops=self.total_ops, min_bytes=self.min_bytes,
                    roofline_us=self.roofline_s * 1e6,
                    roofline_bound="compute" if self.roofline_compute_s >= self.roofline_memory_s
                    else "memory",
                    ratio_to_roofline=(self.total_s / self.roofline_s if self.roofline_s > 0
                                       else float("inf")),
                    rewrite_bound_us=self.rewrite_bound_s * 1e6,
                    max_rewrite_speedup=(self.total_s / self.rewrite_bound_s
                                         if self.rewrite_bound_s > 0 else float("inf")))

    def table(self, *, nodes: bool = False, max_kinds: int = 20) -> str:
        """Summary, per-kind and per-block tables, fallback regions, optionally every node."""
        from tabulate import tabulate

        s = self.summary()
        head = (f"target {self.target} ({self.bits_label}): "
                f"{s['total_us']:.1f} us total — chip {s['chip_us']:.1f} us in {s['kernels']} "
                f"kernels, host fallback {s['fallback_us']:.1f} us in {s['fallback_regions']} "
                f"region(s) ({100 * s['fallback_share']:.1f} %), prologue "
                f"{s['prologue_us']:.1f} us, link I/O {s['io_us']:.1f} us; roofline "
                f"{s['roofline_us']:.1f} us ({s['roofline_bound']}-bound, "
                f"{s['total_ops'] / 1e9:.3g} Gop, {s['min_bytes'] / 1e6:.3g} MB), ratio "
                f"{s['ratio_to_roofline']:.2f}x")
        parts = [head]
        kinds = list(self.by_kind().items())[:max_kinds]
        parts.append(tabulate([(k, int(d["count"]), d["time_s"] * 1e6, d["ops"] / 1e6,
                                d["bytes"] / 1e3) for k, d in kinds],
                              headers=["kind", "count", "us", "Mop", "kB"], tablefmt="github",
                              floatfmt=".1f"))
        blocks = self.by_block()
        if len(blocks) > 1:
            parts.append(tabulate([(b, d["time_s"] * 1e6, d["chip_s"] * 1e6, d["host_s"] * 1e6,
                                    d["ops"] / 1e6) for b, d in blocks.items()],
                                  headers=["block", "us", "chip us", "host us", "Mop"],
                                  tablefmt="github", floatfmt=".1f"))
        if self.regions:
            parts.append(tabulate(
                [(g.index, len(g.nodes), ", ".join(f"{k}×{c}" for k, c in g.kinds.items()),
                  g.host_compute_s * 1e6, (g.link_in_bytes + g.link_out_bytes) / 1e3,
                  g.link_s * 1e6, g.round_trip_s * 1e6, g.total_s * 1e6) for g in self.regions],
                headers=["region", "nodes", "kinds", "host us", "link kB", "link us",
                         "round trip us", "total us"], tablefmt="github", floatfmt=".1f"))
        if nodes:
            parts.append(tabulate(
                [(r.name, r.kind, r.where, r.fused_into, r.block, r.ops, r.bytes,
                  r.compute_s * 1e6, r.memory_s * 1e6, r.time_s * 1e6) for r in self.rows
                 if r.where not in ("free", "const")],
                headers=["node", "kind", "where", "fused into", "block", "ops", "bytes",
                         "compute us", "memory us", "us"], tablefmt="github", floatfmt=".2f"))
        if self.notes:
            parts.append("notes: " + "; ".join(self.notes))
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self, *, nodes: bool = True) -> dict[str, Any]:
        """JSON-ready: summary, by kind, by block, regions and (optionally) every row."""
        d: dict[str, Any] = dict(summary=self.summary(), by_kind=self.by_kind(),
                                 by_block=self.by_block(),
                                 regions=[g.as_dict() for g in self.regions], notes=self.notes)
        if nodes:
            d["rows"] = [r.as_dict() for r in self.rows]
        return d


# --------------------------------------------------------------------------- the estimate


def _peak(target: Target, bits: int) -> float:
    """Peak ops/s for ``bits``-bit operations: narrowest listed precision ≥ bits, else the
    widest scaled by ``widest / bits``."""
    peaks = target.cost.peak_ops_per_s
    wider = sorted(b for b in peaks if b >= bits)
    if wider:
        return float(peaks[wider[0]])
    top = max(peaks)
    return float(peaks[top]) * top / bits


def _blocks_map(blocks: Any) -> dict[str, str] | None:
    if blocks is None:
        return None
    if isinstance(blocks, Mapping):
        return {str(k): str(v) for k, v in blocks.items()}
    out: dict[str, str] = {}
    try:
        for b in blocks:
            for nm in b.nodes:
                out[nm] = b.name
    except (TypeError, AttributeError):
        raise InputError("blocks must be a mapping node name → block name or a list of "
                         "archnet_fx.train.partition.Block") from None
    return out


def estimate_latency(model_or_gm: torch.nn.Module, target: str | Target,
                     example_inputs: Any = None, *, weight_bits: int | None = None,
                     act_bits: int | None = None, blocks: Any = None,
                     layer_bits: Mapping[str, int] | None = None) -> LatencyReport:
    """Estimated latency of a model on ``target`` (see the module docstring for every rule).

    ``model_or_gm`` is an ``nn.Module`` (captured with ``example_inputs``: a tensor, a tuple or
    a dict of keyword tensors) or a captured/legalized GraphModule (its example inputs are used
    when none are given). ``weight_bits``/``act_bits`` default to the target's and must be
    among those it allows. ``layer_bits`` (node name → bits, each among the target's) sets
    the weight bits of single top-level layers (mixed precision); the rest take
    ``weight_bits``.
    """
    from archnet_fx.train.partition import layer_key

    tgt = load_target(target)
    wbits, abits = tgt.quant.check_bits(weight_bits, act_bits)
    if isinstance(model_or_gm, torch.fx.GraphModule) and EXAMPLE_META_KEY in model_or_gm.meta:
        gm = model_or_gm
    elif isinstance(model_or_gm, torch.nn.Module):
        if example_inputs is None:
            raise InputError(
                f"estimate_latency() got a {type(model_or_gm).__name__} that is not a captured "
                "graph and no example_inputs: pass example_inputs=(tensor, ...) or a dict of "
                "keyword tensors shaped like one real batch (the estimate uses their shapes)")
        gm = capture(model_or_gm, example_inputs)
    else:
        raise InputError(f"estimate_latency() needs an nn.Module or a captured GraphModule, got "
                         f"{type(model_or_gm).__name__}")
    if example_inputs is not None:
        args, kwargs = normalize_inputs(example_inputs)
    else:
        args, kwargs = gm.meta[EXAMPLE_META_KEY]

    layer_bits = checked_layer_bits(gm, tgt, layer_bits, abits)   # (archnet_fx.quant)
    verdicts = {v.node: v for v in check(gm, tgt).verdicts}
    interp = CostInterpreter(gm, abits, wbits, verdicts=verdicts, layer_bits=layer_bits)
    with torch.no_grad():
        interp.run(*bind_placeholders(gm, args, kwargs)[1])
    recs = interp.records
    by_name = {r.name: r for r in recs}

    # Block of each top-level node (nested ones: their outer node's).
    bmap = _blocks_map(blocks)
    node_block: dict[str, str] = {}
    last = ""
    for n in gm.graph.nodes:
        if bmap is not None:
            b = bmap.get(n.name)
        else:
            b = layer_key(n)
            if b and b.startswith("_empty_nn_module_stack"):
                b = None  # torch.export's placeholder for "no module"
        if b:
            last = b
        node_block[n.name] = b or last

    return _assemble(recs, by_name, tgt, wbits, abits, node_block, layer_bits)


def _where(recs: list[_Rec], by_name: dict[str, _Rec], tgt: Target) -> dict[str, str]:
    """Location of every record: chip | free | host | hostfree | prologue | input | const."""
    loc: dict[str, str] = {}
    for r in recs:
        if not r.dependent:
            loc[r.name] = "const"
            continue
        if r.kind == "placeholder" and not r.alias:
            loc[r.name] = "input"
            continue
        if r.kind in METADATA_KINDS:
            loc[r.name] = "free"  # guards and shape arithmetic: bookkeeping, no tensor
            continue
        inherit = (r.alias or r.kind in META_KINDS or r.kind in NOOP_KINDS
                   or (r.kind in FREE_KINDS and r.status == "ok") or r.status is None)
        if not inherit:
            if r.status == "ok":
                loc[r.name] = "chip"
            elif r.status == "prologue":
                loc[r.name] = "prologue"
            else:
                loc[r.name] = "host"
            continue
        src = [loc.get(i, "const") for i in r.inputs]
        src = [s for s in src if s != "const"]
        if any(s in ("host", "hostfree") for s in src):
            loc[r.name] = "hostfree"
        elif src and all(s in ("input", "prologue", "prologuefree") for s in src):
            loc[r.name] = "prologuefree"
        elif not src and r.status == "prologue":
            loc[r.name] = "prologuefree"
        else:
            loc[r.name] = "free"
    return loc


def _fuse_epilogue_dags(recs: list[_Rec], by_name: dict[str, _Rec], loc: dict[str, str],
                       users: Mapping[str, list[str]], fusable: set[str],
                       leader: dict[str, str], dropped_out: set[str],
                       dropped_in: dict[str, set[str]], consumers: Any, source: Any) -> None:
    """Grow each kernel's epilogue over elementwise work that forks and re-joins.

    After chain fusion a kernel ``K`` (with its fused chain) absorbs every fusable chip node
    whose activation operands all come from the kernel (through free nodes) and that has the
    kernel's element count — ``c·relu(w·x − b) + s·x`` after a linear reads ``x`` twice, so no
    single-user chain covers it. Kept only if the grown group still writes exactly one tensor
    (every other member is read only inside the group): a single-output epilogue, as an NPU
    computes it from the accumulator. ``consumers``/``source`` are :func:`_assemble`'s (compute
    readers through free nodes; the producer behind single-input free nodes). Updates
    ``leader``/``dropped_*`` in place."""
    order = {r.name: k for k, r in enumerate(recs)}
    members: dict[str, set[str]] = defaultdict(set)
    for m, h in leader.items():
        members[h].add(m)
    for r in recs:
        if loc[r.name] != "chip" or r.kind not in ANCHOR_KINDS or r.name in leader:
            continue
        group = {r.name} | members[r.name]
        added: list[str] = []
        frontier = sorted(group, key=order.__getitem__)
        seen: set[str] = set()
        while frontier:
            cur = frontier.pop(0)
            stack = list(users[cur])
            while stack:
                u = stack.pop()
                if loc.get(u) == "free":
                    stack.extend(users[u])
                    continue
                if u in seen or u in group or u in leader or loc.get(u) != "chip" \
                        or by_name[u].kind not in fusable:
                    continue
                srcs = [source(i) for i in by_name[u].inputs if loc.get(i) != "const"]
                if not srcs or any(x not in group for x in srcs):
                    continue  # an operand still to come may join later: revisit then
                seen.add(u)
                if abs(by_name[u].out_bytes - r.out_bytes) > 1e-9:
                    continue
                group.add(u)
                added.append(u)
                frontier.append(u)
        if not added:
            continue
        outputs = [m for m in group if (c := consumers(m)) is None or any(x not in group
                                                                          for x in c)]
        if len(outputs) != 1:
            continue  # several tensors leave the group: keep the chains
        for m in added:
            leader[m] = r.name
            dropped_in[m].update(i for i in by_name[m].inputs if source(i) in group)
        dropped_out.update(m for m in group if m not in outputs)


_CHIP_SIDE = ("chip", "free")
_HOST_SIDE = ("input", "prologue", "prologuefree")


def _assemble(recs: list[_Rec], by_name: dict[str, _Rec], tgt: Target, wbits: int, abits: int,
              node_block: Mapping[str, str], layer_bits: Mapping[str, int] | None = None
              ) -> LatencyReport:
    cost, host = tgt.cost, tgt.cost.host
    bw = cost.memory_bytes_per_s
    loc = _where(recs, by_name, tgt)
    users: dict[str, list[str]] = defaultdict(list)
    for r in recs:
        for i in r.inputs:
            users[i].append(r.name)

    def block_of(name: str) -> str:
        return node_block.get(name.split("/", 1)[0], "")

    def bits_of(r: _Rec) -> int:
        return (max((layer_bits or {}).get(r.name, wbits), abits)
                if (r.kind in MAC_KINDS and r.consts) else abits)

    def consumers(name: str) -> list[str] | None:
        """Compute nodes reading ``name`` (through free nodes); None if the host or the graph
        output reads it. A shape query reads no data: it and what is computed from it (the
        host-side length arithmetic of a dynamic sequence) are not readers."""
        out: list[str] = []
        stack = [name]
        while stack:
            cur = stack.pop()
            for u in users[cur]:
                ur = by_name[u]
                if ur.kind in METADATA_KINDS:
                    continue
                if ur.is_output or loc.get(u) not in _CHIP_SIDE:
                    return None
                if loc[u] == "free":
                    stack.append(u)
                else:
                    out.append(u)
        return out

    def source(name: str) -> str:
        """The node behind ``name``'s single-input free nodes (a free node with several
        inputs, or a compute node)."""
        cur = name
        while loc.get(cur) == "free" and len(by_name[cur].inputs) == 1:
            cur = by_name[cur].inputs[0]
        return cur

    # ---- fusion: follow single-user chains through free chip nodes.
    leader: dict[str, str] = {}
    dropped_out: set[str] = set()        # nodes whose output write is elided
    dropped_in: dict[str, set[str]] = defaultdict(set)  # node -> producers not read back

    def chain_source(name: str) -> str | None:
        """The compute node ``name``'s value comes from, through single-user free nodes."""
        cur = name
        while loc.get(cur) == "free":
            r = by_name[cur]
            if len(r.inputs) != 1 or len(users[cur]) != 1:
                return None
            cur = r.inputs[0]
        return cur if loc.get(cur) == "chip" else None

    fusable = set(cost.fusable)
    for r in recs:
        if loc[r.name] != "chip" or r.kind not in fusable:
            continue
        for inp in r.inputs:
            if loc.get(inp) not in _CHIP_SIDE:
                continue
            # Every free node between the producer and r has r as its only user.
            cur, ok = inp, True
            while loc.get(cur) == "free":
                if len(users[cur]) != 1 or len(by_name[cur].inputs) != 1:
                    ok = False
                    break
                cur = by_name[cur].inputs[0]
            src = chain_source(inp) if ok else None
            if src is None or len(users[src]) != 1:
                continue
            head = leader.get(src, src)
            if by_name[head].kind not in ANCHOR_KINDS:
                continue
            if abs(by_name[src].out_bytes - r.out_bytes) > 1e-9 and by_name[src].out_bytes > 0:
                continue  # not an epilogue (broadcast up / reduction)
            leader[r.name] = head
            dropped_out.add(src)
            dropped_in[r.name].add(inp)
            break

    _fuse_epilogue_dags(recs, by_name, loc, users, fusable, leader, dropped_out, dropped_in,
                        consumers, source)

    # ---- SRAM residency: chip -> chip activations that never touch DRAM.
    budget = cost.sram_bytes / 2.0

    resident: set[str] = set()
    for r in recs:
        if loc[r.name] != "chip" or r.out_bytes <= 0:
            continue
        cons = consumers(r.name)
        if not cons:
            continue
        if r.out_bytes <= budget or (len(set(cons)) == 1 and r.kind in ROW_LOCAL_KINDS
                                     and by_name[cons[0]].kind in ROW_LOCAL_KINDS):
            resident.add(r.name)

    # ---- chip kernels.
    rows: dict[str, NodeCost] = {}
    groups: dict[str, list[str]] = defaultdict(list)
    for r in recs:
        w = loc[r.name]
        if w != "chip":
            continue
        by = r.const_bytes + sum(b for p, b in r.in_bytes.items()
                                 if p not in dropped_in[r.name] and source(p) not in resident)
        if r.name not in dropped_out and r.name not in resident:
            by += r.out_bytes
        peak = _peak(tgt, bits_of(r))
        rows[r.name] = NodeCost(r.name, r.kind, r.ops, by, r.ops / peak, by / bw, 0.0, "chip",
                                leader.get(r.name, ""), block_of(r.name))
        groups[leader.get(r.name, r.name)].append(r.name)
    for head, members in groups.items():
        comp = sum(rows[m].compute_s for m in members)
        mem = sum(rows[m].memory_s for m in members)
        t = max(comp, mem) + cost.per_op_overhead_s
        weights = [rows[m].compute_s + rows[m].memory_s for m in members]
        tot = sum(weights)
        for m, wgt in zip(members, weights):
            rows[m].time_s = t * (wgt / tot if tot > 0 else 1.0 / len(members))

    # ---- host fallback, prologue, free and const rows.
    for r in recs:
        w = loc[r.name]
        if w == "chip" or r.alias or r.kind in ("placeholder", "output"):
            continue
        if w in ("host", "prologue"):
            t = r.ops / host.ops_per_s
            rows[r.name] = NodeCost(r.name, r.kind, r.ops, 0.0, t, 0.0, t, w, "",
                                    block_of(r.name))
        else:
            where = {"const": "const", "hostfree": "host", "prologuefree": "prologue"}.get(
                w, "free")
            rows[r.name] = NodeCost(r.name, r.kind, 0.0, 0.0, 0.0, 0.0, 0.0, where, "",
                                    block_of(r.name))

    # ---- fallback regions.
    hostset = [r.name for r in recs if loc[r.name] in ("host", "hostfree")]
    g = nx.DiGraph()
    g.add_nodes_from(hostset)
    hs = set(hostset)
    for n in hostset:
        for i in by_name[n].inputs:
            if i in hs:
                g.add_edge(i, n)
    order = {r.name: k for k, r in enumerate(recs)}
    comps = sorted((sorted(c, key=order.__getitem__) for c in nx.weakly_connected_components(g)),
                   key=lambda c: order[c[0]])
    regions: list[FallbackRegion] = []
    for k, comp in enumerate(comps):
        cs = set(comp)
        if not any(loc[n] == "host" for n in comp):
            continue
        ins: dict[str, float] = {}
        outs: dict[str, float] = {}
        for n in comp:
            for i in by_name[n].inputs:
                if i not in cs and loc.get(i) in _CHIP_SIDE:
                    ins[i] = by_name[i].out_bytes
            if any(u not in cs and loc.get(u) in _CHIP_SIDE for u in users[n]):
                outs[n] = by_name[n].out_bytes
        compute = sum(rows[n].time_s for n in comp if n in rows)
        link_b = sum(ins.values()) + sum(outs.values())
        idx = len(regions)
        for n in comp:
            if n in rows:
                rows[n].region = idx
        kinds = Counter(by_name[n].kind for n in comp if loc[n] == "host")
        regions.append(FallbackRegion(idx, [n for n in comp if n in rows], dict(kinds), compute,
                                      sum(ins.values()), sum(outs.values()),
                                      link_b / host.link_bytes_per_s, host.round_trip_s))

    # ---- link I/O: host-resident inputs read by the chip, chip values returned.
    up: dict[str, float] = {}
    down: dict[str, float] = {}
    for r in recs:
        if loc[r.name] in _CHIP_SIDE:
            for i in r.inputs:
                if loc.get(i) in _HOST_SIDE:
                    up[i] = by_name[i].out_bytes
        if r.is_output:
            for i in r.inputs:
                if loc.get(i) in _CHIP_SIDE:
                    down[i] = by_name[i].out_bytes
    io_rows = []
    for label, d in (("<upload>", up), ("<download>", down)):
        b = sum(d.values())
        t = b / host.link_bytes_per_s
        io_rows.append(NodeCost(label, "link", 0.0, b, 0.0, t, t, "io", "", ""))

    # ---- roofline bound.
    total_ops, comp_s = 0.0, 0.0
    consts: dict[str, float] = {}
    for r in recs:
        if loc[r.name] in ("chip", "host"):
            total_ops += r.ops
            comp_s += r.ops / _peak(tgt, bits_of(r))
        if loc[r.name] == "chip":
            consts.update(r.consts)
    io_bytes = sum(by_name[r.name].out_bytes for r in recs
                   if r.kind == "placeholder" and not r.alias and r.dependent)
    io_bytes += sum(by_name[i].out_bytes for r in recs if r.is_output for i in r.inputs
                    if by_name[i].dependent)
    min_bytes = sum(consts.values()) + io_bytes
    macs = [r for r in recs if r.kind in ANCHOR_KINDS and loc[r.name] in ("chip", "host")
            and r.ops > 0]

    ordered = [rows[r.name] for r in recs if r.name in rows] + io_rows
    rep = LatencyReport(tgt.name, wbits, abits, ordered, regions, total_ops, min_bytes, comp_s,
                        min_bytes / bw, mac_kernels=len(macs),
                        mac_compute_s=sum(r.ops / _peak(tgt, bits_of(r)) for r in macs),
                        per_op_overhead_s=cost.per_op_overhead_s,
                        layer_bits=dict(layer_bits or {}))
    log.info("latency on %s: %.1f us (%d regions)", tgt.name, rep.total_s * 1e6, len(regions))
    return rep


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Measurement:
    """One timed kernel: ``kind``, ``shape`` (see :func:`kernel_ops_bytes`), ``bits``, ``us``."""
    kind: str
    shape: tuple[int, ...]
    bits: int
    us: float


def kernel_ops_bytes(kind: str, shape: Sequence[int], bits: int) -> tuple[float, float]:
    """(ops, bytes) of a calibration kernel, all operands at ``bits``.

    ``shape`` by kind:

    * ``linear``: ``M×K×N`` — ``(M, K)`` activations times a ``K×N`` weight; ops ``2MKN``,
      bytes ``(MK + KN + MN)·bits/8``.
    * ``matmul``: ``M×K×N`` or ``B×M×K×N`` — two activations; ops ``2BMKN``, bytes
      ``B(MK + KN + MN)·bits/8``.
    * ``conv``: ``N×Cin×H×W×Cout×k`` — stride 1, "same" padding, groups 1, ``H×W`` the output
      size; ops ``2·N·H·W·Cout·Cin·k²``, bytes ``(N·Cin·H·W + N·Cout·H·W + Cout·Cin·k²)·bits/8``.
    * any elementwise kind of :data:`OPS_PER_ELEMENT` (``add``, ``relu``, ...): the tensor's
      dims, ``E`` elements; ops ``E·OPS_PER_ELEMENT[kind]``, bytes ``(inputs + 1)·E·bits/8``
      with 2 inputs for binary kinds.
    """
    b = bits / 8.0
    s = [int(x) for x in shape]
    if kind == "linear":
        if len(s) != 3:
            raise InputError(f"linear shape must be MxKxN, got {'x'.join(map(str, s))}")
        m, k, n = s
        return 2.0 * m * k * n, (m * k + k * n + m * n) * b
    if kind == "matmul":
        if len(s) not in (3, 4):
            raise InputError(f"matmul shape must be MxKxN or BxMxKxN, got {'x'.join(map(str, s))}")
        bb, m, k, n = ([1] + s) if len(s) == 3 else s
        return 2.0 * bb * m * k * n, bb * (m * k + k * n + m * n) * b
    if kind == "conv":
        if len(s) != 6:
            raise InputError(f"conv shape must be NxCinxHxWxCoutxk, got {'x'.join(map(str, s))}")
        nb, cin, h, w, cout, k = s
        return (2.0 * nb * h * w * cout * cin * k * k,
                (nb * cin * h * w + nb * cout * h * w + cout * cin * k * k) * b)
    if kind in OPS_PER_ELEMENT:
        e = _prod(s)
        n_in = 2 if kind in _BINARY_KINDS else 1
        return OPS_PER_ELEMENT[kind] * e, (n_in + 1) * e * b
    raise InputError(f"calibration kind {kind!r} is not one of linear, matmul, conv or an "
                     f"elementwise kind ({', '.join(sorted(OPS_PER_ELEMENT))})")


def _parse_shape(text: Any) -> tuple[int, ...]:
    if isinstance(text, (tuple, list)):
        return tuple(int(x) for x in text)
    try:
        dims = tuple(int(x) for x in str(text).lower().replace("×", "x").split("x"))
    except ValueError:
        raise InputError(f"shape {text!r}: write dimensions as 128x384x1536") from None
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"shape {text!r}: dimensions must be positive integers")
    return dims


def _read_measurements(measurements: Any) -> list[Measurement]:
    if isinstance(measurements, (str, os.PathLike)):
        path = Path(measurements)
        try:
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                need = {"kind", "shape", "bits", "us"}
                if reader.fieldnames is None or not need <= set(reader.fieldnames):
                    raise InputError(f"{path}: CSV needs the header columns kind,shape,bits,us "
                                     f"(got {reader.fieldnames})")
                raw = [(r["kind"], r["shape"], r["bits"], r["us"]) for r in reader]
        except OSError as e:
            raise InputError(f"{path}: cannot read measurements: {e.strerror or e}") from None
    else:
        raw = []
        for r in measurements:
            if isinstance(r, Measurement):
                raw.append((r.kind, r.shape, r.bits, r.us))
            elif isinstance(r, Mapping):
                raw.append((r["kind"], r["shape"], r["bits"], r["us"]))
            else:
                raw.append(tuple(r))
    out = []
    for i, row in enumerate(raw):
        try:
            kind, shape, bits, us = row
            m = Measurement(str(kind).strip(), _parse_shape(shape),
                            int(str(bits).lower().replace("int", "")), float(us))
        except (ValueError, TypeError) as e:
            raise InputError(f"measurement {i}: {row!r} is not (kind, shape, bits, us): {e}"
                             ) from None
        if not (m.us > 0 and math.isfinite(m.us)):
            raise InputError(f"measurement {i}: time must be a positive number of "
                             f"microseconds, got {m.us}")
        kernel_ops_bytes(m.kind, m.shape, m.bits)  # validates kind and shape
        out.append(m)
    if not out:
        raise InputError("no measurements: pass a CSV path (columns kind,shape,bits,us) or rows "
                         "of (kind, shape, bits, us)")
    return out


@dataclass
class CostFit:
    """Cost parameters fitted to measured kernel times."""
    peak_ops_per_s: dict[int, float]
    memory_bytes_per_s: float
    per_op_overhead_s: float
    measurements: list[Measurement]
    predicted_us: list[float]
    rel_errors: list[float]
    base_target: str = ""

    @property
    def rms_rel_error(self) -> float:
        return math.sqrt(sum(e * e for e in self.rel_errors) / len(self.rel_errors))

    @property
    def max_rel_error(self) -> float:
        return max(abs(e) for e in self.rel_errors)

    def apply(self, target: str | Target) -> Target:
        """A copy of ``target`` with the fitted cost (precisions not measured keep theirs)."""
        tgt = load_target(target)
        peaks = dict(tgt.cost.peak_ops_per_s)
        peaks.update(self.peak_ops_per_s)
        cost = dataclasses.replace(tgt.cost, peak_ops_per_s=peaks,
                                   memory_bytes_per_s=self.memory_bytes_per_s,
                                   per_op_overhead_s=self.per_op_overhead_s)
        return dataclasses.replace(tgt, cost=cost, source=f"{tgt.source} (fitted cost)")

    def table(self) -> str:
        from tabulate import tabulate

        head = ", ".join(f"int{b} {p / 1e12:.3g} TOPS" for b, p in
                         sorted(self.peak_ops_per_s.items()))
        head += (f"; {self.memory_bytes_per_s / 1e9:.3g} GB/s; overhead "
                 f"{self.per_op_overhead_s * 1e6:.3g} us; rel. error rms "
                 f"{100 * self.rms_rel_error:.2f} %, max {100 * self.max_rel_error:.2f} %")
        rows = [(m.kind, "x".join(map(str, m.shape)), m.bits, m.us, p, 100 * e)
                for m, p, e in zip(self.measurements, self.predicted_us, self.rel_errors)]
        return head + "\n\n" + tabulate(rows, headers=["kind", "shape", "bits", "us",
                                                       "predicted us", "error %"],
                                        tablefmt="github", floatfmt=".2f")

    def __str__(self) -> str:
        return self.table()


def fit_cost_params(measurements: Any, target: str | Target) -> CostFit:
    """Fit peak ops/s per precision, bandwidth and per-op overhead to measured kernel times.

    ``measurements``: a CSV path with header ``kind,shape,bits,us`` (e.g.
    ``linear,128x384x1536,8,52.1``), or rows ``(kind, shape, bits, us)`` / dicts /
    :class:`Measurement`; ``shape`` is ``"AxBxC"`` or a tuple, its meaning per kind in
    :func:`kernel_ops_bytes`; ``bits`` the precision (``8`` or ``"int8"``); ``us`` the
    measured time. The model is ``t = max(ops / peak[bits], bytes / bandwidth) + overhead``;
    the parameters are fitted in log space by ``scipy.optimize.least_squares`` on relative
    residuals, from the target's values and a few scaled restarts (the ``max`` makes the
    problem piecewise smooth); the best fit wins. Rows must cover compute-bound, memory-bound
    and overhead-dominated sizes for all three to be identifiable.
    """
    import numpy as np
    from scipy.optimize import least_squares

    tgt = load_target(target)
    ms = _read_measurements(measurements)
    bits_list = sorted({m.bits for m in ms})
    ob = np.array([kernel_ops_bytes(m.kind, m.shape, m.bits) for m in ms])
    ops, nbytes = ob[:, 0], ob[:, 1]
    meas = np.array([m.us * 1e-6 for m in ms])
    which = np.array([bits_list.index(m.bits) for m in ms])
    nb = len(bits_list)

    def model(x: np.ndarray) -> np.ndarray:
        peaks = np.exp(x[:nb])
        bw, ovh = np.exp(x[nb]), np.exp(x[nb + 1])
        return np.maximum(ops / peaks[which], nbytes / bw) + ovh

    def resid(x: np.ndarray) -> np.ndarray:
        return model(x) / meas - 1.0

    x0 = np.array([math.log(_peak(tgt, b)) for b in bits_list]
                  + [math.log(tgt.cost.memory_bytes_per_s),
                     math.log(max(tgt.cost.per_op_overhead_s, 1e-7))])
    best = None
    for scale in (1.0, 0.3, 3.0, 0.1, 10.0):
        start = x0 + math.log(scale)
        start[nb + 1] = x0[nb + 1] + math.log(scale)
        res = least_squares(resid, start, method="trf", x_scale=1.0, xtol=1e-12, ftol=1e-12,
                            gtol=1e-12, max_nfev=2000)
        if best is None or res.cost < best.cost:
            best = res
        if best.cost < 1e-12:
            break
    x = best.x
    pred = model(x)
    fit = CostFit({b: float(math.exp(x[i])) for i, b in enumerate(bits_list)},
                  float(math.exp(x[nb])), float(math.exp(x[nb + 1])), ms,
                  [float(p * 1e6) for p in pred], [float(e) for e in pred / meas - 1.0],
                  tgt.name)
    log.info("fitted cost for %s: rms rel. error %.3g", tgt.name, fit.rms_rel_error)
    return fit

"""Integer reference executor for converted graphs (:mod:`archnet_fx.quant.convert`).

:class:`IntegerInterpreter` (a ``torch.fx.Interpreter``) runs a converted GraphModule the way an
integer chip would, and :func:`compare_integer` measures how far that is from the
fake-quantized / converted float path.

What runs in integers:

* **linear / conv / matmul** whose activation and weight operands are both ``Dequantize`` outputs
  (an activation Q/DQ pair and an integer weight, or two activation pairs): the kernel takes the
  integers ``q − z`` and accumulates exactly. The products of ≤ 16-bit integers are summed in
  float64, which is exact integer arithmetic while ``|acc| < 2^53`` (checked); the result is then
  held as int64. The bias is added as an integer at the accumulator scale ``s_x·s_w``
  (``round(b / (s_x·s_w))``, as chips store it in int32). Every accumulator is checked against
  the target's ``accumulator_bits``: :attr:`IntRefReport.overflow` lists the nodes whose
  accumulators would not fit (the chip would saturate or wrap; we keep the exact value).
* **layout ops** (view/reshape/permute/transpose/contiguous/flatten/squeeze/unsqueeze/slice/
  select/expand) and ``relu`` (the chip's fused activation; ``relu(acc)·s = relu(acc·s)`` for
  positive scales) between such a kernel and the next ``Quantize`` carry the integer accumulator
  along;
* **re-quantization**: a ``Quantize`` whose input is such an accumulator computes
  ``q = clamp(((acc·m0) >> shift, rounded) + z, qmin, qmax)`` with the fixed-point multiplier
  ``M = s_x·s_w / s_out = m0·2^−shift`` (``m0`` a 31-bit integer per output channel). On
  power-of-two targets ``M`` is a power of two, ``m0 = 2^30`` and the re-quantization is a shift.

Everything else — the surrogates' add/mul/relu/PWL bodies, residual adds, a ``Quantize`` of a
float value — runs in float32 on dequantized values, as it sits between Q/DQ pairs; a
quantizer's integers are recomputed from that float value the same way the float path does.

Rounding: fixed-point rounding is half-up, the float path's ``torch.round`` is half-to-even, and
the integer bias is rounded; each costs at most one step at a Q node, so with inputs from the
float path (``local=True``) every integer differs by at most one step. Propagated through the
network (``local=False``) the differences can grow; :func:`compare_integer` reports both the
fraction of elements that differ and by how much.

>>> import torch
>>> from archnet_fx.quant import fakequant as q
>>> from archnet_fx.quant.convert import convert
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(),
...                                                  torch.nn.Linear(8, 4)))
>>> fq = q.insert_fake_quant(gm, "npu_a").module
>>> with q.calibrating(fq):
...     _ = fq(torch.randn(16, 8))
>>> stats = compare_integer(fq, (torch.randn(4, 8),), target="npu_a")
>>> stats.max_step_diff <= 1
True
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from archnet_fx.capture import normalize_inputs
from archnet_fx.quant.qdq import Dequantize, Quantize
from archnet_fx.quant.convert import convert
from archnet_fx.ir.opkinds import node_kind
from archnet_fx.quant.fakequant import quantizers
from archnet_fx.targets import Target, load_target

log = logging.getLogger(__name__)

__all__ = ["IntegerInterpreter", "IntRefReport", "run_integer", "compare_integer",
           "fixed_point_multiplier", "INTEGER_KINDS", "CARRY_KINDS"]

#: Kinds computed with integer operands and integer accumulation.
INTEGER_KINDS = frozenset({"linear", "conv", "matmul"})
#: Kinds that carry an integer accumulator to the next Quantize unchanged.
CARRY_KINDS = frozenset({"reshape", "permute", "slice", "expand", "identity"})
_EXACT = float(2 ** 53)


def fixed_point_multiplier(m: torch.Tensor, bits: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    """``m ≈ m0 · 2^−shift`` with integer ``m0 ∈ [2^(bits−1), 2^bits)`` (elementwise, int64)."""
    m = m.double()
    frac, exp = torch.frexp(m)                       # m = frac·2^exp, frac ∈ [0.5, 1)
    m0 = torch.round(frac * (1 << bits)).to(torch.int64)
    carry = m0 == (1 << bits)
    m0 = torch.where(carry, m0 // 2, m0)
    exp = exp.to(torch.int64) + carry.to(torch.int64)
    return m0, bits - exp


def _rounding_shift(v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``round(v / 2^shift)`` half-up for int64 ``v`` (``shift`` may be ≤ 0)."""
    pos = shift.clamp_min(1)
    out = (v + (torch.ones_like(v) << (pos - 1))) >> pos
    return torch.where(shift > 0, out, v << (-shift).clamp_min(0))


@dataclass
class IntRefReport:
    """What one integer run did."""
    integer_nodes: list[str] = field(default_factory=list)      # kernels run in integers
    requantized: list[str] = field(default_factory=list)        # Q nodes fed by an accumulator
    accumulators: dict[str, int] = field(default_factory=dict)  # node → max |acc|
    accumulator_bits: int = 32
    overflow: list[str] = field(default_factory=list)           # nodes beyond accumulator_bits
    float_nodes: list[str] = field(default_factory=list)        # compute run in float


class IntegerInterpreter(torch.fx.Interpreter):
    """Run a converted GraphModule with integer kernels (see the module docstring).

    ``reference``: Quantize-node values of the float path; with it each Q node's integers are
    compared to the reference and then *replaced* by it (``local`` mode), so differences do not
    propagate.
    """

    def __init__(self, gm: torch.fx.GraphModule, accumulator_bits: int = 32,
                 reference: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(gm)
        self.report = IntRefReport(accumulator_bits=accumulator_bits)
        self.reference = reference
        self.q_values: dict[str, torch.Tensor] = {}
        self._deq: dict[torch.fx.Node, tuple[torch.Tensor, torch.Tensor, int | None]] = {}
        self._acc: dict[torch.fx.Node, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ helpers
    def _module(self, n: torch.fx.Node) -> Any:
        return self.module.get_submodule(n.target) if n.op == "call_module" else None

    @staticmethod
    def _per_channel(t: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
        if axis is None or t.dim() == 0:
            return t.reshape(())
        shape = [1] * ndim
        shape[axis] = -1
        return t.reshape(shape)

    def _integer_kernel(self, n: torch.fx.Node, args: tuple, kwargs: dict) -> torch.Tensor | None:
        kind = node_kind(n, self.module)
        a, b = (n.args + (None, None))[:2]
        if kind not in INTEGER_KINDS or a not in self._deq or b not in self._deq:
            return None
        (qa, za, sa, axa), (qb, zb, sb, axb) = self._deq[a], self._deq[b]
        if axa is not None:
            return None  # per-channel activations: not produced by convert
        xa = (qa - self._per_channel(za, axa, qa.dim())).double()
        xb = (qb - self._per_channel(zb, axb, qb.dim())).double()
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if kind == "matmul":
            if axb is not None:
                return None
            acc = torch.matmul(xa, xb)
            s = (sa * sb).double().reshape(())
        elif kind == "linear":
            acc = F.linear(xa, xb)
            s = (sa.double() * sb.double()).reshape(-1) if axb in (0, None) else None
            if s is None:
                return None
        else:  # conv: weight channels on axis 0 → output channels on dim 1
            if axb not in (0, None):
                return None
            rest = list(args[3:]) if len(args) > 3 else []
            acc = n.target(xa, xb, None, *rest, **{k: v for k, v in kwargs.items()
                                                    if k != "bias"})
            s = (sa.double() * sb.double()).reshape(-1)
            s = s.reshape([1, -1] + [1] * (acc.dim() - 2)) if s.numel() > 1 else s.reshape(())
        if acc.abs().max() >= _EXACT:
            raise OverflowError(f"{n.name}: accumulator beyond 2^53, not exact in float64")
        acc = acc.round().to(torch.int64)
        if bias is not None:
            b_int = torch.round(bias.double() / (s.reshape(-1) if s.dim() else s)).to(torch.int64)
            if kind == "conv" and b_int.dim():
                b_int = b_int.reshape([1, -1] + [1] * (acc.dim() - 2))
            acc = acc + b_int
        peak = int(acc.abs().max()) if acc.numel() else 0
        self.report.accumulators[n.name] = peak
        if peak > (1 << (self.report.accumulator_bits - 1)) - 1:
            self.report.overflow.append(n.name)
        self.report.integer_nodes.append(n.name)
        s_full = torch.broadcast_to(s, acc.shape) if s.dim() else s.expand(acc.shape)
        self._acc[n] = (acc, s_full)
        return (acc.double() * s_full).float()

    def _requantize(self, n: torch.fx.Node, mod: Quantize) -> torch.Tensor | None:
        src = n.args[0]
        if src not in self._acc:
            return None
        acc, s_acc = self._acc[src]
        s_out = self._per_channel(mod.scale, mod.axis, acc.dim()).double()
        z = self._per_channel(mod.zero_point, mod.axis, acc.dim()).round().to(torch.int64)
        m = (s_acc / s_out).contiguous()
        peak = int(acc.abs().max()) if acc.numel() else 0
        bits = max(8, min(31, 62 - max(1, peak.bit_length())))
        m0, shift = fixed_point_multiplier(m, bits)
        q = _rounding_shift(acc * m0, shift) + z
        q = q.clamp(mod.qmin, mod.qmax)
        self.report.requantized.append(n.name)
        return q.float()

    # ------------------------------------------------------------------ interpreter
    def run_node(self, n: torch.fx.Node) -> Any:
        mod = self._module(n)
        if isinstance(mod, Quantize):
            q = self._requantize(n, mod)
            if q is None:
                q = super().run_node(n)
            self.q_values[n.name] = q
            if self.reference is not None and n.name in self.reference:
                q = self.reference[n.name]
            return q
        out = super().run_node(n)
        if isinstance(mod, Dequantize):
            qin = self.env[n.args[0]] if isinstance(n.args[0], torch.fx.Node) else n.args[0]
            self._deq[n] = (torch.round(qin.double()).to(torch.int64) if qin.is_floating_point()
                            else qin.to(torch.int64), mod.zero_point.round().to(torch.int64),
                            mod.scale, mod.axis)
            return out
        if n.op in ("call_function", "call_method", "call_module"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.op != "call_module":
                res = self._integer_kernel(n, args, kwargs)
                if res is not None:
                    return res
            kind = node_kind(n, self.module)
            src = n.args[0] if n.args else None
            if kind == "relu" and src in self._acc and bool((self._acc[src][1] > 0).all()):
                # relu(acc·s) = relu(acc)·s for s > 0: the chip's fused ReLU on the accumulator
                acc, s = self._acc[src]
                self._acc[n] = (acc.clamp_min(0), s)
            elif kind in CARRY_KINDS and src in self._acc and not any(
                    isinstance(a, torch.fx.Node) and a in self._acc and a is not src
                    for a in pytree.tree_leaves((n.args, n.kwargs))):
                acc, s = self._acc[src]
                a2 = (acc,) + tuple(args[1:])
                s2 = (s,) + tuple(args[1:])
                fn = (getattr(torch.Tensor, n.target) if n.op == "call_method" else
                      mod if mod is not None else n.target)
                self._acc[n] = (fn(*a2, **kwargs), fn(*s2, **kwargs))
            elif kind not in ("shape", "assert", "getitem") and isinstance(out, torch.Tensor) \
                    and out.is_floating_point():
                self.report.float_nodes.append(n.name)
        return out


class _QCapture(torch.fx.Interpreter):
    """The float path, recording each Quantize node's integers."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.q_values: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), Quantize):
            self.q_values[n.name] = out
        return out


def _converted(module: torch.nn.Module, target: Target | None) -> torch.fx.GraphModule:
    if any(bool(q.initialized) and q.enabled for q in quantizers(module)):
        return convert(module, target).module
    return module


def run_integer(gm: torch.nn.Module, example_inputs: Any, target: str | Target | None = None
                ) -> tuple[Any, IntRefReport]:
    """Outputs of ``gm`` (converted, or fake-quantized: converted first) run with integer
    kernels, and the :class:`IntRefReport` of the run."""
    tgt = load_target(target) if target is not None else None
    conv = _converted(gm, tgt)
    args, kwargs = normalize_inputs(example_inputs)
    flat = _flat_inputs(conv, args, kwargs)
    it = IntegerInterpreter(conv, tgt.quant.accumulator_bits if tgt else 32)
    with torch.no_grad():
        out = it.run(*flat)
    return out, it.report


def _flat_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = list(args)
    for ph in phs[len(args):]:
        out.append(kwargs.get(ph.target, ph.args[0] if ph.args else None))
    return out


@dataclass
class IntRefStats:
    """Integer run vs the float path: per Q node and per output."""
    local: bool
    nodes: list[dict[str, Any]]          # node, elements, frac_diff, max_step_diff
    outputs: list[dict[str, Any]]        # output, frac_diff, max_abs_diff, max_rel_diff
    report: IntRefReport

    @property
    def max_step_diff(self) -> int:
        return max((r["max_step_diff"] for r in self.nodes), default=0)

    @property
    def frac_diff(self) -> float:
        tot = sum(r["elements"] for r in self.nodes)
        return sum(r["frac_diff"] * r["elements"] for r in self.nodes) / max(1, tot)

    def table(self) -> str:
        from tabulate import tabulate
        mode = "local: float-path inputs at each Q" if self.local else "propagated"
        rep = self.report
        head = (f"integer reference ({mode}): {len(rep.integer_nodes)} integer kernels, "
                f"{len(rep.requantized)} fixed-point requantizations, accumulator "
                f"{rep.accumulator_bits} bits, overflow at {rep.overflow or 'none'}")
        rows = [(r["node"], r["elements"], f"{r['frac_diff']:.4%}", r["max_step_diff"])
                for r in self.nodes]
        outs = [(r["output"], f"{r['frac_diff']:.4%}", f"{r['max_abs_diff']:.3g}",
                 f"{r['max_rel_diff']:.3g}") for r in self.outputs]
        return "\n\n".join([head, tabulate(rows, headers=["Q node", "elements", "differ",
                                                          "max |Δq| (steps)"], tablefmt="github"),
                            tabulate(outs, headers=["output", "differ", "max |Δ|",
                                                    "max |Δ| / max |y|"], tablefmt="github")])

    def __str__(self) -> str:
        return self.table()


def compare_integer(module: torch.nn.Module, example_inputs: Any,
                    target: str | Target | None = None, *, local: bool = False,
                    rtol: float = 1e-6) -> IntRefStats:
    """Integer reference vs the fake-quantized/converted float path on ``example_inputs``.

    Per Quantize node: the fraction of integers that differ and the largest difference in steps;
    per float output: the fraction of elements differing by more than ``rtol·max|y|``, the largest
    absolute and relative difference. ``local=True`` feeds every Q node's consumers the float
    path's integers, so each difference is that node's own (≤ 1 step by construction).
    """
    tgt = load_target(target) if target is not None else None
    conv = _converted(module, tgt)
    args, kwargs = normalize_inputs(example_inputs)
    flat = _flat_inputs(conv, args, kwargs)
    with torch.no_grad():
        cap = _QCapture(conv)
        ref_out = cap.run(*flat)
        it = IntegerInterpreter(conv, tgt.quant.accumulator_bits if tgt else 32,
                                reference=cap.q_values if local else None)
        out = it.run(*flat)
    nodes = []
    for name, ref in cap.q_values.items():
        got = it.q_values.get(name)
        if got is None:
            continue
        d = (got - ref).abs()
        nodes.append({"node": name, "elements": d.numel(),
                      "frac_diff": float((d > 0).float().mean()) if d.numel() else 0.0,
                      "max_step_diff": int(d.max()) if d.numel() else 0})
    outputs = []
    for i, (a, b) in enumerate(zip(pytree.tree_leaves(ref_out), pytree.tree_leaves(out))):
        if not isinstance(a, torch.Tensor) or not a.is_floating_point():
            continue
        scale = float(a.abs().max()) or 1.0
        d = (a - b).abs()
        outputs.append({"output": f"output[{i}]",
                        "frac_diff": float((d > rtol * scale).float().mean()),
                        "max_abs_diff": float(d.max()), "max_rel_diff": float(d.max()) / scale})
    return IntRefStats(local, nodes, outputs, it.report)

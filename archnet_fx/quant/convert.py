"""``convert``: replace fake quantization by integer quantize/dequantize (Q/DQ) nodes.

After distillation the student computes with :class:`~archnet_fx.quant.FakeQuant` modules —
float simulations of integers. :class:`ConvertPass` ("convert", a
:class:`~archnet_fx.infra.graphpass.GraphPass`) makes the integers explicit, so an integer executor
(:mod:`archnet_fx.quant.intref`) and the ONNX exporter (:mod:`archnet_fx.export`) can map them 1:1:

* **weights** — a weight FakeQuant ``fq(get_attr W)`` (functional/ATen graphs) or the
  ``weight_fq`` of a :class:`~archnet_fx.quant.fakequant.QuantLinear`/``QuantConv*`` becomes an *integer
  buffer* ``get_attr W_int`` (``torch.int8`` storage for ≤ 8 bits, ``torch.int16`` above;
  ``uint8`` for an unsigned quantizer, e.g. of an all-positive weight; values within
  ``[qmin, qmax]`` of the requested bits, e.g. ``[-8, 7]`` for int4) followed by a
  :class:`Dequantize` with the quantizer's scales (per channel along ``axis`` or per tensor) and
  zero points; on power-of-two targets every scale is an exact power of two;
* **activations** — an activation FakeQuant ``fq(x)`` becomes ``Dequantize(Quantize(x))`` with
  the same step, zero point and range (``[0, 2^b − 1]`` unsigned or ``[−2^(b−1), 2^(b−1) − 1]``
  signed, as calibrated);
* **quantized layers** — a ``QuantLinear``/``QuantConv*`` call becomes explicit nodes: the
  activation Q/DQ pair, the weight ``get_attr``+``Dequantize``, and ``F.linear``/``F.conv*d``
  on the dequantized values with the float bias;
* **surrogates** whose bodies hold quantized layers (an embedding as one-hot × linear, an affine
  LayerNorm) are *inlined* first (traced with :class:`~archnet_fx.capture.LeafTracer`), so every
  Q/DQ is a node of the top-level graph;
* **BatchNorm** is normally folded by canonicalization before quantization; an eval BatchNorm
  that survives right after a per-channel quantized conv is folded *into the weight scale*
  (``s_c·a_c``), which keeps the integer weights and is exact; elsewhere (and affine surrogates
  such as ``NormAffine``, which sit after a residual ``add``, never directly after a layer) it
  stays a float op between Q/DQ pairs (a refusal says so for BatchNorm).

:class:`Quantize` returns **float32 tensors holding integers** (so the converted module stays a
normal float PyTorch module that runs anywhere); :class:`Dequantize` accepts float or integer
tensors. Both are leaves with op kind ``identity`` on chip (the quantize is the requantization
folded into the producing op) and carry ``archnet_qdq`` so tools can find them.

Numerics: the converted float path quantizes as ONNX ``QuantizeLinear`` does in onnxruntime,
``round(clamp(x/s, qmin − z, qmax − z)) + z`` (so the exported file computes the same integers),
and dequantizes as ``(q − z)·s``; :class:`FakeQuant` computes the same ``round(clamp(x/s, qmin −
z, qmax − z))·s``, so the two agree up to float rounding of the straight-through estimator (``(round(v) − v) + v`` is ``round(v)`` to
within one ulp): the tests use ``atol = 1e-5·max|y|``.

Uninitialised or disabled quantizers are identities in the fake-quantized module and are dropped
(a refusal names each). Quantizers marked *lossless* (integer activations such as one-hots) get a
Q/DQ pair with step 1.

>>> import torch
>>> from archnet_fx.quant import fakequant as q
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
>>> fq = q.insert_fake_quant(gm, "npu_a").module
>>> with q.calibrating(fq):
...     _ = fq(torch.randn(8, 4))
>>> res = convert(fq, "npu_a")
>>> sorted(res.record.rule_hits.items())
[('act_qdq', 1), ('layer', 1), ('weight_int', 1)]
>>> x = torch.randn(5, 4)
>>> bool(torch.allclose(res.module(x), fq(x), atol=1e-5))
True
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from archnet_fx.ir.meta import KIND_META_KEY
from archnet_fx.ir.opkinds import node_kind
from archnet_fx.ir.meta import FROM_PASS_KEY
from archnet_fx.infra.graphpass import GraphPass, fresh_attr_name, stamp_node
from archnet_fx.infra.records import PassRecord, PassResult
from archnet_fx.quant.fakequant import FakeQuant, QuantLayer, quantizers
from archnet_fx.targets import Target, load_target
from archnet_fx.quant.qdq import Dequantize, QParams, Quantize, integer_dtype

log = logging.getLogger(__name__)

__all__ = ["Quantize", "Dequantize", "QParams", "ConvertPass", "convert", "qdq_nodes",
           "qdq_counts", "integer_dtype"]


def qdq_nodes(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """The ``quantize`` and ``dequantize`` nodes of a converted graph."""
    out: dict[str, list[torch.fx.Node]] = {"quantize": [], "dequantize": []}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            role = getattr(gm.get_submodule(n.target), "archnet_qdq", "")
            if role:
                out[role].append(n)
    return out


def qdq_counts(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Counts of Q nodes, DQ nodes on activations and DQ nodes on integer weights."""
    nodes = qdq_nodes(gm)
    w = sum(1 for n in nodes["dequantize"] if n.args and isinstance(n.args[0], torch.fx.Node)
            and n.args[0].op == "get_attr")
    return {"quantize": len(nodes["quantize"]), "dequantize_act": len(nodes["dequantize"]) - w,
            "dequantize_weight": w}


# --------------------------------------------------------------------------- the pass


def _usable(fq: Any) -> bool:
    return isinstance(fq, FakeQuant) and fq.enabled and bool(fq.initialized)


def _contains_quant(m: nn.Module) -> bool:
    return any(isinstance(c, (FakeQuant, QuantLayer)) for c in m.modules() if c is not m)


_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvertPass(GraphPass):
    """Fake quantization → integer weights and explicit Q/DQ nodes (see module docstring)."""

    name = "convert"
    exact = True  # reproduces the fake-quantized module up to float rounding

    def __init__(self, target: Target | None = None) -> None:
        self.target = target

    def apply(self, gm: torch.fx.GraphModule, record: PassRecord) -> None:
        graph = gm.graph
        taken: set[str] = set()

        def fresh(hint: str) -> str:
            return fresh_attr_name(gm, hint, taken)

        def stamp(n: torch.fx.Node, rule: str, like: torch.fx.Node) -> torch.fx.Node:
            return stamp_node(n, self.name, rule, like)

        # 1. inline surrogates (and other containers) whose bodies hold quantizers.
        self._inline(gm, record, stamp, fresh)

        # 2. weights: fq(get_attr W) → get_attr W_int → Dequantize.
        def int_weight(w: torch.Tensor, fq: FakeQuant, hint: str, like: torch.fx.Node,
                       rule: str) -> torch.fx.Node:
            p = QParams.of(fq)
            q = fq.quantize_int(w.detach()).to(integer_dtype(fq.bits, bool(fq.signed)))
            bname = fresh(f"{hint}_int")
            gm.register_buffer(bname, q)
            dname = fresh(f"{hint}_dq")
            gm.add_submodule(dname, Dequantize(p))
            g = stamp(graph.get_attr(bname), rule, like)
            d = stamp(graph.call_module(dname, (g,)), rule, like)
            record.rule_hits["weight_int"] += 1
            return d

        def act_qdq(x: Any, fq: FakeQuant, hint: str, like: torch.fx.Node) -> torch.fx.Node:
            p = QParams.of(fq)
            qn, dn = fresh(f"{hint}_q"), fresh(f"{hint}_dq")
            gm.add_submodule(qn, Quantize(p))
            gm.add_submodule(dn, Dequantize(p))
            q = stamp(graph.call_module(qn, (x,)), "act", like)
            d = stamp(graph.call_module(dn, (q,)), "act", like)
            record.rule_hits["act_qdq"] += 1
            return d

        for node in list(graph.nodes):
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            if isinstance(mod, FakeQuant):
                src = node.args[0] if node.args else None
                if not _usable(mod):
                    node.replace_all_uses_with(src)
                    graph.erase_node(node)
                    _refuse(record, node.name, "fake_quant", "quantizer uninitialised or "
                            "disabled: an identity in the fake-quantized module, dropped")
                    continue
                with graph.inserting_before(node):
                    if mod.role == "weight" and isinstance(src, torch.fx.Node) and \
                            src.op == "get_attr":
                        w = _attr(gm, src.target)
                        new = int_weight(w, mod, str(node.target), node, "weight")
                    else:
                        new = act_qdq(src, mod, str(node.target), node)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
            elif isinstance(mod, QuantLayer):
                self._expand_layer(gm, node, mod, record, fresh, stamp, int_weight, act_qdq)

        # 3. BN / per-channel affine right after a per-channel quantized layer → into the scale.
        self._fold_affine(gm, record, fresh)

        for n in graph.nodes:
            if n.meta.get(FROM_PASS_KEY) == self.name:
                n.meta[KIND_META_KEY] = node_kind(n, gm)
        left = [q for n in graph.nodes if n.op == "call_module"
                for q in quantizers(gm.get_submodule(n.target)) if _usable(q)]
        if left:
            record.notes.append(f"{len(left)} quantizer(s) remain inside modules that could not "
                                "be inlined")
        tgt = self.target
        if tgt is not None:
            q = tgt.quant
            record.notes.append(
                f"{tgt.name}: weights {q.weight_granularity} "
                f"{'symmetric' if q.weight_symmetric else 'asymmetric'} integers, activations "
                f"{'symmetric' if q.act_symmetric else 'asymmetric'}"
                f"{', power-of-two scales' if q.power_of_two_scales else ''}; Quantize outputs "
                "float32 tensors holding integers")

    # ------------------------------------------------------------------ pieces
    def _inline(self, gm: torch.fx.GraphModule, record: PassRecord, stamp, fresh) -> None:
        """Splice the traced bodies of modules that hold quantizers into ``gm``'s graph."""
        from archnet_fx.capture import LeafTracer

        graph = gm.graph
        changed = True
        while changed:
            changed = False
            for node in list(graph.nodes):
                if node.op != "call_module":
                    continue
                mod = gm.get_submodule(node.target)
                if isinstance(mod, (FakeQuant, QuantLayer)) or not _contains_quant(mod):
                    continue
                try:
                    body = LeafTracer().trace(mod)
                except Exception as e:  # noqa: BLE001 - reported as a refusal
                    _refuse(record, node.name, "inline", f"body not traceable ({e})")
                    continue
                env: dict[torch.fx.Node, Any] = {}
                phs = [n for n in body.nodes if n.op == "placeholder"]
                args = list(node.args)
                for i, ph in enumerate(phs):
                    if i < len(args):
                        env[ph] = args[i]
                    elif ph.target in node.kwargs:
                        env[ph] = node.kwargs[ph.target]
                    else:
                        env[ph] = ph.args[0] if ph.args else None
                out_val: Any = None
                prefix = f"{node.target}."
                with graph.inserting_before(node):
                    for bn in body.nodes:
                        if bn.op == "placeholder":
                            continue
                        if bn.op == "output":
                            out_val = torch.fx.map_arg(bn.args[0], lambda a: env[a])
                            continue
                        new = graph.node_copy(bn, lambda a: env[a])
                        # Re-home attributes and leaves at fresh top-level names: a path into
                        # the (shared) surrogate would let unused-attribute cleanup edit it.
                        if bn.op == "get_attr":
                            new.target = fresh(prefix + str(bn.target))
                            _register(gm, new.target, _attr(mod, bn.target))
                        elif bn.op == "call_module":
                            new.target = fresh(prefix + str(bn.target))
                            gm.add_submodule(new.target, mod.get_submodule(bn.target))
                        stamp(new, "inline", node)
                        new.meta.pop("tensor_meta", None)
                        env[bn] = new
                node.replace_all_uses_with(out_val)
                graph.erase_node(node)
                record.rule_hits["inline_surrogate"] += 1
                changed = True

    def _expand_layer(self, gm, node, mod, record, fresh, stamp, int_weight, act_qdq) -> None:
        graph = gm.graph
        x = node.args[0] if node.args else node.kwargs.get("input")
        with graph.inserting_before(node):
            if _usable(mod.act_fq):
                x = act_qdq(x, mod.act_fq, f"{node.target}.act_fq", node)
            if _usable(mod.weight_fq):
                w = int_weight(mod.weight, mod.weight_fq, f"{node.target}.weight", node,
                               "layer_weight")
            else:
                wname = fresh(f"{node.target}.weight")
                _register(gm, wname, mod.weight)
                w = stamp(graph.get_attr(wname), "layer_weight", node)
                _refuse(record, node.name, "layer", "weight quantizer uninitialised or "
                        "disabled: float weight kept")
            b = None
            if mod.bias is not None:  # re-homed at the top level (the layer module is shared)
                bname = fresh(f"{node.target}.bias")
                _register(gm, bname, mod.bias)
                b = stamp(graph.get_attr(bname), "layer_bias", node)
            if isinstance(mod, nn.Linear):
                new = graph.call_function(F.linear, (x, w, b))
            else:
                if mod.padding_mode != "zeros":
                    raise NotImplementedError(f"convert: {node.name} uses padding_mode="
                                              f"{mod.padding_mode!r}; only 'zeros' is supported")
                fn = _CONV_FNS[len(mod.kernel_size)]
                new = graph.call_function(fn, (x, w, b, mod.stride, mod.padding, mod.dilation,
                                               mod.groups))
            stamp(new, "layer", node)
        new.meta.update({k: v for k, v in node.meta.items()
                         if k in ("tensor_meta", "val", "archnet.prologue")})
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        record.rule_hits["layer"] += 1

    def _fold_affine(self, gm: torch.fx.GraphModule, record: PassRecord, fresh) -> None:
        """``y = (x ⊛ W_int·s)·a + b'`` = ``x ⊛ W_int·(s·a) + b'``: fold an eval ``BatchNorm``
        module that directly follows a per-channel quantized conv into the conv's dequantize
        scale and bias (exact; integer weights unchanged). Negative ``a`` flips the sign of the
        scale, which DequantizeLinear allows. Anything else stays a float batch_norm (refusal)."""
        graph = gm.graph
        for node in list(graph.nodes):
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            if not isinstance(mod, nn.modules.batchnorm._BatchNorm):
                continue
            prod = node.args[0]
            if mod.training or not mod.track_running_stats or mod.running_var is None:
                _refuse(record, node.name, "fold_bn", "BatchNorm in training mode")
                continue
            ok = (isinstance(prod, torch.fx.Node) and prod.op == "call_function"
                  and prod.target in (F.conv1d, F.conv2d, F.conv3d) and len(prod.users) == 1)
            wdq = prod.args[1] if ok else None
            dq = gm.get_submodule(wdq.target) if isinstance(wdq, torch.fx.Node) and \
                wdq.op == "call_module" else None
            if not isinstance(dq, Dequantize) or dq.axis != 0 or len(wdq.users) != 1:
                _refuse(record, node.name, "fold_bn", "not directly after a per-channel "
                        "quantized conv: kept as a float batch_norm")
                continue
            with torch.no_grad():
                a = mod.running_var.add(mod.eps).rsqrt()
                if mod.weight is not None:
                    a = a * mod.weight
                shift = -mod.running_mean * a
                if mod.bias is not None:
                    shift = shift + mod.bias
                new_dq = Dequantize(QParams(dq.scale * a, dq.zero_point, dq.qmin, dq.qmax,
                                            dq.bits, 0, dq.signed))
                old_b = _attr(gm, prod.args[2].target) if isinstance(prod.args[2], torch.fx.Node) \
                    else torch.zeros_like(a)
                bias = old_b * a + shift
            gm.add_submodule(str(wdq.target), new_dq)  # created by this pass: not shared
            bname = fresh(f"{str(wdq.target)}_bias")
            gm.register_buffer(bname, bias.detach().clone())
            with graph.inserting_before(prod):
                bn_node = graph.get_attr(bname)
            args = list(prod.args)
            args[2] = bn_node
            prod.args = tuple(args)
            node.replace_all_uses_with(prod)
            graph.erase_node(node)
            record.rule_hits["fold_bn_into_scale"] += 1


def _refuse(record: PassRecord, node: str, rule: str, reason: str) -> None:
    from archnet_fx.infra.records import Refusal
    record.refusals.append(Refusal(node, rule, reason))


def _register(gm: nn.Module, name: str, t: Any) -> None:
    """Register tensor ``t`` on ``gm`` under the top-level ``name`` (parameter or buffer)."""
    if isinstance(t, nn.Parameter):
        gm.register_parameter(name, t)
    elif isinstance(t, torch.Tensor):
        gm.register_buffer(name, t)
    else:
        setattr(gm, name, t)


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for p in str(target).split("."):
        obj = getattr(obj, p)
    return obj


def convert(gm: torch.fx.GraphModule, target: str | Target | None = None) -> PassResult:
    """Run :class:`ConvertPass` on a fake-quantized GraphModule (never edited).

    Float BatchNorm of the teacher is normally folded by canonicalization before quantization;
    a BatchNorm that survives right after a per-channel quantized conv is folded into the weight
    scale here (exact), any other stays a float ``batch_norm`` (a refusal says so).
    """
    tgt = load_target(target) if target is not None else None
    return ConvertPass(tgt)(gm)

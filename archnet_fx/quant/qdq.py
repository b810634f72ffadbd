"""Explicit integer quantize / dequantize modules and their ONNX lowering.

:class:`Quantize` computes ``q = round(clamp(x/s, qmin − z, qmax − z)) + z`` (float32 holding integers,
:class:`Dequantize` ``x̂ = (q − z)·s``; :class:`QParams` is their scale, zero point, range, bits
and axis. Under ``torch.onnx.export`` each module lowers through :class:`QuantizeFn` /
:class:`DequantizeFn` to ONNX ``QuantizeLinear`` / ``DequantizeLinear`` with its own scale and
zero point; zero-point types torch cannot emit (INT4, UINT4, UINT16) go out as
``archnet::<op>`` for the exporter to retype. The lowering lives here, beside the modules, so
the exporter imports it and nothing in this layer imports the exporter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from archnet_fx.quant.fakequant import FakeQuant


def integer_dtype(bits: int, signed: bool = True) -> torch.dtype:
    """Storage dtype of a ``bits``-bit integer: int8/uint8 up to 8 bits, int16 (int32 for
    unsigned) up to 16. A symmetric quantizer of an all-positive weight is unsigned
    (``[0, 2^b − 1]``), so the sign matters."""
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    if bits <= 16:
        return torch.int16 if signed else torch.int32
    raise ValueError(f"no integer storage for {bits} bits")


@dataclass(frozen=True)
class QParams:
    """What a Q/DQ pair (or an integer weight) means: ``x ≈ (q − zero_point)·scale``."""
    scale: torch.Tensor          # float32, shape () or (C,)
    zero_point: torch.Tensor     # float32 holding integers, same shape
    qmin: int
    qmax: int
    bits: int
    axis: int | None             # per-channel axis, None per tensor
    signed: bool

    @classmethod
    def of(cls, fq: FakeQuant) -> "QParams":
        per_channel = fq.axis is not None
        s = fq.effective_step().float().clone()
        z = fq.integer_zero_point().float().clone()
        if bool(fq.lossless):
            s, z = torch.ones_like(s), torch.zeros_like(z)
        if not per_channel:
            s, z = s.reshape(()), z.reshape(())
        return cls(s, z, fq.qmin, fq.qmax, fq.bits, fq.axis, bool(fq.signed))


class QDQBase(nn.Module):
    archnet_kind = "identity"   # on chip: requantization folded into the producer / consumer
    archnet_leaf = True
    archnet_qdq = ""            # "quantize" | "dequantize"

    def __init__(self, p: QParams) -> None:
        super().__init__()
        self.register_buffer("scale", p.scale.detach().clone().float())
        self.register_buffer("zero_point", p.zero_point.detach().clone().float())
        self.qmin, self.qmax, self.bits, self.axis, self.signed = (p.qmin, p.qmax, p.bits, p.axis,
                                                                   p.signed)

    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero_point, self.qmin, self.qmax, self.bits, self.axis,
                       self.signed)

    def _shape(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None or t.dim() == 0:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return t.reshape(shape)

    def extra_repr(self) -> str:
        gran = "per_tensor" if self.axis is None else f"per_channel(axis={self.axis}, " \
            f"n={self.scale.numel()})"
        return f"{'int' if self.signed else 'uint'}{self.bits} [{self.qmin}, {self.qmax}], {gran}"


class Quantize(QDQBase):
    """``q = round(clamp(x/s, qmin − z, qmax − z)) + z`` — float32 tensor holding integers.

    The operations and their order are ONNX ``QuantizeLinear``'s as onnxruntime computes it
    (divide by the scale, clamp to the range shifted by the zero point, round half to even, add
    the zero point), so the same float input gives the same integers bit for bit. (Adding the
    zero point *before* rounding, ``round(x/s + z)``, differs when ``x/s + z`` is inexact in
    float32.)"""

    archnet_qdq = "quantize"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return QuantizeFn.apply(x, self)  # defined below; lowers to QuantizeLinear
        s = self._shape(self.scale, x).to(x.dtype)
        z = self._shape(self.zero_point, x).to(x.dtype)
        v = torch.minimum(torch.maximum(x / s, self.qmin - z), self.qmax - z)
        return torch.round(v) + z


class Dequantize(QDQBase):
    """``x̂ = (q − z)·s`` for float or integer ``q``; float32 out."""

    archnet_qdq = "dequantize"

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return DequantizeFn.apply(q, self)  # lowers to DequantizeLinear
        q = q.float() if not q.is_floating_point() else q
        s = self._shape(self.scale, q).to(q.dtype)
        z = self._shape(self.zero_point, q).to(q.dtype)
        return (q - z) * s


# --------------------------------------------------------------------------- Q/DQ symbolics


def _zp_type(bits: int, signed: bool) -> tuple[torch.dtype | None, int]:
    """(torch dtype the exporter can emit, or None; ONNX TensorProto type) of a zero point."""
    from onnx import TensorProto as T

    if bits <= 4:
        return None, (T.INT4 if signed else T.UINT4)
    if bits <= 8:
        return (torch.int8, T.INT8) if signed else (torch.uint8, T.UINT8)
    return (torch.int16, T.INT16) if signed else (None, T.UINT16)


def _qdq_op(g: Any, op: str, x: Any, mod: Any) -> Any:
    """``op`` (QuantizeLinear / DequantizeLinear) with the module's scale and zero point; types
    torch cannot emit (INT4, UINT4, UINT16) go out as ``archnet.<op>`` with an int32 zero point
    and ``zp_type``, fixed up by :func:`_typed_rewrite`."""
    scale = mod.scale.detach().float()
    attrs = {"axis_i": int(mod.axis)} if mod.axis is not None and scale.dim() else {}
    dt, onnx_type = _zp_type(mod.bits, mod.signed)
    s = g.op("Constant", value_t=scale)
    if dt is not None:
        z = g.op("Constant", value_t=mod.zero_point.detach().round().to(dt))
        return g.op(op, x, s, z, **attrs)
    z = g.op("Constant", value_t=mod.zero_point.detach().round().to(torch.int32))
    out = g.op(f"archnet::{op}", x, s, z, zp_type_i=onnx_type, **attrs)
    # A custom op's output has no inferred type: give it the input's shape (the exporter needs
    # it, e.g. for a convolution's kernel), float for DequantizeLinear.
    ty = x.type()
    if op == "DequantizeLinear" and hasattr(ty, "with_dtype"):
        ty = ty.with_dtype(torch.float32)
    out.setType(ty)
    return out


#: Q/DQ modules being exported, by id (autograd.Function symbolics take ints, not modules).
EXPORTING: dict[int, Any] = {}


class QuantizeFn(torch.autograd.Function):
    @staticmethod
    def apply(x, mod):  # noqa: D102
        EXPORTING[id(mod)] = mod
        return _QuantizeImpl.apply(x, id(mod))


class DequantizeFn(torch.autograd.Function):
    @staticmethod
    def apply(q, mod):  # noqa: D102
        EXPORTING[id(mod)] = mod
        return _DequantizeImpl.apply(q, id(mod))


class _QuantizeImpl(torch.autograd.Function):
    # Only traced during export: the value is never used (the reference output is computed
    # outside export mode), and touching the module's buffers here upsets the tracer.
    @staticmethod
    def forward(ctx, x, key):  # noqa: D102
        return x.clone()

    @staticmethod
    def symbolic(g, x, key):  # noqa: D102
        return _qdq_op(g, "QuantizeLinear", x, EXPORTING[key])


class _DequantizeImpl(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, key):  # noqa: D102
        return q.float() if not q.is_floating_point() else q.clone()

    @staticmethod
    def symbolic(g, q, key):  # noqa: D102
        return _qdq_op(g, "DequantizeLinear", q, EXPORTING[key])

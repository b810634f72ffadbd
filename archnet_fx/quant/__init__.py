"""Quantization: learned-step fake quantization for training, conversion to explicit integer
Quantize/Dequantize nodes, and the integer reference executor that checks them.

Data flow inside the layer: :mod:`~archnet_fx.quant.fakequant` (``insert_fake_quant``: LSQ
quantizers on weights and activations, per the target's ``[quant]`` rules) →
:mod:`~archnet_fx.quant.convert` (``convert``: fake quantizers become :mod:`~archnet_fx.quant.qdq`
modules and integer weights) → :mod:`~archnet_fx.quant.intref` (``run_integer``: the same graph
executed in integer arithmetic). The Q/DQ modules also carry their ONNX lowering
(``QuantizeLinear``/``DequantizeLinear``), so the exporter needs nothing private from here.
"""
from archnet_fx.quant.convert import ConvertPass, convert
from archnet_fx.quant.fakequant import FakeQuant, calibrating, fake_quant_enabled, insert_fake_quant
from archnet_fx.quant.qdq import Dequantize, QParams, Quantize

__all__ = ["FakeQuant", "insert_fake_quant", "calibrating", "fake_quant_enabled", "convert",
           "ConvertPass", "Quantize", "Dequantize", "QParams"]

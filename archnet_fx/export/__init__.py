"""Export: the converted integer graph as QDQ ONNX (:mod:`~archnet_fx.export.onnx`), checked
with onnx's checker, an ONNX-level legality scan in the core's op-kind vocabulary, and
onnxruntime against torch; exact CPU-runtime rewrites; written atomically."""

from archnet_fx.export.onnx import ExportReport, export_onnx, ort_session  # noqa: E402

__all__ = ["export_onnx", "ExportReport", "ort_session"]

"""archnet_fx: make trained PyTorch models run on inference chips, fast and below 8 bits.

The public API (design.md §4)::

    import archnet_fx as ax
    gm  = ax.capture(model, example_inputs)      # torch.fx.GraphModule, op kinds in node.meta
    tgt = ax.load_target("npu_a")                # or a path to a .toml; ax.list_targets()
    rep = ax.check(gm, tgt)                      # LegalityReport
    res = ax.canonicalize(gm)                    # PipelineResult: .module, .records, .diff()
    leg = ax.legalize(model, "npu_a", example_inputs, calib_data=batches)   # surrogates
    res = ax.transform(model, "npu_a", example_inputs, calib_data=batches,  # + distillation
                       weight_bits=8, act_bits=8)                          # and fake quant
    ax.estimate_latency(res.module, "npu_a")     # LatencyReport
    ax.export_onnx(res, "model.onnx")            # QDQ ONNX, checked in onnxruntime
"""
from archnet_fx.capture import capture
from archnet_fx.convert import convert
from archnet_fx.errors import (ArchnetError, BitWidthError, CalibrationError, CaptureError,
                               ChoiceError, ExportError, InputError, PipelineError, TargetError,
                               UnsupportedOpError, VerificationError)
from archnet_fx.export import export_onnx
from archnet_fx.legality import LegalityReport, check
from archnet_fx.latency import LatencyReport, estimate_latency, fit_cost_params
from archnet_fx.legalize import LegalizeResult, legalize
from archnet_fx.opkinds import kind_histogram, node_kind
from archnet_fx.passmanager import GraphPass, PassManager, PassRecord, PassResult, PipelineResult
from archnet_fx.pipeline import canonicalize
from archnet_fx.targets import Target, list_targets, load_target
from archnet_fx.transform import TransformReport, TransformResult, transform

__version__ = "0.1.0"

__all__ = [
    "ArchnetError", "BitWidthError", "CalibrationError", "CaptureError", "ChoiceError",
    "GraphPass",
    "InputError", "LegalityReport", "PassManager", "PassRecord", "PassResult", "PipelineError",
    "PipelineResult", "Target", "TargetError", "UnsupportedOpError", "VerificationError",
    "LegalizeResult", "canonicalize", "capture", "check", "kind_histogram", "legalize",
    "list_targets", "load_target", "node_kind",
    "LatencyReport", "estimate_latency", "fit_cost_params",
    "ExportError", "convert", "export_onnx",
    "TransformReport", "TransformResult", "transform",
]

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
import importlib
from typing import Any

from archnet_fx.capture import capture
from archnet_fx.cost.latency import LatencyReport, estimate_latency, fit_cost_params
from archnet_fx.errors import (ArchnetError, BitWidthError, CalibrationError, CaptureError,
                               CheckpointError, ChoiceError, DeviceError, ExportError, InputError,
                               OptionError, PipelineError, TargetError, UnsupportedOpError,
                               VerificationError)
from archnet_fx.export.onnx import export_onnx
from archnet_fx.infra.graphpass import GraphPass
from archnet_fx.infra.manager import PassManager, PipelineResult
from archnet_fx.infra.records import PassRecord, PassResult
from archnet_fx.ir.opkinds import kind_histogram, node_kind
from archnet_fx.legality import LegalityReport, check
from archnet_fx.legalize import LegalizeResult, legalize
from archnet_fx.pipelines import canonicalize
from archnet_fx.quant.convert import convert
from archnet_fx.targets import Target, list_targets, load_target
from archnet_fx.transform import TransformReport, TransformResult, transform

#: The demo modules under their old names (``from archnet_fx import zoo``, ``... import data``).
_MODULES = {"zoo": "archnet_fx.demo.zoo", "data": "archnet_fx.demo.data"}


def __getattr__(name: str) -> Any:
    """The demo modules under their old names (``from archnet_fx import zoo``)."""
    if name in _MODULES:
        value = importlib.import_module(_MODULES[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module 'archnet_fx' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "ArchnetError", "BitWidthError", "CalibrationError", "CaptureError", "ChoiceError",
    "CheckpointError", "DeviceError", "OptionError",
    "GraphPass",
    "InputError", "LegalityReport", "PassManager", "PassRecord", "PassResult", "PipelineError",
    "PipelineResult", "Target", "TargetError", "UnsupportedOpError", "VerificationError",
    "LegalizeResult", "canonicalize", "capture", "check", "kind_histogram", "legalize",
    "list_targets", "load_target", "node_kind",
    "LatencyReport", "estimate_latency", "fit_cost_params",
    "ExportError", "convert", "export_onnx",
    "TransformReport", "TransformResult", "transform",
]

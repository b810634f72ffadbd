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
import sys
import types
from typing import Any

from archnet_fx.errors import (ArchnetError, BitWidthError, CalibrationError, CaptureError,
                               CheckpointError, ChoiceError, DeviceError, ExportError, InputError,
                               OptionError, PipelineError, TargetError, UnsupportedOpError,
                               VerificationError)

#: Public name -> the module that defines it. Imported on first use, so ``import archnet_fx``
#: (and ``archnet-fx --help``) does not pay for torch until something needs it.
_LAZY = {
    "capture": "archnet_fx.capture",
    "LatencyReport": "archnet_fx.cost.latency", "estimate_latency": "archnet_fx.cost.latency",
    "fit_cost_params": "archnet_fx.cost.latency",
    "export_onnx": "archnet_fx.export.onnx",
    "GraphPass": "archnet_fx.infra.graphpass",
    "PassManager": "archnet_fx.infra.manager", "PipelineResult": "archnet_fx.infra.manager",
    "PassRecord": "archnet_fx.infra.records", "PassResult": "archnet_fx.infra.records",
    "kind_histogram": "archnet_fx.ir.opkinds", "node_kind": "archnet_fx.ir.opkinds",
    "LegalityReport": "archnet_fx.legality", "check": "archnet_fx.legality",
    "LegalizeResult": "archnet_fx.legalize", "legalize": "archnet_fx.legalize",
    "canonicalize": "archnet_fx.pipelines",
    "convert": "archnet_fx.quant.convert",
    "Target": "archnet_fx.targets", "list_targets": "archnet_fx.targets",
    "load_target": "archnet_fx.targets",
    "TransformReport": "archnet_fx.transform", "TransformResult": "archnet_fx.transform",
    "transform": "archnet_fx.transform",
    # the demo modules under their old names (``from archnet_fx import zoo``, ``... import data``)
    "zoo": "archnet_fx.demo.zoo", "data": "archnet_fx.demo.data",
}
_MODULES = {"zoo", "data"}


def __getattr__(name: str) -> Any:
    """The public API, imported on first use (see ``_LAZY``)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'archnet_fx' has no attribute {name!r}")
    mod = importlib.import_module(_LAZY[name])
    value = mod if name in _MODULES else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``archnet_fx.capture``/``.transform``/``.legalize`` the functions: importing the
    submodule of the same name would otherwise bind the module over the lazy function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == f"archnet_fx.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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

"""Named pipelines: every straight-line pass list the library runs, in one module.

Each function returns the list a :class:`~archnet_fx.infra.manager.PassManager` runs under the
pipeline's name; entry points (``canonicalize``, ``legalize``, ``transform``, ``export_onnx``)
only choose which list to run. Read top to bottom, this module is the data flow:

==================  ===============================================================  ==========
pipeline            passes                                                           exact
==================  ===============================================================  ==========
``canonicalize``    drop_identity, index_to_view, fold_constants, fold_batchnorm,    yes
                    div_to_mul, decompose_sdpa, dce
``legalize[t]``     one surrogate pass per family in :data:`FAMILIES` order, then    no
                    kernel and channel tiling
``host_fallback``   mark what no candidate could legalize (``allow_host_fallback``)   yes
``quantize``        fake_quant (LSQ quantizers at the target's bit widths)           yes
``convert``         convert (fake quantizers → integer Q/DQ, integer weights)        yes
==================  ===============================================================  ==========

The surrogate family order is the literal :data:`FAMILIES`: embeddings first (their one-hot
inputs feed the rest), norms before softmax (a hand-written norm's chain contains divisions and
square roots the elementwise family would otherwise take one by one), the elementwise family
last (what the others left: div, exp, pow, products of activations, reductions, layout).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from archnet_fx.capture import capture
from archnet_fx.errors import InputError
from archnet_fx.infra.graphpass import GraphPass
from archnet_fx.infra.manager import PassManager, PipelineResult
from archnet_fx.ir.meta import CAPTURE_META_KEY
from archnet_fx.surrogate.base import Candidate
from archnet_fx.surrogate.driver import LegalizeOptions, MarkHostFallback, SurrogatePass
from archnet_fx.surrogate.observe import Ranges
from archnet_fx.targets import Target

#: The surrogate families (``archnet_fx.passes.<name>``), in the order legalization runs them.
FAMILIES = ("embedding", "layernorm", "softmax", "activations", "elementwise")


def canonicalize_passes() -> list[GraphPass]:
    """Exact simplifications (see :mod:`archnet_fx.passes.canonicalize`)."""
    from archnet_fx.passes.canonicalize import canonicalize_passes as passes

    return passes()


def surrogate_families() -> list[tuple[str, Sequence[Candidate]]]:
    """``(family, candidates)`` for every family of :data:`FAMILIES`, in order."""
    import importlib

    return [(name, importlib.import_module(f"archnet_fx.passes.{name}").CANDIDATES)
            for name in FAMILIES]


def legalize_passes(target: Target, ranges: Ranges, options: LegalizeOptions
                    ) -> list[GraphPass]:
    """One :class:`SurrogatePass` per family, then the structural tiling passes (kernel
    tiling first: its 1×1 / tile convs may then need a channel split)."""
    from archnet_fx.passes.tiling import tiling_passes

    return [SurrogatePass(name, cands, target, ranges, options)
            for name, cands in surrogate_families()] + tiling_passes(target)


def host_fallback_passes(target: Target) -> list[GraphPass]:
    return [MarkHostFallback(target)]


def quantize_passes(target: Target, weight_bits: int, act_bits: int, **options: Any
                    ) -> list[GraphPass]:
    """Fake quantization (:class:`~archnet_fx.quant.fakequant.FakeQuantPass`); bit widths
    already checked against the target."""
    from archnet_fx.quant.fakequant import FakeQuantPass

    return [FakeQuantPass(target, weight_bits, act_bits, **options)]


def convert_passes(target: Target | None) -> list[GraphPass]:
    """Fake quantizers → integer Q/DQ (:class:`~archnet_fx.quant.convert.ConvertPass`)."""
    from archnet_fx.quant.convert import ConvertPass

    return [ConvertPass(target)]


def as_graph_module(model: torch.nn.Module, example_inputs: Any,
                    max_seq_len: int | str | None = None) -> torch.fx.GraphModule:
    """``model`` if it is already a captured GraphModule, else ``capture(model, example_inputs,
    max_seq_len=max_seq_len)``."""
    if isinstance(model, torch.fx.GraphModule) and CAPTURE_META_KEY in model.meta:
        return model
    if example_inputs is None:
        raise InputError(f"{type(model).__name__} is not captured yet and no example_inputs were "
                         "given: pass example_inputs=(tensor, ...) or a dict of keyword tensors")
    return capture(model, example_inputs, max_seq_len=max_seq_len)


def canonicalize(model: torch.nn.Module, example_inputs: Any = None, *, verify: bool = True
                 ) -> PipelineResult:
    """Capture (if given an ``nn.Module``) and run the ``canonicalize`` pipeline, verifying
    each pass numerically."""
    gm = as_graph_module(model, example_inputs)
    return PassManager("canonicalize", canonicalize_passes(), verify=verify).run(gm)

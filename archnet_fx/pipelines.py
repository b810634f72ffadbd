"""Named pipelines: the straight-line pass lists the public API runs.

``canonicalize(model_or_gm, example_inputs=None, verify=True)`` captures when given an
``nn.Module`` and runs :func:`archnet_fx.passes.canonicalize.canonicalize_passes` with numerical
verification after each pass.
"""
from __future__ import annotations

from typing import Any

import torch

from archnet_fx.ir.meta import CAPTURE_META_KEY
from archnet_fx.capture import capture
from archnet_fx.errors import InputError
from archnet_fx.infra.manager import PassManager, PipelineResult


def as_graph_module(model: torch.nn.Module, example_inputs: Any) -> torch.fx.GraphModule:
    """``model`` if it is already a captured GraphModule, else ``capture(model, example_inputs)``."""
    if isinstance(model, torch.fx.GraphModule) and CAPTURE_META_KEY in model.meta:
        return model
    if example_inputs is None:
        raise InputError(f"{type(model).__name__} is not captured yet and no example_inputs were "
                         "given: pass example_inputs=(tensor, ...) or a dict of keyword tensors")
    return capture(model, example_inputs)


def canonicalize(model: torch.nn.Module, example_inputs: Any = None, *, verify: bool = True
                 ) -> PipelineResult:
    from archnet_fx.passes.canonicalize import canonicalize_passes

    gm = as_graph_module(model, example_inputs)
    return PassManager("canonicalize", canonicalize_passes(), verify=verify).run(gm)

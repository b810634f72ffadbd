"""Small calibrated fake-quantized models shared by tests/test_convert.py and test_export.py."""
from __future__ import annotations

import copy
import functools

import torch

from archnet_fx.demo import zoo
from archnet_fx.legalize import legalize
from archnet_fx.quant.fakequant import calibrating, insert_fake_quant


def call(m, ex):
    return m(**ex) if isinstance(ex, dict) else m(*ex)


@functools.lru_cache(maxsize=None)
def fake_quant(name: str, target: str = "npu_a", weight_bits: int | None = None,
               act_bits: int | None = None):
    """(legalized + fake-quantized + calibrated GraphModule, example inputs (batch 4))."""
    torch.manual_seed(0)
    model, ex = zoo.get_model(name, batch_size=4)
    leg = legalize(model, target, ex, [ex], verify=False)
    gm = insert_fake_quant(copy.deepcopy(leg.module), target, weight_bits, act_bits).module
    with torch.no_grad(), calibrating(gm):
        call(gm, ex)
    return gm, ex

"""``convert`` (archnet_fx/quant/convert.py) and the integer reference (archnet_fx/quant/intref.py).

Tolerances: the converted float path reproduces the fake-quantized module to 1e-5·max|y| (the
STE's ``(round(v) − v) + v`` differs from ``round(v)`` by an ulp); the integer reference differs
from the float path by at most one step at every Q node when fed the float path's inputs.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from archnet_fx.quant.convert import convert, qdq_counts, qdq_nodes
from archnet_fx.quant.intref import compare_integer, fixed_point_multiplier, run_integer
from archnet_fx.ir.meta import FROM_PASS_KEY
from archnet_fx.quant.fakequant import FakeQuant, calibrating, insert_fake_quant, quantizers
from archnet_fx.targets import load_target
from qdq_models import call, fake_quant

pytestmark = pytest.mark.usefixtures("one_thread")


def _close(a, b, rtol=1e-5):
    for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b)):
        assert (x - y).abs().max() <= rtol * max(1.0, float(x.abs().max()))


# golden Q/DQ counts per (model, target): one Q/DQ pair per quantized activation producer, one
# integer weight per conv/linear (bert_tiny: 13 linears + 2 one-hot embedding linears, and
# the two activation × activation matmuls of each of its 2 layers quantize both operands).
GOLDEN = {
    ("mlp", "npu_a"): {"quantize": 3, "dequantize_act": 3, "dequantize_weight": 3},
    ("cnn", "npu_b"): {"quantize": 3, "dequantize_act": 3, "dequantize_weight": 3},
    ("mlp", "dsp_c"): {"quantize": 3, "dequantize_act": 3, "dequantize_weight": 3},
    ("bert_tiny", "npu_a"): {"quantize": 19, "dequantize_act": 19, "dequantize_weight": 15},
}


@pytest.mark.parametrize("name,target", list(GOLDEN))
def test_qdq_placement_and_numerics(name, target):
    if name == "bert_tiny":
        pytest.importorskip("transformers")
    gm, ex = fake_quant(name, target)
    with torch.no_grad():
        ref = call(gm, ex)
    res = convert(gm, target)
    conv = res.module
    assert qdq_counts(conv) == GOLDEN[(name, target)]
    assert res.modified and res.record.rule_hits["act_qdq"] == GOLDEN[(name, target)]["quantize"]
    assert res.record.rule_hits["weight_int"] == GOLDEN[(name, target)]["dequantize_weight"]
    # no fake quantizer is left on the path, and every Q/DQ node says where it came from
    assert not [n for n in conv.graph.nodes if n.op == "call_module"
                and any(isinstance(m, FakeQuant) for m in conv.get_submodule(n.target).modules())]
    for n in qdq_nodes(conv)["quantize"]:
        assert n.meta[FROM_PASS_KEY] == "convert" and n.name in res.record.created
    with torch.no_grad():
        _close(ref, call(conv, ex))
        _close(ref, call(gm, ex))  # the input module is untouched and still fake-quantizes
    assert quantizers(gm)


def test_weights_are_integers_in_range_int4():
    gm, ex = fake_quant("mlp", "npu_a", 4)
    conv = convert(gm, "npu_a").module
    ws = [n for n in qdq_nodes(conv)["dequantize"] if n.args[0].op == "get_attr"]
    assert len(ws) == 3
    for n in ws:
        w = getattr(conv, n.args[0].target)
        dq = conv.get_submodule(n.target)
        assert w.dtype == torch.int8 and int(w.min()) >= -8 and int(w.max()) <= 7
        assert (dq.qmin, dq.qmax, dq.bits) == (-8, 7, 4)
        assert dq.axis == 0 and dq.scale.numel() == w.shape[0]  # per channel on npu_a
        assert int(w.max()) == 7 or int(w.min()) == -8           # the range is used


def test_unsigned_weight_stored_unsigned():
    # a symmetric quantizer of an all-positive weight uses [0, 255]: it must not wrap in int8
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.uniform_(0.1, 1.0)
    fq = insert_fake_quant(torch.fx.symbolic_trace(nn.Sequential(lin)), "npu_a").module
    x = torch.randn(8, 4)
    with torch.no_grad(), calibrating(fq):
        fq(x)
    conv = convert(fq, "npu_a").module
    (w,) = [getattr(conv, n.args[0].target) for n in qdq_nodes(conv)["dequantize"]
            if n.args[0].op == "get_attr"]
    assert w.dtype == torch.uint8 and int(w.max()) > 127
    with torch.no_grad():
        _close(fq(x), conv(x))


def test_power_of_two_scales_on_npu_b():
    gm, ex = fake_quant("cnn", "npu_b")
    conv = convert(gm, "npu_b").module
    mods = [conv.get_submodule(n.target) for ns in qdq_nodes(conv).values() for n in ns]
    assert mods
    for m in mods:
        e = torch.log2(m.scale)
        assert torch.equal(e, torch.round(e)), m
        assert m.axis is None  # per-tensor weights on npu_b
        assert float(m.zero_point.abs().max()) == 0  # symmetric


def test_int16_activations_on_dsp_c():
    gm, ex = fake_quant("mlp", "dsp_c")
    conv = convert(gm, "dsp_c").module
    qs = [conv.get_submodule(n.target) for n in qdq_nodes(conv)["quantize"]]
    assert qs and all(q.bits == 16 for q in qs)
    assert all(q.qmax in (32767, 65535) for q in qs)


def test_no_quantizers_no_change_and_idempotent():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert not convert(gm, "npu_a").modified          # nothing to convert
    fq, _ = fake_quant("mlp", "npu_a")
    once = convert(fq, "npu_a").module
    twice = convert(once, "npu_a")
    assert not twice.modified


def test_uninitialised_quantizer_dropped_with_refusal():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    fq = insert_fake_quant(gm, "npu_a").module         # never calibrated: identities
    res = convert(fq, "npu_a")
    assert qdq_counts(res.module)["quantize"] == 0
    assert res.record.refusals and "uninitialised" in res.record.refusals[0].reason
    x = torch.randn(3, 4)
    assert torch.allclose(res.module(x), gm(x))


def test_batchnorm_after_quantized_conv_folds_into_scale():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.ReLU()))
    fq = insert_fake_quant(gm, "npu_a").module
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), calibrating(fq):
        fq(x)
    res = convert(fq, "npu_a")
    assert res.record.rule_hits["fold_bn_into_scale"] == 1
    assert not any(isinstance(res.module.get_submodule(n.target), nn.BatchNorm2d)
                   for n in res.module.graph.nodes if n.op == "call_module")
    with torch.no_grad():
        _close(fq(x), res.module(x))


# --------------------------------------------------------------------------- integer reference


@pytest.mark.parametrize("name,target", [("mlp", "npu_a"), ("cnn", "npu_b"), ("mlp", "dsp_c"),
                                         ("bert_tiny", "npu_a")])
def test_integer_reference_within_one_step(name, target):
    if name == "bert_tiny":
        pytest.importorskip("transformers")
    gm, ex = fake_quant(name, target)
    local = compare_integer(gm, ex, target, local=True)
    assert local.report.integer_nodes                 # linear/conv/matmul ran in integers
    assert local.max_step_diff <= 1
    assert local.frac_diff < 0.01
    prop = compare_integer(gm, ex, target)            # differences propagated end to end
    assert prop.max_step_diff <= 2
    for r in prop.outputs:
        assert r["max_rel_diff"] < 0.05
    assert "integer reference" in prop.table()
    assert not prop.report.overflow


def test_requantization_and_overflow_report():
    gm, ex = fake_quant("cnn", "npu_b")
    out, rep = run_integer(gm, ex, "npu_b")
    assert rep.requantized                              # conv → relu → Q as a shift
    tiny = dataclasses.replace(load_target("npu_b"), name="tiny_acc",
                               quant=dataclasses.replace(load_target("npu_b").quant,
                                                         accumulator_bits=8))
    _, rep8 = run_integer(gm, ex, tiny)
    assert rep8.overflow and rep8.accumulator_bits == 8


def test_fixed_point_multiplier():
    m = torch.tensor([0.3, 1e-4, 0.5, 2.0 ** -7, 0.999999])
    m0, shift = fixed_point_multiplier(m)
    assert ((m0 >= 2 ** 30) & (m0 < 2 ** 31)).all()
    back = m0.double() * torch.pow(2.0, -shift.double())
    assert torch.allclose(back, m.double(), rtol=2 ** -30)
    p2 = fixed_point_multiplier(torch.tensor([2.0 ** -5]))[0]
    assert int(p2) == 2 ** 30                            # power of two: a pure shift

"""LSQ fake quantization (archnet_fx/quant/fakequant.py): the quantizer's maths and the fake_quant pass.

Tolerances: quantized values must sit on the integer grid to 1e-4 of a step (float rounding of
``x / s``); a pass that only inserts (uncalibrated, pass-through) quantizers is exact (0).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import archnet_fx as ax
from archnet_fx.quant.fakequant import (FakeQuant, QuantConv2d, QuantLinear, calibrating,
                                        disable_fake_quant, enable_fake_quant, fake_quant_enabled,
                                        insert_fake_quant, quantizers)
from passtest import assert_idempotent, assert_pass, captured_zoo, run_pass


def _calibrated(fq: FakeQuant, x: torch.Tensor) -> FakeQuant:
    with calibrating(fq):
        fq(x)
    return fq


def _on_grid(fq: FakeQuant, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The integers q with y = (q - z) s, checked to lie on the grid."""
    s = fq.effective_step().detach()
    z = fq.integer_zero_point()
    if fq.axis is not None:
        shape = [1] * x.dim()
        shape[fq.axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    q = y.detach() / s + z
    assert torch.allclose(q, q.round(), atol=1e-4), "values off the integer grid"
    return q.round()


# --------------------------------------------------------------------------- quantizer maths


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric,data,lo,hi", [
    (True, "signed", lambda b: -(2 ** (b - 1)), lambda b: 2 ** (b - 1) - 1),
    (True, "relu", lambda b: 0, lambda b: 2 ** b - 1),          # unsigned range after ReLU
    (False, "signed", lambda b: 0, lambda b: 2 ** b - 1),       # zero point
])
def test_values_on_grid_and_in_range(bits, symmetric, data, lo, hi):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g) * 3
    if data == "relu":
        x = x.relu()
    fq = _calibrated(FakeQuant(bits, symmetric=symmetric), x)
    assert (fq.qmin, fq.qmax) == (lo(bits), hi(bits))
    y = fq(x * 1.5)  # also values beyond the calibrated range: clamped
    q = _on_grid(fq, y, x)
    assert q.min() >= lo(bits) and q.max() <= hi(bits)
    assert len(torch.unique(q)) <= 2 ** bits
    # quantization error of in-range values is at most half a step
    inside = fq(x)
    s = float(fq.effective_step())
    in_range = (x / s + fq.integer_zero_point() >= lo(bits)) & \
               (x / s + fq.integer_zero_point() <= hi(bits))
    assert ((inside - x).abs()[in_range] <= s / 2 + 1e-5).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_weight_steps(bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 10, generator=g) * torch.tensor([0.01, 0.1, 1, 10, 100, 1000])[:, None]
    fq = _calibrated(FakeQuant(bits, symmetric=True, axis=0, channels=6, role="weight"), w)
    assert fq.step.shape == (6,)
    steps = fq.effective_step().detach()
    # steps follow the channels' scales (a per-tensor step would crush the small channels)
    assert torch.all(steps[1:] > steps[:-1])
    y = fq(w)
    q = _on_grid(fq, y, w)
    assert q.abs().max() <= 2 ** (bits - 1)
    rel = ((y - w).norm(dim=1) / w.norm(dim=1))
    assert rel.max() < (0.2 if bits == 4 else 0.02)
    # conv-shaped weights, axis 0
    wc = torch.randn(4, 3, 3, 3, generator=g)
    fqc = _calibrated(FakeQuant(bits, axis=0, channels=4, role="weight"), wc)
    assert fqc(wc).shape == wc.shape
    _on_grid(fqc, fqc(wc), wc)


def test_power_of_two_steps():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, generator=g) * 0.37
    fq = _calibrated(FakeQuant(8, symmetric=True, pow2=True), x)
    with torch.no_grad():
        fq.step.mul_(1.3)  # any learned value still rounds to a power of two
    e = math.log2(float(fq.effective_step()))
    assert e == round(e)
    _on_grid(fq, fq(x), x)
    w = torch.randn(5, 7, generator=g)
    fqw = _calibrated(FakeQuant(4, axis=0, channels=5, pow2=True, role="weight"), w)
    logs = torch.log2(fqw.effective_step().detach())
    assert torch.equal(logs, logs.round())
    # the step still learns: a gradient reaches it through the STE on log2
    fqw(w).pow(2).sum().backward()
    assert fqw.step.grad is not None and fqw.step.grad.abs().sum() > 0


def test_lsq_gradients():
    """∂x̂/∂s = (round(x/s) − x/s)·g inside the range, qmax·g above; ∂x̂/∂x = 1 inside, 0 out."""
    fq = FakeQuant(4, symmetric=True)
    with torch.no_grad():
        fq.step.fill_(0.5)
        fq.initialized.fill_(True)
        fq.signed.fill_(True)
    x = torch.tensor([0.3, 1.1, 100.0], requires_grad=True)
    y = fq(x)
    assert torch.allclose(y.detach(), torch.tensor([0.5, 1.0, 3.5]))
    y.sum().backward()
    g = 1.0 / math.sqrt(3 * 7)
    want = ((round(0.6) - 0.6) + (round(2.2) - 2.2) + 7) * g
    assert fq.step.grad.item() == pytest.approx(want, rel=1e-5)
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))


def test_asymmetric_zero_point_learns():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(512, generator=g) * 4 - 0.5  # mostly positive, some negative
    fq = _calibrated(FakeQuant(8, symmetric=False), x)
    assert 0 < float(fq.integer_zero_point()) < 255
    fq(x).pow(2).sum().backward()
    assert fq.zero_point.grad is not None and fq.step.grad is not None


def test_pass_through_until_calibrated_and_toggles():
    x = torch.randn(16, 8)
    fq = FakeQuant(4, symmetric=True)
    assert torch.equal(fq(x), x)                 # uninitialised: pass-through
    with calibrating(fq) as qs:
        assert qs == [fq]
        assert torch.equal(fq(x), x)             # observing: pass-through
    assert bool(fq.initialized)
    assert not torch.equal(fq(x), x)
    with fake_quant_enabled(fq, False):
        assert torch.equal(fq(x), x)
    assert fq.enabled
    disable_fake_quant(fq)
    assert torch.equal(fq(x), x)
    enable_fake_quant(fq)
    assert not torch.equal(fq(x), x)


def test_integer_activations_are_lossless():
    onehot = torch.nn.functional.one_hot(torch.tensor([3, 0, 7]), 10).float()
    fq = _calibrated(FakeQuant(8, symmetric=False), onehot)
    assert bool(fq.lossless) and "lossless" in repr(fq)
    assert fq(onehot) is onehot
    assert float(fq.effective_step()) == 1.0
    # not integers, or integers beyond the range: a real quantizer
    assert not bool(_calibrated(FakeQuant(8, symmetric=False), onehot * 0.5).lossless)
    assert not bool(_calibrated(FakeQuant(4, symmetric=False), onehot * 100).lossless)


def test_bad_quantizer_arguments():
    with pytest.raises(ValueError, match="bits"):
        FakeQuant(1)
    with pytest.raises(ValueError, match="role"):
        FakeQuant(8, role="bias")


# --------------------------------------------------------------------------- the pass


def test_pass_module_form_mlp():
    model, ex, gm = captured_zoo("mlp")
    before, res = run_pass(_fq_pass("npu_a", 4, 8), gm)
    # QuantLinear is a Linear: the op-kind histogram is unchanged; uncalibrated = exact.
    assert_pass(res, before, fired={"weight_module": 3}, hist=ax.kind_histogram(gm),
                atol=0.0, rtol=0.0)
    q = quantizers(res.module)
    assert len(q) == 6 and sum(f.role == "weight" for f in q) == 3
    lin = [m for m in res.module.modules() if isinstance(m, QuantLinear)]
    assert len(lin) == 3 and all(m.weight_fq.bits == 4 and m.act_fq.bits == 8 for m in lin)
    assert all(m.weight_fq.axis == 0 and m.weight_fq.step.numel() == m.out_features for m in lin)
    assert_idempotent(_fq_pass("npu_a", 4, 8), res)
    # calibrated, W4A8 changes the output a little
    args, kwargs = gm.meta["archnet.example"]
    with calibrating(res.module):
        res.module(*args)
    with torch.no_grad():
        ref, out = gm(*args), res.module(*args)
    err = float((out - ref).norm() / ref.norm())
    assert 0 < err < 0.3
    # legality is unchanged (the captured mlp still has its dropout)
    assert ax.check(res.module, "npu_a").unsupported_counts == \
        ax.check(gm, "npu_a").unsupported_counts


def test_pass_conv_and_target_rules():
    model, ex, gm = captured_zoo("cnn")
    res = insert_fake_quant(gm, "npu_b")  # per-tensor, symmetric, power-of-two
    convs = [m for m in res.module.modules() if isinstance(m, QuantConv2d)]
    assert convs and all(m.weight_fq.axis is None and m.weight_fq.pow2 for m in convs)
    assert all(m.act_fq.symmetric for m in convs)
    res_a = insert_fake_quant(gm, "npu_a")
    convs_a = [m for m in res_a.module.modules() if isinstance(m, QuantConv2d)]
    assert all(m.weight_fq.axis == 0 and not m.act_fq.symmetric for m in convs_a)
    assert "fake_quant" == res.record.name and res.record.notes


def test_pass_functional_and_surrogates_bert_tiny():
    """ATen linear/matmul get FakeQuant nodes; Linear layers inside surrogates are wrapped."""
    from passtest import legalized  # shared, never modified
    leg = legalized("bert_tiny")
    before, res = run_pass(_fq_pass("npu_a", 8, 8, "all"), leg.module)
    rec = res.record
    hits = dict(rec.rule_hits)
    assert hits["weight_functional"] == 13        # 12 encoder linears + pooler
    # per layer: LN out (shared by q/k/v), attention out, LN out, GELU out, and both operands
    # of the two matmuls; plus the pooler's input
    assert hits["act"] == 2 * (4 + 4) + 1
    assert hits["surrogate_layer"] > 0
    # exact up to float rounding: an unwrapped PWL evaluates by intervals (archnet_fx.surrogate.hinge),
    # a wrapped one (pass-through quantizers until calibrated) as its hinge layers
    assert_pass(res, before, fired=None, hist=None, atol=1e-5, rtol=1e-5)
    assert res.record.kinds_after["identity"] - res.record.kinds_before["identity"] == \
        hits["weight_functional"] + hits["act"]
    # one quantizer per producer, right before its first quantized consumer
    for n in res.module.graph.nodes:
        if n.op == "call_module" and n.target.startswith("fq_a_"):
            assert len([u for u in n.args[0].users if u.target == n.target]) == 1
    assert ax.check(res.module, "npu_a").ok
    assert_idempotent(_fq_pass("npu_a", 8, 8, "all"), res)
    # default: emulation bodies stay float, the embedding's one-hot × table (exact) is quantized
    default = insert_fake_quant(leg.module, "npu_a")
    assert default.record.rule_hits["surrogate_layer"] == 2  # word + token type tables
    plain = insert_fake_quant(leg.module, "npu_a", quantize_surrogates=False)
    assert "surrogate_layer" not in plain.record.rule_hits
    with pytest.raises(ValueError, match="quantize_surrogates"):
        insert_fake_quant(leg.module, "npu_a", quantize_surrogates="some")


@pytest.mark.parametrize("target,w,a", [("npu_a", 2, 8), ("npu_a", 8, 4), ("npu_b", 4, 8)])
def test_bad_bits(target, w, a):
    _, ex, gm = captured_zoo("mlp")
    with pytest.raises(ax.BitWidthError, match=target):
        insert_fake_quant(gm, target, w, a)


def _fq_pass(target, w, a, surrogates="structural"):
    from archnet_fx.quant.fakequant import FakeQuantPass
    return FakeQuantPass(ax.load_target(target), w, a, quantize_surrogates=surrogates)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fused_lsq_matches_autograd_composition(symmetric):
    """The fused _LSQ node gives the values and STE gradients of the plain composition."""
    from archnet_fx.quant.fakequant import _LSQ, _round_ste

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 16, generator=g) * 3).requires_grad_()
    s = (torch.rand(1, 8, 1, generator=g) * 0.1 + 0.02).requires_grad_()
    z = None if symmetric else torch.randint(0, 255, (1, 8, 1), generator=g).float()
    if z is not None:
        z.requires_grad_()
    qmin, qmax = (-128, 127) if symmetric else (0, 255)
    weights = torch.randn(4, 8, 16, generator=g)

    def composed(x, s, z, qmin, qmax):
        q = _round_ste(torch.clamp(x / s + (0 if z is None else z), qmin, qmax))
        return (q - (0 if z is None else z)) * s

    results = []
    for f in (composed, _LSQ.apply):
        leaves = [t for t in (x, s, z) if t is not None]
        for t in leaves:
            t.grad = None
        y = f(x, s, z, qmin, qmax)
        (y * weights).sum().backward()
        results.append([y.detach()] + [t.grad.clone() for t in leaves])
    assert (results[0][0] - results[0][0].round()).abs().max() > 0  # x really is clipped/rounded
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4)


def test_single_hinge_relu_form_is_a_float_epilogue():
    """A one-hinge ReLU form (GELU → c·relu(w·x − b) + a) is scalar multiply-adds, not MACs:
    its Linear(1, 1) layers get no quantizers, so the FFN's hidden tensor is quantized once (at
    the second linear's input), not three times; the two real linears are still quantized."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(16, 8)
    leg = ax.legalize(m, "npu_a", (x,), verify=False, choices={"gelu": "relu_form"})
    res = insert_fake_quant(leg.module, "npu_a")
    hits = res.record.rule_hits
    assert hits["surrogate_scalar_affine_float"] == 2            # inner and outer hinge layers
    assert "surrogate_layer" not in hits
    layers = [m for m in res.module.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 and all(m.in_features in (8, 32) for m in layers)
    assert hits["act"] == 0 and hits["weight_module"] == 2       # module linears: own act fq
    hinge = [m for m in res.module.modules() if type(m) is nn.Linear]
    assert len(hinge) == 2 and all(m.in_features == m.out_features == 1 for m in hinge)
    with calibrating(res.module):
        res.module(x)
    assert len(quantizers(res.module)) == 4                      # 2 weights + 2 inputs
    # a K-hinge structural form (hard tanh: two hinges) keeps quantized hinge layers
    m2 = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 8))
    leg2 = ax.legalize(m2, "npu_a", (x,), verify=False, choices={"tanh": "relu_form"})
    res2 = insert_fake_quant(leg2.module, "npu_a")
    assert res2.record.rule_hits["surrogate_layer"] == 2
    assert "surrogate_scalar_affine_float" not in res2.record.rule_hits

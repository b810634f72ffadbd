"""Pointwise activation surrogates (passes/activations.py).

Bounds: the ``pwl`` emulation (32 knots) stays within 1e-2 × max|f| of the original over
[−12, 12] (the data's range and the function's saturation; measured: tanh 5.4e-3, erf 6.6e-3,
the rest below); ``relu_exact`` is exact (1e-6);
``relu_form`` is the coarse Arch-Net start (GELU → ReLU: ≤ 0.2 absolute on [−4, 4]);
``hard_gate`` (x·clamp(a·x + b, 0, 1)) at most 0.7 × ReLU's max error on [−6, 6];
``poly_gate`` (an odd degree-7 gate) within 6e-3 of GELU (measured 4.8e-3) and 0.04 of SiLU
(measured 0.033) on [−12, 12].
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import archnet_fx as ax
from passtest import assert_idempotent, assert_pass, run_family
from archnet_fx.passes.activations import (HardGate, PointwiseSurrogate, PolyGate,
                                          hard_gate_init, poly_gate_init)
from surrogate_check import assert_body_legal, assert_grads_flow, call, forms, surrogates

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {  # kind: (module form, functional form)
    "gelu": (nn.GELU(), lambda x: F.gelu(x)),
    "gelu_tanh": (nn.GELU(approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    "silu": (nn.SiLU(), F.silu),
    "sigmoid": (nn.Sigmoid(), torch.sigmoid),
    "tanh": (nn.Tanh(), torch.tanh),
    "hardswish": (nn.Hardswish(), F.hardswish),
    "elu": (nn.ELU(), F.elu),
    "softplus": (nn.Softplus(), F.softplus),
    "mish": (nn.Mish(), F.mish),
    "erf": (None, torch.erf),
}


class Wrap(nn.Module):
    """Linear → activation → linear, so the activation sits between on-chip ops."""

    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)
        self.act = act

    def forward(self, x):
        return self.b(self.act(self.a(x)))


class WrapFn(Wrap):
    def __init__(self, fn):
        super().__init__(nn.Identity())
        self.fn = fn

    def forward(self, x):
        return self.b(self.fn(self.a(x)))


def _x(n=64):
    return (torch.randn(n, 16, generator=torch.Generator().manual_seed(1)) * 3,)


def _models(kind):
    mod, fn = CASES[kind]
    return (Wrap(mod) if mod is not None else WrapFn(fn)), WrapFn(fn)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("target", ["npu_a", "npu_b"])
def test_pwl_is_close_legal_and_trainable(kind, target):
    m, _ = _models(kind)
    ex = _x()
    res = ax.legalize(m, target, ex, verify=False)
    assert res.after.fully_on_chip
    subs = [s for s in surrogates(res.module) if isinstance(s, PointwiseSurrogate)]
    assert len(subs) == 1 and subs[0].candidate == "pwl"
    assert_body_legal(subs[0], target)
    # error of the surrogate alone vs the exact function on (and a bit past) the data's range
    fn = CASES[kind][1]
    x = torch.linspace(-12, 12, 20001)
    with torch.no_grad():
        err = (subs[0](x) - fn(x)).abs().max()
    scale = fn(x).abs().max()
    assert err <= 1e-2 * scale, f"{kind}: max error {float(err):.3g} vs scale {float(scale):.3g}"
    assert_grads_flow(res.module, ex)


@pytest.mark.parametrize("form", ["module", "functional", "aten"])
def test_fires_on_every_form(form):
    m, f = _models("gelu")
    gm = forms(m, f, _x())[form]
    res = ax.legalize(gm, "npu_a", verify=False)
    assert res.after.fully_on_chip
    assert list(res.choices.values()) == ["pwl"]
    assert ax.check(gm, "npu_a").unsupported_counts["gelu"] == 1


def test_does_not_fire_where_native():
    m, _ = _models("gelu")
    res = ax.legalize(m, "dsp_c", _x(), verify=False)   # GELU is a lookup table on the DSP
    assert not res.choices
    assert not surrogates(res.module)


def test_structural_relu_form_is_the_hard_counterpart():
    m, _ = _models("gelu")
    res = ax.legalize(m, "npu_a", _x(), verify=False, choices={"gelu": "relu_form"})
    (s,) = surrogates(res.module)
    assert s.candidate == "relu_form" and s.style == "structural"
    assert_body_legal(s, "npu_a")
    x = torch.linspace(-4, 4, 1001)
    with torch.no_grad():
        assert torch.allclose(s(x), torch.relu(x), atol=1e-6)
        assert float((s(x) - F.gelu(x)).abs().max()) <= 0.2
    assert_grads_flow(res.module, _x())


def _gated(kind, target, cand):
    """(legalize result, example, the one surrogate) of ``kind`` legalized with ``cand``,
    checked fully on chip and legal."""
    m, _ = _models(kind)
    ex = _x()
    res = ax.legalize(m, target, ex, verify=False, choices={kind: cand})
    assert res.after.fully_on_chip and list(res.choices.values()) == [cand]
    (s,) = surrogates(res.module)
    assert_body_legal(s, target)
    return res, ex, s


@pytest.mark.parametrize("kind", ["gelu", "silu"])
@pytest.mark.parametrize("target", ["npu_a", "npu_b"])
def test_hard_gate_is_legal_fitted_and_closer_than_relu(kind, target):
    """hard_gate: x·clamp(a·x + b, 0, 1), legal on both NPUs (npu_b multiplies the two
    activations by matmul), a and b fitted on the calibrated range, within half of ReLU's max
    error (GELU: 0.08 vs 0.17; SiLU: 0.19 vs 0.28 on [−6, 6]) and trainable."""
    res, ex, s = _gated(kind, target, "hard_gate")
    assert isinstance(s, HardGate) and s.style == "structural"
    fn = CASES[kind][1]
    x = torch.linspace(-6, 6, 4001)
    with torch.no_grad():
        err = float((s(x) - fn(x)).abs().max())
        gate = torch.clamp(s.a * x + s.b, 0, 1)
        assert torch.allclose(s(x), x * gate, atol=1e-6)
    assert err <= 0.7 * float((torch.relu(x) - fn(x)).abs().max())
    assert err <= {"gelu": 0.09, "silu": 0.2}[kind]
    assert_grads_flow(res.module, ex)


@pytest.mark.parametrize("kind", ["gelu", "silu"])
@pytest.mark.parametrize("target", ["npu_a", "npu_b"])
def test_poly_gate_is_legal_near_exact_and_saturates_exactly(kind, target):
    """poly_gate: legal on both NPUs, near-exact, x / 0 beyond ±L, trainable."""
    res, ex, s = _gated(kind, target, "poly_gate")
    assert isinstance(s, PolyGate) and s.style == "emulation"
    fn = CASES[kind][1]
    x = torch.linspace(-12, 12, 4001)
    scale = 1.0 / s.inv_scale
    with torch.no_grad():
        y = s(x)
        assert float((y - fn(x)).abs().max()) <= {"gelu": 6e-3, "silu": 0.04}[kind]
        hi, lo = x >= scale, x <= -scale          # gate 1 / 0 up to float32 rounding
        torch.testing.assert_close(y[hi], x[hi], rtol=1e-6, atol=0.0)
        assert float(y[lo].abs().max()) <= 1e-6 * scale
        hard = HardGate(kind, *hard_gate_init(fn, None, -12.0, 12.0), s.mul)
        assert float((y - fn(x)).abs().max()) < 0.25 * float((hard(x) - fn(x)).abs().max())
        assert abs(float(s.coefficients().sum()) - 0.5) < 1e-6
        s.coef.add_(torch.tensor([0.3, -0.2, 0.05]))       # as training might move them
        y = s(x)                                             # the tails stay x and 0
        torch.testing.assert_close(y[hi], x[hi], rtol=1e-6, atol=0.0)
        assert float(y[lo].abs().max()) <= 1e-6 * scale
    assert_grads_flow(res.module, ex)


def test_poly_gate_fuses_into_its_producer_on_npu_a():
    """Multiplies, adds and clamps only: on npu_a (elementwise epilogues fuse) the gate adds
    no kernel to the linear before it, where the 32-knot PWL adds two."""
    m, _ = _models("gelu")
    ex = _x()
    kernels = {}
    for cand in ("pwl", "poly_gate", "hard_gate"):
        res = ax.legalize(m, "npu_a", ex, verify=False, choices={"gelu": cand})
        kernels[cand] = ax.estimate_latency(res.module, "npu_a", ex).n_kernels
    assert kernels["poly_gate"] == kernels["hard_gate"] == kernels["pwl"] - 2


def test_poly_gate_init_pins_the_gate_and_beats_a_hard_gate():
    scale, d = poly_gate_init(F.gelu, None, -8.0, 8.0)
    assert scale in (2.5, 3.0, 3.5) and d.numel() == 4
    assert abs(float(d.sum()) - 0.5) < 1e-12          # gate(t = 1) = ½ + Σd = 1
    x = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    t = (x / scale).clamp(-1, 1)
    y = x * (0.5 + sum(d[i] * t ** (2 * i + 1) for i in range(4)))
    a, b = hard_gate_init(F.gelu, None, -8.0, 8.0)
    err_hard = float(((x * torch.clamp(a * x + b, 0, 1) - F.gelu(x)) ** 2).mean())
    assert float(((y - F.gelu(x)) ** 2).mean()) < 0.01 * err_hard   # measured: 0.0044×


def test_hard_gate_init_minimises_the_error():
    x = torch.linspace(-5, 5, 2001, dtype=torch.float64)

    def err(a, b):
        return float(((x * torch.clamp(a * x + b, 0, 1) - F.gelu(x)) ** 2).mean())
    a, b = hard_gate_init(F.gelu, None, -5.0, 5.0)
    assert err(a, b) < err(1 / 6, 0.5) and err(a, b) < err(1.0, 0.5) and err(a, b) < err(0.3, 0.4)
    # the fit follows the calibrated range: on [−1, 1] the gate's slope matches Φ'(0) ≈ 0.4
    a2, _ = hard_gate_init(F.gelu, torch.rand(5000, dtype=torch.float64) * 2 - 1, -1.0, 1.0)
    assert a2 > a and abs(a2 - 0.4) <= 0.1


@pytest.mark.parametrize("act", [nn.LeakyReLU(0.1), nn.PReLU(init=0.2), nn.Hardsigmoid()])
def test_exact_candidates_beat_emulation(act):
    """npu_b lacks these piecewise-linear kinds: the exact ReLU identity is chosen, not a fit."""
    m = Wrap(act)
    ex = _x()
    res = ax.legalize(m, "npu_b", ex, verify=False)
    assert set(res.choices.values()) == {"relu_exact"}
    assert torch.allclose(call(m, ex), call(res.module, ex), atol=1e-6)


def test_relu6_and_clamp_stay_native_on_npu_b():
    m = Wrap(nn.ReLU6())
    res = ax.legalize(m, "npu_b", _x(), verify=False)
    assert not res.choices


_GELU_SIGMOID = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16), nn.Sigmoid())


@pytest.mark.parametrize("target", ["npu_a", "npu_b"])
def test_family_through_the_shared_helper(target):
    """GELU and sigmoid become PWL surrogates within 5e-3 (32 knots on the calibrated range);
    golden kinds; the rule fired twice; idempotent."""
    torch.manual_seed(0)
    before, res, p = run_family("activations", _GELU_SIGMOID, (torch.randn(4, 16),), target)
    assert_pass(res, before, fired={"pwl": 2},
                hist={"linear": 2, "surrogate:gelu": 1, "surrogate:sigmoid": 1},
                atol=5e-3, rtol=0.0)
    assert_idempotent(p, res)


def test_family_does_not_fire_where_the_kinds_are_native():
    """dsp_c runs GELU and sigmoid as lookup tables: nothing changes."""
    torch.manual_seed(0)
    before, res, _ = run_family("activations", _GELU_SIGMOID, (torch.randn(4, 16),), "dsp_c")
    assert_pass(res, before, fired={}, hist={"linear": 2, "gelu": 1, "sigmoid": 1},
                atol=0.0, rtol=0.0)

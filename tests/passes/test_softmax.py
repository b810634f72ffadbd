"""Softmax / log-softmax surrogate family (passes/softmax.py).

Tolerances stated here:
* ``softmax_pwl`` (32 knots) on held-out attention-like logits (std 3, 16 keys, fitted on the
  calibration batches): max |p − p_ref| ≤ 2e-3 (measured ~5e-4), row sums within 1e-4 of 1
  (Newton step: measured ~1e-6); log_softmax max |Δ| ≤ 5e-3 (measured ~1e-3).
  On real MiniLM attention logits (6 softmaxes, 128 keys) the measured max |Δp| is ≤ 7.3e-4 and
  the row L1 error ≤ 2.3e-3; the sentence-embedding cosine with only the softmaxes replaced is
  > 0.99999 (not run here: MiniLM is too slow for this file's budget).
* masking: masked logits (finfo.min, −1e9, −inf) give probability exactly 0 (asserted < 1e-6)
  for both candidates, before and after a training step.
"""
from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import archnet_fx as ax
import archnet_fx.targets as targets_pkg
from archnet_fx.legalize import legalize
from archnet_fx.ir.opkinds import kind_histogram
from archnet_fx.passes.softmax import (CANDIDATES, MASK_THRESHOLD, POLY_EXP_SQUARINGS, PolyExp,
                                       ReluAttention, SoftmaxPow, SoftmaxPWL, exp_floor,
                                       poly_exp_init, pow_kernel_init, RECIP_KNOTS,
                                       relu_attention_init)
from archnet_fx.surrogate.products import RowSum
from passtest import assert_idempotent, assert_pass, captured_zoo, run_family
from surrogate_check import assert_body_legal, assert_grads_flow, forms, surrogates

TARGETS = ("npu_a", "npu_b", "dsp_c")
NEG = torch.finfo(torch.float32).min


pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(seed: int, masked: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g) * 3.0
    if masked:
        x[1, :, :, -4:] = NEG                                   # padding mask (finfo.min)
        x[0] = x[0] + torch.full((16, 16), -1e9).triu(1)        # causal mask (−1e9)
        x[1, 0, 0, :3] = -float("inf")                          # −inf
    return x


CALIB = [(_logits(s),) for s in range(1, 5)]


class Fn(nn.Module):
    def forward(self, x):
        return F.softmax(x, dim=-1)


class Method(nn.Module):
    def forward(self, x):
        return x.softmax(3)


class Both(nn.Module):
    def forward(self, x):
        return F.softmax(x, dim=-1), F.log_softmax(x, -1)


class OtherDims(nn.Module):
    def forward(self, x):
        return torch.softmax(x, 1) + torch.log_softmax(x, -3)


@functools.lru_cache(maxsize=None)
def _tiny(target: str, choice: str):
    """Both kinds legalized once per (target, softmax candidate); log_softmax → softmax_pwl."""
    return legalize(Both(), target, _logits(0), calib_data=CALIB, verify=False,
                    choices={"softmax": choice, "log_softmax": "softmax_pwl"})


def _sur(target: str, choice: str, kind: str = "softmax"):
    (m,) = [m for m in surrogates(_tiny(target, choice).module) if m.replaces == kind]
    return m


# --------------------------------------------------------------------------- legality


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("choice", ("softmax_pwl", "relu_attention"))
def test_body_legal_on_each_target(target, choice):
    tgt = ax.load_target(target)
    assert all(c.offered(tgt) is None for c in CANDIDATES)
    res = _tiny(target, choice)
    assert res.choices == {"softmax": choice, "log_softmax": "softmax_pwl"}
    assert ax.check(res.module, target).fully_on_chip
    assert isinstance(_sur(target, choice), ReluAttention if choice == "relu_attention"
                      else SoftmaxPWL)
    for m in surrogates(res.module):
        assert_body_legal(m, target)
        assert any(p.requires_grad for p in m.parameters())


def test_npu_b_multiplies_by_matmul():
    """npu_b has no mul of two activations: the row scale and Newton step are matmuls."""
    assert _sur("npu_b", "softmax_pwl").scale.mode == "matmul"
    assert _sur("npu_a", "softmax_pwl").scale.mode == "mul"


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("target", ("npu_a", "npu_b"))
def test_emulation_error_on_calibrated_range(target):
    m = _sur(target, "softmax_pwl")
    for seed in (10, 11):
        x = _logits(seed)
        with torch.no_grad():
            p, ref = m(x), torch.softmax(x, -1)
        assert float((p - ref).abs().max()) <= 2e-3
        assert float((p.sum(-1) - 1).abs().max()) <= 1e-4
        assert float(p.min()) >= -1e-6


@pytest.mark.parametrize("target", TARGETS)
def test_pow_kernel_softmax_is_legal_normalized_and_close(target):
    """softmax_pow: legal everywhere (npu_b squares by matmul), rows sum to 1, masked keys get
    exactly 0, and rows are far closer to softmax than ReLU attention's, before training."""
    res = _tiny(target, "softmax_pow")
    assert res.choices["softmax"] == "softmax_pow"
    assert ax.check(res.module, target).fully_on_chip
    m = _sur(target, "softmax_pow")
    assert isinstance(m, SoftmaxPow)
    assert_body_legal(m, target)
    relu = _sur(target, "relu_attention")
    for seed in (10, 11):
        x = _logits(seed)
        with torch.no_grad():
            p, q, ref = m(x), relu(x), torch.softmax(x, -1)
        assert float((p.sum(-1) - 1).abs().max()) <= 1e-4
        cos = F.cosine_similarity(p, ref, dim=-1)
        assert float(cos.min()) >= 0.995
        assert float(cos.mean()) > float(F.cosine_similarity(q, ref, dim=-1).mean()) + 0.05
    x = _logits(7, masked=True)
    with torch.no_grad():
        assert _assert_masked_zero(x, m(x)) > 0
        # however training moves the kernel's scale (even through 0), masks stay exactly 0
        m2 = copy.deepcopy(m)
        for a in (-0.5, 0.0, 1e-6):
            m2.exp.a.fill_(a)
            p = m2(x)
            assert _assert_masked_zero(x, p) > 0
            assert torch.isfinite(p).all()


def test_pow_kernel_row_sum_uses_the_targets_reduction():
    """softmax_pow sums rows with the target's own reduction (dsp_c: sum, npu_a: mean × N) and
    falls back to the ones-linear (npu_b has neither); all three forms give the same rows."""
    forms = {t: _sur(t, "softmax_pow").rowsum.reduce for t in TARGETS}
    assert forms == {"npu_a": "mean", "npu_b": None, "dsp_c": "sum"}
    assert _sur("npu_a", "softmax_pwl").rowsum.reduce is None   # the default keeps the linear
    # both normalize with the same 1/s: RECIP_KNOTS decreasing hinges, no Newton step; the
    # float32 hinge form (what the chip and an export evaluate) within 5e-5 of 1/s on [1, s_hi]
    from archnet_fx.surrogate.hinge import hinge_sum

    for cand in ("softmax_pow", "softmax_pwl"):
        recip = _sur("npu_a", cand).recip
        assert recip.outer.weight.shape[1] == RECIP_KNOTS and bool((recip.outer.weight >= 0).all())
        s = torch.logspace(0, math.log10(float(recip.inner.bias.detach().max())), 4001)
        with torch.no_grad():
            r = hinge_sum(s, recip.inner.weight, recip.inner.bias, recip.outer.weight,
                          recip.outer.bias, None, fast=False)
        assert float((r.double() * s.double() - 1).abs().max()) <= 5e-5
    x = torch.rand(3, 5, 128)
    ref = x.sum(-1, keepdim=True)
    for reduce in RowSum.REDUCTIONS:
        got = RowSum(128, reduce=reduce)(x)
        assert got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-5)
    assert torch.allclose(RowSum(128, 0.5, "mean")(x), ref * 0.5, rtol=1e-5)
    with pytest.raises(ValueError, match="reduce"):
        RowSum(4, reduce="max")


def test_pow_kernel_init_fits_the_scale():
    rows = _logits(5).reshape(-1, 16).double()
    assert pow_kernel_init(None, 2) == 0.25  # τ = 2^k without samples
    p = torch.softmax(rows, -1)

    def err(a):
        h = torch.relu(1 + a * (rows - rows.amax(-1, keepdim=True))) ** 4
        return float(((h / h.sum(-1, keepdim=True) - p) ** 2).sum())
    a = pow_kernel_init(rows, 2)
    assert err(a) <= err(0.25) and err(a) < err(1.0) and err(a) < err(1 / 32)


@pytest.mark.parametrize("target", TARGETS)
def test_poly_exp_softmax_is_legal_and_nearly_exact(target):
    """softmax_poly: legal everywhere, within 2e-4 of softmax (several times closer than the
    32-knot PWL's), masked keys 0 (< 1e-6 here; the kernel alone is exactly 0 at and below
    lo, test_poly_exp_fit) — also after its coefficients move, and at −inf."""
    res = _tiny(target, "softmax_poly")
    assert res.choices["softmax"] == "softmax_poly"
    assert ax.check(res.module, target).fully_on_chip
    m = _sur(target, "softmax_poly")
    assert isinstance(m, SoftmaxPow) and isinstance(m.exp, PolyExp)
    assert_body_legal(m, target)
    for seed in (10, 11):
        x = _logits(seed)
        with torch.no_grad():
            p, q, ref = m(x), _sur(target, "softmax_pwl")(x), torch.softmax(x, -1)
        err = float((p - ref).abs().max())
        assert err <= 2e-4 and err < 0.5 * float((q - ref).abs().max())
        assert float((p.sum(-1) - 1).abs().max()) <= 1e-4
    x = _logits(7, masked=True)
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        assert _assert_masked_zero(x, m2(x)) > 0
        g = torch.Generator().manual_seed(0)
        m2.exp.theta.add_(0.05 * torch.randn(m2.exp.theta.shape, generator=g))
        p = m2(x)
    assert _assert_masked_zero(x, p) > 0 and float(p.min()) >= 0


@pytest.mark.parametrize("lo", (-16.0, -11.0, -8.0))
def test_poly_exp_fit(lo):
    """The cubic to the 16th is within 5e-5 of e^z − e^lo on [lo, 0] (the shift that makes it
    0 at lo, below any probability a row keeps there), exactly 0 at and below lo, and
    its traced body has no hidden tensor wider than its input (the point of the form)."""
    from torch.fx.passes.shape_prop import ShapeProp

    from archnet_fx.surrogate.products import Mul

    k = PolyExp(lo, poly_exp_init(lo, None), POLY_EXP_SQUARINGS, Mul())
    z = torch.linspace(lo, 0.0, 10001)
    with torch.no_grad():
        e = k(z)
        assert float((e - (torch.exp(z) - math.exp(lo))).abs().max()) <= 5e-5
        assert float(k(torch.tensor([lo, lo - 3.0, -1e9, -float("inf")])).abs().max()) == 0.0
    gm = torch.fx.symbolic_trace(k)
    ShapeProp(gm).propagate(z)
    sizes = [n.meta["tensor_meta"].shape.numel() for n in gm.graph.nodes
             if hasattr(n.meta.get("tensor_meta"), "shape")]
    assert len(sizes) > 10 and max(sizes) == z.numel()


def test_log_softmax_error():
    x = _logits(12)
    with torch.no_grad():
        y = _sur("npu_b", "relu_attention", "log_softmax")(x)
    assert float((y - F.log_softmax(x, -1)).abs().max()) <= 5e-3


def test_exp_floor_ignores_mask_values():
    x = _logits(3, masked=True).reshape(-1, 16).double()
    lo = exp_floor(x)
    assert -16.0 <= lo <= -8.0
    assert exp_floor(torch.full((4, 8), NEG, dtype=torch.float64)) == -16.0


@settings(max_examples=12, deadline=None)
@given(rank=st.integers(1, 5), n=st.integers(2, 40), dim=st.integers(-5, 4),
       scale=st.floats(0.1, 6.0), seed=st.integers(0, 99))
def test_any_shape_and_dim(rank, n, dim, scale, seed):
    dim = dim % rank
    shape = [3, 2, 4, 2, 3][:rank]
    shape[dim] = n
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    m = SoftmaxPWL("softmax", rank, n, -16.0, 32, "matmul",
                   dim=None if dim == rank - 1 else dim)
    with torch.no_grad():
        assert float((m(x) - torch.softmax(x, dim)).abs().max()) <= 3e-3


def test_other_dims_replaced_through_transpose():
    x = _logits(5)
    res = legalize(OtherDims(), "npu_b", x)
    assert set(res.choices.values()) == {"softmax_pwl"}
    with torch.no_grad():
        assert float((res.module(x) - OtherDims()(x)).abs().max()) <= 5e-3


# --------------------------------------------------------------------------- masking


def _assert_masked_zero(x: torch.Tensor, p: torch.Tensor) -> int:
    masked = ~(torch.isfinite(x) & (x > MASK_THRESHOLD))
    assert torch.isfinite(p[~masked]).all()
    if masked.any():
        assert float(p[masked].abs().max()) < 1e-6
    return int(masked.sum())


def test_masks_give_exact_zero_standalone():
    x = _logits(7, masked=True)
    for choice in ("softmax_pwl", "relu_attention"):
        for target in ("npu_a", "npu_b"):
            with torch.no_grad():
                p = _sur(target, choice)(x)
                lp = _sur(target, choice, "log_softmax")(x)
            masked = ~(torch.isfinite(x) & (x > MASK_THRESHOLD))
            assert float(lp[masked].max()) < -1e8  # log-probabilities of masked keys stay huge
            assert _assert_masked_zero(x, p) > 0
            if choice == "softmax_pwl":
                keep = torch.isfinite(x) & (x > MASK_THRESHOLD)
                ref = torch.softmax(torch.where(keep, x, torch.tensor(-float("inf"))), -1)
                assert float((p - ref).abs().max()) <= 2e-3


def test_masks_still_zero_after_training_step():
    m = copy.deepcopy(_sur("npu_b", "softmax_pwl"))  # the cached result stays untouched
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = _logits(8, masked=True)
    loss = (m(x) - 0.1).pow(2).sum()
    loss.backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # −inf inputs too
    opt.step()
    with torch.no_grad():
        assert _assert_masked_zero(x, m(x)) > 0


@functools.lru_cache(maxsize=None)
def _zoo_result(name: str, target: str):
    _, ex, gm = captured_zoo(name)
    return legalize(gm, target, ex, allow_host_fallback=True, verify=False), ex


def _hooked(res, ex):
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append((mod, i[0], o)))
             for m in surrogates(res.module) if m.replaces == "softmax"]
    with torch.no_grad():
        res.module(**ex) if isinstance(ex, dict) else res.module(*ex)
    for h in hooks:
        h.remove()
    assert seen, "no softmax surrogate ran"
    return seen


@pytest.mark.parametrize("name,target", [("transformer", "npu_b"), ("bert_tiny", "npu_a"),
                                         ("decoder", "npu_b")])
def test_zoo_masks_give_exact_zero(name, target):
    """Padding (transformer, bert_tiny) and causal (decoder) masks survive both candidates."""
    res, ex = _zoo_result(name, target)
    total = 0
    for mod, x, p in _hooked(res, ex):
        assert isinstance(mod, SoftmaxPWL)
        total += _assert_masked_zero(x, p)
        keep = torch.isfinite(x) & (x > MASK_THRESHOLD)
        ref = torch.softmax(torch.where(keep, x, torch.tensor(-float("inf"))), -1)
        ref = torch.nan_to_num(ref)
        assert float((p - ref).abs().max()) <= 2e-3
        b, g = relu_attention_init(x.reshape(-1, x.shape[-1]).double(), x.shape[-1])
        with torch.no_grad():
            _assert_masked_zero(x, ReluAttention(b, g)(x))
    assert total > 0, f"{name}: no masked logits reached the softmax surrogates"


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("choice", ("softmax_pwl", "relu_attention", "softmax_pow",
                                    "softmax_poly"))
def test_grads_flow(choice):
    gm = copy.deepcopy(_tiny("npu_b", choice).module)
    assert_grads_flow(gm, (_logits(9),))  # (masked log-probs would make this loss inf)


# --------------------------------------------------------------------------- firing


def test_fires_on_module_functional_aten_and_method_forms():
    x = _logits(0)
    gms = forms(nn.Softmax(dim=-1), Fn(), (x,))
    gms["method"] = ax.capture(Method(), (x,), method="fx")
    for form, gm in gms.items():
        res = legalize(gm, "npu_a", (x,), verify=False)
        assert list(res.choices.values()) == ["softmax_pwl"], form
        assert kind_histogram(res.module)["softmax"] == 0
        with torch.no_grad():
            assert float((res.module(x) - torch.softmax(x, -1)).abs().max()) <= 2e-3


def test_does_not_fire_where_softmax_is_native(tmp_path: Path):
    src = (Path(targets_pkg.__file__).parent / "npu_a.toml").read_text()
    src = src.replace('name = "npu_a"', 'name = "npu_a_softmax"')
    src = src.replace("[ops]\n", "[ops]\nsoftmax = {}\nlog_softmax = {}\n", 1)
    path = tmp_path / "npu_a_softmax.toml"
    path.write_text(src)
    x = _logits(0)
    res = legalize(Both(), str(path), x, verify=False)
    assert not res.choices
    assert not surrogates(res.module)
    hist = kind_histogram(res.module)
    assert hist["softmax"] == 1 and hist["log_softmax"] == 1


@pytest.mark.filterwarnings("ignore:Implicit dimension choice for softmax:UserWarning")
def test_refuses_implicit_dim_with_reason():
    x = _logits(0)
    res = legalize(nn.Softmax(dim=None), "npu_a", x, allow_host_fallback=True, verify=False)
    reasons = [r.reason for rec in res.records for r in rec.refusals if r.node.startswith("soft")]
    assert reasons and all("dim" in r for r in reasons), reasons
    assert res.after.host_fallback_counts["softmax"] == 1


# --------------------------------------------------------------------------- zoo


@pytest.mark.parametrize("target", ("npu_a", "npu_b"))
@pytest.mark.parametrize("name", ("vit", "transformer", "decoder"))
def test_zoo_leaves_no_softmax(name, target):
    res, _ = _zoo_result(name, target)
    rep = ax.check(res.module, target)
    assert rep.unsupported_counts["softmax"] == 0
    assert rep.host_fallback_counts["softmax"] == 0
    picked = {n: c for n, c in res.choices.items() if n.startswith("softmax")}
    assert len(picked) == 2 and set(picked.values()) == {"softmax_pwl"}


class _ScaledAttention(nn.Module):
    def forward(self, q, k):
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)


@pytest.mark.parametrize("target", ["npu_a", "npu_b", "dsp_c"])
def test_family_through_the_shared_helper(target):
    """The softmax family alone, as legalization runs it: numerics within 1e-3 of the row
    maximum (PWL emulation), golden kinds, the rule fired once, idempotent."""
    g = torch.Generator().manual_seed(0)
    ex = (torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g))
    before, res, p = run_family("softmax", _ScaledAttention(), ex, target)
    assert_pass(res, before, fired={"softmax_pwl": 1},
                hist={"matmul": 1, "mul": 1, "permute": 1, "surrogate:softmax": 1},
                atol=1e-3, rtol=0.0)
    assert_idempotent(p, res)


def test_family_does_not_fire_without_softmax():
    before, res, _ = run_family("softmax", nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
                                (torch.randn(2, 8),), "npu_a")
    assert_pass(res, before, fired={}, hist={"linear": 1, "relu": 1}, atol=0.0, rtol=0.0)


def test_a_fitted_state_carries_its_floor():
    """The coefficients mean nothing without the lo they were fitted at (t = z/|lo|; the PWL's
    first breakpoint): loading a state into a module built from other batches takes lo along."""
    from archnet_fx.surrogate.products import Mul

    a, b = (PolyExp(lo, poly_exp_init(lo, None), POLY_EXP_SQUARINGS, Mul()) for lo in (-10, -12.5))
    b.load_state_dict(a.state_dict())
    z = torch.linspace(-20.0, 0.0, 1001)
    with torch.no_grad():
        assert b.lo == -10.0 and torch.equal(a(z), b(z))
    p, q = (SoftmaxPWL("softmax", 2, 8, lo, 32, "mul") for lo in (-10.0, -14.0))
    q.load_state_dict(p.state_dict())
    x = _logits(3).reshape(-1, 16)[:, :8]
    with torch.no_grad():
        assert q.lo == -10.0 and torch.equal(p(x), q(x))
    with pytest.raises(ValueError, match="finite lo"):
        PolyExp(-math.inf, poly_exp_init(-8.0, None), 4, Mul())

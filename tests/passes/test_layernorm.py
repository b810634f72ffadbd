"""LayerNorm / RMSNorm surrogate family (passes/layernorm.py).

Tolerances stated here:
* ``fit_rsqrt``: max relative error of 1/√(v+ε) ≤ 1e-3 on the fitted range (measured ~5e-4);
* emulation candidates: max |y − y_ref| / max |y_ref| ≤ 2e-3 on held-out rows whose per-row
  scale spans 0.1–10 (variance ratio 1e4) plus outlier channels (measured ~3e-4);
* affine candidates: the least-squares init has zero mean residual per channel on the
  calibration rows and beats the naive ``a = γ, b = β`` init.
"""
from __future__ import annotations

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
from archnet_fx.demo import zoo
from archnet_fx.legalize import legalize

from passtest import assert_idempotent, assert_pass, family_pass
from passtest import run_family as run_one_family
from archnet_fx.passes.layernorm import CANDIDATES, NormMatch, affine_init, fit_rsqrt
from surrogate_check import (assert_body_legal, assert_grads_flow, forms, max_rel_error,
                             surrogates)

TARGETS = ("npu_a", "npu_b", "dsp_c")
C = 48
EMU_TOL = 2e-3


def _rows(n: int, c: int = C, seed: int = 0) -> torch.Tensor:
    """LN-like inputs: per-row scale log-uniform in [0.1, 10], row offsets, outlier channels."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(n, 1).uniform_(math.log(0.1), math.log(10.0), generator=g))
    x = torch.randn(n, c, generator=g) * scale + torch.randn(n, 1, generator=g)
    x[:, :2] *= 4.0  # outlier channels, as in real residual streams
    return x


def _x(seed: int = 0) -> torch.Tensor:
    return _rows(2 * 24, seed=seed).reshape(2, 24, C)


class LNF(nn.Module):
    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(c) + 0.5)
        self.b = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.w, self.b, 1e-5)


class RMSF(nn.Module):
    def __init__(self, c: int = C) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.w, 1e-6)


def _ln_module() -> nn.LayerNorm:
    m = nn.LayerNorm(C)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
    return m


def _rms_module() -> nn.RMSNorm:
    m = nn.RMSNorm(C, eps=1e-6)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    return m


class HandLN(nn.Module):
    """``(x − μ) / sqrt(var + ε) · w + b`` written out, in several spellings."""

    def __init__(self, form: str = "var_sqrt") -> None:
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.rand(C) + 0.5)
        self.b = nn.Parameter(torch.randn(C) * 0.1)

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        if self.form == "var_sqrt":
            y = (x - mu) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5)
        elif self.form == "pow_rsqrt":
            d = x - mu
            y = d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5)
        else:  # "dd_sqrt": d*d, numerator recomputed
            d = x - mu
            y = (x - mu) / torch.sqrt((d * d).mean(-1, keepdim=True) + 1e-5)
        return y * self.w + self.b


class HandRMS(nn.Module):
    def __init__(self, square: str = "pow") -> None:
        super().__init__()
        self.square = square
        self.weight = nn.Parameter(torch.rand(C) + 0.5)

    def forward(self, x):
        sq = x * x if self.square == "mul" else x ** 2
        return self.weight * (x * torch.rsqrt(sq.mean(-1, keepdim=True) + 1e-6))


class NotANorm(nn.Module):
    """Look-alikes the chain matcher must refuse."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form

    def forward(self, x):
        y = x * 2.0 + 1.0
        if self.form == "other_dim":
            return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)
        if self.form == "other_x":
            return y * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.form == "cube":
            return x * torch.rsqrt(x.pow(3).abs().mean(-1, keepdim=True) + 1e-6)
        if self.form == "unbiased":
            return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)
        raise ValueError(self.form)


def run_family(model, ex, target, prefer: str = "emulation", calib=None, method: str = "auto",
               gm=None):
    """Canonicalize, calibrate (on ``calib``, else the example alone) and run only this
    family's pass, as legalize does: ``(canonical graph, result)``."""
    canon, res, _ = run_one_family("layernorm", gm if gm is not None else model, ex, target,
                                   calib=[ex] if calib is None else calib, method=method,
                                   prefer=prefer)
    return canon, res


def _out(m, ex):
    with torch.no_grad():
        return m(*ex)


# --------------------------------------------------------------------------- candidates

def test_two_candidates_per_kind():
    by_kind: dict[str, set[str]] = {}
    for c in CANDIDATES:
        by_kind.setdefault(c.kind, set()).add(c.style)
    for kind in ("layer_norm", "rms_norm", "pow", "rsqrt", "sqrt", "div", "mean", "var", "mul"):
        assert by_kind[kind] == {"emulation", "structural"}, kind
        for t in TARGETS:
            assert all(c.offered(ax.load_target(t)) is None for c in CANDIDATES if c.kind == kind)


MODELS = {
    "ln": (_ln_module, {"emulation": "ln_emulate", "structural": "ln_affine"}),
    "rms": (_rms_module, {"emulation": "rms_emulate", "structural": "rms_affine"}),
    "hand_ln": (HandLN, {"emulation": "norm_chain_emulate", "structural": "norm_chain_affine"}),
    "hand_rms": (HandRMS, {"emulation": "norm_chain_emulate",
                           "structural": "norm_chain_affine"}),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("prefer", ["emulation", "structural"])
@pytest.mark.parametrize("model", list(MODELS))
def test_candidate_fires_legal_and_trainable(model, prefer, target):
    factory, names = MODELS[model]
    torch.manual_seed(0)
    m, ex = factory().eval(), (_x(),)
    canon, res = run_family(m, ex, target, prefer, calib=[(_x(1),), (_x(2),)])
    assert dict(res.record.rule_hits) == {names[prefer]: 1}, res.record.refusals
    subs = surrogates(res.module)
    assert len(subs) == 1 and subs[0].style == prefer
    assert subs[0].replaces == ("layer_norm" if "ln" in model else "rms_norm")
    assert_body_legal(subs[0], target)
    hist = ax.kind_histogram(res.module)
    assert not {"layer_norm", "rms_norm", "pow", "rsqrt", "sqrt", "div", "var"} & set(hist)
    # idempotent: nothing of this family's is left illegal
    assert not _again(res.module, target).record.rule_hits
    err = max_rel_error(_out(m, ex), _out(res.module, ex))
    assert err <= (EMU_TOL if prefer == "emulation" else 1.0), err
    assert_grads_flow(res.module, ex)


def _again(gm, target):
    return family_pass("layernorm", target)(gm)


# --------------------------------------------------------------------------- approximation

def test_rsqrt_pwl_relative_error():
    for lo, hi, eps in ((1e-3, 1e3, 1e-5), (0.05, 400.0, 1e-12), (1e-2, 10.0, 1e-6)):
        pwl = fit_rsqrt(lo, hi, eps, 64)
        v = torch.logspace(math.log10(lo), math.log10(hi), 50_000)
        with torch.no_grad():
            got = pwl(v).double()
        want = (v.double() + eps).rsqrt()
        assert float(((got - want) / want).abs().max()) <= 1e-3
        with torch.no_grad():  # saturates right of the range: never negative
            assert float(pwl(torch.tensor([hi * 1e3])).min()) > 0


@pytest.mark.parametrize("target", ["npu_a", "npu_b"])  # mul/mean path and matmul/linear path
@pytest.mark.parametrize("factory", [_ln_module, _rms_module], ids=["ln", "rms"])
def test_emulation_error_on_held_out_rows(factory, target):
    torch.manual_seed(0)
    m = factory().eval()
    calib = [(_rows(512, seed=s).reshape(8, 64, C),) for s in (1, 2)]
    ex = (_rows(512, seed=3).reshape(8, 64, C),)
    _, res = run_family(m, ex, target, calib=calib)
    err = max_rel_error(_out(m, ex), _out(res.module, ex))
    assert err <= EMU_TOL, err


def test_affine_init_least_squares():
    torch.manual_seed(0)
    w, b = torch.rand(C) + 0.5, torch.randn(C) * 0.1
    m = NormMatch("layer_norm", None, C, 1e-5, w, b, None)  # type: ignore[arg-type]
    x = _rows(4096, seed=5).double()
    y = m.reference(x)
    a, c = affine_init(m, x.float(), None)
    fit = x * a.double() + c.double()
    assert float((fit - y).mean(0).abs().max()) < 1e-4        # matches on average per channel
    naive = x * w.double() + b.double()
    assert float((fit - y).pow(2).mean()) < 0.5 * float((naive - y).pow(2).mean())


@settings(max_examples=8, deadline=None)
@given(c=st.sampled_from([8, 33, 96]), lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       rms=st.booleans())
def test_emulation_shapes(c, lead, rms):
    torch.manual_seed(0)
    m = (nn.RMSNorm(c, eps=1e-6) if rms else nn.LayerNorm(c)).eval()
    n = math.prod(lead)
    ex = (_rows(n, c, seed=7).reshape(*lead, c),)
    _, res = run_family(m, ex, "npu_b")
    assert sum(res.record.rule_hits.values()) == 1
    assert max_rel_error(_out(m, ex), _out(res.module, ex)) <= EMU_TOL


# --------------------------------------------------------------------------- where it fires

@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("form", ["module", "functional", "aten"])
def test_fires_on_every_form(kind, form):
    torch.manual_seed(0)
    mod, fun = (_ln_module(), LNF()) if kind == "ln" else (_rms_module(), RMSF())
    fun.load_state_dict({k.replace("weight", "w").replace("bias", "b"): v
                         for k, v in mod.state_dict().items()})
    ex = (_x(),)
    gm = forms(mod.eval(), fun.eval(), ex)[form]
    _, res = run_family(None, ex, "npu_a", gm=gm)
    assert dict(res.record.rule_hits) == {f"{kind}_emulate": 1}, res.record.refusals
    assert max_rel_error(_out(mod, ex), _out(res.module, ex)) <= EMU_TOL


@pytest.mark.parametrize("form", ["var_sqrt", "pow_rsqrt", "dd_sqrt"])
@pytest.mark.parametrize("method", ["fx", "export"])
def test_fires_on_hand_written_layernorm(form, method):
    torch.manual_seed(0)
    m, ex = HandLN(form).eval(), (_x(),)
    for target in ("npu_a", "npu_b"):
        canon, res = run_family(m, ex, target, method=method)
        assert dict(res.record.rule_hits) == {"norm_chain_emulate": 1}, res.record.refusals
        hist = ax.kind_histogram(res.module)
        assert hist["surrogate:layer_norm"] == 1
        # the whole chain (mean, sub, var/pow, add, sqrt/rsqrt, div/mul, ·w, +b) is gone
        assert sum(hist.values()) <= 2, hist
        assert max_rel_error(_out(m, ex), _out(res.module, ex)) <= EMU_TOL


@pytest.mark.parametrize("square", ["pow", "mul"])
def test_fires_on_hand_written_rmsnorm(square):
    torch.manual_seed(0)
    m, ex = HandRMS(square).eval(), (_x(),)
    for target in TARGETS:
        # anchors: pow (x**2), or rsqrt on npu_a for x*x (mul, mean, add are legal there),
        # or mul on npu_b (x*x is a product of two activations)
        _, res = run_family(m, ex, target)
        assert dict(res.record.rule_hits) == {"norm_chain_emulate": 1}, res.record.refusals
        assert ax.kind_histogram(res.module)["surrogate:rms_norm"] == 1
        assert max_rel_error(_out(m, ex), _out(res.module, ex)) <= EMU_TOL


def test_fires_on_decoder_rmsnorm(target="npu_b"):
    m, ex = zoo.get_model("decoder")
    _, res = run_family(m, ex, target)
    assert dict(res.record.rule_hits) == {"norm_chain_emulate": 5}
    assert all(s.replaces == "rms_norm" for s in surrogates(res.module))
    left = ax.check(res.module, target).unsupported_counts
    assert not {"pow", "rsqrt", "mean"} & set(left), left
    assert max_rel_error(_out(m, ex), _out(res.module, ex)) <= EMU_TOL


def test_does_not_fire_where_norms_are_legal(tmp_path: Path):
    toml = (Path(targets_pkg.__file__).parent / "npu_a.toml").read_text()
    toml = toml.replace('name = "npu_a"', 'name = "npu_norm"').replace(
        "[ops]\n", "[ops]\nlayer_norm = {}\nrms_norm = {}\n")
    path = tmp_path / "npu_norm.toml"
    path.write_text(toml)
    for m in (_ln_module(), _rms_module()):
        _, res = run_family(m.eval(), (_x(),), str(path))
        assert not res.record.rule_hits and not res.record.modified


@pytest.mark.parametrize("form", ["other_dim", "other_x", "cube", "unbiased"])
def test_does_not_fire_on_look_alike_chains(form):
    m, ex = NotANorm(form).eval(), (_x(),)
    _, res = run_family(m, ex, "npu_a")
    assert not res.record.rule_hits and not res.record.modified
    assert res.record.refusals and all("not part of a recognised norm chain" in r.reason
                                       for r in res.record.refusals)


def test_refuses_multi_axis_layernorm():
    m, ex = nn.LayerNorm((4, 12)).eval(), (_x().reshape(2, 24, 4, 12),)
    _, res = run_family(m, ex, "npu_a")
    assert not res.record.rule_hits
    assert any("last axis" in r.reason for r in res.record.refusals)


# --------------------------------------------------------------------------- legalize

@pytest.mark.parametrize("target", ["npu_a", "npu_b"])
@pytest.mark.parametrize("name", ["vit", "decoder"])
def test_legalize_leaves_no_norms(name, target):
    m, ex = zoo.get_model(name)
    res = legalize(m, target, ex, allow_host_fallback=True, verify=False)
    mine = {"layer_norm", "rms_norm"} | ({"pow", "rsqrt"} if name == "decoder" else set())
    rep = ax.check(res.module, target)
    assert not mine & set(rep.unsupported_counts), rep.unsupported_counts
    assert not mine & set(rep.host_fallback_counts), rep.host_fallback_counts
    assert len([s for s in surrogates(res.module)
                if s.replaces in ("layer_norm", "rms_norm")]) == 5


@pytest.mark.parametrize("target", ["npu_a", "npu_b", "dsp_c"])
def test_family_through_the_shared_helper(target):
    """nn.LayerNorm → ln_emulate within 2e-3 of the normalised output; golden kinds; fired
    once; idempotent; and nothing to do on a graph without a norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))
    before, res, p = run_one_family("layernorm", model, (torch.randn(4, 8, 16),), target)
    assert_pass(res, before, fired={"ln_emulate": 1},
                hist={"linear": 1, "surrogate:layer_norm": 1}, atol=2e-3, rtol=0.0)
    assert_idempotent(p, res)
    before, res, _ = run_one_family("layernorm", nn.Linear(16, 16), (torch.randn(4, 16),), target)
    assert_pass(res, before, fired={}, hist={"linear": 1}, atol=0.0, rtol=0.0)

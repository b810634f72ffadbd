"""The elementwise surrogate family (passes/elementwise.py).

For every candidate on every built-in target that offers it: the rule fires where the target
lacks the op (and not where it has it), every surrogate body traces to ops legal on that target,
and the output matches the original within the stated bound (relative to the output's max):

* exact identities (products by 0/1, ReLU identities, reshapes, concat): 1e-6;
* ``pwl`` (emulation, ≥ 32 knots, fitted to the calibrated range): 2e-3 (measured 7e-5 – 5e-4 on
  geometric knots, 1.1e-3 for x³ on uniform ones);
* ``quarter_square`` (PWL square): 5e-3 (measured 1.6e-3);
* ``structural`` (4 knots, a coarse start for distillation): 1e-1 (measured 8e-3 – 7e-2).

The family is run on its own (canonicalize → observe → this pass) so that each case tests these
candidates rather than whichever family runs first on a shared kind.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import archnet_fx as ax
from archnet_fx.ir.meta import PROLOGUE_KEY
from archnet_fx.capture import calibration_batches

from passtest import assert_idempotent, assert_pass, family_pass
from passtest import run_family as run_one_family
from archnet_fx.passes.canonicalize import canonicalize_passes
from archnet_fx.passes.elementwise import CANDIDATES, KINDS
from archnet_fx.infra.manager import PassManager
from archnet_fx.surrogate.observe import observe
from archnet_fx.targets import load_target
from surrogate_check import assert_body_legal, assert_grads_flow, max_rel_error, surrogates

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = ("npu_a", "npu_b", "dsp_c")
BOUND = {"exact": 1e-6, "host": 0.0, "emulation": 2e-3, "structural": 1e-1}
BOUND_BY_NAME = {"quarter_square": 5e-3}


class Op(nn.Module):
    """``f(lin_a(x), lin_b(x), *extra)``: the op's operands are real activations."""

    def __init__(self, fn: Callable, width: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fn = fn
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.a(x), self.b(x))


class MaskOp(Op):
    """``f(lin_a(x), lin_b(x), mask)`` with a bool mask input."""

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.fn(self.a(x), self.b(x), m)


class ConvOp(nn.Module):
    def __init__(self, fn: Callable) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fn = fn
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.conv(x))


def _pos(t: torch.Tensor) -> torch.Tensor:
    return torch.relu(t) + 0.5


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


MASK = torch.rand(2, 6, 8, generator=torch.Generator().manual_seed(2)) > 0.5


ZEROS_ONLY = {"conv_pad": "zeros only"}


class ConstMaskOp(Op):
    """A constant bool buffer as the mask (a causal mask): blended with stored 0/1 floats."""

    def __init__(self, fn: Callable) -> None:
        super().__init__(fn)
        self.register_buffer("m", torch.ones(6, 8, dtype=torch.bool).triu(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.a(x), self.b(x), self.m)


@dataclass
class Case:
    name: str
    kind: str
    model: nn.Module
    inputs: tuple
    fires: tuple[str, ...]                    # candidates that must fire (where kind is illegal)
    refuses: dict[str, str] = field(default_factory=dict)  # candidate -> reason substring

    def __post_init__(self) -> None:
        # the operands here are on-chip activations: the host prologue never applies
        self.refuses = dict(self.refuses)
        if "prologue" not in self.fires:
            self.refuses.setdefault("prologue", "on-chip activation")


CASES = [
    Case("exp", "exp", Op(lambda a, b: torch.exp(a)), (_x(2, 6, 8),), ("pwl", "structural")),
    Case("log", "log", Op(lambda a, b: torch.log(_pos(a))), (_x(2, 6, 8),),
         ("pwl", "structural")),
    Case("sqrt", "sqrt", Op(lambda a, b: torch.sqrt(_pos(a))), (_x(2, 6, 8),),
         ("pwl", "structural")),
    Case("rsqrt", "rsqrt", Op(lambda a, b: _pos(a).rsqrt()), (_x(2, 6, 8),),
         ("pwl", "structural")),
    Case("reciprocal", "reciprocal", Op(lambda a, b: torch.reciprocal(_pos(a))), (_x(2, 6, 8),),
         ("pwl", "structural")),
    Case("reciprocal_neg", "reciprocal", Op(lambda a, b: torch.reciprocal(_pos(a) * -1.0)),
         (_x(2, 6, 8),), ("pwl", "structural")),
    # integer powers: 'exact' by default; the PWLs only when chosen (as here)
    Case("square", "pow", Op(lambda a, b: a ** 2), (_x(2, 6, 8),),
         ("exact", "pwl", "structural")),
    Case("cube", "pow", Op(lambda a, b: torch.pow(a, 3)), (_x(2, 6, 8),),
         ("exact", "pwl", "structural")),
    Case("pow_frac", "pow", Op(lambda a, b: _pos(a) ** 1.5), (_x(2, 6, 8),),
         ("pwl", "structural"), {"exact": "not an integer"}),
    Case("rpow", "pow", Op(lambda a, b: 2 ** a), (_x(2, 6, 8),), ("pwl", "structural"),
         {"exact": "not an integer"}),
    Case("div", "div", Op(lambda a, b: a / _pos(b)), (_x(2, 6, 8),), ("pwl", "structural")),
    Case("rdiv", "div", Op(lambda a, b: 3.0 / _pos(b)), (_x(2, 6, 8),), ("pwl", "structural")),
    Case("mul", "mul", Op(lambda a, b: a * b), (_x(2, 6, 8),), ("product", "quarter_square")),
    Case("row_scale", "mul", Op(lambda a, b: a * b[..., :1]), (_x(2, 6, 8),),
         ("product", "quarter_square")),
    Case("abs", "abs", Op(lambda a, b: a.abs()), (_x(2, 6, 8),), ("relu_pair", "relu_pwl")),
    Case("neg", "neg", Op(lambda a, b: -a), (_x(2, 6, 8),), ("mul_const",)),
    Case("maximum", "maximum", Op(lambda a, b: torch.maximum(a, b)), (_x(2, 6, 8),),
         ("relu_sub", "abs_form")),
    Case("minimum", "minimum", Op(lambda a, b: torch.minimum(a, b)), (_x(2, 6, 8),),
         ("relu_sub", "abs_form")),
    Case("mean_last", "mean", Op(lambda a, b: a.mean(-1, keepdim=True)), (_x(2, 6, 8),),
         ("rowsum", "avg_pool")),
    Case("mean_hw", "mean", ConvOp(lambda t: t.mean(dim=(2, 3))), (_x(2, 3, 5, 5),),
         ("rowsum", "avg_pool")),
    Case("sum_mid", "sum", Op(lambda a, b: a.sum(1)), (_x(2, 6, 8),), ("rowsum",),
         {"avg_pool": "trailing dims"}),
    Case("masked_fill", "masked_fill", MaskOp(lambda a, b, m: a.masked_fill(m, 0.5)),
         (_x(2, 6, 8), MASK), ("blend",), {"prologue": "on-chip activation"}),
    Case("where", "where", MaskOp(lambda a, b, m: torch.where(m, a, b)), (_x(2, 6, 8), MASK),
         ("blend",)),
    Case("causal", "masked_fill", ConstMaskOp(lambda a, b, m: a.masked_fill(m, -3.0)),
         (_x(2, 6, 8),), ("blend",)),
    Case("where_scalar", "where", MaskOp(lambda a, b, m: torch.where(m, 1.5, b)),
         (_x(2, 6, 8), MASK), ("blend",)),
    Case("mask_inf", "masked_fill",
         MaskOp(lambda a, b, m: a + torch.zeros_like(m, dtype=torch.float).masked_fill(m, -1e4)),
         (_x(2, 6, 8), MASK), ("prologue", "blend")),
    Case("expand", "expand", Op(lambda a, b: a[:, :1].expand(-1, 5, -1)), (_x(2, 6, 8),),
         ("add_zeros", "concat"), {"prologue": "on-chip activation"}),
    Case("repeat", "expand", Op(lambda a, b: a.repeat(1, 2, 1)), (_x(2, 6, 8),), ("concat",),
         {"add_zeros": "only size-1 dims broadcast"}),
    Case("pad", "pad", Op(lambda a, b: F.pad(a, (1, 2), value=0.25)), (_x(2, 6, 8),),
         ("concat",), {"conv_pad": "zeros only"}),
    Case("pad_zero2d", "pad", ConvOp(nn.ZeroPad2d((1, 2, 0, 1))), (_x(2, 3, 5, 5),),
         ("concat", "conv_pad")),
    Case("pad_reflect", "pad", ConvOp(lambda t: F.pad(t, (2, 1, 1, 2), mode="reflect")),
         (_x(2, 3, 5, 5),), ("concat",), ZEROS_ONLY),
    Case("pad_replicate", "pad", ConvOp(lambda t: F.pad(t, (1, 1, 2, 0), mode="replicate")),
         (_x(2, 3, 5, 5),), ("concat",), ZEROS_ONLY),
    Case("pad_circular", "pad", ConvOp(lambda t: F.pad(t, (1, 2, 2, 1), mode="circular")),
         (_x(2, 3, 5, 5),), ("concat",), ZEROS_ONLY),
    Case("zeros_like", "creation", Op(lambda a, b: a + torch.ones_like(a)), (_x(2, 6, 8),),
         ("from_shape",), {"prologue": "on-chip activation"}),
    Case("compare", "compare", Op(lambda a, b: a + (a > 0)), (_x(2, 6, 8),), (),
         {"prologue": "no exact ReLU form"}),
]
BY_NAME = {c.name: c for c in CASES}


@functools.lru_cache(maxsize=None)
def prepared(name: str) -> tuple[torch.fx.GraphModule, dict]:
    """Captured + canonicalized graph and samples of every node's inputs (target-independent)."""
    case = BY_NAME[name]
    gm = ax.capture(case.model.eval(), case.inputs)
    gm = PassManager("canonicalize", canonicalize_passes()).run(gm).module
    watch = {n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    return gm, observe(gm, calibration_batches([case.inputs, second(case)]), watch)


def second(case: Case) -> tuple:
    """A second seeded batch from the same distribution (calibration sees both)."""
    return (_x(*case.inputs[0].shape, seed=7),) + tuple(case.inputs[1:])


def run_family(gm: torch.fx.GraphModule, ranges: dict, target: str,
               choices: dict[str, str] | None = None):
    return family_pass("elementwise", target, ranges, choices=dict(choices or {}))(gm)


def _illegal_kinds(gm: torch.fx.GraphModule, target: str) -> set[str]:
    return {v.kind for v in ax.check(gm, target).unsupported}


def _call(m: Any, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return m(*inputs)


def _lacks(target: str, kind: str) -> bool:
    """The target cannot run ``kind`` on these cases' operands (two activations for mul)."""
    t = load_target(target)
    return not t.supports(kind) or (kind == "mul" and not t.limits("mul").two_activations)


def _params() -> list:
    out = []
    for case in CASES:
        for cand in sorted({c.name for c in CANDIDATES if c.kind == case.kind}):
            for t in TARGETS:
                if _lacks(t, case.kind):
                    out.append(pytest.param(case.name, cand, t, id=f"{case.name}-{cand}-{t}"))
    return out


@pytest.mark.parametrize("case_name, target", [
    pytest.param(c.name, t, id=f"{c.name}-{t}") for c in CASES for t in TARGETS
    if not _lacks(t, c.kind)])
def test_does_not_fire_where_the_target_has_the_op(case_name: str, target: str) -> None:
    case = BY_NAME[case_name]
    gm, ranges = prepared(case_name)
    assert case.kind not in _illegal_kinds(gm, target)
    for cand in {c.name for c in CANDIDATES if c.kind == case.kind}:
        res = run_family(gm, ranges, target, {case.kind: cand})
        assert not res.record.rule_hits and not res.modified, res.record


@pytest.mark.parametrize("case_name, cand_name, target", _params())
def test_candidate(case_name: str, cand_name: str, target: str) -> None:
    case = BY_NAME[case_name]
    cand = next(c for c in CANDIDATES if c.kind == case.kind and c.name == cand_name)
    gm, ranges = prepared(case_name)
    res = run_family(gm, ranges, target, {case.kind: cand_name})
    rec = res.record
    assert case.kind in _illegal_kinds(gm, target)
    if cand.offered(load_target(target)) is not None:
        assert not rec.rule_hits
        return
    if cand_name in case.refuses:
        assert not rec.rule_hits
        assert any(case.refuses[cand_name] in r.reason for r in rec.refusals
                   if r.rule == cand_name), rec.refusals
        return
    assert cand_name in case.fires, f"unexpected: {rec.rule_hits} {rec.refusals}"
    assert rec.rule_hits[cand_name] >= 1, rec.refusals
    out = res.module
    assert case.kind not in _illegal_kinds(out, target)
    for s in surrogates(out):
        assert_body_legal(s, target)
    if cand.style == "host":
        assert any(n.meta.get(PROLOGUE_KEY) for n in out.graph.nodes)
    bound = BOUND_BY_NAME.get(cand_name, BOUND[cand.style])
    for inputs in (case.inputs, second(case)):
        err = max_rel_error(_call(gm, inputs), _call(out, inputs))
        assert err <= bound, f"{case_name}/{cand_name} on {target}: error {err:.2e} > {bound}"


def test_default_choice_prefers_exact_forms() -> None:
    # without a choice: emulation first, but pwl refuses integer powers so the exact form wins
    gm, ranges = prepared("square")
    rec = run_family(gm, ranges, "npu_b").record
    assert dict(rec.rule_hits) == {"exact": 1}
    gm, ranges = prepared("rsqrt")
    assert dict(run_family(gm, ranges, "npu_b").record.rule_hits) == {"pwl": 1}


def test_every_kind_has_a_candidate() -> None:
    assert {c.kind for c in CANDIDATES} == set(KINDS)
    for kind in KINDS:
        names = [c.name for c in CANDIDATES if c.kind == kind]
        assert len(names) == len(set(names)), kind


@pytest.mark.parametrize("case_name, cand_name", [
    ("rsqrt", "pwl"), ("div", "pwl"), ("exp", "structural"), ("abs", "relu_pwl"),
    ("mul", "quarter_square"), ("pow_frac", "pwl")])
def test_gradients_flow(case_name: str, cand_name: str) -> None:
    case = BY_NAME[case_name]
    gm, ranges = prepared(case_name)
    out = run_family(gm, ranges, "npu_b", {case.kind: cand_name}).module
    assert_grads_flow(out, case.inputs)


class Forms(nn.Module):
    """rsqrt, maximum, mean, pad and masked_fill in function / method spellings."""

    def __init__(self, method: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.method = method
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.method:
            r = (h.relu() + 0.5).rsqrt() + h.maximum(h * 0.5) + h.mean(-1, keepdim=True)
            return F.pad(r.masked_fill(m, 1.0), (1, 1))
        r = torch.rsqrt(torch.relu(h) + 0.5) + torch.maximum(h, h * 0.5) \
            + torch.mean(h, dim=-1, keepdim=True)
        return torch.nn.functional.pad(torch.masked_fill(r, m, 1.0), [1, 1])


@pytest.mark.parametrize("method, form", [(True, "fx"), (False, "fx"), (False, "export")])
def test_fires_on_every_form(method: bool, form: str) -> None:
    x, m = _x(2, 6, 8), MASK
    gm = ax.capture(Forms(method).eval(), (x, m), method=form)
    gm = PassManager("canonicalize", canonicalize_passes()).run(gm).module
    watch = {n.name for n in gm.graph.nodes}
    ranges = observe(gm, calibration_batches(None, (x, m)), watch)
    res = run_family(gm, ranges, "npu_b")
    assert dict(res.record.rule_hits) == {"pwl": 1, "relu_sub": 1, "rowsum": 1, "blend": 1,
                                          "concat": 1}
    assert ax.check(res.module, "npu_b").ok
    assert max_rel_error(_call(gm, (x, m)), _call(res.module, (x, m))) < 2e-3
    # npu_a has mean and pad: only rsqrt, maximum and masked_fill are replaced there
    hits = run_family(gm, ranges, "npu_a").record.rule_hits
    assert dict(hits) == {"pwl": 1, "relu_sub": 1, "blend": 1}


def test_does_not_fire_on_legal_nodes() -> None:
    # x * const, x - y, mean on npu_a: all legal — the pass changes nothing
    model = Op(lambda a, b: (a * 2.0 - b).mean(-1))
    x = _x(2, 6, 8)
    gm = PassManager("canonicalize", canonicalize_passes()).run(ax.capture(model, (x,))).module
    res = run_family(gm, {}, "npu_a")
    assert not res.record.rule_hits and not res.modified


def test_infinite_fill_is_refused_by_blend_but_goes_to_prologue() -> None:
    model = MaskOp(lambda a, b, m: a + torch.zeros_like(m, dtype=torch.float).masked_fill(
        m, float("-inf")))
    x = _x(2, 6, 8)
    gm = PassManager("canonicalize", canonicalize_passes()).run(
        ax.capture(model, (x, MASK))).module
    res = run_family(gm, {}, "npu_b", {"masked_fill": "blend"})
    assert any("not finite" in r.reason for r in res.record.refusals)
    res = run_family(gm, {}, "npu_b")
    assert dict(res.record.rule_hits) == {"prologue": 1}
    assert ax.check(res.module, "npu_b").ok
    torch.testing.assert_close(_call(res.module, (x, MASK)), _call(gm, (x, MASK)))


def test_dynamic_expand_is_refused() -> None:
    model = Op(lambda a, b: a[:1].expand(a.shape[0], -1, -1) + a)
    x = _x(2, 6, 8)
    gm = PassManager("canonicalize", canonicalize_passes()).run(ax.capture(model, (x,))).module
    res = run_family(gm, {}, "npu_b")
    assert not res.record.rule_hits.get("add_zeros")
    assert any("run time" in r.reason for r in res.record.refusals)


def test_decoder_rmsnorm_op_by_op_on_npu_b() -> None:
    # without the layernorm family: x * rsqrt(mean(x**2) + eps) * w and SwiGLU's product,
    # op by op (pow exact, mean rowsum, rsqrt pwl, mul product)
    from archnet_fx.demo.zoo import get_model

    model, ex = get_model("decoder")
    gm = PassManager("canonicalize", canonicalize_passes()).run(ax.capture(model, ex)).module
    watch = {v.node for v in ax.check(gm, "npu_b").unsupported}
    res = run_family(gm, observe(gm, calibration_batches(None, ex), watch), "npu_b")
    assert dict(res.record.rule_hits) == {"exact": 5, "rowsum": 5, "pwl": 5, "product": 7}
    assert not _illegal_kinds(res.module, "npu_b") & {"pow", "mean", "rsqrt", "mul"}
    assert max_rel_error(_call(gm, ex), _call(res.module, ex)) < 2e-3


def test_pole_in_range_is_refused_and_second_run_is_a_no_op() -> None:
    model = Op(lambda a, b: torch.reciprocal(a))  # a crosses 0: 1/x has a pole there
    x = _x(2, 6, 8)
    gm = PassManager("canonicalize", canonicalize_passes()).run(ax.capture(model, (x,))).module
    ranges = observe(gm, calibration_batches(None, (x,)), {n.name for n in gm.graph.nodes})
    res = run_family(gm, ranges, "npu_a")
    assert not res.record.rule_hits
    assert all("pole" in r.reason for r in res.record.refusals)
    # idempotence: legalized output has nothing left for this family
    gm, ranges = prepared("div")
    once = run_family(gm, ranges, "npu_b")
    twice = run_family(once.module, ranges, "npu_b")
    assert not twice.record.rule_hits and not twice.modified


class _ExpAbs(nn.Module):
    def forward(self, x):
        return torch.exp(x.clamp(-4, 2)) + x.abs()


@pytest.mark.parametrize("target,fired,hist", [
    ("npu_a", {"pwl": 1, "relu_pair": 1},
     {"add": 1, "clamp": 1, "surrogate:abs": 1, "surrogate:exp": 1}),
    # dsp_c has exp as a lookup table: only abs is rewritten there
    ("dsp_c", {"relu_pair": 1}, {"add": 1, "clamp": 1, "exp": 1, "surrogate:abs": 1}),
])
def test_family_through_the_shared_helper(target, fired, hist):
    """exp → PWL (within 1e-3 of max|y| ≈ 10.8 on the calibrated range), |x| → the exact
    relu(x) + relu(−x); golden kinds; idempotent."""
    g = torch.Generator().manual_seed(0)
    before, res, p = run_one_family("elementwise", _ExpAbs(), (torch.randn(2, 6, 8, generator=g),),
                                target)
    assert_pass(res, before, fired=fired, hist=hist, atol=1.1e-2, rtol=0.0)
    assert_idempotent(p, res)

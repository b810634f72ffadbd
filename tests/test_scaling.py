"""Complexity guards for the pass pipeline (issue 6): what makes legalization time linear.

Not timings — the properties that keep it fast: a pipeline copies the graph once and never
re-runs it to learn shapes; shape propagation after a pass evaluates only the nodes the pass
touched (on meta tensors); identical sample-free PWL fits are solved once; surrogate bodies of
one structure are traced once; and the fast paths give exactly what the slow ones gave.
"""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import archnet_fx as ax
from archnet_fx.infra import graphpass as pm
from archnet_fx.infra import manager as mgr
from archnet_fx.ir.shapes import propagate_shapes, propagate_shapes_incremental
from archnet_fx.passes.layernorm import NormEmulation, fit_rsqrt
from archnet_fx.passes.softmax import SoftmaxPWL
from archnet_fx.surrogate.pwl import PWL
from archnet_fx.surrogate.products import Mul

shapes_mod = importlib.import_module("archnet_fx.ir.shapes")
legalize_mod = importlib.import_module("archnet_fx.legalize")
legality_mod = importlib.import_module("archnet_fx.legality")
pwl_mod = importlib.import_module("archnet_fx.surrogate.pwl")

pytestmark = pytest.mark.usefixtures("one_thread")


def _shapes(gm: torch.fx.GraphModule) -> dict[str, object]:
    """Shape and dtype of every node (what passes read; a replacement inherits these from the
    node it replaced, not its strides)."""
    def one(tm):
        if isinstance(tm, (tuple, list)):
            return tuple(one(t) for t in tm)
        if isinstance(tm, dict):
            return {k: one(v) for k, v in tm.items()}
        return (tuple(tm.shape), tm.dtype) if hasattr(tm, "shape") else tm
    return {n.name: one(n.meta.get("tensor_meta")) for n in gm.graph.nodes}


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


def test_legalize_copies_once_and_never_reruns_the_graph_for_shapes(bert_tiny, monkeypatch):
    _, ex, gm = bert_tiny
    copies = _Counter(pm.copy_graph_module)
    full = _Counter(propagate_shapes)
    monkeypatch.setattr(pm, "copy_graph_module", copies)
    monkeypatch.setattr(mgr, "copy_graph_module", copies)
    monkeypatch.setattr(pm, "propagate_shapes", full)
    legalize_mod.clear_caches()
    res = legalize_mod.legalize(gm, "npu_a", ex, verify=False)
    assert res.after.ok
    # One copy of the caller's graph for both pipelines (14 passes) and no whole-graph run:
    # capture recorded the shapes of one sample, and every pass updates only what it touched.
    assert copies.calls == 1
    assert full.calls == 0
    # ... and the shapes the passes left are the ones a full run on the example gives.
    incremental = _shapes(res.module)
    propagate_shapes(res.module, *pm.shape_example(res.module))
    assert _shapes(res.module) == incremental
    # The generated code is current (one recompile at the end).
    a, k = pm.shape_example(res.module)
    assert res.module(*a, **k) is not None


def test_incremental_propagation_evaluates_only_dirty_nodes():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    gm = ax.capture(model, (torch.randn(3, 8),))
    relu = next(n for n in gm.graph.nodes if n.meta.get("archnet.kind") == "relu")
    with gm.graph.inserting_after(relu):
        neg = gm.graph.call_function(torch.neg, (relu,))
    relu.replace_all_uses_with(neg, delete_user_cb=lambda u: u is not neg)
    user = next(iter(neg.users))
    done = propagate_shapes_incremental(gm, [neg])
    # The new node is evaluated, and its user (its input is new); the user's shape did not
    # change, so nothing after it is.
    assert done == [neg.name, user.name]
    # (capture records the shapes of one sample: batch 1, whatever the example's batch)
    assert tuple(neg.meta["tensor_meta"].shape) == (1, 16)
    # A node whose shape changes makes its users dirty too.
    with gm.graph.inserting_after(neg):
        cat = gm.graph.call_function(torch.cat, ([neg, neg], 0))
    neg.replace_all_uses_with(cat, delete_user_cb=lambda u: u is not cat)
    user = next(iter(cat.users))
    done = propagate_shapes_incremental(gm, [cat])
    assert done == [cat.name, user.name, next(iter(user.users)).name]
    assert tuple(user.meta["tensor_meta"].shape)[0] == 2
    # An input with no recorded shape: not possible, nothing changed, the caller runs it all.
    del relu.meta["tensor_meta"]
    before = dict(cat.meta)
    assert propagate_shapes_incremental(gm, [neg, cat]) is None
    assert cat.meta == before


def test_replacement_takes_the_replaced_nodes_shape_without_evaluation(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    ex = (torch.randn(1, 8),)  # batch 1: the capture's shapes are the shape example's
    gm = ax.capture(model, ex)
    evaluated = _Counter(shapes_mod._run_on_meta)
    full = _Counter(propagate_shapes)
    monkeypatch.setattr(shapes_mod, "_run_on_meta", evaluated)
    monkeypatch.setattr(pm, "propagate_shapes", full)
    res = legalize_mod.legalize(gm, "npu_a", ex, verify=False)
    sur = [n for n in res.module.graph.nodes if n.op == "call_module"
           and getattr(res.module.get_submodule(n.target), "archnet_surrogate", False)]
    assert len(sur) == 1 and tuple(sur[0].meta["tensor_meta"].shape) == (1, 16)
    assert evaluated.calls == 0 and full.calls == 0


def test_identical_sample_free_fits_are_solved_once(monkeypatch):
    legalize_mod.clear_caches()
    solves = _Counter(pwl_mod.solve_hinges)
    monkeypatch.setattr(pwl_mod, "solve_hinges", solves)
    monkeypatch.setattr(importlib.import_module("archnet_fx.passes.softmax"), "solve_hinges",
                        solves)
    a = PWL.fit(torch.reciprocal, None, 0.9, 135.0, knots=64, spacing="geometric")
    b = PWL.fit(torch.reciprocal, None, 0.9, 135.0, knots=64, spacing="geometric")
    assert solves.calls == 1
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
        assert p.data_ptr() != q.data_ptr()  # independent, trainable separately
    PWL.fit(torch.reciprocal, None, 0.9, 136.0, knots=64, spacing="geometric")
    assert solves.calls == 2  # another range: another fit
    s = torch.linspace(-3, 3, 1000)
    PWL.fit(torch.tanh, s, -3, 3, knots=8)
    PWL.fit(torch.tanh, s, -3, 3, knots=8)
    assert solves.calls == 4  # fits to samples are never shared
    # Log-softmax surrogates of one row length share their log(s) fit (a softmax's 1/s is
    # interpolated, PWL.convex_decreasing: no solve at all).
    SoftmaxPWL("log_softmax", 4, 128, -12.0, 16, None)
    SoftmaxPWL("log_softmax", 4, 128, -11.0, 16, None)
    assert solves.calls == 4 + 2 + 1  # two exp fits (per data), one log fit
    SoftmaxPWL("softmax", 4, 128, -10.0, 16, "mul")
    assert solves.calls == 4 + 2 + 1 + 1  # its exp fit only


def test_fast_quantiles_match_torch():
    g = torch.Generator().manual_seed(0)
    for n in (5, 1000, 250_001):
        v = torch.randn(n, generator=g, dtype=torch.float64) ** 3
        q = torch.linspace(0, 1, 18, dtype=torch.float64)[1:-1]
        assert torch.equal(pwl_mod.quantiles(v, q), torch.quantile(v, q))


def _norm(lo: float) -> NormEmulation:
    # 64 knots cover both ranges (fewer would add knots for the wider one: another structure)
    return NormEmulation("layer_norm", 32, True, "mean", Mul(), fit_rsqrt(lo, 10.0, 1e-12, 64),
                         torch.ones(32), torch.zeros(32))


def test_surrogate_bodies_of_one_structure_are_traced_once(monkeypatch):
    legalize_mod.clear_caches()
    traces = _Counter(legality_mod._trace)
    monkeypatch.setattr(legality_mod, "_trace", traces)
    a, b = _norm(0.1), _norm(0.2)  # same structure, other breakpoint values
    ba, bb = legality_mod.traced_body(a), legality_mod.traced_body(b)
    assert traces.calls == 1
    assert ba.graph is not bb.graph and str(ba.graph) == str(bb.graph)
    x = torch.randn(3, 32)
    fresh = torch.fx.GraphModule(b, traces.fn(b))  # (uncounted)
    assert torch.equal(bb(x), fresh(x))  # the shared trace runs on b's own weights
    assert not torch.equal(ba(x), bb(x))
    # A plain attribute that the graph bakes in (the exp floor) is a different structure.
    legality_mod.traced_body(SoftmaxPWL("softmax", 2, 8, -12.0, 4, "mul"))
    legality_mod.traced_body(SoftmaxPWL("softmax", 2, 8, -11.0, 4, "mul"))
    assert traces.calls == 3
    tgt = ax.load_target("npu_a")
    assert ax.check(ax.capture(nn.Sequential(a), (x,)), tgt).ok


def test_delete_unused_submodules_matches_torch():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 4)),
                          nn.Linear(4, 2))
    gm = ax.capture(model, (torch.randn(2, 4),))
    ref = pm.copy_graph_module(gm)
    ours = pm.copy_graph_module(gm)
    for g in (ref, ours):
        last = next(n for n in g.graph.nodes if n.op == "output")
        lin = [n for n in g.graph.nodes if n.op == "call_module"][-1]
        last.args = (lin.args[0],)
        g.graph.erase_node(lin)
    ref.delete_all_unused_submodules()
    pm._delete_unused_submodules(ours)
    assert [n for n, _ in ref.named_modules()] == [n for n, _ in ours.named_modules()]


def test_legalize_runs_on_one_thread_and_restores_the_setting(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    ex = (torch.randn(2, 8),)
    gm = ax.capture(model, ex)
    seen = []
    observe = legalize_mod.observe

    def spy(*a, **k):  # calibration: the largest tensor work legalization does
        seen.append(torch.get_num_threads())
        return observe(*a, **k)
    monkeypatch.setattr(legalize_mod, "observe", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        legalize_mod.legalize(gm, "npu_a", ex, verify=False)
        assert seen == [1] and torch.get_num_threads() == 2
        legalize_mod.legalize(gm, "npu_a", ex, verify=False, threads=None)
        assert seen == [1, 2]
        with pytest.raises(ValueError, match="threads"):
            legalize_mod.legalize(gm, "npu_a", ex, threads=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

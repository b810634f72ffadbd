"""Pass manager, pass records, verification, and the inspection instruments built on them."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import archnet_fx as ax
from archnet_fx.demo import zoo
from archnet_fx.infra.instruments import graph_to_networkx, pass_diff, records_table, write_dot
from archnet_fx.ir.opkinds import kind_histogram
from archnet_fx.passes.canonicalize import canonicalize_passes, drop_identity, fold_batchnorm
from archnet_fx.ir.meta import FROM_PASS_KEY, RULE_KEY
from archnet_fx.infra.graphpass import GraphPass
from archnet_fx.infra.manager import PassManager
from archnet_fx.infra.rules import RewritePass, Rule, refuse
from passtest import assert_idempotent, assert_pass, assert_unchanged, run_pass, snapshot


@pytest.fixture
def mlp():
    model, ex = zoo.get_model("mlp")
    return model, ex, ax.capture(model, ex)


# A rewrite table for tests: relu(x) = clamp(x, min=0) (exact), and a deliberately wrong rule.
def _match_relu(node, ctx):
    return node.args[0]


def _rank2_only(src, ctx):
    if ctx.shape(src) is not None and len(ctx.shape(src)) > 2:
        return "only rank-2 inputs"  # a refusal with its reason
    return None


RELU_TO_CLAMP = Rule("relu_to_clamp", frozenset({"relu"}), _match_relu,
                     lambda x, ctx: ctx.call_function(torch.clamp, (x,), {"min": 0.0}),
                     doc="relu(x) = clamp(x, min=0)", filter=_rank2_only)
WRONG = Rule("relu_to_neg", frozenset({"relu"}), lambda n, ctx: n.args[0],
             lambda x, ctx: ctx.call_function(torch.neg, (x,)), doc="deliberately wrong")


class Boom(GraphPass):
    name = "boom"

    def apply(self, gm, record):
        raise RuntimeError("boom went the pass")


# --------------------------------------------------------------------------- records

def test_record_of_a_rewrite_pass(mlp):
    model, ex, gm = mlp
    p = RewritePass([RELU_TO_CLAMP], name="relu_to_clamp")
    before, res = run_pass(p, gm)
    rec = res.record
    assert rec.name == "relu_to_clamp" and rec.modified and res.modified
    assert rec.rule_hits == {"relu_to_clamp": 2}
    assert sorted(rec.replaced) == ["_1", "_5"]  # the two nn.ReLU call nodes
    assert len(rec.created) == 2 and sorted(rec.erased) == ["_1", "_5"]
    assert rec.kinds_before == kind_histogram(gm)
    assert rec.kind_delta() == {"relu": -2, "clamp": 2}
    assert rec.seconds > 0 and rec.exact
    for name in rec.created:  # provenance
        node = next(n for n in res.module.graph.nodes if n.name == name)
        assert node.meta[FROM_PASS_KEY] == "relu_to_clamp"
        assert node.meta[RULE_KEY] == "relu_to_clamp"
        assert node.meta["nn_module_stack"] or node.meta.get("stack_trace") is not None
    assert_pass(res, before, fired={"relu_to_clamp": 2},
                hist={"linear": 3, "clamp": 2, "dropout": 1, "batch_norm": 1},
                atol=0.0, rtol=0.0)
    assert_idempotent(p, res)


def test_refusals_are_recorded_with_reasons():
    gm = ax.capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 3, 4),))
    before, res = run_pass(RewritePass([RELU_TO_CLAMP], name="r2c"), gm)
    assert_pass(res, before, fired={}, hist={"linear": 1, "relu": 1},
                refused={"relu_to_clamp": "only rank-2"}, atol=0.0, rtol=0.0)
    assert "only rank-2 inputs" in pass_diff(res.record)


def test_a_builder_refuses_by_raising_and_a_stray_string_is_a_bug():
    gm = ax.capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
    late = Rule("late", frozenset({"relu"}), _match_relu,
                lambda x, ctx: refuse("found out while building"))
    before, res = run_pass(RewritePass([late, RELU_TO_CLAMP], name="late"), gm)
    # the refusing rule is recorded, the next row of the table still fires
    assert_pass(res, before, fired={"relu_to_clamp": 1}, hist={"linear": 1, "clamp": 1},
                refused={"late": "found out while building"}, atol=0.0, rtol=0.0)
    stray = Rule("stray", frozenset({"relu"}), lambda n, ctx: "not a match object",
                 lambda x, ctx: x)
    with pytest.raises(ax.PipelineError, match="match returned a string"):
        ax.PassManager("p", [RewritePass([stray], name="stray")]).run(gm)


def test_pass_never_edits_its_input_even_when_it_changes_weights():
    model, ex = zoo.get_model("cnn")
    gm = ax.capture(model, ex)
    snap = snapshot(gm)
    weight_before = model.conv1.weight.detach().clone()
    res = fold_batchnorm()(gm)
    assert res.record.rule_hits == {"fold_bn": 2}
    assert_unchanged(gm, snap)
    assert torch.equal(model.conv1.weight, weight_before)  # nor the user's model
    assert res.module.conv1_bnfold.weight is not gm.conv1.weight


# --------------------------------------------------------------------------- manager

def test_pipeline_runs_records_and_keeps_input(mlp):
    model, ex, gm = mlp
    snap = snapshot(gm)
    res = PassManager("canon", canonicalize_passes(), verify=True, keep_stages=True).run(gm)
    assert_unchanged(gm, snap)
    names = [r.name for r in res.records]
    assert names == ["drop_identity", "index_to_view", "fold_constants", "fold_batchnorm",
                     "div_to_mul", "decompose_sdpa", "dce"]
    assert res.pipeline == "canon"
    assert len(res.stages) == len(names) + 1 and res.stages[0] is gm
    assert res.stages[-1] is res.module
    assert all(r.max_abs_error is not None and r.max_abs_error < 1e-5 for r in res.records)
    assert res.record("fold_batchnorm").rule_hits == {"fold_bn": 1}
    assert kind_histogram(res.module) == {"linear": 3, "relu": 2}
    with torch.no_grad():
        torch.testing.assert_close(res.module(*ex), model(*ex), atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="no pass named 'nope'.*drop_identity"):
        res.record("nope")


def test_verify_failure_names_passes_that_ran(mlp):
    _, _, gm = mlp
    snap = snapshot(gm)
    pm = PassManager("broken", [drop_identity(), RewritePass([WRONG], name="wrong")],
                     verify=True)
    with pytest.raises(ax.VerificationError) as ei:
        pm.run(gm)
    msg = str(ei.value)
    assert "pipeline 'broken': pass 'wrong' changed the numerics" in msg
    assert "passes that ran: ['drop_identity']" in msg
    assert isinstance(ei.value, ax.PipelineError)
    assert_unchanged(gm, snap)
    # without verification the same pipeline "succeeds": verification is what caught it
    assert PassManager("broken", [RewritePass([WRONG], name="wrong")]).run(gm).records


def test_approximate_pass_records_error_without_failing(mlp):
    _, _, gm = mlp
    res = PassManager("approx", [RewritePass([WRONG], name="approx", exact=False)],
                      verify=True).run(gm)
    assert res.records[0].max_abs_error > 0.1


def test_failing_pass_raises_pipeline_error(mlp):
    _, _, gm = mlp
    pm = PassManager("p", [drop_identity(), fold_batchnorm(), Boom()])
    with pytest.raises(ax.PipelineError) as ei:
        pm.run(gm)
    msg = str(ei.value)
    assert "pass 'boom' failed: RuntimeError: boom went the pass" in msg
    assert "passes that ran: ['drop_identity', 'fold_batchnorm']" in msg
    with pytest.raises(ax.PipelineError, match="passes that ran: none"):
        PassManager("p", [Boom()]).run(gm)


def test_canonicalize_needs_example_inputs_for_a_plain_model():
    with pytest.raises(ax.InputError, match="example_inputs"):
        ax.canonicalize(nn.Linear(2, 2))


# --------------------------------------------------------------------------- inspection

def test_records_table_and_pass_diff(mlp):
    _, _, gm = mlp
    res = ax.canonicalize(gm)
    table = res.diff()
    assert table == records_table(res.records)
    header = table.splitlines()[0]
    for col in ("pass", "changed", "+nodes", "-nodes", "replaced", "rule hits", "kind delta",
                "ms", "max|err|"):
        assert col in header
    for r in res.records:
        assert re.search(rf"^\| {r.name} +\| (yes|no) ", table, re.M), r.name
    assert "dropout_eval×1" in table and "batch_norm-1" in table

    detail = res.diff("fold_batchnorm")
    assert detail == pass_diff(res.record("fold_batchnorm"))
    assert detail.startswith("pass fold_batchnorm: modified in ")
    assert re.search(r"\| batch_norm +\| +1 \| +0 \| +-1 \|", detail)
    assert re.search(r"\| fold_bn +\| +1 \|", detail)
    assert "replaced: _4→" in detail
    assert "created (1): " in detail and "erased (2): " in detail
    assert res.diff("div_to_mul").startswith("pass div_to_mul: no change")


def test_dot_files(mlp, tmp_path):
    _, _, gm = mlp
    res = ax.canonicalize(gm)
    g = graph_to_networkx(res.module)
    created = res.record("fold_batchnorm").created[0]
    assert g.nodes[created]["from_pass"] == "fold_batchnorm"
    assert g.nodes[created]["kind"] == "linear" and g.nodes[created]["shape"][1:] == (64,)
    assert ("input_1", "_0") in g.edges  # placeholder -> first linear (guard node left out)
    assert "_guard_inputs" not in g
    path = write_dot(res.module, tmp_path / "sub" / "mlp.after.dot")
    text = path.read_text()
    assert text.startswith('digraph "mlp.after" {') and text.rstrip().endswith("}")
    assert re.search(rf'"{created}" \[label="{created}\\nlinear\\n\[\d+, 64\]", style=filled', text)
    assert text.count("->") == g.number_of_edges()
    assert not list((tmp_path / "sub").glob(".*.tmp"))  # atomic write leaves no temp file

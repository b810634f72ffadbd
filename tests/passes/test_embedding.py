"""Embedding / gather surrogates (passes/embedding.py).

Tolerance: every candidate is exact — onehot_linear adds one table row to exact zeros, so the
outputs are compared with atol = rtol = 1e-6 (observed: 0.0).
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from passtest import assert_pass, run_pass
from surrogate_check import (assert_body_legal, assert_grads_flow, forms, legalize_ok,
                             surrogates)
from torch import nn

import archnet_fx as ax
from archnet_fx.ir.meta import PROLOGUE_KEY
from archnet_fx.errors import UnsupportedOpError
from archnet_fx.legalize import legalize
from archnet_fx.surrogate.driver import LegalizeOptions, SurrogatePass
from archnet_fx.passes.embedding import CANDIDATES, OneHotLinear
from archnet_fx.passes.canonicalize import canonicalize_passes
from archnet_fx.infra.manager import PassManager

TOL = dict(atol=1e-6, rtol=1e-6)
V, D, L = 5000, 8, 6


def emb_pass(target: str, **opts) -> SurrogatePass:
    return SurrogatePass("embedding", CANDIDATES, ax.load_target(target), {},
                         LegalizeOptions(**opts))


def ids(batch: int, seed: int = 0) -> torch.Tensor:
    t = torch.randint(0, V, (batch, L), generator=torch.Generator().manual_seed(seed))
    t[:, -2:] = 0  # padding positions
    return t


class ModuleForm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)  # row 0 is zero

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.emb(i)


class FunctionalForm(ModuleForm):
    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return F.embedding(i, self.emb.weight, padding_idx=0)


class IndexSelect(ModuleForm):
    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return torch.index_select(self.emb.weight, 0, i.flatten()).view(-1, L, D)


class Positions(nn.Module):
    """Token table on input ids plus a position table on a constant arange slice (HF-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(100, D)
        self.pos = nn.Embedding(32, D)
        self.register_buffer("position_ids", torch.arange(32).unsqueeze(0))

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.tok(i) + self.pos(self.position_ids[:, :L])


@pytest.fixture(scope="module")
def graphs() -> dict[str, torch.fx.GraphModule]:
    g = forms(ModuleForm(), FunctionalForm(), (ids(2),))
    g["index_select"] = ax.capture(IndexSelect(), (ids(2),), method="export")
    return g


@pytest.mark.parametrize("target", ["npu_a", "npu_b"])
@pytest.mark.parametrize("form", ["module", "functional", "aten", "index_select"])
def test_onehot_exact_legal_and_fires(graphs, form, target):
    before, res = run_pass(emb_pass(target), graphs[form])
    chunks = {"npu_a": 1, "npu_b": 3}[target]  # 5000 rows: ≤ 8192 / ≤ 2048 per linear
    assert_pass(res, before, (ids(3, seed=1),), fired={"onehot_linear": 1}, **TOL,
                hist={"reshape": 1 + (form == "index_select") * 2, "compare": 1, "cast": 1,
                      "surrogate:gather" if form == "index_select" else "surrogate:embedding": 1})
    gm = res.module
    rep = ax.check(gm, target)
    assert rep.ok and not rep.host_fallback_counts, rep
    body = {"linear": chunks, "slice": chunks if chunks > 1 else 0, "add": chunks - 1}
    assert +rep.on_chip_counts == +Counter(body) + Counter(
        {"reshape": 1} if form == "index_select" else {})
    # the one-hot is host prologue, not on-chip work
    assert {"compare": 1, "cast": 1}.items() <= rep.prologue_counts.items()
    assert "compare" not in rep.on_chip_counts and "cast" not in rep.on_chip_counts
    (sur,) = surrogates(gm)
    assert isinstance(sur, OneHotLinear) and len(sur.parts) == chunks
    assert all(p.in_features <= ax.load_target(target).limits("linear").max_channels
               for p in sur.parts)
    assert_body_legal(sur, target)
    ref = graphs[form]
    for b in (1, 3):
        x = ids(b, seed=b)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), ref(x), **TOL)
            assert gm(x)[:, -2:].abs().max() == 0  # padding rows stay the zero row
    assert torch.equal(sur.table(), ref.state_dict()[next(k for k in ref.state_dict()
                                                           if "weight" in k)])
    assert_grads_flow(gm, (ids(2),))


def test_not_on_dsp_c(graphs):
    for form in ("module", "aten", "index_select"):
        before, res = run_pass(emb_pass("dsp_c"), graphs[form])
        assert_pass(res, before, fired={}, hist=None, **TOL)


def test_const_rows_positions():
    model = Positions()
    res = legalize_ok(model, (ids(2) % 100,), "npu_b")
    assert res.choices == {"tok": "onehot_linear", "pos": "const_rows"}
    gm = res.module
    rows = [p for n, p in gm.named_parameters() if "rows" in n]
    assert len(rows) == 1 and rows[0].shape == (1, L, D)  # broadcast over the batch by the add
    for b in (1, 3):
        x = ids(b, seed=b) % 100
        with torch.no_grad():
            torch.testing.assert_close(gm(x), model(x), **TOL)
    gm.train()
    gm(ids(2) % 100).pow(2).sum().backward()
    assert rows[0].grad is not None and rows[0].grad.abs().max() > 0
    assert all(p.grad is not None for s in surrogates(gm) for p in s.parameters())


def test_host_lookup_only_when_chosen(graphs):
    before, res = run_pass(emb_pass("npu_a", choices={"embedding": "host_lookup"}),
                           graphs["module"])
    assert_pass(res, before, fired={"host_lookup": 1}, hist={"embedding": 1}, **TOL)
    rep = ax.check(res.module, "npu_a")
    assert rep.ok and rep.prologue_counts["embedding"] == 1 and not rep.on_chip_counts
    (node,) = [n for n in res.module.graph.nodes if n.meta.get(PROLOGUE_KEY)]
    assert node.meta["archnet.rule"] == "host_lookup"


def test_max_norm_refused():
    model = nn.Sequential(nn.Embedding(50, D, max_norm=1.0))
    x = torch.randint(0, 50, (2, L))
    before, res = run_pass(emb_pass("npu_a"), model, (x,))
    assert_pass(res, before, fired={}, hist=None, **TOL,
                refused={"onehot_linear": "max_norm", "host_lookup": "only when chosen",
                         "const_rows": "depend on a graph input"})
    with pytest.raises(UnsupportedOpError, match="embedding"):
        legalize(model, "npu_a", (x,))


def test_gather_along_axis_not_a_lookup():
    class Gather(nn.Module):
        def forward(self, x, i):
            return torch.gather(x, 1, i)
    ex = (torch.randn(2, 5), torch.randint(0, 5, (2, 3)))
    before, res = run_pass(emb_pass("npu_a"), Gather(), ex)
    assert_pass(res, before, fired={}, hist=None, **TOL,
                refused={"onehot_linear": "not a row lookup"})


def test_idempotent(graphs):
    _, res = run_pass(emb_pass("npu_b"), graphs["aten"])
    again = emb_pass("npu_b")(res.module)
    assert not again.modified and not again.record.rule_hits


@pytest.fixture(scope="module")
def bert_tiny():
    from archnet_fx.demo import zoo
    model, ex = zoo.get_model("bert_tiny", 2)
    return model, ex, ax.capture(model, ex)


def test_bert_tiny_embeddings_exact(bert_tiny):
    model, ex, gm = bert_tiny
    canon = PassManager("canonicalize", canonicalize_passes()).run(gm).module
    res = emb_pass("npu_b")(canon)
    assert +res.record.rule_hits == {"onehot_linear": 2, "const_rows": 1}  # word, type; position
    rep = ax.check(res.module, "npu_b")
    assert not {"embedding", "gather"} & (set(rep.unsupported_counts) | set(rep.on_chip_counts))
    from archnet_fx.demo import zoo
    for b in (1, 3):
        x = zoo._bert_tiny_inputs(b)
        with torch.no_grad():
            torch.testing.assert_close(res.module(**x)[0], model(**x).last_hidden_state,
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("target", ["npu_a"])  # npu_b: the embedding pass alone, above
def test_bert_tiny_legalized_no_lookup_on_chip(bert_tiny, target):
    _, ex, gm = bert_tiny
    res = legalize(gm, target, ex, allow_host_fallback=True)
    rep = ax.check(res.module, target)
    lookups = {"embedding", "gather"}
    assert not lookups & set(rep.unsupported_counts) and not lookups & set(rep.on_chip_counts)
    assert not lookups & set(rep.host_fallback_counts)
    assert {k: res.choices[k] for k in ("embedding", "embedding_1", "embedding_2")} == {
        "embedding": "onehot_linear", "embedding_1": "onehot_linear",
        "embedding_2": "const_rows"}
    onehot = [n.name for n in res.module.graph.nodes
              if n.meta.get("archnet.rule") == "onehot_linear" and n.op == "call_function"]
    assert len(onehot) == 6  # unsqueeze, eq, to per id input
    status = {v.node: v.status for v in rep.verdicts}
    assert all(status[n] == "prologue" for n in onehot)
    assert rep.prologue_counts["compare"] >= 2 and "host prologue" in rep.table()

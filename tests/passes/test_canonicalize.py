"""Canonicalization passes (passes/canonicalize.py), each on fx and torch.export graphs.

Every pass test states its numerical tolerance, checks a golden op-kind histogram, that the rule
fired (with its count), a case where it must not fire, and idempotence (see tests/passtest.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import archnet_fx as ax
from archnet_fx.ir.meta import CAPTURE_META_KEY, EXAMPLE_META_KEY
from archnet_fx.capture import CaptureInfo
from archnet_fx.ir.shapes import propagate_shapes
from archnet_fx.ir.opkinds import annotate_kinds, kind_histogram
from archnet_fx.passes.canonicalize import (DeadCodeElimination, FoldConstants,
                                            canonicalize_passes, decompose_sdpa, div_to_mul,
                                            drop_identity, fold_batchnorm, index_to_view)
from passtest import assert_idempotent, assert_pass, run_pass

METHODS = ["fx", "export"]
# Exact rewrites (dropping no-ops, DCE, constant folding evaluate the very same ops).
EXACT = dict(atol=0.0, rtol=0.0)
# Re-associated float arithmetic (BN folded into weights, x*(1/c), decomposed attention).
FLOAT = dict(atol=1e-5, rtol=1e-5)


def _seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


def _randomize_bn(*bns):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b in bns:
            b.running_mean.copy_(torch.rand(b.num_features, generator=g) - 0.5)
            b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
            b.weight.copy_(torch.rand(b.num_features, generator=g) + 0.5)
            b.bias.copy_(torch.rand(b.num_features, generator=g) - 0.5)


# --------------------------------------------------------------------------- drop_identity

class Identities(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()

    def forward(self, x):
        y = self.ident(self.drop(self.lin(x)))
        y = y.clone().detach().to(torch.float32)
        y = F.dropout(y, 0.3, training=False)
        return y.contiguous().relu()


@pytest.mark.parametrize("method", METHODS)
def test_drop_identity_fires(method):
    before, res = run_pass(drop_identity(), _seeded(Identities), (torch.randn(3, 8),),
                           method=method)
    if method == "fx":  # Dropout, F.dropout; Identity, clone, detach; to(float32)
        fired = {"dropout_eval": 2, "identity": 3, "noop_cast": 1}
        # contiguous() is refused: a later view() may need the layout.
        hist = {"linear": 1, "identity": 1, "relu": 1}
        refused = {"identity": "contiguous()"}
    else:  # export already drops nn.Identity and the no-op contiguous()
        fired = {"dropout_eval": 2, "identity": 2, "noop_cast": 1}
        hist = {"linear": 1, "relu": 1}
        refused = None
    assert kind_histogram(before)["dropout"] == 2
    assert_pass(res, before, fired=fired, hist=hist, refused=refused, **EXACT)
    assert_idempotent(drop_identity(), res)


class RealCasts(nn.Module):
    def forward(self, x):
        return (x.to(torch.float64) * 2).to(torch.float32)


class CopyThenWrite(nn.Module):
    """clone() is not an alias when the copy is written in place."""

    def forward(self, x):
        h = x * 1
        y = h.clone()
        h.view(-1).mul_(2)
        return h + y


@pytest.mark.parametrize("method", METHODS)
def test_drop_identity_must_not_fire(method):
    before, res = run_pass(drop_identity(), RealCasts(), (torch.randn(2, 5),), method=method)
    assert_pass(res, before, fired={}, hist={"cast": 2, "mul": 1}, **EXACT)

    before, res = run_pass(drop_identity(), CopyThenWrite(), (torch.randn(2, 5),), method=method)
    assert_pass(res, before, fired={}, hist={"mul": 2, "identity": 1, "reshape": 1, "add": 1},
                refused={"identity": "written in place"}, **EXACT)


def test_drop_identity_train_mode_model_captured_as_eval():
    from archnet_fx.demo import zoo
    model, ex = zoo.get_model("mlp")
    model.train()
    before, res = run_pass(drop_identity(), model, ex)
    assert model.training  # the caller's flag is untouched
    assert_pass(res, before, fired={"dropout_eval": 1},
                hist={"linear": 3, "relu": 2, "batch_norm": 1}, **EXACT)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(res.module(*ex), model(*ex), atol=0, rtol=0)


# --------------------------------------------------------------------------- fold_constants

class Constants(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("pos", torch.arange(16.0))
        self.frozen = nn.Parameter(torch.linspace(-1, 1, 4), requires_grad=False)
        self.w = nn.Parameter(torch.linspace(0, 1, 4))

    def forward(self, x):
        # frozen.exp() and pos[:4]*2+1 depend on no input; w*3 is trainable and must stay.
        return x + (self.pos[:4] * 2 + 1) + self.frozen.exp() + self.w * 3


@pytest.mark.parametrize("method", METHODS)
def test_fold_constants_fires(method):
    before, res = run_pass(FoldConstants(), Constants(), (torch.randn(2, 4),), method=method)
    # fx evaluates buffer arithmetic while tracing (a _tensor_constant), so only the frozen
    # parameter's exp() is left to fold; export keeps both constant subgraphs. Either way the
    # result is x + c0 + c1 + w*3.
    if method == "fx":
        assert kind_histogram(before) == {"add": 3, "exp": 1, "mul": 1}
    else:
        assert kind_histogram(before) == {"slice": 1, "mul": 2, "add": 4, "exp": 1}
    assert_pass(res, before, fired={"fold_constant": 2 if method == "export" else 1},
                hist={"add": 3, "mul": 1}, **EXACT)
    # The trainable parameter is still a trainable parameter read by the graph; the folded
    # values are buffers, not parameters.
    params = dict(res.module.named_parameters())
    assert [n for n in params if n.endswith("w")] and all(p.requires_grad for p in params.values())
    assert_idempotent(FoldConstants(), res)


class OnlyTrainable(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0, 1, 4))

    def forward(self, x):
        return x + self.w * 3


@pytest.mark.parametrize("method", METHODS)
def test_fold_constants_must_not_fire_on_trainable(method):
    before, res = run_pass(FoldConstants(), OnlyTrainable(), (torch.randn(2, 4),), method=method)
    assert_pass(res, before, fired={}, hist={"add": 1, "mul": 1}, **EXACT)


# --------------------------------------------------------------------------- fold_batchnorm

class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.lin = nn.Linear(8, 4, bias=False)
        self.bn1 = nn.BatchNorm1d(4)
        _randomize_bn(self.bn, self.bn1)

    def forward(self, x):
        y = self.bn(self.conv(x)).relu().mean((2, 3))
        return self.bn1(self.lin(y))


@pytest.mark.parametrize("method", METHODS)
def test_fold_batchnorm_fires(method):
    before, res = run_pass(fold_batchnorm(), _seeded(ConvBN), (torch.randn(2, 3, 8, 8),),
                           method=method)
    assert_pass(res, before, fired={"fold_bn": 2},
                hist={"conv": 1, "relu": 1, "mean": 1, "linear": 1}, **FLOAT)
    assert_idempotent(fold_batchnorm(), res)


class FunctionalConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.cw = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.register_buffer("rm", torch.rand(8) - 0.5)
        self.register_buffer("rv", torch.rand(8) + 0.5)
        self.g = nn.Parameter(torch.rand(8) + 0.5)
        self.b = nn.Parameter(torch.rand(8))

    def forward(self, x):
        return F.batch_norm(F.conv2d(x, self.cw), self.rm, self.rv, self.g, self.b, False, 0.1,
                            1e-5)


def test_fold_batchnorm_functional_fx():
    # F.conv2d / F.batch_norm calls (overloaded builtins) are read by name, not position.
    before, res = run_pass(fold_batchnorm(), _seeded(FunctionalConvBN),
                           (torch.randn(2, 3, 8, 8),), method="fx")
    assert_pass(res, before, fired={"fold_bn": 1}, hist={"conv": 1}, **FLOAT)


def _aten_core(model, example):
    """An ATen core-IR GraphModule (BN as a tuple-returning op), as capture would annotate it."""
    ep = torch.export.export(model, example).run_decompositions()
    gm = ep.module()
    gm.meta[EXAMPLE_META_KEY] = (example, {})
    gm.meta[CAPTURE_META_KEY] = CaptureInfo("export", ("x",), False, (), type(model).__name__)
    propagate_shapes(gm, example, {})
    annotate_kinds(gm)
    return gm


def test_fold_batchnorm_aten_tuple_form():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    _randomize_bn(model[1])
    gm = _aten_core(model, (torch.randn(2, 3, 8, 8),))
    assert kind_histogram(gm) == {"conv": 1, "batch_norm": 1, "relu": 1}
    before, res = run_pass(fold_batchnorm(), gm)
    # folded at getitem(bn, 0), leaving no getitem/slice of the conv output behind
    assert_pass(res, before, fired={"fold_bn_tuple": 1}, hist={"conv": 1, "relu": 1}, **FLOAT)
    assert_idempotent(fold_batchnorm(), res)


class BNNotFoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.lin = nn.Linear(8, 4)
        self.bn1 = nn.BatchNorm1d(4)
        _randomize_bn(self.bn, self.bn2, self.bn1)

    def forward(self, x):
        y = self.conv(x)
        a = self.bn(y) + y             # conv output has a second user
        b = self.bn2(y.relu())         # BN after a ReLU, not after conv/linear
        t = a.flatten(2)[:, :, :4]     # (B, 8, 4)
        t = t.transpose(1, 2)          # (B, 4, 8)
        c = self.bn1(self.lin(t))      # (B, 4, 4): BN1d normalizes dim 1, not the features
        return b, c


@pytest.mark.parametrize("method", METHODS)
def test_fold_batchnorm_must_not_fire(method):
    before, res = run_pass(fold_batchnorm(), _seeded(BNNotFoldable), (torch.randn(2, 3, 8, 8),),
                           method=method)
    hist = kind_histogram(before)
    assert hist["batch_norm"] == 3
    assert_pass(res, before, fired={}, hist=hist, **EXACT,
                refused={"fold_bn": "other users"})
    reasons = " ".join(f.reason for f in res.record.refusals)
    assert "rank != 2" in reasons


# --------------------------------------------------------------------------- div_to_mul

class Divs(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.tensor([2.0, 4.0, 8.0, 0.5]))
        self.p = nn.Parameter(torch.rand(4) + 1)

    def forward(self, x, y):
        return (x / 3.0,                                      # fires
                torch.div(x, self.c),                        # fires (constant buffer)
                x / y,                                       # two activations: no
                x / self.p,                                  # trainable divisor: refused
                torch.div(x, 2.0, rounding_mode="floor"))    # rounding: refused


@pytest.mark.parametrize("method", METHODS)
def test_div_to_mul(method):
    ex = (torch.randn(2, 4), torch.rand(2, 4) + 1)
    before, res = run_pass(div_to_mul(), Divs(), ex, method=method)
    assert_pass(res, before, fired={"div_const": 2}, hist={"mul": 2, "div": 3},
                refused={"div_const": "trainable"}, **FLOAT)
    reasons = " ".join(f.reason for f in res.record.refusals)
    assert "rounding mode" in reasons
    assert_idempotent(div_to_mul(), res)


class DivByActivation(nn.Module):
    def forward(self, x, y):
        return x / y, x / (y + 1)


def test_div_to_mul_must_not_fire():
    before, res = run_pass(div_to_mul(), DivByActivation(), (torch.randn(2, 4), torch.rand(2, 4) + 1))
    assert_pass(res, before, fired={}, hist={"div": 2, "add": 1}, **EXACT)


class DivBy(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x / self.c


@settings(max_examples=15, deadline=None)
@given(c=st.floats(min_value=1e-3, max_value=1e3).flatmap(lambda v: st.sampled_from([v, -v])),
       batch=st.integers(1, 4), width=st.integers(1, 6))
def test_div_to_mul_random_constants(c, batch, width):
    before, res = run_pass(div_to_mul(), DivBy(c), (torch.randn(batch, width),), method="fx")
    # x * (1/c) vs x / c: at most a couple of ulps apart
    assert_pass(res, before, fired={"div_const": 1}, hist={"mul": 1}, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- index_to_view


class MaskIndex(nn.Module):
    """transformers' padding mask: ``mask[b_idx, kv_idx]`` over aranges of the whole dims."""

    def forward(self, x, mask):
        b = torch.arange(x.shape[0])[:, None, None, None]
        kv = torch.arange(mask.shape[1])[None, None, None, :] + 0
        m = mask.to(torch.bool)[b, kv]                      # (B, 1, 1, L)
        return x * m.to(x.dtype)


class SwappedIndex(nn.Module):
    """Indices along swapped axes: ``t[i, j]`` with i along axis 1, j along axis 0 = t.T."""

    def forward(self, t):
        i = torch.arange(t.shape[0])[None, :]
        j = torch.arange(t.shape[1])[:, None]
        return t[i, j] * 2.0


class PrefixIndex(nn.Module):
    """``t[:, arange(3)]`` (as two aranges): a prefix of dim 1, not all of it — a real gather,
    kept."""

    def forward(self, t):
        return t[torch.arange(t.shape[0])[:, None], torch.arange(3)[None, :]] + 1.0


def test_index_to_view_removes_the_padding_mask_gather():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 5, 7, generator=g)
    mask = (torch.rand(3, 7, generator=g) > 0.3).long()
    before, res = run_pass(index_to_view(), MaskIndex(), (x, mask), method="export")
    assert kind_histogram(before)["gather"] == 1
    assert_pass(res, before, fired={"index_arange_to_view": 1}, hist=None, **EXACT)
    hist = kind_histogram(res.module)
    assert hist["gather"] == 0 and hist["reshape"] >= 2  # two unsqueezes
    # other batch sizes too (the batch arange is symbolic)
    for b in (1, 5):
        xb, mb = torch.randn(b, 2, 5, 7), (torch.rand(b, 7) > 0.5).long()
        torch.testing.assert_close(res.module(xb, mb), MaskIndex()(xb, mb), atol=0, rtol=0)
    assert_idempotent(index_to_view(), res)


def test_index_to_view_permutes_swapped_axes():
    t = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    before, res = run_pass(index_to_view(), SwappedIndex(), (t,), method="export")
    assert_pass(res, before, fired={"index_arange_to_view": 1}, hist=None, **EXACT)
    assert kind_histogram(res.module)["gather"] == 0
    assert kind_histogram(res.module)["permute"] == 1


def test_index_to_view_keeps_a_partial_index():
    t = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    before, res = run_pass(index_to_view(), PrefixIndex(), (t,), method="export")
    assert_pass(res, before, fired={}, hist=None, refused={"index_arange_to_view": "not the whole"},
                **EXACT)
    assert kind_histogram(res.module)["gather"] == 1


# --------------------------------------------------------------------------- decompose_sdpa

class Attn(nn.Module):
    def forward(self, q, k, v, mask):
        return (F.scaled_dot_product_attention(q, k, v, attn_mask=mask),   # bool mask
                F.scaled_dot_product_attention(q, k, v, is_causal=True),
                F.scaled_dot_product_attention(q, k, v, scale=0.3))


def _qkv(heads_kv: int = 4):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k = torch.randn(2, heads_kv, 6, 8, generator=g)
    v = torch.randn(2, heads_kv, 6, 8, generator=g)
    return q, k, v


@pytest.mark.parametrize("method", METHODS)
def test_decompose_sdpa(method):
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    before, res = run_pass(decompose_sdpa(), Attn(), (q, k, v, mask), method=method)
    # each sdpa: transpose k, q@k^T, *scale, softmax, @v; bool mask -> where + add; causal -> add
    assert_pass(res, before, fired={"decompose_sdpa": 3},
                hist={"permute": 3, "matmul": 6, "mul": 3, "where": 1, "add": 2, "softmax": 3},
                **FLOAT)
    assert "sdpa" not in kind_histogram(res.module)
    assert_idempotent(decompose_sdpa(), res)


class GQA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


@pytest.mark.parametrize("method", METHODS)
def test_decompose_sdpa_must_not_fire_on_gqa(method):
    before, res = run_pass(decompose_sdpa(), GQA(), _qkv(heads_kv=2), method=method)
    assert_pass(res, before, fired={}, hist={"sdpa": 1}, refused={"decompose_sdpa": "grouped"},
                **EXACT)


def test_decompose_sdpa_in_transformer_encoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True).eval()
    before, res = run_pass(decompose_sdpa(), layer, (torch.randn(2, 10, 32),))
    assert before.meta["archnet.capture"].method == "export"
    assert_pass(res, before, fired={"decompose_sdpa": 1}, hist=None, **FLOAT)
    h = kind_histogram(res.module)
    assert h["sdpa"] == 0 and h["softmax"] == 1


# --------------------------------------------------------------------------- dce

class Dead(nn.Module):
    def forward(self, x):
        b, n = x.shape
        unused = x * 2  # noqa: F841
        return x + 1


class InPlaceWrite(nn.Module):
    def forward(self, x):
        h = x * 1
        h.add_(1)  # result unused, but the write must survive DCE
        return h + x


@pytest.mark.parametrize("method", METHODS)
def test_dce(method):
    before, res = run_pass(DeadCodeElimination(), Dead(), (torch.randn(2, 4),), method=method)
    # fx: x.shape (getattr), two getitems, x*2; export: x*2 (sizes are already symbolic)
    assert_pass(res, before, fired={"dead_node": 4 if method == "fx" else 1}, hist={"add": 1},
                **EXACT)
    assert_idempotent(DeadCodeElimination(), res)


@pytest.mark.parametrize("method", METHODS)
def test_dce_must_not_fire(method):
    before, res = run_pass(DeadCodeElimination(), InPlaceWrite(), (torch.randn(2, 4),),
                           method=method)
    assert_pass(res, before, fired={}, hist={"mul": 1, "add": 2}, **EXACT)


def test_other_passes_leave_dead_code_to_dce():
    """A pass records only what it did: dead code it was given is the dce pass's to remove."""
    before, res = run_pass(drop_identity(), Dead(), (torch.randn(2, 4),), method="fx")
    assert_pass(res, before, fired={}, hist={"mul": 1, "add": 1}, **EXACT)


# --------------------------------------------------------------------------- the pipeline

def test_canonicalize_pipeline_on_cnn():
    from archnet_fx.demo import zoo
    model, ex = zoo.get_model("cnn")
    res = ax.canonicalize(model, ex)
    assert [r.name for r in res.records] == [p.name for p in canonicalize_passes()]
    assert res.record("fold_batchnorm").rule_hits == {"fold_bn": 2}
    assert kind_histogram(res.module) == {"conv": 2, "relu": 2, "max_pool": 1,
                                          "adaptive_avg_pool": 1, "reshape": 1, "linear": 1}
    with torch.no_grad():
        torch.testing.assert_close(res.module(*ex), model(*ex), atol=1e-5, rtol=1e-5)
    assert ax.check(res.module, "npu_b").ok


def test_canonicalize_bert_tiny(bert_tiny):
    model, ex, gm = bert_tiny
    assert gm.meta["archnet.capture"].method == "export"
    res = ax.canonicalize(gm)  # verify=True: each pass checked numerically
    hits = {r.name: dict(r.rule_hits) for r in res.records}
    assert hits["drop_identity"] == {"dropout_eval": 7, "noop_cast": 2}
    # the padding mask's index over two aranges becomes a view (its constant key arange, no
    # longer used, is not folded)
    assert hits["index_to_view"] == {"index_arange_to_view": 1}
    assert hits["fold_constants"] == {"fold_constant": 4}
    assert hits["dce"] == {"dead_node": 5}
    assert hits["fold_batchnorm"] == hits["div_to_mul"] == hits["decompose_sdpa"] == {}
    h = kind_histogram(res.module)
    assert h["dropout"] == 0 and h["layer_norm"] == 5 and h["softmax"] == 2 and h["linear"] == 13
    assert h["gather"] == 0
    with torch.no_grad():
        want = model(**ex).last_hidden_state
        got = res.module(**ex).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # idempotent as a whole
    again = ax.canonicalize(res.module, verify=False)
    assert not any(r.modified for r in again.records)

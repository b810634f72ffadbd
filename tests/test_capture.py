"""capture(): fx first, torch.export fallback, dynamic batch, input checks, one clear error."""
from __future__ import annotations

import inspect
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import archnet_fx as ax
from archnet_fx.demo import zoo
from archnet_fx.ir.meta import CAPTURE_META_KEY, EXAMPLE_META_KEY
from archnet_fx.ir.meta import KIND_META_KEY
from archnet_fx.ir.opkinds import kind_histogram

TOL = dict(atol=1e-5, rtol=1e-5)  # captured graph vs eager model, float32


def _run(m, inputs):
    with torch.no_grad():
        out = m(**inputs) if isinstance(inputs, dict) else m(*inputs)
    return getattr(out, "last_hidden_state", out)


# --------------------------------------------------------------------------- torch-native models

@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_fx_capture_of_zoo_models(name):
    model, ex = zoo.get_model(name)
    gm = ax.capture(model, ex)
    assert isinstance(gm, torch.fx.GraphModule)
    info = gm.meta[CAPTURE_META_KEY]
    assert info.method == "fx" and info.fx_error is None
    torch.testing.assert_close(_run(gm, ex), _run(model, ex), **TOL)
    # every node carries its op kind and (where it is a tensor) its shape
    for n in gm.graph.nodes:
        assert KIND_META_KEY in n.meta
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_module")
    # any batch size
    for b in (1, 5):
        _, exb = zoo.get_model(name, batch_size=b)
        torch.testing.assert_close(_run(gm, exb), _run(model, exb), **TOL)


def test_capture_records_the_shapes_of_one_sample():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ex = (torch.randn(6, 8),)
    gm = ax.capture(model, ex)
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
              if hasattr(n.meta.get("tensor_meta"), "shape")}
    # Dynamic batch: every recorded shape is per sample (batch 1); the example keeps all 6.
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert shapes[ph.name] == (1, 8)
    assert all(s[0] == 1 for s in shapes.values() if s), shapes
    assert (1, 16) in shapes.values() and (1, 4) in shapes.values()
    args, _ = gm.meta[EXAMPLE_META_KEY]
    assert args[0].shape == (6, 8)
    assert gm(torch.randn(6, 8)).shape == (6, 4)


def test_transformer_encoder_layer_falls_back_to_export():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    layer.train()  # dropout active in the caller's model: capture treats it as eval
    x = torch.randn(2, 10, 32)
    gm = ax.capture(layer, (x,))
    info = gm.meta[CAPTURE_META_KEY]
    assert info.method == "export" and info.fx_error  # why fx failed is kept
    assert layer.training
    hist = kind_histogram(gm)
    assert hist["layer_norm"] == 2 and hist["linear"] == 4 and hist["sdpa"] == 1
    layer.eval()
    for b in (1, 2, 5):
        xb = torch.randn(b, 10, 32)
        torch.testing.assert_close(_run(gm, (xb,)), _run(layer, (xb,)), **TOL)
    with pytest.raises(ax.InputError, match=r"\(batch, 10, 32\)"):
        gm(torch.randn(2, 11, 32))


def test_transformer_encoder_layer_dict_inputs_with_mask_batch1_example():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    x = torch.randn(1, 10, 32)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, -3:] = True
    gm = ax.capture(layer, {"src": x, "src_key_padding_mask": mask})
    info = gm.meta[CAPTURE_META_KEY]
    assert info.kwargs_call and info.input_names == ("src", "src_key_padding_mask")
    assert [s.batched for s in info.specs] == [True, True]
    # captured on a batch of one, still runs any batch
    x3, m3 = torch.randn(3, 10, 32), torch.zeros(3, 10, dtype=torch.bool)
    m3[1, -4:] = True
    torch.testing.assert_close(gm(src=x3, src_key_padding_mask=m3),
                               _run(layer, {"src": x3, "src_key_padding_mask": m3}), **TOL)


# --------------------------------------------------------------------------- HF BERT (export)

def test_bert_tiny_captures_via_export(bert_tiny):
    model, ex, gm = bert_tiny
    info = gm.meta[CAPTURE_META_KEY]
    assert info.method == "export"
    assert info.fx_error  # transformers 5.x is not symbolically traceable
    assert info.kwargs_call and info.input_names == ("input_ids", "token_type_ids",
                                                     "attention_mask")
    torch.testing.assert_close(_run(gm, ex), _run(model, ex), **TOL)
    hist = kind_histogram(gm)
    assert hist["embedding"] == 3 and hist["layer_norm"] == 5 and hist["softmax"] == 2
    assert not any(k.startswith("unknown:") for k in hist)
    for b in (1, 3):
        exb = zoo.MODELS["bert_tiny"].example_inputs(b)
        torch.testing.assert_close(_run(gm, exb), _run(model, exb), **TOL)


def test_bert_tiny_wrong_sequence_length(bert_tiny):
    _, ex, gm = bert_tiny
    bad = {k: torch.cat([v, v[:, :3]], 1) for k, v in ex.items()}  # length 19, not 16
    with pytest.raises(ax.InputError, match=r"input_ids.*\(batch, 16\)"):
        _run(gm, bad)


# --------------------------------------------------------------------------- input forms

class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(3, 4)

    def forward(self, x, y):
        return self.a(x) * self.b(y)


def test_tuple_and_dict_example_inputs_agree():
    torch.manual_seed(0)
    m = TwoInputs().eval()
    x, y = torch.randn(2, 6), torch.randn(2, 3)
    g_tuple = ax.capture(m, (x, y))
    g_dict = ax.capture(m, {"x": x, "y": y})
    g_tensor = ax.capture(nn.Linear(6, 4), x)  # a lone tensor is a 1-tuple
    assert g_tensor(x).shape == (2, 4)
    assert not g_tuple.meta[CAPTURE_META_KEY].kwargs_call
    assert g_dict.meta[CAPTURE_META_KEY].kwargs_call
    want = _run(m, (x, y))
    torch.testing.assert_close(g_tuple(x, y), want, atol=0, rtol=0)
    torch.testing.assert_close(g_dict(x=x, y=y), want, atol=0, rtol=0)
    with pytest.raises(ax.InputError, match="input 'y'"):
        g_dict(x=x, y=torch.randn(2, 4))


class StarArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x, *extra):
        return self.a(x) + sum(extra)  # fx cannot iterate a Proxy: export path


def test_varargs_forward():
    torch.manual_seed(0)
    m = StarArgs().eval()
    x, y, z = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    gm = ax.capture(m, (x, y, z))
    assert gm.meta[CAPTURE_META_KEY].method == "export"
    torch.testing.assert_close(gm(x, y, z), _run(m, (x, y, z)), **TOL)
    x5, y5, z5 = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(gm(x5, y5, z5), _run(m, (x5, y5, z5)), **TOL)
    with pytest.raises(ax.InputError):
        gm(x, y, torch.randn(2, 9))


def test_already_captured_module_is_returned_as_is():
    gm = ax.capture(nn.Linear(4, 2), (torch.randn(2, 4),))
    assert ax.capture(gm, (torch.randn(2, 4),)) is gm


@pytest.mark.parametrize("method", ["fx", "export"])
def test_wrong_runtime_shapes_raise_input_error(method):
    gm = ax.capture(nn.Linear(4, 2), (torch.randn(2, 4),), method=method)
    assert gm.meta[CAPTURE_META_KEY].method == method
    assert gm(torch.randn(7, 4)).shape == (7, 2)
    with pytest.raises(ax.InputError, match=r"shape \(2, 5\).*expects \(batch, 4\)"):
        gm(torch.randn(2, 5))
    with pytest.raises(ax.InputError, match="3 dimensions"):
        gm(torch.randn(2, 4, 1))
    with pytest.raises(ax.InputError, match="1 dimensions"):
        gm(torch.randn(4))
    assert issubclass(ax.InputError, ValueError)


@pytest.mark.parametrize("bad, match", [
    ((), "empty"),
    ([], "empty"),
    ({}, "empty dict"),
    ((torch.zeros(0, 4),), r"empty \(shape \(0, 4\)\)"),
    ((3,), "not a tensor"),
    ((torch.randn(2, 4), "x"), r"\[1\] is of type str, not a tensor"),
    ({"x": 1.5}, "x is of type float, not a tensor"),
    ({0: torch.randn(2, 4)}, "not a string"),
    ((torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]),), "NaN or Inf"),
    ((torch.tensor([[float("inf"), 0.0, 0.0, 0.0]]),), "NaN or Inf"),
    (None, "no example inputs"),
    ("x", "type str is not supported"),
])
def test_bad_example_inputs_raise_input_error(bad, match):
    m = nn.Linear(4, 2)
    with pytest.raises(ax.InputError, match=match):
        ax.capture(m, bad)


def test_bad_arguments():
    with pytest.raises(ax.CaptureError, match="needs a torch.nn.Module"):
        ax.capture(lambda x: x, (torch.randn(2, 2),))
    with pytest.raises(ValueError, match="method must be"):
        ax.capture(nn.Linear(2, 2), (torch.randn(2, 2),), method="jit")


# --------------------------------------------------------------------------- failures

class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # MARK: data-dependent control flow
            return self.lin(x)
        return -x


def _marked_line(cls) -> int:
    lines, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, ln in enumerate(lines) if "MARK" in ln)


def test_untraceable_model_one_capture_error_naming_both_causes():
    with pytest.raises(ax.CaptureError) as ei:
        ax.capture(Untraceable(), (torch.randn(2, 4),))
    msg = str(ei.value)
    assert "torch.fx.symbolic_trace" in msg and "torch.export" in msg
    assert "control flow" in msg  # fx's cause
    assert "data-dependent" in msg  # export's cause
    where = f"{os.path.basename(__file__)}:{_marked_line(Untraceable)}"
    assert where in msg, msg  # the user's source line
    assert "if x.sum() > 0" in msg
    assert "Fix:" in msg
    assert isinstance(ei.value, RuntimeError)


def test_fx_only_capture_error_suggests_auto():
    with pytest.raises(ax.CaptureError, match="symbolic_trace failed.*\n.*\n?.*method='auto'"):
        ax.capture(Untraceable(), (torch.randn(2, 4),), method="fx")


# --------------------------------------------------------------------------- caller's model untouched

class WithEverything(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.lin(x)).relu())


@pytest.mark.parametrize("method", ["fx", "export"])
def test_capture_never_mutates_the_callers_model(method):
    torch.manual_seed(0)
    m = WithEverything()
    m.train()
    calls = []
    h1 = m.lin.register_forward_hook(lambda mod, i, o: calls.append("fwd"))
    h2 = m.register_forward_pre_hook(lambda mod, i: calls.append("pre"))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    ids = {k: id(v) for k, v in m.state_dict(keep_vars=True).items()}
    req = {k: p.requires_grad for k, p in m.named_parameters()}
    x = torch.randn(4, 8)

    gm = ax.capture(m, (x,), method=method)

    assert m.training and all(c.training for c in m.children())
    assert calls == []  # hooks were not run by capture ...
    assert len(m.lin._forward_hooks) == 1 and len(m._forward_pre_hooks) == 1  # ... and kept
    for k, v in m.state_dict(keep_vars=True).items():
        assert id(v) == ids[k] and torch.equal(v, state[k]), k  # running stats not updated
    assert {k: p.requires_grad for k, p in m.named_parameters()} == req
    # the capture is eval-mode and deterministic (dropout off, running stats used)
    torch.testing.assert_close(gm(x), gm(x), atol=0, rtol=0)
    m.eval()
    with torch.no_grad():
        want = m(x)
    torch.testing.assert_close(gm(x), want, **TOL)
    assert calls == ["pre", "fwd"]  # the caller's hooks still work on the caller's model
    # and the captured weights are a copy: editing them leaves the model alone
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    assert torch.equal(m.lin.weight, state["lin.weight"])
    h1.remove()
    h2.remove()


def test_example_inputs_are_stored_and_not_mutated():
    x = torch.randn(2, 4)
    x0 = x.clone()
    gm = ax.capture(nn.Linear(4, 3), (x,))
    assert torch.equal(x, x0)
    args, kwargs = gm.meta[EXAMPLE_META_KEY]
    assert args[0] is x and kwargs == {}


# --------------------------------------------------------------------------- property

class MLP(nn.Module):
    def __init__(self, d_in, hidden):
        super().__init__()
        self.l1 = nn.Linear(d_in, hidden)
        self.l2 = nn.Linear(hidden, 3)

    def forward(self, x):
        return self.l2(self.l1(x).relu())


@settings(max_examples=12, deadline=None)
@given(batch=st.integers(1, 6), d_in=st.integers(1, 12), hidden=st.integers(1, 16),
       other_batch=st.integers(1, 9))
def test_mlp_capture_keeps_batch_dynamic(batch, d_in, hidden, other_batch):
    torch.manual_seed(0)
    m = MLP(d_in, hidden).eval()
    g = torch.Generator().manual_seed(batch * 100 + d_in)
    gm = ax.capture(m, (torch.randn(batch, d_in, generator=g),))
    spec = gm.meta[CAPTURE_META_KEY].specs[0]
    assert spec.batched and spec.shape == (batch, d_in)
    x = torch.randn(other_batch, d_in, generator=g)
    torch.testing.assert_close(gm(x), _run(m, (x,)), **TOL)
    with pytest.raises(ax.InputError):
        gm(torch.randn(other_batch, d_in + 1))

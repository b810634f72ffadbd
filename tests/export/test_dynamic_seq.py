"""Dynamic sequence length (``max_seq_len=``): capture, legalize, transform, latency and export
accept every length from 2 to the maximum; the exported file is checked integer by integer at
three lengths; a model that fixes its length is refused or (``"auto"``) kept fixed with a note."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import archnet_fx as ax
from archnet_fx.capture import dynamic_seq
from archnet_fx.cli import main
from archnet_fx.demo import zoo
from archnet_fx.export.onnx import ort_session


def _cut(ex, n):
    return {k: v[:, :n] for k, v in ex.items()} if isinstance(ex, dict) else \
        tuple(v[:, :n] for v in ex)


def _call(m, ex):
    out = m(**ex) if isinstance(ex, dict) else m(*ex)
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    return out


@pytest.mark.parametrize("name, target", [("bert_tiny", "npu_a"), ("bert_tiny", "npu_b"),
                                          ("decoder", "npu_b"), ("transformer", "dsp_c")])
def test_legalized_graph_runs_at_every_length(name, target):
    if name == "bert_tiny":
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, ex = zoo.get_model(name, batch_size=2)
    seq = (next(iter(ex.values())) if isinstance(ex, dict) else ex[0]).shape[1]
    leg = ax.legalize(model, target, ex, max_seq_len=seq, verify=False)
    assert dynamic_seq(leg.module) == (seq, seq) and ax.check(leg.module, target).ok
    for n in (2, seq // 2 + 1, seq):
        with torch.no_grad():
            a, b = _call(model, _cut(ex, n)), _call(leg.module, _cut(ex, n))
        assert b.shape == a.shape
        assert float(nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0)) > 0.999


def test_transform_export_runs_at_three_lengths_integer_checked(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, ex = zoo.get_model("bert_tiny", batch_size=4)
    res = ax.transform(model, "npu_a", ex, [ex], steps=1, max_seq_len=16, progress=False)
    rep = ax.export_onnx(res, tmp_path / "b.onnx")
    assert rep.seq_lengths == [2, 8, 16]
    assert all(r.ok and r.q_nodes == rep.exactness.q_nodes for r in rep.seq_exactness.values())
    dims = [d.dim_param or d.dim_value
            for d in onnx.load(tmp_path / "b.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    sess = ort_session(tmp_path / "b.onnx", level="basic")
    for b, n in ((1, 5), (3, 11)):
        feed = {k: v[:1].repeat(b, 1)[:, :n].numpy() for k, v in ex.items()}
        (y, *_) = sess.run(None, feed)
        assert y.shape[:2] == (b, n) and np.isfinite(y).all()
    # the latency model takes any length too
    short = ax.estimate_latency(res.module, "npu_a", {k: v[:1, :4] for k, v in ex.items()})
    full = ax.estimate_latency(res.module, "npu_a", {k: v[:1] for k, v in ex.items()})
    assert 0 < short.summary()["total_us"] < full.summary()["total_us"]


def test_guard_accepts_2_to_max_and_names_the_limit():
    pytest.importorskip("transformers")
    model, ex = zoo.get_model("bert_tiny")
    gm = ax.capture(model, ex, max_seq_len=16)
    gm(**_cut(ex, 3))
    longer = {k: torch.cat([v, v], 1) for k, v in ex.items()}
    with pytest.raises(ax.InputError, match=r"sequence length 32 .* 2 to 16 \(max_seq_len\)"):
        gm(**longer)
    fixed = ax.capture(model, ex)
    with pytest.raises(ax.InputError, match=r"only the batch dimension is dynamic.*max_seq_len"):
        fixed(**_cut(ex, 3))


class _FixedLength(nn.Module):
    """Mixes positions with a Linear over the sequence axis: the length is part of the model."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.mix = nn.Linear(6, 6)

    def forward(self, ids):
        return self.mix(self.emb(ids).transpose(1, 2)).transpose(1, 2)


def test_a_model_that_fixes_its_length():
    model, ids = _FixedLength().eval(), torch.randint(0, 50, (2, 6))
    with pytest.raises(ax.CaptureError):
        ax.capture(model, ids, max_seq_len=6)
    gm = ax.capture(model, ids, max_seq_len="auto")       # the default of the CLI
    assert dynamic_seq(gm) is None
    assert any("sequence length fixed at 6" in n for n in gm.meta["archnet.capture"].notes)


def test_bad_max_seq_len():
    model, ex = zoo.get_model("decoder")
    with pytest.raises(ax.OptionError, match="max_seq_len must be"):
        ax.capture(model, ex, max_seq_len=1)
    with pytest.raises(ax.InputError, match=r"sequence length 16 > max_seq_len=8"):
        ax.capture(model, ex, max_seq_len=8)
    with pytest.raises(ax.OptionError, match="max_seq_len must be"):
        ax.transform(model, "npu_a", ex, max_seq_len="long")


def test_cli_transform_is_dynamic_by_default_for_token_models(tmp_path):
    out = tmp_path / "d.onnx"
    assert main(["transform", "decoder", "-t", "npu_b", "-o", str(out), "--steps", "1",
                 "--batch", "2"]) == 0
    dims = [d.dim_param or d.dim_value
            for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]


def test_ones_matmul_row_sum_is_exact_per_row_at_any_length():
    from archnet_fx.surrogate.products import RowSum
    rs = RowSum(8, reduce="ones_matmul")
    x = torch.tensor([[float("nan"), 1.0, 2.0], [1.0, 1.0, 1.0]])
    y = rs(x)                                   # a NaN row does not poison the others
    assert torch.isnan(y[0, 0]) and y[1, 0] == 3.0
    z = torch.randn(2, 3, 5)
    assert torch.allclose(rs(z), z.sum(-1, keepdim=True), atol=1e-6)


def test_resume_settings_digest_takes_any_dtype():
    from archnet_fx.infra.instruments import tensor_digest as _digest
    a = _digest([torch.ones(3, dtype=torch.bfloat16)])
    b = _digest([torch.zeros(3, dtype=torch.bfloat16)])
    assert a != b and len(a) == 64


class _SeqReductions(nn.Module):
    """Sums over the sequence (length-generic on every target) and, with ``mean_seq``, a mean
    over it (no exact form on npu_b, which has no mean: it would divide by the length)."""

    def __init__(self, mean_seq: bool = False):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 4)
        self.mean_seq = mean_seq

    def forward(self, ids):
        h = self.emb(ids)
        y = self.fc(h.transpose(1, 2).sum(-1)) + self.fc(h).mean(-1, keepdim=True).sum(1)
        return y + h.mean(1)[:, :4] if self.mean_seq else y


@pytest.mark.parametrize("target", ["npu_a", "npu_b", "dsp_c"])
def test_sums_over_the_sequence_are_length_generic(target):
    torch.manual_seed(0)
    model, ids = _SeqReductions().eval(), torch.randint(0, 50, (2, 6))
    res = ax.legalize(model, target, ids)          # default "auto", verified
    assert dynamic_seq(res.module) == (6, 6) and ax.check(res.module, target).ok
    for n in (2, 4, 6):
        with torch.no_grad():
            assert (res.module(ids[:, :n]) - model(ids[:, :n])).abs().max() <= 1e-5


def test_no_length_generic_form_auto_keeps_the_length_explicit_refuses():
    torch.manual_seed(0)
    model, ids = _SeqReductions(mean_seq=True).eval(), torch.randint(0, 50, (2, 6))
    res = ax.legalize(model, "npu_b", ids, verify=False)        # default "auto"
    assert dynamic_seq(res.module) is None and ax.check(res.module, "npu_b").ok
    with pytest.raises(ax.UnsupportedOpError, match=r"(?s)mean_1: mean at .*dynamic sequence "
                                                    r"length.*max_seq_len=None"):
        ax.legalize(model, "npu_b", ids, max_seq_len=6, verify=False)
    tr = ax.transform(model, "npu_b", ids, [ids], steps=1, progress=False)
    assert dynamic_seq(tr.module) is None


def test_a_maximum_beyond_the_models_tables_is_refused_at_capture():
    pytest.importorskip("transformers")
    model, ex = zoo.get_model("bert_tiny")           # torch.export: 64 positions
    with pytest.raises(ax.CaptureError, match=r"supports at most 64.*max_seq_len=64 or less"):
        ax.capture(model, ex, max_seq_len=100)
    model, ex = zoo.get_model("decoder")             # fx: its tables stop at 64 too
    with pytest.raises(ax.CaptureError, match=r"does not run at sequence length "
                                              r"max_seq_len=4096"):
        ax.capture(model, ex, max_seq_len=4096)
    gm = ax.capture(model, ex, max_seq_len=48)       # a maximum above the example's
    ids = ex if isinstance(ex, torch.Tensor) else ex[0]
    assert gm(ids.repeat(1, 3)[:, :48]).shape[1] == 48


class _ConvOverSeq(nn.Module):
    """Runs only from length 3 (a 3-tap conv without padding over the sequence)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.conv(self.emb(ids).transpose(1, 2)).mean(-1))


def test_export_of_a_model_that_needs_a_longer_sequence(tmp_path):
    torch.manual_seed(0)
    model, ids = _ConvOverSeq().eval(), torch.randint(0, 50, (2, 6))
    res = ax.transform(model, "dsp_c", ids, [ids], steps=1, progress=False)   # auto
    rep = ax.export_onnx(res, tmp_path / "auto.onnx")
    assert rep.seq_lengths == [] and rep.checked          # exported at the example's length
    res = ax.transform(model, "dsp_c", ids, [ids], steps=1, max_seq_len=6, progress=False)
    with pytest.raises(ax.ExportError, match=r"does not run at sequence length 2"):
        ax.export_onnx(res, tmp_path / "explicit.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.onnx"]


class _TwoClasses(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.emb(ids).sum(1))


def test_an_output_as_wide_as_the_example_length_is_not_a_sequence(tmp_path):
    torch.manual_seed(0)
    model, ids = _TwoClasses().eval(), torch.randint(0, 50, (3, 2))
    res = ax.transform(model, "dsp_c", ids, [ids], steps=1, max_seq_len=8, progress=False)
    rep = ax.export_onnx(res, tmp_path / "c.onnx")
    out = onnx.load(tmp_path / "c.onnx").graph.output[0]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 2]
    assert rep.seq_lengths == [2, 4, 8]

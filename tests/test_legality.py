"""Legality: check(gm, target) -> which nodes a target cannot run, why, and where they came from."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import archnet_fx as ax
from archnet_fx.demo import zoo
from passtest import captured_zoo


@pytest.fixture(scope="module")
def cnn_gelu():
    return captured_zoo("cnn_gelu")[2]


def test_report_api(cnn_gelu):
    rep = ax.check(cnn_gelu, "npu_a")
    assert isinstance(rep, ax.LegalityReport) and rep.target == "npu_a"
    assert not rep.ok
    # npu_a: no LayerNorm/GELU/SiLU/Hardswish; 4x4 and 2x2 stem/downsample kernels over limit
    assert rep.unsupported_counts == {"layer_norm": 3, "gelu": 3, "silu": 1, "hardswish": 1,
                                      "conv": 2}
    by_node = {v.node: v for v in rep.unsupported}
    assert by_node["block1_norm"].status == "unsupported"
    assert by_node["block1_norm"].reason == "npu_a has no 'layer_norm'"
    assert by_node["stem"].status == "limit" and "kernel (4, 4)" in by_node["stem"].reason
    # nodes carry their source module path and the user's file:line
    assert by_node["block1_norm"].location.startswith("block1.norm (zoo.py:")
    assert by_node["block2_act"].location.startswith("block2.act (")
    assert sum(rep.on_chip_counts.values()) + len(rep.unsupported) == len(rep.verdicts)


def test_report_prints_a_table(cnn_gelu):
    text = str(ax.check(cnn_gelu, "npu_b"))
    assert text == ax.check(cnn_gelu, "npu_b").table()
    assert text.startswith("target npu_b: ")
    assert re.search(r"\| kind +\| +count \| why", text)
    assert re.search(r"\| node +\| kind +\| reason +\| source", text)
    assert "block1.norm (zoo.py:" in text
    assert "kernel (7, 7) not in allowed sizes (1, 3)" in text
    short = ax.check(cnn_gelu, "npu_b").table(max_nodes=2)
    assert "... and 11 more" in short


def test_dsp_c_runs_lut_activations(cnn_gelu):
    rep = ax.check(cnn_gelu, "dsp_c")
    assert rep.unsupported_counts == {"layer_norm": 3}  # GELU/SiLU/Hardswish are native there


def test_legal_model_is_ok():
    model, ex = zoo.get_model("cnn")
    res = ax.canonicalize(model, ex)
    for t in ax.list_targets():
        rep = ax.check(res.module, t)
        assert rep.ok and rep.fully_on_chip and not rep.unsupported_counts, t
        assert "0 not" in str(rep)


class Limits(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Linear(16, 4096)          # > npu_b's 2048 channels
        self.c5 = nn.Conv2d(3, 4, 5, padding=2)  # npu_b allows kernels 1 and 3 only
        self.c3 = nn.Conv2d(3, 4, 3, padding=1)
        self.register_buffer("k", torch.rand(4))

    def forward(self, x, img):
        a, b = self.c5(img), self.c3(img)
        return (self.big(x),
                a * b,                          # two activations: not on npu_b
                a * 2.0,                        # activation x literal: fine
                b * self.k.view(1, 4, 1, 1),    # activation x constant buffer: fine
                a + b)                          # add of two activations is allowed


@pytest.mark.parametrize("method", ["fx", "export"])
def test_limits(method):
    gm = ax.capture(Limits(), (torch.randn(2, 16), torch.randn(2, 3, 8, 8)), method=method)
    rep = ax.check(gm, "npu_b")
    assert rep.unsupported_counts == {"linear": 1, "conv": 1, "mul": 1}
    reasons = sorted(v.reason for v in rep.unsupported)
    assert reasons == ["16→4096 channels exceed the limit of 2048",
                       "kernel (5, 5) not in allowed sizes (1, 3)",
                       "mul of two activations is not supported (only activation × constant)"]
    assert all(v.status == "limit" for v in rep.unsupported)
    assert rep.on_chip_counts["mul"] == 2 and rep.on_chip_counts["add"] == 1
    # npu_a: 8192 channels, kernels up to 7, two-activation mul allowed
    assert ax.check(gm, "npu_a").ok
    assert ax.check(gm, "dsp_c").ok


def test_integer_inputs_are_host_prologue():
    class Ids(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, ids):
            mask = (ids > 0).long()      # computed from integer ids only: host prologue
            return self.emb(ids) * mask.unsqueeze(-1)

    gm = ax.capture(Ids(), (torch.randint(0, 10, (2, 5)),))
    rep = ax.check(gm, "dsp_c")
    assert rep.prologue_counts["compare"] == 1
    assert "host prologue" in str(rep)
    assert "compare" not in rep.unsupported_counts


def test_target_by_object_and_path(cnn_gelu, tmp_path):
    from archnet_fx.targets import schema
    tgt = ax.load_target("npu_a")
    assert ax.check(cnn_gelu, tgt).unsupported_counts == ax.check(cnn_gelu,
                                                                  "npu_a").unsupported_counts
    path = tmp_path / "mine.toml"
    path.write_text((schema._BUILTIN_DIR / "dsp_c.toml").read_text().replace(
        'name = "dsp_c"', 'name = "mine"').replace("\nlinear = ", "\nlayer_norm = {}\nlinear = "))
    rep = ax.check(cnn_gelu, str(path))
    assert rep.target == "mine" and rep.ok


def test_errors():
    gm = ax.capture(nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(ax.TargetError, match="unknown target 'npu_z'.*dsp_c, npu_a, npu_b"):
        ax.check(gm, "npu_z")
    with pytest.raises(TypeError, match="GraphModule"):
        ax.check(nn.Linear(4, 4), "npu_a")
    with pytest.raises(ax.BitWidthError, match="target 'npu_b' does not support weight_bits=4 "
                                               r"\(allowed: 8\)"):
        ax.load_target("npu_b").quant.check_bits(weight_bits=4)
    with pytest.raises(ax.BitWidthError, match="act_bits=4"):
        ax.load_target("npu_a").quant.check_bits(act_bits=4)
    assert ax.load_target("npu_a").quant.check_bits(weight_bits=4) == (4, 8)
    assert issubclass(ax.BitWidthError, ax.TargetError)

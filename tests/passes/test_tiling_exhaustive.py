"""Kernel tiling covers every conv a model may have: kernel sizes, strides, dilations, groups
(depthwise and grouped), paddings (int, 'same', per-dim) and padding modes, 1-D and 2-D — each
legal on npu_b (kernel sizes 1 and 3 only) and exact against the original conv."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import archnet_fx as ax

CASES = [
    # (dims, kernel, stride, dilation, groups, padding, padding_mode)
    *[(2, k, s, d, g, p, "zeros")
      for k, s, d, g, p in itertools.product((2, 4, 5, 7), (1, 2, 3), (1, 2), ("dw", 1, 4),
                                             ("half", 0))],
    (2, 7, 1, 1, "dw", "same", "zeros"), (2, 6, 1, 2, "dw", "same", "zeros"),
    (2, (7, 5), (2, 1), (1, 3), "dw", (3, 1), "zeros"),
    (2, (1, 7), 1, 1, 8, (0, 3), "zeros"),
    (1, 7, 1, 1, "dw", "half", "zeros"), (1, 9, 2, 3, 4, "half", "zeros"),
    *[(2, 7, s, d, "dw", "half", m) for s, d, m in itertools.product(
        (1, 2), (1, 2), ("reflect", "replicate", "circular"))],
    (1, 5, 1, 1, "dw", "half", "reflect"),
]


def _conv(dims, k, s, d, g, p, mode, c=8):
    groups = c if g == "dw" else g
    if p == "half":
        kk = k if isinstance(k, int) else k[0]
        dd = d if isinstance(d, int) else d[0]
        p = (kk // 2) * dd
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    return cls(c, c, k, stride=s, dilation=d, groups=groups, padding=p, padding_mode=mode)


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("form", ["module", "functional"])
def test_every_conv_tiles_exactly_on_npu_b(case, form):
    # "module": inside a model the conv stays a module call (its padding mode read from the
    # module); "functional": a bare conv is traced into F.pad + conv
    torch.manual_seed(0)
    conv = _conv(*case).eval()
    model = nn.Sequential(conv) if form == "module" else conv
    ex = torch.randn(2, 8, *([13] * case[0]))
    leg = ax.legalize(model, "npu_b", ex, verify=False)
    assert ax.check(leg.module, "npu_b").ok
    with torch.no_grad():
        assert (leg.module(ex) - conv(ex)).abs().max() <= 1e-5


class _ConvNeXtStage(nn.Module):
    """A ConvNeXt stem (4×4, stride 4) then a block with a 7×7 depthwise conv: the stem's
    rewrite (patchify) comes first in the same pass, and the depthwise conv reads its output."""

    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = self.stem(x)
        return x + self.pw(torch.relu(self.dw(x)))


@pytest.mark.parametrize("target", ["npu_a", "npu_b"])
def test_convnext_stage_legalizes_and_exports(target, tmp_path):
    torch.manual_seed(0)
    model, ex = _ConvNeXtStage().eval(), torch.randn(2, 3, 32, 32)
    leg = ax.legalize(model, target, ex)
    assert ax.check(leg.module, target).ok
    with torch.no_grad():
        assert (leg.module(ex) - model(ex)).abs().max() <= 1e-5
    res = ax.transform(model, target, ex, [ex], steps=1, progress=False)
    rep = ax.export_onnx(res, tmp_path / "c.onnx")
    assert rep.exactness.ok and rep.batch_sizes == [1, 2, 8]

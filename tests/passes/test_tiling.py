"""Structural tiling passes (passes/tiling.py) and the end-to-end legalization of the zoo.

Tiling is exact: every test compares with the original on the captured example and a seeded
second input within atol = rtol = 1e-5 (measured max abs error ≤ 1.5e-6: the partial sums are
re-associated float32). Each test checks the rule hits, a golden op-kind histogram or legality
on the target, provenance, and idempotence (via tests/passtest.py).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import archnet_fx as ax
from archnet_fx.legalize import legalize
from archnet_fx.passes.elementwise import KINDS as ELEMENTWISE_KINDS
from archnet_fx.passes.tiling import tile_channels, tile_kernels, tiling_passes
from archnet_fx.infra.manager import PassManager
from archnet_fx.targets import load_target
from archnet_fx.demo.zoo import get_model
from passtest import assert_idempotent, assert_pass, run_pass

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = dict(atol=1e-5, rtol=1e-5)
NPU_A, NPU_B = load_target("npu_a"), load_target("npu_b")


def _conv(cin, cout, k, **kw) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(cin, cout, k, **kw)).eval()


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _limit_kinds(gm: torch.fx.GraphModule, target: str) -> dict:
    return {v.kind: v.reason for v in ax.check(gm, target).unsupported if v.status == "limit"}


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("method", ["fx", "export"])
def test_patchify_vit_stem(method: str) -> None:
    # 4×4 stride-4 patch conv (ViT, ConvNeXt stem) → pixel_unshuffle + 1×1 conv
    before, res = run_pass(tile_kernels(NPU_B), _conv(3, 16, 4, stride=4), (_x(2, 3, 32, 32),),
                           method=method)
    assert_pass(res, before, fired={"patchify": 1}, hist={"permute": 1, "conv": 1}, **EXACT)
    assert not _limit_kinds(res.module, "npu_b")
    assert_idempotent(tile_kernels(NPU_B), res)


def test_patchify_crops_a_remainder() -> None:
    # 2×2 stride 2 on a 9×9 input: the conv never reads the last row/column
    before, res = run_pass(tile_kernels(NPU_B), _conv(4, 8, 2, stride=2), (_x(2, 4, 9, 9),))
    assert_pass(res, before, fired={"patchify": 1}, hist={"slice": 2, "permute": 1, "conv": 1},
                **EXACT)


@pytest.mark.parametrize("k, stride, padding, groups, size, rule", [
    (7, 1, 3, 8, 8, "tile_kernel"),       # ConvNeXt depthwise 7×7 on npu_b (1, 3)
    (7, 2, 3, 1, 15, "tile_kernel"),      # strided, odd size
    (5, 1, 2, 1, 9, "tile_kernel"),
    (4, 3, 1, 1, 11, "tile_kernel"),      # kernel ≠ stride: not a patch conv
    (6, 2, 1, 2, 13, "tile_kernel"),      # grouped
    (4, 1, "same", 1, 6, "tile_kernel"),  # asymmetric 'same' padding
    (2, 1, 0, 1, 7, "pad_kernel"),        # 2×2 → zero-padded 3×3
    (2, 1, 1, 4, 6, "pad_kernel"),
])
@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning")
def test_kernel_tiling_is_exact(k, stride, padding, groups, size, rule, method) -> None:
    model = _conv(8, 8, k, stride=stride, padding=padding, groups=groups)
    before, res = run_pass(tile_kernels(NPU_B), model, (_x(2, 8, size, size + 1),),
                           method=method)
    assert_pass(res, before, fired={rule: 1}, hist=None, **EXACT)
    assert set(ax.kind_histogram(res.module)) <= {"conv", "add", "slice"}
    assert not _limit_kinds(res.module, "npu_b")
    assert_idempotent(tile_kernels(NPU_B), res)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(2, 8), stride=st.integers(1, 4), pad=st.integers(0, 4),
       size=st.integers(9, 14), conv1d=st.booleans())
def test_kernel_tiling_any_shape(k: int, stride: int, pad: int, size: int, conv1d: bool) -> None:
    torch.manual_seed(0)
    conv = (nn.Conv1d if conv1d else nn.Conv2d)(3, 4, k, stride=stride, padding=min(pad, k - 1))
    x = _x(2, 3, size) if conv1d else _x(2, 3, size, size - 1)
    gm = ax.capture(nn.Sequential(conv).eval(), (x,), method="fx")
    res = tile_kernels(NPU_B)(gm)
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), gm(x), **EXACT)
    assert not _limit_kinds(res.module, "npu_b")
    assert sum(res.record.rule_hits.values()) == (0 if k in (1, 3) else 1)


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 3, 5, 5) * 0.1)
        self.b = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=2)


def test_functional_conv_and_new_weights_are_trainable() -> None:
    before, res = run_pass(tile_kernels(NPU_B), FunctionalConv(), (_x(2, 3, 8, 8),))
    assert_pass(res, before, fired={"tile_kernel": 1}, hist=None, **EXACT)
    new = [p for n, p in res.module.named_parameters() if "tile" in n]
    assert new and all(p.requires_grad for p in new)
    res.module(_x(2, 3, 8, 8)).square().mean().backward()
    assert all(p.grad is not None for p in new)


def test_does_not_fire_on_allowed_kernels() -> None:
    before, res = run_pass(tile_kernels(NPU_A), _conv(3, 8, 3, padding=1), (_x(2, 3, 8, 8),))
    assert_pass(res, before, fired={}, hist={"conv": 1}, **EXACT)
    # 7×7 is allowed on npu_a: the ConvNeXt depthwise conv stays
    before, res = run_pass(tile_kernels(NPU_A), _conv(8, 8, 7, padding=3, groups=8),
                           (_x(2, 8, 8, 8),))
    assert_pass(res, before, fired={}, hist={"conv": 1}, **EXACT)


def test_dilated_conv_tiles_exactly() -> None:
    # 5×5 taps at dilation 2 (a 9×9 footprint): tiles of 3 and 2 (padded to 3) taps, each
    # starting tap·dilation positions in
    before, res = run_pass(tile_kernels(NPU_B), _conv(3, 4, 5, padding=4, dilation=2),
                           (_x(2, 3, 9, 9),))
    assert_pass(res, before, fired={"tile_kernel": 1}, hist=None, **EXACT)
    assert ax.check(res.module, NPU_B).ok


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_of_module_convs_are_written_out(mode) -> None:
    # capture turns a padded conv into pad + conv (the elementwise family legalizes the pad);
    # a graph that keeps the conv as a module call (symbolic_trace, Conv2d a leaf) is tiled
    # with its padding written out as slices + concat
    from archnet_fx.ir.shapes import propagate_shapes

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 5, padding=2, groups=4, padding_mode=mode)
    gm = torch.fx.symbolic_trace(nn.Sequential(conv))
    x = _x(2, 4, 8, 8)
    propagate_shapes(gm, (x,))
    res = tile_kernels(NPU_B)(gm)
    assert res.record.rule_hits == {"tile_kernel": 1}
    assert ax.check(res.module, NPU_B).ok
    with torch.no_grad():
        assert (res.module(x) - conv(x)).abs().max() <= 1e-5


# --------------------------------------------------------------------------- channels


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3000, 3000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_3000_channel_linear_on_npu_b() -> None:
    before, res = run_pass(tile_channels(NPU_B), Wide(), (_x(2, 3, 3000),))
    # 2 input chunks × 2 output chunks: 4 linears, 2 partial sums, 1 concat, 2 input slices
    assert_pass(res, before, fired={"split_channels": 1},
                hist={"linear": 4, "add": 2, "concat": 1, "slice": 2}, **EXACT)
    assert not _limit_kinds(res.module, "npu_b")
    assert_idempotent(tile_channels(NPU_B), res)
    # npu_a allows 8192 channels
    before, res = run_pass(tile_channels(NPU_A), Wide(), (_x(2, 3, 3000),))
    assert_pass(res, before, fired={}, hist={"linear": 1}, **EXACT)


@pytest.mark.parametrize("cin, cout, groups", [(2100, 40, 1), (40, 2100, 1), (2400, 2400, 2400)])
def test_conv_channel_split(cin: int, cout: int, groups: int) -> None:
    model = _conv(cin, cout, 3, padding=1, groups=groups)
    before, res = run_pass(tile_channels(NPU_B), model, (_x(2, cin, 4, 4),))
    assert_pass(res, before, fired={"split_channels": 1}, hist=None, **EXACT)
    assert not _limit_kinds(res.module, "npu_b")


# --------------------------------------------------------------------------- zoo


@functools.lru_cache(maxsize=None)
def captured(name: str):
    model, ex = get_model(name)
    return model, ex, ax.capture(model, ex)


@pytest.mark.parametrize("name", ["cnn_gelu", "vit"])
def test_zoo_convs_legal_on_npu_b(name: str) -> None:
    model, ex, gm = captured(name)
    assert "conv" in _limit_kinds(gm, "npu_b")
    res = PassManager("tiling", tiling_passes(NPU_B), verify=True).run(gm)
    assert "conv" not in _limit_kinds(res.module, "npu_b")
    with torch.no_grad():
        torch.testing.assert_close(res.module(*ex), gm(*ex), **EXACT)
    hits = res.record("tile_kernels").rule_hits
    assert dict(hits) == ({"patchify": 2, "tile_kernel": 2} if name == "cnn_gelu"
                          else {"patchify": 1})


@pytest.mark.parametrize("name", ["cnn_gelu", "vit", "decoder", "transformer"])
@pytest.mark.parametrize("target", ["npu_a", "npu_b"])
def test_zoo_end_to_end(name: str, target: str) -> None:
    # other families may still leave kinds to the host; none of the elementwise kinds and no
    # conv/linear limit may remain
    model, ex, gm = captured(name)
    res = legalize(gm, target, ex, allow_host_fallback=True, verify=False)
    mine = set(ELEMENTWISE_KINDS) | {"conv", "linear"}
    left = {v.kind for v in res.after.verdicts if v.status in ("host", "unsupported", "limit")}
    assert not (left & mine), f"{name} on {target}: {sorted(left & mine)} left"
    with torch.no_grad():
        ref, got = gm(*ex), res.module(*ex)
    assert float((ref - got).abs().max()) <= 1e-2 * float(ref.abs().max())

"""Per-layer weight widths (mixed precision) in the cost model, the quantization pass and the
selection: W4 is an option only where it makes a layer faster (memory-bound), the integer
program takes it under a tight budget, and the chosen widths reach the quantized network and its
ONNX export."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import archnet_fx as ax
from archnet_fx.cost.latency import estimate_latency
from archnet_fx.errors import BitWidthError
from archnet_fx.quant.fakequant import FakeQuant, insert_fake_quant
from archnet_fx.selection import BITS_KIND, _cache_key, weight_layers, with_layer_bits

pytestmark = pytest.mark.usefixtures("one_thread")


class Wide(nn.Module):
    """LayerNorm (illegal on npu_a) and three linears whose 1-5 MB of weights dominate a
    batch-1, 4-token call: memory-bound, so W4's halved weight bytes are faster."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ln = nn.LayerNorm(512)
        self.l1, self.l2, self.l3 = nn.Linear(512, 2048), nn.Linear(2048, 512), nn.Linear(512, 512)

    def forward(self, x):
        return self.l3(self.l2(torch.relu(self.l1(self.ln(x)))))


def _batches(n: int, rows: int = 4) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(1, rows, 512, generator=g),) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def _gm(rows: int = 4):
    return ax.capture(Wide().eval(), (torch.randn(1, rows, 512),))


def test_cost_model_charges_each_layer_its_width():
    gm = _gm()
    assert set(weight_layers(gm)) == {"l1", "l2", "l3"}
    base = estimate_latency(gm, "npu_a")
    one = estimate_latency(gm, "npu_a", layer_bits={"l1": 4})
    rows0, rows1 = ({r.name: r.time_s for r in rep.rows} for rep in (base, one))
    assert rows1["l1"] < 0.7 * rows0["l1"]                  # memory-bound: ~half the bytes
    assert rows1["l2"] == pytest.approx(rows0["l2"]) and one.total_s < base.total_s
    # every layer at W4 is what weight_bits=4 gives
    all4 = estimate_latency(gm, "npu_a", layer_bits={n: 4 for n in ("l1", "l2", "l3")})
    assert all4.total_s == pytest.approx(estimate_latency(gm, "npu_a", weight_bits=4).total_s)


def test_compute_bound_layers_gain_nothing_from_w4():
    gm = _gm(rows=2048)
    base, w4 = estimate_latency(gm, "npu_a"), estimate_latency(gm, "npu_a", layer_bits={"l1": 4})

    def kernel(rep):     # l1 and the ReLU fused into it (their split moves with the bytes)
        return sum(r.time_s for r in rep.rows if "l1" in (r.name, r.fused_into))
    assert kernel(w4) == pytest.approx(kernel(base), rel=1e-9)   # W4A8 computes at the int8 rate
    assert w4.total_s == pytest.approx(base.total_s, rel=1e-9)


def test_quantization_pass_takes_per_layer_widths():
    res = insert_fake_quant(_gm(), "npu_a", layer_bits={"l2": 4})
    bits = {n.split(".")[0]: m.bits for n, m in res.module.named_modules()
            if isinstance(m, FakeQuant) and m.role == "weight"}
    assert bits == {"l1": 8, "l2": 4, "l3": 8}
    assert any("1 layer(s) W4" in note for r in [res.record] for note in r.notes)
    with pytest.raises(BitWidthError):
        insert_fake_quant(_gm(), "npu_a", layer_bits={"l2": 2})


@functools.lru_cache(maxsize=None)
def _transform(**budget):
    return ax.transform(Wide().eval(), "npu_a", example_inputs=_batches(1)[0],
                        calib_data=_batches(12), steps=2, **dict(budget))


def test_selection_takes_w4_where_the_budget_needs_it(tmp_path):
    strict = _transform(min_fidelity=0.9999).report.selection
    w4 = [o for o in strict.options if o.kind == BITS_KIND and o.candidate == "w4"]
    assert {o.node for o in w4} == {"l1", "l2", "l3"}      # all memory-bound: all measured
    assert all(o.cost > 1e-4 for o in w4)                  # W4 loses against W8 everywhere
    defaults = [o for o in strict.options if o.kind == BITS_KIND and o.default]
    assert all(o.cost == 0 and o.candidate == "w8" for o in defaults)
    # a floor W4's error does not fit under: every layer keeps W8
    assert strict.layer_bits == {} and "weight_bits:w4" not in strict.changed()
    # the default floor (0.99) is the fastest network that keeps it: W4 where it fits, and the
    # check of the assembled network includes those layers' W4 weights
    default = _transform(min_fidelity=0.99).report.selection
    assert default.layer_bits and default.assembled_cosine >= 0.99
    assert default.assembled_s < strict.assembled_s
    tgt = ax.load_target("npu_a")
    (held,) = _batches(12)[-1:]                       # transform's held-out batch (10 %)
    with torch.no_grad():
        want = Wide().eval()(*held).reshape(1, -1)
        plain = default.module(*held).reshape(1, -1)
        w4 = with_layer_bits(default.module, tgt, default.layer_bits, 8)(*held).reshape(1, -1)
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(w4, want)) == pytest.approx(default.assembled_cosine, abs=1e-6)
    assert float(cos(plain, want)) > float(cos(w4, want))      # the check saw the W4 error

    # a budget that the LayerNorm alone cannot meet: some layers go to W4
    res = _transform(speedup=1.5)
    sel = res.report.selection
    assert sel.layer_bits and set(sel.layer_bits.values()) == {4}
    assert sel.changed()["weight_bits:w4"] == len(sel.layer_bits)
    assert sel.assembled_s <= sel.budget_s * 1.02
    assert sel.assembled_s == pytest.approx(sel.predicted_s, rel=0.02)
    bits = {n.split(".")[0]: m.bits for n, m in res.module.named_modules()
            if isinstance(m, FakeQuant) and m.role == "weight" and n.split(".")[0] in
            {"l1", "l2", "l3"}}
    assert {n for n, b in bits.items() if b == 4} == set(sel.layer_bits)
    assert f"({len(sel.layer_bits)} layer(s) W4)" in str(res.report)
    # the chosen widths survive into the integer export, checked against onnxruntime
    rep = ax.export_onnx(res, tmp_path / "mixed.onnx")
    assert "opset 21" in str(rep)                          # int4 weights need opset 21


def test_w4_not_measured_where_it_is_not_faster():
    m = Wide().eval()
    res = ax.transform(m, "npu_a", example_inputs=(torch.randn(1, 2048, 512),),
                       calib_data=[(torch.randn(1, 2048, 512),) for _ in range(3)], steps=1,
                       min_fidelity=0.99)
    sel = res.report.selection
    assert not [o for o in sel.options if o.kind == BITS_KIND and o.candidate == "w4"]
    assert any("W4 is not faster than W8 at 3 of 3 layer(s)" in n for n in sel.notes)


def test_an_explicit_weight_bits_fixes_every_layer():
    res = ax.transform(Wide().eval(), "npu_a", example_inputs=_batches(1)[0],
                       calib_data=_batches(12), steps=1, weight_bits=8, speedup=1.2)
    sel = res.report.selection
    assert not [o for o in sel.options if o.kind == BITS_KIND] and sel.layer_bits == {}
    assert {m.bits for m in res.module.modules()
            if isinstance(m, FakeQuant) and m.role == "weight"} == {8}


def test_mixed_widths_and_fixed_widths_never_share_a_cache_entry(tmp_path):
    from archnet_fx.selection import SelectOptions

    opts = SelectOptions(cache_dir=tmp_path)
    args = (_gm(), ax.load_target("npu_a"), 8, 8, "emulation", {}, False, _batches(2),
            _batches(1), opts, 0)
    assert _cache_key(*args, True) != _cache_key(*args, False)


def test_layer_bits_errors_name_the_layer():
    from archnet_fx.errors import OptionError

    with pytest.raises(OptionError, match="'ln'.*not conv/linear"):
        estimate_latency(_gm(), "npu_a", layer_bits={"ln": 4})
    with pytest.raises(OptionError, match="'nope'"):
        insert_fake_quant(_gm(), "npu_a", layer_bits={"nope": 4})
    with pytest.raises(BitWidthError, match=r"layer_bits\['l1'\]"):
        estimate_latency(_gm(), "npu_a", layer_bits={"l1": 3})
    with pytest.raises(OptionError, match="must map"):
        estimate_latency(_gm(), "npu_a", layer_bits=[("l1", 4)])


def test_shared_weights_get_no_width_of_their_own():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.b(self.a(self.a(x)))       # a called twice: one weight, two nodes

    gm = ax.capture(Tied().eval(), (torch.randn(1, 4, 64),))
    assert set(weight_layers(gm)) == {"b"}


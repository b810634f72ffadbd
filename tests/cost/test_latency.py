"""The latency cost model (archnet_fx.cost.latency) on hand-computable graphs.

npu_a's numbers, used throughout: int8 peak 4e12 ops/s, DRAM 25e9 B/s, 2 us per kernel,
SRAM 4 MiB; host 5e10 ops/s, link 8e9 B/s, 50 us round trip. W8A8: one byte per float
activation and per weight; a MAC is 2 ops.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import archnet_fx as ax
from archnet_fx.errors import BitWidthError, InputError, TargetError
from archnet_fx.cost.latency import (LatencyReport, fit_cost_params, kernel_ops_bytes,
                                     estimate_latency)

pytestmark = pytest.mark.usefixtures("one_thread")

PEAK, BW, OVH = 4e12, 25e9, 2e-6
HOST, LINK, RT = 5e10, 8e9, 5e-5


def seeded(m: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in m.parameters():
        nn.init.normal_(p, std=0.1)
    return m.eval()


def chip_rows(rep: LatencyReport):
    return {r.name: r for r in rep.rows if r.where == "chip"}


def io_s(rep: LatencyReport) -> float:
    return sum(r.time_s for r in rep.rows if r.where == "io")


def test_linear_memory_bound():
    m = seeded(nn.Sequential(nn.Linear(256, 512, bias=False)))
    x = torch.randn(64, 256)
    rep = estimate_latency(m, "npu_a", (x,))
    (row,) = chip_rows(rep).values()
    ops = 2 * 64 * 256 * 512                       # 2 ops per MAC
    nbytes = 256 * 512 + 64 * 256 + 64 * 512       # weight + input read + output write
    assert row.ops == ops and row.bytes == nbytes
    assert row.compute_s == pytest.approx(ops / PEAK)
    assert row.memory_s == pytest.approx(nbytes / BW)
    assert row.memory_s > row.compute_s            # memory-bound
    assert row.time_s == pytest.approx(nbytes / BW + OVH)
    # input uploaded over the link, output downloaded
    assert io_s(rep) == pytest.approx((64 * 256 + 64 * 512) / LINK)
    assert rep.total_s == pytest.approx(row.time_s + io_s(rep))
    assert rep.n_regions == 0 and rep.fallback_share == 0
    # roofline: weights once + input + output
    assert rep.min_bytes == nbytes and rep.roofline_s == pytest.approx(nbytes / BW)


def test_linear_compute_bound_and_weight_bits():
    m = seeded(nn.Sequential(nn.Linear(1024, 1024, bias=False)))
    x = torch.randn(1024, 1024)
    rep = estimate_latency(m, "npu_a", (x,))
    (row,) = chip_rows(rep).values()
    ops = 2 * 1024 ** 3
    assert row.compute_s == pytest.approx(ops / PEAK) and row.compute_s > row.memory_s
    assert row.time_s == pytest.approx(ops / PEAK + OVH)
    assert rep.summary()["roofline_bound"] == "compute"
    # W4A8: half the weight bytes, MACs still at the int8 rate (max of the two widths)
    rep4 = estimate_latency(m, "npu_a", (x,), weight_bits=4)
    (row4,) = chip_rows(rep4).values()
    assert row4.bytes == row.bytes - 1024 * 1024 / 2
    assert row4.compute_s == pytest.approx(row.compute_s)


def test_conv_and_groups():
    x = torch.randn(1, 8, 32, 32)
    rep = estimate_latency(seeded(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False))),
                           "npu_a", (x,))
    (row,) = chip_rows(rep).values()
    out = 16 * 32 * 32
    assert row.ops == 2 * out * 8 * 9
    assert row.bytes == 16 * 8 * 9 + 8 * 32 * 32 + out
    assert row.time_s == pytest.approx(max(row.ops / PEAK, row.bytes / BW) + OVH)
    dw = estimate_latency(seeded(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8,
                                                         bias=False))), "npu_a", (x,))
    (row,) = chip_rows(dw).values()
    assert row.ops == 2 * (8 * 32 * 32) * 1 * 9   # Cin/groups = 1


def test_fusion_linear_relu_is_one_kernel():
    m = seeded(nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU()))
    x = torch.randn(32, 64)
    rep = estimate_latency(m, "npu_a", (x,))
    rows = chip_rows(rep)
    lin, relu = rows["_0"], rows["_1"]
    assert relu.fused_into == "_0" and rep.n_kernels == 1
    # the linear's output is never written; the relu reads nothing from DRAM, writes the result
    assert lin.bytes == 64 * 64 + 32 * 64 and relu.bytes == 32 * 64
    ops = 2 * 32 * 64 * 64 + 32 * 64
    kernel = max(ops / PEAK, (64 * 64 + 2 * 32 * 64) / BW) + OVH   # one overhead
    assert lin.time_s + relu.time_s == pytest.approx(kernel)
    # GELU is not fusable on npu_a: it is not even supported (host fallback), so no fusion
    rep2 = estimate_latency(seeded(nn.Sequential(nn.Linear(64, 64), nn.GELU())), "npu_a", (x,))
    assert not any(r.fused_into for r in rep2.rows)


class ForkJoin(nn.Module):
    """linear → {relu·2, x·0.5} → add: elementwise work that forks after the kernel and joins."""

    def __init__(self, outputs: int = 1) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64, bias=False)
        self.outputs = outputs

    def forward(self, x):
        h = self.fc(x)
        a, b = torch.relu(h) * 2.0, h * 0.5
        return a + b if self.outputs == 1 else (a + b, b)


def test_fork_join_epilogue_is_one_kernel():
    x = torch.randn(32, 64)
    rep = estimate_latency(seeded(ForkJoin()), "npu_a", (x,))
    rows = chip_rows(rep)
    assert rep.n_kernels == 1
    assert {r.fused_into for n, r in rows.items() if n != "fc"} == {"fc"}
    # one kernel: weight + input read, only the add's result written; 4 elementwise ops/elem
    ops = 2 * 32 * 64 * 64 + 4 * 32 * 64
    nbytes = 64 * 64 + 32 * 64 + 32 * 64
    assert sum(r.ops for r in rows.values()) == ops
    assert sum(r.bytes for r in rows.values()) == nbytes
    assert sum(r.time_s for r in rows.values()) == pytest.approx(
        max(ops / PEAK, nbytes / BW) + OVH)
    # a branch that is also returned: two tensors would leave the group, so no fork-join
    # fusion, and the linear's output has two readers, so no chain either: the linear plus
    # four elementwise kernels
    rep2 = estimate_latency(seeded(ForkJoin(outputs=2)), "npu_a", (x,))
    assert rep2.n_kernels == 1 + 4


def test_scalar_affine_linear_is_an_epilogue_multiply_add():
    """A Linear(1, 1) per element (a one-hinge ReLU form's layer) is costed as an elementwise
    multiply-add that fuses, not as a GEMM kernel of its own."""
    class Hinge(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64, bias=False)
            self.inner, self.outer = nn.Linear(1, 1), nn.Linear(1, 1)

        def forward(self, x):
            h = self.fc(x)
            return self.outer(torch.relu(self.inner(h.unsqueeze(-1)))).squeeze(-1) + h * 0.1

    x = torch.randn(32, 64)
    rep = estimate_latency(seeded(Hinge()), "npu_a", (x,))
    rows = chip_rows(rep)
    assert rows["inner"].kind == rows["outer"].kind == "mul"
    assert rows["inner"].ops == 2 * 32 * 64                       # w·x + b per element
    assert rep.n_kernels == 1 and rows["add"].fused_into == "fc"
    # a wider hinge layer stays a MAC kernel
    m = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Unflatten(1, (64, 1)), nn.Linear(1, 4))
    rep4 = estimate_latency(seeded(m), "npu_a", (x,))
    assert chip_rows(rep4)["_2"].kind == "linear" and rep4.n_kernels == 2


def test_fallback_region_between_two_linears():
    m = seeded(nn.Sequential(nn.Linear(16, 32, bias=False), nn.GELU(),
                             nn.Linear(32, 8, bias=False)))
    x = torch.randn(4, 16)
    rep = estimate_latency(m, "npu_a", (x,))
    assert rep.n_regions == 1
    (g,) = rep.regions
    assert g.kinds == {"gelu": 1}
    # the linear's output goes to the host, GELU's output comes back: 4*32 bytes each way
    assert g.link_in_bytes == 4 * 32 and g.link_out_bytes == 4 * 32
    assert g.link_s == pytest.approx(256 / LINK)
    assert g.round_trip_s == RT
    assert g.host_compute_s == pytest.approx(8 * 4 * 32 / HOST)   # 8 ops per GELU element
    gelu = next(r for r in rep.rows if r.kind == "gelu")
    assert gelu.where == "host" and gelu.region == 0
    assert rep.fallback_s == pytest.approx(g.total_s)
    assert rep.fallback_share == pytest.approx(g.total_s / rep.total_s)
    assert rep.total_s == pytest.approx(rep.chip_s + rep.fallback_s + rep.io_s)
    # the first linear's output is written for the host; the second reads GELU's from DRAM
    rows = chip_rows(rep)
    assert rows["_0"].bytes == 16 * 32 + 4 * 16 + 4 * 32
    assert rows["_2"].bytes == 32 * 8 + 4 * 32 + 4 * 8
    # The rewrite bound: both linears' MACs at peak plus one overhead each (GELU free).
    macs = 2 * 4 * (16 * 32 + 32 * 8)
    assert rep.mac_kernels == 2
    assert rep.rewrite_bound_s == pytest.approx(macs / PEAK + 2 * OVH)
    assert rep.summary()["max_rewrite_speedup"] == pytest.approx(
        rep.total_s / (macs / PEAK + 2 * OVH))


def test_sram_residency_between_chip_kernels():
    # linear -> linear: the 32x64 intermediate fits in SRAM, so it never touches DRAM
    m = seeded(nn.Sequential(nn.Linear(16, 64, bias=False), nn.Linear(64, 8, bias=False)))
    rep = estimate_latency(m, "npu_a", (torch.randn(32, 16),))
    rows = chip_rows(rep)
    assert rows["_0"].bytes == 16 * 64 + 32 * 16      # weight + input; no output write
    assert rows["_1"].bytes == 64 * 8 + 32 * 8        # weight + output; no input read


def test_module_and_aten_flavours_agree():
    m = seeded(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(),
                             nn.Linear(32, 4)))
    x = torch.randn(3, 16)
    fx = ax.capture(m, (x,), method="fx")
    ex = ax.capture(m, (x,), method="export")
    a, b = estimate_latency(fx, "npu_a"), estimate_latency(ex, "npu_a")
    assert b.total_s == pytest.approx(a.total_s, rel=1e-9)
    assert b.total_ops == a.total_ops and b.min_bytes == a.min_bytes
    assert b.n_regions == a.n_regions == 1
    assert {k: v["ops"] for k, v in b.by_kind().items()} == \
        {k: v["ops"] for k, v in a.by_kind().items()}


def test_legalized_surrogates_are_entered():
    m = seeded(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)))
    x = torch.randn(3, 16)
    res = ax.legalize(m, "npu_a", (x,), verify=False)
    rep = estimate_latency(res.module, "npu_a")          # example inputs from gm.meta
    assert rep.n_regions == 0 and rep.fallback_s == 0
    inner = [r for r in rep.rows if "/" in r.name]
    assert inner and all(r.where in ("chip", "free", "const") for r in inner)
    assert any(r.kind == "linear" and r.name.startswith(inner[0].name.split("/")[0])
               for r in inner)


def test_report_outputs_and_blocks():
    m = seeded(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)))
    x = torch.randn(3, 16)
    rep = estimate_latency(m, "npu_a", (x,), blocks={"_0": "first", "_1": "first", "_2": "second"})
    assert list(rep.by_block()) == ["first", "second", "(none)"]   # link I/O has no block
    assert sum(d["time_s"] for d in rep.by_block().values()) == pytest.approx(rep.total_s)
    assert sum(d["time_s"] for d in rep.by_kind().values()) == pytest.approx(rep.total_s)
    text = str(rep)
    assert "region" in text and "gelu" in text and text == rep.table()
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["summary"]["fallback_regions"] == 1 and len(d["rows"]) == len(rep.rows)
    # default blocks: module paths (Sequential children are top-level names)
    assert {r.block for r in estimate_latency(m, "npu_a", (x,)).rows if r.where == "chip"} \
        == {"0", "2"}


def test_dict_inputs_and_batch(bert_tiny):
    model, ex, gm = bert_tiny
    rep = estimate_latency(gm, "npu_a")
    assert rep.total_s > 0 and rep.n_regions > 0
    assert any(b.startswith("encoder.layer.") for b in rep.by_block())
    rep2 = estimate_latency(model, "npu_a", {k: v[:1] for k, v in ex.items()})
    assert rep2.total_ops < rep.total_ops   # batch as given


def test_bad_inputs():
    m = nn.Linear(4, 4)
    with pytest.raises(InputError, match="example_inputs"):
        estimate_latency(m, "npu_a")
    with pytest.raises(InputError, match="nn.Module"):
        estimate_latency("not a model", "npu_a")
    with pytest.raises(BitWidthError):
        estimate_latency(m, "npu_a", (torch.randn(2, 4),), act_bits=4)
    with pytest.raises(TargetError):
        estimate_latency(m, "no_such_chip", (torch.randn(2, 4),))
    with pytest.raises(InputError, match="blocks"):
        estimate_latency(m, "npu_a", (torch.randn(2, 4),), blocks=3)


# --------------------------------------------------------------------------- calibration


TRUE = dict(peaks={8: 3.0e12, 16: 1.1e12}, bw=18e9, ovh=3.5e-6)
SHAPES = [
    ("linear", (512, 1024, 1024)), ("linear", (256, 768, 3072)),     # compute-bound
    ("linear", (1, 4096, 4096)), ("linear", (4, 2048, 2048)),       # memory-bound (GEMV)
    ("linear", (8, 16, 16)),                                        # overhead-dominated
    ("matmul", (12, 128, 64, 128)), ("conv", (1, 64, 56, 56, 64, 3)),
    ("add", (1, 128, 384)), ("relu", (4, 64, 56, 56)), ("mul", (16,)), ("gelu", (1, 1536)),
]


def synthetic(peaks, bw, ovh):
    rows = []
    for bits in (8, 16):
        for kind, shape in SHAPES:
            ops, nbytes = kernel_ops_bytes(kind, shape, bits)
            t = max(ops / peaks[bits], nbytes / bw) + ovh
            rows.append((kind, "x".join(map(str, shape)), bits, t * 1e6))
    return rows


def test_fit_recovers_parameters(tmp_path):
    rows = synthetic(**TRUE)
    fit = fit_cost_params(rows, "npu_a")
    for b, p in TRUE["peaks"].items():
        assert fit.peak_ops_per_s[b] == pytest.approx(p, rel=0.05)
    assert fit.memory_bytes_per_s == pytest.approx(TRUE["bw"], rel=0.05)
    assert fit.per_op_overhead_s == pytest.approx(TRUE["ovh"], rel=0.05)
    assert fit.max_rel_error < 0.01 and fit.rms_rel_error < 0.01
    # the same from a CSV file
    path = tmp_path / "m.csv"
    path.write_text("kind,shape,bits,us\n" + "".join(f"{k},{s},int{b},{u}\n"
                                                    for k, s, b, u in rows))
    fit2 = fit_cost_params(path, "npu_a")
    assert fit2.memory_bytes_per_s == pytest.approx(TRUE["bw"], rel=0.05)
    # a target with the fitted cost: int4 peak kept, others replaced; usable for estimates
    tgt = fit.apply("npu_a")
    assert tgt.cost.peak_ops_per_s[4] == 8e12
    assert tgt.cost.peak_ops_per_s[8] == pytest.approx(3e12, rel=0.05)
    assert tgt.cost.per_op_overhead_s == fit.per_op_overhead_s
    rep = estimate_latency(nn.Linear(8, 8), tgt, (torch.randn(2, 8),))
    assert rep.target == "npu_a" and math.isfinite(rep.total_s)
    assert "TOPS" in fit.table()


def test_fit_bad_measurements(tmp_path):
    with pytest.raises(InputError, match="kind,shape,bits,us"):
        p = tmp_path / "bad.csv"
        p.write_text("op,shape,us\nlinear,1x2x3,4\n")
        fit_cost_params(p, "npu_a")
    with pytest.raises(InputError, match="calibration kind"):
        fit_cost_params([("frobnicate", "2x2", 8, 1.0)], "npu_a")
    with pytest.raises(InputError, match="MxKxN"):
        fit_cost_params([("linear", "2x2", 8, 1.0)], "npu_a")
    with pytest.raises(InputError, match="positive"):
        fit_cost_params([("add", "2x2", 8, -1.0)], "npu_a")
    with pytest.raises(InputError, match="no measurements"):
        fit_cost_params([], "npu_a")


class _RowSumByLength(nn.Module):
    """linear → (row sum over a ones vector cut to the row's length) and a product: the
    dynamic-sequence softmax's pattern, where the length is read off the activation's shape."""

    def __init__(self, by_shape: bool):
        super().__init__()
        self.a = nn.Linear(16, 64, bias=False)
        self.register_buffer("ones", torch.ones(128, 1))
        self.by_shape = by_shape

    def forward(self, x):
        y = self.a(x)
        n = y.shape[-1] if self.by_shape else 64
        s = torch.matmul(y, self.ones.narrow(0, 0, n))
        return y * s


def test_a_shape_query_does_not_evict_an_activation_from_sram():
    """Reading a tensor's shape (host-side length arithmetic) reads none of its data: the
    linear's output stays in SRAM for its two chip consumers, as with a fixed length."""
    x = (torch.randn(32, 16),)
    fixed = estimate_latency(seeded(_RowSumByLength(False)), "npu_a", x)
    dyn = estimate_latency(seeded(_RowSumByLength(True)), "npu_a", x)
    assert chip_rows(dyn)["a"].bytes == chip_rows(fixed)["a"].bytes == 16 * 64 + 32 * 16
    assert dyn.chip_s == pytest.approx(fixed.chip_s)

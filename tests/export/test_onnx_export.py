"""``export_onnx`` (archnet_fx/export/onnx.py) and the ``archnet-fx transform`` command.

The export check is integer-exact (archnet_fx/export/verify.py): every QuantizeLinear's integers
in onnxruntime equal the torch module's, fed the same upstream integers, except a small stated
share of one-step flips from float summation order; tests here check the report's figures.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import archnet_fx as ax
from archnet_fx.cli import main
from archnet_fx.export.onnx import ort_session
from archnet_fx.ir.opkinds import ONNX_KINDS
from archnet_fx.demo import zoo
from qdq_models import fake_quant

pytestmark = pytest.mark.usefixtures("one_thread")


def _types(model, op):
    inits = {i.name: i.data_type for i in model.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t.data_type for n in model.graph.node
              if n.op_type == "Constant"}
    return {inits.get(n.input[2], consts.get(n.input[2])) for n in model.graph.node
            if n.op_type == op}


def test_mlp_round_trip(tmp_path):
    gm, ex = fake_quant("mlp", "npu_a")
    path = tmp_path / "mlp.onnx"
    rep = ax.export_onnx(gm, path, target="npu_a")
    assert path.exists() and rep.checked and rep.max_abs_diff < 1e-3
    assert rep.convert_record.name == "convert" and rep.convert_record.rule_hits["act_qdq"] == 3
    model = onnx.load(path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    assert [i.name for i in model.graph.input] == rep.input_names
    assert _types(model, "QuantizeLinear") <= {onnx.TensorProto.UINT8, onnx.TensorProto.INT8}
    # dynamic batch: run at a batch the export never saw
    x = torch.randn(7, 32)
    out = ort_session(path, level="basic").run(None, {rep.input_names[0]: x.numpy()})[0]
    conv = ax.convert(gm, "npu_a").module
    with torch.no_grad():
        assert np.abs(out - conv(x).numpy()).max() < 1e-2 * max(1, float(conv(x).abs().max()))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_unsigned_weight_exports(tmp_path):
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.uniform_(0.1, 1.0)
    fq = ax.quant.insert_fake_quant(torch.fx.symbolic_trace(nn.Sequential(lin)), "npu_a").module
    x = torch.randn(8, 4)
    with torch.no_grad(), ax.quant.calibrating(fq):
        fq(x)
    rep = ax.export_onnx(fq, tmp_path / "u.onnx", example_inputs=(x,), target="npu_a")
    assert rep.max_abs_diff < 1e-4


def test_int4_weights_opset21(tmp_path):
    gm, ex = fake_quant("mlp", "npu_a", 4)
    rep = ax.export_onnx(gm, tmp_path / "w4.onnx", target="npu_a")
    model = onnx.load(tmp_path / "w4.onnx")
    assert rep.opset == 21
    assert onnx.TensorProto.INT4 in {i.data_type for i in model.graph.initializer}
    assert not [o for o in model.opset_import if o.domain == "archnet"]


def test_int16_activations_dsp_c(tmp_path):
    gm, ex = fake_quant("mlp", "dsp_c")
    rep = ax.export_onnx(gm, tmp_path / "a16.onnx", target="dsp_c")
    model = onnx.load(tmp_path / "a16.onnx")
    assert rep.opset == 21
    assert _types(model, "QuantizeLinear") <= {onnx.TensorProto.INT16, onnx.TensorProto.UINT16}


def test_bert_tiny_export_names_and_dynamic_batch(tmp_path):
    pytest.importorskip("transformers")
    gm, ex = fake_quant("bert_tiny", "npu_a")
    rep = ax.export_onnx(gm, tmp_path / "bert.onnx", target="npu_a")
    assert rep.input_names == ["input_ids", "token_type_ids", "attention_mask"]
    assert rep.dynamic_batch is True and rep.batch_sizes == [1, 4, 8]
    assert rep.op_counts["QuantizeLinear"] == 19
    # every Q node of the file maps to the torch module's, and their integers agree
    assert rep.exactness.q_nodes == 19 and not rep.exactness.unmapped
    assert rep.exactness.ok and rep.exactness.torch_local.max_steps <= 1
    assert rep.prologue_nodes                     # one-hot / mask arithmetic on the host
    kinds = {ONNX_KINDS.get(op) for op in rep.op_counts}
    assert not kinds & {"softmax", "layer_norm", "gelu", "erf", "exp", "div", "sqrt"}
    assert rep.rewrites["fold_weight_transposes"] > 0      # DQ → MatMul for runtimes
    # CPU-runtime form: the one-hot embedding products become row gathers, bit-exact
    g = ax.export_onnx(gm, tmp_path / "bert_g.onnx", target="npu_a", onehot_gather=True)
    assert g.rewrites["onehot_to_gather"] == 2
    # the gather form computes the same integers as the one-hot form
    assert g.exactness.torch_local.differ == rep.exactness.torch_local.differ
    assert g.exactness.output_rel_diff <= 1e-5
    model = onnx.load(tmp_path / "bert_g.onnx")
    assert not [n for n in model.graph.node if n.op_type == "Equal"
                and "vocab" in "".join(n.input)]
    # the integer table is gathered first and only the selected rows are dequantized
    int8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    table_gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in int8]
    assert len(table_gathers) == 2
    consumers = {i: n.op_type for n in model.graph.node for i in n.input}
    assert {consumers[n.output[0]] for n in table_gathers} == {"Cast"}   # then · column scales


@pytest.mark.parametrize("zero_point", [0, 3])
def test_onehot_to_gather_dequantizes_the_gathered_rows(zero_point):
    """A one-hot × DequantizeLinear(int8 table, per column, any zero point) product becomes an
    integer row gather, then (q − z)·s on those rows only: the same values as the product."""
    from onnx import TensorProto, helper, numpy_helper

    from archnet_fx.export.onnx import onehot_to_gather

    rng = np.random.default_rng(0)
    vocab, dim = 50, 6
    table = rng.integers(-100, 100, (vocab, dim)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, dim).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (table, "w_int"), (scale, "w_scale"), (np.full(dim, zero_point, np.int8), "w_zp"),
        (np.arange(vocab, dtype=np.int64), "vocab"), (np.array([-1], np.int64), "axes"),
        (np.array(1.0, np.float32), "one"), (np.array(0, np.uint8), "zero")]]
    nodes = [helper.make_node("Unsqueeze", ["ids", "axes"], ["ids_u"]),
             helper.make_node("Equal", ["ids_u", "vocab"], ["hot"]),
             helper.make_node("Cast", ["hot"], ["hot_f"], to=TensorProto.FLOAT),
             helper.make_node("QuantizeLinear", ["hot_f", "one", "zero"], ["hot_q"]),
             helper.make_node("DequantizeLinear", ["hot_q", "one", "zero"], ["hot_dq"]),
             helper.make_node("DequantizeLinear", ["w_int", "w_scale", "w_zp"], ["w"], axis=1),
             helper.make_node("MatMul", ["hot_dq", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "onehot", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ids = rng.integers(0, vocab, (2, 7)).astype(np.int64)
    import onnxruntime as ort

    def run(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"ids": ids})[0]
    ref = run(model)
    assert onehot_to_gather(model) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" not in ops and "Equal" not in ops and "DequantizeLinear" not in ops
    assert len([n for n in model.graph.node if n.name.endswith("sub_zero_point")]) == \
        (1 if zero_point else 0)
    np.testing.assert_allclose(run(model), ref, rtol=1e-6, atol=1e-7)
    expected = (table[ids].astype(np.float32) - zero_point) * scale
    np.testing.assert_allclose(ref, expected, rtol=1e-6)


def test_illegal_op_rejected_and_no_file_left(tmp_path):
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(8, 8), nn.GELU()))
    path = tmp_path / "bad.onnx"
    with pytest.raises(ax.ExportError, match=r"Gelu|Erf"):
        ax.export_onnx(gm, path, example_inputs=(torch.randn(2, 8),), target="npu_a")
    assert os.listdir(tmp_path) == []                # no partial file, no temp file
    # without a target the same graph exports (nothing to check legality against)
    ax.export_onnx(gm, path, example_inputs=(torch.randn(2, 8),))
    assert path.exists()


def test_fake_quant_without_target_is_an_error(tmp_path):
    gm, ex = fake_quant("mlp", "npu_a")
    with pytest.raises(ax.ExportError, match="target="):
        ax.export_onnx(gm, tmp_path / "x.onnx")
    assert os.listdir(tmp_path) == []


def test_transform_result_and_cli(tmp_path):
    out = tmp_path / "cli.onnx"
    assert main(["transform", "mlp", "--target", "npu_b", "--out", str(out), "--steps", "1",
                 "--batch", "4"]) == 0
    model = onnx.load(out)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 3
    assert main(["transform", "mlp", "--target", "npu_b", "--out", str(tmp_path / "y.onnx"),
                 "--weight-bits", "4"]) == 2           # npu_b has no int4
    assert not (tmp_path / "y.onnx").exists()
    # surrogate choices from the command line: the ViT's GELUs as hard gates
    out = tmp_path / "vit.onnx"
    assert main(["transform", "vit", "--target", "npu_a", "--out", str(out), "--steps", "1",
                 "--batch", "2", "--choice", "gelu=hard_gate"]) == 0
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "Erf" not in ops and "Clip" in ops


def test_constant_gathers_become_slices():
    """Gather with a constant index (a shape dimension, a pooler's h[:, 0]) is rewritten into
    Shape(start, end) / Slice (+ Squeeze): no Gather node left, same values in onnxruntime."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from archnet_fx.export.onnx import constant_gathers

    def const(name, v):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
            np.array(v, np.int64)))
    nodes = [helper.make_node("Shape", ["x"], ["s"]), const("i0", 0),
             helper.make_node("Gather", ["s", "i0"], ["batch"], axis=0),
             const("i1", [2]), helper.make_node("Gather", ["x", "i1"], ["col"], axis=2),
             helper.make_node("Gather", ["x", "i0"], ["first"], axis=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 5])],
        [helper.make_tensor_value_info(n, t, shape) for n, t, shape in
         (("batch", TensorProto.INT64, []), ("col", TensorProto.FLOAT, ["b", 4, 1]),
          ("first", TensorProto.FLOAT, ["b", 5]))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)

    def run(m):
        return ort.InferenceSession(m.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = run(model)
    assert constant_gathers(model) == 3
    onnx.checker.check_model(model)
    assert not [n for n in model.graph.node if n.op_type == "Gather"]
    for a, b in zip(want, run(model)):
        assert a.shape == b.shape and np.array_equal(a, b)


class _OneKnot(nn.Module):
    """A structural-GELU-like hinge: Linear(1, 1) → ReLU → Linear(1, 1) on (…, 1), plus x."""

    def __init__(self):
        super().__init__()
        self.inner, self.outer = nn.Linear(1, 1), nn.Linear(1, 1)
        with torch.no_grad():
            self.inner.weight.fill_(1.3)
            self.inner.bias.fill_(-0.2)
            self.outer.weight.fill_(0.7)
            self.outer.bias.fill_(0.1)

    def forward(self, x):
        return self.outer(torch.relu(self.inner(x.unsqueeze(-1)))).squeeze(-1) + x


def _const_matmuls(model):
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}

    def shape(name):
        n = prod.get(name)
        while n is not None and n.op_type in ("DequantizeLinear", "Transpose", "Identity"):
            name, n = n.input[0], prod.get(n.input[0])
        return inits.get(name)
    return [n for n in model.graph.node if n.op_type == "MatMul" and shape(n.input[1]) == [1, 1]]


def test_one_wide_matmuls_and_scalar_operands_take_cpu_friendly_forms(tmp_path):
    """Exact rewrites in the written file: the 1 × 1 MatMuls of one-knot hinges become Mul (the
    target has mul), one-element constants against (…, 1) tensors become (1, 1); same values."""
    x = torch.randn(4, 6, 5)
    gm = torch.fx.symbolic_trace(_OneKnot())
    fq = ax.quant.insert_fake_quant(gm, "npu_a").module
    with torch.no_grad(), ax.quant.calibrating(fq):
        fq(x)
    rep = ax.export_onnx(fq, tmp_path / "k1.onnx", example_inputs=(x,), target="npu_a")
    assert rep.checked and rep.max_abs_diff < 1e-3
    assert rep.rewrites["narrow_matmuls_to_mul"] == 2
    assert rep.rewrites["rank2_scalars"] >= 2  # the two biases
    model = onnx.load(tmp_path / "k1.onnx")
    assert not _const_matmuls(model)
    # without the rewrites (the functions applied to nothing) the file would hold both MatMuls
    from archnet_fx.export.onnx import narrow_matmuls_to_mul
    assert narrow_matmuls_to_mul(model) == 0
    # a target without mul keeps them as MatMuls (a Mul would be illegal there)
    import dataclasses
    npu_a = ax.load_target("npu_a")
    cost = dataclasses.replace(npu_a.cost, fusable=[k for k in npu_a.cost.fusable if k != "mul"])
    no_mul = dataclasses.replace(npu_a, name="npu_a_no_mul", cost=cost,
                                 ops={k: v for k, v in npu_a.ops.items() if k != "mul"})
    rep2 = ax.export_onnx(fq, tmp_path / "k2.onnx", example_inputs=(x,), target=no_mul,
                          check=False)
    assert rep2.rewrites["narrow_matmuls_to_mul"] == 0
    assert len(_const_matmuls(onnx.load(tmp_path / "k2.onnx"))) == 2


def test_w4_int4_exports_are_exact_and_dynamic(tmp_path):
    gm, ex = fake_quant("mlp", "npu_a", 4)
    rep = ax.export_onnx(gm, tmp_path / "w4.onnx", target="npu_a")
    assert rep.opset == 21 and rep.exactness.ok and rep.exactness.q_nodes > 0
    assert rep.exactness.intref_local.max_steps <= 1      # the integer reference agrees too
    assert rep.batch_sizes[0] == 1 and rep.batch_sizes[-1] == 8


def test_exported_file_loads_without_unused_initializers(tmp_path):
    gm, ex = fake_quant("cnn", "npu_a")
    ax.export_onnx(gm, tmp_path / "c.onnx", target="npu_a")
    model = onnx.load(tmp_path / "c.onnx")
    used = {i for n in model.graph.node for i in n.input}
    assert [i.name for i in model.graph.initializer if i.name not in used] == []
    assert len(model.graph.value_info) == 0   # no stale shape annotations for ORT to merge


def test_a_wrong_scale_in_the_file_fails_the_integer_check(tmp_path):
    from archnet_fx.export.verify import compare_exported
    from archnet_fx.export.onnx import _prepare
    from archnet_fx.ir.meta import EXAMPLE_META_KEY

    gm, ex = fake_quant("mlp", "npu_a")
    path = tmp_path / "m.onnx"
    rep = ax.export_onnx(gm, path, target="npu_a")
    assert rep.exactness.ok
    conv = ax.convert(gm, "npu_a").module
    prepared = _prepare(conv)
    args, _ = conv.meta[EXAMPLE_META_KEY]
    good = compare_exported(path, prepared, rep.input_names, list(args))
    assert good.ok and good.q_nodes == rep.exactness.q_nodes
    model = onnx.load(path)      # halve the scale of the first activation QuantizeLinear
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    const = next(n for n in model.graph.node if n.output[0] == q.input[1])
    arr = onnx.numpy_helper.to_array(const.attribute[0].t) / 2
    const.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32)))
    onnx.save(model, path)
    bad = compare_exported(path, prepared, rep.input_names, list(args))
    assert not bad.ok and bad.torch_local.max_steps > 1


def test_golden_vectors(tmp_path):
    gm, ex = fake_quant("mlp", "npu_a")
    rep = ax.export_onnx(gm, tmp_path / "m.onnx", target="npu_a", golden=tmp_path / "g.npz")
    g = np.load(tmp_path / "g.npz")
    qs = [k for k in g.files if k.endswith(".q")]
    assert len(qs) == rep.exactness.q_nodes
    assert all(g[k].dtype in (np.int8, np.uint8) for k in qs)
    assert "input.0" in g.files and "output.0" in g.files
    assert sorted(os.listdir(tmp_path)) == ["g.npz", "m.onnx"]


class _PinsBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x).reshape(2, 4, 2).sum(-1)   # the batch of 2 written as a constant


def test_a_graph_that_pins_the_batch_is_an_error_naming_the_node(tmp_path):
    gm = torch.fx.symbolic_trace(_PinsBatch())
    path = tmp_path / "p.onnx"
    with pytest.raises(ax.ExportError, match=r"pins the batch size.*batch 1.*Reshape.*"
                                             r"dynamic_batch=False"):
        ax.export_onnx(gm, path, example_inputs=(torch.randn(2, 8),))
    assert os.listdir(tmp_path) == []
    rep = ax.export_onnx(gm, path, example_inputs=(torch.randn(2, 8),), dynamic_batch=False)
    assert rep.batch_sizes == [] and rep.checked


def test_transformer_encoder_batch_is_dynamic_for_real(tmp_path):
    # torch.export capture: the head-split reshapes compute batch·heads from the batch size
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    model = nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)).eval()
    ex = torch.randn(2, 6, 16)
    leg = ax.legalize(model, "npu_b", ex)
    rep = ax.export_onnx(leg.module, tmp_path / "t.onnx", target="npu_b")
    assert rep.batch_sizes == [1, 2, 8]
    sess = ort_session(tmp_path / "t.onnx", level="basic")
    for b in (1, 3, 5):
        (y,) = sess.run(None, {rep.input_names[0]: np.random.randn(b, 6, 16).astype(np.float32)})
        assert y.shape == (b, 6, 16)


def test_layer_sqnr_against_the_float_model(tmp_path):
    torch.manual_seed(0)
    model, ex = zoo.get_model("cnn", batch_size=4)
    res = ax.transform(model, "npu_a", ex, [ex], weight_bits=8, steps=1, progress=False)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in res.module.modules()]
    r8 = ax.export_onnx(res, tmp_path / "a.onnx")
    assert len(r8.layer_sqnr) == r8.exactness.q_nodes
    assert all(v > 10 for v in r8.layer_sqnr.values())        # 8-bit: well above 10 dB
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks)
            for m in res.module.modules()] == hooks              # the caller's module is clean
    assert "SQNR vs float" in r8.sqnr_table()
    # 4-bit weights quantize coarser: the deepest activation's SQNR drops
    res4 = ax.transform(model, "npu_a", ex, [ex], weight_bits=4, steps=1, progress=False)
    r4 = ax.export_onnx(res4, tmp_path / "b.onnx")
    assert min(r4.layer_sqnr.values()) < min(r8.layer_sqnr.values())

"""Op kinds: every spelling of an op (module, function, Tensor method, ATen) gets one kind."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import archnet_fx as ax
from archnet_fx.demo import zoo
from archnet_fx.ir.meta import KIND_META_KEY
from archnet_fx.ir.opkinds import META_KINDS, kind_histogram, node_kind, target_name
from archnet_fx.targets import KNOWN_KINDS


class Fn(nn.Module):
    """Wraps a function of one tensor as a module."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return self.f(x)


_MODS = {"layer_norm": lambda: nn.LayerNorm(8), "softmax": lambda: nn.Softmax(-1),
         "gelu": nn.GELU, "relu": nn.ReLU, "linear": lambda: nn.Linear(8, 8),
         "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}

SPELLINGS = [
    ("layer_norm", "module", lambda m, x: m(x)),
    ("layer_norm", "F.layer_norm", lambda m, x: F.layer_norm(x, (8,))),
    ("layer_norm", "torch.layer_norm", lambda m, x: torch.layer_norm(x, (8,))),
    ("softmax", "module", lambda m, x: m(x)),
    ("softmax", "F.softmax", lambda m, x: F.softmax(x, -1)),
    ("softmax", "torch.softmax", lambda m, x: torch.softmax(x, -1)),
    ("softmax", "method", lambda m, x: x.softmax(-1)),
    ("add", "operator", lambda m, x: x + 1),
    ("add", "torch.add", lambda m, x: torch.add(x, 1)),
    ("add", "method", lambda m, x: x.add(1)),
    ("mul", "operator", lambda m, x: x * 2),
    ("mul", "torch.mul", lambda m, x: torch.mul(x, 2)),
    ("mul", "method", lambda m, x: x.mul(2)),
    ("div", "operator", lambda m, x: x / 2),
    ("div", "torch.div", lambda m, x: torch.div(x, 2)),
    ("div", "method", lambda m, x: x.div(2)),
    ("gelu", "module", lambda m, x: m(x)),
    ("gelu", "F.gelu", lambda m, x: F.gelu(x)),
    ("relu", "module", lambda m, x: m(x)),
    ("relu", "F.relu", lambda m, x: F.relu(x)),
    ("relu", "torch.relu", lambda m, x: torch.relu(x)),
    ("relu", "method", lambda m, x: x.relu()),
    ("linear", "module", lambda m, x: m(x)),
    ("linear", "F.linear", lambda m, x: F.linear(x, m.weight, m.bias)),
    ("exp", "method", lambda m, x: x.exp()),
    ("exp", "torch.exp", lambda m, x: torch.exp(x)),
    ("mean", "method", lambda m, x: x.mean(-1)),
    ("mean", "torch.mean", lambda m, x: torch.mean(x, -1)),
    ("reshape", "reshape", lambda m, x: x.reshape(-1, 32)),
    ("reshape", "view", lambda m, x: x.view(x.shape[0], 32)),
    ("reshape", "flatten", lambda m, x: x.flatten(1)),
    ("permute", "permute", lambda m, x: x.permute(0, 2, 1)),
    ("permute", "transpose", lambda m, x: x.transpose(1, 2)),
    ("concat", "torch.cat", lambda m, x: torch.cat([x, x], -1)),
    ("sigmoid", "module", lambda m, x: m(x)),
    ("sigmoid", "torch.sigmoid", lambda m, x: torch.sigmoid(x)),
    ("sigmoid", "method", lambda m, x: x.sigmoid()),
    ("tanh", "module", lambda m, x: m(x)),
    ("tanh", "torch.tanh", lambda m, x: torch.tanh(x)),
    ("unknown:cumprod", "torch.cumprod", lambda m, x: torch.cumprod(x, -1)),
    ("unknown:cumprod", "method", lambda m, x: x.cumprod(-1)),
    ("unknown:logsumexp", "torch.logsumexp", lambda m, x: torch.logsumexp(x, -1)),
]


class AllSpellings(nn.Module):
    """Every spelling of the given kinds, side by side; returns all results.

    Each spelling is ``f(m, x)`` where ``m`` is the kind's module (for module calls and
    ``F.linear``'s weights) or None.
    """

    def __init__(self, kinds):
        super().__init__()
        self.spellings = [(k, f) for k, _, f in SPELLINGS if k in kinds]
        self.mods = nn.ModuleDict({k: _MODS[k]() for k in kinds if k in _MODS})

    def forward(self, x):
        return tuple(f(self.mods[k] if k in self.mods else None, x) for k, f in self.spellings)


KINDS = sorted({k for k, _, _ in SPELLINGS})


def _check_kinds(gm, expected):
    assert kind_histogram(gm) == expected
    for n in gm.graph.nodes:  # node.meta carries the same kind as node_kind()
        assert n.meta[KIND_META_KEY] == node_kind(n, gm)


@pytest.mark.parametrize("kind", KINDS)
def test_every_spelling_gets_the_canonical_kind_fx(kind):
    """Module call, torch function, F function, Tensor method, operator: one kind."""
    torch.manual_seed(0)
    gm = ax.capture(AllSpellings({kind}).eval(), (torch.randn(2, 4, 8),), method="fx")
    assert gm.meta["archnet.capture"].method == "fx"
    _check_kinds(gm, {kind: sum(1 for k, _, _ in SPELLINGS if k == kind)})


def test_every_spelling_gets_the_canonical_kind_export():
    """The same spellings as ATen ops (one export of all of them, it is slow)."""
    torch.manual_seed(0)
    gm = ax.capture(AllSpellings(set(KINDS)).eval(), (torch.randn(2, 4, 8),), method="export")
    assert gm.meta["archnet.capture"].method == "export"
    assert all(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes
               if n.op == "call_function" and node_kind(n, gm) not in META_KINDS)
    _check_kinds(gm, Counter(k for k, _, _ in SPELLINGS))


@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn_gelu", "decoder"])
def test_same_model_both_ways_same_compute_histogram(name):
    model, ex = zoo.get_model(name)
    via_fx = ax.capture(model, ex, method="fx")
    via_export = ax.capture(model, ex, method="export")
    h = kind_histogram(via_fx)
    assert h == kind_histogram(via_export)
    assert sum(h.values()) > 0 and not any(k in META_KINDS for k in h)
    assert all(k in KNOWN_KINDS for k in h), h  # zoo models use no unknown op


def test_golden_histogram_of_vit():
    model, ex = zoo.get_model("vit")
    assert kind_histogram(ax.capture(model, ex)) == {
        "conv": 1, "reshape": 9, "permute": 11, "expand": 1, "concat": 1, "add": 5,
        "layer_norm": 5, "linear": 13, "matmul": 4, "mul": 2, "softmax": 2, "gelu": 2,
        "slice": 1}


class Decomposable(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(self.norm(x)).softmax(-1)


def test_aten_core_ir_spellings():
    """After run_decompositions: native_layer_norm, addmm/mm, _softmax keep their kinds."""
    ep = torch.export.export(Decomposable(), (torch.randn(3, 8),)).run_decompositions()
    gm = ep.module()
    kinds = {target_name(n): node_kind(n, gm) for n in gm.graph.nodes
             if isinstance(n.target, torch._ops.OpOverload)}
    assert kinds["native_layer_norm"] == "layer_norm"
    assert kinds["_softmax"] == "softmax"
    assert kinds.get("addmm", kinds.get("mm")) in ("linear", "matmul")
    # tuple outputs of native_layer_norm are read with getitem (bookkeeping, not a slice)
    getitems = [n for n in gm.graph.nodes if target_name(n) == "getitem"]
    assert getitems and all(node_kind(n, gm) == "getitem" for n in getitems)


class ShapesAndTuples(nn.Module):
    def forward(self, x):
        b, n, c = x.shape              # shape queries and getitem on a torch.Size
        a, z = x.split(4, dim=-1)      # getitem on a tuple-producing op
        return x[:, 0, 0] + a.sum((1, 2)) * z.sum((1, 2)) + b * n * c


def test_meta_kinds_shape_getitem_slice():
    gm = ax.capture(ShapesAndTuples(), (torch.randn(2, 3, 8),), method="fx")
    kinds = {n.name: node_kind(n, gm) for n in gm.graph.nodes}
    assert kinds["x"] == "placeholder" and kinds["output"] == "output"
    assert kinds["getattr_1"] == "shape"
    assert kinds["getitem"] == "getitem"  # b = x.shape[0]
    assert kinds["split"] == "slice"
    split_items = [n for n in gm.graph.nodes
                   if n.op == "call_function" and n.args and getattr(n.args[0], "name", "") == "split"]
    assert split_items and all(kinds[n.name] == "getitem" for n in split_items)
    x_index = [n for n in gm.graph.nodes if n.op == "call_function" and n.args
               and getattr(n.args[0], "name", "") == "x" and target_name(n) == "getitem"]
    assert [kinds[n.name] for n in x_index] == ["slice"]  # x[:, 0] is a tensor slice
    mul_shape = [k for name, k in kinds.items() if name.startswith("mul")]
    assert "shape" in mul_shape  # b * n * c is integer bookkeeping
    # meta kinds are out of the histogram unless asked for
    h, full = kind_histogram(gm), kind_histogram(gm, include_meta=True)
    assert not set(h) & META_KINDS
    assert full["placeholder"] == 1 and full["assert"] == 1 and full["getitem"] >= 5


class Custom(nn.Module):
    archnet_leaf = True  # kept as one node by the tracer

    def forward(self, x):
        return x * 2


class Tagged(Custom):
    archnet_kind = "relu"  # a surrogate declaring its kind


class HasCustom(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1


def test_unknown_module_and_declared_kind():
    gm = ax.capture(HasCustom(Custom()), (torch.randn(2, 3),), method="fx")
    assert kind_histogram(gm) == {"unknown:Custom": 1, "add": 1}
    gm = ax.capture(HasCustom(Tagged()), (torch.randn(2, 3),), method="fx")
    assert kind_histogram(gm) == {"relu": 1, "add": 1}


@pytest.mark.parametrize("target", ax.list_targets())
def test_unknown_kinds_are_never_supported(target):
    gm = ax.capture(HasCustom(Custom()), (torch.randn(2, 3),), method="fx")
    rep = ax.check(gm, target)
    assert not rep.ok
    assert rep.unsupported_counts["unknown:Custom"] == 1
    gm = ax.capture(Fn(lambda x: torch.cumprod(x, -1)), (torch.randn(2, 3),))
    assert ax.check(gm, target).unsupported_counts == {"unknown:cumprod": 1}


def test_classifier_vocabulary_is_what_targets_may_name():
    """Every kind the tables map to is a target-known kind, a meta kind or shape bookkeeping."""
    from archnet_fx.ir.opkinds import MODULE_KINDS, NAME_KINDS
    kinds = {k for _, k in MODULE_KINDS} | set(NAME_KINDS.values())
    extra = {k for k in kinds if k not in KNOWN_KINDS and not k.startswith("unknown:")}
    assert extra <= META_KINDS, extra


def test_tensor_indexing_is_a_gather_and_int_indexing_a_slice():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(10, 4))

        def forward(self, ids, x):
            return self.table[ids] + x[:, 0:1]

    gm = ax.capture(M(), (torch.tensor([[1, 2], [3, 4]]), torch.randn(2, 2, 4)), method="fx")
    kinds = [ax.node_kind(n, gm) for n in gm.graph.nodes if n.op == "call_function"]
    assert "gather" in kinds and "slice" in kinds


def test_onnx_table_speaks_the_core_vocabulary():
    """The exporter's ONNX op → kind table yields only known kinds (one vocabulary for fx,
    ATen and ONNX), and agrees with the fx/ATen table on the ops both name."""
    from archnet_fx.ir.opkinds import KNOWN_KINDS, NAME_KINDS, ONNX_KINDS, onnx_kind

    yielded = {k for k in ONNX_KINDS.values() if k is not None}
    assert yielded <= KNOWN_KINDS, yielded - KNOWN_KINDS
    # ops with the same meaning in both worlds map to the same kind
    same = {"ReduceMax": "amax", "ReduceMin": "amin", "Equal": "eq", "Reciprocal": "reciprocal",
            "LogSoftmax": "log_softmax", "Softmax": "softmax", "Erf": "erf", "Sqrt": "sqrt",
            "Exp": "exp", "Where": "where", "Concat": "cat", "Transpose": "permute"}
    for op, torch_name in same.items():
        assert ONNX_KINDS[op] == NAME_KINDS[torch_name], (op, ONNX_KINDS[op])

    class N:  # the two fields of an onnx NodeProto the classifier reads
        def __init__(self, op_type, inputs):
            self.op_type, self.input = op_type, inputs
    assert onnx_kind(N("MatMul", ["x", "w"]), {"w"}) == "linear"
    assert onnx_kind(N("MatMul", ["x", "y"]), {"w"}) == "matmul"
    assert onnx_kind(N("Gather", ["x", "i"]), {"i"}) == "slice"
    assert onnx_kind(N("QuantizeLinear", ["x", "s", "z"])) == "identity"
    assert onnx_kind(N("NonMaxSuppression", [])) == "unknown:NonMaxSuppression"

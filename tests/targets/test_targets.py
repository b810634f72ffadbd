"""Tests for archnet_fx.targets: built-in targets, the loader and its error messages."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re

import pytest

from archnet_fx.errors import BitWidthError, TargetError
from archnet_fx.targets import (
    KNOWN_KINDS,
    CostSpec,
    HostFallback,
    OpLimits,
    QuantSpec,
    Target,
    list_targets,
    load_target,
    targets_table,
)

# A small valid target; error tests change one line of it.
VALID = """\
name = "npu_x"
description = "test chip"

[ops]
conv = { kernel_sizes = [1, 3], max_channels = 64 }
linear = {}
mul = { two_activations = false }
relu = {}

[quant]
weight_bits = [4, 8]
act_bits = [8]
default_weight_bits = 8
default_act_bits = 8
weight_granularity = "per_channel"
weight_symmetric = true
act_symmetric = false
power_of_two_scales = false
accumulator_bits = 32

[cost]
memory_bytes_per_s = 1e9
sram_bytes = 1024
per_op_overhead_s = 1e-6
fusable = ["relu"]

[cost.peak_ops_per_s]
int8 = 1e12

[cost.host]
ops_per_s = 1e9
link_bytes_per_s = 1e9
round_trip_s = 1e-5
"""


def write(tmp_path, old: str | None = None, new: str = "", name: str = "npu_x.toml"):
    text = VALID
    if old is not None:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / name
    path.write_text(text)
    return path


# --- built-ins ---------------------------------------------------------------------------------


def test_list_targets():
    assert list_targets() == ["dsp_c", "npu_a", "npu_b"]


@pytest.mark.parametrize("name", ["dsp_c", "npu_a", "npu_b"])
def test_builtin_loads(name):
    t = load_target(name)
    assert t.name == name
    assert t.source.endswith(f"{name}.toml")
    assert set(t.ops) <= KNOWN_KINDS
    assert all(t.supports(k) for k in t.cost.fusable)
    assert t.quant.target_name == name
    assert t.quant.check_bits() == (t.quant.default_weight_bits, t.quant.default_act_bits)
    assert load_target(name) is t  # cached: immutable, so sharing is safe


def test_builtins_differ_as_designed():
    a, b, c = load_target("npu_a"), load_target("npu_b"), load_target("dsp_c")
    transformer_kinds = ["layer_norm", "softmax", "div", "sqrt", "rsqrt"]
    for t in (a, b, c):
        assert not any(t.supports(k) for k in transformer_kinds)
    # npu_a: int4 weights, two-activation matmul and mul, no GELU / gather / exp.
    assert a.quant.weight_bits == (4, 8) and a.quant.weight_granularity == "per_channel"
    assert not a.quant.act_symmetric and not a.quant.power_of_two_scales
    assert a.limits("conv").kernel_sizes == (1, 3, 5, 7) and a.limits("conv").max_channels == 8192
    assert a.limits("matmul").two_activations and a.limits("mul").two_activations
    assert a.cost.peak_ops_per_s == {4: 8e12, 8: 4e12}
    assert not any(a.supports(k) for k in ["gelu", "embedding", "gather", "exp", "tanh", "sigmoid"])
    # npu_b: int8-only, per-tensor pow2 scales, mul only by constants, fewer layout ops.
    assert b.quant.weight_bits == (8,) and b.quant.weight_granularity == "per_tensor"
    assert b.quant.power_of_two_scales and b.quant.act_symmetric
    assert b.limits("matmul").two_activations and not b.limits("mul").two_activations
    assert b.limits("conv").kernel_sizes == (1, 3) and b.limits("linear").max_channels == 2048
    assert not any(b.supports(k) for k in ["expand", "pad", "upsample", "mean", "neg"])
    assert set(b.cost.peak_ops_per_s) == {8}
    # dsp_c: int16 activations by default, LUT elementwise functions are native.
    assert c.quant.act_bits == (8, 16) and c.quant.default_act_bits == 16
    assert c.quant.accumulator_bits == 40
    assert all(c.supports(k) for k in ["gelu", "silu", "sigmoid", "tanh", "exp", "erf", "embedding"])
    assert c.limits("conv").kernel_sizes is None and c.limits("conv").max_channels == 4096
    assert c.cost.peak_ops_per_s == {8: 5e11, 16: 2.5e11}
    assert len({a.cost.host.round_trip_s, b.cost.host.round_trip_s, c.cost.host.round_trip_s}) == 3


def test_known_kinds_cover_the_classifier():
    opkinds = pytest.importorskip("archnet_fx.ir.opkinds")
    emitted = set(opkinds.NAME_KINDS.values()) | {k for _, k in opkinds.MODULE_KINDS}
    emitted = {k for k in emitted if not k.startswith("unknown:")} - set(opkinds.META_KINDS)
    assert emitted <= KNOWN_KINDS


def test_unknown_kinds_never_supported():
    t = load_target("dsp_c")
    assert not t.supports("unknown:foo")
    assert t.limits("unknown:foo") is None and t.limits("softmax") is None


def test_targets_table():
    table = targets_table()
    for name in list_targets():
        assert name in table
    assert "per_tensor" in table and "peak int8 TOPS" in table


# --- loading by path / passthrough -------------------------------------------------------------


def test_user_file_by_path(tmp_path):
    path = write(tmp_path)
    for arg in (path, str(path)):
        t = load_target(arg)
        assert t.name == "npu_x" and t.source == str(path)
        assert t.supports("conv") and not t.limits("mul").two_activations
        assert t.limits("relu") == OpLimits(kind="relu")


def test_int_accepted_for_float(tmp_path):
    t = load_target(write(tmp_path, "memory_bytes_per_s = 1e9", "memory_bytes_per_s = 1000000000"))
    assert t.cost.memory_bytes_per_s == 1e9 and isinstance(t.cost.memory_bytes_per_s, float)


def test_target_passthrough():
    t = load_target("npu_a")
    assert load_target(t) is t


def test_frozen_hashable_picklable():
    t = load_target("npu_a")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.quant.weight_bits = (2,)
    with pytest.raises(TypeError):
        t.ops["gelu"] = OpLimits(kind="gelu")
    assert isinstance(t.quant.weight_bits, tuple) and isinstance(t.cost.fusable, tuple)
    assert hash(t) == hash(copy.deepcopy(t))
    assert pickle.loads(pickle.dumps(t)) == t


def test_python_construction_is_validated_too():
    q = load_target("npu_a").quant
    with pytest.raises(TargetError, match=r"field 'default_weight_bits': 8 is not among the allowed weight_bits \(4\)"):
        dataclasses.replace(q, weight_bits=(4,))
    assert dataclasses.replace(q, weight_bits=[8]).weight_bits == (8,)  # lists canonicalised
    host = HostFallback(ops_per_s=1, link_bytes_per_s=1, round_trip_s=0)
    cost = CostSpec(peak_ops_per_s={8: 1e12}, memory_bytes_per_s=1e9, sram_bytes=0,
                    per_op_overhead_s=0, fusable=(), host=host)
    t = Target(name="tiny", description="", ops={"relu": OpLimits("relu")}, quant=q, cost=cost)
    assert t.quant.target_name == "tiny" and t.source == "<memory>"
    with pytest.raises(TargetError, match=r"field 'ops\.relu': limits are for kind 'conv'"):
        Target(name="tiny", description="", ops={"relu": OpLimits("conv")}, quant=q, cost=cost)
    assert isinstance(t.quant, QuantSpec)


# --- check_bits --------------------------------------------------------------------------------


def test_check_bits_defaults_and_explicit():
    assert load_target("npu_a").quant.check_bits() == (8, 8)
    assert load_target("npu_a").quant.check_bits(weight_bits=4) == (4, 8)
    assert load_target("dsp_c").quant.check_bits() == (8, 16)
    assert load_target("dsp_c").quant.check_bits(act_bits=8) == (8, 8)


def test_check_bits_refuses():
    q = load_target("npu_b").quant
    with pytest.raises(BitWidthError, match=r"target 'npu_b' does not support weight_bits=4 \(allowed: 8\)"):
        q.check_bits(weight_bits=4)
    with pytest.raises(BitWidthError, match=r"act_bits=16 \(allowed: 8\)"):
        q.check_bits(act_bits=16)
    with pytest.raises(TypeError, match="weight_bits must be an int"):
        q.check_bits(weight_bits=True)
    assert issubclass(BitWidthError, TargetError) and issubclass(TargetError, ValueError)


# --- error messages: each names the file and the field -----------------------------------------

BAD = [
    # id, old line, new line, dotted field, reason (regex)
    ("syntax", "weight_symmetric = true", "weight_symmetric = yes", "quant.weight_symmetric",
     "TOML syntax error"),
    ("unknown-top", 'description = "test chip"', 'description = "x"\ncolour = "red"', "colour",
     "unknown field; expected one of: name, description, ops, quant, cost"),
    ("unknown-quant", "accumulator_bits = 32", "accumulator_bits = 32\nweight_bitz = [8]",
     "quant.weight_bitz", "unknown field; did you mean 'weight_bits'"),
    ("unknown-op-field", "linear = {}", "linear = { max_chanels = 8 }", "ops.linear.max_chanels",
     "unknown field; did you mean 'max_channels'"),
    ("missing", "accumulator_bits = 32\n", "", "quant.accumulator_bits", "missing required field"),
    ("missing-table", "[cost.host]\nops_per_s = 1e9\nlink_bytes_per_s = 1e9\nround_trip_s = 1e-5\n", "",
     "cost.host", "missing required field"),
    ("str-bits", "weight_bits = [4, 8]", 'weight_bits = [4, "8"]', "quant.weight_bits[1]",
     "expected int, got str '8'"),
    ("bool-int", "accumulator_bits = 32", "accumulator_bits = true", "quant.accumulator_bits",
     "expected int, got bool True"),
    ("str-float", "round_trip_s = 1e-5", 'round_trip_s = "fast"', "cost.host.round_trip_s",
     "expected float, got str"),
    ("list-type", "fusable = [\"relu\"]", 'fusable = "relu"', "cost.fusable", "expected a list of str"),
    ("zero-bits", "weight_bits = [4, 8]", "weight_bits = [4, 0]", "quant.weight_bits[1]",
     "bit width must be between 1 and 32, got 0"),
    ("dup-bits", "weight_bits = [4, 8]", "weight_bits = [8, 8]", "quant.weight_bits[1]", "duplicate value 8"),
    ("default-not-allowed", "default_weight_bits = 8", "default_weight_bits = 2", "quant.default_weight_bits",
     r"2 is not among the allowed weight_bits \(4, 8\)"),
    ("granularity", '"per_channel"', '"per_row"', "quant.weight_granularity",
     "must be one of 'per_channel', 'per_tensor', got 'per_row'"),
    ("negative-rate", "memory_bytes_per_s = 1e9", "memory_bytes_per_s = -1e9", "cost.memory_bytes_per_s",
     "must be a finite number > 0"),
    ("negative-sram", "sram_bytes = 1024", "sram_bytes = -1", "cost.sram_bytes", "must be a finite number >= 0"),
    ("peak-key", "int8 = 1e12", "fp16 = 1e12", "cost.peak_ops_per_s.fp16", "precision key must look like 'int8'"),
    ("peak-value", "int8 = 1e12", "int8 = 0", "cost.peak_ops_per_s.int8", "must be a finite number > 0"),
    ("unknown-kind", "relu = {}", "rleu = {}", "ops.rleu", "unknown op kind 'rleu'; did you mean 'relu'"),
    ("fusable-kind", 'fusable = ["relu"]', 'fusable = ["relu", "gelu"]', "cost.fusable[1]",
     "'gelu' is not among this target's ops"),
    ("kernel-on-linear", "linear = {}", "linear = { kernel_sizes = [3] }", "ops.linear.kernel_sizes",
     "only applies to op kinds"),
    ("two-act-on-relu", "relu = {}", "relu = { two_activations = false }", "ops.relu.two_activations",
     "only applies to op kinds"),
    ("op-not-table", "linear = {}", "linear = 3", "ops.linear", "expected a table, got int 3"),
    ("kind-in-entry", "linear = {}", 'linear = { kind = "linear" }', "ops.linear.kind", "unknown field"),
]


@pytest.mark.parametrize("old,new,field,reason", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_file_names_file_and_field(tmp_path, old, new, field, reason):
    path = write(tmp_path, old, new)
    with pytest.raises(TargetError, match=re.escape(f"{path}: field '{field}': ")) as info:
        load_target(path)
    assert re.search(reason, str(info.value)), str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(TargetError, match=re.escape(f"{path}: cannot read target file")):
        load_target(path)
    with pytest.raises(TargetError, match="cannot read target file"):
        load_target(str(path))


def test_unknown_name_lists_builtins():
    with pytest.raises(TargetError, match=r"unknown target 'npu_z'; built-in targets are: dsp_c, npu_a, npu_b "
                                          r"\(or pass a path to a \.toml target file\)"):
        load_target("npu_z")


def test_wrong_argument_type():
    with pytest.raises(TypeError, match="built-in name, a path to a .toml file or a Target"):
        load_target(42)

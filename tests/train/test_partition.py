"""Partition into blocks (archnet_fx/train/partition.py).

Checks: blocks cover every activation node exactly once, running the blocks one after another
equals the GraphModule (exactly: the same ops on the same values), side inputs cross blocks,
cuts sit where few tensors are live, the three ways to choose cuts, and their errors.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archnet_fx.ir.dataflow import input_dependent
from archnet_fx.train.partition import block_table, layer_key, live_profile, partition, run_blocks
from archnet_fx.infra.manager import flat_outputs
from archnet_fx.quant.fakequant import insert_fake_quant
from passtest import captured_zoo


@functools.lru_cache(maxsize=None)
def student(name: str) -> torch.fx.GraphModule:
    """Legalized for npu_a and fake-quantized (quantizers uncalibrated: pass-through)."""
    from passtest import legalized  # one legalization per model for the whole session
    return insert_fake_quant(legalized(name).module, "npu_a").module


def _example(gm):
    return gm.meta["archnet.example"]


def _check_cover_and_chain(gm, blocks):
    acts = [n.name for n in gm.graph.nodes
            if n in input_dependent(gm) and n.op not in ("placeholder", "output")]
    covered = [n for b in blocks for n in b.nodes]
    assert sorted(covered) == sorted(acts), "blocks must cover every activation exactly once"
    assert len(covered) == len(set(covered))
    produced = {}
    for b in blocks:
        for i in b.inputs:  # every input is a graph input or an earlier block's output
            assert i in produced or any(n.name == i and n.op == "placeholder"
                                        for n in gm.graph.nodes)
        for o in b.outputs:
            produced[o] = b.index
    args, kwargs = _example(gm)
    with torch.no_grad():
        want = flat_outputs(gm(*args, **kwargs))
        got = flat_outputs(run_blocks(blocks, gm, *args, **kwargs))
    assert len(want) == len(got)
    for a, c in zip(want, got):
        assert torch.equal(a, c)


@pytest.mark.parametrize("name,n_blocks", [("mlp", 2), ("cnn", 1), ("vit", 2),
                                           ("bert_tiny", 3)])
def test_default_blocks_cover_and_chain(name, n_blocks):
    gm = student(name)
    blocks = partition(gm)
    assert len(blocks) == n_blocks
    _check_cover_and_chain(gm, blocks)
    assert "live at cut" in block_table(blocks)


def test_bert_tiny_layers_and_side_inputs():
    gm = student("bert_tiny")
    blocks = partition(gm)
    assert [b.name for b in blocks] == ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    # the attention mask (and the sequence length) cross every block: side inputs of the last
    last = blocks[-1]
    assert "where" in last.inputs and "where" in last.side_inputs
    assert any(i.startswith("sym_size") for i in last.side_inputs)
    # a layer boundary carries the hidden state (float, not its quantized copy) + mask + length
    assert blocks[1].outputs == ["layer_norm_2_ln_emulate"]
    assert blocks[0].live_after == 2.25  # two tensors and one Python int (1/4)
    # the graph's two outputs come from the last block
    assert set(last.outputs) == {"layer_norm_4_ln_emulate", "tanh_pwl"}


def test_cut_where_few_tensors_live():
    gm = student("vit")
    prof = {name: live for name, live, _ in live_profile(gm)}
    blocks = partition(gm)
    cut = blocks[0].nodes[-1]
    assert prof[cut] == 1 == min(prof[b.nodes[-1]] for b in blocks[:-1])


def test_layer_key_from_module_path():
    gm = student("bert_tiny")
    keys = {layer_key(n) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"encoder.layer.0", "encoder.layer.1", "embeddings"} <= keys


@settings(max_examples=6, deadline=None)
@given(st.integers(min_value=1, max_value=7))
def test_granularity_any_number_of_blocks_chains(n):
    gm = student("vit")
    blocks = partition(gm, granularity=n)
    assert 1 <= len(blocks) <= n
    if n <= 4:
        assert len(blocks) == n
    _check_cover_and_chain(gm, blocks)


def test_cut_nodes():
    gm = student("bert_tiny")
    blocks = partition(gm, cut_nodes=["layer_norm_1_ln_emulate", "layer_norm_3_ln_emulate"])
    assert [b.nodes[-1] for b in blocks[:-1]] == ["layer_norm_1_ln_emulate",
                                                  "layer_norm_3_ln_emulate"]
    _check_cover_and_chain(gm, blocks)


def test_boundary_ok_is_respected():
    gm = student("vit")
    reject = {"add_2"}

    def ok(live):
        return "rejected" if reject & set(live) else None
    blocks = partition(gm, boundary_ok=ok)
    assert all("add_2" not in b.outputs or b is blocks[-1] for b in blocks)
    _check_cover_and_chain(gm, blocks)
    with pytest.raises(ValueError, match="rejected"):
        partition(gm, cut_nodes=["add_2"], boundary_ok=ok)


@pytest.mark.parametrize("kwargs,match", [
    (dict(granularity=0), "granularity"),
    (dict(granularity=2.5), "granularity"),
    (dict(granularity=2, cut_nodes=["add_2"]), "not both"),
    (dict(cut_nodes=["no_such_node"]), "not in the graph"),
    (dict(cut_nodes=["head"]), "last node"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        partition(student("vit"), **kwargs)


def test_plain_captured_graph_and_blocks_share_parameters():
    _, ex, gm = captured_zoo("cnn")
    blocks = partition(gm, granularity=2)
    assert len(blocks) == 2
    _check_cover_and_chain(gm, blocks)
    ids = {id(p) for p in gm.parameters()}
    assert all(id(p) in ids for b in blocks for p in b.parameters())

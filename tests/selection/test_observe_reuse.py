"""The selection's legalizations share one calibration observation per graph, parameters,
watched nodes and batches (archnet_fx.surrogate.observe.reuse_observations)."""
from __future__ import annotations

import torch
from torch import nn

import archnet_fx as ax


def _gm():
    torch.manual_seed(0)
    m = nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64)).eval()
    return ax.capture(m, (torch.randn(1, 4, 64),))


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(1, 4, 64, generator=g),) for _ in range(n)]


def test_observations_are_shared_only_inside_the_block_and_for_the_same_inputs():
    from archnet_fx.surrogate.observe import observe, reuse_observations

    gm = _gm()
    a, b = [((x,), {}) for (x,) in _batches(2)], [((x,), {}) for (x,) in _batches(3)[1:]]
    assert observe(gm, a, {"_1"}) is not observe(gm, a, {"_1"})     # no sharing outside
    with reuse_observations():
        first = observe(gm, a, {"_1"})
        assert observe(gm, [((x.clone(),), {}) for ((x,), _) in a], {"_1"}) is first
        assert observe(gm, b, {"_1"}) is not first                   # other batches
        assert observe(gm, a, {"_0"}) is not first                   # other watched nodes
        assert torch.equal(first["_1"].inputs[0], observe(gm, a, {"_1"})["_1"].inputs[0])
    assert observe(gm, a, {"_1"}) is not first

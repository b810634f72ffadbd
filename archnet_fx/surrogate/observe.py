"""Samples of the inputs of the nodes a target cannot run, on calibration data.

:func:`observe` interprets the graph (a ``torch.fx.Interpreter``) on calibration batches and
keeps, per watched node, a bounded subsample of each input (:class:`NodeSamples`: values,
range, quantiles). Emulation candidates fit their breakpoints to these ranges.

Inside :func:`reuse_observations` (the hardware-aware selection legalizes one model on the same
batches a dozen times), an observation of the same graph, parameters, watched nodes and batch
tensors is made once and handed out again.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.fx
from torch.utils import _pytree as pytree

from archnet_fx.ir.shapes import bind_placeholders
from archnet_fx.surrogate.pwl import quantiles, subsample


# --------------------------------------------------------------------------- observation


@dataclass
class NodeSamples:
    """Samples of one node's tensor inputs (rows of the last axis) and their extremes."""
    inputs: list[torch.Tensor] = field(default_factory=list)  # per tensor input: [rows, last]
    lo: list[float] = field(default_factory=list)
    hi: list[float] = field(default_factory=list)

    def values(self, i: int = 0) -> torch.Tensor:
        return self.inputs[i].flatten()

    def range(self, i: int = 0, q: float = 0.0) -> tuple[float, float]:
        """(low, high) of input ``i``; with ``q`` > 0 the q / 1-q quantiles of finite values."""
        if q <= 0:
            return self.lo[i], self.hi[i]
        v = self.values(i)
        v = v[torch.isfinite(v)]
        v = subsample(v, 200_000, seed=0).double()
        lo, hi = quantiles(v, torch.tensor([q, 1 - q], dtype=torch.float64)).tolist()
        return lo, hi


Ranges = dict  # node name -> NodeSamples


class _Observer(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, watch: set[str], rows: int, store: Ranges,
                 gen: torch.Generator):
        super().__init__(gm)
        self.watch, self.rows, self.store, self.gen = watch, rows, store, gen

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.watch:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            tensors = [a for a in list(args) + list(kwargs.values())
                       if isinstance(a, torch.Tensor) and a.is_floating_point()]
            rec = self.store.setdefault(n.name, NodeSamples())
            for i, t in enumerate(tensors):
                t = t.detach().float()
                rows = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
                if rows.shape[0] > self.rows:
                    idx = torch.randperm(rows.shape[0], generator=self.gen)[:self.rows]
                    rows = rows[idx]
                lo = hi = 0.0
                if t.numel():
                    t_lo, t_hi = torch.aminmax(t)
                    lo, hi = float(t_lo), float(t_hi)
                if not (math.isfinite(lo) and math.isfinite(hi)):  # some inf/NaN: skip those
                    fin = t[torch.isfinite(t)]
                    lo = float(fin.min()) if fin.numel() else 0.0
                    hi = float(fin.max()) if fin.numel() else 0.0
                if i < len(rec.inputs):
                    if rec.inputs[i].shape[-1] == rows.shape[-1]:
                        merged = torch.cat([rec.inputs[i], rows])
                        if merged.shape[0] > 4 * self.rows:
                            keep = torch.randperm(merged.shape[0], generator=self.gen)
                            merged = merged[keep[:4 * self.rows]]
                        rec.inputs[i] = merged
                    rec.lo[i], rec.hi[i] = min(rec.lo[i], lo), max(rec.hi[i], hi)
                else:
                    rec.inputs.append(rows)
                    rec.lo.append(lo)
                    rec.hi.append(hi)
        return super().run_node(n)


_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("archnet_fx_observations",
                                                                    default=None)


@contextlib.contextmanager
def reuse_observations() -> Iterator[None]:
    """Within the block, :func:`observe` returns its earlier result for the same graph (its
    nodes), parameter values, watched nodes, sample size and batches (their contents) instead
    of running the graph again; the results are dropped on leaving. Callers must not modify the
    samples they get (none does: the fits read them)."""
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def _memo_key(gm: torch.fx.GraphModule, batches: list, watch: set[str], rows: int) -> tuple:
    from archnet_fx.infra.instruments import tensor_digest

    params = tensor_digest(v for _, v in sorted(gm.state_dict().items()))
    data = tensor_digest(t for b in batches for t in pytree.tree_leaves(b))
    return (str(gm.graph), params, frozenset(watch), rows, data,
            repr([pytree.tree_structure(b) for b in batches]))


def observe(gm: torch.fx.GraphModule, batches: Iterable[tuple[tuple, dict]], watch: set[str],
            rows: int = 2048, max_batches: int = 16) -> Ranges:
    """Run ``gm`` on (args, kwargs) batches and keep samples of the watched nodes' inputs."""
    batches = [b for _, b in zip(range(max_batches), batches)]
    memo = _MEMO.get()
    key = _memo_key(gm, batches, watch, rows) if memo is not None else None
    if key is not None and key in memo:
        return memo[key]
    store: Ranges = {}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for args, kwargs in batches:
            _Observer(gm, watch, rows, store, gen).run(*bind_placeholders(gm, args, kwargs)[1])
    if key is not None:
        memo[key] = store
    return store

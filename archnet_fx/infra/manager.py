"""The pass manager: runs a named straight-line list of passes and verifies each.

``PassManager(name, passes, verify=True).run(gm)`` copies ``gm`` once, runs every pass on that
private copy, optionally checks each stage numerically against the previous one on the captured
example (an exact pass must agree within ``rtol·max|y| + atol``; an approximate one records its
error), and on failure raises :class:`~archnet_fx.errors.PipelineError` naming the passes that
ran and the one that failed. The pipelines themselves are lists in :mod:`archnet_fx.pipelines`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from archnet_fx.ir.shapes import shape_example
from archnet_fx.errors import PipelineError, VerificationError
from archnet_fx.infra.graphpass import GraphPass, copy_graph_module, recompile_now
from archnet_fx.infra.records import PassRecord

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- manager

@dataclass
class PipelineResult:
    """Output of :meth:`PassManager.run`: the final module, one record per pass, the stages."""
    module: torch.fx.GraphModule
    records: list[PassRecord]
    pipeline: str
    stages: list[torch.fx.GraphModule] = field(default_factory=list, repr=False)

    def record(self, name: str) -> PassRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(f"no pass named {name!r} ran; passes: {[r.name for r in self.records]}")

    def diff(self, name: str | None = None) -> str:
        from archnet_fx.infra.instruments import pass_diff, records_table
        return records_table(self.records) if name is None else pass_diff(self.record(name))


def flat_outputs(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def compare_outputs(ref: Any, got: Any) -> float:
    """Largest absolute difference between two (nested) outputs; inf on structure mismatch."""
    a, b = flat_outputs(ref), flat_outputs(got)
    if len(a) != len(b):
        return float("inf")
    err = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        if x.numel():
            err = max(err, float((x.double() - y.double()).abs().max()))
    return err


def _scale(out: Any) -> float:
    ts = flat_outputs(out)
    return max([float(t.double().abs().max()) for t in ts if t.numel()] + [1.0])


class PassManager:
    """Runs a named straight-line pipeline of passes.

    ``verify=True`` lints each result and compares it numerically with the previous stage on the
    example inputs: an ``exact`` pass must agree within ``rtol * max|output| + atol`` (defaults
    1e-4, 1e-5); an approximate pass (a surrogate) records its error without failing.
    """

    def __init__(self, name: str, passes: Iterable[GraphPass], *, verify: bool = False,
                 rtol: float = 1e-4, atol: float = 1e-5, keep_stages: bool = False) -> None:
        self.name = name
        self.passes = list(passes)
        self.verify = verify
        self.rtol, self.atol = rtol, atol
        self.keep_stages = keep_stages

    def run(self, gm: torch.fx.GraphModule, *, copy: bool = True, recompile: bool = True
            ) -> PipelineResult:
        """Run the pipeline on a copy of ``gm``; ``copy=False`` edits ``gm`` itself (for a caller
        that owns it, e.g. the output of an earlier pipeline). ``recompile=False`` leaves the
        result's generated ``forward`` stale, for a caller that edits it further and then calls
        ``module.recompile()`` once."""
        records: list[PassRecord] = []
        stages = [gm] if self.keep_stages else []
        # Verify on (at most) the first two samples: batch-dependent bugs still show, and a
        # large calibration-sized example does not make every pass cost a full forward.
        example = shape_example(gm, batch=2)
        prev_out = None
        if self.verify and example is not None:
            if not copy:
                gm.recompile()  # ours, possibly left stale by an earlier pipeline
            with torch.no_grad():
                prev_out = gm(*example[0], **example[1])
        # Passes edit one private copy in place (one graph copy and one recompile per pipeline,
        # not per pass); kept stages need a module per pass, and a pass that wraps __call__
        # gets called as such.
        cur = gm if self.keep_stages or not copy else copy_graph_module(gm, lazy=True)
        stale = False
        state = None
        for p in self.passes:
            ran = [r.name for r in records]
            try:
                if self.keep_stages or type(p).__call__ is not GraphPass.__call__:
                    if stale:
                        cur.recompile()
                        stale = False
                    res = p(cur)
                    state = None
                else:
                    # Linted per pass only when verifying (it names the pass that broke the
                    # graph); otherwise once, after the last pass.
                    res = p.run_inplace(cur, recompile=False, prior=state, lint=self.verify)
                    state = res.state
                    stale = stale or res.modified
                    if self.verify and stale:
                        cur.recompile()
                        stale = False
            except Exception as e:  # noqa: BLE001
                raise PipelineError(
                    f"pipeline '{self.name}': pass '{p.name}' failed: {type(e).__name__}: {e}\n"
                    f"  passes that ran: {ran or 'none'}") from e
            rec = res.record
            if self.verify and example is not None:
                with torch.no_grad():
                    out = res.module(*example[0], **example[1])
                err = compare_outputs(prev_out, out)
                rec.max_abs_error = err
                tol = self.rtol * _scale(prev_out) + self.atol
                if p.exact and not err <= tol:
                    raise VerificationError(
                        f"pipeline '{self.name}': pass '{p.name}' changed the numerics: max |diff| "
                        f"{err:.3g} > tolerance {tol:.3g}\n  passes that ran: {ran or 'none'}")
                prev_out = out
            log.debug("pass %s: %s", p.name, rec.kind_delta())
            records.append(rec)
            cur = res.module
            if self.keep_stages:
                stages.append(cur)
        if not self.verify and self.passes:
            try:
                cur.graph.lint()
            except Exception as e:  # noqa: BLE001
                raise PipelineError(
                    f"pipeline '{self.name}': the graph after passes "
                    f"{[r.name for r in records]} is malformed: {e} (run with verify=True to "
                    f"find the pass)") from e
        if recompile and (stale or (cur is not gm and isinstance(cur, _LazyGraphModule))):
            recompile_now(cur)
        return PipelineResult(cur, records, self.name, stages)

"""Shared checks for surrogate families (keeps each family's tests a few lines).

* :func:`legalize_ok` — legalize a model for a target with no host fallback and assert that
  ``check()`` reports zero unsupported on-chip nodes; returns the LegalizeResult.
* :func:`surrogates` — the Surrogate submodules of a legalized module.
* :func:`assert_body_legal` — trace one surrogate and assert every op inside is legal on the target.
* :func:`assert_grads_flow` — backprop through the module; every surrogate parameter gets a
  finite gradient and at least one is non-zero.
* :func:`max_rel_error` — max |a − b| / max |b| between two (nested) outputs.
* :func:`forms` — the same one-op model in module, functional and ATen (export) form.
"""
from __future__ import annotations

from typing import Any

import torch

import archnet_fx as ax
from archnet_fx.capture import LeafTracer
from archnet_fx.legality import _verdicts
from archnet_fx.legalize import legalize
from archnet_fx.infra.manager import flat_outputs
from archnet_fx.surrogate.base import Surrogate


def call(m: Any, ex: Any) -> Any:
    with torch.no_grad():
        return m(**ex) if isinstance(ex, dict) else m(*ex)


def legalize_ok(model: torch.nn.Module, ex: Any, target: str, **kw: Any):
    res = legalize(model, target, ex, **kw)
    rep = ax.check(res.module, target)
    assert rep.ok, f"still unsupported on {target}:\n{rep}"
    assert not rep.host_fallback_counts, f"host fallback on {target}: {rep.host_fallback_counts}"
    return res


def surrogates(gm: torch.nn.Module) -> list[Surrogate]:
    return [m for m in gm.modules() if isinstance(m, Surrogate)]


def assert_body_legal(mod: Surrogate, target: str) -> None:
    inner = torch.fx.GraphModule(mod, LeafTracer().trace(mod))
    bad = [v for v in _verdicts(inner, ax.load_target(target))
           if v.status in ("unsupported", "limit")]
    assert not bad, f"{type(mod).__name__} ({mod.candidate}) not legal on {target}: {bad}"


def assert_grads_flow(gm: torch.nn.Module, ex: Any) -> None:
    gm.train()
    params = [p for s in surrogates(gm) for p in s.parameters() if p.requires_grad]
    assert params, "no trainable surrogate parameters"
    out = gm(**ex) if isinstance(ex, dict) else gm(*ex)
    loss = sum(t.float().pow(2).mean() for t in flat_outputs(out) if t.is_floating_point())
    loss.backward()
    grads = [p.grad for p in params]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), "missing/NaN grads"
    assert any(float(g.abs().max()) > 0 for g in grads), "all surrogate gradients are zero"


def max_rel_error(ref: Any, got: Any) -> float:
    a, b = flat_outputs(ref), flat_outputs(got)
    assert len(a) == len(b)
    scale = max(float(t.abs().max()) for t in a) or 1.0
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b)) / scale


def forms(module_form: torch.nn.Module, functional_form: torch.nn.Module, ex: tuple
          ) -> dict[str, torch.fx.GraphModule]:
    """Captured graphs of the same op as a module call, a function call and an ATen op."""
    return {"module": ax.capture(module_form, ex, method="fx"),
            "functional": ax.capture(functional_form, ex, method="fx"),
            "aten": ax.capture(module_form, ex, method="export")}

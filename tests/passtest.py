"""Shared helper for pass tests (design.md §9 rule 7), so each pass test is a few lines.

Typical use::

    before, res = run_pass(div_to_mul(), Model(), (x,))
    assert_pass(res, before, fired={"div_const": 1}, hist={"mul": 1}, atol=1e-6, rtol=1e-6)
    assert_idempotent(div_to_mul(), res)

:func:`run_pass` captures a model (or takes an already captured GraphModule), snapshots it,
runs the pass and checks right away that the pass did not edit its input.
:func:`assert_pass` checks, in order:

* the input GraphModule is unchanged (generated code, node names/targets, state_dict values and
  tensor identities) — a pass never edits the caller's module;
* numerics: the output of the new module equals the input module's on the example inputs and on
  a second *seeded* input of the same shapes (floats redrawn, ints/bools kept), within the
  tolerance the test states (``|got - want| <= atol + rtol * |want|`` elementwise);
* the record is consistent: ``kinds_before``/``kinds_after`` are the histograms of the two graphs;
* the golden op-kind histogram (``hist``; meta kinds excluded) of the result;
* which rules fired and how often (``fired``; ``{}`` means "must not fire": then nothing may
  change at all);
* refusals, when given, by rule name and a substring of the reason;
* provenance: every created node carries ``node.meta["archnet.from_pass"] == pass name``;
* the new graph lints and the input guard still rejects a wrong shape where it did before.
"""
from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.fx

import archnet_fx as ax
from archnet_fx.ir.meta import CAPTURE_META_KEY, EXAMPLE_META_KEY
from archnet_fx.ir.opkinds import kind_histogram
from archnet_fx.ir.meta import FROM_PASS_KEY
from archnet_fx.infra.graphpass import GraphPass
from archnet_fx.infra.records import PassResult
from archnet_fx.infra.manager import flat_outputs

SEED = 1234


@dataclass
class Snapshot:
    """Everything about a GraphModule a pass must not touch."""
    code: str
    nodes: list[tuple[str, str, str]]
    state: dict[str, torch.Tensor]       # cloned values
    ids: dict[str, int]                  # tensor identities (no re-binding of attributes)
    kinds: list[Any]                     # node.meta["archnet.kind"] per node


def snapshot(gm: torch.fx.GraphModule) -> Snapshot:
    sd = gm.state_dict(keep_vars=True)
    return Snapshot(
        code=gm.code,
        nodes=[(n.name, n.op, str(n.target)) for n in gm.graph.nodes],
        state={k: v.detach().clone() for k, v in sd.items()},
        ids={k: id(v) for k, v in sd.items()},
        kinds=[n.meta.get("archnet.kind") for n in gm.graph.nodes],
    )


def assert_unchanged(gm: torch.fx.GraphModule, snap: Snapshot) -> None:
    assert gm.code == snap.code, "the pass edited its input graph in place"
    assert [(n.name, n.op, str(n.target)) for n in gm.graph.nodes] == snap.nodes
    assert [n.meta.get("archnet.kind") for n in gm.graph.nodes] == snap.kinds
    sd = gm.state_dict(keep_vars=True)
    assert sorted(sd) == sorted(snap.state), "the pass added/removed weights of its input"
    for k, v in sd.items():
        assert id(v) == snap.ids[k], f"the pass re-bound {k} on its input"
        assert torch.equal(v.detach(), snap.state[k]), f"the pass wrote into {k} of its input"


def as_captured(model_or_gm: Any, example: Any = None, method: str = "auto"
                ) -> torch.fx.GraphModule:
    if isinstance(model_or_gm, torch.fx.GraphModule) and CAPTURE_META_KEY in model_or_gm.meta:
        return model_or_gm
    return ax.capture(model_or_gm, example, method=method)


def run_pass(pass_obj: GraphPass, model_or_gm: Any, example: Any = None, *,
             method: str = "auto") -> tuple[torch.fx.GraphModule, PassResult]:
    """Capture (unless already captured), run ``pass_obj`` once; return ``(before_gm, result)``."""
    before = as_captured(model_or_gm, example, method)
    snap = snapshot(before)
    result = pass_obj(before)
    assert isinstance(result, PassResult)
    assert result.module is not before, "a pass must return a new module"
    assert_unchanged(before, snap)
    result.passtest_snapshot = snap  # type: ignore[attr-defined]
    return before, result


def seeded_like(example: tuple[tuple, dict], seed: int = SEED) -> tuple[tuple, dict]:
    """Same shapes as ``example``: float tensors redrawn from a seeded generator, others kept."""
    g = torch.Generator().manual_seed(seed)

    def redraw(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return torch.randn(v.shape, generator=g, dtype=v.dtype)
        return v
    args, kwargs = example
    return tuple(redraw(a) for a in args), {k: redraw(v) for k, v in kwargs.items()}


def assert_close_outputs(want: Any, got: Any, *, atol: float, rtol: float) -> None:
    a, b = flat_outputs(want), flat_outputs(got)
    assert len(a) == len(b), f"{len(b)} outputs, expected {len(a)}"
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=atol, rtol=rtol)


def call(gm: torch.nn.Module, inputs: tuple[tuple, dict]) -> Any:
    with torch.no_grad():
        return gm(*inputs[0], **inputs[1])


def assert_numerics(before: torch.fx.GraphModule, after: torch.fx.GraphModule, *,
                    atol: float, rtol: float, inputs: list[tuple[tuple, dict]] | None = None
                    ) -> None:
    if inputs is None:
        example = before.meta[EXAMPLE_META_KEY]
        inputs = [example, seeded_like(example)]
    for inp in inputs:
        assert_close_outputs(call(before, inp), call(after, inp), atol=atol, rtol=rtol)


def assert_pass(result: PassResult, before: torch.fx.GraphModule, example: Any = None, *,
                fired: Mapping[str, int] | None, hist: Mapping[str, int] | None,
                atol: float, rtol: float,
                refused: Mapping[str, str] | None = None) -> None:
    """Check one pass result against the module it was given (see the module docstring).

    ``example``: extra inputs (tuple/dict) to compare on besides the captured example and its
    seeded twin. ``fired``: exact rule-hit counts (``{}`` = must not fire; ``None`` = skip).
    ``hist``: exact golden op-kind histogram of the result (meta kinds excluded).
    ``refused``: rule name -> substring of a refusal reason that must have been recorded.
    """
    rec = result.record
    snap = getattr(result, "passtest_snapshot", None)
    if snap is not None:
        assert_unchanged(before, snap)
    out = result.module

    # numerics (tolerance stated by the caller)
    ex = before.meta[EXAMPLE_META_KEY]
    inputs = [ex, seeded_like(ex)]
    if example is not None:
        from archnet_fx.capture import normalize_inputs
        inputs.append(normalize_inputs(example))
    assert_numerics(before, out, atol=atol, rtol=rtol, inputs=inputs)

    # the record describes the two graphs
    assert rec.kinds_before == kind_histogram(before)
    assert rec.kinds_after == kind_histogram(out)
    assert rec.seconds >= 0
    assert result.modified == rec.modified
    out.graph.lint()

    if hist is not None:
        assert +kind_histogram(out) == +Counter(hist), (
            f"golden histogram mismatch:\n got  {dict(sorted(kind_histogram(out).items()))}\n"
            f" want {dict(sorted(hist.items()))}")
    if fired is not None:
        assert +rec.rule_hits == +Counter(fired), f"rule hits {dict(rec.rule_hits)} != {fired}"
        if not fired:
            assert not result.modified, f"no rule fired but the pass changed the graph: {rec}"
            assert not (rec.created or rec.erased or rec.replaced or rec.changed)
            assert out.code == before.code
        else:
            assert result.modified
    if refused:
        reasons = {}
        for f in rec.refusals:
            reasons.setdefault(f.rule, []).append(f.reason)
        for rule, text in refused.items():
            assert any(text in r for r in reasons.get(rule, [])), (
                f"no refusal of {rule!r} mentioning {text!r}; refusals: {reasons}")

    # provenance
    names = {n.name: n for n in out.graph.nodes}
    for name in rec.created:
        assert names[name].meta.get(FROM_PASS_KEY) == rec.name, (
            f"created node {name} lacks provenance {FROM_PASS_KEY}={rec.name!r}")
    for old, new in rec.replaced.items():
        assert old not in names or names[old].users == {}, f"{old} replaced but still used"
    # the guard survived: still raises InputError on a wrong non-batch shape
    _assert_guard_kept(before, out)


def _assert_guard_kept(before: torch.fx.GraphModule, after: torch.fx.GraphModule) -> None:
    args, kwargs = before.meta[EXAMPLE_META_KEY]
    first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
    if first is None or not first.is_floating_point():
        return
    bad = torch.randn(*first.shape[:-1], first.shape[-1] + 1)
    bad_args = tuple(bad if a is first else a for a in args)
    try:
        call(before, (bad_args, kwargs))
    except ax.InputError:
        pass  # capture's guard: the result must keep it
    except Exception:  # noqa: BLE001 - not captured by archnet_fx (no guard of ours)
        return
    else:  # the input had no guard to keep
        return
    try:
        call(after, (bad_args, kwargs))
    except ax.InputError:
        return
    raise AssertionError("the pass dropped the input shape guard")


def assert_idempotent(pass_obj: GraphPass, result: PassResult) -> PassResult:
    """Running the pass again on its own output changes nothing."""
    snap = snapshot(result.module)
    again = pass_obj(result.module)
    assert_unchanged(result.module, snap)
    assert not again.modified, f"second run changed the graph: {again.record}"
    assert not again.record.rule_hits, f"second run fired rules: {dict(again.record.rule_hits)}"
    assert not (again.record.created or again.record.erased or again.record.replaced)
    assert again.module.code == result.module.code
    return again


@functools.lru_cache(maxsize=None)
def legalized(name: str):
    """A zoo model captured and legalized for npu_a, once per session (shared by the
    quantization, partition and distillation tests; callers never modify it)."""
    _, _, teacher = captured_zoo(name)
    return ax.legalize(teacher, "npu_a", allow_host_fallback=True, verify=False)


@functools.lru_cache(maxsize=None)
def captured_zoo(name: str, method: str = "auto"):
    """``(model, example, gm)`` for a zoo model, captured once per test session.

    Shared between test modules: callers must not edit the model or the GraphModule (passes
    never do; tests that need a private copy build their own).
    """
    from archnet_fx.demo import zoo
    model, ex = zoo.get_model(name)
    return model, ex, ax.capture(model, ex, method=method)


# --------------------------------------------------------------------------- surrogate families

def family_pass(family: str, target: Any, ranges: Mapping[str, Any] | None = None,
                **options: Any) -> GraphPass:
    """The legalization pass of one surrogate family (``archnet_fx.passes.<family>``) for
    ``target``, with :class:`LegalizeOptions` ``options`` (choices, prefer, knots)."""
    import importlib

    from archnet_fx.surrogate.driver import LegalizeOptions, SurrogatePass
    cands = importlib.import_module(f"archnet_fx.passes.{family}").CANDIDATES
    return SurrogatePass(family, cands, ax.load_target(target), dict(ranges or {}),
                         LegalizeOptions(**options))


def run_family(family: str, model_or_gm: Any, example: Any = None, target: Any = "npu_a", *,
               calib: Any = None, method: str = "auto", **options: Any
               ) -> tuple[torch.fx.GraphModule, PassResult, GraphPass]:
    """Capture, canonicalize, observe the illegal nodes' inputs on ``calib`` (default: the
    example and its seeded twin) and run one family's pass as legalization does.

    Returns ``(before, result, pass)`` for :func:`assert_pass` and :func:`assert_idempotent`;
    ``before`` is the canonicalized graph the pass was given (and must not have edited).
    """
    from archnet_fx.capture import calibration_batches
    from archnet_fx.infra.manager import PassManager
    from archnet_fx.pipelines import canonicalize_passes
    from archnet_fx.surrogate.observe import observe

    gm = as_captured(model_or_gm, example, method)
    canon = PassManager("canonicalize", canonicalize_passes(), verify=False).run(gm).module
    tgt = ax.load_target(target)
    watch = {v.node for v in ax.check(canon, tgt).unsupported}
    ex = canon.meta[EXAMPLE_META_KEY]
    if calib is None:  # the captured (args, kwargs) and its seeded twin, as user batches
        calib = [k if k and not a else a for a, k in (ex, seeded_like(ex))]
    batches = calibration_batches(calib)
    ranges = observe(canon, batches, watch) if watch else {}
    p = family_pass(family, tgt, ranges, **options)
    before, result = run_pass(p, canon)
    return before, result, p

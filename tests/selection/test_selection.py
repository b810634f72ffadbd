"""HANT selection: the integer program on hand-checked problems, and select() end to end on a
small model (every candidate measured, the budget met, the assembled network legal)."""
from __future__ import annotations

import itertools

import pytest

from archnet_fx.errors import OptionError
from archnet_fx.selection import BITS_KIND, Option, SelectOptions, SelectionError, solve


def _toy():
    # three nodes; (latency µs, cost) per candidate
    table = {"a": [("exact", 10, 0.0), ("fast", 2, 0.03), ("faster", 1, 0.2)],
             "b": [("exact", 8, 0.0), ("fast", 3, 0.01)],
             "c": [("exact", 6, 0.0), ("fast", 1, 0.05), ("mid", 4, 0.004)]}
    opts = [Option(n, "k", c, "s", lat * 1e-6, cost) for n, rows in table.items()
            for c, lat, cost in rows]
    return table, opts


def _brute(table, base, budget=None, max_cost=None):
    best = None
    for combo in itertools.product(*table.values()):
        lat = base + sum(r[1] for r in combo) * 1e-6
        cost = sum(r[2] for r in combo)
        if budget is not None and lat > budget + 1e-12:
            continue
        if max_cost is not None and cost > max_cost + 1e-12:
            continue
        key = (cost, lat) if budget is not None else (lat, cost)
        if best is None or key < best[0]:
            best = (key, {n: r[0] for n, r in zip(table, combo)})
    return best


@pytest.mark.parametrize("budget_us", [30, 17, 12, 9, 6])
def test_ilp_finds_the_brute_force_optimum_within_the_budget(budget_us):
    table, opts = _toy()
    base = 5e-6
    chosen, predicted, objective, _ = solve(opts, base, budget_s=base + budget_us * 1e-6)
    (cost, lat), want = _brute(table, base, budget=base + budget_us * 1e-6)
    assert chosen == want
    assert objective == pytest.approx(cost) and predicted == pytest.approx(lat)
    assert predicted <= base + budget_us * 1e-6 + 1e-12


def test_ilp_dual_fastest_within_a_cost_allowance():
    table, opts = _toy()
    chosen, predicted, objective, _ = solve(opts, 0.0, max_cost=0.02)
    (lat, cost), want = _brute(table, 0.0, max_cost=0.02)
    assert chosen == want and objective <= 0.02 and predicted == pytest.approx(lat)


def test_infeasible_budget_names_the_fastest_and_the_most_faithful():
    _, opts = _toy()
    with pytest.raises(SelectionError) as ei:
        solve(opts, 5e-6, budget_s=5e-6 + 3e-6)      # the fastest is 1 + 3 + 1 = 5 µs
    msg = str(ei.value)
    assert "fastest achievable is 10.0 µs" in msg and "most faithful 29.0 µs" in msg
    assert isinstance(ei.value, OptionError)


@pytest.mark.parametrize("kw", [dict(speedup=0), dict(speedup=True), dict(latency_budget=-1),
                                dict(min_fidelity=1.5), dict(speedup=2, latency_budget=1e-3),
                                dict(steps=-1)])
def test_bad_selection_options(kw):
    with pytest.raises(OptionError):
        SelectOptions(**kw)


@pytest.fixture(scope="module")
def tiny_bert_run():
    pytest.importorskip("transformers")
    import archnet_fx as ax
    from archnet_fx.demo import zoo

    m, ex = zoo.get_model("bert_tiny", batch_size=8)
    batches = zoo.random_batches("bert_tiny", 6, 8, seed=0)
    return m, ex, batches, ax


def test_transform_with_a_speedup_measures_every_candidate_and_meets_the_budget(tiny_bert_run):
    m, ex, batches, ax = tiny_bert_run
    res = ax.transform(m, "npu_a", ex, batches, steps=2, holdout=2, progress=False,
                       verify=False, speedup=4.0)
    sel = res.report.selection
    assert sel is not None and sel.budget_s == pytest.approx(sel.original_s / 4)
    assert sel.predicted_s <= sel.budget_s
    # the additive latency model against the assembled network's estimate
    assert sel.assembled_s == pytest.approx(sel.predicted_s, rel=0.1)
    nodes = {o.node for o in sel.options if o.kind != BITS_KIND}    # widths: layer_bits
    assert set(sel.chosen) == nodes
    kinds = {(o.kind, o.candidate) for o in sel.options}
    assert {("layer_norm", "ln_affine"), ("gelu", "hard_gate"),
            ("softmax", "relu_attention")} <= kinds
    assert ax.check(res.module, "npu_a").ok
    est = ax.estimate_latency(res.module, "npu_a", {k: v[:1] for k, v in ex.items()}).total_s
    assert est <= sel.original_s / 4 * 1.1
    assert "selection: predicted" in res.report.table()
    # the report's summary: one row per (kind, candidate), chosen counts adding up per kind
    summary = sel.summary()
    for kind, cand in kinds:
        picked = sum(1 for o in sel.options if (o.kind, o.candidate) == (kind, cand)
                     and sel.picked(o))
        total = sum(1 for o in sel.options if (o.kind, o.candidate) == (kind, cand))
        assert any(cand in line and f"{picked}/{total}" in line
                   for line in summary.splitlines()), (kind, cand, summary)
    # the assembled network uses exactly the chosen candidate at every node (bert_tiny has nodes
    # named like their kind: "softmax", "gelu", "layer_norm", "embedding")
    assert {n: res_c for n, res_c in sel.legalized.choices.items() if n in nodes} == sel.chosen


def test_min_fidelity_picks_the_fastest_that_stays_faithful(tiny_bert_run):
    m, ex, batches, ax = tiny_bert_run
    res = ax.transform(m, "npu_a", ex, batches, steps=2, holdout=2, progress=False,
                       verify=False, min_fidelity=0.99)
    sel = res.report.selection
    assert sel.assembled_cosine >= 0.99
    assert sel.assembled_s < sel.default_s            # faster than the default candidates


def test_an_impossible_budget_raises_before_training(tiny_bert_run):
    m, ex, batches, ax = tiny_bert_run
    with pytest.raises(SelectionError, match="fastest achievable"):
        ax.transform(m, "npu_a", ex, batches, steps=2, holdout=2, progress=False,
                     verify=False, speedup=1000.0)


def test_cache_is_reused_for_a_new_budget_and_not_for_new_data(tiny_bert_run, tmp_path, caplog):
    import logging

    from archnet_fx.demo import zoo

    m, ex, batches, ax = tiny_bert_run
    kw = dict(steps=1, holdout=2, progress=False, verify=False, cache_dir=tmp_path)
    caplog.set_level(logging.INFO, logger="archnet_fx.progress")
    a = ax.transform(m, "npu_a", ex, batches, speedup=2.0, **kw).report.selection
    assert len(list(tmp_path.glob("selection-*.pt"))) == 1
    assert "from the cache" not in caplog.text
    caplog.clear()
    b = ax.transform(m, "npu_a", ex, batches, speedup=6.0, **kw).report.selection
    assert "from the cache" in caplog.text
    assert [(o.node, o.candidate, o.cost) for o in a.options] == \
        [(o.node, o.candidate, o.cost) for o in b.options]
    assert b.measure_s < a.measure_s
    caplog.clear()
    other = zoo.random_batches("bert_tiny", 6, 8, seed=1)       # new data: measured again
    ax.transform(m, "npu_a", ex, other, speedup=2.0, **kw)
    assert "from the cache" not in caplog.text
    assert len(list(tmp_path.glob("selection-*.pt"))) == 2
    caplog.clear()
    import copy

    import torch

    changed = copy.deepcopy(m)                                  # a changed model: measured again
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    ax.transform(changed, "npu_a", ex, batches, speedup=2.0, **kw)
    assert "from the cache" not in caplog.text
    assert len(list(tmp_path.glob("selection-*.pt"))) == 3


def test_cache_is_not_reused_by_changed_candidate_code(tiny_bert_run, tmp_path, caplog,
                                                       monkeypatch):
    """A new candidate or a changed builder (the digest of the families' and the measuring
    code) measures again; the digest covers every surrogate family's source."""
    import logging

    from archnet_fx import selection
    from archnet_fx.pipelines import FAMILIES

    m, ex, batches, ax = tiny_bert_run
    kw = dict(steps=1, holdout=2, progress=False, verify=False, cache_dir=tmp_path, speedup=2.0)
    caplog.set_level(logging.INFO, logger="archnet_fx.progress")
    ax.transform(m, "npu_a", ex, batches, **kw)
    monkeypatch.setattr(selection, "_code_digest", lambda: "another version of the passes")
    caplog.clear()
    ax.transform(m, "npu_a", ex, batches, **kw)
    assert "from the cache" not in caplog.text
    assert len(list(tmp_path.glob("selection-*.pt"))) == 2
    monkeypatch.undo()
    assert set(f"archnet_fx.passes.{f}" for f in FAMILIES) | set(selection._MEASURING_CODE) >= {
        "archnet_fx.passes.activations", "archnet_fx.passes.softmax", "archnet_fx.selection"}


def test_cache_dir_that_is_a_file_is_refused_before_work(tiny_bert_run, tmp_path):
    m, ex, batches, ax = tiny_bert_run
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(OptionError, match="cache_dir"):
        ax.transform(m, "npu_a", ex, batches, speedup=2.0, cache_dir=f / "sub")


def test_the_default_transform_selects_the_fastest_faithful_network(tiny_bert_run):
    from archnet_fx.transform import DEFAULT_MIN_FIDELITY

    m, ex, batches, ax = tiny_bert_run
    res = ax.transform(m, "npu_a", ex, batches, steps=2, holdout=2, progress=False,
                       verify=False)
    sel = res.report.selection
    assert sel is not None, "the default transform must measure and select"
    assert sel.assembled_cosine >= DEFAULT_MIN_FIDELITY
    assert sel.assembled_s < sel.default_s
    # "order" is the old default: the first candidate of the preferred style, nothing measured
    order = ax.transform(m, "npu_a", ex, batches, steps=2, holdout=2, progress=False,
                         verify=False, select="order")
    assert order.report.selection is None
    # ... and slower than the selected network
    one = {k: v[:1] for k, v in ex.items()}
    assert ax.estimate_latency(res.module, "npu_a", one).total_s < \
        ax.estimate_latency(order.module, "npu_a", one).total_s


@pytest.mark.parametrize("kw, match", [
    (dict(select="order", speedup=2.0), "speedup need.*select='measured'"),
    (dict(select="latency", min_fidelity=0.9), "min_fidelity need.*select='measured'"),
    (dict(select="order", workers=2), "workers belong.*select='measured'"),
    (dict(select="order", cache_dir="x"), "cache_dir belong.*select='measured'"),
    (dict(select="fastest"), "select must be one of"),
    (dict(workers=0), "workers must be an integer >= 1"),
    (dict(workers="group"), "none is initialized")])
def test_selection_arguments_without_measured_selection_are_refused(tiny_bert_run, kw, match):
    m, ex, batches, ax = tiny_bert_run
    with pytest.raises(OptionError, match=match):
        ax.transform(m, "npu_a", ex, batches, steps=1, progress=False, **kw)


def test_chain_surrogates_are_measured_at_the_chain_output_and_lossy_defaults_cost():
    """The decoder's hand-written RMSNorm is one chain rule anchored at `pow`: its surrogate
    replaces the chain's output. Measured there, the near-exact chain emulation costs ~0 and the
    affine form more; under prefer="structural" the lossy defaults are measured too (not free)."""
    import archnet_fx as ax
    from archnet_fx.demo import zoo

    m, ex = zoo.get_model("decoder")
    batches = zoo.random_batches("decoder", 6, 8, seed=0)
    sel = ax.transform(m, "npu_a", ex, batches, steps=1, holdout=2, progress=False,
                       prefer="structural").report.selection
    by = {(o.node, o.candidate): o for o in sel.options}
    chains = [n for (n, c) in by if c == "norm_chain_emulate"]
    assert chains, "the RMSNorm chains must be offered"
    for n in chains:
        emu, aff = by[n, "norm_chain_emulate"], by[n, "norm_chain_affine"]
        assert aff.default and emu.cost < 1e-6 and emu.local_nmse < 1e-6
        assert aff.cost > emu.cost and aff.local_nmse > 1e-4
    lossy_defaults = [o for o in sel.options if o.default and o.style == "structural"]
    assert lossy_defaults and all(o.cost > 0 for o in lossy_defaults)
    assert sel.assembled_cosine >= 0.99


def test_choose_resolves_another_budget_from_the_measurements(tiny_bert_run):
    m, ex, batches, ax = tiny_bert_run
    sel = ax.transform(m, "npu_a", ex, batches, steps=1, holdout=2, progress=False,
                       verify=False, speedup=2.0).report.selection
    for speedup in (2.0, 3.0, 4.0):
        chosen, predicted, cost = sel.choose(speedup=speedup)
        want, want_pred, want_cost, _ = solve(sel.options, sel.base_s,
                                              budget_s=sel.original_s / speedup)
        assert chosen == want and predicted == pytest.approx(want_pred)
        assert predicted <= sel.original_s / speedup * (1 + 1e-9)
    loose, _, loose_cost = sel.choose(min_fidelity=0.5)
    tight, _, tight_cost = sel.choose(min_fidelity=0.999)
    assert tight_cost <= 2 * (1 - 0.999) + 1e-12 and loose_cost <= 2 * (1 - 0.5)
    with pytest.raises(SelectionError, match="fastest achievable"):
        sel.choose(speedup=1000.0)


def test_two_gloo_workers_measure_the_same_as_one(tiny_bert_run):
    """workers=2: two forked ranks in a gloo group share the jobs; the measured options, the
    choice, the fitted modules and the transformed network's outputs equal workers=1's."""
    import torch

    m, ex, batches, ax = tiny_bert_run
    kw = dict(steps=2, holdout=2, progress=False, verify=False, speedup=3.0)
    one = ax.transform(m, "npu_a", ex, batches, **kw)
    two = ax.transform(m, "npu_a", ex, batches, workers=2, **kw)
    a, b = one.report.selection, two.report.selection
    assert [(o.node, o.candidate, o.cost, o.local_nmse) for o in a.options] == \
        [(o.node, o.candidate, o.cost, o.local_nmse) for o in b.options]
    assert a.chosen == b.chosen
    with torch.no_grad():
        outs = [torch.utils._pytree.tree_leaves(r.module(**ex)) for r in (one, two)]
    assert outs[0] and len(outs[0]) == len(outs[1])
    assert all(torch.equal(x, y) for x, y in zip(*outs))


def test_candidate_fit_leaves_nested_frozen_parameters_alone():
    """The measurement's fit honours ``distill_frozen`` at any depth, as distillation does: a
    softmax surrogate's normalizer (its 1/s PWL) and the PWL skip slopes stay as built while
    the exp's coefficients train."""
    import torch

    from archnet_fx.passes.softmax import SoftmaxPWL
    from archnet_fx.selection import _fit
    from archnet_fx.surrogate.base import frozen_parameters

    mod = SoftmaxPWL("softmax", 2, 8, lo=-16.0, knots=8, mode="mul")
    frozen = frozen_parameters(mod)
    assert {id(p) for p in mod.recip.parameters()} <= frozen
    assert id(mod.exp.coef) not in frozen
    with torch.no_grad():                     # a distorted exp, for the fit to repair
        mod.exp.coef.mul_(torch.linspace(0.5, 1.5, mod.exp.coef.numel()))
    before = {n: p.detach().clone() for n, p in mod.named_parameters()}
    g = torch.Generator().manual_seed(0)
    io = [((x,), torch.softmax(x, -1)) for x in (torch.randn(64, 8, generator=g) * 3
                                                 for _ in range(2))]
    start = _fit(mod, io, steps=0, lr=1e-3, seed=0)
    assert _fit(mod, io, steps=20, lr=1e-3, seed=0) < start
    after = dict(mod.named_parameters())
    for n, p in after.items():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (id(p) not in frozen), n

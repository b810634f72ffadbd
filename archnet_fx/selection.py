"""Hardware-aware selection (HANT): measure every candidate of every replaced node, choose with
one integer program.

``select(teacher, target, train, held, *, speedup=None, latency_budget=None,
min_fidelity=None, ...) -> Selection``

1. **Candidates.** The default legalization ``L0`` (every illegal node gets its default
   candidate, near-exact emulation where one exists) and one legalization per alternative
   candidate of each kind (all nodes of that kind take it, legalized on the fitting batches).
   Every surrogate is one ``call_module`` node named ``<node>_<candidate>``; the legalization's
   records say which node of the original (canonicalized) graph it computes — for a chain rule
   the chain's output, not its anchor — and from which of the original's nodes.
2. **Fidelity cost** of candidate *c* at node *n* (independent-block mode: the teacher's own
   inputs, so candidates of different nodes do not interact): its module is first fitted
   locally — ``steps`` Adam steps on the normalised MSE between its output and the original
   op's, on the original's inputs at that node over ``FIT_BATCHES`` calibration batches —
   then swapped alone into the **original** graph, and the held-out normalised MSE of the
   network's outputs against the original's (on at most ``MEASURE_HELD`` held-out batches) is
   its cost. Costs are measured in float; quantization comes after selection. The default
   legalization ``L0``'s own error is reported beside (:attr:`Selection.base_nmse`).
3. **Latency** of candidate *c* at node *n*: the cost model's time of its module's nodes
   (``estimate_latency`` rows ``<node>_<candidate>/...`` in the legalization that used it,
   batch 1, fused epilogues included), plus its share of the change it makes outside the
   surrogate modules (a host lookup removes the prologue's one-hot matrix and its upload).
   The network's latency is taken as additive: the rest of ``L0`` (its total minus its default
   modules' time) plus the chosen modules' times.
   :attr:`Selection.predicted_s` is that sum; the assembled network's estimate is reported
   beside it (``assembled_s``) so the error of the additive model is visible.
4. **One integer program** (``scipy.optimize.milp``, HiGHS): one binary per (node, candidate),
   exactly one per node; minimise the summed fidelity cost subject to predicted latency ≤
   budget (``latency_budget`` in seconds, or the original's estimate / ``speedup``); or, with
   ``min_fidelity`` alone, minimise latency subject to the summed cost ≤ ``2·(1 − min_fidelity)``
   (normalised MSE ≈ 2(1 − cosine) for outputs of equal norm), verified on the assembled float
   network's held-out mean cosine and re-solved with half the cost allowance while it misses
   (at most four times). An infeasible budget raises :class:`SelectionError` naming the fastest
   achievable latency and the most faithful one's latency.
5. **Assembly.** The network is legalized afresh with the chosen candidates as node choices, and
   every fitted module is loaded in place of its fresh one (a warm start for the distillation
   that follows in :func:`~archnet_fx.transform`).

Lossless candidates (styles ``exact`` and ``host``: a one-hot product or a host lookup for an
embedding) cost nothing in fidelity and are not fitted; near-exact ``emulation`` defaults are
charged 0 too (the default legalization's own error is reported); a lossy default (e.g. a
structural form under ``prefer="structural"``) is measured like any alternative. A candidate
whose module does not compute one node of the original from the original's nodes cannot be
swapped in alone and is left out, with a note.

**Jobs.** One job per (node, lossy candidate) and one per lossless candidate, in a fixed order;
``workers`` > 1 shares them over forked gloo ranks, and inside a running ``torch.distributed``
group (``workers="group"``: ``torchrun``, one machine or several with a shared ``cache_dir``) the
ranks share them (:mod:`archnet_fx.infra.workers`); a job's seed comes from its index, so the
measurement does not depend on how it was shared (up to floating-point summation order where
the per-process thread count changes a kernel's reduction). **Cache** (``cache_dir``): one file
per model (parameters, buffers and graph code), target, bits, candidate settings, calibration
and held-out data and recipe, holding every option and fitted module; a new budget on the same
model and data reads it and re-solves (:meth:`Selection.choose` re-solves in milliseconds
without assembling).

**Per-layer weight bits** (mixed precision), where the target lists more than one weight
width: every top-level conv/linear of the original with a weight parameter is a node of kind
``weight_bits`` whose candidates are the widths (``"w4"``, ``"w8"``; the default is
``weight_bits``). Latency: the layer's row in the cost model plus the change of its kernel
(the layer and the epilogue fused into it) with every layer at that width — additive like the
candidates'. A W4A8 layer runs at the int8 rate on npu_a, so W4 saves weight bytes only: it
makes a layer faster only where the layer is memory-bound (MiniLM at 128 tokens: only the
pooler, which reads 384×384 weights for one token; at a few tokens, every layer). A width that
is narrower than the default and not faster is dominated (more error, no gain) and not
measured — a note says at how many layers. Fidelity: the held-out output nMSE
with that one layer's weight quantized at the width (the target's granularity and symmetry,
MSE-calibrated), minus the layer's best width's; the assembled network's check quantizes the
chosen non-default layers' weights the same way. ``transform`` quantizes each layer at its
chosen width (:attr:`Selection.layer_bits`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

from archnet_fx.ir.copying import deepcopy
from archnet_fx.capture import as_call, first_sample
from archnet_fx.errors import OptionError, UnsupportedOpError, first_line
from archnet_fx.infra.progress import PROGRESS
from archnet_fx.infra.workers import all_ranks, run_jobs
from archnet_fx.ir.opkinds import node_kind, target_name
from archnet_fx.quant.fakequant import LAYER_KINDS
from archnet_fx.ir.shapes import bind_placeholders
from archnet_fx.surrogate.base import LOSSLESS, frozen_parameters
from archnet_fx.targets import Target, load_target

log = logging.getLogger(__name__)

#: The estimate outside every surrogate module (host link, prologue, hand-offs); a candidate is
#: charged the change it makes to it.
REST_KEY = "<rest>"
#: Calibration batches the candidates are fitted on (the original's inputs at their node).
FIT_BATCHES = 4
#: Held-out batches a candidate's fidelity cost is measured on.
MEASURE_HELD = 4
#: Kind of the per-layer weight-width options (candidates ``"w4"``, ``"w8"``, …).
BITS_KIND = "weight_bits"

__all__ = ["SelectionError", "SelectOptions", "Option", "Selection", "assemble", "select",
           "solve"]


class SelectionError(OptionError):
    """A latency budget no combination of candidates meets (the message states the fastest
    achievable latency and the most faithful combination's), or a fidelity floor none reaches."""


@dataclass(frozen=True)
class SelectOptions:
    """Options of :func:`select` (validated on construction)."""
    speedup: float | None = None
    latency_budget: float | None = None      # seconds
    min_fidelity: float | None = None        # held-out mean cosine of the outputs
    steps: int = 150                          # local fitting steps per candidate
    lr: float = 3e-3
    max_resolves: int = 4
    cache_dir: Any = None                     # measured options on disk, keyed (see select)
    workers: int | str = 1                    # local processes, or "group" (torch.distributed)

    def __post_init__(self) -> None:
        for name in ("speedup", "latency_budget"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not v > 0):
                raise OptionError(f"{name} must be a positive number or None, got {v!r}")
        if self.speedup is not None and self.latency_budget is not None:
            raise OptionError("give speedup or latency_budget, not both")
        m = self.min_fidelity
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float))
                              or not 0 < m < 1):
            raise OptionError(f"min_fidelity must be a cosine in (0, 1), got {m!r}")
        from archnet_fx.infra.workers import check_workers

        check_workers(self.workers)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise OptionError(f"selection steps must be an integer >= 0, got {self.steps!r}")
        if self.cache_dir is not None:
            from pathlib import Path

            from archnet_fx.infra.instruments import blocked_directory

            if not isinstance(self.cache_dir, (str, Path)):
                raise OptionError(f"cache_dir must be a directory path, got {self.cache_dir!r}")
            blocked = blocked_directory(Path(self.cache_dir))
            if blocked is not None:
                where, why = blocked
                raise OptionError(f"cache_dir {str(self.cache_dir)!r}: {where} is "
                                  f"{'a file' if why == 'file' else 'not writable'}; give a "
                                  "writable directory")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.speedup, self.latency_budget,
                                           self.min_fidelity))


@dataclass
class Option:
    """One candidate at one node, measured."""
    node: str
    kind: str
    candidate: str
    style: str
    latency_s: float
    cost: float                  # held-out output nMSE when swapped alone into the original
    local_nmse: float = 0.0      # its module's fitted error against the original op's output
    default: bool = False


@dataclass
class Selection:
    """What :func:`select` measured and chose."""
    options: list[Option]
    chosen: dict[str, str]
    original_s: float            # estimate of the original (host fallback for what is illegal)
    default_s: float             # L0's estimate
    base_s: float                # L0 without its selectable modules
    predicted_s: float           # base + the chosen modules (the additive model)
    assembled_s: float | None    # estimate of the assembled network
    budget_s: float | None
    objective: float             # summed fidelity cost of the choice
    base_nmse: float             # L0's held-out output nMSE against the teacher
    assembled_cosine: float | None
    solver_s: float
    measure_s: float
    resolves: int = 0
    notes: list[str] = field(default_factory=list)
    legalized: Any = field(default=None, repr=False)   # L0's LegalizeResult
    module: Any = field(default=None, repr=False)      # the assembled float network
    #: layers whose chosen weight width differs from ``weight_bits`` (node name -> bits);
    #: ``chosen`` holds the surrogate candidates only
    layer_bits: dict[str, int] = field(default_factory=dict)

    def picked(self, o: Option) -> bool:
        """Whether option ``o`` is the one chosen at its node (a weight layer not in
        ``layer_bits`` keeps its default width)."""
        if o.kind == BITS_KIND:
            return (f"w{self.layer_bits[o.node]}" == o.candidate if o.node in self.layer_bits
                    else o.default)
        return self.chosen.get(o.node) == o.candidate

    def changed(self) -> dict[str, int]:
        """How many nodes took each non-default choice: ``{"kind:candidate": count}``, widths
        as ``"weight_bits:w4"``."""
        return dict(Counter(f"{o.kind}:{o.candidate}" for o in self.options
                            if self.picked(o) and not o.default))

    def _head(self) -> str:
        return (f"selection: predicted {self.predicted_s * 1e6:.0f} µs (additive model), "
                + (f"assembled {self.assembled_s * 1e6:.0f} µs, " if self.assembled_s else "")
                + f"original {self.original_s * 1e6:.0f} µs "
                  f"({self.original_s / (self.assembled_s or self.predicted_s):.2f}× faster), "
                  f"default candidates {self.default_s * 1e6:.0f} µs; "
                + (f"budget {self.budget_s * 1e6:.0f} µs; " if self.budget_s else "")
                + f"summed fidelity cost {self.objective:.3g}"
                + (f", assembled float cosine {self.assembled_cosine:.4f}"
                   + (" (W4 layers' weights quantized)" if self.layer_bits else "")
                   if self.assembled_cosine is not None else "")
                + f"; measured in {self.measure_s:.1f} s, solved in {self.solver_s * 1e3:.0f} ms"
                + (f" ({self.resolves} re-solves)" if self.resolves else ""))

    def summary(self) -> str:
        """One row per (kind, candidate): at how many of the kind's nodes it was chosen, their
        µs and summed cost, and the range of its measured costs (the per-node table is
        :meth:`table`)."""
        from tabulate import tabulate

        groups: dict[tuple[str, str], list[Option]] = {}
        for o in self.options:
            groups.setdefault((o.kind, o.candidate), []).append(o)
        rows = []
        for (kind, cand), opts in groups.items():
            picked = [o for o in opts if self.picked(o)]
            costs = [o.cost for o in opts]
            rows.append((kind, cand + (" (default)" if any(o.default for o in opts) else ""),
                         opts[0].style, f"{len(picked)}/{len(opts)}",
                         f"{sum(o.latency_s for o in picked) * 1e6:.1f}",
                         f"{sum(o.cost for o in picked):.2e}",
                         f"{min(costs):.1e} – {max(costs):.1e}"))
        return "\n".join([self._head(), tabulate(
            rows, headers=["kind", "candidate", "style", "chosen at", "µs (chosen)",
                           "cost (chosen)", "cost per node (measured)"], tablefmt="github"),
            "cost: held-out output nMSE of the candidate swapped alone into the original; the "
            "per-node table is report.selection.table()"] + self.notes)

    def table(self) -> str:
        from tabulate import tabulate

        rows = [(o.node, o.kind, o.candidate + (" (default)" if o.default else ""), o.style,
                 f"{o.latency_s * 1e6:.1f}", f"{o.cost:.2e}", f"{o.local_nmse:.2e}",
                 "←" if self.picked(o) else "")
                for o in self.options]
        head = self._head()
        legend = ("µs: the candidate's modules in the cost model (batch 1); cost: held-out "
                  "output nMSE when swapped alone into the original model (emulation and "
                  "lossless candidates: 0 by assumption, the default legalization's own error "
                  f"is {self.base_nmse:.1e}); local: its fitted error against the original op")
        return "\n".join([head, tabulate(rows, headers=["node", "kind", "candidate", "style",
                                                        "µs", "cost", "local", "chosen"],
                                         tablefmt="github"), legend] + self.notes)

    def __str__(self) -> str:
        return self.table()

    def choose(self, *, speedup: float | None = None, latency_budget: float | None = None,
               min_fidelity: float | None = None) -> tuple[dict[str, str], float, float]:
        """Re-solve the integer program over the measured options for another budget
        (milliseconds; nothing is measured or assembled): ``(chosen, predicted latency s,
        summed fidelity cost)``. Raises :class:`SelectionError` when infeasible. Pass the
        result's budget to :func:`archnet_fx.transform` with the same ``cache_dir`` to get
        the network. Weight layers (mixed precision) are in ``chosen`` too, as ``"w4"``,
        ``"w8"``, …"""
        opts = SelectOptions(speedup=speedup, latency_budget=latency_budget,
                             min_fidelity=min_fidelity)
        budget = _budget(opts, self.original_s)
        if budget is None and min_fidelity is None:
            raise OptionError("choose: give speedup, latency_budget or min_fidelity")
        chosen, predicted, objective, _ = solve(
            self.options, self.base_s, budget_s=budget,
            max_cost=None if budget is not None else 2 * (1 - min_fidelity))
        return chosen, predicted, objective

    def front(self, points: int = 12) -> list[tuple[float, float]]:
        """The predicted Pareto front from the measured options: (predicted latency s, summed
        fidelity cost) of the ILP's answer at ``points`` budgets from the fastest achievable to
        the most faithful (re-solved in milliseconds; predictions, not assembled networks)."""
        nodes = {o.node for o in self.options}
        fast = self.base_s + sum(min(o.latency_s for o in self.options if o.node == n)
                                 for n in nodes)
        slow = self.base_s + sum(max(o.latency_s for o in self.options if o.node == n)
                                 for n in nodes)
        out = []
        for i in range(points):
            budget = fast + (slow - fast) * i / max(points - 1, 1)
            try:
                _, lat, cost, _ = solve(self.options, self.base_s, budget_s=budget * (1 + 1e-9))
            except SelectionError:
                continue
            if not out or (lat, cost) != out[-1]:
                out.append((lat, cost))
        return out


# --------------------------------------------------------------------------- the program


def solve(options: Sequence[Option], base_s: float, *, budget_s: float | None = None,
          max_cost: float | None = None) -> tuple[dict[str, str], float, float, float]:
    """One option per node: the least summed cost within ``budget_s`` (when given), else the
    lowest latency within ``max_cost``. Returns ``(chosen, predicted_s, objective, solver_s)``;
    raises :class:`SelectionError` when infeasible."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    opts = list(options)
    nodes = list(dict.fromkeys(o.node for o in opts))
    if not nodes:
        return {}, base_s, 0.0, 0.0
    lat = np.array([o.latency_s for o in opts])
    cost = np.array([max(o.cost, 0.0) for o in opts])
    a_eq = np.zeros((len(nodes), len(opts)))
    for j, o in enumerate(opts):
        a_eq[nodes.index(o.node), j] = 1.0
    cons = [LinearConstraint(a_eq, 1, 1)]
    if budget_s is not None:
        cons.append(LinearConstraint(lat[None, :], -np.inf, budget_s - base_s))
        c = cost + 1e-9 * lat / max(lat.max(), 1e-30)    # ties: the faster one
    else:
        if max_cost is not None:
            cons.append(LinearConstraint(cost[None, :], -np.inf, max_cost))
        c = lat + 1e-12 * cost
    t0 = time.perf_counter()
    res = milp(c, constraints=cons, integrality=np.ones(len(opts)), bounds=Bounds(0, 1))
    secs = time.perf_counter() - t0
    if res.status != 0 or res.x is None:
        def per_node(key):
            return {n: min((o for o in opts if o.node == n), key=key) for n in nodes}
        fastest = per_node(lambda o: (o.latency_s, o.cost))
        faithful = per_node(lambda o: (o.cost, o.latency_s))
        what = (f"latency budget {budget_s * 1e6:.1f} µs" if budget_s is not None else
                f"fidelity cost allowance {max_cost:.3g}")
        raise SelectionError(
            f"no choice of candidates meets the {what}: the fastest achievable is "
            f"{(base_s + sum(o.latency_s for o in fastest.values())) * 1e6:.1f} µs (summed "
            f"fidelity cost {sum(o.cost for o in fastest.values()):.3g}), the most faithful "
            f"{(base_s + sum(o.latency_s for o in faithful.values())) * 1e6:.1f} µs (cost "
            f"{sum(o.cost for o in faithful.values()):.3g}); loosen the budget (speedup= or "
            "latency_budget=) or lower min_fidelity")
    x = res.x > 0.5
    chosen = {o.node: o.candidate for o, on in zip(opts, x) if on}
    predicted = base_s + float(lat[x].sum())
    return chosen, predicted, float(cost[x].sum()), secs


# --------------------------------------------------------------------------- measurement


def _leaves(v: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor)
            and t.is_floating_point()]


class _Fidelity:
    """The teacher's held-out outputs, computed once; nMSE and mean cosine of a module."""

    def __init__(self, teacher: torch.nn.Module, held: Sequence[tuple[tuple, dict]]) -> None:
        self.held = list(held)
        with torch.no_grad():
            self.ref = [_leaves(teacher(*a, **k)) for a, k in self.held]

    def __call__(self, module: torch.nn.Module) -> tuple[float, float]:
        err = ref = cos = 0.0
        n = 0
        with torch.no_grad():
            for (a, k), want in zip(self.held, self.ref):
                got = _leaves(module(*a, **k))
                for w, g in zip(want, got):
                    w2, g2 = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
                    err += float((w2 - g2).pow(2).sum())
                    ref += float(w2.pow(2).sum())
                    cos += float(torch.nn.functional.cosine_similarity(w2, g2, dim=1).sum())
                    n += w2.shape[0]
        return err / max(ref, 1e-30), cos / max(n, 1)


def _module_node(gm: torch.fx.GraphModule, node: str, cand: str) -> torch.fx.Node | None:
    target = f"{node}_{cand}"
    return next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == target),
                None)


class _Recorder(torch.fx.Interpreter):
    """Runs a graph and keeps the values of the named nodes."""

    def __init__(self, gm: torch.fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.seen = names, {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = pytree.tree_map(
                lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)
        return out


def _teacher_io(teacher: torch.fx.GraphModule, sites: dict[tuple[str, tuple], list[str]],
                batches: Sequence[tuple[tuple, dict]]) -> dict[tuple[str, tuple], list]:
    """Per site (``(node, its arguments) -> the teacher nodes a surrogate of the node takes as
    arguments``), the arguments' values and the node's own output on ``batches``."""
    names = {n for n, _ in sites} | {a for args in sites.values() for a in args}
    got: dict[tuple[str, tuple], list] = {site: [] for site in sites}
    with torch.no_grad():
        for a, k in batches:
            rec = _Recorder(teacher, names)
            rec.run(*bind_placeholders(teacher, a, k)[1])
            for site, args in sites.items():
                got[site].append((tuple(rec.seen[x] for x in args), rec.seen[site[0]]))
    return got


def _swap_into_teacher(teacher: torch.fx.GraphModule, node: str, args: list[str],
                       mod: torch.nn.Module) -> torch.fx.GraphModule:
    """A copy of ``teacher`` whose node ``node`` is computed by ``mod`` from the teacher nodes
    ``args`` (the graph is copied; the teacher's parameters are shared, not copied)."""
    graph = deepcopy(teacher.graph)
    out = torch.fx.GraphModule(teacher, graph, teacher.__class__.__name__)
    out.meta = dict(teacher.meta)
    by_name = {n.name: n for n in out.graph.nodes}
    old = by_name[node]
    name = f"{node}__candidate"
    out.add_submodule(name, mod)
    with out.graph.inserting_after(old):
        new = out.graph.call_module(name, tuple(by_name[a] for a in args))
    old.replace_all_uses_with(new)
    out.graph.erase_node(old)
    out.graph.eliminate_dead_code()      # the rest of a replaced chain
    out.recompile()
    return out


def _fit(mod: torch.nn.Module, io: list[tuple[tuple, Any]], steps: int, lr: float,
         seed: int) -> float:
    """Fit ``mod`` to map the recorded inputs to the recorded outputs (normalised MSE, Adam);
    returns the final error over all recorded pairs. Frozen parameters (``distill_frozen``)
    (:func:`~archnet_fx.surrogate.base.frozen_parameters`, nested ones too) and parameters
    already without grad stay as they are."""
    frozen = frozen_parameters(mod)
    params = [p for p in mod.parameters() if p.requires_grad and id(p) not in frozen]

    def err() -> float:
        e = r = 0.0
        with torch.no_grad():
            for args, want in io:
                for w, g in zip(_leaves(want), _leaves(mod(*args))):
                    e += float((w - g).pow(2).sum())
                    r += float(w.pow(2).sum())
        return e / max(r, 1e-30)
    if not params or steps == 0:
        return err()
    start = err()
    snapshot = {k: v.detach().clone() for k, v in mod.state_dict().items()}
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        args, want = io[int(torch.randint(len(io), (1,), generator=g))]
        outs = _leaves(mod(*args))
        ws = _leaves(want)
        loss = sum((o - w).pow(2).mean() / w.pow(2).mean().clamp_min(1e-12)
                   for o, w in zip(outs, ws))
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = err()
    if not end <= start:                       # not better (or NaN): keep the initialisation
        mod.load_state_dict(snapshot)
        return start
    return end


def _latency_by_module(gm: torch.fx.GraphModule, tgt: Target, one: Any, wbits: int,
                       abits: int) -> tuple[float, dict[str, float], Any]:
    """(total, time per surrogate module plus :data:`REST_KEY`, the latency report)."""
    from archnet_fx.cost.latency import estimate_latency

    rep = estimate_latency(gm, tgt, one, weight_bits=wbits, act_bits=abits)
    mods = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    per: dict[str, float] = {}
    for r in rep.rows:
        head = r.name.split("/", 1)[0]
        if head in mods:
            per[head] = per.get(head, 0.0) + r.time_s
    # everything outside the modules: the host link, the prologue, region hand-offs
    per[REST_KEY] = rep.total_s - sum(per.values())
    return rep.total_s, per, rep


def weight_layers(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Top-level conv/linear nodes of ``gm`` whose weight is one of its parameters (not inside a
    surrogate) and used by that node alone: node name -> the weight's qualified name. A weight
    shared by several nodes (a module called twice, a tied LM head) is left out: its nodes
    could not take different widths, and quantizing it for one would change the others."""
    out: dict[str, str] = {}
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function") or node_kind(n, gm) not in LAYER_KINDS:
            continue
        if n.op == "call_function" and target_name(n) == "addmm":
            continue          # addmm(bias, input, weightᵀ): the weight is a transposed view
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            w = getattr(mod, "weight", None)
            if (getattr(mod, "archnet_surrogate", False) or not isinstance(w, torch.nn.Parameter)
                    or w.dim() < 2 or w.numel() < 2):
                continue
            out[n.name] = f"{n.target}.weight"
            continue
        wn = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        if "transpose" in str(n.target) or not isinstance(wn, torch.fx.Node) \
                or wn.op != "get_attr":
            continue
        try:
            w = gm.get_parameter(wn.target)
        except AttributeError:
            continue
        if w.dim() >= 2 and w.numel() >= 2:
            out[n.name] = str(wn.target)
    # drop every layer whose weight another node also reads: count each parameter's readers
    # (a get_attr's users, a module's calls — a surrogate holding the tensor counts too)
    readers: Counter[int] = Counter()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                readers[id(gm.get_parameter(n.target))] += len(n.users)
            except AttributeError:
                continue
        elif n.op == "call_module":
            readers.update(id(p) for p in gm.get_submodule(n.target).parameters())
    return {n: name for n, name in out.items() if readers[id(gm.get_parameter(name))] <= 1}


def quantized_weight(tgt: Target, w: torch.Tensor, bits: int, act_bits: int) -> torch.Tensor:
    """``w`` fake-quantized at ``bits`` as the quantization pass does it (the target's
    granularity and symmetry, MSE-calibrated step): a new tensor."""
    from archnet_fx.quant.fakequant import FakeQuantPass, calibrating

    fq = FakeQuantPass(tgt, bits, act_bits).weight_fq(w, bits)
    with torch.no_grad():
        with calibrating(fq):
            fq(w)
        return fq(w).detach().clone()


class _WithWeights(torch.nn.Module):
    """``gm`` run with some of its parameters replaced (``torch.func.functional_call``; ``gm``
    itself is not touched)."""

    def __init__(self, gm: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.gm, self.weights = gm, weights

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.gm, self.weights, args, kwargs, strict=False)


def with_layer_bits(gm: torch.nn.Module, tgt: Target, layer_bits: dict[str, int],
                    act_bits: int) -> torch.nn.Module:
    """``gm`` (a GraphModule) with the weights of the layers in ``layer_bits`` fake-quantized at
    their width (``gm`` itself when there are none)."""
    if not layer_bits:
        return gm
    names = weight_layers(gm)
    weights = {names[n]: quantized_weight(tgt, gm.get_parameter(names[n]), b, act_bits)
               for n, b in layer_bits.items() if n in names}
    return _WithWeights(gm, weights)


def _bits_latency(gm: torch.fx.GraphModule, tgt: Target, one: Any, layers: Sequence[str],
                  wbits: int, abits: int, at_wbits: Any) -> dict[tuple[str, int], float]:
    """(layer, bits) -> the layer's time in the cost model: its own row at ``wbits`` plus the
    change of its whole kernel (the layer and the epilogue fused into it) with every layer at
    ``bits``. A fused kernel's time is split over its members, so the row alone would move a
    little even where the kernel's time does not; charging the kernel's change keeps a width
    that makes the kernel no faster exactly as fast, and leaves the fused members' rows (a
    surrogate's, say) to their own options. ``at_wbits``: ``gm``'s estimate at ``wbits`` (the
    default legalization's, already made)."""
    from archnet_fx.cost.latency import estimate_latency

    row: dict[str, float] = {}
    kernel: dict[tuple[str, int], float] = {}
    for b in tgt.quant.weight_bits:
        rep = at_wbits if b == wbits else estimate_latency(
            gm, tgt, one, weight_bits=wbits, act_bits=abits, layer_bits={n: b for n in layers})
        for n in layers:
            kernel[n, b] = 0.0
        for r in rep.rows:
            lead = r.fused_into or r.name
            if (lead, b) in kernel:
                kernel[lead, b] += r.time_s
            if b == wbits and r.name in layers:
                row[r.name] = r.time_s
    return {(n, b): row.get(n, 0.0) + kernel[n, b] - kernel[n, wbits] for n, b in kernel}


def _bits_jobs(layers: Sequence[str], lat: dict[tuple[str, int], float], tgt: Target,
               wbits: int) -> tuple[list[Option], list["_Job"], list[str]]:
    """The free default option of every layer, the jobs measuring its other widths, and a note
    on the dominated ones (narrower and not faster: more error for nothing)."""
    defaults = [Option(n, BITS_KIND, f"w{wbits}", "quant", lat[n, wbits], 0.0, default=True)
                for n in layers]
    jobs, dominated = [], {}
    for b in tgt.quant.weight_bits:
        if b == wbits:
            continue
        for n in layers:
            if b < wbits and lat[n, b] >= lat[n, wbits] * (1 - 1e-6):
                dominated[b] = dominated.get(b, 0) + 1
            else:
                jobs.append(_Job(BITS_KIND, f"w{b}", n))
    measured = {j.node for j in jobs}
    jobs = [_Job(BITS_KIND, f"w{wbits}", n, default=True) for n in layers if n in measured] \
        + jobs
    notes = [f"weight_bits: W{b} is not faster than W{wbits} at {k} of {len(layers)} layer(s) "
             f"on {tgt.name} (W{b} saves weight bytes only, and those layers are "
             "compute-bound): not measured there" for b, k in sorted(dominated.items())]
    return defaults, jobs, notes


def _split_widths(chosen: dict[str, str], bits_nodes: set[str], wbits: int
                  ) -> tuple[dict[str, str], dict[str, int]]:
    """The integer program's answer as (surrogate candidates per node, weight layers whose
    chosen width is not ``wbits`` -> that width)."""
    cands = {n: c for n, c in chosen.items() if n not in bits_nodes}
    widths = {n: int(c[1:]) for n, c in chosen.items() if n in bits_nodes}
    return cands, {n: b for n, b in widths.items() if b != wbits}


def _relative_bits_costs(opts: list[Option]) -> list[Option]:
    """Bits options carry their raw held-out nMSE until here; each layer's widths are charged
    their nMSE minus the layer's best width's (so the best costs 0, and the default too when
    only narrower widths were measured)."""
    best: dict[str, float] = {}
    for o in opts:
        if o.kind == BITS_KIND:
            best[o.node] = min(best.get(o.node, math.inf), o.cost)
    for o in opts:
        if o.kind == BITS_KIND:
            o.cost = max(o.cost - best[o.node], 0.0)
    return opts


@dataclass
class _Job:
    """Measuring one lossy candidate at one node, or every node of one lossless candidate."""
    kind: str
    candidate: str
    node: str | None            # None: a lossless candidate, all its nodes at once
    default: bool = False       # the node's default candidate (lossy defaults are measured too)


#: Styles charged no fidelity cost: lossless ones, and near-exact emulation (its error against
#: the original, the default legalization's, is reported as :attr:`Selection.base_nmse`).
FREE_STYLES = frozenset(LOSSLESS) | {"emulation"}


def _jobs(selectable: dict[str, str], kind_of: dict[str, str], alts: dict[str, list[str]],
          styles: dict[str, str]) -> list[_Job]:
    """Every (kind, candidate[, node]) to measure, in a fixed order (the same on every rank)."""
    jobs = []
    for kind in sorted({kind_of.get(n, "") for n in selectable}):
        nodes = [n for n in selectable if kind_of.get(n) == kind]
        jobs += [_Job(kind, selectable[n], n, default=True) for n in nodes
                 if styles.get(selectable[n]) not in FREE_STYLES]
        for cand in dict.fromkeys(alts.get(kind, [])):
            todo = [n for n in nodes if selectable[n] != cand]
            if not todo:
                continue
            if styles.get(cand) in LOSSLESS:
                jobs.append(_Job(kind, cand, None))
            else:
                jobs += [_Job(kind, cand, n) for n in todo]
    return jobs


def _replaced_by(res: Any) -> dict[str, str]:
    """A legalization's surrogate nodes -> the node of the original (canonicalized) graph whose
    value each computes (a chain rule's surrogate replaces the chain's output, not its anchor)."""
    out: dict[str, str] = {}
    for rec in getattr(res, "records", ()):
        for old, new in rec.replaced.items():
            out[new] = old
    return out


class _Measurer:
    """Measures jobs (see the module docstring): legalizes each (kind, candidate) once, on the
    fitting batches, when one of its jobs comes up. ``teacher`` is the canonicalized original
    (exact rewrites only: its node names are the ones legalization replaces)."""

    def __init__(self, teacher: torch.fx.GraphModule, tgt: Target, leg: Any, l0: Any,
                 per0: dict[str, float], selectable: dict[str, str], styles: dict[str, str],
                 fid: _Fidelity, call: list, one: Any, options: SelectOptions, wbits: int,
                 abits: int, seed: int) -> None:
        self.teacher, self.tgt, self.leg, self.l0, self.per0 = teacher, tgt, leg, l0, per0
        self.selectable, self.styles, self.fid, self.call = selectable, styles, fid, call
        self.one, self.options, self.bits, self.seed = one, options, (wbits, abits), seed
        self.teacher_names = {t.name for t in teacher.graph.nodes}
        # (kind, candidate, default) -> (legalization, per-module latency, nodes, rest share,
        # surrogate node -> replaced node), or the note of a candidate not offered
        self.pairs: dict[tuple[str, str, bool], Any] = {}
        self.recorded: tuple[str, dict] = ("", {})
        self.layers: dict[str, str] = {}                       # weight layer -> its parameter
        self.bits_lat: dict[tuple[str, int], float] = {}       # (layer, bits) -> seconds

    def _bits(self, job: "_Job") -> tuple[list[Option], dict, list[str]]:
        """One layer at one weight width: its raw held-out nMSE (made relative later,
        :func:`_relative_bits_costs`)."""
        n, b = job.node, int(job.candidate[1:])
        name = self.layers[n]
        w = quantized_weight(self.tgt, self.teacher.get_parameter(name), b, self.bits[1])
        nmse, _ = self.fid(_WithWeights(self.teacher, {name: w}))
        return [Option(n, BITS_KIND, job.candidate, "quant", self.bits_lat[n, b],
                       max(nmse, 0.0), default=job.default)], {}, []

    def _site(self, lc: Any, inv: dict[str, str], n: str, cand: str
              ) -> tuple[str, list[str]] | None:
        """(the original node the surrogate of ``n`` replaces, the original nodes it takes as
        arguments), or None when they are not nodes of the original graph. ``inv``: the
        legalization's :func:`_replaced_by`."""
        nc = _module_node(lc.module, n, cand)
        if nc is None or nc.kwargs or not nc.args:
            return None
        value = inv.get(nc.name, n)
        args = [inv.get(a.name, a.name) if isinstance(a, torch.fx.Node) else None
                for a in nc.args]
        if value not in self.teacher_names or not all(a in self.teacher_names for a in args):
            return None
        return value, args

    def _io(self, kind: str, value: str, args: list[str]) -> list[tuple[tuple, Any]]:
        """The original's arguments and output at ``value`` on the fitting batches; recorded for
        every node of ``kind`` known so far at once (one pass over the original per kind; jobs
        come kind by kind), and dropped when the kind changes."""
        rec_kind, rec = self.recorded
        if rec_kind != kind or (value, tuple(args)) not in rec:
            sites = {(value, tuple(args)): args}
            for (k, _, _), pair in self.pairs.items():
                if k == kind and not isinstance(pair, str):
                    lc, _, todo, _, inv = pair
                    for n in todo:
                        site = self._site(lc, inv, n, lc.choices[n])
                        if site is not None:
                            sites.setdefault((site[0], tuple(site[1])), site[1])
            rec = _teacher_io(self.teacher, sites, self.call[:FIT_BATCHES])
            self.recorded = (kind, rec)
        return rec[value, tuple(args)]

    def _pair(self, kind: str, cand: str, default: bool = False) -> Any:
        """(legalization, per-module latency, the nodes it took, rest share, surrogate node ->
        replaced node) or a note. A default candidate's legalization is the default one
        (``L0``)."""
        key = (kind, cand, default)
        if key not in self.pairs:
            if default:
                todo = [n for n, c in self.selectable.items() if c == cand]
                self.pairs[key] = (self.l0, self.per0, todo, 0.0, _replaced_by(self.l0))
                return self.pairs[key]
            try:
                lc = self.leg({kind: cand}, self.call[:FIT_BATCHES])
            except UnsupportedOpError as e:
                self.pairs[key] = (f"{kind}→{cand}: not offered here "
                                   f"({first_line(e).rstrip(':')})")
                return self.pairs[key]
            per_c = _latency_by_module(lc.module, self.tgt, self.one, *self.bits)[1]
            todo = [n for n, c in lc.choices.items() if c == cand and n in self.selectable
                    and self.selectable[n] != cand]
            # what the candidate changes outside its modules (a host lookup uploads the rows it
            # read instead of a one-hot matrix built in the prologue), shared among its nodes
            rest = (per_c[REST_KEY] - self.per0[REST_KEY]) / max(len(todo), 1)
            self.pairs[key] = (lc, per_c, todo, rest, _replaced_by(lc))
        return self.pairs[key]

    def __call__(self, job: _Job, index: int) -> tuple[list[Option], dict, list[str]]:
        if job.kind == BITS_KIND:
            return self._bits(job)
        pair = self._pair(job.kind, job.candidate, job.default)
        if isinstance(pair, str):
            return [], {}, [pair]
        lc, per_c, todo, rest, inv = pair
        cand, style = job.candidate, self.styles.get(job.candidate, "?")

        def lat(n: str) -> float:
            # a host candidate has no module of its own: all of it is in the rest
            return per_c.get(f"{n}_{cand}", 0.0) + rest
        if job.node is None:                 # exact or host: nothing to fit, nothing lost
            log.debug("selection: %s → %s (lossless) at %d node(s)", job.kind, cand,
                      len(todo))
            return [Option(n, job.kind, cand, style, lat(n), 0.0) for n in todo], {}, []
        n = job.node
        if n not in todo:
            return [], {}, [f"{job.kind}→{cand}: the rule refused node {n}"]
        site = self._site(lc, inv, n, cand)
        if site is None:
            return [], {}, [f"{n}→{cand}: its module does not compute one node of the "
                            "original from the original's nodes; not measured"]
        value, args = site
        mod = deepcopy(lc.module.get_submodule(_module_node(lc.module, n, cand).target))
        local = _fit(mod, self._io(job.kind, value, args), self.options.steps,
                     self.options.lr, self.seed + index)
        state = {k: v.detach().clone() for k, v in mod.state_dict().items()}
        nmse, _ = self.fid(_swap_into_teacher(self.teacher, value, args, mod))
        log.debug("selection: %s → %s%s: held-out cost %.2e (local %.2e)", n, cand,
                  " (default)" if job.default else "", nmse, local)
        return [Option(n, job.kind, cand, style, lat(n), max(nmse, 0.0), local,
                       default=job.default)], {(n, cand): state}, []


def _measure(teacher: torch.fx.GraphModule, tgt: Target, l0: Any, leg: Any,
             selectable: dict[str, str], kind_of: dict[str, str], fid: _Fidelity, call: list,
             one: Any, options: SelectOptions, weight_bits: int, act_bits: int, prefer: str,
             seed: int, workers: int | str = 1, progress: bool = False, mixed_bits: bool = True
             ) -> tuple[list[Option], dict[tuple[str, str], dict], float, float, list[str]]:
    """Every candidate at every selectable node: (options, fitted state dicts, L0's latency,
    the original's latency, notes). See the module docstring; with ``workers`` > 1 or inside
    a ``torch.distributed`` group the jobs are shared out (:mod:`archnet_fx.infra.workers`)."""
    from archnet_fx.cost.latency import estimate_latency
    from archnet_fx.legalize import default_candidates

    default_s, per0, rep0 = _latency_by_module(l0.module, tgt, one, weight_bits, act_bits)
    original_s = estimate_latency(teacher, tgt, one, weight_bits=weight_bits,
                                  act_bits=act_bits).total_s
    styles: dict[str, str] = {}
    alts: dict[str, list[str]] = {}
    for kind, cands in default_candidates(tgt, prefer=prefer).items():
        for c, why in cands:
            styles[c.name] = c.style
            if why is None:
                alts.setdefault(kind, []).append(c.name)
    out = [Option(n, kind_of.get(n, "?"), c0, styles.get(c0, "?"), per0.get(f"{n}_{c0}", 0.0),
                  0.0, 0.0, default=True) for n, c0 in selectable.items()]
    jobs = _jobs(selectable, kind_of, alts, styles)
    measurer = _Measurer(teacher, tgt, leg, l0, per0, selectable, styles, fid, call, one,
                         options, weight_bits, act_bits, seed)
    notes: list[str] = []
    if mixed_bits and len(tgt.quant.weight_bits) > 1:   # one option per layer and width
        kept = weight_layers(l0.module)
        measurer.layers = {n: p for n, p in weight_layers(teacher).items() if n in kept}
        measurer.bits_lat = _bits_latency(l0.module, tgt, one, list(measurer.layers),
                                          weight_bits, act_bits, rep0)
        more, bits_jobs, notes = _bits_jobs(list(measurer.layers), measurer.bits_lat, tgt,
                                            weight_bits)
        out += more
        jobs += bits_jobs
    fitted: dict[tuple[str, str], dict] = {}
    from tqdm.auto import tqdm

    # a bar in this process only (forked ranks would each draw a copy)
    bar = tqdm(total=len(jobs), desc="measuring candidates", leave=False, dynamic_ncols=True,
               disable=not (progress and workers == 1))
    done: dict[str, int] = {}

    def job(j: _Job, i: int) -> Any:
        out = measurer(j, i)
        bar.update(1)
        done[j.kind] = done.get(j.kind, 0) + 1
        if i + 1 == len(jobs) or jobs[i + 1].kind != j.kind:
            PROGRESS.info("selection: %s measured (%d job(s), %d/%d)", j.kind, done[j.kind],
                          i + 1, len(jobs))
        return out
    try:
        results = run_jobs(job, jobs, workers)
    finally:
        bar.close()
    for opts, fit, note in results:
        for o in opts:
            if o.default:          # a measured lossy default replaces its free placeholder
                out = [x for x in out if not (x.default and x.node == o.node)]
            out.append(o)
        fitted.update(fit)
        notes += [x for x in note if x not in notes]
    return _relative_bits_costs(out), fitted, default_s, original_s, _grouped(notes)


def _grouped(notes: list[str]) -> list[str]:
    """"k→c: the rule refused node n" notes as one line per (kind, candidate)."""
    refused: dict[str, list[str]] = {}
    rest = []
    for x in notes:
        head, sep, node = x.partition(": the rule refused node ")
        if sep:
            refused.setdefault(head, []).append(node)
        else:
            rest.append(x)
    return rest + [f"{head}: the rule refused {len(ns)} node(s) ({', '.join(ns[:6])}"
                   f"{', …' if len(ns) > 6 else ''})" for head, ns in refused.items()]


#: Bumped when the measurement changes meaning (a cache entry of another recipe is not reused).
RECIPE = 6


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


#: Modules whose code decides what a measurement is: the surrogate families (which candidates
#: exist, how they are built and fitted), their building blocks, legalization, the legality
#: check and body traces the cost model reads, capture's tracer, node kinds, the cost model
#: and this module (the recipe).
_MEASURING_CODE = ("archnet_fx.passes.canonicalize", "archnet_fx.passes.tiling",
                   "archnet_fx.surrogate.base", "archnet_fx.surrogate.pwl",
                   "archnet_fx.surrogate.hinge", "archnet_fx.surrogate.products",
                   "archnet_fx.surrogate.observe", "archnet_fx.surrogate.driver",
                   "archnet_fx.legalize", "archnet_fx.legality", "archnet_fx.capture",
                   "archnet_fx.ir.opkinds", "archnet_fx.cost.latency",
                   "archnet_fx.quant.fakequant", __name__)


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """Digest of the source of :data:`_MEASURING_CODE` and of every surrogate family: a new
    candidate or a changed builder never reuses a measurement of the old code."""
    import hashlib
    import importlib

    from archnet_fx.pipelines import FAMILIES

    h = hashlib.sha256()
    for name in sorted(set(_MEASURING_CODE) | {f"archnet_fx.passes.{f}" for f in FAMILIES}):
        path = getattr(importlib.import_module(name), "__file__", None)
        h.update(name.encode())
        if path:
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def _cache_key(teacher: torch.fx.GraphModule, tgt: Target, wbits: int, abits: int, prefer: str,
               user: dict[str, str], host: bool, train: Sequence, held: Sequence,
               options: SelectOptions, seed: int, mixed_bits: bool = True) -> str | None:
    """Model (parameters, buffers and graph code), target, bits, candidates' settings,
    calibration data, recipe and the code that builds and measures candidates
    (:func:`_code_digest`): anything that changes a measurement changes the key."""
    if options.cache_dir is None:
        return None
    import hashlib

    from archnet_fx.infra.instruments import tensor_digest

    parts = [tensor_digest(v for _, v in sorted(teacher.state_dict().items())),
             hashlib.sha256(teacher.code.encode()).hexdigest(), repr(tgt), wbits, abits, prefer,
             sorted(user.items()), host, seed, mixed_bits, RECIPE, FIT_BATCHES, options.steps,
             options.lr,
             torch.__version__, _code_digest(),
             tensor_digest(t for b in list(train) + list(held) for t in pytree.tree_leaves(b)),
             [str(pytree.tree_structure(b)) for b in list(train) + list(held)],
             len(train), len(held)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _cache_file(cache_dir: Any, key: str) -> Any:
    from pathlib import Path

    return Path(cache_dir) / f"selection-{key}.pt"


def _cache_load(cache_dir: Any, key: str | None) -> dict | None:
    if key is None:
        return None
    f = _cache_file(cache_dir, key)
    if not f.exists():
        return None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged entry is measured again
        log.warning("selection cache %s unreadable (%s); measuring again", f, e)
        return None


def _cache_save(cache_dir: Any, key: str | None, entry: dict) -> None:
    if key is None:
        return
    from archnet_fx.infra.instruments import atomic_write

    atomic_write(_cache_file(cache_dir, key), lambda fh: torch.save(entry, fh), binary=True)


def _sharing_observations(fn: Any) -> Any:
    """Run ``fn`` inside :func:`~archnet_fx.surrogate.observe.reuse_observations`: the selection
    legalizes the teacher a dozen times on the same batches, and each legalization would
    otherwise run the whole model over them again to observe the replaced nodes' inputs."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from archnet_fx.surrogate.observe import reuse_observations

        with reuse_observations():
            return fn(*args, **kwargs)
    return wrapper


@_sharing_observations
def select(teacher: torch.fx.GraphModule, target: str | Target, example: Any,
           train: Sequence[tuple[tuple, dict]], held: Sequence[tuple[tuple, dict]], *,
           options: SelectOptions, weight_bits: int, act_bits: int,
           choices: dict[str, str] | None = None, prefer: str = "emulation",
           allow_host_fallback: bool = False, seed: int = 0, verify: bool = False,
           progress: bool = False, mixed_bits: bool = True) -> Selection:
    """Measure every candidate of every replaced node and choose (see the module docstring).
    Nodes the user pinned in ``choices`` (by node name or kind) are not selected. ``verify``:
    the default and the assembled legalizations check every pass numerically; ``progress``: a
    tqdm bar over the measuring jobs (one process only); ``mixed_bits``: choose each weight
    layer's width too (``transform`` does when no ``weight_bits`` is given)."""
    from archnet_fx import pipelines
    from archnet_fx.cost.latency import estimate_latency
    from archnet_fx.infra.manager import PassManager
    from archnet_fx.legalize import legalize

    tgt = load_target(target)
    t_start = time.perf_counter()
    user = dict(choices or {})
    call = [(a, k) for a, k in train]
    one = first_sample(as_call(held[0] if held else train[0]))

    def leg(extra: dict[str, str], batches: Sequence | None = None, check: bool = False):
        return legalize(teacher, tgt, example,
                        calib_data=[as_call(b) for b in (call if batches is None else batches)],
                        choices={**extra, **user}, prefer=prefer,
                        allow_host_fallback=allow_host_fallback, verify=check)
    l0 = leg({}, check=verify)
    kind_of = {v.node: v.kind for v in l0.before.unsupported}
    # candidates are measured in the canonicalized original (exact rewrites: the graph whose
    # node names legalization replaces)
    canon = PassManager("canonicalize", pipelines.canonicalize_passes(), verify=False).run(
        teacher).module
    fid = _Fidelity(canon, held)
    selectable = {n: c for n, c in l0.choices.items()
                  if n not in user and kind_of.get(n, "") not in user
                  and _module_node(l0.module, n, c) is not None}
    key = _cache_key(teacher, tgt, weight_bits, act_bits, prefer, user, allow_host_fallback,
                     train, held, options, seed, mixed_bits)
    entry = _cache_load(options.cache_dir, key)
    hit = entry is not None and entry["selectable"] == selectable
    if all_ranks(hit, options.workers):     # in a process group: only if every rank has it
        out = [Option(**d) for d in entry["options"]]
        fitted = {tuple(k.split("|", 1)): v for k, v in entry["fitted"].items()}
        default_s, original_s, notes = entry["default_s"], entry["original_s"], entry["notes"]
        base_nmse = entry["base_nmse"]
        PROGRESS.info("selection: %d measured option(s) from the cache (%s)", len(out),
                      _cache_file(options.cache_dir, key))
    else:
        base_nmse, _ = fid(l0.module)
        # candidates' costs on at most MEASURE_HELD batches (the assembled network's check
        # below uses every held-out batch)
        fid_m = fid if len(held) <= MEASURE_HELD else _Fidelity(canon, held[:MEASURE_HELD])
        out, fitted, default_s, original_s, notes = _measure(
            canon, tgt, l0, leg, selectable, kind_of, fid_m, call, one, options,
            weight_bits, act_bits, prefer, seed, options.workers, progress, mixed_bits)
        if _rank() == 0:
            _cache_save(options.cache_dir, key, {
                "selectable": selectable, "options": [dataclasses.asdict(o) for o in out],
                "fitted": {f"{n}|{c}": v for (n, c), v in fitted.items()},
                "default_s": default_s, "original_s": original_s, "notes": notes,
                "base_nmse": base_nmse})
        all_ranks(True, options.workers)      # the entry is written before any rank goes on
    base_s = default_s - sum(o.latency_s for o in out if o.default)
    measure_s = time.perf_counter() - t_start

    budget = _budget(options, original_s)
    resolves = 0
    max_cost = (2 * (1 - options.min_fidelity) if budget is None and
                options.min_fidelity is not None else None)
    final = functools.partial(leg, check=verify)
    bits_nodes = {o.node for o in out if o.kind == BITS_KIND}
    best = None
    while True:
        try:
            chosen, predicted, objective, solver_s = solve(out, base_s, budget_s=budget,
                                                           max_cost=max_cost)
        except SelectionError:
            if budget is not None:
                raise
            if best is not None:             # tightened past what any choice meets: keep
                break
            # no choice is estimated to keep min_fidelity: the most faithful one, said so
            chosen, predicted, objective, solver_s = solve(out, base_s, budget_s=math.inf)
            notes.append(f"no choice is estimated to keep min_fidelity {options.min_fidelity} "
                         f"(summed cost allowance {max_cost:.3g}): the most faithful one "
                         "taken")
            log.warning("selection: %s", notes[-1])
            max_cost = None
        cands, layer_bits = _split_widths(chosen, bits_nodes, weight_bits)
        result = assemble(l0, selectable, cands, fitted, final)
        cos = fid(with_layer_bits(result.module, tgt, layer_bits, act_bits))[1]
        if best is None or budget is not None or cos > best[-1]:
            best = (cands, predicted, objective, solver_s, result, layer_bits, cos)
        if (options.min_fidelity is None or budget is not None or max_cost is None
                or cos >= options.min_fidelity or resolves >= options.max_resolves
                or objective <= 0):          # nothing left to tighten
            break
        resolves += 1
        max_cost = objective / 2
    cands, predicted, objective, solver_s, result, layer_bits, cos = best
    assembled = result.module
    assembled_s = estimate_latency(assembled, tgt, one, weight_bits=weight_bits,
                                   act_bits=act_bits, layer_bits=layer_bits).total_s
    if options.min_fidelity is not None and cos < options.min_fidelity:
        notes.append(f"min_fidelity {options.min_fidelity} not reached after {resolves} "
                     f"re-solves: assembled float cosine {cos:.4f}")
    sel = Selection(out, cands, original_s, default_s, base_s, predicted, assembled_s,
                    budget, objective, base_nmse, cos, solver_s, measure_s, resolves, notes)
    sel.legalized = result
    sel.module = assembled
    sel.layer_bits = layer_bits
    PROGRESS.info("selection: %d option(s) at %d node(s); predicted %.0f µs, assembled %s µs "
                  "(original %.0f µs), float cosine %s (%.1f s)", len(out), len(selectable),
                  predicted * 1e6, f"{assembled_s * 1e6:.0f}" if assembled_s else "?",
                  original_s * 1e6, f"{cos:.4f}" if cos is not None else "?", measure_s)
    return sel


def _budget(options: SelectOptions, original_s: float) -> float | None:
    """The latency budget in seconds, or None (``min_fidelity`` alone)."""
    if options.latency_budget is not None:
        return options.latency_budget
    return original_s / options.speedup if options.speedup is not None else None


def assemble(l0: Any, defaults: dict[str, str], chosen: dict[str, str],
             fitted: dict[tuple[str, str], dict], leg: Any) -> Any:
    """The legalization with the chosen candidates (``leg(node choices)``; ``l0`` itself when
    nothing changed), each measured candidate's locally fitted module loaded in place of its
    fresh one (a measured lossy default's too)."""
    changed = {n: c for n, c in chosen.items() if defaults.get(n) != c}
    # every node pinned by name: a node may be named like a kind ("softmax"), and a choice
    # under that key alone would move every node of the kind
    res = leg({**defaults, **chosen}) if changed else l0
    for n, c in chosen.items():
        if (n, c) in fitted and res.choices.get(n) == c:
            try:
                res.module.get_submodule(f"{n}_{c}").load_state_dict(fitted[(n, c)])
            except (AttributeError, RuntimeError) as e:
                log.warning("%s → %s: fitted parameters not loaded (%s); it starts fresh", n, c,
                            first_line(e))
    return res

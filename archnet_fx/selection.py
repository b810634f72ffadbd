"""Hardware-aware selection (HANT): measure every candidate of every replaced node, choose with
one integer program.

``select(teacher, target, train, held, *, speedup=None, latency_budget=None,
min_fidelity=None, ...) -> Selection``

1. **Candidates.** The default legalization ``L0`` (every illegal node gets its default
   candidate, near-exact emulation where one exists) and one legalization per alternative
   candidate of each kind (all nodes of that kind take it). Every surrogate is one
   ``call_module`` node named ``<node>_<candidate>`` taking the original node's arguments, so a
   candidate module of one legalization can stand in for the default in ``L0``.
2. **Fidelity cost** of candidate *c* at node *n*: its module is first fitted locally (its own
   input, recorded in ``L0`` on the training batches, to the default module's output there:
   ``steps`` Adam steps on the normalised MSE — what independent-block training does for one
   node), then swapped alone into ``L0``, and the held-out normalised MSE of the network's
   outputs against the teacher's, minus ``L0``'s own, is its cost (clamped at 0). ``L0`` stands
   in for the teacher: its emulation surrogates are within ~1e-3 nMSE of it (measured per
   model; the figure is in :attr:`Selection.base_nmse`). Costs are measured in float;
   quantization comes after selection.
3. **Latency** of candidate *c* at node *n*: the cost model's time of its module's nodes
   (``estimate_latency`` rows ``<node>_<candidate>/...`` in the legalization that used it,
   batch 1, fused epilogues included), plus its share of the change it makes outside the
   surrogate modules (a host lookup removes the prologue's one-hot matrix and its upload). The network's latency is taken as additive: the rest of
   ``L0`` (its total minus its default modules' time) plus the chosen modules' times.
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
embedding) cost nothing in fidelity and are not fitted; a lossy candidate whose module takes
other arguments than the default's cannot be swapped in alone and is left out, with a note.

Per-layer bit widths, the on-disk cache and ``torch.distributed`` workers of the HANT issue are
not built yet.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

from archnet_fx.capture import as_call, first_sample
from archnet_fx.errors import OptionError, UnsupportedOpError, first_line
from archnet_fx.infra.progress import PROGRESS
from archnet_fx.surrogate.base import LOSSLESS
from archnet_fx.targets import Target, load_target

log = logging.getLogger(__name__)

#: The estimate outside every surrogate module (host link, prologue, hand-offs); a candidate is
#: charged the change it makes to it.
REST_KEY = "<rest>"
#: Calibration batches the candidates are fitted on (their inputs recorded in ``L0``).
FIT_BATCHES = 4

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
    cost: float                  # held-out output nMSE it adds to L0 when swapped in alone
    local_nmse: float = 0.0      # its module's fitted error against the default module's output
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

    def table(self) -> str:
        from tabulate import tabulate

        rows = [(o.node, o.kind, o.candidate + (" (default)" if o.default else ""), o.style,
                 f"{o.latency_s * 1e6:.1f}", f"{o.cost:.2e}", f"{o.local_nmse:.2e}",
                 "←" if self.chosen.get(o.node) == o.candidate else "")
                for o in self.options]
        head = (f"selection: predicted {self.predicted_s * 1e6:.0f} µs (additive model), "
                + (f"assembled {self.assembled_s * 1e6:.0f} µs, " if self.assembled_s else "")
                + f"original {self.original_s * 1e6:.0f} µs "
                  f"({self.original_s / (self.assembled_s or self.predicted_s):.2f}× faster), "
                  f"default candidates {self.default_s * 1e6:.0f} µs; "
                + (f"budget {self.budget_s * 1e6:.0f} µs; " if self.budget_s else "")
                + f"summed fidelity cost {self.objective:.3g}"
                + (f", assembled float cosine {self.assembled_cosine:.4f}"
                   if self.assembled_cosine is not None else "")
                + f"; measured in {self.measure_s:.1f} s, solved in {self.solver_s * 1e3:.0f} ms"
                + (f" ({self.resolves} re-solves)" if self.resolves else ""))
        legend = ("µs: the candidate's modules in the cost model (batch 1); cost: held-out "
                  "output nMSE it adds when swapped alone into the default legalization; "
                  "local: its fitted error against the default module at that node")
        return "\n".join([head, tabulate(rows, headers=["node", "kind", "candidate", "style",
                                                        "µs", "cost", "local", "chosen"],
                                         tablefmt="github"), legend] + self.notes)

    def __str__(self) -> str:
        return self.table()

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


def _swap(l0: torch.fx.GraphModule, swaps: dict[str, tuple[str, str, torch.nn.Module]]
          ) -> torch.fx.GraphModule:
    """A copy of ``l0`` whose default module at each node is replaced: node -> (default
    candidate, new candidate, module)."""
    out = torch.fx.GraphModule(l0, copy.deepcopy(l0.graph), l0.__class__.__name__)
    out.meta = dict(l0.meta)               # shares l0's other modules: only the graph differs
    for node, (c0, c, mod) in swaps.items():
        n = _module_node(out, node, c0)
        name = f"{node}_{c}"
        out.add_submodule(name, mod)
        n.target = name
    out.recompile()
    out.delete_all_unused_submodules()
    return out


def _record_io(gm: torch.fx.GraphModule, targets: list[str],
               batches: Sequence[tuple[tuple, dict]]) -> dict[str, list[tuple[tuple, Any]]]:
    """Inputs and outputs of the named submodules on ``batches`` (forward hooks)."""
    got: dict[str, list] = {t: [] for t in targets}
    hooks = []
    for t in targets:
        def hook(mod, args, out, t=t):
            got[t].append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                           pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor)
                                           else v, out)))
        hooks.append(gm.get_submodule(t).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for a, k in batches:
                gm(*a, **k)
    finally:
        for h in hooks:
            h.remove()
    return got


def _fit(mod: torch.nn.Module, io: list[tuple[tuple, Any]], steps: int, lr: float,
         seed: int) -> float:
    """Fit ``mod`` to map the recorded inputs to the recorded outputs (normalised MSE, Adam);
    returns the final error over all recorded pairs. Frozen parameters (``distill_frozen``)
    and parameters already without grad stay as they are."""
    frozen = set(getattr(mod, "distill_frozen", ()) or ())
    params = [p for n, p in mod.named_parameters() if p.requires_grad
              and n.split(".")[-1] not in frozen]

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
                       abits: int) -> tuple[float, dict[str, float]]:
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
    return rep.total_s, per


def _measure(teacher: torch.fx.GraphModule, tgt: Target, l0: Any, leg: Any,
             selectable: dict[str, str], kind_of: dict[str, str], fid: _Fidelity,
             base_nmse: float, call: list, one: Any, options: SelectOptions, weight_bits: int,
             act_bits: int, prefer: str, seed: int
             ) -> tuple[list[Option], dict[tuple[str, str], dict], float, float, list[str]]:
    """Every candidate at every selectable node: (options, fitted state dicts, L0's latency,
    the original's latency, notes). See the module docstring."""
    from archnet_fx.cost.latency import estimate_latency
    from archnet_fx.legalize import default_candidates

    default_s, per0 = _latency_by_module(l0.module, tgt, one, weight_bits, act_bits)
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
    notes: list[str] = []
    fitted: dict[tuple[str, str], dict] = {}
    for kind in sorted({kind_of.get(n, "") for n in selectable}):
        nodes = [n for n in selectable if kind_of.get(n) == kind]
        for cand in dict.fromkeys(alts.get(kind, [])):
            if all(selectable[n] == cand for n in nodes):
                continue
            try:
                lc = leg({kind: cand})
            except UnsupportedOpError as e:
                notes.append(f"{kind}→{cand}: not offered here "
                             f"({first_line(e)})")
                continue
            _, per_c = _latency_by_module(lc.module, tgt, one, weight_bits, act_bits)
            todo = [n for n in nodes if lc.choices.get(n) == cand and selectable[n] != cand]
            if not todo:
                continue
            # what the candidate changes outside its modules (a host lookup uploads the rows it
            # read instead of a one-hot matrix built in the prologue), shared among its nodes
            rest = (per_c[REST_KEY] - per0[REST_KEY]) / len(todo)

            def lat(n: str, cand: str = cand, per_c: dict = per_c, rest: float = rest) -> float:
                # a host candidate has no module of its own: all of it is in the rest
                return per_c.get(f"{n}_{cand}", 0.0) + rest
            if styles.get(cand) in LOSSLESS:     # exact or host: nothing to fit, nothing lost
                out += [Option(n, kind, cand, styles[cand], lat(n), 0.0) for n in todo]
                PROGRESS.info("selection: %s → %s (lossless) at %d node(s)", kind, cand,
                              len(todo))
                continue
            io = _record_io(l0.module, [f"{n}_{selectable[n]}" for n in todo],
                            call[:FIT_BATCHES])
            for i, n in enumerate(todo):
                c0 = selectable[n]
                n0, nc = _module_node(l0.module, n, c0), _module_node(lc.module, n, cand)
                if nc is None or [str(a) for a in nc.args] != [str(a) for a in n0.args] or \
                        nc.kwargs != n0.kwargs:
                    notes.append(f"{n}→{cand}: its module takes other arguments than "
                                 f"{c0}'s; not measured")
                    continue
                mod = copy.deepcopy(lc.module.get_submodule(nc.target))
                local = _fit(mod, io[f"{n}_{c0}"], options.steps, options.lr, seed + i)
                fitted[(n, cand)] = {k: v.detach().clone() for k, v in mod.state_dict().items()}
                nmse, _ = fid(_swap(l0.module, {n: (c0, cand, mod)}))
                out.append(Option(n, kind, cand, styles.get(cand, "?"), lat(n),
                                  max(nmse - base_nmse, 0.0), local))
            PROGRESS.info("selection: measured %s → %s at %d node(s)", kind, cand, len(todo))
    return out, fitted, default_s, original_s, notes


#: Bumped when the measurement changes meaning (a cache entry of another recipe is not reused).
RECIPE = 5


def _cache_key(teacher: torch.fx.GraphModule, tgt: Target, wbits: int, abits: int, prefer: str,
               user: dict[str, str], host: bool, train: Sequence, held: Sequence,
               options: SelectOptions, seed: int) -> str | None:
    """Model (parameters, buffers and graph code), target, bits, candidates' settings,
    calibration data and recipe: anything that changes a measurement changes the key."""
    if options.cache_dir is None:
        return None
    import hashlib

    from archnet_fx.infra.instruments import tensor_digest

    parts = [tensor_digest(v for _, v in sorted(teacher.state_dict().items())),
             hashlib.sha256(teacher.code.encode()).hexdigest(), repr(tgt), wbits, abits, prefer,
             sorted(user.items()), host, seed, RECIPE, FIT_BATCHES, options.steps, options.lr,
             torch.__version__,
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


def select(teacher: torch.fx.GraphModule, target: str | Target, example: Any,
           train: Sequence[tuple[tuple, dict]], held: Sequence[tuple[tuple, dict]], *,
           options: SelectOptions, weight_bits: int, act_bits: int,
           choices: dict[str, str] | None = None, prefer: str = "emulation",
           allow_host_fallback: bool = False, seed: int = 0) -> Selection:
    """Measure every candidate of every replaced node and choose (see the module docstring).
    Nodes the user pinned in ``choices`` (by node name or kind) are not selected."""
    from archnet_fx.cost.latency import estimate_latency
    from archnet_fx.legalize import legalize

    tgt = load_target(target)
    t_start = time.perf_counter()
    user = dict(choices or {})
    call = [(a, k) for a, k in train]
    one = first_sample(as_call(held[0] if held else train[0]))

    def leg(extra: dict[str, str]):
        return legalize(teacher, tgt, example, calib_data=[as_call(b) for b in call],
                        choices={**extra, **user}, prefer=prefer,
                        allow_host_fallback=allow_host_fallback, verify=False)
    l0 = leg({})
    kind_of = {v.node: v.kind for v in l0.before.unsupported}
    fid = _Fidelity(teacher, held)
    selectable = {n: c for n, c in l0.choices.items()
                  if n not in user and kind_of.get(n, "") not in user
                  and _module_node(l0.module, n, c) is not None}
    key = _cache_key(teacher, tgt, weight_bits, act_bits, prefer, user, allow_host_fallback,
                     train, held, options, seed)
    entry = _cache_load(options.cache_dir, key)
    if entry is not None and entry["selectable"] == selectable:
        out = [Option(**d) for d in entry["options"]]
        fitted = {tuple(k.split("|", 1)): v for k, v in entry["fitted"].items()}
        default_s, original_s, notes = entry["default_s"], entry["original_s"], entry["notes"]
        base_nmse = entry["base_nmse"]
        PROGRESS.info("selection: %d measured option(s) from the cache (%s)", len(out),
                      _cache_file(options.cache_dir, key))
    else:
        base_nmse, _ = fid(l0.module)
        out, fitted, default_s, original_s, notes = _measure(
            teacher, tgt, l0, leg, selectable, kind_of, fid, base_nmse, call, one, options,
            weight_bits, act_bits, prefer, seed)
        _cache_save(options.cache_dir, key, {
            "selectable": selectable, "options": [dataclasses.asdict(o) for o in out],
            "fitted": {f"{n}|{c}": v for (n, c), v in fitted.items()},
            "default_s": default_s, "original_s": original_s, "notes": notes,
            "base_nmse": base_nmse})
    base_s = default_s - sum(o.latency_s for o in out if o.default)
    measure_s = time.perf_counter() - t_start

    budget = options.latency_budget if options.latency_budget is not None else (
        original_s / options.speedup if options.speedup is not None else None)
    resolves = 0
    max_cost = (2 * (1 - options.min_fidelity) if budget is None and
                options.min_fidelity is not None else None)
    while True:
        chosen, predicted, objective, solver_s = solve(out, base_s, budget_s=budget,
                                                       max_cost=max_cost)
        result = assemble(l0, selectable, chosen, fitted, leg)
        assembled = result.module
        cos = fid(assembled)[1]
        if (options.min_fidelity is None or budget is not None
                or cos >= options.min_fidelity or resolves >= options.max_resolves
                or objective <= 0):          # nothing left to tighten: the lossless choice
            break
        resolves += 1
        max_cost = objective / 2
    assembled_s = estimate_latency(assembled, tgt, one, weight_bits=weight_bits,
                                   act_bits=act_bits).total_s
    if options.min_fidelity is not None and cos < options.min_fidelity:
        notes.append(f"min_fidelity {options.min_fidelity} not reached after {resolves} "
                     f"re-solves: assembled float cosine {cos:.4f}")
    sel = Selection(out, dict(chosen), original_s, default_s, base_s, predicted, assembled_s,
                    budget, objective, base_nmse, cos, solver_s, measure_s, resolves, notes)
    sel.legalized = result
    sel.module = assembled
    PROGRESS.info("selection: %d option(s) at %d node(s); predicted %.0f µs, assembled %s µs "
                  "(original %.0f µs), float cosine %s (%.1f s)", len(out), len(selectable),
                  predicted * 1e6, f"{assembled_s * 1e6:.0f}" if assembled_s else "?",
                  original_s * 1e6, f"{cos:.4f}" if cos is not None else "?", measure_s)
    return sel


def assemble(l0: Any, defaults: dict[str, str], chosen: dict[str, str],
             fitted: dict[tuple[str, str], dict], leg: Any) -> Any:
    """The legalization with the chosen candidates (``leg(node choices)``), each measured
    candidate's locally fitted module loaded in place of its fresh one; ``l0`` itself when
    nothing changed."""
    changed = {n: c for n, c in chosen.items() if defaults.get(n) != c}
    if not changed:
        return l0
    # every node pinned by name: a node may be named like a kind ("softmax"), and a choice
    # under that key alone would move every node of the kind
    res = leg({**defaults, **chosen})
    for n, c in changed.items():
        if (n, c) in fitted and res.choices.get(n) == c:
            try:
                res.module.get_submodule(f"{n}_{c}").load_state_dict(fitted[(n, c)])
            except (AttributeError, RuntimeError) as e:
                log.warning("%s → %s: fitted parameters not loaded (%s); it starts fresh", n, c,
                            first_line(e))
    return res

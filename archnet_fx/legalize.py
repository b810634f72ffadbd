"""Legalization: rewrite a model so every on-chip node is an op the target runs.

``legalize(model_or_gm, target, example_inputs=None, calib_data=None, choices=None,
allow_host_fallback=False)``:

1. capture (if given an ``nn.Module``) and canonicalize (verified, exact);
2. find the nodes the target cannot run (:func:`archnet_fx.check`) and record samples of their
   inputs on the calibration data (or the example inputs) — emulation candidates fit their
   breakpoints to these ranges;
3. run the surrogate families in order (:data:`archnet_fx.pipelines.FAMILIES`): each replaces every illegal node of
   its kinds with a trainable surrogate module chosen per node (see *choices*), built only from
   ops the target has; a candidate whose body turns out illegal on the target is skipped with
   the reason recorded;
4. run the structural tiling passes (channel and kernel limits);
5. check again: any node still illegal raises :class:`UnsupportedOpError` listing node, kind and
   source, unless ``allow_host_fallback=True``, in which case those nodes are marked as host
   fallback in a record of their own and in the legality report.

*choices* maps an op kind or a node name to a candidate name or a style (``"emulation"``,
``"structural"``); node names win over kinds. Without a choice the target's default applies:
an exact candidate where one exists (const rows, one-hot × linear, ReLU identities, tiling),
then the preferred style (``prefer``, default ``"emulation"``, nearly exact before any
training), then any other offered candidate.
"""
from __future__ import annotations

import functools
import gc
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.fx

from archnet_fx.ir.meta import CAPTURE_META_KEY, EXAMPLE_META_KEY
from archnet_fx.capture import calibration_batches, dynamic_seq, with_seq_length
from archnet_fx.errors import ChoiceError, OptionError, UnsupportedOpError
from archnet_fx.legality import LegalityReport, check
from archnet_fx.infra.graphpass import recompile_now
from archnet_fx.infra.manager import PassManager, PipelineResult
from archnet_fx import pipelines
from archnet_fx.pipelines import as_graph_module
from archnet_fx.surrogate.base import DEFAULT_STYLE, LOSSLESS, STYLES, Candidate, default_order
from archnet_fx.surrogate.driver import LegalizeOptions
from archnet_fx.surrogate.observe import observe
from archnet_fx.targets import Target, load_target

log = logging.getLogger(__name__)

SELECTS = ("order", "latency")
#: Names the refusal of a legalized graph that only runs at the example's sequence length.
SEQ_FIXED_MARK = "does not run at sequence lengths"
#: Calibration batches legalization observes (input ranges for the emulation fits).
CALIB_LIMIT = 16


@dataclass
class LegalizeResult(PipelineResult):
    target: str = ""
    before: LegalityReport | None = None
    after: LegalityReport | None = None
    choices: dict[str, str] = field(default_factory=dict)
    #: With ``select="latency"``: one row per lossless alternative tried (node, candidate,
    #: estimated µs of the whole graph with it, whether it was kept).
    selection: list[dict] = field(default_factory=list)


def default_candidates(target: Target, prefer: str = DEFAULT_STYLE
                       ) -> dict[str, list[tuple[Candidate, str | None]]]:
    """Per op kind, every family's candidates in default order with why each is not offered.

    A candidate can still refuse a particular node when it is built (e.g. a chain candidate on
    a node that is not part of a chain); this lists what the target allows in general.
    """
    out: dict[str, list[tuple[Candidate, str | None]]] = {}
    for _, cands in pipelines.surrogate_families():
        for kind in dict.fromkeys(c.kind for c in cands):
            mine = default_order([c for c in cands if c.kind == kind], prefer)
            out.setdefault(kind, []).extend((c, c.offered(target)) for c in mine)
    return out


def _validate_choices(choices: Mapping[str, str]) -> None:
    """Every choice must name a candidate or style that exists in some family."""
    cands = [c for _, cs in pipelines.surrogate_families() for c in cs]
    known = {c.name for c in cands} | {c.style for c in cands}
    for key, value in choices.items():
        if value not in known:
            kinds = {c.kind for c in cands}
            hint = ""
            if key in kinds:
                hint = "; candidates for " + key + ": " + ", ".join(
                    sorted({f"{c.name} ({c.style})" for c in cands if c.kind == key}))
            raise ChoiceError(f"choices[{key!r}] = {value!r} names no candidate or style "
                              f"(styles: {', '.join(STYLES)}){hint}")


def legalize(model: torch.nn.Module, target: str | Target, example_inputs: Any = None,
             calib_data: Iterable | None = None, *, choices: Mapping[str, str] | None = None,
             prefer: str = DEFAULT_STYLE, allow_host_fallback: bool = False, knots: int = 32,
             verify: bool = True, threads: int | None = 1, select: str = "order",
             max_seq_len: int | str | None = "auto") -> LegalizeResult:
    """Rewrite ``model`` so that ``check(result.module, target)`` has no unsupported node.

    ``threads``: torch intra-op threads while legalizing (restored afterwards; ``None`` leaves
    torch's setting). Legalization is thousands of small tensor ops — calibration, least-squares
    fits, shape checks — where intra-op threads buy nothing, and on a busy machine every parallel
    region waits for a descheduled thread: all-MiniLM-L6-v2 took 11–17 s with torch's 2 threads
    on a loaded 2-core box, 1.2 s with 1. The results are the same (bit-identical on MiniLM:
    tensors this small mostly run on one thread either way).

    ``max_seq_len``: capture (an ``nn.Module``) with a dynamic sequence dimension up to this
    length (:func:`archnet_fx.capture`); surrogates then take length-generic forms where a
    row is the sequence (the softmax row max pools in ceil mode, its row sum is the target's
    sum or a ones-matmul), so the legalized graph runs at every length from 2 to the maximum.
    ``"auto"`` (default): for models with token-id inputs, up to the example's length, and the
    example's fixed length when the model or a rewrite fixes it; None: the example's length.

    ``select``: ``"order"`` (default) takes, per node, the first candidate in the order above.
    ``"latency"`` then revisits every node whose candidate is lossless (style exact or host:
    one-hot × linear, a host-prologue lookup, const rows, ...) and tries each other lossless
    candidate the target offers, keeping it when :func:`archnet_fx.estimate_latency` of the
    whole legalized graph drops — HANT's per-layer choice, where equal accuracy reduces its
    integer program to a latency minimum per node. One extra legalization per alternative;
    ``result.selection`` lists what was tried. Lossy styles (emulation, structural) are left
    to ``choices`` and distillation.
    """
    if select not in SELECTS:
        raise OptionError(f"select must be one of {SELECTS}, got {select!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise OptionError(f"threads must be a positive integer or None, got {threads!r}")
    before = torch.get_num_threads()
    gc_was_on = gc.isenabled()
    if threads is not None:
        torch.set_num_threads(threads)
    # Rewriting allocates many short-lived acyclic objects (nodes, signatures, small tensors):
    # the cyclic collector's full passes over a large model's objects cost up to a third of the
    # time and free nothing; collect once, afterwards.
    gc.disable()
    if calib_data is not None and not isinstance(calib_data, (torch.Tensor, list, tuple, dict)):
        calib_data = list(calib_data)     # an iterator is read once; a retry reads it again
    run = functools.partial(_legalize, model, target, example_inputs, calib_data, prefer=prefer,
                            allow_host_fallback=allow_host_fallback, knots=knots, verify=verify,
                            max_seq_len=max_seq_len)
    try:
        res = run(choices=choices)
        return _select_by_latency(res, run, choices) if select == "latency" else res
    finally:
        if gc_was_on:
            gc.enable()
        if threads is not None:
            torch.set_num_threads(before)


def _select_by_latency(res: LegalizeResult, run: Callable[..., LegalizeResult],
                       choices: Mapping[str, str] | None) -> LegalizeResult:
    """Greedy per-node latency choice among lossless candidates (see :func:`legalize`)."""
    from archnet_fx.cost.latency import estimate_latency

    tgt = load_target(res.target)
    kind_of = {v.node: v.kind for v in res.before.unsupported} if res.before else {}
    by_kind = default_candidates(tgt)
    styles = {c.name: c.style for cands in by_kind.values() for c, _ in cands}
    best, best_s = res, estimate_latency(res.module, tgt).total_s
    user = dict(choices or {})
    for node, chosen in res.choices.items():
        if node in user or styles.get(chosen) not in LOSSLESS:
            continue
        alts = [c.name for c, why in by_kind.get(kind_of.get(node, ""), [])
                if why is None and c.style in LOSSLESS and c.name != chosen]
        for alt in dict.fromkeys(alts):
            # Every other node pinned by name to its current candidate: a node may be named
            # like a kind ("embedding"), and a choice under that key would move them all.
            try:
                trial = run(choices={**user, **best.choices, node: alt})
            except UnsupportedOpError:  # the candidate refused this node (no fallback allowed)
                continue
            if trial.choices.get(node) != alt:  # refused, and the node went to the host
                continue
            t = estimate_latency(trial.module, tgt).total_s
            keep = t < best_s
            best.selection.append(dict(node=node, candidate=alt, was=chosen,
                                       estimate_us=t * 1e6, best_us=best_s * 1e6, kept=keep))
            log.info("select: %s %s → %s: %.1f us (best %.1f us)%s", node, chosen, alt,
                     t * 1e6, best_s * 1e6, " kept" if keep else "")
            if keep:
                trial.selection = best.selection
                best, best_s, chosen = trial, t, alt
    return best


def _legalize(model: torch.nn.Module, target: str | Target, example_inputs: Any,
              calib_data: Iterable | None, *, choices: Mapping[str, str] | None, prefer: str,
              allow_host_fallback: bool, knots: int, verify: bool,
              max_seq_len: int | str | None = "auto") -> LegalizeResult:
    tgt = load_target(target)
    options = LegalizeOptions(dict(choices or {}), prefer, allow_host_fallback, knots)
    _validate_choices(options.choices)
    if example_inputs is None and calib_data is not None and not isinstance(calib_data,
                                                                             torch.Tensor):
        batches = calibration_batches(calib_data, limit=CALIB_LIMIT)
        first = batches[0]
        example_inputs = first[1] if first[1] else first[0]
    gm = as_graph_module(model, example_inputs, max_seq_len)
    if example_inputs is None:
        a, k = gm.meta[EXAMPLE_META_KEY]
        example_inputs = k if k else a
    batches = calibration_batches(calib_data, example_inputs, limit=CALIB_LIMIT)

    # One graph copy and one recompile for the whole of legalization: canonicalization copies
    # the caller's graph, the legalization pipeline edits that copy, then it is recompiled.
    canon = PassManager("canonicalize", pipelines.canonicalize_passes(), verify=verify).run(
        gm, recompile=False)
    before = check(canon.module, tgt)
    watch = {v.node for v in before.unsupported}
    ranges = observe(canon.module, batches, watch) if watch else {}

    passes = pipelines.legalize_passes(tgt, ranges, options)
    res = PassManager(f"legalize[{tgt.name}]", passes, verify=verify).run(
        canon.module, copy=False, recompile=False)
    records = canon.records + res.records
    module = res.module
    recompile_now(module)
    after = check(module, tgt)
    owned = not (isinstance(model, torch.fx.GraphModule) and CAPTURE_META_KEY in model.meta)
    auto = owned and getattr(gm.meta[CAPTURE_META_KEY], "seq_auto", False)

    def fixed_length(why: str, host_fallback: bool = allow_host_fallback) -> LegalizeResult:
        # "auto" chose a dynamic sequence, but a rewrite needs the length fixed: legalize the
        # fixed-length capture instead (an explicit max_seq_len raises)
        log.info("%s; trying the example's sequence length", why)
        return _legalize(model, target, example_inputs, calib_data, choices=choices,
                         prefer=prefer, allow_host_fallback=host_fallback, knots=knots,
                         verify=verify, max_seq_len=None)
    if after.unsupported and auto:
        # maybe only the dynamic length lacks a form: the fixed length, fully on chip, wins;
        # otherwise keep the dynamic graph (host fallback, or the error below)
        try:
            return fixed_length(f"{len(after.unsupported)} node(s) have no legal form for a "
                                f"dynamic sequence length", host_fallback=False)
        except UnsupportedOpError:
            pass
    if after.unsupported:
        if not allow_host_fallback:
            lines = [f"  {v.node}: {v.kind} at {v.location} — {v.reason}"
                     for v in after.unsupported]
            raise UnsupportedOpError(
                f"{len(after.unsupported)} node(s) have no legal replacement on {tgt.name}:\n"
                + "\n".join(lines) + "\nFix: pass allow_host_fallback=True to run them on the "
                "host, choose another candidate via choices=..., or use a target that has "
                "these ops." + (" The graph has a dynamic sequence length, and some forms "
                                "(a mean over the sequence) exist only for a fixed one: "
                                "max_seq_len=None keeps the example's length."
                                if dynamic_seq(gm) else ""))
        fb = PassManager("host_fallback", pipelines.host_fallback_passes(tgt)).run(module)
        module, records = fb.module, records + fb.records
        after = check(module, tgt)
    if not _seq_generic(module, gm, example_inputs):
        if auto:
            return fixed_length("the legalized graph does not run at other sequence lengths")
        raise UnsupportedOpError(
            f"the graph legalized for {tgt.name} {SEQ_FIXED_MARK} below "
            f"{dynamic_seq(gm)[0]} (a rewrite fixed the length): capture without max_seq_len "
            f"for a fixed-length graph")
    chosen: dict[str, str] = {}
    for p in passes:
        chosen.update(getattr(p, "chosen", {}))
    return LegalizeResult(module, records, f"legalize[{tgt.name}]", target=tgt.name,
                          before=before, after=after, choices=chosen)


def _seq_generic(module: torch.fx.GraphModule, teacher: torch.fx.GraphModule,
                 example_inputs: Any) -> bool:
    """True unless ``module`` has a dynamic sequence and, at half the example's length (one
    sample), fails, gives outputs shaped unlike the teacher's, or departs from the teacher much
    more than at the example's length (a length baked into a constant: a sum computed as a
    mean times the example's length)."""
    dyn = dynamic_seq(teacher)
    if dyn is None:
        return True
    from torch.utils import _pytree as pytree

    from archnet_fx.capture import normalize_inputs

    info = teacher.meta[CAPTURE_META_KEY]
    seq_names = {s.name for s in info.specs if s.seq}
    batched = {s.name for s in info.specs if s.batched}
    args, kwargs = normalize_inputs(example_inputs)
    names = list(info.input_names)

    def run(length: int) -> tuple[list, list] | None:
        def cut(name: str, v: Any) -> Any:
            if not isinstance(v, torch.Tensor):
                return v
            v = v[:1] if name in batched else v
            return with_seq_length(v, length) if name in seq_names else v
        a = tuple(cut(n, v) for n, v in zip(names, args))
        k = {n: cut(n, v) for n, v in kwargs.items()}
        try:
            with torch.no_grad():
                ref = [t for t in pytree.tree_leaves(teacher(*a, **k))
                       if isinstance(t, torch.Tensor)]
                got = [t for t in pytree.tree_leaves(module(*a, **k))
                       if isinstance(t, torch.Tensor)]
        except Exception as e:  # noqa: BLE001 - a fixed length shows as a shape error
            log.info("legalized graph at sequence length %d: %s: %s", length, type(e).__name__,
                     str(e).splitlines()[0][:200] if str(e) else "")
            return None
        if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got)):
            return None
        return ref, got

    def rel_err(pair: tuple[list, list]) -> float:
        worst = 0.0
        for r, g in zip(*pair):
            if r.is_floating_point() and r.numel():
                r64, g64 = r.double(), g.double()
                worst = max(worst, float((r64 - g64).norm() / r64.norm().clamp_min(1e-12)))
        return worst

    full, half = run(dyn[0]), run(max(2, dyn[0] // 2))
    if full is None or half is None:
        return half is not None
    return rel_err(half) <= 2 * rel_err(full) + 0.05


def clear_caches() -> None:
    """Forget the process-wide memo tables legalization fills (traced surrogate bodies and
    their verdicts by structure, sample-free PWL fits): for cold-start timings and tests."""
    from archnet_fx.legality import clear_body_cache
    from archnet_fx.surrogate.pwl import clear_fit_cache

    clear_body_cache()
    clear_fit_cache()

"""``transform``: the whole pipeline — capture, legalize, fake-quantize, partition, distill, report.

::

    res = archnet_fx.transform(model, target="npu_a", example_inputs=ex, calib_data=batches,
                               weight_bits=4, act_bits=8, seed=0)
    res.module(**inputs)        # the trained, fake-quantized, target-legal student (same call)
    print(res.report)           # legality before/after, blocks, per-block losses, fidelity, time
    res.records                 # one PassRecord per pass (legalization + fake_quant)

Steps (design.md §2):

1. check the bit widths against the target (``BitWidthError`` before anything else);
2. normalise and validate the calibration data: every batch a tuple or dict of tensors shaped
   like the example inputs beyond the batch dimension, finite — otherwise ``CalibrationError``
   before any work. Without ``calib_data`` the example inputs are used, with a loud warning.
   The last ``holdout`` batches are kept out of training to measure fidelity;
3. capture the model (the *teacher*; never modified) and legalize it for the target;
4. deep-copy the legalized module (passes share parameters with their input) and insert LSQ
   fake quantizers at the requested widths (:func:`archnet_fx.quant.insert_fake_quant`);
5. partition it into blocks whose boundaries the teacher also computes
   (:func:`archnet_fx.train.partition.partition` with :func:`archnet_fx.train.distill.boundary_check`);
6. distill block by block (:func:`archnet_fx.train.distill.distill`), progressive or independent;
   the held-out batches measure each block's loss before and after training, never train;
7. measure fidelity on the held-out batches in three stages — the legalized float student, the
   quantized one calibrated on the first training batch (before distillation), and the
   distilled one — against the teacher (mean per-sample cosine, normalised MSE): what
   legalization cost, what quantization cost, what training bought back.

Everything runs under a fixed seed without touching the caller's global RNG; on CPU the result
is deterministic for a seed. The student runs where the model's parameters are (or ``device``).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

from archnet_fx.ir.copying import deepcopy
from archnet_fx.ir.meta import CAPTURE_META_KEY
from archnet_fx.capture import as_call, calibration_batches, dynamic_seq
from archnet_fx.train.distill import (DistillOptions, DistillReport, boundary_check, distill,
                                      match_values)
from archnet_fx.errors import CalibrationError, CheckpointError, OptionError, UnsupportedOpError
from archnet_fx.legality import LegalityReport
from archnet_fx.selection import SelectOptions
from archnet_fx.selection import select as measure_and_select
from archnet_fx.train.partition import Block, block_table, partition
from archnet_fx.infra.records import PassRecord
from archnet_fx import pipelines
from archnet_fx.infra.instruments import tensor_digest
from archnet_fx.infra.manager import PassManager
from archnet_fx.infra.progress import PROGRESS
from archnet_fx.pipelines import as_graph_module
from archnet_fx.quant.fakequant import (calibrating, fake_quant_enabled, surrogate_mode,
                                       widths_label)
from archnet_fx.surrogate.base import DEFAULT_STYLE
from archnet_fx.surrogate.driver import LegalizeOptions
from archnet_fx.targets import Target, load_target

log = logging.getLogger(__name__)

__all__ = ["transform", "TransformResult", "TransformReport",
           "output_fidelity", "DEFAULT_MIN_FIDELITY", "SELECT_MODES"]

#: How transform picks each node's surrogate (see :func:`transform`).
SELECT_MODES = ("measured", "order", "latency")
#: The fidelity floor of the default selection: held-out mean cosine of the outputs of the
#: assembled float network (quantization and distillation come after; the report states the
#: final figure).
DEFAULT_MIN_FIDELITY = 0.99


# --------------------------------------------------------------------------- report


@dataclass
class TransformReport:
    target: str
    weight_bits: int
    act_bits: int
    mode: str
    before: LegalityReport
    after: LegalityReport
    blocks: str                                  # block table
    distill: DistillReport
    fidelity: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    selection: Any = None                        # Selection, when speedup/budget/fidelity ran

    def fidelity_of(self, stage: str = "distilled") -> list[dict[str, Any]]:
        return [r for r in self.fidelity if r["stage"] == stage]

    @property
    def bits_label(self) -> str:
        """``"W8A8"``, or with widths chosen per layer ``"W8A8 (3 layer(s) W4)"``."""
        return widths_label(self.weight_bits, self.act_bits,
                            self.selection.layer_bits if self.selection else None)

    def table(self) -> str:
        from tabulate import tabulate

        def legal(rep: LegalityReport) -> str:
            bad = ", ".join(f"{k}×{n}" for k, n in sorted(rep.unsupported_counts.items()))
            host = sum(rep.host_fallback_counts.values())
            return (f"{sum(rep.on_chip_counts.values())} on chip, {len(rep.unsupported)} "
                    f"unsupported" + (f" ({bad})" if bad else "") + (f", {host} host fallback"
                                                                     if host else ""))
        cal = self.calibration
        parts = [
            f"archnet_fx.transform → {self.target}, {self.bits_label}, "
            f"{self.mode} distillation; calibration: {cal.get('train_batches')} batches "
            f"({cal.get('train_samples')} samples) for training, {cal.get('holdout_batches')} "
            f"held out ({cal.get('holdout_samples')} samples)",
            tabulate([("before", legal(self.before)), ("after", legal(self.after))],
                     headers=["legality", self.target], tablefmt="github"),
            "blocks:\n" + self.blocks,
            "distillation:\n" + self.distill.table(),
        ]
        if self.fidelity:
            rows = [(r["stage"], r["output"], f"{r['cosine']:.5f}", f"{r['nmse']:.3g}")
                    for r in self.fidelity]
            where = ("held-out batches" if cal.get("holdout_batches") else
                     "the training batches (none held out)")
            parts.append(f"fidelity on {where}, vs the original (mean cosine of each output's "
                         "samples; normalised MSE = MSE / mean square of the original's):\n"
                         + tabulate(
                rows, headers=["stage", "output", "mean cosine", "normalised MSE"],
                tablefmt="github"))
        if self.selection is not None:
            parts.append(self.selection.summary())
        parts.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        parts += [f"note: {n}" for n in self.notes]
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """Everything in :meth:`table` as plain JSON-able data."""

        def legal(rep: LegalityReport) -> dict[str, Any]:
            return {"on_chip": sum(rep.on_chip_counts.values()),
                    "unsupported": len(rep.unsupported),
                    "unsupported_by_kind": dict(sorted(rep.unsupported_counts.items())),
                    "host_fallback": sum(rep.host_fallback_counts.values())}
        d = self.distill
        return {
            "target": self.target, "weight_bits": self.weight_bits, "act_bits": self.act_bits,
            "mode": self.mode, "calibration": dict(self.calibration),
            "legality": {"before": legal(self.before), "after": legal(self.after)},
            "distillation": {
                "blocks": [dataclasses.asdict(b) for b in d.blocks], "seconds": d.seconds,
                "e2e_steps": d.e2e_steps, "e2e_loss_before": d.e2e_loss_before,
                "e2e_loss_after": d.e2e_loss_after, "complete": d.complete,
                "resumed_from": d.resumed_from, "peak_store_mb": d.peak_store_mb,
                "spilled_mb": d.spilled_mb},
            "fidelity": [dict(r) for r in self.fidelity],
            "seconds": dict(self.seconds), "notes": list(self.notes),
            "selection": None if self.selection is None else {
                k: getattr(self.selection, k) for k in (
                    "chosen", "layer_bits", "original_s", "default_s", "base_s", "predicted_s",
                    "assembled_s", "budget_s", "objective", "base_nmse", "assembled_cosine",
                    "solver_s", "measure_s", "resolves", "notes")} | {
                "options": [dataclasses.asdict(o) for o in self.selection.options]}}


def _mean_cos(rows: list[dict[str, Any]], stage_index: int) -> float:
    """Mean cosine over the outputs of the ``stage_index``-th fidelity stage."""
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    if stage_index >= len(stages):
        return float("nan")
    cos = [r["cosine"] for r in rows if r["stage"] == stages[stage_index]]
    return sum(cos) / len(cos) if cos else float("nan")


@dataclass
class TransformResult:
    module: torch.fx.GraphModule
    records: list[PassRecord]
    report: TransformReport
    blocks: list[Block] = field(default_factory=list, repr=False)

    def diff(self, name: str | None = None) -> str:
        from archnet_fx.infra.instruments import pass_diff, records_table

        if name is None:
            return records_table(self.records)
        for r in self.records:
            if r.name == name:
                return pass_diff(r)
        raise KeyError(f"no pass named {name!r} ran; passes: {[r.name for r in self.records]}")


# --------------------------------------------------------------------------- calibration


def _validate_batches(gm: torch.fx.GraphModule, batches: Sequence[tuple[tuple, dict]]) -> None:
    """Shapes beyond the batch dimension as captured, finite floats; else CalibrationError."""
    info = gm.meta.get(CAPTURE_META_KEY)
    if info is None:
        return
    names = list(info.input_names)
    for i, (args, kwargs) in enumerate(batches):
        sizes = set()
        for spec in info.specs:
            idx = names.index(spec.name) if spec.name in names else -1
            if 0 <= idx < len(args):
                v = args[idx]
            elif spec.name in kwargs:
                v = kwargs[spec.name]
            else:
                raise CalibrationError(f"calibration batch {i} has no input '{spec.name}' "
                                       f"(the model was captured with inputs "
                                       f"{', '.join(s.name for s in info.specs)})")
            if not isinstance(v, torch.Tensor):
                raise CalibrationError(f"calibration batch {i}: input '{spec.name}' is a "
                                       f"{type(v).__name__}, not a tensor")
            if v.dtype != spec.dtype:
                raise CalibrationError(f"calibration batch {i}: input '{spec.name}' has dtype "
                                       f"{v.dtype} but the model was captured with {spec.dtype} "
                                       f"(the example's); convert it with .to({spec.dtype})")
            want = spec.shape
            shape = tuple(v.shape)
            start = 1 if spec.batched else 0
            if len(shape) != len(want) or shape[start:] != want[start:]:
                exp = ("(batch, " + ", ".join(map(str, want[1:])) + ")") if spec.batched \
                    else str(want)
                raise CalibrationError(f"calibration batch {i}: input '{spec.name}' has shape "
                                       f"{shape} but the model takes {exp}")
            if spec.batched:
                sizes.add(shape[0])
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise CalibrationError(f"calibration batch {i}: input '{spec.name}' contains "
                                       "NaN or Inf; pass finite values")
            if v.numel() == 0:
                raise CalibrationError(f"calibration batch {i}: input '{spec.name}' is empty")
        if len(sizes) > 1:
            raise CalibrationError(f"calibration batch {i}: inputs disagree on the batch size "
                                   f"({sorted(sizes)})")


def _split_holdout(batches: list, holdout: int | float) -> tuple[list, list]:
    n = len(batches)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or holdout < 0 or \
            (isinstance(holdout, float) and holdout >= 1):
        raise OptionError(f"holdout must be a number of batches (int >= 0) or a fraction in "
                          f"[0, 1), got {holdout!r}")
    h = int(holdout) if isinstance(holdout, int) else round(holdout * n)
    if holdout and h == 0:
        h = 1
    if n < 2:
        return batches, []
    h = min(h, n - 1)
    return batches[:n - h], batches[n - h:]


# --------------------------------------------------------------------------- resume

SETTINGS_NAME = "transform_settings.json"


def _settings(model: Any, target: str, w_bits: int | str, a_bits: int, opts: DistillOptions,
              holdout: Any, choices: Any, granularity: Any, cut_nodes: Any, prefer: str,
              *rest: Any) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint (cheap to compute:
    checked before capture): target, bits, options (normalised), and a digest of the model's
    parameters and buffers."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else {}
    return {"target": target, "bits": [w_bits, a_bits],
            "options": {k: str(v) for k, v in opts.fingerprint_fields().items()},
            "transform": [repr(float(holdout)) if isinstance(holdout, (int, float)) else
                          repr(holdout), repr(sorted((choices or {}).items())),
                          repr(granularity), repr(tuple(cut_nodes or ())), prefer,
                          *[repr(r) for r in rest]],
            "model": tensor_digest(v for _, v in sorted(state.items()))}


def _check_resume(checkpoint_dir: Any, settings: dict[str, Any], batches: list
                  ) -> dict[str, Any]:
    """Refuse a checkpoint directory written with other settings, before any work. Returns the
    settings (with the calibration data's digest) for :func:`_record_settings`."""
    import json
    from pathlib import Path

    from archnet_fx.train.distill import CHECKPOINT_NAME

    settings = dict(settings, batches=tensor_digest(t for b in batches
                                              for t in pytree.tree_leaves(b)))
    d = Path(checkpoint_dir)
    f = d / SETTINGS_NAME
    if (d / CHECKPOINT_NAME).exists() and f.exists():
        try:
            old = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read the settings of the checkpoint ({e}); "
                                  f"delete {d} or pass another checkpoint_dir") from None
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise CheckpointError(f"checkpoint_dir {str(d)!r} holds a checkpoint of other "
                                  f"settings (they differ in: {', '.join(diff)}); pass the same "
                                  f"model, target, options and calibration data to resume, or "
                                  f"another checkpoint_dir (or delete it) to start afresh")
    return settings


def _record_settings(checkpoint_dir: Any, settings: dict[str, Any]) -> None:
    """Write this run's settings beside the checkpoint it is about to start (not when a
    checkpoint without settings exists: distillation's own fingerprint judges that one)."""
    import json
    from pathlib import Path

    from archnet_fx.infra.instruments import atomic_write_text
    from archnet_fx.train.distill import CHECKPOINT_NAME

    d = Path(checkpoint_dir)
    if not (d / CHECKPOINT_NAME).exists():
        atomic_write_text(d / SETTINGS_NAME, json.dumps(settings))


# --------------------------------------------------------------------------- fidelity


def output_fidelity(teacher: torch.nn.Module, student: torch.nn.Module,
                    batches: Sequence[tuple[tuple, dict]], stage: str) -> list[dict[str, Any]]:
    """Per float output: mean per-sample cosine and normalised MSE of student vs teacher."""
    acc: dict[int, dict[str, float]] = {}
    t_dev = next((p.device for p in teacher.parameters()), torch.device("cpu"))
    s_dev = next((p.device for p in student.parameters()), torch.device("cpu"))

    def to(v, d):
        return pytree.tree_map(lambda t: t.to(d) if isinstance(t, torch.Tensor) else t, v)
    with torch.no_grad():
        for args, kwargs in batches:
            t_out = [t for t in pytree.tree_leaves(teacher(*to(args, t_dev), **to(kwargs, t_dev)))
                     if isinstance(t, torch.Tensor)]
            s_out = [t for t in pytree.tree_leaves(student(*to(args, s_dev), **to(kwargs, s_dev)))
                     if isinstance(t, torch.Tensor)]
            for j, (a, b) in enumerate(zip(t_out, s_out)):
                if not a.is_floating_point():
                    continue
                a, b = a.float().cpu(), b.float().cpu()
                a2 = a.reshape(a.shape[0], -1) if a.dim() > 1 else a.reshape(1, -1)
                b2 = b.reshape(a2.shape)
                cos = torch.nn.functional.cosine_similarity(a2, b2, dim=1, eps=1e-12)
                r = acc.setdefault(j, {"cos": 0.0, "n": 0, "err": 0.0, "ref": 0.0})
                r["cos"] += float(cos.sum())
                r["n"] += cos.numel()
                r["err"] += float((a - b).pow(2).sum())
                r["ref"] += float(a.pow(2).sum())
    return [{"stage": stage, "output": f"output[{j}]", "cosine": r["cos"] / max(1, r["n"]),
             "nmse": r["err"] / max(r["ref"], 1e-30)} for j, r in sorted(acc.items())]


def calibrated(student: torch.nn.Module, batch: tuple[tuple, dict]) -> torch.nn.Module:
    """A copy of the fake-quantized ``student`` with every quantizer calibrated on ``batch``
    (one forward pass): the quantized model before any training."""
    dev = next((p.device for p in student.parameters()), torch.device("cpu"))
    args, kwargs = pytree.tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t,
                                   batch)
    out = deepcopy(student)
    with torch.no_grad(), calibrating(out):
        out(*args, **kwargs)
    return out


# --------------------------------------------------------------------------- transform


def transform(model: torch.nn.Module, target: str | Target = "npu_a", example_inputs: Any = None,
              calib_data: Iterable | None = None, weight_bits: int | None = None,
              act_bits: int | None = None, seed: int = 0, *, mode: str = "progressive",
              steps: int | None = None, epochs: int = 1, checkpoint_dir: Any = None,
              holdout: int | float = 0.1, choices: Mapping[str, str] | None = None,
              device: str | torch.device | None = None, granularity: int | None = None,
              cut_nodes: Sequence[str] | None = None, prefer: str = DEFAULT_STYLE,
              allow_host_fallback: bool = False, quantize_surrogates: str | bool = "structural",
              surrogate_weight_bits: int | None = None, verify: bool = True,
              select: str = "measured", max_seq_len: int | str | None = "auto",
              speedup: float | None = None, latency_budget: float | None = None,
              min_fidelity: float | None = None, cache_dir: Any = None, workers: int | str = 1,
              **distill_options: Any) -> TransformResult:
    """Make ``model`` run on ``target`` at ``weight_bits``/``act_bits`` (see module docstring).

    Extra keyword arguments go to :class:`~archnet_fx.train.distill.DistillOptions`
    (``lr_surrogate``, ``lr_weight``, ``lr_quant``, ``e2e_steps``, ``grad_clip``,
    ``memory_budget_mb``, ``spill_dir``, ``stop_after``, ``progress``).

    **Which surrogate each unsupported node gets** (``select``):

    * ``"measured"`` (default): hardware-aware selection (:mod:`archnet_fx.selection`): every
      candidate of every replaced node is fitted and measured (held-out output error when
      swapped alone into the original, latency from the target's cost model), one integer
      program chooses, and distillation starts from the fitted modules. ``speedup`` (over the
      original's estimate) / ``latency_budget`` (seconds): the most faithful choice within it;
      ``min_fidelity`` (held-out mean cosine of the outputs, float, checked after assembly):
      the fastest choice that keeps it. With none of the three, ``min_fidelity=`` 0.99
      (:data:`DEFAULT_MIN_FIDELITY`): the fastest network that stays faithful. ``cache_dir``
      keeps the measurements, so another budget on the same model and data skips them;
      ``workers`` > 1 measures in that many local processes (``torch.distributed``, gloo), and
      inside a running process group (``torchrun``) the ranks share the work. The report's
      ``selection`` holds the table.
    * ``"order"``: no measurement: each node takes the first candidate of ``prefer``'s order
      (``prefer="structural"`` then means Arch-Net's forms everywhere).
    * ``"latency"``: as ``"order"``, then each node's lossless alternatives are kept where the
      estimate is faster (see :func:`archnet_fx.legalize`).

    ``choices`` pins nodes or kinds under any of the three.

    **Weight widths.** ``weight_bits=None`` (default) under ``"measured"``: each conv/linear's
    width is chosen by the same integer program among the target's widths, the target's
    default width as the reference (npu_a: W4 where it makes a layer faster — memory-bound
    layers only, a W4A8 MAC runs at the int8 rate — and the budget or fidelity floor allows it;
    the report names the W4 layers). An explicit ``weight_bits`` fixes every layer's width.
    ``max_seq_len`` (default ``"auto"``: the calibration data's length for models with token-id
    inputs; an int; None for the example's fixed length): the result runs at any sequence
    length from 2 up to it (see :func:`archnet_fx.capture`); calibration batches keep the
    example's shape. Under ``"auto"`` a model or rewrite that fixes the length keeps the
    example's, with a note in the report.
    """
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    tgt = load_target(target)
    w_bits, a_bits = tgt.quant.check_bits(weight_bits, act_bits)
    if surrogate_weight_bits is not None:
        tgt.quant.check_bits(surrogate_weight_bits, a_bits)
    try:
        opts = DistillOptions(mode=mode, steps=steps, epochs=epochs,
                              checkpoint_dir=checkpoint_dir, device=device, seed=seed,
                              **distill_options)
    except TypeError as e:
        if isinstance(e, OptionError):
            raise
        known = ", ".join(f for f in DistillOptions.__dataclass_fields__)
        unknown = sorted(set(distill_options) - set(DistillOptions.__dataclass_fields__))
        raise OptionError(f"transform: unknown option(s) {', '.join(unknown) or e}; transform's "
                          f"own options are documented in help(archnet_fx.transform), "
                          f"distillation options: {known}") from None
    surrogate_mode(quantize_surrogates)
    _split_holdout([], holdout)  # validates holdout
    if granularity is not None and (isinstance(granularity, bool)
                                    or not isinstance(granularity, int) or granularity < 1):
        raise OptionError(f"granularity must be a positive integer (number of blocks) or None, "
                          f"got {granularity!r}")
    if cut_nodes is not None and (isinstance(cut_nodes, str) or not isinstance(
            cut_nodes, Sequence) or not all(
            isinstance(c, str) for c in cut_nodes)):
        raise OptionError(f"cut_nodes must be a list of node names, got {cut_nodes!r}")
    if max_seq_len is not None and max_seq_len != "auto" and (
            isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2):
        raise OptionError(f"max_seq_len must be an integer >= 2, 'auto' or None, got "
                          f"{max_seq_len!r}")
    if select not in SELECT_MODES:
        raise OptionError(f"select must be one of {', '.join(map(repr, SELECT_MODES))}, got "
                          f"{select!r}")
    given = [k for k, v in (("speedup", speedup), ("latency_budget", latency_budget),
                            ("min_fidelity", min_fidelity)) if v is not None]
    if select != "measured" and given:
        raise OptionError(f"{', '.join(given)} need(s) select='measured' (the default); "
                          f"select={select!r} does not measure candidates: drop "
                          f"{', '.join(given)} or leave select at its default")
    extra = [k for k, bad in (("cache_dir", cache_dir is not None), ("workers", workers != 1))
             if bad]
    if select != "measured" and extra:
        raise OptionError(f"{' and '.join(extra)} belong(s) to select='measured' (the default); "
                          f"select={select!r} measures nothing: drop {' and '.join(extra)} or "
                          "leave select at its default")
    if select == "measured" and not given:
        min_fidelity = DEFAULT_MIN_FIDELITY
    if choices is not None and not isinstance(choices, Mapping):
        raise OptionError(f"choices must be a mapping {{kind or node: candidate or style}}, "
                          f"got {type(choices).__name__}")
    LegalizeOptions(dict(choices or {}), prefer, allow_host_fallback)  # validates prefer
    sel_opts = SelectOptions(speedup=speedup, latency_budget=latency_budget,
                             min_fidelity=min_fidelity, cache_dir=cache_dir, workers=workers)
    for name, flag in (("allow_host_fallback", allow_host_fallback), ("verify", verify)):
        if not isinstance(flag, bool):
            raise OptionError(f"{name} must be a bool, got {flag!r}")
    batches = calibration_batches(calib_data, example_inputs, warn_example="transform")
    if checkpoint_dir is not None:   # digests of the model and data only when resuming
        settings = _check_resume(checkpoint_dir, _settings(
            # weight_bits=None: widths chosen per layer (a different network from all-W8)
            model, tgt.name, w_bits if weight_bits is not None else f"per layer, ref. {w_bits}",
            a_bits, opts, holdout, choices, granularity, cut_nodes,
            prefer, allow_host_fallback, quantize_surrogates, surrogate_weight_bits, select,
            max_seq_len, speedup, latency_budget, min_fidelity), batches)
    notes: list[str] = []
    if calib_data is None:
        notes.append("no calib_data: distilled on the example inputs only")
    if example_inputs is None:
        example_inputs = as_call(batches[0])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        teacher = as_graph_module(model, example_inputs, max_seq_len)
        seconds["capture"] = time.perf_counter() - t0
        PROGRESS.info("capture: %s, %d nodes (%.1f s)", getattr(teacher.meta.get(
            CAPTURE_META_KEY), "method", "graph given"), len(teacher.graph.nodes),
            seconds["capture"])
        _validate_batches(teacher, batches)
        train, held = _split_holdout(batches, holdout)
        if not held:
            notes.append("one calibration batch: fidelity is measured on the training batch"
                         if len(batches) == 1 else
                         "holdout=0: fidelity is measured on the training batches")
            held = train

        from archnet_fx.legalize import legalize
        selection = None
        t0 = time.perf_counter()
        run_legalize = functools.partial(
            legalize, target=tgt, example_inputs=example_inputs,
            calib_data=[as_call(b) for b in train], choices=choices, prefer=prefer,
            allow_host_fallback=allow_host_fallback, verify=verify,
            select="order" if select == "measured" else select)

        def legalize_or_select(teacher: torch.fx.GraphModule) -> Any:
            nonlocal selection
            if not sel_opts.active:
                return run_legalize(teacher)
            selection = measure_and_select(
                teacher, tgt, example_inputs, train, held, options=sel_opts, weight_bits=w_bits,
                act_bits=a_bits, choices=choices, prefer=prefer,
                allow_host_fallback=allow_host_fallback, seed=seed, verify=verify,
                progress=opts.progress, mixed_bits=weight_bits is None)
            return selection.legalized
        try:
            leg = legalize_or_select(teacher)
        except UnsupportedOpError as e:
            if not getattr(teacher.meta[CAPTURE_META_KEY], "seq_auto", False):
                raise
            # max_seq_len="auto": a rewrite needs the length fixed, so keep the example's
            teacher = as_graph_module(model, example_inputs, None)
            if dynamic_seq(teacher) is not None:   # the caller passed a captured graph
                raise
            notes.append(f"sequence length fixed at the example's: {str(e).splitlines()[0]}")
            leg = legalize_or_select(teacher)
        seconds["legalize"] = time.perf_counter() - t0
        if selection is not None:     # the measured selection ran inside this stage
            seconds["select"] = selection.measure_s
            seconds["legalize"] -= selection.measure_s
        PROGRESS.info("legalize for %s%s: %d unsupported node(s) before, %d after, %d "
                      "surrogate(s) (%.1f s)", tgt.name,
                      "" if selection is None else " with the selected candidates",
                      len(leg.before.unsupported), len(leg.after.unsupported), len(leg.choices),
                      seconds["legalize"])

        t0 = time.perf_counter()
        student = deepcopy(leg.module)  # passes share parameters: train a private copy
        fq = PassManager("quantize", pipelines.quantize_passes(
            tgt, w_bits, a_bits, surrogate_weight_bits=surrogate_weight_bits,
            quantize_surrogates=quantize_surrogates,
            layer_bits=selection.layer_bits if selection is not None else None)).run(
                student, copy=False)
        student = fq.module
        if device is not None:
            student.to(device)
        records = list(leg.records) + fq.records
        vmap = match_values(teacher, student, records)
        blocks = partition(student, granularity, cut_nodes,
                           boundary_ok=boundary_check(student, vmap))
        seconds["quantize+partition"] = time.perf_counter() - t0
        PROGRESS.info("quantize W%dA%d and partition: %d blocks (%.1f s)", w_bits, a_bits,
                      len(blocks), seconds["quantize+partition"])

        t0 = time.perf_counter()
        fidelity = output_fidelity(teacher, leg.module, held, "legalized (float, untrained)")
        fidelity += output_fidelity(teacher, calibrated(student, train[0]), held,
                                    "quantized, calibrated (before distillation)")
        seconds["fidelity"] = time.perf_counter() - t0
        PROGRESS.info("fidelity before distillation: cosine %.4f legalized, %.4f quantized "
                      "(%.1f s)", _mean_cos(fidelity, 0), _mean_cos(fidelity, 1),
                      seconds["fidelity"])

        t0 = time.perf_counter()
        if checkpoint_dir is not None:
            _record_settings(checkpoint_dir, settings)
        drep = distill(student, teacher, blocks, train, opts, value_map=vmap,
                       holdout=held if held is not train else ())
        seconds["distill"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with fake_quant_enabled(student, True):
            fidelity += output_fidelity(teacher, student, held, "distilled")
        seconds["fidelity"] += time.perf_counter() - t0
        PROGRESS.info("fidelity after distillation: cosine %.4f (%.1f s)",
                      _mean_cos(fidelity, 2), time.perf_counter() - t0)
    seconds["total"] = time.perf_counter() - t_all

    def n_samples(bs):
        out = 0
        for a, k in bs:
            leaves = [t for t in list(a) + list(k.values()) if isinstance(t, torch.Tensor)]
            out += int(leaves[0].shape[0]) if leaves and leaves[0].dim() else 1
        return out
    report = TransformReport(
        target=tgt.name, weight_bits=w_bits, act_bits=a_bits, mode=opts.mode,
        before=leg.before, after=leg.after, blocks=block_table(blocks), distill=drep,
        fidelity=fidelity, seconds=seconds,
        calibration={"train_batches": len(train),
                     "holdout_batches": 0 if held is train else len(held),
                     "train_samples": n_samples(train),
                     "holdout_samples": 0 if held is train else n_samples(held)},
        notes=notes, selection=selection)
    if not drep.complete:
        report.notes.append("distillation stopped early (stop_after); call again with the same "
                            "arguments and checkpoint_dir to finish")
    return TransformResult(student, records, report, blocks)

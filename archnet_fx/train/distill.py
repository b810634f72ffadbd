"""Blockwise distillation of a legalized, fake-quantized student against the original graph.

No labels: the *teacher* is the captured original graph, the *student* its legalized copy with
LSQ quantizers (:mod:`archnet_fx.quant.fakequant`), cut into blocks by :func:`archnet_fx.train.partition.partition`.

Data flow of :func:`distill`::

    calibration batches ──teacher (fx Interpreter)──▶ teacher values at every block boundary
                        ──side graph──────────────▶ parameter-free side values (masks, shapes)
    for each block k:
        inputs  = graph inputs + side values + upstream values, either the student's own
                  (progressive, Arch-Net) or the teacher's (independent, HANT)
        calibrate the block's quantizers on the first batch (MSE-optimal steps)
        Adam on  ‖student_k(inputs) − teacher outputs‖² / ‖teacher outputs‖²   (per output,
                 averaged) over the training batches, rates relative to what each parameter
                 is (see _param_groups: per element for surrogates, in quantization steps for
                 quantized weights), linear warm-up then cosine decay, gradient clipping;
                 if the loss on the held-out batches ends higher than before training, the
                 calibrated parameters are restored (the safety net; a note says so)
        run the trained block on every batch: loss after, and (progressive) its outputs for
        the blocks downstream
        checkpoint (student state, optimizer, RNG, losses so far)
    optional short end-to-end stage on the graph outputs

Which student value is which teacher value: passes keep node names and record every
replacement (``PassRecord.replaced``, old → new); :func:`match_values` follows those records
from the teacher's names to the student's, and pairs the graph outputs by position. A value that
crosses a block boundary must have a teacher counterpart or be *side* (computed from the inputs
without trained parameters: attention masks, shapes — recomputed exactly from the student graph);
:func:`boundary_check` gives :func:`~archnet_fx.train.partition.partition` that rule.

Memory is bounded: boundary values live in an :class:`ActivationStore`, in RAM up to
``memory_budget_mb`` and spilled to ``.pt`` shards in a temporary directory beyond it; values no
later block needs are dropped as training advances.

Resume: with ``checkpoint_dir`` a checkpoint is written atomically after every block (and after
the end-to-end stage). A new call with the same student, blocks, batches and options loads it,
rebuilds the boundary values (the teacher and the trained upstream blocks are deterministic),
and continues; every random choice is drawn from a generator seeded by ``(seed, block)``, so the
result equals an uninterrupted run's. A checkpoint made with other settings is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

from archnet_fx.errors import CalibrationError, CheckpointError, DeviceError, OptionError
from archnet_fx.ir.dataflow import input_dependent
from archnet_fx.train.partition import Block, bind_inputs
from archnet_fx.infra.instruments import blocked_directory, process_umask
from archnet_fx.infra.progress import PROGRESS
from archnet_fx.infra.records import PassRecord
from archnet_fx.quant.fakequant import FakeQuant, calibrating
from archnet_fx.surrogate.base import Surrogate, frozen_parameters

log = logging.getLogger(__name__)

__all__ = ["DistillOptions", "DistillReport", "BlockStats", "ActivationStore", "distill",
           "match_values", "boundary_check", "side_values", "normalized_mse"]

MODES = ("progressive", "independent")
CHECKPOINT_NAME = "distill_checkpoint.pt"
ELEMENT_FLOOR = 1e-2  # surrogate parameters: an element's rate is at least 1% of the tensor's
EVAL_BATCHES = 2  # without held-out batches, loss before/after is measured on the first few
NEAR_EXACT = 1e-4  # a block whose loss starts at or below this nMSE has nothing to learn
_FORMAT = 1


# --------------------------------------------------------------------------- options


@dataclass
class DistillOptions:
    """Settings of :func:`distill`; every field is validated (``ValueError`` names it)."""
    mode: str = "progressive"          # "progressive" (Arch-Net) or "independent" (HANT)
    epochs: int = 1                    # passes over the batches per block (unless ``steps``)
    steps: int | None = None           # optimizer steps per block; overrides ``epochs``
    # Learning rates are relative to each parameter tensor's RMS (see _param_groups); 0 freezes.
    lr_surrogate: float = 1e-3         # parameters that surrogates introduced (PWL knots, ...)
    lr_weight: float = 5e-4            # float weights: biases, affine, exact surrogates (RMS-relative)
    lr_weight_step: float = 0.02       # quantized weights, in units of their quantization step
    lr_quant: float = 1e-2             # quantizer steps and zero points (integer units)
    e2e_steps: int = 0                 # optional end-to-end steps on the graph outputs
    e2e_lr_scale: float = 0.1          # learning rates × this in the end-to-end stage
    grad_clip: float | None = 1.0      # max gradient norm per step (None: no clipping)
    warmup: float = 0.2                # fraction of a block's steps with a linear lr warm-up
    far_loss: float | None = 0.05      # a block starting above this nMSE (None: no block) ...
    far_boost: float = 1.0             # ... trains its weights at this × the rates (1: off; 4
                                       # cost a W2A4 ViT 2/3 → 0/3 seeds within 0.5 points)
    per_element: bool = True           # per-element rates (surrogates, quantized weights); False:
                                       # one rate per tensor (the recipe before issue 14)
    checkpoint_dir: str | os.PathLike | None = None
    device: str | torch.device | None = None   # default: where the student's parameters are
    seed: int = 0
    memory_budget_mb: float = 1024.0   # boundary values kept in RAM; the rest spills to disk
    spill_dir: str | os.PathLike | None = None  # where spilled shards go (default: a temp dir)
    stop_after: int | None = None      # train at most this many blocks in this call (resume later)
    progress: bool = True              # tqdm bars

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> OptionError:
            return OptionError(f"DistillOptions.{name} must be {want}, got "
                               f"{getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if self.mode not in MODES:
            raise bad("mode", f"one of {MODES}")
        if not is_int(self.epochs) or self.epochs < 1:
            raise bad("epochs", "a positive integer")
        if self.steps is not None and (not is_int(self.steps) or self.steps < 0):
            raise bad("steps", "a non-negative integer or None")
        for name in ("lr_surrogate", "lr_weight", "lr_weight_step", "lr_quant"):
            v = getattr(self, name)
            if not is_num(v) or v < 0:
                raise bad(name, "a finite number >= 0")
        if not is_int(self.e2e_steps) or self.e2e_steps < 0:
            raise bad("e2e_steps", "a non-negative integer")
        if not is_num(self.e2e_lr_scale) or self.e2e_lr_scale <= 0:
            raise bad("e2e_lr_scale", "a finite number > 0")
        if self.far_loss is not None and (not is_num(self.far_loss) or self.far_loss <= 0):
            raise bad("far_loss", "a finite number > 0 or None")
        if not is_num(self.far_boost) or self.far_boost <= 0:
            raise bad("far_boost", "a finite number > 0")
        if not is_num(self.warmup) or not 0 <= self.warmup < 1:
            raise bad("warmup", "a fraction in [0, 1)")
        if self.grad_clip is not None and (not is_num(self.grad_clip) or self.grad_clip <= 0):
            raise bad("grad_clip", "a finite number > 0 or None")
        if not is_int(self.seed):
            raise bad("seed", "an integer")
        if not is_num(self.memory_budget_mb) or self.memory_budget_mb < 0:
            raise bad("memory_budget_mb", "a finite number >= 0")
        if self.stop_after is not None and (not is_int(self.stop_after) or self.stop_after < 1):
            raise bad("stop_after", "a positive integer or None")
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise bad("device", "a torch device such as 'cpu' or 'cuda'") from e
            check_device(dev)
        for name in ("checkpoint_dir", "spill_dir"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise bad(name, "a path or None")
            if v is not None:
                _check_dir(Path(v), name, CheckpointError if name == "checkpoint_dir"
                           else OptionError)
        for name in ("progress", "per_element"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that change the result (not device, paths, bars or stop_after)."""
        skip = {"checkpoint_dir", "device", "memory_budget_mb", "spill_dir", "stop_after",
                "progress"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


# --------------------------------------------------------------------------- report


@dataclass
class BlockStats:
    index: int
    name: str
    nodes: int
    params: int
    steps: int
    loss_before: float | None   # after calibrating its quantizers, before training (eval batches)
    loss_after: float | None    # after training, on the same eval batches
    seconds: float
    note: str = ""
    loss_after_all: float | None = None  # after training, mean over every batch (progressive)


@dataclass
class DistillReport:
    mode: str
    blocks: list[BlockStats] = field(default_factory=list)
    e2e_steps: int = 0
    e2e_loss_before: float | None = None
    e2e_loss_after: float | None = None
    seconds: float = 0.0
    resumed_from: int | None = None      # blocks already done in the checkpoint that was loaded
    complete: bool = True                 # False when stop_after ended the call early
    peak_store_mb: float = 0.0            # most boundary-value memory held in RAM at once
    spilled_mb: float = 0.0               # written to disk

    def table(self) -> str:
        from tabulate import tabulate

        def f(v: float | None) -> str:
            return "—" if v is None else f"{v:.4g}"
        rows = [(b.index, b.name, b.nodes, b.params, b.steps, f(b.loss_before), f(b.loss_after),
                 f(b.loss_after_all), f"{b.seconds:.1f}", b.note) for b in self.blocks]
        text = tabulate(rows, headers=["block", "layer", "nodes", "params", "steps",
                                       "loss before", "loss after", "after (all batches)", "s",
                                       "note"], tablefmt="github")
        tail = ["loss: normalised MSE of the block's outputs against the teacher's; before: with "
                "calibrated quantizers, untrained; before/after on the held-out batches (on the "
                "training batches when none are held out); after (all batches): the mean over "
                "the training batches",
                f"mode {self.mode}, {self.seconds:.1f} s"
                + (f", resumed after block {self.resumed_from - 1}" if self.resumed_from else "")
                + ("" if self.complete else ", stopped early (resume with the same call)")
                + f"; boundary store peak {self.peak_store_mb:.0f} MB in RAM, "
                  f"{self.spilled_mb:.0f} MB spilled"]
        if self.e2e_steps:
            tail.append(f"end-to-end: {self.e2e_steps} steps, loss {f(self.e2e_loss_before)} → "
                        f"{f(self.e2e_loss_after)}")
        return text + "\n" + "\n".join(tail)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------- storage


class ActivationStore:
    """Key → value, in RAM up to a byte budget, spilled to ``.pt`` shards beyond it."""

    def __init__(self, budget_bytes: float, spill_dir: str | os.PathLike | None = None) -> None:
        self.budget = float(budget_bytes)
        self._ram: dict[tuple, Any] = {}
        self._disk: dict[tuple, Path] = {}
        self._sizes: dict[tuple, int] = {}
        self.used = 0
        self.peak = 0
        self.spilled = 0
        self._own_dir = spill_dir is None
        self._dir = Path(spill_dir) if spill_dir is not None else None

    @staticmethod
    def _nbytes(v: Any) -> int:
        return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(v)
                   if isinstance(t, torch.Tensor))

    def _path(self, key: tuple) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="archnet_distill_"))
        self._dir.mkdir(parents=True, exist_ok=True)
        name = "-".join("".join(c if c.isalnum() or c in "_." else "_" for c in str(k))
                        for k in key)
        return self._dir / f"{name}.pt"

    def put(self, key: tuple, value: Any) -> None:
        self.drop(key)
        value = pytree.tree_map(lambda t: t.detach().to("cpu", copy=False).contiguous()
                                if isinstance(t, torch.Tensor) else t, value)
        n = self._nbytes(value)
        if n and self.used + n > self.budget:
            path = self._path(key)
            torch.save(value, path)
            self._disk[key] = path
            self.spilled += n
        else:
            self._ram[key] = value
            self._sizes[key] = n
            self.used += n
            self.peak = max(self.peak, self.used)

    def get(self, key: tuple) -> Any:
        if key in self._ram:
            return self._ram[key]
        if key in self._disk:
            return torch.load(self._disk[key], weights_only=True)
        raise KeyError(key)

    def __contains__(self, key: tuple) -> bool:
        return key in self._ram or key in self._disk

    def drop(self, key: tuple) -> None:
        if key in self._ram:
            del self._ram[key]
            self.used -= self._sizes.pop(key)
        if key in self._disk:
            self._disk.pop(key).unlink(missing_ok=True)

    def drop_where(self, pred: Callable[[tuple], bool]) -> None:
        for key in [k for k in list(self._ram) + list(self._disk) if pred(k)]:
            self.drop(key)

    def close(self) -> None:
        self._ram.clear()
        self._sizes.clear()
        for p in self._disk.values():
            p.unlink(missing_ok=True)
        self._disk.clear()
        self.used = 0
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# --------------------------------------------------------------------------- value matching


def _out_leaves(gm: torch.fx.GraphModule) -> list[Any]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return pytree.tree_leaves(out.args[0])


def _shape(n: torch.fx.Node) -> tuple[int, ...] | None:
    tm = n.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape)
    return None


def _dtype(n: torch.fx.Node) -> torch.dtype | None:
    tm = n.meta.get("tensor_meta")
    return getattr(tm, "dtype", None)


def match_values(teacher: torch.fx.GraphModule, student: torch.fx.GraphModule,
                 records: Sequence[PassRecord] = ()) -> dict[str, str]:
    """Student value name → teacher value name, for the values both graphs compute.

    Follows ``records`` (the passes that turned the teacher into the student, in order): a name
    keeps its meaning until a pass erases or re-creates it; a replacement ``old → new`` carries
    the meaning to ``new``. Graph outputs pair by position. Pairs whose shapes (beyond the batch
    dimension) or float-ness differ are dropped.
    """
    alias = {n.name: n.name for n in teacher.graph.nodes if n.op != "output"}
    for rec in records:
        new_alias = dict(alias)
        for name in list(rec.erased) + list(rec.created):
            new_alias.pop(name, None)
        for old, new in rec.replaced.items():
            if old in alias:
                new_alias[new] = alias[old]
        alias = new_alias
    s_nodes = {n.name: n for n in student.graph.nodes}
    t_nodes = {n.name: n for n in teacher.graph.nodes}
    pairs = {s: t for s, t in alias.items() if s in s_nodes and t in t_nodes}
    s_out, t_out = _out_leaves(student), _out_leaves(teacher)
    if len(s_out) == len(t_out):
        for a, b in zip(s_out, t_out):
            if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
                pairs[a.name] = b.name
    good = {}
    for s, t in pairs.items():
        sn, tn = s_nodes[s], t_nodes[t]
        ss, ts = _shape(sn), _shape(tn)
        if ss is not None and ts is not None and (len(ss) != len(ts) or ss[1:] != ts[1:]):
            continue
        sd, td = _dtype(sn), _dtype(tn)
        if sd is not None and td is not None and sd.is_floating_point != td.is_floating_point:
            continue
        good[s] = t
    return good


def _trained_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes whose value depends on a parameter or a quantizer (forward closure)."""
    trained: set[torch.fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                gm.get_parameter(n.target)
                trained.add(n)
            except AttributeError:
                pass
            continue
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if any(True for _ in mod.parameters()) or isinstance(mod, FakeQuant):
                trained.add(n)
                continue
        if any(a in trained for a in n.all_input_nodes):
            trained.add(n)
    return trained


def side_values(gm: torch.fx.GraphModule) -> set[str]:
    """Names of input-dependent values computed without trained parameters (masks, shapes)."""
    dep = input_dependent(gm)
    trained = _trained_nodes(gm)
    return {n.name for n in gm.graph.nodes if n in dep and n not in trained
            and n.op not in ("placeholder", "output")}


def boundary_check(student: torch.fx.GraphModule, value_map: Mapping[str, str]
                   ) -> Callable[[list[str]], str | None]:
    """A ``boundary_ok`` for :func:`partition`: every crossing value must be teacher-matched or
    side (parameter-free)."""
    side = side_values(student)
    nodes = {n.name: n for n in student.graph.nodes}

    def ok(live: list[str]) -> str | None:
        for v in live:
            if v in side:
                continue
            if v in value_map and _dtype(nodes[v]) is not None and _dtype(nodes[v]).is_floating_point:
                continue
            return (f"value {v!r} crosses it but has no counterpart in the teacher (and depends "
                    "on trained parameters)")
        return None
    return ok


class _Recorder(torch.fx.Interpreter):
    """Runs a graph and keeps the values of the named nodes (an analysis, design.md §9)."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.kept: dict[str, Any] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.kept[n.name] = out
        return out


def _side_graph(gm: torch.fx.GraphModule, names: list[str]) -> torch.fx.GraphModule:
    """A GraphModule of ``gm``'s placeholders → the named side values (parameter-free)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    need: set[torch.fx.Node] = set()
    stack = [nodes[v] for v in names]
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        stack.extend(n.all_input_nodes)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = graph.placeholder(n.name)
            env[n].meta = dict(n.meta)
        elif n in need:
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[nodes[v]] for v in names))
    return torch.fx.GraphModule(gm, graph, class_name="SideValues")


# --------------------------------------------------------------------------- helpers


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """‖s − t‖² / ‖t‖² (mean squares), in float32."""
    s, t = student.float(), teacher.float()
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)


def _to(v: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, v)


def _param_groups(module: torch.nn.Module, opts: DistillOptions) -> list[dict[str, Any]]:
    """Optimizer groups for a block's parameters: surrogate parameters, weights, quantizer steps.

    Learning rates are *relative*: Adam moves a parameter by about ``lr`` per step whatever its
    scale, and the scales here span orders of magnitude (a PWL knot of 1e-3, a coefficient of
    1e3, a weight of 0.05, a quantization step of 1e-4), so each tensor gets its own group with
    ``lr × RMS(tensor)`` — it moves by about ``lr`` of its size per step. Two refinements
    (``per_element``, the default) come from measuring why training raised the loss (issue 14):

    * surrogate parameters move by ``lr`` of *each element's* size (:class:`ScaledAdam`, floor
      ``ELEMENT_FLOOR`` of the RMS): a PWL's slope changes span 1e-7…1e-1 within one tensor,
      and a per-tensor rate moved the tiny ones at far knots by 300× their size in one step
      (a LayerNorm-emulation block went from nMSE 0.008 to 0.12);
    * a quantized weight moves in units of its own quantization step (per channel),
      ``lr_weight_step`` per step: what matters to a quantized weight is where it sits between
      grid points, and the step is 20× larger relative to the weight at 4 bits than at 8
      (at 8 bits 0.02 of a step is about 5e-4 of the weight's RMS, the rate that stopped
      raising MiniLM's last layer; one RMS rate for all widths left a W2A4 ViT 1.4 points
      short, and 0.05–0.1 of a step per step diverged on W4 MiniLM layers).

    Float weights (biases, affine parameters, exact surrogates' tables) use ``lr_weight`` of
    their RMS — Adam's first steps are sign-like, so every weight of a near-optimal layer moves
    the same way and the output by about √fan_in × lr (2e-3 raised MiniLM's last layer, 5e-4
    does not); zero points (integer units) ``lr_quant`` as is. A rate of 0 freezes the group.
    """
    groups: list[dict[str, Any]] = []
    # parameters (or submodules) a module declares untrainable by distillation: see
    # PWL.distill_frozen and the softmax surrogates' normalizer
    seen = frozen_parameters(module)

    def add(p: torch.nn.Parameter, kind: str, base: float, relative: bool = True,
            elementwise: bool = False) -> None:
        if id(p) in seen or not p.requires_grad:
            return
        seen.add(id(p))
        if base <= 0:
            return
        scale = float(p.detach().float().pow(2).mean().sqrt()) if relative else 1.0
        if not math.isfinite(scale) or scale < 1e-6:
            scale = 1e-3
        group = {"params": [p], "lr": base * scale, "name": kind}
        if elementwise and opts.per_element and p.numel() > 1:
            # each element moves by about lr of its own size (a floor of 1% of the tensor's
            # RMS lets zeros move): see the docstring
            group["scale"] = [(p.detach().abs() / scale).clamp_min(ELEMENT_FLOOR)]
        groups.append(group)

    for m in module.modules():
        if isinstance(m, FakeQuant):
            add(m.step, "quant", opts.lr_quant)
            if m.zero_point is not None:
                add(m.zero_point, "quant", opts.lr_quant, relative=False)
    for m in module.modules():
        if isinstance(m, Surrogate) or getattr(m, "archnet_surrogate", False):
            exact = getattr(m, "style", "") == "exact"
            for p in m.parameters():
                if exact:
                    add(p, "weight", opts.lr_weight)
                else:
                    add(p, "surrogate", opts.lr_surrogate, elementwise=True)
    for m in module.modules():
        fq = getattr(m, "weight_fq", None)
        w = getattr(m, "weight", None)
        if opts.per_element and isinstance(fq, FakeQuant) and isinstance(
                w, torch.nn.Parameter) and fq.enabled and bool(fq.initialized) \
                and not bool(fq.lossless) and id(w) not in seen and w.requires_grad:
            # a quantized weight moves in units of its own quantization step (per channel)
            seen.add(id(w))
            if opts.lr_weight_step > 0:
                groups.append({"params": [w], "lr": opts.lr_weight_step, "name": "weight",
                               "scale": [fq._shape(fq.effective_step(), w).expand_as(w).clone()]})
    for p in module.parameters():
        add(p, "weight", opts.lr_weight)
    return groups


def schedule(total: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor at step ``i`` of ``total``: a linear warm-up over the first
    ``warmup`` fraction (Adam's first steps are sign-like: at full rate they move every
    near-optimal weight coherently), then a cosine decay to 0."""
    w = int(math.ceil(warmup * total))

    def factor(i: int) -> float:
        if i < w:
            return (i + 1) / (w + 1)
        return 0.5 * (1 + math.cos(math.pi * min(i - w, total - w) / max(1, total - w)))
    return factor


class ScaledAdam(torch.optim.Adam):
    """Adam whose update of a parameter is multiplied elementwise by a fixed tensor (the
    group's ``scale``: one tensor or None per parameter), i.e. Adam with a learning rate per
    element. Groups without ``scale`` are plain Adam."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        scaled = [(p, p.detach().clone(), s) for g in self.param_groups
                  for p, s in zip(g["params"], g.get("scale") or [None] * len(g["params"]))
                  if s is not None and p.grad is not None]
        out = super().step(closure)
        for p, old, s in scaled:
            p.copy_(old.add_((p - old).mul_(s.to(p.device))))
        return out


def _rng_state() -> dict[str, Any]:
    import numpy as np

    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def check_device(dev: torch.device) -> None:
    """:class:`DeviceError` unless this machine has ``dev`` (tried with a one-element tensor)."""
    try:
        torch.empty(1, device=dev)
    except (RuntimeError, AssertionError, ValueError) as e:
        have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        raise DeviceError(f"device {str(dev)!r} is not available on this machine "
                          f"({str(e).splitlines()[0][:160]}); devices here: {', '.join(have)}. "
                          f"Pass device='cpu' or leave device unset") from None


def _check_dir(path: Path, option: str, error: type = CheckpointError) -> None:
    """A directory option must name a directory, or a path one can be created at, writable."""
    if path.exists() and not path.is_dir():
        raise error(f"{option}={str(path)!r} is a file, not a directory; pass a "
                    f"directory (it is created if missing)")
    blocked = blocked_directory(path)
    if blocked and blocked[1] == "file":
        raise error(f"{option}={str(path)!r}: {str(blocked[0])!r} is a file, so the "
                    f"directory cannot be created")
    if blocked:
        raise error(f"{option}={str(path)!r}: {str(blocked[0])!r} is not writable; pass a "
                    f"directory you can write to")


def _fingerprint(blocks: Sequence[Block], batches: Sequence[tuple[tuple, dict]],
                 opts: DistillOptions, student: torch.nn.Module) -> str:
    def shapes(v: Any) -> Any:
        return [tuple(t.shape) if isinstance(t, torch.Tensor) else repr(t)
                for t in pytree.tree_leaves(v)]
    data = {
        "format": _FORMAT,
        "blocks": [(b.name, b.nodes, b.inputs, b.outputs) for b in blocks],
        "batches": [shapes(b) for b in batches],
        "options": {k: str(v) for k, v in opts.fingerprint_fields().items()},
        "params": sorted((k, tuple(v.shape)) for k, v in student.state_dict().items()),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _g(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}"


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------- distill


class _Run:
    """State of one :func:`distill` call."""

    def __init__(self, student: torch.fx.GraphModule, teacher: torch.fx.GraphModule,
                 blocks: Sequence[Block], batches: Sequence[tuple[tuple, dict]],
                 opts: DistillOptions, value_map: Mapping[str, str],
                 holdout: Sequence[tuple[tuple, dict]] = ()) -> None:
        self.student, self.teacher, self.blocks, self.opts = student, teacher, list(blocks), opts
        # batches [0, n_train) train; the held-out ones after them only measure
        self.batches = list(batches) + list(holdout)
        self.n_train = len(batches)
        self.nb = len(self.batches)
        self.eval_ids = list(range(self.n_train, self.nb)) or list(
            range(min(EVAL_BATCHES, self.n_train)))
        self.map = dict(value_map)
        self.device = torch.device(opts.device) if opts.device is not None else next(
            (p.device for p in student.parameters()), torch.device("cpu"))
        self.t_device = next((p.device for p in teacher.parameters()), self.device)
        self.store = ActivationStore(opts.memory_budget_mb * 2 ** 20, opts.spill_dir)
        self.placeholders = [n.name for n in student.graph.nodes if n.op == "placeholder"]
        self.side = side_values(student)
        s_nodes = {n.name: n for n in student.graph.nodes}
        produced = {o: b.index for b in self.blocks for o in b.outputs}
        self.produced = produced
        # values crossing boundaries and where each comes from
        self.crossing: set[str] = set()
        for b in self.blocks:
            for i in b.inputs:
                if i not in self.placeholders:
                    self.crossing.add(i)
        self.side_needed = sorted(v for v in self.crossing if v in self.side)
        for v in sorted(self.crossing - set(self.side_needed)):
            if v not in self.map:
                raise ValueError(
                    f"value {v!r} crosses a block boundary but has no counterpart in the teacher "
                    "and depends on trained parameters: partition with "
                    "boundary_ok=boundary_check(student, value_map) or choose other cut nodes")
        # loss targets per block: teacher-matched float outputs that depend on parameters
        self.targets: list[list[str]] = []
        for b in self.blocks:
            ts = [o for o in b.outputs if o in self.map and o not in self.side
                  and _dtype(s_nodes[o]) is not None and _dtype(s_nodes[o]).is_floating_point]
            self.targets.append(ts)
        self.final_targets = [n.name for n in _out_leaves(student)
                              if isinstance(n, torch.fx.Node) and n.name in self.map
                              and n.name not in self.side]
        # teacher values to record: matched crossing values + all targets
        self.t_names = sorted({v for v in self.crossing if v not in self.side}
                              | {t for ts in self.targets for t in ts} | set(self.final_targets))
        self.bound = [bind_inputs(student, a, k) for a, k in self.batches]
        self.snapshot: dict[int, torch.Tensor] = {}
        self.t_bound = [bind_inputs(teacher, a, k) for a, k in self.batches]

    # data -----------------------------------------------------------------
    def record_teacher(self) -> None:
        wanted = {self.map[v] for v in self.t_names}
        t_phs = [n.name for n in self.teacher.graph.nodes if n.op == "placeholder"]
        side_gm = _side_graph(self.student, self.side_needed) if self.side_needed else None
        bar = _bar(self.nb, "teacher boundaries", self.opts.progress)
        with torch.no_grad():
            for b in range(self.nb):
                rec = _Recorder(self.teacher, wanted)
                rec.run(*[_to(self.t_bound[b][p], self.t_device) for p in t_phs],
                        enable_io_processing=False)
                for v in self.t_names:
                    self.store.put(("t", v, b), rec.kept[self.map[v]])
                del rec
                if side_gm is not None:
                    vals = side_gm(*[_to(self.bound[b][p], self.device)
                                     for p in self.placeholders])
                    for v, val in zip(self.side_needed, vals):
                        self.store.put(("s", v, b), val)
                bar.update(1)
        bar.close()

    def inputs(self, k: int, b: int, stream: str) -> list[Any]:
        vals = []
        for name in self.blocks[k].inputs:
            if name in self.bound[b] and name in self.placeholders:
                v = self.bound[b][name]
            elif name in self.side:
                v = self.store.get(("s", name, b))
            elif stream == "student":
                v = self.store.get(("p", name, b))
            else:
                v = self.store.get(("t", name, b))
            vals.append(_to(v, self.device))
        return vals

    def later_needs(self, k: int) -> set[str]:
        """Crossing values that blocks after ``k`` read."""
        return {i for b in self.blocks[k + 1:] for i in b.inputs if i not in self.placeholders}

    def block_loss(self, k: int, outs: Sequence[Any], b: int) -> torch.Tensor:
        by_name = dict(zip(self.blocks[k].outputs, outs))
        losses = [normalized_mse(by_name[t], _to(self.store.get(("t", t, b)), self.device))
                  for t in self.targets[k]]
        return torch.stack(losses).mean()

    def forward_all(self, k: int, stream: str, *, keep: bool) -> dict[int, float]:
        """Run block ``k`` on the batches (no grad): batch → loss; store what others need.

        Every batch when its outputs feed the next blocks (``keep``), else (independent mode)
        only the evaluation batches.
        """
        blk = self.blocks[k]
        need = self.later_needs(k) - self.side
        losses: dict[int, float] = {}
        with torch.no_grad():
            for b in (range(self.nb) if keep else self.eval_ids):
                outs = blk.module(*self.inputs(k, b, stream))
                if self.targets[k]:
                    losses[b] = float(self.block_loss(k, outs, b))
                if keep:
                    for name, v in zip(blk.outputs, outs):
                        if name in need:
                            self.store.put(("p", name, b), v)
        return losses

    # training -------------------------------------------------------------
    def train_block(self, k: int, stream: str) -> tuple[BlockStats, dict | None]:
        t0 = time.perf_counter()
        blk = self.blocks[k]
        mod = blk.module
        n_params = sum(p.numel() for p in mod.parameters())
        # calibrate this block's quantizers on the first batch
        with torch.no_grad(), calibrating(mod):
            mod(*self.inputs(k, 0, stream))
        groups = _param_groups(mod, self.opts)
        if not self.targets[k] or not groups:
            note = "no teacher-matched output" if not self.targets[k] else "no parameters"
            return BlockStats(k, blk.name, len(blk.nodes), n_params, 0, None, None,
                              time.perf_counter() - t0, note), None
        with torch.no_grad():
            loss_before = sum(float(self.block_loss(k, mod(*self.inputs(k, b, stream)), b))
                              for b in self.eval_ids) / len(self.eval_ids)
        total = self.opts.steps if self.opts.steps is not None else \
            self.opts.epochs * self.n_train
        if self.opts.far_loss is not None and loss_before > self.opts.far_loss:
            # far from the teacher (a coarse structural surrogate): the weights must move
            # further than near an almost exact initialisation
            for g in groups:
                if g["name"] == "weight":
                    g["lr"] *= self.opts.far_boost
        trained = {id(p) for g in groups for p in g["params"]}
        frozen = [p for p in mod.parameters() if p.requires_grad and id(p) not in trained]
        for p in frozen:
            p.requires_grad_(False)
        self.snapshot = {id(p): p.detach().clone() for p in mod.parameters() if id(p) in trained}
        opt = ScaledAdam(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(total, self.opts.warmup))
        self.optimize(opt, groups, total, lambda b: self.block_loss(
            k, mod(*self.inputs(k, b, stream)), b), seed=self.opts.seed * 1_000_003 + k,
            desc=f"block {k + 1}/{len(self.blocks)} {blk.name}", sched=sched)
        opt.zero_grad(set_to_none=True)
        for p in frozen:
            p.requires_grad_(True)
        stats = BlockStats(k, blk.name, len(blk.nodes), n_params, total, loss_before, None,
                           time.perf_counter() - t0)
        return stats, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}

    def optimize(self, opt: torch.optim.Optimizer, groups: list[dict[str, Any]], steps: int,
                 loss_of: Callable[[int], torch.Tensor], *, seed: int, desc: str,
                 sched: Any = None) -> None:
        """``steps`` optimizer steps on ``loss_of(batch)``, batches in seeded random epochs
        (a fresh permutation whenever one is used up), gradient clipping, a progress bar."""
        gen = torch.Generator().manual_seed(seed)
        params = [p for g in groups for p in g["params"]]
        order: list[int] = []
        bar = _bar(steps, desc, self.opts.progress)
        for _ in range(steps):
            if not order:
                order = torch.randperm(self.n_train, generator=gen).tolist()
            b = order.pop(0)
            with torch.enable_grad():
                loss = loss_of(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            if self.opts.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, self.opts.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.detach().item():.4g}")
        bar.close()

    def restore(self, k: int) -> None:
        with torch.no_grad():
            for p in self.blocks[k].module.parameters():
                if id(p) in self.snapshot:
                    p.copy_(self.snapshot[id(p)])
        self.snapshot = {}

    def chain(self, b: int) -> dict[str, Any]:
        """Run every block on batch ``b`` (the student's own stream); value env."""
        env = {p: _to(self.bound[b][p], self.device) for p in self.placeholders}
        for v in self.side_needed:
            env[v] = _to(self.store.get(("s", v, b)), self.device)
        for blk in self.blocks:
            outs = blk.module(*[env[i] for i in blk.inputs])
            env.update(zip(blk.outputs, outs))
        return env

    def final_loss(self, env: Mapping[str, Any], b: int) -> torch.Tensor:
        return torch.stack([normalized_mse(env[t], _to(self.store.get(("t", t, b)), self.device))
                            for t in self.final_targets]).mean()

    def e2e(self, report: DistillReport) -> dict | None:
        steps = self.opts.e2e_steps
        if not steps or not self.final_targets:
            return None
        groups = _param_groups(self.student, self.opts)
        for g in groups:
            g["lr"] *= self.opts.e2e_lr_scale
        with torch.no_grad():
            report.e2e_loss_before = sum(float(self.final_loss(self.chain(b), b))
                                         for b in self.eval_ids) / len(self.eval_ids)
        opt = ScaledAdam(groups)
        self.optimize(opt, groups, steps, lambda b: self.final_loss(self.chain(b), b),
                      seed=self.opts.seed * 1_000_003 + 999_983, desc="end-to-end")
        with torch.no_grad():
            report.e2e_loss_after = sum(float(self.final_loss(self.chain(b), b))
                                        for b in self.eval_ids) / len(self.eval_ids)
        report.e2e_steps = steps
        return {"optimizer": opt.state_dict()}


def distill(student: torch.fx.GraphModule, teacher: torch.fx.GraphModule,
            blocks: Sequence[Block], batches: Sequence[tuple[tuple, dict]],
            options: DistillOptions | None = None, *,
            records: Sequence[PassRecord] = (),
            value_map: Mapping[str, str] | None = None,
            holdout: Sequence[tuple[tuple, dict]] = ()) -> DistillReport:
    """Train ``student`` (in place) block by block to match ``teacher`` on ``batches``.

    ``holdout`` batches are never trained on: each block's loss before and after training is
    measured on them, and they judge the safety net (a block whose held-out loss training
    raised gets its calibrated parameters back). Without them the first training batches
    measure.

    ``blocks`` come from :func:`~archnet_fx.train.partition.partition` of ``student`` (ideally with
    ``boundary_ok=boundary_check(student, value_map)``); ``batches`` are ``(args, kwargs)``
    pairs as :func:`~archnet_fx.train.partition.bind_inputs` takes them; ``records`` are the passes
    from teacher to student (for :func:`match_values`) unless ``value_map`` is given.
    ``teacher`` is only read.
    """
    opts = options if options is not None else DistillOptions()
    if not isinstance(opts, DistillOptions):
        raise OptionError(f"options must be a DistillOptions, got {type(opts).__name__}")
    if not blocks:
        raise OptionError("no blocks to distill: partition the student first")
    batches = list(batches)
    if not batches:
        raise CalibrationError("no calibration batches to distill on")
    t_start = time.perf_counter()
    vmap = dict(value_map) if value_map is not None else match_values(teacher, student, records)
    holdout = list(holdout)
    run = _Run(student, teacher, blocks, batches, opts, vmap, holdout)
    if opts.device is not None:
        student.to(run.device)
    student.eval()
    report = DistillReport(opts.mode)
    ckpt_path = Path(opts.checkpoint_dir) / CHECKPOINT_NAME if opts.checkpoint_dir else None
    fp = _fingerprint(blocks, batches + holdout, opts, student)
    start, e2e_done, ckpt = 0, False, None
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("fingerprint") != fp:
            raise CheckpointError(
                f"checkpoint {ckpt_path} was made with a different student, blocks, batches or "
                "options; delete it or pass another checkpoint_dir")
        student.load_state_dict(ckpt["state"])
        start = int(ckpt["completed"])
        e2e_done = bool(ckpt.get("e2e_done", False))
        report.blocks = [BlockStats(**s) for s in ckpt["stats"]]
        report.e2e_steps = ckpt.get("e2e_steps", 0)
        report.e2e_loss_before = ckpt.get("e2e_loss_before")
        report.e2e_loss_after = ckpt.get("e2e_loss_after")
        _set_rng_state(ckpt["rng"])
        report.resumed_from = start
        log.info("resuming distillation from %s: %d of %d blocks done", ckpt_path, start,
                 len(blocks))

    def save(completed: int, extra: dict | None, e2e: bool) -> None:
        if ckpt_path is None:
            return
        _atomic_save({
            "format": _FORMAT, "fingerprint": fp, "completed": completed, "e2e_done": e2e,
            "state": student.state_dict(), "stats": [asdict(s) for s in report.blocks],
            "optimizer": (extra or {}).get("optimizer"),
            "scheduler": (extra or {}).get("scheduler"), "rng": _rng_state(),
            "e2e_steps": report.e2e_steps, "e2e_loss_before": report.e2e_loss_before,
            "e2e_loss_after": report.e2e_loss_after}, ckpt_path)

    stream = "student" if opts.mode == "progressive" else "teacher"
    try:
        done_now = 0
        todo = start < len(blocks) or (opts.e2e_steps and not e2e_done)
        if todo:
            run.record_teacher()
        if start > 0 and start < len(blocks) and stream == "student":
            # rebuild the student's stream from the restored upstream blocks
            for k in range(start):
                run.forward_all(k, "student", keep=True)
        for k in range(start, len(blocks)):
            if opts.stop_after is not None and done_now >= opts.stop_after:
                report.complete = False
                break
            t0 = time.perf_counter()
            run.snapshot = {}
            stats, extra = run.train_block(k, stream)
            losses = run.forward_all(k, stream, keep=stream == "student")

            def held(ls: dict[int, float]) -> float:
                return sum(ls[b] for b in run.eval_ids) / len(run.eval_ids)
            if losses and stats.loss_before is not None and run.snapshot and \
                    held(losses) > stats.loss_before:
                # the safety net: training did not help on the evaluation batches, so the
                # calibrated parameters are kept
                run.restore(k)
                losses = run.forward_all(k, stream, keep=stream == "student")
                stats.note = (
                    f"starts within {NEAR_EXACT:g} nMSE of the teacher: nothing to gain, "
                    "calibrated parameters kept" if stats.loss_before <= NEAR_EXACT else
                    "training raised the held-out loss: calibrated parameters kept")
            elif stats.loss_before is not None and stats.loss_before <= NEAR_EXACT:
                stats.note = f"starts within {NEAR_EXACT:g} nMSE of the teacher"
            if losses:
                stats.loss_after = held(losses)
                train_ids = [b for b in losses if b < run.n_train]
                if len(train_ids) == run.n_train:
                    stats.loss_after_all = sum(losses[b] for b in train_ids) / len(train_ids)
            stats.seconds = time.perf_counter() - t0
            report.blocks.append(stats)
            PROGRESS.info("block %d/%d %s: %d steps, loss %s → %s%s (%.1f s)", k + 1,
                          len(blocks), blocks[k].name, stats.steps, _g(stats.loss_before),
                          _g(stats.loss_after), f"; {stats.note}" if stats.note else "",
                          stats.seconds)
            # free what no later block reads
            later = run.later_needs(k)
            run.store.drop_where(lambda key: key[0] in ("p", "t") and key[1] not in later
                                 and key[1] not in run.final_targets
                                 and run.produced.get(key[1], -1) <= k)
            save(k + 1, extra, False)
            done_now += 1
        if report.complete and opts.e2e_steps and not e2e_done:
            extra = run.e2e(report)
            save(len(blocks), extra, True)
    finally:
        report.peak_store_mb = run.store.peak / 2 ** 20
        report.spilled_mb = run.store.spilled / 2 ** 20
        run.store.close()
    report.seconds = time.perf_counter() - t_start
    log.info("distillation (%s): %d blocks in %.1f s\n%s", opts.mode, len(report.blocks),
             report.seconds, report.table())
    return report

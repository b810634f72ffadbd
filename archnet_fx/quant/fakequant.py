"""Fake quantization with learned step sizes (LSQ), and the pass that inserts it.

:class:`FakeQuant` simulates a ``bits``-bit integer tensor in float (Esser et al., *Learned Step
Size Quantization*, 2020; the zero point as in LSQ+, Bhalgat et al., 2020)::

    q  = clamp(round(x / s) + z, qmin, qmax)        # the integer the chip stores
    x̂  = (q − z) · s                                # what the next op sees

* ``round`` passes gradients straight through (STE); ``clamp`` zeroes them outside the range,
  so ``∂x̂/∂x`` is 1 inside the range and 0 outside.
* The step ``s`` is a parameter. LSQ's gradient ``∂x̂/∂s = round(x/s) − x/s`` inside the range and
  ``qmin − z`` / ``qmax − z`` outside comes from autograd through the STE; it is scaled by
  ``g = 1/sqrt(N · qmax)`` (N = elements per step) so steps learn at the pace of weights.
* Symmetric quantizers have ``z = 0``; a signed one uses ``[−2^(b−1), 2^(b−1)−1]``, an unsigned
  one (all observed values ≥ 0, e.g. after ReLU) ``[0, 2^b − 1]``. Asymmetric quantizers learn a
  float zero point, rounded with the STE, in ``[0, 2^b − 1]``.
* Power-of-two targets (re-quantization is a shift) use ``s = 2^round(log2 s)``, again with the
  STE on ``log2 s``, so ``s`` stays learnable.
* Per-channel quantizers keep one step per slice along ``axis`` (output channels of a conv or
  linear weight); per-tensor ones keep one.

A quantizer is a pass-through until it is *initialised*: in calibration mode
(:func:`calibrating`) it records what it sees — weights initialise from the weight, activations
from the first batch(es) — and on leaving the mode picks the step (and zero point): for weights
the one minimising the quantization MSE over a grid of clipping ratios of the range, for
activations the observed range itself (clipping the rare outlier channels of a transformer's
hidden state costs far more downstream than the coarser step). This keeps the inserting
pass exact (shape propagation on the example does not initialise anything) and makes the
initialisation an explicit, reproducible step of distillation. An activation quantizer that saw
only integers fitting its range (a one-hot, a 0/1 mask) is *lossless*: step 1, an identity that
costs nothing in training.

:func:`insert_fake_quant` is a :class:`~archnet_fx.infra.graphpass.GraphPass` ("fake_quant"):

* conv/linear submodules (``nn.Linear``, ``nn.Conv*``, also inside surrogate modules, see
  :data:`SURROGATE_MODES`) become :class:`QuantLinear` / :class:`QuantConv*` — subclasses of the
  float layer, so op kinds and legality are unchanged — that fake-quantize their weight and
  their input activation;
* functional / ATen ``linear``/``conv`` nodes get a :class:`FakeQuant` ``call_module`` on the
  weight ``get_attr`` (per channel where the target says so) and on the activation input;
* ``matmul`` nodes get activation quantizers on each activation operand (a constant operand is
  quantized per tensor as a weight);
* one activation quantizer per producer, shared by all its quantized consumers (the chip stores
  the tensor once), inserted right before the first of them — so a block boundary that cuts
  between producer and consumer carries the float value, which the teacher also has.

>>> import torch
>>> fq = FakeQuant(4, symmetric=True)
>>> with calibrating(fq):
...     _ = fq(torch.linspace(-1, 1, 101))
>>> y = fq(torch.linspace(-1, 1, 101))
>>> len(torch.unique(y)) <= 16
True
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import Counter
from typing import Any, Iterator, Mapping

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from archnet_fx.errors import BitWidthError, OptionError
from archnet_fx.ir.dataflow import activations, is_float
from archnet_fx.ir.meta import KIND_META_KEY
from archnet_fx.ir.opkinds import node_kind, target_name
from archnet_fx.ir.meta import FROM_PASS_KEY
from archnet_fx.infra.graphpass import GraphPass, fresh_attr_name, stamp_node
from archnet_fx.infra.records import PassRecord, PassResult
from archnet_fx.targets import Target, load_target

log = logging.getLogger(__name__)

__all__ = ["FakeQuant", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantConv3d",
           "FakeQuantPass", "insert_fake_quant", "quantizers", "enable_fake_quant",
           "disable_fake_quant", "fake_quant_enabled", "calibrating"]

#: Clipping ratios of the observed range tried when initialising a step (MSE-optimal pick).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3)
_MAX_SAMPLES = 1 << 18  # values kept per activation quantizer for initialisation


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return (torch.round(x) - x).detach() + x


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward, gradient times g backward."""
    y = x * g
    return (x - y).detach() + y


class _LSQ(torch.autograd.Function):
    """``y = round(clamp(x/s, qmin − z, qmax − z))·s`` (``= (q − z)·s`` with ``q`` the integer
    of ONNX ``QuantizeLinear``, computed in its order) with LSQ's straight-through gradients.

    One fused node instead of a dozen autograd ones (fake quantization of every activation is
    most of a distillation step's elementwise work). ``s`` and ``z`` come broadcastable to ``x``
    (``z`` may be None: symmetric; it holds integers); with ``inside = qmin − z ≤ x/s ≤ qmax −
    z``: ``∂y/∂x = inside``, ``∂y/∂s = (q − z) − inside·x/s``, ``∂y/∂z = −s·(1 − inside)`` —
    what autograd gives for the composition with round as identity (tested).
    """

    @staticmethod
    def _bounds(z, qmin: int, qmax: int):
        return (qmin, qmax) if z is None else (qmin - z, qmax - z)

    @staticmethod
    def forward(ctx, x, s, z, qmin: int, qmax: int):  # noqa: D401
        lo, hi = _LSQ._bounds(z, qmin, qmax)
        q = torch.round(torch.clamp(x / s, lo, hi))
        ctx.save_for_backward(x, s, z)
        ctx.qrange = (qmin, qmax)
        return q.mul_(s)

    @staticmethod
    def backward(ctx, g):
        x, s, z = ctx.saved_tensors
        lo, hi = _LSQ._bounds(z, *ctx.qrange)
        v = x / s
        inside = (v >= lo) & (v <= hi)
        gx = g * inside if ctx.needs_input_grad[0] else None
        gs = gz = None
        if ctx.needs_input_grad[1]:
            q = torch.round(torch.clamp(v, lo, hi))
            ds = q - torch.where(inside, v, torch.zeros_like(x))
            gs = (g * ds).sum_to_size(s.shape)
        if z is not None and ctx.needs_input_grad[2]:
            gz = (g * (~inside)).mul_(-s).sum_to_size(z.shape)
        return gx, gs, gz, None, None


class FakeQuant(nn.Module):
    """LSQ fake quantizer of a weight or an activation (see the module docstring)."""

    #: On chip a quantize step is the requantization folded into the producing op; legality and
    #: cost treat the node as an identity (every built-in target runs ``identity``).
    archnet_kind = "identity"
    archnet_leaf = True  # traced as one op inside surrogate bodies

    def __init__(self, bits: int, *, symmetric: bool = True, axis: int | None = None,
                 channels: int = 1, pow2: bool = False, role: str = "act") -> None:
        super().__init__()
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 < bits <= 16:
            raise ValueError(f"FakeQuant bits must be an integer in 2..16, got {bits!r}")
        if role not in ("act", "weight"):
            raise ValueError(f"FakeQuant role must be 'act' or 'weight', got {role!r}")
        if axis is None and channels != 1:
            raise ValueError("a per-tensor FakeQuant has channels=1")
        self.bits, self.symmetric, self.axis, self.pow2, self.role = (bits, symmetric, axis,
                                                                      pow2, role)
        self.step = nn.Parameter(torch.ones(channels))
        self.zero_point = None if symmetric else nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(bool(symmetric)))
        # Activations that were integers fitting the range in calibration (a one-hot, a mask)
        # are represented exactly with step 1: the quantizer is then an identity.
        self.register_buffer("lossless", torch.tensor(False))
        self.enabled = True
        self.calibrating = False
        self._seen: list[torch.Tensor] = []
        self._integral = True
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None

    # ---------------------------------------------------------------- integer range
    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if bool(self.signed) else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if bool(self.signed) else (1 << self.bits) - 1

    def extra_repr(self) -> str:
        gran = "per_tensor" if self.axis is None else f"per_channel(axis={self.axis}, " \
            f"n={self.step.numel()})"
        return (f"{self.role}, bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}"
                f", {gran}{', pow2' if self.pow2 else ''}"
                f"{'' if bool(self.initialized) else ', uninitialized'}"
                f"{', lossless (integer values)' if bool(self.lossless) else ''}")

    # ---------------------------------------------------------------- forward
    def _shape(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            return t.reshape(())
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return t.reshape(shape)

    def effective_step(self) -> torch.Tensor:
        """The step actually used (positive; a power of two on pow2 targets), detached."""
        s = self.step.detach().abs().clamp_min(1e-12)
        if self.pow2:
            s = torch.pow(2.0, torch.round(torch.log2(s)))
        return s

    def integer_zero_point(self) -> torch.Tensor:
        if self.zero_point is None:
            return torch.zeros_like(self.step)
        return torch.round(self.zero_point.detach()).clamp(self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not torch.is_floating_point(x):
            return x
        if self.calibrating:
            self._observe(x)
            return x
        if not bool(self.initialized) or bool(self.lossless):
            return x
        qmin, qmax = self.qmin, self.qmax
        n = max(1, x.numel() // max(1, self.step.numel()))
        g = 1.0 / math.sqrt(n * max(qmax, 1))
        s = _grad_scale(self.step, g).abs().clamp_min(1e-12)
        if self.pow2:
            s = torch.pow(2.0, _round_ste(torch.log2(s)))
        s = self._shape(s, x).to(x.dtype)
        z = None
        if self.zero_point is not None:
            z = _round_ste(_grad_scale(self.zero_point, g)).clamp(qmin, qmax)
            z = self._shape(z, x).to(x.dtype)
        return _LSQ.apply(x, s, z, qmin, qmax)

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """The integers ``q`` of ``x`` (int32), for tests and export."""
        with torch.no_grad():
            s = self._shape(self.effective_step(), x)
            z = self._shape(self.integer_zero_point(), x)
            v = torch.clamp(x / s, self.qmin - z, self.qmax - z)
            return (torch.round(v) + z).to(torch.int32)

    # ---------------------------------------------------------------- initialisation
    def _observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.axis is not None:
            xc = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1).float()
            lo, hi = xc.min(1).values, xc.max(1).values
            self._seen = [xc]  # weights: the tensor itself
        else:
            flat = x.reshape(-1).float()
            lo, hi = flat.min().reshape(1), flat.max().reshape(1)
            if self._integral:
                self._integral = bool(torch.equal(flat, torch.round(flat)))
            if flat.numel() > _MAX_SAMPLES // 4:
                stride = math.ceil(flat.numel() / (_MAX_SAMPLES // 4))
                flat = flat[::stride]
            self._seen.append(flat)
            total = sum(t.numel() for t in self._seen)
            while total > _MAX_SAMPLES and len(self._seen) > 1:
                total -= self._seen.pop(0).numel()
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)

    def finish_calibration(self) -> bool:
        """Pick the step (and zero point) from what was observed; False if nothing was."""
        self.calibrating = False
        if self._lo is None:
            return False
        if self.axis is not None:
            data = self._seen[0]
        else:
            data = torch.cat(self._seen).reshape(1, -1)
        self.init_from(data, self._lo, self._hi)
        lo, hi = float(self._lo.min()), float(self._hi.max())
        if self.role == "act" and self._integral and self.step.numel() == 1:
            fits = (lo >= 0 and hi <= (1 << self.bits) - 1 if not self.symmetric
                    else lo >= -(1 << (self.bits - 1)) and hi <= (1 << (self.bits - 1)) - 1)
            if fits:
                with torch.no_grad():
                    self.step.fill_(1.0)
                    if self.zero_point is not None:
                        self.zero_point.fill_(0.0)
                    self.signed.fill_(lo < 0)
                self.lossless.fill_(True)
        self._seen, self._lo, self._hi, self._integral = [], None, None, True
        return True

    @torch.no_grad()
    def init_from(self, data: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Initialise from ``data`` (rows = channels, or one row) and its per-row range."""
        data = data.to(self.step.device, torch.float32)
        lo = lo.to(data).reshape(-1)
        hi = hi.to(data).reshape(-1)
        if self.symmetric:
            self.signed.fill_(bool((lo < 0).any()))
        else:
            self.signed.fill_(False)
        qmin, qmax = self.qmin, self.qmax
        best_err = torch.full((data.shape[0],), float("inf"), device=data.device)
        best_s = torch.ones(data.shape[0], device=data.device)
        best_z = torch.zeros(data.shape[0], device=data.device)
        # Weights: the clipping ratio with the least quantization MSE (outliers of a weight row
        # matter little). Activations: the observed range, unclipped — a tensor-wide MSE pick
        # clips the few outlier channels transformers rely on (all-MiniLM-L6-v2 W8A8, mean
        # cosine of embeddings: 0.85 clipped, 0.99 unclipped).
        ratios = CLIP_RATIOS if self.role == "weight" else (1.0,)
        for r in ratios:
            if self.symmetric:
                amax = torch.maximum(lo.abs(), hi.abs()) * r
                denom = qmax if bool(self.signed) else qmax
                s = (amax / denom).clamp_min(1e-8)
                z = torch.zeros_like(s)
            else:
                lo_r = torch.minimum(lo, torch.zeros_like(lo)) * r
                hi_r = torch.maximum(hi, torch.zeros_like(hi)) * r
                s = ((hi_r - lo_r) / (qmax - qmin)).clamp_min(1e-8)
                z = torch.round(qmin - lo_r / s).clamp(qmin, qmax)
            if self.pow2:
                s = torch.pow(2.0, torch.round(torch.log2(s)))
            sc, zc = s[:, None], z[:, None]
            deq = (torch.clamp(torch.round(data / sc) + zc, qmin, qmax) - zc) * sc
            err = (deq - data).pow(2).mean(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
        self.step.copy_(best_s.reshape(self.step.shape))
        if self.zero_point is not None:
            self.zero_point.copy_(best_z.reshape(self.zero_point.shape))
        self.initialized.fill_(True)


# --------------------------------------------------------------------------- quantized layers


class QuantLayer:
    """Mixin: a float layer that fake-quantizes its input (``act_fq``) and weight (``weight_fq``)."""

    @classmethod
    def wrap(cls, layer: nn.Module, weight_fq: FakeQuant, act_fq: FakeQuant | None):
        """A new layer of this class sharing ``layer``'s parameters (``layer`` is not touched)."""
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        new._parameters = dict(layer._parameters)
        new._buffers = dict(layer._buffers)
        new._modules = dict(layer._modules)
        new._non_persistent_buffers_set = set(layer._non_persistent_buffers_set)
        new._forward_hooks = type(layer._forward_hooks)()
        new._forward_pre_hooks = type(layer._forward_pre_hooks)()
        new.weight_fq = weight_fq
        new.act_fq = act_fq if act_fq is not None else nn.Identity()
        return new


class QuantLinear(QuantLayer, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_fq(x), self.weight_fq(self.weight), self.bias)


class _QuantConv(QuantLayer):
    """The forward of every quantized conv (``_conv_forward`` of the float class it mixes in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_fq(x), self.weight_fq(self.weight), self.bias)


class QuantConv1d(_QuantConv, nn.Conv1d):
    pass


class QuantConv2d(_QuantConv, nn.Conv2d):
    pass


class QuantConv3d(_QuantConv, nn.Conv3d):
    pass


_QUANT_CLASSES: tuple[tuple[type, type], ...] = (
    (nn.Linear, QuantLinear), (nn.Conv1d, QuantConv1d), (nn.Conv2d, QuantConv2d),
    (nn.Conv3d, QuantConv3d))


def _quant_class(m: nn.Module) -> type | None:
    if isinstance(m, QuantLayer):
        return None
    for base, q in _QUANT_CLASSES:
        if type(m) is base or (isinstance(m, base) and not isinstance(m, QuantLayer)):
            return q
    return None


# --------------------------------------------------------------------------- helpers


def quantizers(module: nn.Module) -> list[FakeQuant]:
    """Every :class:`FakeQuant` inside ``module`` (each once)."""
    seen: dict[int, FakeQuant] = {}
    for m in module.modules():
        if isinstance(m, FakeQuant):
            seen.setdefault(id(m), m)
    return list(seen.values())


def enable_fake_quant(module: nn.Module, enabled: bool = True) -> None:
    """Turn every quantizer in ``module`` on (or off: then the model computes in float)."""
    for q in quantizers(module):
        q.enabled = enabled


def disable_fake_quant(module: nn.Module) -> None:
    enable_fake_quant(module, False)


@contextlib.contextmanager
def fake_quant_enabled(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Temporarily switch the quantizers of ``module`` on or off."""
    qs = quantizers(module)
    old = [q.enabled for q in qs]
    for q in qs:
        q.enabled = enabled
    try:
        yield
    finally:
        for q, o in zip(qs, old):
            q.enabled = o


@contextlib.contextmanager
def calibrating(module: nn.Module, *, reinit: bool = False) -> Iterator[list[FakeQuant]]:
    """Calibration mode: uninitialised quantizers (all with ``reinit``) observe and pass through;
    on exit each initialises its step from what it saw (MSE-optimal clipping)."""
    qs = [q for q in quantizers(module) if reinit or not bool(q.initialized)]
    for q in qs:
        q.calibrating, q._seen, q._lo, q._hi, q._integral = True, [], None, None, True
        q.lossless.fill_(False)
    try:
        yield qs
    finally:
        missed = [q for q in qs if not q.finish_calibration()]
        if missed:
            log.debug("%d quantizer(s) saw no data during calibration", len(missed))


# --------------------------------------------------------------------------- the pass


def _shallow_clone(m: nn.Module) -> nn.Module:
    """A new module object sharing ``m``'s parameters, buffers and children."""
    new = copy.copy(m)
    new._parameters = dict(m._parameters)
    new._buffers = dict(m._buffers)
    new._modules = dict(m._modules)
    return new


class FakeQuantPass(GraphPass):
    """Insert LSQ fake quantizers for ``target`` at the given bit widths (see module docstring)."""

    name = "fake_quant"
    exact = True  # quantizers are pass-throughs until calibrated

    def __init__(self, target: Target, weight_bits: int, act_bits: int, *,
                 surrogate_weight_bits: int | None = None,
                 quantize_surrogates: str | bool = "structural",
                 layer_bits: Mapping[str, int] | None = None) -> None:
        self.target = target
        self.weight_bits, self.act_bits = weight_bits, act_bits
        #: per-layer weight bits (top-level node name -> bits; mixed precision, e.g. chosen by
        #: the selection); every other layer takes ``weight_bits``
        self.layer_bits = dict(layer_bits or {})
        self.surrogate_weight_bits = surrogate_weight_bits or weight_bits
        self.quantize_surrogates = surrogate_mode(quantize_surrogates)
        q = target.quant
        self.per_channel = q.weight_granularity == "per_channel"
        self.w_sym, self.a_sym, self.pow2 = q.weight_symmetric, q.act_symmetric, \
            q.power_of_two_scales

    def quantizes(self, surrogate: nn.Module) -> bool:
        """Whether the layers inside ``surrogate`` get quantizers (see ``SURROGATE_MODES``)."""
        mode = self.quantize_surrogates
        if mode == "all":
            return True
        if mode == "none":
            return False
        return getattr(surrogate, "style", "") != "emulation"

    # quantizer factories -------------------------------------------------
    def weight_fq(self, w: torch.Tensor, bits: int | None = None, axis: int = 0,
                  per_channel: bool | None = None) -> FakeQuant:
        pc = self.per_channel if per_channel is None else per_channel
        if pc and w.dim() >= 2:
            return FakeQuant(bits or self.weight_bits, symmetric=self.w_sym, axis=axis,
                             channels=int(w.shape[axis]), pow2=self.pow2, role="weight")
        return FakeQuant(bits or self.weight_bits, symmetric=self.w_sym, pow2=self.pow2,
                         role="weight")

    def act_fq(self) -> FakeQuant:
        return FakeQuant(self.act_bits, symmetric=self.a_sym, pow2=self.pow2, role="act")

    def wrap_layer(self, m: nn.Module, bits: int | None = None) -> nn.Module | None:
        cls = _quant_class(m)
        if cls is None:
            return None
        return cls.wrap(m, self.weight_fq(m.weight, bits), self.act_fq())

    def wrap_tree(self, m: nn.Module, record: PassRecord) -> nn.Module | None:
        """A clone of ``m`` whose conv/linear descendants are quantized (None if it has none).

        A ``Linear(1, 1)`` inside a surrogate body (the single hinge of a ReLU form:
        ``c·relu(w·x − b) + a``) is a scalar multiply-add, not a multiply-accumulate: the chip
        runs it as an elementwise epilogue at accumulator precision, so it gets no weight or
        input quantizer (no int8 round trip of the tensor it scales)."""
        changed = False
        new = _shallow_clone(m)
        for name, child in m._modules.items():
            if child is None:
                continue
            if _scalar_affine(child):
                record.rule_hits["surrogate_scalar_affine_float"] += 1
                continue
            q = self.wrap_layer(child, self.surrogate_weight_bits)
            if q is None:
                q = self.wrap_tree(child, record)
            else:
                record.rule_hits["surrogate_layer"] += 1
            if q is not None:
                new._modules[name] = q
                changed = True
        return new if changed else None

    # graph ---------------------------------------------------------------
    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        self._swapped: list[str] = []
        res = super().__call__(gm)
        # A submodule swap keeps the node's signature; record it as a change.
        extra = [n for n in self._swapped if n not in res.record.changed]
        if extra:
            res.record.changed.extend(extra)
            res.record.modified = True
            res = PassResult(res.module, True, res.record)
        return res

    def apply(self, gm: torch.fx.GraphModule, record: PassRecord) -> None:
        graph = gm.graph
        if not hasattr(self, "_swapped"):
            self._swapped = []
        act = activations(gm)
        act_fq: dict[torch.fx.Node, torch.fx.Node] = {}
        current: list[torch.fx.Node] = []  # the consumer being rewritten

        def fresh(hint: str) -> str:
            return fresh_attr_name(gm, hint)

        def stamp(n: torch.fx.Node, rule: str, like: torch.fx.Node) -> torch.fx.Node:
            return stamp_node(n, self.name, rule, like)

        def quantized_act(src: Any) -> Any:
            if not isinstance(src, torch.fx.Node) or src not in act or not is_float(src):
                return src
            if src.op == "call_module" and isinstance(gm.get_submodule(src.target), FakeQuant):
                return src  # already quantized (idempotence)
            if src in act_fq:
                return act_fq[src]
            # Inserted right before the first quantized consumer (the one being rewritten), so
            # the float value, not its quantized copy, is what crosses a block boundary.
            name = fresh(f"fq_a_{src.name}")
            gm.add_submodule(name, self.act_fq())
            with graph.inserting_before(current[0]):
                n = stamp(graph.call_module(name, (src,)), "act", current[0])
            act_fq[src] = n
            record.rule_hits["act"] += 1
            return n

        def quantized_weight(wn: Any, axis: int = 0, per_channel: bool | None = None,
                             bits: int | None = None) -> Any:
            if not isinstance(wn, torch.fx.Node) or wn.op != "get_attr":
                return wn
            w = gm.get_parameter(wn.target) if _is_param(gm, wn.target) else _attr(gm, wn.target)
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                return wn
            name = fresh(f"fq_w_{wn.target}")
            gm.add_submodule(name, self.weight_fq(w, bits, axis=axis, per_channel=per_channel))
            with graph.inserting_after(wn):
                n = stamp(graph.call_module(name, (wn,)), "weight", wn)
            record.rule_hits["weight_functional"] += 1
            return n

        for node in list(graph.nodes):
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            kind = node_kind(node, gm)
            current[:] = [node]
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                if isinstance(mod, (FakeQuant, QuantLayer)):
                    continue
                if kind in ("linear", "conv"):
                    q = self.wrap_layer(mod, self.layer_bits.get(node.name))
                    if q is not None:
                        _set_submodule(gm, node.target, q)
                        record.rule_hits["weight_module"] += 1
                        self._swapped.append(node.name)
                        continue
                if getattr(mod, "archnet_surrogate", False) and self.quantizes(mod):
                    q = self.wrap_tree(mod, record)
                    if q is not None:
                        _set_submodule(gm, node.target, q)
                        self._swapped.append(node.name)
                continue
            if kind in ("linear", "conv") and target_name(node) == "addmm":
                # addmm(bias, input, weightᵀ): quantize the activation; the weight is a
                # transposed view, quantized where it is stored (not here).
                args = list(node.args)
                if len(args) > 1:
                    args[1] = quantized_act(args[1])
                node.args = tuple(args)
            elif kind in ("linear", "conv"):
                args = list(node.args)
                kwargs = dict(node.kwargs)
                # (input, weight, bias, ...) positionally for F.linear / aten.linear / conv*d.
                if args:
                    args[0] = quantized_act(args[0])
                elif "input" in kwargs:
                    kwargs["input"] = quantized_act(kwargs["input"])
                transposed = "transpose" in str(node.target)
                bits = self.layer_bits.get(node.name)
                if len(args) > 1:
                    args[1] = quantized_weight(args[1], axis=1 if transposed else 0, bits=bits)
                elif "weight" in kwargs:
                    kwargs["weight"] = quantized_weight(kwargs["weight"],
                                                        axis=1 if transposed else 0, bits=bits)
                node.args, node.kwargs = tuple(args), kwargs
            elif kind == "matmul":
                new_args = []
                for a in node.args:
                    if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                        new_args.append(quantized_weight(a, per_channel=False))
                    else:
                        new_args.append(quantized_act(a))
                node.args = tuple(new_args)
        # Kinds of the new nodes (refresh re-annotates, but keep meta consistent meanwhile).
        for n in graph.nodes:
            if n.meta.get(FROM_PASS_KEY) == self.name:
                n.meta[KIND_META_KEY] = node_kind(n, gm)
        q = self.target.quant
        record.notes.append(
            f"{widths_label(self.weight_bits, self.act_bits, self.layer_bits)} on "
            f"{self.target.name}: weights "
            f"{q.weight_granularity}, {'symmetric' if q.weight_symmetric else 'asymmetric'}; "
            f"activations {'symmetric' if q.act_symmetric else 'asymmetric'}"
            f"{'; power-of-two steps' if q.power_of_two_scales else ''}"
            + (f"; surrogate layers W{self.surrogate_weight_bits}"
               if self.surrogate_weight_bits != self.weight_bits else "")
            + {"all": "; surrogate bodies quantized",
               "structural": "; structural/exact surrogate bodies quantized, emulation bodies "
                             "in float",
               "none": "; surrogate bodies in float"}[self.quantize_surrogates]
            + ". Quantizers pass values through until calibrated (archnet_fx.quant.calibrating).")


#: What ``quantize_surrogates`` may say about the conv/linear layers inside surrogate modules:
#: ``"all"``; ``"structural"`` (default): those of structural and exact surrogates (an affine
#: LayerNorm, an embedding as one-hot × table, ReLU forms) but not of *emulation* surrogates,
#: whose piecewise-linear bodies approximate a scalar function (exp, 1/x, 1/√x, GELU) with
#: coefficients spanning orders of magnitude that one int8/int4 scale cannot hold (MiniLM
#: W8A8, untrained: mean cosine 0.99 with emulation bodies in float, 0.94 quantized; W4A8: 0.93
#: vs 0.22) — the chip evaluates them at accumulator precision; ``"none"``. ``True``/``False``
#: mean ``"all"``/``"none"``.
SURROGATE_MODES = ("all", "structural", "none")


def _scalar_affine(m: nn.Module) -> bool:
    """``nn.Linear(1, 1)``: ``y = w·x + b`` elementwise (one product per output, no sum)."""
    return type(m) is nn.Linear and m.in_features == 1 and m.out_features == 1


def surrogate_mode(mode: str | bool) -> str:
    if mode is True:
        return "all"
    if mode is False:
        return "none"
    if mode not in SURROGATE_MODES:
        raise OptionError(f"quantize_surrogates must be one of {SURROGATE_MODES} or a bool, got "
                         f"{mode!r}")
    return mode


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _set_submodule(gm: torch.fx.GraphModule, target: str, mod: nn.Module) -> None:
    """Replace the submodule at ``target`` in ``gm``'s own hierarchy, cloning shared parents.

    ``gm`` is a pass's private copy whose intermediate modules may be shared with the input
    GraphModule (fx copies the hierarchy by reference): every parent on the path is replaced by
    a shallow clone first, so the input never sees the new child.
    """
    parts = target.split(".")
    parent: nn.Module = gm
    for p in parts[:-1]:
        child = parent._modules[p]
        clone = _shallow_clone(child)
        parent._modules[p] = clone
        parent = clone
    parent._modules[parts[-1]] = mod


#: Node kinds whose weight width ``layer_bits`` may set.
LAYER_KINDS = ("linear", "conv")


def widths_label(weight_bits: int, act_bits: int, layer_bits: Mapping[str, int] | None) -> str:
    """``"W8A8"``, or with layers at other widths ``"W8A8 (3 layer(s) W4)"``: the label of a
    network, its report and its latency estimate."""
    mixed = Counter(b for b in (layer_bits or {}).values() if b != weight_bits)
    return (f"W{weight_bits}A{act_bits}"
            + "".join(f" ({n} layer(s) W{b})" for b, n in sorted(mixed.items())))


def checked_layer_bits(gm: torch.fx.GraphModule, tgt: Target, layer_bits: Any, act_bits: int
                       ) -> dict[str, int]:
    """``layer_bits`` (node name -> weight bits) checked against ``gm``'s conv/linear
    nodes and the target's widths: :class:`~archnet_fx.errors.OptionError` for a name that is
    not such a node, :class:`~archnet_fx.errors.BitWidthError` naming the layer for a width
    the target lacks."""
    if layer_bits is None:
        return {}
    if not isinstance(layer_bits, Mapping):
        raise OptionError(f"layer_bits must map node names to weight bits, got "
                          f"{type(layer_bits).__name__}")
    kinds = {n.name: node_kind(n, gm) for n in gm.graph.nodes}
    bad = [k for k in layer_bits if kinds.get(k) not in LAYER_KINDS]
    if bad:
        layers = [n for n, k in kinds.items() if k in LAYER_KINDS]
        raise OptionError(f"layer_bits names {', '.join(map(repr, bad[:5]))}, not conv/linear "
                          f"nodes of this graph (its layers: {', '.join(layers[:8])}"
                          f"{', …' if len(layers) > 8 else ''})")
    out = {}
    for k, v in layer_bits.items():
        try:
            out[k] = tgt.quant.check_bits(v, act_bits)[0]
        except BitWidthError as e:
            raise BitWidthError(f"layer_bits[{k!r}]: {e}") from None
    return out


def insert_fake_quant(gm: torch.fx.GraphModule, target: str | Target = "npu_a",
                      weight_bits: int | None = None, act_bits: int | None = None, *,
                      surrogate_weight_bits: int | None = None,
                      quantize_surrogates: str | bool = "structural",
                      layer_bits: Mapping[str, int] | None = None) -> PassResult:
    """Run :class:`FakeQuantPass` on ``gm`` (never edited); bits default to the target's;
    ``layer_bits`` (node name → weight bits) overrides single layers.

    Raises :class:`~archnet_fx.errors.BitWidthError` for widths the target cannot do.
    """
    tgt = load_target(target)
    w, a = tgt.quant.check_bits(weight_bits, act_bits)
    if surrogate_weight_bits is not None:
        surrogate_weight_bits, _ = tgt.quant.check_bits(surrogate_weight_bits, a)
    layer_bits = checked_layer_bits(gm, tgt, layer_bits, a)
    return FakeQuantPass(tgt, w, a, surrogate_weight_bits=surrogate_weight_bits,
                         quantize_surrogates=quantize_surrogates, layer_bits=layer_bits)(gm)

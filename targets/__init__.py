"""Target chips as data: what each one runs, its integer arithmetic, and what things cost.

A target is one TOML file in this folder (``npu_a.toml``, ``npu_b.toml``, ``dsp_c.toml``) or
anywhere on disk, loaded into a frozen :class:`Target`:

* ``ops``: the canonical op kinds (:data:`KNOWN_KINDS`, the classifier's vocabulary) the chip
  runs natively, each with :class:`OpLimits` (channel limit, kernel sizes, whether a binary op
  may take two runtime activations, max rank). A kind that is absent must be rewritten by a
  surrogate pass or run on the host; ``unknown:*`` kinds are never supported.
* ``quant``: :class:`QuantSpec`, allowed weight/activation bit widths and their defaults,
  per-channel or per-tensor weights, symmetry, power-of-two scales, accumulator width.
* ``cost``: :class:`CostSpec`, peak ops/s per precision, memory bandwidth, SRAM, per-op
  overhead, fusable elementwise kinds, and the :class:`HostFallback` for unsupported nodes.

Loading is strict: an unknown or missing field, a wrong type, an impossible value, an unknown
op kind or a TOML syntax error raises :class:`~archnet_fx.errors.TargetError` naming the file
and the dotted field, e.g. ``my.toml: field 'quant.weight_bits[1]': bit width must be between
1 and 32, got 0``. One validator, driven by the dataclass fields, does all of it
(see :mod:`archnet_fx.targets.schema`).

>>> from archnet_fx.targets import load_target, list_targets
>>> list_targets()
['dsp_c', 'npu_a', 'npu_b']
>>> t = load_target("npu_a")
>>> t.supports("conv"), t.supports("layer_norm"), t.supports("unknown:foo")
(True, False, False)
>>> t.limits("conv").kernel_sizes
(1, 3, 5, 7)
>>> t.quant.check_bits(weight_bits=4)
(4, 8)
>>> load_target("npu_b").limits("mul").two_activations
False
>>> load_target("dsp_c").supports("gelu")
True
"""

from .schema import (
    BINARY_KINDS,
    KNOWN_KINDS,
    CostSpec,
    HostFallback,
    OpLimits,
    QuantSpec,
    Target,
    list_targets,
    load_target,
    targets_table,
)

__all__ = [
    "BINARY_KINDS",
    "KNOWN_KINDS",
    "CostSpec",
    "HostFallback",
    "OpLimits",
    "QuantSpec",
    "Target",
    "list_targets",
    "load_target",
    "targets_table",
]

"""Target schema: frozen dataclasses for a chip description, and the strict TOML loader.

A target file is plain data (see ``npu_a.toml``); this module turns it into a :class:`Target`
and refuses anything it does not understand. There is one validator for every record type,
driven by the dataclass fields and their type hints:

* field names: a key that is not a field is an error, a field without a default that is
  absent is an error (fields marked ``toml=False`` are filled by the loader, not the file);
* types: ``bool`` is not ``int``, ``int`` is accepted for ``float``, lists become tuples,
  tables become immutable :class:`FrozenMap` mappings, nested tables become nested records;
* values: a per-field ``check`` in the field metadata (bit widths, positive rates, choices,
  known op kinds), applied to every scalar leaf, plus two generic cross-field rules
  (``member_of``: a default must be among the allowed values; ``applies_to``: a per-op limit
  only where it means something).

Errors name the dotted field (``quant.weight_bits[1]``, ``ops.conv.kernel_sizes``) and, when
the record came from a file, the file path. The same validation runs when a record is built
directly in Python (``__post_init__``), so a hand-made :class:`Target` is as trustworthy as a
loaded one.

Mappings are :class:`FrozenMap` rather than ``types.MappingProxyType`` because records must be
hashable, picklable and deep-copyable (graph metadata and pass options are copied).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Union

from archnet_fx.errors import BitWidthError, TargetError
from archnet_fx.ir.kinds import KNOWN_KINDS

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "KNOWN_KINDS",
    "BINARY_KINDS",
    "FrozenMap",
    "OpLimits",
    "QuantSpec",
    "HostFallback",
    "CostSpec",
    "Target",
    "list_targets",
    "load_target",
    "targets_table",
]

#: Kinds with two tensor operands, for which ``OpLimits.two_activations`` means something.
BINARY_KINDS: frozenset[str] = frozenset(
    "matmul einsum add sub mul div pow maximum minimum where masked_fill compare logical".split()
)

#: Kinds with a spatial kernel, for which ``OpLimits.kernel_sizes`` means something.
KERNEL_KINDS: frozenset[str] = frozenset("conv conv_transpose max_pool avg_pool".split())

_BUILTIN_DIR = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# Immutable mapping
# --------------------------------------------------------------------------------------------


class FrozenMap(Mapping):
    """A read-only, hashable, picklable mapping (insertion order kept)."""

    __slots__ = ("_d",)

    def __init__(self, items: Mapping | Iterable[tuple[Any, Any]] = ()) -> None:
        object.__setattr__(self, "_d", dict(items))

    def __getitem__(self, key: Any) -> Any:
        return self._d[key]

    def __iter__(self) -> Iterator:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        return hash(frozenset(self._d.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self):
        return (type(self), (self._d,))

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"


# --------------------------------------------------------------------------------------------
# The one validator
# --------------------------------------------------------------------------------------------


class _FieldError(TargetError):
    """A validation failure at a dotted field path (relative until the caller prefixes it)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"field '{path}': {reason}" if path else reason)

    def under(self, prefix: str) -> _FieldError:
        if not self.path:
            path = prefix
        elif self.path.startswith("["):
            path = prefix + self.path
        else:
            path = f"{prefix}.{self.path}" if prefix else self.path
        return _FieldError(path, self.reason)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        return "a table"
    if dataclasses.is_dataclass(hint):
        return "a table"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    """Check ``value`` against ``hint`` and return its canonical immutable form.

    Raises :class:`_FieldError` with a path relative to ``value``.
    """
    origin = typing.get_origin(hint)
    if origin in (Union, UnionType):
        args = typing.get_args(hint)
        if value is None and NoneType in args:
            return None
        (inner,) = [a for a in args if a is not NoneType]
        return _coerce(value, inner, meta)

    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return _build(hint, value)
        raise _FieldError("", f"expected a table, got {_describe(value)}")

    if origin is tuple:
        (item_hint, _ellipsis) = typing.get_args(hint)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _FieldError("", f"expected {_type_name(hint)}, got {_describe(value)}")
        out = []
        for i, item in enumerate(value):
            try:
                item = _coerce(item, item_hint, meta)
                if meta.get("unique") and item in out:
                    raise _FieldError("", f"duplicate value {item!r}")
            except _FieldError as e:
                raise e.under(f"[{i}]") from None
            out.append(item)
        return tuple(out)

    if origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise _FieldError("", f"expected a table, got {_describe(value)}")
        key_fn: Callable[[Any], Any] | None = meta.get("key")
        key_field: str | None = meta.get("key_field")
        out_map: dict[Any, Any] = {}
        for raw_key, item in value.items():
            try:
                if key_fn is not None:
                    try:
                        key = key_fn(raw_key)
                    except ValueError as e:
                        raise _FieldError("", str(e)) from None
                else:
                    key = _coerce(raw_key, key_hint, {})
                if key in out_map:
                    raise _FieldError("", f"duplicate key {key!r}")
                if key_field is not None and isinstance(item, Mapping):
                    out_map[key] = _build(value_hint, item, extra={key_field: key})
                else:
                    out_map[key] = _coerce(item, value_hint, {"check": meta.get("check")})
            except _FieldError as e:
                raise e.under(str(raw_key)) from None
        return FrozenMap(out_map)

    # Scalars.
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif hint is str:
        ok = isinstance(value, str)
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported schema type {hint!r}")
    if not ok:
        raise _FieldError("", f"expected {_type_name(hint)}, got {_describe(value)}")
    check: Callable[[Any], str | None] | None = meta.get("check")
    if check is not None:
        reason = check(value)
        if reason:
            raise _FieldError("", reason)
    return value


def _toml_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.metadata.get("toml", True)}


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _build(cls: type, raw: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Any:
    """Build record ``cls`` from a TOML table: unknown and missing names, then ``cls(**raw)``."""
    allowed = _toml_fields(cls)
    for key in raw:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise _FieldError(str(key), f"unknown field; {hint}expected one of: {', '.join(allowed)}")
    for name, f in allowed.items():
        if name not in raw and not _has_default(f):
            raise _FieldError(name, "missing required field")
    return cls(**raw, **(extra or {}))


class _Record:
    """Base of the schema records: validates and canonicalises fields after ``__init__``."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            try:
                value = _coerce(getattr(self, f.name), hints[f.name], f.metadata)
            except _FieldError as e:
                raise e.under(f.name) from None
            object.__setattr__(self, f.name, value)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            other = f.metadata.get("member_of")
            if other is not None and value not in getattr(self, other):
                allowed = ", ".join(map(str, getattr(self, other))) or "none"
                raise _FieldError(f.name, f"{value!r} is not among the allowed {other} ({allowed})")
            kinds = f.metadata.get("applies_to")
            if kinds is not None and value != f.default and self.kind not in kinds:  # type: ignore[attr-defined]
                raise _FieldError(
                    f.name, f"only applies to op kinds {', '.join(sorted(kinds))}, not '{self.kind}'"  # type: ignore[attr-defined]
                )
        self._check()

    def _check(self) -> None:
        """Record-specific cross-field rules (raise :class:`_FieldError`)."""


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# Leaf checks: each returns None when fine, else the reason.


def _bits(lo: int, hi: int) -> Callable[[int], str | None]:
    def check(v: int) -> str | None:
        return None if lo <= v <= hi else f"bit width must be between {lo} and {hi}, got {v}"

    return check


def _positive(v: float) -> str | None:
    return None if v > 0 and math.isfinite(v) else f"must be a finite number > 0, got {v!r}"


def _nonnegative(v: float) -> str | None:
    return None if v >= 0 and math.isfinite(v) else f"must be a finite number >= 0, got {v!r}"


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}, got {v!r}"

    return check


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _known_kind(v: str) -> str | None:
    if v in KNOWN_KINDS:
        return None
    close = difflib.get_close_matches(v, sorted(KNOWN_KINDS), n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"unknown op kind {v!r}{hint} (see archnet_fx.targets.KNOWN_KINDS)"


def _op_key(k: Any) -> str:
    if not isinstance(k, str):
        raise ValueError(f"op kind must be a string, got {_describe(k)}")
    reason = _known_kind(k)
    if reason:
        raise ValueError(reason)
    return k


_PEAK_KEY = re.compile(r"int(\d+)")


def _peak_key(k: Any) -> int:
    """``"int8"`` (TOML) or ``8`` (Python) -> 8."""
    if isinstance(k, int) and not isinstance(k, bool):
        bits = k
    elif isinstance(k, str) and _PEAK_KEY.fullmatch(k):
        bits = int(k[3:])
    else:
        raise ValueError(f"precision key must look like 'int8', got {k!r}")
    if not 1 <= bits <= 32:
        raise ValueError(f"bit width must be between 1 and 32, got {bits}")
    return bits


def _meta(**kw: Any) -> dict[str, Any]:
    return kw


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpLimits(_Record):
    """What a target allows for one op kind (``None`` = no limit)."""

    kind: str = field(metadata=_meta(check=_known_kind, toml=False))
    #: Largest input/output channel count of conv/linear (and feature size elsewhere).
    max_channels: int | None = field(default=None, metadata=_meta(check=_positive))
    #: Allowed kernel sizes, each spatial dimension (conv, pooling).
    kernel_sizes: tuple[int, ...] | None = field(
        default=None, metadata=_meta(check=_positive, unique=True, applies_to=KERNEL_KINDS)
    )
    #: For binary ops: may both operands be runtime activations (else one must be a constant)?
    two_activations: bool = field(default=True, metadata=_meta(applies_to=BINARY_KINDS))
    #: Largest tensor rank the op accepts.
    max_rank: int | None = field(default=None, metadata=_meta(check=_positive))


@dataclass(frozen=True)
class QuantSpec(_Record):
    """Integer arithmetic the target offers."""

    weight_bits: tuple[int, ...] = field(metadata=_meta(check=_bits(1, 32), unique=True))
    act_bits: tuple[int, ...] = field(metadata=_meta(check=_bits(1, 32), unique=True))
    default_weight_bits: int = field(metadata=_meta(check=_bits(1, 32), member_of="weight_bits"))
    default_act_bits: int = field(metadata=_meta(check=_bits(1, 32), member_of="act_bits"))
    weight_granularity: str = field(metadata=_meta(check=_one_of("per_channel", "per_tensor")))
    weight_symmetric: bool
    act_symmetric: bool
    #: Scales restricted to 2**k, so re-quantization is a shift.
    power_of_two_scales: bool
    accumulator_bits: int = field(metadata=_meta(check=_bits(1, 64)))
    #: Name of the owning target (set by :class:`Target`), used in error messages.
    target_name: str = field(default="", compare=False, metadata=_meta(toml=False))

    def check_bits(self, weight_bits: int | None = None, act_bits: int | None = None) -> tuple[int, int]:
        """Return ``(weight_bits, act_bits)`` with ``None`` replaced by the target's defaults.

        Raises :class:`~archnet_fx.errors.BitWidthError` when a width is not allowed.
        """
        w = self.default_weight_bits if weight_bits is None else weight_bits
        a = self.default_act_bits if act_bits is None else act_bits
        for label, v in (("weight_bits", w), ("act_bits", a)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise BitWidthError(f"{label} must be an int or None, got {_describe(v)} "
                                    f"(allowed: {', '.join(map(str, self.weight_bits if label == 'weight_bits' else self.act_bits))})")
        bad = []
        if w not in self.weight_bits:
            bad.append(f"weight_bits={w} (allowed: {', '.join(map(str, self.weight_bits))})")
        if a not in self.act_bits:
            bad.append(f"act_bits={a} (allowed: {', '.join(map(str, self.act_bits))})")
        if bad:
            who = f"target '{self.target_name}'" if self.target_name else "this target"
            raise BitWidthError(f"{who} does not support {' and '.join(bad)}")
        return w, a


@dataclass(frozen=True)
class HostFallback(_Record):
    """Cost of running a node on the host instead of the chip."""

    ops_per_s: float = field(metadata=_meta(check=_positive))
    link_bytes_per_s: float = field(metadata=_meta(check=_positive))
    #: Fixed cost of one chip -> host -> chip hand-off.
    round_trip_s: float = field(metadata=_meta(check=_nonnegative))


@dataclass(frozen=True)
class CostSpec(_Record):
    """Roofline-style cost parameters of the chip."""

    #: bits -> peak ops/s (TOML keys ``int4``, ``int8``, ``int16``).
    peak_ops_per_s: Mapping[int, float] = field(metadata=_meta(key=_peak_key, check=_positive))
    memory_bytes_per_s: float = field(metadata=_meta(check=_positive))
    sram_bytes: int = field(metadata=_meta(check=_nonnegative))
    per_op_overhead_s: float = field(metadata=_meta(check=_nonnegative))
    #: Elementwise kinds that fuse into a preceding conv/linear/matmul (cost nothing extra).
    fusable: tuple[str, ...] = field(metadata=_meta(check=_known_kind, unique=True))
    host: HostFallback

    def _check(self) -> None:
        if not self.peak_ops_per_s:
            raise _FieldError("peak_ops_per_s", "needs at least one precision, e.g. int8 = 1e12")


@dataclass(frozen=True)
class Target(_Record):
    """One inference chip: the op kinds it runs, its integer arithmetic, and its costs."""

    name: str = field(metadata=_meta(check=_nonempty))
    description: str
    ops: Mapping[str, OpLimits] = field(metadata=_meta(key=_op_key, key_field="kind"))
    quant: QuantSpec
    cost: CostSpec
    #: File the target was loaded from (``"<memory>"`` when built in Python).
    source: str = field(default="<memory>", compare=False, metadata=_meta(toml=False))

    def _check(self) -> None:
        for kind, lim in self.ops.items():
            if lim.kind != kind:
                raise _FieldError(f"ops.{kind}", f"limits are for kind '{lim.kind}', not '{kind}'")
        for i, kind in enumerate(self.cost.fusable):
            if kind not in self.ops:
                raise _FieldError(f"cost.fusable[{i}]", f"'{kind}' is not among this target's ops")
        if self.quant.target_name != self.name:
            object.__setattr__(self, "quant", dataclasses.replace(self.quant, target_name=self.name))

    def supports(self, kind: str) -> bool:
        """Whether the chip runs op kind ``kind`` natively (``unknown:*`` never)."""
        return not kind.startswith("unknown:") and kind in self.ops

    def limits(self, kind: str) -> OpLimits | None:
        """Per-kind limits, or ``None`` when the kind is not supported."""
        return self.ops.get(kind) if self.supports(kind) else None

    def summary_row(self) -> dict[str, Any]:
        """One row for :func:`targets_table`."""
        q, c = self.quant, self.cost

        def bits(allowed: tuple[int, ...], default: int) -> str:
            return ",".join(map(str, allowed)) + f" ({default})"

        int8 = c.peak_ops_per_s.get(8)
        return {
            "target": self.name,
            "#ops": len(self.ops),
            "weight bits": bits(q.weight_bits, q.default_weight_bits),
            "act bits": bits(q.act_bits, q.default_act_bits),
            "granularity": q.weight_granularity,
            "pow2 scales": q.power_of_two_scales,
            "peak int8 TOPS": None if int8 is None else int8 / 1e12,
            "bandwidth GB/s": c.memory_bytes_per_s / 1e9,
            "host round trip us": c.host.round_trip_s * 1e6,
        }


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def list_targets() -> list[str]:
    """Names of the built-in targets, sorted."""
    return sorted(p.stem for p in _BUILTIN_DIR.glob("*.toml"))


def load_target(name_or_path: str | os.PathLike | Target) -> Target:
    """A :class:`Target` from a built-in name, a path to a ``.toml`` file, or a Target (as is)."""
    if isinstance(name_or_path, Target):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TargetError(
            f"target must be a built-in name, a path to a .toml file or a Target, got {_describe(name_or_path)}"
        )
    if isinstance(name_or_path, str) and name_or_path in list_targets():
        return _load_builtin(name_or_path)
    path = Path(name_or_path)
    looks_like_path = not isinstance(name_or_path, str) or path.suffix == ".toml" or len(path.parts) > 1
    if looks_like_path or path.exists():
        return _load_file(path)
    raise TargetError(
        f"unknown target {str(name_or_path)!r}; built-in targets are: {', '.join(list_targets())} "
        "(or pass a path to a .toml target file)"
    )


@lru_cache(maxsize=None)
def _load_builtin(name: str) -> Target:
    return _load_file(_BUILTIN_DIR / f"{name}.toml")


def _load_file(path: Path) -> Target:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise TargetError(f"{path}: cannot read target file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TargetError(f"{path}: target file is not UTF-8 text: {e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        where = _syntax_error_field(text, str(e))
        at = f"field '{where}': " if where else ""
        raise TargetError(f"{path}: {at}TOML syntax error: {e}") from None
    try:
        return _build(Target, data, extra={"source": str(path)})
    except _FieldError as e:
        raise TargetError(f"{path}: {e}") from None


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


def _syntax_error_field(text: str, message: str) -> str:
    """Best-effort dotted field at the line a TOML syntax error points to."""
    m = re.search(r"at line (\d+)", message)
    if not m:
        return ""
    lines = text.splitlines()
    lineno = min(int(m.group(1)), len(lines))
    section = ""
    for line in lines[: max(lineno - 1, 0)]:
        h = _HEADER.match(line)
        if h:
            section = h.group(1).replace(" ", "")
    key_match = _KEY.match(lines[lineno - 1]) if lines else None
    if key_match:
        key = key_match.group(1).strip().replace('"', "").replace("'", "")
        return f"{section}.{key}" if section else key
    line = lines[lineno - 1].strip() if lines else ""
    return line.strip("[]").strip() if line.startswith("[") else section


def targets_table(targets: Iterable[Target | str | os.PathLike] | None = None) -> str:
    """A text table comparing targets (default: all built-ins), one row each."""
    from tabulate import tabulate

    chosen = list_targets() if targets is None else targets
    rows = [load_target(t).summary_row() for t in chosen]
    return tabulate(rows, headers="keys", floatfmt="g", missingval="-")

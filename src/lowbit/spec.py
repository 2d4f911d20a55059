"""Quantization schemes: frozen, validated specs and the string grammar that names them.

A scheme names how a layer's weights are quantized (`QuantSpec`) and, optionally, its inputs
(activations, `ActSpec`); `Scheme` holds the pair. Grammar (case-insensitive)::

    w<bits>[g<group>|c|r|t][a8[-static]][-sym|-asym][-minmax|-mse|-greedy|-p<percentile>][-s<dtype>][-zint|-zfloat]

    w8        int8 weights, one scale per output channel (symmetric)
    w4g128    int4 weights, one scale and zero point per group of 128 inputs (asymmetric)
    w4g32, w3g128, w2g64, ...
    w8r       per row (embedding tables: per-row scale and bias, asymmetric)
    w8t       one scale for the whole tensor
    w8a8      int8 weights and int8 inputs quantized per token at run time (dynamic)
    w8a8-static   int8 inputs with a per-tensor range fixed by calibration

Aliases: ``int8`` -> ``w8a8``, ``int4`` -> ``w4g128``.
Defaults: 8-bit is symmetric, 2..7-bit and per-row are asymmetric; ranges are min-max; asymmetric
zero points are integer codes (``-zfloat`` selects lowbit's older float zero point). Each suffix
kind (symmetry, range, scale dtype, zero point, static) may appear once: ``w4-sym-asym`` is an error.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import SchemeError

GRANULARITIES = ("tensor", "channel", "group", "row")
RANGE_METHODS = ("minmax", "percentile", "mse", "greedy")
SCALE_DTYPES = ("float16", "float32")
ZERO_POINT_FORMS = ("int", "float")
DEFAULT_PERCENTILE = 99.9
ALIASES = {"int8": "w8a8", "int4": "w4g128"}
_GRAN_LETTER = {"c": "channel", "r": "row", "t": "tensor", "": "channel"}

VALID_FORMS = (
    "w<bits> (per channel), w<bits>g<group> (per group), w<bits>r (per row), w<bits>t (per tensor); "
    "bits 2..8; a8 after the weight part quantizes inputs too (w8a8: dynamic, per token; w8a8-static: "
    "calibrated per tensor); optional suffixes, each kind at most once: -sym/-asym, "
    "-minmax/-mse/-greedy/-p<percentile>, -sfloat16/-sfloat32, -zint/-zfloat (asymmetric zero point: "
    "integer code, the default, or float); "
    "examples: w8, w4g128, w4g32, w3g128, w2g64, w8r, w4g128-sym, w8-mse, w8a8; "
    "aliases: int8 -> w8a8, int4 -> w4g128"
)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. Validated on construction; round-trips through JSON.

    Dequantization is ``x_hat = (q - zero_point) * scale`` with unsigned codes ``q`` in
    ``[0, 2**bits - 1]``. Symmetric specs use the implicit zero point ``2**(bits-1)`` and the
    restricted codes ``[1, 2**bits - 1]`` (so +-amax are both exact). Asymmetric specs store a zero
    point per group in one of two forms (``zero_point_form``):

    - ``"int"`` (default): an integer code in ``[0, qmax]`` stored as uint8, with the range widened
      to include 0 so that 0.0 is exactly on the grid (the common asymmetric convention).
    - ``"float"``: lowbit's first form, an unrounded zero point in the scale dtype, so the range's
      minimum maps exactly but 0.0 generally does not (the scale-and-bias form of row-wise
      embedding tables: ``bias = -zero_point * scale``). Spec dicts written before this field
      existed mean this form: `from_dict` reads a missing key as ``"float"`` for asymmetric specs.

    Symmetric specs have the implicit integer zero point ``2**(bits-1)``: their form is ``"int"``.
    """

    bits: int
    symmetric: bool
    granularity: str = "channel"
    group_size: int | None = None
    scale_dtype: str = "float16"
    range_method: str = "minmax"
    percentile: float = 99.9  # DEFAULT_PERCENTILE
    zero_point_form: str = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise SchemeError(f"bits must be an integer in 2..8, found {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise SchemeError(f"symmetric must be True or False, found {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            raise SchemeError(f"granularity must be one of {GRANULARITIES}, found {self.granularity!r}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise SchemeError("group_size is set exactly when granularity is 'group', "
                              f"found granularity={self.granularity!r} group_size={self.group_size!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 2):
            raise SchemeError(f"group_size must be an integer >= 2, found {self.group_size!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(f"scale_dtype must be one of {SCALE_DTYPES}, found {self.scale_dtype!r}")
        if self.range_method not in RANGE_METHODS:
            raise SchemeError(f"range_method must be one of {RANGE_METHODS}, found {self.range_method!r}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise SchemeError(f"percentile must be in (50, 100], found {self.percentile!r}")
        if self.range_method != "percentile" and float(self.percentile) != DEFAULT_PERCENTILE:
            raise SchemeError(f"percentile={self.percentile!r} is set but range_method is "
                              f"{self.range_method!r}, not 'percentile'")
        if self.zero_point_form not in ZERO_POINT_FORMS:
            raise SchemeError(f"zero_point_form must be one of {ZERO_POINT_FORMS}, "
                              f"found {self.zero_point_form!r}")
        if self.symmetric and self.zero_point_form != "int":
            raise SchemeError("a symmetric spec has the implicit integer zero point 2**(bits-1); "
                              f"zero_point_form must be 'int', found {self.zero_point_form!r}")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        """The canonical scheme string; ``parse_scheme(spec.name) == spec``."""
        gran = {"channel": "", "row": "r", "tensor": "t"}.get(self.granularity, f"g{self.group_size}")
        out = f"w{self.bits}{gran}"
        if self.symmetric != _default_symmetric(self.bits, self.granularity):
            out += "-sym" if self.symmetric else "-asym"
        if self.range_method == "percentile":
            out += "-p" + repr(float(self.percentile)).removesuffix(".0")
        elif self.range_method != "minmax":
            out += f"-{self.range_method}"
        if self.scale_dtype != "float16":
            out += f"-s{self.scale_dtype}"
        if self.zero_point_form != "int":
            out += f"-z{self.zero_point_form}"
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        if isinstance(d, dict) and "zero_point_form" not in d and not d.get("symmetric", True):
            # written before the field existed, when every asymmetric zero point was a float
            d = {**d, "zero_point_form": "float"}
        if isinstance(d, dict) and ("act_bits" in d or "act_static" in d):
            # format 1 kept input settings here; unset they mean nothing, set they belong in ActSpec
            if d.get("act_bits") or d.get("act_static"):
                raise SchemeError(f"act_bits/act_static belong in ActSpec (Scheme.input), found {d!r:.200}")
            d = {k: v for k, v in d.items() if k not in ("act_bits", "act_static")}
        return _from_dict(cls, d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantSpec":
        return cls.from_dict(json.loads(text))

    def with_(self, **changes: Any) -> "QuantSpec":
        return dataclasses.replace(self, **changes)


OBSERVERS = ("minmax", "ema", "percentile", "mse", "histogram")
# The default observer of static inputs: on all-MiniLM-L6-v2 the one that keeps w8a8-static
# within 0.005 mean cosine of dynamic w8a8, where min-max ranges do not (BENCHMARKS.md, issue 6).
STATIC_OBSERVER = "histogram"
ACT_GRANULARITIES = ("token", "tensor")


@dataclass(frozen=True)
class ActSpec:
    """How a layer's inputs (activations) are quantized at run time.

    Dynamic (``static=False``): each token's (row's) range is measured on the fly. Static: one
    per-tensor range fixed by calibration, chosen by ``observer`` (default `STATIC_OBSERVER`;
    dynamic specs keep "minmax", which they do not use). Codes are unsigned 8-bit:
    ``x_hat = (q - zero_point) * scale``, symmetric ones with the implicit zero point 128.
    """

    bits: int = 8
    static: bool = False
    symmetric: bool = False
    granularity: str = "token"
    observer: str | None = None

    def __post_init__(self) -> None:
        if self.observer is None:
            object.__setattr__(self, "observer", STATIC_OBSERVER if self.static is True else "minmax")
        if self.bits != 8:
            raise SchemeError(f"input bits must be 8, found {self.bits!r}")
        for key in ("static", "symmetric"):
            if not isinstance(getattr(self, key), bool):
                raise SchemeError(f"{key} must be True or False, found {getattr(self, key)!r}")
        if self.granularity not in ACT_GRANULARITIES:
            raise SchemeError(f"input granularity must be one of {ACT_GRANULARITIES}, "
                              f"found {self.granularity!r}")
        if self.static and self.granularity != "tensor":
            raise SchemeError("static input ranges are per tensor: granularity must be 'tensor'")
        if self.observer not in OBSERVERS:
            raise SchemeError(f"observer must be one of {OBSERVERS}, found {self.observer!r}")

    @property
    def name(self) -> str:
        return f"a{self.bits}" + ("-static" if self.static else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActSpec":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class Scheme:
    """A weight spec and an optional input spec: what a scheme string names."""

    weight: QuantSpec
    input: ActSpec | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weight, QuantSpec):
            raise SchemeError(f"Scheme.weight must be a QuantSpec, found {type(self.weight).__name__}")
        if self.input is not None and not isinstance(self.input, ActSpec):
            raise SchemeError(f"Scheme.input must be an ActSpec or None, found {type(self.input).__name__}")

    @property
    def name(self) -> str:
        """The canonical scheme string; ``parse(s.name) == s``."""
        w = self.weight.name
        if self.input is None:
            return w
        base, sep, rest = w.partition("-")
        suffix = "-static" if self.input.static else ""
        return f"{base}{self.input.name.split('-')[0]}{suffix}{sep}{rest}"

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.to_dict(),
                "input": None if self.input is None else self.input.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scheme":
        if not isinstance(d, dict) or "weight" not in d:
            raise SchemeError(f"a Scheme dict needs 'weight' (and optional 'input'), found {d!r}")
        extra = set(d) - {"weight", "input"}
        if extra:
            raise SchemeError(f"unknown Scheme fields {sorted(extra)}; known: ['input', 'weight']")
        act = d.get("input")
        return cls(QuantSpec.from_dict(d["weight"]), None if act is None else ActSpec.from_dict(act))


def _from_dict(cls, d: Any):
    if not isinstance(d, dict):
        raise SchemeError(f"{cls.__name__} expects a dict of fields, found {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise SchemeError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(names)}")
    try:
        return cls(**d)
    except TypeError as exc:
        raise SchemeError(f"{cls.__name__}: {exc}") from None


def _default_symmetric(bits: int, granularity: str) -> bool:
    return bits == 8 and granularity != "row"


_PATTERN = re.compile(r"^w(?P<bits>\d)(?:(?P<letter>[crt])|g(?P<group>\d+))?(?:a(?P<abits>\d))?$")
_SCALE_SUFFIX = {f"s{d}": d for d in SCALE_DTYPES}
_ZP_SUFFIX = {f"z{f}": f for f in ZERO_POINT_FORMS}


def parse(scheme: "str | QuantSpec | Scheme") -> Scheme:
    """Parse a scheme string (see module docstring) into a `Scheme` (weight and input specs)."""
    if isinstance(scheme, Scheme):
        return scheme
    if isinstance(scheme, QuantSpec):
        return Scheme(scheme)
    if not isinstance(scheme, str) or not scheme.strip():
        raise SchemeError(f"a scheme must be a non-empty string, found {scheme!r}; valid forms: {VALID_FORMS}")
    text = ALIASES.get(scheme.strip().lower(), scheme.strip().lower())
    base, *suffixes = text.split("-")
    m = _PATTERN.match(base)
    if not m:
        raise SchemeError(f"unknown scheme {scheme!r}; valid forms: {VALID_FORMS}")
    bits = int(m["bits"])
    gran = "group" if m["group"] else _GRAN_LETTER[m["letter"] or ""]
    fields: dict[str, Any] = {"bits": bits, "granularity": gran,
                              "group_size": int(m["group"]) if m["group"] else None,
                              "symmetric": _default_symmetric(bits, gran)}
    act: dict[str, Any] | None = {"bits": int(m["abits"])} if m["abits"] else None
    seen: dict[str, str] = {}
    for sfx in suffixes:
        _apply_suffix(fields, act, sfx, scheme, seen)
    try:
        if act is not None and act.get("static"):
            act["granularity"] = "tensor"
        return Scheme(QuantSpec(**fields), None if act is None else ActSpec(**act))
    except SchemeError as exc:
        raise SchemeError(f"scheme {scheme!r}: {exc}; valid forms: {VALID_FORMS}") from None


def parse_scheme(scheme: "str | QuantSpec") -> QuantSpec:
    """Parse a weight-only scheme string into its `QuantSpec` (``w8a8`` needs `parse`)."""
    if isinstance(scheme, QuantSpec):
        return scheme
    parsed = parse(scheme)
    if parsed.input is not None:
        raise SchemeError(f"scheme {scheme!r} also quantizes inputs; use lowbit.spec.parse() for a "
                          "Scheme with weight and input specs")
    return parsed.weight


def _apply_suffix(fields: dict[str, Any], act: dict[str, Any] | None, sfx: str, scheme: str,
                  seen: dict[str, str]) -> None:
    category = _suffix_category(sfx, act, scheme)
    if category in seen:
        what = "repeats" if seen[category] == sfx else "contradicts"
        raise SchemeError(f"suffix -{sfx} {what} -{seen[category]} in scheme {scheme!r}: each of "
                          f"symmetry, range, scale dtype and -static may appear once; valid forms: "
                          f"{VALID_FORMS}")
    seen[category] = sfx
    if category == "symmetry":
        fields["symmetric"] = sfx == "sym"
    elif category == "static":
        act["static"] = True
    elif category == "scale":
        fields["scale_dtype"] = _SCALE_SUFFIX[sfx]
    elif category == "zero point":
        fields["zero_point_form"] = _ZP_SUFFIX[sfx]
    elif sfx.startswith("p") and sfx not in RANGE_METHODS:
        fields["range_method"], fields["percentile"] = "percentile", float(sfx[1:])
    else:
        fields["range_method"] = sfx


def _suffix_category(sfx: str, act: dict[str, Any] | None, scheme: str) -> str:
    if sfx in ("sym", "asym"):
        return "symmetry"
    if sfx in ("minmax", "mse", "greedy") or re.fullmatch(r"p\d+(\.\d+)?", sfx):
        return "range"
    if sfx in _SCALE_SUFFIX:
        return "scale"
    if sfx in _ZP_SUFFIX:
        return "zero point"
    if sfx == "static" and act is not None:
        return "static"
    raise SchemeError(f"unknown suffix -{sfx} in scheme {scheme!r}; valid forms: {VALID_FORMS}")

"""Quantization schemes: a frozen, validated `QuantSpec` and the string grammar that names one.

Grammar (case-insensitive)::

    w<bits>[g<group>|c|r|t][-sym|-asym][-minmax|-mse|-greedy|-p<percentile>][-zint|-zfloat]

    w8        int8 weights, one scale per output channel (symmetric)
    w4g128    int4 weights, one scale and zero point per group of 128 inputs (asymmetric)
    w4g32, w3g128, w2g64, ...
    w8r       per row (embedding tables: per-row scale and bias, asymmetric)
    w8t       one scale for the whole tensor
    w8a8, w8a8-static   reserved for activation quantization (not built yet)

Aliases: ``int8`` -> ``w8a8``, ``int4`` -> ``w4g128``.
Defaults: 8-bit is symmetric, 2..7-bit and per-row are asymmetric; ranges are min-max;
asymmetric zero points are integer codes (``-zfloat`` selects lowbit's older float zero point).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

GRANULARITIES = ("tensor", "channel", "group", "row")
RANGE_METHODS = ("minmax", "percentile", "mse", "greedy")
SCALE_DTYPES = ("float16", "float32")
ZERO_POINT_FORMS = ("int", "float")
DEFAULT_PERCENTILE = 99.9
ALIASES = {"int8": "w8a8", "int4": "w4g128"}
_GRAN_LETTER = {"c": "channel", "r": "row", "t": "tensor", "": "channel"}

VALID_FORMS = (
    "w<bits> (per channel), w<bits>g<group> (per group), w<bits>r (per row), w<bits>t (per tensor); "
    "bits 2..8; optional suffixes -sym/-asym, -minmax/-mse/-greedy/-p<percentile> and -zint/-zfloat "
    "(asymmetric zero point: integer code, the default, or float); "
    "examples: w8, w4g128, w4g32, w3g128, w2g64, w8r, w4g128-sym, w8-mse; "
    "w8a8 and w8a8-static are reserved for activation quantization; aliases: int8 -> w8a8, int4 -> w4g128"
)


class SchemeError(ValueError):
    """A scheme string or spec field that lowbit cannot accept."""


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
    act_bits: int | None = None
    act_static: bool = False
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
        if self.act_bits not in (None, 8):
            raise SchemeError(f"act_bits must be None or 8, found {self.act_bits!r}")
        if self.act_static and not self.act_bits:
            raise SchemeError("act_static=True needs act_bits")

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        """The canonical scheme string; ``parse_scheme(spec.name) == spec``."""
        gran = {"channel": "", "row": "r", "tensor": "t"}.get(self.granularity, f"g{self.group_size}")
        out = f"w{self.bits}{gran}"
        if self.act_bits:
            out += f"a{self.act_bits}" + ("-static" if self.act_static else "")
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
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SchemeError(f"unknown QuantSpec fields {sorted(unknown)}; known: {sorted(names)}")
        if "zero_point_form" not in d and not d.get("symmetric", True):
            # written before the field existed, when every asymmetric zero point was a float
            d = {**d, "zero_point_form": "float"}
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantSpec":
        return cls.from_dict(json.loads(text))

    def with_(self, **changes: Any) -> "QuantSpec":
        return dataclasses.replace(self, **changes)


def _default_symmetric(bits: int, granularity: str) -> bool:
    return bits == 8 and granularity != "row"


_PATTERN = re.compile(r"^w(?P<bits>\d)(?:(?P<letter>[crt])|g(?P<group>\d+))?(?:a(?P<abits>\d))?$")
_SCALE_SUFFIX = {f"s{d}": d for d in SCALE_DTYPES}
_ZP_SUFFIX = {f"z{f}": f for f in ZERO_POINT_FORMS}


def parse_scheme(scheme: "str | QuantSpec") -> QuantSpec:
    """Parse a scheme string (see module docstring) into a `QuantSpec`."""
    if isinstance(scheme, QuantSpec):
        return scheme
    if not isinstance(scheme, str) or not scheme.strip():
        raise SchemeError(f"a scheme must be a non-empty string; valid forms: {VALID_FORMS}")
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
    if m["abits"]:
        fields["act_bits"] = int(m["abits"])
    for sfx in suffixes:
        _apply_suffix(fields, sfx, scheme)
    try:
        return QuantSpec(**fields)
    except SchemeError as exc:
        raise SchemeError(f"scheme {scheme!r}: {exc}; valid forms: {VALID_FORMS}") from None


def _apply_suffix(fields: dict[str, Any], sfx: str, scheme: str) -> None:
    if sfx in ("sym", "asym"):
        fields["symmetric"] = sfx == "sym"
    elif sfx in ("minmax", "mse", "greedy"):
        fields["range_method"] = sfx
    elif sfx == "static" and "act_bits" in fields:
        fields["act_static"] = True
    elif sfx in _ZP_SUFFIX:
        if fields.get("zero_point_form", _ZP_SUFFIX[sfx]) != _ZP_SUFFIX[sfx]:
            raise SchemeError(f"scheme {scheme!r} names both -zint and -zfloat; valid forms: {VALID_FORMS}")
        fields["zero_point_form"] = _ZP_SUFFIX[sfx]
    elif sfx in _SCALE_SUFFIX:
        fields["scale_dtype"] = _SCALE_SUFFIX[sfx]
    elif re.fullmatch(r"p\d+(\.\d+)?", sfx):
        fields["range_method"], fields["percentile"] = "percentile", float(sfx[1:])
    else:
        raise SchemeError(f"unknown suffix -{sfx} in scheme {scheme!r}; valid forms: {VALID_FORMS}")

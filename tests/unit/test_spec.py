"""QuantSpec and the scheme grammar (src/lowbit/spec.py).

Every named form is pinned field by field; every spec must survive ``parse_scheme(spec.name)`` and a
JSON round trip; every bad name must fail loudly with a message that lists the valid forms.
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from lowbit.spec import ALIASES, VALID_FORMS, ActSpec, QuantSpec, Scheme, SchemeError, parse, parse_scheme

# scheme string -> the fields it must parse to (fields not named keep QuantSpec's defaults)
NAMED_FORMS: dict[str, dict] = {
    "w8": dict(bits=8, symmetric=True, granularity="channel"),
    "w4g128": dict(bits=4, symmetric=False, granularity="group", group_size=128),
    "w4g32": dict(bits=4, symmetric=False, granularity="group", group_size=32),
    "w3g128": dict(bits=3, symmetric=False, granularity="group", group_size=128),
    "w2g64": dict(bits=2, symmetric=False, granularity="group", group_size=64),
    "w8r": dict(bits=8, symmetric=False, granularity="row"),
    "w8t": dict(bits=8, symmetric=True, granularity="tensor"),
    "w8c": dict(bits=8, symmetric=True, granularity="channel"),
    "w4": dict(bits=4, symmetric=False, granularity="channel"),
    "w4r": dict(bits=4, symmetric=False, granularity="row"),
    "w2t": dict(bits=2, symmetric=False, granularity="tensor"),
    "w8g64": dict(bits=8, symmetric=True, granularity="group", group_size=64),
    "w8a8": dict(bits=8, symmetric=True, granularity="channel"),
    "w8a8-static": dict(bits=8, symmetric=True, granularity="channel"),
    "int8": dict(bits=8, symmetric=True, granularity="channel"),
    "int4": dict(bits=4, symmetric=False, granularity="group", group_size=128),
    "w4g128-sym": dict(bits=4, symmetric=True, granularity="group", group_size=128),
    "w8-asym": dict(bits=8, symmetric=False, granularity="channel"),
    "w8r-sym": dict(bits=8, symmetric=True, granularity="row"),
    "w8t-asym": dict(bits=8, symmetric=False, granularity="tensor"),
    "w4g128-asym": dict(bits=4, symmetric=False, granularity="group", group_size=128),
    "w8-mse": dict(bits=8, symmetric=True, range_method="mse"),
    "w4g128-greedy": dict(bits=4, symmetric=False, granularity="group", group_size=128,
                          range_method="greedy"),
    "w4g128-p99.9": dict(bits=4, symmetric=False, granularity="group", group_size=128,
                         range_method="percentile", percentile=99.9),
    "w8-p99": dict(bits=8, symmetric=True, range_method="percentile", percentile=99.0),
    "w8-p100": dict(bits=8, symmetric=True, range_method="percentile", percentile=100.0),
    "w8-minmax": dict(bits=8, symmetric=True, range_method="minmax"),
    "w4g32-sym-mse": dict(bits=4, symmetric=True, granularity="group", group_size=32,
                          range_method="mse"),
    "w2g64-greedy-asym": dict(bits=2, symmetric=False, granularity="group", group_size=64,
                              range_method="greedy"),
    "w4g128-sfloat32": dict(bits=4, symmetric=False, granularity="group", group_size=128,
                            scale_dtype="float32"),
    "w4g128-zfloat": dict(bits=4, symmetric=False, granularity="group", group_size=128,
                          zero_point_form="float"),
    "w4g128-zint": dict(bits=4, symmetric=False, granularity="group", group_size=128),
    "w8-asym-zfloat": dict(bits=8, symmetric=False, granularity="channel", zero_point_form="float"),
    "w2g64-mse-zfloat": dict(bits=2, symmetric=False, granularity="group", group_size=64,
                             range_method="mse", zero_point_form="float"),
    "w8-sym-zint": dict(bits=8, symmetric=True, granularity="channel"),
    "W4G128": dict(bits=4, symmetric=False, granularity="group", group_size=128),
    "  INT4 ": dict(bits=4, symmetric=False, granularity="group", group_size=128),
}

# scheme string -> its canonical name (defaults dropped, aliases resolved)
CANONICAL_NAMES = {
    "w8": "w8", "w4g128": "w4g128", "w8c": "w8", "w8r": "w8r", "w8t": "w8t", "w8a8": "w8a8",
    "w8a8-static": "w8a8-static", "int8": "w8a8", "int4": "w4g128", "W4G128": "w4g128",
    "w4g128-asym": "w4g128", "w8-minmax": "w8", "w4g128-sym": "w4g128-sym",
    "w8r-sym": "w8r-sym", "w8-asym": "w8-asym", "w4g128-p99.9": "w4g128-p99.9",
    "w8-p99": "w8-p99", "w2g64-greedy-asym": "w2g64-greedy", "w4g32-sym-mse": "w4g32-sym-mse",
    "w4g128-zint": "w4g128", "w4g128-zfloat": "w4g128-zfloat", "w8-asym-zfloat": "w8-asym-zfloat",
    "w2g64-mse-zfloat": "w2g64-mse-zfloat", "w8-sym-zint": "w8",
}

BAD_SCHEMES = ["w9", "w1", "w0", "w10", "w4g", "w4g1", "q4", "", "   ", "w4g128-foo", "int3",
               "w4x", "4", "w", "w8a4", "w4-p50", "w4-p", "w4-p101", "w8-static", "w4g128 sym",
               "w4g128--sym", "w4g0", "w4g128-zfloat-zint", "w4g128-zint-zfloat", "w8-zfloat",
               "w4g128-sym-zfloat", "w4g128-zdouble", "w4g128-z"]

SPEC_DEFAULTS = dict(granularity="channel", group_size=None, scale_dtype="float16",
                     range_method="minmax", percentile=99.9, zero_point_form="int")
# schemes that also quantize inputs -> their input spec
INPUT_FORMS = {"w8a8": ActSpec(), "int8": ActSpec(),
               "w8a8-static": ActSpec(static=True, granularity="tensor")}

W4G128_JSON = ('{"bits": 4, "granularity": "group", '
               '"group_size": 128, "percentile": 99.9, "range_method": "minmax", '
               '"scale_dtype": "float16", "symmetric": false, "zero_point_form": "int"}')


@pytest.mark.parametrize("scheme", list(NAMED_FORMS))
def test_named_form_parses_to_expected_fields(scheme):
    parsed = parse(scheme)
    expected = {**SPEC_DEFAULTS, **NAMED_FORMS[scheme]}
    assert dataclasses.asdict(parsed.weight) == expected
    assert parsed.input == INPUT_FORMS.get(scheme.strip().lower())


@pytest.mark.parametrize("alias,target", sorted(ALIASES.items()))
def test_aliases_equal_their_targets(alias, target):
    assert (alias, target) in {("int8", "w8a8"), ("int4", "w4g128")}
    assert parse(alias) == parse(target)


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static", "int8"])
def test_parse_scheme_refuses_input_schemes(scheme):
    """parse_scheme returns a weight spec: an input scheme must not lose its input part silently."""
    with pytest.raises(SchemeError, match="also quantizes inputs"):
        parse_scheme(scheme)


CONTRADICTIONS = ["w4g128-sym-asym", "w8-p99.9-mse", "w8-sfloat16-sfloat32", "w8-sym-sym",
                  "w4g32-mse-greedy", "w8a8-static-static", "w4-minmax-p99", "w8-asym-sym"]


@pytest.mark.parametrize("bad", CONTRADICTIONS)
def test_contradictory_or_repeated_suffixes_raise(bad):
    """Regression: these kept the last suffix in silence."""
    with pytest.raises(SchemeError, match="repeats|contradicts") as info:
        parse(bad)
    assert VALID_FORMS in str(info.value)


def test_scheme_json_round_trip_and_bad_dicts():
    s = parse("w8a8-static-mse")
    assert Scheme.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert parse(s.name) == s
    for bad in ({"weight": 4}, {"input": None}, {"weight": s.weight.to_dict(), "extra": 1}, [1]):
        with pytest.raises(SchemeError):
            Scheme.from_dict(bad)
    with pytest.raises(SchemeError, match="static input ranges are per tensor"):
        ActSpec(static=True)
    with pytest.raises(SchemeError, match="observer must be one of"):
        ActSpec(observer="magic")


@pytest.mark.parametrize("bits", range(2, 9))
def test_default_symmetry_by_bits_and_granularity(bits):
    expect_sym = bits == 8
    assert parse_scheme(f"w{bits}").symmetric is expect_sym
    assert parse_scheme(f"w{bits}t").symmetric is expect_sym
    assert parse_scheme(f"w{bits}g32").symmetric is expect_sym
    assert parse_scheme(f"w{bits}r").symmetric is False  # per row is always asymmetric by default


@pytest.mark.parametrize("scheme,name", sorted(CANONICAL_NAMES.items()))
def test_canonical_name(scheme, name):
    assert parse(scheme).name == name


@pytest.mark.parametrize("scheme", list(NAMED_FORMS))
def test_name_round_trip(scheme):
    spec = parse(scheme)
    assert parse(spec.name) == spec
    assert parse(spec.name).name == spec.name


@pytest.mark.parametrize("scheme", list(NAMED_FORMS))
def test_json_round_trip(scheme):
    spec = parse(scheme).weight
    assert QuantSpec.from_json(spec.to_json()) == spec
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_json_is_sorted_and_stable():
    assert parse_scheme("w4g128").to_json() == W4G128_JSON


def test_parse_passes_a_spec_through():
    spec = parse_scheme("w4g32")
    assert parse_scheme(spec) is spec


@pytest.mark.parametrize("bad", BAD_SCHEMES)
def test_bad_scheme_raises_with_valid_forms(bad):
    with pytest.raises(SchemeError) as info:
        parse_scheme(bad)
    msg = str(info.value)
    assert "w4g128" in msg
    assert VALID_FORMS in msg


@pytest.mark.parametrize("bad", [None, 4, 4.0, b"w4g128", ["w8"]])
def test_non_string_scheme_raises(bad):
    with pytest.raises(SchemeError, match="w4g128"):
        parse_scheme(bad)


def test_bad_scheme_message_quotes_the_input():
    with pytest.raises(SchemeError, match="'w4g128-foo'"):
        parse_scheme("w4g128-foo")
    with pytest.raises(SchemeError, match="-foo"):
        parse_scheme("w4g128-foo")


def test_schemeerror_is_a_valueerror():
    assert issubclass(SchemeError, ValueError)


def test_quantspec_is_frozen():
    spec = parse_scheme("w4g128")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.group_size = 32  # type: ignore[misc]
    assert spec.bits == 4 and spec.group_size == 128


def test_quantspec_hash_and_eq():
    assert hash(parse_scheme("int4")) == hash(parse_scheme("w4g128"))
    assert len({parse_scheme(s) for s in ("w4g128", "int4", "W4G128", "w4g128-asym")}) == 1
    assert parse_scheme("w4g128") != parse_scheme("w4g128-sym")


@pytest.mark.parametrize("bits,qmax", [(2, 3), (3, 7), (4, 15), (5, 31), (6, 63), (7, 127), (8, 255)])
def test_qmax(bits, qmax):
    assert QuantSpec(bits=bits, symmetric=False).qmax == qmax


BAD_FIELDS = [
    dict(bits=1, symmetric=False),
    dict(bits=9, symmetric=False),
    dict(bits=4.0, symmetric=False),
    dict(bits="4", symmetric=False),
    dict(bits=True, symmetric=False),
    dict(bits=4, symmetric=False, granularity="block"),
    dict(bits=4, symmetric=False, granularity="group"),  # group without a size
    dict(bits=4, symmetric=False, granularity="channel", group_size=128),  # size without group
    dict(bits=4, symmetric=False, granularity="group", group_size=1),
    dict(bits=4, symmetric=False, granularity="group", group_size=0),
    dict(bits=4, symmetric=False, granularity="group", group_size=32.0),
    dict(bits=4, symmetric=False, scale_dtype="bfloat16"),
    dict(bits=4, symmetric=False, range_method="kmeans"),
    dict(bits=4, symmetric=False, percentile=50.0),
    dict(bits=4, symmetric=False, percentile=100.5),
    dict(bits=4, symmetric=False, percentile=float("nan")),
    dict(bits=8, symmetric=True, act_bits=8),  # inputs live in ActSpec, not in the weight spec
    dict(bits=4, symmetric=False, zero_point_form="fp16"),
    dict(bits=4, symmetric=False, zero_point_form=None),
    dict(bits=4, symmetric=True, zero_point_form="float"),  # symmetric: implicit integer zero point
]


@pytest.mark.parametrize("fields", BAD_FIELDS, ids=[str(f) for f in BAD_FIELDS])
def test_quantspec_validates_fields(fields):
    with pytest.raises((SchemeError, TypeError)):
        QuantSpec(**fields)


def test_quantspec_accepts_edges():
    assert QuantSpec(bits=2, symmetric=False, granularity="group", group_size=2).group_size == 2
    assert QuantSpec(bits=8, symmetric=True, range_method="percentile", percentile=100.0).percentile == 100.0


def test_with_validates():
    spec = parse_scheme("w4g128")
    assert spec.with_(group_size=32) == parse_scheme("w4g32")
    with pytest.raises(SchemeError):
        spec.with_(bits=9)
    with pytest.raises(SchemeError):
        spec.with_(granularity="channel")  # group_size 128 left behind


def test_from_dict_rejects_unknown_fields():
    d = parse_scheme("w8").to_dict()
    d["rounding"] = "stochastic"
    with pytest.raises(SchemeError, match="rounding"):
        QuantSpec.from_dict(d)


def test_from_dict_validates_values():
    d = parse_scheme("w8").to_dict()
    d["bits"] = 12
    with pytest.raises(SchemeError):
        QuantSpec.from_dict(d)


def test_name_round_trip_keeps_percentile_precision():
    spec = parse_scheme("w4g128-p99.99999")
    assert spec.percentile == 99.99999
    assert parse_scheme(spec.name) == spec


def test_unused_percentile_is_rejected():
    with pytest.raises(SchemeError, match="percentile=99.0 is set but range_method"):
        QuantSpec(bits=4, symmetric=False, percentile=99.0)


def test_quantspec_validates_symmetric_is_bool():
    with pytest.raises(SchemeError):
        QuantSpec(bits=4, symmetric="no")  # type: ignore[arg-type]


# A spec dict as lowbit wrote it before zero_point_form existed (asymmetric meant a float zero point)
LEGACY_W4G128 = {"act_bits": None, "act_static": False, "bits": 4, "granularity": "group",
                 "group_size": 128, "percentile": 99.9, "range_method": "minmax",
                 "scale_dtype": "float16", "symmetric": False}


def test_from_dict_without_zero_point_form_is_the_old_float_form():
    spec = QuantSpec.from_dict(LEGACY_W4G128)
    assert spec.zero_point_form == "float"
    assert spec == parse_scheme("w4g128-zfloat")
    assert spec.name == "w4g128-zfloat"
    with pytest.raises(SchemeError, match="belong in ActSpec"):
        QuantSpec.from_dict({**LEGACY_W4G128, "act_bits": 8})


def test_from_dict_without_zero_point_form_symmetric_is_int():
    legacy = {k: v for k, v in parse_scheme("w8").to_dict().items() if k != "zero_point_form"}
    assert QuantSpec.from_dict(legacy) == parse_scheme("w8")


def test_new_specs_default_to_the_integer_zero_point():
    assert parse_scheme("w4g128").zero_point_form == "int"
    assert QuantSpec(bits=4, symmetric=False).zero_point_form == "int"
    assert QuantSpec.from_dict(parse_scheme("w4g128").to_dict()).zero_point_form == "int"


def test_contradictory_zero_point_suffixes_are_named():
    with pytest.raises(SchemeError, match="-zfloat contradicts -zint"):
        parse_scheme("w4g128-zint-zfloat")
    with pytest.raises(SchemeError, match="zero_point_form must be 'int'"):
        parse_scheme("w4g128-sym-zfloat")

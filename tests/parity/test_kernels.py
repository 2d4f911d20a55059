"""Parity: every fast path in `lowbit.kernels.cpu` against its plain-torch reference twin.

The packed paths (``int4mm``, ``int8mm``) round activations, parameters and output to bf16; three
references, each isolating one source of error:

* ``ref``      `cpu.ref_linear`: fp32 dequantization by `primitives`, fp32 matmul (the truth);
* ``ref_bf16x`` ``x.bfloat16().float() @ dequant.T``: the same, with the activations rounded to bf16
               as the fast paths round them, so what is left is the weight-parameter rounding
               (scale / zero in bf16) and the bf16 output;
* ``ref_own``  the activations in bf16 *and* the weight rebuilt in fp32 from the exact bf16
               parameters the kernel is handed, so all that is left is the bf16 rounding of the
               output (one rounding: at most ``BF16_U`` of the largest output).

The ``f32`` path is all fp32: it dequantizes as ``q * scale + offset`` with ``offset = -zp * scale``
where ``ref`` computes ``(q - zp) * scale``, so the fp32 rounding of those two forms is all that
separates them (nothing at all with float16 scales and zero points: every product is exact in fp32).

Errors are ``max|fast - ref| / max|ref|`` over a whole (M, N) output. The numbers behind each
tolerance were measured on this CPU (torch 2.13, seeded inputs below) and are quoted next to it.
"""
from __future__ import annotations

import functools
import os
import re

import pytest
import torch
import torch.nn.functional as F

from lowbit.kernels import bf16, cpu
from lowbit.nn import QConv2d, QEmbedding, QLinear
from lowbit.primitives import QuantizedWeight, pack, quantize_weight, unpack
from lowbit.primitives.affine import implicit_zero_point
from lowbit.spec import parse_scheme

BF16_U = 2.0 ** -8  # unit roundoff of bfloat16 (8 significand bits): |fl(x) - x| <= BF16_U * |x|
F32_U = 2.0 ** -24  # unit roundoff of float32

# Error budgets, relative to max|ref|. In brackets: the worst case measured over the matrix below
# (seeded; torch 2.13 CPU), then over the full K x N cross product measured while choosing them.
INT4_TOL = 0.01          # int4mm vs ref [0.0051; 0.0065], vs ref_bf16x [0.0046; 0.0052]
INT8_TOL = 0.01          # int8mm vs ref [0.0052; 0.0060], vs ref_bf16x [0.0056; 0.0060]
# f32 path vs ref: float16 scales (every FAST_SCHEMES entry) [0 exactly; 0]; float32 scales
# (F32_SCALE_SCHEMES) [4.2e-7; 4.6e-7], the fp32 rounding of q*scale + offset vs (q - zp)*scale
# carried through the matmul.
F32_PATH_TOL = 1e-5
# dequant_f32 vs QuantizedWeight.dequantize, elementwise in units of F32_U * (q + |zp|) * scale:
# first-order bound 4 (q*scale, offset and the sum in one form; q - zp and the product in the
# other), measured [1.99; 1.99] with float32 scales; relative to max|dequant| [1.2e-7; 1.2e-7].
F32_DEQUANT_ULPS = 4
OWN_PARAMS_TOL = 1.25 * BF16_U   # any fast path vs ref_own [0.0037 = 0.95 BF16_U; 0.0038]
ACT_ROUND_TOL = 0.005            # ref vs ref_bf16x, activation rounding alone [0.0015; 0.0031]

BF16_TOL = 0.01         # bf16 path vs ref: bf16 activations and weights, measured in tests/parity/test_bf16.py
PATH_TOL = {"int4mm": INT4_TOL, "int8mm": INT8_TOL, "f32": F32_PATH_TOL, "bf16": BF16_TOL}

M_VALUES = (1, 7, 64, 65, 300)
K_VALUES = (128, 384, 1024)
N_VALUES = (16, 384, 1536)
# w4g*: integer (uint8) zero points, the default; -zfloat keeps the float-zero-point form covered
FAST_SCHEMES = ("w4g32", "w4g64", "w4g128", "w4g256", "w4g128-sym", "w8", "w4g32-zfloat", "w4g128-zfloat")
# The same with float32 scales (and zero points): the only specs where the f32 path rounds at all.
F32_SCALE_SCHEMES = tuple(f"{s}-sfloat32" for s in FAST_SCHEMES)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref| over the whole tensor."""
    ref = ref.float()
    return ((a.float() - ref).abs_().max() / ref.abs().max()).item()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_weight(n: int, k: int, seed: int) -> torch.Tensor:
    """Gaussian weights with a per-row offset, so asymmetric zero points move away from the middle."""
    g = seeded(seed)
    return torch.randn(n, k, generator=g) * 0.05 + 0.02 * torch.randn(n, 1, generator=g)


@functools.lru_cache(maxsize=None)
def layer(scheme: str, k: int, n: int) -> tuple[QuantizedWeight, QLinear, torch.Tensor]:
    """A quantized weight, its QLinear and its fp32 dequantization, built once per test session."""
    qw = quantize_weight(make_weight(n, k, seed=k * 7 + n), parse_scheme(scheme))
    return qw, QLinear(qw, None), qw.dequantize(torch.float32)


def matrix_cases(schemes=FAST_SCHEMES):
    """Every K with N = 384 and every N with the largest K, for each scheme (every K, N and M value
    meets every scheme without paying for the full cross product)."""
    for scheme in schemes:
        gs = parse_scheme(scheme).group_size
        shapes = [(k, 384) for k in K_VALUES] + [(K_VALUES[-1], n) for n in N_VALUES if n != 384]
        for k, n in shapes:
            if not (gs and k % gs):
                yield scheme, k, n


CASES = list(matrix_cases())
F32_CASES = CASES + list(matrix_cases(F32_SCALE_SCHEMES))


def fast_path(scheme: str) -> str:
    return "int8mm" if parse_scheme(scheme).bits == 8 else "int4mm"


def own_weight(qw: QuantizedWeight, path: str) -> torch.Tensor:
    """(out, in) fp32 weight rebuilt from exactly the bf16 parameters packed ``path`` uses."""
    rows, cols = qw.shape
    q = qw.codes().float()
    if path == "int4mm":
        _, sz = cpu.prepare_int4(qw)  # (groups, out, 2)
        gs = qw.spec.group_size
        scale = sz[..., 0].float().t().repeat_interleave(gs, dim=1)
        zero = sz[..., 1].float().t().repeat_interleave(gs, dim=1)
        return (q - 8) * scale + zero
    assert path == "int8mm", path
    w8, s8 = cpu.prepare_int8(qw)
    return w8.float() * s8.float()[:, None]


def zp_and_scale(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero point and scale per element (out, in) in fp32."""
    per = qw.shape[1] // qw.scale.shape[1]
    s = qw.scale.float().repeat_interleave(per, dim=1)
    zp = (torch.full_like(s, float(implicit_zero_point(qw.spec))) if qw.zero_point is None
          else qw.zero_point.float().repeat_interleave(per, dim=1))
    return zp, s


@pytest.fixture
def taken(monkeypatch) -> list[str]:
    """Names of the `cpu` *_linear functions QLinear.forward calls, in order."""
    calls: list[str] = []
    names = {"int4mm": (cpu, "int4_linear"), "int8mm": (cpu, "int8_linear"), "f32": (cpu, "f32_linear"),
             "ref": (cpu, "ref_linear"), "bf16": (bf16, "bf16_linear")}
    assert set(names) == set(cpu.PATHS)
    for path, (mod, name) in names.items():
        def spy(*args, _fn=getattr(mod, name), _path=path):
            calls.append(_path)
            return _fn(*args)
        monkeypatch.setattr(mod, name, spy)
    return calls


def pinned_choice(qw: QuantizedWeight) -> str:
    """The path the suite's pinned selector (tests/conftest.py) gives a layer: the first offered."""
    order = os.environ["LOWBIT_KERNEL"].split(",")
    return next(p for p in order if p in cpu.available_paths(qw))


# ------------------------------------------------------------------------------------------------
# QLinear fast paths vs references


def test_matrix_covers_every_int4_group_size():
    assert {parse_scheme(s).group_size for s, _, _ in CASES} >= set(cpu.INT4_GROUP_SIZES)


@pytest.mark.parametrize("scheme,k,n", CASES)
def test_forced_packed_path_matches_references(scheme, k, n):
    qw, lin, deq = layer(scheme, k, n)
    path = fast_path(scheme)
    tol = PATH_TOL[path]
    w_own = own_weight(qw, path)
    g = seeded(1000 + k + n)
    lin.force_path = path
    try:
        for m in M_VALUES:
            x = torch.randn(m, k, generator=g)
            xb = x.bfloat16().float()
            y = lin(x)
            assert y.shape == (m, n) and y.dtype == torch.float32
            ref = F.linear(x, deq)  # = cpu.ref_linear(x, qw) bit for bit (see test_ref_path_...)
            e_ref = rel_err(y, ref)
            e_act = rel_err(y, xb @ deq.T)
            e_own = rel_err(y, xb @ w_own.T)
            assert e_ref <= tol, f"{path} M={m}: {e_ref:.5f} vs ref > {tol}"
            assert e_act <= tol, f"{path} M={m}: {e_act:.5f} vs bf16-activation ref > {tol}"
            assert e_own <= OWN_PARAMS_TOL, f"{path} M={m}: {e_own:.5f} vs own-params ref > {OWN_PARAMS_TOL}"
    finally:
        lin.force_path = None


@pytest.mark.parametrize("scheme,k,n", F32_CASES)
def test_f32_path_matches_ref(scheme, k, n):
    qw, lin, deq = layer(scheme, k, n)
    exact = qw.spec.scale_dtype == "float16"   # see the module docstring
    w_own = cpu.dequant_f32(qw, *cpu.f32_params(qw))
    g = seeded(1000 + k + n)
    lin.set_path("f32")
    try:
        for m in M_VALUES:
            x = torch.randn(m, k, generator=g)
            y = lin(x)
            assert y.shape == (m, n) and y.dtype == torch.float32
            ref = F.linear(x, deq)
            e_ref = rel_err(y, ref)
            assert e_ref <= F32_PATH_TOL, f"f32 M={m}: {e_ref:.3g} vs ref > {F32_PATH_TOL}"
            # the same fp32 matmul on its own weight, bit for bit: all the error is in dequant_f32
            assert torch.equal(y, F.linear(x, w_own)), f"f32 M={m}: not F.linear(x, dequant_f32)"
            if exact:
                assert torch.equal(y, ref), f"f32 M={m}: float16 scales should match ref exactly"
    finally:
        lin.set_path(None)


@pytest.mark.parametrize("scheme", FAST_SCHEMES + ("w3g128", "w2g64", "w8-asym", "w4"))
def test_ref_path_is_fp32_dequant_matmul(scheme):
    k, n = 256, 48
    qw = quantize_weight(make_weight(n, k, seed=3), parse_scheme(scheme))
    lin = QLinear(qw, None)
    lin.force_path = "ref"
    x = torch.randn(9, k, generator=seeded(4))
    y = lin(x)
    assert torch.equal(y, cpu.ref_linear(x, qw))
    assert torch.equal(y, F.linear(x, qw.dequantize(torch.float32)))
    # rounding the activations to bf16 alone costs this much: the floor under every fast path
    assert rel_err(y, x.bfloat16().float() @ qw.dequantize().T) <= ACT_ROUND_TOL


@pytest.mark.parametrize("scheme", FAST_SCHEMES + ("w3g128",))
def test_unforced_forward_uses_the_chosen_path(scheme, taken):
    k, n = 256, 32
    qw = quantize_weight(make_weight(n, k, seed=5), parse_scheme(scheme))
    lin = QLinear(qw, None)
    g = seeded(6)
    for m in (1, 7, 49, 300):
        x = torch.randn(m, k, generator=g)
        chosen = pinned_choice(qw)
        assert lin.path_for(m) == chosen
        taken.clear()
        auto = lin(x)
        assert taken == [chosen], f"M={m}: forward took {taken}, the selector says {chosen}"
        lin.set_path(chosen)
        forced = lin(x)
        lin.set_path(None)
        assert torch.equal(auto, forced), f"M={m}: forward did not take path {chosen}"


def test_selector_decides_per_row_bucket(monkeypatch):
    """Unpinned, a layer asks its selector once per row bucket and remembers the answer."""
    from lowbit.kernels.select import KernelSelector
    monkeypatch.delenv("LOWBIT_KERNEL")
    qw = quantize_weight(make_weight(32, 256, seed=5), parse_scheme("w4g128"))
    lin = QLinear(qw, None)
    asked = []

    class Recording(KernelSelector):
        def choose(self, key, rows, candidates, reference=None):
            asked.append((rows, sorted(candidates)))
            return "f32" if rows > 8 else "int4mm"
    lin.selector = Recording()
    assert [lin.path_for(m) for m in (1, 1, 3, 64, 100, 5000)] == \
        ["int4mm", "int4mm", "int4mm", "f32", "f32", "f32"]
    assert [r for r, _ in asked] == [1, 3, 64, 5000]  # buckets 1, 2-8, 33-128, 513+
    assert asked[0][1] == ["bf16", "f32", "int4mm"]


# ------------------------------------------------------------------------------------------------
# QLinear.set_path


def test_paths():
    assert cpu.PATHS == ("int4mm", "int8mm", "bf16", "f32", "ref")


@pytest.mark.parametrize("scheme,valid", [
    ("w4g128", ("int4mm", "bf16", "f32", "ref")),
    ("w4g32-sfloat32", ("int4mm", "bf16", "f32", "ref")),
    ("w8", ("int8mm", "bf16", "f32", "ref")),
    ("w3g128", ("ref",)),
    ("w8-asym", ("bf16", "ref")),
])
def test_set_path_pins_the_path_used(scheme, valid, taken):
    k, n = 256, 32
    qw = quantize_weight(make_weight(n, k, seed=21), parse_scheme(scheme))
    lin = QLinear(qw, None)
    assert tuple(p for p in cpu.PATHS if cpu.path_supported(qw, p)) == valid
    deq = qw.dequantize(torch.float32)
    g = seeded(22)
    xs = [torch.randn(m, k, generator=g) for m in (1, 300)]   # one row each side of every threshold
    for path in valid:
        lin.set_path(path)
        assert lin.force_path == path
        for x in xs:
            assert lin.path_for(x.shape[0]) == path
            taken.clear()
            y = lin(x)
            assert taken == [path], f"pinned {path}, M={x.shape[0]}: forward took {taken}"
            ref = F.linear(x, deq)
            assert rel_err(y, ref) <= PATH_TOL.get(path, 0.0), path
    lin.set_path(None)
    assert lin.force_path is None
    for x in xs:
        taken.clear()
        lin(x)
        assert taken == [pinned_choice(qw)]


@pytest.mark.parametrize("path", ["bf32", "fp32", "F32", "int4", "", "auto"])
def test_set_path_rejects_unknown_path(path):
    qw = quantize_weight(make_weight(32, 256, seed=23), parse_scheme("w4g128"))
    lin = QLinear(qw, None)
    lin.set_path("int4mm")
    with pytest.raises(ValueError, match=re.escape(repr(path))):
        lin.set_path(path)
    assert lin.force_path == "int4mm"   # a refused pin leaves the old one


@pytest.mark.parametrize("scheme,path", [
    ("w8", "int4mm"),          # an 8-bit layer has no int4 pack
    ("w3g128", "f32"),         # 3-bit codes: only ref
    ("w3g128", "int4mm"), ("w3g128", "int8mm"),
    ("w4g128", "int8mm"),
    ("w8-asym", "int8mm"), ("w8-asym", "f32"),   # int8mm (and so f32) is symmetric only
    ("w4g128", "int4mm"),      # supported in general, but 24 out features is no multiple of 16
])
def test_set_path_rejects_unsupported_path(scheme, path):
    n = 24 if (scheme, path) == ("w4g128", "int4mm") else 32
    qw = quantize_weight(make_weight(n, 256, seed=24), parse_scheme(scheme))
    assert not cpu.path_supported(qw, path)
    lin = QLinear(qw, None)
    with pytest.raises(ValueError, match=re.escape(repr(path))):
        lin.set_path(path)
    assert lin.force_path is None
    lin.set_path("ref")                 # always available
    assert lin.path_for(1) == "ref"


# ------------------------------------------------------------------------------------------------
# which paths a weight offers (the selector chooses among these on the host)


@pytest.mark.parametrize("scheme", ["w4g32", "w4g64", "w4g128", "w4g256", "w4g128-sym"])
def test_available_paths_int4(scheme):
    qw = quantize_weight(make_weight(32, 512, seed=7), parse_scheme(scheme))
    assert cpu.available_paths(qw) == ("int4mm", "bf16", "f32")


def test_available_paths_int8():
    qw = quantize_weight(make_weight(24, 48, seed=8), parse_scheme("w8"))
    assert cpu.available_paths(qw) == ("int8mm", "bf16", "f32")


@pytest.mark.parametrize("k", [40, 100, 104, 120])
def test_int8_kernel_refused_when_in_features_not_multiple_of_16(k):
    """torch 2.13's _weight_int8pack_mm returns garbage or crashes for K % 16 != 0."""
    qw = quantize_weight(make_weight(32, k, seed=11), parse_scheme("w8"))
    assert not cpu.int8_supported(qw)
    assert "int8mm" not in cpu.available_paths(qw)
    lin = QLinear(qw, None)
    with pytest.raises(ValueError, match="int8mm"):
        lin.set_path("int8mm")
    lin.set_path("ref")
    x = torch.randn(2, k, generator=seeded(12))
    assert torch.equal(lin(x), cpu.ref_linear(x, qw))


def test_empty_batch_and_non_contiguous_input():
    qw4 = quantize_weight(make_weight(32, 256, seed=13), parse_scheme("w4g128"))
    qw8 = quantize_weight(make_weight(32, 256, seed=13), parse_scheme("w8"))
    for qw in (qw4, qw8):
        lin = QLinear(qw, None)
        assert lin(torch.zeros(0, 256)).shape == (0, 32)
        x = torch.randn(256, 6, generator=seeded(14)).t()  # (6, 256), not contiguous
        assert torch.equal(lin(x), lin(x.contiguous()))


@pytest.mark.parametrize("scheme,shape,paths", [
    ("w3g128", (32, 256), ("ref",)), ("w2g64", (32, 256), ("ref",)), ("w3g32", (16, 64), ("ref",)),
    ("w2g32", (16, 64), ("ref",)),
    ("w4g128", (24, 256), ("bf16",)),   # out features not a multiple of 16: no int4 pack
    ("w4g16", (32, 64), ("bf16",)),     # group size the int4 kernel does not take
    ("w4", (32, 64), ("bf16",)),        # per channel 4-bit
    ("w8-asym", (32, 64), ("bf16",)),   # int8mm is symmetric only
    ("w8g32", (32, 64), ("bf16",)), ("w8t", (32, 64), ("ref",)), ("w6", (32, 64), ("ref",)),
])
def test_paths_without_a_packed_kernel(scheme, shape, paths):
    qw = quantize_weight(make_weight(*shape, seed=9), parse_scheme(scheme))
    assert cpu.available_paths(qw) == paths
    lin = QLinear(qw, None)
    x = torch.randn(3, shape[1], generator=seeded(10))
    lin.set_path("ref")
    assert torch.equal(lin(x), cpu.ref_linear(x, qw))
    lin.set_path(None)
    tol = PATH_TOL.get(paths[0], 0.0)
    assert rel_err(lin(x), cpu.ref_linear(x, qw)) <= tol
